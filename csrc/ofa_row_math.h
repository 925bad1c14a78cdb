// Per-element formulas of the OFA loss, shared by the CPU kernel (scalar and at::vec
// vector types) and the CUDA kernel (__host__ __device__ scalars).
//
// Notation for one row (see shared/docs/ofa-loss.md): x = s / T (student), z = t / T
// (teacher), log_p = z - lse(z), p = exp(log_p), y the target class, eps > 0.
//   w_c = p_c ** eps            = exp(eps * log_p_c)          (c != y)
//   w_y = (1 + p_y) ** eps - 1  = expm1(eps * log1p(p_y))
//   S   = sum_c w_c
//   l   = sum_c w_c * (max_x - x_c) + S * log(sum_c exp(x_c - max_x))
//   dl/ds_c = (S * q_c - w_c) / T,   q = softmax(x)
//   dl/dt_c = (p_c / T) * (g_c - sum_j p_j g_j),  g_c = -eps * (p_c + m_c) ** (eps - 1) * log_q_c
//
// Every function is a template over the value type, so the CPU kernel instantiates the same
// formula for a scalar tail and for a SIMD vector, and nvcc for float and double. Callers
// provide ofa_exp / ofa_log1p / ofa_expm1 overloads for their types before including this.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OFA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OFA_HOST_DEVICE inline
#endif

namespace ofakd {

// Scalar elementary functions, usable on host and device.
OFA_HOST_DEVICE float ofa_exp(float x) { return expf(x); }
OFA_HOST_DEVICE double ofa_exp(double x) { return exp(x); }
OFA_HOST_DEVICE float ofa_log(float x) { return logf(x); }
OFA_HOST_DEVICE double ofa_log(double x) { return log(x); }
OFA_HOST_DEVICE float ofa_log1p(float x) { return log1pf(x); }
OFA_HOST_DEVICE double ofa_log1p(double x) { return log1p(x); }
OFA_HOST_DEVICE float ofa_expm1(float x) { return expm1f(x); }
OFA_HOST_DEVICE double ofa_expm1(double x) { return expm1(x); }

// Weight of a non-target class: p_c ** eps, with no pow (log_p is already known).
// eps == 1 is the common case (w = p) and is best served by the caller reusing p.
template <typename T>
OFA_HOST_DEVICE T class_weight(T log_p, T eps) {
  return ofa_exp(eps * log_p);
}

// Weight of the target class: (1 + p_y) ** eps - 1, exact for small p_y.
template <typename T>
OFA_HOST_DEVICE T target_weight(T p_target, T eps) {
  return ofa_expm1(eps * ofa_log1p(p_target));
}

// Row loss from the three statistics a pass over the student row gathers:
// weight_sum = S, weighted_gap = sum_c w_c (max_x - x_c) >= 0, log_sum = log(sum_c exp(x_c - max_x)).
// Written this way no term cancels, even for logits of magnitude 1e4.
template <typename T>
OFA_HOST_DEVICE T row_loss(T weight_sum, T weighted_gap, T log_sum) {
  return weighted_gap + weight_sum * log_sum;
}

// Student gradient of one element, already multiplied by (upstream scale / T):
// (S * q_c - w_c) * scale_over_T.
template <typename T>
OFA_HOST_DEVICE T student_grad(T weight_sum, T q, T w, T scale_over_T) {
  return (weight_sum * q - w) * scale_over_T;
}

// d l / d p_c for the teacher gradient: -eps * base ** (eps - 1) * log_q_c, where
// log_base = log(p_c) off the target and log1p(p_y) on it.
template <typename T>
OFA_HOST_DEVICE T weight_grad(T log_base, T eps, T log_q) {
  return T(-1) * eps * ofa_exp((eps - T(1)) * log_base) * log_q;
}

// p_c * dl/dp_c of a non-target class written with its weight w_c = p_c ** eps:
// p_c * (-eps * p_c ** (eps - 1) * log_q_c) = -eps * w_c * log_q_c. Unlike p * weight_grad(log p, ...)
// it never forms p ** (eps - 1), which overflows (inf * 0 = NaN) for eps < 1 where p underflows.
template <typename T>
OFA_HOST_DEVICE T class_weight_grad_times_p(T w, T eps, T log_q) {
  return T(-1) * eps * w * log_q;
}

// Teacher gradient of one element from the products h_c = p_c * g_c and their row sum
// H = sum_j p_j g_j, already multiplied by (upstream scale / T): (h_c - p_c * H) * scale_over_T,
// i.e. p_c * (g_c - H) * scale_over_T without dividing h by p.
template <typename T>
OFA_HOST_DEVICE T teacher_grad_from_products(T h, T p, T sum_h, T scale_over_T) {
  return (h - p * sum_h) * scale_over_T;
}

// ---- The sparse teacher (shared/docs/ofa-loss.md, "A sparse teacher") ----
// A row keeps k stored classes A with log_p_i = t_i / T - lse_t; the other C - k classes share the
// rest of the mass evenly. With G(S) = sum_{c in S} (max_x - x_c) >= 0 (the gap of a set):
//   l = sum_{i in A, i != y} w_i (max_x - x_i) + w_y (max_x - x_y)
//       + w_rest * (G(all) - G(A) - [y not in A] (max_x - x_y))  +  S * log_sum
//   S = sum_{i in A, i != y} w_i + w_y + w_rest * (C - k - [y not in A])
// so a pass over the student row gathers max_x, log_sum and G(all); nothing dense of the teacher.

// log of one non-stored class's probability, log(r / (C - k)) with r = 1 - sum_A p_i written as
// -expm1(log_stored_mass) (exact when the stored mass is close to 1); -inf when r = 0 or k = C.
template <typename T>
OFA_HOST_DEVICE T log_rest_probability(T log_stored_mass, long long others) {
  const T rest = T(-1) * ofa_expm1(log_stored_mass < T(0) ? log_stored_mass : T(0));
  if (others <= 0 || !(rest > T(0))) return T(-1) / T(0);
  return ofa_log(rest) - ofa_log(T(others));
}

// Merges two partial gaps (max m, gap g = sum (m - x), count n) into one about the larger max:
// every term stays >= 0, so G(all) has no cancellation even for logits of magnitude 1e4.
template <typename T>
OFA_HOST_DEVICE void merge_gap(T& m, T& g, long long& n, T m_b, T g_b, long long n_b) {
  if (n_b == 0) return;
  if (n == 0) {
    m = m_b;
    g = g_b;
  } else if (m_b > m) {
    g = g_b + g + T(n) * (m_b - m);
    m = m_b;
  } else {
    g = g + g_b + T(n_b) * (m - m_b);
  }
  n += n_b;
}

}  // namespace ofakd
