import hashlib
import os
import tempfile
import zlib

import pytest
import torch

# Every float32 GEMM through oneDNN whatever its size (csrc/cpu/matmul.cpp sends small ones to ATen's mm
# by default), so that the tests' small shapes still cover oneDNN's layouts; subprocesses inherit it.
os.environ.setdefault("MMKERNELS_ONEDNN_MIN_MACS", "0")

import mmkernels  # noqa: E402


def _inductor_cache_for_this_build() -> None:
    # torch.compile's on-disk caches are keyed on the traced code, not on our library's fake kernels:
    # after a rebuild that changes an op's output strides, a shared cache replays graphs compiled for
    # the old ones. One cache directory per build of the library keeps reuse within a build only.
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    lib = mmkernels._C.__file__
    stamp = hashlib.sha1(f"{lib}:{os.path.getmtime(lib)}:{os.path.getsize(lib)}".encode()).hexdigest()[:12]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"mmkernels-inductor-{stamp}")


_inductor_cache_for_this_build()


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


# The differential fuzzing's case counts (and how many results passed only within the reference's
# own error in their dtype, see tests/hardening/fuzz_support.assert_matches), printed at the end.
def pytest_terminal_summary(terminalreporter):
    import sys

    support = sys.modules.get("fuzz_support")
    stats = getattr(support, "STATS", None)
    if not stats:
        return
    tr = terminalreporter
    tr.section(f"differential fuzzing ({support.PROFILE} profile)")
    total = 0
    for name, s in stats.items():
        total += s["cases"]
        line = (f"{name:26s} {s['cases']:6d} cases {s.get('results', 0):7d} results compared, "
                f"{s.get('widened', 0):4d} passed only within {support.OWN_ERROR_FACTOR:g}x the reference's own error")
        if s.get("examples"):
            line += ": " + ", ".join(sorted(s["examples"])[:6])
        tr.write_line(line)
    tr.write_line(f"{'total':26s} {total:6d} cases")
