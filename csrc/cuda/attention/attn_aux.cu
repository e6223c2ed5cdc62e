// Small helper kernels of the CUDA attention: the visible key range per batch, the backward pre-pass
// D = rowsum(dO * O), the final dQ scale-and-convert, and the dropout keep mask for the fallback path.
//
// UNVERIFIED ON A GPU: compiled for sm_80 / sm_90, not yet run.
#include "attn_device.cuh"

namespace mmkernels::cuda::attn {
namespace {

// One block per batch: the first and one-past-last key in [0, kv_lengths[b]) that key_padding_mask
// does not ignore. Keys in between that the mask ignores are handled per element in the kernels.
__global__ void key_ranges_kernel(const int32_t* lengths, const uint8_t* kpm, int32_t Lk, int32_t* kv_range) {
  const int b = blockIdx.x;
  int len = lengths != nullptr ? lengths[b] : Lk;
  len = max(0, min(len, Lk));  // out-of-range lengths are rejected on the host side (Python wrapper)
  if (kpm == nullptr) {
    if (threadIdx.x == 0) kv_range[2 * b] = 0, kv_range[2 * b + 1] = len;
    return;
  }
  __shared__ int lo, hi;
  if (threadIdx.x == 0) lo = len, hi = 0;
  __syncthreads();
  int my_lo = len, my_hi = 0;
  const uint8_t* row = kpm + static_cast<int64_t>(b) * Lk;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    if (!row[j]) my_lo = min(my_lo, j), my_hi = max(my_hi, j + 1);
  }
  atomicMin(&lo, my_lo);
  atomicMax(&hi, my_hi);
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool any = hi > lo;
    kv_range[2 * b] = any ? lo : 0;
    kv_range[2 * b + 1] = any ? hi : 0;
  }
}

// One warp per row (b, h, i): D = sum_d dO[d] * O[d] in float32.
template <bool kBF16>
__global__ void dot_rows_kernel(const uint16_t* dout, int64_t do_sb, int64_t do_sh, int64_t do_sl,
                                const uint16_t* out, int64_t o_sb, int64_t o_sh, int64_t o_sl, int32_t H, int32_t Lq,
                                int32_t E, int64_t rows, float* dsum) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int64_t i = r % Lq, bh = r / Lq, b = bh / H, h = bh % H;
  const uint16_t* a = dout + b * do_sb + h * do_sh + i * do_sl;
  const uint16_t* o = out + b * o_sb + h * o_sh + i * o_sl;
  float acc = 0.0f;
  for (int d = 2 * lane; d < E; d += 64) {  // E is even: pairs of 16-bit values
    const float2 x = unpack2<kBF16>(*reinterpret_cast<const uint32_t*>(a + d));
    const float2 y = unpack2<kBF16>(*reinterpret_cast<const uint32_t*>(o + d));
    acc += x.x * y.x + x.y * y.y;
  }
#pragma unroll
  for (int s = 16; s > 0; s /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) dsum[r] = acc;
}

template <bool kBF16>
__global__ void finish_dq_kernel(const float* acc, float scale, uint16_t* dq, int64_t pairs) {
  for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < pairs;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float2 x = reinterpret_cast<const float2*>(acc)[n];
    reinterpret_cast<uint32_t*>(dq)[n] = pack2<kBF16>(x.x * scale, x.y * scale);
  }
}

// One thread per (row, column pair): the row's lse over the splits (a few loads, recomputed by each
// thread rather than shared: the splits are few), then its two output values.
template <bool kBF16>
__global__ void combine_splits_kernel(const float* out_accum, const float* lse_accum, int32_t splits, int32_t H,
                                      int32_t Lq, int32_t E, int64_t rows, uint16_t* out, int64_t o_sb, int64_t o_sh,
                                      int64_t o_sl, float* lse) {
  const int64_t pairs = rows * (E / 2);
  for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < pairs;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = n / (E / 2);
    const int c = static_cast<int>(n % (E / 2)) * 2;
    // The max skips NaN and -inf (a split that saw no key); a NaN lse then makes the sum NaN.
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, lse_accum[s * rows + r]);
    const float base = mx == -INFINITY ? 0.0f : mx;
    float sum = 0.0f, o0 = 0.0f, o1 = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float w = expf(lse_accum[s * rows + r] - base);
      const float2 x = *reinterpret_cast<const float2*>(out_accum + (s * rows + r) * E + c);
      sum += w;
      o0 += w * x.x, o1 += w * x.y;
    }
    const float inv = sum != 0.0f ? 1.0f / sum : 0.0f;  // NaN sum: NaN output
    const int64_t i = r % Lq, bh = r / Lq, b = bh / H, h = bh % H;
    *reinterpret_cast<uint32_t*>(out + b * o_sb + h * o_sh + i * o_sl + c) = pack2<kBF16>(o0 * inv, o1 * inv);
    if (c == 0) lse[r] = sum != 0.0f ? base + logf(sum) : INFINITY;
  }
}

template <typename T>
__global__ void dropout_factors_kernel(const AttnParams p, int32_t i0, int32_t rows, T* z) {
  const int64_t total = static_cast<int64_t>(p.B) * p.H * rows * p.Lk;
  const uint64_t seed = dropout_seed(p);
  for (int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; n < total;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(n % p.Lk);
    const int64_t r = n / p.Lk;
    const int i = i0 + static_cast<int>(r % rows);
    const int64_t bh = r / rows;
    z[n] = dropout_hash(dropout_row_key(seed, bh, p.Lq, i), static_cast<uint32_t>(j)) >= p.threshold ? T(1) : T(0);
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

void launch_key_ranges(const int32_t* lengths, const uint8_t* kpm, int32_t B, int32_t Lk, int32_t* kv_range,
                       cudaStream_t stream) {
  key_ranges_kernel<<<B, 256, 0, stream>>>(lengths, kpm, Lk, kv_range);
}

void launch_dot_rows(const void* dout, int64_t do_sb, int64_t do_sh, int64_t do_sl, const void* out, int64_t o_sb,
                     int64_t o_sh, int64_t o_sl, int32_t B, int32_t H, int32_t Lq, int32_t E, bool bf16, float* dsum,
                     cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(B) * H * Lq;
  const int grid = static_cast<int>((rows + 7) / 8);  // 8 warps per block
  auto d = static_cast<const uint16_t*>(dout);
  auto o = static_cast<const uint16_t*>(out);
  if (bf16) {
    dot_rows_kernel<true><<<grid, 256, 0, stream>>>(d, do_sb, do_sh, do_sl, o, o_sb, o_sh, o_sl, H, Lq, E, rows, dsum);
  } else {
    dot_rows_kernel<false><<<grid, 256, 0, stream>>>(d, do_sb, do_sh, do_sl, o, o_sb, o_sh, o_sl, H, Lq, E, rows, dsum);
  }
}

void launch_finish_dq(const float* dq_accum, float scale, void* dq, int64_t count, bool bf16, cudaStream_t stream) {
  const int64_t pairs = count / 2;  // count = B H Lq E with E even
  auto out = static_cast<uint16_t*>(dq);
  if (bf16) {
    finish_dq_kernel<true><<<grid_for(pairs, 256), 256, 0, stream>>>(dq_accum, scale, out, pairs);
  } else {
    finish_dq_kernel<false><<<grid_for(pairs, 256), 256, 0, stream>>>(dq_accum, scale, out, pairs);
  }
}

void launch_combine_splits(const float* out_accum, const float* lse_accum, int32_t splits, int32_t B, int32_t H,
                           int32_t Lq, int32_t E, void* out, int64_t o_sb, int64_t o_sh, int64_t o_sl, float* lse,
                           bool bf16, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(B) * H * Lq, pairs = rows * (E / 2);
  auto o = static_cast<uint16_t*>(out);
  if (bf16) {
    combine_splits_kernel<true><<<grid_for(pairs, 256), 256, 0, stream>>>(out_accum, lse_accum, splits, H, Lq, E, rows,
                                                                          o, o_sb, o_sh, o_sl, lse);
  } else {
    combine_splits_kernel<false><<<grid_for(pairs, 256), 256, 0, stream>>>(out_accum, lse_accum, splits, H, Lq, E,
                                                                           rows, o, o_sb, o_sh, o_sl, lse);
  }
}

void launch_dropout_factors(const AttnParams& p, int32_t i0, int32_t rows, void* z, bool dbl, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.B) * p.H * rows * p.Lk;
  if (dbl) {
    dropout_factors_kernel<double><<<grid_for(total, 256), 256, 0, stream>>>(p, i0, rows, static_cast<double*>(z));
  } else {
    dropout_factors_kernel<float><<<grid_for(total, 256), 256, 0, stream>>>(p, i0, rows, static_cast<float*>(z));
  }
}

}  // namespace mmkernels::cuda::attn
