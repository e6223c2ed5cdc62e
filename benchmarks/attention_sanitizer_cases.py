"""A few small cross_modal_attention forward+backward calls for compute-sanitizer (memcheck, racecheck):
every tensor-core instantiation, tile edges (Lq, Lk not multiples of 64), masks of every kind, fully
masked rows, dropout. Small on purpose: the sanitizers slow kernels down by orders of magnitude.
Usage: compute-sanitizer --tool memcheck python benchmarks/attention_sanitizer_cases.py
"""
import torch

import mmkernels

torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float16, torch.bfloat16):
    for E in (32, 64, 128):
        for Lq, Lk, masks, p in (
            (17, 123, {}, 0.0),
            (70, 65, {"key_padding_mask": torch.rand(2, 65, device=dev) < 0.3,
                      "kv_lengths": torch.tensor([65, 0], dtype=torch.int32, device=dev)}, 0.2),
            (1, 130, {"attn_mask": torch.randn(1, 2, 1, 130, device=dev)}, 0.0),
            (65, 64, {"attn_mask": torch.rand(65, 64, device=dev) < 0.5}, 0.0),
        ):
            q = torch.randn(2, 2, Lq, E, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(2, 2, Lk, E, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(2, 2, Lk, E, device=dev, dtype=dtype, requires_grad=True)
            out = mmkernels.cross_modal_attention(q, k, v, dropout_p=p, **masks)
            out.float().square().sum().backward()
            assert not torch.isnan(q.grad).any() and not torch.isnan(out).any()
torch.cuda.synchronize()
print("attention sanitizer cases done")
