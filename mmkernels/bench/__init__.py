"""The benchmark runner behind ``python -m mmkernels.bench``.

Modules, each importing only those above it:

- ``core``: the vocabulary (Options, Contender, Built, Case, Suite) and helpers for writing cases
- ``suites/``: one file per suite; ``suites/__init__.py`` is the registry (``SUITES``)
- ``timing`` (interleaved repetitions), ``memory`` (peak memory, a separate pass), ``stats``
  (bootstrap intervals and verdicts), ``runner`` (one case: check, time, measure)
- ``env`` (commit, CPU, load), ``report`` (rows, markdown, JSON, CSV), ``plots``, ``compare``,
  ``live`` (rows as they finish, progress and ETA), ``cli`` (the command line)

Adding a suite: write ``suites/<name>.py`` defining ``SUITE = Suite(name, about, cases, contenders=...)``
where ``cases()`` returns every ``Case`` of the full sweep and marks one or two ``default=True`` (the
short default run takes those), each ``Case.build(device)`` returning ``Built`` contenders, ours
first, the oracle named; then add ``<name>.SUITE`` to the tuple in ``suites/__init__.py``. The runner,
``--list``, the plots and ``benchmarks/`` (pytest-benchmark) pick it up from the registry.
"""
from .core import OURS, Built, Case, Contender, Options, Suite  # noqa: F401
from .suites import SUITES  # noqa: F401
