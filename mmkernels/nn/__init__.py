"""Drop-in modules built on the mmkernels ops."""
from .fused_concat_linear import FusedConcatLinear
from .fusion import ConcatFusion, FiLM, GatedMultimodalUnit, LowRankFusion

__all__ = ["FusedConcatLinear", "ConcatFusion", "GatedMultimodalUnit", "LowRankFusion", "FiLM"]
