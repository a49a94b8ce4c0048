#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer build of the compiled core (loramix._core and
# loramix._core_testing) into build/asan, then the safetensors reader and kernel tests against it.
#
#   tools/sanitize.sh [PYTEST ARGS...]
#     default: tests/test_safetensors.py tests/test_divergence.py tests/test_wsum.py tests/test_mixpass.py tests/test_pread.py
#              tests/test_core_module.py
#
# The Python interpreter is not instrumented, so the ASan runtime is preloaded (LD_PRELOAD) and
# Python's own allocator is switched off (PYTHONMALLOC=malloc) so that ASan sees every buffer.
# Leak detection is off: CPython does not free everything at exit. Any ASan or UBSan report
# aborts the run (-fno-sanitize-recover, halt_on_error) with a non-zero status.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bdir=$root/build/asan
cxx=${CXX:-g++}
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_CXX_FLAGS="$san" -DCMAKE_MODULE_LINKER_FLAGS="$san" -DCMAKE_SHARED_LINKER_FLAGS="$san" \
  -DLORAMIX_BUILD_PYTHON=ON -DLORAMIX_TESTING=ON \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$bdir" -j"${JOBS:-2}"

# A copy of the package with the instrumented modules (the working tree's dev build is untouched).
pkg=$bdir/pkg
rm -rf "$pkg"
mkdir -p "$pkg"
cp -r "$root/python/loramix" "$pkg/"
find "$pkg" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
cp "$bdir"/_core.*.so "$bdir"/_core_testing.*.so "$pkg/loramix/"

# libstdc++ is preloaded too: python3 does not link it, and ASan's __cxa_throw interceptor must
# find the real one at start-up ("CHECK failed: ... real___cxa_throw != 0" on the first throw).
runtime=$("$cxx" -print-file-name=libasan.so):$("$cxx" -print-file-name=libstdc++.so.6)
export LD_PRELOAD=$runtime${LD_PRELOAD:+:$LD_PRELOAD}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:abort_on_error=1:check_initialization_order=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export PYTHONMALLOC=malloc
export PYTHONPATH=$pkg
cd "$root"
python3 -c 'import loramix._core as c, loramix._core_testing as t; print("sanitized modules:", c.__file__, t.__file__, "ISAs:", c.available_isas())'
if [[ $# -eq 0 ]]; then
  set -- tests/test_safetensors.py tests/test_divergence.py tests/test_wsum.py tests/test_mixpass.py tests/test_core_module.py tests/test_pread.py
fi
exec python3 -m pytest -q -p no:cacheprovider "$@"
