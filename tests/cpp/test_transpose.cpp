// C++ tests of the block transposes (csrc/cpu/transpose.cpp): every tile shape, full and partial
// (the AVX-512 path for float on a CPU that has it, the scalar path for double), strided on both
// sides, with the destination's padding left untouched.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "cpu/transpose.h"

namespace {

template <typename T>
void expect_transposes(int64_t rows, int64_t cols) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const at::Tensor src = at::randn({rows, cols + 3}, opts);  // leading dim past the row
  at::Tensor dst = at::full({cols, rows + 5}, 7.0, opts);
  mmkernels::cpu::transpose(src.const_data_ptr<T>(), cols + 3, rows, cols, dst.data_ptr<T>(), rows + 5);
  EXPECT_TRUE(at::equal(dst.narrow(1, 0, rows), src.narrow(1, 0, cols).t())) << rows << " x " << cols;
  EXPECT_TRUE(at::equal(dst.narrow(1, rows, 5), at::full({cols, 5}, 7.0, opts))) << rows << " x " << cols;
}

TEST(Transpose, MatchesTensorTranspose) {
  at::manual_seed(0);
  for (int64_t rows : {1, 2, 7, 15, 16, 17, 31, 32, 33, 64, 130})
    for (int64_t cols : {1, 3, 15, 16, 17, 48, 64, 100}) {
      expect_transposes<float>(rows, cols);
      expect_transposes<double>(rows, cols);
    }
}

}  // namespace
