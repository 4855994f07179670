// Deterministic sums over rows and columns of an [M, K] operand, accumulated in double like the
// CPU backend. "Deterministic" means the partition and the order of every addition depend on
// (M, K) alone, never on timing: no atomics. Used by reduce.cu, nn.cu and optim.cu.
#pragma once

#include "cuda/cuda_utils.cuh"
#include "dilatron/storage.h"

namespace dilatron::kernels::cuda {

// A row shorter than this is summed by one block; a longer one (a full-tensor sum is one row) is
// cut into chunks of this many elements, one block each, whose partial sums are added in order.
constexpr int64_t kRowChunk = 1 << 15;

// dst[blockIdx.x] = sum of f(m, k) over the block's chunk, with blockIdx.x = row * chunks + chunk.
template <typename Out, typename F>
__global__ void row_chunk_sums_kernel(Out* dst, int64_t K, int64_t chunks, F f) {
  __shared__ typename BlockReduce<double>::TempStorage temp;
  const int64_t row = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int64_t begin = chunk * kRowChunk, end = min(K, begin + kRowChunk);
  double acc = 0.0;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) acc += f(row, k);
  const double total = BlockReduce<double>(temp).Sum(acc);
  if (threadIdx.x == 0) dst[blockIdx.x] = static_cast<Out>(total);
}

// out[m] = sum over c of partial[m * chunks + c], in chunk order.
template <typename Out>
__global__ void sum_chunks_kernel(Out* out, const double* partial, int64_t M, int64_t chunks) {
  for (int64_t m = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; m < M; m += int64_t{gridDim.x} * blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partial[m * chunks + c];
    out[m] = static_cast<Out>(s);
  }
}

// out[m] = Out(sum over k < K of f(m, k)) for m < M; f is a device functor returning double.
template <typename Out, typename F>
void row_sums(Out* out, int64_t M, int64_t K, F f, int device_index) {
  if (M == 0) return;
  const int64_t chunks = K <= kRowChunk ? 1 : (K + kRowChunk - 1) / kRowChunk;
  if (chunks == 1) {
    row_chunk_sums_kernel<Out, F><<<static_cast<unsigned>(M), kBlockThreads, 0, kStream>>>(out, K, 1, f);
    CUDA_CHECK_LAUNCH();
    return;
  }
  ScratchBuffer<double> partial(static_cast<size_t>(M * chunks), Device::cuda(device_index));
  row_chunk_sums_kernel<double, F><<<static_cast<unsigned>(M * chunks), kBlockThreads, 0, kStream>>>(
      partial.data(), K, chunks, f);
  CUDA_CHECK_LAUNCH();
  sum_chunks_kernel<Out><<<grid_for(M), kBlockThreads, 0, kStream>>>(out, partial.data(), M, chunks);
  CUDA_CHECK_LAUNCH();
}

// Column sums: rows are cut into at most kColumnGroups groups; a thread sums one column of one
// group (threads of a warp read adjacent columns), then the group partials are added in order.
constexpr int64_t kColumnGroups = 64;

// partial[g * K + k] = sum over the rows of group g of f(m, k).
template <typename F>
__global__ void column_group_sums_kernel(double* partial, int64_t M, int64_t K, int64_t rows_per_group, F f) {
  const int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (k >= K) return;
  const int64_t g = blockIdx.y;
  const int64_t m_end = min(M, (g + 1) * rows_per_group);
  double acc = 0.0;
  for (int64_t m = g * rows_per_group; m < m_end; ++m) acc += f(m, k);
  partial[g * K + k] = acc;
}

template <typename Out>
__global__ void sum_groups_kernel(Out* out, const double* partial, int64_t K, int64_t groups) {
  const int64_t k = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (k >= K) return;
  double s = 0.0;
  for (int64_t g = 0; g < groups; ++g) s += partial[g * K + k];
  out[k] = static_cast<Out>(s);
}

// out[k] = Out(sum over m < M of f(m, k)) for k < K.
template <typename Out, typename F>
void column_sums(Out* out, int64_t M, int64_t K, F f, int device_index) {
  if (K == 0) return;
  const int64_t groups = M == 0 ? 1 : std::min<int64_t>(kColumnGroups, M);
  const int64_t rows_per_group = M == 0 ? 0 : (M + groups - 1) / groups;
  ScratchBuffer<double> partial(static_cast<size_t>(groups * K), Device::cuda(device_index));
  const unsigned column_blocks = static_cast<unsigned>((K + kBlockThreads - 1) / kBlockThreads);
  column_group_sums_kernel<F><<<dim3(column_blocks, static_cast<unsigned>(groups)), kBlockThreads, 0, kStream>>>(
      partial.data(), M, K, rows_per_group, f);
  CUDA_CHECK_LAUNCH();
  sum_groups_kernel<Out><<<column_blocks, kBlockThreads, 0, kStream>>>(out, partial.data(), K, groups);
  CUDA_CHECK_LAUNCH();
}

}  // namespace dilatron::kernels::cuda
