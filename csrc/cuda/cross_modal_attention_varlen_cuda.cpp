// CUDA kernels of cross_modal_attention_varlen (host side): packed variable-length sequences
// (FlashAttention-2's varlen layout) on the dense op's tensor-core kernels. The kernels take
// cu_seqlens_q / _k (AttnParams): the grid covers B sequences x the longest one, a block reads its
// sequence's first rows and lengths and leaves at once when its tile lies past that sequence's end,
// so no padding is computed and nothing is copied; lse is (H, total_q), as on the CPU. Dropout draws
// the CPU kernel's mask element for element (a seed per sequence: varlen_sequence_seed).
//
// The prefix sums stay on the device: their values (0 first, non-decreasing, ending at total,
// lengths within max_seqlen_*) are checked by the Python wrapper in eager mode; checking them here
// would cost a device-to-host sync per call. Inputs the kernels do not cover (float32 / float64,
// head dims other than E = Ev in {32, 64, 128}, pre-sm_80 devices) run the dense op per sequence
// (its own fallback), after one warning; that path reads the prefix sums on the host.
//
// UNVERIFIED ON A GPU: compiled for sm_80 / sm_90, not yet run; the emulator tests
// (tests/emu/test_emu_attention_varlen.py) run the kernels on the CPU. GPU tests:
// tests/test_cuda_cross_modal_attention_varlen.py.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "attention/attn_params.h"
#include "checks.h"
#include "cross_modal_attention_cuda.h"
#include "dropout_hash.h"

namespace mmkernels::cuda {
namespace {

struct Varlen {
  int64_t batch = 0, total_q = 0, total_k = 0, H = 0, Hkv = 0, E = 0, Ev = 0;
};

Varlen check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                    const at::Tensor& cu_k, int64_t max_q, int64_t max_k, double dropout_p,
                    const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  check_device_and_dtypes(q, "q", c10::DeviceType::CUDA, {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble},
                          "float16, bfloat16, float32 or float64 on CUDA");
  check_varlen_shapes(q, k, v, cu_q, cu_k);
  MMK_CHECK_ARG(cu_q.device() == q.device(), "cu_seqlens_q", "expected device ", q.device(), " (that of q), got ",
                cu_q.device());
  MMK_CHECK_ARG(cu_k.device() == q.device(), "cu_seqlens_k", "expected device ", q.device(), " (that of q), got ",
                cu_k.device());
  // The dense checks on (1, heads, total, D) views: dtypes, devices, grouped-query heads, head dims, dropout.
  const at::Tensor q4 = q.unsqueeze(0).transpose(1, 2), k4 = k.unsqueeze(0).transpose(1, 2);
  check_attention_qkv(q4, k4, v.unsqueeze(0).transpose(1, 2));
  check_attention_options(q4, k4, std::nullopt, std::nullopt, std::nullopt, dropout_p, dropout_seed);
  check_causal_mode(causal);
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  MMK_CHECK_ARG(max_q >= 0 && max_q < kMax, "max_seqlen_q", "expected a value in [0, 2^31 - 1), got ", max_q);
  MMK_CHECK_ARG(max_k >= 0 && max_k < kMax, "max_seqlen_k", "expected a value in [0, 2^31 - 1), got ", max_k);
  MMK_CHECK_ARG(q.size(0) < kMax && k.size(0) < kMax && cu_q.size(0) < kMax, "q",
                "sizes beyond int32 range are not supported, got q ", q.sizes(), " and k ", k.sizes());
  Varlen s;
  s.batch = cu_q.size(0) - 1, s.total_q = q.size(0), s.total_k = k.size(0);
  s.H = q.size(1), s.Hkv = k.size(1), s.E = q.size(2), s.Ev = v.size(2);
  return s;
}

bool use_tensor_cores(const at::Tensor& q, const Varlen& s) {
  if (choose_path(q, s.E, s.Ev) == Path::TensorCore) return true;
  TORCH_WARN_ONCE("mmkernels.cross_modal_attention_varlen (CUDA): ", q.scalar_type(), " with head dims E=", s.E,
                  ", Ev=", s.Ev, " runs the dense op's fallback once per sequence; the packed tensor-core kernels "
                  "cover float16 / bfloat16 with E = Ev in {32, 64, 128} on sm_80 or newer.");
  return false;
}

// The fields of every packed launch: sequences, lengths, strides (batch stride = row stride, see
// AttnParams), dropout.
void fill_packed(attn::AttnParams& a, const Varlen& s, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                 int64_t max_k, double scale, double dropout_p, const at::Tensor& seed_dev, uint64_t seed,
                 int64_t causal, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  a.q = q.const_data_ptr(), a.k = k.const_data_ptr(), a.v = v.const_data_ptr();
  a.q_sb = a.q_sl = q.stride(0), a.q_sh = q.stride(1);
  a.k_sb = a.k_sl = k.stride(0), a.k_sh = k.stride(1);
  a.v_sb = a.v_sl = v.stride(0), a.v_sh = v.stride(1);
  a.B = static_cast<int32_t>(s.batch), a.H = static_cast<int32_t>(s.H), a.H_kv = static_cast<int32_t>(s.Hkv);
  a.Lq = static_cast<int32_t>(max_q), a.Lk = static_cast<int32_t>(max_k);
  a.causal = static_cast<int32_t>(causal);
  a.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  a.kv_range = nullptr, a.kpm = nullptr, a.mask_kind = attn::kMaskNone, a.mask = nullptr;
  a.m_sb = a.m_sh = a.m_sl = a.m_sk = 0;
  set_dropout_fields(a, dropout_p, seed, seed_dev.defined() ? seed_dev.const_data_ptr<int64_t>() : nullptr);
  a.cu_seqlens_q = cu_q.const_data_ptr<int32_t>(), a.cu_seqlens_k = cu_k.const_data_ptr<int32_t>();
  a.lse_sh = s.total_q;
}

// The call's dropout seed: on the device as it is (the kernels read it there), else its value.
struct Seed {
  at::Tensor dev;
  uint64_t value = 0;
};
Seed read_seed(double dropout_p, const std::optional<at::Tensor>& dropout_seed, const at::Tensor& q) {
  Seed r;
  if (dropout_p <= 0.0) return r;
  if (dropout_seed->is_cuda()) {
    r.dev = dropout_seed->reshape({1}).to(q.device()).contiguous();
  } else {
    r.value = static_cast<uint64_t>(dropout_seed->item<int64_t>());
  }
  return r;
}

// ------------------------------------------------------------------------------------------ fallback

// Sequence b's rows of a packed (total, heads, D) tensor as the dense op's (1, heads, n, D).
at::Tensor seq_view(const at::Tensor& x, int64_t off, int64_t n) { return x.narrow(0, off, n).transpose(0, 1).unsqueeze(0); }

// The dense op's arguments for sequence b: its own dropout seed, as a CPU tensor.
std::optional<at::Tensor> seq_seed(double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t b) {
  if (dropout_p <= 0.0) return std::nullopt;
  const auto seed = static_cast<uint64_t>(dropout_seed->to(at::kCPU).item<int64_t>());
  return at::scalar_tensor(static_cast<int64_t>(varlen_sequence_seed(seed, b)), at::kLong);
}

std::vector<int64_t> host_offsets(const at::Tensor& cu) {
  const at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + c.numel());
}

std::tuple<at::Tensor, at::Tensor> forward_per_sequence(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_q, const at::Tensor& cu_k, double scale,
                                                        double dropout_p, const std::optional<at::Tensor>& seed,
                                                        int64_t causal, const Varlen& s) {
  const auto qo = host_offsets(cu_q), ko = host_offsets(cu_k);
  at::Tensor out = at::zeros({s.total_q, s.H, s.Ev}, q.options());
  at::Tensor lse = at::full({s.H, s.total_q}, std::numeric_limits<double>::infinity(),
                            q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t nq = qo[b + 1] - qo[b], nk = ko[b + 1] - ko[b];
    if (nq == 0) continue;
    auto [o, l] = cross_modal_attention_cuda(seq_view(q, qo[b], nq), seq_view(k, ko[b], nk), seq_view(v, ko[b], nk),
                                             std::nullopt, std::nullopt, std::nullopt, scale, dropout_p,
                                             seq_seed(dropout_p, seed, b), causal);
    seq_view(out, qo[b], nq).copy_(o);
    lse.narrow(1, qo[b], nq).copy_(l[0]);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_per_sequence(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, int64_t causal, const Varlen& s) {
  const auto qo = host_offsets(cu_q), ko = host_offsets(cu_k);
  at::Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t nq = qo[b + 1] - qo[b], nk = ko[b + 1] - ko[b];
    if (nq == 0) continue;  // its keys: zero gradient
    auto [g_q, g_k, g_v] = cross_modal_attention_backward_cuda(
        seq_view(grad_out, qo[b], nq), seq_view(q, qo[b], nq), seq_view(k, ko[b], nk), seq_view(v, ko[b], nk),
        seq_view(out, qo[b], nq), lse.narrow(1, qo[b], nq).unsqueeze(0), std::nullopt, std::nullopt, std::nullopt,
        scale, dropout_p, seq_seed(dropout_p, seed, b), causal);
    seq_view(dq, qo[b], nq).copy_(g_q);
    seq_view(dk, ko[b], nk).copy_(g_k);
    seq_view(dv, ko[b], nk).copy_(g_v);
  }
  return {dq, dk, dv};
}

// ------------------------------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor> cross_modal_attention_varlen_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  const Varlen s = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                dropout_seed, causal);
  const c10::cuda::CUDAGuard guard(q.device());
  if (!use_tensor_cores(q, s)) {
    return forward_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, dropout_p, dropout_seed, causal, s);
  }
  at::Tensor out = at::empty({s.total_q, s.H, s.Ev}, q.options());
  at::Tensor lse = at::empty({s.H, s.total_q}, q.options().dtype(at::kFloat));
  if (s.total_q == 0 || s.H == 0 || s.batch == 0 || max_seqlen_q == 0) return {out, lse};
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const Seed seed = read_seed(dropout_p, dropout_seed, q);
  attn::FwdParams fp{};
  fill_packed(fp, s, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, seed.dev, seed.value, causal, qc, kc,
              vc);
  fp.out = out.data_ptr();
  fp.o_sb = fp.o_sl = out.stride(0), fp.o_sh = out.stride(1);
  fp.lse = lse.data_ptr<float>();
  run_fwd(fp, s.E, q.scalar_type() == at::kBFloat16, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_varlen_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    int64_t causal) {
  const Varlen s = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                dropout_seed, causal);
  MMK_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({s.total_q, s.H, s.Ev}), "grad_out", "expected shape (",
                s.total_q, ", ", s.H, ", ", s.Ev, "), got ", grad_out.sizes());
  check_same_device_dtype(grad_out, q, "grad_out");
  MMK_CHECK_ARG(out.sizes() == grad_out.sizes(), "out", "expected shape ", grad_out.sizes(), ", got ", out.sizes());
  check_same_device_dtype(out, q, "out");
  MMK_CHECK_ARG(lse.sizes() == at::IntArrayRef({s.H, s.total_q}), "lse", "expected shape (", s.H, ", ", s.total_q,
                "), got ", lse.sizes());
  MMK_CHECK_ARG(lse.device() == q.device(), "lse", "expected device ", q.device(), ", got ", lse.device());
  const c10::cuda::CUDAGuard guard(q.device());
  if (!use_tensor_cores(q, s)) {
    return backward_per_sequence(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, dropout_p,
                                 dropout_seed, causal, s);
  }
  // Keys of sequences with no query get zeros from the kernel; with no key or no query at all, no launch.
  if (s.total_q == 0 || s.total_k == 0 || s.H == 0 || s.batch == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options())};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool bf16 = q.scalar_type() == at::kBFloat16;
  const at::Tensor qc = kernel_layout(q), kc = kernel_layout(k), vc = kernel_layout(v);
  const at::Tensor doc = kernel_layout(grad_out), oc = kernel_layout(out);
  const at::Tensor lsec = lse.to(at::kFloat).contiguous();
  const at::Tensor cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  // D = rowsum(dO * O) in lse's (H, total_q) layout: the packed rows as one (1, H, total_q) problem.
  at::Tensor dsum = at::empty({s.H, s.total_q}, q.options().dtype(at::kFloat));
  attn::launch_dot_rows(doc.const_data_ptr(), 0, doc.stride(1), doc.stride(0), oc.const_data_ptr(), 0, oc.stride(1),
                        oc.stride(0), 1, static_cast<int32_t>(s.H), static_cast<int32_t>(s.total_q),
                        static_cast<int32_t>(s.E), bf16, dsum.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor dq = at::empty(q.sizes(), q.options());  // contiguous, as its float32 accumulator
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  const Seed seed = read_seed(dropout_p, dropout_seed, q);
  attn::BwdParams bp{};
  fill_packed(bp, s, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, dropout_p, seed.dev, seed.value, causal, qc, kc,
              vc);
  bp.dout = doc.const_data_ptr();
  bp.do_sb = bp.do_sl = doc.stride(0), bp.do_sh = doc.stride(1);
  bp.lse = lsec.const_data_ptr<float>();
  bp.dsum = dsum.const_data_ptr<float>();
  bp.dq_accum = dq_accum.data_ptr<float>();
  bp.dq_sb = bp.dq_sl = dq_accum.stride(0), bp.dq_sh = dq_accum.stride(1);
  bp.dk = dk.data_ptr();
  bp.dk_sb = bp.dk_sl = dk.stride(0), bp.dk_sh = dk.stride(1);
  bp.dv = dv.data_ptr();
  bp.dv_sb = bp.dv_sl = dv.stride(0), bp.dv_sh = dv.stride(1);
  run_bwd(bp, s.E, bf16, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attn::launch_finish_dq(dq_accum.const_data_ptr<float>(), static_cast<float>(scale), dq.data_ptr(), dq.numel(), bf16,
                         stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CUDA, m) {
  m.impl("cross_modal_attention_varlen", &cross_modal_attention_varlen_cuda);
  m.impl("cross_modal_attention_varlen_backward", &cross_modal_attention_varlen_backward_cuda);
}

}  // namespace mmkernels::cuda
