// C++ tests of fused_concat_linear through the dispatcher, against cat + linear in ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <torch/csrc/autograd/autograd.h>

#include "activation.h"

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

// The scalar activation math of activation.h (what the CUDA kernels run) agrees with ATen's.
TEST(ActivationMath, ScalarMatchesATen) {
  using namespace mmkernels;
  const at::Tensor z = at::linspace(-6.0, 6.0, 241, at::kDouble);
  const std::vector<std::string> names = {"none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"};
  for (const auto& name : names) {
    const at::Tensor y_aten = reference({z.unsqueeze(-1)}, at::ones({1, 1}, at::kDouble), at::zeros({1}, at::kDouble),
                                        name).squeeze(-1);
    const at::Tensor zg = z.unsqueeze(-1).clone().requires_grad_();
    at::Tensor yg = reference({zg}, at::ones({1, 1}, at::kDouble), at::zeros({1}, at::kDouble), name);
    const at::Tensor dy_aten = torch::autograd::grad({yg.sum()}, {zg})[0].squeeze(-1);
    dispatch_activation(parse_activation(name), [&](auto act_c) {
      constexpr Activation A = decltype(act_c)::value;
      for (int64_t i = 0; i < z.numel(); ++i) {
        const double zi = z[i].item<double>(), yi = y_aten[i].item<double>();
        EXPECT_NEAR(yi, (activate<A, double>(zi)), 1e-12) << name << " at " << zi;
        EXPECT_NEAR(dy_aten[i].item<double>(), (activation_grad<A, double>(zi, yi)), 1e-12) << name << " at " << zi;
      }
    });
  }
}

}  // namespace
