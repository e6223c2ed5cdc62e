"""The examples run, and show what they claim (on their --quick settings)."""
import importlib.util
import pathlib

import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_modal_classifier_quick():
    threads = torch.get_num_threads()
    try:
        # One thread: the run is short, and a loaded machine does not make OpenMP spin.
        results = load("three_modal_classifier").main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    acc = results["accuracy"]
    singles = {k: v for k, v in acc.items() if k != "fused"}
    assert acc["fused"] > max(singles.values()) + 0.1, acc  # fusion beats every single modality
    assert max(results["max_diff"]) <= 1e-10  # fused model == reference model (float64)
    assert set(results["step_ms"]) == {"fused", "reference"}
