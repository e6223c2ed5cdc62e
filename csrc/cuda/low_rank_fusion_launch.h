// Host-side declarations of the low_rank_fusion CUDA kernels (low_rank_fusion_elementwise.cu): the
// table of modalities they read and their launchers. The host code (low_rank_fusion_cuda.cpp) runs
// the projections as GEMMs over a chunk of rows; these kernels do the rest, the part worth fusing.
//
// Layout of one chunk of `rows` rows: modality m's projection is a row-major (rows, R * N) matrix,
// element (r, k, n) at r * R * N + k * N + n (the GEMM x_m @ F_m[:, :D_m, :] as one (D_m, R * N)
// matrix), in the compute type acc_t (float for float16 / bfloat16 / float32, double for float64).
#pragma once
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>

namespace mmkernels::cuda {

// Modalities one launch reads. More are folded by the host first (their product taken with ATen
// into the last slot) in forward; backward with more runs ATen's elementwise ops instead.
constexpr int kLrfMaxModalities = 8;

template <typename acc_t>
struct LrfModalities {
  // x_m @ F_m[k, :D_m, :] for the chunk, (rows, R * N); null when D_m == 0 (the projection is the row alone).
  const acc_t* proj[kLrfMaxModalities];
  // F_m[k, D_m, :] (what the appended 1 picks) at k * N, (R * N,); null: nothing to add (a folded product).
  const acc_t* row[kLrfMaxModalities];
  // Backward: dP_m = g * w[k] * prod_{j != m} P_j is written here, (rows, R * N); may alias proj[m]
  // (each element is read before it is written, by the same thread); null: not wanted.
  acc_t* grad[kLrfMaxModalities];
  int32_t count;
};

// out (rows, N), contiguous: bias[n] + sum_k w[k] * prod_m P_m[r, k, n]. bias may be null; w is (R,) in acc_t.
template <typename T, typename acc_t>
void launch_lrf_forward(const LrfModalities<acc_t>& mods, const acc_t* w, const T* bias, T* out, int64_t rows, int64_t N,
                        int64_t R, cudaStream_t stream);

// Threads per block of both kernels, and the backward grid's width: its rank-weight partial sums
// are (R, lrf_backward_blocks(rows, N)), summed by the caller (a fixed order: deterministic).
constexpr int kLrfThreads = 256;
inline int lrf_backward_blocks(int64_t rows, int64_t N) {
  return static_cast<int>(std::clamp<int64_t>((rows * N + kLrfThreads - 1) / kLrfThreads, 1, 128));
}

// grad_out (rows, N), contiguous. Writes dP_m to mods.grad[m] and, when w_partial is not null,
// w_partial[k * blocks + b] = block b's share of sum_{r, n} grad_out[r, n] * prod_m P_m[r, k, n].
template <typename T, typename acc_t>
void launch_lrf_backward(const LrfModalities<acc_t>& mods, const T* grad_out, const acc_t* w, acc_t* w_partial,
                         int64_t rows, int64_t N, int64_t R, cudaStream_t stream);

}  // namespace mmkernels::cuda
