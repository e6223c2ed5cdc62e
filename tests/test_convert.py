"""mmkernels.convert / revert on real model shapes: same outputs, gradients and state_dict."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels import ops
from mmkernels.nn import CrossModalAttention

TOL = dict(atol=1e-4, rtol=1e-4)  # float32 models; the fused kernels accumulate in another order


# --------------------------------------------------------------------------- models


class ThreeModal(nn.Module):
    """Concatenation fusion of three modalities, in the two spellings convert rewrites."""

    def __init__(self):
        super().__init__()
        self.enc_a = nn.Sequential(nn.Linear(5, 8), nn.ReLU())
        self.enc_b = nn.Linear(7, 6)
        self.enc_c = nn.Linear(3, 4)
        self.fusion = nn.Linear(18, 16)
        self.gate_w = nn.Parameter(torch.randn(16, 34) * 0.2)
        self.gate_b = nn.Parameter(torch.zeros(16))
        self.head = nn.Linear(16, 10)
        self.register_buffer("calls", torch.zeros(()))  # unused by forward: must stay in state_dict

    def forward(self, a, b, c):
        a, b, c = self.enc_a(a), torch.tanh(self.enc_b(b)), self.enc_c(c)
        h = torch.relu(self.fusion(torch.cat([a, b, c], dim=1)))
        g = torch.sigmoid(F.linear(torch.cat((a, b, c, h), -1), self.gate_w, self.gate_b))
        return self.head(h * g)


class CrossModalBlock(nn.Module):
    """MulT's cross-modal transformer block: x attends to the other modality y."""

    def __init__(self, d, heads):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads)
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x, y, y_padding=None):
        kv = self.norm_kv(y)
        x = x + self.attn(self.norm_q(x), kv, kv, key_padding_mask=y_padding)[0]
        return x + self.ff(x)


class MulT(nn.Module):
    """Two modalities (text, audio), sequence-first as in MulT: cross-modal blocks both ways, a
    self-attention layer, then a late fusion head on the concatenated last states."""

    def __init__(self, d_text=10, d_audio=6, d=16, heads=4, classes=3):
        super().__init__()
        self.proj_t = nn.Conv1d(d_text, d, 1)
        self.proj_a = nn.Conv1d(d_audio, d, 1)
        self.t_from_a = nn.ModuleList([CrossModalBlock(d, heads) for _ in range(2)])
        self.a_from_t = nn.ModuleList([CrossModalBlock(d, heads) for _ in range(2)])
        self.self_t = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0)
        self.out = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, classes))

    def forward(self, text, audio, text_padding=None, audio_padding=None):
        t = self.proj_t(text.transpose(1, 2)).permute(2, 0, 1)  # (L, B, d)
        a = self.proj_a(audio.transpose(1, 2)).permute(2, 0, 1)
        for block in self.t_from_a:
            t = block(t, a, audio_padding)
        for block in self.a_from_t:
            a = block(a, t, text_padding)
        t = self.self_t(t, src_key_padding_mask=text_padding)
        return self.out(torch.cat([t[-1], a[-1]], dim=-1))


class NoFusion(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(24, 5))

    def forward(self, x):
        return self.body(x) * 2


class DataDependent(nn.Module):
    """linear(cat) behind Python control flow on a tensor value: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, a, b):
        if a.sum() > 0:
            a = -a
        return self.fc(torch.cat([a, b], -1))


class TrainingDependent(nn.Module):
    """fx would freeze self.training into the graph: convert must leave it alone."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, a, b):
        return F.dropout(self.fc(torch.cat([a, b], -1)), 0.5, self.training)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.bad = DataDependent()
        self.fusion = nn.Sequential(nn.Linear(6, 4), nn.GELU(approximate="tanh"))
        self.reuse = nn.Linear(6, 6)

    def forward(self, a, b):
        x = torch.cat([a, b], -1)
        y = self.reuse(x) + x  # the cat is needed anyway: not rewritten
        return self.bad(a, b).sum(-1, keepdim=True) + self.fusion(torch.cat([a, b], -1)).sum(-1, keepdim=True) + y


class WeightsReaders(nn.Module):
    """Three ways of calling attention: convert may drop the weights only where nobody reads them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = (nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(3))

    def forward(self, x, y):
        out_a, _ = self.a(x, y, y)  # weights discarded
        out_b, weights = self.b(x, y, y)  # weights read
        out_c = self.c(x, y, y, None, True)[0]  # need_weights passed positionally
        return out_a + out_b + out_c + weights.sum(-1, keepdim=True)


# --------------------------------------------------------------------------- helpers


def outputs_and_grads(model, inputs):
    inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    gen = torch.Generator().manual_seed(5)
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input{i}": x.grad for i, x in enumerate(inputs) if x.grad is not None})
    return out.detach(), grads


def assert_equivalent(original, converted, inputs, tol=TOL):
    ref_out, ref_grads = outputs_and_grads(original, inputs)
    out, grads = outputs_and_grads(converted, inputs)
    torch.testing.assert_close(out, ref_out, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda m: f"grad {name}: {m}")


def count_calls(monkeypatch, name):
    """The positional arguments of every call to ops.<name>."""
    calls = []
    real = getattr(ops, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, name, spy)
    return calls


def three_modal_inputs(B=4):
    return [torch.randn(B, 5), torch.randn(B, 7), torch.randn(B, 3)]


def mult_inputs(B=3, Lt=7, La=5):
    text_padding = torch.zeros(B, Lt, dtype=torch.bool)
    text_padding[1, 4:] = True
    audio_padding = torch.zeros(B, La, dtype=torch.bool)
    audio_padding[2, 2:] = True
    return [torch.randn(B, Lt, 10), torch.randn(B, La, 6), text_padding, audio_padding]


# --------------------------------------------------------------------------- transformer decoder


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_transformer_decoder(batch_first, train):
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerDecoder(layer, num_layers=2).train(train)
    converted = mmkernels.convert(model)
    attn = [n for n, m in converted.named_modules() if type(m) is CrossModalAttention]
    assert attn == [f"layers.{i}.{a}" for i in range(2) for a in ("self_attn", "multihead_attn")]
    assert not any(type(m) is nn.MultiheadAttention for m in converted.modules())
    assert all(type(m) is nn.MultiheadAttention for n, m in model.named_modules() if n.endswith("attn"))  # a copy
    assert list(converted.state_dict()) == list(model.state_dict())

    B, T, S = 3, 6, 9
    tgt = torch.randn((B, T, 16) if batch_first else (T, B, 16))
    memory = torch.randn((B, S, 16) if batch_first else (S, B, 16))
    causal = nn.Transformer.generate_square_subsequent_mask(T)
    memory_padding = torch.zeros(B, S, dtype=torch.bool)
    memory_padding[0, 5:] = True

    class Call(nn.Module):  # the masks as keyword arguments, as users call a decoder
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, tgt, memory):
            return self.decoder(tgt, memory, tgt_mask=causal, tgt_is_causal=True,
                                memory_key_padding_mask=memory_padding)

    assert_equivalent(Call(model), Call(converted), [tgt, memory])


def test_transformer_encoder_fast_path_in_inference():
    # nn.TransformerEncoder in eval under no_grad takes PyTorch's nested-tensor fast path, which
    # reads self_attn's weights and calls self_attn.merge_masks: it must keep working and agree.
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    converted = mmkernels.convert(model)
    assert type(converted.layers[0].self_attn) is CrossModalAttention
    assert "fast path" in str(converted.mmkernels_report)
    x = torch.randn(3, 7, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 3:] = True
    with torch.no_grad():
        torch.testing.assert_close(converted(x, src_key_padding_mask=padding),
                                   model(x, src_key_padding_mask=padding), **TOL)
    # With gradients on, the layer calls our module.
    assert_equivalent(model, converted, [x])


def test_transformer_encoder_layer_fast_path_calls_merge_masks(monkeypatch):
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    converted = mmkernels.convert(layer)
    calls = []
    real = CrossModalAttention.merge_masks
    monkeypatch.setattr(CrossModalAttention, "merge_masks", lambda self, *a: (calls.append(1), real(self, *a))[1])
    x = torch.randn(3, 7, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 3:] = True
    with torch.no_grad():
        torch.testing.assert_close(converted(x, src_key_padding_mask=padding), layer(x, src_key_padding_mask=padding))
    assert calls == [1]  # PyTorch's native layer kernel ran, with our module's masks merged as MHA's


# --------------------------------------------------------------------------- MulT


def test_mult_style_model(monkeypatch):
    torch.manual_seed(2)
    model = MulT()
    converted = mmkernels.convert(model)
    report = converted.mmkernels_report
    replaced = dict(report.replaced)
    assert sum(1 for m in converted.modules() if type(m) is CrossModalAttention) == 5
    assert "self_t.self_attn" in replaced
    assert "fused_concat_linear" in replaced[""] and "gelu" in replaced[""]
    assert list(converted.state_dict()) == list(model.state_dict())

    attn_calls = count_calls(monkeypatch, "cross_modal_attention")
    fcl_calls = count_calls(monkeypatch, "fused_concat_linear")
    inputs = mult_inputs()
    for train in (True, False):
        model.train(train), converted.train(train)
        assert_equivalent(model, converted, inputs)
    # The rewritten cat + linear, once per mode (CrossModalAttention's float32 CPU projections are
    # one-input calls).
    assert sum(len(args[0]) > 1 for args in fcl_calls) == 2
    # CrossModalBlock calls attn(...)[0] under MHA's default need_weights=True; convert saw that the
    # weights are never read and passes need_weights=False, so all five attentions run the fused op.
    assert len(attn_calls) == 2 * 5
    assert sum("need_weights=False" in what for _, what in report.replaced) == 4


def test_need_weights_dropped_only_where_weights_are_unread(monkeypatch):
    from mmkernels.nn import cross_modal_attention as cma_module

    monkeypatch.setattr(cma_module, "_FEW_SCORES", 0)  # b's training step: weights beside the fused op
    torch.manual_seed(10)
    model = WeightsReaders()
    converted = mmkernels.convert(model)
    dropped = [what for _, what in converted.mmkernels_report.replaced if "need_weights=False" in what]
    assert [d.split("(")[0] for d in dropped] == ["a", "c"]
    calls = count_calls(monkeypatch, "cross_modal_attention")
    assert_equivalent(model, converted, [torch.randn(2, 3, 8), torch.randn(2, 5, 8)])
    # All three on the fused op; b still returns its weights (computed beside the output), a and c
    # skip computing them.
    assert len(calls) == 3
    plain = mmkernels.convert(model, attention=False)  # nothing swapped, so nothing to drop
    assert plain.mmkernels_report.replaced == [] and "forward" not in plain.__dict__


# --------------------------------------------------------------------------- three modalities


def test_three_modal_concat_linear(monkeypatch):
    torch.manual_seed(3)
    model = ThreeModal()
    converted = mmkernels.convert(model)
    report = converted.mmkernels_report
    assert len(report.replaced) == 2, report
    text = str(report)
    assert "nn.Linear fusion(torch.cat([3 inputs])) + relu -> fused_concat_linear" in text
    assert "F.linear(torch.cat([4 inputs])) + sigmoid -> fused_concat_linear" in text
    assert type(converted) is ThreeModal and isinstance(converted.fusion, nn.Linear)
    assert list(converted.state_dict()) == list(model.state_dict())
    calls = count_calls(monkeypatch, "fused_concat_linear")
    assert_equivalent(model, converted, three_modal_inputs())
    assert len(calls) == 2
    # The original model is untouched (inplace=False).
    assert "forward" not in model.__dict__


def test_converted_model_trains_saves_and_reloads_into_the_original_class():
    torch.manual_seed(4)
    model = MulT()
    converted = mmkernels.convert(model)
    inputs = mult_inputs()
    target = torch.randint(0, 3, (3,))
    opt_ref = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = torch.optim.SGD(converted.parameters(), lr=0.05)
    for _ in range(3):
        for m, o in ((model, opt_ref), (converted, opt)):
            o.zero_grad()
            F.cross_entropy(m(*inputs), target).backward()
            o.step()
    for (name, p_ref), (_, p) in zip(model.named_parameters(), converted.named_parameters()):
        torch.testing.assert_close(p, p_ref, **TOL, msg=lambda m: f"{name}: {m}")

    buf = io.BytesIO()
    torch.save(converted.state_dict(), buf)
    buf.seek(0)
    fresh = MulT()
    fresh.load_state_dict(torch.load(buf))
    fresh.eval(), converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inputs), converted(*inputs), **TOL)
    # And back: an unconverted state_dict loads into the converted model.
    converted.load_state_dict(MulT().state_dict())


def test_converted_model_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(11)
    model = nn.ModuleDict({"fuse": ThreeModal(), "block": CrossModalBlock(16, 4)})
    converted = mmkernels.convert(model)

    def step(m, a, b, c, seq):
        h = m["fuse"](a, b, c)  # (B, 10)
        return m["block"](seq, seq).sum() + h.sum()

    inputs = three_modal_inputs(B=3) + [torch.randn(4, 3, 16)]
    expected = step(converted, *inputs)
    compiled = torch.compile(lambda *xs: step(converted, *xs), fullgraph=True, backend="aot_eager")
    got = compiled(*inputs)
    torch.testing.assert_close(got, expected, **TOL)
    got.backward()


def test_copies_and_whole_model_pickles_keep_working():
    torch.manual_seed(5)
    model = ThreeModal()
    converted = mmkernels.convert(model)
    inputs = three_modal_inputs()
    twin = copy.deepcopy(converted)
    assert "forward" in twin.__dict__ and twin.__dict__["forward"].__self__ is twin
    torch.testing.assert_close(twin(*inputs), converted(*inputs))
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    # The unpickled module runs its class's forward (documented): same numbers.
    torch.testing.assert_close(loaded(*inputs), converted(*inputs), **TOL)


def test_fx_graph_module_is_rewritten_and_reverted():
    torch.manual_seed(12)
    model = ThreeModal()
    traced = torch.fx.symbolic_trace(model)  # a GraphModule: its graph is used as it is
    converted = mmkernels.convert(traced)
    assert len(converted.mmkernels_report.replaced) == 2, converted.mmkernels_report
    assert list(converted.state_dict()) == list(traced.state_dict())
    assert_equivalent(model, converted, three_modal_inputs())
    restored = mmkernels.revert(converted)
    assert "forward" not in restored.__dict__
    assert "cat" in restored.code and "_cat_linear" not in restored.code


# --------------------------------------------------------------------------- what is left alone


def test_nothing_to_convert():
    torch.manual_seed(6)
    model = NoFusion()
    converted = mmkernels.convert(model)
    report = converted.mmkernels_report
    assert report.replaced == [] and report.skipped == []
    assert "nothing to convert" in str(report)
    assert "forward" not in converted.__dict__
    assert_equivalent(model, converted, [torch.randn(2, 3, 8)], tol=dict(atol=0, rtol=0))


def test_untraceable_and_unsafe_modules_are_left_alone_with_a_reason():
    torch.manual_seed(7)
    model = Outer()
    converted = mmkernels.convert(model)
    report = converted.mmkernels_report
    skipped = dict(report.skipped)
    assert "does not trace with torch.fx" in skipped["bad"]
    assert "also used elsewhere" in skipped[""]
    assert [what for _, what in report.replaced] == [
        "nn.Linear fusion.0(torch.cat([2 inputs])) + gelu_tanh -> fused_concat_linear"
    ]
    assert "forward" not in converted.bad.__dict__
    inputs = [torch.randn(4, 2), torch.randn(4, 4)]
    assert_equivalent(model, converted, inputs)

    frozen = mmkernels.convert(TrainingDependent()).mmkernels_report
    assert "self.training" in dict(frozen.skipped)[""]


def test_switches_inplace_and_idempotence():
    torch.manual_seed(8)
    model = MulT()
    only_attention = mmkernels.convert(model, concat_linear=False)
    assert "forward" not in only_attention.__dict__ and type(only_attention.self_t.self_attn) is CrossModalAttention
    only_linear = mmkernels.convert(model, attention=False)
    assert "forward" in only_linear.__dict__ and type(only_linear.self_t.self_attn) is nn.MultiheadAttention

    same = mmkernels.convert(model, inplace=True)
    assert same is model and type(model.self_t.self_attn) is CrossModalAttention
    again = mmkernels.convert(model).mmkernels_report
    assert again.replaced == []  # already converted: nothing more to do
    with pytest.raises(TypeError, match="model"):
        mmkernels.convert(lambda x: x)


def test_shared_attention_module_stays_shared():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"a": mha, "b": mha})
    converted = mmkernels.convert(model)
    assert converted["a"] is converted["b"] and type(converted["a"]) is CrossModalAttention


# --------------------------------------------------------------------------- revert


def test_revert_restores_standard_modules():
    torch.manual_seed(9)
    model = MulT()
    converted = mmkernels.convert(model)
    restored = mmkernels.revert(converted)
    assert not any(type(m) is CrossModalAttention for m in restored.modules())
    assert type(restored.self_t.self_attn) is nn.MultiheadAttention
    assert "forward" not in restored.__dict__ and not hasattr(restored, "mmkernels_report")
    assert list(restored.state_dict()) == list(model.state_dict())
    assert_equivalent(model, restored, mult_inputs())
    # The converted model itself is untouched by a non-inplace revert.
    assert type(converted.self_t.self_attn) is CrossModalAttention and "forward" in converted.__dict__
