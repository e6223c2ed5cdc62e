// C++ tests of the packed AVX2 GEMM (csrc/cpu/packed_gemm.cpp): sizes on both sides of every block
// and tile edge (6 x 16 tiles, 96-row jobs, 256-column jobs, 256-step K blocks, 2048-column B blocks),
// row- and column-major operands with padding, overwriting and accumulating, against ATen's mm in
// float64, C's padding untouched; and the same bits on one thread as on several.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <tuple>
#include <vector>

#include "cpu/packed_gemm.h"

namespace {

namespace packed_gemm = mmkernels::cpu::packed_gemm;

// An M x K operand as row-major (row stride K + 3) or column-major (column stride M + 2) view.
at::Tensor operand(int64_t rows, int64_t cols, bool column_major) {
  return column_major ? at::randn({cols, rows + 2}).narrow(1, 0, rows).t() : at::randn({rows, cols + 3}).narrow(1, 0, cols);
}

void run(const at::Tensor& a, const at::Tensor& b, at::Tensor& c, bool accumulate) {
  packed_gemm::gemm(a.size(0), b.size(1), a.size(1), a.const_data_ptr<float>(), a.stride(0), a.stride(1),
                    b.const_data_ptr<float>(), b.stride(0), b.stride(1), c.data_ptr<float>(), c.stride(0), accumulate);
}

TEST(PackedGemm, EveryEdgeAndLayout) {
  if (!packed_gemm::available()) GTEST_SKIP() << "no AVX2 + FMA";
  at::manual_seed(0);
  std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes;
  for (int64_t M : {1, 5, 6, 7, 96, 97, 200})
    for (int64_t N : {1, 15, 16, 17, 255, 257})
      for (int64_t K : {0, 1, 255, 257}) shapes.emplace_back(M, N, K);
  shapes.emplace_back(13, 2100, 20);  // two B blocks
  shapes.emplace_back(50, 40, 600);   // three K blocks
  for (const auto& [M, N, K] : shapes)
    for (bool a_cols : {false, true})
      for (bool b_cols : {false, true}) {
        const at::Tensor a = operand(M, K, a_cols), b = operand(K, N, b_cols);
        const at::Tensor product = at::mm(a.to(at::kDouble), b.to(at::kDouble));
        at::Tensor padded = at::full({M, N + 5}, 7.0), c = padded.narrow(1, 0, N);
        for (bool accumulate : {true, false}) {
          const at::Tensor before = c.to(at::kDouble);
          run(a, b, c, accumulate);
          const at::Tensor want = (accumulate ? before + product : product).to(at::kFloat);
          EXPECT_TRUE(at::allclose(c, want, 1e-5, 1e-4)) << M << " x " << N << " x " << K << " a_cols " << a_cols
                                                          << " b_cols " << b_cols << " accumulate " << accumulate;
          EXPECT_TRUE(at::equal(padded.narrow(1, N, 5), at::full({M, 5}, 7.0)));
        }
      }
}

TEST(PackedGemm, SameBitsOnAnyThreadCount) {
  if (!packed_gemm::available()) GTEST_SKIP() << "no AVX2 + FMA";
  at::manual_seed(1);
  const at::Tensor a = operand(300, 700, false), b = operand(700, 600, true);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  at::Tensor one = at::empty({300, 600});
  run(a, b, one, false);
  at::set_num_threads(std::max(2, threads));
  at::Tensor many = at::empty({300, 600});
  run(a, b, many, false);
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(one, many));
}

}  // namespace
