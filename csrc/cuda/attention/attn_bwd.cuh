// Backward tensor-core attention kernel (flash-attention-2 style, written for this project).
//
// One thread block = 4 warps per (batch, head, tile of kBc = 64 keys); each warp owns 16 keys. K_j
// and V_j stay in shared memory; Q_i and dO_i tiles of kBr query rows stream through two buffers
// with cp.async. The block works in the transposed orientation (keys as mma rows), so that P^T and
// dS^T come out of the mma accumulators already in the A-fragment layout of the dV / dK products:
//   S^T  = K_j Q_i^T                              (16 keys x kBr queries per warp)
//   P^T  = exp2(S^T * scale log2e + mask - lse_i log2e)   recomputed from forward's lse: no max, no sum
//   dV_j += (P^T o Z) dO_i                         Z = dropout factors, regenerated from the seed
//   dP^T = V_j dO_i^T
//   dS^T = P^T o (dP^T o Z - D_i)                  D_i = rowsum(dO_i o O_i), a pre-pass (attn_aux.cu)
//   dK_j += dS^T Q_i                               (times scale at the end)
//   dQ_i += dS K_j                                 dS^T goes through shared memory (transposed by
//                                                  ldmatrix.trans), each warp takes D/4 of the head
//                                                  dim, and adds its 16 x D/4 blocks to a float32
//                                                  dQ accumulator in global memory with atomics.
// dQ: atomics rather than a second pass over (query tile, key tiles), which would recompute S and
// dP a second time (2 more of the 5 GEMMs). The price: float32 atomics to a (B, H, Lq, E) buffer,
// a final scale-and-convert kernel, and a summation order that varies from run to run (dq is not
// bitwise deterministic; dk and dv are). Measuring both on a GPU is still to do.
//
// Grouped-query attention: a block owns a key tile of one kv head and steps through the query tiles
// of every query head of its group (G = H / H_kv of them, one after the other), so dK and dV sum
// over the group in its registers: no race, no partial buffers, each K / V tile loaded once per
// group. (The grid has B * H_kv * key tiles blocks: with few kv heads and short keys it can leave
// SMs idle; splitting the group over blocks would need a reduction of dK / dV. Not measured.)
// Causal: a key tile is seen only by the query rows i >= j0 - offset, so the loop starts at the
// query tile holding the first of them (tiles before the diagonal are never loaded), and only the
// query tiles that cross the diagonal mask per element. A key tile no query sees writes zeros.
//
// Key tiles outside the batch's visible key range write zero dK / dV and stop. D = 128 takes query
// tiles of 16 rows: its dK and dV accumulators already hold 128 registers per thread, and with 32
// rows ptxas spilled (~100 bytes) at the 255-register limit. D = 64 takes 32 (it took 64 until the
// causal and grouped-query loop came: with 64, ptxas spilled 12-40 bytes).
//
// Packed sequences (cross_modal_attention_varlen, kVarlen = true): b is a sequence, the grid covers the
// longest, and a block whose tile lies past its sequence's end returns at once (see Seq in attn_device.cuh).
//
// UNVERIFIED ON A GPU: compiled for sm_80 / sm_90, not yet run. Tests: tests/test_cuda_cross_modal_attention.py and
// tests/test_cuda_cross_modal_attention_varlen.py (GPU), tests/emu (emulator).
#pragma once
#include "attn_device.cuh"

namespace mmkernels::cuda::attn {

template <int D>
struct BwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBc = 16 * kWarps;        // keys per block
  static constexpr int kBr = D >= 128 ? 16 : D >= 64 ? 32 : 64;  // query rows per step (see above)
  // K, V + 2 x (Q, dO) tiles + the dS^T tile, 16-bit elements.
  static constexpr int kSmemBytes = (2 * kBc * D + 4 * kBr * D + kBc * kBr) * 2;
};

template <int D, bool kBF16, bool kVarlen>
__global__ void __launch_bounds__(BwdTraits<D>::kThreads, 1) attn_bwd_kernel(const BwdParams p) {
  using Tr = BwdTraits<D>;
  constexpr int kBr = Tr::kBr, kBc = Tr::kBc, kThreads = Tr::kThreads;
  constexpr int kNT = kBr / 8;  // n-tiles (queries) of S^T per warp
  constexpr int kDT = D / 8;    // n-tiles of dK / dV per warp
  constexpr int kDQ = D / 32;   // n-tiles of dQ per warp (each warp takes D/4 columns)
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sK = smem;                // [kBc][D]
  uint16_t* sV = sK + kBc * D;        // [kBc][D]
  uint16_t* sQ = sV + kBc * D;        // [2][kBr][D]
  uint16_t* sdO = sQ + 2 * kBr * D;   // [2][kBr][D]
  uint16_t* sdS = sdO + 2 * kBr * D;  // [kBc][kBr]: dS^T, keys as rows

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int nkt = (p.Lk + kBc - 1) / kBc;
  const int bhk = blockIdx.x / nkt, b = bhk / p.H_kv, hkv = bhk % p.H_kv;
  const int group = p.H / p.H_kv;
  const int j0 = (blockIdx.x % nkt) * kBc;
  const Seq<kVarlen> seq = sequence<kVarlen>(p, b);
  // Packed sequences: the grid covers the longest; a tile past this sequence's end has nothing to do.
  if (kVarlen && j0 >= seq.Lk) return;

  int kbeg = 0, kend = seq.Lk;
  if (p.kv_range != nullptr) kbeg = p.kv_range[2 * b], kend = p.kv_range[2 * b + 1];
  uint16_t* dkg = static_cast<uint16_t*>(p.dk) + seq.k_base * p.dk_sb + hkv * p.dk_sh;
  uint16_t* dvg = static_cast<uint16_t*>(p.dv) + seq.k_base * p.dv_sb + hkv * p.dv_sh;
  // Query tiles [qt_first, nqt) of each query head of the group: causal skips those before the
  // first row that sees key j0.
  const int coff = causal_offset(p, seq);
  const int nqt = (seq.Lq + kBr - 1) / kBr;
  const int qt_first = p.causal ? max(0, j0 - coff) / kBr : 0;
  const int nq = nqt - qt_first;  // query tiles per query head

  if (j0 + kBc <= kbeg || j0 >= kend || nq <= 0 || (p.causal && j0 - coff >= seq.Lq)) {
    // No visible key in this tile (or no query that sees one): zero gradients, nothing to compute.
    const int rows = min(kBc, seq.Lk - j0);
    for (int idx = tid; idx < rows * (D / 8); idx += kThreads) {
      const int64_t j = j0 + idx / (D / 8), c = (idx % (D / 8)) * 8;
      *reinterpret_cast<uint4*>(dkg + j * p.dk_sl + c) = make_uint4(0, 0, 0, 0);
      *reinterpret_cast<uint4*>(dvg + j * p.dv_sl + c) = make_uint4(0, 0, 0, 0);
    }
    return;
  }

  const uint16_t* kg = static_cast<const uint16_t*>(p.k) + seq.k_base * p.k_sb + hkv * p.k_sh;
  const uint16_t* vg = static_cast<const uint16_t*>(p.v) + seq.k_base * p.v_sb + hkv * p.v_sh;
  // The loop steps through (query head of the group, query tile >= qt_first), the next step's tiles
  // prefetched into the other buffer. Its counters move by increments, not by dividing a flat step
  // index; the head's pointers, the causal offset and the dropout seed are re-read from p at each
  // use rather than held: D = 64 and 128 sit at the 255-register limit, and each of those held in a
  // register made ptxas spill (12-44 bytes, sm_80 / sm_90).
  auto load_step = [&](int hq, int qt, int buffer) {
    const int i1 = qt * kBr;
    const uint16_t* qg = static_cast<const uint16_t*>(p.q) + seq.q_base * p.q_sb + hq * p.q_sh;
    const uint16_t* dog = static_cast<const uint16_t*>(p.dout) + seq.q_base * p.do_sb + hq * p.do_sh;
    load_tile_async<D, kBr, kThreads>(sQ + buffer * kBr * D, qg + i1 * p.q_sl, p.q_sl, seq.Lq - i1, qg, tid);
    load_tile_async<D, kBr, kThreads>(sdO + buffer * kBr * D, dog + i1 * p.do_sl, p.do_sl, seq.Lq - i1, dog, tid);
  };

  load_tile_async<D, kBc, kThreads>(sK, kg + j0 * p.k_sl, p.k_sl, seq.Lk - j0, kg, tid);
  load_tile_async<D, kBc, kThreads>(sV, vg + j0 * p.v_sl, p.v_sl, seq.Lk - j0, vg, tid);
  load_step(hkv * group, qt_first, 0);
  cp_async_commit();

  // This thread's two keys (C-fragment rows g and g + 8 of the warp's 16).
  const int key[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
  const bool key_ok[2] = {key[0] >= kbeg && key[0] < kend, key[1] >= kbeg && key[1] < kend};
  const bool has_mask = p.kpm != nullptr || p.mask_kind != kMaskNone;

  float dk[kDT][4], dv[kDT][4];
#pragma unroll
  for (int d = 0; d < kDT; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[d][e] = dv[d][e] = 0.0f;
  }

  const int hq_end = (hkv + 1) * group;
  for (int hq = hkv * group, qt = qt_first, buf = 0; hq < hq_end; buf ^= 1) {
    const int h = hq;  // this step's query head and tile (hq, qt move on below)
    const int i0 = qt * kBr;
    const int64_t row0 = lse_row0(p, seq, h);  // (b, hq)'s rows of lse and dsum
    // This query tile crosses the diagonal of the key tile: some of its rows miss some of its keys.
    // The next step: the next query tile of this head, or the first of the next head.
    if (++qt == nqt) qt = qt_first, ++hq;
    if (hq < hq_end) {
      load_step(hq, qt, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* sQb = sQ + buf * kBr * D;
    const uint16_t* sdOb = sdO + buf * kBr * D;

    // S^T = K Q^T and dP^T = V dO^T (same shapes, same B-operand pattern).
    float st[kNT][4], dpt[kNT][4];
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[n][e] = dpt[n][e] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t ak[4], av[4];
      ldmatrix_x4(ak, sK + swz<D>(warp * 16 + (lane % 16), ks * 2 + lane / 16));
      ldmatrix_x4(av, sV + swz<D>(warp * 16 + (lane % 16), ks * 2 + lane / 16));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        const int r = np * 16 + (lane % 8) + (lane / 16) * 8, c = ks * 2 + (lane / 8) % 2;
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, sQb + swz<D>(r, c));
        ldmatrix_x4(bo, sdOb + swz<D>(r, c));
        mma16816<kBF16>(st[2 * np], ak, bq[0], bq[1]);
        mma16816<kBF16>(st[2 * np + 1], ak, bq[2], bq[3]);
        mma16816<kBF16>(dpt[2 * np], av, bo[0], bo[1]);
        mma16816<kBF16>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }

    // P^T from lse, then dS^T; st becomes P^T o Z (for dV), dpt becomes dS^T.
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = i0 + n * 8 + 2 * t4 + c;
        // Rows past Lq: lse = +inf gives P = 0 (their Q and dO were zero-filled anyway).
        const float lse2 = i < seq.Lq ? p.lse[row0 + i] * kLog2e : INFINITY;
        const float dsum = i < seq.Lq ? p.dsum[row0 + i] : 0.0f;
        const uint64_t rk = p.dropout ? row_dropout_key(p, seq, dropout_seed(p), h, i) : 0;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int e = 2 * r + c;
          float x = st[n][e] * p.scale_log2;
          if (!key_ok[r] || (p.causal && key[r] > i + causal_offset(p, seq))) {
            x = -INFINITY;
          } else if (has_mask && i < seq.Lq) {
            const float bias = mask_bias_log2(p, b, h, i, key[r]);  // masked: -inf, as in the forward
            x = bias == -INFINITY ? -INFINITY : x + bias;
          }
          // exp2(finite - inf) = 0; a NaN row (lse = NaN: NaN among its visible scores) gets NaN
          // from its visible keys, so its gradients are NaN. A masked key (x = -inf) has P = 0 and
          // dS = 0 whatever its row holds, so a NaN row does not reach it either.
          const bool seen = x != -INFINITY;
          const float prob = seen ? exp2f(x - lse2) : 0.0f;
          const float z = p.dropout ? dropout_factor(p, rk, key[r]) : 1.0f;
          st[n][e] = prob * z;
          // A row that saw no key (lse = +inf) gets zero gradient even where a value is NaN.
          dpt[n][e] = lse2 == INFINITY || !seen ? 0.0f : prob * (dpt[n][e] * z - dsum);
        }
      }
    }

    // dV += (P o Z)^T dO and dK += dS^T Q: A from registers, B = dO / Q rows via ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBr / 16; ++kk) {
      uint32_t ap[4], as[4];
      ap[0] = pack2<kBF16>(st[2 * kk][0], st[2 * kk][1]);
      ap[1] = pack2<kBF16>(st[2 * kk][2], st[2 * kk][3]);
      ap[2] = pack2<kBF16>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[3] = pack2<kBF16>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      as[0] = pack2<kBF16>(dpt[2 * kk][0], dpt[2 * kk][1]);
      as[1] = pack2<kBF16>(dpt[2 * kk][2], dpt[2 * kk][3]);
      as[2] = pack2<kBF16>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      as[3] = pack2<kBF16>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
      const int r = kk * 16 + (lane % 8) + ((lane / 8) & 1) * 8;
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bo[4];
        ldmatrix_x4_trans(bo, sdOb + swz<D>(r, dp * 2 + lane / 16));
        mma16816<kBF16>(dv[2 * dp], ap, bo[0], bo[1]);
        mma16816<kBF16>(dv[2 * dp + 1], ap, bo[2], bo[3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bq[4];
        ldmatrix_x4_trans(bq, sQb + swz<D>(r, dp * 2 + lane / 16));
        mma16816<kBF16>(dk[2 * dp], as, bq[0], bq[1]);
        mma16816<kBF16>(dk[2 * dp + 1], as, bq[2], bq[3]);
      }
      // dS^T (16-bit, as the mma consumes it) to shared memory for the dQ product.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int kr = warp * 16 + g + 8 * r;
        *reinterpret_cast<uint32_t*>(sdS + swz<kBr>(kr, 2 * kk) + 2 * t4) = as[r];
        *reinterpret_cast<uint32_t*>(sdS + swz<kBr>(kr, 2 * kk + 1) + 2 * t4) = as[2 + r];
      }
    }
    __syncthreads();

    // dQ_i (kBr x D) += dS K_j: warp w takes columns [w D/4, (w+1) D/4). A = dS rows read from dS^T
    // with ldmatrix.trans; B = K rows (keys as k) with ldmatrix.trans.
#pragma unroll
    for (int mt = 0; mt < kBr / 16; ++mt) {
      float dq[kDQ][4];
#pragma unroll
      for (int n = 0; n < kDQ; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kBc / 16; ++ks) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, sdS + swz<kBr>(ks * 16 + (lane % 8) + (lane / 16) * 8, mt * 2 + ((lane / 8) & 1)));
#pragma unroll
        for (int n = 0; n < kDQ; ++n) {
          uint32_t bk[2];
          ldmatrix_x2_trans(bk, sK + swz<D>(ks * 16 + (lane % 8) + ((lane / 8) & 1) * 8, warp * kDQ + n));
          mma16816<kBF16>(dq[n], a, bk[0], bk[1]);
        }
      }
#pragma unroll
      for (int n = 0; n < kDQ; ++n) {
        const int col = (warp * kDQ + n) * 8 + 2 * t4;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int i = i0 + mt * 16 + g + 8 * r;
          if (i < seq.Lq) {
            float* dqg = p.dq_accum + seq.q_base * p.dq_sb + h * p.dq_sh + i * p.dq_sl + col;
            atomicAdd(dqg, dq[n][2 * r]);
            atomicAdd(dqg + 1, dq[n][2 * r + 1]);
          }
        }
      }
    }
    // (The next iteration's __syncthreads comes before anyone rewrites sdS or this Q / dO buffer.)
  }

  // Epilogue: dK * scale and dV through this warp's own rows of sK / sV (after every warp has
  // finished reading K in the last dQ product), then 16-byte stores.
  __syncthreads();
  const float scale = p.scale_log2 / kLog2e;
#pragma unroll
  for (int d = 0; d < kDT; ++d) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int kr = warp * 16 + g + 8 * r, col = d * 8 + 2 * t4;
      *reinterpret_cast<uint32_t*>(sK + swz<D>(kr, col / 8) + col % 8) =
          pack2<kBF16>(dk[d][2 * r] * scale, dk[d][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(sV + swz<D>(kr, col / 8) + col % 8) = pack2<kBF16>(dv[d][2 * r], dv[d][2 * r + 1]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < 16 * (D / 8) / 32; ++it) {
    const int idx = lane + it * 32;
    const int kr = warp * 16 + idx / (D / 8), c = idx % (D / 8);
    const int j = j0 + kr;
    if (j < seq.Lk) {
      *reinterpret_cast<uint4*>(dkg + j * p.dk_sl + c * 8) =
          *reinterpret_cast<const uint4*>(sK + swz<D>(kr, c));
      *reinterpret_cast<uint4*>(dvg + j * p.dv_sl + c * 8) =
          *reinterpret_cast<const uint4*>(sV + swz<D>(kr, c));
    }
  }
}

template <int D, bool kBF16>
void launch_bwd(const BwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<D>;
  // Dense and packed layouts are separate instantiations (see Seq in attn_device.cuh).
  auto kernel = p.cu_seqlens_q != nullptr ? attn_bwd_kernel<D, kBF16, true> : attn_bwd_kernel<D, kBF16, false>;
  if (Tr::kSmemBytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  }
  const dim3 grid(((p.Lk + Tr::kBc - 1) / Tr::kBc) * p.B * p.H_kv);
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
}

}  // namespace mmkernels::cuda::attn
