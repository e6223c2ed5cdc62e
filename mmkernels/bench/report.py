"""What a run's results look like: the row printed as each case finishes, the markdown report, the
summary, JSON (every repetition) and CSV."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from typing import Iterable

from .core import OURS, Case
from .runner import Result

MB = 2.0 ** 20
LEGEND = ("each baseline: its median ms, x = its time / ours (> 1: ours is faster), the 95% interval of x "
          "from the repetitions; ? = the interval spans 1.0: inconclusive, neither a win nor a loss")


def ms(s: float) -> str:
    v = s * 1e3
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 100 else f"{v:.1f}"


def baselines_of(cases: Iterable[Case]) -> list[str]:
    return list(dict.fromkeys(b for c in cases for b in c.baselines))


def speedup_cell(r: Result, baseline: str, with_time: bool = True) -> str:
    """``4.210 1.45x 1.38-1.52``: the baseline's median ms, the speed-up and its interval (``?`` appended
    when inconclusive); ``n/a`` when unavailable, ``-`` when the case has no such contender."""
    if baseline not in r.case.baselines:
        return "-"
    iv = r.intervals.get(baseline)
    if iv is None:
        return "n/a"
    mark = "?" if iv.verdict() == "inconclusive" else ""
    time = f"{ms(r.times[baseline].median_s)} " if with_time else ""
    return f"{time}{iv.ratio:.2f}x {iv.low:.2f}-{min(iv.high, 99.99):.2f}{mark}"


class RowFormat:
    """Fixed columns for one suite's rows, sized from its cases before any of them has run, so rows
    can be printed one at a time and still line up."""

    CELL = 24

    def __init__(self, cases: list[Case]):
        self.baselines = baselines_of(cases)
        self.shape_w = max([len("shape")] + [len(c.shape) for c in cases])

    def header(self) -> str:
        cols = [f"{'mode':<7}", f"{'dtype':<8}", f"{'shape':<{self.shape_w}}", f"{'ours ms':>9}"]
        cols += [f"{b:<{self.CELL}}" for b in self.baselines]
        return "  ".join(cols) + "  peak MB " + "|".join(["ours"] + self.baselines)

    def row(self, r: Result) -> str:
        cols = [f"{r.case.mode:<7}", f"{r.case.dtype_name:<8}", f"{r.case.shape:<{self.shape_w}}"]
        if r.error:
            return "  ".join(cols) + f"  ERROR: {r.error}"
        cols.append(f"{ms(r.times[OURS].median_s):>9}")
        cols += [f"{speedup_cell(r, b):<{self.CELL}}" for b in self.baselines]
        mem = "|".join(f"{r.memory[n] / MB:.1f}" if n in r.memory else "-" for n in [OURS] + self.baselines)
        return "  ".join(cols) + "  " + mem


def notes(results: list[Result]) -> list[str]:
    """What the cases' builders noted, why a contender was not timed, and what went wrong, one line each."""
    out = [f"note: {r.case.id}: {n}" for r in results for n in r.notes]
    out += [f"n/a: {r.case.id} {b}: {why}" for r in results for b, why in r.unavailable.items()]
    return out + [f"ERROR: {r.case.id} on {r.device}: {r.error}" for r in results if r.error]


def groups(results: Iterable[Result]) -> dict[tuple[str, str], list[Result]]:
    """Results by (suite, device), in run order."""
    return _by(results, lambda r: (r.case.suite, r.device))


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(results: list[Result]) -> list[dict]:
    """Per (suite, device, baseline): geometric-mean speed-up and the cases by verdict."""
    out = []
    for (suite, device), rs in groups(results).items():
        for b in baselines_of(r.case for r in rs):
            timed = [r for r in rs if b in r.intervals]
            if not timed:
                continue
            by = defaultdict(list)
            for r in timed:
                by[r.verdict(b)].append(f"{r.case.mode} {r.case.shape}")
            out.append({"suite": suite, "device": device, "baseline": b, "cases": len(timed),
                        "geomean": geomean([r.intervals[b].ratio for r in timed]),
                        "wins": by["wins"], "loses": by["loses"], "inconclusive": by["inconclusive"]})
    return out


def efficiency(results: list[Result]) -> list[dict]:
    """Per (device, dtype) of the cases whose params name a role: each "attention" case's FLOP rate,
    ours and each baseline's, as a fraction of the best rate any contender reached on a "gemm" case of
    the same run (the efficiency suite)."""
    rate = lambda r, name: r.case.flops / r.times[name].median_s  # noqa: E731
    out = []
    for (device, dtype), rs in _by(results, lambda r: (r.device, r.case.dtype_name)).items():
        peaks = [rate(r, n) for r in rs if r.case.params.get("role") == "gemm" and not r.error for n in r.times]
        if not peaks:
            continue
        peak = max(peaks)
        for r in rs:
            if r.case.params.get("role") == "attention" and not r.error:
                out.append({"device": device, "dtype": dtype, "case": r.case.shape, "gemm_gflops": peak / 1e9,
                            "fraction": {n: rate(r, n) / peak for n in r.times}})
    return out


def _by(results, key) -> dict:
    out = defaultdict(list)
    for r in results:
        out[key(r)].append(r)
    return out


def summary_lines(results: list[Result]) -> list[str]:
    lines = [f"efficiency ({e['device']}, {e['dtype']}) {e['case']}: "
             + ", ".join(f"{n} {f:.0%}" for n, f in e["fraction"].items())
             + f" of the best GEMM rate, {e['gemm_gflops']:.0f} GFLOP/s" for e in efficiency(results)]
    for s in summary(results):
        line = (f"{s['suite']} ({s['device']}) vs {s['baseline']}: geomean {s['geomean']:.2f}x over {s['cases']} "
                f"case{'s' * (s['cases'] != 1)}: {len(s['wins'])} faster, {len(s['loses'])} slower, "
                f"{len(s['inconclusive'])} inconclusive")
        if s["loses"]:
            line += f"; slower on {s['loses'][0]}" + (f" (+{len(s['loses']) - 1})" if len(s["loses"]) > 1 else "")
        lines.append(line)
    return lines


def markdown(results: list[Result], info: dict, glossary: dict[str, dict[str, str]]) -> str:
    """The whole report: environment, per-suite tables with intervals and verdicts, summary, notes."""
    out = [f"# mmkernels.bench, {info.get('date', '')}", "",
           f"commit `{info.get('commit')}`, torch {info.get('torch')}, {info.get('cpu')}, "
           f"{info.get('threads')} threads, GEMMs: {info.get('gemm')}; "
           f"load average {info.get('load_avg_start')} at start, {info.get('load_avg_end')} at end.",
           f"Command: `{info.get('command')}`" + (" (interrupted: partial results)" if info.get("interrupted") else ""),
           "", LEGEND + ". Peak MB: extra memory of one step above what is live before it.", ""]
    out += [f"> {w}" for w in info.get("warnings", [])]
    for (suite, device), rs in groups(results).items():
        baselines = baselines_of(r.case for r in rs)
        head = ["mode", "dtype", "shape", "ours ms"]
        head += [x for b in baselines for x in (f"{b} ms", f"vs {b}")]
        head += [f"peak MB {n}" for n in ["ours"] + baselines]
        out += ["", f"## {suite} on {device}", ""]
        out += [f"- `{n}`: {what}" for n, what in glossary.get(suite, {}).items()]
        out += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            row = [r.case.mode, r.case.dtype_name, f"`{r.case.shape}`"]
            if r.error:
                out.append("| " + " | ".join(row + [f"ERROR: {r.error}"] + [""] * (len(head) - 4)) + " |")
                continue
            row.append(ms(r.times[OURS].median_s))
            for b in baselines:
                cell = speedup_cell(r, b, with_time=False)
                verdict = r.verdict(b)
                row.append(ms(r.times[b].median_s) if b in r.times else "-")
                row.append(cell.rstrip("?") + (f" {verdict}" if verdict else ""))
            row += [f"{r.memory[n] / MB:.1f}" if n in r.memory else "-" for n in [OURS] + baselines]
            out.append("| " + " | ".join(row) + " |")
    out += ["", "## Summary", ""] + [f"- {line}" for line in summary_lines(results)]
    extra = notes(results)
    if extra:
        out += ["", "## Notes", ""] + [f"- {n}" for n in extra]
    return "\n".join(out) + "\n"


def to_dict(results: list[Result], info: dict) -> dict:
    out = []
    for r in results:
        contenders = {}
        for n in [OURS] + list(r.case.baselines):
            t, iv = r.times.get(n), r.intervals.get(n)
            contenders[n] = {
                "median_ms": t.median_s * 1e3 if t else None,
                "q1_ms": t.q1_s * 1e3 if t else None,
                "q3_ms": t.q3_s * 1e3 if t else None,
                "reps": t.reps if t else 0,
                "calls_per_rep": t.calls_per_rep if t else 0,
                "samples_ms": [x * 1e3 for x in t.samples_s] if t else [],
                "peak_mb": r.memory[n] / MB if n in r.memory else None,
                "speedup": iv.ratio if iv else (1.0 if n == OURS and t else None),
                "speedup_low": iv.low if iv else None,
                "speedup_high": iv.high if iv else None,
                "verdict": iv.verdict() if iv else None,
                "rel_error": r.rel_err.get(n),
                "unavailable": r.unavailable.get(n),
            }
        out.append({"id": r.case.id, "suite": r.case.suite, "device": r.device, "mode": r.case.mode,
                    "dtype": r.case.dtype_name, "shape": r.case.shape, "params": r.case.params,
                    "flops": r.case.flops, "wall_s": round(r.wall_s, 2), "error": r.error or None,
                    "notes": r.notes, "contenders": contenders})
    return {"meta": info, "results": out, "summary": summary(results), "efficiency": efficiency(results)}


def write_json(path, results: list[Result], info: dict) -> None:
    with open(path, "w") as f:
        json.dump(to_dict(results, info), f, indent=1)


def write_csv(path, results: list[Result]) -> None:
    cols = ["suite", "device", "mode", "dtype", "shape", "contender", "median_ms", "q1_ms", "q3_ms", "reps",
            "peak_mb", "speedup", "speedup_low", "speedup_high", "verdict", "rel_error", "status"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for rec in to_dict(results, {})["results"]:
            for name, c in rec["contenders"].items():
                status = rec["error"] or c["unavailable"] or "ok"
                w.writerow({**{k: rec[k] for k in cols[:5]}, "contender": name, "status": status,
                            **{k: c[k] for k in cols[6:16]}})
