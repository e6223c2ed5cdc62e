// C++ tests of the attention's float row loops (csrc/cpu/attention_rows.cpp), on the clone this CPU
// runs: exp_sum's exponential against std::exp over the whole softmax range, subnormal results
// included, and its edge values (-inf gives exactly 0, NaN stays NaN).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_rows.h"

namespace {

TEST(AttentionRows, ExpSumMatchesStdExp) {
  // x from -110 to 0 in steps of 2^-10, an odd count so that the vector loops' tails run too.
  std::vector<float> x;
  for (int i = -110 * 1024; i <= 0; ++i) x.push_back(static_cast<float>(i) / 1024.0f);
  const float inf = std::numeric_limits<float>::infinity();
  x.push_back(-inf);
  std::vector<float> s = x;
  const float sum = mmkernels::cpu::rows::exp_sum(s.data(), static_cast<int64_t>(s.size()), 0.0f);
  double want_sum = 0.0, worst_rel = 0.0;
  for (size_t c = 0; c < x.size(); ++c) {
    const float want = static_cast<float>(std::exp(static_cast<double>(x[c])));
    want_sum += want;
    if (want >= std::numeric_limits<float>::min()) {
      worst_rel = std::max(worst_rel, std::abs(double(s[c]) - want) / want);
    } else {  // subnormal or 0: the same relative error, plus one unit of the smallest subnormal
      EXPECT_LE(std::abs(double(s[c]) - want), 3e-7 * want + std::numeric_limits<float>::denorm_min())
          << "x = " << x[c];
    }
  }
  EXPECT_LE(worst_rel, 3e-7);
  EXPECT_EQ(s.back(), 0.0f);  // exp(-inf)
  EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum);

  // A NaN score makes its own entry and the sum NaN; the others are unaffected.
  std::vector<float> n = {-1.0f, std::numeric_limits<float>::quiet_NaN(), -2.0f};
  EXPECT_TRUE(std::isnan(mmkernels::cpu::rows::exp_sum(n.data(), 3, 0.0f)));
  EXPECT_TRUE(std::isnan(n[1]));
  EXPECT_FLOAT_EQ(n[0], std::exp(-1.0f));
  EXPECT_FLOAT_EQ(n[2], std::exp(-2.0f));
}

}  // namespace
