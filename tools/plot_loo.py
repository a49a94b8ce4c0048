"""Bar chart of a leave-one-out summary (``loramix eval leave-one-out`` → summary.json).

    python tools/plot_loo.py RUN_DIR/summary.json docs/img/loo_minibank.png
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(summary_path: str, png: str) -> None:
    systems = json.load(open(summary_path))["systems"]
    names = list(systems)
    means = [systems[n]["rougeL"][0] for n in names]
    lo = [systems[n]["rougeL"][0] - systems[n]["rougeL"][1] for n in names]
    hi = [systems[n]["rougeL"][2] - systems[n]["rougeL"][0] for n in names]
    colors = ["#999999" if n == "base" else "#2b8a3e" if n == "task-lora" else
              "#bbbbbb" if n in ("uniform",) or n.startswith("nearest") else "#4472c4" for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.2))
    y = range(len(names))[::-1]
    ax.barh(list(y), means, xerr=[lo, hi], color=colors, capsize=2)
    ax.set_yticks(list(y), names)
    ax.axvline(systems["base"]["rougeL"][0], color="#999999", ls=":", lw=1)
    ax.axvline(systems["task-lora"]["rougeL"][0], color="#2b8a3e", ls=":", lw=1)
    ax.set_xlabel("Rouge-L F, mean over held-out tasks (95% bootstrap CI over tasks)")
    ax.set_title("Leave-one-out on the mini bank: generated adapters vs base and task LoRAs")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
