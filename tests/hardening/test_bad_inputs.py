"""The bad-input matrix (bad_inputs.CASES), each case checked in a subprocess.

All cases run in one child process (one torch import); if the child crashes or hangs, the case it was
in is recorded as crashed/hung and a fresh child carries on with the rest. A crash therefore fails
exactly one test instead of the whole run.
"""
import json
import os
import subprocess
import sys

import pytest

from bad_inputs import CASES

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bad_input_runner.py")
TIMEOUT_S = float(os.environ.get("MMKERNELS_BAD_INPUT_TIMEOUT", "300"))


def _run_all(ids):
    """{id: {"ok", "detail"}} for every id, plus "<exit>" entries for children that ran every case
    they started yet exited badly (e.g. a sanitizer report at exit)."""
    results = {}
    pending = list(ids)
    while pending:
        current = None
        try:
            proc = subprocess.run([sys.executable, RUNNER, *pending], capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
            failure = f"exit status {rc}"
        except subprocess.TimeoutExpired as err:
            stdout = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
            stderr = err.stderr.decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
            rc, failure = None, f"hung (no answer within {TIMEOUT_S:.0f}s)"
        for line in stdout.splitlines():
            if line.startswith("BEGIN "):
                current = line[len("BEGIN "):]
            elif line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                results[r["id"]] = r
                current = None
        if current is not None:  # died inside a case: blame it, go on with the rest in a new child
            results[current] = {"id": current, "ok": False, "detail": f"crashed: {failure}\n{stderr[-3000:]}"}
            pending = [i for i in pending if i not in results]
            continue
        for i in pending:  # died outside any case (at import, between cases)
            results.setdefault(i, {"id": i, "ok": False, "detail": f"child died before the case ({failure}): {stderr[-2000:]}"})
        if rc != 0:
            results[f"<exit {len(results)}>"] = {"ok": False, "detail": f"child {failure}: {stderr[-3000:]}"}
        break
    return results


@pytest.fixture(scope="module")
def matrix_results():
    return _run_all(sorted(CASES))


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_bad_input(case_id, matrix_results):
    result = matrix_results[case_id]
    assert result["ok"], f"{case_id}: {result['detail']}"


def test_children_exit_cleanly(matrix_results):
    bad = {k: v["detail"] for k, v in matrix_results.items() if k.startswith("<exit")}
    assert not bad, bad


def test_runner_survives_a_crash(monkeypatch):
    # The harness itself: a case that kills the child is reported, and the cases after it still run.
    ids = ["fused_concat_linear/valid", "zz/crash", "fused_concat_linear/weight-1d"]
    env_case = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    # The child builds its own CASES: the crashing case comes in through the runner's test hook.
    monkeypatch.setenv("MMKERNELS_BAD_INPUT_INJECT", env_case)
    results = _run_all(ids)
    assert results["fused_concat_linear/valid"]["ok"]
    assert not results["zz/crash"]["ok"] and "crashed" in results["zz/crash"]["detail"]
    assert results["fused_concat_linear/weight-1d"]["ok"]
