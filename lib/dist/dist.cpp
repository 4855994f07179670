#include "dilatron/dist.h"

#include <cstdlib>

#include "mpi_group.h"

namespace dilatron::dist {
namespace {

class SingleProcessGroup final : public ProcessGroup {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  int local_rank() const override { return 0; }
  std::string backend() const override { return "single"; }
  void all_reduce(Tensor&) override { ++stats_->all_reduce.calls; }
  void all_gather(const Tensor& in, Tensor& out) override {
    ++stats_->all_gather.calls;
    out.copy_(in.reshape(out.shape()));
  }
  void reduce_scatter(const Tensor& in, Tensor& out) override {
    ++stats_->reduce_scatter.calls;
    out.copy_(in.reshape(out.shape()));
  }
  void broadcast(Tensor&, int) override { ++stats_->broadcast.calls; }
  void barrier() override { ++stats_->barrier.calls; }
  std::unique_ptr<ProcessGroup> split(int) override {
    auto group = std::make_unique<SingleProcessGroup>();
    group->stats_ = stats_;
    return group;
  }
  [[noreturn]] void abort(int code) override { std::exit(code); }
};

}  // namespace

bool launched_by_mpi() {
  // Open MPI, MPICH / Intel MPI (Hydra), and Slurm's PMI/PMIx launches.
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}

bool built_with_mpi() {
#ifdef DILATRON_WITH_MPI
  return true;
#else
  return false;
#endif
}

bool built_with_nccl() {
#ifdef DILATRON_WITH_NCCL
  return true;
#else
  return false;
#endif
}

std::unique_ptr<ProcessGroup> single_process_group() { return std::make_unique<SingleProcessGroup>(); }

std::unique_ptr<ProcessGroup> init_process_group(const InitOptions& options) {
  DILATRON_CHECK(options.timeout_s > 0.0, "dist: the collective timeout must be > 0 seconds, got ", options.timeout_s);
  if (!launched_by_mpi()) return single_process_group();
#ifdef DILATRON_WITH_MPI
  return make_mpi_group(options);
#else
  throw Error("this process was started by an MPI launcher, but dilatron was built without MPI (each process would "
              "train alone); install Open MPI (scripts/install-deps.sh) and rebuild, or run without mpirun");
#endif
}

}  // namespace dilatron::dist
