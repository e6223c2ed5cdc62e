"""Run against an installed CUDA build of mmkernels, on a machine without a GPU: the import works,
the library records the versions it was built for, and every mmkernels op has a CUDA kernel.

The ops are read from the registered schemas (so new ops are covered as they land); an op that
truly has no CUDA kernel yet must be listed in KNOWN_MISSING with the reason. Any other op without
one fails; a listed op that has gained a kernel gets a note to take it off the list.
"""
from __future__ import annotations

import sys

KNOWN_MISSING: dict[str, str] = {}


def main() -> int:
    import torch

    import mmkernels
    from mmkernels import _C, _build

    info = mmkernels.build_info()
    print(f"mmkernels {mmkernels.__version__} from {mmkernels.__file__}")
    print(f"  built for torch {_C.torch_version}, CUDA {getattr(_C, 'cuda_version', None)}; build info {info}")
    print(f"  running torch {torch.__version__} (CUDA {torch.version.cuda}); GPU present: {torch.cuda.is_available()}")
    errors = []
    if not _C.with_cuda or not info["with_cuda"]:
        errors.append("the library was built without CUDA kernels")
    if getattr(_C, "cuda_version", None) != torch.version.cuda:
        errors.append(f"compiled with CUDA {getattr(_C, 'cuda_version', None)}, torch has CUDA {torch.version.cuda}")
    names = sorted({op.split("::")[1].split(".")[0] for op in _build.registered_ops()})
    if not names:
        errors.append("no mmkernels ops are registered")
    for name in names:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"mmkernels::{name}", "CUDA")
        if name in KNOWN_MISSING:
            print(f"  {name:<40} CUDA: {'yes' if has else 'no (known: ' + KNOWN_MISSING[name] + ')'}")
            if has:  # harmless, but the list should stay true: say so loudly
                print(f"  NOTE: {name} now has a CUDA kernel: remove it from KNOWN_MISSING in .ci/cuda/check_cuda_ops.py")
        else:
            print(f"  {name:<40} CUDA: {'yes' if has else 'MISSING'}")
            if not has:
                errors.append(f"mmkernels::{name} has no CUDA kernel (add one, or list it in KNOWN_MISSING with a reason)")
    for name in sorted(set(KNOWN_MISSING) - set(names)):
        errors.append(f"KNOWN_MISSING lists {name}, which is not a registered op")
    for e in errors:
        print(f"FAIL: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
