// The CUDA surface our kernels use, for the emulation build (MMK_EMU): the same kernel source,
// compiled by the host compiler, runs on the CPU executor of runtime.cpp. Each block's threads are
// cooperatively scheduled fibers; warp-collective instructions complete when every lane of the warp
// has arrived; cp.async copies land at their wait. Memory accesses of the kernel code reach the
// executor through the compiler's ThreadSanitizer instrumentation hooks (runtime.cpp implements
// them: bounds of global and shared accesses, shared-memory races, no tsan runtime involved).
#pragma once
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------ vector types

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

// ------------------------------------------------------------------------------ runtime API types

enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };
using cudaStream_t = struct CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace mmk_emu {

// Where the executor keeps the running thread's indices (set at every fiber switch).
extern uint3 g_thread_idx, g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

// Barriers and warp collectives (runtime.cpp). `site` tells barriers at different places apart.
void syncthreads(const void* site);
void syncwarp(unsigned mask);
uint32_t shfl_xor_u32(unsigned mask, uint32_t v, int lane_mask, int width);
uint32_t shfl_idx_u32(unsigned mask, uint32_t v, int src_lane, int width);
void cp_async16(void* dst_shared, const void* src_global, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);
// ldmatrix .m8n8 .b16: `count` (1, 2, 4) matrices; this lane supplies the row address `row`.
void ldmatrix(uint32_t* r, int count, bool trans, const void* row);
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += a b with this lane's fragments.
void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bool bf16);
int atomic_min_i32(int* p, int v);
int atomic_max_i32(int* p, int v);
float atomic_add_f32(float* p, float v);
[[noreturn]] void trap();

// Launch plumbing.
void launch(void (*entry)(void*), void* ctx, const void* kernel, dim3 grid, dim3 block, size_t dyn_smem,
            const void* arg_lo, size_t arg_bytes);
void set_max_dynamic_smem(const void* kernel, int bytes);
void check_last_launch();
// The harness's dynamic shared memory array (`extern __shared__ T name[]` resolves to it).
void register_dynamic_smem(void* (*getter)(), size_t capacity);

// 16-bit float helpers, round to nearest even (the _rn intrinsics).
uint16_t float_to_half_bits(float f);
float half_bits_to_float(uint16_t h);
uint16_t float_to_bf16_bits(float f);
float bf16_bits_to_float(uint16_t h);

// kernel<<<grid, block, smem, stream>>>(args) is rewritten by the harness build into
// kernel ^ LaunchConfig(grid, block, smem, stream) ^ LaunchArgs(args): nvcc's own host pass
// does the same kind of rewrite into a cudaLaunchKernel call.
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  LaunchConfig(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};
template <class... P>
struct PendingLaunch {
  void (*kernel)(P...);
  LaunchConfig cfg;
};
template <class... P>
PendingLaunch<P...> operator^(void (*kernel)(P...), const LaunchConfig& cfg) {
  return {kernel, cfg};
}
template <class... A>
std::tuple<std::decay_t<A>...> LaunchArgs(A&&... a) {
  return std::tuple<std::decay_t<A>...>(std::forward<A>(a)...);
}
template <class... P, class... A>
void operator^(const PendingLaunch<P...>& pl, std::tuple<A...>&& args) {
  struct Ctx {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  Ctx ctx{pl.kernel, std::tuple<std::decay_t<P>...>(std::move(args))};
  // Every thread calls the kernel with its own by-value copy of the arguments (on its fiber stack).
  launch([](void* c) { auto* x = static_cast<Ctx*>(c); std::apply(x->kernel, x->args); }, &ctx,
         reinterpret_cast<const void*>(pl.kernel), pl.cfg.grid, pl.cfg.block, pl.cfg.smem, &ctx, sizeof(ctx));
}

}  // namespace mmk_emu

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int value) {
  mmk_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

// ------------------------------------------------------------------------------ device built-ins

#define threadIdx (::mmk_emu::g_thread_idx)
#define blockIdx (::mmk_emu::g_block_idx)
#define blockDim (::mmk_emu::g_block_dim)
#define gridDim (::mmk_emu::g_grid_dim)
#define warpSize 32

// noinline so that its return address names the barrier's place in the kernel.
__attribute__((noinline)) inline void __syncthreads() { mmk_emu::syncthreads(__builtin_return_address(0)); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { mmk_emu::syncwarp(mask); }
[[noreturn]] inline void __trap() { mmk_emu::trap(); }

// A 32-bit value through a 32-bit lane exchange, bits unchanged (float, int or unsigned alike).
template <class T, class Exchange>
inline T shuffle_bits(T v, Exchange exchange) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  uint32_t u;
  __builtin_memcpy(&u, &v, 4);
  u = exchange(u);
  __builtin_memcpy(&v, &u, 4);
  return v;
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return shuffle_bits(v, [&](uint32_t u) { return mmk_emu::shfl_xor_u32(mask, u, lane_mask, width); });
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return shuffle_bits(v, [&](uint32_t u) { return mmk_emu::shfl_idx_u32(mask, u, src_lane, width); });
}

inline int atomicMin(int* p, int v) { return mmk_emu::atomic_min_i32(p, v); }
inline int atomicMax(int* p, int v) { return mmk_emu::atomic_max_i32(p, v); }
inline float atomicAdd(float* p, float v) { return mmk_emu::atomic_add_f32(p, v); }

// The integer / float min and max overloads CUDA's math headers provide to device code.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }

// Shared memory is per block: every fiber of the block (one OS thread) sees the same thread_local
// object, so __shared__ becomes thread_local. The executor finds these objects as the module's TLS.
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __grid_constant__
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// ------------------------------------------------------------------------------ 16-bit types

struct __half { uint16_t x; };
struct __half2 { uint16_t x, y; };
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { uint16_t x, y; };
inline __half2 __floats2half2_rn(float a, float b) {
  return __half2{mmk_emu::float_to_half_bits(a), mmk_emu::float_to_half_bits(b)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{mmk_emu::float_to_bf16_bits(a), mmk_emu::float_to_bf16_bits(b)};
}
inline float2 __half22float2(__half2 h) {
  return float2{mmk_emu::half_bits_to_float(h.x), mmk_emu::half_bits_to_float(h.y)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) {
  return float2{mmk_emu::bf16_bits_to_float(h.x), mmk_emu::bf16_bits_to_float(h.y)};
}
