// Processes that train together: a process group (rank, world size) and its collectives, after
// torch.distributed. MPI launches the processes (`mpirun -np P dilatron train ...`) and carries CPU
// tensors; NCCL carries CUDA tensors when dilatron was built with it. Without MPI, or when no MPI
// launcher started the process, the group is this one process and every collective is a copy.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "dilatron/tensor.h"

namespace dilatron::dist {

// What this process sent, per collective: bytes that left it (its own payload, as the algorithm moves
// it; nothing for a one-process group) and calls.
struct CollectiveCount {
  int64_t calls = 0;
  int64_t bytes_sent = 0;
};
struct CommStats {
  CollectiveCount all_reduce, all_gather, reduce_scatter, broadcast, barrier;
  int64_t bytes_sent() const {
    return all_reduce.bytes_sent + all_gather.bytes_sent + reduce_scatter.bytes_sent + broadcast.bytes_sent;
  }
};

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual int local_rank() const = 0;  // among the processes on this host: the GPU it takes
  virtual std::string backend() const = 0;  // "single", "mpi"

  // Collectives: every rank calls them in the same order with tensors of the same shape and dtype
  // (float32 or float64, contiguous). A collective that does not finish within the group's timeout
  // throws an Error naming it (a rank died or hangs); call abort() then, the others still wait.
  //
  // Sums t over the ranks, in place. Every rank gets the same bits; over MPI in an order fixed by
  // the world size (a ring: reduce-scatter, then all-gather), over NCCL in NCCL's.
  virtual void all_reduce(Tensor& t) = 0;
  // Every rank's `in`, in rank order, into `out` (world_size * in.numel() elements).
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  // The sum over the ranks of block `rank` of `in` (world_size blocks of out.numel() elements) into
  // `out`: the first half of a ring all-reduce. CPU tensors.
  virtual void reduce_scatter(const Tensor& in, Tensor& out) = 0;
  // root's t into every rank's t.
  virtual void broadcast(Tensor& t, int root) = 0;
  virtual void barrier() = 0;
  // The ranks that pass the same color, as a group of their own, ranked in this group's order (every
  // rank calls it, as a collective). Its bytes count in this group's stats.
  virtual std::unique_ptr<ProcessGroup> split(int color) = 0;
  // Ends every process of the job with this exit code (after an error on this one).
  [[noreturn]] virtual void abort(int code) = 0;

  const CommStats& stats() const { return *stats_; }

 protected:
  std::shared_ptr<CommStats> stats_ = std::make_shared<CommStats>();  // shared with the groups split off
};

struct InitOptions {
  double timeout_s = 300.0;  // how long a collective may wait for the other ranks
};

// True when an MPI launcher (mpirun, srun with PMI) started this process.
bool launched_by_mpi();
// True when this dilatron was built with MPI / with NCCL.
bool built_with_mpi();
bool built_with_nccl();

// This process alone: collectives leave tensors as they are (all_gather copies).
std::unique_ptr<ProcessGroup> single_process_group();

// The group of this run: every process of the MPI job when an MPI launcher started this one (MPI is
// initialised here and finalised when the group goes), else this process alone. An MPI launch of a
// dilatron built without MPI is an Error (each process would train alone).
std::unique_ptr<ProcessGroup> init_process_group(const InitOptions& options = {});

}  // namespace dilatron::dist
