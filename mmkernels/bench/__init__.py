"""The benchmark runner behind ``python -m mmkernels.bench``.

Suites are a registry of cases (``core.SUITES``); each case builds its inputs and contenders lazily,
so listing or selecting cases costs nothing. ``runner`` checks correctness, then times the contenders
interleaved; ``report`` prints the table and writes JSON/CSV/plots. The pytest-benchmark suite under
``benchmarks/`` reuses the same case definitions.
"""
from .core import SUITES, Case, Built, Contender, suite_cases  # noqa: F401
