"""Train the three-modal classifier (examples/three_modal_classifier.py) on several processes.

    torchrun --nproc-per-node 2 examples/distributed_train.py              # DDP
    torchrun --nproc-per-node 2 examples/distributed_train.py --fsdp       # FSDP2 (fully_shard)
    torchrun --nproc-per-node 2 examples/distributed_train.py --tp         # tensor parallel
    torchrun --nproc-per-node 2 examples/distributed_train.py --checkpoint # + activation checkpointing

gloo on the CPU; NCCL, one GPU per process (LOCAL_RANK), where CUDA is present. Data parallel (DDP,
FSDP2): each rank trains on its own slice of every global batch, so a step's update is the one a
single process would make on the whole batch. Tensor parallel (--tp): every rank sees the whole
batch; the fusion layer's output features and the head's input features are split over the ranks
(FusedConcatLinearColwise, then torch's RowwiseParallel). --checkpoint recomputes the encoders in
backward instead of keeping their activations. Rank 0 prints a progress bar and, at the end, the
held-out accuracy and the throughput (samples/s over all ranks, after the first steps).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from three_modal_classifier import Classifier, accuracy, make_dataset  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    mode.add_argument("--tp", action="store_true", help="tensor parallel instead of data parallel")
    p.add_argument("--checkpoint", action="store_true", help="activation checkpointing of the encoders")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="samples per rank per step (data parallel)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the throughput")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--expect-accuracy", type=float, default=None, help="exit 1 if the held-out accuracy is lower (CI)")
    return p.parse_args(argv)


class Checkpointed(torch.nn.Module):
    """Recompute a module in backward (non-reentrant checkpointing) instead of keeping its activations."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return checkpoint(self.module, x, use_reentrant=False)


def build(args, device, mesh):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = Classifier().to(device)
    if args.checkpoint:
        for name in list(model.encoders):
            model.encoders[name] = Checkpointed(model.encoders[name])
    if args.tp:
        from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

        from mmkernels.distributed import FusedConcatLinearColwise

        return parallelize_module(model, mesh, {"fusion": FusedConcatLinearColwise(), "head": RowwiseParallel()})
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for encoder in model.encoders.values():
            fully_shard(encoder, mesh=mesh)
        fully_shard(model.fusion, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def progress(step, total, loss, width=30):
    """A bar redrawn in place on a terminal; in a log (CI), a line every tenth of the run."""
    done = int(width * step / total)
    line = f"[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {loss:.3f}"
    if sys.stdout.isatty():
        print("\r" + line, end="", flush=True)
    elif step == total or step % max(1, total // 10) == 0:
        print(line, flush=True)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    model = build(args, device, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    # Every rank generates the same data set; data parallel ranks then take their slice of each batch.
    g = torch.Generator().manual_seed(args.seed)
    global_batch = args.batch_size * (1 if args.tp else world)
    data, y, patterns = make_dataset(global_batch * 8, noise=1.0, generator=g)
    test, y_test, _ = make_dataset(512, noise=1.0, generator=g, patterns=patterns)
    mine = slice(None) if args.tp else slice(rank * args.batch_size, (rank + 1) * args.batch_size)

    model.train()
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        i = (step % 8) * global_batch
        batch = {k: v[i : i + global_batch][mine].to(device) for k, v in data.items()}
        loss = F.cross_entropy(model(batch), y[i : i + global_batch][mine].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0:
            progress(step + 1, args.steps, loss.item())
    dist.barrier()
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    samples = (args.steps - args.warmup) * global_batch
    model.eval()
    with torch.no_grad():
        acc = accuracy(model, {k: v.to(device) for k, v in test.items()}, y_test.to(device))
    result = {"world": world, "accuracy": acc, "samples_per_s": samples / elapsed, "final_loss": loss.item()}
    if rank == 0:
        mode = "tp" if args.tp else "fsdp" if args.fsdp else "ddp"
        print(f"\n{mode}{' + checkpoint' if args.checkpoint else ''}, {world} processes: held-out accuracy "
              f"{acc:.3f}, {result['samples_per_s']:.0f} samples/s ({global_batch} per step)")
    dist.destroy_process_group()
    if args.expect_accuracy is not None and acc < args.expect_accuracy:
        raise SystemExit(f"held-out accuracy {acc:.3f} is below the expected {args.expect_accuracy}")
    return result


if __name__ == "__main__":
    main()
