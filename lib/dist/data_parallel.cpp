#include "dilatron/data_parallel.h"

#include "dilatron/autograd.h"
#include "dilatron/ops.h"

namespace dilatron::dist {
namespace {

int64_t bytes_of(const Tensor& t) { return t.numel() * static_cast<int64_t>(dtype_size(t.dtype())); }

Tensor flat_part(const Tensor& flat, int64_t offset, const Tensor& like) {
  return flat.narrow(0, offset, like.numel()).view(like.shape());
}

}  // namespace

Tensor flatten_gradients(const std::vector<Tensor>& params) {
  DILATRON_CHECK(!params.empty(), "flatten_gradients: no parameters");
  int64_t n = 0;
  for (const Tensor& p : params) {
    DILATRON_CHECK(p.grad().defined(), "flatten_gradients: a parameter of shape ", shape_str(p.shape()),
                   " has no gradient");
    n += p.numel();
  }
  Tensor flat = Tensor::empty({n}, params.front().grad().options());
  int64_t offset = 0;
  for (const Tensor& p : params) {
    flat_part(flat, offset, p).copy_(p.grad());
    offset += p.numel();
  }
  return flat;
}

void set_gradients(const std::vector<Tensor>& params, const Tensor& flat) {
  int64_t offset = 0;
  for (const Tensor& p : params) {
    DILATRON_CHECK(offset + p.numel() <= flat.numel(), "set_gradients: ", flat.numel(),
                   " elements are fewer than the parameters hold");
    Tensor(p).set_grad(flat_part(flat, offset, p));  // a handle: the parameter itself gets it
    offset += p.numel();
  }
  DILATRON_CHECK(offset == flat.numel(), "set_gradients: ", flat.numel(), " elements for parameters of ", offset);
}

void all_reduce_gradients(ProcessGroup& group, const std::vector<Tensor>& params, int64_t bucket_bytes) {
  if (group.world_size() == 1) return;
  autograd::NoGradGuard no_grad;
  // Buckets of consecutive parameters with the dtype and device of their first one.
  for (size_t first = 0; first < params.size();) {
    const TensorOptions opts = params[first].grad().options();
    size_t end = first;
    int64_t bytes = 0;
    while (end < params.size() && params[end].grad().dtype() == opts.dtype &&
           params[end].grad().device() == opts.device && (end == first || bytes + bytes_of(params[end].grad()) <= bucket_bytes))
      bytes += bytes_of(params[end++].grad());
    const std::vector<Tensor> bucket(params.begin() + static_cast<std::ptrdiff_t>(first),
                                     params.begin() + static_cast<std::ptrdiff_t>(end));
    Tensor flat = flatten_gradients(bucket);
    group.all_reduce(flat);
    set_gradients(bucket, flat);
    first = end;
  }
}

Tensor sum_shards_in_order(ProcessGroup& group, const Tensor& local) {
  DILATRON_CHECK(local.dim() == 2, "sum_shards_in_order: expected [shards, n], got ", shape_str(local.shape()));
  autograd::NoGradGuard no_grad;
  const int64_t shards = local.size(0) * group.world_size(), n = local.size(1);
  Tensor all = Tensor::empty({shards, n}, local.options());
  group.all_gather(local.contiguous(), all);
  Tensor sum = all.narrow(0, 0, 1).reshape({n}).clone();
  for (int64_t k = 1; k < shards; ++k) sum = add(sum, all.narrow(0, k, 1).reshape({n}));
  return sum;
}

}  // namespace dilatron::dist
