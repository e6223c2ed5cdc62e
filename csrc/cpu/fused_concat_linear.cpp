// CPU kernels of fused_concat_linear: act(cat(inputs, -1) @ W.T + b) without the concatenation.
//
// Forward walks the output in row blocks. For each block every segment's GEMM accumulates into the
// block (x_s @ W[:, cols_s].T, BLAS through ATen), then bias + activation run over the block while
// it is still in cache. Enough blocks: threads take whole blocks (single-threaded GEMMs, no
// synchronisation); too few: blocks run in turn and each GEMM uses every thread.
// Backward forms gz = grad_out * act'(.) once, then writes each input's gradient (gz @ W[:, cols_s])
// and each column block of grad_weight (gz.T @ x_s) directly: no concatenation, no split.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/functional.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "activation_vec.h"
#include "checks.h"

namespace mmkernels::cpu {
namespace {

struct Problem {
  int64_t M = 0, N = 0, K = 0;
  std::vector<int64_t> lead;          // leading (batch) dims of every input
  std::vector<at::Tensor> rows;       // each input as a (M, D_s) matrix
  std::vector<at::Tensor> weight_t;   // W[:, cols_s].T, a (D_s, N) strided view
};

Problem make_problem(at::TensorList inputs, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  MMK_CHECK_ARG(!inputs.empty(), "inputs", "expected at least one tensor, got an empty list");
  MMK_CHECK_ARG(weight.dim() == 2, "weight", "expected a 2-D (out_features, in_features) tensor, got ",
                weight.dim(), "-D");
  const auto dt = weight.scalar_type();
  MMK_CHECK_ARG(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, "weight",
                "expected float32, float64, bfloat16 or float16, got ", dt);
  Problem p;
  p.N = weight.size(0);
  auto lead = inputs[0].sizes().vec();
  MMK_CHECK_ARG(!lead.empty(), "inputs[0]", "expected at least 1 dimension (..., features), got a 0-D tensor");
  lead.pop_back();
  int64_t offset = 0;
  for (size_t s = 0; s < inputs.size(); ++s) {
    const auto& x = inputs[s];
    const std::string name = "inputs[" + std::to_string(s) + "]";
    MMK_CHECK_ARG(x.dim() >= 1, name, "expected at least 1 dimension (..., features), got a 0-D tensor");
    check_same_device_dtype(x, weight, name.c_str());
    MMK_CHECK_ARG(x.sizes().slice(0, x.dim() - 1).equals(lead), name, "expected leading dims ", at::IntArrayRef(lead),
                  " (those of inputs[0]), got ", x.sizes().slice(0, x.dim() - 1));
    offset += x.size(-1);
  }
  MMK_CHECK_ARG(offset == weight.size(1), "weight", "expected ", offset,
                " columns (the sum of the inputs' feature sizes), got shape ", weight.sizes());
  if (bias.has_value()) {
    MMK_CHECK_ARG(bias->dim() == 1 && bias->size(0) == p.N, "bias", "expected shape (", p.N, "), got ", bias->sizes());
    check_same_device_dtype(*bias, weight, "bias");
  }
  p.K = offset;
  p.M = c10::multiply_integers(lead);
  p.lead = std::move(lead);
  offset = 0;
  for (const auto& x : inputs) {
    const int64_t d = x.size(-1);
    p.rows.push_back(x.reshape({p.M, d}));  // a view unless the leading dims cannot be flattened
    p.weight_t.push_back(weight.narrow(1, offset, d).t());
    offset += d;
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

// Runs fn(row_begin, row_count) over row blocks: in parallel across blocks when there are enough,
// otherwise in turn (ATen ops inside then use every thread).
template <typename F>
void for_each_row_block(int64_t M, int64_t rows, F&& fn) {
  const int64_t nblocks = (M + rows - 1) / rows;
  // OpenMP workers do not inherit the caller's dispatcher state (we run below autograd): carry it over.
  const at::ThreadLocalState state;
  auto run = [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t b = b0; b < b1; ++b) fn(b * rows, std::min(rows, M - b * rows));
  };
  if (nblocks >= 2 * at::get_num_threads()) {
    at::parallel_for(0, nblocks, 1, run);
  } else {
    run(0, nblocks);
  }
}

// acc (rows x N, compute type T) += bias; preact = acc; acc = act(acc); out = acc. acc may alias out.
template <Activation A, typename T, typename out_t>
void epilogue(T* acc, out_t* out, out_t* preact, const T* bias, int64_t rows, int64_t N) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t r = 0; r < rows; ++r) {
    T* a = acc + r * N;
    if (bias != nullptr) at::vec::map2<T>([](Vec<T> x, Vec<T> b) { return x + b; }, a, a, bias, N);
    if (preact != nullptr) at::vec::convert(a, preact + r * N, N);
    if constexpr (A != Activation::None) {
      for (int64_t j = 0; j < N; j += W) {
        const int64_t n = std::min(W, N - j);
        activate_vec<A, T>(Vec<T>::loadu(a + j, n)).store(a + j, n);
      }
    }
    if (static_cast<void*>(a) != static_cast<void*>(out + r * N)) at::vec::convert(a, out + r * N, N);
  }
}

std::tuple<at::Tensor, at::Tensor> fused_concat_linear_cpu(at::TensorList inputs, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           c10::string_view activation) {
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  Problem p = make_problem(inputs, weight, bias);
  const bool keep_preact = needs_preactivation(act);
  at::Tensor out = at::empty({p.M, p.N}, weight.options());
  at::Tensor preact = at::empty({keep_preact ? p.M : 0, keep_preact ? p.N : 0}, weight.options());
  auto result = [&] {
    return std::make_tuple(out.view(out_shape(p)), keep_preact ? preact.view(out_shape(p)) : preact.view({0}));
  };
  if (p.M == 0 || p.N == 0) return result();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "fused_concat_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float for bfloat16/float16
    constexpr bool low_precision = !std::is_same_v<acc_t, scalar_t>;
    at::Tensor bias_acc = bias.has_value() ? bias->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
    const acc_t* bias_ptr = bias_acc.defined() ? bias_acc.data_ptr<acc_t>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    scalar_t* pre_ptr = keep_preact ? preact.data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto act_c) {
      constexpr Activation A = decltype(act_c)::value;
      for_each_row_block(p.M, block_rows(p), [&](int64_t r0, int64_t rn) {
        at::Tensor block = out.narrow(0, r0, rn);
        at::Tensor acc = block;
        if constexpr (low_precision) {
          // Each segment's GEMM accumulates in float32 inside the BLAS; segments sum in float32 here.
          acc = at::mm(p.rows[0].narrow(0, r0, rn), p.weight_t[0]).to(at::kFloat);
          for (size_t s = 1; s < p.rows.size(); ++s) acc.add_(at::mm(p.rows[s].narrow(0, r0, rn), p.weight_t[s]));
        } else {
          at::mm_out(block, p.rows[0].narrow(0, r0, rn), p.weight_t[0]);
          for (size_t s = 1; s < p.rows.size(); ++s) block.addmm_(p.rows[s].narrow(0, r0, rn), p.weight_t[s]);
        }
        epilogue<A, acc_t, scalar_t>(acc.data_ptr<acc_t>(), out_ptr + r0 * p.N,
                                     pre_ptr ? pre_ptr + r0 * p.N : nullptr, bias_ptr, rn, p.N);
      });
    });
  });
  return result();
}

// gz = grad_out * act'(preact or out), in row blocks across threads (compute in acc_t).
template <Activation A, typename scalar_t>
void activation_backward(const scalar_t* g, const scalar_t* z, const scalar_t* y, scalar_t* gz, int64_t M, int64_t N) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::size();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> gb(N), zb(N), yb(N);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t o = r * N;
      at::vec::convert(g + o, gb.data(), N);
      if (z != nullptr) at::vec::convert(z + o, zb.data(), N);
      if (y != nullptr) at::vec::convert(y + o, yb.data(), N);
      for (int64_t j = 0; j < N; j += W) {
        const int64_t n = std::min(W, N - j);
        auto d = activation_grad_vec<A, acc_t>(Vec<acc_t>::loadu(zb.data() + j, n), Vec<acc_t>::loadu(yb.data() + j, n));
        (Vec<acc_t>::loadu(gb.data() + j, n) * d).store(gb.data() + j, n);
      }
      at::vec::convert(gb.data(), gz + o, N);
    }
  });
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
  at::Tensor g = grad_out.reshape({p.M, p.N}).contiguous();

  at::Tensor gz = g;
  if (act != Activation::None && p.M * p.N > 0) {
    const bool from_pre = needs_preactivation(act);
    at::Tensor src = (from_pre ? preact : out).reshape({p.M, p.N}).contiguous();
    gz = at::empty_like(g);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "fused_concat_linear_backward_cpu", [&] {
      const scalar_t* s = src.data_ptr<scalar_t>();
      dispatch_activation(act, [&](auto act_c) {
        activation_backward<decltype(act_c)::value, scalar_t>(g.data_ptr<scalar_t>(), from_pre ? s : nullptr,
                                                             from_pre ? nullptr : s, gz.data_ptr<scalar_t>(), p.M, p.N);
      });
    });
  }

  const auto empty = at::empty({0}, weight.options());
  std::vector<at::Tensor> grad_inputs;
  int64_t offset = 0;
  for (size_t s = 0; s < inputs.size(); ++s) {
    const int64_t d = inputs[s].size(-1);
    if (inputs_need_grad[s]) {
      grad_inputs.push_back(at::mm(gz, weight.narrow(1, offset, d)).view(inputs[s].sizes()));
    } else {
      grad_inputs.push_back(empty);
    }
    offset += d;
  }
  at::Tensor grad_weight = empty;
  if (weight_needs_grad) {
    grad_weight = at::empty({p.N, p.K}, weight.options());
    at::Tensor gz_t = gz.t();
    offset = 0;
    for (size_t s = 0; s < inputs.size(); ++s) {
      const int64_t d = inputs[s].size(-1);
      at::Tensor cols = grad_weight.narrow(1, offset, d);
      at::mm_out(cols, gz_t, p.rows[s]);  // writes the column block in place (row stride K)
      offset += d;
    }
  }
  at::Tensor grad_bias = bias_needs_grad ? at::sum(gz, {0}, false, gz.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).to(weight.scalar_type()) : empty;
  return {std::move(grad_inputs), std::move(grad_weight), std::move(grad_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmkernels, CPU, m) {
  m.impl("fused_concat_linear", &fused_concat_linear_cpu);
  m.impl("fused_concat_linear_backward", &fused_concat_linear_backward_cpu);
}

}  // namespace mmkernels::cpu
