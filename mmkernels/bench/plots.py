"""One PNG per (suite, device): speed-up with its 95% interval per case on the left, peak memory per
contender on the right; commit, machine and date in the title."""
from __future__ import annotations

import os

from .core import OURS
from .report import MB, baselines_of, groups
from .runner import Result

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def _label(r: Result) -> str:
    return f"{r.case.mode} {r.case.dtype_name}\n{r.case.shape}"


def plot_suite(path: str, suite: str, device: str, results: list[Result], info: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results if not r.error]
    everyone = [OURS] + baselines_of(r.case for r in rs)
    color = {name: COLORS[i % len(COLORS)] for i, name in enumerate(everyone)}  # same colour in both panels
    baselines = [b for b in everyone[1:] if any(b in r.intervals for r in rs)]  # those timed at least once
    names = [n for n in everyone if any(n in r.memory for r in rs)]
    n = len(rs)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 2.4 + 0.42 * n * max(1.5, len(baselines) * 0.8)),
                                     gridspec_kw={"width_ratios": [3, 2]}, sharey=True, layout="constrained")
    band = 0.8 / max(1, len(baselines))
    for i, b in enumerate(baselines):
        ys, xs, lo, hi = [], [], [], []
        for j, r in enumerate(rs):
            iv = r.intervals.get(b)
            if iv is None:
                continue
            ys.append(j + (i - (len(baselines) - 1) / 2) * band)
            xs.append(iv.ratio)
            lo.append(iv.ratio - iv.low)
            hi.append(min(iv.high, 10 * iv.ratio) - iv.ratio)
            # The number at the whisker's end; "?" where the interval spans 1.0.
            ax_t.text(xs[-1] + hi[-1], ys[-1], f" {iv.ratio:.2f}x" + ("?" if iv.verdict() == "inconclusive" else ""),
                      va="center", fontsize=7)
        ax_t.barh(ys, xs, band * 0.9, xerr=[lo, hi], capsize=3, color=color[b],
                  error_kw={"elinewidth": 1}, label=f"vs {b}")
    ax_t.axvline(1.0, color="black", linewidth=1)
    ax_t.margins(x=0.12)  # room for the numbers
    ax_t.set_xlabel("speed-up = baseline time / ours  (> 1: mmkernels faster; bars: 95% interval)")
    ax_t.set_yticks(range(n))
    ax_t.set_yticklabels([_label(r) for r in rs], fontsize=8)
    ax_t.invert_yaxis()
    ax_t.grid(axis="x", alpha=0.3)
    ax_t.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=max(1, len(baselines)), fontsize=8, frameon=False)

    band_m = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [j + (i - (len(names) - 1) / 2) * band_m for j, r in enumerate(rs) if name in r.memory]
        xs = [r.memory[name] / MB for r in rs if name in r.memory]
        ax_m.barh(ys, xs, band_m * 0.9, color=color[name], label=name)
    ax_m.set_xlabel("peak extra memory of one step (MB)")
    ax_m.grid(axis="x", alpha=0.3)
    ax_m.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=max(1, len(names)), fontsize=8, frameon=False)

    fig.suptitle(f"{suite} on {device}: commit {info.get('commit', '?')}, {info.get('date', '')[:16]}\n"
                 f"{info.get('cpu', '')}, {info.get('threads', '?')} threads, torch {info.get('torch', '?')}",
                 fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_all(folder: str, results: list[Result], info: dict) -> list[str]:
    """Writes ``<suite>-<device>.png`` per group with at least one timed case; returns the paths."""
    paths = []
    for (suite, device), rs in groups(results).items():
        if any(not r.error for r in rs):
            path = os.path.join(folder, f"{suite}-{device}.png")
            plot_suite(path, suite, device, rs, info)
            paths.append(path)
    return paths
