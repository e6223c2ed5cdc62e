"""Prints the differential fuzzing's case counts (and how many results passed only within the
reference's own error in their dtype, see fuzz_support.assert_matches) at the end of a run."""


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
