// The memory layouts of cross_modal_attention's results, the same on every device (the fake
// kernels in mmkernels/ops.py mirror them, so torch.compile sees the true strides).
//  - out (B, H, Lq, Ev) is stored in (B, Lq, H, Ev) order: merging the heads back into a
//    (B, Lq, H*Ev) activation, as every attention module does next, is a view, not a copy; and the
//    gradient that comes back through that view has the same layout.
//  - dq, dk, dv are laid out like q, k, v (at::empty_like) where that layout keeps the last dim
//    contiguous, else contiguous: where q is a head-split view of a projection, dq reaches the
//    projection's backward without a copy.
#pragma once

#include <ATen/ATen.h>

namespace mmkernels {

inline at::Tensor empty_attention_out(int64_t B, int64_t H, int64_t Lq, int64_t Ev, const at::TensorOptions& options) {
  return at::empty({B, Lq, H, Ev}, options).permute({0, 2, 1, 3});
}

// The buffer for the gradient of x, in dtype.
inline at::Tensor empty_grad_like(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor t = at::empty_like(x, x.options().dtype(dtype));
  return t.stride(-1) == 1 ? t : at::empty(x.sizes(), x.options().dtype(dtype));
}

}  // namespace mmkernels
