// The MPI process group. Its collectives are rings of non-blocking point-to-point messages, so that
// (1) every wait polls against a deadline: a rank that died or hangs gives an Error naming the
// collective instead of a hang; (2) the bytes each rank sends are counted as they go; (3) the order
// of the floating-point sums is fixed by the world size (and the same bits reach every rank).
// CUDA tensors go through NCCL when dilatron was built with it (nccl_comm.h), else through host copies.
#include "mpi_group.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#ifdef DILATRON_WITH_NCCL
#include "nccl_comm.h"
#endif

namespace dilatron::dist {
namespace {

using Clock = std::chrono::steady_clock;

void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw Error(std::string("dist: ") + call + " failed: " + std::string(text, static_cast<size_t>(len)));
}

void check_payload(const Tensor& t, const char* collective) {
  DILATRON_CHECK(t.dtype() == DType::Float32 || t.dtype() == DType::Float64, "dist: ", collective,
                 " takes float32 or float64 tensors, got ", dtype_name(t.dtype()));
  DILATRON_CHECK(t.is_contiguous(), "dist: ", collective, " takes contiguous tensors, got ", shape_str(t.shape()),
                 " with strides ", shape_str(t.strides()));
}

// One message's element count as MPI's int: a ring moves 1/P of a tensor at a time.
int message_count(int64_t elements, const char* collective) {
  DILATRON_CHECK(elements <= INT_MAX, "dist: ", collective, ": a message of ", elements,
                 " elements is more than MPI's int count holds; reduce in smaller buckets");
  return static_cast<int>(elements);
}

class MpiGroup final : public ProcessGroup {
 public:
  // The world: initialises MPI, which the group finalises when it goes.
  static std::unique_ptr<MpiGroup> world(const InitOptions& o) {
    int initialised = 0;
    MPI_Initialized(&initialised);
    DILATRON_CHECK(!initialised, "dist: MPI is already initialised (one process group per process)");
    int provided = 0;
    // Only the main thread calls MPI; OpenMP threads run the kernels between the calls.
    check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    MPI_Comm comm;
    check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &comm), "MPI_Comm_dup");
    return std::unique_ptr<MpiGroup>(new MpiGroup(comm, o.timeout_s, std::make_shared<CommStats>(), true));
  }
  ~MpiGroup() override {
#ifdef DILATRON_WITH_NCCL
    nccl_.reset();
#endif
    MPI_Comm_free(&comm_);
    if (owns_mpi_) MPI_Finalize();
  }
  MpiGroup(const MpiGroup&) = delete;
  MpiGroup& operator=(const MpiGroup&) = delete;

  int rank() const override { return rank_; }
  int world_size() const override { return size_; }
  int local_rank() const override { return local_rank_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(Tensor& t) override {
    check_payload(t, "all_reduce");
    ++stats_->all_reduce.calls;
#ifdef DILATRON_WITH_NCCL
    if (t.device().is_cuda()) return nccl(t.device()).all_reduce(t, stats_->all_reduce);
#endif
    on_host(t, [&](Tensor& h) {
      if (h.dtype() == DType::Float32)
        ring_all_reduce(h.data<float>(), h.numel(), MPI_FLOAT);
      else
        ring_all_reduce(h.data<double>(), h.numel(), MPI_DOUBLE);
    });
  }

  void all_gather(const Tensor& in, Tensor& out) override {
    check_payload(in, "all_gather");
    check_payload(out, "all_gather");
    DILATRON_CHECK(out.numel() == in.numel() * size_ && out.dtype() == in.dtype() && out.device() == in.device(),
                   "dist: all_gather: out must hold world_size (", size_, ") x ", in.numel(), " ", dtype_name(in.dtype()),
                   " elements on ", in.device().str(), ", got ", out.numel(), " ", dtype_name(out.dtype()), " on ",
                   out.device().str());
    ++stats_->all_gather.calls;
#ifdef DILATRON_WITH_NCCL
    if (in.device().is_cuda()) return nccl(in.device()).all_gather(in, out, stats_->all_gather);
#endif
    const Tensor in_host = in.to(Device::cpu());
    on_host(out, [&](Tensor& h) { ring_all_gather(in_host, h); });
  }

  void broadcast(Tensor& t, int root) override {
    check_payload(t, "broadcast");
    DILATRON_CHECK(root >= 0 && root < size_, "dist: broadcast: root ", root, " is not a rank of ", size_);
    ++stats_->broadcast.calls;
#ifdef DILATRON_WITH_NCCL
    if (t.device().is_cuda()) return nccl(t.device()).broadcast(t, root, stats_->broadcast);
#endif
    on_host(t, [&](Tensor& h) {
      const int count = message_count(h.numel(), "broadcast");
      const MPI_Datatype type = h.dtype() == DType::Float32 ? MPI_FLOAT : MPI_DOUBLE;
      std::vector<MPI_Request> requests;
      if (rank_ == root) {
        for (int r = 0; r < size_; ++r) {
          if (r == root) continue;
          requests.emplace_back();
          check_mpi(MPI_Isend(h.raw_data(), count, type, r, kTag, comm_, &requests.back()), "MPI_Isend");
          stats_->broadcast.bytes_sent += h.numel() * static_cast<int64_t>(dtype_size(h.dtype()));
        }
      } else {
        requests.emplace_back();
        check_mpi(MPI_Irecv(h.raw_data(), count, type, root, kTag, comm_, &requests.back()), "MPI_Irecv");
      }
      wait(requests, "broadcast");
    });
  }

  void barrier() override {
    ++stats_->barrier.calls;
    std::vector<MPI_Request> requests(1);
    check_mpi(MPI_Ibarrier(comm_, requests.data()), "MPI_Ibarrier");
    wait(requests, "barrier");
  }

  void reduce_scatter(const Tensor& in, Tensor& out) override {
    check_payload(in, "reduce_scatter");
    check_payload(out, "reduce_scatter");
    DILATRON_CHECK(in.numel() == out.numel() * size_ && out.dtype() == in.dtype() && out.device().is_cpu() &&
                       in.device().is_cpu(),
                   "dist: reduce_scatter: in must hold world_size (", size_, ") x ", out.numel(), " ",
                   dtype_name(out.dtype()), " elements, both on the CPU; got ", in.numel(), " ", dtype_name(in.dtype()),
                   " on ", in.device().str(), " and out on ", out.device().str());
    ++stats_->reduce_scatter.calls;
    Tensor work = in.clone();
    const int64_t m = out.numel();
    const auto begin = [&](int c) { return m * c; };
    if (in.dtype() == DType::Float32)
      ring_reduce_scatter(work.data<float>(), begin, 0, MPI_FLOAT, "reduce_scatter", stats_->reduce_scatter);
    else
      ring_reduce_scatter(work.data<double>(), begin, 0, MPI_DOUBLE, "reduce_scatter", stats_->reduce_scatter);
    out.copy_(work.reshape({in.numel()}).narrow(0, rank_ * m, m).reshape(out.shape()));
  }

  std::unique_ptr<ProcessGroup> split(int color) override {
    DILATRON_CHECK(color >= 0, "dist: split: color must be >= 0, got ", color);
    barrier();  // MPI_Comm_split blocks without a deadline: every rank is known to have come first
    MPI_Comm comm;
    check_mpi(MPI_Comm_split(comm_, color, rank_, &comm), "MPI_Comm_split");
    return std::unique_ptr<MpiGroup>(new MpiGroup(comm, timeout_s_, stats_, false));
  }

  [[noreturn]] void abort(int code) override {
    std::fflush(stdout);
    std::fflush(stderr);
    MPI_Abort(comm_, code);
    std::_Exit(code);  // MPI_Abort does not return; this says so to the compiler
  }

 private:
  static constexpr int kTag = 0x64;  // every message of the ring; MPI keeps messages of one pair in order

  MpiGroup(MPI_Comm comm, double timeout_s, std::shared_ptr<CommStats> stats, bool owns_mpi)
      : timeout_s_(timeout_s), comm_(comm), owns_mpi_(owns_mpi) {
    stats_ = std::move(stats);
    // Errors come back as return codes (and become Errors) instead of ending the process.
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm local;
    check_mpi(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local), "MPI_Comm_split_type");
    MPI_Comm_rank(local, &local_rank_);
    MPI_Comm_free(&local);
  }

  // Runs f on t, or on a host copy of a CUDA tensor that is copied back.
  template <typename F>
  void on_host(Tensor& t, F&& f) {
    if (t.device().is_cpu()) return f(t);
    Tensor h = t.to(Device::cpu());
    f(h);
    t.copy_(h);
  }

  // Polls until every request completed, or throws after the timeout naming the collective.
  void wait(std::vector<MPI_Request>& requests, const char* collective) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s_);
    for (int polls = 0;; ++polls) {
      int done = 0;
      check_mpi(MPI_Testall(static_cast<int>(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE),
                "MPI_Testall");
      if (done) return;
      if (Clock::now() > deadline) {
        char message[256];
        std::snprintf(message, sizeof message,
                      "dist: %s timed out after %g s on rank %d of %d: another rank died or hangs (the limit is "
                      "dilatron train --dist-timeout)", collective, timeout_s_, rank_, size_);
        throw Error(message);
      }
      // Spin briefly (a ring step is usually quick), then sleep so that a waiting rank leaves the
      // core to the ranks still computing (several ranks share the cores of one machine).
      if (polls > 64) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // One ring step: send `count` elements to the right neighbour while receiving as many from the left.
  void exchange(const void* send, int send_count, void* recv, int recv_count, MPI_Datatype type, int64_t elem_size,
                const char* collective, CollectiveCount& count) {
    const int right = (rank_ + 1) % size_, left = (rank_ + size_ - 1) % size_;
    std::vector<MPI_Request> requests(2);
    check_mpi(MPI_Irecv(recv, recv_count, type, left, kTag, comm_, &requests[0]), "MPI_Irecv");
    check_mpi(MPI_Isend(send, send_count, type, right, kTag, comm_, &requests[1]), "MPI_Isend");
    wait(requests, collective);
    count.bytes_sent += send_count * elem_size;
  }

  int mod(int c) const { return ((c % size_) + size_) % size_; }

  // Ring reduce-scatter over the chunks [begin(c), begin(c + 1)) of data: in P - 1 steps each rank
  // passes its partial sum of one chunk to the right and adds the left's, until rank r holds chunk
  // (r + last) mod P summed over the ranks. Each rank sends (P - 1) / P of the data.
  template <typename T, typename Begin>
  void ring_reduce_scatter(T* data, const Begin& begin, int last, MPI_Datatype type, const char* collective,
                           CollectiveCount& count) {
    const auto length = [&](int c) { return message_count(begin(c + 1) - begin(c), collective); };
    int64_t longest = 0;
    for (int c = 0; c < size_; ++c) longest = std::max<int64_t>(longest, length(c));
    std::vector<T> received(static_cast<size_t>(longest));
    for (int s = 0; s < size_ - 1; ++s) {
      const int send = mod(rank_ + last - 1 - s), recv = mod(rank_ + last - 2 - s);
      exchange(data + begin(send), length(send), received.data(), length(recv), type, sizeof(T), collective, count);
      T* chunk = data + begin(recv);
      for (int i = 0; i < length(recv); ++i) chunk[i] += received[static_cast<size_t>(i)];
    }
  }

  // Ring all-reduce of n elements: the reduce-scatter leaves chunk (r + 1) mod P summed on rank r,
  // P - 1 all-gather steps pass the sums round. Each rank sends 2 (P - 1) / P of the data.
  template <typename T>
  void ring_all_reduce(T* data, int64_t n, MPI_Datatype type) {
    if (size_ == 1) return;
    const auto begin = [&](int c) { return n * c / size_; };  // chunk c: [begin(c), begin(c + 1))
    const auto length = [&](int c) { return message_count(begin(c + 1) - begin(c), "all_reduce"); };
    ring_reduce_scatter(data, begin, 1, type, "all_reduce", stats_->all_reduce);
    for (int s = 0; s < size_ - 1; ++s) {
      const int send = mod(rank_ + 1 - s), recv = mod(rank_ - s);
      exchange(data + begin(send), length(send), data + begin(recv), length(recv), type, sizeof(T), "all_reduce",
               stats_->all_reduce);
    }
  }

  // Ring all-gather: P - 1 steps, each passing one rank's block to the right.
  void ring_all_gather(const Tensor& in, Tensor& out) {
    const int64_t n = in.numel(), elem = static_cast<int64_t>(dtype_size(in.dtype()));
    auto* base = static_cast<char*>(out.raw_data());
    std::memcpy(base + rank_ * n * elem, in.raw_data(), static_cast<size_t>(n * elem));
    const int count = message_count(n, "all_gather");
    const MPI_Datatype type = in.dtype() == DType::Float32 ? MPI_FLOAT : MPI_DOUBLE;
    for (int s = 0; s < size_ - 1; ++s) {
      const int send = (rank_ - s + size_) % size_, recv = (rank_ - s - 1 + size_) % size_;
      exchange(base + send * n * elem, count, base + recv * n * elem, count, type, elem, "all_gather",
               stats_->all_gather);
    }
  }

#ifdef DILATRON_WITH_NCCL
  // NCCL for CUDA tensors, set up on first use (every rank reaches its first CUDA collective together).
  NcclComm& nccl(Device device) {
    if (!nccl_) nccl_ = std::make_unique<NcclComm>(comm_, rank_, size_, device.index, timeout_s_);
    return *nccl_;
  }
#endif

  double timeout_s_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  bool owns_mpi_;  // the world's group: it initialised MPI
  int rank_ = 0, size_ = 1, local_rank_ = 0;
#ifdef DILATRON_WITH_NCCL
  std::unique_ptr<NcclComm> nccl_;
#endif
};

}  // namespace

std::unique_ptr<ProcessGroup> make_mpi_group(const InitOptions& options) { return MpiGroup::world(options); }

}  // namespace dilatron::dist
