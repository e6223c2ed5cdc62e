// CPU kernels of cross_modal_attention_varlen: packed variable-length sequences (FlashAttention-2's
// varlen layout). Each sequence is a problem of the dense kernel (cross_modal_attention.h) on strided
// views of the packed tensors ((1, H, L_b, E) views of its rows: no copy in, no padding), writing
// into views of the packed outputs. The whole batch is scheduled at once: a sequence large enough to
// keep every thread busy runs alone with the kernel's own parallel tasks; the others run side by
// side, one per thread (the kernel's nested parallel loops run inline), longest first from a shared
// counter: whole, or one problem per kv head (with its query heads) when they are too few to balance
// the threads. Dropout: each
// sequence's seed is the call's seed mixed with its index, so sequences draw independent masks, and
// a kv head's problem draws the whole sequence's mask for its heads (Problem::head0).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "cross_modal_attention.h"
#include "dropout_hash.h"

namespace mmkernels::cpu {
namespace {

// Sequence b's rows [off[b], off[b + 1]) of a prefix-sum tensor (its shape checked by
// check_varlen_shapes), the values checked against the packed total and the stated maximum length.
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_len,
                                     const char* max_name) {
  MMK_CHECK_ARG(cu.device().is_cpu(), name, "expected a CPU tensor, got ", cu.device());
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.const_data_ptr<int32_t>();
  std::vector<int64_t> off(p, p + c.numel());
  MMK_CHECK_ARG(off[0] == 0, name, "expected prefix sums starting at 0, got ", off[0]);
  for (size_t b = 0; b + 1 < off.size(); ++b) {
    MMK_CHECK_ARG(off[b + 1] >= off[b], name, "expected non-decreasing prefix sums, got ", off[b], " then ",
                  off[b + 1], " at ", b);
    MMK_CHECK_ARG(off[b + 1] - off[b] <= max_len, max_name, "sequence ", b, " has length ", off[b + 1] - off[b],
                  ", more than ", max_name, " = ", max_len);
  }
  MMK_CHECK_ARG(off.back() == total, name, "expected its last value to be ", total,
                " (the packed length of the tensors), got ", off.back());
  return off;
}

struct Packed {
  std::vector<int64_t> q_off, k_off;
  int64_t H = 0, E = 0, Ev = 0;
};

Packed check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                    const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  check_varlen_shapes(q, k, v, cu_q, cu_k);
  Packed s;
  s.q_off = read_cu_seqlens(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q");
  s.k_off = read_cu_seqlens(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k");
  s.H = q.size(1), s.E = q.size(2), s.Ev = v.size(2);
  return s;
}

// Sequence rows [off, off + n) of a packed (total, heads, D) tensor as a (1, heads, n, D) view.
at::Tensor seq_view(const at::Tensor& x, int64_t off, int64_t n) {
  return x.narrow(0, off, n).permute({1, 0, 2}).unsqueeze(0);
}

// The options every sequence shares, and the per-sequence problem of the dense kernel.
struct Shared {
  int64_t H = 0, Hkv = 0, E = 0, Ev = 0;
  double scale = 1.0;
  int64_t causal = 0;
  double dropout_p = 0.0;
  uint64_t seed = 0;  // the call's dropout seed, read once
};

Shared check_shared(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Packed& s, double scale,
                    double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  check_device_and_dtypes(q, "q", c10::DeviceType::CPU, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf},
                          "float32, float64, bfloat16 or float16 on the CPU");
  // The dense checks on (1, heads, total, D) views: dtypes, devices, GQA heads, head dims, dropout.
  const at::Tensor q4 = q.unsqueeze(0).transpose(1, 2), k4 = k.unsqueeze(0).transpose(1, 2);
  check_attention_qkv(q4, k4, v.unsqueeze(0).transpose(1, 2));
  check_attention_options(q4, k4, std::nullopt, std::nullopt, std::nullopt, dropout_p, dropout_seed);
  check_causal_mode(causal);
  Shared c;
  c.H = s.H, c.Hkv = k.size(1), c.E = s.E, c.Ev = s.Ev, c.scale = scale, c.causal = causal, c.dropout_p = dropout_p;
  if (dropout_p > 0.0) c.seed = static_cast<uint64_t>(dropout_seed->to(at::kCPU).item<int64_t>());
  return c;
}

// Sequence b's problem over kv heads [hk0, hk0 + nhk) and their query heads.
Problem seq_problem(const Shared& c, const Packed& s, size_t b, int64_t hk0, int64_t nhk) {
  const int64_t nq = s.q_off[b + 1] - s.q_off[b], nk = s.k_off[b + 1] - s.k_off[b];
  Problem p;
  p.G = c.Hkv > 0 ? c.H / c.Hkv : 1;
  p.B = 1, p.H = nhk * p.G, p.Hkv = nhk, p.Lq = nq, p.Lk = nk, p.E = c.E, p.Ev = c.Ev;
  p.head0 = hk0 * p.G;
  p.scale = c.scale;
  p.set_causal(c.causal);
  p.kbeg.assign(1, 0);
  p.kend.assign(1, nk);
  // An independent seed per sequence (shared with the CUDA kernels).
  if (c.dropout_p > 0.0) p.set_dropout(c.dropout_p, varlen_sequence_seed(c.seed, static_cast<int64_t>(b)));
  return p;
}

// Runs run(b, hk0, nhk) over every sequence b with queries: a sequence costing at least 1 / (2 threads)
// of the batch alone, over all its kv heads and every thread; the others side by side, longest first,
// each on one thread (a dense call inside a parallel region runs its tasks inline), whole or, when
// they are too few to balance the threads, as one problem per kv head.
template <typename F>
void for_each_problem(const Packed& s, int64_t Hkv, F&& run) {
  struct Unit {
    int64_t b, hk;
    double cost;
  };
  std::vector<Unit> units;
  double total = 0.0;
  for (size_t b = 0; b + 1 < s.q_off.size(); ++b) {
    const int64_t nq = s.q_off[b + 1] - s.q_off[b], nk = s.k_off[b + 1] - s.k_off[b];
    if (nq == 0 || Hkv == 0) continue;
    // Score work, plus a fixed cost per query row for what every block does besides.
    const double cost = static_cast<double>(nq) * static_cast<double>(nk + 64);
    units.push_back({static_cast<int64_t>(b), -1, cost});
    total += cost;
  }
  const int64_t nthreads = at::get_num_threads();
  std::vector<Unit> side_by_side;
  for (const Unit& u : units) {
    if (nthreads > 1 && u.cost * 2 * nthreads >= total) {
      run(u.b, 0, Hkv);
    } else {
      side_by_side.push_back(u);
    }
  }
  // Too few sequences to balance the threads: one problem per kv head instead (each call has a fixed
  // cost, its scratch, so sequences stay whole where there are enough of them).
  if (static_cast<int64_t>(side_by_side.size()) < 4 * nthreads && Hkv > 1) {
    std::vector<Unit> heads;
    for (const Unit& u : side_by_side)
      for (int64_t hk = 0; hk < Hkv; ++hk) heads.push_back({u.b, hk, u.cost / static_cast<double>(Hkv)});
    side_by_side.swap(heads);
  }
  std::stable_sort(side_by_side.begin(), side_by_side.end(),
                   [](const Unit& x, const Unit& y) { return x.cost > y.cost; });
  parallel_tasks(static_cast<int64_t>(side_by_side.size()),
                 [&](int64_t t, int) {
                   const Unit& u = side_by_side[t];
                   if (u.hk < 0) {
                     run(u.b, 0, Hkv);
                   } else {
                     run(u.b, u.hk, 1);
                   }
                 });
}

// The views of packed tensors that a problem of sequence b reads and writes: its query rows and
// heads of (total_q, H, D) tensors, its key rows and kv heads of (total_k, H_kv, D) ones, as
// (1, heads, n, D); and its rows and heads of (H, total_q) ones (lse, D) as (1, heads, n).
struct Views {
  int64_t q0, nq, k0, nk, h0, nh, hk0, nhk;
  Views(const Packed& s, int64_t b, const Problem& p, int64_t hk0_)
      : q0(s.q_off[b]), nq(s.q_off[b + 1] - q0), k0(s.k_off[b]), nk(s.k_off[b + 1] - k0), h0(p.head0), nh(p.H),
        hk0(hk0_), nhk(p.Hkv) {}
  at::Tensor q(const at::Tensor& x) const { return seq_view(x, q0, nq).narrow(1, h0, nh); }
  at::Tensor k(const at::Tensor& x) const { return seq_view(x, k0, nk).narrow(1, hk0, nhk); }
  at::Tensor rows(const at::Tensor& x) const { return x.narrow(1, q0, nq).narrow(0, h0, nh).unsqueeze(0); }
};

std::tuple<at::Tensor, at::Tensor> cross_modal_attention_varlen_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, int64_t causal) {
  const Packed s = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Shared c = check_shared(q, k, v, s, scale, dropout_p, dropout_seed, causal);
  const auto dt = q.scalar_type();
  const auto ct = dt == at::kDouble ? at::kDouble : at::kFloat;
  // The operands the kernel reads in place: bfloat16 (see bf16_in_place) and float16 as they are, the
  // rest in the compute type (converted once for the whole batch).
  const bool in_place = (dt == at::kBFloat16 && bf16_in_place(s.E)) || dt == at::kHalf;
  const at::Tensor qc = last_dim_contiguous(in_place ? q : q.to(ct));
  const at::Tensor kl = last_dim_contiguous(in_place ? k : k.to(ct));
  const at::Tensor kc = dt == at::kBFloat16 && in_place ? bf16_pairs_aligned(kl) : kl;
  const at::Tensor vc = last_dim_contiguous(in_place ? v : v.to(ct));
  at::Tensor out = at::empty({q.size(0), s.H, s.Ev}, q.options().dtype(in_place ? dt : ct));
  at::Tensor lse = at::empty({s.H, q.size(0)}, q.options().dtype(ct));
  for_each_problem(s, c.Hkv, [&](int64_t b, int64_t hk0, int64_t nhk) {
    const Problem p = seq_problem(c, s, static_cast<size_t>(b), hk0, nhk);
    const Views view(s, b, p, hk0);
    at::Tensor ob = view.q(out), lb = view.rows(lse);
    attention_forward(p, view.q(qc), view.k(kc), view.k(vc), ob, lb);
  });
  return {out.scalar_type() == dt ? out : out.to(dt), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_modal_attention_varlen_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed,
    int64_t causal) {
  const Packed s = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const Shared c = check_shared(q, k, v, s, scale, dropout_p, dropout_seed, causal);
  MMK_CHECK_ARG(grad_out.sizes() == at::IntArrayRef({q.size(0), s.H, s.Ev}), "grad_out", "expected shape (",
                q.size(0), ", ", s.H, ", ", s.Ev, "), got ", grad_out.sizes());
  MMK_CHECK_ARG(out.sizes() == grad_out.sizes(), "out", "expected shape ", grad_out.sizes(), ", got ", out.sizes());
  MMK_CHECK_ARG(lse.sizes() == at::IntArrayRef({s.H, q.size(0)}), "lse", "expected shape (", s.H, ", ", q.size(0),
                "), got ", lse.sizes());
  const auto dt = q.scalar_type();
  const auto ct = dt == at::kDouble ? at::kDouble : at::kFloat;
  // Everything in the compute type, converted once for the whole batch.
  const at::Tensor qc = last_dim_contiguous(q.to(ct)), kc = last_dim_contiguous(k.to(ct));
  const at::Tensor vc = last_dim_contiguous(v.to(ct)), doc = last_dim_contiguous(grad_out.to(ct));
  const at::Tensor lsec = lse.to(ct).contiguous();
  // D = rowsum(dO O) for every packed row at once: (1, H, total_q), the layout of lse.
  Problem whole;
  whole.B = 1, whole.H = s.H, whole.Lq = q.size(0), whole.Ev = s.Ev;
  const at::Tensor D = attention_row_dot(seq_view(doc, 0, q.size(0)),
                                         seq_view(last_dim_contiguous(out.to(ct)), 0, q.size(0)), whole)[0];
  at::Tensor dq = at::empty(q.sizes(), q.options().dtype(ct));
  at::Tensor dk = at::empty(k.sizes(), k.options().dtype(ct));
  at::Tensor dv = at::empty(v.sizes(), v.options().dtype(ct));
  // Keys of a sequence with no query get no task: zero gradient.
  for (size_t b = 0; b + 1 < s.q_off.size(); ++b) {
    if (s.q_off[b + 1] > s.q_off[b]) continue;
    dk.narrow(0, s.k_off[b], s.k_off[b + 1] - s.k_off[b]).zero_();
    dv.narrow(0, s.k_off[b], s.k_off[b + 1] - s.k_off[b]).zero_();
  }
  for_each_problem(s, c.Hkv, [&](int64_t b, int64_t hk0, int64_t nhk) {
    const Problem p = seq_problem(c, s, static_cast<size_t>(b), hk0, nhk);
    const Views view(s, b, p, hk0);
    at::Tensor dqb = view.q(dq), dkb = view.k(dk), dvb = view.k(dv);
    attention_backward(p, view.q(qc), view.k(kc), view.k(vc), view.q(doc), view.rows(lsec), view.rows(D), dqb, dkb,
                       dvb);
  });
  if (dt == ct) return {dq, dk, dv};
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("cross_modal_attention_varlen", &cross_modal_attention_varlen_cpu);
  m.impl("cross_modal_attention_varlen_backward", &cross_modal_attention_varlen_backward_cpu);
}

}  // namespace mmkernels::cpu
