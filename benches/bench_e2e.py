"""End to end: `loramix generate` in fresh processes against the bank's read ceiling, interleaved.

Every case runs in a new Python process (imports, bank open, profile, distances, mix, write),
warm page cache, and reports its wall time and the child's VmHWM / RssAnon (read from
/proc/self/status at exit). The ceiling is reading the same bytes once in a fresh process:
every member's adapter_model.safetensors read with readinto into one reused 1 MiB buffer
(what `cat FILES > /dev/null` does), on 1 thread and on as many threads as cores. Cases and
ceilings alternate (A B C A B C ...) so that they see the same machine load; medians are
reported, with the load average before and after.

    PYTHONPATH=python python benches/bench_e2e.py --root /work/benchdata/perf-mix --scale paper \
        [--cases factors,top16,svd16,open --repeat 3 --json bench_out/e2e.json]

Banks come from benches/loramix_bench/synth.py (``ensure_inputs``), never inside the repo.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# child prologue: report memory at exit, whatever the case runs
_PROLOGUE = r"""
import atexit, json, sys, time
_t0 = time.perf_counter()
def _report():
    st = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmHWM', 'RssAnon', 'RssFile'):
            st[k] = int(v.split()[0]) * 1024
    st['inner_s'] = time.perf_counter() - _t0
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF)
    st['cpu_s'] = ru.ru_utime + ru.ru_stime
    sys.stderr.write('\nBENCH ' + json.dumps(st) + '\n')
atexit.register(_report)
"""

_READ = r"""
import os, sys, threading
files = sys.argv[1:]
T = int(os.environ.get('BENCH_THREADS', '1'))
def work(part):
    buf = bytearray(1 << 20); mv = memoryview(buf)
    for f in part:
        with open(f, 'rb', buffering=0) as fh:
            while fh.readinto(mv):
                pass
parts = [files[i::T] for i in range(T)]
ts = [threading.Thread(target=work, args=(p,)) for p in parts]
[t.start() for t in ts]; [t.join() for t in ts]
"""

_OPEN = r"""
import time
from loramix.bank.bank import Bank
t = time.perf_counter(); b = Bank.open(sys.argv[1]); dt = time.perf_counter() - t
sys.stderr.write('\nOPEN %.6f %d\n' % (dt, len(b.members)))
"""


def _run(code: str, args: list[str], env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _PROLOGUE + code, *args], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"case failed ({p.returncode}): {p.stderr[-2000:]}")
    out = {"wall_s": wall}
    for line in p.stderr.splitlines():
        if line.startswith("BENCH "):
            out.update(json.loads(line[6:]))
        if line.startswith("OPEN "):
            out["open_s"] = float(line.split()[1])
    return out


def _cli(args: list[str]) -> str:  # noqa: ARG001 - the arguments go on the command line
    return "import sys\nfrom loramix.cli import main\nsys.argv = ['loramix'] + sys.argv[1:]\nrc = main()\n" \
           "sys.exit(rc)\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/work/benchdata/perf-mix")
    ap.add_argument("--scale", default="paper", choices=("laptop", "paper"))
    ap.add_argument("--dtype", default="BF16")
    ap.add_argument("--cases", default="factors,top16,svd16,open")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="LORAMIX_NUM_THREADS for the cases")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from loramix_bench.synth import ensure_inputs

    bank, target = ensure_inputs(a.root, a.scale, a.dtype)
    files = sorted(str(p) for p in Path(bank).glob("*/adapter_model.safetensors"))
    nbytes = sum(os.path.getsize(f) for f in files)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "python"), env.get("PYTHONPATH", "")])
    from loramix_bench._common import bytecode_env

    env = bytecode_env(env)   # what a user runs: bytecode compiled, as pip install leaves it
    if a.threads:
        env["LORAMIX_NUM_THREADS"] = str(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="loramix-e2e-"))
    batch = []
    if "batch16" in a.cases:   # 16 different datasets, one call (Q = 16)
        from loramix_bench.synth import make_dataset

        for i in range(16):
            f = Path(a.root) / f"target-b{i:02d}.jsonl"
            if not f.is_file():
                make_dataset(f, seed=100 + i)
            batch.append(str(f))
    # the paper's pipeline (the measurements): main's default metric adds an embedding
    gen = ["generate", str(target), "--bank", str(bank), "--overwrite", "--pipeline", "normalized", "--metric", "js"]
    cases = {
        "read_1t": (_READ, files, {"BENCH_THREADS": "1"}),
        f"read_{os.cpu_count()}t": (_READ, files, {"BENCH_THREADS": str(os.cpu_count())}),
        "factors": (_cli([]), gen + ["--out", str(tmp / "f")], {}),
        "top16": (_cli([]), gen + ["--out", str(tmp / "t"), "--top-k", "16"], {}),
        "svd16": (_cli([]), gen + ["--out", str(tmp / "s"), "--top-k", "16", "--mode", "svd"], {}),
        "top16_1t": (_cli([]), gen + ["--out", str(tmp / "t1"), "--top-k", "16"], {"LORAMIX_NUM_THREADS": "1"}),
        "batch16": (_cli([]), ["generate", *batch] + gen[2:] + ["--out", str(tmp / "b")], {}),
        "open": (_OPEN, [str(bank)], {}),
    }
    chosen = ["read_1t", f"read_{os.cpu_count()}t"] + [c for c in a.cases.split(",") if c]
    load0 = os.getloadavg()
    runs: dict[str, list[dict]] = {c: [] for c in chosen}
    try:
        for _ in [None] + list(range(a.repeat)):          # the first round warms the page cache
            for c in chosen:
                code, args, extra = cases[c]
                # a fresh output folder per run: an existing finished output may be skipped
                args = [str(tmp / f"{c}-{len(runs[c])}-{_}") if x.startswith(str(tmp)) else x for x in args]
                r = _run(code, args, {**env, **extra})
                if _ is not None:
                    runs[c].append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    read_s = min(statistics.median(r["wall_s"] for r in runs[c]) for c in chosen if c.startswith("read_"))
    bw = nbytes / read_s
    print(f"bank {bank}: {len(files)} members, {nbytes / 1e9:.2f} GB; load average {load0[0]:.1f} -> {load1[0]:.1f} "
          f"on {os.cpu_count()} cores")
    print(f"ceiling: read the bank once in a fresh process, best of 1 / {os.cpu_count()} threads: "
          f"{read_s:.2f} s ({bw / 1e9:.2f} GB/s)")
    print(f"{'case':10s} {'median s':>9s} {'cpu s':>6s} {'x read':>7s} {'goal s':>7s} {'VmHWM MB':>9s} {'RssAnon MB':>10s}")
    summary = {"bank": str(bank), "members": len(files), "bytes": nbytes, "load": [load0, load1],
               "read_s": read_s, "cases": {}}
    for c in chosen:
        med = statistics.median(r["wall_s"] for r in runs[c])
        hwm = statistics.median(r.get("VmHWM", 0) for r in runs[c]) / 1e6
        anon = statistics.median(r.get("RssAnon", 0) for r in runs[c]) / 1e6
        goal = {"factors": 2.5 * read_s + 0.3, "svd16": 5.0}.get(c)
        extra = ""
        if c == "open":
            med_open = statistics.median(r["open_s"] for r in runs[c])
            extra = f"   Bank.open itself {med_open * 1e3:.1f} ms"
        cpu = statistics.median(r.get("cpu_s", 0) for r in runs[c])
        print(f"{c:10s} {med:9.2f} {cpu:6.2f} {med / read_s:7.2f} {'' if goal is None else f'{goal:.2f}':>7s} "
              f"{hwm:9.0f} {anon:10.0f}{extra}")
        summary["cases"][c] = {"median_s": med, "runs": runs[c]}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
