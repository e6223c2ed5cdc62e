"""The differential fuzz table: one entry per op or module.

An entry is a Hypothesis strategy that draws a *case* (a plain dict of sizes, layouts, seeds: it is
what Hypothesis prints and shrinks), and a `run(case, impl)` that builds the tensors from the case and
returns named results (the output and every gradient). `impl` is "ours", or "reference" which runs
mmkernels/reference.py (or the PyTorch module replaced) on the same values, upcast to float64, or in
the case's own dtype for the NaN/Inf positions (see test_fuzz.py).

Adding an op: write its case strategy and its run function, append a FuzzSpec to SPECS.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from hypothesis import strategies as st
from torch import nn

import mmkernels
from mmkernels import reference
from mmkernels.nn import FusedConcatLinear

from fuzz_support import LAYOUTS, dtypes, make_tensor, positive_size, scales, small_size, specials


@dataclass(frozen=True)
class FuzzSpec:
    name: str
    cases: st.SearchStrategy  # draws a case dict with at least "dtype"
    run: Callable  # run(case, impl, dtype) -> dict[str, Tensor]
    # Results compared in forward only for these dtypes (e.g. relu's mask in bfloat16, see README).
    forward_only: Callable = lambda case: False


def _grads(out, named_inputs, seed):
    """Backward with a seeded random grad_out; returns {name: grad} for inputs needing grad."""
    named = [(k, t) for k, t in named_inputs if t is not None and t.requires_grad]
    if not named or not out.requires_grad:
        return {}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, [t for _, t in named], g.to(out.dtype), allow_unused=True)
    return {f"grad_{k}": v for (k, _), v in zip(named, grads)}


def _cast(t, dtype):
    """Same values, same layout preserved where possible, as a fresh leaf in `dtype`."""
    if t is None:
        return None
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


# --------------------------------------------------------------------------- fused_concat_linear


@st.composite
def tensor_spec(draw, scale=None, inject=True):
    return {
        "layout": draw(st.sampled_from(LAYOUTS)),
        "scale": draw(scales) if scale is None else scale,
        "inject": draw(specials()) if inject else [],
        "grad": draw(st.booleans()) or draw(st.booleans()),
    }


@st.composite
def fcl_cases(draw):
    nseg = draw(st.integers(1, 4) | st.integers(5, 24))
    widths = draw(st.lists(small_size, min_size=nseg, max_size=nseg))
    k = sum(widths)
    case = {
        "dtype": draw(dtypes),
        "lead": draw(st.lists(small_size, max_size=3)),
        "widths": widths,
        "n": draw(small_size),
        "activation": draw(st.sampled_from(list(reference.ACTIVATIONS))),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "inputs": [draw(tensor_spec()) for _ in widths],
        # The weight keeps unit-ish scale so that products stay far from overflow and underflow.
        "weight": draw(tensor_spec(scale=1.0 / max(k, 1) ** 0.5)),
        "bias": draw(st.none() | tensor_spec(scale=1.0)),
    }
    return case


def fcl_tensors(case, dtype):
    s = case["seed"]
    xs = [
        make_tensor((*case["lead"], d), dtype, layout=t["layout"], scale=t["scale"], inject=t["inject"],
                    seed=s + 10 * i, requires_grad=t["grad"])
        for i, (d, t) in enumerate(zip(case["widths"], case["inputs"]))
    ]
    w_spec, b_spec = case["weight"], case["bias"]
    w = make_tensor((case["n"], sum(case["widths"])), dtype, layout=w_spec["layout"], scale=w_spec["scale"],
                    inject=w_spec["inject"], seed=s + 7, requires_grad=w_spec["grad"])
    b = None
    if b_spec is not None:
        b = make_tensor((case["n"],), dtype, layout=b_spec["layout"], scale=b_spec["scale"], inject=b_spec["inject"],
                        seed=s + 5, requires_grad=b_spec["grad"])
    return xs, w, b


def fcl_run(case, impl, dtype):
    xs, w, b = fcl_tensors(case, case["dtype"])
    if impl == "reference":
        xs, w, b = [_cast(x, dtype) for x in xs], _cast(w, dtype), _cast(b, dtype)
        out = reference.fused_concat_linear(xs, w, b, case["activation"])
    else:
        out = mmkernels.fused_concat_linear(xs, w, b, case["activation"])
    named = [(f"inputs[{i}]", x) for i, x in enumerate(xs)] + [("weight", w), ("bias", b)]
    return {"out": out, **_grads(out, named, case["seed"])}


def fcl_forward_only(case):
    # bfloat16 + relu: where the pre-activation rounds across 0, relu's mask (so the gradient)
    # legitimately differs from float64's. Documented in the README.
    return case["dtype"] == torch.bfloat16 and case["activation"] == "relu"


# --------------------------------------------------------------------------- FusedConcatLinear


@st.composite
def fcl_module_cases(draw):
    widths = draw(st.lists(positive_size, min_size=1, max_size=6))
    return {
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
        "lead": draw(st.lists(small_size, max_size=2)),
        "widths": widths,
        "n": draw(positive_size),
        "bias": draw(st.booleans()),
        "activation": draw(st.sampled_from(list(reference.ACTIVATIONS))),
        "call": draw(st.sampled_from(["args", "list", "tuple", "dict"])),
        "layouts": [draw(st.sampled_from(LAYOUTS)) for _ in widths],
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def fcl_module_run(case, impl, dtype):
    torch.manual_seed(case["seed"])
    fused = FusedConcatLinear(case["widths"], case["n"], bias=case["bias"], activation=case["activation"],
                              dtype=case["dtype"])
    xs = [make_tensor((*case["lead"], d), case["dtype"], layout=lay, seed=case["seed"] + i, requires_grad=True)
          for i, (d, lay) in enumerate(zip(case["widths"], case["layouts"]))]
    if impl == "reference":
        # The module it replaces: nn.Linear over torch.cat, loaded from our state_dict.
        linear = nn.Linear(sum(case["widths"]), case["n"], bias=case["bias"], dtype=dtype)
        linear.load_state_dict(fused.state_dict())
        xs = [_cast(x, dtype) for x in xs]
        out = reference.ACTIVATIONS[case["activation"]](linear(torch.cat(xs, -1)))
        params = dict(linear.named_parameters())
    else:
        call = case["call"]
        if call == "args":
            out = fused(*xs)
        elif call == "list":
            out = fused(list(xs))
        elif call == "tuple":
            out = fused(tuple(xs))
        else:  # sorted key order: zero-padded names sort like the positions
            out = fused({f"m{i:02d}": x for i, x in reversed(list(enumerate(xs)))})
        params = dict(fused.named_parameters())
    named = [(f"inputs[{i}]", x) for i, x in enumerate(xs)] + sorted(params.items())
    return {"out": out, **_grads(out, named, case["seed"])}


SPECS = [
    FuzzSpec("fused_concat_linear", fcl_cases(), fcl_run, fcl_forward_only),
    FuzzSpec("nn.FusedConcatLinear", fcl_module_cases(), fcl_module_run),
]


# --------------------------------------------------------------------------- cross_modal_attention


@st.composite
def attention_cases(draw):
    b, h = draw(st.sampled_from([0, 1, 1, 2, 3])), draw(st.sampled_from([1, 1, 2, 3]))
    lq, lk = draw(small_size), draw(small_size)
    e, ev = draw(positive_size), draw(positive_size)
    full = (b, h, lq, lk)
    mask = None
    kind = draw(st.sampled_from(["none", "bool", "float", "float-inf"]))
    if kind != "none":
        # A broadcastable shape: rank 2..4, each kept dim either full or 1.
        rank = draw(st.integers(2, 4))
        shape = [s if draw(st.booleans()) else 1 for s in full[4 - rank:]]
        mask = {"kind": kind, "shape": shape, "density": draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))}
    kpm = draw(st.none() | st.sampled_from([0.0, 0.3, 1.0]))
    lengths = draw(st.none() | st.sampled_from(["int32", "int64"]))
    # NaN/Inf only where every key is visible: masked-out keys are never read by the kernel, while
    # the reference multiplies them by a zero probability (0 * NaN = NaN). See the README.
    inject = mask is None and kpm is None and lengths is None
    return {
        "dtype": draw(dtypes),
        "shape": [b, h, lq, lk, e, ev],
        "seed": draw(st.integers(0, 2**31 - 1)),
        # Large q scales make large logits (softmax stability); tiny ones nearly uniform attention.
        "q": draw(tensor_spec(scale=draw(st.sampled_from([1.0, 1.0, 1e-3, 30.0, 1e3])), inject=inject)),
        "k": draw(tensor_spec(scale=1.0, inject=inject)),
        "v": draw(tensor_spec(inject=inject)),
        "key_padding_mask": kpm,
        "kv_lengths": lengths,
        "attn_mask": mask,
        "scale": draw(st.none() | st.sampled_from([0.0, 1e-3, 0.5, 10.0])),
        "dropout_p": draw(st.sampled_from([0.0, 0.0, 0.0, 1.0])),
    }


def attention_tensors(case, dtype):
    b, h, lq, lk, e, ev = case["shape"]
    s = case["seed"]
    g = torch.Generator().manual_seed(s + 3)

    def tensor(name, shape, offset):
        t = case[name]
        return make_tensor(shape, dtype, layout=t["layout"], scale=t["scale"], inject=t["inject"], seed=s + offset,
                           requires_grad=t["grad"])

    q, k, v = tensor("q", (b, h, lq, e), 1), tensor("k", (b, h, lk, e), 2), tensor("v", (b, h, lk, ev), 4)
    kpm = None
    if case["key_padding_mask"] is not None:
        kpm = torch.rand(b, lk, generator=g) < case["key_padding_mask"]
    lengths = None
    if case["kv_lengths"] is not None:
        lengths = torch.randint(0, lk + 1, (b,), generator=g, dtype=getattr(torch, case["kv_lengths"]))
    mask = None
    m = case["attn_mask"]
    if m is not None:
        hidden = torch.rand(m["shape"], generator=g) < m["density"]
        if m["kind"] == "bool":
            mask = ~hidden  # True = may attend
        else:
            mask = torch.randn(m["shape"], generator=g, dtype=torch.float64) * 3
            if m["kind"] == "float-inf":
                mask = mask.masked_fill(hidden, float("-inf"))
            mask = mask.to(dtype)
    return q, k, v, kpm, lengths, mask


def attention_run(case, impl, dtype):
    q, k, v, kpm, lengths, mask = attention_tensors(case, case["dtype"])
    kwargs = {"key_padding_mask": kpm, "kv_lengths": lengths, "scale": case["scale"], "dropout_p": case["dropout_p"]}
    if impl == "reference":
        q, k, v = _cast(q, dtype), _cast(k, dtype), _cast(v, dtype)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(dtype)
        if case["dropout_p"] == 1.0:  # everything dropped: the reference's explicit keep-mask of zeros
            kwargs["dropout_mask"] = torch.zeros((), dtype=torch.bool)
        out = reference.cross_modal_attention(q, k, v, attn_mask=mask, **kwargs)
    else:
        out = mmkernels.cross_modal_attention(q, k, v, attn_mask=mask, **kwargs)
    return {"out": out, **_grads(out, [("q", q), ("k", k), ("v", v)], case["seed"])}


SPECS.append(FuzzSpec("cross_modal_attention", attention_cases(), attention_run))
