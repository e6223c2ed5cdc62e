"""GPU benchmark of cross_modal_attention (issue 5): our op vs F.scaled_dot_product_attention with each
backend forced (flash, efficient, cuDNN, math), and the CrossModalAttention module vs
nn.MultiheadAttention, in bfloat16.

Per case (B, H, Lq, Lk, E), unpadded and with about half the keys padded: forward and forward+backward
median time (CUDA events, contenders interleaved, random inputs), TFLOP/s (4*B*H*Lq*Lk*E forward,
2.5x that for backward, nominal: padded keys are counted), the fraction of the measured bf16 matmul
rate, and peak memory. Correctness is checked against SDPA's math backend before timing.

Usage: python benchmarks/gpu_attention_bench.py [--json OUT.json] [--reps N] [--quick]
Called by benchmarks/gpu_check.sh; needs the extension built with CUDA.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import mmkernels

CASES = [(4, 16, 4096, 1024, 128), (8, 16, 1024, 256, 64), (32, 8, 256, 4096, 64), (2, 16, 16384, 512, 128),
         (64, 12, 1, 1024, 64)]
BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
DTYPE = torch.bfloat16


def matmul_peak(n=8192, reps=20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=DTYPE)
    b = torch.randn(n, n, device="cuda", dtype=DTYPE)
    t = time_fns({"mm": lambda: a @ b}, reps)["mm"]
    return 2 * n**3 / t / 1e12


def time_fns(fns: dict, reps: int, warmup: int = 3) -> dict:
    """Median seconds per call, contenders interleaved round by round."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            f()
            e.record()
            e.synchronize()
            times[k].append(s.elapsed_time(e) / 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_mem(f) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    f()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def supported(f) -> bool:
    try:
        f()
        torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False


def bench_case(B, H, Lq, Lk, E, padded: bool, reps: int) -> dict:
    q = torch.randn(B, H, Lq, E, device="cuda", dtype=DTYPE, requires_grad=True)
    k = torch.randn(B, H, Lk, E, device="cuda", dtype=DTYPE, requires_grad=True)
    v = torch.randn(B, H, Lk, E, device="cuda", dtype=DTYPE, requires_grad=True)
    kpm = None
    sdpa_mask = None
    if padded:  # about half the keys padded, on the right, varying per batch
        lengths = torch.randint(Lk // 4, 3 * Lk // 4 + 1, (B,), device="cuda")
        kpm = torch.arange(Lk, device="cuda")[None, :] >= lengths[:, None]
        sdpa_mask = (~kpm)[:, None, None, :]  # True = may attend
    go = torch.randn(B, H, Lq, E, device="cuda", dtype=DTYPE)

    def ours():
        return mmkernels.cross_modal_attention(q, k, v, key_padding_mask=kpm)

    fwd = {"ours": ours}
    for name, be in BACKENDS.items():
        def f(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
        fwd[name] = f
    fwd = {n: f for n, f in fwd.items() if supported(f)}

    # Correctness first: ours against the math backend (float32 accumulation in bf16 inputs).
    with torch.no_grad():
        ref = fwd["sdpa_math"]() if "sdpa_math" in fwd else None
        out = ours()
        err = (out.float() - ref.float()).abs().max().item() if ref is not None else float("nan")

    def fb(f):
        def run():
            q.grad = k.grad = v.grad = None
            f().backward(go)
        return run

    fwdbwd = {n: fb(f) for n, f in fwd.items()}
    with torch.no_grad():
        t_fwd = time_fns(fwd, reps)
    t_fb = time_fns(fwdbwd, max(3, reps // 2))
    with torch.no_grad():
        mem_fwd = {n: peak_mem(f) for n, f in fwd.items()}
    mem_fb = {n: peak_mem(f) for n, f in fwdbwd.items()}
    flops = 4.0 * B * H * Lq * Lk * E
    return {
        "case": [B, H, Lq, Lk, E],
        "padded": padded,
        "max_abs_err_vs_math": err,
        "fwd_s": t_fwd,
        "fwdbwd_s": t_fb,
        "fwd_tflops": {n: flops / t / 1e12 for n, t in t_fwd.items()},
        "fwdbwd_tflops": {n: 3.5 * flops / t / 1e12 for n, t in t_fb.items()},
        "fwd_peak_bytes": mem_fwd,
        "fwdbwd_peak_bytes": mem_fb,
    }


def bench_module(B, L, S, embed, heads, reps: int) -> dict:
    """CrossModalAttention vs nn.MultiheadAttention, forward+backward, batch_first, key_padding_mask."""
    if not hasattr(mmkernels.nn, "CrossModalAttention"):
        return {"skipped": "mmkernels.nn.CrossModalAttention not present"}
    mha = torch.nn.MultiheadAttention(embed, heads, batch_first=True, device="cuda", dtype=DTYPE)
    ours = mmkernels.nn.CrossModalAttention.from_module(mha)
    x = torch.randn(B, L, embed, device="cuda", dtype=DTYPE, requires_grad=True)
    mem = torch.randn(B, S, embed, device="cuda", dtype=DTYPE, requires_grad=True)
    lengths = torch.randint(S // 4, 3 * S // 4 + 1, (B,), device="cuda")
    kpm = torch.arange(S, device="cuda")[None, :] >= lengths[:, None]

    def fb(m):
        def run():
            x.grad = mem.grad = None
            m.zero_grad(set_to_none=True)
            m(x, mem, mem, key_padding_mask=kpm, need_weights=False)[0].float().square().mean().backward()
        return run

    t = time_fns({"ours": fb(ours), "nn.MultiheadAttention": fb(mha)}, reps)
    return {"case": [B, L, S, embed, heads], "fwdbwd_s": t, "speedup": t["nn.MultiheadAttention"] / t["ours"]}


def geomean(xs):
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="the first two cases and one module case only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    t0 = time.time()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    peak = matmul_peak()
    print(f"device: {dev}; torch {torch.__version__}; measured bf16 matmul peak {peak:.0f} TFLOP/s")
    results = []
    for case in CASES[:2] if args.quick else CASES:
        for padded in (False, True):
            r = bench_case(*case, padded=padded, reps=args.reps)
            results.append(r)
            best_f = min((t for n, t in r["fwd_s"].items() if n != "ours"), default=float("nan"))
            best_fb = min((t for n, t in r["fwdbwd_s"].items() if n != "ours"), default=float("nan"))
            r["fwd_vs_best_sdpa"] = best_f / r["fwd_s"]["ours"]
            r["fwdbwd_vs_best_sdpa"] = best_fb / r["fwdbwd_s"]["ours"]
            r["fwd_frac_of_matmul_peak"] = r["fwd_tflops"]["ours"] / peak
            cols = " ".join(f"{n}={t * 1e3:.3f}" for n, t in r["fwd_s"].items())
            print(f"{tuple(case)} padded={padded} err={r['max_abs_err_vs_math']:.2e} fwd ms: {cols}")
            cols = " ".join(f"{n}={t * 1e3:.3f}" for n, t in r["fwdbwd_s"].items())
            print(f"{'':>28} fwd+bwd ms: {cols}")
    modules = [bench_module(8, 1024, 256, 1024, 16, args.reps)]
    if not args.quick:
        modules.append(bench_module(4, 4096, 1024, 2048, 16, args.reps))
    summary = {
        "device": dev,
        "torch": torch.__version__,
        "matmul_peak_tflops": peak,
        "fwd_geomean_vs_best_sdpa": geomean([r["fwd_vs_best_sdpa"] for r in results]),
        "fwdbwd_geomean_vs_best_sdpa": geomean([r["fwdbwd_vs_best_sdpa"] for r in results]),
        "module_fwdbwd_speedup_vs_mha": [m.get("speedup") for m in modules],
        "seconds": time.time() - t0,
    }
    print()
    print(f"{'case':>28} {'pad':>5} {'fwd ms':>8} {'TF/s':>6} {'%peak':>6} {'xSDPA':>6} {'f+b ms':>8} {'xSDPA':>6}")
    for r in results:
        print(f"{str(tuple(r['case'])):>28} {str(r['padded']):>5} {r['fwd_s']['ours'] * 1e3:8.3f} "
              f"{r['fwd_tflops']['ours']:6.1f} {100 * r['fwd_frac_of_matmul_peak']:6.1f} {r['fwd_vs_best_sdpa']:6.2f} "
              f"{r['fwdbwd_s']['ours'] * 1e3:8.3f} {r['fwdbwd_vs_best_sdpa']:6.2f}")
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "cases": results, "modules": modules}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
