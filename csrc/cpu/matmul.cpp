// The rule: float32 GEMMs go to oneDNN (through ATen's mkldnn_matmul), everything else to ATen's
// mm/addmm (MKL on x86 wheels; bfloat16 there already goes to oneDNN).
//
// Why: on the AMD EPYC (Zen 4) machines this project is measured on, MKL's sgemm stays well below
// the CPU's AVX-512 peak (likely its non-Intel code path), while oneDNN JIT-compiles AVX-512 kernels
// for the CPU it finds: 190-215 against 130-165 GFLOP/s on the projection shapes of the benchmarks
// (benchmarks/RESULTS.md, "Session 5"). Both sum in float32 with float32 accumulators; the results
// differ from MKL's in rounding only, as two BLAS libraries do.
//
// MMKERNELS_CPU_GEMM=aten keeps every GEMM on ATen's mm (MKL), e.g. to compare; the rule also
// stays with ATen where torch was built without oneDNN, where the user disabled it
// (torch.backends.mkldnn.enabled = False) or where its matmul refuses the CPU (onednn_matmul_runs),
// for layouts oneDNN serves badly or not at all, and for small GEMMs (kOneDnnMinMacs), where oneDNN's
// fixed cost per call outweighs its faster kernel.
//
// bfloat16 and float16 GEMMs run in float32 where oneDNN refuses the CPU (half_gemm_in_float): ATen's
// own half-precision GEMM then runs at under 1 GFLOP/s (0.7 on the AMD Zen 3 of 2026-12-02, against
// 25-60 for float32 on 2 threads), so the operands are widened and the product rounded back.
#include "matmul.h"

#include <ATen/ATen.h>
#include <ATen/Config.h>
#include <ATen/Context.h>

#include <algorithm>
#include <cstdlib>
#include <string_view>

// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h, a header the wheels do not ship):
// result = beta * result + alpha * mat1 @ mat2, for strided 2-D operands.
namespace at::native {
TORCH_API void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result, float beta,
                             float alpha);
}

namespace mmkernels::cpu {
namespace {

bool onednn_requested() {
  static const bool requested = [] {
    const char* env = std::getenv("MMKERNELS_CPU_GEMM");
    return env == nullptr || std::string_view(env) != "aten";
  }();
  return requested;
}

// oneDNN reads operands row- or column-major with any leading dimension, but not expanded (stride 0)
// or strided both ways. Its output must be row-major: a column-major output ran at under
// 1 GFLOP/s here (a reference kernel), against 190 row-major.
bool row_major(const at::Tensor& t) { return t.stride(1) == 1 && (t.size(0) == 1 || t.stride(0) >= t.size(1)); }
bool col_major(const at::Tensor& t) { return t.stride(0) == 1 && (t.size(1) == 1 || t.stride(1) >= t.size(0)); }

// Below this many multiply-adds, ATen's mm: each mkldnn_matmul call pays a fixed cost (primitive
// lookup and set-up), measured at 70-250 us against 4-60 us for the whole ATen GEMM on the issue-19
// decoding and fusion-head shapes (1 x 256 -> 768, 8 x 192 -> 64; Intel Xeon, 1 thread, a loaded
// machine); oneDNN draws level at about 2^24 (64 x 512 -> 512) and pulls ahead above (256 x 512 -> 256:
// 1.3x).
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 24;

// MMKERNELS_ONEDNN_MIN_MACS overrides it: the tests set 0, so that their small shapes still run every
// layout through oneDNN (tests/conftest.py).
int64_t onednn_min_macs() {
  static const int64_t macs = [] {
    const char* env = std::getenv("MMKERNELS_ONEDNN_MIN_MACS");
    return env == nullptr ? kOneDnnMinMacs : std::max<int64_t>(0, std::atoll(env));
  }();
  return macs;
}

}  // namespace

// torch 2.13's mkldnn_matmul refuses CPUs with neither AVX-512 (BW, VL, DQ) nor AVX-NE-CONVERT, for
// float32 too (its bfloat16 check guards the whole function): on AVX2-only CPUs (AMD Zen 3, older
// Intel) every GEMM stays on ATen's mm. Asked of the function itself, once, so that the rule follows
// whatever the torch in use accepts.
bool onednn_matmul_runs() {
#if AT_MKLDNN_ENABLED() && defined(__x86_64__)
  static const bool runs = [] {
    try {
      const at::Tensor one = at::ones({1, 1});
      at::native::mkldnn_matmul(one, one, at::empty({1, 1}), 0.0f, 1.0f);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }();
  return runs;
#else
  return false;
#endif
}

bool matmul_uses_onednn(at::ScalarType dtype) {
#if AT_MKLDNN_ENABLED() && defined(__x86_64__)
  return dtype == at::kFloat && onednn_requested() && at::globalContext().userEnabledMkldnn() &&
         onednn_matmul_runs();
#else
  (void)dtype;
  return false;
#endif
}

bool half_gemm_in_float(at::ScalarType dtype) {
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && !onednn_matmul_runs();
}

void matmul_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (half_gemm_in_float(out.scalar_type())) {
    // Widening is exact, so this is the float32 product rounded once (per call, as ATen's own
    // half-precision GEMM rounds its result).
    at::Tensor acc = accumulate ? out.to(at::kFloat) : at::empty(out.sizes(), out.options().dtype(at::kFloat));
    matmul_out(acc, a.to(at::kFloat), b.to(at::kFloat), accumulate);
    out.copy_(acc);
    return;
  }
  const bool empty = out.numel() == 0 || a.size(1) == 0;
  const bool layouts_ok = (row_major(a) || col_major(a)) && (row_major(b) || col_major(b)) && row_major(out);
  const bool large = a.size(0) * a.size(1) * b.size(1) >= onednn_min_macs();
  if (!empty && large && layouts_ok && matmul_uses_onednn(out.scalar_type())) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
  } else if (accumulate) {
    at::Tensor dst = out;
    dst.addmm_(a, b);
  } else {
    at::Tensor dst = out;
    at::mm_out(dst, a, b);
  }
}

}  // namespace mmkernels::cpu
