"""Differential fuzzing: every entry of fuzz_table.SPECS against the reference, on drawn shapes,
layouts, values (tiny, huge, NaN, Inf) and dtypes.

Checked per result (output, then every gradient):
  - NaN/+Inf/-Inf sit where the float64 reference puts them, or where the reference evaluated in the
    case's own dtype does (what a user of the PyTorch code we replace would get);
  - finite values agree with the reference evaluated in float64 within the dtype's tolerance, or
    (float32/bfloat16) within a multiple of PyTorch's own error in that dtype: see
    fuzz_support.assert_matches.
"""
import functools

import pytest
import torch
from hypothesis import given

from fuzz_support import FUZZ, STATS, assert_matches, flash_reference
from fuzz_table import SPECS


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_matches_reference(spec):
    @FUZZ
    @given(case=spec.cases)
    def check(case):
        stats = STATS.setdefault(spec.name, {"cases": 0, "results": 0, "widened": 0})
        stats["cases"] += 1
        dtype = case["dtype"]
        ours = spec.run(case, "ours", dtype)
        want64 = spec.run(case, "reference", torch.float64)
        # PyTorch's own evaluations of the reference in the case's dtype: the plain one, then, only
        # when a result fails against that, the one with SDPA's flash attention too.
        same = [] if dtype == torch.float64 else [spec.run(case, "reference", dtype)]
        assert ours.keys() == want64.keys(), "ours and the reference disagree on which gradients exist"
        for name, got in ours.items():
            if name != "out" and spec.forward_only(case):
                continue
            assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
            compare = functools.partial(assert_matches, got, want64[name], dtype, what=name,
                                        floor=spec.magnitude(case))
            try:
                widened = compare(expected_same_dtype=[s[name] for s in same])
            except AssertionError:
                if len(same) != 1:
                    raise
                with flash_reference():
                    same.append(spec.run(case, "reference", dtype))
                widened = compare(expected_same_dtype=[s[name] for s in same])
            stats["results"] += 1
            if widened:
                stats["widened"] += 1
                stats.setdefault("examples", set()).add(f"{name} ({str(dtype).replace('torch.', '')})")

    check()
