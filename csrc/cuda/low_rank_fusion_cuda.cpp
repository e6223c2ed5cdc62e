// CUDA kernels of low_rank_fusion (host side). UNVERIFIED ON A GPU: this compiles for sm_80 / sm_90
// and its kernels run on the CPU emulation harness (tests/emu); tests/test_cuda_low_rank_fusion.py
// waits for a GPU.
//
//   out = bias + sum_k w[k] * prod_m P_m[k],   P_m[k] = [x_m, 1] @ F_m[k] = x_m @ F_m[k, :D_m] + F_m[k, D_m]
//
// The rows are processed in chunks. Per chunk, each modality's projections for every rank come from
// one GEMM, x_m (rows, D_m) @ F_m[:, :D_m, :] laid out once per call as a (D_m, R * N) matrix, into a
// float32 (float64 for float64) buffer: float16 / bfloat16 inputs go through ATen's mm with a float32
// output (tensor cores, no rounding of the projections). Then one kernel
// (low_rank_fusion_elementwise.cu) adds each modality's appended-1 row, multiplies over modalities
// and sums over the rank with the weights, writing the output once. So what is alive is one chunk's
// (rows, R * N) projection per modality, bounded by kChunkBytes, never the reference's (..., R, N)
// per modality over the whole batch, nor their product.
//
// Backward recomputes a chunk's projections and the kernel overwrites each with
//   dP_m = g * w[k] * prod_{j != m} P_j        (prefix and suffix products; no division)
// and sums g * prod_m P_m per rank (the rank weight's gradient) in per-block partials. Then, per chunk:
//   grad x_m = dP_m @ F_m[:, :D_m, :]^T as (R * N, D_m): one GEMM, written in place;
//   grad F_m[:, :D_m, :] += x_m^T @ dP_m: one GEMM into a (D_m, R * N) accumulator;
//   grad F_m[:, D_m, :] += column sums of dP_m;  grad bias = column sums of g.
// These GEMMs run in the compute type (float16 / bfloat16 inputs converted per chunk), as the CPU
// kernel does.
//
// More than kLrfMaxModalities modalities: forward folds the extra ones into the last slot with ATen
// elementwise ops; backward then runs the product rule with ATen elementwise ops on the same chunk
// buffers (same memory bound, more passes over it).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "checks.h"
#include "low_rank_fusion_launch.h"

namespace mmkernels::cuda {
namespace {

// tests/emu/test_emu_low_rank_fusion_host.py compiles this file against the CPU build of torch with
// MMK_EMU_HOST: the CUDA headers replaced by csrc/emu/host, the kernels running on the emulator, CPU
// tensors standing in for device memory. Only the lines under MMK_EMU_HOST differ.
#ifdef MMK_EMU_HOST
constexpr auto kDeviceType = c10::DeviceType::CPU;
#else
constexpr auto kDeviceType = c10::DeviceType::CUDA;
#endif

// Bytes of chunk buffers (projections, dP) alive at once.
constexpr int64_t kChunkBytes = int64_t(64) << 20;

struct Problem {
  int64_t rows = 0, N = 0, R = 0;
  std::vector<int64_t> lead;      // leading (batch) dims shared by every input
  at::ScalarType dt, acc;         // the parameters' dtype; the compute type (float32 for 16-bit)
  std::vector<at::Tensor> x;      // input m as a (rows, D_m) matrix, in its own dtype
  std::vector<at::Tensor> fw;     // F_m[:, :D_m, :] as a (D_m, R * N) matrix, element (d, k * N + n), dtype dt
  std::vector<at::Tensor> row;    // F_m[:, D_m, :] as (R * N,), in the compute type
  at::Tensor w;                   // rank weights (R,), in the compute type
};

Problem make_problem(at::TensorList inputs, at::TensorList factors, const at::Tensor& rank_weight,
                     const std::optional<at::Tensor>& bias) {
  check_device_and_dtypes(rank_weight, "rank_weight", kDeviceType,
                          {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble}, "float16, bfloat16, float32 or float64");
  Problem p;
  p.lead = check_low_rank_fusion(inputs, factors, rank_weight, bias);
  p.rows = c10::multiply_integers(p.lead);
  p.R = rank_weight.size(0);
  p.N = factors[0].size(2);
  p.dt = rank_weight.scalar_type();
  p.acc = at::toOpMathType(p.dt);
  for (size_t m = 0; m < inputs.size(); ++m) {
    const int64_t d = inputs[m].size(-1);
    p.x.push_back(inputs[m].reshape({p.rows, d}));
    // Parameter-sized copies, once per call: the GEMM's right operand and the appended 1's row.
    p.fw.push_back(factors[m].narrow(1, 0, d).permute({1, 0, 2}).reshape({d, p.R * p.N}));
    p.row.push_back(factors[m].select(1, d).to(p.acc).reshape({p.R * p.N}).contiguous());
  }
  p.w = rank_weight.to(p.acc).contiguous();
  return p;
}

std::vector<int64_t> out_shape(const Problem& p) {
  auto s = p.lead;
  s.push_back(p.N);
  return s;
}

// Rows per chunk: `buffers` (rows, R * N) buffers of the compute type within kChunkBytes.
// MMKERNELS_LRF_CUDA_CHUNK_ROWS overrides it (tests, to cover several chunks on small inputs).
int64_t chunk_rows(const Problem& p, int64_t buffers) {
  if (const char* env = std::getenv("MMKERNELS_LRF_CUDA_CHUNK_ROWS")) {
    const long long v = std::atoll(env);
    TORCH_CHECK(v > 0, "mmkernels: MMKERNELS_LRF_CUDA_CHUNK_ROWS must be a positive integer; got '", env, "'");
    return std::min<int64_t>(v, std::max<int64_t>(p.rows, 1));
  }
  const int64_t per_row = std::max<int64_t>(buffers * p.R * p.N * c10::elementSize(p.acc), 1);
  return std::clamp<int64_t>(kChunkBytes / per_row, 1, std::max<int64_t>(p.rows, 1));
}

// Modality m's projections x_m[r0 : r0 + n] @ F_m[:, :D_m, :] as a (n, R * N) compute-type matrix;
// undefined when D_m == 0 (the projection is the row alone) or R * N == 0 (nothing to project).
at::Tensor project(const Problem& p, size_t m, int64_t r0, int64_t n) {
  if (p.x[m].size(1) == 0 || p.R * p.N == 0) return at::Tensor();
  const at::Tensor x = p.x[m].narrow(0, r0, n);
  if (p.acc == p.dt) return at::mm(x, p.fw[m]);
#ifdef MMK_EMU_HOST
  return at::mm(x.to(p.acc), p.fw[m].to(p.acc));  // ATen's CPU mm has no out_dtype
#else
  return at::mm(x, p.fw[m], p.acc);  // float16 / bfloat16 in, float32 out
#endif
}

template <typename acc_t>
LrfModalities<acc_t> table(const std::vector<at::Tensor>& proj, const std::vector<at::Tensor>& rows,
                           const std::vector<at::Tensor>* grads) {
  LrfModalities<acc_t> t{};
  t.count = static_cast<int32_t>(proj.size());
  for (size_t m = 0; m < proj.size(); ++m) {
    t.proj[m] = proj[m].defined() ? proj[m].data_ptr<acc_t>() : nullptr;
    t.row[m] = rows[m].defined() ? rows[m].data_ptr<acc_t>() : nullptr;
    t.grad[m] = grads != nullptr && (*grads)[m].defined() ? (*grads)[m].data_ptr<acc_t>() : nullptr;
  }
  return t;
}

at::Tensor low_rank_fusion_cuda(at::TensorList inputs, at::TensorList factors, const at::Tensor& rank_weight,
                                const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(rank_weight.device());
  Problem p = make_problem(inputs, factors, rank_weight, bias);
  at::Tensor out = at::empty({p.rows, p.N}, rank_weight.options());
  if (p.rows * p.N == 0) return out.view(out_shape(p));
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const size_t M = inputs.size(), slots = std::min<size_t>(M, kLrfMaxModalities);
  const int64_t chunk = chunk_rows(p, static_cast<int64_t>(slots));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t r0 = 0; r0 < p.rows; r0 += chunk) {
    const int64_t n = std::min(chunk, p.rows - r0);
    std::vector<at::Tensor> proj(slots), rows(p.row.begin(), p.row.begin() + slots);
    for (size_t m = 0; m + 1 < slots; ++m) proj[m] = project(p, m, r0, n);
    if (M <= slots) {
      proj[slots - 1] = project(p, slots - 1, r0, n);
    } else {
      // Fold modalities slots-1 .. M-1 into the last slot: their full product, row included.
      at::Tensor fold = at::empty({n, p.R * p.N}, out.options().dtype(p.acc));
      for (size_t m = slots - 1; m < M; ++m) {
        at::Tensor pm = project(p, m, r0, n);
        const at::Tensor full = pm.defined() ? pm.add_(p.row[m]) : p.row[m].expand({n, p.R * p.N});
        if (m == slots - 1) fold.copy_(full); else fold.mul_(full);
      }
      proj[slots - 1] = fold;
      rows[slots - 1] = at::Tensor();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dt, "low_rank_fusion_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch_lrf_forward<scalar_t, acc_t>(table<acc_t>(proj, rows, nullptr), p.w.data_ptr<acc_t>(),
                                          b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                                          out.data_ptr<scalar_t>() + r0 * p.N, n, p.N, p.R, stream);
    });
  }
  return out.view(out_shape(p));
}

// The product rule with ATen ops on a chunk (more modalities than one launch takes): P holds the
// chunk's full projections (row added), replaced by dP_m where grads are wanted; returns the
// chunk's sum over rows and columns of g * prod_m P_m per rank.
at::Tensor product_rule_aten(std::vector<at::Tensor>& P, const std::vector<bool>& wanted, const at::Tensor& g,
                             const at::Tensor& w, int64_t R, int64_t N) {
  const size_t M = P.size();
  const int64_t n = g.size(0);
  std::vector<at::Tensor> prefix(M);  // prefix[m] = prod_{j < m} P_j (undefined: the empty product)
  for (size_t m = 1; m < M; ++m) prefix[m] = m == 1 ? P[0] : prefix[m - 1] * P[m - 1];
  const at::Tensor full = prefix[M - 1] * P[M - 1];
  const at::Tensor gw = (g.unsqueeze(1) * full.view({n, R, N})).sum({0, 2});
  const at::Tensor gk = (g.unsqueeze(1) * w.view({1, R, 1})).reshape({n, R * N});  // g * w[k]
  at::Tensor suffix;  // prod_{j > m} P_j
  for (size_t m = M; m-- > 0;) {
    // A product or a copy, never P[m] itself, which is overwritten below.
    at::Tensor next_suffix = m > 0 ? (suffix.defined() ? suffix * P[m] : P[m].clone()) : at::Tensor();
    if (wanted[m]) {
      at::Tensor d = gk;
      if (prefix[m].defined()) d = d * prefix[m];
      if (suffix.defined()) d = d * suffix;
      P[m].copy_(d);  // every read of P[m] is done: prefix and suffix hold their own products
    }
    suffix = next_suffix;
  }
  return gw;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> low_rank_fusion_backward_cuda(
    const at::Tensor& grad_out, at::TensorList inputs, at::TensorList factors, const at::Tensor& rank_weight,
    const c10::List<bool>& inputs_need_grad, const c10::List<bool>& factors_need_grad, bool rank_weight_needs_grad,
    bool bias_needs_grad) {
  const c10::cuda::CUDAGuard guard(rank_weight.device());
  Problem p = make_problem(inputs, factors, rank_weight, std::nullopt);
  const size_t M = inputs.size();
  MMK_CHECK_ARG(inputs_need_grad.size() == M, "inputs_need_grad", "expected ", M, " flags, got ", inputs_need_grad.size());
  MMK_CHECK_ARG(factors_need_grad.size() == M, "factors_need_grad", "expected ", M, " flags, got ",
                factors_need_grad.size());
  MMK_CHECK_ARG(grad_out.sizes().equals(out_shape(p)), "grad_out", "expected shape ", at::IntArrayRef(out_shape(p)),
                ", got ", grad_out.sizes());
  check_same_device_dtype(grad_out, rank_weight, "grad_out");
  const auto opts = rank_weight.options().dtype(p.acc);
  const at::Tensor g_all = grad_out.reshape({p.rows, p.N}).contiguous();
  const int64_t RN = p.R * p.N;

  // Accumulators in the compute type, cast to the parameters' dtype at the end.
  std::vector<at::Tensor> gx(M), gfw(M), gfrow(M), fw_t(M);
  std::vector<bool> wanted(M);
  for (size_t m = 0; m < M; ++m) {
    const int64_t d = p.x[m].size(1);
    if (inputs_need_grad[m]) gx[m] = at::zeros({p.rows, d}, opts);
    if (factors_need_grad[m]) gfw[m] = at::zeros({d, RN}, opts), gfrow[m] = at::zeros({RN}, opts);
    if (gx[m].defined() && d > 0) fw_t[m] = p.fw[m].t().to(p.acc);  // (R * N, D_m)
    wanted[m] = (gx[m].defined() && d > 0) || gfw[m].defined();
  }
  at::Tensor gw = at::zeros({p.R}, opts);
  const bool any_dp = std::any_of(wanted.begin(), wanted.end(), [](bool b) { return b; });
  const bool work = (any_dp || rank_weight_needs_grad) && p.rows * p.N > 0 && p.R > 0;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunk = chunk_rows(p, static_cast<int64_t>(M) + 1);
  for (int64_t r0 = 0; work && r0 < p.rows; r0 += chunk) {
    const int64_t n = std::min(chunk, p.rows - r0);
    const at::Tensor g = g_all.narrow(0, r0, n);
    std::vector<at::Tensor> proj(M), dp(M);
    for (size_t m = 0; m < M; ++m) proj[m] = project(p, m, r0, n);
    if (M <= static_cast<size_t>(kLrfMaxModalities)) {
      for (size_t m = 0; m < M; ++m) {
        // dP_m overwrites the projection; a featureless modality whose row needs a gradient gets a buffer.
        if (wanted[m]) dp[m] = proj[m].defined() ? proj[m] : at::empty({n, RN}, opts);
      }
      const int blocks = lrf_backward_blocks(n, p.N);
      at::Tensor partial = rank_weight_needs_grad ? at::empty({p.R, blocks}, opts) : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.dt, "low_rank_fusion_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        launch_lrf_backward<scalar_t, acc_t>(table<acc_t>(proj, p.row, &dp), g.data_ptr<scalar_t>(),
                                             p.w.data_ptr<acc_t>(), partial.defined() ? partial.data_ptr<acc_t>() : nullptr,
                                             n, p.N, p.R, stream);
      });
      if (partial.defined()) gw.add_(partial.sum(1));
    } else {
      std::vector<at::Tensor> full(M);
      for (size_t m = 0; m < M; ++m) {
        full[m] = proj[m].defined() ? proj[m].add_(p.row[m]) : p.row[m].expand({n, RN}).contiguous();
      }
      gw.add_(product_rule_aten(full, wanted, g.to(p.acc), p.w, p.R, p.N));
      for (size_t m = 0; m < M; ++m) if (wanted[m]) dp[m] = full[m];
    }
    for (size_t m = 0; m < M; ++m) {
      if (!dp[m].defined()) continue;
      if (fw_t[m].defined()) {
        at::Tensor gx_rows = gx[m].narrow(0, r0, n);
        at::mm_out(gx_rows, dp[m], fw_t[m]);
      }
      if (gfw[m].defined()) {
        if (gfw[m].size(0) > 0) gfw[m].addmm_(p.x[m].narrow(0, r0, n).to(p.acc).t(), dp[m]);
        gfrow[m].add_(dp[m].sum(0));
      }
    }
  }

  const at::Tensor empty = at::empty({0}, rank_weight.options());
  std::vector<at::Tensor> grad_inputs, grad_factors;
  for (size_t m = 0; m < M; ++m) {
    grad_inputs.push_back(gx[m].defined() ? gx[m].to(p.dt).view(inputs[m].sizes()) : empty);
    if (!gfw[m].defined()) {
      grad_factors.push_back(empty);
      continue;
    }
    const int64_t d = p.x[m].size(1);
    at::Tensor gf = at::empty({p.R, d + 1, p.N}, rank_weight.options());
    gf.narrow(1, 0, d).copy_(gfw[m].view({d, p.R, p.N}).permute({1, 0, 2}));
    gf.select(1, d).copy_(gfrow[m].view({p.R, p.N}));
    grad_factors.push_back(gf);
  }
  at::Tensor grad_w = rank_weight_needs_grad ? gw.to(p.dt) : empty;
  at::Tensor grad_b = bias_needs_grad ? at::sum(g_all, {0}, false, p.acc).to(p.dt) : empty;
  return {std::move(grad_inputs), std::move(grad_factors), std::move(grad_w), std::move(grad_b)};
}

}  // namespace

#ifndef MMK_EMU_HOST
TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("low_rank_fusion", &low_rank_fusion_cuda);
  m.impl("low_rank_fusion_backward", &low_rank_fusion_backward_cuda);
}
#endif

}  // namespace mmkernels::cuda
