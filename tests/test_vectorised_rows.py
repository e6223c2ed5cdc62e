"""The softmax row loops' AVX2 clones must be vector code.

csrc/cpu/attention_rows.cpp clones its loops per instruction set (GCC target_clones). Built without
-fno-trapping-math, GCC 12 left the AVX2 (x86-64-v3) clones of these four scalar: every select in them
needs AVX-512's masking otherwise, so AVX-512 CPUs never showed it, and on an AVX2-only CPU the
attention forward spent a third of its time in a scalar exp (RESULTS.md, "Session 11"). Timings do
not belong in tests; the instructions the build emitted do.
"""

import platform
import shutil
import subprocess

import pytest

import mmkernels

ROW_LOOPS = ["exp_sum", "probs_from_scores", "dscore", "scale_bias_max"]

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not (shutil.which("nm") and shutil.which("objdump")),
    reason="x86-64 only, and needs binutils (nm, objdump)",
)


def _library():
    return mmkernels._C.__file__


def _symbols(lib):
    return subprocess.run(["nm", lib], capture_output=True, text=True, check=True).stdout


def _disassembly(lib, symbol):
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--disassemble={symbol}", lib],
                          capture_output=True, text=True, check=True).stdout


def _row_loop_clone(symbols, loop, arch):
    # Itanium mangling of mmkernels::cpu::rows::<loop>(float*, ...): the name's length, the name, Pf.
    names = [line.split()[-1] for line in symbols.splitlines()
             if line.endswith(f".arch_{arch}") and f"rows{len(loop)}{loop}EPf" in line]
    assert len(names) == 1, f"{loop}: expected one float {arch} clone, found {names}"
    return names[0]


def test_avx2_clones_of_the_row_loops_use_256_bit_vectors():
    lib = _library()
    symbols = _symbols(lib)
    if "__asan_report" in symbols:
        pytest.skip("a sanitized build: its code generation is not the release build's")
    if ".arch_x86_64_v3" not in symbols:
        comment = subprocess.run(["readelf", "-p", ".comment", lib], capture_output=True, text=True).stdout
        if "clang" in comment.lower():
            pytest.skip("built by clang: no target_clones (MMK_CLONES is GCC only)")
        pytest.fail(f"{lib} has no x86-64-v3 clones: the build lost attention_rows.cpp's target_clones")
    # The AVX-512 clone vectorises with or without the flag; if it did not, the build is unoptimised.
    if "zmm" not in _disassembly(lib, _row_loop_clone(symbols, "exp_sum", "x86_64_v4")):
        pytest.skip("an unoptimised build (MMKERNELS_DEBUG=1?): not even the AVX-512 clone is vector code")
    for loop in ROW_LOOPS:
        asm = _disassembly(lib, _row_loop_clone(symbols, loop, "x86_64_v3"))
        assert "ymm" in asm, f"the AVX2 clone of rows::{loop} is scalar code (was -fno-trapping-math dropped?)"
