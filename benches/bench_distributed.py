"""Batch generation on Dask: 1 vs 2 worker processes, split by module slices vs by targets.

    PYTHONPATH=python python benches/bench_distributed.py [--out bench_out/distributed.json]

Builds a synthetic bank (N members, q/k/v LoRA of L layers, hidden H, rank r, f32; no torch),
mixes a batch of Q targets with dense random weights locally (the reference, the core using
all cores) and on a ``LocalCluster`` of 1 and 2 worker processes (one Dask thread each, the
core given cores/workers threads), for each split and each Q, and records median seconds,
bank GB/s (bank bytes / time) and whether the outputs equal the local run's to the bit.

On one machine the bank sits in the page cache after the warm-up, so this measures compute,
part files and scheduling; not a shared filesystem. The scaling model for real clusters is in
the docs of ``loramix.mixing.distributed``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_bank(root: Path, n: int, layers: int, hidden: int, r: int, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from loramix.bank.bank import build_bank as build
    from loramix.core.tensors import SafetensorsWriter

    rng = np.random.default_rng(seed)
    bank = root / "bank"
    words = [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    (root / "tok").mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tok" / "tokenizer.json"))
    for i in range(n):
        d = bank / f"m{i:03d}"
        d.mkdir(parents=True)
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "bench/base",
               "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "k_proj", "v_proj"]}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        entries = []
        for lyr in range(layers):
            for p in ("q_proj", "k_proj", "v_proj"):
                m = f"base_model.model.model.layers.{lyr}.self_attn.{p}"
                entries += [(f"{m}.lora_A.weight", "F32", (r, hidden)), (f"{m}.lora_B.weight", "F32", (hidden, r))]
        with SafetensorsWriter(d / "adapter_model.safetensors", entries) as w:
            for name, _, shape in entries:
                w.write(name, rng.standard_normal(shape).astype(np.float32) * 0.01)
        rows = [{"input": " ".join(rng.choice(words[i % 10 * 20:(i % 10 + 1) * 20], 8)), "output": ["x"]}
                for _ in range(4)]
        (d / "dataset.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    build(bank, root / "tok" / "tokenizer.json")
    return bank


def same(a: Path, b: Path) -> bool:
    return all((a / n / f).read_bytes() == (b / n / f).read_bytes()
               for n in os.listdir(a) for f in ("adapter_model.safetensors", "adapter_config.json"))


def cluster(n_workers: int):
    from dask.distributed import Client, LocalCluster

    c = LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                     dashboard_address=None,
                     scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
    return c, Client(c, set_as_default=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/distributed.json")
    ap.add_argument("--members", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="1,8,32", help="batch sizes Q, comma-separated")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    from loramix.bank.bank import Bank
    from loramix.mixing.distributed import mix_adapters as dist_mix
    from loramix.mixing.local import mix_adapters as local_mix

    cores = os.cpu_count() or 1
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="loramix-bench-dist-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        bank_dir = build_bank(tmp, args.members, args.layers, args.hidden, args.rank)
        bank = Bank.open(bank_dir)
        bank_bytes = sum((m.path / "adapter_model.safetensors").stat().st_size for m in bank.members)
        print(f"bank: {args.members} members, {bank_bytes / 1e6:.1f} MB, built in {time.perf_counter() - t0:.1f} s",
              flush=True)
        rng = np.random.default_rng(1)
        doc = {"machine": {"cpus": cores, "python": platform.python_version(), "node": platform.node(),
                           "loadavg_at_start": os.getloadavg()},
               "bank": {"members": args.members, "modules": 3 * args.layers, "hidden": args.hidden,
                        "rank": args.rank, "bytes": bank_bytes},
               "note": "one machine, bank in page cache after warm-up; median and min of --repeat runs",
               "local": [], "dask": []}
        refs = {}
        for Q in [int(x) for x in args.targets.split(",")]:
            W = rng.dirichlet(np.ones(args.members), size=Q)
            outs = [tmp / "local" / f"Q{Q}" / f"t{q}" for q in range(Q)]
            times = []
            for i in range(args.repeat + 1):
                shutil.rmtree(tmp / "local" / f"Q{Q}", ignore_errors=True)
                t = time.perf_counter()
                local_mix(bank, W, outs)
                if i:
                    times.append(time.perf_counter() - t)
            refs[Q] = (W, tmp / "local" / f"Q{Q}")
            med = statistics.median(times)
            doc["local"].append({"Q": Q, "seconds": times, "median_s": med, "min_s": min(times),
                                 "bank_GBps": bank_bytes / med / 1e9})
            print(f"local     Q={Q:3d}              {med:7.3f} s (min {min(times):.3f})", flush=True)
        for nw in [int(x) for x in args.workers.split(",")]:
            cl, client = cluster(nw)
            try:
                for Q, (W, ref) in refs.items():
                    for split in ("modules", "targets"):
                        base = tmp / "dask" / f"w{nw}-Q{Q}-{split}"
                        outs = [base / f"t{q}" for q in range(Q)]
                        times, ok = [], True
                        for i in range(args.repeat + 1):   # the first run opens the bank on the workers
                            shutil.rmtree(base, ignore_errors=True)
                            t = time.perf_counter()
                            dist_mix(bank, W, outs, client=client, split=split,
                                     threads=max(1, cores // nw), timeout=600)
                            if i:
                                times.append(time.perf_counter() - t)
                            ok = ok and same(ref, base)
                        med = statistics.median(times)
                        doc["dask"].append({"workers": nw, "Q": Q, "split": split, "seconds": times,
                                            "median_s": med, "min_s": min(times),
                                            "bank_GBps": bank_bytes / med / 1e9,
                                            "identical_to_local": ok})
                        print(f"dask w={nw} Q={Q:3d} {split:8s} {med:7.3f} s (min {min(times):.3f})  "
                              f"identical={ok}", flush=True)
            finally:
                client.close()
                cl.close()
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
