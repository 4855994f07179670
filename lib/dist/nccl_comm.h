// NCCL collectives on CUDA tensors for the MPI group (built when CUDA and NCCL are found), private to
// lib/dist. Unverified: compiled, never run on a GPU (docs/distributed.md).
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include "dilatron/dist.h"

namespace dilatron::dist {

class NcclComm {
 public:
  // Collective over `comm`: rank 0 makes the NCCL id and MPI carries it to the others.
  NcclComm(MPI_Comm comm, int rank, int world_size, int device, double timeout_s);
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  // As ProcessGroup's; `count` gets the bytes a ring moves (NCCL does not report what it sent).
  void all_reduce(Tensor& t, CollectiveCount& count);
  void all_gather(const Tensor& in, Tensor& out, CollectiveCount& count);
  void broadcast(Tensor& t, int root, CollectiveCount& count);

 private:
  // Polls the stream and NCCL's asynchronous error until the collective is done, or aborts the
  // communicator and throws after the timeout.
  void wait(const char* collective);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int rank_, size_, device_;
  double timeout_s_;
};

}  // namespace dilatron::dist
