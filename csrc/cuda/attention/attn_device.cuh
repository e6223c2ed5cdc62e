// Device helpers of the tensor-core attention kernels: PTX wrappers (cp.async, ldmatrix, mma.sync
// m16n8k16), the shared-memory swizzle, and the per-element mask / dropout used by forward and
// backward alike (backward must rebuild exactly the probabilities forward used).
//
// UNVERIFIED ON A GPU: compiled for sm_80 / sm_90, not yet run.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attn_params.h"
#include "dropout_hash.h"

namespace mmkernels::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------- PTX wrappers

#ifdef MMK_EMU
// Emulation build (csrc/emu): the same instructions, executed by the CPU executor.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  ::mmk_emu::cp_async16(dst, src, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::mmk_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::mmk_emu::cp_async_wait(N);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ::mmk_emu::ldmatrix(r, 4, false, p); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  ::mmk_emu::ldmatrix(r, 4, true, p);
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  ::mmk_emu::ldmatrix(r, 2, true, p);
}
template <bool kBF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  ::mmk_emu::mma_m16n8k16(d, a, b, kBF16);
}
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 writes zeros (rows past the end).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(p)));
}

// d += a (16x16, row) * b (16x8, col); float32 accumulation.
template <bool kBF16>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

#endif  // MMK_EMU

// Two floats -> one register of two 16-bit values (low half = x), as the mma A/B fragments hold them.
template <bool kBF16>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (kBF16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <bool kBF16>
__device__ __forceinline__ float2 unpack2(uint32_t r) {
  if constexpr (kBF16) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&r));
  } else {
    return __half22float2(*reinterpret_cast<__half2*>(&r));
  }
}

// ------------------------------------------------------------------------------- shared memory

// Offset (in 16-bit elements) of the 8-element chunk `c` of row `r` in a [rows][W] tile. Chunks are
// XOR-swizzled so that the 8 row addresses of one ldmatrix 8x8 matrix (same logical chunk, 8
// consecutive rows) land in 8 different 16-byte bank groups: conflict-free ldmatrix and cp.async
// without padding. With W >= 64 a row spans >= 128 bytes (all 8 bank groups), so c ^ (r % 8); with
// W = 32 (16) two (four) rows share 128 bytes, so the XOR uses r / 2 (r / 4) instead.
template <int W>
__device__ __forceinline__ int swz(int r, int c) {
  static_assert(W == 16 || W == 32 || W % 64 == 0, "tile width must be 16, 32 or a multiple of 64 elements");
  if constexpr (W == 16) {
    return r * W + ((c ^ ((r >> 2) & 1)) << 3);
  } else if constexpr (W == 32) {
    return r * W + ((c ^ ((r >> 1) & 3)) << 3);
  } else {
    return r * W + ((c ^ (r & 7)) << 3);
  }
}

// cp.async of rows [0, kRows) x W elements from `src` (row stride in elements) into a swizzled tile;
// rows >= nvalid are zero-filled (their source address is `safe`, never read).
template <int W, int kRows, int kThreads>
__device__ __forceinline__ void load_tile_async(uint16_t* dst, const uint16_t* src, int64_t row_stride, int nvalid,
                                                const uint16_t* safe, int tid) {
  constexpr int kChunks = W / 8;
  static_assert((kRows * kChunks) % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int idx = tid + it * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool ok = r < nvalid;
    const uint16_t* s = ok ? src + r * row_stride + c * 8 : safe;
    cp_async16(dst + swz<W>(r, c), s, ok ? 16 : 0);
  }
}

// ------------------------------------------------------------------------------- masks, dropout

// The attn_mask / key_padding_mask contribution to score (b, h, i, j) in base-2 units: 0, a float
// mask value times log2(e), or -inf. (The key range is checked by the caller.) i < Lq, j < Lk.
__device__ __forceinline__ float mask_bias_log2(const AttnParams& p, int b, int h, int i, int j) {
  if (p.kpm != nullptr && p.kpm[static_cast<int64_t>(b) * p.Lk + j]) return -INFINITY;
  if (p.mask_kind == kMaskNone) return 0.0f;
  const int64_t off = b * p.m_sb + h * p.m_sh + i * p.m_sl + j * p.m_sk;
  if (p.mask_kind == kMaskBool) return static_cast<const uint8_t*>(p.mask)[off] ? 0.0f : -INFINITY;
  return static_cast<const float*>(p.mask)[off] * kLog2e;
}

// ------------------------------------------------------------------------------- dense or packed

// The problem of batch entry b as a block sees it. Dense (kVarlen = false): rows from 0, p.Lq x p.Lk,
// base = b. Packed (kVarlen, AttnParams::cu_seqlens_q / _k): sequence b's lengths, and bases = its
// first packed rows; the host set the batch strides to row strides, so base * (batch stride) is the
// sequence's first row in either layout. A template flag rather than a run-time test of the pointers,
// so that the dense kernels stay exactly what they were (no extra registers, no extra branches).
template <bool kVarlen>
struct Seq {
  int b, q_base, k_base, Lq, Lk;
};

template <bool kVarlen>
__device__ __forceinline__ Seq<kVarlen> sequence(const AttnParams& p, int b) {
  if constexpr (kVarlen) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    return {b, q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
  } else {
    return {b, b, b, p.Lq, p.Lk};
  }
}

// The causal flag's diagonal: query i sees key j iff j <= i + causal_offset (with p.causal != 0).
template <bool kVarlen>
__device__ __forceinline__ int causal_offset(const AttnParams& p, const Seq<kVarlen>& s) {
  return p.causal == 2 ? s.Lk - s.Lq : 0;
}

// Where row 0 of (b, h) sits in lse / dsum: (B, H, Lq) dense, (H, total_q) packed.
template <bool kVarlen>
__device__ __forceinline__ int64_t lse_row0(const AttnParams& p, const Seq<kVarlen>& s, int h) {
  if constexpr (kVarlen) {
    return h * p.lse_sh + s.q_base;
  } else {
    return static_cast<int64_t>(s.b * p.H + h) * p.Lq;
  }
}

__device__ __forceinline__ uint64_t dropout_seed(const AttnParams& p) {
  return p.seed_ptr != nullptr ? static_cast<uint64_t>(*p.seed_ptr) : p.seed;
}

// Dropout's key of query row i of (b, h): dense, row (b * H + h, i) of the call's seed; packed, row
// (h, i) of a one-sequence problem with the sequence's own seed (the CPU varlen kernel's rule).
// seed: dropout_seed(p).
template <bool kVarlen>
__device__ __forceinline__ uint64_t row_dropout_key(const AttnParams& p, const Seq<kVarlen>& s, uint64_t seed, int h,
                                                    int i) {
  if constexpr (kVarlen) {
    return ::mmkernels::dropout_row_key(varlen_sequence_seed(seed, s.b), h, s.Lq, i);
  } else {
    return ::mmkernels::dropout_row_key(seed, s.b * p.H + h, p.Lq, i);
  }
}

// The dropout factor (inv_keep or 0) of element (row key, key j).
__device__ __forceinline__ float dropout_factor(const AttnParams& p, uint64_t row_key, int j) {
  return dropout_hash(row_key, static_cast<uint32_t>(j)) >= p.threshold ? p.inv_keep : 0.0f;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace mmkernels::cuda::attn
