"""Register mmkernels.distributed (the ops' DTensor sharding strategies) as soon as DTensor exists.

Importing torch.distributed.tensor costs about a second of CPU (its op tables, sympy), which every
`import mmkernels` would pay, distributed or not. A DTensor cannot exist before that module is
imported, so registering then is just as early for every user of DTensor (TP, FSDP2, DCP): if it is
already imported, mmkernels.distributed is imported now; otherwise the first import of
torch.distributed.tensor finishes by importing it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "torch.distributed.tensor"


def _register() -> None:
    from . import distributed  # noqa: F401  (registers on import)


class _AfterDTensorImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one use; lets the normal finders resolve the module below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    import torch

    if not torch.distributed.is_available():
        return
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterDTensorImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterDTensorImport())
