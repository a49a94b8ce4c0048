"""Sanity check of a mini bank (not loramix): base vs each task's own LoRA vs a uniform average of
the *other* same-family adapters' A and B factors (plain numpy), on test splits.

    python tools/minibank_check.py BANK_DIR [--tasks-per-family 2] [--n 48] [--csv results.csv]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def family_mix(bank: Path, task: str, family: list[str], out: Path) -> Path:
    others = [t for t in family if t != task]
    sds = [load_file(str(bank / "bank" / t / "adapter_model.safetensors")) for t in others]
    mixed = {k: np.mean([sd[k] for sd in sds], axis=0).astype(np.float32) for k in sds[0]}
    out.mkdir(parents=True, exist_ok=True)
    save_file(mixed, str(out / "adapter_model.safetensors"))
    shutil.copy(bank / "bank" / task / "adapter_config.json", out / "adapter_config.json")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("bank")
    ap.add_argument("--tasks-per-family", type=int, default=2)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--families", default=None, help="comma-separated subset")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    from loramix.evaluation.generation import ResultsTable, evaluate_adapter, load_base, load_examples, summarize

    bank = Path(a.bank)
    man = json.loads((bank / "build_manifest.json").read_text()) if (bank / "build_manifest.json").exists() else None
    fams: dict[str, list[str]] = {}
    for t in sorted(p.name for p in (bank / "bank").iterdir() if (p / "adapter_model.safetensors").exists()):
        fam = man["tasks"][t]["family"] if man else t.rsplit("_", 1)[0]
        fams.setdefault(fam, []).append(t)
    if a.families:
        fams = {f: fams[f] for f in a.families.split(",")}
    model, tok = load_base(bank)
    table = ResultsTable(a.csv or tempfile.mktemp(suffix=".csv"))
    side = Path(str(table.path) + ".examples.jsonl")  # per-example Rouge-L, for the pooled CI
    ex_scores = {}
    if side.exists():
        for line in side.read_text().splitlines():
            r = json.loads(line)
            ex_scores[(r["task"], r["system"])] = np.array(r["rougeL"])
    per = {"base": {}, "own": {}, "family_mix": {}}
    tmp = Path(tempfile.mkdtemp())
    for fam, tasks in fams.items():
        for t in tasks[: a.tasks_per_family]:
            ex = load_examples(bank / "bank" / t / "test.jsonl", limit=a.n)
            for system, ad in [("base", None), ("own", bank / "bank" / t),
                               ("family_mix", family_mix(bank, t, tasks, tmp / t) if len(tasks) > 1 else None)]:
                if system == "family_mix" and ad is None:
                    continue
                if not table.done(t, system):
                    s = evaluate_adapter(None, ad, ex, model=model, tokenizer=tok, max_new_tokens=24)
                    r = table.add(t, system, s)
                    with open(side, "a") as fh:
                        fh.write(json.dumps({"task": t, "system": system, "rougeL": s["rougeL"].tolist()}) + "\n")
                    ex_scores[(t, system)] = s["rougeL"]
                    print(f"{t:22s} {system:11s} rougeL {r['rougeL']:.3f} exact {r['exact']:.3f}  e.g. {s['predictions'][0]!r} vs {ex[0]['output'][0]!r}", flush=True)
                per[system][t] = {"rougeL": ex_scores[(t, system)]}
    print(f"{'family':18s} " + " ".join(f"{k:>10s}" for k in per))
    for fam, tasks in fams.items():
        vals = [np.mean([per[k][t]["rougeL"].mean() for t in tasks if t in per[k]]) if any(t in per[k] for t in tasks) else float("nan") for k in per]
        print(f"{fam:18s} " + " ".join(f"{v:10.3f}" for v in vals))
    for system, d in per.items():
        if d:
            s = summarize(d)
            e = s["evaluate_style"]
            print(f"{system:11s} mean rougeL over {s['tasks']} tasks {s['mean_over_tasks']:.3f} "
                  f"CI95 over tasks [{s['ci95_over_tasks'][0]:.3f}, {s['ci95_over_tasks'][1]:.3f}]; "
                  f"evaluate-style (BCa, pooled examples) [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
