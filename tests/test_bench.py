"""The benchmark runner's machinery on tiny cases: correctness gate, timing and its extension,
intervals and verdicts, the memory pass, the saved artifacts, --list, --compare and Ctrl-C."""
import csv
import json
import os
import time

import pytest
import torch

from mmkernels.bench import cli, compare, env, memory, report, shares, stats
from mmkernels.bench.core import OURS, Built, Case, Contender, Options, Suite
from mmkernels.bench.live import Progress
from mmkernels.bench.runner import run_case
from mmkernels.bench.suites import SUITES
from mmkernels.bench.suites.concat_linear import make_case
from mmkernels.bench.timing import Budget, measure

TINY = Budget(warmup=1, min_reps=3, max_reps=5, seconds=0.05, min_sample_s=1e-4, max_seconds=0.1)
CPU = torch.device("cpu")
NO_COMPILE = Options(compile=False)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_concat_linear_case_runs(mode):
    res = run_case(make_case(37, (5, 11), 7, mode, torch.float32), CPU, TINY, NO_COMPILE)
    assert not res.error
    expected = {OURS, "eager"} | ({"gemm"} if mode == "fwd" else set())
    assert set(res.times) == expected
    assert all(s.median_s > 0 and s.reps >= 3 and len(s.samples_s) == s.reps for s in res.times.values())
    assert res.rel_err[OURS] < 1e-5
    assert res.unavailable["compile"] == "skipped (--no-compile)"
    assert set(res.memory) == expected and res.memory["eager"] > 0
    assert set(res.intervals) == expected - {OURS}
    iv = res.intervals["eager"]
    assert iv.low <= iv.ratio <= iv.high and iv.ratio == pytest.approx(res.speedup("eager"))
    assert res.verdict("eager") in ("wins", "loses", "inconclusive") and res.speedup("compile") is None
    assert res.wall_s > 0


def _fake_case(ours_result, suite="fake", shape="8", build_hook=None, notes=()):
    x = torch.randn(8)

    def build(device):
        if build_hook:
            build_hook()
        return Built([Contender(OURS, lambda: ours_result(x)), Contender("eager", lambda: x * 2),
                      Contender("compile", None, "RuntimeError: no compiler", compiles=True)],
                     oracle="eager", tol=1e-5, notes=list(notes))

    return Case(suite, shape, "fwd", torch.float32, build, baselines=("eager", "compile"), default=True)


def test_wrong_result_fails_loudly():
    res = run_case(_fake_case(lambda x: x * 2 + 1), CPU, TINY)
    assert res.error.startswith("WRONG RESULT") and not res.times
    assert "ERROR" in report.RowFormat([res.case]).row(res)


def test_a_case_that_raises_is_an_error_row():
    def broken():
        raise RuntimeError("out of memory, say")

    res = run_case(_fake_case(lambda x: x * 2, build_hook=broken), CPU, TINY)
    assert res.error == "raised RuntimeError: out of memory, say" and not res.times


def test_unavailable_baseline_is_reported_not_fatal():
    res = run_case(_fake_case(lambda x: x * 2), CPU, TINY)
    assert not res.error and res.unavailable == {"compile": "RuntimeError: no compiler"}
    cells = report.RowFormat([res.case]).row(res).split()  # mode dtype shape ours-ms, eager: ms x interval
    assert cells[4:6] == [report.ms(res.times["eager"].median_s), f"{res.speedup('eager'):.2f}x"]
    assert cells[7] == "n/a"  # compile
    assert any("no compiler" in n for n in report.notes([res]))


def test_builder_notes_reach_the_report_and_json():
    res = run_case(_fake_case(lambda x: x * 2, notes=["attention is 9% of it"]), CPU, TINY)
    assert f"note: {res.case.id}: attention is 9% of it" in report.notes([res])
    assert report.to_dict([res], {})["results"][0]["notes"] == ["attention is 9% of it"]


# ----------------------------------------------------------------------------- intervals and verdicts


def _noisy(center, n=40, spread=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (center * (1 + spread * (torch.rand(n, generator=g) - 0.5))).tolist()


def test_paired_interval_verdicts():
    ours = _noisy(1.0)
    assert stats.paired_ratio(_noisy(2.0, seed=1), ours).verdict() == "wins"
    assert stats.paired_ratio(_noisy(0.5, seed=2), ours).verdict() == "loses"
    a = _noisy(1.0, spread=0.5, seed=3)
    same = stats.paired_ratio(a[::-1], a)  # the same times in another order: equal medians, wide noise
    assert same.ratio == 1.0 and same.low < 1.0 < same.high and same.verdict() == "inconclusive"
    iv = stats.paired_ratio(_noisy(2.0, seed=1), ours)
    assert iv.low <= 2.0 <= iv.high and iv.rel_halfwidth < 0.05


def test_paired_interval_follows_the_pairing():
    # A drift hits both contenders in the same repetition: paired, the ratio is exactly 2 every time.
    drift = [1.0 + 0.5 * (i % 7) for i in range(30)]
    iv = stats.paired_ratio([2 * d for d in drift], drift)
    assert iv.ratio == pytest.approx(2.0) and iv.high - iv.low < 0.3
    wide = stats.independent_ratio([2 * d for d in drift], drift)
    assert wide.high - wide.low > iv.high - iv.low  # unpaired, the drift widens the interval


def test_too_few_reps_is_inconclusive():
    assert stats.paired_ratio([2.0, 2.0], [1.0, 1.0]).verdict() == "inconclusive"


def test_timing_extends_while_unsettled():
    budget = Budget(warmup=0, min_reps=3, max_reps=100000, seconds=0.02, min_sample_s=1e-4, max_seconds=0.15)
    steps = {"a": lambda: sum(range(100)), "b": lambda: sum(range(200))}
    t0 = time.perf_counter()
    settled = measure(steps, CPU, budget, settled=lambda s: True)
    t1 = time.perf_counter()
    unsettled = measure(steps, CPU, budget, settled=lambda s: False)
    t2 = time.perf_counter()
    assert t1 - t0 < 0.15 <= t2 - t1
    assert unsettled["a"].reps > settled["a"].reps


# ----------------------------------------------------------------------------- memory pass


def test_memory_pass_drops_profiler_chatter_only(capfd):
    peak = memory.peak_extra_bytes(lambda: torch.randn(256, 256) @ torch.randn(256, 256), CPU)
    assert peak >= 3 * 256 * 256 * 4
    with memory.without_profiler_chatter():
        os.write(2, b"USDT:2026-01-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\nkeep me\n")
    err = capfd.readouterr().err
    assert "USDT" not in err and "keep me" in err


def test_cpu_time_share_of_named_ops():
    a, b, c = torch.randn(384, 384), torch.randn(384, 384), torch.randn(64)

    def step():
        return torch.matmul(a, b), c + 1

    big = shares.cpu_time_share(step, {"aten::matmul"})  # its mm inside it counts
    small = shares.cpu_time_share(step, {"aten::add"})
    assert 0.7 < big <= 1.0 and 0.0 < small < 0.3
    assert shares.cpu_time_share(step, {"aten::conv2d"}) == 0.0


# ----------------------------------------------------------------------------- the command line


def test_every_suite_has_one_or_two_default_cases():
    for name, suite in SUITES.items():
        if suite.unavailable():
            continue
        defaults = suite.select("default")
        assert 1 <= len(defaults) <= 2, name
        assert {c.id for c in defaults} <= {c.id for c in suite.select("full")}
        assert OURS in suite.contenders and all(b in suite.contenders for c in defaults for b in c.baselines)


def test_list_shows_suites_contenders_and_defaults(capsys):
    assert cli.main(["--list", "--suite", "concat_linear"]) == 0
    out = capsys.readouterr().out
    assert "concat_linear: " in out and "  gemm " in out
    assert "* fwd     float32  8192x(512,768,128)->256" in out
    assert "  fwd+bwd bfloat16 4096x(2048,2048,512)->1024" in out
    assert sum(line.startswith("  *") for line in out.splitlines()) == 2


def test_help_has_the_glossary(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in SUITES:
        assert f"  {name}: " in out
    assert "Lq query length" in out and "--full" in out and "--compare" in out


def test_unknown_suite_names_the_argument():
    with pytest.raises(SystemExit, match="--suite: unknown suite 'nope'"):
        cli.main(["--suite", "nope", "--no-save"])


@pytest.fixture
def tiny_suite(monkeypatch):
    cases = [make_case(33, (5, 11), 7, "fwd", torch.float32, default=True),
             make_case(33, (5, 11), 7, "fwd+bwd", torch.float32, default=True)]
    for c in cases:
        c.suite = "tiny"
    suite = Suite("tiny", "a tiny concat_linear", lambda: cases, contenders=SUITES["concat_linear"].contenders)
    monkeypatch.setitem(SUITES, "tiny", suite)
    return suite


def test_run_saves_artifacts(tiny_suite, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--suite", "tiny", "--quick", "--seconds", "0.02", "--no-compile", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 cases (quick run), expected ~" in text and f"saved to {out}/" in text
    assert "33x(5,11)->7" in text and "vs eager: geomean" in text
    assert sorted(os.listdir(out)) == ["report.md", "results.csv", "results.json", "tiny-cpu.png"]
    data = json.loads((out / "results.json").read_text())
    meta = data["meta"]
    assert {"commit", "torch", "cpu", "threads", "gemm", "load_avg_start", "load_avg_end"} <= set(meta)
    assert meta["interrupted"] is False and len(data["results"]) == 2 and "--suite tiny" in meta["command"]
    ours = data["results"][0]["contenders"][OURS]
    assert len(ours["samples_ms"]) == ours["reps"] >= 7
    eager = data["results"][0]["contenders"]["eager"]
    assert eager["speedup_low"] <= eager["speedup"] <= eager["speedup_high"] and eager["verdict"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["contender"] for r in rows} == {OURS, "eager", "compile", "gemm"}
    md = (out / "report.md").read_text()
    assert "## tiny on cpu" in md and "`eager`: F.relu" in md and "## Summary" in md


def test_ctrl_c_saves_partial_results(tiny_suite, tmp_path, monkeypatch, capsys):
    cases = tiny_suite.cases()

    def interrupt():
        raise KeyboardInterrupt

    cases[1].build = _fake_case(lambda x: x, build_hook=interrupt).build
    out = tmp_path / "run"
    assert cli.main(["--suite", "tiny", "--quick", "--seconds", "0.02", "--no-compile", "--out", str(out)]) == 130
    assert "INTERRUPTED after 1 of 2 cases" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["interrupted"] is True and len(data["results"]) == 1


def _saved(median, spread=0.01, seed=0, speedup=2.0):
    samples = _noisy(median, spread=spread, seed=seed)
    eager = [speedup * x for x in _noisy(median, spread=spread, seed=seed + 100)]
    return {"meta": {"commit": "x", "date": "d", "cpu": "c", "threads": 2},
            "results": [{"id": "s-fwd-float32-1", "suite": "s", "device": "cpu", "mode": "fwd", "dtype": "float32",
                         "shape": "1", "error": None,
                         "contenders": {OURS: {"samples_ms": samples, "median_ms": median, "speedup": 1.0},
                                        "eager": {"samples_ms": eager, "speedup": speedup}}}]}


def test_compare_flags_only_changes_beyond_the_noise(tmp_path, capsys):
    lines = compare.compare(_saved(1.0), _saved(2.0, seed=1))
    assert "SLOWER" in lines[1] and lines[-1].startswith("1 case(s) changed beyond the noise")
    lines = compare.compare(_saved(1.0, spread=0.5), _saved(1.02, spread=0.5, seed=1))
    assert "same (within noise)" in lines[1] and lines[-1].startswith("0 case(s) changed")
    assert "faster" in compare.compare(_saved(2.0), _saved(1.0, seed=1))[1]
    # The speed-up's own change: flagged when beyond the noise of the per-repetition ratios.
    assert "vs eager 2.00x->1.00x (changed)" in compare.compare(_saved(1.0), _saved(1.0, seed=1, speedup=1.0))[1]
    assert "(changed)" not in compare.compare(_saved(1.0), _saved(1.0, seed=1))[1]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_saved(1.0)))
    b.write_text(json.dumps({**_saved(1.0, seed=2), "meta": {"commit": "y", "cpu": "other"}}))
    assert cli.main(["--compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "note: cpu differs" in out and "same (within noise)" in out
    with pytest.raises(SystemExit, match="not a results.json"):
        compare.load(str(tmp_path / "c.json") if (tmp_path / "c.json").write_text("{}") else "")


def test_eta_scales_with_measured_costs():
    p = Progress([10.0, 10.0, 10.0])
    assert p.eta() == pytest.approx(30.0)
    p.done, p.t0 = 1, time.perf_counter() - 20.0  # the first case took twice its estimate
    assert p.eta() == pytest.approx(40.0, rel=0.05)


def test_load_warning():
    assert env.load_warning([3.5, 1.0, 1.0], 2, "start").startswith("WARNING: load average 3.50 at start")
    assert env.load_warning([1.5, 9.0, 9.0], 2, "end") is None
    assert "family" in env.cpu_model() or env.cpu_model()


def test_estimates_come_from_the_latest_saved_run(tmp_path):
    case = make_case(33, (5, 11), 7, "fwd", torch.float32)
    assert cli.measured_costs(str(tmp_path)) == {}
    model = cli.estimate(case, Budget(), Options())
    assert model > cli.estimate(case, Budget(), NO_COMPILE)  # compiling is most of a case's cost
    for name, wall in (("old", 99.0), ("new", 12.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"meta": {}, "results": [{"id": case.id, "device": "cpu", "wall_s": wall}]}))
        os.utime(tmp_path / name / "results.json", (1e9 + wall, 1e9 + wall))
    os.utime(tmp_path / "new" / "results.json", (2e9, 2e9))
    assert cli.measured_costs(str(tmp_path)) == {f"cpu:{case.id}": 12.5}


def test_efficiency_is_attention_rate_over_the_runs_best_gemm_rate():
    from mmkernels.bench.runner import Result
    from mmkernels.bench.timing import Stats

    def result(shape, role, flops, medians, dtype=torch.float32):
        case = Case(suite="efficiency", shape=shape, mode="fwd", dtype=dtype, build=None, params={"role": role},
                    flops=flops)
        return Result(case, "cpu", times={n: Stats(m, m, m, 3, 1) for n, m in medians.items()})

    results = [
        result("gemm", "gemm", 100e9, {OURS: 0.5, "linear": 0.4}),  # best: 250 GFLOP/s
        result("attn", "attention", 200e9, {OURS: 1.0, "sdpa": 2.0}),  # 200 and 100 GFLOP/s
        result("attn", "attention", 200e9, {OURS: 1.0}, dtype=torch.bfloat16),  # no gemm case in bf16
    ]
    (e,) = report.efficiency(results)
    assert e["dtype"] == "float32" and e["gemm_gflops"] == pytest.approx(250)
    assert e["fraction"] == pytest.approx({OURS: 0.8, "sdpa": 0.4})
    assert any("efficiency (cpu, float32) attn: mmkernels 80%, sdpa 40%" in line for line in report.summary_lines(results))
