"""The bad-input matrix: every class of invalid argument for every public function, raw op and module.

Each case is a function that builds otherwise valid inputs, breaks exactly one thing, and makes the
call. It must raise ValueError or RuntimeError (TypeError too, where marked: a non-tensor passed for a
tensor) whose message matches `names` (the argument's name). Each group also has a `valid` control
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

import mmkernels
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
        raises = row[3] if len(row) > 3 else (ValueError, RuntimeError)

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
