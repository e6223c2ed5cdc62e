"""Real architectures from transformers: attn_implementation "mmkernels" vs "sdpa" vs "eager" (issue 14).

A training step (forward, the model's own loss, backward to every parameter) and a greedy
generate() of small but realistically sized configs, random weights, the same weights for every
contender (copies of one model). The oracle is "sdpa": gradients within tolerance, generated tokens
identical. Skipped, with a note, where transformers is not installed.

Full profile: a CLIP ViT-B/32-sized vision and text tower at batch 8 (text padded), a
Whisper-base-sized encoder-decoder (1500 encoder frames), a 2-layer grouped-query decoder
(8 query heads over 2 kv heads) at sequence 1024, padded on the right for training and on the left
for generation. Quick: the same widths with fewer layers and shorter sequences.

Every case also notes attention's share of sdpa's step (on the CPU), and with it the most that any
attention backend could gain there: the rest of the step is the same code for all three.
"""
from __future__ import annotations

import copy
import warnings

import torch

from ..core import OURS, Built, Case, Contender, Suite, make_step, tol_for
from ..shares import cpu_time_share

CONTENDERS = (OURS, "sdpa", "eager")


def _transformers_missing() -> str | None:
    try:
        import transformers  # noqa: F401
        from mmkernels.integrations import transformers as backend

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            backend.register()
    except ImportError as err:
        return f"transformers not installed ({str(err).splitlines()[0][:80]})"
    return None


# --------------------------------------------------------------------------- models and inputs


def _clip(layers: int):
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=8, max_position_embeddings=77, eos_token_id=49407, pad_token_id=1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512)
    return transformers.CLIPModel(cfg)


def _clip_inputs(batch: int, device):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 49000, (batch, 77), generator=gen)
    lengths = torch.randint(8, 78, (batch,), generator=gen)
    mask = (torch.arange(77)[None] < lengths[:, None]).long()
    ids[torch.arange(batch), lengths - 1] = 49407  # eos closes each text
    ids[mask == 0] = 1
    pixels = torch.randn(batch, 3, 224, 224, generator=gen)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels.to(device),
                return_loss=True)


def _whisper(layers: int, frames: int):
    import transformers

    cfg = transformers.WhisperConfig(
        vocab_size=51865, num_mel_bins=80, encoder_layers=layers, decoder_layers=layers, d_model=512,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
        max_source_positions=frames, max_target_positions=448, pad_token_id=50257, bos_token_id=50257,
        eos_token_id=50257, decoder_start_token_id=50258, suppress_tokens=None, begin_suppress_tokens=None)
    return transformers.WhisperForConditionalGeneration(cfg)


def _whisper_inputs(batch: int, frames: int, target: int, device):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(batch, 80, 2 * frames, generator=gen)
    labels = torch.randint(0, 50000, (batch, target), generator=gen)
    return dict(input_features=features.to(device), labels=labels.to(device))


def _decoder(layers: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _decoder_inputs(batch: int, length: int, device, training: bool = True):
    """Training: right padding, padded labels ignored. Generation: left padding. (Left padding in
    training would make the last pad position predict the first token: a fully masked query row,
    where eager attention's uniform average and SDPA's differ.)"""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8192, (batch, length), generator=gen)
    pad = torch.randint(0, length // 4, (batch,), generator=gen)
    pad[0] = 0
    pos = torch.arange(length)[None]
    mask = (pos < (length - pad)[:, None] if training else pos >= pad[:, None]).long()
    ids[mask == 0] = 0
    out = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
    if training:
        out["labels"] = ids.masked_fill(mask == 0, -100).to(device)
    return out


# --------------------------------------------------------------------------- steps


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()  # generate()'s notes on max_length, once per call


def _copies(make, device):
    """One model per contender, same weights, attn_implementation set."""
    _quiet()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = make().to(device)
    models = {}
    for name in CONTENDERS:
        m = copy.deepcopy(base)
        m.set_attn_implementation("mmkernels" if name == OURS else name)
        models[name] = m
    return models


def _train_step(model, inputs):
    """Forward, the model's loss, gradients of every parameter: returns the loss and the gradients."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = model(**inputs).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    return step


def _flat(output) -> torch.Tensor:
    """A training step's loss and gradients as one vector, for the check only (never timed), so that
    the runner's relative error is taken over the whole gradient: per tensor, a gradient that is
    zero in exact arithmetic (a key projection's bias: softmax ignores a shift shared by every key)
    is rounding noise in every contender, and its relative error means nothing."""
    loss, grads = output
    return torch.cat([loss.reshape(1)] + [g.reshape(-1) for g in grads])


# SDPA's entry point (its forward, whichever backend it picks, inside) and its CPU flash backward,
# which every training case here runs (a math-path backward would be missed: the bound too low).
SDPA_OPS = {"aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def _ceiling(contenders: list[Contender], device) -> list[str]:
    """Amdahl's bound for the case, as a note: attention's share of sdpa's step (CPU only), and so the
    most any attention backend could gain over sdpa here; the rest of the step is the same for all."""
    if device.type != "cpu":
        return []
    share = cpu_time_share(next(c.step for c in contenders if c.name == "sdpa"), SDPA_OPS)
    bound = 1 / (1 - share) if share < 1 else float("inf")
    return [f"attention is {share:.0%} of sdpa's step (torch.profiler): no attention backend can be more "
            f"than {bound:.2f}x faster than sdpa on it"]


def _build_train(make, inputs, device) -> Built:
    models = _copies(make, device)
    contenders = []
    for name, model in models.items():
        model.train()  # dropout is 0 in these configs: train mode for the model's own training branches
        contenders.append(Contender(name, _train_step(model, inputs)))
    return Built(contenders, oracle="sdpa", tol=tol_for(torch.float32), check_layout=dict.fromkeys(CONTENDERS, _flat),
                 notes=_ceiling(contenders, device))


def _build_generate(make, generate, device) -> Built:
    models = _copies(make, device)
    contenders = []
    for name, model in models.items():
        model.eval()
        contenders.append(Contender(name, make_step(lambda m=model: generate(m), "fwd", [], None)))
    # Tokens must be identical: any difference is a whole token id.
    return Built(contenders, oracle="sdpa", tol=0.0, notes=_ceiling(contenders, device))


def _profile(quick: bool) -> list[Case]:
    layers = 2 if quick else None
    specs = []
    # CLIP ViT-B/32 towers: vision 768 wide, 50 tokens; text 512 wide, 77 tokens padded.
    L = layers or 12
    specs.append(("train", f"CLIP ViT-B/32 towers L{L} B8 text pad", {"model": "clip", "layers": L, "B": 8},
                  lambda device, L=L: _build_train(lambda: _clip(L), _clip_inputs(8, device), device)))
    # Whisper-base: d512, 8 heads; 1500 encoder frames (quick 500), 64 target tokens.
    L, frames = layers or 6, 500 if quick else 1500
    specs.append(("train", f"Whisper-base L{L}+{L} B2 frames{frames} T64",
                  {"model": "whisper", "layers": L, "B": 2, "frames": frames, "T": 64},
                  lambda device, L=L, f=frames: _build_train(lambda: _whisper(L, f), _whisper_inputs(2, f, 64, device),
                                                             device)))
    # Grouped-query decoder: 8 query heads over 2 kv heads, d512.
    seq = 512 if quick else 1024
    specs.append(("train", f"GQA decoder L2 H8/2 B2 S{seq} right pad", {"model": "gqa", "layers": 2, "B": 2, "S": seq},
                  lambda device, s=seq: _build_train(lambda: _decoder(2), _decoder_inputs(2, s, device), device)))
    new = 16 if quick else 32

    def gen_decoder(device, s=seq, n=new):
        inputs = _decoder_inputs(2, s, device, training=False)
        return _build_generate(lambda: _decoder(2), lambda m: m.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1), device)

    specs.append(("generate", f"GQA decoder L2 H8/2 B2 prompt{seq} +{new} left pad",
                  {"model": "gqa", "layers": 2, "B": 2, "S": seq, "new_tokens": new}, gen_decoder))

    def gen_whisper(device, L=layers or 6, f=frames, n=new):
        features = _whisper_inputs(2, f, 1, device)["input_features"]
        return _build_generate(lambda: _whisper(L, f), lambda m: m.generate(
            input_features=features, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1), device)

    specs.append(("generate", f"Whisper-base L{layers or 6}+{layers or 6} B2 frames{frames} +{new}",
                  {"model": "whisper", "layers": layers or 6, "B": 2, "frames": frames, "new_tokens": new},
                  gen_whisper))
    # A training step is the runner's "fwd+bwd" mode, a generate() run its "fwd" (no_grad) one. The
    # default run takes the small CLIP training step only (the models cost tens of seconds each).
    return [
        Case(suite="models", shape=f"{kind}: {shape}", mode="fwd+bwd" if kind == "train" else "fwd",
             dtype=torch.float32, build=build, params=params,
             baselines=CONTENDERS[1:], devices=("cpu", "cuda"), default=quick and i == 0)
        for i, (kind, shape, params, build) in enumerate(specs)
    ]


def _cases() -> list[Case]:
    # The small profile (fewer layers, shorter sequences) and the realistically sized one.
    return _profile(quick=True) + _profile(quick=False)


SUITE = Suite(
    "models", "transformers models with attn_implementation 'mmkernels' vs 'sdpa' vs 'eager' (training step, generate)",
    _cases,
    contenders={
        OURS: "the model with attn_implementation='mmkernels' (every attention through cross_modal_attention)",
        "sdpa": "the same model and weights with attn_implementation='sdpa' (the oracle)",
        "eager": "the same model and weights with attn_implementation='eager' (transformers' matmul-softmax code)",
    },
    unavailable=_transformers_missing,
)
