"""What a bank's integrity checks cost per member, next to the machine's read ceiling.

One paper-scale member (fp32, r=16, q/k/v of 32 layers of a 4096-wide model: 37.7 MB) in the
page cache. Per round, interleaved: the read ceiling (numpy sum over the mapped tensors),
``file_sha256`` (the full hash recorded at build and used by ``bank verify``), the non-finite
scan done at build (``nonfinite_problem``), ``hashlib.blake2b`` (a peer hash from the standard
library) and ``weights_signature`` (the quick check done at every open). Medians over rounds,
in ms per member and GB/s, and projected to a 502-member bank. Prints a table; writes JSON
(default bench_out/bank_integrity.json).

    PYTHONPATH=python python benches/bench_bank_integrity.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from loramix.bank import integrity
from loramix.core.tensors import SafetensorsFile


class _Spec:   # what nonfinite_problem reads of a member's spec
    name = "bench"
    modules: dict = {}


def make_member(path: Path, layers: int = 32, hidden: int = 4096, kv: int = 1024, r: int = 16) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    t = {}
    for i in range(layers):
        for mod, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            base = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            t[f"{base}.lora_A.weight"] = rng.standard_normal((r, hidden), dtype=np.float32)
            t[f"{base}.lora_B.weight"] = rng.standard_normal((out, r), dtype=np.float32)
    save_file(t, str(path), metadata={"format": "pt"})


def blake2b(path) -> str:
    """The peer: BLAKE2b through the same chunked read as loramix's SHA-256."""
    return integrity.file_digest(path, "blake2b")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="bench_out/bank_integrity.json")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "adapter_model.safetensors"
        make_member(f)
        size = f.stat().st_size
        sf = SafetensorsFile(str(f))
        cases = {
            "read ceiling (numpy sum)": lambda: sum(float(sf.numpy(k).sum()) for k in sf.keys()),
            "sha256 (build, verify)": lambda: integrity.file_sha256(f),
            "blake2b (peer)": lambda: blake2b(f),
            "non-finite scan (build)": lambda: integrity.nonfinite_problem(_Spec, sf),
            "signature (every open)": lambda: integrity.weights_signature(f),
        }
        for fn in cases.values():   # warm-up: page cache
            fn()
        times = {k: [] for k in cases}
        for _ in range(a.rounds):   # interleaved: A B C D E, A B C D E, ...
            for k, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        sf.close()
    load = os.getloadavg()
    rows = []
    for k, ts in times.items():
        med = statistics.median(ts)
        rows.append({"case": k, "ms_per_member": med * 1e3, "GB_s": size / med / 1e9,
                     "s_per_502_members": med * 502})
    print(f"member {size / 1e6:.1f} MB, {a.rounds} rounds, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'case':<28} {'ms/member':>10} {'GB/s':>8} {'s / 502 members':>16}")
    for r in rows:
        print(f"{r['case']:<28} {r['ms_per_member']:>10.2f} {r['GB_s']:>8.2f} {r['s_per_502_members']:>16.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"member_bytes": size, "rounds": a.rounds, "loadavg": load,
                                       "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
