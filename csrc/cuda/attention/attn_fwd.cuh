// Forward tensor-core attention kernel (flash-attention-2 style, written for this project).
//
// One thread block = 4 warps per (batch, head, tile of kBr = 64 query rows); each warp owns 16 query
// rows. The Q tile sits in shared memory for the whole block; K and V tiles of kBc = 64 keys (32 at
// D = 128) stream through two shared-memory buffers with cp.async, so the copy of tile t+1 overlaps
// the math of tile t. Per key tile, per warp:
//   S (16 x kBc) = Q K^T           mma.sync m16n8k16, A = Q via ldmatrix, B = K via ldmatrix
//   scale, masks, online softmax   in registers, base 2 (running max m and partial row sum l)
//   O (16 x D)  += P V             A = P straight from the S accumulators (re-packed to 16 bit),
//                                  B = V via ldmatrix.trans
// At the end O / l goes out through shared memory (16-byte coalesced stores), and
// lse = (m + log2 l) * ln 2, or +inf for a row that saw no key (out = 0 there). A NaN among a row's
// visible scores makes l NaN (fmaxf skips NaN in the max, exp2 does not), so out and lse are NaN
// there and backward's P, hence the row's gradients, are NaN too: l == 0, not l <= 0, means no key.
//
// Key tiles outside the batch's visible key range (kv_lengths, leading/trailing key_padding_mask)
// are never loaded; only the tiles at the range's edges pay the per-element range check, and the
// per-element mask reads happen only when a mask exists.
//
// Causal (p.causal 1 / 2: query i sees keys j <= i + offset, offset 0 or Lk - Lq): the key loop
// stops at the last key the tile's last row sees, so tiles past the diagonal are never loaded, and
// only the tiles that cross the diagonal pay the per-element check. With the flag, the grid runs the
// query tiles of a head from last to first: the long ones (most keys) start first.
// Grouped-query attention: query head h reads K and V of kv head h / (H / H_kv); the query heads of
// a group are adjacent in the grid, so their blocks read the same K / V from L2.
//
// Packed sequences (cross_modal_attention_varlen, kVarlen = true): b is a sequence, the grid covers the
// longest, and a block whose tile lies past its sequence's end returns at once (see Seq in attn_device.cuh).
//
// UNVERIFIED ON A GPU: compiled for sm_80 / sm_90, not yet run. Tests: tests/test_cuda_cross_modal_attention.py and
// tests/test_cuda_cross_modal_attention_varlen.py (GPU), tests/emu (emulator).
#pragma once
#include "attn_device.cuh"

namespace mmkernels::cuda::attn {

// A split's partial result of this thread's two rows (row[r], fragment columns 2 t4, 2 t4 + 1 of each
// 8-column tile): O / l and lse in float32, lse -inf where the split saw no key (so that the combine
// gives it weight 0), NaN where l is.
template <int D>
__device__ __forceinline__ void store_split(const FwdParams& p, int bh, const int (&row)[2], const float (&acc)[D / 8][4],
                                            const float (&inv)[2], const float (&m)[2], const float (&l)[2], int t4) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.H * p.Lq;
  const int64_t base = (blockIdx.x % p.num_splits) * rows + static_cast<int64_t>(bh) * p.Lq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= p.Lq) continue;
    float* o = p.out_accum + (base + row[r]) * D + 2 * t4;
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      *reinterpret_cast<float2*>(o + d * 8) = make_float2(acc[d][2 * r] * inv[r], acc[d][2 * r + 1] * inv[r]);
    }
    if (t4 == 0) p.lse_accum[base + row[r]] = l[r] != 0.0f ? (m[r] + log2f(l[r])) * kLn2 : -INFINITY;
  }
}

template <int D>
struct FwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBr = 16 * kWarps;  // query rows per block
  // Keys per tile. D = 128 takes 32: with 64 (and the causal checks) ptxas spilled 8 bytes on sm_90.
  static constexpr int kBc = D >= 128 ? 32 : 64;
  // One block per SM is all the launch bounds promise: with no minimum, ptxas may aim at a higher
  // occupancy on its own and spill to get there (D = 32: 128 registers and an 8-byte spill).
  static constexpr int kMinBlocks = 1;
  // Q + 2 x K + 2 x V tiles of 16-bit elements.
  static constexpr int kSmemBytes = (kBr + 4 * kBc) * D * 2;
};

// kSplit: split keys (FwdParams::num_splits > 1); dense layout only.
template <int D, bool kBF16, bool kVarlen, bool kSplit>
__global__ void __launch_bounds__(FwdTraits<D>::kThreads, FwdTraits<D>::kMinBlocks) attn_fwd_kernel(const FwdParams p) {
  using Tr = FwdTraits<D>;
  constexpr int kBr = Tr::kBr, kBc = Tr::kBc, kThreads = Tr::kThreads;
  constexpr int kNT = kBc / 8;  // n-tiles of S per warp
  constexpr int kDT = D / 8;    // n-tiles of O per warp
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sQ = smem;
  uint16_t* sK = sQ + kBr * D;   // [2][kBc][D]
  uint16_t* sV = sK + 2 * kBc * D;  // [2][kBc][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  // Flat grid, query tiles of one (b, h) adjacent: they share K and V, which then stay in L2.
  const int nqt = (p.Lq + kBr - 1) / kBr;
  // Split keys: the splits of one (b, h, query tile) are adjacent blocks.
  const int block = kSplit ? blockIdx.x / p.num_splits : blockIdx.x;
  const int bh = block / nqt, b = bh / p.H, h = bh % p.H;
  const int hkv = h / (p.H / p.H_kv);
  const int qt = block % nqt;
  const int i0 = (p.causal ? nqt - 1 - qt : qt) * kBr;
  const Seq<kVarlen> seq = sequence<kVarlen>(p, b);
  // Packed sequences: the grid covers the longest; a tile past this sequence's end has nothing to do.
  if (kVarlen && i0 >= seq.Lq) return;

  int kbeg = 0, kend = seq.Lk;
  if (p.kv_range != nullptr) kbeg = p.kv_range[2 * b], kend = p.kv_range[2 * b + 1];
  // Causal: no row of this tile sees a key past the last row's diagonal; tiles that cross the
  // diagonal (some key past the first row's) mask per element.
  const int kstop = p.causal ? min(kend, min(i0 + kBr, seq.Lq) + causal_offset(p, seq)) : kend;
  int t_first = kbeg / kBc;
  int t_last = kstop > kbeg ? (kstop + kBc - 1) / kBc : t_first;  // tiles [t_first, t_last)
  if constexpr (kSplit) {
    // This split's share of the visible tiles (an equal count each; the last ones may get none).
    const int split = blockIdx.x % p.num_splits;
    const int per = (t_last - t_first + p.num_splits - 1) / p.num_splits;
    t_first = min(t_last, t_first + split * per);
    t_last = min(t_last, t_first + per);
  }

  const uint16_t* qg = static_cast<const uint16_t*>(p.q) + seq.q_base * p.q_sb + h * p.q_sh;
  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + seq.k_base * p.k_sb + hkv * p.k_sh;
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + seq.k_base * p.v_sb + hkv * p.v_sh;

  load_tile_async<D, kBr, kThreads>(sQ, qg + i0 * p.q_sl, p.q_sl, seq.Lq - i0, qg, tid);
  if (t_first < t_last) {
    const int j0 = t_first * kBc;
    load_tile_async<D, kBc, kThreads>(sK, kg + j0 * p.k_sl, p.k_sl, seq.Lk - j0, kg, tid);
    load_tile_async<D, kBc, kThreads>(sV, vg + j0 * p.v_sl, p.v_sl, seq.Lk - j0, vg, tid);
  }
  cp_async_commit();

  // This thread's two query rows (mma C-fragment rows g and g + 8 of the warp's 16).
  const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  const bool has_mask = p.kpm != nullptr || p.mask_kind != kMaskNone;
  uint64_t row_key[2] = {0, 0};
  if (p.dropout) {
    const uint64_t seed = dropout_seed(p);
#pragma unroll
    for (int r = 0; r < 2; ++r) row_key[r] = row_dropout_key(p, seq, seed, h, row[r]);
  }

  float acc[kDT][4];
#pragma unroll
  for (int d = 0; d < kDT; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};  // this thread's partial row sums (its 16 of the 64 columns); summed over the quad at the end

  for (int t = t_first; t < t_last; ++t) {
    const int buf = (t - t_first) & 1;
    if (t + 1 < t_last) {
      const int j1 = (t + 1) * kBc;
      load_tile_async<D, kBc, kThreads>(sK + (buf ^ 1) * kBc * D, kg + j1 * p.k_sl, p.k_sl, seq.Lk - j1, kg, tid);
      load_tile_async<D, kBc, kThreads>(sV + (buf ^ 1) * kBc * D, vg + j1 * p.v_sl, p.v_sl, seq.Lk - j1, vg, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* sKb = sK + buf * kBc * D;
    const uint16_t* sVb = sV + buf * kBc * D;

    // S = Q K^T for this warp's 16 rows x kBc keys.
    float s[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, sQ + swz<D>(warp * 16 + (lane % 16), ks * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, sKb + swz<D>(np * 16 + (lane % 8) + (lane / 16) * 8, ks * 2 + (lane / 8) % 2));
        mma16816<kBF16>(s[2 * np], a, bb[0], bb[1]);
        mma16816<kBF16>(s[2 * np + 1], a, bb[2], bb[3]);
      }
    }

    // Scale (to base 2) and mask.
    const int j0 = t * kBc;
    // Tiles at the key range's edges or across the causal diagonal check each element.
    const bool edge = j0 < kbeg || j0 + kBc > kend || (p.causal && j0 + kBc - 1 > i0 + causal_offset(p, seq));
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = row[e / 2], j = j0 + n * 8 + 2 * t4 + (e & 1);
        float x = s[n][e] * p.scale_log2;
        if (edge && (j < kbeg || j >= kend || (p.causal && j > i + causal_offset(p, seq)))) {
          x = -INFINITY;
        } else if (has_mask && i < seq.Lq) {
          // A masked key stays -inf even where the score is NaN: it is not seen, NaN query or not.
          const float bias = mask_bias_log2(p, b, h, i, j);
          x = bias == -INFINITY ? -INFINITY : x + bias;
        }
        s[n][e] = x;
      }
    }

    // Online softmax: new running max, rescale of what was accumulated, probabilities in place.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int n = 0; n < kNT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = quad_max(mx);
      // A row with nothing visible so far keeps m = -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
      const float base = mx == -INFINITY ? 0.0f : mx;
      const float alpha = exp2f(m[r] - base);
      m[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
        s[n][2 * r] = exp2f(s[n][2 * r] - base);
        s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int d = 0; d < kDT; ++d) acc[d][2 * r] *= alpha, acc[d][2 * r + 1] *= alpha;
    }

    // Dropout acts on P V only: the normaliser l is of the undropped probabilities (as on the CPU).
    if (p.dropout) {
#pragma unroll
      for (int n = 0; n < kNT; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= dropout_factor(p, row_key[e / 2], j0 + n * 8 + 2 * t4 + (e & 1));
      }
    }

    // O += P V: the S accumulators of n-tiles 2kk and 2kk+1 are exactly the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<kBF16>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<kBF16>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<kBF16>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<kBF16>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, sVb + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8, dp * 2 + lane / 16));
        mma16816<kBF16>(acc[2 * dp], a, bb[0], bb[1]);
        mma16816<kBF16>(acc[2 * dp + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next iteration refills it
  }
  // With no key tile at all the Q copy may still be in flight, and other threads' copies land in
  // this warp's rows of sQ, which the epilogue reuses: wait for all of them block-wide.
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue: O / l through this warp's own 16 rows of sQ (no other warp reads them), then
  // 16-byte coalesced stores.
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] = quad_sum(l[r]);
    inv[r] = l[r] != 0.0f ? 1.0f / l[r] : 0.0f;  // NaN l: NaN output
  }
  if constexpr (kSplit) {
    store_split<D>(p, bh, row, acc, inv, m, l, t4);
  } else {
#pragma unroll
    for (int d = 0; d < kDT; ++d) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int rr = warp * 16 + g + 8 * r, col = d * 8 + 2 * t4;
        *reinterpret_cast<uint32_t*>(sQ + swz<D>(rr, col / 8) + col % 8) =
            pack2<kBF16>(acc[d][2 * r] * inv[r], acc[d][2 * r + 1] * inv[r]);
      }
    }
    __syncwarp();
    uint16_t* og = static_cast<uint16_t*>(p.out) + seq.q_base * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int it = 0; it < 16 * (D / 8) / 32; ++it) {
      const int idx = lane + it * 32;
      const int rr = warp * 16 + idx / (D / 8), c = idx % (D / 8);
      const int i = i0 + rr;
      if (i < seq.Lq) {
        *reinterpret_cast<uint4*>(og + i * p.o_sl + c * 8) =
            *reinterpret_cast<const uint4*>(sQ + swz<D>(rr, c));
      }
    }
    if (t4 == 0) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (row[r] < seq.Lq) {
          p.lse[lse_row0(p, seq, h) + row[r]] = l[r] != 0.0f ? (m[r] + log2f(l[r])) * kLn2 : INFINITY;
        }
      }
    }
  }
}

template <int D, bool kBF16>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<D>;
  // Dense, packed and split-key forms are separate instantiations (see Seq in attn_device.cuh), so
  // that each pays only for itself.
  const bool split = p.num_splits > 1 && p.cu_seqlens_q == nullptr;
  auto kernel = p.cu_seqlens_q != nullptr ? attn_fwd_kernel<D, kBF16, true, false>
                : split                   ? attn_fwd_kernel<D, kBF16, false, true>
                                          : attn_fwd_kernel<D, kBF16, false, false>;
  if (Tr::kSmemBytes > 48 * 1024) {
    // Above 48 KiB of dynamic shared memory a kernel must opt in (per device, so every launch).
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  }
  const dim3 grid(((p.Lq + Tr::kBr - 1) / Tr::kBr) * p.B * p.H * (split ? p.num_splits : 1));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
}

}  // namespace mmkernels::cuda::attn
