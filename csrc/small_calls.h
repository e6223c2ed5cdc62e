// The plain eager entries of mmkernels._C (csrc/small_calls.cpp, csrc/attention_call.cpp), added to the
// module by csrc/module.cpp, and what they share.
#pragma once
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

namespace mmkernels {

PyMethodDef* small_call_method_table();
PyMethodDef* attention_call_method_table();

// No torch-function mode, no dispatch mode (fake tensors, tracing), no functorch transform: what
// mmkernels.ops._common.plain_eager tests besides torch.compile, which the Python side rules out.
inline bool plain_context() {
  // functorch includes its front-mode key while any transform (vmap, grad, jvp...) is active.
  return !at::impl::torch_function_mode_enabled() && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode);
}

// A plain torch.Tensor or nn.Parameter (no subclass with its own __torch_function__ / dispatch).
inline const at::Tensor* plain_tensor(PyObject* obj) {
  return THPVariable_CheckExact(obj) ? &THPVariable_Unpack(obj) : nullptr;
}

// An optional argument from a pointer that may be null.
inline std::optional<at::Tensor> opt(const at::Tensor* t) { return t ? std::optional<at::Tensor>(*t) : std::nullopt; }

// The attention op's output (no dropout), called below autograd; where a gradient is needed, with its
// formula recorded as a C++ autograd node (csrc/attention_call.cpp).
at::Tensor attention_out(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_padding_mask,
                         const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& attn_mask,
                         double scale, int64_t causal);

}  // namespace mmkernels
