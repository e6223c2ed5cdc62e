"""mmkernels: fused multimodal-fusion kernels for PyTorch.

fused_concat_linear: act(cat(inputs) @ W.T + b) without materialising the concatenation.
cross_modal_attention: flash-style attention (SDPA layout) with padding / attention masks and dropout.
cross_modal_attention_varlen: the same over packed variable-length sequences (FlashAttention-2's layout).
"""
from . import nn
from ._build import build_info
from ._errors import ArgumentError
from .ops import cross_modal_attention, cross_modal_attention_varlen, fused_concat_linear, low_rank_fusion

__version__ = "0.1.0"

__all__ = ["cross_modal_attention", "cross_modal_attention_varlen", "fused_concat_linear", "low_rank_fusion", "nn",
           "build_info", "ArgumentError", "__version__"]

# Swapping standard fusion layers of existing models for the fused ones.
from .convert import ConversionReport, convert, revert  # noqa: E402

__all__ += ["convert", "revert", "ConversionReport"]

# DTensor sharding strategies of every op and tensor-parallel styles (mmkernels.distributed): registered
# when torch.distributed.tensor is imported (now, if it already is; see _dtensor_hook).
from ._dtensor_hook import install as _install_dtensor_hook  # noqa: E402

_install_dtensor_hook()
