"""mmkernels: fused multimodal-fusion kernels for PyTorch.

fused_concat_linear: act(cat(inputs) @ W.T + b) without materialising the concatenation.
cross_modal_attention: flash-style attention (SDPA layout) with padding / attention masks and dropout.
"""
from . import nn
from ._build import build_info
from ._errors import ArgumentError
from .ops import cross_modal_attention, fused_concat_linear, low_rank_fusion

__version__ = "0.1.0"

__all__ = ["cross_modal_attention", "fused_concat_linear", "low_rank_fusion", "nn", "build_info", "__version__"]
__all__ += ["ArgumentError"]

# Swapping standard fusion layers of existing models for the fused ones.
from .convert import ConversionReport, convert, revert  # noqa: E402

__all__ += ["convert", "revert", "ConversionReport"]
