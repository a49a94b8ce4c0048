"""``loramix bench``: paper-scale speed and memory, loramix and its peers side by side in one run.

    loramix bench [--scale laptop|paper] [--bank-dir DIR] [--suite kernels|mix|e2e|all] [--out DIR]

Inputs are generated under ``--bank-dir`` (never inside the repository): a synthetic bank shaped
like Lots-of-LoRAs (:mod:`loramix_bench.synth`), 64 members at ``laptop`` scale, 502 at
``paper`` scale, and a 1,000-example target dataset. Results: tables on stdout and in
``OUT/bench.md``, everything in ``OUT/bench.json``, plots ``OUT/*.png``.

Importing this package is cheap (the CLI builds its parser with :func:`add_arguments`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

SUITES = ("kernels", "mix", "e2e", "all")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--scale", choices=("laptop", "paper"), default="laptop",
                   help="laptop: 64 members; paper: 502 (as Lots-of-LoRAs)")
    p.add_argument("--bank-dir", default="loramix-benchdata",
                   help="folder for the generated banks and dataset (made if missing; keep it outside the repo)")
    p.add_argument("--suite", choices=SUITES, default="all")
    p.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md and the PNG plots")
    p.add_argument("--dtype", choices=("bf16", "f32", "f16"), default="bf16", help="bank dtype for mix/e2e")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per case (median reported)")
    p.add_argument("--fp32", action="store_true",
                   help="also generate the fp32 bank as published (37.7 MB x N) and mix from it cold")
    p.add_argument("--delete-fp32", action="store_true", help="delete the fp32 bank after measuring")
    p.add_argument("--peft-n", type=int, default=None, help="members loaded into PEFT (default min(N, 64, fit); 16 at laptop scale)")
    p.add_argument("--peft-svd-layers", type=int, default=None,
                   help="layers for PEFT svd (dense SVDs, minutes per layer), extrapolated to 32 "
                        "(default 1; 0 at laptop scale, where loramix svd is capped anyway)")
    p.add_argument("--loo-layers", type=int, default=None,
                   help="layers mixed in the leave-one-out case (default all; 4 at laptop scale; output = N adapters)")
    p.add_argument("--exact-all-max", type=int, default=64,
                   help="largest N for concat/svd with top-k all (output/QR grow with N)")
    p.add_argument("--svd-timeout", type=float, default=30.0,
                   help="seconds after which an svd case is stopped and reported as capped (0: no cap; "
                        "the cap exists until svd is fast, issue 11 goal 5)")
    p.add_argument("--paper-n", type=int, default=None,
                   help="members the paper's in-RAM approach loads (default: as many as fit; 32 at laptop scale)")
    p.add_argument("--scratch", default=None,
                   help="folder for mixed outputs while timing (default /dev/shm/loramix-bench; one case "
                        "also writes to OUT/tmp on disk)")
    return p


def run(args) -> int:
    from loramix_bench import report, suites, synth

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    root = Path(args.bank_dir).resolve()
    dtype = {"bf16": "BF16", "f32": "F32", "f16": "F16"}[args.dtype]
    opts = {k: getattr(args, k) for k in ("repeat", "peft_n", "peft_svd_layers", "loo_layers", "exact_all_max",
                                          "delete_fp32", "dtype", "suite", "fp32", "scratch",
                                          "svd_timeout", "paper_n")}
    r = suites.Run(Path(args.out), args.scale, root, opts, log)
    r.doc["command"] = "loramix bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:])
    r.loadavg("start")
    want = SUITES[:-1] if args.suite == "all" else (args.suite,)
    inputs_s = 0.0
    if "kernels" in want:
        log("suite kernels")
        suites.suite_kernels(r)
    if "mix" in want or "e2e" in want:
        log(f"inputs under {root} ...")
        t0 = time.perf_counter()
        bank, target = synth.ensure_inputs(root, args.scale, dtype, progress=True)
        inputs_s = time.perf_counter() - t0   # generating the bank: once per --bank-dir, not the bench
        if "mix" in want:
            log("suite mix")
            suites.suite_mix(r, bank)
        if "e2e" in want:
            log("suite e2e")
            suites.suite_e2e(r, bank, target)
    if args.fp32:
        log("suite fp32")
        suites.suite_fp32(r)
    r.loadavg("end")
    r.doc["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    r.doc["wall_s"] = time.perf_counter() - r.t0
    r.doc["inputs_s"] = inputs_s
    r.save()
    text = report.tables(r.doc) + "\n" + report.goals(r.doc)
    (r.out / "bench.md").write_text(f"Command: `{r.doc['command']}`\n\n" + text)
    pngs = report.plots(r.doc, r.out)
    print(text)
    log(f"wrote {r.out / 'bench.json'}, {r.out / 'bench.md'}, " + ", ".join(str(p) for p in pngs))
    return 0


def main(argv=None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="loramix bench", description=__doc__.splitlines()[0]))
    return run(p.parse_args(argv))
