"""The elementwise CUDA kernels of fused_concat_linear (csrc/cuda/fused_concat_linear_elementwise.cu),
executed from their own source on the emulation harness, against float64 PyTorch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import ACTIVATIONS, DTYPE_CODE, harness, ptr
from mmkernels import reference

pytestmark = pytest.mark.emu

TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2), torch.float32: (1e-5, 1e-5),
       torch.float64: (1e-12, 1e-12)}


def check(actual, expected, dtype, what):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("M,N", [(1, 1), (3, 17), (7, 123)])
def test_bias_act(dtype, act, M, N):
    acc_t = torch.float64 if dtype == torch.float64 else torch.float32
    acc = torch.randn(M, N, dtype=acc_t)
    bias = torch.randn(N).to(dtype)
    out = torch.full((M, N), float("nan")).to(dtype)
    preact = torch.full((M, N), float("nan")).to(dtype)
    h = harness()
    h.run("emu_bias_act", DTYPE_CODE[dtype], ptr(acc), ptr(bias), ptr(out), ptr(preact), M, N,
          ACTIVATIONS.index(act), buffers={"acc": acc, "bias": bias, "out": out, "preact": preact})
    z = acc.double() + bias.double()
    check(preact, z, dtype, "preact")
    check(out, reference.ACTIVATIONS[act](z), dtype, "out")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bias_act_in_place_without_bias(dtype):
    # acc may alias out when the accumulator has the output's type (float32, float64).
    M, N = 5, 70
    acc = torch.randn(M, N, dtype=dtype)
    expected = F.silu(acc.double())
    harness().run("emu_bias_act", DTYPE_CODE[dtype], ptr(acc), None, ptr(acc), None, M, N, ACTIVATIONS.index("silu"),
                  buffers={"acc_and_out": acc})
    check(acc, expected, dtype, "out")


@pytest.mark.parametrize("dtype", list(DTYPE_CODE), ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_act_backward(dtype, act):
    n = 301
    x = torch.randn(n, dtype=torch.float64, requires_grad=True)
    y = reference.ACTIVATIONS[act](x)
    grad = torch.randn(n, dtype=torch.float64)
    (expected,) = torch.autograd.grad(y, x, grad)
    # gelu, gelu_tanh and silu take the pre-activation; the others the output.
    z = (x if act in ("gelu", "gelu_tanh", "silu") else y).detach().to(dtype)
    g = grad.to(dtype)
    gz = torch.full((n,), float("nan")).to(dtype)
    harness().run("emu_act_backward", DTYPE_CODE[dtype], ptr(g), ptr(z), ptr(gz), n, ACTIVATIONS.index(act),
                  buffers={"grad": g, "z": z, "gz": gz})
    # The reference from the rounded inputs the kernel saw.
    seen, gd = z.double(), g.double()
    if act in ("gelu", "gelu_tanh", "silu"):
        x_seen = seen.requires_grad_()
        (expected,) = torch.autograd.grad(reference.ACTIVATIONS[act](x_seen), x_seen, gd)
    else:  # the derivative as a function of the output y
        dy = {"none": torch.ones_like(seen), "relu": (seen > 0).double(), "tanh": 1 - seen * seen,
              "sigmoid": seen * (1 - seen)}[act]
        expected = gd * dy
    check(gz, expected, dtype, "gz")
