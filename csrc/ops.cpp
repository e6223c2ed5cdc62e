// Every mmkernels operator schema, and nothing else. Kernels register per backend in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd are registered from Python (mmkernels/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(mmkernels, m) {
  // act(cat(inputs, -1) @ weight.T + bias) without building the concatenation. Returns
  // (out, preact): preact is the pre-activation, kept for backward only when the activation's
  // derivative needs it (gelu, gelu_tanh, silu), else an empty tensor.
  m.def("fused_concat_linear(Tensor[] inputs, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)");
  // Gradients of the above. Each *_needs_grad flag skips a gradient (returned as an empty tensor).
  m.def(
      "fused_concat_linear_backward(Tensor grad_out, Tensor[] inputs, Tensor weight, Tensor out, Tensor preact, "
      "str activation, bool[] inputs_need_grad, bool weight_needs_grad, bool bias_needs_grad) "
      "-> (Tensor[], Tensor, Tensor)");

  // Attention over (B, H, Lq, E) queries and (B, H, Lk, E|Ev) keys / values, flash-style (the score
  // matrix is never built). key_padding_mask: bool (B, Lk), True = ignore; kv_lengths: int (B,);
  // attn_mask: bool (True = may attend) or additive float, broadcastable to (B, H, Lq, Lk).
  // dropout_seed: a one-element int64 tensor (drawn from torch's generator by the Python wrapper)
  // from which the kernel derives every dropout decision, so backward needs no stored mask.
  // causal: 0 none, 1 upper-left (query i sees keys j <= i), 2 lower-right (j <= i + Lk - Lq), a flag
  // combined with every mask above, never materialised. k and v may have H_kv heads dividing H
  // (grouped-query attention: query head h reads kv head h / (H / H_kv)).
  // Returns (out (B, H, Lq, Ev), lse (B, H, Lq) in the accumulation type; +inf for a row that sees no key).
  m.def(
      "cross_modal_attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? kv_lengths, "
      "Tensor? attn_mask, float scale, float dropout_p, Tensor? dropout_seed, int causal=0) -> (Tensor, Tensor)");
  // Gradients (dq, dk, dv) of the above from grad_out, recomputing the scores block by block.
  m.def(
      "cross_modal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? kv_lengths, Tensor? attn_mask, float scale, float dropout_p, "
      "Tensor? dropout_seed, int causal=0) -> (Tensor, Tensor, Tensor)");

  // The same attention over packed variable-length sequences (FlashAttention-2's varlen layout): q
  // (total_q, H, E), k / v (total_k, H_kv, E|Ev), cu_seqlens_q / cu_seqlens_k int32 (batch + 1,) prefix
  // sums from 0 (on the CPU), every sequence no longer than max_seqlen_q / max_seqlen_k; causal per
  // sequence. Returns (out (total_q, H, Ev), lse (H, total_q)).
  m.def(
      "cross_modal_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, float dropout_p, Tensor? dropout_seed, int causal=0) "
      "-> (Tensor, Tensor)");
  m.def(
      "cross_modal_attention_varlen_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, float dropout_p, "
      "Tensor? dropout_seed, int causal=0) -> (Tensor, Tensor, Tensor)");
}

// Fusion-layer ops (mmkernels.nn.LowRankFusion).
TORCH_LIBRARY_FRAGMENT(mmkernels, m) {
  // LMF's product of projections: bias + sum_k rank_weight[k] * prod_m ([inputs[m], 1] @ factors[m][k]),
  // factors[m]: (rank, D_m + 1, N). Backward recomputes the projections rather than saving them.
  m.def("low_rank_fusion(Tensor[] inputs, Tensor[] factors, Tensor rank_weight, Tensor? bias) -> Tensor");
  m.def(
      "low_rank_fusion_backward(Tensor grad_out, Tensor[] inputs, Tensor[] factors, Tensor rank_weight, "
      "bool[] inputs_need_grad, bool[] factors_need_grad, bool rank_weight_needs_grad, bool bias_needs_grad) "
      "-> (Tensor[], Tensor[], Tensor, Tensor)");
}
