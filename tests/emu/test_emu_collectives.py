"""The emulated warp collectives against a plain matmul: ldmatrix (x4, x4.trans, x2.trans) and
mma.sync m16n8k16 through the attention kernels' own wrappers (attn_device.cuh) with the per-lane
addressing the kernels use (csrc/emu/fragment_probe.cu). A wrong fragment layout in the executor
would permute or transpose the products, which these comparisons see."""
from __future__ import annotations

import pytest
import torch

from harness import harness, ptr

pytestmark = pytest.mark.emu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", range(3))
def test_ldmatrix_and_mma_fragments_match_matmul(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(16, 16, generator=g).to(dtype)
    bt = torch.randn(16, 16, generator=g).to(dtype)   # N x K: the B operand stored as K rows (the S = Q K^T case)
    bk = torch.randn(16, 16, generator=g).to(dtype)   # K x N: the B operand stored row-major (the O = P V case)
    nt = torch.full((16, 16), float("nan"))
    nn = torch.full((16, 16), float("nan"))
    x2 = torch.full((16, 8), float("nan"))
    harness().run("emu_fragment_probe", int(dtype == torch.bfloat16), *map(ptr, (a, bt, bk, nt, nn, x2)),
                  buffers=dict(a=a, bt=bt, bk=bk, nt=nt, nn=nn, x2=x2))
    # 16-bit products are exact in float32; only the float32 summation order differs.
    a64 = a.double()
    torch.testing.assert_close(nt.double(), a64 @ bt.double().T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nn.double(), a64 @ bk.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.double(), a64 @ bk.double()[:, :8], rtol=1e-5, atol=1e-5)


def test_fragments_are_not_symmetric_by_accident():
    # A one-hot A and B: a swapped row/column or lane mapping moves the single 1 elsewhere.
    a = torch.zeros(16, 16, dtype=torch.float16)
    bk = torch.zeros(16, 16, dtype=torch.float16)
    a[3, 11] = 1
    bk[11, 13] = 1
    bt = bk.T.contiguous()
    out = {n: torch.zeros(16, w) for n, w in (("nt", 16), ("nn", 16), ("x2", 8))}
    harness().run("emu_fragment_probe", 0, ptr(a), ptr(bt), ptr(bk), ptr(out["nt"]), ptr(out["nn"]), ptr(out["x2"]),
                  buffers=dict(a=a, bt=bt, bk=bk, **out))
    for name in ("nt", "nn"):
        assert out[name].nonzero().tolist() == [[3, 13]], name
    assert out["x2"].abs().sum() == 0
