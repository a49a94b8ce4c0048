"""Rouge-L speed: loramix.evaluation.rouge (numba LCS, cached stemming) vs rouge_score, same pairs, same run.

    python benches/bench_rouge.py [--pairs 10000] [--out bench_out/rouge.json]

Prints a table (seconds, pairs/s, speed-up) for short answers (Lots-of-LoRAs-like) and for long
texts, and writes it as JSON. Correctness lives in tests/test_rouge.py; here only a max |diff| is
reported.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import numpy as np


def make_pairs(n: int, lo: int, hi: int, seed: int):
    rnd = random.Random(seed)
    vocab = [("".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 10))))
             for _ in range(3000)]
    def text():
        return " ".join(rnd.choice(vocab) + rnd.choice(["", "", ",", "."]) for _ in range(rnd.randint(lo, hi)))
    preds, refs = [], []
    for _ in range(n):
        r = text()
        toks = r.split()
        p = " ".join(t for t in toks if rnd.random() < 0.75) if rnd.random() < 0.6 else text()
        preds.append(p)
        refs.append(r)
    return preds, refs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=10_000)
    ap.add_argument("--out", default="bench_out/rouge.json")
    args = ap.parse_args()

    from rouge_score import rouge_scorer

    from loramix.evaluation import rouge

    rouge.rouge_l(["warm up"], ["warm up the jit"])  # compile (or load the numba cache)
    rows = []
    for name, lo, hi, n in [("short (1-20 words)", 1, 20, args.pairs),
                            ("medium (20-100 words)", 20, 100, args.pairs),
                            ("long (200-400 words)", 200, 400, max(args.pairs // 10, 100))]:
        preds, refs = make_pairs(n, lo, hi, seed=len(rows))
        sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        t0 = time.perf_counter()
        ref_f = np.array([sc.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)])
        t_ref = time.perf_counter() - t0
        # each case draws its own vocabulary (its own seed), so its words' stems are (nearly all) not
        # cached yet: a fair first call without reaching into the library's private cache
        t0 = time.perf_counter()
        f = rouge.rouge_l(preds, refs)[2]
        t_ours = time.perf_counter() - t0
        rows.append({"case": name, "pairs": n, "rouge_score_s": t_ref, "loramix_s": t_ours,
                     "rouge_score_pairs_per_s": n / t_ref, "loramix_pairs_per_s": n / t_ours,
                     "speedup": t_ref / t_ours, "max_abs_diff": float(np.max(np.abs(f - ref_f)))})

    print(f"{'case':24s} {'pairs':>6s} {'rouge_score s':>14s} {'loramix s':>10s} {'pairs/s':>10s} {'speed-up':>9s} {'max|d|':>7s}")
    for r in rows:
        print(f"{r['case']:24s} {r['pairs']:6d} {r['rouge_score_s']:14.3f} {r['loramix_s']:10.4f} "
              f"{r['loramix_pairs_per_s']:10.0f} {r['speedup']:8.1f}x {r['max_abs_diff']:7.0e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"bench": "rouge_l", "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "rows": rows}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
