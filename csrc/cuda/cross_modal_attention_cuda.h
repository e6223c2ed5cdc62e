// What the CUDA host side of cross_modal_attention (cross_modal_attention_cuda.cpp) shares with that
// of cross_modal_attention_varlen (cross_modal_attention_varlen_cuda.cpp): the path choice, the tile
// loads' layout rule, the dropout fields, the launch by head dim and dtype, and the dense ops
// themselves (the varlen op's fallback runs them per sequence).
//
// UNVERIFIED ON A GPU: compiled for sm_80 / sm_90, not yet run.
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "attention/attn_params.h"

namespace mmkernels::cuda {

// Whether the tensor-core kernels cover these inputs: float16 / bfloat16, E = Ev in {32, 64, 128},
// an sm_80 or newer device.
enum class Path { TensorCore, FallbackDtype, FallbackHeadDim, FallbackArch };
Path choose_path(const at::Tensor& q, int64_t E, int64_t Ev);

// x itself where its last dim is contiguous and every other stride (and the base) is 16-byte
// aligned, as the cp.async tile loads need; otherwise a contiguous copy.
at::Tensor kernel_layout(const at::Tensor& x);

// AttnParams' dropout fields for probability dropout_p (0: none); the seed is seed_ptr's value
// (a device tensor, read by the kernels) or, where seed_ptr is null, `seed`.
void set_dropout_fields(attn::AttnParams& a, double dropout_p, uint64_t seed, const int64_t* seed_ptr);

// The tensor-core kernels' instantiation for the run-time (E, dtype); E in {32, 64, 128}.
void run_fwd(const attn::FwdParams& fp, int64_t E, bool bf16, cudaStream_t stream);
void run_bwd(const attn::BwdParams& bp, int64_t E, bool bf16, cudaStream_t stream);

// The dense ops' CUDA kernels (the schemas in csrc/ops.cpp).
std::tuple<at::Tensor, at::Tensor> cross_modal_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask, double scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t causal);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask, double scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t causal);

}  // namespace mmkernels::cuda
