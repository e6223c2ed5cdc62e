"""ctypes front of the emulation harness (csrc/emu): runs one of our CUDA launchers on the CPU
executor with the given tensors as its global memory, and returns what the checks reported.

Every tensor a kernel may touch is registered by name with its exact extent, so any access outside
them is reported ("global out of bounds ... of 'q'"). Tests pass fresh, exactly sized tensors.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess

import torch

import sys

import emu_build

sys.path.insert(0, str(emu_build.ROOT / "tests"))  # attention_support, shared with the GPU tests

VP = ctypes.c_void_p
I64 = ctypes.c_int64
I32 = ctypes.c_int32

_SIGNATURES = {
    "emu_clear": ([], None),
    "emu_add_buffer": ([VP, ctypes.c_size_t, ctypes.c_char_p], None),
    "emu_error_count": ([], ctypes.c_size_t),
    "emu_errors_kept": ([], ctypes.c_size_t),
    "emu_error_text": ([ctypes.c_size_t], ctypes.c_char_p),
    "emu_attn_fields": ([ctypes.c_int], ctypes.c_char_p),
    "emu_attn_fwd": ([ctypes.c_int, ctypes.c_int, ctypes.POINTER(I64), ctypes.POINTER(ctypes.c_double)], None),
    "emu_attn_bwd": ([ctypes.c_int, ctypes.c_int, ctypes.POINTER(I64), ctypes.POINTER(ctypes.c_double)], None),
    "emu_dropout_factors": ([ctypes.POINTER(I64), ctypes.POINTER(ctypes.c_double), ctypes.c_int, ctypes.c_int, VP,
                             ctypes.c_int], None),
    "emu_key_ranges": ([VP, VP, I32, I32, VP], None),
    "emu_dot_rows": ([VP, I64, I64, I64, VP, I64, I64, I64, I32, I32, I32, I32, ctypes.c_int, VP], None),
    "emu_finish_dq": ([VP, ctypes.c_double, VP, I64, ctypes.c_int], None),
    "emu_choose_key_splits": ([I64, I64, ctypes.c_int], ctypes.c_int),
    "emu_combine_splits": ([VP, VP, I32, I32, I32, I32, I32, VP, I64, I64, I64, VP, ctypes.c_int], None),
    "emu_fragment_probe": ([ctypes.c_int, VP, VP, VP, VP, VP, VP], None),
    "emu_bias_act": ([ctypes.c_int, VP, VP, VP, VP, I64, I64, ctypes.c_int], None),
    "emu_act_backward": ([ctypes.c_int, VP, VP, VP, I64, ctypes.c_int], None),
    "emu_tc_forward": ([ctypes.c_int, ctypes.c_int, ctypes.POINTER(VP), ctypes.POINTER(I64), ctypes.POINTER(I32),
                        ctypes.POINTER(I32), ctypes.c_uint32, I32, VP, I64, VP, VP, VP, I64, I64, ctypes.c_int], None),
    "emu_lrf_forward": ([ctypes.c_int, ctypes.c_int, ctypes.POINTER(VP), ctypes.POINTER(VP), VP, VP, VP, I64, I64, I64],
                        None),
    "emu_lrf_backward": ([ctypes.c_int, ctypes.c_int, ctypes.POINTER(VP), ctypes.POINTER(VP), ctypes.POINTER(VP), VP, VP,
                          VP, I64, I64, I64], None),
    "emu_lrf_backward_blocks": ([I64, I64], ctypes.c_int),
}

DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
ACTIVATIONS = ["none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid"]  # the Activation enum's order


class EmuError(AssertionError):
    pass


_PC = re.compile(r"\(([^()\s]+)\+0x([0-9a-f]+)\)")


def symbolize(report: str) -> str:
    """Appends the kernel source line (addr2line on the harness library's line tables) to a report."""
    m = _PC.search(report)
    if m is None or shutil.which("addr2line") is None:
        return report
    r = subprocess.run(["addr2line", "-C", "-f", "-i", "-e", m.group(1), hex(int(m.group(2), 16) - 1)],
                       capture_output=True, text=True)
    lines = r.stdout.split()
    if r.returncode != 0 or len(lines) < 2:
        return report
    # Innermost frame first: the kernel line is the first with a csrc path.
    where = [ln for ln in r.stdout.splitlines() if "/csrc/" in ln]
    return report + (" -> " + " <- ".join(w.rsplit("/csrc/", 1)[-1] for w in where[:3]) if where else "")


def extent_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def ptr(t: torch.Tensor | None):
    return None if t is None else VP(t.data_ptr())


class Harness:
    def __init__(self, path):
        # Lazy binding: a partial build (planted-bug tests) has launchers it never calls left undefined.
        self.lib = ctypes.CDLL(str(path), mode=os.RTLD_LAZY | os.RTLD_LOCAL)
        for name, (args, res) in _SIGNATURES.items():
            f = getattr(self.lib, name)
            f.argtypes, f.restype = args, res

    def run(self, entry: str, *args, buffers: dict, expect_errors: bool = False) -> list[str]:
        """Calls `entry` with `buffers` as the only global memory; raises EmuError on any report
        unless `expect_errors` (then returns the reports)."""
        self.lib.emu_clear()
        for name, t in buffers.items():
            if t is not None:
                assert t.device.type == "cpu" and all(s >= 0 for s in t.stride()), name
                self.lib.emu_add_buffer(VP(t.data_ptr()), extent_bytes(t), name.encode())
        getattr(self.lib, entry)(*args)
        errors = [symbolize(self.lib.emu_error_text(i).decode()) for i in range(self.lib.emu_errors_kept())]
        total = self.lib.emu_error_count()
        if total and not expect_errors:
            raise EmuError(f"{entry}: {total} report(s):\n" + "\n".join(errors))
        return errors

    def attn_fields(self, backward: bool) -> list[str]:
        return [f for f in self.lib.emu_attn_fields(int(backward)).decode().split(",") if f]

    def attn_arrays(self, backward: bool, fields: dict, scale_log2: float, inv_keep: float):
        names = self.attn_fields(backward)
        missing = set(names) - set(fields)
        assert not missing, f"attention fields not given: {sorted(missing)}"
        ints = (I64 * len(names))(*[int(fields[n]) for n in names])
        reals = (ctypes.c_double * 2)(scale_log2, inv_keep)
        return ints, reals


@functools.lru_cache(maxsize=None)
def harness(overrides: tuple[tuple[str, str], ...] = (), sources: tuple[str, ...] = ()) -> Harness:
    return Harness(emu_build.build(dict(overrides), list(sources) or None))
