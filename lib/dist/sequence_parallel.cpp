// Sequence-parallel dilated attention. Each branch runs as its own call of the backend's kernels
// (one-branch schedule), and the branches' outputs are merged by their log-sum-exps, which is the
// contract's one softmax over all branches. The backward runs each branch's kernel with the merged
// o and lse: its probabilities exp(s - lse) are then the merged softmax's, and the kernel's
// D = rowsum(do * o) the merged one's, so the branches' gradients add up to the op's.
//
// A branch whose segments span parts runs on a window: the segment holding this rank's part, as a
// [B, w, H, D] problem whose keys and values are zero off the grid (no query of the branch sees
// them) and whose queries are zero outside the part (their outputs are dropped, their output
// gradients zero). Positions inside the window are those of the whole sequence shifted by the
// segment's start, a multiple of w: the grids, the causal mask and the bias distances are the same.
#include "dilatron/sequence_parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "dilatron/autograd.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/ops.h"

namespace dilatron::dist {
namespace {

// How one branch runs on this rank.
struct BranchPlan {
  DilatedAttentionOptions opts;  // the caller's, with this branch alone
  int64_t dilation = 1;          // the grid's stride, as the op bounds it
  bool local = true;             // its segments lie inside the parts; else its segment spans parts
  int64_t window_start = 0;      // spanning: the segment holding this rank's part, as positions
  int64_t window_len = 0;        //   [window_start, window_start + window_len)
  int members = 1;               // spanning: the ranks of the segment, and this rank's index among them
  int member = 0;
};

std::vector<BranchPlan> plan_branches(const DilatedAttentionOptions& opts, int64_t n, int64_t H, int rank, int world) {
  const int64_t N = n * world;
  const std::vector<AttentionBranch> bounded = bounded_schedule(opts.schedule, H, N);
  std::vector<BranchPlan> plans;
  for (size_t i = 0; i < bounded.size(); ++i) {
    BranchPlan p;
    p.opts = opts;
    p.opts.schedule = {opts.schedule[i]};
    p.dilation = bounded[i].dilation;
    const int64_t w = std::min(bounded[i].segment, N);
    if (n % w != 0) {
      DILATRON_CHECK(w % n == 0 && N % w == 0, "sequence_parallel_attention: branch ", i, " (",
                     format_schedule({opts.schedule[i]}), "): its segment length ", w,
                     " must divide the part length n = N / S = ", n, ", or be a multiple of n that divides N = ", N,
                     " (a segment of whole parts)");
      p.local = false;
      p.window_start = rank * n / w * w;
      p.window_len = w;
      p.members = static_cast<int>(w / n);
      p.member = static_cast<int>((rank * n - p.window_start) / n);
    }
    plans.push_back(p);
  }
  return plans;
}

// Grid rows a part holds per head: at most ceil(n / r).
int64_t grid_capacity(const BranchPlan& p, int64_t n) { return (n + p.dilation - 1) / p.dilation; }

// Moves the grid rows of head h's grid in the window positions [lo, lo + n) between `rows` (a
// [B, L, H, D] tensor whose row 0 is window position `first`) and `block` ([B, H, capacity, D]: slot
// a holds the a-th grid row of the range). to_block copies rows into the block; otherwise the block
// is added to the rows.
template <typename T>
void move_grid_rows(const BranchPlan& p, int64_t lo, int64_t n, const Tensor& rows, int64_t first, const Tensor& block,
                    bool to_block) {
  const int64_t B = rows.size(0), L = rows.size(1), H = rows.size(2), D = rows.size(3), cap = block.size(2);
  T* r = rows.data<T>();
  T* k = block.data<T>();
  const int64_t stride = p.dilation;
  for (int64_t h = 0; h < H; ++h) {
    const int64_t o = h % stride;
    const int64_t u0 = lo <= o ? o : o + (lo - o + stride - 1) / stride * stride;
    for (int64_t b = 0; b < B; ++b) {
      int64_t a = 0;
      for (int64_t u = u0; u < lo + n; u += stride, ++a) {
        T* row = r + ((b * L + (u - first)) * H + h) * D;
        T* slot = k + ((b * H + h) * cap + a) * D;
        for (int64_t d = 0; d < D; ++d) {
          if (to_block)
            slot[d] = row[d];
          else
            row[d] += slot[d];
        }
      }
    }
  }
}

void move_grid(const BranchPlan& p, int64_t lo, int64_t n, const Tensor& rows, int64_t first, const Tensor& block,
               bool to_block) {
  if (rows.dtype() == DType::Float32)
    move_grid_rows<float>(p, lo, n, rows, first, block, to_block);
  else
    move_grid_rows<double>(p, lo, n, rows, first, block, to_block);
}

// The ranks of this rank's segment of a spanning branch.
std::unique_ptr<ProcessGroup> segment_group(ProcessGroup& group, const BranchPlan& p) {
  return group.split(static_cast<int>(p.window_start / p.window_len));
}

struct Window {
  Tensor q, k, v;
};

// A branch's call: the part itself, or the window of a spanning branch, its grid keys and values
// all-gathered from the segment's ranks.
Window window_inputs(const BranchPlan& p, const Tensor& q, const Tensor& k, const Tensor& v, ProcessGroup& group) {
  if (p.local) return {q, k, v};
  const int64_t B = q.size(0), n = q.size(1), H = q.size(2), D = q.size(3), cap = grid_capacity(p, n);
  const int64_t mine_lo = p.member * n;
  Tensor mine = Tensor::zeros({2, B, H, cap, D}, q.options());
  move_grid(p, mine_lo, n, k, mine_lo, mine.narrow(0, 0, 1).reshape({B, H, cap, D}), true);
  move_grid(p, mine_lo, n, v, mine_lo, mine.narrow(0, 1, 1).reshape({B, H, cap, D}), true);
  Tensor all = Tensor::empty({p.members, 2, B, H, cap, D}, q.options());
  segment_group(group, p)->all_gather(mine, all);
  Window w{Tensor::zeros({B, p.window_len, H, D}, q.options()), Tensor::zeros({B, p.window_len, H, D}, q.options()),
           Tensor::zeros({B, p.window_len, H, D}, q.options())};
  for (int m = 0; m < p.members; ++m) {
    const Tensor blocks = all.narrow(0, m, 1).reshape({2, B, H, cap, D});
    move_grid(p, m * n, n, w.k, 0, blocks.narrow(0, 0, 1).reshape({B, H, cap, D}), false);
    move_grid(p, m * n, n, w.v, 0, blocks.narrow(0, 1, 1).reshape({B, H, cap, D}), false);
  }
  w.q.narrow(1, mine_lo, n).copy_(q);
  return w;
}

// This rank's rows of a branch's window output o [B, L, H, D] or lse [B, H, L].
int64_t own_first(const BranchPlan& p, int64_t n) { return p.local ? 0 : p.member * n; }

// The branches' (o_i, lse_i) merged into the one softmax: lse = log sum_i exp(lse_i),
// o = sum_i exp(lse_i - lse) o_i; a query no branch covers keeps o = 0, lse = -inf.
template <typename T>
void merge_branches(const std::vector<Tensor>& outs, const std::vector<Tensor>& lses, Tensor& o, Tensor& lse) {
  const int64_t B = o.size(0), n = o.size(1), H = o.size(2), D = o.size(3);
  T* out = o.data<T>();
  T* l = lse.data<T>();
  std::vector<const T*> oi, li;
  for (size_t i = 0; i < outs.size(); ++i) {
    oi.push_back(outs[i].data<T>());
    li.push_back(lses[i].data<T>());
  }
  constexpr T kMinusInf = -std::numeric_limits<T>::infinity();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < n; ++t) {
        const int64_t at = (b * H + h) * n + t;
        T m = kMinusInf;
        for (const T* x : li) m = std::max(m, x[at]);
        T* row = out + ((b * n + t) * H + h) * D;
        std::fill(row, row + D, T(0));
        if (m == kMinusInf) {
          l[at] = kMinusInf;
          continue;
        }
        T z = 0;
        for (const T* x : li) z += std::exp(x[at] - m);
        l[at] = m + std::log(z);
        for (size_t i = 0; i < li.size(); ++i) {
          if (li[i][at] == kMinusInf) continue;
          const T weight = std::exp(li[i][at] - l[at]);
          const T* src = oi[i] + ((b * n + t) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) row[d] += weight * src[d];
        }
      }
}

struct SequenceParallelFunction : autograd::Function<SequenceParallelFunction> {
  static const char* name() { return "sequence_parallel_attention"; }

  // Saved: bias, then per branch its call's q, k, v and lse, then the merged o and lse.
  static Tensor forward(autograd::Context& ctx, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& bias,
                        const std::vector<BranchPlan>& plans, ProcessGroup* group) {
    const int64_t B = q.size(0), n = q.size(1), H = q.size(2);
    std::vector<Tensor> saved = {bias};
    std::vector<Tensor> outs, lses;
    for (const BranchPlan& p : plans) {
      const Window w = window_inputs(p, q, k, v, *group);
      const int64_t L = w.q.size(1);
      Tensor o = Tensor::empty(w.q.shape(), q.options());
      Tensor lse = Tensor::empty({B, H, L}, q.options());
      kernels::backend_of(q).dilated_attention_forward(o, lse, w.q, w.k, w.v, bias,
                                                       attention_params(w.q, w.k, w.v, p.opts, bias));
      outs.push_back(o.narrow(1, own_first(p, n), n).contiguous());
      lses.push_back(lse.narrow(2, own_first(p, n), n).contiguous());
      saved.insert(saved.end(), {w.q, w.k, w.v, lse});
    }
    Tensor o = Tensor::empty(q.shape(), q.options());
    Tensor lse = Tensor::empty({B, H, n}, q.options());
    if (q.dtype() == DType::Float32)
      merge_branches<float>(outs, lses, o, lse);
    else
      merge_branches<double>(outs, lses, o, lse);
    saved.insert(saved.end(), {o, lse});
    ctx.save_for_backward(saved);
    ctx.set("plans", plans);
    ctx.set("group", group);
    return o;
  }

  static std::vector<Tensor> backward(autograd::Context& ctx, const std::vector<Tensor>& grads) {
    if (!grads[0].defined()) return {};
    const std::vector<Tensor>& s = ctx.saved();
    const auto plans = ctx.get<std::vector<BranchPlan>>("plans");
    ProcessGroup& group = *ctx.get<ProcessGroup*>("group");
    const Tensor &bias = s[0], &o = s[s.size() - 2], &lse = s[s.size() - 1];
    const Tensor dout = grads[0].contiguous();
    const int64_t B = o.size(0), n = o.size(1), H = o.size(2), D = o.size(3);
    Tensor dq = Tensor::zeros(o.shape(), o.options()), dk = Tensor::zeros(o.shape(), o.options()),
           dv = Tensor::zeros(o.shape(), o.options());
    const bool bias_grad = bias.defined() && ctx.needs_input_grad[3];
    Tensor dbias = bias_grad ? Tensor::zeros(bias.shape(), bias.options()) : Tensor();
    for (size_t i = 0; i < plans.size(); ++i) {
      const BranchPlan& p = plans[i];
      const Tensor &wq = s[1 + 4 * i], &wk = s[2 + 4 * i], &wv = s[3 + 4 * i], &wlse = s[4 + 4 * i];
      const int64_t first = own_first(p, n);
      // The merged o, lse and do at this rank's rows; elsewhere do = 0 (and o = 0, the branch's own
      // finite lse), so the other queries of the window add nothing.
      Tensor wo = o, wl = lse, wdo = dout;
      if (!p.local) {
        wo = Tensor::zeros(wq.shape(), o.options());
        wo.narrow(1, first, n).copy_(o);
        wl = wlse.clone();
        wl.narrow(2, first, n).copy_(lse);
        wdo = Tensor::zeros(wq.shape(), o.options());
        wdo.narrow(1, first, n).copy_(dout);
      }
      Tensor wdq = Tensor::empty(wq.shape(), o.options()), wdk = Tensor::empty(wq.shape(), o.options()),
             wdv = Tensor::empty(wq.shape(), o.options());
      Tensor wdbias = bias_grad ? Tensor::empty(bias.shape(), bias.options()) : Tensor();
      kernels::backend_of(o).dilated_attention_backward(wdq, wdk, wdv, wdbias, wdo, wq, wk, wv, wo, wl, bias,
                                                        attention_params(wq, wk, wv, p.opts, bias));
      dq = add(dq, wdq.narrow(1, first, n));
      if (bias_grad) dbias = add(dbias, wdbias);
      if (p.local) {
        dk = add(dk, wdk);
        dv = add(dv, wdv);
        continue;
      }
      // Each rank of the segment holds gradients for every part's grid keys: the sums go to their owners.
      const int64_t cap = grid_capacity(p, n);
      Tensor send = Tensor::zeros({p.members, 2, B, H, cap, D}, o.options());
      for (int m = 0; m < p.members; ++m) {
        const Tensor blocks = send.narrow(0, m, 1).reshape({2, B, H, cap, D});
        move_grid(p, m * n, n, wdk, 0, blocks.narrow(0, 0, 1).reshape({B, H, cap, D}), true);
        move_grid(p, m * n, n, wdv, 0, blocks.narrow(0, 1, 1).reshape({B, H, cap, D}), true);
      }
      Tensor mine = Tensor::empty({2, B, H, cap, D}, o.options());
      segment_group(group, p)->reduce_scatter(send, mine);
      move_grid(p, first, n, dk, first, mine.narrow(0, 0, 1).reshape({B, H, cap, D}), false);
      move_grid(p, first, n, dv, first, mine.narrow(0, 1, 1).reshape({B, H, cap, D}), false);
    }
    return {dq, dk, dv, dbias};
  }
};

}  // namespace

Tensor sequence_parallel_attention(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionOptions& opts,
                                   ProcessGroup& group, const Tensor& bias) {
  DILATRON_CHECK(q.defined() && q.dim() == 4 && k.defined() && v.defined() && k.shape() == q.shape() &&
                     v.shape() == q.shape(),
                 "sequence_parallel_attention: q, k, v must be [B, n, H, D] alike, got ",
                 q.defined() ? shape_str(q.shape()) : "undefined", ", ", k.defined() ? shape_str(k.shape()) : "undefined",
                 ", ", v.defined() ? shape_str(v.shape()) : "undefined");
  DILATRON_CHECK(q.device().is_cpu() && (q.dtype() == DType::Float32 || q.dtype() == DType::Float64),
                 "sequence_parallel_attention: takes float32 or float64 CPU tensors, got ", dtype_name(q.dtype()),
                 " on ", q.device().str());
  DILATRON_CHECK(opts.dropout == 0.0, "sequence_parallel_attention: dropout ", opts.dropout,
                 " is not supported (the windows' positions would draw other dropout bits); use 0");
  validate_schedule(opts.schedule);
  const std::vector<BranchPlan> plans = plan_branches(opts, q.size(1), q.size(2), group.rank(), group.world_size());
  return SequenceParallelFunction::apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                         bias.defined() ? bias.contiguous() : Tensor(), plans, &group);
}

}  // namespace dilatron::dist
