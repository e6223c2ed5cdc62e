"""Fusion layers (issue 6): the low_rank_fusion op vs its eager reference, and training steps
(forward + backward) of whole blocks against their plain-PyTorch twins with the same weights:

- ``low_rank_fusion``: LMF's product of projections vs reference.low_rank_fusion (einsum per
  modality, every (B, rank, N) projection kept for backward) and torch.compile of it.
- ``fusion_train``: the three-modality classifier of examples/three_modal_classifier.py
  (FusedConcatLinear vs torch.cat + nn.Linear; skipped where the examples folder is not present, as in
  an installed wheel), and GatedCrossAttention vs the same block on nn.MultiheadAttention and
  nn.Linear + GELU.
"""
from __future__ import annotations

import importlib.util
import pathlib

import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import reference

from ..core import OURS, Built, Case, Contender, Suite, compiled_contender, make_step, randn, tol_for

# ------------------------------------------------------------------------------ low_rank_fusion

# (rows, modality widths, rank, N): LMF's sizes (hidden 32-128, rank 4-16) at batch x sequence scale.
LMF_SHAPES = [(4096, (128, 64, 32), 8, 256), (16384, (32, 32, 32), 4, 64), (1024, (300, 74, 35), 16, 128)]


def _build_lmf(M, widths, rank, N, mode, dtype, device) -> Built:
    grad = mode != "fwd"
    xs = [randn(M, d, dtype=dtype, device=device, requires_grad=grad) for d in widths]
    fs = [randn(rank, d + 1, N, dtype=dtype, device=device, scale=(d + 1) ** -0.5, requires_grad=grad)
          for d in widths]
    w = randn(rank, dtype=dtype, device=device, scale=rank ** -0.5, requires_grad=grad)
    b = randn(N, dtype=dtype, device=device, scale=0.1, requires_grad=grad)
    leaves = [*xs, *fs, w, b]
    g = randn(M, N, dtype=dtype, device=device) if grad else None
    return Built([
        Contender(OURS, make_step(lambda: mmkernels.low_rank_fusion(xs, fs, w, b), mode, leaves, g)),
        Contender("eager", make_step(lambda: reference.low_rank_fusion(xs, fs, w, b), mode, leaves, g)),
        compiled_contender("compile", reference.low_rank_fusion,
                           lambda f: make_step(lambda: f(xs, fs, w, b), mode, leaves, g)),
    ], oracle="eager", tol=tol_for(dtype))


def _lmf_cases() -> list[Case]:
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for M, widths, rank, N in LMF_SHAPES:
            cases.append(Case(
                suite="low_rank_fusion", shape=f"{M}x({','.join(map(str, widths))}) r{rank}->{N}", mode=mode,
                dtype=torch.float32,
                build=lambda device, s=(M, widths, rank, N), mode=mode: _build_lmf(*s, mode, torch.float32, device),
                params={"M": M, "widths": list(widths), "rank": rank, "N": N}, baselines=("eager", "compile"),
                flops=2.0 * M * (sum(widths) + len(widths)) * rank * N * (1 if mode == "fwd" else 3),
                default=mode == "fwd+bwd" and (M, widths, rank, N) == LMF_SHAPES[0],
            ))
    return cases


LMF_SUITE = Suite(
    "low_rank_fusion", "mmkernels.low_rank_fusion (LMF) vs its eager reference", _lmf_cases,
    contenders={
        OURS: "mmkernels.low_rank_fusion(xs, factors, w, b): the fused product of projections",
        "eager": "mmkernels.reference.low_rank_fusion: an einsum per modality, every projection kept",
        "compile": "torch.compile of that reference",
    })

# ------------------------------------------------------------------------------ training steps

EXAMPLE = pathlib.Path(mmkernels.__file__).resolve().parents[1] / "examples" / "three_modal_classifier.py"


def _example():
    spec = importlib.util.spec_from_file_location("three_modal_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build_three_modal(B, dtype, device) -> Built:
    ex = _example()
    fused = ex.Classifier().to(device=device, dtype=dtype)
    ref = ex.reference_model(fused)  # same weights; parameters in the same order
    gen = torch.Generator().manual_seed(0)
    data, _, _ = ex.make_dataset(B, 6.0, gen)
    data = {k: v.to(device=device, dtype=dtype) for k, v in data.items()}
    g = randn(B, ex.NUM_CLASSES, dtype=dtype, device=device)
    return Built([
        Contender(OURS, make_step(lambda: fused(data), "fwd+bwd", list(fused.parameters()), g)),
        Contender("eager", make_step(lambda: ref(data), "fwd+bwd", list(ref.parameters()), g)),
    ], oracle="eager", tol=tol_for(dtype))


class EagerGatedCrossAttention(nn.Module):
    """GatedCrossAttention in plain PyTorch, with the same state_dict keys."""

    def __init__(self, dim, heads, media_dim, ff_mult, device=None, dtype=None):
        super().__init__()
        f = {"device": device, "dtype": dtype}
        self.attn_norm = nn.LayerNorm(dim, **f)
        self.attn = nn.MultiheadAttention(dim, heads, kdim=media_dim, vdim=media_dim, batch_first=True, **f)
        self.attn_gate = nn.Parameter(torch.zeros(1, **f))
        self.ff_norm = nn.LayerNorm(dim, **f)
        self.ff_in = nn.Linear(dim, dim * ff_mult, **f)
        self.ff_out = nn.Linear(dim * ff_mult, dim, **f)
        self.ff_gate = nn.Parameter(torch.zeros(1, **f))

    def forward(self, x, media, media_key_padding_mask=None):
        a, _ = self.attn(self.attn_norm(x), media, media, key_padding_mask=media_key_padding_mask, need_weights=False)
        x = x + torch.tanh(self.attn_gate) * a
        return x + torch.tanh(self.ff_gate) * self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))


def _build_gca(B, L, M, dim, media_dim, heads, dtype, device) -> Built:
    ours = mmkernels.nn.GatedCrossAttention(dim, heads, media_dim=media_dim, device=device, dtype=dtype)
    with torch.no_grad():
        ours.attn_gate.fill_(0.5)  # open gates: closed ones make both branches' gradients vanish
        ours.ff_gate.fill_(0.5)
    eager = EagerGatedCrossAttention(dim, heads, media_dim, 4, device=device, dtype=dtype)
    eager.load_state_dict(ours.state_dict())
    x = randn(B, L, dim, dtype=dtype, device=device, requires_grad=True)
    media = randn(B, M, media_dim, dtype=dtype, device=device, requires_grad=True)
    keep = torch.randint(M // 4, M + 1, (B,), generator=torch.Generator().manual_seed(1))
    pad = (torch.arange(M)[None] >= keep[:, None]).to(device)  # True = padding; every sample keeps keys
    g = randn(B, L, dim, dtype=dtype, device=device)
    leaves = lambda m: [x, media, *m.parameters()]  # noqa: E731
    return Built([
        Contender(OURS, make_step(lambda: ours(x, media, pad), "fwd+bwd", leaves(ours), g)),
        Contender("eager", make_step(lambda: eager(x, media, pad), "fwd+bwd", leaves(eager), g)),
    ], oracle="eager", tol=tol_for(dtype))


# GatedCrossAttention: (B, text L, media M, dim, media_dim, heads)
GCA_SHAPES = [(4, 256, 64, 512, 768, 8), (2, 1024, 256, 512, 1024, 8)]


def _train_cases() -> list[Case]:
    cases = []
    if EXAMPLE.exists():
        cases.append(Case(
            suite="fusion_train", shape="three_modal_classifier B256", mode="fwd+bwd", dtype=torch.float32,
            build=lambda device: _build_three_modal(256, torch.float32, device), params={"model": "three_modal", "B": 256},
            baselines=("eager",), devices=("cpu", "cuda"),
        ))
    for B, L, M, dim, mdim, heads in GCA_SHAPES:
        cases.append(Case(
            suite="fusion_train", shape=f"GatedCrossAttention B{B} L{L} M{M} d{dim} m{mdim} H{heads} pad",
            mode="fwd+bwd", dtype=torch.float32,
            build=lambda device, s=(B, L, M, dim, mdim, heads): _build_gca(*s, torch.float32, device),
            params={"model": "gated_cross_attention", "B": B, "L": L, "M": M, "dim": dim, "media_dim": mdim,
                    "heads": heads},
            baselines=("eager",), default=(B, L, M, dim, mdim, heads) == GCA_SHAPES[0],
        ))
    return cases


TRAIN_SUITE = Suite(
    "fusion_train", "training steps of fusion blocks vs their plain-PyTorch twins (same weights)", _train_cases,
    contenders={
        OURS: "the block built on mmkernels (FusedConcatLinear / GatedCrossAttention)",
        "eager": "the same block on torch.cat + nn.Linear / nn.MultiheadAttention + nn.Linear",
    })
