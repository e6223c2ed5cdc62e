// CPU kernels of fused_concat_linear: act(cat(inputs, -1) @ W.T + b) without the concatenation.
//
// Forward walks the output in row blocks. For each block every segment's GEMM accumulates into the
// block (x_s @ W[:, cols_s].T, BLAS through ATen, bias folded in through beta = 1), then the
// activation runs over the block while it is still in cache. Enough blocks: threads take whole
// blocks (single-threaded GEMMs, no synchronisation); too few: blocks run in turn and each GEMM
// uses every thread.
// Backward, in row blocks too: gz = grad_out * act'(.) and its column sums (grad_bias) per block;
// where W is small each block then also writes its rows of every input's gradient (gz @ W[:, cols_s])
// and adds gz.T @ x_s into per-thread partial sums of grad_weight, so gz never exists in full.
// Where W is large, gz is formed in full and whole-M GEMMs write each input's gradient and each
// column block of grad_weight. No concatenation, no split, in either direction, except under the
// few-rows heuristic (concat_is_cheaper) where the concatenation is smaller than W.
// float32 with at most small_gemm::kMaxRows rows takes neither path: small_gemm's kernels, in place.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "activation.h"
#include "checks.h"
#include "matmul.h"
#include "small_gemm.h"

namespace mmkernels::cpu {
namespace {

struct Problem {
  int64_t M = 0, N = 0, K = 0;
  std::vector<int64_t> lead;          // leading (batch) dims of every input
  std::vector<at::Tensor> rows;       // each input as a (M, D_s) matrix
  std::vector<int64_t> offsets;       // each segment's first column in W, then K
};

Problem make_problem(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_device_and_dtypes(weight, "weight", c10::DeviceType::CPU, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf},
                          "float32, float64, bfloat16 or float16");
  auto lead = check_concat_linear(inputs, weight, bias);
  Problem p;
  p.N = weight.size(0);
  p.K = weight.size(1);
  p.M = c10::multiply_integers(lead);
  p.lead = std::move(lead);
  p.offsets.push_back(0);
  for (const auto& x : inputs) {
    const int64_t d = x.size(-1);
    p.rows.push_back(x.reshape({p.M, d}));  // a view unless the leading dims cannot be flattened
    p.offsets.push_back(p.offsets.back() + d);
  }
  return p;
}

std::vector<int64_t> out_shape(const Problem& p) {
  auto shape = p.lead;
  shape.push_back(p.N);
  return shape;
}

// Rows per block: about 64K output elements (256 KB of float32, cache-resident for the epilogue),
// and at least 512 rows when W is large, so that packing W inside each GEMM call stays cheap.
int64_t block_rows(const Problem& p) {
  int64_t rows = std::clamp<int64_t>((int64_t(1) << 16) / std::max<int64_t>(p.N, 1), 64, 4096);
  if (p.K * p.N > (int64_t(1) << 20)) rows = std::max<int64_t>(rows, 512);
  return rows;
}

// Shape heuristic: few rows. Then every GEMM is bound by streaming W, and the concatenation
// (M x K) is small next to W (N x K): one GEMM on a concatenated copy of the inputs costs less
// than one GEMM per segment (fewer BLAS calls and parallel regions, the same W traffic), and in
// bfloat16 it rounds once instead of once per segment. The fused path wins where M*K is large,
// which is where the concatenation costs memory and time. Measured on the issue-2 shapes (see
// benchmarks/RESULTS.md): (32, (2048, 1024), 512) lost to eager fused and takes this path; every
// other shape has M >= 8 N.
bool concat_is_cheaper(const Problem& p) { return p.rows.size() > 1 && p.M * 8 <= p.N; }

// Copies between the (M, D_s) segments and one (M, K) row-major matrix holding them side by side:
// parts -> whole (to_whole) or whole -> parts. One memcpy per row and segment, in parallel only over
// chunks of at least 1 MB: at::cat and Tensor::copy_ open a parallel region above 32K elements, and
// under load each region waits for a descheduled thread (this is the few-rows path, where the copies
// are small next to W). Segments whose rows are not contiguous go through at::cat / copy_.
void copy_segments(const at::Tensor& whole, const std::vector<at::Tensor>& parts, bool to_whole) {
  const int64_t M = whole.size(0), K = whole.size(1);
  bool rows_contiguous = whole.is_contiguous();
  for (const auto& x : parts) rows_contiguous = rows_contiguous && x.stride(1) == 1 && x.scalar_type() == whole.scalar_type();
  if (!rows_contiguous) {
    if (to_whole) {
      at::Tensor out = whole;
      at::cat_out(out, parts, 1);
    } else {
      for (int64_t s = 0, off = 0; s < int64_t(parts.size()); off += parts[s].size(1), ++s) {
        at::Tensor dst = parts[s];
        dst.copy_(whole.narrow(1, off, parts[s].size(1)));
      }
    }
    return;
  }
  const int64_t elem = whole.element_size();
  char* base = static_cast<char*>(whole.data_ptr());
  const int64_t grain = std::max<int64_t>(1, ((int64_t(1) << 20) / elem + K - 1) / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    int64_t off = 0;
    for (const auto& x : parts) {
      const int64_t d = x.size(1);
      if (d == 0) continue;
      char* seg = static_cast<char*>(x.data_ptr());
      for (int64_t r = r0; r < r1; ++r) {
        char* w = base + (r * K + off) * elem;
        char* v = seg + r * x.stride(0) * elem;
        if (to_whole) std::memcpy(w, v, d * elem); else std::memcpy(v, w, d * elem);
      }
      off += d;
    }
  });
}

// The same problem with the inputs concatenated into one segment (used where concat_is_cheaper).
Problem concatenated(const Problem& p, const at::Tensor& weight) {
  Problem c;
  c.M = p.M, c.N = p.N, c.K = p.K, c.lead = p.lead;
  c.rows = {at::empty({p.M, p.K}, weight.options())};
  copy_segments(c.rows[0], p.rows, true);
  c.offsets = {0, p.K};
  return c;
}

// Runs fn(row_begin, row_count) over row blocks: in parallel across blocks when there are enough,
// otherwise in turn (ATen ops inside then use every thread).
template <typename F>
void for_each_row_block(int64_t M, int64_t rows, F&& fn) {
  const int64_t nblocks = (M + rows - 1) / rows;
  auto run = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * rows, std::min(rows, M - b * rows));
  };
  if (nblocks >= 2 * at::get_num_threads()) {
    // OpenMP workers do not inherit the caller's dispatcher state (we run below autograd): carry it over.
    const at::ThreadLocalState state;
    at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
      at::ThreadLocalStateGuard guard(state);
      run(b0, b1);
    });
  } else {
    run(0, nblocks);
  }
}

// Above this many weight elements W no longer fits in cache beside a row block: each block's GEMMs
// stream it from memory again, and backward's per-thread grad_weight partials cost more to reduce
// than they save.
constexpr int64_t kLargeWeight = int64_t(1) << 18;

// Shape rule: where matmul_out runs on oneDNN, one whole-M GEMM per segment (oneDNN threads each
// one, 1.2-1.5x faster than row blocks of single-threaded GEMMs here) beats the row blocks and their
// in-cache epilogue when W is large, and always without an activation (no epilogue to keep in
// cache). With MKL, or a small W and an activation, the row blocks win (measured:
// benchmarks/RESULTS.md, "Session 5"). Forward and backward follow it alike.
bool whole_matrix_gemms(const Problem& p, at::ScalarType dtype, Activation act) {
  return matmul_uses_onednn(dtype) && (p.N * p.K > kLargeWeight || act == Activation::None);
}

// act(block) in place. ATen's unary kernels are vectorised for the CPU it runs on (AVX-512 here),
// which this file, built without -march flags, could not be; on a block that is still in cache
// each is a cheap pass.
void activate_(at::Tensor& block, Activation act) {
  switch (act) {
    case Activation::None: break;
    case Activation::Relu: block.relu_(); break;
    case Activation::Gelu: at::gelu_(block); break;
    case Activation::GeluTanh: at::gelu_(block, "tanh"); break;
    case Activation::Silu: at::silu_(block); break;
    case Activation::Tanh: block.tanh_(); break;
    case Activation::Sigmoid: block.sigmoid_(); break;
  }
}

// gz = grad_out * act'(.), from the pre-activation z or the output y: the same ATen kernels eager
// autograd runs, so the numbers match it.
void activation_backward_out(at::Tensor& gz, const at::Tensor& g, const at::Tensor& z, const at::Tensor& y,
                             Activation act) {
  switch (act) {
    case Activation::None: gz.copy_(g); break;
    case Activation::Relu: at::threshold_backward_out(gz, g, y, 0); break;
    case Activation::Gelu: at::gelu_backward_out(gz, g, z, "none"); break;
    case Activation::GeluTanh: at::gelu_backward_out(gz, g, z, "tanh"); break;
    case Activation::Silu: at::silu_backward_out(gz, g, z); break;
    case Activation::Tanh: at::tanh_backward_out(gz, g, y); break;
    case Activation::Sigmoid: at::sigmoid_backward_out(gz, g, y); break;
  }
}

// Few rows in float32 (fusion heads, decoding steps: M <= small_gemm::kMaxRows): small_gemm's kernels
// read every segment and W in place, with no BLAS call, no concatenation and no split (issue 19).
bool few_rows_kernel(const Problem& p, const at::Tensor& weight) {
  if (weight.scalar_type() != at::kFloat || p.M > small_gemm::kMaxRows || weight.stride(1) != 1) return false;
  for (const auto& x : p.rows) {
    if (x.stride(1) != 1 && x.size(1) > 1) return false;
  }
  return true;
}

// fn(begin, end) over [0, n) items (rows or columns of a result), in parallel chunks (multiples of
// `align`) only where each chunk gets at least 2^18 multiply-adds: below that a parallel region costs
// more than it saves.
template <typename F>
void split_work(int64_t n, int64_t macs_per_item, int64_t align, F&& fn) {
  const int64_t items = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(macs_per_item, 1));
  const int64_t grain = (items + align - 1) / align;
  const int64_t chunks = (n + align - 1) / align;
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) { fn(c0 * align, std::min(n, c1 * align)); });
}

// out = x @ W.T + b, and relu in place where `relu` (the other activations are ATen's, after).
void few_rows_forward(const Problem& p, const at::Tensor& weight, const std::optional<at::Tensor>& bias, bool relu,
                      at::Tensor& out) {
  const auto& offsets = p.offsets;
  const float* w = weight.data_ptr<float>();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* c = out.data_ptr<float>();
  split_work(p.N, p.M * p.K, 4, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < p.M; ++i) {
      float* row = c + i * p.N;
      for (int64_t j = j0; j < j1; ++j) row[j] = bp ? bp[j] : 0.0f;
    }
    for (size_t s = 0; s < p.rows.size(); ++s) {
      const int64_t d = offsets[s + 1] - offsets[s];
      if (d == 0) continue;
      small_gemm::dot_rows(p.M, j1 - j0, d, p.rows[s].data_ptr<float>(), p.rows[s].stride(0),
                           w + j0 * weight.stride(0) + offsets[s], weight.stride(0), c + j0, p.N, true);
    }
    for (int64_t i = 0; relu && i < p.M; ++i) {
      float* row = c + i * p.N;
      for (int64_t j = j0; j < j1; ++j) row[j] = row[j] < 0.0f ? 0.0f : row[j];  // NaN stays NaN, as in ATen
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_concat_linear_cpu(at::TensorList inputs, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           c10::string_view activation) {
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  Problem p = make_problem(inputs, weight, bias);
  if (concat_is_cheaper(p) && !few_rows_kernel(p, weight)) p = concatenated(p, weight);
  const bool keep_preact = needs_preactivation(act);
  at::Tensor out = at::empty({p.M, p.N}, weight.options());
  at::Tensor preact = at::empty({keep_preact ? p.M : 0, keep_preact ? p.N : 0}, weight.options());
  auto result = [&] {
    return std::make_tuple(out.view(out_shape(p)), keep_preact ? preact.view(out_shape(p)) : preact.view({0}));
  };
  if (p.M == 0 || p.N == 0) return result();
  if (few_rows_kernel(p, weight)) {
    few_rows_forward(p, weight, bias, act == Activation::Relu, out);
    if (keep_preact) preact.copy_(out);
    if (act != Activation::Relu) activate_(out, act);
    return result();
  }

  // bfloat16/float16: ATen has no CPU GEMM with a float32 output, so summing per-segment products
  // would round each one to 8 bits and move pre-activations across relu's kink far more often than
  // eager does. Instead each row block's segments are staged side by side (rows x K, one block per
  // thread, never the whole concatenation) and one GEMM accumulates all of K in float32 and rounds
  // once, exactly as eager's linear does.
  const bool stage = at::toOpMathType(weight.scalar_type()) != weight.scalar_type() && p.rows.size() > 1;
  std::vector<at::Tensor> weight_t;  // W[:, cols_s].T, (D_s, N) strided views
  for (size_t s = 0; s < p.rows.size(); ++s) weight_t.push_back(weight.narrow(1, p.offsets[s], p.rows[s].size(1)).t());
  const at::Tensor bias_row = bias.has_value() ? bias->view({1, p.N}) : at::Tensor();
  // Whole-M GEMMs are one block of all rows: it runs alone, so each GEMM gets every thread.
  const int64_t rows = whole_matrix_gemms(p, weight.scalar_type(), act) ? p.M : block_rows(p);
  for_each_row_block(p.M, rows, [&](int64_t r0, int64_t rn) {
    at::Tensor block = out.narrow(0, r0, rn);
    auto gemm = [&](const at::Tensor& x, const at::Tensor& w_t, bool first) {
      if (first && bias_row.defined()) block.copy_(bias_row.expand_as(block));  // then accumulated onto, as addmm does
      matmul_out(block, x, w_t, !first || bias_row.defined());
    };
    if (stage) {
      std::vector<at::Tensor> parts;
      for (const auto& x : p.rows) parts.push_back(x.narrow(0, r0, rn));
      gemm(at::cat(parts, 1), weight.t(), true);
    } else {
      for (size_t s = 0; s < p.rows.size(); ++s) gemm(p.rows[s].narrow(0, r0, rn), weight_t[s], s == 0);
    }
    if (keep_preact) preact.narrow(0, r0, rn).copy_(block);
    activate_(block, act);
  });
  return result();
}

// Backward keeps per-thread partial sums of grad_weight (and of grad_bias) when W is small: then
// each row block does all its work while its gz is in cache (gz, grad_bias, grad_inputs, grad_weight)
// and gz never exists in full. A large W (kLargeWeight): gz is formed in full, then large GEMMs follow.

struct Grads {
  std::vector<at::Tensor> inputs;  // (M, D_s) each, or undefined where not needed
  at::Tensor weight, bias;         // undefined where not needed
};

// The backward of one Problem: g is grad_out as (M, N); z/y the saved pre-activation/output.
Grads backward(const Problem& p, const at::Tensor& g, const at::Tensor& z_saved, const at::Tensor& y_saved,
               const at::Tensor& weight, Activation act, const std::vector<bool>& inputs_need_grad,
               bool weight_needs_grad, bool bias_needs_grad) {
  const size_t S = p.rows.size();
  const bool from_pre = needs_preactivation(act);
  const at::Tensor z = from_pre ? z_saved.reshape({p.M, p.N}).contiguous() : at::Tensor();
  const at::Tensor y = (act != Activation::None && !from_pre) ? y_saved.reshape({p.M, p.N}).contiguous() : at::Tensor();
  const auto acc_type = at::toOpMathType(weight.scalar_type());
  const bool low_precision = acc_type != weight.scalar_type();

  std::vector<at::Tensor> grad_inputs(S);
  const auto& offsets = p.offsets;
  for (size_t s = 0; s < S; ++s) {
    if (inputs_need_grad[s]) grad_inputs[s] = at::empty({p.M, p.rows[s].size(1)}, weight.options());
  }
  at::Tensor grad_weight = weight_needs_grad ? at::empty({p.N, p.K}, weight.options()) : at::Tensor();
  const int64_t rows = block_rows(p);
  const int64_t nthreads = at::get_num_threads();
  const bool fused = !whole_matrix_gemms(p, weight.scalar_type(), act) && p.N * p.K <= kLargeWeight &&
                     (p.M + rows - 1) / rows >= 2 * nthreads;
  // Per-thread partial sums, in the accumulation type: [thread][segment] for grad_weight, [thread] for bias.
  std::vector<at::Tensor> weight_parts(fused && weight_needs_grad ? nthreads * S : 0);
  std::vector<at::Tensor> bias_parts(bias_needs_grad ? nthreads : 0);
  at::Tensor gz_full = fused ? at::Tensor() : (act == Activation::None ? g : at::empty_like(g));

  if (p.M > 0) {
    for_each_row_block(p.M, rows, [&](int64_t r0, int64_t rn) {
      const int64_t t = at::in_parallel_region() ? at::get_thread_num() : 0;
      at::Tensor gz = g.narrow(0, r0, rn);
      if (act != Activation::None) {
        at::Tensor dst = fused ? at::empty({rn, p.N}, g.options()) : gz_full.narrow(0, r0, rn);
        activation_backward_out(dst, gz, from_pre ? z.narrow(0, r0, rn) : z, from_pre ? y : y.narrow(0, r0, rn), act);
        gz = dst;
      }
      if (bias_needs_grad) {
        at::Tensor part = at::sum(gz, {0}, false, acc_type);
        bias_parts[t] = bias_parts[t].defined() ? bias_parts[t].add_(part) : part;
      }
      if (!fused) return;
      for (size_t s = 0; s < S; ++s) {
        const at::Tensor w_s = weight.narrow(1, offsets[s], offsets[s + 1] - offsets[s]);
        if (inputs_need_grad[s]) {
          at::Tensor gx = grad_inputs[s].narrow(0, r0, rn);
          matmul_out(gx, gz, w_s, false);
        }
        if (!weight_needs_grad) continue;
        at::Tensor& part = weight_parts[t * S + s];
        const at::Tensor x = p.rows[s].narrow(0, r0, rn);
        if (low_precision) {
          at::Tensor prod = at::empty({p.N, x.size(1)}, x.options());
          matmul_out(prod, gz.t(), x, false);
          part = part.defined() ? part.add_(prod) : prod.to(acc_type);
        } else {
          const bool first = !part.defined();
          if (first) part = at::empty({p.N, x.size(1)}, x.options());
          matmul_out(part, gz.t(), x, !first);
        }
      }
    });
  }

  if (!fused) {
    // Large W: whole-M GEMMs (the BLAS parallelises each one) into each input's gradient and into
    // each column block of grad_weight (written in place, row stride K): no concatenation, no split.
    for (size_t s = 0; s < S; ++s) {
      const int64_t d = offsets[s + 1] - offsets[s];
      if (inputs_need_grad[s]) matmul_out(grad_inputs[s], gz_full, weight.narrow(1, offsets[s], d), false);
      if (weight_needs_grad) matmul_out(grad_weight.narrow(1, offsets[s], d), gz_full.t(), p.rows[s], false);
    }
  } else if (weight_needs_grad) {
    for (size_t s = 0; s < S; ++s) {
      at::Tensor sum;
      for (int64_t t = 0; t < nthreads; ++t) {
        const at::Tensor& part = weight_parts[t * S + s];
        if (part.defined()) sum = sum.defined() ? sum.add_(part) : part;
      }
      at::Tensor cols = grad_weight.narrow(1, offsets[s], offsets[s + 1] - offsets[s]);
      if (sum.defined()) cols.copy_(sum); else cols.zero_();
    }
  }
  at::Tensor grad_bias;
  if (bias_needs_grad) {
    for (const auto& part : bias_parts) {
      if (part.defined()) grad_bias = grad_bias.defined() ? grad_bias.add_(part) : part;
    }
    grad_bias = grad_bias.defined() ? grad_bias.to(weight.scalar_type()) : at::zeros({p.N}, weight.options());
  }
  return {std::move(grad_inputs), std::move(grad_weight), std::move(grad_bias)};
}

// The backward where few_rows_kernel: gz = grad_out * act'(.) (ATen's kernels, as above), then each
// input's gradient gz @ W[:, cols_s] and each column block of grad_weight gz.T @ x_s, in place.
Grads few_rows_backward(const Problem& p, const at::Tensor& g, const at::Tensor& z_saved, const at::Tensor& y_saved,
                        const at::Tensor& weight, Activation act, const std::vector<bool>& inputs_need_grad,
                        bool weight_needs_grad, bool bias_needs_grad) {
  at::Tensor gz = g;
  if (act != Activation::None) {
    const bool from_pre = needs_preactivation(act);
    gz = at::empty_like(g);
    activation_backward_out(gz, g, from_pre ? z_saved.reshape({p.M, p.N}) : at::Tensor(),
                            from_pre ? at::Tensor() : y_saved.reshape({p.M, p.N}), act);
  }
  const float* gp = gz.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const int64_t ldw = weight.stride(0);
  const auto& offsets = p.offsets;
  Grads r;
  r.inputs.resize(p.rows.size());
  for (size_t s = 0; s < p.rows.size(); ++s) {
    if (!inputs_need_grad[s]) continue;
    const int64_t d = offsets[s + 1] - offsets[s];
    r.inputs[s] = at::empty({p.M, d}, weight.options());
    float* dx = r.inputs[s].data_ptr<float>();
    split_work(d, p.M * p.N, 16, [&](int64_t j0, int64_t j1) {
      small_gemm::outer(p.M, j1 - j0, p.N, gp, p.N, 1, w + offsets[s] + j0, ldw, dx + j0, d, false);
    });
  }
  if (weight_needs_grad) {
    r.weight = at::empty({p.N, p.K}, weight.options());
    float* dw = r.weight.data_ptr<float>();
    split_work(p.N, p.M * p.K, 4, [&](int64_t i0, int64_t i1) {
      for (size_t s = 0; s < p.rows.size(); ++s) {
        small_gemm::outer(i1 - i0, offsets[s + 1] - offsets[s], p.M, gp + i0, 1, p.N, p.rows[s].data_ptr<float>(),
                          p.rows[s].stride(0), dw + i0 * p.K + offsets[s], p.K, false);
      }
    });
  }
  if (bias_needs_grad) {
    r.bias = at::zeros({p.N}, weight.options());
    float* db = r.bias.data_ptr<float>();
    for (int64_t i = 0; i < p.M; ++i) {
      for (int64_t j = 0; j < p.N; ++j) db[j] += gp[i * p.N + j];
    }
  }
  return r;
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> fused_concat_linear_backward_cpu(
    const at::Tensor& grad_out, at::TensorList inputs, const at::Tensor& weight, const at::Tensor& out,
    const at::Tensor& preact, c10::string_view activation, const c10::List<bool>& inputs_need_grad,
    bool weight_needs_grad, bool bias_needs_grad) {
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  Problem p = make_problem(inputs, weight, std::nullopt);
  MMK_CHECK_ARG(inputs_need_grad.size() == inputs.size(), "inputs_need_grad", "expected ", inputs.size(),
                " flags, got ", inputs_need_grad.size());
  MMK_CHECK_ARG(grad_out.sizes().equals(out_shape(p)), "grad_out", "expected shape ", at::IntArrayRef(out_shape(p)),
                ", got ", grad_out.sizes());
  check_same_device_dtype(grad_out, weight, "grad_out");
  if (act != Activation::None) {  // the saved tensor the activation's derivative is read from
    const bool from_pre = needs_preactivation(act);
    const at::Tensor& saved = from_pre ? preact : out;
    const char* name = from_pre ? "preact" : "out";
    MMK_CHECK_ARG(saved.sizes().equals(out_shape(p)), name, "expected shape ", at::IntArrayRef(out_shape(p)),
                  " for activation '", std::string(activation), "', got ", saved.sizes());
    check_same_device_dtype(saved, weight, name);
  }
  const at::Tensor g = grad_out.reshape({p.M, p.N}).contiguous();
  std::vector<bool> need(inputs_need_grad.begin(), inputs_need_grad.end());
  const auto empty = at::empty({0}, weight.options());
  std::vector<at::Tensor> grad_inputs(inputs.size(), empty);
  Grads gr;
  if (concat_is_cheaper(p) && !few_rows_kernel(p, weight)) {
    // As the forward did: one segment, so two GEMMs (two parallel regions) in all, as eager's backward;
    // the (M, K) input gradient is then split into one fresh tensor per input (small here, and copied
    // without a parallel region, see copy_segments).
    const bool any = std::any_of(need.begin(), need.end(), [](bool b) { return b; });
    gr = backward(concatenated(p, weight), g, preact, out, weight, act, {any}, weight_needs_grad, bias_needs_grad);
    if (any) {
      std::vector<at::Tensor> parts;
      for (size_t s = 0; s < inputs.size(); ++s) parts.push_back(at::empty({p.M, inputs[s].size(-1)}, weight.options()));
      copy_segments(gr.inputs[0], parts, false);
      for (size_t s = 0; s < inputs.size(); ++s) {
        if (need[s]) grad_inputs[s] = parts[s];
      }
    }
  } else {
    auto run = few_rows_kernel(p, weight) ? few_rows_backward : backward;
    gr = run(p, g, preact, out, weight, act, need, weight_needs_grad, bias_needs_grad);
    for (size_t s = 0; s < inputs.size(); ++s) {
      if (need[s]) grad_inputs[s] = gr.inputs[s];
    }
  }
  for (size_t s = 0; s < inputs.size(); ++s) {
    if (need[s]) grad_inputs[s] = grad_inputs[s].view(inputs[s].sizes());
  }
  return {std::move(grad_inputs), gr.weight.defined() ? gr.weight : empty, gr.bias.defined() ? gr.bias : empty};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("fused_concat_linear", &fused_concat_linear_cpu);
  m.impl("fused_concat_linear_backward", &fused_concat_linear_backward_cpu);
}

}  // namespace mmkernels::cpu
