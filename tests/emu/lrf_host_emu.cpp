// The host code of low_rank_fusion's CUDA kernels (csrc/cuda/low_rank_fusion_cuda.cpp), compiled
// against CPU torch with MMK_EMU_HOST (see that file) and linked to the emulation harness library,
// whose launchers run the kernels on the CPU executor. Included, not linked, so that its functions
// (in an anonymous namespace) can be bound here.
#include <torch/extension.h>

#include "low_rank_fusion_cuda.cpp"

namespace {

at::Tensor forward(const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& factors,
                   const at::Tensor& rank_weight, const std::optional<at::Tensor>& bias) {
  return mmkernels::cuda::low_rank_fusion_cuda(inputs, factors, rank_weight, bias);
}

auto backward(const at::Tensor& grad_out, const std::vector<at::Tensor>& inputs, const std::vector<at::Tensor>& factors,
              const at::Tensor& rank_weight, const std::vector<bool>& inputs_need_grad,
              const std::vector<bool>& factors_need_grad, bool rank_weight_needs_grad, bool bias_needs_grad) {
  c10::List<bool> in_flags, f_flags;
  for (bool b : inputs_need_grad) in_flags.push_back(b);
  for (bool b : factors_need_grad) f_flags.push_back(b);
  return mmkernels::cuda::low_rank_fusion_backward_cuda(grad_out, inputs, factors, rank_weight, in_flags, f_flags,
                                                        rank_weight_needs_grad, bias_needs_grad);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
