"""When the ops' DTensor sharding strategies are registered: as soon as DTensor exists, without
`import mmkernels` paying for torch.distributed.tensor otherwise (one fresh interpreter)."""
import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

CODE = textwrap.dedent(
    """
    import sys
    import torch
    import mmkernels
    assert "torch.distributed.tensor" not in sys.modules, "import mmkernels imported torch.distributed.tensor"
    from torch.distributed.tensor import DTensor
    propagator = DTensor._op_dispatcher.sharding_propagator
    ops = [torch.ops.mmkernels.fused_concat_linear, torch.ops.mmkernels.fused_concat_linear_backward,
           torch.ops.mmkernels.low_rank_fusion, torch.ops.mmkernels.low_rank_fusion_backward,
           torch.ops.mmkernels.cross_modal_attention, torch.ops.mmkernels.cross_modal_attention_backward]
    missing = [str(op) for op in ops if op.default not in propagator.op_strategy_funcs]
    assert not missing, f"no sharding strategy for {missing}"
    # The backward ops return (Tensor[], ...), which DTensor's dispatcher cannot wrap: they need a handler.
    for op in (torch.ops.mmkernels.fused_concat_linear_backward, torch.ops.mmkernels.low_rank_fusion_backward):
        assert op.default in DTensor._op_dispatcher._custom_op_handlers, op
    print("registered")
    """
)


def test_strategies_register_when_dtensor_is_imported():
    res = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "registered" in res.stdout, res.stderr
