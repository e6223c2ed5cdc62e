// Activations of fused_concat_linear: the name <-> enum mapping and the scalar math that every
// backend shares (forward value, and derivative from the pre-activation or from the output).
#pragma once
#include <cmath>
#include <string_view>
#include <type_traits>

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

namespace mmkernels {

enum class Activation { None, Relu, Gelu, GeluTanh, Silu, Tanh, Sigmoid };

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::None;
  if (name == "relu") return Activation::Relu;
  if (name == "gelu") return Activation::Gelu;
  if (name == "gelu_tanh") return Activation::GeluTanh;
  if (name == "silu") return Activation::Silu;
  if (name == "tanh") return Activation::Tanh;
  if (name == "sigmoid") return Activation::Sigmoid;
  TORCH_CHECK(false, "mmkernels: argument 'activation': expected one of none, relu, gelu, gelu_tanh, silu, tanh, "
                     "sigmoid; got '", name, "'");
}

// Backward of these needs the pre-activation; the others' derivative is a function of the output.
inline bool needs_preactivation(Activation a) {
  return a == Activation::Gelu || a == Activation::GeluTanh || a == Activation::Silu;
}

// Scalar math, templated on the compute type (float, or double for gradcheck), used by the CUDA
// kernels (the CPU kernels run ATen's own vectorised activations on cache-hot blocks).
template <typename T>
struct ActConst {
  static constexpr T sqrt1_2 = T(0.70710678118654752440);
  static constexpr T sqrt2_over_pi = T(0.79788456080286535588);
  static constexpr T inv_sqrt_2pi = T(0.39894228040143267794);
  static constexpr T tanh_coef = T(0.044715);
};

template <Activation A, typename T>
C10_HOST_DEVICE inline T activate(T z) {
  using C = ActConst<T>;
  if constexpr (A == Activation::Relu) return z > T(0) ? z : T(0);
  if constexpr (A == Activation::Gelu) return T(0.5) * z * (T(1) + erf(z * C::sqrt1_2));
  if constexpr (A == Activation::GeluTanh)
    return T(0.5) * z * (T(1) + tanh(C::sqrt2_over_pi * (z + C::tanh_coef * z * z * z)));
  if constexpr (A == Activation::Silu) return z / (T(1) + exp(-z));
  if constexpr (A == Activation::Tanh) return tanh(z);
  if constexpr (A == Activation::Sigmoid) return T(1) / (T(1) + exp(-z));
  return z;
}

// d act / d z, from the pre-activation z (gelu, gelu_tanh, silu) or from the output y (the others).
template <Activation A, typename T>
C10_HOST_DEVICE inline T activation_grad(T z, T y) {
  using C = ActConst<T>;
  // PyTorch's threshold_backward: 0 where y <= 0, else 1, so a NaN output passes the gradient.
  if constexpr (A == Activation::Relu) return y <= T(0) ? T(0) : T(1);
  if constexpr (A == Activation::Tanh) return T(1) - y * y;
  if constexpr (A == Activation::Sigmoid) return y * (T(1) - y);
  if constexpr (A == Activation::Gelu)
    return T(0.5) * (T(1) + erf(z * C::sqrt1_2)) + z * C::inv_sqrt_2pi * exp(T(-0.5) * z * z);
  if constexpr (A == Activation::GeluTanh) {
    T t = tanh(C::sqrt2_over_pi * (z + C::tanh_coef * z * z * z));
    T dinner = C::sqrt2_over_pi * (T(1) + T(3) * C::tanh_coef * z * z);
    return T(0.5) * (T(1) + t) + T(0.5) * z * (T(1) - t * t) * dinner;
  }
  if constexpr (A == Activation::Silu) {
    T s = T(1) / (T(1) + exp(-z));
    return s * (T(1) + z * (T(1) - s));
  }
  return T(1);
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime activation a.
template <typename F>
inline auto dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::None: return f(std::integral_constant<Activation, Activation::None>{});
    case Activation::Relu: return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Gelu: return f(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh: return f(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::Silu: return f(std::integral_constant<Activation, Activation::Silu>{});
    case Activation::Tanh: return f(std::integral_constant<Activation, Activation::Tanh>{});
    case Activation::Sigmoid: return f(std::integral_constant<Activation, Activation::Sigmoid>{});
  }
  TORCH_CHECK(false, "mmkernels: unhandled activation");
}

}  // namespace mmkernels
