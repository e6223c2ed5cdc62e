// Counter-based dropout for attention: whether element (b, h, i, j) is kept is a pure function of
// (seed, b*H + h, i, j), so backward regenerates forward's mask with nothing stored, any block order
// gives the same mask, and torch.manual_seed (which draws the seed) makes it reproducible.
#pragma once
#include <cstdint>

#include <c10/macros/Macros.h>

namespace mmkernels {

C10_HOST_DEVICE inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// One key per query row (b, h, i); the per-element hash below mixes in the key index j.
C10_HOST_DEVICE inline uint64_t dropout_row_key(uint64_t seed, int64_t bh, int64_t Lq, int64_t i) {
  return splitmix64(seed ^ splitmix64(static_cast<uint64_t>(bh) * static_cast<uint64_t>(Lq) + static_cast<uint64_t>(i)));
}

// 32-bit finaliser (murmur3 fmix32) of the row key and j: cheap, vectorisable, well mixed.
C10_HOST_DEVICE inline uint32_t dropout_hash(uint64_t row_key, uint32_t j) {
  uint32_t x = (static_cast<uint32_t>(row_key) ^ (j * 0x9E3779B1u)) + static_cast<uint32_t>(row_key >> 32);
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// The seed of sequence b of a packed (varlen) batch: the call's seed mixed with b, so that sequences
// draw independent masks (an odd multiplier keeps distinct indices distinct). Its rows are then the
// rows (h, i) of a one-sequence problem: dropout_row_key(this, h, length, i), on the CPU and CUDA alike.
C10_HOST_DEVICE inline uint64_t varlen_sequence_seed(uint64_t seed, int64_t b) {
  return (seed + static_cast<uint64_t>(b + 1) * 0x9E3779B97F4A7C15ull) >> 2;
}

// Element kept iff its hash >= threshold, so P(drop) = threshold / 2^32 = dropout_p (to 2^-32).
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace mmkernels
