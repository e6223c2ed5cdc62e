"""Concurrency and state: the same call from 8 Python threads at once, run to run, and across
torch.set_num_threads, for every op (forward and backward).

What is promised (README, "Guarantees"): bitwise identical results run to run and across concurrent
callers for a fixed thread count; across thread counts, agreement within the dtype's tolerance
(BLAS blocking may change with the thread count, so not necessarily bitwise).
"""
from __future__ import annotations

import threading

import pytest
import torch

import mmkernels

from fuzz_support import TOLERANCES


def _fcl_case(dtype, activation):
    g = torch.Generator().manual_seed(1)
    # Enough rows for several row blocks (the parallel path) and a width past a vector register.
    xs = [torch.randn(3000, d, generator=g, dtype=dtype) for d in (40, 3, 21)]
    w = torch.randn(48, 64, generator=g, dtype=dtype) / 8
    b = torch.randn(48, generator=g, dtype=dtype)
    grad = torch.randn(3000, 48, generator=g, dtype=dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (*xs, w, b)]
        out = mmkernels.fused_concat_linear(leaves[:3], leaves[3], leaves[4], activation)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad))

    return run


def _attention_case(dtype):
    g = torch.Generator().manual_seed(2)
    # Several query blocks and key blocks per head, a padding mask and a broadcast float mask.
    q = torch.randn(2, 3, 300, 40, generator=g, dtype=dtype)
    k = torch.randn(2, 3, 700, 40, generator=g, dtype=dtype)
    v = torch.randn(2, 3, 700, 24, generator=g, dtype=dtype)
    kpm = torch.rand(2, 700, generator=g) < 0.2
    mask = torch.randn(1, 3, 300, 700, generator=g, dtype=dtype)
    grad = torch.randn(2, 3, 300, 24, generator=g, dtype=dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = mmkernels.cross_modal_attention(*leaves, key_padding_mask=kpm, attn_mask=mask)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad))

    return run


def _lrf_case(dtype):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2000, d, generator=g, dtype=dtype) for d in (16, 7)]
    fs = [torch.randn(4, d + 1, 32, generator=g, dtype=dtype) / 4 for d in (16, 7)]
    w, b = torch.randn(4, generator=g, dtype=dtype), torch.randn(32, generator=g, dtype=dtype)
    grad = torch.randn(2000, 32, generator=g, dtype=dtype)

    def run():
        leaves = [t.clone().requires_grad_() for t in (*xs, *fs, w, b)]
        out = mmkernels.low_rank_fusion(leaves[:2], leaves[2:4], leaves[4], leaves[5])
        return (out.detach(), *torch.autograd.grad(out, leaves, grad))

    return run


# name -> factory of a no-argument callable returning a tuple of tensors (output and gradients).
CASES = {
    "fcl-float32-gelu": lambda: _fcl_case(torch.float32, "gelu"),
    "fcl-bfloat16-relu": lambda: _fcl_case(torch.bfloat16, "relu"),
    "fcl-float64-sigmoid": lambda: _fcl_case(torch.float64, "sigmoid"),
    "attention-float32": lambda: _attention_case(torch.float32),
    "attention-bfloat16": lambda: _attention_case(torch.bfloat16),
    "attention-float16": lambda: _attention_case(torch.float16),
    "fcl-float16-silu": lambda: _fcl_case(torch.float16, "silu"),
    "low_rank_fusion-float32": lambda: _lrf_case(torch.float32),
}


def _assert_identical(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what}: result {i} differs (max abs diff {(a.double() - b.double()).abs().max()})"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bitwise_deterministic_run_to_run(name):
    run = CASES[name]()
    first = run()
    for _ in range(2):
        _assert_identical(run(), first, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_eight_threads_at_once_agree_bitwise(name):
    run = CASES[name]()
    want = run()
    start = threading.Barrier(8)
    results, errors = [None] * 8, []

    def worker(i):
        try:
            start.wait()
            results[i] = [run() for _ in range(2)]
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for i, per_thread in enumerate(results):
        for got in per_thread:
            _assert_identical(got, want, f"{name}, thread {i}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_independent_of_num_threads(name):
    run = CASES[name]()
    base = run()
    saved = torch.get_num_threads()
    try:
        for n in sorted({1, 2, 3, saved}):
            torch.set_num_threads(n)
            got = run()
            _assert_identical(run(), got, f"{name}, {n} threads, run to run")
            for i, (a, b) in enumerate(zip(got, base)):
                atol, rtol = TOLERANCES[a.dtype]
                scale = b.abs().max().item() or 1.0
                torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol,
                                           msg=lambda m: f"{name}, {n} threads, result {i}: {m}")
    finally:
        torch.set_num_threads(saved)
