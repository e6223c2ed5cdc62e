// CUDA kernels of cross_modal_attention (host side): argument checks, mask and dropout set-up, the
// choice between the tensor-core kernels (csrc/cuda/attention/) and the fallback, and the backward.
//
// Paths:
//  * tensor cores: float16 / bfloat16, head dims E = Ev in {32, 64, 128}, sm_80 or newer. Forward
//    is one flash-style kernel (attn_fwd.cuh), or for decoding shapes (a grid too small for the
//    device, long keys: attn::choose_key_splits) that kernel with the keys split over several blocks
//    per query tile and a combine kernel merging their float32 partials by log-sum-exp; backward is a D = rowsum(dO * O) pre-pass, one kernel
//    per key tile (attn_bwd.cuh) with dQ accumulated by float32 atomics, and a dQ convert pass.
//  * fallback (float32, float64, other head dims, Ev != E, pre-sm_80 devices): the same math as an
//    ATen composition (cuBLAS GEMMs + elementwise ops) over chunks of query rows, so its extra memory
//    is bounded by the chunk (~2^26 scores), not O(Lq * Lk). It says once per process which path ran
//    and why (TORCH_WARN_ONCE). It drops exactly the elements the kernels (and the CPU) drop: the
//    keep mask comes from the same counter-based hash (csrc/include/dropout_hash.h).
//
// Causal (causal = 1 upper-left, 2 lower-right) and grouped-query heads (k, v with H_kv heads
// dividing H) are flags and indices to the kernels: no mask and no copy of K / V is made; the
// fallback adds the causal mask per chunk of rows and folds each group's query heads into the rows
// of one GEMM against its kv head.
//
// Masks are never expanded in memory: attn_mask is read through its (stride-0 where broadcast)
// strides, key_padding_mask and kv_lengths become a per-batch visible key range (tiles outside it
// are skipped) plus a per-element check for holes. kv_lengths values outside [0, Lk] are clamped
// here (the Python wrapper rejects them eagerly; checking here would need a device-to-host sync).
//
// UNVERIFIED ON A GPU: this file and the kernels compile for sm_80 / sm_90 but have not yet run on a
// GPU. tests/test_cuda_cross_modal_attention.py is ready for the first session that has one.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

#include "attention/attn_params.h"
#include "attention_layout.h"
#include "checks.h"
#include "cross_modal_attention_cuda.h"
#include "dropout_hash.h"

namespace mmkernels::cuda {

using attn::AttnParams;
using attn::BwdParams;
using attn::FwdParams;

Path choose_path(const at::Tensor& q, int64_t E, int64_t Ev) {
  const auto dt = q.scalar_type();
  if (dt != at::kHalf && dt != at::kBFloat16) return Path::FallbackDtype;
  if (E != Ev || (E != 32 && E != 64 && E != 128)) return Path::FallbackHeadDim;
  if (at::cuda::getDeviceProperties(q.device().index())->major < 8) return Path::FallbackArch;
  return Path::TensorCore;
}

at::Tensor kernel_layout(const at::Tensor& x) {
  bool ok = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) ok = ok && x.stride(d) % 8 == 0;
  return ok ? x : x.contiguous();
}

void set_dropout_fields(attn::AttnParams& a, double dropout_p, uint64_t seed, const int64_t* seed_ptr) {
  const bool on = dropout_p > 0.0;
  a.dropout = on ? 1 : 0;
  a.threshold = on ? dropout_threshold(dropout_p) : 0u;
  a.inv_keep = on && dropout_p < 1.0 ? static_cast<float>(1.0 / (1.0 - dropout_p)) : 0.0f;
  a.seed = seed;
  a.seed_ptr = seed_ptr;
}

void run_fwd(const FwdParams& fp, int64_t E, bool bf16, cudaStream_t stream) {
  if (E == 32) {
    bf16 ? attn::launch_fwd<32, true>(fp, stream) : attn::launch_fwd<32, false>(fp, stream);
  } else if (E == 64) {
    bf16 ? attn::launch_fwd<64, true>(fp, stream) : attn::launch_fwd<64, false>(fp, stream);
  } else {
    bf16 ? attn::launch_fwd<128, true>(fp, stream) : attn::launch_fwd<128, false>(fp, stream);
  }
}

void run_bwd(const BwdParams& bp, int64_t E, bool bf16, cudaStream_t stream) {
  if (E == 32) {
    bf16 ? attn::launch_bwd<32, true>(bp, stream) : attn::launch_bwd<32, false>(bp, stream);
  } else if (E == 64) {
    bf16 ? attn::launch_bwd<64, true>(bp, stream) : attn::launch_bwd<64, false>(bp, stream);
  } else {
    bf16 ? attn::launch_bwd<128, true>(bp, stream) : attn::launch_bwd<128, false>(bp, stream);
  }
}

namespace {

// ------------------------------------------------------------------------------------------ checks

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_attention_ranks(q, k, v);
  check_device_and_dtypes(q, "q", c10::DeviceType::CUDA, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble},
                          "float16, bfloat16, float32 or float64 on CUDA");
  check_attention_qkv(q, k, v);  // includes H % H_kv == 0
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  MMK_CHECK_ARG(q.size(2) < kMax && k.size(2) < kMax && q.size(0) * q.size(1) < kMax, "q",
                "sizes beyond int32 range are not supported, got q ", q.sizes(), " and k ", k.sizes());
}

// The inputs after the checks, with the masks in the form the kernels read (kept alive here).
struct Prepared {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, E = 0, Ev = 0;
  int64_t Hkv = 0, G = 1;  // kv heads; query heads per kv head
  int64_t causal = 0;      // 0 none, 1 upper-left, 2 lower-right
  double scale = 1.0;
  at::Tensor kpm;          // (B, Lk) bool, contiguous, on q's device; or undefined
  at::Tensor lengths;      // (B,) int32 on q's device; or undefined
  at::Tensor mask;         // (B, H, Lq, Lk) expanded view (stride 0 on broadcast dims): bool or float
  bool dropout = false;
  double dropout_p = 0.0;
  uint64_t seed = 0;
  at::Tensor seed_dev;     // the seed when it lives on the GPU
};

// The dtype float masks are read in and the fallback computes in: float32, float64 for float64 inputs.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
                 const std::optional<at::Tensor>& attn_mask, double scale, double dropout_p,
                 const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  // q, k, v were checked by the op, before its device guard.
  MMK_CHECK_ARG(causal >= 0 && causal <= 2, "causal", "expected 0 (none), 1 (upper-left) or 2 (lower-right), got ",
                causal);
  Prepared p;
  p.B = q.size(0), p.H = q.size(1), p.Lq = q.size(2), p.Lk = k.size(2), p.E = q.size(3), p.Ev = v.size(3);
  p.Hkv = k.size(1), p.G = p.Hkv > 0 ? p.H / p.Hkv : 1;
  p.causal = causal;
  p.scale = scale;
  check_attention_options(q, k, key_padding_mask, kv_lengths, attn_mask, dropout_p, dropout_seed);
  if (key_padding_mask.has_value()) p.kpm = key_padding_mask->contiguous();
  // A CPU kv_lengths is copied over; values are clamped to [0, Lk] on the device.
  if (kv_lengths.has_value()) p.lengths = kv_lengths->to(q.device(), at::kInt, /*non_blocking=*/false).contiguous();
  if (attn_mask.has_value()) {
    // A float mask is converted (in its own, unexpanded shape) to the compute type.
    const auto& m = *attn_mask;
    const at::Tensor mm = m.scalar_type() == at::kBool ? m : m.to(compute_type(q.scalar_type()));
    p.mask = mm.expand({p.B, p.H, p.Lq, p.Lk});
  }
  if (dropout_p > 0.0) {
    const auto& s = *dropout_seed;
    p.dropout = true;
    p.dropout_p = dropout_p;
    if (s.is_cuda()) {
      p.seed_dev = s.reshape({1}).contiguous();  // read by the kernels: no device-to-host sync
    } else {
      p.seed = static_cast<uint64_t>(s.item<int64_t>());
    }
  }
  return p;
}

// The fields of AttnParams that do not depend on q / k / v layouts. kv_range: device int32 (B, 2) or undefined.
void fill_common(AttnParams& a, const Prepared& p, const at::Tensor& kv_range) {
  a.B = static_cast<int32_t>(p.B), a.H = static_cast<int32_t>(p.H);
  a.Lq = static_cast<int32_t>(p.Lq), a.Lk = static_cast<int32_t>(p.Lk);
  a.H_kv = static_cast<int32_t>(p.Hkv), a.causal = static_cast<int32_t>(p.causal);
  a.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  a.kv_range = kv_range.defined() ? kv_range.data_ptr<int32_t>() : nullptr;
  a.kpm = p.kpm.defined() ? reinterpret_cast<const uint8_t*>(p.kpm.const_data_ptr<bool>()) : nullptr;
  a.mask_kind = attn::kMaskNone;
  a.mask = nullptr;
  a.m_sb = a.m_sh = a.m_sl = a.m_sk = 0;
  if (p.mask.defined()) {
    a.mask_kind = p.mask.scalar_type() == at::kBool ? attn::kMaskBool : attn::kMaskFloat;
    a.mask = p.mask.const_data_ptr();
    a.m_sb = p.mask.stride(0), a.m_sh = p.mask.stride(1), a.m_sl = p.mask.stride(2), a.m_sk = p.mask.stride(3);
  }
  set_dropout_fields(a, p.dropout ? p.dropout_p : 0.0, p.seed,
                     p.seed_dev.defined() ? p.seed_dev.const_data_ptr<int64_t>() : nullptr);
}

// The visible key range per batch, computed on the device from kv_lengths / key_padding_mask.
at::Tensor key_ranges(const Prepared& p, const at::Tensor& like, cudaStream_t stream) {
  if (!p.kpm.defined() && !p.lengths.defined()) return {};
  at::Tensor r = at::empty({p.B, 2}, like.options().dtype(at::kInt));
  if (p.B > 0) {
    attn::launch_key_ranges(p.lengths.defined() ? p.lengths.const_data_ptr<int32_t>() : nullptr,
                            p.kpm.defined() ? reinterpret_cast<const uint8_t*>(p.kpm.const_data_ptr<bool>()) : nullptr,
                            static_cast<int32_t>(p.B), static_cast<int32_t>(p.Lk), r.data_ptr<int32_t>(), stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return r;
}

// ------------------------------------------------------------------------------------------ path choice

void warn_fallback(Path path, const at::Tensor& q, const Prepared& p) {
  // One warning per reason, once per process.
  switch (path) {
    case Path::FallbackDtype:
      TORCH_WARN_ONCE("mmkernels.cross_modal_attention (CUDA): ", q.scalar_type(),
                      " inputs take the ATen fallback path (cuBLAS GEMMs over chunks of query rows), not the "
                      "tensor-core kernel, which covers float16 / bfloat16 only.");
      break;
    case Path::FallbackHeadDim:
      TORCH_WARN_ONCE("mmkernels.cross_modal_attention (CUDA): head dims E=", p.E, ", Ev=", p.Ev,
                      " take the ATen fallback path (cuBLAS GEMMs over chunks of query rows), not the tensor-core "
                      "kernel, which covers E = Ev in {32, 64, 128}.");
      break;
    case Path::FallbackArch:
      TORCH_WARN_ONCE("mmkernels.cross_modal_attention (CUDA): this device is older than sm_80; the ATen fallback "
                      "path (cuBLAS GEMMs over chunks of query rows) runs instead of the tensor-core kernel.");
      break;
    case Path::TensorCore:
      break;
  }
}

void set_qkv(AttnParams& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  a.q = q.const_data_ptr(), a.k = k.const_data_ptr(), a.v = v.const_data_ptr();
  a.q_sb = q.stride(0), a.q_sh = q.stride(1), a.q_sl = q.stride(2);
  a.k_sb = k.stride(0), a.k_sh = k.stride(1), a.k_sl = k.stride(2);
  a.v_sb = v.stride(0), a.v_sh = v.stride(1), a.v_sl = v.stride(2);
}

// ------------------------------------------------------------------------------------------ fallback

// Grouped-query heads: x (B, H, rows, D) as (B, H_kv, G * rows, D), the G query heads of a kv head
// stacked as the rows of one GEMM against it (a view where x is dense; no copy of K or V ever).
at::Tensor group_rows(const Prepared& p, const at::Tensor& x) {
  return x.reshape({p.B, p.Hkv, p.G * x.size(2), x.size(3)});
}
// The inverse, for a GEMM result (B, H_kv, G * rows, D), which is contiguous: (B, H, rows, D).
at::Tensor ungroup_rows(const Prepared& p, const at::Tensor& x) {
  return x.view({p.B, p.H, x.size(2) / p.G, x.size(3)});
}

// Scores of query rows [i0, i1) in the compute type, scaled and masked (-inf where not visible).
at::Tensor masked_scores(const Prepared& p, const at::Tensor& qf, const at::Tensor& kf, const at::Tensor& visible,
                         int64_t i0, int64_t i1) {
  at::Tensor s = ungroup_rows(p, at::matmul(group_rows(p, qf.slice(2, i0, i1)), kf.transpose(-1, -2))).mul_(p.scale);
  if (visible.defined()) s.masked_fill_(visible.logical_not(), -std::numeric_limits<double>::infinity());
  if (p.causal != 0) {
    // Query i sees key j iff j <= i + offset: the (rows, Lk) band, broadcast over batch and heads.
    const int64_t offset = p.causal == 2 ? p.Lk - p.Lq : 0;
    const auto opts = s.options().dtype(at::kLong);
    const at::Tensor last_seen = at::arange(i0, i1, opts).view({i1 - i0, 1}) + offset;
    const at::Tensor hidden = at::arange(p.Lk, opts).view({1, p.Lk}).gt(last_seen);
    s.masked_fill_(hidden, -std::numeric_limits<double>::infinity());
  }
  if (p.mask.defined()) {
    const at::Tensor m = p.mask.slice(2, i0, i1);
    if (m.scalar_type() == at::kBool) {
      s.masked_fill_(m.logical_not(), -std::numeric_limits<double>::infinity());
    } else {  // -inf stays -inf where the score is NaN: a masked key is not seen
      s.add_(m).masked_fill_(m.eq(-std::numeric_limits<double>::infinity()), -std::numeric_limits<double>::infinity());
    }
  }
  return s;
}

// (B, 1, 1, Lk) bool: keys left visible by kv_lengths and key_padding_mask; undefined if neither.
at::Tensor visible_keys(const Prepared& p, const at::Tensor& like) {
  if (!p.kpm.defined() && !p.lengths.defined()) return {};
  at::Tensor vis = at::ones({p.B, p.Lk}, like.options().dtype(at::kBool));
  if (p.kpm.defined()) vis = vis.logical_and(p.kpm.logical_not());
  if (p.lengths.defined()) {
    const at::Tensor keys = at::arange(p.Lk, like.options().dtype(at::kInt));
    vis = vis.logical_and(keys.view({1, p.Lk}).lt(p.lengths.view({p.B, 1})));
  }
  return vis.view({p.B, 1, 1, p.Lk});
}

// Dropout factors (inv_keep or 0) of rows [i0, i1), (B, H, i1 - i0, Lk) in the compute type.
at::Tensor dropout_factors(const Prepared& p, const at::Tensor& like, int64_t i0, int64_t i1, cudaStream_t stream) {
  at::Tensor z = at::empty({p.B, p.H, i1 - i0, p.Lk}, like.options());
  AttnParams a{};
  fill_common(a, p, at::Tensor());
  attn::launch_dropout_factors(a, static_cast<int32_t>(i0), static_cast<int32_t>(i1 - i0), z.data_ptr(),
                               like.scalar_type() == at::kDouble, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z.mul_(p.dropout_p < 1.0 ? 1.0 / (1.0 - p.dropout_p) : 0.0);
}

int64_t chunk_rows(const Prepared& p) {
  const int64_t per_row = std::max<int64_t>(1, p.B * p.H * p.Lk);
  return std::clamp<int64_t>((int64_t{1} << 26) / per_row, 1, std::max<int64_t>(p.Lq, 1));
}

std::tuple<at::Tensor, at::Tensor> forward_fallback(const Prepared& p, const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, cudaStream_t stream) {
  const auto ct = compute_type(q.scalar_type());
  const at::Tensor qf = q.to(ct), kf = k.to(ct), vf = v.to(ct);
  at::Tensor out = empty_attention_out(p.B, p.H, p.Lq, p.Ev, q.options().dtype(ct));
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(ct));
  const at::Tensor visible = visible_keys(p, q);
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t i0 = 0, step = chunk_rows(p); i0 < p.Lq; i0 += step) {
    const int64_t i1 = std::min(p.Lq, i0 + step);
    at::Tensor s = masked_scores(p, qf, kf, visible, i0, i1);
    at::Tensor m = std::get<0>(s.max(-1, /*keepdim=*/true));
    m.masked_fill_(m.eq(-inf), 0.0);  // a row with no visible key: exp(-inf - 0) = 0, never NaN
    at::Tensor e = s.sub_(m).exp_();
    at::Tensor l = e.sum(-1, /*keepdim=*/true);
    // l is 0 only where no key is visible; NaN among the visible scores makes m and l NaN, and
    // that row's out and lse NaN (its gradients then NaN as well), as in the reference.
    const at::Tensor seen = l.ne(0);
    lse.slice(2, i0, i1).copy_(at::where(seen, m + l.log(), inf).squeeze(-1));
    at::Tensor prob = e.div_(at::where(seen, l, 1.0));
    if (p.dropout) prob.mul_(dropout_factors(p, prob, i0, i1, stream));
    out.slice(2, i0, i1).copy_(ungroup_rows(p, at::matmul(group_rows(p, prob), vf)));
  }
  return {out.to(q.scalar_type()), ct == at::kDouble ? lse : lse.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_fallback(const Prepared& p, const at::Tensor& grad_out,
                                                                 const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v, const at::Tensor& out,
                                                                 const at::Tensor& lse, cudaStream_t stream) {
  const auto ct = compute_type(q.scalar_type());
  const at::Tensor qf = q.to(ct), kf = k.to(ct), vf = v.to(ct), dof = grad_out.to(ct);
  const at::Tensor lsef = lse.to(ct);
  const at::Tensor D = (dof * out.to(ct)).sum(-1);  // rowsum(dO * O): O already carries the dropout
  at::Tensor dq = empty_grad_like(q, ct);
  at::Tensor dk = empty_grad_like(k, ct).zero_();
  at::Tensor dv = empty_grad_like(v, ct).zero_();
  const at::Tensor visible = visible_keys(p, q);
  for (int64_t i0 = 0, step = chunk_rows(p); i0 < p.Lq; i0 += step) {
    const int64_t i1 = std::min(p.Lq, i0 + step);
    at::Tensor s = masked_scores(p, qf, kf, visible, i0, i1);
    // P from the saved lse: a row with lse = +inf (no visible key) gets exactly 0, a NaN row (lse =
    // NaN) NaN at its visible keys. Masked keys get P = 0 and dS = 0 whatever their row holds.
    const at::Tensor unseen = s.eq(-std::numeric_limits<double>::infinity());
    const at::Tensor prob = s.sub_(lsef.slice(2, i0, i1).unsqueeze(-1)).exp_().masked_fill_(unseen, 0);
    const at::Tensor dout_c = dof.slice(2, i0, i1);
    at::Tensor dp = ungroup_rows(p, at::matmul(group_rows(p, dout_c), vf.transpose(-1, -2)));
    at::Tensor pz = prob;
    if (p.dropout) {
      const at::Tensor z = dropout_factors(p, prob, i0, i1, stream);
      pz = prob * z;
      dp.mul_(z);
    }
    // dK, dV: the group's rows are the GEMMs' inner dim, so they sum over the group's query heads.
    dv.add_(at::matmul(group_rows(p, pz).transpose(-1, -2), group_rows(p, dout_c)));
    // Masked keys (and rows that see none): dS = 0 even where dP or D is NaN, as in the kernels.
    const at::Tensor ds = dp.sub_(D.slice(2, i0, i1).unsqueeze(-1)).mul_(prob).mul_(p.scale).masked_fill_(unseen, 0);
    const at::Tensor dsg = group_rows(p, ds);
    dq.slice(2, i0, i1).copy_(ungroup_rows(p, at::matmul(dsg, kf)));
    dk.add_(at::matmul(dsg.transpose(-1, -2), group_rows(p, qf.slice(2, i0, i1))));
  }
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

// ------------------------------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor> cross_modal_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask, double scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  check_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Path path = choose_path(q, p.E, p.Ev);
  if (p.B * p.H * p.Lq == 0 || p.Lk == 0) {
    // Nothing to attend to (or nobody asking): zeros, lse = +inf.
    const auto lse_t = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return {empty_attention_out(p.B, p.H, p.Lq, p.Ev, q.options()).zero_(),
            at::full({p.B, p.H, p.Lq}, std::numeric_limits<double>::infinity(), q.options().dtype(lse_t))};
  }
  if (path != Path::TensorCore) {
    warn_fallback(path, q, p);
    return forward_fallback(p, q, k, v, stream);
  }
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  at::Tensor out = empty_attention_out(p.B, p.H, p.Lq, p.E, q.options());
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  const at::Tensor range = key_ranges(p, q, stream);
  FwdParams fp{};
  fill_common(fp, p, range);
  set_qkv(fp, qc, kc, vc);
  fp.out = out.data_ptr();
  fp.o_sb = out.stride(0), fp.o_sh = out.stride(1), fp.o_sl = out.stride(2);
  fp.lse = lse.data_ptr<float>();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  // Decoding shapes (too few (b, h, query tile) blocks to fill the device, long keys): split the keys
  // over several blocks each, then merge their partial results by log-sum-exp (flash-decoding).
  const int64_t blocks = (p.Lq + 63) / 64 * p.B * p.H;
  const int splits =
      attn::choose_key_splits(blocks, p.Lk, at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount);
  at::Tensor out_accum, lse_accum;
  if (splits > 1) {
    out_accum = at::empty({splits, p.B, p.H, p.Lq, p.E}, q.options().dtype(at::kFloat));
    lse_accum = at::empty({splits, p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
    fp.num_splits = splits;
    fp.out_accum = out_accum.data_ptr<float>();
    fp.lse_accum = lse_accum.data_ptr<float>();
  }
  run_fwd(fp, p.E, bf16, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    attn::launch_combine_splits(out_accum.const_data_ptr<float>(), lse_accum.const_data_ptr<float>(), splits,
                                static_cast<int32_t>(p.B), static_cast<int32_t>(p.H), static_cast<int32_t>(p.Lq),
                                static_cast<int32_t>(p.E), out.data_ptr(), out.stride(0), out.stride(1), out.stride(2),
                                lse.data_ptr<float>(), bf16, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask, double scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  check_inputs(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const Prepared p = prepare(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal);
  MMK_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({p.B, p.H, p.Lq, p.Ev}), "grad_out", "expected shape (", p.B,
                ", ", p.H, ", ", p.Lq, ", ", p.Ev, "), got ", grad_out.sizes());
  check_same_device_dtype(grad_out, q, "grad_out");
  MMK_CHECK_ARG(out.sizes() == grad_out.sizes(), "out", "expected shape ", grad_out.sizes(), ", got ", out.sizes());
  check_same_device_dtype(out, q, "out");
  MMK_CHECK_ARG(lse.sizes() == at::IntArrayRef({p.B, p.H, p.Lq}), "lse", "expected shape (", p.B, ", ", p.H, ", ",
                p.Lq, "), got ", lse.sizes());
  MMK_CHECK_ARG(lse.device() == q.device(), "lse", "expected device ", q.device(), ", got ", lse.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const Path path = choose_path(q, p.E, p.Ev);
  if (p.B * p.H * p.Lq == 0 || p.Lk == 0) {
    return {empty_grad_like(q, q.scalar_type()).zero_(), empty_grad_like(k, k.scalar_type()).zero_(),
            empty_grad_like(v, v.scalar_type()).zero_()};
  }
  if (path != Path::TensorCore) {
    warn_fallback(path, q, p);
    return backward_fallback(p, grad_out, q, k, v, out, lse, stream);
  }
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  const at::Tensor doc = kernel_layout(grad_out);
  const at::Tensor oc = kernel_layout(out);
  const at::Tensor lsec = lse.to(at::kFloat).contiguous();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  at::Tensor dsum = at::empty({p.B, p.H, p.Lq}, q.options().dtype(at::kFloat));
  attn::launch_dot_rows(doc.const_data_ptr(), doc.stride(0), doc.stride(1), doc.stride(2), oc.const_data_ptr(),
                        oc.stride(0), oc.stride(1), oc.stride(2), static_cast<int32_t>(p.B), static_cast<int32_t>(p.H), static_cast<int32_t>(p.Lq),
                        static_cast<int32_t>(p.E), bf16, dsum.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // dq and its float32 accumulator share one dense layout (dq's), which finish_dq relies on.
  at::Tensor dq = empty_grad_like(q, q.scalar_type());
  at::Tensor dq_accum = at::zeros_like(dq, dq.options().dtype(at::kFloat));
  at::Tensor dk = empty_grad_like(k, k.scalar_type());
  at::Tensor dv = empty_grad_like(v, v.scalar_type());
  const at::Tensor range = key_ranges(p, q, stream);
  BwdParams bp{};
  fill_common(bp, p, range);
  set_qkv(bp, qc, kc, vc);
  bp.dout = doc.const_data_ptr();
  bp.do_sb = doc.stride(0), bp.do_sh = doc.stride(1), bp.do_sl = doc.stride(2);
  bp.lse = lsec.const_data_ptr<float>();
  bp.dsum = dsum.const_data_ptr<float>();
  bp.dq_accum = dq_accum.data_ptr<float>();
  bp.dq_sb = dq_accum.stride(0), bp.dq_sh = dq_accum.stride(1), bp.dq_sl = dq_accum.stride(2);
  bp.dk = dk.data_ptr();
  bp.dk_sb = dk.stride(0), bp.dk_sh = dk.stride(1), bp.dk_sl = dk.stride(2);
  bp.dv = dv.data_ptr();
  bp.dv_sb = dv.stride(0), bp.dv_sh = dv.stride(1), bp.dv_sl = dv.stride(2);
  run_bwd(bp, p.E, bf16, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_INTERNAL_ASSERT(dq.is_non_overlapping_and_dense() && dq.strides() == dq_accum.strides());
  attn::launch_finish_dq(dq_accum.const_data_ptr<float>(), static_cast<float>(p.scale), dq.data_ptr(),
                         dq.numel(), bf16, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("cross_modal_attention", &cross_modal_attention_cuda);
  m.impl("cross_modal_attention_backward", &cross_modal_attention_backward_cuda);
}

}  // namespace mmkernels::cuda
