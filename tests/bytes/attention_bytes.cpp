// attention_bytes DIR: the raw bytes of the CPU attention op's outputs and gradients (o, lse, dq,
// dk, dv, dbias) in float32 and float64 for every case of attention_cases.h and kMoreCases, one
// file per (case, dtype, tensor) under DIR. Two builds that must agree bit for bit (a kernel
// rewrite that only changes speed) write two directories, and `diff -r` compares them.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../attention_cases.h"

namespace {
using namespace dilatron;
using namespace dilatron::test;

// Beyond the suite's: head dims that are no multiple of 8 (products' single-column tails), segments
// small enough for the per-thread segment copies, the benchmark's schedule (branches wider than N).
const std::vector<AttentionCase> kMoreCases = {
    {"d12_causal_dropout_bias", 2, 97, 3, 12, "32:1,97:4k", true, 0.3, true, false},
    {"d20_causal", 1, 300, 4, 20, "64:1,300:2", true, 0.0, false, false},
    {"d28_ragged_1025", 1, 1025, 2, 28, "100:1,1025:3", false, 0.0, false, false},
    {"segment_copies_causal_2048", 1, 2048, 8, 64, "256:1,512:2", true, 0.0, false, false},
    {"segment_copies_dropout_bias_2048", 1, 2048, 8, 32, "128:1,512:4", false, 0.3, true, false},
    {"bench_schedule_causal_4096", 1, 4096, 8, 64, "1024:1,4096:4,16384:16", true, 0.0, false, false},
    {"key_dilated_causal_dropout_bias_2049", 1, 2049, 4, 64, "512:1,2048:4k", true, 0.3, true, false},
};

void write(const std::filesystem::path& file, const Tensor& t) {
  const Tensor c = t.contiguous();
  std::ofstream(file, std::ios::binary)
      .write(static_cast<const char*>(c.raw_data()), static_cast<std::streamsize>(c.numel() * dtype_size(c.dtype())));
}

void run(const AttentionCase& c, DType dtype, const std::filesystem::path& dir) {
  Generator gen(1234);
  auto leaf = [&](const Shape& s) {
    return Tensor::randn(s, gen, DType::Float32, 0.0, 1.0).to(dtype).requires_grad_();
  };
  const Shape shape{c.B, c.N, c.H, c.D};
  attention_reference::Problem p;
  p.schedule = parse_schedule(c.schedule);
  p.causal = c.causal;
  p.p = c.dropout;
  p.seed = 0x9e3779b97f4a7c15ULL;
  p.offset = 7;
  p.num_buckets = 8;
  p.max_distance = 40;
  Tensor q = leaf(shape), k = leaf(shape), v = leaf(shape);
  Tensor bias = c.bias ? leaf({c.H, p.num_buckets}) : Tensor();
  const Tensor dout = Tensor::randn(shape, gen, DType::Float32, 0.0, 1.0).to(dtype);
  const AttentionOutput out = dilated_attention_with_lse(q, k, v, oracle_options(p), bias);
  out.o.backward(dout);
  const std::string stem = c.name + "." + std::string(dtype_name(dtype)) + ".";
  write(dir / (stem + "o"), out.o);
  write(dir / (stem + "lse"), out.lse);
  write(dir / (stem + "dq"), q.grad());
  write(dir / (stem + "dk"), k.grad());
  write(dir / (stem + "dv"), v.grad());
  if (c.bias) write(dir / (stem + "dbias"), bias.grad());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: attention_bytes DIR\n");
    return 2;
  }
  const std::filesystem::path dir = argv[1];
  std::filesystem::create_directories(dir);
  std::vector<AttentionCase> cases = kAttentionCases;
  cases.insert(cases.end(), kMoreCases.begin(), kMoreCases.end());
  for (const AttentionCase& c : cases)
    for (const DType dtype : {DType::Float32, DType::Float64}) run(c, dtype, dir);
  std::printf("%zu cases x 2 dtypes written to %s\n", cases.size(), dir.c_str());
}
