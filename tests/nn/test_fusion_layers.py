"""Fusion layers (mmkernels.nn.fusion) and the low_rank_fusion op against their references."""
import warnings

import pytest
import torch

from torch import nn

import mmkernels
from mmkernels import ops, reference
from mmkernels.nn import ConcatFusion, FiLM, GatedMultimodalUnit, LowRankFusion

# (atol, rtol) of a result against the float64 reference evaluated on the same values.
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def up(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def assert_close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    # bfloat16/float16 are compared relative to the tensor's scale, not element by element.
    low = dtype in (torch.bfloat16, torch.float16)
    scale = max(expected.abs().max().item(), 1.0) if low and expected.numel() else 1.0
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
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
    for dtype in (torch.float32, torch.float16):
        xs_l, fs_l, w_l, _ = lmf_case((5,), (4, 2), 3, 6, dtype)
        torch.library.opcheck(torch.ops.mmkernels.low_rank_fusion.default, (xs_l, fs_l, w_l, None))


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
    # A device the build has no kernel for (emptied kernel table here) takes the reference and says so once.
    monkeypatch.setitem(ops.KERNELS, "mmkernels::low_rank_fusion", frozenset())
    monkeypatch.setattr(ops._common, "_warned", set())
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


def test_fusion_layers_export():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lmf, self.gmu = LowRankFusion([3, 5], 7, rank=2), GatedMultimodalUnit([3, 5], 7)
            self.film, self.concat = FiLM(7, 3), ConcatFusion([3, 5], 4, activation="relu")

        def forward(self, a, b):
            return self.film(self.lmf(a, b) + self.gmu(a, b), a), self.concat(a, b)

    model, a, b = Model(), torch.randn(4, 3), torch.randn(4, 5)
    exported = torch.export.export(model, (a, b))
    targets = {str(n.target) for n in exported.graph.nodes}
    assert "mmkernels.low_rank_fusion.default" in targets and "mmkernels.fused_concat_linear.default" in targets
    for x, y in zip(exported.module()(a, b), model(a, b)):
        torch.testing.assert_close(x, y)


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


# --------------------------------------------------------------------------- attention fusion layers

import torch.nn.functional as F  # noqa: E402

from mmkernels.nn import GatedCrossAttention, ModalityGraphAttention  # noqa: E402


class EagerGatedCrossAttention(nn.Module):
    """The block in plain PyTorch (nn.MultiheadAttention, nn.Linear + GELU); same state_dict keys."""

    def __init__(self, dim, heads, media_dim, ff_mult, bias=True, dtype=None):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, dtype=dtype)
        self.attn = nn.MultiheadAttention(dim, heads, bias=bias, kdim=media_dim, vdim=media_dim, batch_first=True,
                                          dtype=dtype)
        self.attn_gate = nn.Parameter(torch.zeros(1, dtype=dtype))
        self.ff_norm = nn.LayerNorm(dim, dtype=dtype)
        self.ff_in = nn.Linear(dim, dim * ff_mult, bias=bias, dtype=dtype)
        self.ff_out = nn.Linear(dim * ff_mult, dim, bias=bias, dtype=dtype)
        self.ff_gate = nn.Parameter(torch.zeros(1, dtype=dtype))

    def forward(self, x, media, media_key_padding_mask=None):
        a, _ = self.attn(self.attn_norm(x), media, media, key_padding_mask=media_key_padding_mask, need_weights=False)
        x = x + torch.tanh(self.attn_gate) * a
        return x + torch.tanh(self.ff_gate) * self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))


def gca_pair(dim, heads, media_dim, ff_mult, dtype, bias=True):
    ours = GatedCrossAttention(dim, heads, media_dim=media_dim, ff_mult=ff_mult, bias=bias, dtype=dtype)
    with torch.no_grad():
        ours.attn_gate.fill_(0.7)  # open the gates (they start closed: the block is then the identity)
        ours.ff_gate.fill_(-0.4)
        for p in ours.parameters():
            if p.dim() == 1 and p.numel() > 1:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial biases and LayerNorm affines
    ref = EagerGatedCrossAttention(dim, heads, media_dim, ff_mult, bias=bias, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    return ours, ref


def compare_modules(ours, ref, args, args_ref, mask_out=None):
    out, out_r = ours(*args), ref(*args_ref)
    assert_close(out, out_r, out.dtype)
    g = torch.randn_like(out)
    out.backward(g)
    out_r.backward(g.double())
    params_r = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, params_r[name].grad, p.dtype)
    for a, a_r in zip(args, args_ref):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert_close(a.grad, a_r.grad, a.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,heads,media_dim,L,M,ff_mult", [(16, 4, 12, 5, 7, 2), (6, 3, None, 1, 17, 1),
                                                              (12, 1, 5, 3, 1, 3)])
@pytest.mark.parametrize("train", [True, False])
def test_gated_cross_attention_matches_eager(dtype, dim, heads, media_dim, L, M, ff_mult, train):
    ours, ref = gca_pair(dim, heads, media_dim, ff_mult, dtype)
    ours.train(train), ref.train(train)
    x = torch.randn(3, L, dim, dtype=dtype, requires_grad=True)
    media = torch.randn(3, M, media_dim or dim, dtype=dtype, requires_grad=True)
    mask = torch.rand(3, M) < 0.4
    mask[:, 0] = False  # every sample keeps a key: nn.MultiheadAttention returns NaN otherwise
    compare_modules(ours, ref, (x, media, mask), (up(x), up(media), mask))


def test_gated_cross_attention_identity_at_init_and_fully_padded_media():
    block = GatedCrossAttention(8, 2, media_dim=4)
    x, media = torch.randn(2, 3, 8), torch.randn(2, 5, 4)
    torch.testing.assert_close(block(x, media), x)  # both gates start at 0
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1] = True  # sample 1 sees no media: the attention adds zeros, not NaN
    x.requires_grad_()
    out = block(x, media, mask)
    torch.testing.assert_close(out[1], x[1])
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_gated_cross_attention_errors():
    block = GatedCrossAttention(8, 2, media_dim=4)
    x, media = torch.randn(2, 3, 8), torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"'x'.*\(batch, length, 8\)"):
        block(x[..., :7], media)
    with pytest.raises(ValueError, match=r"'media'.*\(2, media_length, 4\)"):
        block(x, media[:1])
    with pytest.raises(ValueError, match=r"'media_key_padding_mask'.*\(2, 5\)"):
        block(x, media, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'media_key_padding_mask'"):
        block(x, media, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"'embed_dim'"):
        GatedCrossAttention(9, 2)


def graph_attention_reference(x, adjacency, p, heads):
    """Attention across modalities with the mask applied to materialised scores; rows with no
    neighbour give zeros (softmax of all -inf is NaN here: replaced by 0)."""
    b, m, d = x.shape
    q, k, v = F.linear(x, p["qkv.weight"], p["qkv.bias"]).unflatten(-1, (3, heads, d // heads)).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    mask = adjacency if adjacency.dim() == 2 else adjacency[:, None]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return F.linear((probs @ v).transpose(1, 2).reshape(b, m, d), p["out_proj.weight"], p["out_proj.bias"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,heads,m", [(12, 3, 3), (5, 1, 1), (16, 4, 6)])
@pytest.mark.parametrize("batched_adjacency", [False, True])
def test_modality_graph_attention_matches_reference(dtype, d, heads, m, batched_adjacency):
    adjacency = torch.rand(m, m) < 0.5
    adjacency[0] = False  # modality 0 has no neighbour: zeros from the attention
    layer = ModalityGraphAttention(d, heads, m, adjacency=adjacency, dtype=dtype)
    x = torch.randn(4, m, d, dtype=dtype, requires_grad=True)
    call_adj = torch.rand(4, m, m) < 0.6 if batched_adjacency else None
    out = layer(x, call_adj)
    params = dict(layer.named_parameters())
    params_r = {k: up(v) for k, v in params.items()}
    x_r = up(x)
    ref = graph_attention_reference(x_r, adjacency if call_adj is None else call_adj, params_r, heads)
    check(out, ref, [x, *params.values()], [x_r, *params_r.values()])


def test_modality_graph_attention_inputs_and_errors():
    layer = ModalityGraphAttention(8, 2, 3)
    assert layer.adjacency.all() and "adjacency" in layer.state_dict()
    feats = {"c": torch.randn(2, 8), "a": torch.randn(2, 8), "b": torch.randn(2, 8)}
    stacked = torch.stack([feats["a"], feats["b"], feats["c"]], dim=1)
    torch.testing.assert_close(layer(feats), layer(stacked))
    torch.testing.assert_close(layer(list(stacked.unbind(1))), layer(stacked))
    with pytest.raises(ValueError, match=r"'x'.*\(batch, 3, 8\)"):
        layer(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"'adjacency'.*bool"):
        layer(stacked, torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"'adjacency'.*\(2, 3, 3\)"):
        layer(stacked, torch.ones(5, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'adjacency'"):
        ModalityGraphAttention(8, 2, 3, adjacency=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"'embed_dim'"):
        ModalityGraphAttention(7, 2, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
@pytest.mark.parametrize("widths", [(5,), (3, 4)])
def test_low_rank_fusion_non_finite_rank_weight_reaches_gradients(dtype, weight, widths):
    # Regression (long fuzz): backward carried w[k] on the GEMMs' alpha, and ATen's float32 addmm
    # ignores a NaN alpha (computes it as 1), so the gradients of the factors and inputs came out
    # finite where the reference's are NaN. A non-finite w[k] now scales dP itself, as the
    # reference does.
    xs, fs, w, b = lmf_case((2,), widths, 2, 17, dtype)
    with torch.no_grad():
        w[0] = weight
    out = mmkernels.low_rank_fusion(xs, fs, w, b)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [*xs, *fs], g)
    xs_r, fs_r, w_r, b_r = [up(x) for x in xs], [up(f) for f in fs], up(w), up(b)
    ref = reference.low_rank_fusion(xs_r, fs_r, w_r, b_r)
    grads_r = torch.autograd.grad(ref, [*xs_r, *fs_r], g.double())
    for a, r in zip(grads, grads_r):
        assert torch.equal(torch.isnan(a), torch.isnan(r))
        assert torch.equal(torch.isposinf(a), torch.isposinf(r)) and torch.equal(torch.isneginf(a), torch.isneginf(r))
    if weight != weight:  # NaN: every gradient of the factors of rank 0 is NaN
        assert all(torch.isnan(gf[0]).all() for gf in grads[len(xs):])
