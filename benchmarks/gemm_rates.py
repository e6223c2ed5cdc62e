"""float32 GEMM rates on this CPU: mmkernels' GEMM (one-input fused_concat_linear, i.e. csrc/cpu/matmul.cpp's
rule: oneDNN, packed_gemm or ATen) against F.linear (torch's: MKL on x86 wheels), forward, at the
projection shapes of the benchmarks. Interleaved, warmed up, median of 30 calls per round, the middle
of 3 rounds.

    python benchmarks/gemm_rates.py [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import mmkernels

# (M, K, N): x (M x K) @ W.T (K -> N).
SHAPES = [(392, 512, 1024), (392, 1024, 512), (1024, 512, 512), (2048, 1280, 256), (4096, 2048, 2048), (64, 512, 512),
          (16, 1024, 1024)]


def median_seconds(fn, calls: int = 30) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {model}; threads {args.threads}; mmkernels GEMM: {mmkernels._C.cpu_float32_gemm()}")
    print(f"{'M x K -> N':>20} {'F.linear GF/s':>14} {'ours GF/s':>10} {'ratio':>6}")
    for M, K, N in SHAPES:
        x, w = torch.randn(M, K), torch.randn(N, K) * K ** -0.5
        torch.testing.assert_close(mmkernels.fused_concat_linear([x], w), F.linear(x, w), rtol=1e-4, atol=1e-4)
        ours = lambda: mmkernels.fused_concat_linear([x], w)  # noqa: E731
        theirs = lambda: F.linear(x, w)  # noqa: E731
        for fn in (ours, theirs):
            for _ in range(5):
                fn()
        rounds = [(median_seconds(theirs), median_seconds(ours)) for _ in range(3)]
        t_theirs = sorted(r[0] for r in rounds)[1]
        t_ours = sorted(r[1] for r in rounds)[1]
        gflop = 2 * M * N * K / 1e9
        print(f"{f'{M} x {K} -> {N}':>20} {gflop / t_theirs:14.1f} {gflop / t_ours:10.1f} {t_theirs / t_ours:5.2f}x")


if __name__ == "__main__":
    main()
