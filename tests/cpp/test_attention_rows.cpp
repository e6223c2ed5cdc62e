// C++ tests of the attention's float row loops (csrc/cpu/attention_rows.cpp), on the clone this CPU
// runs: exp_sum's exponential against std::exp over the whole softmax range, subnormal results
// included, and its edge values (-inf gives exactly 0, NaN stays NaN); exp_sum_to_bf16 (its one-pass
// AVX512-BF16 loop where the CPU has it) against exp_sum then to_bf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
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

TEST(AttentionRows, ExpSumToBf16IsExpSumThenToBf16) {
  // Row lengths around the loop's 32- and 16-wide steps and its masked tail; scores spread over the
  // softmax's range, -inf (hidden keys) among them; m the row's max or above it.
  std::mt19937 gen(0);
  std::normal_distribution<float> score(0.0f, 8.0f);
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t n : {0, 1, 7, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 511, 512, 513}) {
    std::vector<float> s(n);
    for (int64_t c = 0; c < n; ++c) s[c] = c % 13 == 5 ? -inf : score(gen);
    const float m = n > 0 ? 3.0f + *std::max_element(s.begin(), s.end()) : 0.0f;
    std::vector<float> want_s = s, scratch = s;
    std::vector<uint16_t> want(n), got(n + 1, 0xABCD);  // one guard element past the row
    const float want_sum = mmkernels::cpu::rows::exp_sum(want_s.data(), n, m);
    mmkernels::cpu::rows::to_bf16(want_s.data(), want.data(), n);
    const float got_sum = mmkernels::cpu::rows::exp_sum_to_bf16(scratch.data(), n, m, got.data());
    for (int64_t c = 0; c < n; ++c) EXPECT_EQ(got[c], want[c]) << "n = " << n << ", c = " << c << ", s = " << s[c];
    EXPECT_EQ(got[n], 0xABCD) << "n = " << n << ": wrote past the row";
    EXPECT_NEAR(got_sum, want_sum, 1e-6f * want_sum) << "n = " << n;
  }
  // A NaN max (a NaN row) gives NaN everywhere and a NaN sum.
  std::vector<float> s = {-1.0f, -2.0f, -3.0f};
  std::vector<uint16_t> p(3);
  EXPECT_TRUE(std::isnan(mmkernels::cpu::rows::exp_sum_to_bf16(s.data(), 3, std::nanf(""), p.data())));
  for (uint16_t bits : p) EXPECT_TRUE((bits & 0x7F80) == 0x7F80 && (bits & 0x7F) != 0) << bits;
}

}  // namespace
