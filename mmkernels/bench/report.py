"""Tables, summaries, JSON, CSV and the plot of a run's results."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from typing import Iterable

from .core import OURS
from .runner import Result

MB = 2.0 ** 20


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def _align(rows: list[list[str]], right_from: int) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i < right_from else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def groups(results: Iterable[Result]) -> dict[tuple[str, str], list[Result]]:
    """Results by (suite, device), in run order."""
    out: dict[tuple[str, str], list[Result]] = defaultdict(list)
    for r in results:
        out[(r.case.suite, r.device)].append(r)
    return out


def table(results: list[Result]) -> str:
    """One row per case: our median, each baseline's median and speed-up, then peak memory side by side."""
    baselines = list(dict.fromkeys(b for r in results for b in r.case.baselines))
    head = ["mode", "dtype", "shape", f"{OURS} ms", "iqr%"]
    head += [f"{b} ms (x)" for b in baselines]
    head += ["| peak MB:", OURS] + baselines
    rows = [head]
    for r in results:
        row = [r.case.mode, r.case.dtype_name, r.case.shape]
        if r.error:
            rows.append(row + ["ERROR"] + [""] * (len(head) - 4))
            continue
        ours = r.times[OURS]
        row += [_ms(ours.median_s), f"{max(s.iqr_pct for s in r.times.values()):.0f}"]
        for b in baselines:
            if b in r.times:
                row.append(f"{_ms(r.times[b].median_s)} ({r.speedup(b):.2f}x)")
            elif b in r.case.baselines:
                row.append("n/a")
            else:
                row.append("-")
        row.append("|")
        for name in [OURS] + baselines:
            row.append(f"{r.memory[name] / MB:.1f}" if name in r.memory else "-")
        rows.append(row)
    lines = _align(rows, right_from=3)
    notes = [f"  n/a {r.case.mode} {r.case.dtype_name} {r.case.shape} {b}: {why}"
             for r in results for b, why in r.unavailable.items()]
    notes += [f"  ERROR {r.case.mode} {r.case.dtype_name} {r.case.shape}: {r.error}" for r in results if r.error]
    return "\n".join(lines + notes)


def markdown(results: list[Result]) -> str:
    """The table (times in ms, speed-ups, peak MB) as GitHub markdown, one table per (suite, device)."""
    out = []
    for (suite, device), rs in groups(results).items():
        baselines = list(dict.fromkeys(b for r in rs for b in r.case.baselines))
        head = ["mode", "dtype", "shape", f"{OURS} ms"] + [f"{b} ms (x)" for b in baselines]
        head += [f"peak MB {n}" for n in [OURS] + baselines]
        out += [f"**{suite} on {device}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rs:
            row = [r.case.mode, r.case.dtype_name, f"`{r.case.shape}`"]
            if r.error:
                out.append("| " + " | ".join(row + [f"ERROR: {r.error}"] + [""] * (len(head) - 4)) + " |")
                continue
            row.append(_ms(r.times[OURS].median_s))
            row += [f"{_ms(r.times[b].median_s)} ({r.speedup(b):.2f}x)" if b in r.times else
                    ("n/a" if b in r.case.baselines else "-") for b in baselines]
            row += [f"{r.memory[n] / MB:.1f}" if n in r.memory else "-" for n in [OURS] + baselines]
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def summary(results: list[Result]) -> list[dict]:
    """Per (suite, device, mode, dtype) and baseline: geometric-mean speed-up, min, and losing cases."""
    by: dict[tuple, list[Result]] = defaultdict(list)
    for r in results:
        by[(r.case.suite, r.device, r.case.mode, r.case.dtype_name)].append(r)
    out = []
    for (suite, device, mode, dtype), rs in by.items():
        for b in dict.fromkeys(b for r in rs for b in r.case.baselines):
            pairs = [(r.case.shape, r.speedup(b)) for r in rs if r.speedup(b) is not None]
            if not pairs:
                continue
            ratios = [x for _, x in pairs]
            out.append({
                "suite": suite, "device": device, "mode": mode, "dtype": dtype, "baseline": b,
                "geomean": geomean(ratios), "min": min(ratios), "min_case": min(pairs, key=lambda p: p[1])[0],
                "cases": len(pairs), "losing": [(s, x) for s, x in pairs if x < 1.0],
            })
    return out


def summary_text(results: list[Result]) -> str:
    lines = []
    for s in summary(results):
        line = (f"{s['suite']} {s['device']} {s['mode']:<7} {s['dtype']:<8} vs {s['baseline']:<8}: "
                f"geomean {s['geomean']:.2f}x, min {s['min']:.2f}x ({s['min_case']}), {s['cases']} cases")
        if s["losing"]:
            line += "; fusion does NOT win on: " + ", ".join(f"{c} ({x:.2f}x)" for c, x in s["losing"])
        else:
            line += "; wins on every case"
        lines.append(line)
    return "\n".join(lines)


def to_dict(results: list[Result], meta: dict) -> dict:
    out = []
    for r in results:
        names = [OURS] + list(r.case.baselines)
        out.append({
            "suite": r.case.suite, "device": r.device, "mode": r.case.mode, "dtype": r.case.dtype_name,
            "shape": r.case.shape, "params": r.case.params, "flops": r.case.flops, "error": r.error or None,
            "contenders": {
                n: {
                    "median_ms": r.times[n].median_s * 1e3 if n in r.times else None,
                    "q1_ms": r.times[n].q1_s * 1e3 if n in r.times else None,
                    "q3_ms": r.times[n].q3_s * 1e3 if n in r.times else None,
                    "reps": r.times[n].reps if n in r.times else 0,
                    "peak_mb": r.memory[n] / MB if n in r.memory else None,
                    "speedup": r.speedup(n) if n != OURS else 1.0 if not r.error else None,
                    "rel_error": r.rel_err.get(n),
                    "unavailable": r.unavailable.get(n),
                } for n in names
            },
        })
    return {"meta": meta, "results": out, "summary": summary(results)}


def write_json(path: str, results: list[Result], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump(to_dict(results, meta), f, indent=1)


def write_csv(path: str, results: list[Result]) -> None:
    cols = ["suite", "device", "mode", "dtype", "shape", "contender", "median_ms", "q1_ms", "q3_ms", "reps",
            "peak_mb", "speedup", "rel_error", "status"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for rec in to_dict(results, {})["results"]:
            for name, c in rec["contenders"].items():
                status = rec["error"] or c["unavailable"] or "ok"
                w.writerow({**{k: rec[k] for k in cols[:5]}, "contender": name, "status": status,
                            **{k: c[k] for k in cols[6:13]}})


def plot(path: str, results: list[Result]) -> None:
    """Bar chart of speed-ups (baseline / ours) per case, one panel per (suite, device)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, rs) for k, rs in groups(results).items() if any(not r.error for r in rs)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * max(len(rs) for _, rs in panels) + 3),
                                                       4.2 * len(panels)), squeeze=False)
    for ax, ((suite, device), rs) in zip(axes[:, 0], panels):
        baselines = list(dict.fromkeys(b for r in rs for b in r.case.baselines))
        width = 0.8 / len(baselines)
        for i, b in enumerate(baselines):
            xs = [j + (i - (len(baselines) - 1) / 2) * width for j in range(len(rs))]
            ys = [r.speedup(b) or 0.0 for r in rs]
            ax.bar(xs, ys, width, label=f"vs {b}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels([f"{r.case.mode} {r.case.dtype_name}\n{r.case.shape}" for r in rs], rotation=60,
                           ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("speed-up (baseline / ours)")
        ax.set_title(f"{suite} on {device}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
