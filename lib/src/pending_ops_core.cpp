// TEMPORARY stubs until the owner implements these; delete when done.
#include "dilatron/ops.h"
namespace dilatron {
Tensor add(const Tensor& a, const Tensor& b) { throw Error("add: not implemented yet"); }
Tensor sub(const Tensor& a, const Tensor& b) { throw Error("sub: not implemented yet"); }
Tensor mul(const Tensor& a, const Tensor& b) { throw Error("mul: not implemented yet"); }
Tensor div(const Tensor& a, const Tensor& b) { throw Error("div: not implemented yet"); }
Tensor neg(const Tensor& x) { throw Error("neg: not implemented yet"); }
Tensor add(const Tensor& a, double s) { throw Error("add: not implemented yet"); }
Tensor sub(const Tensor& a, double s) { throw Error("sub: not implemented yet"); }
Tensor rsub(const Tensor& a, double s) { throw Error("rsub: not implemented yet"); }
Tensor mul(const Tensor& a, double s) { throw Error("mul: not implemented yet"); }
Tensor div(const Tensor& a, double s) { throw Error("div: not implemented yet"); }
Tensor rdiv(const Tensor& a, double s) { throw Error("rdiv: not implemented yet"); }
Tensor pow(const Tensor& a, double exponent) { throw Error("pow: not implemented yet"); }
Tensor exp(const Tensor& x) { throw Error("exp: not implemented yet"); }
Tensor log(const Tensor& x) { throw Error("log: not implemented yet"); }
Tensor tanh(const Tensor& x) { throw Error("tanh: not implemented yet"); }
Tensor sigmoid(const Tensor& x) { throw Error("sigmoid: not implemented yet"); }
Tensor sqrt(const Tensor& x) { throw Error("sqrt: not implemented yet"); }
Tensor rsqrt(const Tensor& x) { throw Error("rsqrt: not implemented yet"); }
Tensor abs(const Tensor& x) { throw Error("abs: not implemented yet"); }
Tensor relu(const Tensor& x) { throw Error("relu: not implemented yet"); }
Tensor gelu(const Tensor& x, const std::string& approximate) { throw Error("gelu: not implemented yet"); }
Tensor maximum(const Tensor& a, const Tensor& b) { throw Error("maximum: not implemented yet"); }
Tensor eq(const Tensor& a, const Tensor& b) { throw Error("eq: not implemented yet"); }
Tensor ne(const Tensor& a, const Tensor& b) { throw Error("ne: not implemented yet"); }
Tensor lt(const Tensor& a, const Tensor& b) { throw Error("lt: not implemented yet"); }
Tensor le(const Tensor& a, const Tensor& b) { throw Error("le: not implemented yet"); }
Tensor gt(const Tensor& a, const Tensor& b) { throw Error("gt: not implemented yet"); }
Tensor ge(const Tensor& a, const Tensor& b) { throw Error("ge: not implemented yet"); }
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) { throw Error("where: not implemented yet"); }
Tensor masked_fill(const Tensor& x, const Tensor& mask, double value) { throw Error("masked_fill: not implemented yet"); }
Tensor matmul(const Tensor& a, const Tensor& b) { throw Error("matmul: not implemented yet"); }
Tensor reshape(const Tensor& x, const Shape& shape) { throw Error("reshape: not implemented yet"); }
Tensor view(const Tensor& x, const Shape& shape) { throw Error("view: not implemented yet"); }
Tensor transpose(const Tensor& x, int64_t d0, int64_t d1) { throw Error("transpose: not implemented yet"); }
Tensor permute(const Tensor& x, const Shape& dims) { throw Error("permute: not implemented yet"); }
Tensor contiguous(const Tensor& x) { throw Error("contiguous: not implemented yet"); }
Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length) { throw Error("narrow: not implemented yet"); }
Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t end) { throw Error("slice: not implemented yet"); }
Tensor unsqueeze(const Tensor& x, int64_t dim) { throw Error("unsqueeze: not implemented yet"); }
Tensor squeeze(const Tensor& x, int64_t dim) { throw Error("squeeze: not implemented yet"); }
Tensor expand(const Tensor& x, const Shape& shape) { throw Error("expand: not implemented yet"); }
Tensor flatten(const Tensor& x, int64_t start_dim, int64_t end_dim) { throw Error("flatten: not implemented yet"); }
Tensor cat(const std::vector<Tensor>& xs, int64_t dim) { throw Error("cat: not implemented yet"); }
std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim) { throw Error("split: not implemented yet"); }
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim) { throw Error("split: not implemented yet"); }
std::vector<Tensor> chunk(const Tensor& x, int64_t chunks, int64_t dim) { throw Error("chunk: not implemented yet"); }
Tensor sum(const Tensor& x) { throw Error("sum: not implemented yet"); }
Tensor sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) { throw Error("sum: not implemented yet"); }
Tensor mean(const Tensor& x) { throw Error("mean: not implemented yet"); }
Tensor mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim) { throw Error("mean: not implemented yet"); }
MaxResult max(const Tensor& x, int64_t dim, bool keepdim) { throw Error("max: not implemented yet"); }
Tensor max(const Tensor& x) { throw Error("max: not implemented yet"); }
Tensor sum_to(const Tensor& x, const Shape& shape) { throw Error("sum_to: not implemented yet"); }
}
