// The harness's C interface to the kernels' own launchers (loaded with ctypes by tests/emu): each
// entry takes raw pointers and plain numbers, fills the parameter block the CUDA host code would
// fill, and calls the launcher, whose <<<>>> runs on the CPU executor. The attention parameter
// blocks are filled by field name (emu_attn_fields lists them), so Python never mirrors a layout.
#include <cstring>
#include <string>
#include <type_traits>

#include "attn_params.h"
#include "fcl_launch.h"
#include "low_rank_fusion_launch.h"

namespace mmkernels::cuda::attn {
// The dynamic shared memory of the attention kernels (`extern __shared__ uint16_t smem[]`): one
// array per OS thread, as large as an sm_90 block may have, plus room that out-of-bounds accesses
// land in (and are reported from) rather than corrupting neighbours.
constexpr size_t kDynSmemBytes = 227 * 1024;
thread_local __attribute__((aligned(128))) uint16_t smem[(kDynSmemBytes + 64 * 1024) / 2];
void launch_fragment_probe(bool bf16, const uint16_t* a, const uint16_t* bt, const uint16_t* bk, float* nt, float* nn,
                           float* x2);
}  // namespace mmkernels::cuda::attn

namespace {
using namespace mmkernels::cuda;
using mmkernels::Activation;

const bool registered = [] {
  mmk_emu::register_dynamic_smem([]() -> void* { return attn::smem; }, sizeof(attn::smem));
  return true;
}();

template <class T>
void set_field(T& f, int64_t v) {
  if constexpr (std::is_pointer_v<T>) {
    f = reinterpret_cast<T>(static_cast<intptr_t>(v));
  } else {
    f = static_cast<T>(v);
  }
}

#define MMK_ATTN_FIELDS(X)                                                                                       \
  X(q) X(k) X(v) X(q_sb) X(q_sh) X(q_sl) X(k_sb) X(k_sh) X(k_sl) X(v_sb) X(v_sh) X(v_sl) X(B) X(H) X(Lq) X(Lk) \
  X(H_kv) X(causal) X(kv_range) X(kpm) X(mask_kind) X(mask) X(m_sb) X(m_sh) X(m_sl) X(m_sk) X(dropout)         \
  X(threshold) X(seed) X(seed_ptr) X(cu_seqlens_q) X(cu_seqlens_k) X(lse_sh)
#define MMK_FWD_FIELDS(X) X(out) X(o_sb) X(o_sh) X(o_sl) X(lse) X(num_splits) X(out_accum) X(lse_accum)
#define MMK_BWD_FIELDS(X)                                                                                        \
  X(dout) X(do_sb) X(do_sh) X(do_sl) X(lse) X(dsum) X(dq_accum) X(dq_sb) X(dq_sh) X(dq_sl) X(dk) X(dk_sb)       \
  X(dk_sh) X(dk_sl) X(dv) X(dv_sb) X(dv_sh) X(dv_sl)
#define MMK_NAME(f) #f ","
#define MMK_SET(f) set_field(p.f, ints[i++]);

// reals: scale_log2, inv_keep.
void fill_common(attn::AttnParams& p, const int64_t* ints, const double* reals, int& i) {
  MMK_ATTN_FIELDS(MMK_SET)
  p.scale_log2 = static_cast<float>(reals[0]);
  p.inv_keep = static_cast<float>(reals[1]);
}

template <class F>
void by_head_dim(int D, F&& f) {
  if (D == 32) f(std::integral_constant<int, 32>{});
  if (D == 64) f(std::integral_constant<int, 64>{});
  if (D == 128) f(std::integral_constant<int, 128>{});
}

// low_rank_fusion: the modality table from arrays of pointers (null entries allowed), as the host code
// builds it per chunk. dtype codes as above; float64 computes in float64, the others in float32.
template <typename T, typename acc_t>
LrfModalities<acc_t> lrf_table(int count, const void* const* proj, const void* const* row, void* const* grad) {
  LrfModalities<acc_t> t{};
  t.count = count;
  for (int m = 0; m < count; ++m) {
    t.proj[m] = static_cast<const acc_t*>(proj[m]);
    t.row[m] = static_cast<const acc_t*>(row[m]);
    t.grad[m] = grad != nullptr ? static_cast<acc_t*>(grad[m]) : nullptr;
  }
  return t;
}

template <class F>
void by_dtype(int dtype, F&& f) {
  switch (dtype) {
    case 0: f(c10::Half{}, float{}); break;
    case 1: f(c10::BFloat16{}, float{}); break;
    case 2: f(float{}, float{}); break;
    default: f(double{}, double{});
  }
}

}  // namespace

extern "C" {

const char* emu_attn_fields(int backward) {
  static const std::string fwd = MMK_ATTN_FIELDS(MMK_NAME) MMK_FWD_FIELDS(MMK_NAME);
  static const std::string bwd = MMK_ATTN_FIELDS(MMK_NAME) MMK_BWD_FIELDS(MMK_NAME);
  return backward ? bwd.c_str() : fwd.c_str();
}

void emu_attn_fwd(int D, int bf16, const int64_t* ints, const double* reals) {
  attn::FwdParams p{};
  int i = 0;
  fill_common(p, ints, reals, i);
  MMK_FWD_FIELDS(MMK_SET)
  by_head_dim(D, [&](auto d) {
    bf16 ? attn::launch_fwd<decltype(d)::value, true>(p, nullptr) : attn::launch_fwd<decltype(d)::value, false>(p, nullptr);
  });
}

void emu_attn_bwd(int D, int bf16, const int64_t* ints, const double* reals) {
  attn::BwdParams p{};
  int i = 0;
  fill_common(p, ints, reals, i);
  MMK_BWD_FIELDS(MMK_SET)
  by_head_dim(D, [&](auto d) {
    bf16 ? attn::launch_bwd<decltype(d)::value, true>(p, nullptr) : attn::launch_bwd<decltype(d)::value, false>(p, nullptr);
  });
}

void emu_dropout_factors(const int64_t* ints, const double* reals, int i0, int rows, void* z, int dbl) {
  attn::AttnParams p{};
  int i = 0;
  fill_common(p, ints, reals, i);
  attn::launch_dropout_factors(p, i0, rows, z, dbl != 0, nullptr);
}

void emu_key_ranges(const int32_t* lengths, const uint8_t* kpm, int32_t B, int32_t Lk, int32_t* kv_range) {
  attn::launch_key_ranges(lengths, kpm, B, Lk, kv_range, nullptr);
}

void emu_dot_rows(const void* dout, int64_t do_sb, int64_t do_sh, int64_t do_sl, const void* out, int64_t o_sb,
                  int64_t o_sh, int64_t o_sl, int32_t B, int32_t H, int32_t Lq, int32_t E, int bf16, float* dsum) {
  attn::launch_dot_rows(dout, do_sb, do_sh, do_sl, out, o_sb, o_sh, o_sl, B, H, Lq, E, bf16 != 0, dsum, nullptr);
}

void emu_finish_dq(const float* dq_accum, double scale, void* dq, int64_t count, int bf16) {
  attn::launch_finish_dq(dq_accum, static_cast<float>(scale), dq, count, bf16 != 0, nullptr);
}

void emu_combine_splits(const float* out_accum, const float* lse_accum, int32_t splits, int32_t B, int32_t H,
                        int32_t Lq, int32_t E, void* out, int64_t o_sb, int64_t o_sh, int64_t o_sl, float* lse,
                        int bf16) {
  attn::launch_combine_splits(out_accum, lse_accum, splits, B, H, Lq, E, out, o_sb, o_sh, o_sl, lse, bf16 != 0,
                              nullptr);
}

int emu_choose_key_splits(int64_t blocks, int64_t Lk, int sm_count) {
  return attn::choose_key_splits(blocks, Lk, sm_count);
}

void emu_fragment_probe(int bf16, const uint16_t* a, const uint16_t* bt, const uint16_t* bk, float* nt, float* nn,
                        float* x2) {
  attn::launch_fragment_probe(bf16 != 0, a, bt, bk, nt, nn, x2);
}

// dtype: 0 float16, 1 bfloat16, 2 float32, 3 float64 (float64 accumulates in float64).
void emu_bias_act(int dtype, const void* acc, const void* bias, void* out, void* preact, int64_t M, int64_t N,
                  int act) {
  const auto a = static_cast<Activation>(act);
  switch (dtype) {
    case 0: launch_bias_act<c10::Half, float>(static_cast<const float*>(acc), static_cast<const c10::Half*>(bias),
                                              static_cast<c10::Half*>(out), static_cast<c10::Half*>(preact), M, N, a,
                                              nullptr); break;
    case 1: launch_bias_act<c10::BFloat16, float>(static_cast<const float*>(acc),
                                                  static_cast<const c10::BFloat16*>(bias),
                                                  static_cast<c10::BFloat16*>(out),
                                                  static_cast<c10::BFloat16*>(preact), M, N, a, nullptr); break;
    case 2: launch_bias_act<float, float>(static_cast<const float*>(acc), static_cast<const float*>(bias),
                                          static_cast<float*>(out), static_cast<float*>(preact), M, N, a, nullptr);
      break;
    default: launch_bias_act<double, double>(static_cast<const double*>(acc), static_cast<const double*>(bias),
                                             static_cast<double*>(out), static_cast<double*>(preact), M, N, a,
                                             nullptr);
  }
}

void emu_act_backward(int dtype, const void* grad, const void* z, void* gz, int64_t n, int act) {
  const auto a = static_cast<Activation>(act);
  switch (dtype) {
    case 0: launch_act_backward<c10::Half>(static_cast<const c10::Half*>(grad), static_cast<const c10::Half*>(z),
                                           static_cast<c10::Half*>(gz), n, a, nullptr); break;
    case 1: launch_act_backward<c10::BFloat16>(static_cast<const c10::BFloat16*>(grad),
                                               static_cast<const c10::BFloat16*>(z),
                                               static_cast<c10::BFloat16*>(gz), n, a, nullptr); break;
    case 2: launch_act_backward<float>(static_cast<const float*>(grad), static_cast<const float*>(z),
                                       static_cast<float*>(gz), n, a, nullptr); break;
    default: launch_act_backward<double>(static_cast<const double*>(grad), static_cast<const double*>(z),
                                         static_cast<double*>(gz), n, a, nullptr);
  }
}

void emu_tc_forward(int bf16, int count, const void* const* x, const int64_t* x_stride, const int32_t* width,
                    const int32_t* w_offset, uint32_t vec_mask, int32_t k_tiles, const void* w, int64_t w_stride,
                    const void* bias, void* out, void* preact, int64_t M, int64_t N, int act) {
  SegmentTable t{};
  for (int s = 0; s < count; ++s) t.x[s] = x[s], t.x_stride[s] = x_stride[s], t.width[s] = width[s], t.w_offset[s] = w_offset[s];
  t.vec_mask = vec_mask, t.count = count, t.k_tiles = k_tiles;
  const auto a = static_cast<Activation>(act);
  if (bf16) {
    launch_tc_forward<c10::BFloat16>(t, static_cast<const c10::BFloat16*>(w), w_stride,
                                     static_cast<const c10::BFloat16*>(bias), static_cast<c10::BFloat16*>(out),
                                     static_cast<c10::BFloat16*>(preact), M, N, a, nullptr);
  } else {
    launch_tc_forward<c10::Half>(t, static_cast<const c10::Half*>(w), w_stride, static_cast<const c10::Half*>(bias),
                                 static_cast<c10::Half*>(out), static_cast<c10::Half*>(preact), M, N, a, nullptr);
  }
}

void emu_lrf_forward(int dtype, int count, const void* const* proj, const void* const* row, const void* w,
                     const void* bias, void* out, int64_t rows, int64_t N, int64_t R) {
  by_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    launch_lrf_forward<T, acc_t>(lrf_table<T, acc_t>(count, proj, row, nullptr), static_cast<const acc_t*>(w),
                                 static_cast<const T*>(bias), static_cast<T*>(out), rows, N, R, nullptr);
  });
}

void emu_lrf_backward(int dtype, int count, const void* const* proj, const void* const* row, void* const* grad,
                      const void* grad_out, const void* w, void* w_partial, int64_t rows, int64_t N, int64_t R) {
  by_dtype(dtype, [&](auto t, auto a) {
    using T = decltype(t);
    using acc_t = decltype(a);
    launch_lrf_backward<T, acc_t>(lrf_table<T, acc_t>(count, proj, row, grad), static_cast<const T*>(grad_out),
                                  static_cast<const acc_t*>(w), static_cast<acc_t*>(w_partial), rows, N, R, nullptr);
  });
}

int emu_lrf_backward_blocks(int64_t rows, int64_t N) { return lrf_backward_blocks(rows, N); }

}  // extern "C"
