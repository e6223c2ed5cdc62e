"""Attention's memory bound: extra memory O(B*H*Lq) (plus O(Lk*E) copies of k/v), never the
(Lq, Lk) score matrix, in forward and in backward. Measured as the peak of live CPU allocations
inside the call, from the profiler's memory events; the reference (which materialises the scores)
is the positive control showing the measurement sees a score-sized allocation."""
import torch
from torch.profiler import ProfilerActivity, profile

import mmkernels
from mmkernels import reference


def peak_allocated_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_attention_never_allocates_the_score_matrix():
    B, H, Lq, Lk, E = 1, 2, 2048, 2048, 32
    q, k, v = (torch.randn(B, H, n, E, requires_grad=True) for n in (Lq, Lk, Lk))
    scores = B * H * Lq * Lk * 4
    assert peak_allocated_bytes(lambda: reference.cross_modal_attention(q, k, v)) >= scores  # control

    fwd = peak_allocated_bytes(lambda: mmkernels.cross_modal_attention(q, k, v))
    out = mmkernels.cross_modal_attention(q, k, v)
    grad = torch.randn_like(out)
    bwd = peak_allocated_bytes(lambda: torch.autograd.grad(out, [q, k, v], grad, retain_graph=True))
    # Inputs/outputs are 0.5 MiB each here; the score matrix would be 32 MiB.
    assert fwd < scores / 8, f"forward peak {fwd} bytes, the scores are {scores}"
    assert bwd < scores / 4, f"backward peak {bwd} bytes, the scores are {scores}"


def test_grouped_query_attention_never_expands_k_and_v():
    # issue 13: K / V are read per kv head by every query head of its group, never repeated to H heads.
    B, H, Hkv, L, E, Ev = 1, 16, 1, 2048, 64, 8
    q = torch.randn(B, H, L, E)
    k, v = torch.randn(B, Hkv, L, E), torch.randn(B, Hkv, L, Ev)
    expanded = B * H * L * (E + Ev) * 4  # what repeat_interleave of K and V would allocate
    assert peak_allocated_bytes(lambda: reference.cross_modal_attention(q, k, v, enable_gqa=True)) >= expanded
    fwd = peak_allocated_bytes(lambda: mmkernels.cross_modal_attention(q, k, v, enable_gqa=True))
    # The output (1 MiB here) and per-thread packed key blocks; the expansion would be 9.4 MB.
    assert fwd < expanded / 2, f"forward peak {fwd} bytes, expanded K/V are {expanded}"
