// Plain-data parameter blocks and launcher declarations shared by the host side of the CUDA
// cross_modal_attention (cross_modal_attention_cuda.cpp, host compiler) and its kernels (the .cu
// files here, nvcc). Nothing from ATen here: the .cu files include only CUDA headers, so each of the
// generated instantiation files compiles quickly and nvcc never sees ATen's warnings.
//
// UNVERIFIED ON A GPU: this code has been compiled for sm_80 / sm_90 but has not yet run on a GPU.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace mmkernels::cuda::attn {

// attn_mask as the kernels read it: element (b, h, i, j) at mask[b*s0 + h*s1 + i*s2 + j*s3], stride 0
// on broadcast dims (the mask is never expanded in memory).
enum MaskKind : int32_t { kMaskNone = 0, kMaskBool = 1, kMaskFloat = 2 };

struct AttnParams {
  // q (B, H, Lq, E), k (B, H_kv, Lk, E), v (B, H_kv, Lk, E): last dim contiguous, rows 16-byte aligned.
  // Grouped-query attention: H_kv divides H, query head h reads kv head h / (H / H_kv).
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  int32_t B, H, Lq, Lk;
  int32_t H_kv;
  // Causal flag: 0 none, 1 upper-left (query i sees keys j <= i), 2 lower-right (j <= i + Lk - Lq).
  int32_t causal;
  // softmax scale times log2(e): the kernels work in base 2 (exp2f is one MUFU instruction).
  float scale_log2;
  // Per batch the visible key range [kv_range[2b], kv_range[2b+1]) left by kv_lengths and by the
  // leading / trailing padding of key_padding_mask (attn_key_ranges); null = [0, Lk). Key tiles
  // outside the range are never loaded.
  const int32_t* kv_range;
  // key_padding_mask (B, Lk) contiguous, nonzero = ignore; null if none.
  const uint8_t* kpm;
  // attn_mask: bool (uint8, nonzero = may attend) or float32 additive.
  int32_t mask_kind;
  const void* mask;
  int64_t m_sb, m_sh, m_sl, m_sk;
  // Dropout: element (b, h, i, j) is kept iff dropout_hash(dropout_row_key(seed, b*H+h, Lq, i), j)
  // >= threshold (csrc/include/dropout_hash.h, the same function as the CPU kernel, so both devices
  // drop the same elements for the same seed); kept probabilities are scaled by inv_keep.
  int32_t dropout;
  uint32_t threshold;
  float inv_keep;
  uint64_t seed;            // used when seed_ptr is null
  const int64_t* seed_ptr;  // a device seed tensor (read in the kernel: no host sync)
  // Packed variable-length sequences (FlashAttention-2's varlen layout), or null for the dense layout.
  // With them, B is the number of sequences, Lq / Lk the longest lengths (the grid's size), sequence b
  // is rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q / out / dout / dq and [cu_seqlens_k[b], ...)
  // of k / v / dk / dv, and every batch stride (q_sb, k_sb, ...) is that tensor's row stride, so a
  // sequence's first row sits at (its first packed row) * (batch stride). lse and dsum are (H, total_q):
  // row i of head h at h * lse_sh + first row + i. No masks, no kv_range; dropout seeds per sequence
  // (varlen_sequence_seed, dropout_hash.h), as on the CPU.
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  int64_t lse_sh;
};

struct FwdParams : AttnParams {
  void* out;   // (B, H, Lq, E), last dim contiguous, rows 16-byte aligned, q's dtype
  int64_t o_sb, o_sh, o_sl;
  float* lse;  // (B, H, Lq) contiguous; +inf where a row sees no key
  // Split keys (flash-decoding; dense layout only): with num_splits > 1 each (b, h, query tile) runs
  // as num_splits blocks, split s taking its share of the visible key tiles, and writes its own
  // normalised output and lse in float32 to out_accum (num_splits, B, H, Lq, E) and lse_accum
  // (num_splits, B, H, Lq), both contiguous (lse -inf where the split saw no key); out and lse are
  // then launch_combine_splits' to write. 0 or 1: no split, out / lse written directly.
  int32_t num_splits;
  float* out_accum;
  float* lse_accum;
};

struct BwdParams : AttnParams {
  const void* dout;  // (B, H, Lq, E), last dim contiguous, rows 16-byte aligned
  int64_t do_sb, do_sh, do_sl;
  const float* lse;    // (B, H, Lq) contiguous
  const float* dsum;   // D = rowsum(dO * O), (B, H, Lq) contiguous
  float* dq_accum;     // (B, H, Lq, E) float32 in dq's layout, zeroed; receives sum_j dS_ij K_j (unscaled)
  int64_t dq_sb, dq_sh, dq_sl;
  void* dk;            // (B, H_kv, Lk, E), summed over the group's query heads; last dim contiguous,
                       // rows 16-byte aligned, q's dtype
  int64_t dk_sb, dk_sh, dk_sl;
  void* dv;            // likewise
  int64_t dv_sb, dv_sh, dv_sl;
};

// The tensor-core kernels: head dim D in {32, 64, 128}; bf16 or fp16 operands. Each instantiation
// lives in its own generated file (fwd_hdim*_*.cu, bwd_hdim*_*.cu) so that nvcc builds them in parallel.
template <int D, bool kBF16>
void launch_fwd(const FwdParams& p, cudaStream_t stream);
template <int D, bool kBF16>
void launch_bwd(const BwdParams& p, cudaStream_t stream);

// How many blocks the forward splits each (b, h, query tile)'s keys over: enough to give every SM a
// block when the grid alone cannot (few batches x heads x query tiles: decoding), at least two key
// tiles of 64 per split, at most kMaxKeySplits; 1 (no split) when the grid fills the device.
constexpr int kMaxKeySplits = 32;
inline int choose_key_splits(int64_t blocks, int64_t Lk, int sm_count) {
  if (blocks <= 0 || blocks * 2 > sm_count) return 1;
  const int64_t by_sms = (sm_count + blocks - 1) / blocks;
  const int64_t by_keys = Lk / 128;
  const int64_t n = by_sms < by_keys ? by_sms : by_keys;
  return n < 2 ? 1 : static_cast<int>(n < kMaxKeySplits ? n : kMaxKeySplits);
}

// Helpers (attn_aux.cu).
// out / lse from the splits' partial results (FwdParams::out_accum / lse_accum): lse = log sum_s
// exp(lse_s), out = sum_s exp(lse_s - lse) out_s; a row no split saw gets zeros and lse = +inf.
// out (B, H, Lq, E) 16-bit with strides o_s*, last dim contiguous; lse (B, H, Lq) contiguous.
void launch_combine_splits(const float* out_accum, const float* lse_accum, int32_t splits, int32_t B, int32_t H,
                           int32_t Lq, int32_t E, void* out, int64_t o_sb, int64_t o_sh, int64_t o_sl, float* lse,
                           bool bf16, cudaStream_t stream);
// kv_range[2b..2b+1] from kv_lengths (int32, may be null) and key_padding_mask (may be null).
void launch_key_ranges(const int32_t* lengths, const uint8_t* kpm, int32_t B, int32_t Lk, int32_t* kv_range,
                       cudaStream_t stream);
// dsum[r] = sum_d dout[r, d] * out[r, d] over rows r = (b, h, i); both (B, H, Lq, E), last dim contiguous.
void launch_dot_rows(const void* dout, int64_t do_sb, int64_t do_sh, int64_t do_sl, const void* out, int64_t o_sb,
                     int64_t o_sh, int64_t o_sl, int32_t B, int32_t H, int32_t Lq, int32_t E, bool bf16, float* dsum,
                     cudaStream_t stream);
// dq[n] = dtype(dq_accum[n] * scale), n < count: element by element in memory, so any dense layout
// works when dq and dq_accum share it.
void launch_finish_dq(const float* dq_accum, float scale, void* dq, int64_t count, bool bf16, cudaStream_t stream);
// z (B, H, rows, Lk) float or double: 1 where element (b, h, i0 + r, j) is kept by dropout, else 0 -
// for the ATen fallback path, so that it drops exactly what the kernels drop.
void launch_dropout_factors(const AttnParams& p, int32_t i0, int32_t rows, void* z, bool dbl, cudaStream_t stream);

}  // namespace mmkernels::cuda::attn
