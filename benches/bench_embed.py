"""Sentence-embedding throughput: loramix on ONNX Runtime (fp32, int8) vs sentence-transformers on torch.

Same texts (about 1,000 passages of realistic mixed lengths: docstrings of the Python standard
library, split into sentences and paragraphs), same thread count, same process; the variants run
interleaved, ``--repeats`` rounds, and each reports its best and median round. Also reports the
cosine of each variant to the torch reference (min over texts).

    python benches/bench_embed.py --threads 2 --out bench_out/embed.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import pkgutil
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def corpus(n: int = 1000, seed: int = 0) -> list[str]:
    """Realistic English of mixed lengths: stdlib docstrings as sentences, paragraphs and whole docs."""
    import importlib

    docs = []
    for name in sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.endswith("lib/python" + ".".join(platform.python_version_tuple()[:2]))):
        if name.startswith("_") or name in ("antigravity", "this", "idlelib", "tkinter", "turtle", "pydoc_data"):
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
            d = inspect.getdoc(obj) if obj is not None else None
            if d and len(d) > 20:
                docs.append(d)
    docs = sorted(set(docs))
    rng = np.random.default_rng(seed)
    out: list[str] = []
    while len(out) < n:
        d = docs[int(rng.integers(len(docs)))]
        r = rng.random()
        if r < 0.5:  # a sentence
            sents = [s for s in re.split(r"(?<=[.!?])\s+", d.replace("\n", " ")) if s.strip()]
            out.append(sents[int(rng.integers(len(sents)))])
        elif r < 0.85:  # a paragraph
            paras = [p for p in d.split("\n\n") if p.strip()]
            out.append(paras[int(rng.integers(len(paras)))])
        else:  # a whole docstring (often past 256 tokens)
            out.append(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="torch,ort_fp32,ort_int8,ort_int8_block,ort_std_fp32")
    ap.add_argument("--out", default="bench_out/embed.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    texts = corpus(args.n)
    from loramix.profiles import encoder as embed

    runners = {}
    wanted = args.variants.split(",")
    setup = {}
    for name, fused, q in [("ort_fp32", True, None), ("ort_int8", True, "int8"), ("ort_int8_block", True, "int8-block"),
                           ("ort_std_fp32", False, None), ("ort_std_int8", False, "int8")]:
        if name in wanted:
            t = time.perf_counter()
            enc = embed.Encoder(threads=args.threads, fused=fused, quantize=q, batch_size=args.batch_size)
            setup[name] = time.perf_counter() - t
            runners[name] = enc.encode
    if "torch" in wanted:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(args.threads)
        t = time.perf_counter()
        st = SentenceTransformer(str(embed.default_model_dir()), device="cpu")
        setup["torch"] = time.perf_counter() - t
        runners["torch"] = lambda x: st.encode(x, batch_size=args.batch_size, convert_to_numpy=True)

    ntok = sum(len(i) for i in next(iter(r.__self__ for r in runners.values() if hasattr(r, "__self__"))).tokenize(texts)) \
        if any(hasattr(r, "__self__") for r in runners.values()) else None
    for f in runners.values():  # warm-up (allocations, caches)
        f(texts[:64])
    times: dict[str, list[float]] = {k: [] for k in runners}
    embs = {}
    for _ in range(args.repeats):
        for k, f in runners.items():
            t = time.perf_counter()
            embs[k] = f(texts)
            times[k].append(time.perf_counter() - t)

    ref = embs.get("torch")
    rows = []
    base = len(texts) / min(times["torch"]) if "torch" in times else None
    for k, ts in times.items():
        sps = len(texts) / min(ts)
        row = {"variant": k, "sentences_per_s_best": sps, "sentences_per_s_median": len(texts) / statistics.median(ts),
               "seconds": ts, "setup_s": setup.get(k), "speedup_vs_torch": sps / base if base else None}
        if ref is not None:
            e = embs[k].astype(np.float64)
            cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
            row["min_cosine_vs_torch"] = float(cos.min())
        rows.append(row)

    print(f"{len(texts)} texts, {ntok} tokens after truncation to 256, threads={args.threads}, "
          f"batch={args.batch_size}, repeats={args.repeats}")
    print(f"{'variant':<14}{'sent/s best':>12}{'median':>9}{'x torch':>9}{'min cos':>11}{'setup s':>9}")
    for r in rows:
        print(f"{r['variant']:<14}{r['sentences_per_s_best']:>12.1f}{r['sentences_per_s_median']:>9.1f}"
              f"{(r['speedup_vs_torch'] or float('nan')):>9.2f}{r.get('min_cosine_vs_torch', float('nan')):>11.6f}"
              f"{(r['setup_s'] or float('nan')):>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"texts": len(texts), "tokens": ntok, "threads": args.threads,
                               "batch_size": args.batch_size, "cpu": platform.processor() or platform.machine(),
                               "rows": rows}, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
