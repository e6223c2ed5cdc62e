"""Teeth: known bugs planted in temporary copies of the kernels (the repository's files are never
touched; the harness build takes the altered text as an override) must each be caught, by a
sanitizer report or by a wrong result. Each plant is a textual replacement that must match the
kernel source exactly once, so a kernel edit that removes the planted line fails here loudly
rather than making the test vacuous."""
from __future__ import annotations

import pytest
import torch

import attention_support
import emu_build
from attention_emu import Problem
from attention_support import run_reference
from harness import ACTIVATIONS, EmuError, harness, ptr
from varlen_emu import run_varlen_case

pytestmark = pytest.mark.emu

ATTN = emu_build.CSRC / "cuda" / "attention"


def plant(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, f"the planted line is no longer in {path.name}: {old!r}"
    return path.name, text.replace(old, new)


# (plant, head dim, what must be reported: a substring of a report, or None for a wrong result)
ATTENTION_PLANTS = {
    "off-by-one tile bound (loads one row past the end)": (
        plant(ATTN / "attn_device.cuh", "const bool ok = r < nvalid;", "const bool ok = r <= nvalid;"), 64,
        "global out of bounds"),
    "wrong swizzle (row bits of the 32-wide tile)": (
        plant(ATTN / "attn_device.cuh", "return r * W + ((c ^ ((r >> 1) & 3)) << 3);",
              "return r * W + ((c ^ ((r >> 1) & 7)) << 3);"), 32, None),
    "swizzle missing on one side (epilogue read-back)": (
        plant(ATTN / "attn_fwd.cuh", "*reinterpret_cast<const uint4*>(sQ + swz<D>(rr, c));",
              "*reinterpret_cast<const uint4*>(sQ + rr * D + c * 8);"), 64, None),
    "missing barrier before a buffer is refilled": (
        plant(ATTN / "attn_fwd.cuh", "    __syncthreads();  // every warp is done with this buffer",
              "    // every warp is done with this buffer"), 64, "race"),
    "missing barrier after the copies land": (
        plant(ATTN / "attn_fwd.cuh", "      cp_async_wait<0>();\n    }\n    __syncthreads();",
              "      cp_async_wait<0>();\n    }\n"), 64, "race"),
    "cp.async waited for one group too few": (
        plant(ATTN / "attn_fwd.cuh", "      cp_async_wait<1>();", "      cp_async_wait<2>();"), 64,
        "read before cp.async completed"),
    "query tile never loaded": (
        plant(ATTN / "attn_fwd.cuh", "  load_tile_async<D, kBr, kThreads>(sQ, qg + i0 * p.q_sl, p.q_sl, seq.Lq - i0, qg, tid);\n",
              ""), 64, "uninitialised shared read"),
    "barrier reached by half the block": (
        plant(ATTN / "attn_fwd.cuh", "  __syncwarp();\n", "  if (warp < 2) __syncthreads();\n"), 64,
        "barrier not reached by the whole block"),
}


@pytest.mark.parametrize("name", list(ATTENTION_PLANTS))
def test_planted_attention_bug_is_caught(name):
    (file, text), E, expected = ATTENTION_PLANTS[name]
    h = harness(((file, text),), (f"cuda/attention/fwd_hdim{E}_fp16.cu",))
    B, H, Lq, Lk = 1, 2, 70, 150  # partial last tiles of queries and keys, three key tiles
    g = torch.Generator().manual_seed(0)
    q, k, v = attention_support.make_qkv(B, H, Lq, Lk, E, E, torch.float16, requires_grad=False, gen=g)
    out, _, errors = Problem(h, q, k, v, {}, E**-0.5).forward(expect_errors=True)
    ref, _ = run_reference(q, k, v, {}, scale=E**-0.5)
    wrong = torch.isnan(out).any() or (out.double() - ref).abs().max() > 4e-3 * max(1.0, ref.abs().max().item())
    if expected is None:
        assert errors or wrong, f"{name}: neither reported nor a wrong result"
    else:
        assert any(expected in e for e in errors), f"{name}: expected a '{expected}' report, got {errors}"


# Packed (varlen) sequences: (plant, the kernel files to build, the case that must fail). Short
# sequences before the longest, so that a row or seed taken from the wrong sequence lands on another's
# (inside the buffers: the executor reports a stray access but still performs it).
FWD64 = ("cuda/attention/fwd_hdim64_fp16.cu",)
BWD64 = ("cuda/attention/fwd_hdim64_fp16.cu", "cuda/attention/bwd_hdim64_fp16.cu", "cuda/attention/attn_aux.cu")
VARLEN_PLANTS = {
    "keys bounded by the longest sequence, not this one": (
        plant(ATTN / "attn_fwd.cuh", "int kbeg = 0, kend = seq.Lk;", "int kbeg = 0, kend = p.Lk;"), FWD64,
        dict(grads=False)),
    "lse of every sequence written from the first sequence's row": (
        plant(ATTN / "attn_device.cuh", "return h * p.lse_sh + s.q_base;", "return h * p.lse_sh;"), FWD64,
        dict(grads=False)),
    "dropout keyed by the call's seed, not the sequence's": (
        plant(ATTN / "attn_device.cuh", "varlen_sequence_seed(seed, s.b)", "seed"), FWD64,
        dict(grads=False, dropout_p=0.3, seed=5)),
    "dQ accumulated at the batch index, not the sequence's first row": (
        plant(ATTN / "attn_bwd.cuh", "p.dq_accum + seq.q_base * p.dq_sb", "p.dq_accum + b * p.dq_sb"), BWD64, {}),
    "causal offset of the longest sequences, not this one's": (
        plant(ATTN / "attn_device.cuh", "return p.causal == 2 ? s.Lk - s.Lq : 0;", "return p.causal == 2 ? p.Lk - p.Lq : 0;"),
        BWD64, dict(causal=2)),
}


@pytest.mark.parametrize("name", list(VARLEN_PLANTS))
def test_planted_varlen_bug_is_caught(name):
    (file, text), sources, kw = VARLEN_PLANTS[name]
    h = harness(((file, text),), sources)
    with pytest.raises((AssertionError, EmuError)):
        run_varlen_case([5, 1, 9, 70], [7, 40, 1, 83], 2, 64, torch.float16, h=h, **kw)
    run_varlen_case([5, 1, 9, 70], [7, 40, 1, 83], 2, 64, torch.float16, **kw)  # the unplanted kernels pass


# Split keys (decoding): a split's share of the key tiles one short, and a split that saw no key
# reporting lse = +inf (a row that sees nothing) instead of -inf (weight 0 in the combine).
SPLIT_PLANTS = {
    "split share one tile short": plant(ATTN / "attn_fwd.cuh", "t_last = min(t_last, t_first + per);",
                                        "t_last = min(t_last, t_first + per - 1);"),
    "empty split's lse +inf": plant(ATTN / "attn_fwd.cuh", "(m[r] + log2f(l[r])) * kLn2 : -INFINITY;",
                                    "(m[r] + log2f(l[r])) * kLn2 : INFINITY;"),
}


@pytest.mark.parametrize("name", list(SPLIT_PLANTS))
def test_planted_split_key_bug_is_caught(name):
    h = harness((SPLIT_PLANTS[name],), ("cuda/attention/fwd_hdim64_fp16.cu", "cuda/attention/attn_aux.cu"))
    B, H, Lq, Lk, E = 1, 2, 3, 300, 64
    g = torch.Generator().manual_seed(4)
    q, k, v = attention_support.make_qkv(B, H, Lq, Lk, E, E, torch.float16, requires_grad=False, gen=g)
    lengths = torch.tensor([150], dtype=torch.int32)  # 3 visible tiles over 4 splits: the last sees none
    ref, _ = run_reference(q, k, v, {"kv_lengths": lengths}, scale=E**-0.5)
    for planted, must_match in ((h, False), (harness(), True)):
        out, _ = Problem(planted, q, k, v, {"kv_lengths": lengths}, E**-0.5).forward(num_splits=4)
        err = (out.double() - ref).abs().nan_to_num(1e9).max().item()
        assert (err <= 4e-3 * max(1.0, ref.abs().max().item())) == must_match, f"{name}: error {err}"


def test_planted_missing_barrier_in_attention_backward_is_caught():
    # Without the barrier after dS^T is stored, warps read other warps' dS^T rows before they land.
    file, text = plant(ATTN / "attn_bwd.cuh", "    __syncthreads();\n\n    // dQ_i (kBr x D) += dS K_j",
                       "\n    // dQ_i (kBr x D) += dS K_j")
    planted = harness(((file, text),), ("cuda/attention/bwd_hdim64_fp16.cu", "cuda/attention/attn_aux.cu"))
    B, H, Lq, Lk, E = 1, 1, 70, 64, 64
    g = torch.Generator().manual_seed(1)
    q, k, v = attention_support.make_qkv(B, H, Lq, Lk, E, E, torch.float16, requires_grad=False, gen=g)
    out, lse = Problem(harness(), q, k, v, {}, E**-0.5).forward()
    dout = torch.randn(out.shape, generator=g).half()
    *_, errors = Problem(planted, q, k, v, {}, E**-0.5).backward(out, lse, dout, expect_errors=True)
    assert any("race (read after write)" in e for e in errors), errors


def test_planted_tile_bound_in_concat_linear_kernel_is_caught():
    file, text = plant(emu_build.CSRC / "cuda" / "fused_concat_linear_tc.cu",
                       "const int valid = gr < row_limit ?", "const int valid = gr <= row_limit ?")
    h = harness(((file, text),), ("cuda/fused_concat_linear_tc.cu",))
    M, N, K = 37, 40, 48
    x = torch.randn(M, K).half()
    w = torch.randn(N, K).half()
    out = torch.full((M, N), float("nan")).half()
    xs = (ptr(x),)
    import ctypes

    errors = h.run("emu_tc_forward", 0, 1, (ctypes.c_void_p * 1)(*xs), (ctypes.c_int64 * 1)(K),
                   (ctypes.c_int32 * 1)(K), (ctypes.c_int32 * 1)(0), 1, (K + 31) // 32, ptr(w), K, None, ptr(out), None,
                   M, N, ACTIVATIONS.index("none"), buffers={"x": x, "weight": w, "out": out}, expect_errors=True)
    assert any("global out of bounds" in e for e in errors), errors
