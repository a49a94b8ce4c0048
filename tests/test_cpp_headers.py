"""Every C++ header compiles on its own and the public ones all together (issue 12).

A header that leans on what its includer happened to include first, or two public headers that
define the same name, break whoever includes them in another order. Each case is one generated
translation unit, checked with the C++ compiler (-fsyntax-only); g++ is part of the build
requirements, so a missing compiler is a failure, not a skip.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "cpp" / "include"
SRC = ROOT / "cpp" / "src"
PUBLIC = sorted(INCLUDE.rglob("*.h"))
INTERNAL = sorted(SRC.glob("*.h"))
FLAGS = ["-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DLORAMIX_HAVE_X86=1"]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "no C++ compiler found (g++ is required to build loramix)"
    return cxx


def _compile(tmp_path: pathlib.Path, name: str, headers: list[pathlib.Path]) -> tuple[str, int, str]:
    src = tmp_path / f"{name}.cpp"
    # each header twice: its include guard must hold too
    body = "".join(f'#include "{h}"\n' for h in headers + headers)
    src.write_text(body + "int main() { return 0; }\n")
    r = subprocess.run([_compiler(), *FLAGS, "-I", str(INCLUDE), "-I", str(SRC), str(src)],
                       capture_output=True, text=True)
    return name, r.returncode, r.stderr


def test_headers_found():
    assert INCLUDE.is_dir(), f"{INCLUDE} missing: run the tests from a source checkout"
    names = {p.name for p in PUBLIC}
    assert {"divergence.h", "dtype.h", "safetensors.h", "wsum.h", "cpu.h"} <= names, names


def test_every_header_compiles_alone_and_public_ones_together(tmp_path):
    cases = [(f"alone_{h.stem}", [h]) for h in PUBLIC + INTERNAL]
    cases += [("public_together", PUBLIC), ("public_together_reversed", PUBLIC[::-1])]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as ex:
        results = list(ex.map(lambda c: _compile(tmp_path, *c), cases))
    failed = [f"{name}:\n{err.strip()[:2000]}" for name, rc, err in results if rc != 0]
    assert not failed, "headers that do not compile:\n" + "\n\n".join(failed)

