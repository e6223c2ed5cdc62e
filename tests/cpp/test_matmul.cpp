// C++ tests of matmul_out (csrc/cpu/matmul.cpp) against at::mm, over the operand layouts the kernels
// pass: transposed and column-sliced weights, a column block of a wider output, accumulation.
#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include <cstdlib>

#include "cpu/matmul.h"

namespace {

using mmkernels::cpu::matmul_out;

void expect_matches_mm(const at::Tensor& a, const at::Tensor& b, bool accumulate, double tol = 1e-4) {
  const int64_t M = a.size(0), N = b.size(1);
  // The output is a column block of a wider matrix, whose other columns must stay untouched.
  at::Tensor wide = at::randn({M, N + 5}, a.options());
  const at::Tensor before = wide.clone();
  at::Tensor out = wide.narrow(1, 2, N);
  const at::Tensor product = at::mm(a.to(at::kDouble), b.to(at::kDouble));
  const at::Tensor expected = accumulate ? out.to(at::kDouble) + product : product;
  matmul_out(out, a, b, accumulate);
  EXPECT_TRUE(at::allclose(out.to(at::kDouble), expected, tol, tol));
  EXPECT_TRUE(at::equal(wide.narrow(1, 0, 2), before.narrow(1, 0, 2)));
  EXPECT_TRUE(at::equal(wide.narrow(1, N + 2, 3), before.narrow(1, N + 2, 3)));
}

TEST(Matmul, LayoutsAndAccumulationMatchMm) {
  at::manual_seed(0);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  // 137 x 700 x 180: above kOneDnnMinMacs, so oneDNN serves the layouts it takes; one row: ATen (small).
  const at::Tensor a = at::randn({137, 700}, f32);
  const at::Tensor w = at::randn({180, 1000}, f32);
  for (bool accumulate : {false, true}) {
    expect_matches_mm(a, at::randn({700, 180}, f32), accumulate);              // row-major
    expect_matches_mm(a, w.narrow(1, 300, 700).t(), accumulate);               // W[:, cols].T, column-major
    expect_matches_mm(at::randn({700, 137}, f32).t(), w.narrow(1, 0, 700).t(), accumulate);  // both transposed
    expect_matches_mm(a, at::randn({700, 360}, f32).slice(1, 0, 360, 2), accumulate);       // strided both ways: ATen
    expect_matches_mm(a.narrow(0, 0, 1), at::randn({700, 180}, f32), accumulate);            // one row
    expect_matches_mm(a.narrow(1, 0, 70), w.narrow(1, 0, 70).t(), accumulate);               // small: ATen
    at::Tensor out_t = at::randn({180, 137}, f32).t();                                        // column-major out: ATen
    const at::Tensor before = out_t.clone();
    matmul_out(out_t, a, at::randn({700, 180}, f32), accumulate);
    EXPECT_FALSE(at::equal(out_t, before));
    expect_matches_mm(a.narrow(1, 0, 0), at::randn({0, 180}, f32), accumulate);             // K = 0
  }
}

TEST(Matmul, OnednnRuleFollowsTorchsSwitch) {
  const bool enabled = at::globalContext().userEnabledMkldnn();
#if AT_MKLDNN_ENABLED() && defined(__x86_64__)
  if (enabled && std::getenv("MMKERNELS_CPU_GEMM") == nullptr)
    EXPECT_EQ(mmkernels::cpu::matmul_uses_onednn(at::kFloat), mmkernels::cpu::onednn_matmul_runs());
#endif
  at::globalContext().setUserEnabledMkldnn(false);
  EXPECT_FALSE(mmkernels::cpu::matmul_uses_onednn(at::kFloat));
  at::globalContext().setUserEnabledMkldnn(enabled);
  EXPECT_FALSE(mmkernels::cpu::matmul_uses_onednn(at::kDouble));
  EXPECT_FALSE(mmkernels::cpu::matmul_uses_onednn(at::kBFloat16));
}

TEST(Matmul, HalfPrecisionLayoutsMatchMm) {
  // bfloat16 / float16: in float32 where oneDNN refuses the CPU (half_gemm_in_float), else ATen's.
  EXPECT_EQ(mmkernels::cpu::half_gemm_in_float(at::kBFloat16), !mmkernels::cpu::onednn_matmul_runs());
  EXPECT_EQ(mmkernels::cpu::half_gemm_in_float(at::kHalf), !mmkernels::cpu::onednn_matmul_runs());
  EXPECT_FALSE(mmkernels::cpu::half_gemm_in_float(at::kFloat));
  at::manual_seed(2);
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    const auto opt = at::TensorOptions().dtype(dtype);
    const at::Tensor a = at::randn({37, 70}, opt), w = at::randn({18, 100}, opt);
    // Products of size ~8: a bfloat16 ulp there is 1/16, half an ulp the rounding of the result.
    for (bool accumulate : {false, true}) {
      expect_matches_mm(a, w.narrow(1, 30, 70).t(), accumulate, 0.07);
      expect_matches_mm(at::randn({70, 37}, opt).t(), at::randn({70, 18}, opt), accumulate, 0.07);
      expect_matches_mm(a.narrow(1, 0, 0), at::randn({0, 18}, opt), accumulate, 0.07);  // K = 0
    }
  }
}

#if AT_MKLDNN_ENABLED() && defined(__x86_64__)
TEST(Matmul, OnednnRunsWhereTheCpuHasAvx512) {
  // The probe must not switch oneDNN off where torch's matmul serves the CPU (AVX-512 BW/VL/DQ).
  const bool avx512 = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (avx512) EXPECT_TRUE(mmkernels::cpu::onednn_matmul_runs());
  if (!mmkernels::cpu::onednn_matmul_runs()) EXPECT_FALSE(mmkernels::cpu::matmul_uses_onednn(at::kFloat));
}
#endif

TEST(Matmul, AlsoMatchesWithOnednnDisabled) {
  at::manual_seed(1);
  const bool enabled = at::globalContext().userEnabledMkldnn();
  at::globalContext().setUserEnabledMkldnn(false);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  expect_matches_mm(at::randn({16, 9}, f32), at::randn({11, 9}, f32).t(), true);
  at::globalContext().setUserEnabledMkldnn(enabled);
}

}  // namespace
