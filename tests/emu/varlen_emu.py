"""The emulator's run of one packed (varlen) problem against the float64 reference."""
from __future__ import annotations

import torch

from attention_emu import TOL, VarlenProblem, assert_close
from harness import harness
from varlen_support import cpu_keep_masks, make_packed, reference_lse, reference_varlen


def run_varlen_case(lens_q, lens_k, H, E, dtype, H_kv=None, causal=0, dropout_p=0.0, seed=0, gen_seed=0,
                    layout="packed", grads=True, h=None):
    """The packed kernels on fresh random inputs against the float64 reference: out, lse, gradients."""
    H_kv = H if H_kv is None else H_kv
    g = torch.Generator().manual_seed(gen_seed)
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, H, H_kv, E, dtype, g, layout)
    scale = E**-0.5
    prob = VarlenProblem(h or harness(), q, k, v, cu_q, cu_k, scale, dropout_p, seed, causal)
    out, lse = prob.forward()
    keep = cpu_keep_masks(H, H_kv, cu_q, cu_k, dropout_p, seed) if dropout_p > 0 else None
    ref, leaves = reference_varlen(q, k, v, cu_q, cu_k, scale, causal, keep, dropout_p)
    assert_close(out, ref, TOL[dtype][0], "out")
    torch.testing.assert_close(lse.double(), reference_lse(q, k, cu_q, cu_k, scale, causal), atol=2e-2, rtol=1e-3,
                               msg=lambda m: f"lse: {m}")
    if not grads:
        return
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dq, dk, dv = prob.backward(out, lse, dout)
    want = torch.autograd.grad(ref, leaves, dout.double(), allow_unused=True)
    for name, a, b in zip("qkv", (dq, dk, dv), want):
        assert_close(a, torch.zeros_like(a, dtype=torch.float64) if b is None else b, TOL[dtype][1], f"grad {name}")
