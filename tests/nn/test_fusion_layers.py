"""Fusion layers (mmkernels.nn.fusion) and the low_rank_fusion op against their references."""
import warnings

import pytest
import torch

import mmkernels
from mmkernels import ops, reference
from mmkernels.nn import ConcatFusion, FiLM, GatedMultimodalUnit, LowRankFusion

# (atol, rtol) of a result against the float64 reference evaluated on the same values.
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 2e-2)}


def up(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    # bfloat16 is compared relative to the tensor's scale, not element by element.
    scale = max(expected.abs().max().item(), 1.0) if dtype == torch.bfloat16 and expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol)


def check(out, ref, ours, theirs):
    """Outputs equal, and gradients w.r.t. `ours` equal those w.r.t. `theirs` (float64 copies)."""
    dtype = out.dtype
    assert out.shape == ref.shape
    assert_close(out, ref, dtype)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, ours, g, allow_unused=True)
    grads_r = torch.autograd.grad(ref, theirs, g.double(), allow_unused=True)
    for a, b in zip(grads, grads_r):
        assert a is not None and b is not None and a.shape == b.shape and a.dtype == dtype
        assert_close(a, b, dtype)


def module_vs_reference(module, inputs, ref_fn):
    """ref_fn(inputs64, params64: dict) on float64 copies; compares outputs and every gradient."""
    out = module(inputs) if not isinstance(inputs, tuple) else module(*inputs)
    flat = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
    flat = [x for x in flat if isinstance(x, torch.Tensor)]
    params = dict(module.named_parameters())
    params_r = {k: up(p) for k, p in params.items()}
    flat_r = [up(x) for x in flat]
    if isinstance(inputs, dict):
        inputs_r = dict(zip(inputs.keys(), flat_r))
    else:
        inputs_r = type(inputs)(flat_r)
    ref = ref_fn(inputs_r, params_r)
    check(out, ref, flat + list(params.values()), flat_r + list(params_r.values()))


# --------------------------------------------------------------------------- low_rank_fusion op


def lmf_case(lead, widths, rank, n, dtype, bias=True):
    xs = [torch.randn(*lead, d, dtype=dtype, requires_grad=True) for d in widths]
    fs = [(torch.randn(rank, d + 1, n, dtype=dtype) / (d + 1) ** 0.5).requires_grad_() for d in widths]
    w = torch.randn(rank, dtype=dtype, requires_grad=True)
    b = torch.randn(n, dtype=dtype, requires_grad=True) if bias else None
    return xs, fs, w, b


def lmf_check(xs, fs, w, b):
    out = mmkernels.low_rank_fusion(xs, fs, w, b)
    xs_r, fs_r, w_r = [up(x) for x in xs], [up(f) for f in fs], up(w)
    b_r = None if b is None else up(b)
    ref = reference.low_rank_fusion(xs_r, fs_r, w_r, b_r)
    extra, extra_r = ([b], [b_r]) if b is not None else ([], [])
    check(out, ref, [*xs, *fs, w, *extra], [*xs_r, *fs_r, w_r, *extra_r])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_low_rank_fusion_matches_reference(dtype):
    lmf_check(*lmf_case((5, 7), (3, 1, 17), 4, 13, dtype))


@pytest.mark.parametrize(
    "lead,widths,rank,n,bias",
    [((1,), (1,), 1, 1, True), ((3,), (17, 123), 3, 3, False), ((123,), (3, 1, 17, 5), 2, 17, True),
     ((2, 3, 4), (5, 6), 1, 7, True), ((), (9, 4), 3, 5, True), ((0, 3), (2, 2), 2, 3, True)],
)
def test_low_rank_fusion_odd_sizes(lead, widths, rank, n, bias):
    lmf_check(*lmf_case(lead, widths, rank, n, torch.float32, bias))


def test_low_rank_fusion_many_row_blocks():
    # Enough rows for several forward blocks (run in parallel) and several backward blocks; float64
    # so that the 20000-row sums of the parameter gradients are compared exactly.
    lmf_check(*lmf_case((20000,), (3, 5), 3, 8, torch.float64))


def test_low_rank_fusion_non_contiguous_and_zeros():
    xs, fs, w, b = lmf_case((6, 4), (3, 5), 2, 7, torch.float32)
    xs = [x.detach().transpose(0, 1).requires_grad_() for x in xs]  # (4, 6, d), non-contiguous
    with torch.no_grad():
        xs[1][0] = 0  # zero projections: gradients must not go through a division
        fs[1][:, -1] = 0
    fs = [f.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for f in fs]
    assert not xs[0].is_contiguous() and not fs[0].is_contiguous()
    lmf_check(xs, fs, w, b)


def test_low_rank_fusion_gradcheck_and_opcheck():
    xs, fs, w, b = lmf_case((3, 2), (2, 3, 1), 2, 4, torch.float64)
    fn = lambda *a: mmkernels.low_rank_fusion(list(a[:3]), list(a[3:6]), a[6], a[7])
    assert torch.autograd.gradcheck(fn, (*xs, *fs, w, b))
    torch.library.opcheck(torch.ops.mmkernels.low_rank_fusion.default, (xs, fs, w, b))
    xs32, fs32, w32, _ = lmf_case((5,), (4, 2), 3, 6, torch.float32)
    torch.library.opcheck(torch.ops.mmkernels.low_rank_fusion.default, (xs32, fs32, w32, None))


def test_low_rank_fusion_partial_grads():
    xs, fs, w, b = lmf_case((4,), (3, 2), 2, 5, torch.float32)
    xs[1].requires_grad_(False)
    w.requires_grad_(False)
    out = mmkernels.low_rank_fusion(xs, fs, w, b)
    g = torch.autograd.grad(out.sum(), [xs[0], fs[0], fs[1], b])
    ref = reference.low_rank_fusion(xs, fs, w, b)
    g_r = torch.autograd.grad(ref.sum(), [xs[0], fs[0], fs[1], b])
    for a, c in zip(g, g_r):
        torch.testing.assert_close(a, c)


def test_low_rank_fusion_errors_name_the_argument():
    xs, fs, w, b = lmf_case((4,), (3, 2), 2, 5, torch.float32)
    with pytest.raises(ValueError, match=r"'factors\[1\]'.*\(2, 3, 5\)"):
        mmkernels.low_rank_fusion(xs, [fs[0], fs[1][:, :2]], w, b)
    with pytest.raises(ValueError, match=r"'inputs\[1\]'.*leading dims"):
        mmkernels.low_rank_fusion([xs[0], xs[1][:3]], fs, w, b)
    with pytest.raises(ValueError, match=r"'inputs\[0\]'.*float64"):
        mmkernels.low_rank_fusion([xs[0].double(), xs[1]], fs, w, b)
    with pytest.raises(ValueError, match=r"'bias'"):
        mmkernels.low_rank_fusion(xs, fs, w, b[:3])
    with pytest.raises(ValueError, match=r"'factors'"):
        mmkernels.low_rank_fusion(xs, fs[:1], w, b)
    with pytest.raises(ValueError, match=r"'rank_weight'"):
        mmkernels.low_rank_fusion(xs, fs, w[None], b)
    # The C++ kernel checks too, naming the argument, when called directly.
    with pytest.raises(RuntimeError, match=r"'factors\[1\]'"):
        torch.ops.mmkernels.low_rank_fusion(xs, [fs[0], fs[1][:, :2]], w, b)


def test_low_rank_fusion_falls_back_visibly(monkeypatch):
    # A device without a kernel (CUDA here) takes the reference and says so once per process.
    monkeypatch.setitem(ops._KERNELS, "mmkernels::low_rank_fusion", frozenset())
    monkeypatch.setattr(ops, "_warned", set())
    xs, fs, w, b = lmf_case((4,), (3, 2), 2, 5, torch.float32)
    with pytest.warns(RuntimeWarning, match="no low_rank_fusion kernel"):
        out = mmkernels.low_rank_fusion(xs, fs, w, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mmkernels.low_rank_fusion(xs, fs, w, b)
    torch.testing.assert_close(out, reference.low_rank_fusion(xs, fs, w, b))


# --------------------------------------------------------------------------- modules

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_concat_fusion_dict_sorted_with_projection(dtype):
    m = ConcatFusion({"video": 3, "audio": 17, "text": 1}, 13, activation="relu", dtype=dtype)
    inputs = {k: torch.randn(5, 2, d, dtype=dtype, requires_grad=True) for k, d in
              (("video", 3), ("audio", 17), ("text", 1))}

    def ref(x, p):
        return reference.fused_concat_linear([x["audio"], x["text"], x["video"]], p["proj.weight"], p["proj.bias"],
                                             "relu")

    module_vs_reference(m, inputs, ref)


def test_concat_fusion_without_projection_and_errors():
    m = ConcatFusion([2, 3])
    a, b = torch.randn(4, 2), torch.randn(4, 3)
    torch.testing.assert_close(m({"b": a, "c": b}), torch.cat([a, b], -1))
    torch.testing.assert_close(m(a, b), torch.cat([a, b], -1))
    named = ConcatFusion({"x": 2, "y": 3}, 4)
    with pytest.raises(ValueError, match=r"'inputs'.*\['x', 'y'\]"):
        named({"x": a, "z": b})
    with pytest.raises(ValueError, match=r"'inputs\['y'\]'.*\(\.\.\., 3\)"):
        named({"x": a, "y": a})
    with pytest.raises(ValueError, match=r"'activation'"):
        ConcatFusion([2, 3], activation="relu")
    with pytest.raises(ValueError, match=r"'in_features'"):
        ConcatFusion([2, 0], 4)


def gmu_reference(k):
    def ref(x, p):
        xs = list(x.values()) if isinstance(x, dict) else list(x)
        return reference.gated_multimodal_unit(
            xs, [p[f"projections.{i}.weight"] for i in range(k)], [p[f"projections.{i}.bias"] for i in range(k)],
            p["gate.weight"], p["gate.bias"])
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("widths", [(3, 17), (1, 5, 123), (4, 4, 2, 7)])
def test_gmu_matches_reference(dtype, widths):
    m = GatedMultimodalUnit(widths, 11, dtype=dtype)
    inputs = [torch.randn(3, 5, d, dtype=dtype, requires_grad=True) for d in widths]
    module_vs_reference(m, inputs, gmu_reference(len(widths)))


def test_gmu_gate_is_a_convex_combination_and_errors():
    m = GatedMultimodalUnit({"a": 3, "b": 4, "c": 5}, 6)
    assert m.gate.out_features == 18 and m.gate.activation == "none"
    m2 = GatedMultimodalUnit([3, 4], 6)
    assert m2.gate.out_features == 6 and m2.gate.activation == "sigmoid"
    x = {"a": torch.randn(2, 3), "b": torch.randn(2, 4), "c": torch.randn(2, 5)}
    out = m(x)
    assert out.shape == (2, 6) and out.abs().max() <= 1  # convex combination of tanh outputs
    with pytest.raises(ValueError, match=r"'in_features'.*at least 2"):
        GatedMultimodalUnit([3], 6)
    with pytest.raises(ValueError, match=r"'inputs'.*3 modalities"):
        m(torch.randn(2, 3), torch.randn(2, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("widths,rank,n", [((3, 17, 1), 4, 13), ((5,), 1, 1), ((2, 9), 3, 123)])
def test_low_rank_fusion_module(dtype, widths, rank, n):
    m = LowRankFusion(widths, n, rank, dtype=dtype)
    inputs = [torch.randn(4, 3, d, dtype=dtype, requires_grad=True) for d in widths]

    def ref(x, p):
        return reference.low_rank_fusion(list(x), [p[f"factors.{i}"] for i in range(len(widths))], p["rank_weight"],
                                         p["bias"])

    module_vs_reference(m, inputs, ref)


def test_low_rank_fusion_module_dict_state_dict_and_errors():
    m = LowRankFusion({"b": 4, "a": 3}, 5, rank=2, bias=False)
    assert set(m.state_dict()) == {"factors.0", "factors.1", "rank_weight"}
    assert m.factors[0].shape == (2, 4, 5)  # "a" sorts first
    out = m({"b": torch.randn(2, 4), "a": torch.randn(2, 3)})
    assert out.shape == (2, 5)
    with pytest.raises(ValueError, match=r"'rank'"):
        LowRankFusion([3], 5, rank=0)
    with pytest.raises(ValueError, match=r"'inputs\['b'\]'"):
        m({"a": torch.randn(2, 3), "b": torch.randn(2, 3)})


def test_low_rank_fusion_module_compiles_without_graph_breaks():
    m = LowRankFusion([3, 5], 7, rank=2)
    xs = [torch.randn(4, 3, requires_grad=True), torch.randn(4, 5, requires_grad=True)]
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(xs)
    torch.testing.assert_close(out, m(xs))
    out.sum().backward()
    assert xs[0].grad is not None


def film_ref(dim):
    def ref(x, p):
        x, *conds = x
        return reference.film(x, torch.cat(conds, -1), p["proj.weight"], p["proj.bias"], dim=dim)
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_film_sequence_broadcast(dtype):
    m = FiLM(17, 5, dtype=dtype)
    x = torch.randn(3, 7, 17, dtype=dtype, requires_grad=True)  # (B, L, F): one gamma/beta per batch
    cond = torch.randn(3, 5, dtype=dtype, requires_grad=True)
    module_vs_reference(m, (x, cond), film_ref(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_film_feature_maps_and_several_conditions(dtype):
    m = FiLM(3, [4, 1], dim=1, dtype=dtype)
    x = torch.randn(2, 3, 5, 6, dtype=dtype, requires_grad=True)  # (B, C, H, W)
    c1, c2 = (torch.randn(2, d, dtype=dtype, requires_grad=True) for d in (4, 1))
    out = m(x, [c1, c2])
    assert out.shape == x.shape
    module_vs_reference(lambda x, *c: m(x, list(c)), (x, c1, c2), film_ref(1)) if False else None
    params = dict(m.named_parameters())
    ref = reference.film(up(x), torch.cat([up(c1), up(c2)], -1), up(params["proj.weight"]),
                         up(params["proj.bias"]), dim=1)
    assert_close(out, ref.detach(), dtype)


def test_film_per_token_condition_and_errors():
    m = FiLM(4, 2)
    x, cond = torch.randn(2, 3, 4), torch.randn(2, 3, 2)  # a condition per token
    gamma, beta = m.proj([cond]).chunk(2, -1)
    torch.testing.assert_close(m(x, cond), gamma * x + beta)
    with pytest.raises(ValueError, match=r"'x'.*4 features"):
        m(torch.randn(2, 3, 5), cond)
    with pytest.raises(ValueError, match=r"'cond'.*prefix"):
        m(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"'cond\[0\]'"):
        m(x, torch.randn(2, 3))
