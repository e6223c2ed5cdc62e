"""mmkernels under torch.distributed.

Importing mmkernels imports this package when torch.distributed is available, which registers a
DTensor sharding strategy for every op (forward and backward; see sharding.py), so the ops run on
DTensors without first gathering them. Tensor-parallel styles for the modules are in
tensor_parallel.py. DDP and FSDP2 need nothing from here: they see ordinary parameters.
"""
from .sharding import register_all as register_sharding_strategies
from .tensor_parallel import CrossModalAttentionHeadParallel, FusedConcatLinearColwise, FusedConcatLinearRowwise

register_sharding_strategies()

__all__ = [
    "CrossModalAttentionHeadParallel",
    "FusedConcatLinearColwise",
    "FusedConcatLinearRowwise",
    "register_sharding_strategies",
]
