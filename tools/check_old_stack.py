#!/usr/bin/env python3
"""Does a generated adapter load, from another folder, in an older transformers/PEFT?

Run from a loramix checkout (the dev build in python/ or an installed loramix):

    python3 tools/check_old_stack.py [--venv /tmp/loramix-old] [--transformers 4.46.*] [--peft 0.13.2]

1. generates an adapter from the shipped mini bank with this loramix (base model written as an
   absolute path), and the logits of base + adapter here (current transformers + PEFT);
2. in a plain virtual environment with ``torch==2.13.0``, the given transformers and PEFT (created
   on first use, minutes), from another working directory: loads the tokenizer and
   ``AutoPeftModelForCausalLM.from_pretrained(OUT)``, tokenizes the same prompt and computes the
   logits;
3. prints one JSON line: versions, whether the tokenizer gave the same ids, the max |Δ logits|.
Exit 0 when the old stack loads both and the logits match to 1e-4 (bf16 base; float32 compute).
The result of a run is recorded in docs/TOOLS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "Input: apple banana cherry\nOutput:"

OLD_SIDE = r"""
import json, sys, numpy as np, torch, transformers, peft
from transformers import AutoTokenizer
from peft import AutoPeftModelForCausalLM
out, base, prompt = sys.argv[1:4]
res = {"transformers": transformers.__version__, "peft": peft.__version__}
try:
    tok = AutoTokenizer.from_pretrained(base)
    res["ids"] = tok(prompt)["input_ids"]
    res["tokenizer_class"] = type(tok).__name__
except Exception as e:
    res["tokenizer_error"] = f"{type(e).__name__}: {e}"
m = AutoPeftModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
ids = res.get("ids") or json.loads(sys.argv[4])
with torch.no_grad():
    res["logits"] = m(torch.tensor([ids])).logits[0].double().numpy().tolist()
print(json.dumps(res))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default="/tmp/loramix-old")
    ap.add_argument("--transformers", default="4.46.*")
    ap.add_argument("--peft", default="0.13.2")
    a = ap.parse_args()
    import numpy as np
    import torch
    import transformers
    import peft
    from transformers import AutoTokenizer
    from peft import AutoPeftModelForCausalLM
    from loramix.bank.bank import Bank
    from loramix.evaluation.bankpaths import default_bank_root, resolve_bank, train_split
    from loramix.pipeline import generate

    venv = Path(a.venv)
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", f"transformers=={a.transformers}",
                        f"peft=={a.peft}"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bank = Bank.open(resolve_bank("default", cache=tmp / "cache").bank)
        task = bank.members[0]
        out = tmp / "adapter"
        generate(train_split(task.path), bank, out, exclude=[task.name], top_k=4)
        base = str(default_bank_root() / "base")
        tok = AutoTokenizer.from_pretrained(base)
        ids = tok(PROMPT)["input_ids"]
        m = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        with torch.no_grad():
            new = m(torch.tensor([ids])).logits[0].double().numpy()
        (tmp / "elsewhere").mkdir()
        r = subprocess.run([str(py), "-c", OLD_SIDE, str(out), base, PROMPT, json.dumps(ids)],
                           capture_output=True, text=True, cwd=tmp / "elsewhere", env={"PATH": os.environ["PATH"]})
        if r.returncode != 0:
            print(json.dumps({"ok": False, "error": r.stderr.strip().splitlines()[-1:]}))
            return 1
        old = json.loads(r.stdout)
        diff = float(np.abs(np.asarray(old.pop("logits")) - new).max())
        res = {"new": {"transformers": transformers.__version__, "peft": peft.__version__},
               "old": {k: v for k, v in old.items() if k != "ids"}, "same_ids": old.get("ids") == ids,
               "max_abs_logit_diff": diff}
        res["ok"] = bool(res["same_ids"] and diff < 1e-4 and "tokenizer_error" not in old)
        print(json.dumps(res))
        return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
