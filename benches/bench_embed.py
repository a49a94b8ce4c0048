"""Sentence-embedding throughput: loramix on ONNX Runtime (fp32, int8) vs sentence-transformers on torch.

Texts: ``--n`` real prompts (the ``input`` field: long task definitions plus an example) sampled
without replacement, seeded, from every ``*.jsonl`` of ``--tasks`` (default
``/work/shared/real-tasks/tasks``; ``--tasks stdlib`` uses Python docstrings of mixed lengths).
Same model (all-MiniLM-L6-v2), CPU, the same thread count for both (``torch.set_num_threads``,
ONNX Runtime intra-op threads), sentence-transformers at batch size 32 with its own length sorting.

Two measurements:

* **first call**: one fresh process per variant (A B C, ``--fresh`` rounds) times the import, the
  model load (for loramix: ONNX file from the cache + session) and the first ``encode`` of all
  texts: what a user waits for in a new ``loramix generate``;
* **steady state**: one process, every variant warmed up once, then ``--repeats`` rounds with the
  variants interleaved (A B C A B C ...); medians and ratios to torch. The 1-minute load average
  is recorded with every round.

Also reports accuracy: max |delta| and min cosine of each variant to sentence-transformers, and of
int8 to loramix fp32.

    python benches/bench_embed.py --threads 2 --n 512 --out bench_out/embed.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

VARIANTS = {"ort_fp32": (True, None), "ort_int8": (True, "int8"), "ort_int8_all": (True, "int8-all"),
            "ort_int8_block": (True, "int8-block"), "ort_std_fp32": (False, None)}
DEFAULT_TASKS = "/work/shared/real-tasks/tasks"


def real_prompts(tasks: str, n: int, seed: int = 0) -> list[str]:
    """``n`` prompts sampled without replacement (seeded) from the ``input`` of every task file."""
    pool = []
    for f in sorted(glob.glob(os.path.join(tasks, "*.jsonl"))):
        with open(f, encoding="utf-8") as fh:
            pool.extend(json.loads(line)["input"] for line in fh if line.strip())
    if not pool:
        raise SystemExit(f"{tasks}: no *.jsonl task files")
    idx = np.random.default_rng(seed).choice(len(pool), size=min(n, len(pool)), replace=False)
    return [pool[i] for i in idx]


def stdlib_corpus(n: int, seed: int = 0) -> list[str]:
    """Docstrings of the standard library's modules as sentences, paragraphs and whole docs."""
    import importlib
    import inspect
    import pkgutil
    import re

    docs = set()
    libdir = "lib/python" + ".".join(platform.python_version_tuple()[:2])
    for m in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
        if not m.module_finder.path.endswith(libdir) or m.name.startswith("_") or m.name in (
                "antigravity", "this", "idlelib", "tkinter", "turtle", "pydoc_data"):
            continue
        try:
            mod = importlib.import_module(m.name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
            d = inspect.getdoc(obj) if obj is not None else None
            if d and len(d) > 20:
                docs.add(d)
    docs = sorted(docs)
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        d = docs[int(rng.integers(len(docs)))]
        r = rng.random()
        if r < 0.5:
            sents = [s for s in re.split(r"(?<=[.!?])\s+", d.replace("\n", " ")) if s.strip()]
            out.append(sents[int(rng.integers(len(sents)))])
        elif r < 0.85:
            out.append([p for p in d.split("\n\n") if p.strip()][0])
        else:
            out.append(d)
    return out


def load_texts(args) -> list[str]:
    return stdlib_corpus(args.n) if args.tasks == "stdlib" else real_prompts(args.tasks, args.n, args.seed)


def make_runner(name: str, threads: int, batch_size: int):
    """``encode(texts) -> (n, d) float32`` of one variant (its imports and model load included)."""
    if name == "torch":
        import torch
        from sentence_transformers import SentenceTransformer

        from loramix.profiles import encoder

        torch.set_num_threads(threads)
        st = SentenceTransformer(str(encoder.default_model_dir()), device="cpu")
        return lambda x: st.encode(x, batch_size=batch_size, convert_to_numpy=True)
    from loramix.profiles import encoder

    fused, q = VARIANTS[name]
    return encoder.Encoder(threads=threads, fused=fused, quantize=q).encode


def fresh(args) -> None:
    """Child process: time import + load, and the first encode of all texts; print JSON."""
    texts = load_texts(args)
    t0 = time.perf_counter()
    f = make_runner(args.fresh, args.threads, args.batch_size)
    t1 = time.perf_counter()
    f(texts)
    t2 = time.perf_counter()
    print(json.dumps({"load_s": t1 - t0, "first_s": t2 - t1, "load1": os.getloadavg()[0]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="folder of *.jsonl task files, or 'stdlib'")
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fresh-rounds", type=int, default=1, help="rounds of fresh-process first calls (0: none)")
    ap.add_argument("--variants", default="torch,ort_fp32,ort_int8,ort_int8_all")
    ap.add_argument("--out", default="bench_out/embed.json")
    ap.add_argument("--fresh", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    if args.fresh:
        return fresh(args)
    wanted = args.variants.split(",")
    texts = load_texts(args)

    first: dict[str, list[dict]] = {k: [] for k in wanted}
    child = [sys.executable, __file__, "--tasks", args.tasks, "--n", str(args.n), "--seed", str(args.seed),
             "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    for k in wanted:  # build (or find) the cached .onnx files outside the timing
        if k != "torch":
            make_runner(k, args.threads, args.batch_size)
    for _ in range(args.fresh_rounds):
        for k in wanted:
            r = subprocess.run(child + ["--fresh", k], capture_output=True, text=True, check=True)
            first[k].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print("fresh", k, first[k][-1], flush=True)

    runners = {k: make_runner(k, args.threads, args.batch_size) for k in wanted}
    from loramix.profiles import encoder

    ntok = sum(len(i) for i in encoder.get_encoder(threads=args.threads).tokenize(texts))
    embs, times, loads = {}, {k: [] for k in wanted}, []
    warm = sorted(texts, key=len)[-args.batch_size:] + texts[::16]  # the longest batch and a spread
    for f in runners.values():  # warm-up: the first call in this process, not counted
        f(warm)
    for r in range(args.repeats):
        loads.append(os.getloadavg()[0])
        for k, f in runners.items():
            t = time.perf_counter()
            embs[k] = f(texts)
            times[k].append(time.perf_counter() - t)
        print("round", r, {k: round(v[-1], 3) for k, v in times.items()}, "load", loads[-1], flush=True)
    loads.append(os.getloadavg()[0])

    def accuracy(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        return {"max_abs": float(np.abs(a - b).max()), "min_cos": float(cos.min()), "mean_cos": float(cos.mean())}

    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k in wanted:
        row = {"variant": k, "median_s": med[k], "texts_per_s": len(texts) / med[k], "seconds": times[k],
               "x_torch": med["torch"] / med[k] if "torch" in med else None, "fresh": first[k]}
        if first[k]:
            row["fresh_load_s"] = statistics.median(x["load_s"] for x in first[k])
            row["fresh_first_s"] = statistics.median(x["first_s"] for x in first[k])
            if first.get("torch"):
                tt = statistics.median(x["load_s"] + x["first_s"] for x in first["torch"])
                row["fresh_x_torch"] = tt / (row["fresh_load_s"] + row["fresh_first_s"])
        if "torch" in embs and k != "torch":
            row["vs_torch"] = accuracy(embs[k], embs["torch"])
        if "ort_fp32" in embs and k.startswith("ort_int8"):
            row["vs_fp32"] = accuracy(embs[k], embs["ort_fp32"])
        rows.append(row)

    print(f"{len(texts)} texts, {ntok} tokens after truncation to 256, threads={args.threads}, "
          f"repeats={args.repeats}, 1-min load {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'variant':<15}{'median s':>9}{'texts/s':>9}{'x torch':>8}{'fresh load+1st s':>18}{'fresh x':>8}"
          f"{'max|d| st':>11}{'min cos st':>11}")
    for r in rows:
        acc = r.get("vs_torch", {})
        fr = (r.get("fresh_load_s") or 0) + (r.get("fresh_first_s") or 0)
        print(f"{r['variant']:<15}{r['median_s']:>9.2f}{r['texts_per_s']:>9.1f}{(r['x_torch'] or float('nan')):>8.2f}"
              f"{fr:>18.2f}{r.get('fresh_x_torch', float('nan')):>8.2f}"
              f"{acc.get('max_abs', float('nan')):>11.2e}{acc.get('min_cos', float('nan')):>11.6f}")
        if "vs_fp32" in r:
            print(f"{'':<15}vs loramix fp32: max|d| {r['vs_fp32']['max_abs']:.2e}, min cos {r['vs_fp32']['min_cos']:.6f}, "
                  f"mean cos {r['vs_fp32']['mean_cos']:.6f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"texts": len(texts), "tokens": ntok, "threads": args.threads, "tasks": args.tasks,
                               "batch_size": args.batch_size, "load1": loads, "cpu": platform.processor()
                               or platform.machine(), "rows": rows}, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
