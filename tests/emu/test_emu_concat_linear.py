"""The fused tensor-core kernel of fused_concat_linear (csrc/cuda/fused_concat_linear_tc.cu) executed
from its own source on the emulation harness, against mmkernels/reference.py in float64. Its
fragments are built with plain 32-bit shared loads in the PTX ISA's mma layout (no ldmatrix), so
these tests also check the emulated mma.sync against that layout directly."""
from __future__ import annotations

import ctypes

import pytest
import torch

from harness import ACTIVATIONS, harness, ptr
from mmkernels import reference

pytestmark = pytest.mark.emu

TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}  # tests/test_cuda_fused_concat_linear.py
TILE_K = 32


def run_tc(xs, weight, bias, act, with_preact=True):
    """Mirrors make_table in csrc/cuda/fused_concat_linear_cuda.cpp, then launches on the harness."""
    M, N = xs[0].shape[0], weight.shape[0]
    out = torch.full((M, N), float("nan"), dtype=weight.dtype)
    preact = torch.full((M, N), float("nan"), dtype=weight.dtype) if with_preact else None
    seg = [(x, off) for x, off in zip(xs, torch.tensor([0] + [x.shape[1] for x in xs]).cumsum(0).tolist()) if x.shape[1]]
    n = len(seg)
    vec_mask = 0
    for i, (x, off) in enumerate(seg):
        vec = (x.data_ptr() % 16 == 0 and x.stride(0) % 8 == 0 and weight.data_ptr() % 16 == 0
               and weight.stride(0) % 8 == 0 and off % 8 == 0)
        vec_mask |= int(vec) << i
    k_tiles = sum((x.shape[1] + TILE_K - 1) // TILE_K for x, _ in seg)
    buffers = {f"x{i}": x for i, (x, _) in enumerate(seg)}
    buffers.update(weight=weight, bias=bias, out=out, preact=preact)
    harness().run(
        "emu_tc_forward", int(weight.dtype == torch.bfloat16), n,
        (ctypes.c_void_p * n)(*[x.data_ptr() for x, _ in seg]), (ctypes.c_int64 * n)(*[x.stride(0) for x, _ in seg]),
        (ctypes.c_int32 * n)(*[x.shape[1] for x, _ in seg]), (ctypes.c_int32 * n)(*[off for _, off in seg]),
        vec_mask, k_tiles, ptr(weight), weight.stride(0), ptr(bias), ptr(out), ptr(preact), M, N,
        ACTIVATIONS.index(act), buffers=buffers)
    return out, preact, vec_mask


def make_inputs(M, widths, N, dtype, padded, gen):
    xs = []
    for d in widths:
        if padded:  # row stride a multiple of 8 elements: the 16-byte cp.async path for odd widths too
            xs.append(torch.randn(M, (d + 7) // 8 * 8 + 8, generator=gen).to(dtype)[:, :d])
        else:
            xs.append(torch.randn(M, d, generator=gen).to(dtype))
    w = torch.randn(N, sum(widths), generator=gen).to(dtype) * 0.2
    b = torch.randn(N, generator=gen).to(dtype)
    return xs, w, b


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("M,widths,N,padded", [
    (37, [16, 48], 24, True),        # N <= 32: the 128 x 32 tile; all segments vectorised
    (70, [17, 123, 8], 72, False),   # odd widths, element-wise loader; 64 x 64 tiles, partial in M and N
    (130, [17, 39, 64], 65, True),   # odd width on the vector path (zero-filled tail chunk), mixed paths, odd N
    (1, [3], 1, False),
])
@pytest.mark.parametrize("act", ["none", "gelu", "sigmoid"])
def test_tc_forward_matches_reference(dtype, M, widths, N, padded, act):
    g = torch.Generator().manual_seed(M * 7 + N)
    xs, w, b = make_inputs(M, widths, N, dtype, padded, g)
    out, preact, vec_mask = run_tc(xs, w, b, act)
    if padded:
        assert vec_mask != 0  # the case exercises the cp.async path it means to
    z = reference.fused_concat_linear([x.double() for x in xs], w.double(), b.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(preact.double(), z, atol=atol * 4, rtol=rtol)
    want = reference.fused_concat_linear([x.double() for x in xs], w.double(), b.double(), activation=act)
    torch.testing.assert_close(out.double(), want, atol=atol * 4, rtol=rtol)


def test_tc_forward_without_bias_or_preact():
    g = torch.Generator().manual_seed(5)
    xs, w, _ = make_inputs(33, [32, 32], 40, torch.float16, False, g)
    out, _, _ = run_tc(xs, w, None, "relu", with_preact=False)
    want = reference.fused_concat_linear([x.double() for x in xs], w.double(), None, activation="relu")
    torch.testing.assert_close(out.double(), want, atol=1.2e-2, rtol=3e-3)
