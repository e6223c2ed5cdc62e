"""The registry of benchmark suites: name -> Suite, in the order a run goes through them.

Adding a suite is one new file in this folder, defining a ``Suite`` (see ``mmkernels.bench.core``),
and one line below.
"""
from __future__ import annotations

from ..core import Suite
from . import attention, attention_variants, concat_linear, convert, efficiency, fusion, latency, models

SUITES: dict[str, Suite] = {s.name: s for s in (
    concat_linear.SUITE,
    attention.OP_SUITE,
    attention.MODULE_SUITE,
    attention.MODULE_DEFAULT_SUITE,
    attention_variants.SUITE,
    fusion.LMF_SUITE,
    fusion.TRAIN_SUITE,
    convert.SUITE,
    latency.SUITE,
    models.SUITE,
    efficiency.SUITE,
)}
