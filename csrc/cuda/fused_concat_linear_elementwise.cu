// The elementwise kernels of fused_concat_linear on CUDA: the bias + activation epilogue of the
// cuBLAS path (reads the float32 accumulator once, writes out and, when backward needs it, the
// pre-activation) and the activation backward gz = grad * act'(.). Memory-bound: one thread per
// element, a grid-stride loop, the activation a template parameter so each is straight-line code.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "fcl_launch.h"

namespace mmkernels::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  // Enough CTAs to fill any current GPU several times over; the grid-stride loop does the rest.
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65536));
}

template <Activation A, typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const acc_t* acc, const T* __restrict__ bias, T* out, T* __restrict__ preact, int64_t M,
                    int64_t N) {
  using op_t = at::opmath_type<T>;
  const int64_t total = M * N;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  // The bias column follows i incrementally: one 64-bit modulo per thread, not one per element.
  int64_t col = i % N;
  const int64_t col_step = stride % N;
  for (; i < total; i += stride) {
    op_t z = static_cast<op_t>(acc[i]);
    if (bias != nullptr) z += static_cast<op_t>(bias[col]);
    col += col_step;
    if (col >= N) col -= N;
    if (preact != nullptr) preact[i] = static_cast<T>(z);
    out[i] = static_cast<T>(activate<A, op_t>(z));  // acc may alias out: read before write, same thread
  }
}

template <Activation A, typename T>
__global__ void __launch_bounds__(kThreads)
    act_backward_kernel(const T* __restrict__ grad, const T* __restrict__ z, T* __restrict__ gz, int64_t n) {
  using op_t = at::opmath_type<T>;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const op_t v = static_cast<op_t>(z[i]);
    // activation_grad takes (pre-activation, output); only the one this activation needs is read.
    gz[i] = static_cast<T>(static_cast<op_t>(grad[i]) * activation_grad<A, op_t>(v, v));
  }
}

}  // namespace

template <typename T, typename acc_t>
void launch_bias_act(const acc_t* acc, const T* bias, T* out, T* preact, int64_t M, int64_t N, Activation act,
                     cudaStream_t stream) {
  if (M * N == 0) return;
  dispatch_activation(act, [&](auto a) {
    bias_act_kernel<decltype(a)::value, T, acc_t><<<grid_for(M * N), kThreads, 0, stream>>>(acc, bias, out, preact, M, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
void launch_act_backward(const T* grad, const T* z, T* gz, int64_t n, Activation act, cudaStream_t stream) {
  if (n == 0) return;
  dispatch_activation(act, [&](auto a) {
    act_backward_kernel<decltype(a)::value, T><<<grid_for(n), kThreads, 0, stream>>>(grad, z, gz, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

#define MMK_INSTANTIATE(T, ACC)                                                                            \
  template void launch_bias_act<T, ACC>(const ACC*, const T*, T*, T*, int64_t, int64_t, Activation, cudaStream_t);
MMK_INSTANTIATE(c10::Half, float)
MMK_INSTANTIATE(c10::BFloat16, float)
MMK_INSTANTIATE(float, float)
MMK_INSTANTIATE(double, double)
#undef MMK_INSTANTIATE

template void launch_act_backward<c10::Half>(const c10::Half*, const c10::Half*, c10::Half*, int64_t, Activation,
                                             cudaStream_t);
template void launch_act_backward<c10::BFloat16>(const c10::BFloat16*, const c10::BFloat16*, c10::BFloat16*, int64_t,
                                                 Activation, cudaStream_t);
template void launch_act_backward<float>(const float*, const float*, float*, int64_t, Activation, cudaStream_t);
template void launch_act_backward<double>(const double*, const double*, double*, int64_t, Activation, cudaStream_t);

}  // namespace mmkernels::cuda
