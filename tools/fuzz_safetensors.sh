#!/usr/bin/env bash
# Fuzz the safetensors reader (cpp/fuzz/fuzz_safetensors.cpp) with libFuzzer + AddressSanitizer +
# UndefinedBehaviorSanitizer, seeded with the hostile files in tests/data/hostile and a few valid
# files written by the writer. Needs clang (apt-get install clang); without it, or with
# FUZZ_STANDALONE=1, builds the harness with g++ + sanitizers and replays the seeds only.
#
#   tools/fuzz_safetensors.sh [SECONDS]     (default 300; FUZZ_JOBS=N runs N fuzzing processes)
#
# Findings (crash-*, leak-*, timeout-*) are written to build/fuzz/findings/; the grown corpus to
# build/fuzz/corpus/ (kept between runs). Exit status is non-zero on a finding.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-300}
bdir=$root/build/fuzz
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
if [[ "${FUZZ_STANDALONE:-0}" != 1 ]] && command -v clang++ >/dev/null; then
  cxx=clang++ flags="$san -fsanitize=fuzzer-no-link" standalone=OFF
else
  cxx=${CXX:-g++} flags="$san" standalone=ON bdir=$root/build/fuzz-standalone
fi
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$san" \
  -DLORAMIX_FUZZ=ON -DLORAMIX_FUZZ_STANDALONE=$standalone >/dev/null
cmake --build "$bdir" -j"${JOBS:-2}" --target fuzz_safetensors

# Seeds: the hostile files plus valid files from the writer (loramix itself, if importable).
seeds=$root/build/fuzz/seeds
mkdir -p "$seeds" "$root/build/fuzz/corpus" "$root/build/fuzz/findings"
cp "$root"/tests/data/hostile/*.safetensors "$seeds/"
PYTHONPATH="$root/python" python3 - "$seeds" <<'PY' || echo "(no valid seeds: loramix not importable)"
import sys, numpy as np
from loramix import SafetensorsWriter
d = sys.argv[1]
with SafetensorsWriter(f"{d}/valid_mixed.safetensors",
                       [("a", "F32", (2, 3)), ("b", "BF16", (5,)), ("c", "F16", (0,))],
                       metadata={"format": "pt", "k\u00e9": "v\"\\"}) as w:
    w.write("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    w.write("b", np.ones(5, np.float32))
    w.write("c", np.zeros(0, np.float32))
with SafetensorsWriter(f"{d}/valid_nometa.safetensors", [("x", "F32", (1,))]) as w:
    w.write("x", np.ones(1, np.float32))
PY

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:halt_on_error=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
if [[ $standalone == ON ]]; then
  shopt -s nullglob
  exec "$bdir/fuzz_safetensors" "$seeds"/* "$root"/build/fuzz/corpus/*
fi
cd "$root/build/fuzz/findings"
# -max_len: the seeds are small; room for longer headers. -timeout: a parse must never hang.
"$bdir/fuzz_safetensors" "$root/build/fuzz/corpus" "$seeds" -max_total_time="$secs" \
  -dict="$root/cpp/fuzz/safetensors.dict" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 \
  ${FUZZ_JOBS:+-jobs=$FUZZ_JOBS -workers=$FUZZ_JOBS}
