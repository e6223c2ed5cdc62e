// The CPU executor of the emulation build: runs a kernel launch block by block, each block's threads
// as cooperatively scheduled fibers (ucontext, 64 KiB stacks) on the calling OS thread, and checks
// what compute-sanitizer's memcheck, racecheck and synccheck would:
//   - every global access lies inside one of the buffers the harness registered (exact sizes);
//   - every dynamic shared-memory access lies inside the launch's dynamic size;
//   - no shared-memory byte is written by one thread and read or written by another with no
//     barrier (__syncthreads, or __syncwarp within a warp) in between; no read of bytes whose
//     cp.async has not completed (waited for) yet;
//   - every barrier is reached by the whole block, at the same place; every warp collective by
//     all lanes of its warp, the same instruction.
// Kernel code is compiled with -fsanitize=thread; this file (not instrumented) implements the
// __tsan_* hooks that the instrumentation calls on each load and store. Local variables in
// registers are never seen; memory is classified by address: fiber stacks (ignored), the module's
// thread-local storage (where __shared__ objects live in this build), everything else (global).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "emu.h"

namespace mmk_emu {

uint3 g_thread_idx, g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr size_t kGuardBytes = 4096;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxErrorsKept = 64;

// ------------------------------------------------------------------------------ errors

std::vector<std::string> g_errors;
size_t g_error_count = 0;
std::set<std::pair<std::string, const void*>> g_reported;  // (kind, pc): one report per place

// "symbol+0xN" where the symbol is exported, and always "module+0xN" (the harness turns the latter
// into a source line with addr2line: the kernels are compiled with line tables).
std::string describe_pc(const void* pc) {
  Dl_info info{};
  std::string s;
  char buf[64];
  if (pc != nullptr && dladdr(pc, &info)) {
    if (info.dli_sname != nullptr) {
      int status = 0;
      char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
      s = status == 0 ? name : info.dli_sname;
      free(name);
      snprintf(buf, sizeof buf, "+0x%zx ", reinterpret_cast<const char*>(pc) - static_cast<const char*>(info.dli_saddr));
      s += buf;
    }
    snprintf(buf, sizeof buf, "+0x%zx)", reinterpret_cast<const char*>(pc) - static_cast<const char*>(info.dli_fbase));
    return s + "(" + info.dli_fname + buf;
  }
  snprintf(buf, sizeof buf, "%p", pc);
  return buf;
}

void report(const char* kind, const void* pc, const char* fmt, ...) {
  ++g_error_count;
  if (!g_reported.insert({kind, pc}).second || g_errors.size() >= kMaxErrorsKept) return;
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::string s = std::string(kind) + ": " + buf;
  if (pc != nullptr) s += " [at " + describe_pc(pc) + "]";
  g_errors.push_back(std::move(s));
}

// ------------------------------------------------------------------------------ global buffers

struct Buffer {
  uintptr_t lo, hi;
  std::string name;
};
std::vector<Buffer> g_buffers;
uintptr_t g_args_lo = 0, g_args_hi = 0;      // the launch's argument block (read by the thread entry)
uintptr_t g_image_lo = 0, g_image_hi = 0;    // this module's loaded image (constant tables)
uintptr_t g_tls_lo = 0, g_tls_size = 0;      // this module's TLS block: the __shared__ objects
uintptr_t g_dyn_lo = 0, g_dyn_cap = 0;       // the dynamic shared memory array inside it
size_t g_dyn_bytes = 0;                      // ... and the launch's dynamic size
void* (*g_dyn_getter)() = nullptr;

// ------------------------------------------------------------------------------ fibers

struct PendingCopy {
  uint8_t* dst;
  const uint8_t* src;
  int bytes;
};

struct Fiber {
  ucontext_t ctx;
  bool done = false;
  std::vector<PendingCopy> open;                  // cp.async not yet committed
  std::vector<std::vector<PendingCopy>> groups;  // committed, oldest first
};

struct Warp {
  int arrived = 0;
  uint64_t gen = 0;
  const char* kind = nullptr;
  uint32_t epoch = 0;  // __syncwarp count: orders this warp's shared accesses
  int lanes = 32;
  alignas(16) uint32_t in[32][16];
  uint32_t out[32][8];
  const void* addr[32];
};

struct Shadow {
  uint32_t block;  // serial of the block that last touched this byte (older = empty)
  int16_t w_tid, r_tid;
  int16_t r_warp;  // warp of the readers since the last ordering point, -1 if several warps
  uint8_t pending, r_multi, written, pad;
  uint32_t w_bep, w_wep, r_bep, r_wep;
};

struct Block {
  int n = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t sched;
  int cur = -1;
  bool progress = false, abandoned = false;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  const void* bar_site = nullptr;
  uint32_t epoch = 0;  // completed __syncthreads
  uint32_t serial = 0;
};

Block g_block;
bool g_running = false;
int g_in_runtime = 0;  // > 0 while executor code touches memory through instrumented paths
uint8_t* g_stacks = nullptr;
std::vector<Shadow> g_shadow;
uint32_t g_block_serial = 0;
void (*g_entry)(void*) = nullptr;
void* g_entry_ctx = nullptr;
std::vector<std::pair<const void*, int>> g_max_dyn;  // cudaFuncSetAttribute per kernel

int cur_tid() { return g_block.cur; }

void yield() {
  Fiber& f = g_block.fibers[g_block.cur];
  swapcontext(&f.ctx, &g_block.sched);
  if (g_block.abandoned) {
    // The block was given up (deadlock or trap): this fiber never runs again.
    swapcontext(&f.ctx, &g_block.sched);
  }
}

// ------------------------------------------------------------------------------ memory checks

bool ordered(int prev_tid, uint32_t prev_bep, uint32_t prev_wep, int prev_warp, int me) {
  if (prev_tid == me) return true;
  if (prev_bep != g_block.epoch) return true;  // a barrier since
  return prev_warp == me / 32 && prev_wep != g_block.warps[me / 32].epoch;  // a __syncwarp since
}

void shared_access(uintptr_t a, size_t n, bool write, const void* pc, int me, bool atomic = false) {
  if (a >= g_dyn_lo && a < g_dyn_lo + g_dyn_cap && a + n > g_dyn_lo + g_dyn_bytes) {
    report("shared out of bounds", pc,
           "thread %d %s %zu bytes at dynamic shared byte %zu; the launch has %zu bytes", me,
           write ? "writes" : "reads", n, static_cast<size_t>(a - g_dyn_lo), g_dyn_bytes);
    return;
  }
  if (a + n > g_tls_lo + g_tls_size) {
    report("shared out of bounds", pc, "thread %d accesses %zu bytes past the end of shared memory", me, n);
    return;
  }
  if (atomic) return;  // atomics do not race with each other; bounds were the check
  const uint32_t bep = g_block.epoch, wep = g_block.warps[me / 32].epoch;
  for (size_t i = 0; i < n; ++i) {
    Shadow& s = g_shadow[a - g_tls_lo + i];
    if (s.block != g_block.serial) {
      s = Shadow{};
      s.block = g_block.serial;
      s.w_tid = s.r_tid = -1;
    }
    const size_t off = a - (g_dyn_lo ? g_dyn_lo : g_tls_lo) + i;
    if (s.written && !ordered(s.w_tid, s.w_bep, s.w_wep, s.w_tid / 32, me)) {
      report(write ? "race (write after write)" : "race (read after write)", pc,
             "thread %d %s shared byte %zu, written by thread %d with no barrier in between", me,
             write ? "writes" : "reads", off, s.w_tid);
    }
    if (!write && !s.written && !s.pending) {
      report("uninitialised shared read", pc, "thread %d reads shared byte %zu, which no thread of this block wrote",
             me, off);
    }
    if (s.pending && !write) {
      report("read before cp.async completed", pc,
             "thread %d reads shared byte %zu while a cp.async into it (thread %d) has not been waited for", me,
             off, s.w_tid);
    }
    if (write) {
      if (s.r_tid >= 0 && (s.r_multi || s.r_tid != me) &&
          !ordered(s.r_multi ? -2 : s.r_tid, s.r_bep, s.r_wep, s.r_warp, me)) {
        report("race (write after read)", pc,
               "thread %d writes shared byte %zu, read by thread %d with no barrier in between", me, off, s.r_tid);
      }
      s.written = 1;
      s.w_tid = static_cast<int16_t>(me), s.w_bep = bep, s.w_wep = wep;
      s.r_tid = -1, s.r_multi = 0;
    } else {
      if (s.r_tid >= 0 && s.r_tid != me && !ordered(s.r_tid, s.r_bep, s.r_wep, s.r_warp, me)) {
        s.r_multi = 1;
        if (s.r_warp != me / 32) s.r_warp = -1;
      } else {
        s.r_multi = 0;
        s.r_warp = static_cast<int16_t>(me / 32);
      }
      s.r_tid = static_cast<int16_t>(me), s.r_bep = bep, s.r_wep = wep;
    }
  }
}

void global_access(uintptr_t a, size_t n, bool write, const void* pc, int me) {
  for (const Buffer& b : g_buffers) {
    if (a >= b.lo && a + n <= b.hi) return;
  }
  if (a >= g_args_lo && a + n <= g_args_hi) return;
  if (a >= g_image_lo && a + n <= g_image_hi && !write) return;
  // Name the nearest buffer, so the report says which bound was crossed.
  const Buffer* near = nullptr;
  intptr_t dist = 0;
  for (const Buffer& b : g_buffers) {
    const intptr_t d = a < b.lo ? static_cast<intptr_t>(b.lo - a) : static_cast<intptr_t>(a + n - b.hi);
    if (near == nullptr || d < dist) near = &b, dist = d;
  }
  if (near != nullptr) {
    report("global out of bounds", pc, "thread %d (block %u) %s %zu bytes at offset %lld of '%s' (%zu bytes)", me,
           g_block_idx.x, write ? "writes" : "reads", n,
           static_cast<long long>(static_cast<intptr_t>(a - near->lo)), near->name.c_str(),
           static_cast<size_t>(near->hi - near->lo));
  } else {
    report("global out of bounds", pc, "thread %d %s %zu bytes at %p: no buffer registered", me,
           write ? "writes" : "reads", n, reinterpret_cast<void*>(a));
  }
}

inline void access(const void* p, size_t n, bool write, const void* pc) {
  if (!g_running || g_in_runtime) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a - reinterpret_cast<uintptr_t>(g_stacks) < kMaxThreads * (kStackBytes + kGuardBytes)) return;
  if (a - g_tls_lo < g_tls_size) return shared_access(a, n, write, pc, cur_tid());
  global_access(a, n, write, pc, cur_tid());
}

bool is_shared(const void* p) { return reinterpret_cast<uintptr_t>(p) - g_tls_lo < g_tls_size; }

// ------------------------------------------------------------------------------ module ranges

int find_module(struct dl_phdr_info* info, size_t, void* data) {
  auto self = reinterpret_cast<uintptr_t>(&find_module);
  uintptr_t lo = UINTPTR_MAX, hi = 0;
  const ElfW(Phdr)* tls = nullptr;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD) {
      lo = std::min<uintptr_t>(lo, info->dlpi_addr + ph.p_vaddr);
      hi = std::max<uintptr_t>(hi, info->dlpi_addr + ph.p_vaddr + ph.p_memsz);
    } else if (ph.p_type == PT_TLS) {
      tls = &ph;
    }
  }
  if (self < lo || self >= hi) return 0;
  g_image_lo = lo, g_image_hi = hi;
  if (tls != nullptr && info->dlpi_tls_data != nullptr) {
    g_tls_lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
    g_tls_size = tls->p_memsz;
  }
  (void)data;
  return 1;
}

// ------------------------------------------------------------------------------ the scheduler

void fiber_main() {
  g_entry(g_entry_ctx);
  Fiber& f = g_block.fibers[g_block.cur];
  // Copies still in flight at exit complete (nothing can wait for them any more).
  for (auto& grp : f.groups) f.open.insert(f.open.end(), grp.begin(), grp.end());
  f.groups.clear();
  for (const PendingCopy& c : f.open) {
    std::memcpy(c.dst, c.src, c.bytes);
    std::memset(c.dst + c.bytes, 0, 16 - c.bytes);
  }
  f.open.clear();
  f.done = true;
  g_block.progress = true;
  // uc_link returns to the scheduler.
}

void describe_deadlock() {
  Block& B = g_block;
  int exited = 0;
  for (const Fiber& f : B.fibers) exited += f.done;
  if (B.bar_arrived > 0) {
    report("barrier not reached by the whole block", B.bar_site,
           "block %u: %d of %d threads wait at __syncthreads, %d exited, the others wait elsewhere", g_block_idx.x,
           B.bar_arrived, B.n, exited);
  }
  for (size_t w = 0; w < B.warps.size(); ++w) {
    const Warp& W = B.warps[w];
    if (W.arrived > 0) {
      report("warp collective not reached by the whole warp", nullptr,
             "block %u warp %zu: %d of %d lanes at %s", g_block_idx.x, w, W.arrived, W.lanes, W.kind);
    }
  }
}

void run_block() {
  Block& B = g_block;
  B.n = static_cast<int>(g_block_dim.x * g_block_dim.y * g_block_dim.z);
  B.fibers.assign(B.n, Fiber{});
  B.warps.assign((B.n + 31) / 32, Warp{});
  for (size_t w = 0; w < B.warps.size(); ++w) B.warps[w].lanes = std::min(32, B.n - static_cast<int>(w) * 32);
  B.bar_arrived = 0, B.bar_gen = 0, B.bar_site = nullptr, B.epoch = 0, B.abandoned = false;
  B.serial = ++g_block_serial;
  for (int t = 0; t < B.n; ++t) {
    Fiber& f = B.fibers[t];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = g_stacks + t * (kStackBytes + kGuardBytes) + kGuardBytes;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &B.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  int live = B.n;
  while (live > 0) {
    B.progress = false;
    for (int t = 0; t < B.n; ++t) {
      Fiber& f = B.fibers[t];
      if (f.done) continue;
      B.cur = t;
      g_thread_idx = uint3{t % g_block_dim.x, (t / g_block_dim.x) % g_block_dim.y, t / (g_block_dim.x * g_block_dim.y)};
      swapcontext(&B.sched, &f.ctx);
      if (f.done) --live;
      if (B.abandoned) break;
    }
    if (B.abandoned) break;
    if (!B.progress && live > 0) {
      describe_deadlock();
      B.abandoned = true;
    }
  }
  B.cur = -1;
}

// Arrival at a warp collective: inputs go to the warp, the last lane computes every lane's output.
template <class F>
void collective(const char* kind, F&& compute) {
  Block& B = g_block;
  const int me = B.cur, lane = me % 32;
  Warp& W = B.warps[me / 32];
  if (W.arrived == 0) {
    W.kind = kind;
  } else if (W.kind != kind) {
    report("divergent warp collective", nullptr, "warp %d: lane %d at %s while other lanes are at %s", me / 32, lane,
           kind, W.kind);
  }
  B.progress = true;
  const uint64_t gen = W.gen;
  if (++W.arrived == W.lanes) {
    compute(W);
    W.arrived = 0;
    ++W.gen;
  } else {
    while (W.gen == gen && !B.abandoned) yield();
  }
  B.progress = true;
}

void complete_group(Fiber& f) {
  const int me = g_block.cur;
  for (const PendingCopy& c : f.groups.front()) {
    std::memcpy(c.dst, c.src, c.bytes);
    std::memset(c.dst + c.bytes, 0, 16 - c.bytes);
    for (int i = 0; i < 16; ++i) g_shadow[reinterpret_cast<uintptr_t>(c.dst) - g_tls_lo + i].pending = 0;
    shared_access(reinterpret_cast<uintptr_t>(c.dst), 16, true, nullptr, me);
  }
  f.groups.erase(f.groups.begin());
}

float to_f(uint16_t h, bool bf16) { return bf16 ? bf16_bits_to_float(h) : half_bits_to_float(h); }

}  // namespace

// ------------------------------------------------------------------------------ device API

void syncthreads(const void* site) {
  Block& B = g_block;
  if (B.bar_arrived == 0) {
    B.bar_site = site;
  } else if (site != B.bar_site) {
    report("divergent barrier", site, "threads of block %u wait at two different __syncthreads", g_block_idx.x);
  }
  B.progress = true;
  const uint64_t gen = B.bar_gen;
  if (++B.bar_arrived == B.n) {
    B.bar_arrived = 0;
    ++B.bar_gen;
    ++B.epoch;
  } else {
    while (B.bar_gen == gen && !B.abandoned) yield();
  }
  B.progress = true;
}

void syncwarp(unsigned mask) {
  if (mask != 0xffffffffu) report("unsupported", nullptr, "__syncwarp with a partial mask");
  collective("__syncwarp", [](Warp& W) { ++W.epoch; });
}

uint32_t shfl_xor_u32(unsigned mask, uint32_t v, int lane_mask, int width) {
  if (mask != 0xffffffffu || width != 32) report("unsupported", nullptr, "shuffle with a partial mask or width");
  const int lane = g_block.cur % 32;
  Warp& W = g_block.warps[g_block.cur / 32];
  W.in[lane][0] = v;
  collective("shfl.bfly", [lane_mask](Warp& w) {
    for (int l = 0; l < 32; ++l) w.out[l][0] = w.in[l ^ (lane_mask & 31)][0];
  });
  return W.out[lane][0];
}

uint32_t shfl_idx_u32(unsigned mask, uint32_t v, int src_lane, int width) {
  if (mask != 0xffffffffu || width != 32) report("unsupported", nullptr, "shuffle with a partial mask or width");
  const int lane = g_block.cur % 32;
  Warp& W = g_block.warps[g_block.cur / 32];
  W.in[lane][0] = v;
  W.in[lane][1] = static_cast<uint32_t>(src_lane & 31);
  collective("shfl.idx", [](Warp& w) {
    for (int l = 0; l < 32; ++l) w.out[l][0] = w.in[w.in[l][1]][0];
  });
  return W.out[lane][0];
}

void cp_async16(void* dst, const void* src, int src_bytes) {
  const void* pc = __builtin_return_address(0);
  const int me = g_block.cur;
  if (!is_shared(dst)) {
    report("cp.async", pc, "thread %d: destination is not shared memory", me);
    return;
  }
  if (src_bytes < 0 || src_bytes > 16) report("cp.async", pc, "thread %d: src-size %d outside [0, 16]", me, src_bytes);
  if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16) {
    report("misaligned cp.async", pc, "thread %d: 16-byte cp.async needs 16-byte aligned addresses", me);
  }
  if (src_bytes > 0) global_access(reinterpret_cast<uintptr_t>(src), src_bytes, false, pc, me);
  shared_access(reinterpret_cast<uintptr_t>(dst), 16, true, pc, me);
  for (int i = 0; i < 16; ++i) g_shadow[reinterpret_cast<uintptr_t>(dst) - g_tls_lo + i].pending = 1;
  g_block.fibers[me].open.push_back({static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), src_bytes});
}

void cp_async_commit() {
  Fiber& f = g_block.fibers[g_block.cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = g_block.fibers[g_block.cur];
  while (static_cast<int>(f.groups.size()) > pending) complete_group(f);
}

void ldmatrix(uint32_t* r, int count, bool trans, const void* row) {
  const void* pc = __builtin_return_address(0);
  const int me = g_block.cur, lane = me % 32;
  Warp& W = g_block.warps[me / 32];
  W.addr[lane] = row;
  W.in[lane][0] = static_cast<uint32_t>(count) | (trans ? 0x100u : 0u);
  collective("ldmatrix", [&](Warp& w) {
    const int base = w.in[0][0] & 0xff;
    for (int l = 0; l < 32; ++l) {
      if (w.in[l][0] != w.in[0][0]) report("divergent warp collective", pc, "ldmatrix shapes differ between lanes");
    }
    // Lane 8m + i supplies row i of matrix m: 8 16-bit elements, 16 bytes.
    uint16_t m[4][8][8];
    for (int mat = 0; mat < base; ++mat) {
      for (int i = 0; i < 8; ++i) {
        const int src_lane = mat * 8 + i;
        const int tid = (me / 32) * 32 + src_lane;
        const uintptr_t a = reinterpret_cast<uintptr_t>(w.addr[src_lane]);
        if (!is_shared(w.addr[src_lane])) {
          report("ldmatrix", pc, "lane %d: row address is not shared memory", src_lane);
          std::memset(m[mat][i], 0, 16);
          continue;
        }
        if (a % 16) report("misaligned ldmatrix", pc, "lane %d: row address not 16-byte aligned", src_lane);
        shared_access(a, 16, false, pc, tid);
        std::memcpy(m[mat][i], w.addr[src_lane], 16);
      }
    }
    const bool tr = (w.in[0][0] & 0x100u) != 0;
    for (int l = 0; l < 32; ++l) {
      const int row_ = l / 4, col = 2 * (l % 4);
      for (int mat = 0; mat < base; ++mat) {
        const uint16_t lo = tr ? m[mat][col][row_] : m[mat][row_][col];
        const uint16_t hi = tr ? m[mat][col + 1][row_] : m[mat][row_][col + 1];
        w.out[l][mat] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
    }
  });
  for (int i = 0; i < count; ++i) r[i] = W.out[lane][i];
}

void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b, bool bf16) {
  const int me = g_block.cur, lane = me % 32;
  Warp& W = g_block.warps[me / 32];
  std::memcpy(&W.in[lane][0], a, 16);
  std::memcpy(&W.in[lane][4], b, 8);
  std::memcpy(&W.in[lane][6], d, 16);
  W.in[lane][10] = bf16;
  collective(bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", [](Warp& w) {
    const bool bf = w.in[0][10] != 0;
    float A[16][16], Bm[16][8], C[16][8];
    // PTX ISA fragment layouts, groupID g = lane / 4, t = lane % 4:
    //   A (row-major 16x16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
    //   B (col-major 16x8):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
    //   C/D (16x8 f32):      c0, c1 = (g, 2t, 2t+1), c2, c3 = (g+8, 2t, 2t+1)
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const uint32_t* in = w.in[l];
      for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        A[row][col] = to_f(in[r] & 0xffff, bf);
        A[row][col + 1] = to_f(in[r] >> 16, bf);
      }
      for (int r = 0; r < 2; ++r) {
        Bm[2 * t + 8 * r][g] = to_f(in[4 + r] & 0xffff, bf);
        Bm[2 * t + 8 * r + 1][g] = to_f(in[4 + r] >> 16, bf);
      }
      float c[4];
      std::memcpy(c, &in[6], 16);
      C[g][2 * t] = c[0], C[g][2 * t + 1] = c[1], C[g + 8][2 * t] = c[2], C[g + 8][2 * t + 1] = c[3];
    }
    float D[16][8];
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        // Products of 16-bit values are exact in float32; the sum runs in float32.
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s += A[i][k] * Bm[k][j];
        D[i][j] = C[i][j] + s;
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      float o[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
      std::memcpy(w.out[l], o, 16);
    }
  });
  std::memcpy(d, W.out[lane], 16);
}

namespace {
template <class T, class F>
T atomic_rmw(T* p, F f, const void* pc) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T)) report("misaligned atomic", pc, "thread %d", g_block.cur);
  if (is_shared(p)) {
    shared_access(a, sizeof(T), true, pc, g_block.cur, /*atomic=*/true);
  } else {
    global_access(a, sizeof(T), true, pc, g_block.cur);
  }
  const T old = *p;
  *p = f(old);
  return old;
}
}  // namespace

int atomic_min_i32(int* p, int v) {
  return atomic_rmw(p, [v](int o) { return std::min(o, v); }, __builtin_return_address(0));
}
int atomic_max_i32(int* p, int v) {
  return atomic_rmw(p, [v](int o) { return std::max(o, v); }, __builtin_return_address(0));
}
float atomic_add_f32(float* p, float v) {
  return atomic_rmw(p, [v](float o) { return o + v; }, __builtin_return_address(0));
}

void trap() {
  report("trap", __builtin_return_address(0), "thread %d of block %u executed __trap()", g_block.cur, g_block_idx.x);
  g_block.abandoned = true;
  Fiber& f = g_block.fibers[g_block.cur];
  for (;;) swapcontext(&f.ctx, &g_block.sched);
}

uint16_t float_to_half_bits(float f) { return c10::Half(f).x; }
float half_bits_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
uint16_t float_to_bf16_bits(float f) { return c10::BFloat16(f).x; }
float bf16_bits_to_float(uint16_t h) { return static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits())); }

void set_max_dynamic_smem(const void* kernel, int bytes) {
  for (auto& e : g_max_dyn) {
    if (e.first == kernel) {
      e.second = bytes;
      return;
    }
  }
  g_max_dyn.emplace_back(kernel, bytes);
}

void check_last_launch() {}

void register_dynamic_smem(void* (*getter)(), size_t capacity) {
  g_dyn_getter = getter;
  g_dyn_cap = capacity;
}

void launch(void (*entry)(void*), void* ctx, const void* kernel, dim3 grid, dim3 block, size_t dyn_smem,
            const void* arg_lo, size_t arg_bytes) {
  const size_t threads = size_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads) {
    report("launch", nullptr, "block of %zu threads (1 to 1024 allowed)", threads);
    return;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    report("launch", nullptr, "grid (%u, %u, %u) outside CUDA's limits", grid.x, grid.y, grid.z);
    return;
  }
  int opt_in = 48 * 1024;
  for (auto& e : g_max_dyn) {
    if (e.first == kernel) opt_in = std::max(opt_in, e.second);
  }
  if (dyn_smem > static_cast<size_t>(opt_in)) {
    report("launch", nullptr, "%zu bytes of dynamic shared memory without cudaFuncSetAttribute opting in (limit %d)",
           dyn_smem, opt_in);
    return;
  }
  if (dyn_smem > 227 * 1024) {
    report("launch", nullptr, "%zu bytes of dynamic shared memory: more than sm_90's 227 KiB", dyn_smem);
    return;
  }
  void* dyn = g_dyn_getter != nullptr ? g_dyn_getter() : nullptr;  // also allocates this thread's TLS block
  dl_iterate_phdr(find_module, nullptr);
  if (dyn_smem > 0 && (dyn == nullptr || dyn_smem > g_dyn_cap)) {
    report("launch", nullptr, "dynamic shared memory requested but the harness has no array for it");
    return;
  }
  g_dyn_lo = reinterpret_cast<uintptr_t>(dyn), g_dyn_bytes = dyn_smem;
  if (g_shadow.size() < g_tls_size) g_shadow.resize(g_tls_size);
  if (g_stacks == nullptr) {
    const size_t bytes = kMaxThreads * (kStackBytes + kGuardBytes);
    g_stacks = static_cast<uint8_t*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    for (int t = 0; t < kMaxThreads; ++t) mprotect(g_stacks + t * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
  g_args_lo = reinterpret_cast<uintptr_t>(arg_lo), g_args_hi = g_args_lo + arg_bytes;
  g_entry = entry, g_entry_ctx = ctx;
  g_grid_dim = grid, g_block_dim = block;
  g_running = true;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = uint3{x, y, z};
        // Shared memory starts as garbage on a GPU (what the previous block left, or anything):
        // 0x7f bytes are NaN in float16 and huge in bfloat16, so a stray read shows in the results
        // too (besides the "uninitialised shared read" report).
        if (dyn != nullptr) std::memset(dyn, 0x7f, dyn_smem);
        run_block();
        if (g_block.abandoned) goto done;
      }
    }
  }
done:
  g_running = false;
}

}  // namespace mmk_emu

// ------------------------------------------------------------------------------ tsan hooks

extern "C" {
#define MMK_HOOK(n)                                                                                              \
  void __tsan_read##n(void* p) { mmk_emu::access(p, n, false, __builtin_return_address(0)); }                  \
  void __tsan_write##n(void* p) { mmk_emu::access(p, n, true, __builtin_return_address(0)); }                  \
  void __tsan_unaligned_read##n(void* p) { mmk_emu::access(p, n, false, __builtin_return_address(0)); }        \
  void __tsan_unaligned_write##n(void* p) { mmk_emu::access(p, n, true, __builtin_return_address(0)); }        \
  void __tsan_volatile_read##n(void* p) { mmk_emu::access(p, n, false, __builtin_return_address(0)); }         \
  void __tsan_volatile_write##n(void* p) { mmk_emu::access(p, n, true, __builtin_return_address(0)); }
MMK_HOOK(1)
MMK_HOOK(2)
MMK_HOOK(4)
MMK_HOOK(8)
MMK_HOOK(16)
#undef MMK_HOOK
void __tsan_read_range(void* p, unsigned long n) { mmk_emu::access(p, n, false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { mmk_emu::access(p, n, true, __builtin_return_address(0)); }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_init() {}

// The harness's C interface (ctypes): buffers, errors.
void emu_clear() {
  mmk_emu::g_buffers.clear();
  mmk_emu::g_errors.clear();
  mmk_emu::g_reported.clear();
  mmk_emu::g_error_count = 0;
}
void emu_add_buffer(const void* p, size_t bytes, const char* name) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  mmk_emu::g_buffers.push_back({a, a + bytes, name});
}
size_t emu_error_count() { return mmk_emu::g_error_count; }
size_t emu_errors_kept() { return mmk_emu::g_errors.size(); }
const char* emu_error_text(size_t i) { return i < mmk_emu::g_errors.size() ? mmk_emu::g_errors[i].c_str() : ""; }
}
