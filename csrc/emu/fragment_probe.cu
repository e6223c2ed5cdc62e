// A one-warp kernel for the harness's own unit test (tests/emu/test_emu_collectives.py): it feeds
// the attention kernels' PTX wrappers (attn_device.cuh: ldmatrix x4 / x4.trans / x2.trans,
// mma.sync m16n8k16) with the same per-lane addressing the attention kernels use, so the emulated
// fragment layouts can be checked against a plain matmul.
#include "attn_device.cuh"

namespace mmkernels::cuda::attn {
namespace {

// a (16 x 16, M x K), bt (16 x 16, N x K), bk (16 x 16, K x N), all row-major 16-bit; outputs
// row-major float32: nt = a bt^T (16 x 16), nn = a bk (16 x 16), x2 = a bk[:, :8] (16 x 8).
template <bool kBF16>
__global__ void fragment_probe_kernel(const uint16_t* a, const uint16_t* bt, const uint16_t* bk, float* nt, float* nn,
                                      float* x2) {
  __shared__ __align__(16) uint16_t sA[16 * 16], sB[16 * 16], sV[16 * 16];
  const int lane = threadIdx.x, g = lane / 4, t4 = lane % 4;
  for (int e = lane; e < 256; e += 32) sA[e] = a[e], sB[e] = bt[e], sV[e] = bk[e];
  __syncwarp();
  uint32_t fa[4], fb[4], fv[4], f2[2];
  ldmatrix_x4(fa, sA + (lane % 16) * 16 + (lane / 16) * 8);
  ldmatrix_x4(fb, sB + ((lane % 8) + (lane / 16) * 8) * 16 + ((lane / 8) % 2) * 8);
  ldmatrix_x4_trans(fv, sV + ((lane % 8) + ((lane / 8) & 1) * 8) * 16 + (lane / 16) * 8);
  ldmatrix_x2_trans(f2, sV + ((lane % 8) + ((lane / 8) & 1) * 8) * 16);
  float d[5][4] = {};
  mma16816<kBF16>(d[0], fa, fb[0], fb[1]);
  mma16816<kBF16>(d[1], fa, fb[2], fb[3]);
  mma16816<kBF16>(d[2], fa, fv[0], fv[1]);
  mma16816<kBF16>(d[3], fa, fv[2], fv[3]);
  mma16816<kBF16>(d[4], fa, f2[0], f2[1]);
  // Accumulator element e: row g (+8 for e >= 2), column 2 t4 + (e & 1) of its 16 x 8 tile.
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e / 2), c = 2 * t4 + (e & 1);
    nt[r * 16 + c] = d[0][e], nt[r * 16 + 8 + c] = d[1][e];
    nn[r * 16 + c] = d[2][e], nn[r * 16 + 8 + c] = d[3][e];
    x2[r * 8 + c] = d[4][e];
  }
}

}  // namespace

void launch_fragment_probe(bool bf16, const uint16_t* a, const uint16_t* bt, const uint16_t* bk, float* nt, float* nn,
                           float* x2) {
  if (bf16) {
    fragment_probe_kernel<true><<<1, 32>>>(a, bt, bk, nt, nn, x2);
  } else {
    fragment_probe_kernel<false><<<1, 32>>>(a, bt, bk, nt, nn, x2);
  }
}

}  // namespace mmkernels::cuda::attn
