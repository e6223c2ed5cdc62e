// C++ tests of low_rank_fusion through the dispatcher, against the einsum composition (LMF's code) in
// ATen, with autograd providing the reference gradients.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

namespace {

using Forward = at::Tensor(at::TensorList, at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&);
using Backward = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, at::TensorList, const at::Tensor&, const c10::List<bool>&,
    const c10::List<bool>&, bool, bool);

at::Tensor forward(at::TensorList xs, at::TensorList fs, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mmkernels::low_rank_fusion", "").typed<Forward>();
  return op.call(xs, fs, w, b);
}

auto backward(const at::Tensor& g, at::TensorList xs, at::TensorList fs, const at::Tensor& w) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mmkernels::low_rank_fusion_backward", "").typed<Backward>();
  c10::List<bool> all;
  for (size_t i = 0; i < xs.size(); ++i) all.push_back(true);
  return op.call(g, xs, fs, w, all, all, true, true);
}

at::Tensor reference(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& fs, const at::Tensor& w,
                     const at::Tensor& b) {
  at::Tensor prod;
  for (size_t m = 0; m < xs.size(); ++m) {
    auto ones = at::ones({xs[m].size(0), 1}, xs[m].options());
    auto proj = at::einsum("bd,rdn->brn", {at::cat({xs[m], ones}, -1), fs[m]});
    prod = prod.defined() ? prod * proj : proj;
  }
  return at::einsum("brn,r->bn", {prod, w}) + b;
}

TEST(LowRankFusion, ForwardAndBackwardMatchTheCompositionInDouble) {
  at::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const std::vector<int64_t> widths = {5, 1, 17};
  const int64_t rows = 37, rank = 3, n = 9;
  std::vector<at::Tensor> xs, fs;
  for (auto d : widths) {
    xs.push_back(at::randn({rows, d}, opts).requires_grad_());
    fs.push_back(at::randn({rank, d + 1, n}, opts).requires_grad_());
  }
  at::Tensor w = at::randn({rank}, opts).requires_grad_(), b = at::randn({n}, opts).requires_grad_();
  at::Tensor expected = reference(xs, fs, w, b);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;  // call the kernel itself, as the Python autograd does
    out = forward(xs, fs, w, b);
  }
  EXPECT_TRUE(at::allclose(out, expected, 1e-10, 1e-10));

  at::Tensor g = at::randn({rows, n}, opts);
  expected.backward(g);
  auto [gx, gf, gw, gb] = [&] {
    at::AutoDispatchBelowADInplaceOrView below;
    return backward(g, xs, fs, w);
  }();
  for (size_t m = 0; m < widths.size(); ++m) {
    EXPECT_TRUE(at::allclose(gx[m], xs[m].grad(), 1e-10, 1e-10)) << "grad inputs[" << m << "]";
    EXPECT_TRUE(at::allclose(gf[m], fs[m].grad(), 1e-10, 1e-10)) << "grad factors[" << m << "]";
  }
  EXPECT_TRUE(at::allclose(gw, w.grad(), 1e-10, 1e-10));
  EXPECT_TRUE(at::allclose(gb, b.grad(), 1e-10, 1e-10));
}

TEST(LowRankFusion, BadFactorShapeNamesTheArgument) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  std::vector<at::Tensor> xs = {at::randn({4, 3}, opts), at::randn({4, 2}, opts)};
  std::vector<at::Tensor> fs = {at::randn({2, 4, 5}, opts), at::randn({2, 2, 5}, opts)};
  try {
    forward(xs, fs, at::randn({2}, opts), std::nullopt);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'factors[1]'"), std::string::npos) << e.what();
  }
}

}  // namespace
