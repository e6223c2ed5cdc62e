// Vectorised activation math for the CPU epilogues (at::vec::Vectorized<float|double>); the same
// formulas as the scalar ones in activation.h.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include "activation.h"

namespace mmkernels::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <Activation A, typename T>
inline Vec<T> activate_vec(Vec<T> z) {
  using C = ActConst<T>;
  const Vec<T> one(T(1)), half(T(0.5));
  if constexpr (A == Activation::Relu) return at::vec::maximum(z, Vec<T>(T(0)));
  if constexpr (A == Activation::Gelu) return half * z * (one + (z * Vec<T>(C::sqrt1_2)).erf());
  if constexpr (A == Activation::GeluTanh)
    return half * z * (one + (Vec<T>(C::sqrt2_over_pi) * (z + Vec<T>(C::tanh_coef) * z * z * z)).tanh());
  if constexpr (A == Activation::Silu) return z / (one + z.neg().exp());
  if constexpr (A == Activation::Tanh) return z.tanh();
  if constexpr (A == Activation::Sigmoid) return one / (one + z.neg().exp());
  return z;
}

// d act / d z from the pre-activation z or the output y (see activation_grad in activation.h).
template <Activation A, typename T>
inline Vec<T> activation_grad_vec(Vec<T> z, Vec<T> y) {
  using C = ActConst<T>;
  const Vec<T> one(T(1)), half(T(0.5));
  if constexpr (A == Activation::Relu) return (y > Vec<T>(T(0))) & one;  // mask & 1.0 = 1.0 or 0.0
  if constexpr (A == Activation::Tanh) return one - y * y;
  if constexpr (A == Activation::Sigmoid) return y * (one - y);
  if constexpr (A == Activation::Gelu)
    return half * (one + (z * Vec<T>(C::sqrt1_2)).erf()) +
           z * Vec<T>(C::inv_sqrt_2pi) * (Vec<T>(T(-0.5)) * z * z).exp();
  if constexpr (A == Activation::GeluTanh) {
    Vec<T> t = (Vec<T>(C::sqrt2_over_pi) * (z + Vec<T>(C::tanh_coef) * z * z * z)).tanh();
    Vec<T> dinner = Vec<T>(C::sqrt2_over_pi) * (one + Vec<T>(T(3) * C::tanh_coef) * z * z);
    return half * (one + t) + half * z * (one - t * t) * dinner;
  }
  if constexpr (A == Activation::Silu) {
    Vec<T> s = one / (one + z.neg().exp());
    return s * (one + z * (one - s));
  }
  return one;
}

}  // namespace mmkernels::cpu
