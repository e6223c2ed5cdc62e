import zlib

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` need a GPU; skip them (visibly) where there is none.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        # The marker, not item.keywords: keywords also hold the names of parent directories, so a
        # checkout in a folder named "cuda" would skip every test.
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# Per-dtype tolerances (atol, rtol) against the float64-exact reference run in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}


@pytest.fixture(autouse=True)
def _seed_and_threads(request):
    # Fresh random inputs per test, but reproducible from the test's name on failure.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
