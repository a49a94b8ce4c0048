#!/usr/bin/env bash
# Developer loop: build loramix._core with CMake into build/dev and drop the module next to
# the Python sources, so `PYTHONPATH=python python -m pytest` runs the working tree.
# (Users and CI install with pip; see README.)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bdir=${1:-$root/build/dev}
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLORAMIX_BUILD_PYTHON=ON -DLORAMIX_TESTING=ON \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$bdir" -j"$(nproc)"
rm -f "$root"/python/loramix/_core*.so
cp "$bdir"/_core.*.so "$bdir"/_core_testing.*.so "$root/python/loramix/"
echo "built $(ls "$root"/python/loramix/_core*.so)"
