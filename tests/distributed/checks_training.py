"""Checks run on 2 ranks by test_training.py: data-parallel training (DDP, FSDP2) of models built on
mmkernels equals one process training on the same global batch; optimizer steps keep the ranks
identical; FSDP2's distributed state_dict round-trips; activation checkpointing with attention dropout
reproduces the plain gradients exactly; torch.compile of a DDP-wrapped converted model. float64
throughout, so that 1e-10 separates a right answer from a wrong one."""
from __future__ import annotations

import copy
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import mmkernels
from mmkernels.nn import CrossModalAttention, FusedConcatLinear, LowRankFusion

F64 = torch.float64
TOL = dict(atol=1e-10, rtol=1e-9)
GLOBAL_BATCH = 8


class Fusion(nn.Module):
    """Text tokens attend to image patches (CrossModalAttention); the pooled result and an audio
    vector are fused twice (FusedConcatLinear and LowRankFusion) and classified."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = CrossModalAttention(16, 4, dropout=dropout, batch_first=True)
        self.fuse = FusedConcatLinear([16, 8], 16, activation="gelu")
        self.lrf = LowRankFusion([16, 8], 8, rank=3)
        self.head = nn.Linear(24, 3)

    def attend(self, text, image):
        return self.attn(text, image, image, need_weights=False)[0]

    def forward(self, text, image, audio, checkpointing: str | None = None):
        t = self.embed(text)  # gives the checkpointed region an input that requires grad
        if checkpointing is None:
            a = self.attend(t, image)
        else:
            a = checkpoint(self.attend, t, image, use_reentrant=checkpointing == "reentrant")
        pooled = a.mean(1)
        return self.head(torch.cat([self.fuse(pooled, audio), self.lrf(pooled, audio)], -1))


def fusion_model(seed=0, dropout=0.0) -> Fusion:
    torch.manual_seed(seed)
    return Fusion(dropout).to(F64)


def fusion_batch(step: int):
    """The global batch of a step (the same on every rank) as (inputs, labels)."""
    g = torch.Generator().manual_seed(1000 + step)
    inputs = tuple(torch.randn(GLOBAL_BATCH, *shape, generator=g, dtype=F64) for shape in ((5, 6), (7, 16), (8,)))
    return inputs, torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def decoder_model(seed=0) -> nn.Module:
    """A convert()ed nn.TransformerDecoder: nn.MultiheadAttention swapped for CrossModalAttention."""
    torch.manual_seed(seed)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, dtype=F64)
    model = mmkernels.convert(nn.TransformerDecoder(layer, num_layers=2))
    assert sum(isinstance(m, CrossModalAttention) for m in model.modules()) == 4
    return model


def decoder_batch(step: int):
    g = torch.Generator().manual_seed(2000 + step)
    return tuple(torch.randn(GLOBAL_BATCH, length, 16, generator=g, dtype=F64) for length in (6, 9))


_CAUSAL = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)


def decoder_loss(model, tgt, memory):
    return model(tgt, memory, tgt_mask=_CAUSAL).pow(2).mean()


def fusion_loss(model, inputs, labels, **kwargs):
    return F.cross_entropy(model(*inputs, **kwargs), labels)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch."""
    return t.chunk(dist.get_world_size())[dist.get_rank()]


def plain_grads(model) -> dict[str, torch.Tensor]:
    """Parameter gradients as whole plain tensors (FSDP2 keeps them as sharded DTensors)."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name.replace("module.", "")] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def assert_same_grads(actual: dict, expected: dict, what: str, exact=False) -> None:
    assert actual.keys() == expected.keys(), f"{what}: parameters {sorted(actual)} vs {sorted(expected)}"
    for name, g in expected.items():
        if exact:
            assert torch.equal(actual[name], g), f"{what}: grad of {name} differs"
        else:
            torch.testing.assert_close(actual[name], g, **TOL, msg=lambda m: f"{what}: grad of {name}: {m}")


def assert_ranks_identical(model, what: str) -> None:
    for name, p in model.state_dict().items():
        gathered = [torch.empty_like(p) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, p.contiguous())
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{what}: {name} differs between ranks"


# ------------------------------------------------------------------ data parallel


def check_ddp_step_equals_one_process():
    model = fusion_model()
    single = copy.deepcopy(model)
    ddp = DDP(model)
    inputs, labels = fusion_batch(0)
    fusion_loss(ddp, [local(t) for t in inputs], local(labels)).backward()
    fusion_loss(single, inputs, labels).backward()
    assert_same_grads(plain_grads(ddp), plain_grads(single), "DDP, fusion model")

    model = decoder_model()
    single = copy.deepcopy(model)
    ddp = DDP(model)
    tgt, memory = decoder_batch(0)
    decoder_loss(ddp, local(tgt), local(memory)).backward()
    decoder_loss(single, tgt, memory).backward()
    assert_same_grads(plain_grads(ddp), plain_grads(single), "DDP, converted decoder")


def check_ddp_optimizer_steps_keep_ranks_identical():
    model = fusion_model()
    single = copy.deepcopy(model)
    ddp = DDP(model)
    opt, opt_single = torch.optim.AdamW(ddp.parameters(), lr=1e-2), torch.optim.AdamW(single.parameters(), lr=1e-2)
    for step in range(3):
        inputs, labels = fusion_batch(step)
        opt.zero_grad()
        fusion_loss(ddp, [local(t) for t in inputs], local(labels)).backward()
        opt.step()
        opt_single.zero_grad()
        fusion_loss(single, inputs, labels).backward()
        opt_single.step()
        assert_ranks_identical(model, f"after step {step}")
    for name, p in single.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, **TOL, msg=lambda m: f"{name} after 3 steps: {m}")


def _fsdp(model, mesh, blocks):
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def check_fsdp2_step_equals_one_process():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = fusion_model()
    single = copy.deepcopy(model)
    _fsdp(model, mesh, lambda m: [m.attn, m.fuse, m.lrf])
    inputs, labels = fusion_batch(0)
    fusion_loss(model, [local(t) for t in inputs], local(labels)).backward()
    fusion_loss(single, inputs, labels).backward()
    assert_same_grads(plain_grads(model), plain_grads(single), "FSDP2, fusion model")

    model = decoder_model()
    single = copy.deepcopy(model)
    _fsdp(model, mesh, lambda m: list(m.layers))
    tgt, memory = decoder_batch(0)
    opt, opt_single = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(single.parameters(), lr=0.1)
    for step in range(2):
        tgt, memory = decoder_batch(step)
        opt.zero_grad()
        opt_single.zero_grad()
        decoder_loss(model, local(tgt), local(memory)).backward()
        decoder_loss(single, tgt, memory).backward()
        assert_same_grads(plain_grads(model), plain_grads(single), f"FSDP2, converted decoder, step {step}")
        opt.step()
        opt_single.step()


def check_fsdp2_distributed_state_dict_round_trip():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    trained = _fsdp(fusion_model(seed=1), mesh, lambda m: [m.attn, m.fuse])
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    inputs, labels = fusion_batch(1)
    fusion_loss(trained, [local(t) for t in inputs], local(labels)).backward()
    opt.step()
    full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    assert list(full) == list(Fusion().state_dict()), "state_dict keys differ from the unwrapped model's"

    path = [tempfile.mkdtemp(prefix="mmkernels-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    try:
        dcp.save(get_model_state_dict(trained), checkpoint_id=path[0])
        fresh = _fsdp(fusion_model(seed=2), mesh, lambda m: [m.attn, m.fuse])
        state = get_model_state_dict(fresh)
        dcp.load(state, checkpoint_id=path[0])
        set_model_state_dict(fresh, state)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(path[0], ignore_errors=True)
    loaded = get_model_state_dict(fresh, options=StateDictOptions(full_state_dict=True))
    for name, t in full.items():
        assert torch.equal(loaded[name], t), f"{name} did not round-trip"
    # And the round-tripped model computes what the trained one does.
    torch.testing.assert_close(fresh(*inputs), trained(*inputs), **TOL)


# ------------------------------------------------------------------ activation checkpointing


def _checkpointed_grads(model, checkpointing, seed, shard=False):
    inputs, labels = fusion_batch(3)
    if shard:
        inputs, labels = [local(t) for t in inputs], local(labels)
    torch.manual_seed(seed)  # draws the attention's dropout seed
    fusion_loss(model, inputs, labels, checkpointing=checkpointing).backward()
    return plain_grads(model) if not shard else {n: p.grad.to_local() for n, p in model.named_parameters()}


def check_checkpointing_with_dropout_is_exact():
    base = fusion_model(dropout=0.3)
    plain = _checkpointed_grads(copy.deepcopy(base), None, seed=7)
    other_seed = _checkpointed_grads(copy.deepcopy(base), None, seed=8)
    assert not torch.equal(plain["attn.in_proj_weight"], other_seed["attn.in_proj_weight"]), "dropout had no effect"
    for mode in ("reentrant", "non-reentrant"):
        got = _checkpointed_grads(copy.deepcopy(base), mode, seed=7)
        assert_same_grads(got, plain, f"checkpoint ({mode})", exact=True)


def check_checkpointing_inside_fsdp2_is_exact():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    base = fusion_model(dropout=0.3)

    def wrapped():
        return _fsdp(copy.deepcopy(base), mesh, lambda m: [m.attn, m.fuse])

    plain = _checkpointed_grads(wrapped(), None, seed=11, shard=True)
    for mode in ("reentrant", "non-reentrant"):
        got = _checkpointed_grads(wrapped(), mode, seed=11, shard=True)
        assert_same_grads(got, plain, f"FSDP2 + checkpoint ({mode})", exact=True)


# ------------------------------------------------------------------ torch.compile


def check_compile_of_ddp_converted_decoder():
    model = decoder_model()
    single = copy.deepcopy(model)
    torch._dynamo.reset()
    # aot_eager: the whole of torch.compile's tracing (dynamo, DDP's graph splitting, AOT autograd)
    # without inductor's C++ compile, which would take minutes on the test machine.
    compiled = torch.compile(DDP(model), backend="aot_eager")
    for step in range(2):
        tgt, memory = decoder_batch(step)
        for p in list(model.parameters()) + list(single.parameters()):
            p.grad = None
        decoder_loss(compiled, local(tgt), local(memory)).backward()
        decoder_loss(single, tgt, memory).backward()
        assert_same_grads(plain_grads(model), plain_grads(single), f"compiled DDP, step {step}")
