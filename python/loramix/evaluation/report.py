"""Summaries of a leave-one-out run: means with bootstrap CIs, findings, the markdown table."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from loramix import weights as wts
from loramix.evaluation.systems import DEFAULT_METRIC, DEFAULT_PIPELINE, weight_stats


# --------------------------------------------------------------------------- summary

def _ci(vals):
    from loramix.evaluation.generation import bootstrap_ci

    return list(bootstrap_ci(vals))


def load_examples_file(path: Path) -> dict:
    res = {}
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:   # a line cut by an interruption
                    continue
                res[(r["task"], r["system"])] = r
    return res


def summarize_results(out, *, tasks: Sequence[str] | None = None, systems: Sequence[str] | None = None) -> dict:
    """Aggregate ``out/results.csv`` (+ ``examples.jsonl``, ``weights.json``) into
    ``summary.json``-style numbers and write ``out/table.md``. Every system is compared with the
    base model on the tasks both have."""
    from loramix.evaluation.generation import ResultsTable, evaluate_style_ci

    out = Path(out)
    tab = ResultsTable(out / "results.csv")
    examples = load_examples_file(out / "examples.jsonl")
    wfile = out / "weights.json"
    wdoc = json.loads(wfile.read_text()) if wfile.is_file() else {}
    rows: dict[str, dict[str, dict]] = {}
    for (t, s), r in tab.rows.items():
        if (tasks is None or t in tasks) and (systems is None or s in systems):
            rows.setdefault(s, {})[t] = r
    order = list(systems) if systems else list(rows)
    base = rows.get("base", {})
    res = {}
    for s in order:
        per = rows.get(s)
        if not per:
            continue
        ts = sorted(per)
        r_l = [float(per[t]["rougeL"]) for t in ts]
        d = {"tasks": len(ts), "examples": int(sum(int(per[t]["n"]) for t in ts)),
             "rougeL": _ci(r_l),
             "exact": _ci([float(per[t]["exact"]) for t in ts]),
             "subseq": _ci([float(per[t]["subseq"]) for t in ts]),
             "per_task": {t: float(per[t]["rougeL"]) for t in ts}}
        paired = [t for t in ts if t in base]
        if paired:
            d["delta_vs_base"] = _ci([float(per[t]["rougeL"]) - float(base[t]["rougeL"]) for t in paired])
            d["delta_tasks"] = len(paired)
        pooled = [x for t in ts if (t, s) in examples for x in examples[(t, s)]["rougeL"]]
        if pooled:
            d["evaluate_style"] = list(evaluate_style_ci(pooled))
        ws = wdoc.get("weights", {}).get(s)
        if ws:
            st = [weight_stats(np.asarray(ws[t]), wdoc["members"], t, wdoc.get("families"))
                  for t in ts if t in ws]
            d["weights"] = {k: float(np.mean([x[k] for x in st])) for k in st[0]}
        res[s] = d
    fams = wdoc.get("families") or None
    summary = {"systems": res, "findings": _findings(res),
               "by_family": _by_family(res, fams) if fams else None,
               "ci": "percentile bootstrap of the mean over per-task means (10,000 resamples, seed 0)",
               "evaluate_style_ci": "scipy.stats.bootstrap BCa over pooled examples, as HF evaluate "
                                    "reports strategy='bootstrap'; ignores clustering by task"}
    (out / "table.md").write_text(markdown_table(summary) + "\n")
    return summary


def _is_generated(name: str) -> bool:
    """A generated system at the run's settings (not a baseline, not a temperature-sweep variant:
    the headline must not pick its temperature on the test split)."""
    return (name not in ("base", "task-lora", "uniform") and not name.startswith("nearest-")
            and not re.search(r"-T[0-9.e+-]+$", name))


# Below this many held-out tasks a percentile bootstrap over tasks has too few distinct resamples
# (2 tasks: 3 possible means) to support a 95% statement: findings then make no CI claim.
MIN_TASKS_FOR_CI = 10


def _findings(res: dict) -> dict:
    gen = {s: d for s, d in res.items() if _is_generated(s)}
    if not gen or "base" not in res:
        return {}
    best = max(gen, key=lambda s: gen[s]["rougeL"][0])
    b, bl = gen[best]["rougeL"], res["base"]["rougeL"]
    n = min(gen[best]["tasks"], res["base"]["tasks"])
    enough = n >= MIN_TASKS_FOR_CI
    f = {"best_generated": best, "best_rougeL": b[0], "base_rougeL": bl[0], "tasks": n,
         "examples": gen[best].get("examples"), "ci_supported": enough,
         "best_above_base_ci_disjoint": bool(b[1] > bl[2]) if enough else None}
    if "task-lora" in res:
        tl = res["task-lora"]["rougeL"]
        f.update({"task_lora_rougeL": tl[0],
                  "best_below_task_lora_ci_disjoint": bool(b[2] < tl[1]) if enough else None,
                  "gap_closed": (b[0] - bl[0]) / (tl[0] - bl[0]) if tl[0] != bl[0] else None})
        pb, pt = gen[best]["per_task"], res["task-lora"]["per_task"]
        common = [t for t in pb if t in pt]
        if common:   # paired over tasks: task heterogeneity cancels
            f["task_lora_minus_best"] = _ci([pt[t] - pb[t] for t in common])
    if "delta_vs_base" in gen[best]:
        f["best_minus_base"] = gen[best]["delta_vs_base"]
    f.update(_default_vs_paper(res))
    return f


def default_and_paper_systems() -> tuple[str, str]:
    """The names of loramix's generate default and of the paper's pipeline as systems."""
    p = wts.PAPER_DEFAULTS
    return (f"{wts.DEFAULT_PIPELINE}-{wts.DEFAULT_METRIC}-T{wts.DEFAULT_TEMPERATURE:g}",
            f"{p['pipeline']}-{p['metric']}" + ("" if p["temperature"] == 1.0 else f"-T{p['temperature']:g}"))


def _default_vs_paper(res: dict) -> dict:
    """The comparison fixed before the run (no choice on the test split): loramix's default vs
    the paper's pipeline, paired over tasks, and each one's share of the base→task-LoRA gap."""
    dflt, paper = default_and_paper_systems()
    if dflt not in res or paper not in res:
        return {}
    pd, pp = res[dflt]["per_task"], res[paper]["per_task"]
    common = sorted(t for t in pd if t in pp)
    if not common:
        return {}
    f = {"default_system": dflt, "paper_system": paper, "default_vs_paper_tasks": len(common),
         "default_minus_paper": _ci([pd[t] - pp[t] for t in common])}
    if "base" in res and "task-lora" in res:
        pb, pt = res["base"]["per_task"], res["task-lora"]["per_task"]
        both = [t for t in common if t in pb and t in pt]
        gap = float(np.mean([pt[t] - pb[t] for t in both])) if both else 0.0
        if gap:
            f["gap_closed_default"] = float(np.mean([pd[t] - pb[t] for t in both])) / gap
            f["gap_closed_paper"] = float(np.mean([pp[t] - pb[t] for t in both])) / gap
    return f


def _by_family(res: dict, families: dict) -> dict:
    """Mean per-task Rouge-L per family of held-out tasks, per system."""
    out = {}
    for s, d in res.items():
        acc: dict[str, list] = {}
        for t, v in d["per_task"].items():
            if families.get(t):
                acc.setdefault(families[t], []).append(v)
        out[s] = {f: float(np.mean(v)) for f, v in sorted(acc.items())}
    return out


def _fmt_ci(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def markdown_table(summary: dict) -> str:
    res = summary["systems"]
    lines = ["| system | tasks | Rouge-L mean [95% CI over tasks] | EM | subseq | "
             "Δ Rouge-L vs base [95% CI] | Rouge-L, evaluate-style [95% CI over examples] |",
             "|---|---|---|---|---|---|---|"]
    best = summary.get("findings", {}).get("best_generated")
    for s, d in res.items():
        delta = _fmt_ci(d["delta_vs_base"]) if "delta_vs_base" in d and s != "base" else "—"
        es = _fmt_ci(d["evaluate_style"]) if "evaluate_style" in d else "—"
        name = f"**{s}**" if s == best else s
        lines.append(f"| {name} | {d['tasks']} | {_fmt_ci(d['rougeL'])} | {d['exact'][0]:.3f} | "
                     f"{d['subseq'][0]:.3f} | {delta} | {es} |")
    wrows = [(s, d["weights"]) for s, d in res.items() if "weights" in d]
    if wrows:
        fam = any("family_mass" in w for _, w in wrows)
        lines += ["", "Mixing weights (means over held-out tasks): top-1 weight, effective number of "
                  "members 1/Σw²" + (", weight on the held-out task's own family" if fam else "") + ".", "",
                  "| system | top-1 weight | effective members |" + (" own-family weight |" if fam else ""),
                  "|---|---|---|" + ("---|" if fam else "")]
        for s, w in wrows:
            lines.append(f"| {s} | {w['top1']:.3f} | {w['effective_members']:.1f} |"
                         + (f" {w.get('family_mass', float('nan')):.3f} |" if fam else ""))
    bf = summary.get("by_family")
    if bf:
        show = [x for x in ("base", "uniform", f"nearest-{DEFAULT_METRIC}", f"{DEFAULT_PIPELINE}-{DEFAULT_METRIC}",
                            summary.get("findings", {}).get("best_generated"), default_and_paper_systems()[0],
                            "task-lora") if x in bf]
        show = list(dict.fromkeys(show))
        fams = sorted({f for s in show for f in bf[s]})
        lines += ["", "Rouge-L by family of the held-out task (mean over its tasks):", "",
                  "| family | " + " | ".join(show) + " |", "|---|" + "---|" * len(show)]
        for fam in fams:
            lines.append(f"| {fam} | " + " | ".join(f"{bf[s].get(fam, float('nan')):.3f}" for s in show) + " |")
    f = summary.get("findings") or {}
    if f:
        n = f.get("tasks")
        size = f" over {n} held-out task{'s' if n != 1 else ''}" if n is not None else ""
        if f.get("ci_supported", True):
            claim = ("95% CIs " + ("do not overlap" if f["best_above_base_ci_disjoint"]
                                   else "overlap (or it is not above)"))
        else:
            claim = (f"with fewer than {MIN_TASKS_FOR_CI} tasks the intervals below are descriptive only: "
                     "no claim that the difference is real")
        lines += ["", f"Best generated system: **{f['best_generated']}**, Rouge-L {f['best_rougeL']:.3f} "
                  f"vs base {f['base_rougeL']:.3f}{size}"
                  + (f" ({f['examples']} examples)" if f.get("examples") else "") + f": {claim}."]
        if "best_minus_base" in f:
            lines.append(f"Paired over tasks, best generated − base: {_fmt_ci(f['best_minus_base'])}.")
        if "task_lora_minus_best" in f:
            lines.append(f"Paired over tasks, task LoRA − best generated: {_fmt_ci(f['task_lora_minus_best'])}.")
        if "default_minus_paper" in f:
            d = f["default_minus_paper"]
            verdict = ("" if f["default_vs_paper_tasks"] < MIN_TASKS_FOR_CI else
                       "; the CI excludes 0" if d[1] > 0 or d[2] < 0 else "; the CI includes 0")
            shares = "".join(f", {lab} recovers {100 * f[k]:.0f}% of the base→task-LoRA gap"
                             for lab, k in (("the default", "gap_closed_default"), ("the paper's", "gap_closed_paper"))
                             if k in f)
            lines.append(f"loramix's default ({f['default_system']}) − the paper's pipeline ({f['paper_system']}), "
                         f"paired over {f['default_vs_paper_tasks']} tasks: {_fmt_ci(d)}{verdict}{shares}.")
        if "task_lora_rougeL" in f:
            gap = f.get("gap_closed")
            cis = ("" if f["best_below_task_lora_ci_disjoint"] is None else
                   f"; best generated below them with "
                   f"{'disjoint' if f['best_below_task_lora_ci_disjoint'] else 'overlapping'} CIs")
            lines.append(f"Task-trained LoRAs: {f['task_lora_rougeL']:.3f}{cis}; "
                         f"share of the base→task-LoRA gap closed: "
                         f"{'n/a' if gap is None else f'{100 * gap:.0f}%'}.")
    return "\n".join(lines)
