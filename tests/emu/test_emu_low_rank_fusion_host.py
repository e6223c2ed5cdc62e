"""The host code of low_rank_fusion's CUDA kernels (csrc/cuda/low_rank_fusion_cuda.cpp: chunking, the
projection GEMMs and their layout, the fold past 8 modalities, the ATen product rule, the gradients'
composition) run on the CPU: compiled against CPU torch with MMK_EMU_HOST (CUDA headers replaced by
csrc/emu/host) and linked to the emulation harness, whose executor runs the kernels. CPU tensors stand
in for device memory, so the harness's bounds check is widened to every address here (the kernels'
own bounds are checked by test_emu_low_rank_fusion.py); races, barriers and results are still checked.
What differs from a GPU build: the 16-bit projections convert to float32 before ATen's CPU mm
(on CUDA: mm with a float32 out_dtype, same arithmetic up to summation order)."""
from __future__ import annotations

import ctypes
import functools
import os

import pytest
import torch

import emu_build
from harness import harness
from mmkernels import reference

pytestmark = pytest.mark.emu

TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (3e-2, 2e-2), torch.float32: (2e-5, 1e-4),
       torch.float64: (1e-10, 1e-8)}
# (leading dims, widths, rank, N): as tests/test_cuda_low_rank_fusion.py, 10 modalities included (the
# fold in forward, the ATen product rule in backward).
SHAPES = [
    ((1,), (1,), 1, 1),
    ((3,), (5, 0, 7), 3, 17),
    ((2, 9), (16, 31, 8), 4, 65),
    ((5,), (3, 1, 2, 5, 1, 2, 4, 3), 2, 9),
    ((6,), (2, 3, 1, 0, 2, 4, 1, 3, 2, 5), 3, 11),
]


@functools.lru_cache(maxsize=None)
def host():
    from torch.utils import cpp_extension

    lib = emu_build.build()
    harness()  # loads the same library first, for its error interface
    build_dir = emu_build.BUILD / "lrf-host"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name="mmk_emu_lrf_host",
        sources=[str(emu_build.ROOT / "tests" / "emu" / "lrf_host_emu.cpp")],
        extra_include_paths=[str(emu_build.CSRC / "emu" / "host"), str(emu_build.CSRC / "cuda"),
                             str(emu_build.CSRC / "include")],
        extra_cflags=["-DMMK_EMU_HOST", "-O1"],
        extra_ldflags=[str(lib), f"-Wl,-rpath,{lib.parent}"],
        build_directory=str(build_dir),
        verbose=False,
    )


def run(fn, *args):
    """Calls the host code with every address allowed; raises on any emulator report."""
    lib = harness().lib
    lib.emu_clear()
    lib.emu_add_buffer(ctypes.c_void_p(1), ctypes.c_size_t(2**64 - 2), b"any host memory")
    result = fn(*args)
    errors = [lib.emu_error_text(i).decode() for i in range(lib.emu_errors_kept())]
    assert lib.emu_error_count() == 0, errors
    return result


def make_case(lead, widths, rank, n, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*lead, d, generator=gen).to(dtype) for d in widths]
    fs = [(torch.randn(rank, d + 1, n, generator=gen) / (d + 1) ** 0.5).to(dtype) for d in widths]
    w = (torch.randn(rank, generator=gen) / rank**0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype)
    return xs, fs, w, b


def check(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(params=["auto", "4"], ids=["chunk=auto", "chunk=4"])
def chunk(request, monkeypatch):
    if request.param != "auto":
        monkeypatch.setenv("MMKERNELS_LRF_CUDA_CHUNK_ROWS", request.param)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_forward_and_backward(chunk, dtype):
    for i, (lead, widths, rank, n) in enumerate(SHAPES):
        xs, fs, w, b = make_case(lead, widths, rank, n, dtype, seed=i)
        leaves = [t.detach().double().clone().requires_grad_() for t in (*xs, *fs, w, b)]
        m = len(xs)
        ref = reference.low_rank_fusion(leaves[:m], leaves[m : 2 * m], leaves[-2], leaves[-1])
        out = run(host().forward, xs, fs, w, b)
        assert out.shape == ref.shape and out.dtype == dtype
        check(out, ref.detach(), dtype, f"shape {i} out")
        g = torch.randn(ref.shape).to(dtype)
        exp = torch.autograd.grad(ref, leaves, g.double())
        gx, gf, gw, gb = run(host().backward, g, xs, fs, w, [True] * m, [True] * m, True, True)
        names = [f"inputs[{j}]" for j in range(m)] + [f"factors[{j}]" for j in range(m)] + ["rank_weight", "bias"]
        for name, ours, theirs in zip(names, [*gx, *gf, gw, gb], exp):
            assert ours.dtype == dtype and ours.shape == theirs.shape, name
            check(ours, theirs, dtype, f"shape {i} grad {name}")


@pytest.mark.parametrize("m", [3, 10], ids=lambda m: f"{m} modalities")
def test_backward_some_gradients(m):
    widths = (4, 0, 3, 2, 5, 1, 2, 3, 1, 2)[:m]
    xs, fs, w, b = make_case((7,), widths, 3, 6, torch.float64, seed=20 + m)
    need_x = [j % 2 == 0 for j in range(m)]
    need_f = [j % 3 == 1 for j in range(m)]
    g = torch.randn(7, 6, dtype=torch.float64)
    gx, gf, gw, gb = run(host().backward, g, xs, fs, w, need_x, need_f, False, False)
    leaves = [t.clone().requires_grad_() for t in (*xs, *fs)]
    exp = torch.autograd.grad(reference.low_rank_fusion(leaves[:m], leaves[m:], w, b), leaves, g)
    for j in range(m):
        for what, ours, need, theirs in ((f"inputs[{j}]", gx[j], need_x[j], exp[j]),
                                         (f"factors[{j}]", gf[j], need_f[j], exp[m + j])):
            if need:
                check(ours, theirs, torch.float64, what)
            else:
                assert ours.numel() == 0, f"{what}: a gradient that was not asked for"
    assert gw.numel() == 0 and gb.numel() == 0


def test_strided_inputs_empty_and_rank_zero():
    gen = torch.Generator().manual_seed(3)
    big = torch.randn(40, 64, generator=gen, dtype=torch.float64)
    xs = [big[:, 1:9], big[:, 10:40:3], torch.randn(5, 40, generator=gen, dtype=torch.float64).t()]
    fs = [torch.randn(8, 4, x.shape[1] + 1, generator=gen, dtype=torch.float64).permute(1, 2, 0) / 3 for x in xs]
    w, b = torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    check(run(host().forward, xs, fs, w, b), reference.low_rank_fusion(xs, fs, w, b), torch.float64, "strided")
    assert run(host().forward, [x[:0] for x in xs], fs, w, b).shape == (0, 8)
    f0 = [f[:0] for f in fs]
    check(run(host().forward, xs, f0, w[:0], b), b.expand(40, 8), torch.float64, "rank 0")
    gx, gf, gw, gb = run(host().backward, torch.ones(40, 8, dtype=torch.float64), xs, f0, w[:0], [True] * 3,
                         [True] * 3, True, True)
    assert all(torch.equal(g, torch.zeros_like(x)) for g, x in zip(gx, xs)) and gw.shape == (0,)
    check(gb, torch.full((8,), 40.0, dtype=torch.float64), torch.float64, "grad bias")


def test_errors_name_the_argument():
    xs, fs, w, b = make_case((3,), (2, 4), 2, 5, torch.float32, seed=9)
    with pytest.raises(RuntimeError, match=r"'factors\[1\]'"):
        host().forward(xs, [fs[0], fs[1][:, :2]], w, b)
    with pytest.raises(RuntimeError, match=r"'bias'"):
        host().forward(xs, fs, w, b[:3])
    with pytest.raises(RuntimeError, match=r"'inputs\[1\]'"):
        host().forward([xs[0], xs[1][:2]], fs, w, b)
