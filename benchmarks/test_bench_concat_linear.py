"""pytest-benchmark suite for fused_concat_linear: the cases of ``mmkernels.bench --suite concat_linear``."""
import pytest

from mmkernels.bench.core import suite_cases

from .conftest import bench_case, case_params


@pytest.mark.parametrize("case,contender", case_params(suite_cases("concat_linear")))
def test_concat_linear(benchmark, case, contender):
    bench_case(benchmark, case, contender)
