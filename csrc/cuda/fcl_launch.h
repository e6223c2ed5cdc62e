// Host-side declarations shared by the CUDA files of fused_concat_linear: the segment table that
// the tensor-core kernel walks, and the launchers (each .cu file compiles its own kernels, so nvcc
// can build them in parallel).
#pragma once
#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "activation.h"

namespace mmkernels::cuda {

// Most segments one fused launch takes; the table travels as a kernel argument (by value, in
// constant bank memory), so it has to stay small. More segments go to the cuBLAS path.
constexpr int kMaxSegments = 32;

// The inputs as the fused kernel sees them: segment s is a row-major (M, width[s]) matrix at x[s]
// with row stride x_stride[s], multiplied by W[:, w_offset[s] : w_offset[s] + width[s]].
struct SegmentTable {
  const void* x[kMaxSegments];
  int64_t x_stride[kMaxSegments];
  int32_t width[kMaxSegments];
  int32_t w_offset[kMaxSegments];
  // Bit s set: segment s (input and weight columns) allows 16-byte loads (16-byte aligned base,
  // row stride and first weight column multiples of 8 elements). Unset: the element-wise loader.
  uint32_t vec_mask;
  int32_t count;
  int32_t k_tiles;  // sum over segments of ceil(width / kTileK): the length of the fused K loop
};

// out (M, N) = act(sum_s x_s @ W[:, cols_s].T + bias); preact (may be null) gets the value before
// the activation. T is c10::Half or c10::BFloat16. Launches on `stream`.
template <typename T>
void launch_tc_forward(const SegmentTable& seg, const T* weight, int64_t w_stride, const T* bias, T* out, T* preact,
                       int64_t M, int64_t N, Activation act, cudaStream_t stream);

// The tile width of the fused kernel's K loop (a segment's tail tile is zero-padded).
constexpr int kTileK = 32;

// out = act(acc + bias) elementwise over (M, N); preact (may be null) gets acc + bias. acc may alias
// out (float32 / float64, where acc_t == T).
template <typename T, typename acc_t>
void launch_bias_act(const acc_t* acc, const T* bias, T* out, T* preact, int64_t M, int64_t N, Activation act,
                     cudaStream_t stream);

// gz = grad * act'(z) with z the pre-activation (gelu, gelu_tanh, silu) or the output (the others).
template <typename T>
void launch_act_backward(const T* grad, const T* z, T* gz, int64_t n, Activation act, cudaStream_t stream);

}  // namespace mmkernels::cuda
