"""Shared machinery of the differential fuzz tests: Hypothesis profiles, tensor builders that vary
layout and values, and the comparison against the float64 reference.

Profiles (MMKERNELS_FUZZ_PROFILE):
  fast (default)  a few dozen derandomised cases per op, so the default test run stays quick and
                  never flakes;
  long            thousands of fresh random cases per op (MMKERNELS_FUZZ_EXAMPLES, default 2000),
                  run by tests/hardening/long/run_long_fuzz.sh (.ci/steps/30-long-fuzz.sh in CI).
The settings are applied per test (not with load_profile) so other Hypothesis tests keep theirs.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mmkernels import reference

PROFILE = os.environ.get("MMKERNELS_FUZZ_PROFILE", "fast")
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

if PROFILE == "long":
    FUZZ = settings(
        max_examples=int(os.environ.get("MMKERNELS_FUZZ_EXAMPLES", "2000")),
        deadline=None,
        database=None,  # no replay of examples saved by earlier runs: the seed alone fixes the draw
        suppress_health_check=_HEALTH,
        print_blob=True,  # a failure prints the @reproduce_failure blob to replay it
    )
elif PROFILE == "fast":
    FUZZ = settings(
        max_examples=int(os.environ.get("MMKERNELS_FUZZ_EXAMPLES", "30")),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=_HEALTH,
    )
else:
    raise ValueError(f"MMKERNELS_FUZZ_PROFILE: expected 'fast' or 'long', got {PROFILE!r}")

# Per-dtype tolerances against the float64 reference: (atol relative to the output's scale, rtol).
# The same numbers as tests/conftest.py and the README's table.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}

LAYOUTS = ("contiguous", "strided", "transposed", "expanded", "offset")
SPECIALS = (math.nan, math.inf, -math.inf)


# --------------------------------------------------------------------------- strategies

# Sizes biased towards the edges: empty, one, odd, just past a vector width.
small_size = st.sampled_from([0, 1, 1, 2, 3, 5, 7, 8, 9, 17])
positive_size = st.sampled_from([1, 1, 2, 3, 5, 7, 8, 9, 16, 17, 33])
dtypes = st.sampled_from([torch.float64, torch.float64, torch.float64, torch.float32, torch.bfloat16, torch.float16])
# Magnitude of the values: ordinary, tiny (denormal range for float32) or huge but finite.
scales = st.sampled_from([1.0, 1.0, 1.0, 1e-30, 1e-3, 1e3, 1e15])


@st.composite
def specials(draw, max_count=3, values=SPECIALS):
    """A list of (position in [0, 1), value) NaN/Inf injections; usually empty."""
    if not draw(st.booleans()) or not draw(st.booleans()):
        return []
    n = draw(st.integers(1, max_count))
    return [(draw(st.floats(0, 1, exclude_max=True)), draw(st.sampled_from(values))) for _ in range(n)]


# --------------------------------------------------------------------------- tensors


def make_tensor(shape, dtype, *, layout="contiguous", scale=1.0, inject=(), seed=0, requires_grad=False):
    """A tensor of `shape` and `dtype` whose memory layout is `layout`; values ~ N(0, scale^2) from
    `seed`, with NaN/Inf written at the fractional positions of `inject`.

    The values are built contiguous in float64 first, so every layout of the same seed holds the
    same numbers. The result is a leaf (detached view), so gradients are taken w.r.t. the strided
    tensor itself.
    """
    shape = tuple(shape)
    gen = torch.Generator().manual_seed(seed)
    vals = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if dtype.is_floating_point:
        # Saturate to the dtype's finite range (float16's is +-65504, below the 1e15 scale): NaN/Inf
        # reach the ops only where `inject` puts them, which the cases keep away from masked keys.
        big = torch.finfo(dtype).max
        vals = vals.clamp(-big, big)
    if layout == "expanded" and len(shape) >= 1:
        # Stride 0 along the first non-empty dim: the same row seen several times.
        d = next((i for i, s in enumerate(shape) if s > 1), None)
        if d is not None:
            vals = vals.narrow(d, 0, 1)
    flat = vals.reshape(-1)
    for frac, value in inject:
        if flat.numel():
            flat[int(frac * flat.numel())] = value
    vals = flat.reshape(vals.shape).to(dtype)
    if layout == "expanded":
        t = vals.expand(shape)
    elif layout == "strided" and shape:
        base = torch.zeros(tuple(2 * s for s in shape), dtype=dtype)
        index = tuple(slice(None, None, 2) for _ in shape)
        base[index] = vals
        t = base[index]
    elif layout == "transposed" and len(shape) >= 2:
        perm = tuple(reversed(range(len(shape))))
        t = vals.permute(perm).contiguous().permute(perm)  # column-major strides
    elif layout == "offset":
        base = torch.zeros(vals.numel() + 3, dtype=dtype)
        base[3:] = vals.reshape(-1)
        t = base[3:].view(shape)  # non-zero storage offset
    else:
        t = vals.contiguous()
    assert t.shape == shape
    return t.detach().requires_grad_(requires_grad)


def to_reference(t, requires_grad=None):
    """A float64 copy of `t` (same values), as a fresh leaf for the reference's autograd."""
    if t is None:
        return None
    rg = t.requires_grad if requires_grad is None else requires_grad
    return t.detach().to(torch.float64).requires_grad_(rg)


# --------------------------------------------------------------------------- comparison


def _classes(x):
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf, per element."""
    c = torch.zeros(x.shape, dtype=torch.int8)
    c[torch.isnan(x)] = 1
    c[x == math.inf] = 2
    c[x == -math.inf] = 3
    return c


def case_magnitude(case) -> float:
    """The smallest value scale a case draws (its tensors' "scale" entries), at most 1: the floor of
    the absolute tolerance's scale, so that an exactly-cancelling result (a true 0 computed as 1e-18)
    is judged against the size of its terms, not against 0."""
    found = [1.0]

    def walk(x):
        if isinstance(x, dict):
            if isinstance(x.get("scale"), float) and "layout" in x:
                found.append(x["scale"])
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(case)
    return min(found)


# How far ours may exceed the reference's own error in the case's dtype (see assert_matches).
OWN_ERROR_FACTOR = 2.0
# Per spec: cases drawn, results compared, and how many of those passed only thanks to the
# reference's own error in their dtype (printed at the end of the run by conftest.py).
STATS: dict = {}


@contextlib.contextmanager
def flash_reference():
    """reference.cross_modal_attention computed by PyTorch's flash kernel (F.scaled_dot_product_attention
    under SDPBackend.FLASH_ATTENTION) instead of a materialised softmax, for what is run inside:
    PyTorch's other evaluation of attention in the case's dtype. Its backward forms
    dS = P (dP - rowsum(dO O)), as ours does, with O rounded to that dtype; the materialised softmax's
    backward instead cancels exactly (a query that sees one key has dS = 0 exactly there), so the two
    differ by rounding noise that a LayerNorm in front may amplify a few hundred times, and, in
    bfloat16, by O's rounding times a large scale (ours and SDPA's flash both err by up to ~17% of the
    gradient's scale on scale-10 bfloat16 logits, the materialised softmax by 0.3%). The flash
    kernel needs one head size and contiguous rows: q, k and v are zero-padded to the larger of E
    and Ev (zeros add nothing to a score or to dO O) and the output cut back. Without dropout only;
    a row that sees no key is NaN in SDPA, and the comparison skips it."""
    materialised = reference.cross_modal_attention

    def sdpa(q, k, v, *, key_padding_mask=None, kv_lengths=None, attn_mask=None, scale=None, dropout_p=0.0,
             dropout_mask=None, is_causal=False, enable_gqa=False):
        # The causal flag folded into a bool mask, and the kv heads repeated (the flash kernel takes neither
        # with other masks).
        causal, attn_mask = reference.causal_mode(is_causal, attn_mask, q.shape[-2], k.shape[-2])
        if causal:
            tri = reference.causal_visible(causal, q.shape[-2], k.shape[-2], q.device)
            attn_mask = tri if attn_mask is None else (
                attn_mask & tri if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tri, -math.inf))
        if k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        if dropout_p > 0.0 or dropout_mask is not None:
            return materialised(q, k, v, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths,
                                attn_mask=attn_mask, scale=scale, dropout_p=dropout_p, dropout_mask=dropout_mask)
        mask = visible = reference.visible_keys(q, k, key_padding_mask, kv_lengths, attn_mask)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            mask = attn_mask.to(q.dtype).masked_fill(~visible, -math.inf)
        e, ev = q.shape[-1], v.shape[-1]
        d = max(e, ev)
        scale = e**-0.5 if scale is None else scale
        q, k, v = (F.pad(t, (0, d - t.shape[-1])).contiguous() for t in (q, k, v))  # flash wants stride 1
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out[..., :ev]

    reference.cross_modal_attention = sdpa
    try:
        yield
    finally:
        reference.cross_modal_attention = materialised


def reference_own_error(same_dtype, expected):
    """The largest absolute error of the reference evaluated in the case's dtype (each tensor of
    `same_dtype`: PyTorch's evaluations of it) against the float64 reference, over elements finite
    in both: what PyTorch's own code makes on these inputs in that dtype."""
    e = expected.detach().to(torch.float64)
    worst = 0.0
    for t in same_dtype:
        a = t.detach().to(torch.float64)
        both = torch.isfinite(a) & torch.isfinite(e)
        if both.any():
            worst = max(worst, (a[both] - e[both]).abs().max().item())
    return worst


def assert_matches(actual, expected, dtype, what="output", expected_same_dtype=(), floor=0.0):
    """`actual` (any dtype) against the float64 `expected`. Returns whether it passed only thanks to
    the reference's own error in its dtype (see below).

    NaN, +Inf and -Inf must sit exactly where the float64 reference puts them (IEEE propagation does
    not depend on summation order as long as finite partial sums do not overflow, which the
    generators keep true), or where its values rounded to the case's dtype do (a gradient beyond
    float16's range is +-Inf there), or where the reference evaluated in the case's own dtype puts them
    (`expected_same_dtype[0]`: PyTorch's float32 gelu(+Inf) is NaN, for one, while float64's is +Inf).
    Finite elements must agree with the float64 reference within the dtype's tolerance, the
    absolute part scaled by the largest finite magnitude of the expected tensor -- or, where the
    problem is ill-conditioned in the case's dtype, within OWN_ERROR_FACTOR times the largest error
    that the reference itself makes in that dtype (over `expected_same_dtype`, PyTorch's evaluations
    of it in that dtype; float32/bfloat16/float16 only). The case that needs it: a saturated tanh/sigmoid,
    whose gradient 1 - y*y (or y*(1 - y)) keeps no relative precision once y rounds to +-1 (or 0/1)
    in float32, exactly as PyTorch's own tanh_backward; the dtype's tolerance would fail PyTorch's
    own float32 result there. The bound is per tensor, like the scaled absolute tolerance, and never
    narrower than the dtype's.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    ca, ce = _classes(a), _classes(e)
    # The float64 value rounded to the case's dtype: one beyond its range is +-Inf there.
    ok = (ca == ce) | (ca == _classes(e.to(dtype).to(torch.float64)))
    if expected_same_dtype:
        ok |= ca == _classes(expected_same_dtype[0].detach().to(torch.float64))
    if not ok.all():
        bad = tuple((~ok).nonzero()[:5].T)
        raise AssertionError(
            f"{what}: NaN/Inf positions differ from the reference at {torch.stack(bad, -1).tolist()}: "
            f"ours {a[bad].tolist()}, float64 reference {e[bad].tolist()}"
        )
    finite = (ca == 0) & (ce == 0)
    if not finite.any():
        return False
    atol, rtol = TOLERANCES[dtype]
    # Scale-relative, with the case's smallest value scale as the floor (not 1: the generators also
    # produce tiny, 1e-30, values).
    scale = max(e[finite].abs().max().item(), floor) or 1.0
    atol = atol * scale
    own = reference_own_error(expected_same_dtype, expected) if dtype != torch.float64 else 0.0
    widened = False
    if OWN_ERROR_FACTOR * own > atol:
        try:
            torch.testing.assert_close(a[finite], e[finite], atol=atol, rtol=rtol)
        except AssertionError:
            widened = True
        atol = OWN_ERROR_FACTOR * own
    torch.testing.assert_close(
        a[finite], e[finite], atol=atol, rtol=rtol,
        msg=lambda m: f"{what} ({dtype}): {m} (reference's own {dtype} error: {own:.3g})",
    )
    return widened
