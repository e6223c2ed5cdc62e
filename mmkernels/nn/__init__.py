"""Drop-in modules built on the mmkernels ops."""
from .cross_modal_attention import CrossModalAttention
from .fused_concat_linear import FusedConcatLinear
from .fusion import ConcatFusion, FiLM, GatedMultimodalUnit, LowRankFusion
from .fusion_attention import GatedCrossAttention, ModalityGraphAttention

__all__ = [
    "CrossModalAttention", "FusedConcatLinear", "ConcatFusion", "GatedMultimodalUnit", "LowRankFusion", "FiLM",
    "GatedCrossAttention", "ModalityGraphAttention",
]
