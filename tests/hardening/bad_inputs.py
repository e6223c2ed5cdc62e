"""The bad-input matrix: every class of invalid argument for every public function, raw op and module.

Each case is a function that builds otherwise valid inputs, breaks exactly one thing, and makes the
call. It must raise ValueError or RuntimeError (TypeError too, where marked: a non-tensor passed for a
tensor) whose message matches `names` (the argument's name). A module (`nn.*`) must raise
mmkernels.ArgumentError, a ValueError that is also an AssertionError, as nn.MultiheadAttention raises
AssertionError for malformed shapes. Each group also has a `valid` control
case, which must NOT raise, so a mutation cannot pass by accident of a broken baseline.

Cases run in a subprocess (bad_input_runner.py, driven by test_bad_inputs.py), so a crash or a hang
fails that case instead of killing the test run.

Adding an op: write a `<op>_args()` that returns valid arguments, then a list of (id, names, mutate)
rows and register them with `_register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.attention.bias  # CausalBias cases (mmkernels imports it lazily)

import mmkernels
from mmkernels import ArgumentError
from mmkernels.nn import FusedConcatLinear


@dataclass(frozen=True)
class BadCase:
    call: Callable[[], object]
    names: str | None  # regex the message must match; None: a control case that must succeed
    raises: tuple = (ValueError, RuntimeError)


CASES: dict[str, BadCase] = {}
TYPE_OK = (ValueError, RuntimeError, TypeError)


def _register(prefix, rows, invoke, base):
    """rows: (id, names, mutate[, raises]); mutate(args: dict) edits a fresh copy of base()."""
    CASES[f"{prefix}/valid"] = BadCase(lambda: invoke(base()), None)
    for row in rows:
        case_id, names, mutate = row[:3]
        default = (ArgumentError,) if prefix.startswith("nn.") else (ValueError, RuntimeError)
        raises = row[3] if len(row) > 3 else default

        def call(mutate=mutate):
            args = base()
            mutate(args)
            return invoke(args)

        key = f"{prefix}/{case_id}"
        assert key not in CASES, key
        CASES[key] = BadCase(call, names, raises)


def _set(**kw):
    return lambda a: a.update(kw)


# --------------------------------------------------------------------------- fused_concat_linear


def fcl_args():
    return {"inputs": [torch.randn(4, 3), torch.randn(4, 2)], "weight": torch.randn(5, 5), "bias": torch.randn(5),
            "activation": "relu"}


def _inputs(fn):
    def mutate(a):
        a["inputs"] = fn(a["inputs"])
    return mutate


FCL_ROWS = [
    ("inputs-empty", "inputs", _set(inputs=[])),
    ("inputs-0d", r"inputs\[1\]", _inputs(lambda xs: [xs[0], torch.tensor(1.0)])),
    ("inputs-lead-dims", r"inputs\[1\]", _inputs(lambda xs: [xs[0], xs[1][:3]])),
    ("inputs-rank", r"inputs\[1\]", _inputs(lambda xs: [xs[0], xs[1].expand(2, 4, 2)])),
    ("inputs-dtype", r"inputs\[1\]", _inputs(lambda xs: [xs[0], xs[1].double()])),
    ("inputs-device", r"inputs\[0\]", _inputs(lambda xs: [xs[0].to("meta"), xs[1]])),
    ("inputs-not-tensor", r"inputs", _inputs(lambda xs: [xs[0], [1.0, 2.0]]), TYPE_OK),
    ("weight-1d", "weight", lambda a: a.update(weight=a["weight"][0])),
    ("weight-3d", "weight", lambda a: a.update(weight=a["weight"][None])),
    ("weight-columns", "weight", lambda a: a.update(weight=torch.randn(5, 6))),
    ("weight-dtype", r"weight|inputs\[0\]", lambda a: a.update(weight=a["weight"].double())),
    ("weight-device", r"weight|inputs\[0\]", lambda a: a.update(weight=a["weight"].to("meta"))),
    ("weight-not-tensor", "weight", _set(weight=[[1.0] * 5] * 5), TYPE_OK),
    ("integer-dtype", "weight|inputs",
     lambda a: a.update(inputs=[x.long() for x in a["inputs"]], weight=a["weight"].long(), bias=a["bias"].long())),
    ("complex-dtype", "weight|inputs",
     lambda a: a.update(inputs=[x.cfloat() for x in a["inputs"]], weight=a["weight"].cfloat(), bias=a["bias"].cfloat())),
    ("bias-length", "bias", lambda a: a.update(bias=a["bias"][:4])),
    ("bias-2d", "bias", lambda a: a.update(bias=a["bias"][None])),
    ("bias-dtype", "bias", lambda a: a.update(bias=a["bias"].double())),
    ("bias-device", "bias", lambda a: a.update(bias=a["bias"].to("meta"))),
    ("bias-not-tensor", "bias", _set(bias=1.0), TYPE_OK),
    ("activation-unknown", "activation", _set(activation="swish")),
    ("activation-case", "activation", _set(activation="ReLU")),
    ("activation-none-object", "activation", _set(activation=None), TYPE_OK),
]


def _fcl_functional(a):
    return mmkernels.fused_concat_linear(a["inputs"], a["weight"], a["bias"], a["activation"])


def _fcl_raw(a):
    return torch.ops.mmkernels.fused_concat_linear(a["inputs"], a["weight"], a["bias"], a["activation"])


_register("fused_concat_linear", FCL_ROWS, _fcl_functional, fcl_args)
# The raw op checks its arguments itself (TORCH_CHECK): the same matrix, with RuntimeError expected.
_register("ops.fused_concat_linear", FCL_ROWS, _fcl_raw, fcl_args)


def fcl_backward_args():
    xs, w = [torch.randn(4, 3), torch.randn(4, 2)], torch.randn(5, 5)
    out, pre = torch.ops.mmkernels.fused_concat_linear(xs, w, None, "gelu")
    return {"grad_out": torch.randn_like(out), "inputs": xs, "weight": w, "out": out, "preact": pre,
            "activation": "gelu", "inputs_need_grad": [True, True], "weight_needs_grad": True, "bias_needs_grad": True}


def _fcl_backward(a):
    return torch.ops.mmkernels.fused_concat_linear_backward(**a)


_register("ops.fused_concat_linear_backward", [
    ("grad_out-shape", "grad_out", lambda a: a.update(grad_out=a["grad_out"][:, :4])),
    ("grad_out-dtype", "grad_out", lambda a: a.update(grad_out=a["grad_out"].double())),
    ("grad_out-device", "grad_out", lambda a: a.update(grad_out=a["grad_out"].to("meta"))),
    ("flags-length", "inputs_need_grad", _set(inputs_need_grad=[True])),
    ("preact-shape", "preact", lambda a: a.update(preact=a["preact"][:2])),
    ("out-shape", "out", lambda a: a.update(out=a["out"][:2], activation="tanh")),
    ("weight-columns", "weight", lambda a: a.update(weight=torch.randn(5, 6))),
    ("activation-unknown", "activation", _set(activation="swish")),
], _fcl_backward, fcl_backward_args)


# --------------------------------------------------------------------------- nn.FusedConcatLinear


def fcl_module_args():
    return {"in_features": (3, 2), "out_features": 5, "activation": "relu", "bias": True,
            "forward": [torch.randn(4, 3), torch.randn(4, 2)]}


def _fcl_module(a):
    module = FusedConcatLinear(a["in_features"], a["out_features"], bias=a["bias"], activation=a["activation"])
    return module(*a["forward"])


_register("nn.FusedConcatLinear", [
    ("in_features-empty", "in_features", _set(in_features=())),
    ("in_features-zero", "in_features", _set(in_features=(3, 0))),
    ("in_features-negative", "in_features", _set(in_features=(3, -2))),
    ("out_features-negative", "out_features", _set(out_features=-1)),
    ("activation-unknown", "activation", _set(activation="swish")),
    ("forward-widths", "inputs|feature", lambda a: a.update(forward=[torch.randn(4, 2), torch.randn(4, 3)])),
    ("forward-count", "inputs|feature", lambda a: a.update(forward=a["forward"][:1])),
    ("forward-nothing", "inputs|feature", _set(forward=[])),
    ("forward-lead-dims", r"inputs\[1\]", lambda a: a.update(forward=[torch.randn(4, 3), torch.randn(3, 2)])),
    ("forward-dtype", r"inputs\[0\]", lambda a: a.update(forward=[x.double() for x in a["forward"]])),
    ("forward-device", r"inputs\[0\]", lambda a: a.update(forward=[x.to("meta") for x in a["forward"]])),
], _fcl_module, fcl_module_args)


def _from_linear(a):
    return FusedConcatLinear.from_linear(a["linear"], a["in_features"], activation=a["activation"])


_register("nn.FusedConcatLinear.from_linear", [
    ("in_features-sum", "in_features", _set(in_features=(3, 3))),
    ("activation-unknown", "activation", _set(activation="swish")),
    ("linear-not-linear", "linear", lambda a: a.update(linear=torch.nn.Conv1d(5, 5, 1)), TYPE_OK),
], _from_linear, lambda: {"linear": torch.nn.Linear(5, 4), "in_features": (3, 2), "activation": "relu"})


# --------------------------------------------------------------------------- cross_modal_attention


def attention_args():
    b, h, lq, lk, e = 2, 3, 4, 5, 8
    return {"q": torch.randn(b, h, lq, e), "k": torch.randn(b, h, lk, e), "v": torch.randn(b, h, lk, 6),
            "key_padding_mask": torch.zeros(b, lk, dtype=torch.bool), "kv_lengths": torch.tensor([5, 3]),
            "attn_mask": torch.ones(lq, lk, dtype=torch.bool), "scale": None, "dropout_p": 0.0}


def _attention(a):
    a = dict(a)
    return mmkernels.cross_modal_attention(a.pop("q"), a.pop("k"), a.pop("v"), **a)


def _attention_raw(a):
    a.pop("enable_gqa", None)  # the op reads the head counts from k and v
    seed = torch.tensor(0) if a["dropout_p"] > 0 else None
    scale = a["q"].shape[-1] ** -0.5 if a["scale"] is None else a["scale"]
    return torch.ops.mmkernels.cross_modal_attention(a["q"], a["k"], a["v"], a["key_padding_mask"], a["kv_lengths"],
                                                     a["attn_mask"], scale, a["dropout_p"], seed)


def _t(name, fn):
    return lambda a: a.update({name: fn(a[name])})


ATTENTION_ROWS = [
    ("q-3d", r"'q'", _t("q", lambda t: t[0])),
    ("k-5d", r"'k'", _t("k", lambda t: t[None])),
    ("v-2d", r"'v'", _t("v", lambda t: t[0, 0])),
    ("k-batch", r"'k'", _t("k", lambda t: t[:1])),
    ("v-batch", r"'v'", _t("v", lambda t: t[:1])),
    ("k-heads", r"'k'", _t("k", lambda t: t[:, :2])),
    ("k-head-dim", r"'k'", _t("k", lambda t: t[..., :7])),
    ("v-keys", r"'v'", _t("v", lambda t: t[:, :, :4])),
    ("q-integer", r"'q'", lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long())),
    ("k-dtype", r"'k'", _t("k", lambda t: t.double())),
    ("v-dtype", r"'v'", _t("v", lambda t: t.double())),
    ("k-device", r"'k'", _t("k", lambda t: t.to("meta"))),
    ("v-device", r"'v'", _t("v", lambda t: t.to("meta"))),
    ("q-device", r"'q'|'k'", _t("q", lambda t: t.to("meta"))),
    ("key_padding_mask-dtype", "key_padding_mask", _t("key_padding_mask", lambda t: t.int())),
    ("key_padding_mask-shape", "key_padding_mask", _t("key_padding_mask", lambda t: t[:, :4])),
    ("key_padding_mask-3d", "key_padding_mask", _t("key_padding_mask", lambda t: t[None])),
    ("key_padding_mask-device", "key_padding_mask", _t("key_padding_mask", lambda t: t.to("meta"))),
    ("kv_lengths-dtype", "kv_lengths", _t("kv_lengths", lambda t: t.float())),
    ("kv_lengths-shape", "kv_lengths", _t("kv_lengths", lambda t: t[:1])),
    ("kv_lengths-too-long", "kv_lengths", _set(kv_lengths=torch.tensor([6, 3]))),
    ("kv_lengths-negative", "kv_lengths", _set(kv_lengths=torch.tensor([-1, 3]))),
    ("kv_lengths-device", "kv_lengths", _t("kv_lengths", lambda t: t.to("meta"))),
    ("attn_mask-dtype", "attn_mask", _t("attn_mask", lambda t: t.int())),
    ("attn_mask-1d", "attn_mask", _t("attn_mask", lambda t: t[0])),
    ("attn_mask-5d", "attn_mask", _t("attn_mask", lambda t: t[None, None, None])),
    ("attn_mask-shape", "attn_mask", _t("attn_mask", lambda t: t[:, :4])),
    ("attn_mask-not-broadcastable", "attn_mask", _set(attn_mask=torch.ones(3, 1, 4, 5, dtype=torch.bool))),
    ("attn_mask-device", "attn_mask", _t("attn_mask", lambda t: t.to("meta"))),
    ("dropout_p-negative", "dropout_p", _set(dropout_p=-0.1)),
    ("dropout_p-above-1", "dropout_p", _set(dropout_p=1.5)),
    ("dropout_p-nan", "dropout_p", _set(dropout_p=float("nan"))),
]
# Grouped-query attention: k and v share a head count that divides q's (3 here).
ATTENTION_ROWS += [
    ("v-heads", r"'v'", lambda a: a.update(k=a["k"][:, :1], v=a["v"][:, :2], enable_gqa=True)),
    ("k-heads-not-dividing", r"'k'", lambda a: a.update(k=a["k"][:, :2], v=a["v"][:, :2], enable_gqa=True)),
]
# The public function's own arguments (the op has no enable_gqa: its caller asked for it).
ATTENTION_WRAPPER_ROWS = ATTENTION_ROWS + [
    ("enable_gqa-missing", r"'k'", lambda a: a.update(k=a["k"][:, :1], v=a["v"][:, :1])),
    ("attn_mask-causal-bias-sizes", "attn_mask", _set(attn_mask=torch.nn.attention.bias.causal_upper_left(3, 5))),
]
_register("cross_modal_attention", ATTENTION_WRAPPER_ROWS, _attention, attention_args)
_register("ops.cross_modal_attention", ATTENTION_ROWS, _attention_raw, attention_args)


# --------------------------------------------------------------------------- nn.CrossModalAttention


def mha_args():
    lq, lk, b = 4, 5, 2
    return {"init": {"embed_dim": 8, "num_heads": 2}, "query": torch.randn(lq, b, 8), "key": torch.randn(lk, b, 8),
            "value": torch.randn(lk, b, 8), "kw": {"key_padding_mask": torch.zeros(b, lk, dtype=torch.bool),
                                                   "attn_mask": torch.zeros(lq, lk, dtype=torch.bool)}}


def _mha(a):
    from mmkernels.nn import CrossModalAttention

    module = CrossModalAttention(**a["init"])
    return module(a["query"], a["key"], a["value"], **a["kw"])


def _init(**kw):
    return lambda a: a["init"].update(kw)


def _kw(**kw):
    return lambda a: a["kw"].update(kw)


_register("nn.CrossModalAttention", [
    ("heads-not-dividing", "embed_dim|num_heads", _init(num_heads=3)),
    ("heads-zero", "num_heads", _init(num_heads=0)),
    ("embed_dim-zero", "embed_dim", _init(embed_dim=0)),
    ("dropout-above-1", "dropout", _init(dropout=1.5)),
    ("query-4d", "query", _t("query", lambda t: t[None])),
    ("key-rank", "key", _t("key", lambda t: t[0])),
    ("query-features", "query", _t("query", lambda t: t[..., :6])),
    ("key-features", "key", _t("key", lambda t: t[..., :6])),
    ("key-batch", "key", _t("key", lambda t: t[:, :1])),
    ("value-length", "value", _t("value", lambda t: t[:4])),
    ("query-dtype", "query", _t("query", lambda t: t.double())),
    ("key-dtype", "key", _t("key", lambda t: t.double())),
    ("query-device", "query", _t("query", lambda t: t.to("meta"))),
    ("key_padding_mask-shape", "key_padding_mask", _kw(key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))),
    ("key_padding_mask-dtype", "key_padding_mask", _kw(key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))),
    ("attn_mask-shape", "attn_mask", _kw(attn_mask=torch.zeros(4, 4, dtype=torch.bool))),
    ("attn_mask-3d-shape", "attn_mask", _kw(attn_mask=torch.zeros(3, 4, 5, dtype=torch.bool))),
    ("attn_mask-dtype", "attn_mask", _kw(attn_mask=torch.zeros(4, 5, dtype=torch.int32))),
    ("is_causal-without-mask", "is_causal", _kw(attn_mask=None, is_causal=True)),
], _mha, mha_args)


def _mha_from_module(a):
    from mmkernels.nn import CrossModalAttention

    return CrossModalAttention.from_module(a["mha"])


_register("nn.CrossModalAttention.from_module", [
    ("mha-not-mha", "mha", _set(mha=torch.nn.Linear(4, 4)), TYPE_OK),
], _mha_from_module, lambda: {"mha": torch.nn.MultiheadAttention(8, 2)})


# --------------------------------------------------------------------------- low_rank_fusion


def lrf_args():
    r, n = 3, 4
    return {"inputs": [torch.randn(5, 2), torch.randn(5, 3)], "factors": [torch.randn(r, 3, n), torch.randn(r, 4, n)],
            "rank_weight": torch.randn(r), "bias": torch.randn(n)}


def _lrf(a):
    return mmkernels.low_rank_fusion(a["inputs"], a["factors"], a["rank_weight"], a["bias"])


def _lrf_raw(a):
    return torch.ops.mmkernels.low_rank_fusion(a["inputs"], a["factors"], a["rank_weight"], a["bias"])


def _item(name, i, fn):
    def mutate(a):
        a[name] = list(a[name])
        a[name][i] = fn(a[name][i])
    return mutate


LRF_ROWS = [
    ("inputs-empty", "inputs", _set(inputs=[], factors=[])),
    ("factors-count", "factors", lambda a: a.update(factors=a["factors"][:1])),
    ("inputs-lead-dims", r"inputs\[1\]", _item("inputs", 1, lambda t: t[:4])),
    ("inputs-0d", r"inputs\[1\]", _item("inputs", 1, lambda t: t[0, 0])),
    ("inputs-dtype", r"inputs\[1\]", _item("inputs", 1, lambda t: t.double())),
    ("inputs-device", r"inputs\[0\]", _item("inputs", 0, lambda t: t.to("meta"))),
    ("factors-rank-dim", r"factors\[1\]", _item("factors", 1, lambda t: t[:2])),
    ("factors-in-dim", r"factors\[1\]", _item("factors", 1, lambda t: t[:, :3])),
    ("factors-out-dim", r"factors\[1\]", _item("factors", 1, lambda t: t[..., :3])),
    ("factors-2d", r"factors\[0\]", _item("factors", 0, lambda t: t[0])),
    ("factors-dtype", r"factors\[1\]", _item("factors", 1, lambda t: t.double())),
    ("factors-device", r"factors\[1\]", _item("factors", 1, lambda t: t.to("meta"))),
    ("rank_weight-2d", "rank_weight", lambda a: a.update(rank_weight=a["rank_weight"][None])),
    ("rank_weight-dtype", "rank_weight|inputs|factors", lambda a: a.update(rank_weight=a["rank_weight"].double())),
    ("integer-dtype", "rank_weight|inputs|factors",
     lambda a: a.update(inputs=[x.long() for x in a["inputs"]], factors=[f.long() for f in a["factors"]],
                        rank_weight=a["rank_weight"].long(), bias=a["bias"].long())),
    ("bias-shape", "bias", lambda a: a.update(bias=a["bias"][:3])),
    ("bias-dtype", "bias", lambda a: a.update(bias=a["bias"].double())),
    ("bias-device", "bias", lambda a: a.update(bias=a["bias"].to("meta"))),
    ("bias-not-tensor", "bias", _set(bias=1.0), TYPE_OK),
]
_register("low_rank_fusion", LRF_ROWS, _lrf, lrf_args)
_register("ops.low_rank_fusion", LRF_ROWS, _lrf_raw, lrf_args)
