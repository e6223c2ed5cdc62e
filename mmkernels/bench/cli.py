"""``python -m mmkernels.bench``: run the benchmark suites and print/write the results."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

from .. import _C
from . import core, report
from .runner import run_case
from .timing import QUICK, Budget

HEADER = """\
Protocol: each contender's result is checked against the oracle first (a wrong result fails the case);
warm-up calls; then repetitions in which every contender runs once, in rotating order (interleaved);
times are medians ({clock}); "iqr%" is the largest interquartile range among the case's contenders,
as a % of its median (the noise). x = baseline median / our median: > 1 means the fused kernel wins.
torch.compile is compiled (and checked) before timing. Inputs are random normal.
Peak MB = peak extra memory of one step above what is live before it (inputs, weights): {memory}"""
MEM_CPU = ("the running sum of the torch profiler's CPU allocator events\n"
           "(every tensor allocation and free, torch.compile's included; BLAS-private scratch is not counted).")
MEM_CUDA = "torch.cuda.max_memory_allocated minus memory_allocated before the step."


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=__doc__)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                   help="auto (default): the CPU, plus CUDA when a GPU is present; all: both, CUDA required")
    p.add_argument("--suite", action="append", help="suite name (repeatable); default: every suite")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], help="only this mode")
    p.add_argument("--dtype", help="only this dtype (float32, bfloat16, ...)")
    p.add_argument("--filter", help="only cases whose shape contains this text")
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions (a minute or two)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads), default 2")
    p.add_argument("--seconds", type=float, help="timing time per case (default 3, quick 0.6)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--csv", metavar="FILE")
    p.add_argument("--markdown", metavar="FILE.md", help="the tables as markdown (for benchmarks/RESULTS.md)")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of speed-ups per case (matplotlib)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return p


def _devices(choice: str) -> list[torch.device]:
    has_cuda = torch.cuda.is_available()
    if choice in ("cuda", "all") and not has_cuda:
        raise SystemExit(f"mmkernels.bench: --device {choice} asks for CUDA, but no GPU is available")
    if choice == "cpu" or (choice == "auto" and not has_cuda):
        return [torch.device("cpu")]
    if choice == "cuda":
        return [torch.device("cuda")]
    return [torch.device("cpu"), torch.device("cuda")]


def _commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def meta(args, devices) -> dict:
    m = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "cpu_float32_gemm": _C.cpu_float32_gemm(),
        "load_avg_start": os.getloadavg(),
        "devices": [d.type for d in devices],
        "quick": args.quick,
        "command": " ".join(["python -m mmkernels.bench"] + sys.argv[1:]),
    }
    if any(d.type == "cuda" for d in devices):
        m["gpu"] = torch.cuda.get_device_name()
    return m


def select(args) -> tuple[list[core.Case], list[str]]:
    names = args.suite or core.all_suites()
    cases, notes = [], []
    for name in names:
        if name not in core.all_suites():
            raise SystemExit(f"mmkernels.bench: unknown suite {name!r}; known: {', '.join(core.all_suites())}")
        why = core.suite_unavailable(name)
        if why:
            notes.append(f"suite {name} skipped: {why}")
            continue
        for c in core.suite_cases(name, args.quick):
            if args.mode and c.mode != args.mode:
                continue
            if args.dtype and c.dtype_name != args.dtype:
                continue
            if args.filter and args.filter not in c.shape:
                continue
            cases.append(c)
    return cases, notes


class Progress:
    """One status line on stderr (rewritten in place on a terminal, one line per case otherwise)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def start(self, label: str) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = f", ~{elapsed / self.done * (self.total - self.done):.0f}s left" if self.done else ""
        msg = f"[{self.done + 1}/{self.total}] {label} ({elapsed:.0f}s{eta})"
        sys.stderr.write(("\r\x1b[K" + msg) if self.tty else msg + "\n")
        sys.stderr.flush()
        self.done += 1

    def end(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
        sys.stderr.write(f"done: {self.done} cases in {time.perf_counter() - self.t0:.0f}s\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    core.SKIP_COMPILE = args.no_compile
    devices = _devices(args.device)
    cases, notes = select(args)
    for n in notes:
        print(f"note: {n}")
    if args.list:
        for c in cases:
            print(c.id)
        return 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    budget = QUICK if args.quick else Budget()
    if args.seconds is not None:
        budget = Budget(**{**budget.__dict__, "seconds": args.seconds})
    info = meta(args, devices)
    work = [(c, d) for d in devices for c in cases if d.type in c.devices]
    print(f"mmkernels.bench  {info['date']}  commit {info['commit']}  torch {info['torch']}")
    print(f"CPU: {info['cpu']} ({info['cpu_count']} logical cores), {torch.get_num_threads()} threads; "
          f"load average at start {' '.join(f'{x:.2f}' for x in info['load_avg_start'])}; "
          f"our float32 CPU GEMMs: {info['cpu_float32_gemm']}"
          + (f"; GPU: {info['gpu']}" if "gpu" in info else ""))
    clock = "time.perf_counter" + (", CUDA events on the GPU" if "gpu" in info else "")
    print(HEADER.format(clock=clock, memory=MEM_CUDA if devices == [torch.device("cuda")] else
                        MEM_CPU + ("\nOn CUDA: " + MEM_CUDA if "gpu" in info else "")))
    results = []
    progress = Progress(len(work))
    for case, device in work:
        progress.start(f"{case.suite} {device.type} {case.mode} {case.dtype_name} {case.shape}")
        res = run_case(case, device, budget, with_memory=not args.no_memory)
        if res.error:
            sys.stderr.write(f"\nERROR in {case.id} on {device.type}: {res.error}\n")
        results.append(res)
    progress.end()
    info["load_avg_end"] = os.getloadavg()

    for (suite, device), rs in report.groups(results).items():
        print(f"\n== {suite} on {device} ==")
        print(report.table(rs))
    print("\n== summary (x = baseline / ours; < 1: fusion loses) ==")
    print(report.summary_text(results) or "(no results)")
    print(f"load average at end {' '.join(f'{x:.2f}' for x in info['load_avg_end'])}")
    if args.json:
        report.write_json(args.json, results, info)
    if args.csv:
        report.write_csv(args.csv, results)
    if args.plot:
        report.plot(args.plot, results)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(results) + "\n\n" + report.summary_text(results) + "\n")
    failed = [r for r in results if r.error]
    if failed:
        print(f"\nFAILED: {len(failed)} case(s) gave a wrong result or raised; see ERROR lines above.")
        return 1
    return 0
