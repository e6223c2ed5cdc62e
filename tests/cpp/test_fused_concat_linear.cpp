// C++ tests of fused_concat_linear through the dispatcher, against cat + linear in ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include "cpu/activation_vec.h"

namespace {

using Forward = std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                                                   c10::string_view);

std::tuple<at::Tensor, at::Tensor> fused_concat_linear(at::TensorList xs, const at::Tensor& w,
                                                       const std::optional<at::Tensor>& b, const char* act) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mmkernels::fused_concat_linear", "").typed<Forward>();
  return op.call(xs, w, b, act);
}

at::Tensor reference(const std::vector<at::Tensor>& xs, const at::Tensor& w, const at::Tensor& b, const std::string& act) {
  at::Tensor z = at::linear(at::cat(xs, -1), w, b);
  if (act == "relu") return at::relu(z);
  if (act == "gelu") return at::gelu(z);
  if (act == "gelu_tanh") return at::gelu(z, "tanh");
  if (act == "silu") return at::silu(z);
  if (act == "tanh") return at::tanh(z);
  if (act == "sigmoid") return at::sigmoid(z);
  return z;
}

class FusedConcatLinear : public ::testing::TestWithParam<const char*> {};

TEST_P(FusedConcatLinear, MatchesCatLinearInDouble) {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  std::vector<at::Tensor> xs = {at::randn({3, 17, 5}, opts), at::randn({3, 17, 1}, opts), at::randn({3, 17, 123}, opts)};
  at::Tensor w = at::randn({9, 129}, opts), b = at::randn({9}, opts);
  auto [out, preact] = fused_concat_linear(xs, w, b, GetParam());
  EXPECT_EQ(out.sizes(), at::IntArrayRef({3, 17, 9}));
  EXPECT_TRUE(at::allclose(out, reference(xs, w, b, GetParam()), 1e-10, 1e-10));
  const bool keeps_preact = mmkernels::needs_preactivation(mmkernels::parse_activation(GetParam()));
  EXPECT_EQ(preact.numel() > 0, keeps_preact);
  if (keeps_preact) EXPECT_TRUE(at::allclose(preact, reference(xs, w, b, "none"), 1e-10, 1e-10));
}

INSTANTIATE_TEST_SUITE_P(Activations, FusedConcatLinear,
                         ::testing::Values("none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"));

TEST(FusedConcatLinearErrors, NamesTheArgument) {
  std::vector<at::Tensor> xs = {at::randn({4, 3}), at::randn({4, 2})};
  try {
    fused_concat_linear(xs, at::randn({5, 6}), std::nullopt, "relu");
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("argument 'weight'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(fused_concat_linear({}, at::randn({5, 5}), std::nullopt, "relu"), c10::Error);
  EXPECT_THROW(fused_concat_linear(xs, at::randn({5, 5}), std::nullopt, "swish"), c10::Error);
}

// The vectorised activations used by the CPU epilogue agree with the scalar ones used by CUDA.
TEST(ActivationMath, VectorMatchesScalar) {
  using namespace mmkernels;
  using V = cpu::Vec<float>;
  float z[V::size()], y[V::size()];
  for (int i = 0; i < V::size(); ++i) z[i] = -4.f + 8.f * i / (V::size() - 1);
  auto check = [&](auto act_c) {
    constexpr Activation A = decltype(act_c)::value;
    cpu::activate_vec<A, float>(V::loadu(z)).store(y);
    float g[V::size()];
    cpu::activation_grad_vec<A, float>(V::loadu(z), V::loadu(y)).store(g);
    for (int i = 0; i < V::size(); ++i) {
      EXPECT_NEAR(y[i], (activate<A, float>(z[i])), 1e-5f) << static_cast<int>(A);
      EXPECT_NEAR(g[i], (activation_grad<A, float>(z[i], y[i])), 1e-5f) << static_cast<int>(A);
    }
  };
  for (auto a : {Activation::None, Activation::Relu, Activation::Gelu, Activation::GeluTanh, Activation::Silu,
                 Activation::Tanh, Activation::Sigmoid})
    dispatch_activation(a, check);
}

}  // namespace
