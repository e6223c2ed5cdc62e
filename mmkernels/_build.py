"""Loading of the compiled library, with a clear error when it is missing or built for another torch."""
from __future__ import annotations

import torch

_BUILD_HINT = "Build it from the repository root with: pip install --no-build-isolation -e ."


def load_library():
    """Import mmkernels._C (which registers the ops) and check it matches the running torch."""
    try:
        from mmkernels import _C
    except ImportError as err:
        raise ImportError(
            f"mmkernels: the compiled library mmkernels._C could not be loaded ({err}). "
            f"It is missing, or was built against another torch. {_BUILD_HINT}"
        ) from err
    running = torch.__version__.split("+")[0]
    if _C.torch_version != running:
        raise ImportError(
            f"mmkernels: mmkernels._C was built against torch {_C.torch_version}, but torch {running} "
            f"is installed. Rebuild it against the installed torch. {_BUILD_HINT}"
        )
    if _C.with_cuda:
        # The library's own record (compiled in) first; the generated _build_info.py as a fallback.
        built_cuda = getattr(_C, "cuda_version", None) or build_info()["cuda_version"]
        if torch.version.cuda is None:
            raise ImportError(
                f"mmkernels: this build has CUDA {built_cuda} kernels but the installed torch is a CPU-only "
                f"build. Install a CUDA build of torch, or rebuild with MMKERNELS_CUDA=0."
            )
        if built_cuda is not None and built_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
            raise ImportError(
                f"mmkernels: built for CUDA {built_cuda}, but torch uses CUDA {torch.version.cuda}. {_BUILD_HINT}"
            )
    return _C


def build_info() -> dict:
    """What the compiled library was built against (torch, CUDA, architectures)."""
    try:
        from mmkernels import _build_info as info
    except ImportError:
        return {"torch_version": None, "cuda_version": None, "with_cuda": False, "cuda_arch_list": None}
    return {
        "torch_version": info.TORCH_VERSION,
        "cuda_version": info.CUDA_VERSION,
        "with_cuda": info.WITH_CUDA,
        "cuda_arch_list": info.CUDA_ARCH_LIST,
    }


def registered_ops() -> list[str]:
    """Every operator of the mmkernels namespace, as "mmkernels::name"."""
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("mmkernels::"))


def kernel_table(dispatch_keys=("CPU", "CUDA")) -> dict[str, frozenset[str]]:
    """For each mmkernels op, the dispatch keys it has a kernel for. Computed once at import, so the
    wrappers can consult it under torch.compile as a constant."""
    return {
        op: frozenset(k for k in dispatch_keys if torch._C._dispatch_has_kernel_for_dispatch_key(op, k))
        for op in registered_ops()
    }
