// `dilatron attention`: run the dilated attention op on q, k, v (and optionally do, bias) from an
// HDF5 file and write o, lse (and dq, dk, dv, dbias) to another: how users check the op against
// their own model.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "commands.h"
#include "dilatron/attention.h"
#include "dilatron/autograd.h"
#include "dilatron/hdf5.h"

namespace dilatron::cli {
namespace {

struct AttentionArgs {
  std::string in, out, schedule, dtype, device = "cpu";
  bool causal = false;
  std::optional<double> scale;
  double dropout = 0.0;
  uint64_t seed = 0;
  uint32_t offset = 0;
  int64_t bias_buckets = 32, bias_max_distance = 128;
};

Tensor read_input(h5::File& file, const std::string& path, const std::string& name, DType dtype, Device device) {
  Tensor t = file.read(name);
  DILATRON_CHECK(is_floating(t.dtype()), "'", path, "': dataset '", name, "' is ", dtype_name(t.dtype()),
                 "; expected float32 or float64");
  return t.to(dtype).to(device);
}

// The result is renamed over --out, which replaces whatever the path names: only a new path or a
// regular file other than --in may be replaced. A symlink is refused rather than replaced by a file
// (its target would never be written).
void check_out_path(const std::string& in, const std::string& out) {
  namespace fs = std::filesystem;
  const fs::file_status st = fs::symlink_status(out);
  if (!fs::exists(st)) return;
  DILATRON_CHECK(!fs::is_symlink(st), "--out '", out, "' is a symbolic link; refusing to replace it (give the path "
                 "it points to, or remove it)");
  DILATRON_CHECK(fs::is_regular_file(st), "--out '", out, "' exists and is not a regular file (",
                 fs::is_directory(st) ? "a directory" : "a device, fifo or socket", "); refusing to replace it");
  std::error_code ec;
  DILATRON_CHECK(!fs::equivalent(in, out, ec), "--out '", out, "' is the input file --in '", in,
                 "'; refusing to overwrite it");
}

void run_attention(const AttentionArgs& a) {
  check_out_path(a.in, a.out);
  // What a killed run left beside --out (its atomic_write temporaries can be large).
  const std::filesystem::path out_path(a.out);
  for (const std::string& tmp : h5::remove_orphaned_temporaries(out_path.parent_path().string(),
                                                                out_path.filename().string()))
    std::fprintf(stderr, "removed '%s', left by a process that is no longer running\n", tmp.c_str());
  h5::File in = h5::File::open(a.in, h5::Mode::ReadOnly);
  for (const char* name : {"q", "k", "v"})
    DILATRON_CHECK(in.has(name), "'", a.in, "' has no dataset '", name, "' (needs q, k, v of shape [B, N, H, D])");
  // Without --dtype, q's own dtype: an integer q is reported by read_input, naming the file and dataset.
  const DType dtype = a.dtype.empty() ? in.read("q").dtype() : dtype_from_name(a.dtype);
  DILATRON_CHECK(a.dtype.empty() || is_floating(dtype), "--dtype ", a.dtype, ": expected float32 or float64");
  const Device device = Device::parse(a.device);

  Tensor q = read_input(in, a.in, "q", dtype, device);
  Tensor k = read_input(in, a.in, "k", dtype, device);
  Tensor v = read_input(in, a.in, "v", dtype, device);
  for (const auto& [name, t] : {std::pair{"k", k}, std::pair{"v", v}})
    DILATRON_CHECK(t.shape() == q.shape(), "'", a.in, "': dataset '", name, "' has shape ", shape_str(t.shape()),
                   " but 'q' has shape ", shape_str(q.shape()), " (all must be [B, N, H, D])");
  Tensor bias = in.has("bias") ? read_input(in, a.in, "bias", dtype, device) : Tensor();
  Tensor dout = in.has("do") ? read_input(in, a.in, "do", dtype, device) : Tensor();
  if (dout.defined())
    DILATRON_CHECK(dout.shape() == q.shape(), "'", a.in, "': dataset 'do' has shape ", shape_str(dout.shape()),
                   " but 'q' has shape ", shape_str(q.shape()));

  DilatedAttentionOptions opts;
  opts.schedule = parse_schedule(a.schedule);
  opts.causal = a.causal;
  opts.scale = a.scale;
  opts.dropout = a.dropout;
  opts.seed = a.seed;
  opts.offset = a.offset;
  opts.bias_num_buckets = a.bias_buckets;
  opts.bias_max_distance = a.bias_max_distance;

  const bool backward = dout.defined();
  for (Tensor* t : {&q, &k, &v, &bias})
    if (backward && t->defined()) t->requires_grad_(true);
  AttentionOutput res = dilated_attention_with_lse(q, k, v, opts, bias);
  if (backward) res.o.backward(dout);

  h5::atomic_write(a.out, [&](h5::File& out) {
    out.write("o", res.o.detach());
    out.write("lse", res.lse);
    if (backward) {
      out.write("dq", q.grad());
      out.write("dk", k.grad());
      out.write("dv", v.grad());
      if (bias.defined()) out.write("dbias", bias.grad());
    }
    out.set_attr("/", "schedule", a.schedule);
    out.set_attr("/", "causal", static_cast<int64_t>(a.causal));
    out.set_attr("/", "dropout", a.dropout);
  });
  std::printf("wrote %s: o %s, lse %s%s\n", a.out.c_str(), shape_str(res.o.shape()).c_str(),
              shape_str(res.lse.shape()).c_str(), backward ? (bias.defined() ? ", dq, dk, dv, dbias" : ", dq, dk, dv") : "");
}

}  // namespace

void add_attention_command(CLI::App& app) {
  auto [cmd, args] = add_command(app, "attention",
                                 "Run flash dilated attention on q, k, v [B, N, H, D] from an HDF5 file (backward "
                                 "too when it holds 'do')",
                                 run_attention);
  cmd->add_option("--in", args->in, "input .h5 with datasets q, k, v and optionally do, bias")->required();
  cmd->add_option("--out", args->out, "output .h5: o, lse, and dq, dk, dv (dbias) when do is given")->required();
  cmd->add_option("--schedule", args->schedule, "branches segment:dilation,... e.g. 2048:1,4096:2")->required();
  cmd->add_flag("--causal", args->causal, "causal masking (key j <= query t)");
  cmd->add_option("--scale", args->scale, "score scale (default 1/sqrt(D))");
  cmd->add_option("--dropout", args->dropout, "dropout probability on attention weights, in [0, 1)");
  cmd->add_option("--seed", args->seed, "dropout seed");
  cmd->add_option("--offset", args->offset, "dropout offset (one per call)");
  cmd->add_option("--bias-buckets", args->bias_buckets, "relative-position bias buckets (dataset 'bias' [H, NB])");
  cmd->add_option("--bias-max-distance", args->bias_max_distance, "relative-position bias max distance");
  cmd->add_option("--dtype", args->dtype, "float32 or float64 (default: the dtype of q)");
  cmd->add_option("--device", args->device, "cpu or cuda[:N]");
}

}  // namespace dilatron::cli
