"""Check a CUDA wheel of mmkernels: it holds the compiled library with device code for the
requested architectures, and records the torch and CUDA versions it was built for.

Usage: python check_wheel.py WHEEL TORCH_VERSION CUDA_VERSION ARCH_LIST
  e.g. python check_wheel.py dist/mmkernels-0.1.0-*.whl 2.14.1 13.0 "8.0;9.0+PTX"
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile


def find_cuobjdump() -> str | None:
    # The toolkit here has no cuobjdump; the triton that comes with CUDA torch ships one.
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return None


def main(wheel: str, torch_version: str, cuda_version: str, arch_list: str) -> int:
    errors = []
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        libs = [n for n in names if re.fullmatch(r"mmkernels/_C\.[^/]*\.so", n)]
        print(f"{os.path.basename(wheel)}: {len(names)} files")
        for n in names:
            if not n.endswith(".pyc"):
                print(f"  {n} ({z.getinfo(n).file_size} bytes)")
        if len(libs) != 1:
            errors.append(f"expected one mmkernels/_C*.so, found {libs}")
        if "mmkernels/_build_info.py" not in names:
            errors.append("mmkernels/_build_info.py is missing")
        else:
            ns: dict = {}
            exec(z.read("mmkernels/_build_info.py").decode(), ns)
            want = {"TORCH_VERSION": torch_version, "CUDA_VERSION": cuda_version, "WITH_CUDA": True, "CUDA_ARCH_LIST": arch_list}
            for key, value in want.items():
                if ns.get(key) != value:
                    errors.append(f"_build_info.{key} = {ns.get(key)!r}, expected {value!r}")
            print(f"  recorded: torch {ns.get('TORCH_VERSION')}, CUDA {ns.get('CUDA_VERSION')}, archs {ns.get('CUDA_ARCH_LIST')}")
        cuobjdump = find_cuobjdump()
        if len(libs) == 1 and cuobjdump:
            with tempfile.TemporaryDirectory() as tmp:
                so = z.extract(libs[0], tmp)
                elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True).stdout
                ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True).stdout
            sass = sorted(set(re.findall(r"\.(sm_\d+)\.", elf)))
            ptxs = sorted(set(re.findall(r"\.(sm_\d+)\.", ptx)))
            print(f"  device code: SASS for {sass}, PTX for {ptxs}")
            for arch in arch_list.replace(" ", ";").split(";"):
                if not arch:
                    continue
                sm = "sm_" + arch.replace("+PTX", "").replace(".", "")
                if sm not in sass:
                    errors.append(f"no SASS for {sm} in {libs[0]}")
                if arch.endswith("+PTX") and sm not in ptxs:
                    errors.append(f"no PTX for {sm} in {libs[0]}")
        elif len(libs) == 1:
            print("  (cuobjdump not found: device code not listed)")
    for e in errors:
        print(f"FAIL: {e}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
