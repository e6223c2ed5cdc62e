"""CUDA timing of fused_concat_linear: the data behind the fused-vs-cuBLAS dispatch rule and the
issue's targets. Needs a GPU and a CUDA build of mmkernels.

Per case (bfloat16 by default, relu): forward of our op with the automatic choice, forced to the
fused tensor-core kernel and forced to the per-segment cuBLAS path; eager F.linear(torch.cat(...));
the bare cuBLAS GEMM on an input that is already concatenated (the floor for any fusion); then
forward+backward of ours (auto) against eager. CUDA events, warm-up, interleaved contenders,
medians of many repetitions, random normal inputs; every contender is checked against the float64
reference before it is timed.

    python benchmarks/cuda_concat_linear.py [--dtype bfloat16] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmkernels  # noqa: E402
from mmkernels import reference  # noqa: E402

# (M rows, segment widths, N): typical fusion heads, narrow projections, many small segments, large.
CASES = [
    (8192, (768, 768), 768),
    (4096, (1024, 512, 256), 1024),
    (16384, (256, 128, 64, 32), 64),
    (32768, (64,) * 8, 32),
    (65536, (128, 128), 128),
    (1024, (17, 123, 64), 100),
    (2048, (4096, 4096), 4096),
    (256, (512, 512, 512), 16),
]
QUICK = CASES[:6]
TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def time_interleaved(fns: dict, reps: int, warmup: int = 5) -> dict:
    """Median milliseconds per contender; each repetition runs every contender once, in rotating order."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    names = list(fns)
    samples = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            end.synchronize()
            samples[n].append(start.elapsed_time(end))
    return {n: statistics.median(v) for n, v in samples.items()}


class forced_path:
    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.old = os.environ.get("MMKERNELS_FCL_CUDA_PATH")
        os.environ["MMKERNELS_FCL_CUDA_PATH"] = self.path

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("MMKERNELS_FCL_CUDA_PATH", None)
        else:
            os.environ["MMKERNELS_FCL_CUDA_PATH"] = self.old


def with_path(path, fn):
    def run():
        with forced_path(path):
            return fn()

    return run


def bench_case(m, widths, n, dtype, act, reps):
    gen = torch.Generator(device="cuda").manual_seed(0)
    k = sum(widths)
    xs = [torch.randn(m, d, device="cuda", dtype=dtype, generator=gen) for d in widths]
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) / math.sqrt(k)
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    xcat = torch.cat(xs, -1)
    ours = lambda: mmkernels.fused_concat_linear(xs, w, b, act)
    eager = lambda: reference.ACTIVATIONS[act](F.linear(torch.cat(xs, -1), w, b))
    gemm = lambda: torch.mm(xcat, w.t())
    want = reference.fused_concat_linear([x.double() for x in xs], w.double(), b.double(), act)
    for name, fn in [("auto", with_path("auto", ours)), ("fused", with_path("fused", ours)),
                     ("cublas", with_path("cublas", ours)), ("eager", eager)]:
        torch.testing.assert_close(fn().double(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype] * 4,
                                   msg=lambda s: f"{name} wrong on ({m}, {widths}, {n}): {s}")
    fwd = time_interleaved({"auto": with_path("auto", ours), "fused": with_path("fused", ours),
                            "cublas": with_path("cublas", ours), "eager": eager, "gemm": gemm}, reps)

    xs_g = [x.clone().requires_grad_() for x in xs]
    w_g, b_g = w.clone().requires_grad_(), b.clone().requires_grad_()
    grad = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)

    def step(f):
        def run():
            out = f()
            torch.autograd.backward(out, grad, inputs=[*xs_g, w_g, b_g])
        return run

    ours_fb = step(lambda: mmkernels.fused_concat_linear(xs_g, w_g, b_g, act))
    eager_fb = step(lambda: reference.ACTIVATIONS[act](F.linear(torch.cat(xs_g, -1), w_g, b_g)))
    fb = time_interleaved({"ours": ours_fb, "eager": eager_fb}, max(reps // 2, 10))
    return {
        "m": m, "widths": list(widths), "n": n, "dtype": str(dtype).replace("torch.", ""), "activation": act,
        "fwd_ms": fwd, "fwd_bwd_ms": fb,
        "fwd_speedup_vs_eager": fwd["eager"] / fwd["auto"],
        "fwd_vs_bare_gemm": fwd["auto"] / fwd["gemm"],
        "fwd_bwd_speedup_vs_eager": fb["eager"] / fb["ours"],
        "fused_over_cublas": fwd["fused"] / fwd["cublas"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--activation", default="relu")
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("cuda_concat_linear.py: no GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    rows = []
    for m, widths, n in QUICK if args.quick else CASES:
        rows.append(bench_case(m, widths, n, dtype, args.activation, args.reps))
    print(f"fused_concat_linear on {torch.cuda.get_device_name()}, {args.dtype}, {args.activation}; medians in ms")
    print(f"{'M':>6} {'segments':<22} {'N':>5} | {'auto':>7} {'fused':>7} {'cublas':>7} {'eager':>7} {'gemm':>7} "
          f"| {'x eager':>7} {'/gemm':>6} | {'fb ours':>7} {'fb eager':>8} {'x':>5}")
    for r in rows:
        f, fb = r["fwd_ms"], r["fwd_bwd_ms"]
        seg = ",".join(map(str, r["widths"])) if len(r["widths"]) <= 4 else f"{len(r['widths'])}x{r['widths'][0]}"
        print(f"{r['m']:>6} {seg:<22} {r['n']:>5} | {f['auto']:7.3f} {f['fused']:7.3f} {f['cublas']:7.3f} "
              f"{f['eager']:7.3f} {f['gemm']:7.3f} | {r['fwd_speedup_vs_eager']:7.2f} {r['fwd_vs_bare_gemm']:6.2f} "
              f"| {fb['ours']:7.3f} {fb['eager']:8.3f} {r['fwd_bwd_speedup_vs_eager']:5.2f}")
    gm = math.exp(statistics.mean(math.log(r["fwd_bwd_speedup_vs_eager"]) for r in rows))
    worst = min(r["fwd_bwd_speedup_vs_eager"] for r in rows)
    print(f"fwd+bwd vs eager: geometric mean {gm:.2f}x (target >= 1.2), worst {worst:.2f}x (target >= 0.95)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": rows,
                       "fwd_bwd_geomean": gm, "fwd_bwd_worst": worst}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
