"""``loramix demo``: the built-in default job, on the mini bank shipped with the package.

One task of the bank is held out: its own adapter (and any member trained on the same data) is
left out, and an adapter for its training split is mixed from the other members with the
default pipeline, without any training. The demo prints the top contributing members and
where the adapter went; with the evaluation extra installed (torch, transformers, peft) it also
scores the base model, the generated adapter and the task's own (trained) adapter on the first
examples of the task's test split.

Nothing is written inside the package folder (it may be read-only): a bank without
``bank.json`` is indexed into ``$LORAMIX_CACHE`` (default ``~/.cache/loramix``).
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable

from loramix import weights as wts
from loramix.evaluation import loo as eval_loo

DEFAULT_TASK = "tail_tool_1"   # a task with the median leave-one-out gain (docs/evaluation.md)
DEFAULT_OUT = "loramix-demo-adapter"
DEFAULT_PIPELINE = wts.DEFAULT_PIPELINE   # what `loramix generate` uses
DEFAULT_METRIC = wts.DEFAULT_METRIC
DEFAULT_TEMPERATURE = 0.25   # chosen on the valid split (docs/evaluation.md); the paper uses 1
DEFAULT_EXAMPLES = 24


def default_root() -> Path:
    """The shipped mini bank (``loramix/minibank/shipped``)."""
    return eval_loo.default_bank_root()


def eval_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "peft", "numba"))


def _table(headers, rows, aligns) -> list[str]:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def fmt(r):
        return "  ".join(c.rjust(w) if a == ">" else c.ljust(w) for c, w, a in zip(r, widths, aligns)).rstrip()
    return ["  " + fmt(cells[0]), "  " + "  ".join("-" * w for w in widths)] + ["  " + fmt(r) for r in cells[1:]]


def run_demo(task: str | None = None, out=DEFAULT_OUT, *, bank_root=None, evaluate: bool = True,
             overwrite: bool = False, examples: int = DEFAULT_EXAMPLES, top: int = 5,
             pipeline: str = DEFAULT_PIPELINE, metric: str = DEFAULT_METRIC,
             temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None, cache=None,
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo; returns what it printed as data (``--json``)."""
    from loramix.bank.bank import Bank
    from loramix.mixing.output import check_output
    from loramix.pipeline import generate

    t0 = time.time()
    root = Path(bank_root) if bank_root else default_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the default mini bank is not in this install ({root}); "
                                "pass --bank-root DIR or build one: python -m loramix.minibank build -o DIR")
    bp = eval_loo.resolve_bank(root, cache=cache)
    bank = Bank.open(bp.bank)
    with_test = [m.name for m in bank.members if eval_loo.test_split(m.path) is not None]
    if task is None:
        task = DEFAULT_TASK if DEFAULT_TASK in with_test else (with_test or bank.names)[0]
    if task not in bank.names:
        raise ValueError(f"no task {task!r} in the bank; tasks: {', '.join(bank.names)}")
    member = bank.members[bank.index(task)]
    train = eval_loo.train_split(member.path)
    if train is None:
        raise ValueError(f"task {task!r} has no training data in the bank")
    out = Path(out)
    check_output(out, bank, overwrite)   # refuse before any work
    families = {t: v.get("family") for t, v in (bp.manifest or {}).get("tasks", {}).items()}
    metric = wts.resolve_metric(metric)   # the default hybrid needs the encoder weights: js without them

    echo(f"loramix demo: a LoRA for the held-out task '{task}', mixed from the other "
         f"{len(bank.members) - 1} adapters of the mini bank, without training "
         f"({pipeline} pipeline, {metric} distance, T={temperature:g}"
         + (f", top-{top_k}" if top_k else "") + ")")
    res = generate(train, bank, out, pipeline=pipeline, metric=metric, temperature=temperature,
                   top_k=top_k, exclude=[task], leave_one_out=True, overwrite=overwrite)
    doc = {"task": task, "out": str(res.out), "pipeline": pipeline, "metric": metric,
           "temperature": temperature, "top_k": top_k, "top": []}
    echo("")
    echo(f"Top contributors (of {int((res.weights > 0).sum())} with weight > 0):")
    rows = []
    for i, (name, w) in enumerate(res.top(top), 1):
        d = float(res.distances[bank.index(name)]) if res.distances is not None else float("nan")
        same = families.get(name) is not None and families.get(name) == families.get(task)
        rows.append([i, name, f"{w:.3f}", f"{d:.4f}"] + (["yes" if same else ""] if families else []))
        doc["top"].append({"member": name, "weight": w, "distance": d,
                           **({"same_family": same} if families else {})})
    echo("\n".join(_table(["#", "member", "weight", metric] + (["same family"] if families else []),
                          rows, [">", "<", ">", ">", "<"])))
    if families.get(task):
        fam = [i for i, m in enumerate(bank.names) if m != task and families.get(m) == families[task]]
        mass = float(res.weights[fam].sum())
        doc["family_weight"] = mass
        echo(f"  {mass:.0%} of the weight is on the {len(fam)} other '{families[task]}' task(s), "
             f"{len(fam)} of the {len(bank.members) - 1} members.")
    rank = max(res.ranks.values()) if res.ranks else None
    echo("")
    echo(f"Adapter written to {res.out} (PEFT LoRA, rank {rank}, mode {res.mode}); "
         f"`loramix explain {res.out}` shows all weights.")

    if evaluate and not eval_available():
        echo("(install the evaluation extra to also score it: pip install 'loramix[eval]')")
    elif evaluate:
        doc["eval"] = _evaluate(bp, task, res.out, member.path, examples, echo)
    doc["seconds"] = round(time.time() - t0, 1)
    echo(f"\nDone in {doc['seconds']:.0f}s.")
    return doc


def _evaluate(bp, task, adapter, task_adapter, n: int, echo) -> dict:
    from loramix.evaluation import generation as ev

    test = eval_loo.test_split(Path(task_adapter))
    if test is None or bp.base is None:
        echo("(no test split or base model for this task: nothing to score)")
        return {}
    exs = ev.load_examples(test, limit=n)
    model, tok = eval_loo.load_base(bp.base)
    preds, _ = eval_loo.predict_systems(model, tok, exs, {"generated": adapter, "task-lora": task_adapter},
                                        max_new_tokens=24)
    refs = [e["output"] for e in exs]
    labels = {"base": "base model", "generated": "generated (held out, no training)",
              "task-lora": "task-trained LoRA (upper bound)"}
    scores = {k: ev.score(preds[k], refs) for k in labels}
    echo("")
    echo(f"On the first {len(exs)} examples of {task}'s test split (greedy decoding):")
    echo("\n".join(_table(["system", "Rouge-L", "exact match"],
                          [[labels[k], f"{scores[k]['rougeL'].mean():.3f}", f"{scores[k]['exact'].mean():.3f}"]
                           for k in labels], ["<", ">", ">"])))
    e0 = exs[0]
    prompt = e0["input"].replace("\n", " | ")
    echo(f"\n  e.g. {prompt}")
    echo(f"       reference: {e0['output'][0]!r}; base: {preds['base'][0]!r}; "
         f"generated: {preds['generated'][0]!r}; task LoRA: {preds['task-lora'][0]!r}")
    return {k: {"rougeL": float(scores[k]["rougeL"].mean()), "exact": float(scores[k]["exact"].mean()),
                "n": len(exs)} for k in labels}
