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

import math

from fuzz_support import LAYOUTS, case_magnitude, dtypes, make_tensor, positive_size, scales, small_size, specials


@dataclass(frozen=True)
class FuzzSpec:
    name: str
    cases: st.SearchStrategy  # draws a case dict with at least "dtype"
    run: Callable  # run(case, impl, dtype) -> dict[str, Tensor]
    # Results compared in forward only for these dtypes (e.g. relu's mask in bfloat16, see README).
    forward_only: Callable = lambda case: False
    # Floor of the absolute tolerance's scale (see fuzz_support.case_magnitude).
    magnitude: Callable = case_magnitude


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
    """inject: True (NaN and +-Inf), "nan" (NaN only) or False."""
    values = (math.nan,) if inject == "nan" else (math.nan, math.inf, -math.inf)
    return {
        "layout": draw(st.sampled_from(LAYOUTS)),
        "scale": draw(scales) if scale is None else scale,
        "inject": draw(specials(values=values)) if inject else [],
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


def attention_magnitude(case):
    # Backward cancels dP - D, both of size |dO| |v|, then multiplies by q or k: rounding residues of
    # that size are the honest absolute error of grad_q / grad_k (a single visible key has a true
    # gradient of 0 but computes as eps * |v| |q|).
    return math.prod(max(1.0, case[n]["scale"]) for n in ("q", "k", "v"))


SPECS.append(FuzzSpec("cross_modal_attention", attention_cases(), attention_run, magnitude=attention_magnitude))


# --------------------------------------------------------------------------- low_rank_fusion


@st.composite
def lrf_cases(draw):
    nmod = draw(st.integers(1, 4))
    widths = draw(st.lists(small_size, min_size=nmod, max_size=nmod))
    return {
        "dtype": draw(dtypes),
        "lead": draw(st.lists(small_size, max_size=2)),
        "widths": widths,
        "n": draw(small_size),
        "rank": draw(st.sampled_from([1, 1, 2, 3, 4, 8, 17])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        # Products of several projections: keep magnitudes moderate so the product stays in range.
        # NaN only: the kernel factors the rank weights out of sums, (a + b) * inf where the
        # reference has a * inf + b * inf, so an Inf may legitimately come out as NaN or the reverse.
        "inputs": [draw(tensor_spec(scale=draw(st.sampled_from([1.0, 1e-3, 10.0])), inject="nan")) for _ in widths],
        "factors": [draw(tensor_spec(scale=0.5, inject="nan")) for _ in widths],
        "rank_weight": draw(tensor_spec(scale=1.0, inject="nan")),
        "bias": draw(st.none() | tensor_spec(scale=1.0, inject="nan")),
    }


def lrf_run(case, impl, dtype):
    s, r, n = case["seed"], case["rank"], case["n"]

    def tensor(spec, shape, offset):
        return make_tensor(shape, case["dtype"], layout=spec["layout"], scale=spec["scale"], inject=spec["inject"],
                           seed=s + offset, requires_grad=spec["grad"])

    xs = [tensor(t, (*case["lead"], d), 10 * i) for i, (d, t) in enumerate(zip(case["widths"], case["inputs"]))]
    fs = [tensor(t, (r, d + 1, n), 10 * i + 1) for i, (d, t) in enumerate(zip(case["widths"], case["factors"]))]
    w = tensor(case["rank_weight"], (r,), 7)
    b = None if case["bias"] is None else tensor(case["bias"], (n,), 5)
    if impl == "reference":
        xs, fs, w, b = [_cast(x, dtype) for x in xs], [_cast(f, dtype) for f in fs], _cast(w, dtype), _cast(b, dtype)
        out = reference.low_rank_fusion(xs, fs, w, b)
    else:
        out = mmkernels.low_rank_fusion(xs, fs, w, b)
    named = ([(f"inputs[{i}]", x) for i, x in enumerate(xs)] + [(f"factors[{i}]", f) for i, f in enumerate(fs)]
             + [("rank_weight", w), ("bias", b)])
    return {"out": out, **_grads(out, named, s)}


SPECS.append(FuzzSpec("low_rank_fusion", lrf_cases(), lrf_run))


# --------------------------------------------------------------------------- nn.CrossModalAttention


@st.composite
def mha_cases(draw):
    heads = draw(st.sampled_from([1, 2, 3]))
    return {
        "dtype": draw(st.sampled_from([torch.float64, torch.float32])),
        "heads": heads,
        "head_dim": draw(st.sampled_from([1, 2, 5, 8])),
        "kdim": draw(st.none() | positive_size),
        "vdim": draw(st.none() | positive_size),
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "batch": draw(st.sampled_from([None, 1, 2, 3])),  # None: unbatched (L, E) inputs
        "lq": draw(positive_size),
        "lk": draw(positive_size),
        "kpm": draw(st.sampled_from([None, "bool", "float"])),
        "attn_mask": draw(st.sampled_from([None, "bool-2d", "float-2d", "bool-3d", "float-3d"])),
        "need_weights": draw(st.booleans()),
        "average": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def mha_run(case, impl, dtype):
    from mmkernels.nn import CrossModalAttention

    e = case["heads"] * case["head_dim"]
    kdim = case["kdim"] or e
    vdim = case["vdim"] or e
    cfg = {"embed_dim": e, "num_heads": case["heads"], "bias": case["bias"], "add_bias_kv": case["add_bias_kv"],
           "add_zero_attn": case["add_zero_attn"], "kdim": kdim, "vdim": vdim, "batch_first": case["batch_first"]}
    torch.manual_seed(case["seed"])
    ours = CrossModalAttention(**cfg, dtype=case["dtype"]).eval()
    g = torch.Generator().manual_seed(case["seed"] + 1)
    bsz, lq, lk = case["batch"], case["lq"], case["lk"]

    def seq(n, d):
        if bsz is None:
            shape = (n, d)
        else:
            shape = (bsz, n, d) if case["batch_first"] else (n, bsz, d)
        return torch.randn(shape, generator=g, dtype=case["dtype"]).requires_grad_()

    query, key, value = seq(lq, e), seq(lk, kdim), seq(lk, vdim)
    b = bsz or 1
    kw = {"need_weights": case["need_weights"], "average_attn_weights": case["average"]}
    # Masks never hide key 0, so every query row sees a key: nn.MultiheadAttention returns NaN for
    # rows that see none, where we return zeros by design (see the README).
    if case["kpm"] is not None:
        hide = torch.rand(b, lk, generator=g) < 0.4
        hide[:, 0] = False
        kpm = hide if case["kpm"] == "bool" else torch.zeros(b, lk, dtype=case["dtype"]).masked_fill(hide, -1e4)
        kw["key_padding_mask"] = kpm if bsz is not None else kpm[0]
    if case["attn_mask"] is not None:
        kind, rank = case["attn_mask"].split("-")
        shape = (lq, lk) if rank == "2d" else (b * case["heads"], lq, lk)
        if kind == "bool":
            m = torch.rand(shape, generator=g) < 0.4  # True = NOT allowed (MHA's convention)
            m[..., 0] = False
        else:
            m = torch.randn(shape, generator=g, dtype=case["dtype"])
        if rank == "3d" and bsz is None:
            m = m[: case["heads"]]
        kw["attn_mask"] = m

    if impl == "reference":
        module = nn.MultiheadAttention(**cfg, dtype=dtype).eval()
        module.load_state_dict(ours.state_dict())
        query, key, value = _cast(query, dtype), _cast(key, dtype), _cast(value, dtype)
        kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    else:
        module = ours
    out, weights = module(query, key, value, **kw)
    result = {"out": out}
    if weights is not None:
        result["weights"] = weights.detach()
    named = [("query", query), ("key", key), ("value", value)] + sorted(module.named_parameters())
    result.update(_grads(out, named, case["seed"]))
    return result


SPECS.append(FuzzSpec("nn.CrossModalAttention", mha_cases(), mha_run))
