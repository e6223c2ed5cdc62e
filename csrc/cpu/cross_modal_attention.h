// The dense CPU attention kernel (cross_modal_attention.cpp) as C++ functions, for callers that
// schedule many problems themselves (cross_modal_attention_varlen.cpp runs a packed batch's short
// sequences side by side, one per thread, and its long ones alone). No dispatcher, no checks here:
// the callers check their own arguments.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "dropout_hash.h"

namespace mmkernels::cpu {

enum class MaskKind { None, Bool, Float };

struct Problem {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, E = 0, Ev = 0;
  // Grouped-query attention: Hkv kv heads, each read by G = H / Hkv consecutive query heads.
  int64_t Hkv = 0, G = 1;
  double scale = 1.0;
  // Causal flag: query i sees keys j < i + 1 + causal_offset (0 upper-left, Lk - Lq lower-right).
  bool causal = false;
  int64_t causal_offset = 0;
  // Per batch: the key range [kbeg, kend) that kv_lengths and key_padding_mask leave visible.
  std::vector<int64_t> kbeg, kend;
  // key_padding_mask as (B, Lk) additive bias (0 / -inf) in the compute type, or undefined.
  at::Tensor kpm_bias;
  // attn_mask as a 4-D (B, H, Lq, Lk) view (stride 0 where broadcast), in bool or compute type.
  MaskKind mask_kind = MaskKind::None;
  at::Tensor mask;
  // Dropout. head0: where the problem is one kv head's group of a larger one (B = 1), the index of
  // its first query head there, so that its rows draw the larger problem's mask.
  bool dropout = false;
  int64_t head0 = 0;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double inv_keep = 1.0;

  // The end of the keys query block [i0, i0 + nq) of batch b may see: the batch's visible range cut
  // at the causal diagonal of its last row (never below kbeg: an empty range then).
  int64_t key_limit(int64_t b, int64_t i0, int64_t nq) const {
    if (!causal) return kend[b];
    return std::clamp(i0 + nq + causal_offset, kbeg[b], kend[b]);
  }
  // How many of the nk keys from j0 query row i sees under the causal flag.
  int64_t causal_cols(int64_t i, int64_t j0, int64_t nk) const {
    return causal ? std::clamp<int64_t>(i + 1 + causal_offset - j0, 0, nk) : nk;
  }
  // The op's causal mode (0 none, 1 upper-left, 2 lower-right, checked by the caller) as the flag.
  void set_causal(int64_t mode) {
    causal = mode != 0;
    causal_offset = mode == 2 ? Lk - Lq : 0;
  }
  // Dropout with probability dropout_p (> 0) from the seed the rows' masks derive from.
  void set_dropout(double dropout_p, uint64_t mask_seed) {
    dropout = true;
    seed = mask_seed;
    threshold = dropout_threshold(dropout_p);
    inv_keep = dropout_p >= 1.0 ? 0.0 : 1.0 / (1.0 - dropout_p);
  }
};

// The threads one kernel call may spread its tasks over: 1 inside a parallel region, where a nested
// at::parallel_for runs inline on the calling thread.
inline int64_t task_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// Calls fn(task, thread) for task in [0, n) with dynamic scheduling: threads take tasks from a
// shared counter, so tasks of uneven cost (kv_lengths, masks, sequences of a packed batch) still
// balance. Inside a parallel region it runs inline on the calling thread.
template <typename F>
void parallel_tasks(int64_t n, F&& fn) {
  std::atomic<int64_t> next{0};
  const int64_t nthreads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(t, tid);
  });
}

// Rows BLAS can address: x itself when its last dim is contiguous with a row stride of at least the
// row length, else a contiguous copy.
at::Tensor last_dim_contiguous(const at::Tensor& x);
// Whether the bfloat16 forward reads q, k, v as they are (bfloat16 GEMMs on oneDNN's brgemm, K in
// VNNI pairs): an even head dim, and a CPU whose brgemm takes bfloat16 pairs (torch 2.13: AMX only).
// Otherwise bfloat16 is converted to float32 once and runs the float32 kernel.
bool bf16_in_place(int64_t head_dim);
// x (last dim contiguous) readable as pairs of bfloat16: x itself when 4-byte aligned with even
// strides, else a contiguous copy.
at::Tensor bf16_pairs_aligned(const at::Tensor& x);

// Forward of problem p into out (B, H, Lq, Ev) and lse (B, H, Lq), both last dim contiguous (any
// other strides). q, k, v last dim contiguous, all of one dtype: bfloat16 (E even, k through
// bf16_pairs_aligned) or float16 with out in that dtype and lse float; float or double with out and
// lse in it.
void attention_forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out, at::Tensor& lse);

// D = rowsum(dout * out) (B, H, Lq) contiguous, in the compute type (float or double) of its inputs.
at::Tensor attention_row_dot(const at::Tensor& dout, const at::Tensor& out, const Problem& p);

// Backward of problem p: q, k, v, dout (last dim contiguous), lse and D ((B, H, Lq), last dim
// contiguous), all in the compute type. Writes every element of dq, dk, dv (last dim contiguous,
// any other strides), splitting the work over task_threads() threads.
void attention_backward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& D, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv);

}  // namespace mmkernels::cpu
