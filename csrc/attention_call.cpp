// cross_modal_attention's plain eager calls in one C++ crossing (issue 19: the functional op's fixed
// cost). mmkernels.ops.cross_modal_attention hands its arguments to attention_call first; for a valid
// CPU call on plain tensors it checks them, runs the op below autograd and, where a gradient is
// needed, records a C++ autograd node (AttentionFunction) instead of the Python formula's. It answers
// None for anything else (a tensor subclass, a mode, a functorch transform, autocast, CUDA, dropout, a
// CausalBias, a float mask that needs its gradient, any wrong argument): the Python path then takes
// the call and raises the error that names the argument.
// The Python binding only (CMakeLists.txt builds csrc/cpu without Python).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "small_calls.h"

namespace mmkernels {

namespace {

using OptTensor = std::optional<at::Tensor>;

auto& forward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmkernels::cross_modal_attention", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, double, double, const OptTensor&, int64_t)>();
  return op;
}

auto& backward_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmkernels::cross_modal_attention_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                           const OptTensor&, double, double, const OptTensor&, int64_t)>();
  return op;
}

OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

py::object tensor_or_none(const at::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

// The op's registered autograd formula (mmkernels/ops/cross_modal_attention.py), in C++: the same
// saved tensors and backward op; a backward that is itself differentiated (grad mode on inside it)
// calls the Python _double_backward, whose reference operations have derivatives.
struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const OptTensor& key_padding_mask, const OptTensor& kv_lengths,
                            const OptTensor& attn_mask, double scale, int64_t causal) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse] =
        forward_op().call(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, 0.0, std::nullopt, causal);
    ctx->save_for_backward({q, k, v, out, lse, key_padding_mask.value_or(at::Tensor()),
                            kv_lengths.value_or(at::Tensor()), attn_mask.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t causal = ctx->saved_data["causal"].toInt();
    torch::autograd::variable_list result(8);  // one per forward argument; masks get none
    if (at::GradMode::is_enabled()) {
      py::gil_scoped_acquire gil;
      py::object fn = py::module_::import("mmkernels.ops.cross_modal_attention").attr("_double_backward");
      py::tuple needs = py::make_tuple(ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2));
      py::tuple got = fn(needs, grads[0], q, k, v, tensor_or_none(saved[5]), tensor_or_none(saved[6]),
                         tensor_or_none(saved[7]), scale, 0.0, py::none(), causal);
      for (int i = 0; i < 3; ++i) {
        if (!got[i].is_none()) result[i] = got[i].cast<at::Tensor>();
      }
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below;
    std::tie(result[0], result[1], result[2]) =
        backward_op().call(grads[0], q, k, v, out, lse, defined_or_none(saved[5]), defined_or_none(saved[6]),
                           defined_or_none(saved[7]), scale, 0.0, std::nullopt, causal);
    return result;
  }
};

bool is_cpu_tensor(const at::Tensor* t) { return t != nullptr && t->device().is_cpu() && !t->is_nested(); }

// An optional tensor argument: None, or a plain CPU tensor (set into out); false for anything else.
bool optional_arg(PyObject* obj, const at::Tensor*& out) {
  out = nullptr;
  if (obj == Py_None) return true;
  out = plain_tensor(obj);
  return is_cpu_tensor(out);
}

// A Python float or int (not bool) as a double; false for anything else.
bool number_arg(PyObject* obj, double& out) {
  if (PyFloat_CheckExact(obj)) {
    out = PyFloat_AS_DOUBLE(obj);
    return true;
  }
  if (PyLong_CheckExact(obj)) {
    out = PyLong_AsDouble(obj);
    if (out == -1.0 && PyErr_Occurred()) {  // too large for a double
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

// attention_call(q, k, v, key_padding_mask, kv_lengths, attn_mask, is_causal, scale, dropout_p,
//                enable_gqa) -> Tensor | None: mmkernels.cross_modal_attention's arguments, in order.
PyObject* attention_call(PyObject*, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *q_obj, *k_obj, *v_obj, *kpm_obj, *len_obj, *mask_obj, *causal_obj, *scale_obj, *p_obj, *gqa_obj;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOO", &q_obj, &k_obj, &v_obj, &kpm_obj, &len_obj, &mask_obj, &causal_obj,
                        &scale_obj, &p_obj, &gqa_obj)) {
    return nullptr;
  }
  const at::Tensor *q = plain_tensor(q_obj), *k = plain_tensor(k_obj), *v = plain_tensor(v_obj);
  const at::Tensor *kpm, *lengths, *mask;
  double dropout_p = 0.0, scale = 0.0;
  if (!is_cpu_tensor(q) || !is_cpu_tensor(k) || !is_cpu_tensor(v) || !optional_arg(kpm_obj, kpm) ||
      !optional_arg(len_obj, lengths) || !optional_arg(mask_obj, mask) || !PyBool_Check(causal_obj) ||
      !PyBool_Check(gqa_obj) || !number_arg(p_obj, dropout_p) || dropout_p != 0.0 ||
      (scale_obj != Py_None && !number_arg(scale_obj, scale)) || !plain_context() ||
      at::autocast::is_autocast_enabled(at::kCPU)) {
    Py_RETURN_NONE;
  }
  // q, k, v as ops.cross_modal_attention._check_attention tests them.
  const auto dtype = q->scalar_type();
  if (!(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf) ||
      q->dim() != 4 || k->dim() != 4 || v->dim() != 4 || k->scalar_type() != dtype || v->scalar_type() != dtype) {
    Py_RETURN_NONE;
  }
  const int64_t B = q->size(0), H = q->size(1), Lq = q->size(2), E = q->size(3);
  const int64_t Hk = k->size(1), Lk = k->size(2);
  const bool heads_ok = Hk == H || (gqa_obj == Py_True && Hk > 0 && H % Hk == 0);
  if (k->size(0) != B || v->size(0) != B || !heads_ok || v->size(1) != Hk || k->size(3) != E || v->size(2) != Lk) {
    Py_RETURN_NONE;
  }
  if (kpm && (kpm->scalar_type() != at::kBool || kpm->dim() != 2 || kpm->size(0) != B || kpm->size(1) != Lk)) {
    Py_RETURN_NONE;
  }
  if (lengths) {
    const auto lt = lengths->scalar_type();
    if (!(lt == at::kInt || lt == at::kLong) || lengths->dim() != 1 || lengths->size(0) != B) Py_RETURN_NONE;
    const at::Tensor lc = lengths->contiguous();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = lt == at::kInt ? lc.const_data_ptr<int32_t>()[b] : lc.const_data_ptr<int64_t>()[b];
      if (n < 0 || n > Lk) Py_RETURN_NONE;
    }
  }
  if (mask) {
    const bool floating = at::isFloatingType(mask->scalar_type());
    // A float mask that needs its gradient takes the reference (the kernel treats masks as constants).
    if (!(mask->scalar_type() == at::kBool || floating) || (floating && mask->requires_grad() &&
                                                            at::GradMode::is_enabled())) {
      Py_RETURN_NONE;
    }
    const int64_t full[4] = {B, H, Lq, Lk};
    const int64_t nd = mask->dim();
    if (nd < 2 || nd > 4) Py_RETURN_NONE;
    for (int64_t d = 0; d < nd; ++d) {
      const int64_t s = mask->size(d), f = full[4 - nd + d];
      if (s != 1 && s != f) Py_RETURN_NONE;
    }
  }
  if (scale_obj == Py_None) scale = std::pow(static_cast<double>(E), -0.5);  // Python's E ** -0.5
  const int64_t causal = causal_obj == Py_True ? 1 : 0;

  return THPVariable_Wrap(attention_out(*q, *k, *v, opt(kpm), opt(lengths), opt(mask), scale, causal));
  END_HANDLE_TH_ERRORS
}

PyMethodDef attention_call_methods[] = {
    {"attention_call", attention_call, METH_VARARGS,
     "cross_modal_attention's plain eager CPU call in one crossing, or None where it does not apply."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* attention_call_method_table() { return attention_call_methods; }

at::Tensor attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_padding_mask,
                         const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask,
                         double scale, int64_t causal) {
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    return AttentionFunction::apply(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, causal);
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return std::get<0>(
      forward_op().call(q, k, v, key_padding_mask, kv_lengths, attn_mask, scale, 0.0, std::nullopt, causal));
}

}  // namespace mmkernels
