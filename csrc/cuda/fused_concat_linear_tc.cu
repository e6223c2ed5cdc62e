// The fused tensor-core forward of fused_concat_linear (fp16/bf16, sm_80+):
//   out = act(sum_s x_s @ W[:, cols_s].T + bias), one launch, no concatenation.
//
// Each CTA owns a BM x BN output tile and runs one K loop over all segments: the loader walks the
// segment table (base pointer, row stride, width, first weight column) and zero-pads each
// segment's tail tile, so segments of any width (17, 123, ...) sum into the same float32
// accumulators. Tiles go global -> shared through a 3-stage cp.async pipeline (16-byte copies with
// zero-fill when the segment is 16-byte aligned, element-wise loads otherwise); fragments feed
// mma.sync m16n8k16 (row.col: x is row-major M x K and W is N x K, both K-contiguous, exactly the
// A and B layouts the instruction wants, so no transpose is needed). Bias, the pre-activation
// copy and the activation run in the epilogue on the float32 accumulators.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "fcl_launch.h"

namespace mmkernels::cuda {
namespace {

constexpr int kThreads = 128;              // 4 warps, each owning a 32 x 32 piece of the tile
constexpr int kStages = 3;                 // cp.async pipeline depth
constexpr int kRowElems = kTileK + 8;      // padded smem row: 80 B apart, so the 8 rows a fragment
                                           // read touches land in distinct banks
constexpr int kChunksPerRow = kTileK / 8;  // 16-byte chunks per tile row

#ifdef MMK_EMU
// Emulation build (csrc/emu): the same instructions, executed by the CPU executor.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  ::mmk_emu::cp_async16(smem, gmem, src_bytes);
}
__device__ __forceinline__ void cp_async_commit() { ::mmk_emu::cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  ::mmk_emu::cp_async_wait(N);
}
#else
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  // src_bytes < 16 zero-fills the rest: the tails of segments and of M / N come for free.
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#endif  // MMK_EMU

__device__ __forceinline__ uint32_t lds32(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// D = A (16x16, row) * B (16x8, col) + D, float32 accumulation.
#ifdef MMK_EMU
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::mmk_emu::mma_m16n8k16(d, a, b, std::is_same_v<T, c10::BFloat16>);
}
#else
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

#endif  // MMK_EMU

// Loads rows [row0, row0 + ROWS) x columns [k0, k0 + kTileK) of a row-major 16-bit matrix with
// `width` columns and `row_limit` rows into a padded smem tile; out-of-range elements become 0.
template <int ROWS>
__device__ __forceinline__ void load_tile(uint16_t* tile, const uint16_t* base, int64_t stride, int64_t row0,
                                          int64_t row_limit, int k0, int width, bool vec) {
  static_assert((ROWS * kChunksPerRow) % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int it = 0; it < ROWS * kChunksPerRow / kThreads; ++it) {
    const int c = threadIdx.x + it * kThreads;
    const int r = c / kChunksPerRow;
    const int k = k0 + (c % kChunksPerRow) * 8;
    const int64_t gr = row0 + r;
    const int valid = gr < row_limit ? min(max(width - k, 0), 8) : 0;
    uint16_t* dst = tile + r * kRowElems + (c % kChunksPerRow) * 8;
    if (vec) {
      // With nothing to read, point at the (valid) base: the copy reads 0 bytes and zero-fills.
      const uint16_t* src = valid > 0 ? base + gr * stride + k : base;
      cp_async16(dst, src, valid * 2);
    } else {
      alignas(16) uint16_t v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = e < valid ? base[gr * stride + k + e] : uint16_t(0);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
    }
  }
}

__device__ __forceinline__ float apply_activation(Activation a, float z) {
  switch (a) {
    case Activation::Relu: return activate<Activation::Relu, float>(z);
    case Activation::Gelu: return activate<Activation::Gelu, float>(z);
    case Activation::GeluTanh: return activate<Activation::GeluTanh, float>(z);
    case Activation::Silu: return activate<Activation::Silu, float>(z);
    case Activation::Tanh: return activate<Activation::Tanh, float>(z);
    case Activation::Sigmoid: return activate<Activation::Sigmoid, float>(z);
    default: return z;
  }
}

template <typename T>
__device__ __forceinline__ uint16_t to_bits(float v) {
  return T(v).x;
}

// Writes columns (col, col + 1) of one output row; the pair store needs an even N (4-byte alignment).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst_row, int64_t col, int64_t N, float v0, float v1) {
  if (col + 1 < N && (N % 2) == 0) {
    *reinterpret_cast<uint32_t*>(dst_row + col) = uint32_t(to_bits<T>(v0)) | (uint32_t(to_bits<T>(v1)) << 16);
  } else {
    if (col < N) dst_row[col] = T(v0);
    if (col + 1 < N) dst_row[col + 1] = T(v1);
  }
}

// The segment table is a __grid_constant__ parameter: the K loop indexes it with a runtime segment
// number, which would otherwise make the compiler copy the whole table to local memory.
template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(kThreads)
    fcl_tc_forward_kernel(const __grid_constant__ SegmentTable seg, const T* __restrict__ weight, int64_t w_stride,
                          const T* __restrict__ bias, T* __restrict__ out, T* __restrict__ preact, int64_t M,
                          int64_t N, Activation act) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  constexpr int MT = WM / 16, NT = WN / 8;  // mma tiles per warp
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "one warp per warp tile");
  static_assert(WM % 16 == 0 && WN % 8 == 0, "warp tile must be a multiple of the mma shape");
  __shared__ alignas(16) uint16_t smem[kStages][(BM + BN) * kRowElems];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int g = lane >> 2, t = lane & 3;  // fragment row group and thread-in-group
  const int64_t m0 = int64_t(blockIdx.x) * BM;
  const int64_t n0 = int64_t(blockIdx.y) * BN;
  const uint16_t* w16 = reinterpret_cast<const uint16_t*>(weight);

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // The loader's cursor: segment `ls`, column `lk` inside it. Tiles never straddle two segments.
  int ls = 0, lk = 0;
  auto load_next = [&](int stage) {
    const int width = seg.width[ls];
    const bool vec = (seg.vec_mask >> ls) & 1u;
    load_tile<BM>(smem[stage], static_cast<const uint16_t*>(seg.x[ls]), seg.x_stride[ls], m0, M, lk, width, vec);
    load_tile<BN>(smem[stage] + BM * kRowElems, w16 + seg.w_offset[ls], w_stride, n0, N, lk, width, vec);
    lk += kTileK;
    if (lk >= width) {
      lk = 0;
      ++ls;
    }
  };

  const int tiles = seg.k_tiles;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load_next(s);
    cp_async_commit();  // an empty group keeps the wait count below uniform
  }
  for (int kt = 0; kt < tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed (for this thread's copies) ...
    __syncthreads();               // ... for everyone's, and stage (kt - 1) is free again
    if (kt + kStages - 1 < tiles) load_next((kt + kStages - 1) % kStages);
    cp_async_commit();

    const uint16_t* As = smem[kt % kStages];
    const uint16_t* Bs = As + BM * kRowElems;
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      uint32_t a[MT][4], b[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const uint16_t* p = As + (wm * WM + i * 16 + g) * kRowElems + kk + 2 * t;
        a[i][0] = lds32(p);                      // rows g,     k 2t..2t+1
        a[i][1] = lds32(p + 8 * kRowElems);      // rows g + 8, k 2t..2t+1
        a[i][2] = lds32(p + 8);                  // rows g,     k 2t+8..
        a[i][3] = lds32(p + 8 * kRowElems + 8);  // rows g + 8, k 2t+8..
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint16_t* q = Bs + (wn * WN + j * 8 + g) * kRowElems + kk + 2 * t;
        b[j][0] = lds32(q);      // k 2t..2t+1, column g
        b[j][1] = lds32(q + 8);  // k 2t+8..,   column g
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }
  cp_async_wait<0>();

  // Epilogue: accumulator element e of tile (i, j) is row g (+8 for e >= 2), column 2t + (e & 1).
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + wm * WM + i * 16 + g + h * 8;
      if (row >= M) continue;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t col = n0 + wn * WN + j * 8 + 2 * t;
        float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (bias != nullptr) {
          if (col < N) v0 += static_cast<float>(bias[col]);
          if (col + 1 < N) v1 += static_cast<float>(bias[col + 1]);
        }
        if (preact != nullptr) store_pair<T>(preact + row * N, col, N, v0, v1);
        store_pair<T>(out + row * N, col, N, apply_activation(act, v0), apply_activation(act, v1));
      }
    }
  }
#else
  __trap();  // launched only on sm_80+ (checked on the host)
#endif
}

template <typename T, int BM, int BN, int WARPS_M, int WARPS_N>
void launch_config(const SegmentTable& seg, const T* weight, int64_t w_stride, const T* bias, T* out, T* preact,
                   int64_t M, int64_t N, Activation act, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + BM - 1) / BM), static_cast<unsigned>((N + BN - 1) / BN));
  fcl_tc_forward_kernel<T, BM, BN, WARPS_M, WARPS_N>
      <<<grid, kThreads, 0, stream>>>(seg, weight, w_stride, bias, out, preact, M, N, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Two tile shapes: N <= 32 (the narrowest projections) gets 128 x 32 tiles so that a CTA still does
// a useful amount of work per weight tile; everything else gets 64 x 64.
template <typename T>
void launch_tc_forward(const SegmentTable& seg, const T* weight, int64_t w_stride, const T* bias, T* out, T* preact,
                       int64_t M, int64_t N, Activation act, cudaStream_t stream) {
  if (N <= 32) {
    launch_config<T, 128, 32, 4, 1>(seg, weight, w_stride, bias, out, preact, M, N, act, stream);
  } else {
    launch_config<T, 64, 64, 2, 2>(seg, weight, w_stride, bias, out, preact, M, N, act, stream);
  }
}

template void launch_tc_forward<c10::Half>(const SegmentTable&, const c10::Half*, int64_t, const c10::Half*,
                                           c10::Half*, c10::Half*, int64_t, int64_t, Activation, cudaStream_t);
template void launch_tc_forward<c10::BFloat16>(const SegmentTable&, const c10::BFloat16*, int64_t,
                                               const c10::BFloat16*, c10::BFloat16*, c10::BFloat16*, int64_t,
                                               int64_t, Activation, cudaStream_t);

}  // namespace mmkernels::cuda
