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
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

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
    # bfloat16/float16 + relu: where the pre-activation rounds across 0, relu's mask (so the gradient)
    # legitimately differs from float64's. Documented in the README.
    return case["dtype"] in (torch.bfloat16, torch.float16) and case["activation"] == "relu"


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
    # A rate of hidden keys, or "ends": each batch padded at its ends only (key ranges, no per-key bias).
    kpm = draw(st.none() | st.sampled_from([0.0, 0.3, 1.0, "ends"]))
    lengths = draw(st.none() | st.sampled_from(["int32", "int64"]))
    # The causal flag: 0 none, 1 upper-left (is_causal), 2 lower-right (a CausalBias, or is_causal
    # where attn_mask holds a tensor mask); kv heads: all of q's, or one (grouped-query attention).
    causal = draw(st.sampled_from([0, 0, 1, 2]))
    h_kv = draw(st.sampled_from([h, 1]))
    # NaN/Inf only where every key is visible: masked-out keys are never read by the kernel, while
    # the reference multiplies them by a zero probability (0 * NaN = NaN). See the README.
    inject = mask is None and kpm is None and lengths is None and causal == 0
    return {
        "dtype": draw(dtypes),
        "shape": [b, h, lq, lk, e, ev],
        "h_kv": h_kv,
        "causal": causal,
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

    hk = case.get("h_kv", h)
    q, k, v = tensor("q", (b, h, lq, e), 1), tensor("k", (b, hk, lk, e), 2), tensor("v", (b, hk, lk, ev), 4)
    kpm = None
    if case["key_padding_mask"] == "ends":
        lo = torch.randint(0, lk + 1, (b, 1), generator=g)
        hi = lo + (torch.rand(b, 1, generator=g) * (lk + 1 - lo)).long()
        kpm = (torch.arange(lk) < lo) | (torch.arange(lk) >= hi)
    elif case["key_padding_mask"] is not None:
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
    kwargs = {"key_padding_mask": kpm, "kv_lengths": lengths, "scale": case["scale"], "dropout_p": case["dropout_p"],
              "enable_gqa": True}
    causal = case.get("causal", 0)
    if causal == 1 or (causal == 2 and mask is not None):
        kwargs["is_causal"] = True
    elif causal == 2:
        mask = causal_lower_right(q.shape[2], k.shape[2])
    if impl == "reference":
        q, k, v = _cast(q, dtype), _cast(k, dtype), _cast(v, dtype)
        if isinstance(mask, torch.Tensor) and not isinstance(mask, CausalBias) and mask.dtype != torch.bool:
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


# --------------------------------------------------------------------------- fusion-layer modules
#
# Each module is built in the case's dtype from a seed, every parameter perturbed (so zero-initialised
# biases and Flamingo's zero gates are exercised too), and compared, in output and in the gradient of
# every input and parameter, with the functional reference in mmkernels/reference.py evaluated on
# float64 copies of the same inputs and parameters.

module_dtypes = st.sampled_from([torch.float64, torch.float64, torch.float32])
module_scales = st.sampled_from([1.0, 1.0, 1e-3, 10.0])


@st.composite
def module_input(draw):
    """A finite module input (NaN/Inf are the ops' cases); layout and magnitude vary."""
    return {"layout": draw(st.sampled_from(LAYOUTS)), "scale": draw(module_scales), "inject": [],
            "grad": draw(st.booleans()) or draw(st.booleans())}


def _input(spec, shape, dtype, seed):
    return make_tensor(shape, dtype, layout=spec["layout"], scale=spec["scale"], seed=seed,
                       requires_grad=spec["grad"])


def _build(factory, case):
    """factory() under the case's seed, every parameter then perturbed by N(0, 0.3^2)."""
    torch.manual_seed(case["seed"])
    module = factory()
    g = torch.Generator().manual_seed(case["seed"] + 11)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.3)
    return module


def _module_params(module, impl, dtype):
    """The module's parameters by name: its own (ours), or fresh float64 leaves (reference)."""
    named = dict(sorted(module.named_parameters()))
    return named if impl == "ours" else {k: _cast(p, dtype) for k, p in named.items()}


def _call_inputs(module_call, xs, names=None):
    """forward(*xs), forward(list), forward(tuple) or forward(dict) (keys in xs's order when sorted)."""
    if module_call == "args":
        return tuple(xs)
    if module_call == "list":
        return (list(xs),)
    if module_call == "tuple":
        return (tuple(xs),)
    keys = names or [f"m{i:02d}" for i in range(len(xs))]
    return ({k: x for k, x in reversed(list(zip(keys, xs)))},)


def _module_result(out, xs, params, seed, input_names=None):
    input_names = input_names or [f"inputs[{i}]" for i in range(len(xs))]
    named = list(zip(input_names, xs)) + [(f"param:{k}", p) for k, p in params.items()]
    return {"out": out, **_grads(out, named, seed)}


@st.composite
def multi_input_cases(draw, min_inputs=1, max_inputs=4):
    widths = draw(st.lists(positive_size, min_size=min_inputs, max_size=max_inputs))
    return {
        "dtype": draw(module_dtypes),
        "lead": draw(st.lists(small_size, max_size=2)),
        "widths": widths,
        "n": draw(positive_size),
        "bias": draw(st.booleans()),
        "named": draw(st.booleans()),  # built from {name: size}: a dict call must use those names
        "call": draw(st.sampled_from(["args", "list", "tuple", "dict"])),
        "inputs": [draw(module_input()) for _ in widths],
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _features(case):
    names = [f"mod{i}" for i in range(len(case["widths"]))]  # sorted order = position order
    return (dict(zip(names, case["widths"])) if case["named"] else list(case["widths"])), names


def _module_inputs(case, dtype_of_case):
    return [_input(t, (*case["lead"], d), dtype_of_case, case["seed"] + 10 * i)
            for i, (d, t) in enumerate(zip(case["widths"], case["inputs"]))]


def _run_multi(case, impl, dtype, factory, reference_fn):
    from mmkernels.nn import fusion  # noqa: F401  (the modules under test)

    module = _build(lambda: factory(case), case)
    xs = _module_inputs(case, case["dtype"])
    params = _module_params(module, impl, dtype)
    if impl == "reference":
        xs = [_cast(x, dtype) for x in xs]
        out = reference_fn(case, xs, params)
    else:
        _, names = _features(case)
        out = module(*_call_inputs(case["call"], xs, names if case["named"] else None))
    return _module_result(out, xs, params, case["seed"])


@st.composite
def concat_fusion_cases(draw):
    case = draw(multi_input_cases())
    case["project"] = draw(st.booleans()) or draw(st.booleans())
    case["activation"] = draw(st.sampled_from(list(reference.ACTIVATIONS))) if case["project"] else "none"
    return case


def concat_fusion_run(case, impl, dtype):
    from mmkernels.nn import ConcatFusion

    def factory(c):
        return ConcatFusion(_features(c)[0], c["n"] if c["project"] else None, activation=c["activation"],
                            bias=c["bias"], dtype=c["dtype"])

    def ref(c, xs, p):
        if not c["project"]:
            return torch.cat(xs, -1)
        return reference.fused_concat_linear(xs, p["proj.weight"], p.get("proj.bias"), c["activation"])

    return _run_multi(case, impl, dtype, factory, ref)


def gmu_run(case, impl, dtype):
    from mmkernels.nn import GatedMultimodalUnit

    def factory(c):
        return GatedMultimodalUnit(_features(c)[0], c["n"], bias=c["bias"], dtype=c["dtype"])

    def ref(c, xs, p):
        k = len(xs)
        return reference.gated_multimodal_unit(
            xs, [p[f"projections.{i}.weight"] for i in range(k)], [p.get(f"projections.{i}.bias") for i in range(k)],
            p["gate.weight"], p.get("gate.bias"))

    return _run_multi(case, impl, dtype, factory, ref)


@st.composite
def lrf_module_cases(draw):
    case = draw(multi_input_cases())
    case["rank"] = draw(st.sampled_from([1, 2, 3, 8]))
    return case


def lrf_module_run(case, impl, dtype):
    from mmkernels.nn import LowRankFusion

    def factory(c):
        return LowRankFusion(_features(c)[0], c["n"], c["rank"], bias=c["bias"], dtype=c["dtype"])

    def ref(c, xs, p):
        return reference.low_rank_fusion(xs, [p[f"factors.{i}"] for i in range(len(xs))], p["rank_weight"],
                                         p.get("bias"))

    return _run_multi(case, impl, dtype, factory, ref)


@st.composite
def film_cases(draw):
    batch = draw(st.lists(small_size, max_size=2))
    extra = draw(st.lists(positive_size, max_size=2))  # sequence / spatial dims gamma broadcasts over
    rank = len(batch) + len(extra) + 1
    widths = draw(st.lists(positive_size, min_size=1, max_size=3))
    return {
        "dtype": draw(module_dtypes),
        "batch": batch,
        "extra": extra,
        "features": draw(positive_size),
        "dim": draw(st.integers(-rank, rank - 1)),
        "widths": widths,
        "cond_form": draw(st.sampled_from(["int", "list", "dict"])) if len(widths) == 1
        else draw(st.sampled_from(["list", "dict"])),
        "bias": draw(st.booleans()),
        "x": draw(module_input()),
        "inputs": [draw(module_input()) for _ in widths],
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def film_run(case, impl, dtype):
    from mmkernels.nn import FiLM

    widths, names = case["widths"], [f"c{i}" for i in range(len(case["widths"]))]
    cond_features = {"int": lambda: widths[0], "list": lambda: list(widths),
                     "dict": lambda: dict(zip(names, widths))}[case["cond_form"]]()
    module = _build(lambda: FiLM(case["features"], cond_features, dim=case["dim"], bias=case["bias"],
                                 dtype=case["dtype"]), case)
    shape = [*case["batch"], *case["extra"], case["features"]]
    # The feature axis goes to `dim`: the values are built feature-last, then moved (a permuted view).
    x = _input(case["x"], shape, case["dtype"], case["seed"] + 1)
    x = x.detach().movedim(-1, case["dim"]).requires_grad_(x.requires_grad)
    conds = [_input(t, (*case["batch"], d), case["dtype"], case["seed"] + 10 * (i + 1))
             for i, (d, t) in enumerate(zip(widths, case["inputs"]))]
    params = _module_params(module, impl, dtype)
    if impl == "reference":
        x, conds = _cast(x, dtype), [_cast(c, dtype) for c in conds]
        out = reference.film(x, torch.cat(conds, -1), params["proj.weight"], params.get("proj.bias"), dim=case["dim"])
    else:
        cond = {"int": lambda: conds[0], "list": lambda: list(conds),
                "dict": lambda: {k: c for k, c in reversed(list(zip(names, conds)))}}[case["cond_form"]]()
        out = module(x, cond)
    return _module_result(out, [x, *conds], params, case["seed"],
                          ["x", *[f"cond[{i}]" for i in range(len(conds))]])


SPECS += [
    FuzzSpec("nn.ConcatFusion", concat_fusion_cases(), concat_fusion_run),
    FuzzSpec("nn.GatedMultimodalUnit", multi_input_cases(min_inputs=2), gmu_run),
    FuzzSpec("nn.LowRankFusion", lrf_module_cases(), lrf_module_run),
    FuzzSpec("nn.FiLM", film_cases(), film_run),
]


# --------------------------------------------------------------------------- attention fusion layers


def _mha_projections(p, prefix, e):
    """(wq, wk, wv, bq, bk, bv) of an nn.MultiheadAttention-style parameter dict."""
    if f"{prefix}in_proj_weight" in p:
        wq, wk, wv = p[f"{prefix}in_proj_weight"].split(e)
    else:
        wq, wk, wv = (p[f"{prefix}{n}_proj_weight"] for n in "qkv")
    b = p.get(f"{prefix}in_proj_bias")
    bq, bk, bv = b.split(e) if b is not None else (None, None, None)
    return wq, wk, wv, bq, bk, bv


@st.composite
def gca_cases(draw):
    heads = draw(st.sampled_from([1, 2, 3]))
    return {
        "dtype": draw(module_dtypes),
        "heads": heads,
        "head_dim": draw(st.sampled_from([1, 2, 5, 8])),
        "media_dim": draw(st.none() | positive_size),
        "ff_mult": draw(st.sampled_from([1, 2])),
        "bias": draw(st.booleans()),
        "batch": draw(st.sampled_from([0, 1, 2, 3])),
        "length": draw(small_size),
        "media_length": draw(small_size),
        # Padding density 1.0 pads a sample's media completely: its rows see no key (zeros).
        "padding": draw(st.none() | st.sampled_from([0.0, 0.3, 1.0])),
        "x": draw(module_input()),
        "media": draw(module_input()),
        "train": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def gca_run(case, impl, dtype):
    from mmkernels.nn import GatedCrossAttention

    d = case["heads"] * case["head_dim"]
    module = _build(lambda: GatedCrossAttention(d, case["heads"], media_dim=case["media_dim"], ff_mult=case["ff_mult"],
                                                bias=case["bias"], dtype=case["dtype"]), case)
    module.train(case["train"])  # dropout 0: the same either way
    b, length, mlen = case["batch"], case["length"], case["media_length"]
    md = case["media_dim"] or d
    x = _input(case["x"], (b, length, d), case["dtype"], case["seed"] + 1)
    media = _input(case["media"], (b, mlen, md), case["dtype"], case["seed"] + 2)
    mask = None
    if case["padding"] is not None:
        mask = torch.rand(b, mlen, generator=torch.Generator().manual_seed(case["seed"] + 3)) < case["padding"]
    params = _module_params(module, impl, dtype)
    if impl == "reference":
        x, media = _cast(x, dtype), _cast(media, dtype)
        p, h, e = params, case["heads"], case["head_dim"]
        wq, wk, wv, bq, bk, bv = _mha_projections(p, "attn.", d)
        ln = torch.nn.functional.layer_norm(x, (d,), p["attn_norm.weight"], p["attn_norm.bias"])

        def heads(t):
            return t.unflatten(-1, (h, e)).transpose(1, 2)

        q = heads(torch.nn.functional.linear(ln, wq, bq))
        k = heads(torch.nn.functional.linear(media, wk, bk))
        v = heads(torch.nn.functional.linear(media, wv, bv))
        o = reference.cross_modal_attention(q, k, v, key_padding_mask=mask).transpose(1, 2).reshape(b, length, d)
        a = torch.nn.functional.linear(o, p["attn.out_proj.weight"], p.get("attn.out_proj.bias"))
        y = x + torch.tanh(p["attn_gate"]) * a
        f = torch.nn.functional.layer_norm(y, (d,), p["ff_norm.weight"], p["ff_norm.bias"])
        f = torch.nn.functional.linear(torch.nn.functional.gelu(
            torch.nn.functional.linear(f, p["ff_in.weight"], p.get("ff_in.bias"))), p["ff_out.weight"],
            p.get("ff_out.bias"))
        out = y + torch.tanh(p["ff_gate"]) * f
    else:
        out = module(x, media, mask)
    return _module_result(out, [x, media], params, case["seed"], ["x", "media"])


@st.composite
def mga_cases(draw):
    heads = draw(st.sampled_from([1, 2, 3]))
    return {
        "dtype": draw(module_dtypes),
        "heads": heads,
        "head_dim": draw(st.sampled_from([1, 2, 5, 8])),
        "modalities": draw(st.sampled_from([1, 2, 3, 5])),
        "bias": draw(st.booleans()),
        "batch": draw(st.sampled_from([0, 1, 2, 3])),
        # Where the graph comes from, and how dense it is (0.0: no modality sees any other).
        "adjacency": draw(st.sampled_from(["default", "built", "call-2d", "call-3d"])),
        "density": draw(st.sampled_from([0.0, 0.5, 0.8, 1.0])),
        "call": draw(st.sampled_from(["tensor", "list", "dict"])),
        "x": draw(module_input()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def mga_run(case, impl, dtype):
    from mmkernels.nn import ModalityGraphAttention

    d, h, m, b = case["heads"] * case["head_dim"], case["heads"], case["modalities"], case["batch"]
    g = torch.Generator().manual_seed(case["seed"] + 3)
    kind = case["adjacency"]
    adj = None
    if kind != "default":
        adj = torch.rand((b, m, m) if kind == "call-3d" else (m, m), generator=g) < case["density"]
    module = _build(lambda: ModalityGraphAttention(d, h, m, adjacency=adj if kind == "built" else None,
                                                   bias=case["bias"], dtype=case["dtype"]), case)
    x = _input(case["x"], (b, m, d), case["dtype"], case["seed"] + 1)
    params = _module_params(module, impl, dtype)
    if impl == "reference":
        x = _cast(x, dtype)
        p = params
        graph = torch.ones(m, m, dtype=torch.bool) if adj is None else adj
        mask = graph if graph.dim() == 2 else graph[:, None]
        qkv = torch.nn.functional.linear(x, p["qkv.weight"], p.get("qkv.bias"))
        q, k, v = qkv.unflatten(-1, (3, h, d // h)).permute(2, 0, 3, 1, 4)
        o = reference.cross_modal_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, m, d)
        out = torch.nn.functional.linear(o, p["out_proj.weight"], p.get("out_proj.bias"))
    else:
        arg = {"tensor": lambda: x, "list": lambda: list(x.unbind(1)),
               "dict": lambda: {f"m{i}": t for i, t in reversed(list(enumerate(x.unbind(1))))}}[case["call"]]()
        out = module(arg, adjacency=adj if kind.startswith("call") else None)
    return _module_result(out, [x], params, case["seed"], ["x"])


def _up(spec):
    return max(1.0, spec["scale"])


# As attention_magnitude: a gradient through attention that is 0 in exact arithmetic (identical,
# stride-0 keys; a single visible key) computes as rounding residues of size |dO| |q| |k| |v|, so
# the absolute floor is the scale of those terms (q, k, v are the projections of the inputs whose
# scale is named), never the smallest scale of an unrelated input.
def gca_magnitude(case):
    return _up(case["media"]) ** 2  # q comes through a LayerNorm; k and v from media


def mga_magnitude(case):
    return _up(case["x"]) ** 3  # q, k and v from x


SPECS += [
    FuzzSpec("nn.GatedCrossAttention", gca_cases(), gca_run, magnitude=gca_magnitude),
    FuzzSpec("nn.ModalityGraphAttention", mga_cases(), mga_run, magnitude=mga_magnitude),
]


# --------------------------------------------------------------------------- mmkernels.convert
#
# A small random model in the case's dtype with the patterns convert() rewrites: linear(cat(...)) in
# the spellings it matches (nn.Linear, F.linear, with an activation module/function/method after it
# or none), nn.MultiheadAttention as cross-attention (kdim/vdim, batch_first, padding, [0] or
# need_weights=False) and optionally inside an nn.TransformerEncoderLayer / DecoderLayer. The
# converted copy is compared with the original model evaluated in float64 on the same inputs, in
# output and in the gradient of every input and parameter (same names: state_dict keys are kept).
#
# In float64 only: a rewritten model must compute the same function, which float64 decides. In
# float32 a deep model's backward amplifies its forward rounding differently for every evaluation
# order, so no bound on one evaluation's error holds: with every op of ours within PyTorch's own
# float32 error (each is fuzzed in float32/bfloat16 in its own entry above), a post-norm encoder
# layer behind a cross-attention on scale-10 media gave input gradients 15x further from float64
# than PyTorch's own float32 evaluation (long profile, seed 4); rewriting only its linear(cat),
# which changes nothing but the order of one linear's segment sums, already gave 13x.

_CONVERT_ACTIVATIONS = ["none", "nn.ReLU", "nn.GELU", "nn.GELU-tanh", "nn.SiLU", "nn.Tanh", "nn.Sigmoid",
                        "F.relu", "F.gelu", "torch.tanh", "torch.sigmoid", ".relu()", ".sigmoid()"]


class _ConvertModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, self.c = c["heads"] * c["head_dim"], c
        self.encoders = nn.ModuleList(nn.Linear(w, w + 1) for w in c["widths"])
        k = sum(w + 1 for w in c["widths"])
        if c["spelling"] == "F.linear":
            self.fuse_w = nn.Parameter(torch.randn(d, k) / k ** 0.5)
            self.fuse_b = nn.Parameter(torch.randn(d)) if c["bias"] else None
        else:
            self.fuse = nn.Linear(k, d, bias=c["bias"])
        act = c["activation"]
        self.act = {"nn.ReLU": nn.ReLU, "nn.GELU": nn.GELU, "nn.GELU-tanh": lambda: nn.GELU(approximate="tanh"),
                    "nn.SiLU": nn.SiLU, "nn.Tanh": nn.Tanh, "nn.Sigmoid": nn.Sigmoid}.get(act, lambda: None)()
        md = c["media_dim"] or d
        self.attn = nn.MultiheadAttention(d, c["heads"], kdim=md, vdim=md, bias=c["bias"],
                                          batch_first=c["batch_first"])
        self.layer = None
        if c["layer"] == "encoder":
            self.layer = nn.TransformerEncoderLayer(d, c["heads"], 2 * d, dropout=0.0, batch_first=c["batch_first"],
                                                    norm_first=c["norm_first"])
        elif c["layer"] == "decoder":
            self.layer = nn.TransformerDecoderLayer(d, c["heads"], 2 * d, dropout=0.0, batch_first=c["batch_first"],
                                                    norm_first=c["norm_first"])
        self.head = nn.Linear(d, 3)

    # Fixed arity (torch.fx cannot trace *args); the modalities past len(widths) are None.
    def forward(self, x0, x1, x2, x3, media, padding):
        hs = [enc(x) for enc, x in zip(self.encoders, (x0, x1, x2, x3))]
        cat = torch.cat(hs, -1)
        h = F.linear(cat, self.fuse_w, self.fuse_b) if self.c["spelling"] == "F.linear" else self.fuse(cat)
        act = self.c["activation"]
        if self.act is not None:
            h = self.act(h)
        elif act != "none":
            h = {"F.relu": F.relu, "F.gelu": F.gelu, "torch.tanh": torch.tanh, "torch.sigmoid": torch.sigmoid,
                 ".relu()": lambda t: t.relu(), ".sigmoid()": lambda t: t.sigmoid()}[act](h)
        if self.c["need_weights"] == "[0]":
            a = self.attn(h, media, media, key_padding_mask=padding)[0]
        else:
            a, _ = self.attn(h, media, media, key_padding_mask=padding, need_weights=False)
        h = h + a
        if self.c["layer"] == "encoder":
            h = self.layer(h)
        elif self.c["layer"] == "decoder":
            h = self.layer(h, media if self.c["media_dim"] is None else h, memory_key_padding_mask=
                           padding if self.c["media_dim"] is None else None)
        return self.head(h)


@st.composite
def convert_cases(draw):
    widths = draw(st.lists(positive_size, min_size=2, max_size=4))
    return {
        "dtype": torch.float64,  # see the note above
        "widths": widths,
        "heads": draw(st.sampled_from([1, 2, 4])),
        "head_dim": draw(st.sampled_from([1, 2, 4])),
        "media_dim": draw(st.none() | positive_size),
        "bias": draw(st.booleans()),
        "spelling": draw(st.sampled_from(["nn.Linear", "F.linear"])),
        "activation": draw(st.sampled_from(_CONVERT_ACTIVATIONS)),
        "batch_first": draw(st.booleans()),
        "need_weights": draw(st.sampled_from(["[0]", "False"])),
        "layer": draw(st.sampled_from([None, "encoder", "decoder"])),
        "norm_first": draw(st.booleans()),
        "train": draw(st.booleans()),
        "batch": draw(st.sampled_from([1, 2, 3])),
        "length": draw(positive_size),
        "media_length": draw(positive_size),
        # Padding never hides media position 0: nn.MultiheadAttention (the original) gives NaN for a
        # row that sees no key, where CrossModalAttention gives zeros by design (see the README).
        "padding": draw(st.booleans()),
        "inputs": [draw(module_input()) for _ in widths],
        "media": draw(module_input()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def convert_run(case, impl, dtype):
    if case["heads"] * case["head_dim"] == 1:
        # A LayerNorm over one feature (the transformer layers' norms with embed_dim 1) outputs
        # (x - mean) / sqrt(eps) = rounding residue * 316: its weight's true gradient is 0, and any
        # evaluation is pure amplified noise (no attention there to compare). Width 1 is still
        # fuzzed through the fusion and the attention, without the layer.
        case = {**case, "layer": None}
    original = _build(lambda: _ConvertModel(case).to(case["dtype"]), case).train(case["train"])
    b, length, mlen = case["batch"], case["length"], case["media_length"]
    md = case["media_dim"] or case["heads"] * case["head_dim"]

    def seq(spec, width, n, offset):
        shape = (b, n, width) if case["batch_first"] else (n, b, width)
        return _input(spec, shape, case["dtype"], case["seed"] + offset)

    xs = [seq(t, w, length, 10 * i) for i, (w, t) in enumerate(zip(case["widths"], case["inputs"]))]
    media = seq(case["media"], md, mlen, 5)
    padding = None
    if case["padding"]:
        padding = torch.rand(b, mlen, generator=torch.Generator().manual_seed(case["seed"] + 3)) < 0.4
        padding[:, 0] = False
    if impl == "reference":
        model = original.to(dtype)  # the original, unconverted model, in float64
        xs, media = [_cast(x, dtype) for x in xs], _cast(media, dtype)
    else:
        model = mmkernels.convert(original)
        replaced = [what for _, what in model.mmkernels_report.replaced]
        n_attn = 1 + (case["layer"] == "encoder") + 2 * (case["layer"] == "decoder")
        assert sum("-> CrossModalAttention" in w for w in replaced) == n_attn, str(model.mmkernels_report)
        assert sum("-> fused_concat_linear" in w for w in replaced) == 1, str(model.mmkernels_report)
        assert model.state_dict().keys() == original.state_dict().keys()
    params = dict(sorted(model.named_parameters()))
    out = model(*xs, *[None] * (4 - len(xs)), media, padding)
    return _module_result(out, [*xs, media], params, case["seed"],
                          [*[f"inputs[{i}]" for i in range(len(xs))], "media"])


def convert_magnitude(case):
    # q from the fused modalities, k and v from media (see gca_magnitude)
    return max(_up(t) for t in case["inputs"]) * _up(case["media"]) ** 2


SPECS.append(FuzzSpec("convert", convert_cases(), convert_run, magnitude=convert_magnitude))
