// CPU kernels of cross_modal_attention_varlen: packed variable-length sequences (FlashAttention-2's
// varlen layout). Each sequence runs the dense CPU kernel on strided views of the packed tensors
// ((1, H, L_b, E) views of its rows: no copy in, no padding), whose tasks are that sequence's
// (head, query block) pairs; its results are copied into the packed outputs (O(total * H * E), small
// next to the attention). Dropout: each sequence's seed is the call's seed mixed with its index, so
// sequences draw independent masks.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace mmkernels::cpu {
namespace {

// Sequence b's rows [off[b], off[b + 1]) of a prefix-sum tensor, checked against the packed total and
// the stated maximum length.
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len,
                                     const char* max_name) {
  MMK_CHECK_ARG(cu.scalar_type() == at::kInt, name, "expected an int32 tensor, got ", cu.scalar_type());
  MMK_CHECK_ARG(cu.dim() == 1 && cu.size(0) >= 1, name, "expected a 1-D (batch + 1,) tensor, got shape ", cu.sizes());
  MMK_CHECK_ARG(cu.device().is_cpu(), name, "expected a CPU tensor, got ", cu.device());
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  std::vector<int64_t> off(p, p + c.numel());
  MMK_CHECK_ARG(off[0] == 0, name, "expected prefix sums starting at 0, got ", off[0]);
  for (size_t b = 0; b + 1 < off.size(); ++b) {
    MMK_CHECK_ARG(off[b + 1] >= off[b], name, "expected non-decreasing prefix sums, got ", off[b], " then ",
                  off[b + 1], " at ", b);
    MMK_CHECK_ARG(off[b + 1] - off[b] <= max_len, max_name, "sequence ", b, " has length ", off[b + 1] - off[b],
                  ", more than ", max_name, " = ", max_len);
  }
  MMK_CHECK_ARG(off.back() == total, name, "expected its last value to be ", total,
                " (the packed length of the tensors), got ", off.back());
  return off;
}

struct Packed {
  std::vector<int64_t> q_off, k_off;
  int64_t H = 0, E = 0, Ev = 0;
};

Packed check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                    const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  MMK_CHECK_ARG(q.dim() == 3, "q", "expected a 3-D (total_q, H, E) tensor, got shape ", q.sizes());
  MMK_CHECK_ARG(k.dim() == 3, "k", "expected a 3-D (total_k, H_kv, E) tensor, got shape ", k.sizes());
  MMK_CHECK_ARG(v.dim() == 3, "v", "expected a 3-D (total_k, H_kv, Ev) tensor, got shape ", v.sizes());
  MMK_CHECK_ARG(v.size(0) == k.size(0), "v", "expected ", k.size(0), " rows (total_k of k), got ", v.size(0));
  Packed s;
  s.q_off = read_cu_seqlens(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
  s.k_off = read_cu_seqlens(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
  MMK_CHECK_ARG(s.k_off.size() == s.q_off.size(), "cu_seqlens_k", "expected ", s.q_off.size(),
                " entries (those of cu_seqlens_q), got ", s.k_off.size());
  s.H = q.size(1), s.E = q.size(2), s.Ev = v.size(2);
  return s;
}

// Sequence rows [off, off + n) of a packed (total, heads, D) tensor as a (1, heads, n, D) view.
at::Tensor seq_view(const at::Tensor& x, int64_t off, int64_t n) {
  return x.narrow(0, off, n).permute({1, 0, 2}).unsqueeze(0);
}

// An independent dropout seed per sequence (an odd multiplier keeps distinct indices distinct).
std::optional<at::Tensor> seq_seed(const std::optional<at::Tensor>& seed, double dropout_p, size_t b) {
  if (dropout_p <= 0.0 || !seed.has_value()) return seed;
  const uint64_t s = static_cast<uint64_t>(seed->to(at::kCPU).item<int64_t>()) + (b + 1) * 0x9E3779B97F4A7C15ull;
  return at::scalar_tensor(static_cast<int64_t>(s >> 2), at::TensorOptions().dtype(at::kLong));
}

using DenseForward = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, double,
    const std::optional<at::Tensor>&, int64_t);
using DenseBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
    double, const std::optional<at::Tensor>&, int64_t);

std::tuple<at::Tensor, at::Tensor> cross_modal_attention_varlen_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  const Packed s = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  static const auto dense = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("mmkernels::cross_modal_attention", "")
                                .typed<DenseForward>();
  const auto lse_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({q.size(0), s.H, s.Ev}, q.options());
  at::Tensor lse = at::empty({s.H, q.size(0)}, q.options().dtype(lse_type));
  for (size_t b = 0; b + 1 < s.q_off.size(); ++b) {
    const int64_t q0 = s.q_off[b], nq = s.q_off[b + 1] - q0, k0 = s.k_off[b], nk = s.k_off[b + 1] - k0;
    if (nq == 0) continue;
    auto [ob, lb] = dense.call(seq_view(q, q0, nq), seq_view(k, k0, nk), seq_view(v, k0, nk), std::nullopt,
                               std::nullopt, std::nullopt, scale, dropout_p, seq_seed(dropout_seed, dropout_p, b),
                               causal);
    out.narrow(0, q0, nq).copy_(ob[0].permute({1, 0, 2}));
    lse.narrow(1, q0, nq).copy_(lb[0]);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_varlen_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    int64_t causal) {
  const Packed s = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  MMK_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({q.size(0), s.H, s.Ev}), "grad_out", "expected shape (",
                q.size(0), ", ", s.H, ", ", s.Ev, "), got ", grad_out.sizes());
  MMK_CHECK_ARG(out.sizes() == grad_out.sizes(), "out", "expected shape ", grad_out.sizes(), ", got ", out.sizes());
  MMK_CHECK_ARG(lse.sizes() == at::IntArrayRef({s.H, q.size(0)}), "lse", "expected shape (", s.H, ", ", q.size(0),
                "), got ", lse.sizes());
  static const auto dense = c10::Dispatcher::singleton()
                                .findSchemaOrThrow("mmkernels::cross_modal_attention_backward", "")
                                .typed<DenseBackward>();
  at::Tensor dq = at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::zeros_like(k, at::MemoryFormat::Contiguous);  // keys of a sequence with no query: 0
  at::Tensor dv = at::zeros_like(v, at::MemoryFormat::Contiguous);
  for (size_t b = 0; b + 1 < s.q_off.size(); ++b) {
    const int64_t q0 = s.q_off[b], nq = s.q_off[b + 1] - q0, k0 = s.k_off[b], nk = s.k_off[b + 1] - k0;
    if (nq == 0) continue;
    auto [dqb, dkb, dvb] =
        dense.call(seq_view(grad_out, q0, nq), seq_view(q, q0, nq), seq_view(k, k0, nk), seq_view(v, k0, nk),
                   seq_view(out, q0, nq), lse.narrow(1, q0, nq).unsqueeze(0), std::nullopt, std::nullopt,
                   std::nullopt, scale, dropout_p, seq_seed(dropout_seed, dropout_p, b), causal);
    dq.narrow(0, q0, nq).copy_(dqb[0].permute({1, 0, 2}));
    dk.narrow(0, k0, nk).copy_(dkb[0].permute({1, 0, 2}));
    dv.narrow(0, k0, nk).copy_(dvb[0].permute({1, 0, 2}));
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("cross_modal_attention_varlen", &cross_modal_attention_varlen_cpu);
  m.impl("cross_modal_attention_varlen_backward", &cross_modal_attention_varlen_backward_cpu);
}

}  // namespace mmkernels::cpu
