"""``--compare OLD.json [NEW.json]``: two runs side by side, case by case (a regression check).

For every case in both runs, our time in the new run over our time in the old one, with a 95%
interval from the two runs' repetitions (resampled independently: they were not taken together).
A change is flagged only when that interval excludes 1.0; everything else is "same (within noise)".
That interval knows only each run's own spread: a machine busier in one run than in the other moves
every time, so the speed-up against each baseline is shown too, old -> new, and marked "(changed)"
when the interval of its change (from each repetition's ratio, resampled per run) excludes 1.0.
Speed-ups are timed interleaved and survive a change of load far better than absolute times.
"""
from __future__ import annotations

import json

from . import stats
from .core import OURS


def load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"mmkernels.bench: --compare: cannot read {path}: {err}")
    if "results" not in data or "meta" not in data:
        raise SystemExit(f"mmkernels.bench: --compare: {path} is not a results.json of mmkernels.bench")
    return data


def _samples(c: dict) -> list[float]:
    # Older result files (before repetitions were saved) have only the median.
    return c.get("samples_ms") or ([c["median_ms"]] if c.get("median_ms") else [])


def _ratios(baseline: dict, ours: dict) -> list[float]:
    """Baseline time / our time, repetition by repetition (the two were timed in the same repetition)."""
    return [b / o for b, o in zip(baseline.get("samples_ms") or [], ours.get("samples_ms") or []) if o > 0]


def compare(old: dict, new: dict) -> list[str]:
    lines = [f"old: commit {old['meta'].get('commit')} {old['meta'].get('date')}; "
             f"new: commit {new['meta'].get('commit')} {new['meta'].get('date')}"]
    for key in ("cpu", "threads", "torch", "gemm"):
        if old["meta"].get(key) != new["meta"].get(key):
            lines.append(f"note: {key} differs ({old['meta'].get(key)} vs {new['meta'].get(key)}): "
                         "the times are not comparable, the speed-ups roughly")
    busy = [f"{name} run: load average {run['meta'].get('load_avg_start')} at start, more than its "
            f"{run['meta'].get('threads')} threads" for name, run in (("old", old), ("new", new))
            if (run["meta"].get("load_avg_start") or [0])[0] > (run["meta"].get("threads") or 1e9)]
    if busy:
        lines.append("note: " + "; ".join(busy) + ": our absolute times follow the load, read the speed-ups")
    before = {(r["device"], r.get("id") or f"{r['suite']}-{r['mode']}-{r['dtype']}-{r['shape']}"): r
              for r in old["results"]}
    flagged = same = 0
    for r in new["results"]:
        key = (r["device"], r.get("id") or f"{r['suite']}-{r['mode']}-{r['dtype']}-{r['shape']}")
        o = before.get(key)
        if o is None or r["error"] or o["error"]:
            continue
        a, b = _samples(r["contenders"][OURS]), _samples(o["contenders"][OURS])
        if not a or not b:
            continue
        iv = stats.independent_ratio(a, b)
        verdict = iv.verdict(above="SLOWER", below="faster")
        if verdict == "inconclusive":
            verdict, same = "same (within noise)", same + 1
        else:
            flagged += 1
        speedups = []
        for name, c in r["contenders"].items():
            oc = o["contenders"].get(name)
            if name != OURS and c.get("speedup") and oc and oc.get("speedup"):
                text = f"vs {name} {oc['speedup']:.2f}x->{c['speedup']:.2f}x"
                new_r, old_r = _ratios(c, r["contenders"][OURS]), _ratios(oc, o["contenders"][OURS])
                if len(new_r) >= 3 and len(old_r) >= 3 and stats.independent_ratio(new_r, old_r).verdict(
                        above="up", below="down") != "inconclusive":
                    text += " (changed)"
                speedups.append(text)
        lines.append(f"{key[0]} {key[1]}: ours {iv.ratio:.2f}x the old time ({iv.low:.2f}-{iv.high:.2f}) "
                     f"{verdict}; " + ", ".join(speedups))
    lines.append(f"{flagged} case(s) changed beyond the noise, {same} within it "
                 f"(ours new/old time; > 1 = slower now)")
    return lines
