// The CPU kernel's vector exp, ofa_exp(Vectorized<T>). Included before ofa_row_math.h, whose
// templates call ofa_exp on vector types and so need this overload declared first.
//
// Every argument it gets is <= 0 (logits minus their row max, log-probabilities), so it needs no
// overflow handling. float: x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2, the degree-5
// minimax polynomial of exp on that interval (within 2 ulp), and n added to the exponent bits: 9
// vector operations, inlined, against ~17 for Vectorized::exp_u20. One-step reduction: r is off by at
// most |n| * 2e-9, a relative error that only values below exp(-40) ~ 4e-18 notice. Arguments below
// -87 give exp(-87) ~ 1.6e-38 rather than subnormals (slow on x86); next to a row's largest term
// exp(0) = 1 that changes no sum or gradient. float64 keeps the exact exp.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>

namespace ofakd {

template <typename T>
inline at::vec::Vectorized<T> ofa_exp(const at::vec::Vectorized<T>& x) {
  return x.exp_u20();
}

// p * 2 ** n for the n held in the low mantissa bits of `rounded` (= x * log2(e) + 1.5 * 2 ** 23).
inline at::vec::Vectorized<float> scale_by_power_of_two(const at::vec::Vectorized<float>& p,
                                                        const at::vec::Vectorized<float>& rounded) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_castps_si512(rounded), 23)));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(rounded), 23)));
#else
  constexpr int kWidth = at::vec::Vectorized<float>::size();
  float p_values[kWidth], r_values[kWidth];
  p.store(p_values);
  rounded.store(r_values);
  for (int i = 0; i < kWidth; ++i) {
    uint32_t p_bits, r_bits;
    std::memcpy(&p_bits, &p_values[i], 4);
    std::memcpy(&r_bits, &r_values[i], 4);
    p_bits += r_bits << 23;
    std::memcpy(&p_values[i], &p_bits, 4);
  }
  return at::vec::Vectorized<float>::loadu(p_values);
#endif
}

template <>
inline at::vec::Vectorized<float> ofa_exp(const at::vec::Vectorized<float>& x_in) {
  using V = at::vec::Vectorized<float>;
  const V x = at::vec::clamp_min(x_in, V(-87.0f));  // keeps 2 ** n * exp(r) a normal float
  const V magic(12582912.0f);                         // 1.5 * 2 ** 23
  const V rounded = at::vec::fmadd(x, V(1.44269504088896341f), magic);
  const V n = rounded - magic;                        // round(x / ln2)
  const V r = at::vec::fmadd(n, V(-0.693147180559945309f), x);
  V poly = at::vec::fmadd(V(8.2903131842613220e-3f), r, V(4.1897930204868317e-2f));
  poly = at::vec::fmadd(poly, r, V(1.6667635738849640e-1f));
  poly = at::vec::fmadd(poly, r, V(4.9999150633811951e-1f));
  poly = at::vec::fmadd(poly, r, V(9.9999970197677612e-1f));
  return scale_by_power_of_two(at::vec::fmadd(poly, r, V(1.0f)), rounded);
}

}  // namespace ofakd
