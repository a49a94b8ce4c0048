"""Long property-based fuzz run of loramix's file parsers (the harness in tests/_fuzz.py).

    PYTHONPATH=python python3 tools/fuzz.py --minutes 10                 # every target, random seeds
    PYTHONPATH=python python3 tools/fuzz.py --target safetensors --examples 100000 --seed 7

Targets: safetensors, bank_json, adapter_config, datasets, json_lines, csv_records, json_documents. Each runs hypothesis with a random
seed (or ``--seed``) for its share of ``--minutes`` (or ``--examples`` each), keeps hypothesis'
example database under ``--db`` (default: the temp folder) so a failure found once is replayed
first next time, and prints per target: examples run, accepted/refused counts, and the shrunk
failing input with its traceback if one was found. Exit code 1 when any target failed.
A crash of the process itself (a segfault in the C++ reader) ends the run; its last input is
in ``--db`` and is replayed by the next run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "python"))

CHUNK = 500
TARGETS = ("safetensors", "bank_json", "adapter_config", "datasets", "json_lines", "csv_records", "json_documents")


def _world(scratch: Path):
    """The tiny bank of the test suite (a trained tokenizer, a random Mistral, PEFT adapters)."""
    import _tiny

    class Factory:
        def mktemp(self, name):
            d = scratch / name
            d.mkdir(parents=True, exist_ok=True)
            return d

    return _tiny.world(Factory())


def run_target(name: str, scratch: Path, seconds: float, examples: int, seed, db: Path) -> dict:
    from hypothesis import HealthCheck, given, seed as hseed, settings
    from hypothesis.database import DirectoryBasedExampleDatabase

    import _fuzz

    seen: Counter = Counter()
    if name == "safetensors":
        strat, check = _fuzz.safetensors_bytes(), (lambda x: _fuzz.check_safetensors(x, scratch))
    elif name == "datasets":
        strat, check = _fuzz.dataset_file(), (lambda x: _fuzz.check_dataset(x, scratch))
    elif name == "json_lines":
        strat, check = _fuzz.json_line(), (lambda x: _fuzz.check_json_line(x, scratch))
    elif name == "json_documents":
        strat, check = _fuzz.json_document(), (lambda x: _fuzz.check_json_document(x, scratch))
    elif name == "csv_records":
        strat, check = _fuzz.csv_document(), (lambda x: _fuzz.check_csv_document(x, scratch))
    else:
        w = _world(scratch / "world")
        if name == "bank_json":
            bank = _fuzz.copy_bank(w.bank, scratch / "bank")
            doc = json.loads((bank / "bank.json").read_text())
            strat, check = _fuzz.bank_json_input(doc), (lambda x: _fuzz.check_bank_json(x, bank, scratch))
        else:
            member = _fuzz.copy_bank(w.members["m2"], scratch / "m2")
            base = json.loads((member / "adapter_config.json").read_text())
            strat, check = _fuzz.config_input(base), (lambda x: _fuzz.check_adapter_config(x, member))

    def body(x):
        seen[check(x)] += 1

    deadline = time.monotonic() + seconds    # after the setup (the tiny bank takes a while)

    # rounds of CHUNK examples, each with its own seed, until the time or the examples are spent
    base_seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    t0 = time.monotonic()
    out = {"target": name, "failure": None, "seed": base_seed}
    rnd = 0
    while time.monotonic() < deadline and sum(seen.values()) < examples:
        n = min(CHUNK, examples - sum(seen.values()))
        test = settings(max_examples=n, deadline=None, derandomize=False,
                        database=DirectoryBasedExampleDatabase(str(db / name)), print_blob=True,
                        suppress_health_check=list(HealthCheck))(given(strat)(body))
        try:
            hseed(base_seed + rnd)(test)()
        except Exception:   # noqa: BLE001 - report whatever the shrunk failure raised
            out["failure"] = f"seed {base_seed + rnd}:\n" + traceback.format_exc(limit=8)
            break
        rnd += 1
    out.update(seconds=round(time.monotonic() - t0, 1), examples=sum(seen.values()), **seen)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=TARGETS, action="append", help="default: all")
    ap.add_argument("--minutes", type=float, default=5.0, help="total time, split among the targets")
    ap.add_argument("--examples", type=int, default=10**9, help="at most this many examples per target")
    ap.add_argument("--seed", type=int, default=None, help="default: random")
    ap.add_argument("--db", default=os.path.join(tempfile.gettempdir(), "loramix-fuzz-db"))
    ap.add_argument("--json", default=None, help="write the summary here")
    a = ap.parse_args(argv)
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "loramix-hypothesis"))
    import warnings
    warnings.simplefilter("ignore")
    targets = a.target or list(TARGETS)
    share = a.minutes * 60 / len(targets)
    results = []
    with tempfile.TemporaryDirectory(prefix="loramix-fuzz-") as d:
        for t in targets:
            scratch = Path(d) / t
            scratch.mkdir()
            r = run_target(t, scratch, share, a.examples, a.seed, Path(a.db))
            results.append(r)
            print(f"{t:15s} {r['examples']:7d} examples in {r['seconds']:6.1f} s: "
                  f"{r.get('accepted', 0)} accepted, {r.get('refused', 0)} refused"
                  + ("" if r["failure"] is None else "  FAILED"), flush=True)
            if r["failure"]:
                print(r["failure"], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 1 if any(r["failure"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
