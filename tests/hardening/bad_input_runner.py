"""Runs bad-input cases (by id) in this process and reports each as one line on stdout:

    BEGIN <id>             before the call, so the parent knows which case a crash belongs to
    RESULT <json>          after it: {"id", "ok", "detail"}

Run by test_bad_inputs.py in a subprocess: `python bad_input_runner.py ID [ID ...]`.
"""
import json
import os
import re
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch  # noqa: E402

from bad_inputs import CASES  # noqa: E402


def run_case(case):
    """(ok, detail) for one case."""
    try:
        case.call()
    except BaseException as err:  # noqa: BLE001 - classify everything, including SystemExit
        kind = type(err).__name__
        msg = str(err).splitlines()[0] if str(err) else ""
        if case.names is None:
            return False, f"the valid control call raised {kind}: {msg}\n{traceback.format_exc()}"
        if not isinstance(err, case.raises):
            return False, f"raised {kind}, expected one of {[c.__name__ for c in case.raises]}: {msg}"
        if not re.search(case.names, str(err)):
            return False, f"{kind} does not name the argument (/{case.names}/): {msg}"
        return True, f"{kind}: {msg}"
    if case.names is None:
        return True, "ran"
    return False, "no error raised"


def main(ids):
    torch.manual_seed(0)
    inject = os.environ.get("MMKERNELS_BAD_INPUT_INJECT")
    if inject:  # test hook of the harness itself (test_runner_survives_a_crash)
        from bad_inputs import BadCase
        CASES["zz/crash"] = BadCase(lambda: exec(inject), "never")
    for case_id in ids:
        print(f"BEGIN {case_id}", flush=True)
        ok, detail = run_case(CASES[case_id])
        print("RESULT " + json.dumps({"id": case_id, "ok": ok, "detail": detail}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
