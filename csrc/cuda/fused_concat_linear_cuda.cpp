// CUDA kernels of fused_concat_linear (host side): argument checks, the choice between the fused
// tensor-core kernel and the per-segment cuBLAS path, and the backward.
//
// Forward, two paths (both accumulate in float32 and never build the concatenation):
//  * fused: one launch of the tensor-core kernel (fused_concat_linear_tc.cu) whose K loop walks the
//    segments' pointers, with bias + activation in its epilogue. fp16/bf16 on sm_80+, at most
//    kMaxSegments segments.
//  * cuBLAS: one GEMM per segment (cublasGemmEx on ATen's handle and stream), all accumulating
//    (beta = 1) into one float32 (M, N) buffer (the output itself for float32/float64), then one
//    fused bias + activation kernel. Every dtype, any number of segments.
//
// The rule between them (to be measured on a GPU: none has run this code yet):
//   fused when the dtype is fp16/bf16, the device is sm_80+, there are <= 32 non-empty segments,
//     and either N <= 256 (a narrow projection: the per-segment GEMMs are small, latency-bound
//     launches that each re-read and re-write the whole output) or there are >= 3 segments with a
//     mean width <= 128 (many small GEMMs),
//     and the grid has at least one CTA per two SMs or K <= 1024 (a long serial K loop on a few CTAs
//     loses to cuBLAS, which can split K);
//   cuBLAS otherwise (large N, few wide segments, float32/float64).
// MMKERNELS_FCL_CUDA_PATH=fused|cublas overrides the rule (for tests and measurements). When the
// rule (or the override) wants the fused kernel for a case it does not cover (more than 32
// segments, a pre-sm_80 device, float32), the cuBLAS path runs and a warning says so once.
//
// Backward: gz = grad * act'(.) in one elementwise kernel (from the pre-activation or the output),
// then each input's gradient gz @ W[:, cols_s] is written directly by its own GEMM, each column
// block of grad_weight (gz.T @ x_s) is written in place, and grad_bias is a float32 reduction of gz.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <string>
#include <vector>

#include "checks.h"
#include "fcl_launch.h"

namespace mmkernels::cuda {
namespace {

struct Problem {
  int64_t M = 0, N = 0, K = 0;
  std::vector<int64_t> lead;     // leading (batch) dims of every input
  std::vector<at::Tensor> rows;  // each input as a (M, D_s) matrix with unit column stride
  std::vector<int64_t> ld;       // row stride of rows[s] (>= D_s, as BLAS wants it)
  std::vector<int64_t> offset;   // first column of segment s in the weight
  at::Tensor weight;             // unit column stride, row stride >= K
};

Problem make_problem(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_device_and_dtypes(weight, "weight", c10::DeviceType::CUDA, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble},
                          "float16, bfloat16, float32 or float64");
  auto lead = check_concat_linear(inputs, weight, bias);
  Problem p;
  p.N = weight.size(0);
  p.K = weight.size(1);
  p.M = c10::multiply_integers(lead);
  p.lead = std::move(lead);
  // Strided inputs are used in place when each row is contiguous and rows do not overlap (what both
  // the kernel and cuBLAS address); anything else is made contiguous here, explicitly.
  p.weight = weight;
  if (weight.stride(1) != 1 || (p.N > 1 && weight.stride(0) < p.K)) p.weight = weight.contiguous();
  int64_t offset = 0;
  for (const auto& x : inputs) {
    const int64_t d = x.size(-1);
    at::Tensor r = x.reshape({p.M, d});
    if ((d > 1 && r.stride(1) != 1) || (p.M > 1 && r.stride(0) < d)) r = r.contiguous();
    p.ld.push_back(p.M > 1 ? r.stride(0) : std::max<int64_t>(d, 1));
    p.rows.push_back(std::move(r));
    p.offset.push_back(offset);
    offset += d;
  }
  return p;
}

std::vector<int64_t> out_shape(const Problem& p) {
  auto shape = p.lead;
  shape.push_back(p.N);
  return shape;
}

int64_t nonempty_segments(const Problem& p) {
  int64_t n = 0;
  for (const auto& r : p.rows) n += r.size(1) > 0;
  return n;
}

enum class Path { Fused, Cublas };

// The rule written down at the top of this file.
Path choose_path(const Problem& p, at::ScalarType dt) {
  const char* env = std::getenv("MMKERNELS_FCL_CUDA_PATH");
  const std::string forced = env != nullptr ? env : "auto";
  TORCH_CHECK(forced == "auto" || forced == "fused" || forced == "cublas",
              "mmkernels: MMKERNELS_FCL_CUDA_PATH must be auto, fused or cublas; got '", forced, "'");
  if (forced == "cublas") return Path::Cublas;
  const int64_t nseg = nonempty_segments(p);
  bool want = forced == "fused";
  if (!want) {
    if (dt != at::kHalf && dt != at::kBFloat16) return Path::Cublas;  // by design, no warning
    const auto* props = at::cuda::getCurrentDeviceProperties();
    const bool narrow = p.N <= 256;
    const bool many_small = nseg >= 3 && p.K <= 128 * nseg;
    const int64_t ctas = ((p.M + 63) / 64) * ((p.N + 63) / 64);
    want = (narrow || many_small) && (2 * ctas >= props->multiProcessorCount || p.K <= 1024);
    if (!want) return Path::Cublas;
  }
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const char* why = nullptr;
  if (dt != at::kHalf && dt != at::kBFloat16) why = "its dtype is not float16/bfloat16";
  else if (props->major < 8) why = "the device is older than sm_80";
  else if (nseg > kMaxSegments) why = "it has more than 32 non-empty segments";
  else if (p.K >= (int64_t(1) << 31) || p.N >= (int64_t(1) << 21)) why = "K or N is too large for its indexing";
  if (why == nullptr) return Path::Fused;
  TORCH_WARN_ONCE("mmkernels: fused_concat_linear on CUDA: the fused tensor-core kernel does not cover this case (",
                  why, "); using the per-segment cuBLAS path instead (same result).");
  return Path::Cublas;
}

template <typename T>
SegmentTable make_table(const Problem& p) {
  SegmentTable t;
  std::memset(&t, 0, sizeof(t));
  const auto w_addr = reinterpret_cast<uintptr_t>(p.weight.data_ptr());
  const int64_t w_stride = p.weight.stride(0);
  for (size_t s = 0; s < p.rows.size(); ++s) {
    const int64_t d = p.rows[s].size(1);
    if (d == 0) continue;
    const int i = t.count++;
    t.x[i] = p.rows[s].data_ptr();
    t.x_stride[i] = p.ld[s];
    t.width[i] = static_cast<int32_t>(d);
    t.w_offset[i] = static_cast<int32_t>(p.offset[s]);
    t.k_tiles += static_cast<int32_t>((d + kTileK - 1) / kTileK);
    // 16-byte copies need every chunk address the loader forms (row start + a multiple of 8
    // elements) 16-byte aligned; the width may be anything (a partial chunk is zero-filled).
    const bool vec = reinterpret_cast<uintptr_t>(t.x[i]) % 16 == 0 && p.ld[s] % 8 == 0 && w_addr % 16 == 0 &&
                     w_stride % 8 == 0 && p.offset[s] % 8 == 0;
    if (vec) t.vec_mask |= (1u << i);
  }
  return t;
}

template <typename T>
constexpr cudaDataType_t blas_type() {
  if constexpr (std::is_same_v<T, c10::Half>) return CUDA_R_16F;
  if constexpr (std::is_same_v<T, c10::BFloat16>) return CUDA_R_16BF;
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  return CUDA_R_64F;
}

// c (M, N) row-major = sum_s x_s @ W[:, cols_s].T, one GEMM per segment accumulating (beta = 1) into
// c. In BLAS's column-major terms: c.T (N x M) = W_s (stored D x N, transposed) * x_s.T (D x M).
// cublasGemmEx on ATen's handle (bound to the current stream, with ATen's workspace): ATen's own
// gemm wrapper is not exported from libtorch_cuda, and at::addmm_ cannot accumulate fp16/bf16
// products into a float32 buffer.
template <typename T, typename acc_t>
void gemm_accumulate(const Problem& p, acc_t* c, cudaStream_t stream) {
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(p.M <= kIntMax && p.N <= kIntMax && p.K <= kIntMax && p.weight.stride(0) <= kIntMax,
              "mmkernels: fused_concat_linear on CUDA: sizes beyond 2^31 - 1 are not supported (M=", p.M,
              ", N=", p.N, ", K=", p.K, ")");
  const T* w = p.weight.data_ptr<T>();
  const auto w_stride = static_cast<int>(p.weight.stride(0));
  const cublasComputeType_t compute = std::is_same_v<T, double> ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
  const acc_t one = 1, zero = 0;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  bool first = true;
  for (size_t s = 0; s < p.rows.size(); ++s) {
    const int64_t d = p.rows[s].size(1);
    if (d == 0) continue;
    TORCH_CHECK(p.ld[s] <= kIntMax, "mmkernels: fused_concat_linear on CUDA: row stride of inputs[", s,
                "] is beyond 2^31 - 1");
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(p.N), static_cast<int>(p.M),
                                      static_cast<int>(d), &one, w + p.offset[s], blas_type<T>(), w_stride,
                                      p.rows[s].data_ptr<T>(), blas_type<T>(), static_cast<int>(p.ld[s]),
                                      first ? &zero : &one, c, blas_type<acc_t>(), static_cast<int>(p.N), compute,
                                      CUBLAS_GEMM_DEFAULT));
    first = false;
  }
  if (first) {  // K == 0: the product is zero
    C10_CUDA_CHECK(cudaMemsetAsync(c, 0, sizeof(acc_t) * p.M * p.N, stream));
  }
}

std::tuple<at::Tensor, at::Tensor> fused_concat_linear_cuda(at::TensorList inputs, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            c10::string_view activation) {
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const c10::cuda::CUDAGuard guard(weight.device());
  Problem p = make_problem(inputs, weight, bias);
  const bool keep_preact = needs_preactivation(act);
  at::Tensor out = at::empty({p.M, p.N}, weight.options());
  at::Tensor preact = at::empty({keep_preact ? p.M : 0, keep_preact ? p.N : 0}, weight.options());
  auto result = [&] {
    return std::make_tuple(out.view(out_shape(p)), keep_preact ? preact.view(out_shape(p)) : preact.view({0}));
  };
  if (p.M == 0 || p.N == 0) return result();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const Path path = choose_path(p, weight.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_concat_linear_cuda", [&] {
    const scalar_t* bias_ptr = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* pre_ptr = keep_preact ? preact.data_ptr<scalar_t>() : nullptr;
    if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
      if (path == Path::Fused) {
        launch_tc_forward<scalar_t>(make_table<scalar_t>(p), p.weight.data_ptr<scalar_t>(), p.weight.stride(0),
                                    bias_ptr, out.data_ptr<scalar_t>(), pre_ptr, p.M, p.N, act, stream);
        return;
      }
      // Segments sum in a float32 buffer, rounded once to the output dtype in the epilogue.
      at::Tensor acc = at::empty({p.M, p.N}, weight.options().dtype(at::kFloat));
      gemm_accumulate<scalar_t, float>(p, acc.data_ptr<float>(), stream);
      launch_bias_act<scalar_t, float>(acc.data_ptr<float>(), bias_ptr, out.data_ptr<scalar_t>(), pre_ptr, p.M, p.N,
                                       act, stream);
    } else {
      scalar_t* o = out.data_ptr<scalar_t>();
      gemm_accumulate<scalar_t, scalar_t>(p, o, stream);
      launch_bias_act<scalar_t, scalar_t>(o, bias_ptr, o, pre_ptr, p.M, p.N, act, stream);
    }
  });
  return result();
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fused_concat_linear_backward_cuda(
    const at::Tensor& grad_out, at::TensorList inputs, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& preact, c10::string_view activation, const c10::List<bool>& inputs_need_grad,
    bool weight_needs_grad, bool bias_needs_grad) {
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const c10::cuda::CUDAGuard guard(weight.device());
  Problem p = make_problem(inputs, weight, std::nullopt);
  MMK_CHECK_ARG(inputs_need_grad.size() == inputs.size(), "inputs_need_grad", "expected ", inputs.size(),
                " flags, got ", inputs_need_grad.size());
  MMK_CHECK_ARG(grad_out.sizes().equals(out_shape(p)), "grad_out", "expected shape ",
                at::IntArrayRef(out_shape(p)), ", got ", grad_out.sizes());
  check_same_device_dtype(grad_out, weight, "grad_out");
  const at::Tensor g = grad_out.reshape({p.M, p.N}).contiguous();

  at::Tensor gz = g;
  if (act != Activation::None && p.M * p.N > 0) {
    const bool from_pre = needs_preactivation(act);
    const at::Tensor& src_arg = from_pre ? preact : out;
    const char* src_name = from_pre ? "preact" : "out";
    MMK_CHECK_ARG(src_arg.numel() == p.M * p.N, src_name, "expected ", p.M * p.N, " elements (shape ",
                  at::IntArrayRef(out_shape(p)), "), got shape ", src_arg.sizes());
    check_same_device_dtype(src_arg, weight, src_name);
    const at::Tensor src = src_arg.reshape({p.M, p.N}).contiguous();
    gz = at::empty_like(g);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fused_concat_linear_backward_cuda",
                                    [&] {
                                      launch_act_backward<scalar_t>(g.data_ptr<scalar_t>(), src.data_ptr<scalar_t>(),
                                                                    gz.data_ptr<scalar_t>(), p.M * p.N, act, stream);
                                    });
  }

  const auto empty = at::empty({0}, weight.options());
  std::vector<at::Tensor> grad_inputs;
  for (size_t s = 0; s < inputs.size(); ++s) {
    if (!inputs_need_grad[s]) {
      grad_inputs.push_back(empty);
      continue;
    }
    const int64_t d = p.rows[s].size(1);
    grad_inputs.push_back(at::mm(gz, p.weight.narrow(1, p.offset[s], d)).view(inputs[s].sizes()));
  }
  at::Tensor grad_weight = empty;
  if (weight_needs_grad) {
    grad_weight = at::empty({p.N, p.K}, weight.options());
    const at::Tensor gz_t = gz.t();
    for (size_t s = 0; s < inputs.size(); ++s) {
      at::Tensor cols = grad_weight.narrow(1, p.offset[s], p.rows[s].size(1));
      at::mm_out(cols, gz_t, p.rows[s]);  // written in place: row stride K, unit column stride
    }
  }
  at::Tensor grad_bias = empty;
  if (bias_needs_grad) {
    const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    grad_bias = at::sum(gz, {0}, false, acc).to(weight.scalar_type());
  }
  return {std::move(grad_inputs), std::move(grad_weight), std::move(grad_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("fused_concat_linear", &fused_concat_linear_cuda);
  m.impl("fused_concat_linear_backward", &fused_concat_linear_backward_cuda);
}

}  // namespace mmkernels::cuda
