"""Differential fuzzing: every entry of fuzz_table.SPECS against the reference, on drawn shapes,
layouts, values (tiny, huge, NaN, Inf) and dtypes.

Checked per result (output, then every gradient):
  - NaN/+Inf/-Inf sit where the float64 reference puts them, or where the reference evaluated in the
    case's own dtype does (what a user of the PyTorch code we replace would get);
  - finite values agree with the reference evaluated in float64 within the dtype's tolerance.
"""
import pytest
import torch
from hypothesis import given

from fuzz_support import FUZZ, STATS, assert_matches
from fuzz_table import SPECS


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_matches_reference(spec):
    @FUZZ
    @given(case=spec.cases)
    def check(case):
        STATS.setdefault(spec.name, {"cases": 0, "results": 0, "widened": 0})["cases"] += 1
        dtype = case["dtype"]
        ours = spec.run(case, "ours", dtype)
        want64 = spec.run(case, "reference", torch.float64)
        want = want64 if dtype == torch.float64 else spec.run(case, "reference", dtype)
        assert ours.keys() == want64.keys(), "ours and the reference disagree on which gradients exist"
        for name, got in ours.items():
            if name != "out" and spec.forward_only(case):
                continue
            assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
            same = None if dtype == torch.float64 else want[name]
            assert_matches(got, want64[name], dtype, what=name, expected_same_dtype=same,
                           floor=spec.magnitude(case), stats=STATS[spec.name])

    check()
