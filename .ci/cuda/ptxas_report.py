"""Summarise nvcc's `-Xptxas -v` output from a build log, and fail on spills in our kernels.

Usage: python ptxas_report.py BUILD_LOG

Prints one line per (kernel, architecture): registers, spill stores/loads, stack frame, shared
memory. Every kernel of ours (namespace mmkernels) is a hot kernel: any non-zero spill fails
(exit 1), since a spill to local memory in a GEMM main loop or a fused epilogue costs more than the
fusion saves. A log with no ptxas lines at all fails too (the -Xptxas=-v flag went missing).
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    # Drop the argument list and the anonymous namespace: keep the name and template arguments.
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            return name[:i]
    return name


def parse(text: str) -> list[dict]:
    kernels, cur = [], None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            cur = {"mangled": m.group(1), "arch": m.group(2), "regs": None, "stack": 0, "spill_st": 0, "spill_ld": 0, "smem": 0}
            kernels.append(cur)
        elif cur is not None and (m := PROPS.search(line)):
            cur["stack"], cur["spill_st"], cur["spill_ld"] = (int(g) for g in m.groups())
        elif cur is not None and (m := USED.search(line)):
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    names = demangle(sorted({k["mangled"] for k in kernels}))
    for k in kernels:
        k["name"] = short(names[k["mangled"]])
    return kernels


def main(path: str) -> int:
    with open(path, errors="replace") as f:
        kernels = parse(f.read())
    ours = [k for k in kernels if "mmkernels::" in k["name"]]
    if not ours:
        print(f"ptxas report: no ptxas resource lines for mmkernels kernels in {path} (is -Xptxas=-v set?)")
        return 1
    width = min(110, max(len(k["name"]) for k in ours))
    print(f"{'kernel':<{width}} {'arch':<6} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}")
    bad = []
    for k in sorted(ours, key=lambda k: (k["name"], k["arch"])):
        spill = f"{k['spill_st']}/{k['spill_ld']}"
        print(f"{k['name'][:width]:<{width}} {k['arch']:<6} {k['regs']:>4} {spill:>11} {k['stack']:>5} {k['smem']:>6}")
        if k["spill_st"] or k["spill_ld"]:
            bad.append(k)
    archs = sorted({k["arch"] for k in ours})
    print(f"{len(ours)} kernel builds of ours for {', '.join(archs)}; max registers {max(k['regs'] or 0 for k in ours)}")
    if bad:
        print("FAIL: spills to local memory in hot kernels:")
        for k in bad:
            print(f"  {k['name']} [{k['arch']}]: {k['spill_st']} bytes spill stores, {k['spill_ld']} bytes spill loads")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
