// The row machinery of the CPU kernels (ofa_loss_cpu.cpp: the dense teacher; ofa_loss_cpu_sparse.h:
// the sparse teacher): at::vec loops over one row with acc_t math (float32, float64 for float64),
// bfloat16 and float16 logits widened as they are loaded, and the student side both kernels share:
// the per-branch statistics pass, the gradient row, the rows' pointers and the threading.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_vec_exp.h"  // first: ofa_row_math.h calls its vector ofa_exp
#include "ofa_row_math.h"
#include "op_inputs.h"

namespace ofakd {
namespace cpu_kernel {

using at::vec::Vectorized;

// Runs body(T(0), c) over [0, n): SIMD vectors first, then the tail, so one generic lambda (using
// the shared formulas) serves both. The tail is a scalar loop, or, for a body that may run twice on an
// element (kRevisit: it only stores what it computes from its inputs), one vector ending at n: the
// scalar tail of a 1000-class row is 8 elements of libm calls, a tenth of the row's time.
template <typename acc_t, bool kRevisit = false, typename Body>
inline void for_each_element(int64_t n, const Body& body) {
  constexpr int64_t kWidth = Vectorized<acc_t>::size();
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) body(Vectorized<acc_t>(acc_t(0)), c);
  if (kRevisit && c < n && n >= kWidth) return body(Vectorized<acc_t>(acc_t(0)), n - kWidth);
  for (; c < n; ++c) body(acc_t(0), c);
}

// Loads in acc_t from acc_t rows or from the logits' own dtype: bfloat16 and float16 are widened
// in registers, so their rows need no converted copy.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load(const Vectorized<acc_t>&, const scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(ptr);
  } else {
    Vectorized<acc_t> widened;
    at::vec::load_to_float(ptr, widened);
    return widened;
  }
}
template <typename acc_t, typename scalar_t>
inline acc_t load(acc_t, const scalar_t* ptr) { return static_cast<acc_t>(*ptr); }
// Stores acc_t values to acc_t rows, or narrowed to a bfloat16 / float16 gradient row.
template <typename acc_t, typename scalar_t>
inline void store(const Vectorized<acc_t>& value, scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    value.store(ptr);
  } else {
    at::vec::convert_from_float<scalar_t>(value, value).store(ptr, Vectorized<acc_t>::size());
  }
}
template <typename acc_t, typename scalar_t>
inline void store(acc_t value, scalar_t* ptr) { *ptr = static_cast<scalar_t>(value); }

struct AddOp {
  template <typename T>
  T operator()(const T& a, const T& b) const { return a + b; }
  template <typename acc_t>
  static constexpr acc_t identity() { return acc_t(0); }
};

struct MaxOp {
  template <typename acc_t>
  Vectorized<acc_t> operator()(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) const {
    return at::vec::maximum(a, b);
  }
  template <typename acc_t>
  acc_t operator()(acc_t a, acc_t b) const { return std::max(a, b); }
  template <typename acc_t>
  static constexpr acc_t identity() { return -std::numeric_limits<acc_t>::infinity(); }
};

// Reduces each value body(T(0), c) returns (a std::array, one value per op in Ops) over c in
// [0, n), value i with Ops[i]. The accumulators are locals here, not captured by the body, so
// they stay in registers (a body storing to a float row could otherwise alias them and force a
// memory round trip per vector), and with kInterleave = 2 there are two per value, for even
// and odd vectors, so that cheap bodies (the max pass) are not bound by the latency of one
// chain. Bodies with an exp take 1: there the exp dominates and more live registers spill.
// A row's tail (n not a multiple of the width) is the vector ending at n, so a body may run twice
// on an element: it may store only what it computes from its inputs (for_each_element's kRevisit).
template <typename acc_t, int kInterleave, typename... Ops, typename Body>
inline std::array<acc_t, sizeof...(Ops)> reduce_row(int64_t n, const Body& body) {
  using V = Vectorized<acc_t>;
  constexpr int64_t kWidth = V::size();
  constexpr size_t kN = sizeof...(Ops);
  const auto combine = [](auto& acc, const auto& value) {
    [&]<size_t... I>(std::index_sequence<I...>) { ((acc[I] = Ops()(acc[I], value[I])), ...); }
    (std::make_index_sequence<kN>());
  };
  std::array<V, kN> even{V(Ops::template identity<acc_t>())...}, odd = even;
  int64_t c = 0;
  for (; kInterleave == 2 && c + 2 * kWidth <= n; c += 2 * kWidth) {
    combine(even, body(V(acc_t(0)), c));
    combine(odd, body(V(acc_t(0)), c + kWidth));
  }
  for (; c + kWidth <= n; c += kWidth) combine(even, body(V(acc_t(0)), c));
  combine(even, odd);
  if (c < n && n >= kWidth) {  // the tail as the vector ending at n, its lanes before c set to the identities
    const auto value = body(V(acc_t(0)), n - kWidth);
    const V fresh = V::arange(acc_t(0), acc_t(1)) >= V(static_cast<acc_t>(c - (n - kWidth)));
    std::array<V, kN> masked;
    [&]<size_t... I>(std::index_sequence<I...>) {
      ((masked[I] = V::blendv(V(Ops::template identity<acc_t>()), value[I], fresh)), ...);
    }(std::make_index_sequence<kN>());
    combine(even, masked);
    c = n;
  }
  std::array<acc_t, kN> total;
  [&]<size_t... I>(std::index_sequence<I...>) {
    ((total[I] = at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return Ops()(x, y); }, even[I])), ...);
  }(std::make_index_sequence<kN>());
  for (; c < n; ++c) combine(total, body(acc_t(0), c));
  return total;
}

template <typename acc_t, typename Body>
inline acc_t row_sum(int64_t n, const Body& body) {
  return reduce_row<acc_t, 1, AddOp>(n, [&](auto zero, int64_t c) { return std::array{body(zero, c)}; })[0];
}

template <typename acc_t, typename scalar_t>
inline acc_t row_max(int64_t n, const scalar_t* row) {
  return reduce_row<acc_t, 2, MaxOp>(n, [row](auto zero, int64_t c) { return std::array{load(zero, row + c)}; })[0];
}

template <typename scalar_t, typename acc_t>
inline void write_row(const acc_t* values, int64_t n, scalar_t* out) {
  at::vec::convert(values, out, n);
}


// Gradients at least this large are written with non-temporal stores (float32, bfloat16 and float16
// rows, AVX2/AVX512): around the caches and without the read of each line that an ordinary store's
// write-allocate costs. They cannot stay cached for their consumer anyway; below it (ImageNet-1k:
// 5 MB) the next backward reads them from cache.
constexpr int64_t kStreamGradBytes = int64_t(32) << 20;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
// One vector of float values streamed to `ptr` (aligned to the vector's bytes in scalar_t), narrowed first.
template <typename scalar_t>
inline void stream_store(const Vectorized<float>& value, scalar_t* ptr) {
  if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_ps(ptr, value);
#else
    _mm256_stream_ps(ptr, value);
#endif
  } else {
    const auto narrow = at::vec::convert_from_float<scalar_t>(value, value);  // the first half holds `value`
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(ptr), _mm512_castsi512_si256(narrow));
#else
    _mm_stream_si128(reinterpret_cast<__m128i*>(ptr), _mm256_castsi256_si128(narrow));
#endif
  }
}
#else
constexpr bool kCanStream = false;
template <typename scalar_t>
inline void stream_store(const Vectorized<float>&, scalar_t*) {}
#endif

// Stores value(zero, c) to out[c] for c in [0, n), streamed when `stream` (see kStreamGradBytes):
// ordinary stores up to the first vector-aligned element and for the tail, aligned streams between.
template <typename acc_t, typename scalar_t, typename Value>
inline void write_values(int64_t n, scalar_t* out, bool stream, const Value& value) {
  if constexpr (kCanStream && std::is_same_v<acc_t, float>) {
    if (stream) {
      using V = Vectorized<float>;
      constexpr int64_t kWidth = V::size();
      constexpr auto kBytes = static_cast<uintptr_t>(kWidth * sizeof(scalar_t));
      const uintptr_t misalignment = reinterpret_cast<uintptr_t>(out) % kBytes;
      const int64_t head = std::min<int64_t>(n, misalignment ? (kBytes - misalignment) / sizeof(scalar_t) : 0);
      int64_t c = 0;
      for (; c < head; ++c) store(value(0.0f, c), out + c);
      for (; c + kWidth <= n; c += kWidth) stream_store(value(V(0.0f), c), out + c);
      for (; c < n; ++c) store(value(0.0f, c), out + c);
      return;
    }
  }
  for_each_element<acc_t, /*kRevisit=*/true>(n, [=](auto zero, int64_t c) { store(value(zero, c), out + c); });
}

// Orders a thread's streamed stores before the join of at::parallel_for (they are weakly ordered).
inline void fence_streams() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Asks for the line kPrefetchAhead elements past `p` into L2. The student pass reads two streams (its
// row and, for the max, the next), and the hardware prefetchers, which stop at page boundaries, let
// large rows' lines arrive late: at 256x21841x5 float32 with one thread the call went from 1.42x to
// 1.2x the memcpy floor with it (2048 elements ahead: 1.26x; 4096, 8192, 16384: 1.18x-1.19x). Past a row's end
// it reaches a later row of the same branch, or nothing: a prefetch never faults. Rows shorter than
// the distance are left to the hardware (no gain at 1000 classes).
constexpr int64_t kPrefetchAhead = 8192;
template <typename scalar_t>
inline void prefetch_ahead(const scalar_t* p) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + kPrefetchAhead * sizeof(scalar_t)),
                     /*rw=*/0, /*locality=*/2);
}


// ---- The student side, shared by the dense and the sparse kernel ----

struct Problem {
  int64_t K, B, C;
  double inv_temperature;
  bool want_grad, want_teacher_grad;
  bool stream_grad;  // the branch gradients are written with non-temporal stores (kStreamGradBytes)
};

// Runs body(row_begin, row_end) over the B rows on the intra-op threads, about 16k elements a chunk.
template <typename Body>
void parallel_rows(int64_t B, int64_t C, const Body& body) {
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
    body(begin, end);
    fence_streams();
  });
}

// Whether branch k needs weights of its own: consecutive branches with one eps share them.
inline bool new_eps(const double* eps_values, int64_t k) { return k == 0 || eps_values[k] != eps_values[k - 1]; }

// The K student branches: row b of branch k starts at rows0[k] + b * stride[k] (any row stride).
template <typename scalar_t>
struct BranchRows {
  std::vector<const scalar_t*> rows0;
  std::vector<int64_t> stride;
  const scalar_t* row(int64_t k, int64_t b) const { return rows0[k] + b * stride[k]; }
  int64_t count() const { return static_cast<int64_t>(rows0.size()); }
};

template <typename scalar_t>
BranchRows<scalar_t> branch_rows(const OpInputs& in) {
  BranchRows<scalar_t> rows{{}, in.row_strides};
  for (const auto& m : in.branches) rows.rows0.push_back(m.const_data_ptr<scalar_t>());
  return rows;
}

// Where the kernels write: loss rows [K, B] in acc_t and, when wanted (else null), the gradients
// [K, B, C] for the row factors scale[k * scale_stride_k + b * scale_stride_b].
template <typename scalar_t>
struct BranchOutPtrs {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* loss_rows;
  scalar_t* grad;
  const acc_t* scale;
  int64_t scale_stride_k, scale_stride_b;
  acc_t row_scale(int64_t k, int64_t b) const { return scale[k * scale_stride_k + b * scale_stride_b]; }
};

// One student row at x = s / T: max_x, sum_c exp(x_c - max_x) and a gap sum_c g_c (max_x - x_c) >= 0.
template <typename acc_t>
struct StudentStats {
  acc_t x_max, exp_sum, gap;
};

// The student rows of one thread in the order it visits them (row b, its branches k, row b + 1, ...).
// Each row's max is taken in the pass over its predecessor: a row is read once per pass (only the
// thread's first row has a max pass), and its first touch, a stream from L3 or memory, overlaps the
// exp arithmetic instead of being a pass of its own.
template <typename scalar_t>
class StudentRows {
 public:
  using acc_t = at::opmath_type<scalar_t>;
  StudentRows(const BranchRows<scalar_t>& rows, int64_t C, acc_t inv_t, int64_t row_end)
      : rows_(rows), C_(C), inv_t_(inv_t), row_end_(row_end) {}

  // The pass over row (k, b): exp(x_c - max_x) kept in e (unless null), the exp-sum, the gap of the
  // terms gap_term(zero, c, max_x - x_c), and on the way the max of the next row.
  template <typename GapTerm>
  StudentStats<acc_t> pass(int64_t k, int64_t b, acc_t* e, const GapTerm& gap_term) {
    const scalar_t* s = rows_.row(k, b);
    const acc_t inv_t = inv_t_;
    const acc_t x_max = (have_next_max_ ? next_max_ : row_max<acc_t>(C_, s)) * inv_t;
    const scalar_t* next = successor(k, b);
    have_next_max_ = next != nullptr;
    if (next == nullptr) next = s;  // read for nothing: the thread has no next row
    const bool long_rows = C_ > kPrefetchAhead;
    const auto [exp_sum, gap, max_of_next] = reduce_row<acc_t, 1, AddOp, AddOp, MaxOp>(C_, [=](auto zero, int64_t c) {
      using V = decltype(zero);
      auto shifted = load(zero, s + c) * V(inv_t) - V(x_max);  // x_c - max_x <= 0
      auto ex = ofa_exp(shifted);
      if (e != nullptr) store(ex, e + c);
      if (long_rows) prefetch_ahead(next + c);
      return std::array{ex, gap_term(zero, c, V(acc_t(0)) - shifted), load(zero, next + c)};
    });
    next_max_ = max_of_next;
    return {x_max, exp_sum, gap};
  }

 private:
  const scalar_t* successor(int64_t k, int64_t b) const {
    if (k + 1 < rows_.count()) return rows_.row(k + 1, b);
    return b + 1 < row_end_ ? rows_.row(0, b + 1) : nullptr;
  }

  const BranchRows<scalar_t>& rows_;
  int64_t C_;
  acc_t inv_t_;
  int64_t row_end_;
  acc_t next_max_ = acc_t(0);
  bool have_next_max_ = false;
};

// One gradient row, (S * q_c - w_c) * scale / T with q_c = e_c / exp_sum (e = exp(x - max_x)).
template <typename scalar_t>
struct GradRow {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* e;
  acc_t inv_exp_sum, weight_sum, scale_over_t;
  scalar_t* out;
  bool stream;  // non-temporal stores (see kStreamGradBytes)

  // Every class, with the weights w_c = weight(zero, c); the fields go to locals first so that the
  // stores to `out` cannot alias them.
  template <typename Weight>
  void fill(int64_t C, const Weight& weight) const {
    const acc_t* e_row = e;
    const acc_t inv = inv_exp_sum, sum = weight_sum, scale = scale_over_t;
    write_values<acc_t>(C, out, stream, [=](auto zero, int64_t c) {
      using V = decltype(zero);
      return student_grad(V(sum), load(zero, e_row + c) * V(inv), weight(zero, c), V(scale));
    });
  }

  // Class c with its own weight w (the target, a stored class), written again after fill.
  void set(int64_t c, acc_t w) const { store(student_grad(weight_sum, e[c] * inv_exp_sum, w, scale_over_t), out + c); }
};

}  // namespace cpu_kernel
}  // namespace ofakd
