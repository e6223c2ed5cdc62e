"""Checks run on 2 ranks by test_sharding.py: the ops on DTensors (every sharding rule, forward and
backward) against mmkernels.reference on the whole tensors, and the tensor-parallel styles against
the same modules in one process. float64, so that a wrong shard shows above rounding."""
from __future__ import annotations

import copy
import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import parallelize_module

import mmkernels
from mmkernels import reference
from mmkernels.distributed import (
    CrossModalAttentionHeadParallel,
    FusedConcatLinearColwise,
    FusedConcatLinearRowwise,
)
from mmkernels.distributed.sharding import attention_rules
from mmkernels.nn import CrossModalAttention, FusedConcatLinear

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-9)
_mesh = None


def mesh():
    global _mesh
    if _mesh is None:
        _mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return _mesh


def leaf(*shape, seed, dtype=F64):
    """The same random tensor on every rank (a fresh seed per tensor), requiring grad."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()


def shard(t: torch.Tensor, placement) -> DTensor:
    d = distribute_tensor(t.detach(), mesh(), [placement])
    return d.requires_grad_(t.requires_grad)


def assert_whole(actual, expected, what: str) -> None:
    got = actual.full_tensor() if isinstance(actual, DTensor) else actual
    torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{what}: {m}")


def no_collectives(fn):
    """Run fn, asserting it moved no data between ranks (the op ran on the shards as they were)."""
    with CommDebugMode() as comm:
        out = fn()
    assert comm.get_total_counts() == 0, f"expected no collective, got {comm.get_comm_counts()}"
    return out


# ------------------------------------------------------------------ ops


def check_fused_concat_linear_batch_and_output_rows():
    x1, x2 = leaf(5, 3, 6, seed=1), leaf(5, 3, 4, seed=2)
    w, b = leaf(8, 10, seed=3), leaf(8, seed=4)
    for activation in ("none", "relu", "gelu", "silu"):
        for split, px, pw, out_placement in (
            ("batch dim 0", Shard(0), Replicate(), Shard(0)),
            ("batch dim 1", Shard(1), Replicate(), Shard(1)),
            ("weight rows", Replicate(), Shard(0), Shard(2)),
        ):
            what = f"{activation}, {split}"
            xs = [shard(x1, px), shard(x2, px)]
            wd, bd = shard(w, pw), shard(b, pw)
            out = no_collectives(lambda: mmkernels.fused_concat_linear(xs, wd, bd, activation))
            assert out.placements == (out_placement,), f"{what}: output {out.placements}"
            expected = reference.fused_concat_linear([x1, x2], w, b, activation)
            assert_whole(out, expected, what)
            grad = leaf(*expected.shape, seed=99).detach()
            out.backward(distribute_tensor(grad, mesh(), [out_placement]))
            expected.backward(grad)
            for name, d, t in (("inputs[0]", xs[0], x1), ("inputs[1]", xs[1], x2), ("weight", wd, w), ("bias", bd, b)):
                assert_whole(d.grad, t.grad, f"{what}: grad of {name}")
                t.grad = None


def check_fused_concat_linear_input_columns():
    x, w, b = leaf(7, 10, seed=5), leaf(8, 10, seed=6), leaf(8, seed=7)
    xd, wd, bd = shard(x, Shard(1)), shard(w, Shard(1)), shard(b, Replicate())
    out = mmkernels.fused_concat_linear([xd], wd, bd)
    assert out.placements == (Partial(),), out.placements  # a partial sum per rank, reduced when read
    expected = reference.fused_concat_linear([x], w, b, "none")
    assert_whole(out, expected, "output")
    grad = leaf(*expected.shape, seed=99).detach()
    out.backward(distribute_tensor(grad, mesh(), [Replicate()]))
    expected.backward(grad)
    for name, d, t in (("input", xd, x), ("weight", wd, w), ("bias", bd, b)):
        assert_whole(d.grad, t.grad, f"grad of {name}")
    assert xd.grad.placements == (Shard(1),) and wd.grad.placements == (Shard(1),)


def check_low_rank_fusion_batch_and_output_columns():
    x1, x2 = leaf(6, 5, seed=8), leaf(6, 3, seed=9)
    f1, f2 = leaf(4, 6, 8, seed=10), leaf(4, 4, 8, seed=11)
    rw, b = leaf(4, seed=12), leaf(8, seed=13)
    for split, px, pf, pb, out_placement in (
        ("batch", Shard(0), Replicate(), Replicate(), Shard(0)),
        ("output columns", Replicate(), Shard(2), Shard(0), Shard(1)),
    ):
        xs, fs = [shard(x1, px), shard(x2, px)], [shard(f1, pf), shard(f2, pf)]
        rwd, bd = shard(rw, Replicate()), shard(b, pb)
        out = no_collectives(lambda: mmkernels.low_rank_fusion(xs, fs, rwd, bd))
        assert out.placements == (out_placement,), f"{split}: output {out.placements}"
        expected = reference.low_rank_fusion([x1, x2], [f1, f2], rw, b)
        assert_whole(out, expected, split)
        grad = leaf(*expected.shape, seed=99).detach()
        out.backward(distribute_tensor(grad, mesh(), [out_placement]))
        expected.backward(grad)
        pairs = (("inputs[0]", xs[0], x1), ("inputs[1]", xs[1], x2), ("factors[0]", fs[0], f1),
                 ("factors[1]", fs[1], f2), ("rank_weight", rwd, rw), ("bias", bd, b))
        for name, d, t in pairs:
            assert_whole(d.grad, t.grad, f"{split}: grad of {name}")
            t.grad = None


def _attention_cases():
    B, H, Lq, Lk, E = 4, 4, 5, 7, 8
    g = torch.Generator().manual_seed(20)
    kpm = torch.rand(B, Lk, generator=g) < 0.3
    kpm[:, 0] = False
    return {
        "no mask": {},
        "key_padding_mask": {"key_padding_mask": kpm},
        "kv_lengths": {"kv_lengths": torch.tensor([7, 3, 0, 5])},  # 0: rows that see no key
        "bool attn_mask (B, H, Lq, Lk)": {"attn_mask": torch.rand(B, H, Lq, Lk, generator=g) < 0.7},
        "float attn_mask (H, Lq, Lk)": {"attn_mask": torch.randn(H, Lq, Lk, generator=g, dtype=F64)},
        "float attn_mask (Lq, Lk) and scale": {"attn_mask": torch.randn(Lq, Lk, generator=g, dtype=F64), "scale": 0.3},
        "is_causal with key_padding_mask": {"is_causal": True, "key_padding_mask": kpm},
    }, (B, H, Lq, Lk, E)


def check_attention_batch_and_heads():
    cases, (B, H, Lq, Lk, E) = _attention_cases()
    q, k, v = leaf(B, H, Lq, E, seed=21), leaf(B, H, Lk, E, seed=22), leaf(B, H, Lk, 6, seed=23)
    for case, masks in cases.items():
        for split, dim in (("batch", 0), ("heads", 1)):
            what = f"{case}, by {split}"
            qd, kd, vd = (shard(t, Shard(dim)) for t in (q, k, v))
            # Masks arrive replicated: taking a rank's slice of a replicated tensor moves no data.
            md = {n: distribute_tensor(m, mesh(), [Replicate()]) if isinstance(m, torch.Tensor) else m
                  for n, m in masks.items()}
            out = no_collectives(lambda: mmkernels.cross_modal_attention(qd, kd, vd, **md))
            assert out.placements == (Shard(dim),), f"{what}: output {out.placements}"
            expected = reference.cross_modal_attention(q, k, v, **masks)
            assert_whole(out, expected, what)
            grad = leaf(*expected.shape, seed=99).detach()
            out.backward(distribute_tensor(grad, mesh(), [Shard(dim)]))
            expected.backward(grad)
            for name, d, t in (("q", qd, q), ("k", kd, k), ("v", vd, v)):
                assert d.grad.placements == (Shard(dim),), f"{what}: grad of {name} is {d.grad.placements}"
                assert_whole(d.grad, t.grad, f"{what}: grad of {name}")
                t.grad = None


def check_attention_dropout_is_the_shards_own():
    """With dropout, each rank draws the mask of its shard from the (shared) seed and its local
    (batch, head) indices: the sharded op equals the plain op run on each rank's shard."""
    B, H, L, E = 2, 4, 6, 8
    q, k, v = leaf(B, H, L, E, seed=30), leaf(B, H, L, E, seed=31), leaf(B, H, L, E, seed=32)
    qd, kd, vd = (shard(t, Shard(1)) for t in (q, k, v))
    torch.manual_seed(5)
    out = mmkernels.cross_modal_attention(qd, kd, vd, dropout_p=0.3)
    out.sum().backward()
    local = [t.detach().chunk(dist.get_world_size(), dim=1)[dist.get_rank()].requires_grad_() for t in (q, k, v)]
    torch.manual_seed(5)
    expected = mmkernels.cross_modal_attention(*local, dropout_p=0.3)
    expected.sum().backward()
    assert torch.equal(out.to_local(), expected)
    for d, t in zip((qd, kd, vd), local):
        assert torch.equal(d.grad.to_local(), t.grad)


def check_attention_rules_keep_query_groups_together():
    """Grouped-query attention: heads split only where every rank keeps whole kv groups; asked to run
    head-sharded when they would not, the rule refuses with an error naming the fix."""
    rules = attention_rules("cross_modal_attention")

    def spec(shape, placement):
        t = torch.empty(shape, dtype=F64)
        return DTensorSpec(mesh(), (placement,), tensor_meta=TensorMeta(t.shape, t.stride(), t.dtype))

    def splits(h_kv, placement):
        q = spec((2, 4, 5, 8), placement)
        kv = spec((2, h_kv, 7, 8), placement)
        return [r.inputs[0] for r in rules(q, kv, kv, None, None, None, 0.35, 0.0, None)]

    assert Shard(1) in splits(4, Replicate()) and Shard(1) in splits(2, Replicate())
    assert splits(1, Replicate()) == [Shard(0), Replicate()]  # one kv head: never split by heads
    try:
        splits(1, Shard(1))
    except ValueError as e:
        assert "cannot split attention by heads" in str(e) and "divisible by the mesh size" in str(e), e
    else:
        raise AssertionError("head-sharded q/k/v with an unsplittable kv head count was not refused")
    if "enable_gqa" not in inspect.signature(mmkernels.cross_modal_attention).parameters:
        return "the op has no grouped-query attention in this build (rules checked, not run)"
    q, k, v = leaf(2, 4, 5, 8, seed=40), leaf(2, 2, 7, 8, seed=41), leaf(2, 2, 7, 8, seed=42)
    qd, kd, vd = (shard(t, Shard(1)) for t in (q, k, v))
    out = no_collectives(lambda: mmkernels.cross_modal_attention(qd, kd, vd, enable_gqa=True))
    expected = reference.cross_modal_attention(q, k, v, enable_gqa=True)
    assert_whole(out, expected, "grouped-query attention by heads")


def check_varlen_attention_by_heads():
    """Packed variable-length attention (sequences along dim 0) splits by heads, causal and GQA included."""
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 12], dtype=torch.int32)
    for h_kv, causal in ((4, False), (2, True)):
        what = f"varlen, {h_kv} kv heads, causal={causal}"
        q, k, v = leaf(sum(lens_q), 4, 8, seed=60), leaf(sum(lens_k), h_kv, 8, seed=61), leaf(sum(lens_k), h_kv, 5, seed=62)
        qd, kd, vd = (shard(t, Shard(1)) for t in (q, k, v))
        cq, ck = (distribute_tensor(c, mesh(), [Replicate()]) for c in (cu_q, cu_k))
        out = no_collectives(lambda: mmkernels.cross_modal_attention_varlen(qd, kd, vd, cq, ck, 5, 6, is_causal=causal))
        assert out.placements == (Shard(1),), f"{what}: output {out.placements}"
        expected = reference.cross_modal_attention_varlen(q, k, v, cu_q, cu_k, 5, 6, is_causal=causal)
        assert_whole(out, expected, what)
        grad = leaf(*expected.shape, seed=63).detach()
        out.backward(distribute_tensor(grad, mesh(), [Shard(1)]))
        expected.backward(grad)
        for name, d, t in (("q", qd, q), ("k", kd, k), ("v", vd, v)):
            assert_whole(d.grad, t.grad, f"{what}: grad of {name}")


def check_ops_reject_nothing_they_accept_replicated():
    """Replicated DTensors (the fallback every op has) give the reference results too."""
    x, w = leaf(3, 4, seed=50), leaf(5, 4, seed=51)
    out = mmkernels.fused_concat_linear([shard(x, Replicate())], shard(w, Replicate()), None, "tanh")
    assert out.placements == (Replicate(),)
    assert_whole(out, reference.fused_concat_linear([x], w, None, "tanh"), "replicated")


# ------------------------------------------------------------------ tensor-parallel styles


def _compare_modules(tp, single, inputs_fn, what, kwargs=None):
    kwargs = kwargs or {}
    inputs = inputs_fn()
    clones = {id(t): t.detach().clone().requires_grad_() for t in inputs}  # `query is key` stays so
    inputs_single = [clones[id(t)] for t in inputs]
    out = tp(*inputs, **kwargs)
    expected = single(*inputs_single, **kwargs)
    if isinstance(out, tuple):
        out, expected = out[0], expected[0]
    assert not isinstance(out, DTensor), f"{what}: the output should be a plain tensor"
    torch.testing.assert_close(out, expected, **TOL, msg=lambda m: f"{what}: output: {m}")
    grad = leaf(*expected.shape, seed=99).detach()
    out.backward(grad)
    expected.backward(grad)
    for i, (a, b) in enumerate(zip(inputs, inputs_single)):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m: f"{what}: grad of input {i}: {m}")
    params = dict(single.named_parameters())
    for name, p in tp.named_parameters():
        assert name in params, f"{what}: parameter {name} is not one of the module's"
        torch.testing.assert_close(
            p.grad.full_tensor(), params[name].grad, **TOL, msg=lambda m: f"{what}: grad of {name}: {m}"
        )
    sd = tp.state_dict()
    assert list(sd) == list(single.state_dict()), f"{what}: state_dict keys changed"
    for name, t in single.state_dict().items():
        assert torch.equal(sd[name].full_tensor(), t), f"{what}: state_dict[{name}] differs"


def check_tp_cross_modal_attention_by_heads():
    B, Lq, Lk, E, H = 3, 5, 6, 16, 4
    for batch_first in (True, False):
        for kind in ("self", "cross", "kdim/vdim"):
            torch.manual_seed(60)
            extra = dict(kdim=12, vdim=10) if kind == "kdim/vdim" else {}
            single = CrossModalAttention(E, H, batch_first=batch_first, dtype=F64, **extra)
            tp = parallelize_module(copy.deepcopy(single), mesh(), CrossModalAttentionHeadParallel())

            def shape(L, D):
                return (B, L, D) if batch_first else (L, B, D)

            g = torch.Generator().manual_seed(61)
            kpm = torch.rand(B, Lk, generator=g) < 0.3
            kpm[:, 0] = False
            mask = torch.randn(B * H, Lq, Lq if kind == "self" else Lk, generator=g, dtype=F64)
            what = f"{kind}-attention, batch_first={batch_first}"
            if kind == "self":
                def inputs():
                    x = torch.randn(*shape(Lq, E), generator=g, dtype=F64).requires_grad_()
                    return [x, x, x]
                kwargs = dict(attn_mask=mask, need_weights=False)
            else:
                def inputs():
                    return [torch.randn(*shape(Lq, E), generator=g, dtype=F64).requires_grad_(),
                            torch.randn(*shape(Lk, extra.get("kdim", E)), generator=g, dtype=F64).requires_grad_(),
                            torch.randn(*shape(Lk, extra.get("vdim", E)), generator=g, dtype=F64).requires_grad_()]
                kwargs = dict(key_padding_mask=kpm, attn_mask=mask, need_weights=False)
            _compare_modules(tp, single, inputs, what, kwargs)
    try:
        tp(*inputs())
    except ValueError as e:
        assert "need_weights" in str(e)
    else:
        raise AssertionError("need_weights=True was not refused under head parallelism")


def check_tp_fused_concat_linear_colwise_then_rowwise():
    torch.manual_seed(70)
    single = nn.ModuleDict(
        {"up": FusedConcatLinear([6, 4], 16, activation="gelu", dtype=F64),
         "down": FusedConcatLinear([16], 5, dtype=F64)}
    )
    plan = {"up": FusedConcatLinearColwise(), "down": FusedConcatLinearRowwise()}
    tp = parallelize_module(copy.deepcopy(single), mesh(), plan)
    assert tp["up"].weight.placements == (Shard(0),) and tp["down"].weight.placements == (Shard(1),)

    class Mlp(nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, a, b):
            return self.layers["down"](self.layers["up"](a, b))

    g = torch.Generator().manual_seed(71)
    _compare_modules(
        Mlp(tp), Mlp(single),
        lambda: [torch.randn(3, 7, 6, generator=g, dtype=F64).requires_grad_(),
                 torch.randn(3, 7, 4, generator=g, dtype=F64).requires_grad_()],
        "colwise then rowwise",
    )
    for style, module, needle in (
        (FusedConcatLinearRowwise(), FusedConcatLinear([6, 4], 5), "one input"),
        (FusedConcatLinearRowwise(), FusedConcatLinear([6], 5, activation="relu"), "activation 'none'"),
        (FusedConcatLinearColwise(), nn.Linear(4, 4), "expected a FusedConcatLinear"),
    ):
        try:
            parallelize_module(module, mesh(), style)
        except (ValueError, TypeError) as e:
            assert needle in str(e), e
        else:
            raise AssertionError(f"{type(style).__name__} accepted {module}")


def check_tp_cross_modal_attention_dropout_replays_under_checkpointing():
    """With dropout, the head-parallel module's masks come from the default generator (plus the rank),
    so a seed reproduces them and activation checkpointing replays them exactly."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(80)
    tp = parallelize_module(CrossModalAttention(16, 4, dropout=0.3, batch_first=True, dtype=F64), mesh(),
                            CrossModalAttentionHeadParallel())
    x = leaf(2, 6, 16, seed=81)
    grads = {}
    for mode in ("plain", "checkpoint", "other seed"):
        torch.manual_seed(9 if mode != "other seed" else 10)
        if mode == "checkpoint":
            out = checkpoint(lambda t: tp(t, t, t, need_weights=False)[0], x, use_reentrant=False)
        else:
            out = tp(x, x, x, need_weights=False)[0]
        out.pow(2).sum().backward()
        grads[mode] = [x.grad.clone()] + [p.grad.to_local().clone() for p in tp.parameters()]
        x.grad = None
        tp.zero_grad()
    same = all(torch.equal(a, b) for a, b in zip(grads["plain"], grads["checkpoint"]))
    assert same, "checkpointing changed the gradients"
    assert not torch.equal(grads["plain"][0], grads["other seed"][0]), "dropout had no effect"
