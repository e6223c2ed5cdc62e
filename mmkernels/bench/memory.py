"""Peak extra memory of one step (forward, or forward + backward) per contender.

CPU: the torch profiler's memory events record every allocation and free made through PyTorch's CPU
allocator (tensors, including those that torch.compile's generated code allocates). Their running sum
over one step, peak minus the starting value, is the step's peak extra tensor memory: activations,
saved tensors, outputs, gradients and temporaries such as a concatenation. It leaves out memory that
BLAS/oneDNN allocate privately (packing buffers, at most a few MB), and memory already live before
the step (inputs, weights). CUDA: torch.cuda.max_memory_allocated minus memory_allocated before.

The runner calls this in a pass of its own after the timing, so the profiler never runs during a
timed repetition. Kineto writes a "USDT: ... profiler_start/profiler_stop" line to file descriptor 2
(from C++, past sys.stderr) at every profile; those lines are caught at the descriptor and dropped,
and anything else written there meanwhile is passed on.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import tempfile
from typing import Callable, Iterator

import torch


def peak_extra_bytes(step: Callable[[], object], device: torch.device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with without_profiler_chatter(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
        del result
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def without_profiler_chatter() -> Iterator[None]:
    """Points file descriptor 2 at a temporary file for the duration; then passes on every line that
    is not the profiler's USDT chatter."""
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(keepends=True)
                    if not line.startswith("USDT:")]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
