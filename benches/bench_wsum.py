"""Weighted sums over a bank of bf16 tensors in a safetensors file, against numpy.

One weighted sum of K bf16 tensors of P elements (sources mapped from a safetensors file in
the page cache) vs numpy on float32 copies (`w @ stack` and a loop of `out += w * x`), in GB/s
of source data read, next to the machine's read bandwidth measured in the same run (numpy
sum over a large array, 1 thread and `threads` threads); and a batched Q x K mix vs numpy
matmul in GFLOP/s. Prints a table and writes JSON (default bench_out/wsum.json).

    PYTHONPATH=python python benches/bench_wsum.py [--k 64 --p 4194304 --q 32 --repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

import loramix
from loramix import _core
from loramix_bench._common import run_threads  # benches/ is on sys.path when run as a script
from loramix.core.tensors import SafetensorsFile, SafetensorsWriter, f32_to_bf16, gram, weighted_sum


def best_time(fn, repeat):
    fn()  # warm-up (page cache, first-touch of outputs)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def read_bandwidth(arr: np.ndarray, threads: int, repeat: int) -> float:
    """GB/s of numpy sums over `arr`, split across `threads` Python threads (sum releases the GIL)."""
    flat = arr.reshape(-1)
    parts = np.array_split(flat, threads)
    return flat.nbytes / best_time(lambda: run_threads(p.sum for p in parts), repeat) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--p", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--q", type=int, default=32)
    ap.add_argument("--pq", type=int, default=1024 * 1024, help="elements per source in the batched case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench_out/wsum.json")
    args = ap.parse_args()
    threads = args.threads or _core.default_threads()
    K, P, Q, PQ = args.k, args.p, args.q, min(args.pq, args.p)
    rng = np.random.default_rng(0)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bank.safetensors")
        stack = np.empty((K, P), np.float32)
        with SafetensorsWriter(path, [(f"t{k}", "BF16", (P,)) for k in range(K)]) as w:
            for k in range(K):
                x = rng.standard_normal(P, dtype=np.float32)
                bits = f32_to_bf16(x)
                stack[k] = (bits.astype(np.uint32) << 16).view(np.float32)
                w.write(f"t{k}", bits)
        f = SafetensorsFile(path)
        refs = [f.tensor(f"t{k}") for k in range(K)]
        for r in refs:  # fault the mapping in (page cache -> this process)
            r.numpy()[:: 2048].sum()
        wts = rng.standard_normal(K)
        bytes_bf16 = K * P * 2

        bw1 = read_bandwidth(stack, 1, args.repeat)
        bwn = read_bandwidth(stack, threads, args.repeat)
        bw = max(bw1, bwn)
        rows.append(("numpy sum, 1 thread (read bandwidth)", stack.nbytes / bw1 / 1e9, bw1, None))
        rows.append((f"numpy sum, {threads} threads (read bandwidth)", stack.nbytes / bwn / 1e9, bwn, None))

        info = loramix.info()
        for isa in _core.available_isas():
            _core.set_active_isa(isa)
            t = best_time(lambda: weighted_sum(refs, wts, threads=threads), args.repeat)
            rows.append((f"loramix weighted_sum bf16 ({isa}, {threads} thr)", t, bytes_bf16 / t / 1e9, None))
        _core.set_active_isa(info["active"])
        t = best_time(lambda: weighted_sum(refs, wts, "BF16", threads=threads), args.repeat)
        rows.append((f"loramix weighted_sum bf16 -> BF16 out ({info['active']})", t, bytes_bf16 / t / 1e9, None))
        w32 = wts.astype(np.float32)
        t = best_time(lambda: w32 @ stack, args.repeat)
        rows.append(("numpy w @ stack (f32 copies)", t, stack.nbytes / t / 1e9, None))

        def loop():
            out = np.zeros(P, np.float32)
            for k in range(K):
                out += w32[k] * stack[k]
            return out

        t = best_time(loop, args.repeat)
        rows.append(("numpy loop out += w*x (f32 copies)", t, stack.nbytes / t / 1e9, None))

        # Batched: Q x K weights over sources of PQ elements (a second, smaller bf16 file).
        WQ = rng.standard_normal((Q, K))
        flops = 2.0 * Q * K * PQ
        path_q = os.path.join(tmp, "bank_q.safetensors")
        with SafetensorsWriter(path_q, [(f"t{k}", "BF16", (PQ,)) for k in range(K)]) as w:
            for k in range(K):
                w.write(f"t{k}", f32_to_bf16(stack[k, :PQ]))
        fq = SafetensorsFile(path_q)
        srcs_q = [fq.tensor(f"t{k}") for k in range(K)]
        WQ32 = WQ.astype(np.float32)
        stack_q = np.ascontiguousarray(stack[:, :PQ])
        for isa in _core.available_isas():
            _core.set_active_isa(isa)
            t = best_time(lambda: weighted_sum(srcs_q, WQ, threads=threads), args.repeat)
            rows.append((f"loramix Q={Q} batched bf16 ({isa})", t, K * PQ * 2 / t / 1e9, flops / t / 1e9))
        _core.set_active_isa(info["active"])
        t = best_time(lambda: WQ32 @ stack_q, args.repeat)
        rows.append((f"numpy Q={Q} matmul (f32 copies)", t, stack_q.nbytes / t / 1e9, flops / t / 1e9))
        # Gram of the K sources (GFLOP/s counts the full K x K product, as numpy computes it)
        gflops = 2.0 * K * K * PQ
        t = best_time(lambda: gram(srcs_q, threads=threads), args.repeat)
        rows.append((f"loramix gram K={K} bf16 ({info['active']})", t, K * PQ * 2 / t / 1e9, gflops / t / 1e9))
        t = best_time(lambda: stack_q @ stack_q.T, args.repeat)
        rows.append(("numpy gram X @ X.T (f32 copies)", t, stack_q.nbytes / t / 1e9, gflops / t / 1e9))
        srcs_q = refs = f = fq = None   # unmap before the folder goes (None, not del: the lambdas close over them)

    active_row = next(r for r in rows if r[0].startswith(f"loramix weighted_sum bf16 ({info['active']}"))
    frac = active_row[2] / bw
    print(f"\nK={K} P={P} bf16 sources ({bytes_bf16 / 1e6:.0f} MB), Q={Q} batched over {PQ} elements; "
          f"threads={threads}; cpu={platform.processor() or platform.machine()}")
    print(f"{'variant':58s} {'time s':>9s} {'GB/s read':>10s} {'GFLOP/s':>9s}")
    for name, t, gbs, gf in rows:
        print(f"{name:58s} {t:9.4f} {gbs:10.2f} {'' if gf is None else f'{gf:9.1f}':>9s}")
    print(f"\nweighted_sum ({info['active']}) reads at {100 * frac:.0f}% of the measured read bandwidth "
          f"({bw:.1f} GB/s); goal >= 60%")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"k": K, "p": P, "q": Q, "pq": PQ, "threads": threads, "info": info,
                   "read_bandwidth_gbs": bw, "fraction_of_bandwidth": frac,
                   "rows": [{"variant": n, "seconds": t, "gb_per_s": g, "gflop_per_s": gf} for n, t, g, gf in rows]},
                  fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
