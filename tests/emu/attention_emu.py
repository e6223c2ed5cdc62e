"""The CUDA host side of cross_modal_attention (csrc/cuda/cross_modal_attention_cuda.cpp) and of its
varlen form (cross_modal_attention_varlen_cuda.cpp), mirrored
for the emulation harness: the same kernels in the same order (key ranges, forward; dot-rows,
backward, finish-dq), with the parameter blocks filled as that file fills them. Every buffer is a
fresh, exactly sized tensor; outputs start as NaN so that an element no kernel writes shows up."""
from __future__ import annotations

import math

import torch

import attention_support
from harness import Harness, ptr

LOG2E = 1.4426950408889634

TOL = {  # (atol, rtol) for outputs and for gradients, atol relative to max(1, max |expected|)
    torch.float16: ((4e-3, 4e-3), (1e-2, 1e-2)),
    torch.bfloat16: ((3e-2, 3e-2), (6e-2, 6e-2)),
}
DTYPES = list(TOL)
HEAD_DIMS = [32, 64, 128]


def assert_close(actual, expected, tol, what):
    atol, rtol = tol
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    assert not torch.isnan(actual).any(), f"{what}: NaN (an element no kernel wrote, or a NaN computed)"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def dropout_threshold(p: float) -> int:
    t = p * 4294967296.0
    return 0xFFFFFFFF if t >= 4294967295.0 else int(t)


def keep_mask(B, H, Lq, Lk, p, seed):
    """The CPU kernel's keep mask for this seed (the CUDA kernels hash the same way by design):
    uniform attention (q = k = 0) over v = I makes each output element keep / ((1 - p) Lk)."""
    q = torch.zeros(B, H, Lq, 1, dtype=torch.float64)
    k = torch.zeros(B, H, Lk, 1, dtype=torch.float64)
    v = torch.eye(Lk, dtype=torch.float64).expand(B, H, Lk, Lk)
    out = torch.ops.mmkernels.cross_modal_attention.default(q, k, v, None, None, None, 1.0, p, torch.tensor(seed))[0]
    return out > 0


def with_causal(masks, causal, Lq, Lk):
    """The masks with the causal flag's band (mode 1 upper-left, 2 lower-right) folded into attn_mask:
    the form in which the reference sees what the kernels take as a flag."""
    visible = attention_support.reference.causal_visible(causal, Lq, Lk)
    if visible is None:
        return masks
    m = masks.get("attn_mask")
    if m is None:
        m = visible
    elif m.dtype == torch.bool:
        m = m & visible
    else:
        m = m.masked_fill(~visible, float("-inf"))
    return {**masks, "attn_mask": m}


class Problem:
    """The fields every attention kernel reads, and the buffers behind them."""

    def __init__(self, h: Harness, q, k, v, masks, scale, dropout_p=0.0, seed=0, layout="bhsd", causal=0):
        self.h = h
        if layout == "bhsd":
            self.q, self.k, self.v = (t.detach().contiguous().clone() for t in (q, k, v))
        else:  # "bshd": (B, S, H, D) memory seen as (B, H, S, D), as attention over a packed projection gives
            self.q, self.k, self.v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        self.B, self.H, self.Lq, self.E = q.shape
        self.Lk = k.shape[2]
        self.bf16 = int(q.dtype == torch.bfloat16)
        self.scale = scale
        self.buffers = {"q": self.q, "k": self.k, "v": self.v}
        kpm = masks.get("key_padding_mask")
        lengths = masks.get("kv_lengths")
        self.kpm = None if kpm is None else kpm.contiguous().clone()
        self.lengths = None if lengths is None else lengths.to(torch.int32).contiguous()
        self.kv_range = None
        if self.kpm is not None or self.lengths is not None:
            self.kv_range = torch.full((self.B, 2), -7, dtype=torch.int32)
            h.run("emu_key_ranges", ptr(self.lengths), ptr(self.kpm), self.B, self.Lk, ptr(self.kv_range),
                  buffers={"kv_lengths": self.lengths, "key_padding_mask": self.kpm, "kv_range": self.kv_range})
        m = masks.get("attn_mask")
        self.mask_kind, self.mask, strides = 0, None, (0, 0, 0, 0)
        if m is not None:
            self.mask = m.contiguous() if m.dtype == torch.bool else m.to(torch.float32).contiguous()
            self.mask_kind = 1 if m.dtype == torch.bool else 2
            strides = self.mask.expand(self.B, self.H, self.Lq, self.Lk).stride()
        self.dropout = dropout_p > 0.0
        self.seed_t = torch.tensor([seed], dtype=torch.int64)
        self.fields = dict(
            q=self.q.data_ptr(), k=self.k.data_ptr(), v=self.v.data_ptr(),
            **{f"{n}_s{d}": t.stride(i) for n, t in (("q", self.q), ("k", self.k), ("v", self.v))
               for i, d in enumerate("bhl")},
            B=self.B, H=self.H, Lq=self.Lq, Lk=self.Lk, H_kv=self.k.shape[1], causal=causal,
            kv_range=0 if self.kv_range is None else self.kv_range.data_ptr(),
            kpm=0 if self.kpm is None else self.kpm.data_ptr(),
            mask_kind=self.mask_kind, mask=0 if self.mask is None else self.mask.data_ptr(),
            m_sb=strides[0], m_sh=strides[1], m_sl=strides[2], m_sk=strides[3],
            dropout=int(self.dropout), threshold=dropout_threshold(dropout_p) if self.dropout else 0,
            seed=seed, seed_ptr=0, cu_seqlens_q=0, cu_seqlens_k=0, lse_sh=0,
        )
        self.inv_keep = 1.0 / (1.0 - dropout_p) if self.dropout and dropout_p < 1.0 else 0.0
        self.buffers.update(kv_range=self.kv_range, key_padding_mask=self.kpm, attn_mask=self.mask)

    def arrays(self, backward, extra):
        return self.h.attn_arrays(backward, {**self.fields, **extra}, self.scale * LOG2E, self.inv_keep)

    def forward(self, expect_errors=False, num_splits=1):
        """num_splits > 1: the split-key forward (float32 partials) and the combine kernel, as the host
        runs them for decoding shapes (attn::choose_key_splits)."""
        B, H, Lq, E = self.q.shape
        out = torch.full((B, H, Lq, E), math.nan, dtype=self.q.dtype)
        lse = torch.full((B, H, Lq), math.nan, dtype=torch.float32)
        split = num_splits > 1
        out_accum = torch.full((num_splits, B, H, Lq, E), math.nan) if split else None
        lse_accum = torch.full((num_splits, B, H, Lq), math.nan) if split else None
        ints, reals = self.arrays(False, dict(out=out.data_ptr(), o_sb=out.stride(0), o_sh=out.stride(1),
                                              o_sl=out.stride(2), lse=lse.data_ptr(), num_splits=num_splits,
                                              out_accum=0 if not split else out_accum.data_ptr(),
                                              lse_accum=0 if not split else lse_accum.data_ptr()))
        errors = self.h.run("emu_attn_fwd", E, self.bf16, ints, reals,
                            buffers={**self.buffers, "out": out, "lse": lse, "out_accum": out_accum,
                                     "lse_accum": lse_accum}, expect_errors=expect_errors)
        if split:
            errors += self.h.run("emu_combine_splits", ptr(out_accum), ptr(lse_accum), num_splits, B, H, Lq, E,
                                 ptr(out), *out.stride()[:3], ptr(lse), self.bf16,
                                 buffers={"out_accum": out_accum, "lse_accum": lse_accum, "out": out, "lse": lse},
                                 expect_errors=expect_errors)
        return (out, lse, errors) if expect_errors else (out, lse)

    def backward(self, out, lse, dout, expect_errors=False):
        B, H, Lq, E = self.q.shape
        dout = dout.detach().contiguous().clone()
        out = out.contiguous().clone()
        dsum = torch.full((B, H, Lq), math.nan, dtype=torch.float32)
        self.h.run("emu_dot_rows", ptr(dout), *dout.stride()[:3], ptr(out), *out.stride()[:3], B, H, Lq, E, self.bf16,
                   ptr(dsum), buffers={"dout": dout, "out": out, "dsum": dsum})
        # dq and its float32 accumulator share q's dense layout, which finish_dq relies on (as on the host).
        dq = torch.full_like(self.q, math.nan)
        dq_accum = torch.zeros_like(dq, dtype=torch.float32)
        assert dq_accum.stride() == dq.stride()
        dk = torch.full_like(self.k, math.nan)
        dv = torch.full_like(self.v, math.nan)
        ints, reals = self.arrays(True, dict(
            dout=dout.data_ptr(), do_sb=dout.stride(0), do_sh=dout.stride(1), do_sl=dout.stride(2),
            lse=lse.data_ptr(), dsum=dsum.data_ptr(), dq_accum=dq_accum.data_ptr(), dq_sb=dq_accum.stride(0),
            dq_sh=dq_accum.stride(1), dq_sl=dq_accum.stride(2), dk=dk.data_ptr(), dk_sb=dk.stride(0),
            dk_sh=dk.stride(1), dk_sl=dk.stride(2), dv=dv.data_ptr(), dv_sb=dv.stride(0), dv_sh=dv.stride(1),
            dv_sl=dv.stride(2)))
        errors = self.h.run("emu_attn_bwd", E, self.bf16, ints, reals,
                            buffers={**self.buffers, "dout": dout, "lse": lse, "dsum": dsum, "dq_accum": dq_accum,
                                     "dk": dk, "dv": dv}, expect_errors=expect_errors)
        self.h.run("emu_finish_dq", ptr(dq_accum), self.scale, ptr(dq), dq.numel(), self.bf16,
                   buffers={"dq_accum": dq_accum, "dq": dq})
        return (dq, dk, dv, errors) if expect_errors else (dq, dk, dv)

    def dropout_factors(self, dtype=torch.float32):
        z = torch.full((self.B, self.H, self.Lq, self.Lk), math.nan, dtype=dtype)
        ints, reals = self.arrays(False, dict(out=0, o_sb=0, o_sh=0, o_sl=0, lse=0, num_splits=1, out_accum=0,
                                              lse_accum=0))
        self.h.run("emu_dropout_factors", ints, reals, 0, self.Lq, ptr(z), int(dtype == torch.float64),
                   buffers={**self.buffers, "z": z})
        return z


class VarlenProblem:
    """The packed (varlen) launches as cross_modal_attention_varlen_cuda.cpp makes them: q (total_q, H,
    E), k / v (total_k, H_kv, E) with any row and head strides (views are kept, not copied), the grid
    over B sequences x the longest, batch strides = row strides, lse / dsum (H, total_q)."""

    def __init__(self, h: Harness, q, k, v, cu_q, cu_k, scale, dropout_p=0.0, seed=0, causal=0):
        self.h = h
        self.q, self.k, self.v = (t.detach() for t in (q, k, v))
        self.cu_q, self.cu_k = (c.to(torch.int32).contiguous().clone() for c in (cu_q, cu_k))
        lengths = lambda c: (c[1:] - c[:-1]).tolist() or [0]
        self.max_q, self.max_k = max(lengths(self.cu_q)), max(lengths(self.cu_k))
        self.total_q, self.H, self.E = q.shape
        self.bf16 = int(q.dtype == torch.bfloat16)
        self.scale = scale
        self.dropout = dropout_p > 0.0
        self.inv_keep = 1.0 / (1.0 - dropout_p) if self.dropout and dropout_p < 1.0 else 0.0
        # The buffers are the tensors' whole storage (a view may start inside a larger projection).
        self.buffers = {"q": self._storage(self.q), "k": self._storage(self.k), "v": self._storage(self.v),
                        "cu_seqlens_q": self.cu_q, "cu_seqlens_k": self.cu_k}
        self.fields = dict(
            q=self.q.data_ptr(), k=self.k.data_ptr(), v=self.v.data_ptr(),
            **{f"{n}_s{d}": t.stride(i) for n, t in (("q", self.q), ("k", self.k), ("v", self.v))
               for d, i in (("b", 0), ("h", 1), ("l", 0))},
            B=self.cu_q.numel() - 1, H=self.H, Lq=self.max_q, Lk=self.max_k, H_kv=self.k.shape[1], causal=causal,
            kv_range=0, kpm=0, mask_kind=0, mask=0, m_sb=0, m_sh=0, m_sl=0, m_sk=0,
            dropout=int(self.dropout), threshold=dropout_threshold(dropout_p) if self.dropout else 0,
            seed=seed, seed_ptr=0, cu_seqlens_q=self.cu_q.data_ptr(), cu_seqlens_k=self.cu_k.data_ptr(),
            lse_sh=self.total_q,
        )

    @staticmethod
    def _storage(t):
        base = t
        while base._base is not None:
            base = base._base
        return base

    def arrays(self, backward, extra):
        return self.h.attn_arrays(backward, {**self.fields, **extra}, self.scale * LOG2E, self.inv_keep)

    def forward(self, expect_errors=False):
        out = torch.full((self.total_q, self.H, self.E), math.nan, dtype=self.q.dtype)
        lse = torch.full((self.H, self.total_q), math.nan, dtype=torch.float32)
        ints, reals = self.arrays(False, dict(out=out.data_ptr(), o_sb=out.stride(0), o_sh=out.stride(1),
                                              o_sl=out.stride(0), lse=lse.data_ptr(), num_splits=1, out_accum=0,
                                              lse_accum=0))
        errors = self.h.run("emu_attn_fwd", self.E, self.bf16, ints, reals,
                            buffers={**self.buffers, "out": out, "lse": lse}, expect_errors=expect_errors)
        return (out, lse, errors) if expect_errors else (out, lse)

    def backward(self, out, lse, dout):
        dout = dout.detach().contiguous().clone()
        out = out.contiguous().clone()
        dsum = torch.full((self.H, self.total_q), math.nan, dtype=torch.float32)
        # D = rowsum(dO O) of the packed rows as one (1, H, total_q) problem: lse's layout.
        self.h.run("emu_dot_rows", ptr(dout), 0, dout.stride(1), dout.stride(0), ptr(out), 0, out.stride(1),
                   out.stride(0), 1, self.H, self.total_q, self.E, self.bf16, ptr(dsum),
                   buffers={"dout": dout, "out": out, "dsum": dsum})
        dq = torch.full((self.total_q, self.H, self.E), math.nan, dtype=self.q.dtype)
        dq_accum = torch.zeros(dq.shape, dtype=torch.float32)
        dk = torch.full(self.k.shape, math.nan, dtype=self.k.dtype)
        dv = torch.full(self.v.shape, math.nan, dtype=self.v.dtype)
        ints, reals = self.arrays(True, dict(
            dout=dout.data_ptr(), do_sb=dout.stride(0), do_sh=dout.stride(1), do_sl=dout.stride(0),
            lse=lse.data_ptr(), dsum=dsum.data_ptr(), dq_accum=dq_accum.data_ptr(), dq_sb=dq_accum.stride(0),
            dq_sh=dq_accum.stride(1), dq_sl=dq_accum.stride(0), dk=dk.data_ptr(), dk_sb=dk.stride(0),
            dk_sh=dk.stride(1), dk_sl=dk.stride(0), dv=dv.data_ptr(), dv_sb=dv.stride(0), dv_sh=dv.stride(1),
            dv_sl=dv.stride(0)))
        self.h.run("emu_attn_bwd", self.E, self.bf16, ints, reals,
                   buffers={**self.buffers, "dout": dout, "lse": lse, "dsum": dsum, "dq_accum": dq_accum, "dk": dk,
                            "dv": dv})
        self.h.run("emu_finish_dq", ptr(dq_accum), self.scale, ptr(dq), dq.numel(), self.bf16,
                   buffers={"dq_accum": dq_accum, "dq": dq})
        return dq, dk, dv
