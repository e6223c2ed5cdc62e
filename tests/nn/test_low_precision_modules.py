"""The fusion-layer modules in float16 and bfloat16 on the CPU, against float64 copies of themselves.

Each module is built in the low-precision dtype, so its parameters hold values that dtype can
represent; the float64 copy then computes exactly what the module should, and the module's output
and every gradient (inputs and parameters) must be within the dtype's tolerance of it, relative to
the tensor's scale (gradients are sums over many rows).
"""
import copy

import pytest
import torch
from conftest import TOLERANCES

from mmkernels.nn import ConcatFusion, FiLM, GatedCrossAttention, GatedMultimodalUnit, LowRankFusion, ModalityGraphAttention

LOW_PRECISION = [torch.float16, torch.bfloat16]


def _inputs(dtype, *shapes):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


# name -> (module factory, input factory, how the module is called)
CASES = {
    "ConcatFusion": (lambda dt: ConcatFusion((3, 17, 5), 13, activation="gelu", dtype=dt),
                     lambda dt: _inputs(dt, (6, 3), (6, 17), (6, 5)), lambda m, xs: m(xs)),
    "GatedMultimodalUnit": (lambda dt: GatedMultimodalUnit((7, 4, 9), 11, dtype=dt),
                            lambda dt: _inputs(dt, (3, 5, 7), (3, 5, 4), (3, 5, 9)), lambda m, xs: m(xs)),
    "LowRankFusion": (lambda dt: LowRankFusion((5, 3), 6, 4, dtype=dt),
                      lambda dt: _inputs(dt, (4, 3, 5), (4, 3, 3)), lambda m, xs: m(xs)),
    "FiLM": (lambda dt: FiLM(17, 5, dtype=dt), lambda dt: _inputs(dt, (3, 7, 17), (3, 5)),
             lambda m, xs: m(xs[0], xs[1])),
    "GatedCrossAttention": (lambda dt: GatedCrossAttention(16, 2, media_dim=8, ff_mult=2, dtype=dt),
                            lambda dt: _inputs(dt, (2, 9, 16), (2, 13, 8)), lambda m, xs: m(xs[0], xs[1])),
    "ModalityGraphAttention": (lambda dt: ModalityGraphAttention(8, 2, 3, dtype=dt),
                               lambda dt: _inputs(dt, (4, 8), (4, 8), (4, 8)), lambda m, xs: m(xs)),
}


def _close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_fusion_layer_in_low_precision_matches_float64(name, dtype):
    make_module, make_inputs, call = CASES[name]
    module = make_module(dtype)
    with torch.no_grad():  # gates that start at zero (GatedCrossAttention) would hide the attention
        for p in module.parameters():
            if p.numel() and not p.abs().max() > 0:
                p.uniform_(-0.5, 0.5)
    exact = copy.deepcopy(module).double()
    xs = make_inputs(dtype)
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    out, ref = call(module, xs), call(exact, xs64)
    assert out.dtype == dtype
    _close(out, ref, dtype, "output")
    g = torch.randn_like(out)
    params, params64 = list(module.parameters()), list(exact.parameters())
    grads = torch.autograd.grad(out, [*xs, *params], g)
    grads64 = torch.autograd.grad(ref, [*xs64, *params64], g.double())
    for i, (a, b) in enumerate(zip(grads, grads64)):
        assert a.dtype == dtype
        _close(a, b, dtype, f"gradient {i}")
