"""pytest-benchmark over every suite of ``python -m mmkernels.bench``: the same registry, cases and
contenders, one test per (case, contender), grouped by case.

Select with -k (``-k concat_linear``, ``-k "attention and fwd"``). MMKERNELS_BENCH_SCOPE=default
(or quick) limits each suite to the runner's default cases; the default here is every case (full).
"""
import os

import pytest

from mmkernels.bench.suites import SUITES

from .conftest import bench_case, case_params

SCOPE = os.environ.get("MMKERNELS_BENCH_SCOPE", "full")


def _params():
    params = []
    for name, suite in SUITES.items():
        why = suite.unavailable()
        if why:
            params.append(pytest.param(None, None, id=f"{name}-unavailable", marks=pytest.mark.skip(reason=why)))
        else:
            params += case_params(suite.select("default" if SCOPE == "quick" else SCOPE))
    return params


@pytest.mark.parametrize("case,contender", _params())
def test_suite(benchmark, case, contender):
    bench_case(benchmark, case, contender)
