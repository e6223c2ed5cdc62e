"""The benchmark runner's machinery on tiny cases: correctness gate, timing, memory, table/JSON/CSV."""
import csv
import json

import pytest
import torch

from mmkernels.bench import cli, core, report
from mmkernels.bench.core import OURS, Built, Case, Contender
from mmkernels.bench.runner import run_case
from mmkernels.bench.suites.concat_linear import make_case
from mmkernels.bench.timing import Budget

TINY = Budget(warmup=1, min_reps=3, max_reps=5, seconds=0.05, min_sample_s=1e-4)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_compile(monkeypatch):
    monkeypatch.setattr(core, "SKIP_COMPILE", True)  # compiling takes tens of seconds


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_concat_linear_case_runs(mode):
    res = run_case(make_case(37, (5, 11), 7, mode, torch.float32), CPU, TINY)
    assert not res.error
    expected = {OURS, "eager"} | ({"gemm"} if mode == "fwd" else set())
    assert set(res.times) == expected
    assert all(s.median_s > 0 and s.reps >= 3 for s in res.times.values())
    assert res.rel_err[OURS] < 1e-5
    assert res.unavailable["compile"].startswith("skipped")
    assert set(res.memory) == expected and res.memory["eager"] > 0
    assert res.speedup("eager") > 0 and res.speedup("compile") is None


def _fake_case(ours_result):
    x = torch.randn(8)

    def build(device):
        return Built([Contender(OURS, lambda: ours_result(x)), Contender("eager", lambda: x * 2),
                      Contender("compile", None, "RuntimeError: no compiler")], oracle="eager", tol=1e-5)

    return Case("fake", "8", "fwd", torch.float32, build, baselines=("eager", "compile"))


def test_wrong_result_fails_loudly():
    res = run_case(_fake_case(lambda x: x * 2 + 1), CPU, TINY)
    assert res.error.startswith("WRONG RESULT") and not res.times
    assert "ERROR" in report.table([res])


def test_unavailable_baseline_is_reported_not_fatal():
    res = run_case(_fake_case(lambda x: x * 2), CPU, TINY)
    assert not res.error and res.unavailable == {"compile": "RuntimeError: no compiler"}
    text = report.table([res])
    assert "n/a" in text and "no compiler" in text


def test_outputs(tmp_path):
    results = [run_case(make_case(16, (3, 4), 5, "fwd", torch.float32), CPU, TINY),
               run_case(make_case(16, (3, 4), 5, "fwd+bwd", torch.float32), CPU, TINY)]
    text = report.table(results)
    assert "16x(3,4)->5" in text and "eager ms (x)" in text and "peak MB" in text
    summary = report.summary_text(results)
    assert "geomean" in summary and "vs eager" in summary
    md = report.markdown(results)
    assert md.count("`16x(3,4)->5`") == 2 and "| mode |" in md
    report.write_json(tmp_path / "r.json", results, {"threads": 2})
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["threads"] == 2 and len(data["results"]) == 2
    assert data["results"][0]["contenders"][OURS]["median_ms"] > 0
    report.write_csv(tmp_path / "r.csv", results)
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert {r["contender"] for r in rows} == {OURS, "eager", "compile", "gemm"}
    assert all(r["status"] == "ok" for r in rows if r["contender"] != "compile")


def test_cli_lists_and_skips_missing_suites(capsys):
    assert cli.main(["--list", "--suite", "concat_linear"]) == 0
    out = capsys.readouterr().out
    assert "concat_linear-fwd+bwd-bfloat16-4096x(2048,2048,512)->1024" in out
    assert len(out.strip().splitlines()) == 20


def test_geomean():
    assert report.geomean([2.0, 0.5]) == pytest.approx(1.0)


def test_module_suite_builds_with_compile(monkeypatch):
    # torch.compile of a module is an OptimizedModule, whose truth value asks the module for len():
    # the compile contender must test "is None", not truthiness (nn.MultiheadAttention has no len).
    from mmkernels.bench.suites.attention import _build_module

    monkeypatch.setattr(core, "SKIP_COMPILE", False)
    built = _build_module(2, 4, 3, 8, 2, False, "fwd", torch.float32, CPU)
    assert callable({c.name: c.step for c in built.contenders}["compile"])
