"""Drop-in modules built on the mmkernels ops."""
from .cross_modal_attention import CrossModalAttention
from .fused_concat_linear import FusedConcatLinear
from .fusion import ConcatFusion, FiLM, GatedMultimodalUnit, LowRankFusion

__all__ = ["CrossModalAttention", "FusedConcatLinear", "ConcatFusion", "GatedMultimodalUnit", "LowRankFusion", "FiLM"]
