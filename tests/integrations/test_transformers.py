"""attn_implementation="mmkernels" in transformers models, offline (tiny random configs, no downloads).

Every model family runs the same checks against transformers' own "eager" and "sdpa" attention on the
same weights: outputs (float32, bfloat16), every parameter's gradient, greedy generate() token for
token, torch.compile of the forward, convert()/revert(). Each check also asserts that the fused op
really ran (a counting wrapper around mmkernels.ops.cross_modal_attention).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from mmkernels.integrations import transformers as backend  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

@pytest.fixture
def op_calls(monkeypatch):
    """Records (Lq, Lk) of every call of the fused op."""
    calls = []
    inner = mmkernels.ops.cross_modal_attention

    def counting(*args, **kwargs):
        calls.append((args[0].shape[2], args[1].shape[2]))
        return inner(*args, **kwargs)

    monkeypatch.setattr(mmkernels.ops, "cross_modal_attention", counting)
    return calls


@pytest.fixture(autouse=True, scope="module")
def _registered():
    backend.register()
    transformers.logging.set_verbosity_error()


# --------------------------------------------------------------------------- the model families


@dataclasses.dataclass
class Family:
    name: str
    make: Callable[[], torch.nn.Module]  # a model in eval mode, attn_implementation="eager"
    inputs: Callable[[], dict]  # fresh random inputs
    pick: Callable[[object, dict], list]  # the output tensors to compare (valid positions only)
    generate: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None


def _tiny(**kw):
    base = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    return {**base, **kw}


def _clip():
    cfg = transformers.CLIPConfig(
        text_config=_tiny(vocab_size=99, max_position_embeddings=16, eos_token_id=98, pad_token_id=1, bos_token_id=0),
        vision_config=_tiny(image_size=30, patch_size=6), projection_dim=16)
    return transformers.CLIPModel(cfg)


def _clip_inputs():
    ids = torch.randint(3, 97, (3, 11))
    mask = torch.ones_like(ids)
    for b, n in enumerate((11, 7, 4)):  # right padding, eos last
        ids[b, n - 1], ids[b, n:], mask[b, n:] = 98, 1, 0
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(3, 3, 30, 30))


def _clip_pick(out, inputs):
    valid = inputs["attention_mask"].bool()
    return [out.text_model_output.last_hidden_state[valid], out.vision_model_output.last_hidden_state,
            out.logits_per_text]


def _whisper():
    cfg = transformers.WhisperConfig(
        vocab_size=100, num_mel_bins=16, encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_source_positions=15,
        max_target_positions=40, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
        suppress_tokens=None, begin_suppress_tokens=None)
    return transformers.WhisperForConditionalGeneration(cfg)


def _whisper_inputs():
    return dict(input_features=torch.randn(2, 16, 30), decoder_input_ids=torch.randint(3, 100, (2, 6)))


def _whisper_generate(model, inputs):
    return model.generate(input_features=inputs["input_features"], max_new_tokens=8, do_sample=False,
                          num_beams=1)


def _bert_decoder():
    cfg = transformers.BertConfig(vocab_size=99, **_tiny(), is_decoder=True, add_cross_attention=True,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertLMHeadModel(cfg)


def _bert_inputs():
    ids = torch.randint(3, 99, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = mask[2, 3:] = 0
    enc_mask = torch.ones(3, 7, dtype=torch.long)
    enc_mask[0, 5:] = enc_mask[2, 2:] = 0
    return dict(input_ids=ids, attention_mask=mask, encoder_hidden_states=torch.randn(3, 7, 32),
                encoder_attention_mask=enc_mask)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=101, **_tiny(hidden_size=64), num_key_value_heads=2,
                                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _llama_inputs():
    ids = torch.randint(3, 101, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :6] = 0  # left padding, as for generation
    ids[mask == 0] = 0
    return dict(input_ids=ids, attention_mask=mask)


def _llama_generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1, min_new_tokens=8)


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(**_tiny(), image_size=30, patch_size=6))


def _logits_at_valid(out, inputs):
    return [out.logits[inputs["attention_mask"].bool()]]


FAMILIES = {
    "clip": Family("clip", _clip, _clip_inputs, _clip_pick),
    "whisper": Family("whisper", _whisper, _whisper_inputs, lambda out, inputs: [out.logits, out.encoder_last_hidden_state],
                      _whisper_generate),
    "bert_decoder": Family("bert_decoder", _bert_decoder, _bert_inputs, _logits_at_valid),
    "llama_gqa": Family("llama_gqa", _llama, _llama_inputs, _logits_at_valid, _llama_generate),
    "vit": Family("vit", _vit, lambda: dict(pixel_values=torch.randn(2, 3, 30, 30)),
                  lambda out, inputs: [out.last_hidden_state, out.pooler_output]),
}
GENERATING = [name for name, family in FAMILIES.items() if family.generate is not None]


def _model(family: Family, implementation: str, dtype=torch.float32):
    torch.manual_seed(1234)  # same weights for every implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = family.make()
    model.set_attn_implementation(implementation)
    return model.to(dtype).eval()


def _rel_err(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _run(model, inputs, family):
    return [t.float() for t in family.pick(model(**inputs), inputs)]


# --------------------------------------------------------------------------- per family


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_match_eager_and_sdpa_float32(name, op_calls):
    family = FAMILIES[name]
    inputs = family.inputs()
    with torch.no_grad():
        got = _run(_model(family, "mmkernels"), inputs, family)
        assert op_calls, "the mmkernels attention was never called"
        for reference in ("eager", "sdpa"):
            want = _run(_model(family, reference), inputs, family)
            for i, (a, b) in enumerate(zip(got, want)):
                assert _rel_err(a, b) < 2e-5, f"{name} output {i} vs {reference}: {_rel_err(a, b):.2e}"


@pytest.mark.parametrize("name", FAMILIES)
def test_outputs_bfloat16_as_close_as_sdpa(name, op_calls):
    """bfloat16 against the float64 result: within twice SDPA's own bfloat16 error. (The float64 oracle
    is SDPA's: eager float64 attention turns fully padded query rows into NaN, which then reaches valid
    rows through the keys of the next layer.)"""
    family = FAMILIES[name]
    inputs = family.inputs()
    as_dtype = lambda d, x: {k: v.to(d) if v.is_floating_point() else v for k, v in x.items()}  # noqa: E731
    with torch.no_grad():
        exact = _run(_model(family, "sdpa", torch.float64), as_dtype(torch.float64, inputs), family)
        ours = _run(_model(family, "mmkernels", torch.bfloat16), as_dtype(torch.bfloat16, inputs), family)
        sdpa = _run(_model(family, "sdpa", torch.bfloat16), as_dtype(torch.bfloat16, inputs), family)
    assert op_calls
    for i, (a, s, e) in enumerate(zip(ours, sdpa, exact)):
        assert _rel_err(a, e) <= 2 * _rel_err(s, e) + 4e-3, (
            f"{name} output {i}: bfloat16 error {_rel_err(a, e):.2e}, sdpa's {_rel_err(s, e):.2e}")


@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_gradient_matches_eager(name, op_calls):
    family = FAMILIES[name]
    inputs = family.inputs()
    grads = {}
    for implementation in ("mmkernels", "eager"):
        model = _model(family, implementation)
        outs = family.pick(model(**inputs), inputs)
        torch.manual_seed(7)
        loss = sum((o * torch.randn_like(o)).sum() for o in outs)
        params = [p for p in model.parameters() if p.requires_grad]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        got = torch.autograd.grad(loss, params, allow_unused=True)
        grads[implementation] = dict(zip(names, got))
    assert op_calls
    # Gradients that are zero in exact arithmetic (a key projection's bias: softmax ignores a shift
    # that is the same for every key) are rounding noise in both; they are held to the model's scale.
    scale = max(g.abs().max().item() for g in grads["eager"].values() if g is not None)
    checked = 0
    for pname, want in grads["eager"].items():
        have = grads["mmkernels"][pname]
        if want is None:
            assert have is None or not have.any(), f"{name}: {pname} has a gradient only with mmkernels"
            continue
        assert have is not None, f"{name}: {pname} lost its gradient"
        torch.testing.assert_close(have, want, atol=2e-5 * want.abs().max().item() + 2e-6 * scale, rtol=1e-4,
                                   msg=lambda m, p=pname: f"{name}: gradient of {p}: {m}")
        checked += 1
    assert checked > 10


@pytest.mark.parametrize("name", GENERATING)
def test_greedy_generate_token_identical_to_eager(name, op_calls):
    family = FAMILIES[name]
    inputs = family.inputs()
    tokens = {}
    for implementation in ("mmkernels", "eager", "sdpa"):
        with torch.no_grad():
            tokens[implementation] = family.generate(_model(family, implementation), inputs)
    assert op_calls
    # Decoding steps read a cache: fewer queries than keys (one query, or one per head of a group).
    assert any(lq < lk for lq, lk in op_calls), "no decoding step with a cache ran through mmkernels"
    assert torch.equal(tokens["mmkernels"], tokens["eager"]), f"{tokens['mmkernels']}\n{tokens['eager']}"
    assert torch.equal(tokens["mmkernels"], tokens["sdpa"])


# Inductor's C++ code generation costs minutes per model on two cores: one family gets it, the others
# the aot_eager backend (the same dynamo capture of the op, its fake and the model, without codegen).
COMPILE_BACKEND = {name: "inductor" if name == "llama_gqa" else "aot_eager" for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_compile_of_the_forward(name, op_calls):
    family = FAMILIES[name]
    inputs = family.inputs()
    model = _model(family, "mmkernels")
    torch._dynamo.reset()
    with torch.no_grad():
        want = _run(_model(family, "eager"), inputs, family)
        compiled = torch.compile(model, backend=COMPILE_BACKEND[name])
        got = [t.float() for t in family.pick(compiled(**inputs), inputs)]
    assert op_calls
    for i, (a, b) in enumerate(zip(got, want)):
        assert _rel_err(a, b) < 2e-5, f"{name} compiled output {i}: {_rel_err(a, b):.2e}"


@pytest.mark.parametrize("name", FAMILIES)
def test_convert_and_revert_round_trip(name, op_calls):
    family = FAMILIES[name]
    inputs = family.inputs()
    original = _model(family, "sdpa")
    before = backend._implementations(original.config)
    converted = mmkernels.convert(original)
    assert converted is not original and original.config._attn_implementation == "sdpa"
    assert all(v == "mmkernels" for v in _leaves(backend._implementations(converted.config)))
    assert any("attn_implementation" in what for _, what in converted.mmkernels_report.replaced)
    with torch.no_grad():
        got, want = _run(converted, inputs, family), _run(original, inputs, family)
    assert op_calls
    for a, b in zip(got, want):
        assert _rel_err(a, b) < 2e-5
    reverted = mmkernels.revert(converted)
    assert backend._implementations(reverted.config) == before
    assert list(reverted.state_dict()) == list(original.state_dict())
    calls = len(op_calls)
    with torch.no_grad():
        _run(reverted, inputs, family)
    assert len(op_calls) == calls, "the reverted model still runs mmkernels"


def _leaves(tree):
    for key, value in tree.items():
        yield from (_leaves(value) if isinstance(value, dict) else [value])


# --------------------------------------------------------------------------- the attention function itself


class _Attention(torch.nn.Module):
    """What transformers passes as `module`: is_causal and num_key_value_groups as in its models."""

    def __init__(self, is_causal=False, groups=1):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, groups


def _qkv(B=2, H=4, H_kv=4, Lq=5, Lk=7, D=8, dtype=torch.float32, requires_grad=False):
    q = torch.randn(B, Lq, H, D, dtype=dtype).transpose(1, 2)  # transformers' layout: a transpose view
    k = torch.randn(B, Lk, H_kv, D, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, Lk, H_kv, D, dtype=dtype).transpose(1, 2)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _padding_mask(B, Lq, Lk, causal=False, left=True):
    lengths = torch.randint(1, Lk + 1, (B,))
    lengths[0] = Lk
    pos = torch.arange(Lk)
    keep = pos[None] >= (Lk - lengths)[:, None] if left else pos[None] < lengths[:, None]
    mask = keep[:, None, None, :].expand(B, 1, Lq, Lk)
    if causal:
        mask = mask & torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    return mask


MASK_CASES = {
    "none": lambda B, Lq, Lk: None,
    "bool_padding_left": lambda B, Lq, Lk: _padding_mask(B, Lq, Lk),
    "bool_padding_right": lambda B, Lq, Lk: _padding_mask(B, Lq, Lk, left=False),
    "bool_causal_padding": lambda B, Lq, Lk: _padding_mask(B, Lq, Lk, causal=True),
    "float_additive": lambda B, Lq, Lk: torch.randn(B, 1, Lq, Lk),
}


def _valid_rows(mask, out):
    """Rows that see at least one key (fully masked rows: zeros here, NaN or a mean elsewhere)."""
    if mask is None or mask.dtype != torch.bool:
        return out
    seen = mask.expand(out.shape[0], 1, out.shape[1], -1).any(-1)[:, 0]  # (B, Lq)
    return out[seen]


@pytest.mark.parametrize("mask_kind", MASK_CASES)
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("lengths", [(5, 5), (5, 9), (1, 9)])
def test_attention_function_matches_sdpa(mask_kind, is_causal, heads, lengths):
    (H, H_kv), (Lq, Lk) = heads, lengths
    module = _Attention(is_causal=is_causal, groups=H // H_kv)
    q, k, v = _qkv(B=3, H=H, H_kv=H_kv, Lq=Lq, Lk=Lk, requires_grad=True)
    mask = MASK_CASES[mask_kind](3, Lq, Lk)
    out, weights = backend.attention_forward(module, q, k, v, mask, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert weights is None and out.shape == (3, Lq, H, 8)
    assert out.is_contiguous() or Lq == 1, "the (B, L, H, D) output should be the op's storage, not a copy"
    torch.testing.assert_close(_valid_rows(mask, out), _valid_rows(mask, want), atol=2e-6, rtol=2e-5)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(_valid_rows(mask, out * g).sum(), (q, k, v))
    want_grads = torch.autograd.grad(_valid_rows(mask, want * g).sum(), (q, k, v))
    for a, b, what in zip(got_grads, want_grads, "qkv"):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, w=what: f"grad of {w}: {m}")


def test_output_is_a_view_of_the_op_storage():
    q, k, v = _qkv(H=4, Lq=6, Lk=6)
    out, _ = backend.attention_forward(_Attention(), q, k, v, None)
    merged = out.reshape(2, 6, -1)  # what the model does next
    assert out.is_contiguous() and merged.data_ptr() == out.data_ptr()


def test_static_cache_prefill_crops_the_empty_tail():
    """No mask, causal, more keys than queries (an empty static cache): upper-left, as SDPA."""
    module = _Attention(is_causal=True, groups=2)
    q, k, v = _qkv(H=4, H_kv=2, Lq=4, Lk=10)
    out, _ = backend.attention_forward(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-5)


def test_position_bias_gets_its_gradient():
    module = _Attention()
    q, k, v = _qkv(H=4, Lq=5, Lk=7, requires_grad=True)
    bias = torch.randn(1, 4, 5, 7, requires_grad=True)
    mask = _padding_mask(2, 5, 7)
    out, _ = backend.attention_forward(module, q, k, v, mask, position_bias=bias)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, position_bias=bias)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), (bias, q))
    expected = torch.autograd.grad((want * g).sum(), (bias, q))
    assert got[0].abs().sum() > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_dropout_reaches_the_op():
    module = _Attention()
    q, k, v = _qkv(H=4, Lq=16, Lk=16)
    plain, _ = backend.attention_forward(module, q, k, v, None, dropout=0.0)
    torch.manual_seed(3)
    dropped, _ = backend.attention_forward(module, q, k, v, None, dropout=0.5)
    torch.manual_seed(3)
    again, _ = backend.attention_forward(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(plain, dropped) and torch.equal(dropped, again)


@pytest.mark.parametrize("option", ["softcap", "output_attentions"])
def test_unsupported_options_take_the_eager_path_with_a_warning(option, monkeypatch, op_calls):
    monkeypatch.setattr(mmkernels.ops._common, "_warned", set())
    module = _Attention(is_causal=True, groups=2)
    q, k, v = _qkv(H=4, H_kv=2, Lq=5, Lk=5)
    kwargs = {"softcap": 2.0} if option == "softcap" else {"output_attentions": True}
    with pytest.warns(RuntimeWarning, match="eager"):
        out, weights = backend.attention_forward(module, q, k, v, None, scaling=0.25, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        backend.attention_forward(module, q, k, v, None, scaling=0.25, **kwargs)
    assert not op_calls and weights is not None
    scores = (q @ k.repeat_interleave(2, 1).transpose(2, 3)) * 0.25
    if option == "softcap":
        scores = torch.tanh(scores / 2.0) * 2.0
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    want = (scores.softmax(-1) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=2e-5)


def test_output_attentions_in_a_model_returns_eager_weights():
    family = FAMILIES["llama_gqa"]
    inputs = family.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            ours = _model(family, "mmkernels")(**inputs, output_attentions=True)
            eager = _model(family, "eager")(**inputs, output_attentions=True)
    assert len(ours.attentions) == 2 and all(w is not None for w in ours.attentions)
    for a, b in zip(ours.attentions, eager.attentions):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- registration


def test_register_is_idempotent_and_every_entry_point_accepts_the_name(tmp_path, op_calls):
    assert backend.register() == backend.register() == "mmkernels" and backend.is_registered()
    assert transformers.AttentionInterface._global_mapping["mmkernels"] is backend.attention_forward
    cfg = transformers.ViTConfig(**_tiny(), image_size=30, patch_size=6)
    model = transformers.ViTModel._from_config(cfg, attn_implementation="mmkernels")
    assert model.config._attn_implementation == "mmkernels"
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="mmkernels")
    assert loaded.config._attn_implementation == "mmkernels"
    with torch.no_grad():
        loaded(pixel_values=torch.randn(1, 3, 30, 30))
    assert op_calls


def test_register_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'mmkernels\[transformers\]'"):
        backend.register()


def test_convert_switches_a_tower_inside_a_user_module(op_calls):
    class Fusion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = _model(FAMILIES["vit"], "sdpa")
            self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, pixel_values, text):
            image = self.vision(pixel_values=pixel_values).last_hidden_state
            return self.attn(text, image, image)[0]

    model = Fusion().eval()
    converted = mmkernels.convert(model)
    report = str(converted.mmkernels_report)
    assert "vision" in report and "attn_implementation" in report and "CrossModalAttention" in report
    x, text = torch.randn(2, 3, 30, 30), torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x, text), model(x, text), atol=2e-5, rtol=1e-4)
    assert op_calls
    reverted = mmkernels.revert(converted)
    assert reverted.vision.config._attn_implementation == "sdpa"
    assert type(reverted.attn) is torch.nn.MultiheadAttention


def test_models_bench_suite_is_listed_with_transformers_installed():
    from mmkernels.bench.suites import SUITES

    suite = SUITES["models"]
    assert suite.unavailable() is None
    cases = suite.select("full")
    assert {c.mode for c in cases} == {"fwd", "fwd+bwd"} and len(cases) == 10
    assert all(c.baselines == ("sdpa", "eager") for c in cases)
    assert len(suite.select("default")) == 1  # one small case keeps the default run short


def test_models_bench_case_checks_times_and_notes_its_ceiling():
    # The default case (CLIP towers, 2 layers) through the runner: the three contenders agree on the
    # loss and every gradient, and the note gives attention's share of sdpa's step and its bound.
    import re

    from mmkernels.bench.core import Options
    from mmkernels.bench.runner import run_case
    from mmkernels.bench.suites import SUITES
    from mmkernels.bench.timing import Budget

    (case,) = SUITES["models"].select("default")
    tiny = Budget(warmup=0, min_reps=3, max_reps=3, seconds=0.01, min_sample_s=1e-4, max_seconds=0.1)
    res = run_case(case, torch.device("cpu"), tiny, Options(memory=False))
    assert not res.error and set(res.times) == {"mmkernels", "sdpa", "eager"} and res.rel_err["mmkernels"] < 3e-3
    (note,) = res.notes
    share, bound = re.fullmatch(r"attention is (\d+)% of sdpa's step .* more than ([\d.]+)x faster .*", note).groups()
    assert 0 < int(share) < 50 and float(bound) == pytest.approx(1 / (1 - int(share) / 100), abs=0.02)


# --------------------------------------------------------------------------- masks built once per forward


@pytest.fixture
def op_kwargs(monkeypatch):
    """Records the keyword arguments of every call of the fused op."""
    calls = []
    inner = mmkernels.ops.cross_modal_attention

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return inner(*args, **kwargs)

    monkeypatch.setattr(mmkernels.ops, "cross_modal_attention", recording)
    return calls


def _padding_2d(kind, B, length, start=0):
    """A 2-D padding mask as transformers hands it to mask functions (bool, True = token), its
    padding at or after start."""
    keep = torch.ones(B, length, dtype=torch.bool)
    if kind == "right":
        keep[1, length - 2:] = keep[2, length - 3:] = False
    elif kind == "left":
        keep[1, start: start + 2] = keep[2, start: start + 3] = False
    elif kind == "holes":
        keep[1, start + 1] = keep[2, start::2] = False
    return None if kind == "none" else keep


# (q_length, kv_length, q_offset, kv_offset, 2-D mask length, the causal flag the layout should take
# or None where no layout fits): training and prefill, one query after a cache, a chunk of queries
# after a cache (lower-right), a static cache's prefill (upper-left, empty tail padded), a static
# cache part-filled (no flag fits: the 4-D mask), and a cache whose window starts past position 0.
CAUSAL_GEOMETRIES = [(5, 5, 0, 0, 5, 1), (1, 9, 8, 0, 9, 0), (3, 9, 6, 0, 9, 2), (4, 10, 0, 0, 4, 1),
                     (2, 10, 3, 0, 5, None), (3, 6, 7, 4, 10, 2)]


def _build_both(kind, padding, geometry):
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    q_len, kv_len, q_off, kv_off, mask_len, _ = geometry
    args = dict(batch_size=3, q_length=q_len, kv_length=kv_len, q_offset=q_off, kv_offset=kv_off,
                mask_function=causal_mask_function if kind == "causal" else bidirectional_mask_function,
                attention_mask=_padding_2d(padding, 3, mask_len, kv_off), allow_is_causal_skip=kind == "causal",
                allow_is_bidirectional_skip=False, dtype=torch.float32, device="cpu")
    return backend.build_mask(**args), sdpa_mask(**args)


@pytest.mark.parametrize("padding", ["none", "all_kept", "right", "left", "holes"])
@pytest.mark.parametrize("geometry", CAUSAL_GEOMETRIES + [(5, 7, 0, 0, 7, 0)], ids=str)
def test_build_mask_returns_sdpas_mask_and_a_layout_that_stands_for_it(padding, geometry):
    kind = "bidirectional" if geometry == (5, 7, 0, 0, 7, 0) else "causal"
    ours, sdpa = _build_both(kind, padding, geometry)
    if sdpa is None:
        assert ours is None  # SDPA's is_causal shortcut: the attention function's own causal rule
        return
    assert ours.dtype == torch.bool and torch.equal(ours, sdpa)
    layout = getattr(ours, backend._LAYOUT, None)
    if geometry[-1] is None:
        assert layout is None, "no causal flag fits this geometry: the op must get the 4-D mask"
        return
    assert layout is not None and layout.causal == geometry[-1]
    assert torch.equal(layout.dense().expand_as(ours), ours)
    assert (layout.kv_lengths is not None) == (padding == "right")  # right padding: the cheap form
    assert (layout.key_padding_mask is not None) == (padding in ("left", "holes"))


def test_build_mask_leaves_custom_mask_functions_to_the_dense_mask():
    from transformers.masking_utils import sliding_window_causal_mask_function

    mask = backend.build_mask(batch_size=3, q_length=6, kv_length=6,
                              mask_function=sliding_window_causal_mask_function(3),
                              attention_mask=_padding_2d("left", 3, 6), allow_is_causal_skip=False)
    assert mask is not None and getattr(mask, backend._LAYOUT, None) is None


# Where SDPA's builder returns a mask with a layout (without padding it returns none for training,
# one-query decoding and a static cache's prefill: is_causal, covered by the mask-free tests).
LAYOUT_CASES = [(p, g) for g in CAUSAL_GEOMETRIES if g[-1] is not None
                for p in ("none", "right", "left", "holes") if p != "none" or g[2] != 0 and g[0] > 1]


@pytest.mark.parametrize("padding, geometry", LAYOUT_CASES, ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_attention_with_a_layout_matches_the_dense_mask(padding, geometry, heads, op_kwargs):
    ours, _ = _build_both("causal", padding, geometry)
    (H, H_kv), (q_len, kv_len) = heads, geometry[:2]
    module = _Attention(is_causal=True, groups=H // H_kv)
    q, k, v = _qkv(B=3, H=H, H_kv=H_kv, Lq=q_len, Lk=kv_len, requires_grad=True)
    out, _ = backend.attention_forward(module, q, k, v, ours, scaling=0.3)
    dense = ours.clone()  # the same mask without its layout
    assert getattr(dense, backend._LAYOUT, None) is None
    want, _ = sdpa_attention_forward(module, q, k, v, dense, scaling=0.3)
    dense_passed = type(op_kwargs[0].get("attn_mask")) is torch.Tensor  # (a CausalBias is a subclass)
    assert not dense_passed, op_kwargs[0]
    torch.testing.assert_close(_valid_rows(dense, out), _valid_rows(dense, want), atol=2e-6, rtol=2e-5)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(_valid_rows(dense, out * g).sum(), (q, k, v))
    want_grads = torch.autograd.grad(_valid_rows(dense, want * g).sum(), (q, k, v))
    for a, b, what in zip(got_grads, want_grads, "qkv"):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m, w=what: f"grad of {w}: {m}")


def test_a_left_padded_generate_passes_padding_not_a_4d_mask(op_kwargs):
    """Llama's generate() with left padding: prefill and decoding steps get key_padding_mask (and
    the causal flag in prefill), never the 4-D mask."""
    family = FAMILIES["llama_gqa"]
    with torch.no_grad():
        family.generate(_model(family, "mmkernels"), family.inputs())
    assert op_kwargs and all(kw.get("attn_mask") is None and "key_padding_mask" in kw for kw in op_kwargs)
    assert any(kw.get("is_causal") for kw in op_kwargs) and not all(kw.get("is_causal") for kw in op_kwargs)


def test_a_right_padded_training_forward_passes_kv_lengths(op_kwargs):
    family = FAMILIES["llama_gqa"]
    inputs = family.inputs()
    inputs["attention_mask"] = inputs["attention_mask"].flip(-1)
    model = _model(family, "mmkernels").train()
    model(**inputs).logits.sum().backward()
    assert len(op_kwargs) == 2 and all(
        kw.get("attn_mask") is None and "kv_lengths" in kw and kw.get("is_causal") for kw in op_kwargs)
