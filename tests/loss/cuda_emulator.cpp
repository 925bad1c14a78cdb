// Runs the CUDA kernels' row programs (csrc/ofa_loss_cuda_row.cuh, dense teacher, and
// csrc/ofa_loss_cuda_sparse_row.cuh, sparse teacher) on the host, so their indexing, masking,
// reductions and math are tested on machines without a GPU.
//
// A row group of G GPU threads is emulated by G std::threads that share a barrier (for __syncthreads),
// reduction scratch arrays (for the warp-shuffle + shared-memory reductions; sums are added here in
// rank order instead of a tree, so results may differ from the GPU's in the last bits) and the row's
// shared memory. Every memory access is checked: it must fall inside one of the buffers the caller
// declared (read-only inputs, writable outputs), and a 16-byte access must be 16-byte aligned (as
// the GPU requires). Violations are counted and returned; the test requires zero.
//
// Built by tests/loss/cuda_checks.py with g++ as a plain shared library (c10's Half/BFloat16 headers
// only, no libtorch) and called through ctypes; the branch launches are planned by the same
// launch_branch_groups / launch_sparse_branch_groups / plan_launch / plan_sparse_launch
// (csrc/ofa_loss_cuda_launch.h) the CUDA host code uses.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "ofa_loss_cuda_launch.h"

namespace {

using namespace ofakd::cuda_kernel;

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

struct Region {
  uintptr_t begin, end;
  bool writable;
};

struct MemoryChecker {
  std::vector<Region> regions;
  std::atomic<int64_t> errors{0};
  std::atomic<int64_t> vector_accesses{0};
  std::atomic<int64_t> element_accesses{0};
  // False (and counted) for an access outside the declared buffers or a misaligned 16-byte access;
  // such an access is then not performed.
  bool check(const void* ptr, size_t bytes, bool write, bool vector) {
    (vector ? vector_accesses : element_accesses).fetch_add(1);
    const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
    bool ok = !vector || p % 16 == 0;
    bool inside = false;
    for (const auto& r : regions) {
      if (p >= r.begin && p + bytes <= r.end && (!write || r.writable)) {
        inside = true;
        break;
      }
    }
    if (!ok || !inside) errors.fetch_add(1);
    return ok && inside;
  }
};

template <typename acc_t>
struct GroupState {
  explicit GroupState(int threads) : barrier(threads), max_scratch(threads), sum_scratch(threads) {}
  Barrier barrier;
  std::vector<acc_t> max_scratch;
  std::vector<Sums> sum_scratch;
};

template <typename acc_t>
struct HostOps {
  GroupState<acc_t>* state;
  MemoryChecker* memory;
  int thread_rank;
  int threads;

  int rank() const { return thread_rank; }
  int size() const { return threads; }
  void sync() const { state->barrier.wait(); }
  // Like BlockOps::reduce_max: the maximum in every thread (barriers around the shared scratch).
  acc_t reduce_max(acc_t value) const {
    state->max_scratch[thread_rank] = value;
    sync();
    for (int t = 0; t < threads; ++t) value = state->max_scratch[t] > value ? state->max_scratch[t] : value;
    sync();
    return value;
  }
  // Like BlockOps::reduce_sum: the sums at rank 0 (added in rank order, not in a tree).
  Sums reduce_sum(Sums sums) const {
    state->sum_scratch[thread_rank] = sums;
    sync();
    if (thread_rank == 0) {
      sums = Sums{0.0, 0.0, 0.0};
      for (int t = 0; t < threads; ++t) {
        sums.d += state->sum_scratch[t].d;
        sums.gap += state->sum_scratch[t].gap;
        sums.s += state->sum_scratch[t].s;
      }
    }
    sync();
    return sums;
  }
  template <typename T>
  Pack<T> load_pack(const T* ptr, bool) const {
    Pack<T> pack;
    std::memset(&pack, 0, sizeof(pack));
    if (memory->check(ptr, 16, false, true)) std::memcpy(&pack, ptr, 16);
    return pack;
  }
  template <typename T>
  T load_one(const T* ptr) const {
    return memory->check(ptr, sizeof(T), false, false) ? *ptr : T(0.0f);
  }
  template <typename T>
  void store_pack(T* ptr, const Pack<T>& pack) const {
    if (memory->check(ptr, 16, true, true)) std::memcpy(ptr, &pack, 16);
  }
  template <typename T>
  void store_one(T* ptr, T value) const {
    if (memory->check(ptr, sizeof(T), true, false)) *ptr = value;
  }
};

// One launch: every row b by one emulated group of `threads` threads, rows in sequence; row(ops, b)
// runs the row program.
template <typename acc_t, typename Row>
void emulate_rows(int64_t B, int threads, MemoryChecker& memory, const Row& row) {
  GroupState<acc_t> state(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      HostOps<acc_t> ops{&state, &memory, t, threads};
      for (int64_t b = 0; b < B; ++b) {
        row(ops, b);
        ops.sync();  // one row at a time, like separate blocks
      }
    });
  }
  for (auto& thread : pool) thread.join();
}

// One launch of the dense kernel (ofa_rows_kernel): its shared memory and dynamic scratch per group.
template <typename scalar_t>
void emulate_launch(const LaunchParams<scalar_t>& P, int threads, MemoryChecker& memory) {
  using acc_t = acc_of<scalar_t>;
  RowShared<acc_t> shared_row;
  std::vector<acc_t> row_scratch(row_scratch_bytes(threads, sizeof(scalar_t)) / sizeof(acc_t));
  emulate_rows<acc_t>(P.B, threads, memory, [&](const HostOps<acc_t>& ops, int64_t b) {
    ofa_row<scalar_t>(ops, P, b, shared_row, row_scratch.data());
  });
}

// One launch of the sparse-teacher kernel (ofa_sparse_rows_kernel).
template <typename scalar_t>
void emulate_sparse_launch(const SparseLaunchParams<scalar_t>& P, int threads, MemoryChecker& memory) {
  using acc_t = acc_of<scalar_t>;
  SparseRowShared<acc_t> shared_row;
  emulate_rows<acc_t>(P.B, threads, memory,
                      [&](const HostOps<acc_t>& ops, int64_t b) { ofa_sparse_row<scalar_t>(ops, P, b, shared_row); });
}

// The buffers a call may touch: num_regions triples (address, bytes, writable).
void declare_regions(MemoryChecker& memory, const int64_t* regions, int num_regions) {
  for (int i = 0; i < num_regions; ++i) {
    const auto begin = static_cast<uintptr_t>(regions[3 * i]);
    memory.regions.push_back({begin, begin + static_cast<uintptr_t>(regions[3 * i + 1]), regions[3 * i + 2] != 0});
  }
}

// The student side of a call, as ofa_loss_cuda_op.cpp fills it.
template <typename scalar_t>
void fill_branch_problem(int K, const void* const* branches, const int64_t* branch_strides, const int64_t* target,
                         const double* eps, double temperature, const void* grad_scale, int64_t scale_stride_k,
                         int64_t scale_stride_b, int64_t B, int64_t C, void* loss_rows, void* grad_branches,
                         BranchProblem<scalar_t>& pb) {
  using acc_t = acc_of<scalar_t>;
  for (int k = 0; k < K; ++k) {
    pb.branch.push_back(static_cast<const scalar_t*>(branches[k]));
    pb.branch_stride.push_back(branch_strides[k]);
    pb.eps.push_back(eps[k]);
  }
  pb.target = target;
  pb.B = B;
  pb.C = C;
  pb.temperature = temperature;
  pb.loss_rows = static_cast<acc_t*>(loss_rows);
  pb.grad_scale = static_cast<const acc_t*>(grad_scale);
  pb.scale_stride_k = scale_stride_k;
  pb.scale_stride_b = scale_stride_b;
  pb.grad_branches = static_cast<scalar_t*>(grad_branches);
}

// stats[0 .. 2] of a call: bad accesses, 16-byte accesses, element accesses; returns the bad ones.
int64_t report(const MemoryChecker& memory, int64_t* stats) {
  stats[0] = memory.errors.load();
  stats[1] = memory.vector_accesses.load();
  stats[2] = memory.element_accesses.load();
  return stats[0];
}

template <typename scalar_t>
int64_t run(int K, const void* const* branches, const int64_t* branch_strides, const void* teacher,
            int64_t teacher_stride, const int64_t* target, const double* eps, double temperature, const void* grad_scale,
            int64_t scale_stride_k, int64_t scale_stride_b, int64_t B, int64_t C, void* loss_rows, void* grad_branches,
            void* grad_teacher, void* teacher_workspace, int threads, const int64_t* regions, int num_regions,
            int64_t* stats) {
  using acc_t = acc_of<scalar_t>;
  MemoryChecker memory;
  declare_regions(memory, regions, num_regions);
  Problem<scalar_t> pb;
  fill_branch_problem(K, branches, branch_strides, target, eps, temperature, grad_scale, scale_stride_k, scale_stride_b,
                      B, C, loss_rows, grad_branches, pb);
  pb.teacher = static_cast<const scalar_t*>(teacher);
  pb.teacher_stride = teacher_stride;
  pb.grad_teacher = static_cast<scalar_t*>(grad_teacher);
  pb.teacher_workspace = static_cast<acc_t*>(teacher_workspace);
  const LaunchShape shape = plan_launch(B, C, static_cast<int>(sizeof(scalar_t)), threads);
  launch_branch_groups(pb, [&](const LaunchParams<scalar_t>& params) { emulate_launch(params, shape.threads, memory); });
  return report(memory, stats);
}

template <typename scalar_t>
int64_t run_sparse(int K, const void* const* branches, const int64_t* branch_strides, const void* teacher_logits,
                   const int64_t* teacher_indices, const void* teacher_lse, int64_t k, const int64_t* target,
                   const double* eps, double temperature, const void* grad_scale, int64_t scale_stride_k,
                   int64_t scale_stride_b, int64_t B, int64_t C, void* loss_rows, void* grad_branches, int threads,
                   const int64_t* regions, int num_regions, int64_t* stats) {
  using acc_t = acc_of<scalar_t>;
  MemoryChecker memory;
  declare_regions(memory, regions, num_regions);
  SparseProblem<scalar_t> pb;
  fill_branch_problem(K, branches, branch_strides, target, eps, temperature, grad_scale, scale_stride_k, scale_stride_b,
                      B, C, loss_rows, grad_branches, pb);
  pb.teacher_logits = static_cast<const acc_t*>(teacher_logits);
  pb.teacher_indices = teacher_indices;
  pb.teacher_lse = static_cast<const acc_t*>(teacher_lse);
  pb.k = k;
  const LaunchShape shape = plan_sparse_launch(B, C, static_cast<int>(sizeof(scalar_t)), threads);
  launch_sparse_branch_groups(
      pb, [&](const SparseLaunchParams<scalar_t>& params) { emulate_sparse_launch(params, shape.threads, memory); });
  return report(memory, stats);
}

}  // namespace

// Calls f with a value of the scalar type the ctypes dtype code names (0 float, 1 double, 2 bfloat16,
// 3 half); -1 for another code.
template <typename F>
int64_t with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0:
      return f(float{});
    case 1:
      return f(double{});
    case 2:
      return f(c10::BFloat16{});
    case 3:
      return f(c10::Half{});
    default:
      return -1;
  }
}

extern "C" {

// The launch plan of the CUDA kernel: {threads per row, blocks, chunks, needs a teacher workspace};
// threads > 0 forces the group size.
void ofa_emulator_plan(int64_t K, int64_t B, int64_t C, int elem_size, int threads, int64_t* out) {
  const LaunchShape shape = plan_launch(B, C, elem_size, threads);
  out[0] = shape.threads;
  out[1] = shape.blocks;
  out[2] = shape.chunks;
  out[3] = needs_teacher_workspace(K, shape) ? 1 : 0;
}

// dtype: 0 float32, 1 float64, 2 bfloat16, 3 float16. threads: row group size (0: the CUDA plan's).
// regions: num_regions triples (address, bytes, writable). Returns the number of bad memory accesses;
// stats[0 .. 2]: bad accesses, 16-byte accesses, element accesses.
int64_t ofa_emulator_run(int dtype, int K, const void* const* branches, const int64_t* branch_strides,
                         const void* teacher, int64_t teacher_stride, const int64_t* target, const double* eps,
                         double temperature, const void* grad_scale, int64_t scale_stride_k, int64_t scale_stride_b,
                         int64_t B, int64_t C, void* loss_rows, void* grad_branches, void* grad_teacher,
                         void* teacher_workspace, int threads, const int64_t* regions, int num_regions,
                         int64_t* stats) {
  return with_dtype(dtype, [&](auto tag) {
    return run<decltype(tag)>(K, branches, branch_strides, teacher, teacher_stride, target, eps, temperature,
                              grad_scale, scale_stride_k, scale_stride_b, B, C, loss_rows, grad_branches, grad_teacher,
                              teacher_workspace, threads, regions, num_regions, stats);
  });
}

// The sparse-teacher kernel (fused_forward_sparse): as ofa_emulator_run, with the teacher as logits
// [B, k] and lse [B] (acc dtype) and indices [B, k] (int64); no teacher gradient.
int64_t ofa_emulator_run_sparse(int dtype, int K, const void* const* branches, const int64_t* branch_strides,
                                const void* teacher_logits, const int64_t* teacher_indices, const void* teacher_lse,
                                int64_t k, const int64_t* target, const double* eps, double temperature,
                                const void* grad_scale, int64_t scale_stride_k, int64_t scale_stride_b, int64_t B,
                                int64_t C, void* loss_rows, void* grad_branches, int threads, const int64_t* regions,
                                int num_regions, int64_t* stats) {
  return with_dtype(dtype, [&](auto tag) {
    return run_sparse<decltype(tag)>(K, branches, branch_strides, teacher_logits, teacher_indices, teacher_lse, k,
                                     target, eps, temperature, grad_scale, scale_stride_k, scale_stride_b, B, C,
                                     loss_rows, grad_branches, threads, regions, num_regions, stats);
  });
}

}  // extern "C"
