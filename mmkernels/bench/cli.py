"""python -m mmkernels.bench: time mmkernels' fused kernels against what they replace.

The default run takes one or two representative cases of every suite (about 3 minutes on 2 cores);
--full runs every case (its expected duration is printed first); --quick is the default cases with a
shorter timing budget. Each case's row is printed as it finishes; results go to
bench_out/<date>_<time>-<commit>/ (results.json with every repetition and the environment, results.csv,
report.md, one plot per suite), and Ctrl-C saves what has finished. --compare OLD.json checks a run
against an earlier one.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys

import torch

from . import compare, env, report
from .core import Case, Options
from .live import Progress, duration
from .runner import run_case
from .suites import SUITES
from .timing import QUICK, Budget

SHAPES_HELP = """\
shape notation:
  concat_linear   M x (D1,D2,...) -> N : M rows, one input of width D_i per modality, N output features
  low_rank_fusion M x (D1,...) rR -> N : the same with LMF rank R
  attention*      B batch, Lq query length, Lk key length, E embedding width (all heads), H heads;
                  pad~50%: a key_padding_mask hiding a fixed random 1/4 to 3/4 of each sequence's keys
  models          T target / L text length, S memory / M media length, d model width, m media width;
                  pad: padded memory/media keys
  mode            fwd: a forward under torch.no_grad; fwd+bwd: forward, then the gradients of every
                  input and weight
  x               speed-up = baseline time / mmkernels time, with its 95% interval (paired bootstrap of
                  the interleaved repetitions); "?" / inconclusive: the interval spans 1.0"""


def glossary() -> dict[str, dict[str, str]]:
    return {name: s.contenders for name, s in SUITES.items()}


def glossary_text() -> str:
    lines = ["contenders (per suite; the first, mmkernels, is ours):"]
    for name, s in SUITES.items():
        lines.append(f"  {name}: {s.about}")
        lines += [f"    {c:<9} {what}" for c, what in s.contenders.items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmkernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=glossary_text() + "\n\n" + SHAPES_HELP)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--full", action="store_true", help="every case of every selected suite (tens of minutes)")
    scope.add_argument("--quick", action="store_true", help="the default cases with a shorter timing budget")
    p.add_argument("--suite", action="append", metavar="NAME", help="only this suite (repeatable); see --list")
    p.add_argument("--list", action="store_true", help="list suites, contenders and cases (* = in the default run)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "all"], default="auto",
                   help="auto (default): the CPU, plus CUDA when a GPU is present; all: both, CUDA required")
    p.add_argument("--mode", choices=["fwd", "fwd+bwd"], help="only this mode")
    p.add_argument("--dtype", help="only this dtype (float32, bfloat16, ...)")
    p.add_argument("--filter", help="only cases whose shape contains this text")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads), default 2")
    p.add_argument("--seconds", type=float, help="timing time per case before any extension (default 2, quick 0.6)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--out", metavar="DIR", help="where to save (default: bench_out/<date>_<time>-<commit>/)")
    p.add_argument("--no-save", action="store_true", help="print only, save nothing")
    p.add_argument("--json", metavar="FILE", help="also write the results JSON to FILE")
    p.add_argument("--compare", nargs="+", metavar="JSON",
                   help="OLD.json: run, then compare with OLD; OLD.json NEW.json: compare two saved runs, no run")
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


def select(args) -> tuple[list[Case], list[str]]:
    names = args.suite or list(SUITES)
    scope = "full" if args.full or args.list else "default"
    cases, notes = [], []
    for name in names:
        if name not in SUITES:
            raise SystemExit(f"mmkernels.bench: --suite: unknown suite {name!r}; known: {', '.join(SUITES)}")
        why = SUITES[name].unavailable()
        if why:
            notes.append(f"suite {name} skipped: {why}")
            continue
        for c in SUITES[name].select(scope):
            if args.mode and c.mode != args.mode:
                continue
            if args.dtype and c.dtype_name != args.dtype:
                continue
            if args.filter and args.filter not in c.shape:
                continue
            cases.append(c)
    return cases, notes


def list_text(cases: list[Case], suites: list[str]) -> str:
    lines = []
    for name in suites:
        s = SUITES[name]
        mine = [c for c in cases if c.suite == name]
        lines += [f"{name}: {s.about}"] + [f"  {c:<9} {what}" for c, what in s.contenders.items()]
        lines += [f"  {'*' if c.default else ' '} {c.mode:<7} {c.dtype_name:<8} {c.shape}" for c in mine]
        lines.append("")
    lines.append("* = in the default run; --full runs them all")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- cost estimates


def estimate(case: Case, budget: Budget, options: Options) -> float:
    """Seconds a case costs on 2 busy cores where no earlier run measured it: timing (plus a share of
    the extension for noisy cases), building and checking, the memory pass, and torch.compile's
    compilation, which dominates (a forward ~10 s, a forward + backward ~25 s, cold cache)."""
    cost = 1.3 * budget.seconds + 2.0 + (1.0 if options.memory else 0.0)
    if "compile" in case.baselines and options.compile:
        cost += 10.0 if case.mode == "fwd" else 25.0
    if not case.flops:  # whole models: slower steps to warm up, check and profile
        cost += 6.0
    return cost


def measured_costs(out_root: str) -> dict[str, float]:
    """Case id -> wall seconds from the latest saved run under ``out_root`` (empty if none)."""
    runs = sorted(glob.glob(os.path.join(out_root, "*", "results.json")), key=os.path.getmtime)
    for path in reversed(runs):
        try:
            with open(path) as f:
                return {f"{r['device']}:{r['id']}": r["wall_s"] for r in json.load(f)["results"]
                        if r.get("wall_s")}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return {}


# ----------------------------------------------------------------------------- saving


def out_dir(args, info: dict) -> str:
    if args.out:
        return args.out
    stamp = datetime.datetime.fromisoformat(info["date"]).strftime("%Y-%m-%d_%H%M")
    base = os.path.join("bench_out", f"{stamp}-{info['commit']}")
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def save(folder: str, results, info: dict) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    written = [os.path.join(folder, n) for n in ("results.json", "results.csv", "report.md")]
    report.write_json(written[0], results, info)
    report.write_csv(written[1], results)
    with open(written[2], "w") as f:
        f.write(report.markdown(results, info, glossary()))
    try:
        from . import plots

        written += plots.plot_all(folder, results, info)
    except ImportError as err:  # matplotlib is optional for the runner
        print(f"note: no plots ({err})")
    return written


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.compare and len(args.compare) > 2:
        raise SystemExit("mmkernels.bench: --compare takes OLD.json, or OLD.json NEW.json")
    if args.compare and len(args.compare) == 2:
        print("\n".join(compare.compare(compare.load(args.compare[0]), compare.load(args.compare[1]))))
        return 0
    old = compare.load(args.compare[0]) if args.compare else None

    cases, notes = select(args)
    if args.list:
        print("\n".join(f"note: {n}" for n in notes) + ("\n" if notes else "") +
              list_text(cases, [s for s in (args.suite or list(SUITES)) if s in SUITES]))
        return 0
    devices = _devices(args.device)
    options = Options(compile=not args.no_compile, memory=not args.no_memory)
    budget = QUICK if args.quick else Budget()
    if args.seconds is not None:
        budget = Budget(**{**budget.__dict__, "seconds": args.seconds,
                           "max_seconds": max(budget.max_seconds, 3 * args.seconds)})
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = env.collect(torch.get_num_threads(), [d.type for d in devices], sys.argv[1:] if argv is None else argv)
    info["scope"] = "full" if args.full else "quick" if args.quick else "default"
    folder = None if args.no_save else out_dir(args, info)

    work = [(c, d) for d in devices for c in cases if d.type in c.devices]
    known = measured_costs(os.path.dirname(folder) if folder else "bench_out")
    estimates = [known.get(f"{d.type}:{c.id}", estimate(c, budget, options)) for c, d in work]
    warnings = [w for w in [env.load_warning(info["load_avg_start"], info["threads"], "start")] if w]

    print(f"mmkernels.bench  {info['date']}  commit {info['commit']}  torch {info['torch']}")
    print(f"CPU: {info['cpu']}, {info['cpu_count']} logical cores, {info['threads']} threads; GEMMs: {info['gemm']}"
          + (f"; GPU: {info['gpu']}" if "gpu" in info else ""))
    print(f"load average at start: {' '.join(map(str, info['load_avg_start']))}")
    for line in notes + warnings:
        print(line)
    print(f"{len(work)} cases ({info['scope']} run), expected ~{duration(sum(estimates))}"
          + ("" if args.full else "; --full runs every case") + ". Ctrl-C stops and saves what has finished.")
    print("Each contender is checked against the oracle, then all are timed interleaved (medians).")
    print(report.LEGEND + ". Peak MB: extra memory of one step, measured in a separate pass.")

    results = []
    progress = Progress(estimates)
    interrupted = False
    formats = {s: report.RowFormat([c for c, _ in work if c.suite == s]) for s in dict.fromkeys(c.suite for c, _ in work)}
    current = None
    try:
        for case, device in work:
            if (case.suite, device.type) != current:
                current = (case.suite, device.type)
                progress.line(f"\n== {case.suite} on {device.type}: {SUITES[case.suite].about}")
                progress.line(formats[case.suite].header())
            progress.start(f"{case.suite} {case.mode} {case.dtype_name} {case.shape}")
            res = run_case(case, device, budget, options)
            progress.finish_case()
            results.append(res)
            progress.line(formats[case.suite].row(res))
    except KeyboardInterrupt:
        interrupted = True
    elapsed = progress.end()
    info["load_avg_end"] = env.load_average()
    info["wall_s"] = round(elapsed, 1)
    info["interrupted"] = interrupted
    end_warning = env.load_warning(info["load_avg_end"], info["threads"], "end")
    info["warnings"] = warnings + ([end_warning] if end_warning else [])

    print()
    if interrupted:
        print(f"INTERRUPTED after {len(results)} of {len(work)} cases; saving those.")
    print("\n".join(report.notes(results)))
    print("== summary")
    print("\n".join(report.summary_lines(results)) or "(no results)")
    print(f"{len(results)} cases in {duration(elapsed)}; load average at end: "
          f"{' '.join(map(str, info['load_avg_end']))}")
    if end_warning:
        print(end_warning)
    if old is not None:
        print("== compared with " + args.compare[0])
        print("\n".join(compare.compare(old, report.to_dict(results, info))))
    if args.json:
        report.write_json(args.json, results, info)
    if folder:
        written = save(folder, results, info)
        print(f"saved to {folder}/: " + ", ".join(os.path.basename(p) for p in written))
    failed = [r for r in results if r.error]
    if failed:
        print(f"FAILED: {len(failed)} case(s) gave a wrong result or raised; see the ERROR lines above.")
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
