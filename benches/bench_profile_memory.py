"""Peak memory of profiling one long example: whole-text tokenization (before) vs bounded pieces (after).

Each run is a fresh process that profiles a one-line JSON-lines dataset (default: an 8 MB line of
English-like words) with the shipped mini-bank tokenizer and reports its peak resident set
(``VmHWM``) and the peak of ``RssAnon`` (sampled every 5 ms by a thread). ``before`` sets
``chunks.PIECE_CHARS`` and ``BATCH_CHARS`` so high that the text goes to the tokenizer whole, as
loramix did before issue 10; ``after`` is the library as it is; with ``--baseline-lib DIR`` ``before`` is instead the library
tree at ``DIR`` as it is (before/after a change of the readers). ``--format`` csv and json write
the same text as one quoted CSV field or one string of a ``.json`` document. Runs alternate (A B A B),
medians are reported, with the machine load (``uptime``) before and after, and the token counts
of both (they must be equal: the shipped tokenizer cuts exactly).

    python benches/bench_profile_memory.py --mb 8 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "python/loramix/minibank/shipped/base/tokenizer.json"

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
from loramix.profiles import chunks, tokens
if sys.argv[4] == "before":
    chunks.PIECE_CHARS = chunks.BATCH_CHARS = 1 << 40
peak = [0]
stop = False
def anon():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
def watch():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)
base = anon()
t = threading.Thread(target=watch, daemon=True); t.start()
t0 = time.perf_counter()
p = tokens.build_profile(sys.argv[2], sys.argv[3])
dt = time.perf_counter() - t0
stop = True; t.join()
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(json.dumps({"hwm": hwm, "anon_peak": max(peak[0], anon()), "anon_before": base,
                  "n_tokens": p.n_tokens, "seconds": dt}))
"""


def make_dataset(path: Path, mb: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ("the of and to in is was for on that with as by at from his her this which or be are an "
             "model data token adapter bank memory profile example language Hello, world! 2026 naïve").split()
    target = int(mb * 1e6)
    parts, n = [], 0
    while n < target:
        w = rng.choice(words)
        parts.append(w)
        n += len(w) + 1
    text = " ".join(parts)
    if path.suffix == ".csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as fh:   # quoted: the text holds commas
            csv.writer(fh).writerows([["input", "output"], [text, "done"]])
    elif path.suffix == ".json":
        path.write_text(json.dumps([{"input": text, "output": "done"}]))
    else:
        path.write_text(json.dumps({"input": text, "output": "done"}) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=8.0, help="length of the one line, in MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--only", choices=["before", "after"], default=None,
                    help="run one variant (before needs ~190 MB of RAM per MB of line)")
    ap.add_argument("--format", choices=["jsonl", "csv", "json"], default="jsonl")
    ap.add_argument("--baseline-lib", default=None, metavar="DIR",
                    help="'before' runs the library tree at DIR (its python/ folder, e.g. a copy of an "
                         "older commit's) as it is, instead of whole-text tokenization")
    a = ap.parse_args(argv)
    load = [subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
    res = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / f"long.{a.format}"
        make_dataset(data, a.mb)
        for _ in range(a.repeats):
            for variant in ([a.only] if a.only else ("before", "after")):
                lib, how = ROOT / "python", variant
                if variant == "before" and a.baseline_lib:
                    lib, how = Path(a.baseline_lib), "as-is"
                out = subprocess.run([sys.executable, "-c", CHILD, str(lib), str(data),
                                      str(TOKENIZER), how], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if out.returncode:
                    res[variant].append({"error": out.stderr.strip().splitlines()[-1:]})
                    continue
                res[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load.append(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    summary = {"mb": a.mb, "load": load}
    for v, runs in res.items():
        ok = [r for r in runs if "error" not in r]
        summary[v] = {"runs": runs}
        if ok:
            summary[v].update({k: statistics.median(r[k] for r in ok) for k in ("hwm", "anon_peak", "seconds")})
            summary[v]["n_tokens"] = sorted({r["n_tokens"] for r in ok})
    for v in ([a.only] if a.only else ("before", "after")):
        s = summary[v]
        if "hwm" in s:
            print(f"{v:6s}: VmHWM {s['hwm'] / 2**20:7.1f} MiB, RssAnon peak {s['anon_peak'] / 2**20:7.1f} MiB, "
                  f"{s['seconds']:.2f} s, tokens {s['n_tokens']}  (median of {len(s['runs'])})")
        else:
            print(f"{v:6s}: failed: {s['runs']}")
    print("load:", *load, sep="\n  ")
    if a.out:
        Path(a.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
