"""A short CUDA workload for compute-sanitizer (memcheck, racecheck): both forward paths of
fused_concat_linear (fused tensor-core kernel and per-segment cuBLAS), every CUDA dtype, odd and
aligned segment widths, tails in M and N, and the backward; low_rank_fusion forward and backward
(one launch's modalities and the fold past them, a featureless modality); then the attention cases of
benchmarks/attention_sanitizer_cases.py. Small shapes: under the sanitizer every access is checked,
so this must stay quick.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/cuda_sanitize_case.py
"""
import os
import runpy
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmkernels  # noqa: E402
from mmkernels import reference  # noqa: E402

CASES = [((37,), (17, 64, 3), 45), ((130,), (8, 24), 20), ((5, 3), (40,), 70)]
# low_rank_fusion: (leading dims, widths, rank, N)
LRF_CASES = [((37,), (17, 0, 6), 4, 45), ((3, 11), (2, 3, 1, 2, 4, 1, 2, 3, 5), 3, 9)]


def main() -> int:
    failures = 0
    for path in ("fused", "cublas"):
        os.environ["MMKERNELS_FCL_CUDA_PATH"] = path
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for lead, widths, n in CASES:
                xs = [torch.randn(*lead, d, device="cuda", dtype=dtype, requires_grad=True) for d in widths]
                w = (torch.randn(n, sum(widths), device="cuda", dtype=dtype) / sum(widths) ** 0.5).requires_grad_()
                b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
                out = mmkernels.fused_concat_linear(xs, w, b, "gelu")
                out.backward(torch.randn_like(out))
                want = reference.fused_concat_linear([x.detach().double() for x in xs], w.detach().double(),
                                                     b.detach().double(), "gelu")
                err = (out.double() - want).abs().max().item()
                ok = err < (0.05 if dtype == torch.bfloat16 else 0.01)
                failures += not ok
                print(f"{path:6} {str(dtype):15} {lead} {widths} N={n}: max err {err:.2e} {'ok' if ok else 'WRONG'}")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for lead, widths, rank, n in LRF_CASES:
            xs = [torch.randn(*lead, d, device="cuda", dtype=dtype, requires_grad=True) for d in widths]
            fs = [(torch.randn(rank, d + 1, n, device="cuda", dtype=dtype) / (d + 1) ** 0.5).requires_grad_()
                  for d in widths]
            w = torch.randn(rank, device="cuda", dtype=dtype, requires_grad=True)
            b = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
            out = mmkernels.low_rank_fusion(xs, fs, w, b)
            out.backward(torch.randn_like(out))
            d = lambda ts: [t.detach().double() for t in ts]
            want = reference.low_rank_fusion(d(xs), d(fs), w.detach().double(), b.detach().double())
            err = (out.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
            ok = err < (0.05 if dtype == torch.bfloat16 else 0.01)
            failures += not ok
            print(f"lrf    {str(dtype):15} {lead} {widths} R={rank} N={n}: max rel err {err:.2e} {'ok' if ok else 'WRONG'}")
    torch.cuda.synchronize()
    # The attention kernels' cases too, so that one sanitizer process (one torch start-up, the slow
    # part under the sanitizer) covers every kernel of ours.
    attention_cases = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_sanitizer_cases.py")
    if os.path.exists(attention_cases):
        runpy.run_path(attention_cases)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
