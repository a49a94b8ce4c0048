#!/usr/bin/env python3
"""JS all-pairs 502 x 502 against its "log floor", and 1 x 502 against a prepared bank (issue 11,
goal 7), measured side by side in one run.

floor = shared (pair, bin) terms / vectorized float64 log throughput, where the throughput is
that of the log the sparse js loop uses (the active ISA's, via loramix._core_testing), measured
here on one core and scaled by the thread count. Runs are interleaved (floor, all-pairs,
1 x 502, floor, ...); medians are reported in wall time and in process CPU time (the fair one when
other jobs share the cores), with the load average.

    PYTHONPATH=python python3 tools/js_floor.py [--rounds 7] [--threads 2]

Measures only; tests/test_divergence.py checks correctness.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from loramix import _core, _core_testing
from loramix.core.divergence import divergence, prepare


def histograms(n: int, V: int = 32000, seed: int = 20250701):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benches"))
    from loramix_bench.synth import make_histograms
    return make_histograms(n, V, seed=seed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=502)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the medians here (loramix bench reads them)")
    a = ap.parse_args(argv)
    H = histograms(a.n)
    df = np.bincount(H.indices, minlength=H.shape[1]).astype(np.float64)
    shared = float((df * (df - 1) / 2).sum())
    isa = _core.active_isa()
    # log m for m <= 1, as the js loop takes it; 16k values (256 KB in + out) stay in L2, so this
    # is the log's compute throughput, not memory bandwidth
    m = np.random.default_rng(0).uniform(1e-6, 1.0, 1 << 14)
    _core_testing.divergence_log_abs(m, isa)
    bank = prepare(H, 1e-10, threads=a.threads)
    q = H[:1]
    bank.divergence(q, "js", threads=a.threads)  # builds and keeps the index
    t_log, c_log, t_all, c_all, t_one, t_one1, c_one1, c_np = [], [], [], [], [], [], [], []
    mo = np.empty_like(m)

    def timed(fn):
        t, c = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t, time.process_time() - c

    def logs():
        for _ in range(400):
            _core_testing.divergence_log_abs(m, isa)

    def np_logs():
        for _ in range(400):
            np.log(m, out=mo)

    load = [os.getloadavg()[0]]
    for _ in range(a.rounds):
        w, c = timed(logs)
        t_log.append(w / (400 * m.size))  # s per log, one core
        c_log.append(c / (400 * m.size))
        w, c = timed(lambda: divergence(H, None, "js", 1e-10, threads=a.threads))
        t_all.append(w)
        c_all.append(c)
        t_one.append(timed(lambda: bank.divergence(q, "js", threads=a.threads))[0])
        w, c = timed(lambda: bank.divergence(q, "js", threads=1))
        t_one1.append(w)
        c_one1.append(c)
        c_np.append(timed(np_logs)[1] / (400 * m.size))
        load.append(os.getloadavg()[0])
    med = statistics.median
    floor, floor_cpu = shared * med(t_log) / a.threads, shared * med(c_log)
    print(f"{a.n} histograms, {shared:.4g} shared (pair, bin) terms, ISA {isa}, {a.threads} threads, "
          f"{a.rounds} interleaved rounds, load avg {min(load):.2f}-{max(load):.2f} "
          f"({os.cpu_count()} cores)")
    print(f"log throughput      {1 / med(t_log) / 1e9:.3f} G logs/s/core wall, "
          f"{1 / med(c_log) / 1e9:.3f} per CPU second (medians)")
    print(f"log floor           {floor * 1e3:8.1f} ms wall ({a.threads} cores), "
          f"{floor_cpu * 1e3:.1f} ms CPU  (numpy np.log instead: {1 / med(c_np) / 1e9:.3f} G logs "
          f"per CPU second, floor {shared * med(c_np) * 1e3:.1f} ms CPU)")
    print(f"js all pairs        {med(t_all) * 1e3:8.1f} ms wall median (min {min(t_all) * 1e3:.1f}), "
          f"{med(c_all) * 1e3:.1f} ms CPU  = {med(t_all) / floor:.2f} x floor wall, "
          f"{med(c_all) / floor_cpu:.2f} x floor CPU")
    print(f"js 1 x {a.n} prepared {med(t_one) * 1e3:7.2f} ms wall median, {a.threads} thr "
          f"(min {min(t_one) * 1e3:.2f});  1 thr {med(t_one1) * 1e3:.2f} ms (min {min(t_one1) * 1e3:.2f}, "
          f"CPU {med(c_one1) * 1e3:.2f})")
    if a.json:
        import json

        doc = {"n": a.n, "threads": a.threads, "isa": isa, "rounds": a.rounds, "shared_terms": shared,
               "log_floor_s": floor, "log_floor_cpu_s": floor_cpu, "all_pairs_s": med(t_all),
               "all_pairs_cpu_s": med(c_all), "one_vs_bank_s": med(t_one), "one_vs_bank_1thr_s": med(t_one1),
               "load_avg_1min": [min(load), max(load)]}
        with open(a.json, "w") as fh:
            json.dump(doc, fh, indent=1)

if __name__ == "__main__":
    main()
