"""The environment a run was measured in: commit, versions, CPU, threads, GEMM library, load."""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def commit() -> str:
    """``git describe --always --dirty`` of the source tree, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines()) if v}


def cpu_model() -> str:
    """A CPU description that tells machines apart even where the model name is generic (virtual
    machines often report just "Intel(R) Xeon(R) Processor"): name, family/model and the vector ISA."""
    lscpu, info = _lscpu(), _cpuinfo()
    name = lscpu.get("Model name") or info.get("model name") or platform.processor() or "unknown CPU"
    family, model = lscpu.get("CPU family") or info.get("cpu family"), lscpu.get("Model") or info.get("model")
    flags = set((lscpu.get("Flags") or info.get("flags") or "").split())
    isa = [tag for tag, flag in (("AVX-512", "avx512f"), ("AVX512-FP16", "avx512_fp16"), ("AMX-BF16", "amx_bf16"),
                                 ("AVX2", "avx2")) if flag in flags]
    if "AVX-512" in isa and "AVX2" in isa:
        isa.remove("AVX2")
    detail = ", ".join(([f"family {family} model {model}"] if family and model else []) + isa)
    return f"{name} ({detail})" if detail else name


def gemm_libraries() -> str:
    """Who runs the float32 GEMMs: ours (mmkernels._C.cpu_float32_gemm) and torch's BLAS."""
    from .. import _C

    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    m = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    if m:
        blas = m.group(1)
    onednn = "oneDNN" if torch.backends.mkldnn.is_available() else "no oneDNN"
    return f"mmkernels: {_C.cpu_float32_gemm()}; torch: {blas}, {onednn}"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def collect(threads: int, devices: list[str], argv: list[str]) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    info = {
        "date": now.isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "gemm": gemm_libraries(),
        "load_avg_start": load_average(),
        "devices": devices,
        "command": " ".join(["python -m mmkernels.bench"] + argv),
    }
    if "cuda" in devices:
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_warning(load: list[float], threads: int, when: str) -> str | None:
    """A warning when the 1-minute load average exceeds the threads the run uses: the timings then
    share the cores with other work (ratios stay comparable, being interleaved; absolute times do not)."""
    if load and load[0] > threads:
        return (f"WARNING: load average {load[0]:.2f} at {when} exceeds the {threads} threads this run uses: "
                "the machine is busy, so times are noisy (the ratios, interleaved, suffer less)")
    return None
