"""Thin Python wrappers over torch.ops.mmkernels.*: one file per op (checks, public function, fake
kernels, autograd), sharing _common."""
from ._common import KERNELS, plain_eager, warn_once
from .cross_modal_attention import cross_modal_attention
from .cross_modal_attention_varlen import cross_modal_attention_varlen
from .fused_concat_linear import ACTIVATIONS, fused_concat_linear
from .low_rank_fusion import low_rank_fusion

__all__ = ["ACTIVATIONS", "cross_modal_attention", "cross_modal_attention_varlen", "fused_concat_linear",
           "low_rank_fusion"]
