// CPU kernels of cross_modal_attention: flash-style attention with masks and dropout.
//
// Forward: one task per (batch, head, run of query blocks). Keys and values stream through in
// blocks: the block of scores S = Q_i K_j^T (a GEMM), then per row scale + mask + online softmax
// (running max and sum in the accumulation type), then O_i += P V_j (a GEMM). Only the per-row
// log-sum-exp is kept for backward: the extra memory is O(B*H*Lq) plus per-thread block scratch.
//
// Backward: one task per (batch, head, key block) (or, when there are many heads, per (batch, head)).
// For each query block it recomputes S = Q_i K_j^T and P = exp(scale S + mask - lse) with the
// forward's own GEMM calls (same blocks, same orientation) and rounding, so that P is the
// forward's to the bit, then dV_j^T += dO_i^T P, dP = dO_i V_j^T, dS = P (dP - D), dK_j^T += Q_i^T dS
// and dQ_i += dS K_j. dQ is accumulated per key chunk when key blocks of one head run on several
// threads, and the chunks summed in a fixed order.
//
// Masks: kv_lengths and key_padding_mask trim each batch's key range, so fully padded key blocks
// are skipped; what is left of key_padding_mask and attn_mask (bool or additive float, broadcast
// through stride-0 views, never expanded in memory) is added per row as a bias of 0 / -inf / value.
// A query row that sees no key gets out = 0 and lse = +inf, so that backward's P is exactly 0.
//
// GEMMs: see gemm() below. bfloat16: the forward multiplies bfloat16 operands on oneDNN (float
// accumulation); the backward runs the float kernel on float copies and rounds the results.
// float16: the forward runs the float GEMMs on blocks converted as they are packed (half_convert.h),
// the backward as bfloat16's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "attention_layout.h"
#include "attention_rows.h"
#include "checks.h"
#include "cross_modal_attention.h"
#include "dropout_hash.h"
#include "half_convert.h"
#include "matmul.h"
#include "small_gemm.h"
#include "transpose.h"

namespace mmkernels::cpu {
namespace {

// ------------------------------------------------------------------------------------------ GEMM

// Every block GEMM here is C (+)= A B with row-major A, B and C: the operands that would be
// transposed (K and V in the score GEMMs, Q and dO in the dK and dV GEMMs) are transposed into
// per-thread scratch first, once per block. float follows matmul.cpp's rule: where it picks oneDNN,
// cpublas::brgemm, oneDNN's batch-reduce micro-kernel (measured on this AVX-512 CPU at ~110 GFLOP/s
// a core on the attention's blocks, against ~90 for MKL's sgemm_, which also packs each transposed
// operand per call). Elsewhere (MMKERNELS_CPU_GEMM=aten, oneDNN off, absent or refusing the CPU, as on
// AVX2-only CPUs): small_gemm::outer's AVX2 6 x 16 register tiles where the CPU has AVX2 and FMA (on
// AMD Zen 3 ~90 GFLOP/s a core on these blocks against ~80 for MKL's sgemm through ATen's mm, with no
// packing or call overhead), else matmul_out's ATen mm for all but the smallest blocks.
// double (gradcheck) goes to the BLAS's dgemm_ where torch's BLAS exports it, else to plain loops.
extern "C" {
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// MMKERNELS_NO_BLAS_SYMBOLS=1 takes the path of a torch without dgemm_ (tested that way).
bool blas_symbols() {
  static const bool use = std::getenv("MMKERNELS_NO_BLAS_SYMBOLS") == nullptr;
  return use;
}

// Up to this many multiply-adds (~2 us), a block GEMM off oneDNN runs small_gemm's loops on any CPU, not
// ATen's mm. Each output is one fused multiply-add chain over K from 0, the order rows::dot_rows sums D in.
constexpr int64_t kSmallGemmMacs = int64_t(1) << 16;

// Row-major C (M x N, ldc) (+)= A (M x K, lda) B (K x N, ldb).
void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill_n(C + m * ldc, N, 0.0f);
    return;
  }
  if (matmul_uses_onednn(at::kFloat)) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
    return;
  }
  if (M * N * K <= kSmallGemmMacs || small_gemm::vectorised()) {
    small_gemm::outer(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate);
    return;
  }
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  matmul_out(at::from_blob(C, {M, N}, {ldc, 1}, f32), at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, f32),
             at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, f32), accumulate);
}

void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K > 0 && dgemm_ != nullptr && blas_symbols()) {
    // Column-major view: C^T (N x M) = B^T A^T.
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const double one = 1, beta = accumulate ? 1 : 0;
    dgemm_("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    double* c = C + m * ldc;
    if (!accumulate) std::fill_n(c, N, 0.0);
    for (int64_t kk = 0; kk < K; ++kk) {
      const double a = A[m * lda + kk];
      const double* b = B + kk * ldb;
      for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// ------------------------------------------------------------------------------------------ problem

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_attention_ranks(q, k, v);
  check_device_and_dtypes(q, "q", c10::DeviceType::CPU, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf},
                          "float32, float64, bfloat16 or float16 on the CPU");
  check_attention_qkv(q, k, v);
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
                     const std::optional<at::Tensor>& attn_mask, double scale, double dropout_p,
                     const std::optional<at::Tensor>& dropout_seed, int64_t causal, at::ScalarType compute) {
  check_inputs(q, k, v);
  check_causal_mode(causal);
  Problem p;
  p.B = q.size(0), p.H = q.size(1), p.Lq = q.size(2), p.Lk = k.size(2), p.E = q.size(3), p.Ev = v.size(3);
  p.Hkv = k.size(1), p.G = p.Hkv > 0 ? p.H / p.Hkv : 1;
  p.scale = scale;
  p.set_causal(causal);
  p.kbeg.assign(p.B, 0);
  p.kend.assign(p.B, p.Lk);
  check_attention_options(q, k, key_padding_mask, kv_lengths, attn_mask, dropout_p, dropout_seed);
  if (kv_lengths.has_value()) {
    const at::Tensor l64 = kv_lengths->to(at::kLong).contiguous();
    const int64_t* lp = l64.data_ptr<int64_t>();
    for (int64_t b = 0; b < p.B; ++b) {
      MMK_CHECK_ARG(lp[b] >= 0 && lp[b] <= p.Lk, "kv_lengths", "expected values in [0, ", p.Lk,
                    "] (Lk), got ", lp[b], " at batch ", b);
      p.kend[b] = lp[b];
    }
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor mc = key_padding_mask->contiguous();
    const bool* mp = mc.data_ptr<bool>();
    bool holes = false;  // a masked key inside some batch's trimmed range
    for (int64_t b = 0; b < p.B; ++b) {
      const bool* row = mp + b * p.Lk;
      int64_t lo = p.kbeg[b], hi = p.kend[b];
      while (lo < hi && row[lo]) ++lo;
      while (hi > lo && row[hi - 1]) --hi;
      p.kbeg[b] = lo, p.kend[b] = hi;
      holes = holes || std::any_of(row + lo, row + hi, [](bool m) { return m; });
    }
    // Padding at the ends only (the usual case) is all in the ranges: no per-score bias to add then.
    if (holes) p.kpm_bias = at::zeros({p.B, p.Lk}, q.options().dtype(compute)).masked_fill_(mc, -INFINITY);
  }
  if (attn_mask.has_value()) {
    const auto& m = *attn_mask;
    at::Tensor mm = m.scalar_type() == at::kBool ? m : m.to(compute);
    p.mask = mm.expand({p.B, p.H, p.Lq, p.Lk});  // a view: stride 0 on broadcast dims
    p.mask_kind = m.scalar_type() == at::kBool ? MaskKind::Bool : MaskKind::Float;
  }
  if (dropout_p > 0.0) p.set_dropout(dropout_p, static_cast<uint64_t>(dropout_seed->to(at::kCPU).item<int64_t>()));
  return p;
}

}  // namespace

// Rows BLAS can address: unit stride along the last dim and a row stride (the leading dimension) of at
// least the row length; BLAS rejects anything else (e.g. a stride-0 expanded dim). A fresh contiguous
// copy otherwise: .contiguous() would keep the stride of a size-1 dim, which BLAS checks too.
at::Tensor last_dim_contiguous(const at::Tensor& x) {
  const bool blas_ok = x.stride(-1) == 1 && x.stride(-2) >= std::max<int64_t>(1, x.size(-1));
  return blas_ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

// x (last dim contiguous, even) read as pairs of bfloat16 (32-bit words): its data 4-byte aligned and
// every stride even, else a fresh contiguous copy.
at::Tensor bf16_pairs_aligned(const at::Tensor& x) {
  bool ok = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 4 == 0;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) ok = ok && x.stride(d) % 2 == 0;
  return ok ? x : x.clone(at::MemoryFormat::Contiguous);
}

bool bf16_in_place(int64_t head_dim) {
  // Asked of brgemm itself, once: it refuses the CPUs it cannot serve with an error.
  static const bool brgemm_runs = [] {
    try {
      const at::BFloat16 a[4] = {}, b[4] = {};
      float c[4] = {};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, /*is_vnni=*/true);
      at::native::cpublas::brgemm_release(true);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return head_dim % 2 == 0 && brgemm_runs;
}

namespace {

// The additive bias over keys [j0, j0 + n) of query row i of (b, h), into buf; or null when no mask.
template <typename T>
const T* bias_for_row(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, T* buf) {
  const T* kpm = p.kpm_bias.defined() ? p.kpm_bias.const_data_ptr<T>() + b * p.Lk + j0 : nullptr;
  if (p.mask_kind == MaskKind::None) return kpm;
  const int64_t sk = p.mask.stride(3);
  const int64_t off = b * p.mask.stride(0) + h * p.mask.stride(1) + i * p.mask.stride(2) + j0 * sk;
  if (p.mask_kind == MaskKind::Bool) {
    const bool* m = p.mask.const_data_ptr<bool>() + off;
    for (int64_t c = 0; c < n; ++c) buf[c] = m[c * sk] ? T(0) : -std::numeric_limits<T>::infinity();
  } else {
    const T* m = p.mask.const_data_ptr<T>() + off;
    for (int64_t c = 0; c < n; ++c) buf[c] = m[c * sk];
  }
  if (kpm != nullptr)
    for (int64_t c = 0; c < n; ++c) buf[c] += kpm[c];
  return buf;
}

// Per-thread scratch whose every slice starts on a 64-byte boundary (at::empty's alignment, slices
// rounded up): the BLAS may round differently with the alignment of its operands, and tasks land on
// threads dynamically, so unaligned slices made results vary run to run.
template <typename T>
int64_t aligned_slice(int64_t n) {
  constexpr int64_t a = 64 / static_cast<int64_t>(sizeof(T));
  return (n + a - 1) / a * a;
}

template <typename T>
at::Tensor aligned_scratch(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Block sizes, measured on the suite's shapes (float32, AVX-512 CPU; first with MKL, rechecked with
// brgemm: 64-query and 256-key blocks were no faster): the forward's long key blocks keep P V's
// reduction deep. Backward uses the forward's blocks, queries and keys alike, both
// starting at the batch's first visible key, so that it recomputes every score with the very GEMM
// call the forward made (the BLAS may round a column differently in a GEMM of another width).
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 512;
inline int64_t key_block(int64_t Lk) { return std::min(kBlockK, std::max<int64_t>(Lk, 1)); }
inline int64_t num_key_blocks(int64_t Lk) { return (Lk + key_block(Lk) - 1) / key_block(Lk); }
// The leading dimension of scratch rows n keys wide (scores, K_j^T, gradients): n, or 16 more where n is
// a multiple of 64. The block GEMMs read a 16-column panel of these rows top to bottom, and rows 256
// bytes apart or a multiple of that fall into a few L1 sets, which evict one another.
inline int64_t scratch_ld(int64_t n) { return n % 64 == 0 ? n + 16 : n; }

// ------------------------------------------------------------------------------------------ forward

// The GEMMs' B operands for key block [j0, j0 + nk) of one head, from K_j and V_j (rows of leading
// dim ks2, vs2). float / double: K_j^T (E x nk, rows ldk apart). bfloat16, for cpublas::brgemm (oneDNN;
// AVX512-BF16 / AMX where present), in VNNI-2 layout, pairs of reduction rows interleaved: K_j^T as
// (E/2 x BKp x 2) with BKp = ldk rounded up to even (ldk: the block size), which is a transpose of K_j
// read as 32-bit pairs, and V_j as (BKp/2 x Ev x 2), an odd block's last pair completed with a zero
// row. float16 (for the float GEMMs): K_j converted into `tmp` (nk x E) and transposed from there into
// K_j^T (E x nk, rows ldk apart), V_j converted (nk x Ev).
template <typename In, typename Packed, typename Tmp>
void pack_key_block(const In* kr, int64_t ks2, const In* vr, int64_t vs2, int64_t nk, int64_t E, int64_t Ev,
                    int64_t ldk, Packed* kT, Packed* vP, Tmp* tmp) {
  if constexpr (std::is_same_v<In, at::Half>) {
    for (int64_t c = 0; c < nk; ++c) half_to_float(kr + c * ks2, tmp + c * E, E);
    transpose(tmp, E, nk, E, kT, ldk);
    for (int64_t c = 0; c < nk; ++c) half_to_float(vr + c * vs2, vP + c * Ev, Ev);
  } else if constexpr (std::is_same_v<In, at::BFloat16>) {
    const int64_t BKp = (ldk + 1) & ~int64_t(1);
    transpose(reinterpret_cast<const uint32_t*>(kr), ks2 / 2, nk, E / 2, reinterpret_cast<uint32_t*>(kT), BKp);
    const auto* v16 = reinterpret_cast<const uint16_t*>(vr);
    for (int64_t m = 0; 2 * m < nk; ++m)
      rows::interleave_pairs(v16 + 2 * m * vs2, 2 * m + 1 < nk ? v16 + (2 * m + 1) * vs2 : nullptr, Ev,
                             reinterpret_cast<uint16_t*>(vP) + 2 * m * Ev);
  } else {
    transpose(kr, ks2, nk, E, kT, ldk);
  }
}

// S (nq x nk, ldS) = Q (nq x E) K^T with K's rows read in place (not packed), for decoding's few query
// rows: float through small_gemm's dot-product tiles (no BLAS call per key block: a decoding step is
// bound by reading K and V once); double through the BLAS's GEMV-like path where torch's BLAS exports
// dgemm_; else plain loops.
void scores_from_key_rows(int64_t nq, int64_t nk, int64_t E, const float* q, int64_t qs, const float* k, int64_t ks,
                          float* S, int64_t ldS) {
  small_gemm::dot_rows(nq, nk, E, q, qs, k, ks, S, ldS, false);
}

void scores_from_key_rows(int64_t nq, int64_t nk, int64_t E, const double* q, int64_t qs, const double* k,
                          int64_t ks, double* S, int64_t ldS) {
  if (nq == 0 || nk == 0) return;
  if (E > 0 && dgemm_ != nullptr && blas_symbols()) {
    // Column-major: S^T (nk x nq) = K (k's rows as the columns of an E x nk matrix, transposed) Q^T.
    const int m = static_cast<int>(nk), n = static_cast<int>(nq), kk = static_cast<int>(E);
    const int la = static_cast<int>(ks), lb = static_cast<int>(qs), lc = static_cast<int>(ldS);
    const double one = 1, zero = 0;
    dgemm_("T", "N", &m, &n, &kk, &one, k, &la, q, &lb, &zero, S, &lc);
    return;
  }
  for (int64_t r = 0; r < nq; ++r)
    for (int64_t c = 0; c < nk; ++c) {
      double acc = 0;
      for (int64_t e = 0; e < E; ++e) acc += q[r * qs + e] * k[c * ks + e];
      S[r * ldS + c] = acc;
    }
}

// O (nq x Ev) += P (nq x nk, ldP) V with V's rows read in place, for decoding's few query rows: float
// through small_gemm's broadcast tiles (no BLAS call per key block), double through gemm.
void values_from_rows(int64_t nq, int64_t Ev, int64_t nk, const float* P, int64_t ldP, const float* v, int64_t vs,
                      float* O) {
  small_gemm::outer(nq, Ev, nk, P, ldP, 1, v, vs, O, Ev, true);
}

void values_from_rows(int64_t nq, int64_t Ev, int64_t nk, const double* P, int64_t ldP, const double* v, int64_t vs,
                      double* O) {
  gemm(nq, Ev, nk, P, ldP, v, vs, O, Ev, true);
}

// Decoding: queries per head up to which the forward may split the keys across threads, and (float,
// double) forward and backward form the scores from K's rows directly (scores_from_key_rows):
// packing K^T for a GEMM of so few rows would write and read K once more than the dots read it.
constexpr int64_t kDecodeMaxLq = 4;

// Merges the key chunks' partial results (normalised outputs part_out (nsplit, B, H, Lq, Ev) and
// their log-sum-exps part_lse (nsplit, B, H, Lq), -inf for a chunk with no visible key) into out and
// lse: out = sum_c exp(lse_c - lse) out_c, lse = log sum_c exp(lse_c). A row with no visible key in
// any chunk gets zeros and lse = +inf; a NaN in any chunk makes the row NaN.
template <typename T, typename In>
void merge_key_splits(const Problem& p, const T* part_out, const T* part_lse, int64_t nsplit, at::Tensor& out,
                      at::Tensor& lse) {
  In* od = out.data_ptr<In>();
  T* ld = lse.data_ptr<T>();
  const int64_t rows_all = p.B * p.H * p.Lq, os2 = out.stride(2);
  at::parallel_for(0, rows_all, 16, [&](int64_t r0, int64_t r1) {
    std::vector<T> acc(p.Ev);
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t bh = row / p.Lq, i = row % p.Lq, b = bh / p.H, h = bh % p.H;
      T mx = -std::numeric_limits<T>::infinity();
      bool nan = false;
      for (int64_t c = 0; c < nsplit; ++c) {
        const T lc = part_lse[c * rows_all + row];
        nan = nan || std::isnan(lc);
        mx = std::max(mx, lc);
      }
      std::fill(acc.begin(), acc.end(), T(0));
      T lse_row;
      if (nan) {
        std::fill(acc.begin(), acc.end(), std::numeric_limits<T>::quiet_NaN());
        lse_row = std::numeric_limits<T>::quiet_NaN();
      } else if (mx == -std::numeric_limits<T>::infinity()) {
        lse_row = std::numeric_limits<T>::infinity();  // no visible key: zeros
      } else {
        T sum = 0;
        for (int64_t c = 0; c < nsplit; ++c) sum += std::exp(part_lse[c * rows_all + row] - mx);
        lse_row = mx + std::log(sum);
        for (int64_t c = 0; c < nsplit; ++c) {
          const T w = std::exp(part_lse[c * rows_all + row] - lse_row);
          if (w == T(0)) continue;  // (also a chunk with no visible key: its rows are not read)
          const T* po = part_out + (c * rows_all + row) * p.Ev;
          for (int64_t e = 0; e < p.Ev; ++e) acc[e] += w * po[e];
        }
      }
      ld[b * lse.stride(0) + h * lse.stride(1) + i] = lse_row;
      In* o = od + b * out.stride(0) + h * out.stride(1) + i * os2;
      if constexpr (std::is_same_v<In, at::BFloat16>) {
        rows::to_bf16(acc.data(), reinterpret_cast<uint16_t*>(o), p.Ev);
      } else {  // float, double; float16 rounds each value in c10::Half(float), as the unsplit path
        std::copy_n(acc.data(), p.Ev, o);
      }
    }
  });
}

// T: accumulation type (float, double); In: operand type (T, or bfloat16 / float16 with T = float).
// float16 runs the float GEMMs on blocks converted to float (Q per query block, K and V as packed).
// q, k, v: last dim contiguous, any other strides (bfloat16: k's rows and their pairs 4-byte aligned,
// see bf16_pairs_aligned). out: (B, H, Lq, Ev) in In, last dim contiguous; lse (B, H, Lq) in T,
// last dim contiguous.
template <typename T, typename In>
void forward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& lse) {
  constexpr bool kBf16 = std::is_same_v<In, at::BFloat16>;
  constexpr bool kHalf = std::is_same_v<In, at::Half>;
  using Packed = std::conditional_t<kHalf, T, In>;  // the element type of packed K (and V)
  const int64_t BQ = std::min(kBlockQ, p.Lq), BK = key_block(p.Lk);
  const int64_t BKp = (BK + 1) & ~int64_t(1);  // P's row length, even for the VNNI reduction
  const int64_t LK = scratch_ld(BK);            // the leading dimension of S and (float) K_j^T
  const int64_t nqb = (p.Lq + BQ - 1) / BQ;
  const In* qd = q.const_data_ptr<In>();
  const In* kd = k.const_data_ptr<In>();
  const In* vd = v.const_data_ptr<In>();
  In* od = out.data_ptr<In>();
  T* ld = lse.data_ptr<T>();
  const T scale = static_cast<T>(p.scale);
  const T inv_keep = static_cast<T>(p.inv_keep);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  // The threads the tasks spread over (1 when called inside a parallel region), and the scratch
  // slots: one per thread id that may run a task.
  const int64_t nthreads = task_threads();
  const int64_t scratch_threads = std::max<int64_t>(at::get_num_threads(), at::get_thread_num() + 1);
  // A task is a run of query blocks of one kv head's group of query heads (G = 1 without GQA), which
  // shares one packed copy of the kv head's visible keys and (bfloat16) values (pack_key_block);
  // runs are cut short enough to leave about 8 tasks per thread for balance. Past kMaxKeptBlocks key
  // blocks, each block is packed where it is used instead, so that the scratch stays
  // O(threads * BK * E) for long key sequences. A run's items are (query head in group, query block).
  constexpr int64_t kMaxKeptBlocks = 16;
  const bool direct_scores = !kBf16 && !kHalf && p.Lq <= kDecodeMaxLq;  // nothing to pack then
  // Grouped-query decoding (float, Lq = 1): the group's G query rows (one per head, row stride qs1)
  // are one item, so each K and V row is read once for the group, not once per query head. The
  // scores' dot products sum in the same order for any number of rows (small_gemm::dot_rows), so
  // backward's recomputation, one head at a time, still gives the forward's scores to the bit.
  const bool group_rows = direct_scores && std::is_same_v<In, float> && p.Lq == 1 && p.G > 1;
  const int64_t RQ = group_rows ? p.G : BQ;  // rows of an item
  const int64_t nitems = group_rows ? 1 : p.G * nqb, nunits = p.B * p.Hkv;
  const int64_t runs_per_unit = std::clamp<int64_t>((8 * nthreads + nunits - 1) / nunits, 1, nitems);
  const int64_t run = (nitems + runs_per_unit - 1) / runs_per_unit, nruns = (nitems + run - 1) / run;
  const bool keep_packed = num_key_blocks(p.Lk) <= kMaxKeptBlocks;
  const int64_t slots = direct_scores ? 0 : keep_packed ? num_key_blocks(p.Lk) : 1;  // packed K^T blocks
  // Packed block sizes in In elements, and their scratch in T elements (bfloat16: two per T).
  const int64_t kt_block = p.E * (kBf16 ? BKp : LK), v_block = kBf16 ? BKp * p.Ev : (kHalf ? BK * p.Ev : 0);
  const int64_t kt_size = aligned_slice<T>(kt_block * slots * sizeof(Packed) / sizeof(T));
  const int64_t v_size = aligned_slice<T>(v_block * slots * sizeof(Packed) / sizeof(T));
  // Per-thread scratch: packed K (and V), scores, output accumulator, row max / sum, one bias row,
  // dropout factors, and (bfloat16) P rounded for the second GEMM or (float16) Q_i and K_j in float.
  const int64_t per_thread = kt_size + v_size +
      aligned_slice<T>(RQ * LK + RQ * p.Ev + 2 * RQ + BK + BK + (kBf16 ? (BQ * BKp + 1) / 2 : 0) +
                       (kHalf ? (BQ + BK) * p.E : 0));
  const at::Tensor scratch_t = aligned_scratch<T>(per_thread * scratch_threads);
  T* const scratch = scratch_t.data_ptr<T>();
  // Decoding (few rows, many keys): too few tasks to keep every thread busy, so the keys are split
  // into nsplit chunks of whole key blocks, each chunk a task of its own with a partial result
  // (normalised output and log-sum-exp), merged by merge_key_splits.
  const int64_t nkb = num_key_blocks(p.Lk);
  int64_t nsplit = 1;
  if (p.Lq <= kDecodeMaxLq && nunits * nruns < 2 * nthreads && nthreads > 1 && nkb > 1)
    nsplit = std::min<int64_t>(nkb, (4 * nthreads + nunits * nruns - 1) / (nunits * nruns));
  const int64_t split_blocks = (nkb + nsplit - 1) / nsplit;
  at::Tensor part_out_t, part_lse_t;
  if (nsplit > 1) {
    part_out_t = at::empty({nsplit, p.B, p.H, p.Lq, p.Ev}, lse.options());
    part_lse_t = at::empty({nsplit, p.B, p.H, p.Lq}, lse.options());
  }
  const int64_t ntasks = nunits * nruns * nsplit;
  parallel_tasks(ntasks, [&](int64_t t, int tid) {
    // Causal: later query blocks see more keys; taking them first balances the tail.
    const int64_t task_split = p.causal ? ntasks - 1 - t : t;
    const int64_t split = task_split % nsplit, task = task_split / nsplit;
    const int64_t bk = task / nruns, b = bk / p.Hkv, hk = bk % p.Hkv;
    // This task's keys: the whole visible range, or its chunk of whole key blocks when split.
    const int64_t jbeg = std::min(p.kbeg[b] + split * split_blocks * BK, p.kend[b]);
    const int64_t jend = nsplit > 1 ? std::min(jbeg + split_blocks * BK, p.kend[b]) : p.kend[b];
    const int64_t it0 = (task % nruns) * run, it1 = std::min(nitems, it0 + run);
    Packed* kT = reinterpret_cast<Packed*>(scratch + tid * per_thread);
    Packed* vP = reinterpret_cast<Packed*>(scratch + tid * per_thread + kt_size);
    T* S = scratch + tid * per_thread + kt_size + v_size;
    T* acc = S + RQ * LK;
    T* m = acc + RQ * p.Ev;
    T* l = m + RQ;
    T* bias = l + RQ;
    T* z = bias + BK;
    uint16_t* Pb = reinterpret_cast<uint16_t*>(z + BK);
    T* Qf = z + BK;           // float16: Q_i in float
    T* Kf = Qf + BQ * p.E;    // float16: K_j in float, before its transpose
    auto pack = [&](int64_t j0, int64_t slot) {
      pack_key_block(kd + b * ks0 + hk * ks1 + j0 * ks2, ks2, vd + b * vs0 + hk * vs1 + j0 * vs2, vs2,
                     std::min(BK, p.kend[b] - j0), p.E, p.Ev, kBf16 ? BK : LK, kT + slot * kt_block,
                     vP + slot * v_block, Kf);
    };
    if (keep_packed && !direct_scores) {
      int64_t jpack = jbeg;  // the keys any item of the run sees
      for (int64_t it = it0; it < it1; ++it) {
        const int64_t i0 = (it % nqb) * BQ;
        jpack = std::max(jpack, std::min(jend, p.key_limit(b, i0, std::min(BQ, p.Lq - i0))));
      }
      for (int64_t j0 = jbeg, jb = 0; j0 < jpack; j0 += BK, ++jb) pack(j0, jb);
    }
    for (int64_t it = it0; it < it1; ++it) {
      // Row r of the item: head h + r and query i0 (group_rows), else head h and query i0 + r.
      const int64_t h = group_rows ? hk * p.G : hk * p.G + it / nqb, bh = b * p.H + h;
      const int64_t i0 = group_rows ? 0 : (it % nqb) * BQ, nq = group_rows ? p.G : std::min(BQ, p.Lq - i0);
      const int64_t dh = group_rows ? 1 : 0, di = group_rows ? 0 : 1;
      const int64_t qrs = group_rows ? qs1 : qs2;  // Q's row stride in the item
      const int64_t jlim = std::min(jend, p.key_limit(b, i0, group_rows ? 1 : nq));
      std::fill_n(acc, nq * p.Ev, T(0));
      std::fill_n(m, nq, -std::numeric_limits<T>::infinity());
      std::fill_n(l, nq, T(0));
      const In* qb = qd + b * qs0 + h * qs1 + i0 * qs2;
      if constexpr (kHalf)
        for (int64_t r = 0; r < nq; ++r) half_to_float(qb + r * qrs, Qf + r * p.E, p.E);
      for (int64_t j0 = jbeg, jb = 0; j0 < jlim; j0 += BK, ++jb) {
        // Causal: only the blocks up to the diagonal run, the last one cut at the last row's limit.
        const int64_t nk = std::min(BK, jlim - j0), slot = keep_packed ? jb : 0;
        if (!keep_packed && !direct_scores) pack(j0, slot);
        if constexpr (kBf16) {  // S = Q_i K_j^T
          at::native::cpublas::brgemm(nq, nk, p.E, qs2, BKp, LK, false, qb, kT + slot * kt_block, S, true);
        } else if constexpr (kHalf) {
          gemm(nq, nk, p.E, Qf, p.E, kT + slot * kt_block, LK, S, LK, false);
        } else if (direct_scores) {
          scores_from_key_rows(nq, nk, p.E, qb, qrs, kd + b * ks0 + hk * ks1 + j0 * ks2, ks2, S, LK);
        } else {
          gemm(nq, nk, p.E, qb, qrs, kT + slot * kt_block, LK, S, LK, false);
        }
        for (int64_t r = 0; r < nq; ++r) {
          T* s = S + r * LK;
          const int64_t hr = h + r * dh, ir = i0 + r * di;
          const T* brow = bias_for_row(p, b, hr, ir, j0, nk, bias);
          const int64_t nv = p.causal_cols(ir, j0, nk);  // the row's keys left of the diagonal
          const T mx = rows::scale_bias_max(s, brow, nv, scale);
          // NaN is sticky: a NaN score (returned as mx) or an earlier one (in m) makes the row NaN.
          const T mnew = std::isnan(mx) ? mx : std::max(m[r], mx);
          // bfloat16 without dropout: P's row goes straight to its bfloat16 copy, in one pass.
          bool rounded = false;
          if (mnew == -std::numeric_limits<T>::infinity()) {  // nothing visible yet in this row
            std::fill_n(s, nk, T(0));
          } else {
            T sum;
            if constexpr (kBf16) {
              rounded = !p.dropout;
              sum = rounded ? rows::exp_sum_to_bf16(s, nv, mnew, Pb + r * BKp) : rows::exp_sum(s, nv, mnew);
            } else {
              sum = rows::exp_sum(s, nv, mnew);
            }
            std::fill_n(s + nv, nk - nv, T(0));
            const T alpha = std::exp(m[r] - mnew);  // 0 on the first visible block
            if (alpha != T(1)) rows::scale(acc + r * p.Ev, p.Ev, alpha);
            l[r] = l[r] * alpha + sum;
            m[r] = mnew;
            if (p.dropout) {
              // The row sum above is of the undropped probabilities; only P V sees the mask.
              rows::dropout_factors_row(z, dropout_row_key(p.seed, bh + r * dh + p.head0, p.Lq, ir),
                                        static_cast<uint32_t>(j0), nk, p.threshold, inv_keep);
              rows::mul(s, z, nk);
            }
          }
          if constexpr (kBf16) {
            if (rounded) {
              std::fill_n(Pb + r * BKp + nv, nk - nv, uint16_t(0));
            } else {
              rows::to_bf16(s, Pb + r * BKp, nk);
            }
            if (nk & 1) Pb[r * BKp + nk] = 0;  // the pad of the last VNNI pair
          }
        }
        if constexpr (kBf16) {  // O_i += P V_j
          at::native::cpublas::brgemm(nq, p.Ev, (nk + 1) & ~int64_t(1), BKp, p.Ev, p.Ev, true,
                                      reinterpret_cast<const at::BFloat16*>(Pb), vP + slot * v_block, acc, true);
        } else if constexpr (kHalf) {
          gemm(nq, p.Ev, nk, S, LK, vP + slot * v_block, p.Ev, acc, p.Ev, true);
        } else if (direct_scores) {
          values_from_rows(nq, p.Ev, nk, S, LK, vd + b * vs0 + hk * vs1 + j0 * vs2, vs2, acc);
        } else {
          gemm(nq, p.Ev, nk, S, LK, vd + b * vs0 + hk * vs1 + j0 * vs2, vs2, acc, p.Ev, true);
        }
      }
      // A partial result: normalised rows and their lse (-inf: no key in this chunk). An item's rows
      // are consecutive there either way (group_rows: one query, so the group's heads are).
      if (nsplit > 1) {
        T* po = part_out_t.data_ptr<T>() + ((split * p.B * p.H + bh) * p.Lq + i0) * p.Ev;
        T* pl = part_lse_t.data_ptr<T>() + (split * p.B * p.H + bh) * p.Lq + i0;
        for (int64_t r = 0; r < nq; ++r) {
          if (l[r] != T(0)) rows::scale(acc + r * p.Ev, p.Ev, T(1) / l[r]);
          pl[r] = l[r] != T(0) ? m[r] + std::log(l[r]) : -std::numeric_limits<T>::infinity();
          std::copy_n(acc + r * p.Ev, p.Ev, po + r * p.Ev);
        }
        continue;
      }
      In* ob = od + b * os0 + h * os1 + i0 * os2;
      T* lb = ld + b * lse.stride(0) + h * lse.stride(1) + i0;
      const int64_t ors = group_rows ? os1 : os2, lrs = group_rows ? lse.stride(1) : 1;  // row strides
      for (int64_t r = 0; r < nq; ++r) {
        // l is exactly 0 only when no key was visible; a NaN score makes it NaN, which must reach the
        // output (as in the reference) rather than be mistaken for "no visible key" by a `> 0` test.
        if (l[r] != T(0)) {
          rows::scale(acc + r * p.Ev, p.Ev, T(1) / l[r]);
          lb[r * lrs] = m[r] + std::log(l[r]);
        } else {  // no visible key: zeros, and lse = +inf so that backward's probabilities are 0
          std::fill_n(acc + r * p.Ev, p.Ev, T(0));
          lb[r * lrs] = std::numeric_limits<T>::infinity();
        }
        if constexpr (kBf16) {
          rows::to_bf16(acc + r * p.Ev, reinterpret_cast<uint16_t*>(ob + r * ors), p.Ev);
        } else {
          std::copy_n(acc + r * p.Ev, p.Ev, ob + r * ors);
        }
      }
    }
    if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release(kBf16);
  });
  if (nsplit > 1)
    merge_key_splits<T, In>(p, part_out_t.const_data_ptr<T>(), part_lse_t.const_data_ptr<T>(), nsplit, out, lse);
}

// ------------------------------------------------------------------------------------------ backward

// D_i = rowsum(dO_i * O_i) (= sum_j P_ij dP_ij, with dropout too: O already carries the mask).
template <typename T>
at::Tensor row_dot(const at::Tensor& dout, const at::Tensor& out, const Problem& p) {
  at::Tensor D = at::empty({p.B, p.H, p.Lq}, out.options());
  const T* a = dout.const_data_ptr<T>();
  const T* o = out.const_data_ptr<T>();
  T* d = D.data_ptr<T>();
  const int64_t as0 = dout.stride(0), as1 = dout.stride(1), as2 = dout.stride(2);
  const int64_t os0 = out.stride(0), os1 = out.stride(1), os2 = out.stride(2);
  constexpr int64_t kChunk = 256;  // rows per task
  const int64_t nchunks = (p.Lq + kChunk - 1) / kChunk;
  at::parallel_for(0, p.B * p.H * nchunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nchunks, b = bh / p.H, h = bh % p.H, i0 = (t % nchunks) * kChunk;
      rows::dot_rows(a + b * as0 + h * as1 + i0 * as2, as2, o + b * os0 + h * os1 + i0 * os2, os2,
                     std::min(kChunk, p.Lq - i0), p.Ev, d + bh * p.Lq + i0);
    }
  });
  return D;
}

// q, k, v, dout: last dim contiguous. lse and D (B, H, Lq), last dim contiguous. dq_acc (key chunks or 1, B,
// H, Lq, E) zeroed, last dim contiguous; dk, dv last dim contiguous (every row is written).
template <typename T>
void backward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& D, at::Tensor& dq_acc,
                     at::Tensor& dk, at::Tensor& dv, int64_t nkb_per_task, bool per_thread_dq, int64_t hsplit) {
  const int64_t BQ = std::min(kBlockQ, std::max<int64_t>(p.Lq, 1)), BK = key_block(p.Lk);
  const int64_t LK = scratch_ld(BK);  // the leading dimension of the key-block-wide scratch
  const int64_t nkb = num_key_blocks(p.Lk);
  const int64_t nchunks = (nkb + nkb_per_task - 1) / nkb_per_task;
  const T scale = static_cast<T>(p.scale);
  const T inv_keep = static_cast<T>(p.inv_keep);
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  const T* dod = dout.const_data_ptr<T>();
  const T* lsed = lse.const_data_ptr<T>();
  const T* Dd = D.const_data_ptr<T>();
  T* dqd = dq_acc.data_ptr<T>();
  T* dkd = dk.data_ptr<T>();
  T* dvd = dv.data_ptr<T>();
  const int64_t dks2 = dk.stride(3), dvs2 = dv.stride(3);
  const int64_t qs2 = q.stride(2), ks2 = k.stride(2), vs2 = v.stride(2), dos2 = dout.stride(2);
  const int64_t scratch_threads = std::max<int64_t>(at::get_num_threads(), at::get_thread_num() + 1);
  const int64_t dqs2 = dq_acc.stride(3);
  // Per-thread scratch: K_j^T and V_j^T (E x BK, Ev x BK: the score GEMMs' B operands, laid out
  // as in the forward), P, dP / dS, dropout factors (each BQ x BK), dK^T and dV^T accumulators
  // (E x BK, Ev x BK), Q_i^T and dO_i^T (E x BQ, Ev x BQ), bias row; rows BK wide are LK apart.
  const int64_t per_thread = aligned_slice<T>(p.E * LK) + aligned_slice<T>(p.Ev * LK) +
                             aligned_slice<T>(3 * BQ * LK + (LK + BQ) * (p.E + p.Ev) + LK);
  const at::Tensor scratch_t = aligned_scratch<T>(per_thread * scratch_threads);
  T* const scratch = scratch_t.data_ptr<T>();
  // A task is a chunk of key blocks of one kv head, for every query head of its group: dK and dV sum
  // over the group in the task's accumulators, and each K / V block is transposed once for the group.
  // With hsplit > 1 (grouped-query attention with few kv heads), a task takes a subgroup of the query
  // heads, and dK / dV go to the subgroup's own slice of dk / dv (hsplit, B, H_kv, Lk, E|Ev), summed after.
  const int64_t ntasks = p.B * p.Hkv * hsplit * nchunks;
  const bool direct_scores = p.Lq <= kDecodeMaxLq;  // as the forward formed them
  parallel_tasks(ntasks, [&](int64_t t, int tid) {
    const int64_t task = t;  // causal: early key blocks (the costly ones) already come first
    const int64_t hs = (task / nchunks) % hsplit, bk = task / nchunks / hsplit, b = bk / p.Hkv, hk = bk % p.Hkv;
    const int64_t g_begin = hs * p.G / hsplit, g_end = (hs + 1) * p.G / hsplit;
    const int64_t kb_first = (task % nchunks) * nkb_per_task;
    T* kT = scratch + tid * per_thread;
    T* vT = kT + aligned_slice<T>(p.E * LK);
    T* P = vT + aligned_slice<T>(p.Ev * LK);
    T* DS = P + BQ * LK;
    T* Z = DS + BQ * LK;
    T* dKt = Z + BQ * LK;
    T* dVt = dKt + p.E * LK;
    T* Qt = dVt + p.Ev * LK;
    T* dOt = Qt + p.E * BQ;
    T* bias = dOt + p.Ev * BQ;
    for (int64_t kb = kb_first; kb < std::min(nkb, kb_first + nkb_per_task); ++kb) {
      // Key block kb computes keys [j0, j1): the forward's kb-th block of the batch's visible range.
      // Rows outside that range have zero gradient: slot [a0, a1) of the key axis zeroes its share.
      const int64_t j0 = std::min(p.kbeg[b] + kb * BK, p.kend[b]), j1 = std::min(j0 + BK, p.kend[b]);
      const int64_t nk = j1 - j0;
      const int64_t a0 = kb * BK, a1 = std::min(p.Lk, a0 + BK);
      T* dk_out = dkd + hs * dk.stride(0) + b * dk.stride(1) + hk * dk.stride(2);
      T* dv_out = dvd + hs * dv.stride(0) + b * dv.stride(1) + hk * dv.stride(2);
      for (int64_t j = a0; j < a1; ++j) {
        if (j >= p.kbeg[b] && j < p.kend[b]) continue;
        std::fill_n(dk_out + j * dks2, p.E, T(0));
        std::fill_n(dv_out + j * dvs2, p.Ev, T(0));
      }
      if (nk == 0) continue;
      const T* kr = kd + b * k.stride(0) + hk * k.stride(1) + j0 * ks2;
      if (!direct_scores) transpose(kr, ks2, nk, p.E, kT, LK);
      transpose(vd + b * v.stride(0) + hk * v.stride(1) + j0 * vs2, vs2, nk, p.Ev, vT, LK);
      std::fill_n(dKt, p.E * LK, T(0));
      std::fill_n(dVt, p.Ev * LK, T(0));
      // Causal: the query blocks before the first row that sees key j0 have nothing here.
      const int64_t i_first = p.causal ? std::clamp<int64_t>(j0 - p.causal_offset, 0, p.Lq) / BQ * BQ : 0;
      for (int64_t g = g_begin; g < g_end; ++g) {
        const int64_t h = hk * p.G + g, bh = b * p.H + h;
        // dQ partial sums per key chunk, not per thread: tasks go to threads dynamically, so a
        // per-thread sum would add in a run-dependent order; per chunk, the final sum's order is fixed.
        T* dqb = dqd + (per_thread_dq ? (task % nchunks) * dq_acc.stride(0) : 0) + b * dq_acc.stride(1) +
                 h * dq_acc.stride(2);
        const T* qb = qd + b * q.stride(0) + h * q.stride(1);
        const T* dob = dod + b * dout.stride(0) + h * dout.stride(1);
        const T* lseb = lsed + b * lse.stride(0) + h * lse.stride(1);
        const T* Db = Dd + b * D.stride(0) + h * D.stride(1);
        for (int64_t i0 = i_first; i0 < p.Lq; i0 += BQ) {
          const int64_t nq = std::min(BQ, p.Lq - i0);
          // The forward's width for this (query block, key block) pair: cut at the causal diagonal.
          const int64_t nkq = std::min(j1, p.key_limit(b, i0, nq)) - j0;
          if (nkq <= 0) continue;
          const T* qi = qb + i0 * qs2;
          const T* doi = dob + i0 * dos2;
          // S = Q_i K_j^T and P = exp(S * scale + bias - lse), row by row with the forward's GEMM and
          // its rounding of S * scale + bias, so that P is the forward's to the bit (transposed, the
          // GEMM may sum the head dim in another order: one ulp of a 1e5 logit is 1% of a probability).
          if (direct_scores) {
            scores_from_key_rows(nq, nkq, p.E, qi, qs2, kr, ks2, P, LK);
          } else {
            gemm(nq, nkq, p.E, qi, qs2, kT, LK, P, LK, false);
          }
          for (int64_t r = 0; r < nq; ++r) {
            const T* brow = bias_for_row(p, b, h, i0 + r, j0, nkq, bias);
            const int64_t nv = p.causal_cols(i0 + r, j0, nkq);
            rows::probs_from_scores(P + r * LK, brow, nv, scale, lseb[i0 + r]);
            std::fill_n(P + r * LK + nv, nkq - nv, T(0));
          }
          const T* PZ = P;
          if (p.dropout) {
            // DS temporarily holds P * Z (the probabilities that reached the output).
            for (int64_t r = 0; r < nq; ++r) {
              rows::dropout_factors_row(Z + r * LK, dropout_row_key(p.seed, bh + p.head0, p.Lq, i0 + r),
                                        static_cast<uint32_t>(j0), nkq, p.threshold, inv_keep);
              std::copy_n(P + r * LK, nkq, DS + r * LK);
              rows::mul(DS + r * LK, Z + r * LK, nkq);
            }
            PZ = DS;
          }
          transpose(doi, dos2, nq, p.Ev, dOt, BQ);
          gemm(p.Ev, nkq, nq, dOt, BQ, PZ, LK, dVt, LK, true);  // dV_j^T += dO_i^T (P Z)
          gemm(nq, nkq, p.Ev, doi, dos2, vT, LK, DS, LK, false);  // dP = dO_i V_j^T
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t nv = p.causal_cols(i0 + r, j0, nkq);
            if (p.dropout) rows::mul(DS + r * LK, Z + r * LK, nv);
            rows::dscore(DS + r * LK, P + r * LK, DS + r * LK, Db[i0 + r], lseb[i0 + r], nv, scale);  // dS, scaled
            std::fill_n(DS + r * LK + nv, nkq - nv, T(0));  // keys right of the diagonal: never seen
          }
          transpose(qi, qs2, nq, p.E, Qt, BQ);
          gemm(p.E, nkq, nq, Qt, BQ, DS, LK, dKt, LK, true);                  // dK_j^T += Q_i^T dS
          gemm(nq, p.E, nkq, DS, LK, kr, ks2, dqb + i0 * dqs2, dqs2, true);   // dQ_i += dS K_j
        }
      }
      transpose(dKt, LK, p.E, nk, dk_out + j0 * dks2, dks2);
      transpose(dVt, LK, p.Ev, nk, dv_out + j0 * dvs2, dvs2);
    }
    if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release(false);
  });
}

}  // namespace

// ------------------------------------------------------------------------------------------ entry points

void attention_forward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       at::Tensor& out, at::Tensor& lse) {
  if (lse.numel() == 0) return;
  switch (q.scalar_type()) {
    case at::kBFloat16:
      TORCH_CHECK(bf16_in_place(p.E), "mmkernels: internal: no bfloat16 forward for head dim ", p.E, " on this CPU");
      forward_kernel<float, at::BFloat16>(p, q, k, v, out, lse);
      break;
    case at::kHalf: forward_kernel<float, at::Half>(p, q, k, v, out, lse); break;
    case at::kDouble: forward_kernel<double, double>(p, q, k, v, out, lse); break;
    default: forward_kernel<float, float>(p, q, k, v, out, lse);
  }
}

at::Tensor attention_row_dot(const at::Tensor& dout, const at::Tensor& out, const Problem& p) {
  return dout.scalar_type() == at::kDouble ? row_dot<double>(dout, out, p) : row_dot<float>(dout, out, p);
}

void attention_backward(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& D, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv) {
  // Key blocks of one head on one task when there are enough heads to keep every thread busy;
  // otherwise each key block is a task and dQ is accumulated per thread, then summed.
  const int64_t nthreads = task_threads();
  const int64_t nkb = num_key_blocks(p.Lk);
  int64_t per_task = std::max<int64_t>(nkb, 1);
  // Tasks per kv head: a task covers its group of query heads, or with few kv heads a subgroup
  // (hsplit of them: dK / dV partials of k's size each, not dQ partials of q's size).
  int64_t hsplit = 1;
  if (p.G > 1 && p.B * p.Hkv > 0 && p.B * p.Hkv < 4 * nthreads && nthreads > 1)
    hsplit = std::min<int64_t>(p.G, (4 * nthreads + p.B * p.Hkv - 1) / (p.B * p.Hkv));
  const int64_t units = p.B * p.Hkv * hsplit;
  if (units > 0 && units < 4 * nthreads && nthreads > 1) {
    const int64_t want_chunks = (4 * nthreads + units - 1) / units;
    per_task = std::max<int64_t>(1, (nkb + want_chunks - 1) / want_chunks);
  }
  const bool per_thread_dq = per_task < nkb && nthreads > 1;
  // One dQ accumulator per key chunk (about 4 * threads / (B * H_kv) of them): bitwise deterministic.
  const int64_t nchunks = (nkb + per_task - 1) / per_task;
  // With one accumulator it is dq itself, in dq's layout.
  at::Tensor dq_acc = per_thread_dq ? at::zeros({nchunks, p.B, p.H, p.Lq, p.E}, dq.options()) : dq.zero_().unsqueeze(0);
  at::Tensor dk_acc = hsplit > 1 ? at::empty({hsplit, p.B, p.Hkv, p.Lk, p.E}, dk.options()) : dk.unsqueeze(0);
  at::Tensor dv_acc = hsplit > 1 ? at::empty({hsplit, p.B, p.Hkv, p.Lk, p.Ev}, dv.options()) : dv.unsqueeze(0);
  if (p.B * p.H * p.Lk > 0) {
    if (q.scalar_type() == at::kDouble) {
      backward_kernel<double>(p, q, k, v, dout, lse, D, dq_acc, dk_acc, dv_acc, per_task, per_thread_dq, hsplit);
    } else {
      backward_kernel<float>(p, q, k, v, dout, lse, D, dq_acc, dk_acc, dv_acc, per_task, per_thread_dq, hsplit);
    }
    if (hsplit > 1) {  // every row of every slice was written by its tasks
      at::sum_out(dk, dk_acc, 0);
      at::sum_out(dv, dv_acc, 0);
    }
  } else {
    dk.zero_();
    dv.zero_();
  }
  if (per_thread_dq) at::sum_out(dq, dq_acc, 0);
}

namespace {

// ------------------------------------------------------------------------------------------ ops

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> cross_modal_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask, double scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  const auto ct = compute_type(q.scalar_type());  // make_problem checks q, k, v
  Problem p =
      make_problem(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal, ct);
  at::Tensor lse = at::empty({p.B, p.H, p.Lq}, q.options().dtype(ct));
  if (q.scalar_type() == at::kBFloat16 && bf16_in_place(p.E)) {
    // bfloat16 GEMMs on the inputs (float32 accumulation), K and V packed per task.
    at::Tensor out = empty_attention_out(p.B, p.H, p.Lq, p.Ev, q.options());
    if (lse.numel() > 0)
      forward_kernel<float, at::BFloat16>(p, last_dim_contiguous(q), bf16_pairs_aligned(last_dim_contiguous(k)),
                                          last_dim_contiguous(v), out, lse);
    return {out, lse};
  }
  if (q.scalar_type() == at::kHalf) {
    // float16: float GEMMs on blocks converted as they are packed (no float copy of q, k or v).
    at::Tensor out = empty_attention_out(p.B, p.H, p.Lq, p.Ev, q.options());
    if (lse.numel() > 0)
      forward_kernel<float, at::Half>(p, last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), out,
                                      lse);
    return {out, lse};
  }
  const at::Tensor qc = last_dim_contiguous(q.to(ct));
  const at::Tensor kc = last_dim_contiguous(k.to(ct));
  const at::Tensor vc = last_dim_contiguous(v.to(ct));
  at::Tensor out = empty_attention_out(p.B, p.H, p.Lq, p.Ev, q.options().dtype(ct));
  if (lse.numel() > 0) {
    if (ct == at::kDouble) {
      forward_kernel<double, double>(p, qc, kc, vc, out, lse);
    } else {
      forward_kernel<float, float>(p, qc, kc, vc, out, lse);
    }
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask, double scale,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  const auto ct = compute_type(q.scalar_type());  // make_problem checks q, k, v
  Problem p =
      make_problem(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, dropout_p, dropout_seed, causal, ct);
  MMK_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({p.B, p.H, p.Lq, p.Ev}), "grad_out", "expected shape (", p.B,
                ", ", p.H, ", ", p.Lq, ", ", p.Ev, "), got ", grad_out.sizes());
  MMK_CHECK_ARG(out.sizes() == grad_out.sizes(), "out", "expected shape ", grad_out.sizes(), ", got ", out.sizes());
  MMK_CHECK_ARG(lse.sizes() == at::IntArrayRef({p.B, p.H, p.Lq}), "lse", "expected shape (", p.B, ", ", p.H, ", ",
                p.Lq, "), got ", lse.sizes());
  const at::Tensor qc = last_dim_contiguous(q.to(ct));
  const at::Tensor kc = last_dim_contiguous(k.to(ct));
  const at::Tensor vc = last_dim_contiguous(v.to(ct));
  const at::Tensor doc = last_dim_contiguous(grad_out.to(ct));
  const at::Tensor oc = last_dim_contiguous(out.to(ct));
  const at::Tensor lsec = lse.to(ct).contiguous();
  at::Tensor dq = empty_grad_like(q, ct);
  at::Tensor dk = empty_grad_like(k, ct);
  at::Tensor dv = empty_grad_like(v, ct);
  attention_backward(p, qc, kc, vc, doc, lsec, attention_row_dot(doc, oc, p), dq, dk, dv);
  const auto dt = q.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("cross_modal_attention", &cross_modal_attention_cpu);
  m.impl("cross_modal_attention_backward", &cross_modal_attention_backward_cpu);
}

}  // namespace mmkernels::cpu
