"""Run a module's `check_*` functions on 2 CPU processes (gloo on 127.0.0.1), once, and collect what
each check did on each rank, so that pytest can report every check as its own test.

A spawn costs seconds (two interpreters importing torch), so each test module runs all its checks in
one spawn; the checks run in the order they are defined, every rank runs every check, and a failure
is recorded (with its traceback) without stopping the others. Collectives time out after 120 s, so
a check that fails on one rank only cannot hang the run.
"""
from __future__ import annotations

import datetime
import importlib
import inspect
import json
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
SKIPPED = "skipped: "


def run_checks(module_name: str, world: int = WORLD) -> dict[str, dict[int, str]]:
    """{check name: {rank: "ok" | "skipped: why" | traceback}} for every check_* of `module_name`."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)  # spawned children inherit sys.path: they import the checks by name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, port, module_name, out), nprocs=world, join=True)
        per_rank = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(world)]
    return {name: {r: per_rank[r][name] for r in range(world)} for name in per_rank[0]}


def _worker(rank: int, world: int, port: int, module_name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a shared machine
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    module = importlib.import_module(module_name)
    checks = sorted(
        ((name, fn) for name, fn in vars(module).items() if name.startswith("check_") and inspect.isfunction(fn)),
        key=lambda item: item[1].__code__.co_firstlineno,
    )
    results = {}
    try:
        for name, fn in checks:
            try:
                note = fn()
                results[name] = SKIPPED + note if isinstance(note, str) else "ok"
            except Exception:  # recorded, reported by the pytest side
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
        # Leave without finalizing the interpreter: gloo's worker threads may still be dropping the last
        # reference to a finished collective, whose saved thread-local state holds Python objects (a
        # saved-tensor hook of checkpointing, a mode); that decref, racing interpreter shutdown, made
        # the thread std::terminate (SIGABRT, about 1 run in 15 on 2 loaded cores, torch 2.13).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def assert_check(results: dict, name: str) -> None:
    """The pytest side: the check passed on every rank (or was skipped, with its reason)."""
    import pytest

    assert name in results, f"{name} did not run (results for {sorted(results)})"
    per_rank = results[name]
    failed = {r: msg for r, msg in per_rank.items() if msg != "ok" and not msg.startswith(SKIPPED)}
    assert not failed, "\n".join(f"--- rank {r}:\n{msg}" for r, msg in failed.items())
    skipped = {msg for msg in per_rank.values() if msg.startswith(SKIPPED)}
    if skipped:
        pytest.skip("; ".join(sorted(skipped)))
