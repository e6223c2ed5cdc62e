"""Drop-in modules built on the mmkernels ops."""
from .fused_concat_linear import FusedConcatLinear

__all__ = ["FusedConcatLinear"]
