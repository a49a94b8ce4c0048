"""A mini bank of *real* tasks: a folder of task files instead of the synthetic suite.

``python -m loramix.minibank build --tasks DIR -o OUT [--scale tiny]``: every ``DIR/<name>.jsonl``
(Lots-of-LoRAs layout: ``{"input": prompt, "output": [answer, ...]}``) becomes one bank member.
Its examples are split deterministically (a seeded shuffle) into test / valid / train; the tiny
Mistral-architecture base is pre-trained on all tasks' *training* text (language-model loss on
every token), then one PEFT LoRA per task, exactly as :func:`loramix.minibank.build.build` does for
the synthetic suite. Families are the tasks' main categories from ``tasks.json`` (next to the
files or one folder up) when there is one.

Prompts longer than ``max_tokens`` keep their last tokens (the example and the answer; the start
of a long task definition is what goes). The suite records the sha256 of every task file, so the
build's fingerprint changes with the data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from loramix.bank.integrity import file_sha256
from loramix.minibank.suite import seed_for

#: the full build: under an hour on 2 cores for ~100 tasks with ``--jobs 2`` (docs/evaluation.md)
FULL = {
    "seed": 2507_01806,
    "splits": {"test": 16, "valid": 8},           # the rest of each task's examples is train
    "tokenizer": {"vocab_size": 2048, "min_frequency": 2},
    "model": {"hidden_size": 160, "intermediate_size": 448, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 40,
              "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": True},
    "max_tokens": 384,
    "base_training": {"steps": 1000, "batch_size": 16, "lr": 3e-3, "warmup": 100, "weight_decay": 0.01},
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"],
             "init_seed": 0, "steps": 80, "batch_size": 8, "lr": 5e-3, "warmup": 8},
    "threads": 1,
}


def tasks_suite(tasks_dir, *, scale: str = "full", labels=None) -> dict:
    """The suite dict of a task folder (``scale="tiny"``: 4 tasks, 2 categories where possible,
    a very small model and few steps: seconds)."""
    tasks_dir = Path(tasks_dir)
    files = sorted(f for f in tasks_dir.glob("*.jsonl") if f.is_file())
    if not files:
        raise FileNotFoundError(f"{tasks_dir}: no <task>.jsonl files (Lots-of-LoRAs layout: input, output)")
    if labels is None:
        labels = next((c for c in (tasks_dir / "tasks.json", tasks_dir.parent / "tasks.json") if c.is_file()), None)
    cats = {}
    if labels is not None:
        for t in json.loads(Path(labels).read_text()):
            if isinstance(t, dict) and t.get("name") and t.get("categories"):
                cats[t["name"]] = str(t["categories"][0])
    names = [f.stem for f in files]
    if scale == "tiny":   # two tasks of each of the first two categories (file order)
        by_cat: dict[str, list[str]] = {}
        for n in names:
            by_cat.setdefault(cats.get(n, "tasks"), []).append(n)
        pick = [n for c in list(by_cat)[:2] for n in by_cat[c][:2]]
        names = pick if len(pick) >= 2 else names[:4]
    elif scale != "full":
        raise ValueError(f"unknown scale {scale!r} (expected full or tiny)")
    s = json.loads(json.dumps(FULL))
    fams: dict[str, list] = {}
    for n in names:
        fams.setdefault(cats.get(n, "tasks"), []).append({"name": n})
    s.update(name=f"tasks-{tasks_dir.name}" + ("-tiny" if scale == "tiny" else ""), tasks_dir=str(tasks_dir),
             task_files={n: {"file": f"{n}.jsonl", "sha256": file_sha256(tasks_dir / f"{n}.jsonl")} for n in names},
             families=[{"name": c, "tasks": ts} for c, ts in fams.items()])
    if scale == "tiny":
        s["splits"] = {"test": 4, "valid": 2}
        s["model"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
        s["max_tokens"] = 192
        s["tokenizer"]["vocab_size"] = 400
        s["base_training"].update(steps=6, batch_size=8, warmup=2)
        s["lora"].update(steps=4, batch_size=4, warmup=1)
    return s


def task_specs(suite: dict) -> list[dict]:
    """One spec per task: ``name``, ``family`` (its category)."""
    return [{"name": t["name"], "family": f["name"], "op": "real"} for f in suite["families"] for t in f["tasks"]]


def split_task(suite: dict, name: str) -> dict[str, list[dict]]:
    """``{"train", "valid", "test"}`` rows of one task: a seeded shuffle of its file's examples,
    test and valid first (``suite["splits"]``), the rest train."""
    path = Path(suite["tasks_dir"]) / suite["task_files"][name]["file"]
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {i} is not JSON ({e})") from None
                out = r.get("output")
                if not isinstance(r.get("input"), str) or not out:
                    raise ValueError(f"{path}: line {i} lacks 'input' (a string) or 'output' (a list)")
                rows.append({"input": r["input"], "output": out if isinstance(out, list) else [out]})
    n_test, n_valid = suite["splits"]["test"], suite["splits"]["valid"]
    if len(rows) < n_test + n_valid + 2:
        raise ValueError(f"{path}: {len(rows)} examples; at least {n_test + n_valid + 2} are needed")
    random.Random(seed_for(suite["seed"], "split", name)).shuffle(rows)
    return {"train": rows[n_test + n_valid:], "valid": rows[n_test:n_test + n_valid], "test": rows[:n_test]}


def pretrain_corpus(data: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Every training example of every task as one line ``prompt + " " + answer`` (task order)."""
    return [r["input"].rstrip() + " " + r["output"][0] for name in data for r in data[name]["train"]]
