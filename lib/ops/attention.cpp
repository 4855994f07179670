#include "dilatron/attention.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron {

using kernels::AttentionParams;
using kernels::BranchKind;
using kernels::key_grid;
using kernels::kMaxBatchHeads;
using kernels::kMaxBranches;
using kernels::kMaxSequence;
using kernels::query_grid;
using kernels::subproblems;

// A segment longer than the sequence is one segment of length N, and a dilation r >= max(N, H)
// gives head h the offset h and at most one grid point per residue, as any larger r does. Positions
// stay absolute, so dropout and bias are unchanged; the kernels and visited_pairs then never form
// s*w, r*H*D or r sub-problems from a huge w or r.
std::vector<AttentionBranch> bounded_schedule(std::vector<AttentionBranch> schedule, int64_t H, int64_t N) {
  const int64_t cap = std::max({N, H, int64_t{1}});
  for (AttentionBranch& br : schedule) {
    br.segment = std::min(br.segment, cap);
    br.dilation = std::min(br.dilation, br.segment);
  }
  return schedule;
}

namespace {

struct DilatedAttentionFunction : autograd::Function<DilatedAttentionFunction> {
  static const char* name() { return "dilated_attention"; }

  // Returns {o, lse}; the caller detaches lse, so only o carries a gradient.
  static std::vector<Tensor> forward(autograd::Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                                     const Tensor& bias, const AttentionParams& params) {
    const Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const Tensor bc = bias.defined() ? bias.contiguous() : Tensor();
    const int64_t B = q.size(0), N = q.size(1), H = q.size(2);
    Tensor o = Tensor::empty(q.shape(), q.options());
    Tensor lse = Tensor::empty({B, H, N}, q.options().with_dtype(compute_dtype(q.dtype())));
    kernels::backend_of(q).dilated_attention_forward(o, lse, qc, kc, vc, bc, params);
    ctx.save_for_backward({qc, kc, vc, bc, o, lse});
    ctx.set("params", params);
    return {o, lse};
  }

  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return {};
    const std::vector<Tensor>& s = ctx.saved();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &bias = s[3], &o = s[4], &lse = s[5];
    const Tensor dout = grads[0].contiguous();
    Tensor dq = Tensor::empty(q.shape(), q.options());
    Tensor dk = Tensor::empty(k.shape(), k.options());
    Tensor dv = Tensor::empty(v.shape(), v.options());
    Tensor dbias = bias.defined() && ctx.needs_input_grad[3] ? Tensor::empty(bias.shape(), bias.options()) : Tensor();
    kernels::backend_of(q).dilated_attention_backward(dq, dk, dv, dbias, dout, q, k, v, o, lse, bias,
                                                      ctx.get<AttentionParams>("params"));
    return {dq, dk, dv, dbias};
  }
};

// The scale and, with a bias table [H, num_buckets], its checks and the bucket of every distance
// below n.
void resolve_scale_and_bias(AttentionParams& params, const DilatedAttentionOptions& opts, const Tensor& q, int64_t D,
                            int64_t n, const Tensor& bias) {
  params.scale = opts.scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  DILATRON_CHECK(std::isfinite(params.scale), "dilated_attention: scale must be finite, got ", params.scale,
                 opts.scale ? "" : " (the default 1/sqrt(D) with D = 0)");
  if (!bias.defined()) return;
  const int64_t H = q.size(2);
  DILATRON_CHECK(bias.dim() == 2 && bias.size(0) == H && bias.size(1) == opts.bias_num_buckets,
                 "dilated_attention: bias must be [H, num_buckets] = [", H, ", ", opts.bias_num_buckets, "], got ",
                 shape_str(bias.shape()));
  DILATRON_CHECK(bias.dtype() == q.dtype(), "dilated_attention: bias dtype ", dtype_name(bias.dtype()),
                 " differs from q's ", dtype_name(q.dtype()));
  DILATRON_CHECK(bias.device() == q.device(), "dilated_attention: bias device ", bias.device().str(),
                 " differs from q's ", q.device().str());
  params.bucket_of_distance = relative_position_buckets(n, opts.causal, opts.bias_num_buckets, opts.bias_max_distance);
  params.bucket_base = n - 1;
}

}  // namespace

// Checks everything the contract rejects (the one validation: backends check only their own
// limits) and resolves the kernel parameters.
AttentionParams attention_params(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionOptions& opts,
                                 const Tensor& bias) {
  DILATRON_CHECK(q.defined() && k.defined() && v.defined(), "dilated_attention: q, k and v must be defined");
  DILATRON_CHECK(q.dim() == 4, "dilated_attention: q must be 4-D [B, N, H, D], got shape ", shape_str(q.shape()));
  DILATRON_CHECK(k.shape() == q.shape() && v.shape() == q.shape(), "dilated_attention: q, k, v shapes differ: q ",
                 shape_str(q.shape()), ", k ", shape_str(k.shape()), ", v ", shape_str(v.shape()));
  DILATRON_CHECK(is_floating(q.dtype()), "dilated_attention: q must be float32, float64 or bfloat16, got ",
                 dtype_name(q.dtype()));
  DILATRON_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(), "dilated_attention: q, k, v dtypes differ: q ",
                 dtype_name(q.dtype()), ", k ", dtype_name(k.dtype()), ", v ", dtype_name(v.dtype()));
  DILATRON_CHECK(k.device() == q.device() && v.device() == q.device(), "dilated_attention: q, k, v devices differ: q ",
                 q.device().str(), ", k ", k.device().str(), ", v ", v.device().str());
  validate_schedule(opts.schedule);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  DILATRON_CHECK(B * H < kMaxBatchHeads, "dilated_attention: B*H = ", B, "*", H, " = ", B * H,
                 " must be < 2^28 (the dropout stream id (b*H + h)*16 + i is 32-bit)");
  DILATRON_CHECK(N < kMaxSequence, "dilated_attention: sequence length N = ", N, " must be < 2^31");
  DILATRON_CHECK(opts.dropout >= 0.0 && opts.dropout < 1.0, "dilated_attention: dropout p must be in [0, 1), got ",
                 opts.dropout);

  AttentionParams params;
  params.schedule = bounded_schedule(opts.schedule, H, N);
  params.causal = opts.causal;
  params.dropout_p = opts.dropout;
  params.seed = opts.seed;
  params.offset = opts.offset;
  resolve_scale_and_bias(params, opts, q, D, N, bias);
  return params;
}

AttentionOutput dilated_attention_with_lse(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const DilatedAttentionOptions& opts, const Tensor& bias) {
  const AttentionParams params = attention_params(q, k, v, opts, bias);
  std::vector<Tensor> out = DilatedAttentionFunction::apply(q, k, v, bias, params);
  return {out[0], out[1].detach()};
}

Tensor dilated_attention(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionOptions& opts,
                         const Tensor& bias) {
  return dilated_attention_with_lse(q, k, v, opts, bias).o;
}

// ---------------------------------------------------------------- schedules

std::vector<AttentionBranch> parse_schedule(const std::string& text) {
  std::vector<AttentionBranch> schedule;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = std::min(text.find(',', begin), text.size());
    std::string token = text.substr(begin, end - begin);
    token.erase(0, token.find_first_not_of(" \t"));
    token.erase(token.find_last_not_of(" \t") + 1);
    const size_t colon = token.find(':');
    AttentionBranch branch;
    auto parse = [](const std::string& s, int64_t& value) {
      const auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
      return ec == std::errc() && ptr == s.data() + s.size() && !s.empty();
    };
    std::string dilation = colon == std::string::npos ? "" : token.substr(colon + 1);
    if (!dilation.empty() && dilation.back() == 'k') {
      branch.kind = BranchKind::key_dilated;
      dilation.pop_back();
    }
    DILATRON_CHECK(colon != std::string::npos && parse(token.substr(0, colon), branch.segment) &&
                       parse(dilation, branch.dilation),
                   "parse_schedule: bad branch \"", token, "\" (branch ", schedule.size(), ") in \"", text,
                   "\": expected segment:dilation pairs separated by commas, a trailing k for a key-dilated "
                   "branch, e.g. \"2048:1,4096:2\" or \"256:1,2048:8k\"");
    schedule.push_back(branch);
    begin = end + 1;
  }
  validate_schedule(schedule);
  return schedule;
}

void validate_schedule(const std::vector<AttentionBranch>& schedule) {
  DILATRON_CHECK(!schedule.empty(), "dilated attention schedule is empty: give at least one (segment, dilation)");
  DILATRON_CHECK(static_cast<int64_t>(schedule.size()) <= kMaxBranches, "dilated attention schedule has ",
                 schedule.size(), " branches; at most ", kMaxBranches, " are allowed");
  for (size_t i = 0; i < schedule.size(); ++i) {
    const auto [w, r, kind] = schedule[i];
    DILATRON_CHECK(w >= 1, "dilated attention branch ", i, ": segment w = ", w, " must be >= 1");
    DILATRON_CHECK(r >= 1, "dilated attention branch ", i, ": dilation r = ", r, " must be >= 1");
    DILATRON_CHECK(r <= w, "dilated attention branch ", i, ": dilation r = ", r, " exceeds segment w = ", w);
  }
}

std::string format_schedule(const std::vector<AttentionBranch>& schedule) {
  std::string text;
  for (const auto& br : schedule) {
    if (!text.empty()) text += ',';
    text += std::to_string(br.segment) + ':' + std::to_string(br.dilation);
    if (br.kind == BranchKind::key_dilated) text += 'k';
  }
  return text;
}

Coverage schedule_coverage(const std::vector<AttentionBranch>& schedule, int64_t H, int64_t N, bool causal) {
  validate_schedule(schedule);
  // A branch with r = 1 gives every query itself as a key. Otherwise test each (t, h): coverage is
  // a union of residue classes modulo different segment lengths with ragged ends, which has no
  // simpler exact form, and N * H * branches stays small (a few million).
  for (const auto& br : schedule)
    if (br.dilation == 1) return {};
  for (int64_t t = 0; t < N; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      const bool covered = std::any_of(schedule.begin(), schedule.end(), [&](const AttentionBranch& br) {
        const int64_t s = t / br.segment, u = t - s * br.segment, o = h % br.dilation;
        // A key-dilated branch gives t a key when its segment has a grid point (at or before t, causal).
        if (br.kind == BranchKind::key_dilated)
          return causal ? u >= o : key_grid(br.segment, br.dilation, h, s, N).count > 0;
        return u >= o && (u - o) % br.dilation == 0;
      });
      if (!covered) return {false, t, h};
    }
  }
  return {};
}

int64_t visited_pairs(const std::vector<AttentionBranch>& schedule, int64_t H, int64_t N, bool causal) {
  validate_schedule(schedule);
  const std::vector<AttentionBranch> bounded = bounded_schedule(schedule, H, N);
  // Per sub-problem with gq queries and gk keys: gq(gq+1)/2 pairs causal (c <= a, gq <= gk),
  // gq * gk otherwise. Full segments of a (branch, head) all have the same counts; only the ragged
  // last one differs.
  int64_t total = 0;
  auto segment_pairs = [&](const AttentionBranch& br, int64_t h, int64_t s) {
    const int64_t gk = key_grid(br.segment, br.dilation, h, s, N).count;
    int64_t pairs = 0;
    for (int64_t sub = 0; sub < subproblems(br.kind, br.dilation); ++sub) {
      const int64_t gq = query_grid(br.segment, br.dilation, br.kind, causal, h, s, sub, N).count;
      pairs += causal ? gq * (gq + 1) / 2 : gq * gk;
    }
    return pairs;
  };
  for (const auto& br : bounded) {
    const int64_t full = N / br.segment;
    for (int64_t h = 0; h < H; ++h) {
      if (full > 0) total += full * segment_pairs(br, h, 0);
      if (N % br.segment) total += segment_pairs(br, h, full);
    }
  }
  return total;
}

AttentionFlops attention_flops(const std::vector<AttentionBranch>& schedule, int64_t B, int64_t H, int64_t N,
                               int64_t D, bool causal) {
  DILATRON_CHECK(B >= 0 && D >= 0, "attention_flops: B = ", B, ", D = ", D, " must be >= 0");
  AttentionFlops f;
  f.forward = 4.0 * static_cast<double>(D) * static_cast<double>(B) *
              static_cast<double>(visited_pairs(schedule, H, N, causal));
  f.backward = 2.5 * f.forward;
  return f;
}

// ---------------------------------------------------------------- relative-position bias

std::vector<int32_t> relative_position_buckets(int64_t N, bool causal, int64_t num_buckets, int64_t max_distance) {
  DILATRON_CHECK(N >= 1, "relative_position_buckets: N = ", N, " must be >= 1");
  DILATRON_CHECK(causal || num_buckets % 2 == 0, "relative-position bias: bidirectional (non-causal) attention "
                 "needs an even num_buckets (half for each direction), got ", num_buckets);
  const int64_t nb = causal ? num_buckets : num_buckets / 2;  // buckets per direction
  const int64_t max_exact = nb / 2;
  DILATRON_CHECK(max_exact >= 1, "relative-position bias: num_buckets = ", num_buckets, " is too small (need >= ",
                 causal ? 2 : 4, causal ? " causal)" : " bidirectional)");
  DILATRON_CHECK(max_distance > max_exact, "relative-position bias: max_distance = ", max_distance,
                 " must exceed max_exact = ", max_exact, " (the log-spaced buckets span (max_exact, max_distance])");
  // Bucket of a distance m >= 0 within one direction.
  const double log_range = std::log(static_cast<double>(max_distance) / static_cast<double>(max_exact));
  auto bucket = [&](int64_t m) {
    if (m < max_exact) return m;
    const double large = std::log(static_cast<double>(m) / static_cast<double>(max_exact)) / log_range *
                         static_cast<double>(nb - max_exact);
    return std::min(nb - 1, max_exact + static_cast<int64_t>(std::floor(large)));
  };
  std::vector<int32_t> table(static_cast<size_t>(2 * N - 1));
  for (int64_t m = 0; m < N; ++m) {
    const int64_t b = bucket(m);
    table[static_cast<size_t>(N - 1 + m)] = static_cast<int32_t>(b);  // n = t - j = m >= 0
    if (m > 0) table[static_cast<size_t>(N - 1 - m)] = static_cast<int32_t>(causal ? 0 : nb + b);  // n = -m
  }
  return table;
}

// ---------------------------------------------------------------- incremental decoding

namespace {
// A branch's buffers start small and double up to ceil(w / r) keys per head, so a huge segment
// costs only what the context fills.
constexpr int64_t kFirstCacheCapacity = 64;

int64_t full_capacity(const AttentionBranch& b) { return (b.segment - 1) / b.dilation + 1; }
}  // namespace

AttentionCache::AttentionCache(std::vector<AttentionBranch> schedule, int64_t B, int64_t H, int64_t D,
                               TensorOptions options)
    : schedule_(std::move(schedule)) {
  validate_schedule(schedule_);
  DILATRON_CHECK(B >= 1 && H >= 1 && D >= 1, "AttentionCache: B, H, D must be >= 1, got ", B, ", ", H, ", ", D);
  for (const AttentionBranch& b : schedule_) {
    const Shape shape{B, H, std::min(full_capacity(b), kFirstCacheCapacity), D};
    keys_.push_back(Tensor::zeros(shape, options));
    values_.push_back(Tensor::zeros(shape, options));
  }
}

int64_t AttentionCache::bytes() const {
  int64_t n = 0;
  for (size_t i = 0; i < keys_.size(); ++i)
    n += (keys_[i].numel() + values_[i].numel()) * static_cast<int64_t>(dtype_size(keys_[i].dtype()));
  return n;
}

void AttentionCache::append(const Tensor& k_in, const Tensor& v_in) {
  DILATRON_CHECK(!keys_.empty(), "AttentionCache::append: the cache was default-constructed (no schedule)");
  const Tensor& k0 = keys_[0];
  const int64_t B = k0.size(0), H = k0.size(1), D = k0.size(3);
  DILATRON_CHECK(k_in.dim() == 4 && k_in.size(0) == B && k_in.size(2) == H && k_in.size(3) == D &&
                     v_in.shape() == k_in.shape(),
                 "AttentionCache::append: expected k and v [", B, ", T, ", H, ", ", D, "], got ", shape_str(k_in.shape()),
                 " and ", shape_str(v_in.shape()));
  const Tensor k = k_in.to(k0.dtype()).to(k0.device()).contiguous(), v = v_in.to(k0.dtype()).to(k0.device()).contiguous();
  const int64_t T = k.size(1), first = length_, last = length_ + T - 1;
  for (size_t i = 0; i < schedule_.size() && T > 0; ++i) {
    const int64_t w = schedule_[i].segment, r = schedule_[i].dilation;
    // Only the latest segment's keys stay reachable; the older ones of this call never enter.
    const int64_t seg_start = last / w * w, from = std::max(first, seg_start);
    const int64_t needed = (last - seg_start) / r + 1;  // grid slots up to `last`, offset 0 (the most)
    if (needed > keys_[i].size(2)) {
      const int64_t capacity = std::min(full_capacity(schedule_[i]), std::max(needed, 2 * keys_[i].size(2)));
      for (Tensor* t : {&keys_[i], &values_[i]}) {
        Tensor grown = Tensor::zeros({B, H, capacity, D}, t->options());
        if (first > seg_start) narrow(grown, 2, 0, t->size(2)).copy_(*t);  // the segment's earlier keys
        *t = grown;
      }
    }
    const int64_t capacity = keys_[i].size(2);
    // Heads h = o, o + r, ... share the grid of offset o: one strided copy per offset.
    for (int64_t o = 0; o < std::min(r, H); ++o) {
      const kernels::GridSpan span = kernels::residue_span(seg_start, last - seg_start + 1, r, o);
      const int64_t c0 = from <= span.first ? 0 : (from - span.first + r - 1) / r;  // first new grid slot
      if (c0 >= span.count) continue;
      const int64_t count = span.count - c0, heads = (H - o - 1) / r + 1;
      const Shape shape{B, count, heads, D};
      const Shape src_strides{T * H * D, r * H * D, r * D, 1}, dst_strides{H * capacity * D, D, r * capacity * D, 1};
      const int64_t src_offset = (span.position(c0) - first) * H * D + o * D, dst_offset = o * capacity * D + c0 * D;
      make_view(keys_[i], shape, dst_strides, keys_[i].offset() + dst_offset)
          .copy_(make_view(k, shape, src_strides, k.offset() + src_offset));
      make_view(values_[i], shape, dst_strides, values_[i].offset() + dst_offset)
          .copy_(make_view(v, shape, src_strides, v.offset() + src_offset));
    }
  }
  length_ += T;
}

Tensor dilated_attention_decode(const Tensor& q, const AttentionCache& cache, const DilatedAttentionOptions& opts,
                                const Tensor& bias) {
  DILATRON_CHECK(opts.causal, "dilated_attention_decode: decoding is causal (opts.causal must be true)");
  DILATRON_CHECK(cache.length() >= 1, "dilated_attention_decode: the cache is empty (append the query's key first)");
  DILATRON_CHECK(opts.schedule == cache.schedule(), "dilated_attention_decode: the schedule ",
                 format_schedule(opts.schedule), " differs from the cache's ", format_schedule(cache.schedule()));
  const Tensor& k0 = cache.keys()[0];
  const int64_t B = k0.size(0), H = k0.size(1), D = k0.size(3);
  DILATRON_CHECK(q.dim() == 4 && q.size(0) == B && q.size(1) == 1 && q.size(2) == H && q.size(3) == D,
                 "dilated_attention_decode: q must be [", B, ", 1, ", H, ", ", D, "], got ", shape_str(q.shape()));
  DILATRON_CHECK(q.dtype() == k0.dtype() && q.device() == k0.device(), "dilated_attention_decode: q is ",
                 dtype_name(q.dtype()), " on ", q.device().str(), ", the cache ", dtype_name(k0.dtype()), " on ",
                 k0.device().str());
  AttentionParams params;
  params.schedule = cache.schedule();
  params.causal = true;
  int64_t longest = 1;
  for (const AttentionBranch& b : params.schedule) longest = std::max(longest, b.segment);
  // Distances stay inside a segment; the table is only as long as the cache can reach.
  resolve_scale_and_bias(params, opts, q, D, std::min(longest, cache.length()), bias);
  autograd::NoGradGuard no_grad;
  const Tensor qc = reshape(q, {B, H, D}).contiguous();
  Tensor o = Tensor::empty({B, H, D}, q.options());
  kernels::backend_of(q).dilated_attention_decode(o, qc, cache.keys(), cache.values(), bias, params,
                                                  cache.length() - 1);
  return reshape(o, {B, 1, H, D});
}

}  // namespace dilatron
