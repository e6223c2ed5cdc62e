// One C++ entry for the small-shape calls of plain eager callers (issue 19): the Python wrappers hand
// their arguments here first, and at small shapes the whole call (the checks, the shape rule, the
// ATen ops) runs in one crossing from Python instead of one per check and per op. The entry answers
// None for anything it does not serve (a tensor subclass, a torch-function / dispatch mode, a functorch
// transform, a shape above the rule, or an argument that is wrong in any way): the wrapper then takes
// its usual path, which checks again and raises the error that names the argument.
// The Python binding only (CMakeLists.txt builds csrc/cpu without Python).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu/small_gemm.h"
#include "small_calls.h"

namespace mmkernels {
namespace {

enum class Act { none, relu, gelu, gelu_tanh, silu, tanh, sigmoid, unknown };

Act activation_of(PyObject* name) {
  if (!PyUnicode_Check(name)) return Act::unknown;
  static const char* names[] = {"none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"};
  for (int i = 0; i < 7; ++i) {
    if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0) return static_cast<Act>(i);
  }
  return Act::unknown;
}

// reference.ACTIVATIONS: the same ATen functions F.relu / F.gelu / ... call; in place when no graph is
// recorded (the linear output is a fresh tensor nobody else holds).
at::Tensor activate(at::Tensor y, Act act, bool in_place) {
  switch (act) {
    case Act::relu: return in_place ? y.relu_() : at::relu(y);
    case Act::gelu: return in_place ? at::gelu_(y) : at::gelu(y);
    case Act::gelu_tanh: return in_place ? at::gelu_(y, "tanh") : at::gelu(y, "tanh");
    case Act::silu: return in_place ? at::silu_(y) : at::silu(y);
    case Act::tanh: return in_place ? y.tanh_() : at::tanh(y);
    case Act::sigmoid: return in_place ? y.sigmoid_() : at::sigmoid(y);
    default: return y;
  }
}

using OptTensor = std::optional<at::Tensor>;

auto& concat_linear_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmkernels::fused_concat_linear", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(at::TensorList, const at::Tensor&, const OptTensor&,
                                                                 c10::string_view)>();
  return op;
}

auto& concat_linear_backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmkernels::fused_concat_linear_backward", "")
                       .typed<std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
                           const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           c10::string_view, const c10::List<bool>&, bool, bool)>();
  return op;
}

// The op's autograd formula (mmkernels/ops/fused_concat_linear.py's _FusedConcatLinearEager), in C++: the
// same saved tensors and backward op; a backward that is itself differentiated (grad mode on inside it)
// calls the Python _double_backward, whose reference operations have derivatives.
struct ConcatLinearFunction : torch::autograd::Function<ConcatLinearFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const OptTensor& bias,
                            const std::string& activation, at::TensorList inputs) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, preact] = concat_linear_op().call(inputs, weight, bias, activation);
    // The output only where the activation's derivative is read from it (relu, tanh, sigmoid).
    const bool keep_out = preact.numel() == 0 && activation != "none";
    std::vector<at::Tensor> saved(inputs.begin(), inputs.end());
    saved.insert(saved.end(), {weight, bias.value_or(at::Tensor()), keep_out ? out : at::Tensor(), preact});
    ctx->save_for_backward(saved);
    ctx->saved_data["activation"] = activation;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const size_t n = saved.size() - 4;
    const std::vector<at::Tensor> xs(saved.begin(), saved.begin() + n);
    const at::Tensor &weight = saved[n], &bias = saved[n + 1], &out = saved[n + 2], &preact = saved[n + 3];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    // needs_input_grad counts tensors (weight, bias if given, inputs); the result has a slot per argument.
    const size_t first_input = bias.defined() ? 2 : 1;
    const bool weight_needs = ctx->needs_input_grad(0), bias_needs = bias.defined() && ctx->needs_input_grad(1);
    c10::List<bool> inputs_need;
    for (size_t s = 0; s < n; ++s) inputs_need.push_back(ctx->needs_input_grad(first_input + s));
    torch::autograd::variable_list result(3 + n);
    if (at::GradMode::is_enabled()) {
      py::gil_scoped_acquire gil;
      py::object fn = py::module_::import("mmkernels.ops.fused_concat_linear").attr("_double_backward");
      py::list needs;
      needs.append(weight_needs);
      needs.append(bias_needs);
      for (bool b : inputs_need) needs.append(b);
      py::list got = fn(grads[0], xs, weight, bias.defined() ? py::cast(bias) : py::none(), activation, needs);
      for (size_t i = 0; i < 2 + n; ++i) {
        if (!got[i].is_none()) result[i < 2 ? i : i + 1] = got[i].cast<at::Tensor>();
      }
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below;
    auto [grad_inputs, grad_weight, grad_bias] = concat_linear_backward_op().call(
        grads[0].contiguous(), xs, weight, out, preact, activation, inputs_need, weight_needs, bias_needs);
    if (weight_needs) result[0] = grad_weight;
    if (bias_needs) result[1] = grad_bias;
    for (size_t s = 0; s < n; ++s) {
      if (inputs_need[s]) result[3 + s] = grad_inputs[s];
    }
    return result;
  }
};

// concat_linear_small(inputs, weight, bias, activation, min_macs, widths) -> Tensor | None
// float32 with at most small_gemm::kMaxRows rows (any size, not under autocast): the op itself (its
// few-rows kernel). Otherwise mmkernels.ops.fused_concat_linear's small-shape rule, whole:
// act(linear(cat(inputs, -1), weight, bias)) on the CPU when M * N * K < min_macs (csrc/cpu/matmul.cpp's
// oneDNN threshold) or, with several inputs, M * 8 <= N. widths: None, or the feature sizes a
// FusedConcatLinear expects (None answered otherwise).
PyObject* concat_linear_small(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *inputs, *weight_obj, *bias_obj, *act_obj, *widths;
  long long min_macs;
  if (!PyArg_ParseTuple(args, "OOOOLO", &inputs, &weight_obj, &bias_obj, &act_obj, &min_macs, &widths)) {
    return nullptr;
  }
  const Act act = activation_of(act_obj);
  const at::Tensor* weight = plain_tensor(weight_obj);
  if (act == Act::unknown || weight == nullptr || !(PyList_Check(inputs) || PyTuple_Check(inputs)) ||
      !plain_context()) {
    Py_RETURN_NONE;
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(inputs);
  PyObject** items = PySequence_Fast_ITEMS(inputs);
  if (n == 0 || weight->dim() != 2 || !weight->device().is_cpu()) Py_RETURN_NONE;
  if (widths != Py_None && (!PyTuple_Check(widths) || PyTuple_GET_SIZE(widths) != n)) Py_RETURN_NONE;
  const at::Tensor* bias = nullptr;
  if (bias_obj != Py_None) {
    bias = plain_tensor(bias_obj);
    if (bias == nullptr || bias->dim() != 1 || bias->size(0) != weight->size(0) ||
        bias->scalar_type() != weight->scalar_type() || !bias->device().is_cpu()) {
      Py_RETURN_NONE;
    }
  }
  std::vector<at::Tensor> xs;
  xs.reserve(n);
  int64_t total = 0;
  bool needs_grad = weight->requires_grad() || (bias != nullptr && bias->requires_grad());
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* x = plain_tensor(items[i]);
    if (x == nullptr || x->dim() < 1 || x->scalar_type() != weight->scalar_type() || !x->device().is_cpu()) {
      Py_RETURN_NONE;
    }
    if (i > 0) {
      const at::Tensor& first = xs[0];
      if (x->dim() != first.dim()) Py_RETURN_NONE;
      for (int64_t d = 0; d + 1 < x->dim(); ++d) {
        if (x->size(d) != first.size(d)) Py_RETURN_NONE;
      }
    }
    const int64_t width = x->size(-1);
    if (widths != Py_None) {
      PyObject* w = PyTuple_GET_ITEM(widths, i);
      if (!PyLong_Check(w) || PyLong_AsLongLong(w) != width) Py_RETURN_NONE;
    }
    total += width;
    needs_grad = needs_grad || x->requires_grad();
    xs.push_back(*x);
  }
  const int64_t K = weight->size(1), N = weight->size(0);
  if (total != K) Py_RETURN_NONE;
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < xs[0].dim(); ++d) M *= xs[0].size(d);
  // Microseconds of work: the GIL stays held.
  if (weight->scalar_type() == at::kFloat && M <= cpu::small_gemm::kMaxRows &&
      !at::autocast::is_autocast_enabled(at::kCPU)) {
    // Few float32 rows: the op, whose kernel then runs csrc/cpu/small_gemm.h (no BLAS call), with its
    // autograd formula as one C++ node where a gradient is needed.
    const std::string name = PyUnicode_AsUTF8(act_obj);
    const OptTensor b = opt(bias);
    if (needs_grad && at::GradMode::is_enabled()) {
      return THPVariable_Wrap(ConcatLinearFunction::apply(*weight, b, name, at::TensorList(xs)));
    }
    at::AutoDispatchBelowADInplaceOrView below;
    return THPVariable_Wrap(std::get<0>(concat_linear_op().call(xs, *weight, b, name)));
  }
  const bool few_rows = n > 1 && M * 8 <= N;
  const bool small = static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K) <
                     static_cast<double>(min_macs);
  if (!(few_rows || small)) Py_RETURN_NONE;
  // The reference concatenates even one input (a contiguous copy); a contiguous input gives the same numbers.
  at::Tensor x = n == 1 ? xs[0].contiguous() : at::cat(xs, -1);
  at::Tensor out = activate(at::linear(x, *weight, bias ? std::optional<at::Tensor>(*bias) : std::nullopt), act,
                            !(needs_grad && at::GradMode::is_enabled()));
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}


// CrossModalAttention's projections: F.linear, or None (-> the Python path) where the module would hand
// the GEMM to fused_concat_linear (float32 on the CPU from min_macs multiply-adds: oneDNN's size).
bool linear_is_small(const at::Tensor& x, int64_t n_out, long long min_macs) {
  return x.scalar_type() != at::kFloat || static_cast<double>(x.numel()) * n_out < static_cast<double>(min_macs);
}

// nn/cross_modal_attention.py's _scores_to_weights, op for op.
at::Tensor scores_to_weights(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& additive,
                             double scale) {
  at::Tensor scores = at::matmul(q * scale, k.contiguous().transpose(-2, -1));
  if (additive) scores = scores + *additive;
  at::Tensor dead = scores.amax(-1, true) == -std::numeric_limits<double>::infinity();
  return at::softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0);
}

// attention_small(query, key, value, key_padding_mask, need_weights, average, in_proj_weight, in_proj_bias,
//                 out_weight, out_bias, num_heads, batch_first, weights_chunk, min_macs) -> (out, weights) | None
// CrossModalAttention.forward for a batched call with packed in-projection weights, no attn_mask / is_causal /
// added keys / dropout, and projections below min_macs: the same ATen ops and the same op call, in the
// same order, as the Python forward (the weights of a training step excepted: see below).
PyObject* attention_small(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *query_obj, *key_obj, *value_obj, *kpm_obj, *w_obj, *b_obj, *ow_obj, *ob_obj;
  int need_weights, average, batch_first;
  long long heads, weights_chunk, min_macs;
  if (!PyArg_ParseTuple(args, "OOOOppOOOOLpLL", &query_obj, &key_obj, &value_obj, &kpm_obj, &need_weights,
                        &average, &w_obj, &b_obj, &ow_obj, &ob_obj, &heads, &batch_first, &weights_chunk,
                        &min_macs)) {
    return nullptr;
  }
  const at::Tensor *query = plain_tensor(query_obj), *key = plain_tensor(key_obj), *value = plain_tensor(value_obj);
  const at::Tensor *w = plain_tensor(w_obj), *ow = plain_tensor(ow_obj);
  const at::Tensor* b = b_obj == Py_None ? nullptr : plain_tensor(b_obj);
  const at::Tensor* ob = ob_obj == Py_None ? nullptr : plain_tensor(ob_obj);
  const at::Tensor* kpm = kpm_obj == Py_None ? nullptr : plain_tensor(kpm_obj);
  if (!query || !key || !value || !w || !ow || (b_obj != Py_None && !b) || (ob_obj != Py_None && !ob) ||
      (kpm_obj != Py_None && !kpm) || !plain_context() || heads <= 0) {
    Py_RETURN_NONE;
  }
  // Everything the Python checks test, so that only valid calls stay here (and no autocast).
  const int64_t E = ow->size(0);
  const auto dtype = ow->scalar_type();
  if (ow->dim() != 2 || ow->size(1) != E || E % heads != 0 || w->dim() != 2 || w->size(0) != 3 * E ||
      w->size(1) != E || (b && (b->dim() != 1 || b->size(0) != 3 * E)) || !ow->device().is_cpu() ||
      at::autocast::is_autocast_enabled(at::kCPU)) {
    Py_RETURN_NONE;
  }
  for (const at::Tensor* t : {query, key, value}) {
    if (t->is_nested() || t->dim() != 3 || t->scalar_type() != dtype || !t->device().is_cpu() || t->size(2) != E) {
      Py_RETURN_NONE;
    }
  }
  const int64_t b_dim = batch_first ? 0 : 1, s_dim = 1 - b_dim;
  const int64_t B = query->size(b_dim), Lq = query->size(s_dim), Lk = key->size(s_dim);
  if (key->size(b_dim) != B || value->size(b_dim) != B || value->size(s_dim) != Lk) Py_RETURN_NONE;
  if (kpm && (kpm->scalar_type() != at::kBool || kpm->dim() != 2 || kpm->size(0) != B || kpm->size(1) != Lk ||
              !kpm->device().is_cpu())) {
    Py_RETURN_NONE;
  }
  // A training step records its graph through these same ATen ops and the op's autograd node. With
  // need_weights, the weights' graph is ATen's too: it keeps their probabilities (a few KB at these
  // sizes) where the Python path's _AveragedWeights would recompute them.

  // _visible_key_rows: with a bool mask hiding at least 1/8 of the keys, project the visible rows only.
  std::optional<at::Tensor> key_rows;
  if (kpm) {
    at::Tensor visible = kpm->logical_not();
    at::Tensor rows = (batch_first ? visible : visible.t()).reshape(-1).nonzero().squeeze(1);
    if (rows.numel() * 8 <= visible.numel() * 7) key_rows = rows;
  }
  const bool self_attention = query_obj == key_obj && key_obj == value_obj && !key_rows;
  const bool shared_kv = key_obj == value_obj;
  const int64_t kv_rows = key_rows ? key_rows->numel() : B * Lk;
  if (!linear_is_small(*query, self_attention ? 3 * E : E, min_macs) ||
      (!self_attention && static_cast<double>(kv_rows) * E * (shared_kv ? 2 * E : E) >=
                              static_cast<double>(min_macs) && dtype == at::kFloat)) {
    Py_RETURN_NONE;
  }

  // _project
  auto kv_linear = [&](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    if (!key_rows) return at::linear(x, weight, bias);
    at::Tensor rows = at::linear(x.reshape({-1, x.size(-1)}).index_select(0, *key_rows), weight, bias);
    at::Tensor full = rows.new_zeros({B * Lk, rows.size(-1)}).index_copy(0, *key_rows, rows);
    auto shape = x.sizes().vec();
    shape.back() = rows.size(-1);
    return full.view(shape);
  };
  at::Tensor q, k, v;
  if (self_attention) {
    auto qkv = at::linear(*query, *w, opt(b)).split(E, -1);
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {
    auto ws = w->split_with_sizes({E, 2 * E});
    std::vector<at::Tensor> bs;
    if (b) bs = b->split_with_sizes({E, 2 * E});
    if (shared_kv) {
      auto kv = kv_linear(*key, ws[1], b ? std::optional<at::Tensor>(bs[1]) : std::nullopt).split(E, -1);
      k = kv[0], v = kv[1];
      q = at::linear(*query, ws[0], b ? std::optional<at::Tensor>(bs[0]) : std::nullopt);
    } else {
      auto w3 = w->split(E);
      std::vector<at::Tensor> b3;
      if (b) b3 = b->split(E);
      auto bias_i = [&](int i) { return b ? std::optional<at::Tensor>(b3[i]) : std::nullopt; };
      q = at::linear(*query, w3[0], bias_i(0));
      k = kv_linear(*key, w3[1], bias_i(1));
      v = kv_linear(*value, w3[2], bias_i(2));
    }
  }
  // _split_heads: (L, B, H*D) or (B, L, H*D) -> (B, H, L, D) views.
  const int64_t D = E / heads;
  auto split_heads = [&](const at::Tensor& x) {
    at::Tensor y = x.unflatten(-1, {heads, D});
    return batch_first ? y.permute({0, 2, 1, 3}) : y.permute({1, 2, 0, 3});
  };
  q = split_heads(q), k = split_heads(k), v = split_heads(v);

  const double op_scale = std::pow(static_cast<double>(D), -0.5);
  at::Tensor out = attention_out(q, k, v, opt(kpm), std::nullopt, std::nullopt, op_scale, 0);
  PyObject* weights_obj = Py_None;
  at::Tensor weights;
  if (need_weights) {
    // weights_path_mask: the padding as a (B, 1, 1, Lk) additive mask; _weights / _averaged_weights.
    std::optional<at::Tensor> additive;
    if (kpm) {
      additive = at::zeros(kpm->sizes(), q.options()).masked_fill(*kpm, -std::numeric_limits<double>::infinity())
                     .view({B, 1, 1, -1});
    }
    const double scale = std::sqrt(1.0 / static_cast<double>(D));  // MHA's exact expression
    if (!average) {
      weights = scores_to_weights(q, k, additive, scale);
    } else {
      const int64_t step = std::max<int64_t>(1, weights_chunk / std::max<int64_t>(1, B * Lq * Lk));
      for (int64_t h0 = 0; h0 < heads; h0 += step) {
        const int64_t h1 = std::min<int64_t>(heads, h0 + step);
        at::Tensor part = scores_to_weights(q.slice(1, h0, h1), k.slice(1, h0, h1), additive, scale).sum(1);
        weights = weights.defined() ? weights.add_(part) : part;
      }
      weights = weights.div_(heads);
    }
  }
  // Heads merged in the caller's layout, then out_proj (no larger a GEMM than the query's projection).
  out = batch_first ? out.transpose(1, 2).reshape({B, Lq, E}) : out.permute({2, 0, 1, 3}).reshape({Lq, B, E});
  out = at::linear(out, *ow, opt(ob));
  PyObject* result = PyTuple_New(2);
  PyTuple_SET_ITEM(result, 0, THPVariable_Wrap(std::move(out)));
  if (weights.defined()) {
    weights_obj = THPVariable_Wrap(std::move(weights));
  } else {
    Py_INCREF(Py_None);
  }
  PyTuple_SET_ITEM(result, 1, weights_obj);
  return result;
  END_HANDLE_TH_ERRORS
}

PyMethodDef small_call_methods[] = {
    {"concat_linear_small", concat_linear_small, METH_VARARGS,
     "fused_concat_linear's small-shape route in one call, or None where it does not apply."},
    {"attention_small", attention_small, METH_VARARGS,
     "CrossModalAttention's inference forward at small shapes in one call, or None where it does not apply."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* small_call_method_table() { return small_call_methods; }

}  // namespace mmkernels
