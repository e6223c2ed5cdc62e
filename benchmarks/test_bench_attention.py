"""pytest-benchmark suites for cross-modal attention (issue 3): skipped while the API is absent."""
import pytest

from mmkernels.bench.core import suite_cases, suite_unavailable

from .conftest import bench_case, case_params


def _params(suite):
    why = suite_unavailable(suite)
    if why:
        return [pytest.param(None, None, id=f"{suite}-unavailable", marks=pytest.mark.skip(reason=why))]
    return case_params(suite_cases(suite))


@pytest.mark.parametrize("case,contender", _params("attention"))
def test_attention(benchmark, case, contender):
    bench_case(benchmark, case, contender)


@pytest.mark.parametrize("case,contender", _params("attention_module"))
def test_attention_module(benchmark, case, contender):
    bench_case(benchmark, case, contender)
