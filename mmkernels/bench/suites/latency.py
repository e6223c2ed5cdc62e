"""Small shapes, where the fixed cost per call decides (issue 19, part 1): the drop-in modules against
what they replace, in inference (eval, torch.inference_mode) and as a training step (forward + backward).

- Decoding steps: CrossModalAttention vs nn.MultiheadAttention, batch-first, Lq 1-4 queries over Lk 32-600
  keys (key is value, as in a decoder's cross-attention), E 128-768 with 64-wide heads, with and without
  key padding, need_weights both ways (True is MHA's default call; the weights are computed, then dropped).
- Fusion heads: FusedConcatLinear vs nn.Linear over torch.cat plus the activation, M 1-32 rows, 1-4
  segments, every activation.
- The functional ops' fixed cost, on tiny tensors: cross_modal_attention vs SDPA, fused_concat_linear vs
  F.linear over torch.cat (the target: within 5 us of theirs; the runner prints both medians).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import reference

from ..core import OURS, Built, Case, Contender, Suite, make_step, randn, tol_for
from .attention import padding_mask

# (B, Lq, Lk, E): decoding steps.
DECODE_SHAPES = [(1, 1, 64, 256), (1, 1, 32, 128), (4, 4, 600, 768), (2, 1, 196, 512)]
# (M, widths, N): fusion heads.
HEAD_SHAPES = [(8, (64, 64, 64), 64), (1, (512, 768), 256), (32, (128,), 128), (4, (64, 32, 16, 8), 32)]
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")


def _step(fn, mode, leaves, grad_out):
    """Inference runs under torch.inference_mode (what serving code uses), training as make_step."""
    if mode != "fwd":
        return make_step(fn, mode, leaves, grad_out)

    def step():
        with torch.inference_mode():
            return fn()
    return step


def _build_decode(B, Lq, Lk, E, padded, need_weights, mode, device) -> Built:
    train = mode != "fwd"
    dtype = torch.float32
    mha = torch.nn.MultiheadAttention(E, E // 64, batch_first=True, device=device, dtype=dtype)
    ours = mmkernels.nn.CrossModalAttention.from_module(mha)
    for m in (mha, ours):
        m.train(train)  # eval: MHA may take its native fast path
        m.requires_grad_(train)
    query = randn(B, Lq, E, dtype=dtype, device=device, requires_grad=train)
    memory = randn(B, Lk, E, dtype=dtype, device=device, requires_grad=train)
    pad = padding_mask(B, Lk, padded, device)
    g = randn(B, Lq, E, dtype=dtype, device=device) if train else None

    def run(m):
        return lambda: m(query, memory, memory, key_padding_mask=pad, need_weights=need_weights)[0]

    leaves = lambda m: [query, memory, *m.parameters()]  # noqa: E731
    return Built([
        Contender(OURS, _step(run(ours), mode, leaves(ours), g)),
        Contender("mha", _step(run(mha), mode, leaves(mha), g)),
    ], oracle="mha", tol=tol_for(dtype))


def _build_head(M, widths, N, activation, mode, device) -> Built:
    train = mode != "fwd"
    dtype = torch.float32
    linear = torch.nn.Linear(sum(widths), N, device=device, dtype=dtype)
    ours = mmkernels.nn.FusedConcatLinear.from_linear(linear, widths, activation=activation)
    linear.requires_grad_(train)
    xs = [randn(M, d, dtype=dtype, device=device, requires_grad=train) for d in widths]
    g = randn(M, N, dtype=dtype, device=device) if train else None
    act = reference.ACTIVATIONS[activation]  # F.relu, F.gelu, torch.tanh...: PyTorch's own functions
    leaves = [*xs, *linear.parameters()]
    return Built([
        Contender(OURS, _step(lambda: ours(*xs), mode, leaves, g)),
        Contender("eager", _step(lambda: act(linear(torch.cat(xs, -1))), mode, leaves, g)),
    ], oracle="eager", tol=tol_for(dtype))


def _build_fixed_cost(op, mode, device) -> Built:
    train = mode != "fwd"
    dtype = torch.float32
    if op == "attn":
        q, k, v = (randn(1, 1, n, 8, dtype=dtype, device=device, requires_grad=train) for n in (1, 4, 4))
        g = randn(1, 1, 1, 8, dtype=dtype, device=device) if train else None
        return Built([
            Contender(OURS, _step(lambda: mmkernels.cross_modal_attention(q, k, v), mode, [q, k, v], g)),
            Contender("sdpa", _step(lambda: F.scaled_dot_product_attention(q, k, v), mode, [q, k, v], g)),
        ], oracle="sdpa", tol=tol_for(dtype))
    xs = [randn(4, 8, dtype=dtype, device=device, requires_grad=train) for _ in range(3)]
    w = randn(8, 24, dtype=dtype, device=device, requires_grad=train)
    b = randn(8, dtype=dtype, device=device, requires_grad=train)
    g = randn(4, 8, dtype=dtype, device=device) if train else None
    return Built([
        Contender(OURS, _step(lambda: mmkernels.fused_concat_linear(xs, w, b), mode, [*xs, w, b], g)),
        Contender("linear", _step(lambda: F.linear(torch.cat(xs, -1), w, b), mode, [*xs, w, b], g)),
    ], oracle="linear", tol=tol_for(dtype))


def _cases() -> list[Case]:
    # The default run: the first decoding step (inference, MHA's need_weights=False call) and its
    # first fusion head (inference, relu).
    cases = []
    for mode in ("fwd", "fwd+bwd"):
        for B, Lq, Lk, E in DECODE_SHAPES:
            for padded in (False, True):
                for need_weights in (False, True):
                    cases.append(Case(
                        suite="latency",
                        shape=f"attn B{B} Lq{Lq} Lk{Lk} E{E} H{E // 64}" + (" pad" if padded else "")
                        + (" weights" if need_weights else ""),
                        mode=mode,
                        dtype=torch.float32,
                        build=lambda device, s=(B, Lq, Lk, E, padded, need_weights), mode=mode:
                            _build_decode(*s, mode, device),
                        params={"B": B, "Lq": Lq, "Lk": Lk, "embed": E, "heads": E // 64, "padded": padded,
                                "need_weights": need_weights},
                        baselines=("mha",),
                        default=mode == "fwd" and (B, Lq, Lk, E) == DECODE_SHAPES[0] and not padded
                        and not need_weights,
                    ))
        for M, widths, N in HEAD_SHAPES:
            for activation in ACTIVATIONS:
                cases.append(Case(
                    suite="latency",
                    shape=f"head {M}x({','.join(map(str, widths))})->{N} {activation}",
                    mode=mode,
                    dtype=torch.float32,
                    build=lambda device, s=(M, widths, N, activation), mode=mode: _build_head(*s, mode, device),
                    params={"M": M, "widths": list(widths), "N": N, "activation": activation},
                    baselines=("eager",),
                    default=mode == "fwd" and (M, widths, N) == HEAD_SHAPES[0] and activation == "relu",
                ))
        for op, shape, baseline in (("attn", "op attn B1 H1 Lq1 Lk4 E8", "sdpa"),
                                    ("concat", "op concat 4x(8,8,8)->8", "linear")):
            cases.append(Case(
                suite="latency", shape=shape, mode=mode, dtype=torch.float32,
                build=lambda device, op=op, mode=mode: _build_fixed_cost(op, mode, device),
                params={"op": op}, baselines=(baseline,),
            ))
    return cases


SUITE = Suite(
    "latency", "small shapes, where the fixed cost per call decides: decoding steps and fusion heads", _cases,
    contenders={
        OURS: "mmkernels.nn.CrossModalAttention / FusedConcatLinear (inference under torch.inference_mode)",
        "mha": "torch.nn.MultiheadAttention with the same weights and call",
        "eager": "the activation of nn.Linear over torch.cat(xs, -1)",
        "sdpa": "F.scaled_dot_product_attention (the functional attention's fixed cost)",
        "linear": "F.linear over torch.cat(xs, -1) (the functional concat-linear's fixed cost)",
    },
)
