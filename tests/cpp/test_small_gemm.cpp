// C++ tests of the few-rows GEMMs (csrc/cpu/small_gemm.cpp): every tile and tail shape (rows, columns
// and lengths that are and are not multiples of the register blocks), strided operands, overwriting
// and accumulating (one row of A: the wider tiles of decoding), against ATen's mm in float64, with C's padding left untouched.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "cpu/small_gemm.h"

namespace {

using mmkernels::cpu::small_gemm::dot_rows;
using mmkernels::cpu::small_gemm::outer;

void expect_close(const at::Tensor& got, const at::Tensor& want, int64_t I, int64_t J, int64_t K) {
  EXPECT_TRUE(at::allclose(got, want.to(at::kFloat), 1e-5, 1e-4)) << I << " x " << J << " x " << K;
}

TEST(SmallGemm, DotRowsIsATimesBTransposed) {
  at::manual_seed(0);
  for (int64_t I : {1, 2, 3, 8, 33})
    for (int64_t J : {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64})
      for (int64_t K : {0, 1, 7, 8, 9, 64, 100}) {
        const at::Tensor a = at::randn({I, K + 3}), b = at::randn({J, K + 1});  // row strides past K
        const at::Tensor product = at::mm(a.narrow(1, 0, K).to(at::kDouble), b.narrow(1, 0, K).to(at::kDouble).t());
        at::Tensor c = at::randn({I, J + 2});
        const at::Tensor before = c.to(at::kDouble).narrow(1, 0, J), pad = c.narrow(1, J, 2).clone();
        for (bool accumulate : {true, false}) {
          dot_rows(I, J, K, a.const_data_ptr<float>(), K + 3, b.const_data_ptr<float>(), K + 1, c.data_ptr<float>(),
                   J + 2, accumulate);
          expect_close(c.narrow(1, 0, J), accumulate ? before + product : product, I, J, K);
          EXPECT_TRUE(at::equal(c.narrow(1, J, 2), pad));
        }
      }
}

TEST(SmallGemm, DotRowsSumsAlikeForAnyRowCount) {
  // Each output to the bit as the call for its row alone, and for its row and column alone.
  at::manual_seed(2);
  for (int64_t I : {2, 3, 4, 5, 16})
    for (int64_t J : {1, 7, 9, 17})
      for (int64_t K : {7, 64, 100}) {
        const at::Tensor a = at::randn({I, K}), b = at::randn({J, K});
        at::Tensor all = at::empty({I, J}), row = at::empty({1, J}), one = at::empty({1, 1});
        dot_rows(I, J, K, a.const_data_ptr<float>(), K, b.const_data_ptr<float>(), K, all.data_ptr<float>(), J, false);
        for (int64_t i = 0; i < I; ++i) {
          dot_rows(1, J, K, a[i].const_data_ptr<float>(), K, b.const_data_ptr<float>(), K, row.data_ptr<float>(), J,
                   false);
          EXPECT_TRUE(at::equal(all[i], row[0])) << I << " x " << J << " x " << K << ", row " << i;
          const int64_t j = J - 1;
          dot_rows(1, 1, K, a[i].const_data_ptr<float>(), K, b[j].const_data_ptr<float>(), K, one.data_ptr<float>(), 1,
                   false);
          EXPECT_EQ(all[i][j].item<float>(), one.item<float>()) << I << " x " << J << " x " << K << ", row " << i;
        }
      }
}

TEST(SmallGemm, OuterWithEitherOperandStrides) {
  at::manual_seed(1);
  for (int64_t I : {1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 40})
    for (int64_t J : {1, 7, 8, 15, 16, 17, 33, 63, 64, 65, 130})
      for (int64_t R : {0, 1, 5, 32}) {
        const at::Tensor g = at::randn({R, I});  // A(i, r) = g[r, i]: gz.T, as grad_weight reads it
        const at::Tensor rows = g.t().contiguous();  // A(i, r) = rows[i, r]: gz, as the input gradients read it
        const at::Tensor b = at::randn({R, J + 4});
        const at::Tensor product = at::mm(rows.to(at::kDouble), b.narrow(1, 0, J).to(at::kDouble));
        at::Tensor c = at::full({I, J + 3}, 7.0);
        outer(I, J, R, g.const_data_ptr<float>(), 1, I, b.const_data_ptr<float>(), J + 4, c.data_ptr<float>(), J + 3,
              true);
        expect_close(c.narrow(1, 0, J), product + 7.0, I, J, R);
        outer(I, J, R, rows.const_data_ptr<float>(), R, 1, b.const_data_ptr<float>(), J + 4, c.data_ptr<float>(),
              J + 3, false);
        expect_close(c.narrow(1, 0, J), product, I, J, R);
        EXPECT_TRUE(at::equal(c.narrow(1, J, 3), at::full({I, 3}, 7.0)));
      }
}

TEST(SmallGemm, OuterSumsAlikeForAnyShape) {
  // Each output one chain over r whatever tile it falls in: to the bit as the call for its row alone
  // (small_gemm.h promises this order; the attention's recomputed scores rest on it).
  at::manual_seed(3);
  for (int64_t I : {7, 8, 13, 128})
    for (int64_t J : {17, 64, 530})
      for (int64_t R : {9, 64, 512}) {
        const at::Tensor a = at::randn({I, R}), b = at::randn({R, J});
        at::Tensor all = at::empty({I, J}), row = at::empty({1, J});
        outer(I, J, R, a.const_data_ptr<float>(), R, 1, b.const_data_ptr<float>(), J, all.data_ptr<float>(), J, false);
        for (int64_t i = 0; i < I; ++i) {
          outer(1, J, R, a[i].const_data_ptr<float>(), R, 1, b.const_data_ptr<float>(), J, row.data_ptr<float>(), J,
                false);
          EXPECT_TRUE(at::equal(all[i], row[0])) << I << " x " << J << " x " << R << ", row " << i;
        }
      }
}

}  // namespace
