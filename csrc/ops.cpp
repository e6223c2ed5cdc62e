// Every mmkernels operator schema, and nothing else. Kernels register per backend in csrc/cpu and
// csrc/cuda; fake (meta) kernels and autograd are registered from Python (mmkernels/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(mmkernels, m) {
  // act(cat(inputs, -1) @ weight.T + bias) without building the concatenation. Returns
  // (out, preact): preact is the pre-activation, kept for backward only when the activation's
  // derivative needs it (gelu, gelu_tanh, silu), else an empty tensor.
  m.def("fused_concat_linear(Tensor[] inputs, Tensor weight, Tensor? bias, str activation) -> (Tensor, Tensor)");
  // Gradients of the above. Each *_needs_grad flag skips a gradient (returned as an empty tensor).
  m.def(
      "fused_concat_linear_backward(Tensor grad_out, Tensor[] inputs, Tensor weight, Tensor out, Tensor preact, "
      "str activation, bool[] inputs_need_grad, bool weight_needs_grad, bool bias_needs_grad) "
      "-> (Tensor[], Tensor, Tensor)");
}
