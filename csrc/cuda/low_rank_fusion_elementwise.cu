// The fused part of low_rank_fusion on CUDA: with every modality's projection of a chunk of rows at
// hand (GEMMs, low_rank_fusion_cuda.cpp), the product over modalities and the weighted sum over the
// rank, forward, and the per-modality gradients of that product, backward. UNVERIFIED ON A GPU:
// compiled for sm_80 / sm_90 and run on the CPU emulation harness (tests/emu) only.
//
// Forward: one thread per output element (r, n), looping over k and the modalities, so neither the
// product nor any per-rank term is stored: each projection element is read once and the output
// written once. Backward: one thread per (r, k, n) of a rank (blockIdx.y walks the ranks), the
// modalities' projections held in registers, prefix and suffix products (no division: zeros are
// fine); the rank weight's gradient is reduced per block in shared memory, in a fixed order.
// Threads with consecutive n read consecutive addresses: coalesced.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "low_rank_fusion_launch.h"

namespace mmkernels::cuda {
namespace {

constexpr int kMods = kLrfMaxModalities;

// P_m[r, k, n] for every slot; slots past the table's count hold 1, so products need no bounds.
template <typename acc_t>
__device__ __forceinline__ void load_projections(const LrfModalities<acc_t>& mods, int64_t at, int64_t kn,
                                                 acc_t (&p)[kMods]) {
#pragma unroll
  for (int m = 0; m < kMods; ++m) {
    acc_t v = 1;
    if (m < mods.count) {
      v = mods.proj[m] != nullptr ? mods.proj[m][at] : acc_t(0);
      if (mods.row[m] != nullptr) v += mods.row[m][kn];
    }
    p[m] = v;
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kLrfThreads)
    lrf_forward_kernel(const LrfModalities<acc_t> mods, const acc_t* __restrict__ w, const T* __restrict__ bias,
                       T* __restrict__ out, int64_t rows, int64_t N, int64_t R) {
  const int64_t total = rows * N, RN = R * N;
  for (int64_t i = int64_t(blockIdx.x) * kLrfThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kLrfThreads) {
    const int64_t r = i / N, n = i - r * N;
    acc_t acc = 0;
    for (int64_t k = 0; k < R; ++k) {
      acc_t p[kMods];
      load_projections(mods, r * RN + k * N + n, k * N + n, p);
      acc_t prod = p[0];  // the reference's order: ((P_0 * P_1) * P_2) ...
#pragma unroll
      for (int m = 1; m < kMods; ++m) prod *= p[m];
      acc += w[k] * prod;
    }
    if (bias != nullptr) acc += static_cast<acc_t>(bias[n]);
    out[i] = static_cast<T>(acc);
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kLrfThreads)
    lrf_backward_kernel(const LrfModalities<acc_t> mods, const T* __restrict__ grad_out, const acc_t* __restrict__ w,
                        acc_t* __restrict__ w_partial, int64_t rows, int64_t N, int64_t R) {
  __shared__ acc_t partial[kLrfThreads];
  const int64_t total = rows * N, RN = R * N;
  const int tid = threadIdx.x;
  for (int64_t k = blockIdx.y; k < R; k += gridDim.y) {  // uniform over the block: barriers below are safe
    acc_t gw = 0;
    for (int64_t i = int64_t(blockIdx.x) * kLrfThreads + tid; i < total; i += int64_t(gridDim.x) * kLrfThreads) {
      const int64_t r = i / N, n = i - r * N;
      const int64_t at = r * RN + k * N + n;
      acc_t p[kMods];
      load_projections(mods, at, k * N + n, p);
      // suffix[m] = prod_{j > m} P_j; the prefix runs alongside the writes.
      acc_t suffix[kMods];
      suffix[kMods - 1] = 1;
#pragma unroll
      for (int m = kMods - 1; m > 0; --m) suffix[m - 1] = suffix[m] * p[m];
      const acc_t g = static_cast<acc_t>(grad_out[i]);
      const acc_t gk = g * w[k];
      acc_t prefix = 1;
#pragma unroll
      for (int m = 0; m < kMods; ++m) {
        if (m < mods.count && mods.grad[m] != nullptr) mods.grad[m][at] = gk * (prefix * suffix[m]);
        prefix *= p[m];
      }
      gw += g * prefix;  // prefix is now the whole product
    }
    if (w_partial == nullptr) continue;
    partial[tid] = gw;
    __syncthreads();
#pragma unroll
    for (int width = kLrfThreads / 2; width > 0; width /= 2) {
      if (tid < width) partial[tid] += partial[tid + width];
      __syncthreads();
    }
    if (tid == 0) w_partial[k * gridDim.x + blockIdx.x] = partial[0];
    // The next rank's first write to partial[0] is thread 0's own: no barrier needed before it.
  }
}

unsigned forward_grid(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kLrfThreads - 1) / kLrfThreads, 1, 65536));
}

}  // namespace

template <typename T, typename acc_t>
void launch_lrf_forward(const LrfModalities<acc_t>& mods, const acc_t* w, const T* bias, T* out, int64_t rows, int64_t N,
                        int64_t R, cudaStream_t stream) {
  if (rows * N == 0) return;
  lrf_forward_kernel<T, acc_t><<<forward_grid(rows * N), kLrfThreads, 0, stream>>>(mods, w, bias, out, rows, N, R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename acc_t>
void launch_lrf_backward(const LrfModalities<acc_t>& mods, const T* grad_out, const acc_t* w, acc_t* w_partial,
                         int64_t rows, int64_t N, int64_t R, cudaStream_t stream) {
  if (rows * N == 0 || R == 0) return;
  const dim3 grid(static_cast<unsigned>(lrf_backward_blocks(rows, N)), static_cast<unsigned>(std::min<int64_t>(R, 65535)));
  lrf_backward_kernel<T, acc_t><<<grid, kLrfThreads, 0, stream>>>(mods, grad_out, w, w_partial, rows, N, R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define MMK_INSTANTIATE(T, ACC)                                                                                     \
  template void launch_lrf_forward<T, ACC>(const LrfModalities<ACC>&, const ACC*, const T*, T*, int64_t, int64_t,  \
                                           int64_t, cudaStream_t);                                                 \
  template void launch_lrf_backward<T, ACC>(const LrfModalities<ACC>&, const T*, const ACC*, ACC*, int64_t, int64_t, \
                                            int64_t, cudaStream_t);
MMK_INSTANTIATE(c10::Half, float)
MMK_INSTANTIATE(c10::BFloat16, float)
MMK_INSTANTIATE(float, float)
MMK_INSTANTIATE(double, double)
#undef MMK_INSTANTIATE

}  // namespace mmkernels::cuda
