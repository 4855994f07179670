#include "nccl_comm.h"

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

namespace dilatron::dist {
namespace {

void check_cuda(cudaError_t rc, const char* call) {
  DILATRON_CHECK(rc == cudaSuccess, "dist: ", call, " failed: ", cudaGetErrorString(rc));
}
void check_nccl(ncclResult_t rc, const char* call) {
  DILATRON_CHECK(rc == ncclSuccess, "dist: ", call, " failed: ", ncclGetErrorString(rc));
}

ncclDataType_t nccl_type(const Tensor& t) { return t.dtype() == DType::Float32 ? ncclFloat32 : ncclFloat64; }

int64_t bytes_of(const Tensor& t) { return t.numel() * static_cast<int64_t>(dtype_size(t.dtype())); }

}  // namespace

NcclComm::NcclComm(MPI_Comm comm, int rank, int world_size, int device, double timeout_s)
    : rank_(rank), size_(world_size), device_(device), timeout_s_(timeout_s) {
  ncclUniqueId id;
  if (rank == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  DILATRON_CHECK(MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, comm) == MPI_SUCCESS, "dist: MPI_Bcast of the NCCL id failed");
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  // Blocking with respect to the legacy default stream, which the CUDA backend's kernels run on: a
  // collective starts after the kernels that wrote its tensor, and later kernels wait for it.
  check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate");
  check_nccl(ncclCommInitRank(&comm_, world_size, id, rank), "ncclCommInitRank");
}

NcclComm::~NcclComm() {
  if (comm_) ncclCommDestroy(comm_);
  if (stream_) cudaStreamDestroy(stream_);
}

void NcclComm::wait(const char* collective) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_);
  for (;;) {
    const cudaError_t rc = cudaStreamQuery(stream_);
    if (rc == cudaSuccess) return;
    if (rc != cudaErrorNotReady) check_cuda(rc, "cudaStreamQuery");
    ncclResult_t async = ncclSuccess;
    check_nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
    check_nccl(async, collective);
    if (std::chrono::steady_clock::now() > deadline) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      char message[256];
      std::snprintf(message, sizeof message,
                    "dist: %s (NCCL) timed out after %g s on rank %d of %d: another rank died or hangs (the limit is "
                    "dilatron train --dist-timeout)", collective, timeout_s_, rank_, size_);
      throw Error(message);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void NcclComm::all_reduce(Tensor& t, CollectiveCount& count) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_nccl(ncclAllReduce(t.raw_data(), t.raw_data(), static_cast<size_t>(t.numel()), nccl_type(t), ncclSum, comm_,
                           stream_), "ncclAllReduce");
  wait("all_reduce");
  count.bytes_sent += 2 * (size_ - 1) * bytes_of(t) / size_;
}

void NcclComm::all_gather(const Tensor& in, Tensor& out, CollectiveCount& count) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_nccl(ncclAllGather(in.raw_data(), out.raw_data(), static_cast<size_t>(in.numel()), nccl_type(in), comm_,
                           stream_), "ncclAllGather");
  wait("all_gather");
  count.bytes_sent += (size_ - 1) * bytes_of(in);
}

void NcclComm::broadcast(Tensor& t, int root, CollectiveCount& count) {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  check_nccl(ncclBroadcast(t.raw_data(), t.raw_data(), static_cast<size_t>(t.numel()), nccl_type(t), root, comm_,
                           stream_), "ncclBroadcast");
  wait("broadcast");
  // A ring broadcast: every rank but the one before the root passes the tensor on.
  if (rank_ != (root + size_ - 1) % size_) count.bytes_sent += bytes_of(t);
}

}  // namespace dilatron::dist
