// CPU kernels of low_rank_fusion, the product-of-projections step of LMF (Liu et al. 2018):
//
//   out = bias + sum_k w[k] * prod_m ([x_m, 1] @ F_m[k])        F_m: (R, D_m + 1, N)
//
// The appended 1 picks the last row of each factor, so [x_m, 1] @ F_m[k] = x_m @ F_m[k, :D_m] +
// F_m[k, D_m]: one addmm with the last row as its bias, and [x_m, 1] is never built. The reference
// materialises every modality's (B, R, N) projection (and autograd keeps them all); here a block of
// rows holds one (rows, N) projection and the running product at a time, and backward recomputes
// the projections instead of saving them.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "checks.h"

namespace mmkernels::cpu {
namespace {

struct Problem {
  int64_t rows = 0, N = 0, R = 0;
  std::vector<int64_t> lead;      // leading (batch) dims shared by every input
  at::ScalarType acc;             // compute type: float for bfloat16/float16, else the input type
  std::vector<at::Tensor> x;      // input m as a (rows, D_m) matrix, in its own dtype
  std::vector<at::Tensor> fw;     // F_m[:, :D_m] in the compute type, (R, D_m, N)
  std::vector<at::Tensor> fb;     // F_m[:, D_m], the appended 1's row, (R, N)
  std::vector<double> w;          // rank weights, read once
};

Problem make_problem(at::TensorList inputs, at::TensorList factors, const at::Tensor& rank_weight,
                     const std::optional<at::Tensor>& bias) {
  MMK_CHECK_ARG(rank_weight.dim() == 1, "rank_weight", "expected a 1-D (rank,) tensor, got shape ",
                rank_weight.sizes());
  const auto dt = rank_weight.scalar_type();
  MMK_CHECK_ARG(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, "rank_weight",
                "expected float32, float64, bfloat16 or float16, got ", dt);
  Problem p;
  p.lead = check_low_rank_fusion(inputs, factors, rank_weight, bias);  // shared with the CUDA kernel
  p.R = rank_weight.size(0);
  p.N = factors[0].size(2);
  p.acc = at::toOpMathType(dt);
  p.rows = c10::multiply_integers(p.lead);
  for (size_t m = 0; m < inputs.size(); ++m) {
    const int64_t d = inputs[m].size(-1);
    p.x.push_back(inputs[m].reshape({p.rows, d}));
    const at::Tensor fa = factors[m].to(p.acc);  // no copy unless bfloat16/float16
    p.fw.push_back(fa.narrow(1, 0, d));
    p.fb.push_back(fa.select(1, d));
  }
  const at::Tensor w = rank_weight.to(at::kDouble).contiguous();
  p.w.assign(w.data_ptr<double>(), w.data_ptr<double>() + p.R);
  return p;
}

std::vector<int64_t> out_shape(const Problem& p) {
  auto s = p.lead;
  s.push_back(p.N);
  return s;
}

// Rows per block: `elems` output elements per (rows, N) buffer, so the few live buffers stay in cache.
int64_t block_rows(const Problem& p, int64_t elems) {
  return std::clamp<int64_t>(elems / std::max<int64_t>(p.N, 1), 16, std::max<int64_t>(p.rows, 16));
}

// proj = [x, 1] @ F_m[k] for one block of rows (x_blk already in the compute type).
inline void project(at::Tensor& proj, const Problem& p, const at::Tensor& x_blk, size_t m, int64_t k) {
  at::addmm_out(proj, p.fb[m][k], x_blk, p.fw[m][k]);
}

at::Tensor low_rank_fusion_cpu(at::TensorList inputs, at::TensorList factors, const at::Tensor& rank_weight,
                               const std::optional<at::Tensor>& bias) {
  Problem p = make_problem(inputs, factors, rank_weight, bias);
  at::Tensor out = at::empty({p.rows, p.N}, rank_weight.options());
  if (p.rows == 0 || p.N == 0) return out.view(out_shape(p));
  const at::Tensor bias_acc = bias.has_value() ? bias->to(p.acc) : at::Tensor();
  const int64_t rows = block_rows(p, int64_t(1) << 15);
  const int64_t nblocks = (p.rows + rows - 1) / rows;

  auto run_block = [&](int64_t r0, int64_t rn) {
    const auto opts = out.options().dtype(p.acc);
    // float32/float64 accumulate straight into the output; bfloat16/float16 through a float32 block.
    const bool direct = p.acc == out.scalar_type();
    at::Tensor acc = direct ? out.narrow(0, r0, rn) : at::empty({rn, p.N}, opts);
    at::Tensor prod = at::empty({rn, p.N}, opts), proj = at::empty({rn, p.N}, opts);
    if (bias_acc.defined()) acc.copy_(bias_acc.expand({rn, p.N})); else acc.zero_();
    std::vector<at::Tensor> xb;
    for (const auto& x : p.x) xb.push_back(x.narrow(0, r0, rn).to(p.acc));
    for (int64_t k = 0; k < p.R; ++k) {
      project(prod, p, xb[0], 0, k);
      for (size_t m = 1; m < xb.size(); ++m) {
        project(proj, p, xb[m], m, k);
        prod.mul_(proj);
      }
      acc.add_(prod, p.w[k]);
    }
    if (!direct) out.narrow(0, r0, rn).copy_(acc);
  };
  // OpenMP workers do not inherit the caller's dispatcher state (we run below autograd): carry it over.
  const at::ThreadLocalState state;
  auto run = [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t b = b0; b < b1; ++b) run_block(b * rows, std::min(rows, p.rows - b * rows));
  };
  // Enough blocks: threads take whole blocks (their GEMMs run single-threaded); else blocks run in
  // turn and each ATen op inside uses every thread.
  if (nblocks >= 2 * at::get_num_threads()) at::parallel_for(0, nblocks, 1, run); else run(0, nblocks);
  return out.view(out_shape(p));
}

// Gradients. With P_m = [x_m, 1] @ F_m[k] and dP_m = g * w[k] * prod_{j != m} P_j (prefix and suffix
// products, no division, so zeros are fine):
//   grad x_m += dP_m @ F_m[k, :D].T     grad F_m[k] = [x_m, 1].T @ dP_m     grad w[k] = <g, prod_m P_m>
// Blocks of rows as in forward: with enough blocks threads take whole blocks, summing grad F and
// grad w into per-thread accumulators reduced at the end; otherwise blocks run in turn and the ATen
// ops inside use every thread. w[k] rides on the GEMMs' alpha, so no scaled copy of g is made (unless w[k] is not finite).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, at::Tensor> low_rank_fusion_backward_cpu(
    const at::Tensor& grad_out, at::TensorList inputs, at::TensorList factors, const at::Tensor& rank_weight,
    const c10::List<bool>& inputs_need_grad, const c10::List<bool>& factors_need_grad, bool rank_weight_needs_grad,
    bool bias_needs_grad) {
  Problem p = make_problem(inputs, factors, rank_weight, std::nullopt);
  const size_t M = inputs.size();
  MMK_CHECK_ARG(inputs_need_grad.size() == M, "inputs_need_grad", "expected ", M, " flags, got ", inputs_need_grad.size());
  MMK_CHECK_ARG(factors_need_grad.size() == M, "factors_need_grad", "expected ", M, " flags, got ",
                factors_need_grad.size());
  MMK_CHECK_ARG(grad_out.sizes().equals(out_shape(p)), "grad_out", "expected shape ", at::IntArrayRef(out_shape(p)),
                ", got ", grad_out.sizes());
  check_same_device_dtype(grad_out, rank_weight, "grad_out");
  const auto opts = rank_weight.options().dtype(p.acc);
  const at::Tensor g_all = grad_out.reshape({p.rows, p.N});

  // Accumulators in the compute type; cast to the parameter dtype at the end.
  std::vector<at::Tensor> gx(M), gf(M);
  for (size_t m = 0; m < M; ++m) {
    if (inputs_need_grad[m]) gx[m] = at::zeros({p.rows, p.x[m].size(1)}, opts);
    if (factors_need_grad[m]) gf[m] = at::zeros({p.R, p.x[m].size(1) + 1, p.N}, opts);
  }
  std::vector<double> gw(p.R, 0.0);
  const bool any_factor_or_input = std::any_of(gx.begin(), gx.end(), [](auto& t) { return t.defined(); }) ||
                                   std::any_of(gf.begin(), gf.end(), [](auto& t) { return t.defined(); });

  auto run_block = [&](int64_t r0, int64_t rn, std::vector<at::Tensor>& gf_acc, double* gw_acc) {
    const at::Tensor g = g_all.narrow(0, r0, rn).to(p.acc).contiguous();
    auto buf = [&] { return at::empty({rn, p.N}, opts); };
    std::vector<at::Tensor> xb(M), P(M), pre(M);
    for (size_t m = 0; m < M; ++m) {
      xb[m] = p.x[m].narrow(0, r0, rn).to(p.acc);
      P[m] = buf();
      if (m >= 2) pre[m] = buf();
    }
    at::Tensor full = M > 1 ? buf() : at::Tensor(), dP = buf(), suffix = M > 1 ? buf() : at::Tensor();
    for (int64_t k = 0; k < p.R; ++k) {
      const double wk = p.w[k];
      for (size_t m = 0; m < M; ++m) project(P[m], p, xb[m], m, k);
      // pre[m] = prod_{j < m} P_j (pre[0], the empty product, is never used)
      if (M > 1) pre[1] = P[0];
      for (size_t m = 2; m < M; ++m) at::mul_out(pre[m], pre[m - 1], P[m - 1]);
      if (rank_weight_needs_grad) {
        const at::Tensor& prod = M == 1 ? P[0] : at::mul_out(full, pre[M - 1], P[M - 1]);
        gw_acc[k] += at::dot(g.view(-1), prod.view(-1)).item<double>();
      }
      if (!any_factor_or_input) continue;
      bool have_suffix = false;  // suffix = prod_{j > m} P_j
      for (size_t m = M; m-- > 0;) {
        // dP_m / w[k] = g * pre[m] * suffix
        if (m > 0 && have_suffix) {
          at::mul_out(dP, pre[m], suffix).mul_(g);
        } else if (m > 0) {
          at::mul_out(dP, g, pre[m]);
        } else if (have_suffix) {
          at::mul_out(dP, g, suffix);
        }
        const at::Tensor& d_unscaled = (m == 0 && !have_suffix) ? g : dP;  // M == 1: dP / w[k] = g
        // A non-finite w[k] does not ride on alpha: ATen's float32 addmm ignores a NaN alpha (MKL
        // computes it as 1, found by the long fuzz), and an Inf one would give +-Inf where the
        // reference, summing +-Inf products, gives NaN. A scaled copy of dP keeps both as in the
        // reference; it only costs anything for such (rare) weights.
        const bool scaled = !std::isfinite(wk);
        const at::Tensor d = scaled ? d_unscaled * wk : d_unscaled;
        const double alpha = scaled ? 1.0 : wk;
        if (gx[m].defined()) gx[m].narrow(0, r0, rn).addmm_(d, p.fw[m][k].t(), 1, alpha);
        if (gf_acc[m].defined()) {
          const int64_t dm = p.x[m].size(1);
          gf_acc[m][k].narrow(0, 0, dm).addmm_(xb[m].t(), d, 1, alpha);
          gf_acc[m][k][dm].add_(d.sum(0), alpha);
        }
        if (m > 0) {
          if (have_suffix) suffix.mul_(P[m]); else suffix.copy_(P[m]);
          have_suffix = true;
        }
      }
    }
  };

  const int64_t rows = block_rows(p, int64_t(1) << 15);
  const int64_t nblocks = (any_factor_or_input || rank_weight_needs_grad) ? (p.rows + rows - 1) / rows : 0;
  const int64_t nthreads = at::get_num_threads();
  if (nblocks >= 2 * nthreads) {
    std::vector<std::vector<at::Tensor>> gf_t(nthreads, std::vector<at::Tensor>(M));
    std::vector<std::vector<double>> gw_t(nthreads, std::vector<double>(p.R, 0.0));
    const at::ThreadLocalState state;  // see forward
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      at::ThreadLocalStateGuard guard(state);
      const int t = at::get_thread_num();
      for (size_t m = 0; m < M; ++m)
        if (gf[m].defined() && !gf_t[t][m].defined()) gf_t[t][m] = at::zeros_like(gf[m]);
      for (int64_t b = b0; b < b1; ++b) run_block(b * rows, std::min(rows, p.rows - b * rows), gf_t[t], gw_t[t].data());
    });
    for (int64_t t = 0; t < nthreads; ++t) {
      for (size_t m = 0; m < M; ++m)
        if (gf_t[t][m].defined()) gf[m].add_(gf_t[t][m]);
      for (int64_t k = 0; k < p.R; ++k) gw[k] += gw_t[t][k];
    }
  } else {
    for (int64_t b = 0; b < nblocks; ++b) run_block(b * rows, std::min(rows, p.rows - b * rows), gf, gw.data());
  }

  const auto dt = rank_weight.scalar_type();
  const at::Tensor empty = at::empty({0}, rank_weight.options());
  std::vector<at::Tensor> grad_inputs, grad_factors;
  for (size_t m = 0; m < M; ++m) {
    grad_inputs.push_back(gx[m].defined() ? gx[m].to(dt).view(inputs[m].sizes()) : empty);
    grad_factors.push_back(gf[m].defined() ? gf[m].to(dt) : empty);
  }
  at::Tensor grad_w = rank_weight_needs_grad ? at::tensor(gw, rank_weight.options().dtype(at::kDouble)).to(dt) : empty;
  at::Tensor grad_b = bias_needs_grad ? g_all.to(p.acc).sum(0).to(dt) : empty;
  return {std::move(grad_inputs), std::move(grad_factors), std::move(grad_w), std::move(grad_b)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("low_rank_fusion", &low_rank_fusion_cpu);
  m.impl("low_rank_fusion_backward", &low_rank_fusion_backward_cpu);
}

}  // namespace mmkernels::cpu
