"""``loramix demo`` end to end (subprocess) on a tiny mini bank."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import _tiny

import peft  # noqa: F401  (the test extra installs it; never skip)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_minibank):
    return tiny_minibank


def _listing(d: Path) -> dict:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*"))}


def _demo(args, cwd, cache):
    env = {**os.environ, "PYTHONPATH": str(_tiny.PKG_PARENT), "LORAMIX_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "loramix.cli", "demo", *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def test_demo_end_to_end(tiny, tmp_path):
    before = _listing(tiny)
    r = _demo(["--bank-root", str(tiny), "--task", "second_animal_1", "--examples", "3"], tmp_path, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("loramix demo: a LoRA for the held-out task 'second_animal_1'")
    assert "Top contributors" in out and "second_animal_2" in out and "same family" in out
    assert "of the weight is on the 1 other 'second_animal' task(s), 1 of the 3 members." in out
    adapter = tmp_path / "loramix-demo-adapter"
    assert f"Adapter written to {adapter}" in out
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    prov = json.loads((adapter / "loramix.json").read_text())
    assert prov["weights"]["second_animal_1"] == 0 and "second_animal_1" in prov["exclude"]
    for label in ("base model", "generated (held out, no training)", "task-trained LoRA (upper bound)"):
        assert label in out
    assert "first 3 examples of second_animal_1's test split" in out
    assert r.stderr == ""   # no progress bars or third-party warnings
    assert _listing(tiny) == before   # the bank (in an install: read-only) is never written

    # no clobbering without --overwrite; --json --no-eval for scripts
    again = _demo(["--bank-root", str(tiny), "--task", "second_animal_1"], tmp_path, tmp_path / "cache")
    assert again.returncode == 1 and "exists; pass --overwrite" in again.stderr
    j = _demo(["--bank-root", str(tiny), "--no-eval", "--overwrite", "--json", "--out", "x"], tmp_path,
              tmp_path / "cache")
    assert j.returncode == 0, j.stderr
    doc = json.loads(j.stdout)
    assert doc["task"] in prov["weights"] and doc["out"] == str(tmp_path / "x") and "eval" not in doc
    assert abs(sum(t["weight"] for t in doc["top"]) - 1) < 1e-9   # 3 other members, all listed


def test_demo_without_a_shipped_bank_says_what_to_do(tmp_path):
    r = _demo(["--bank-root", str(tmp_path / "missing")], tmp_path, tmp_path / "cache")
    assert r.returncode == 1 and "python -m loramix.minibank build" in r.stderr


def test_demo_on_the_shipped_bank_without_eval(tmp_path):
    from loramix.demo import DEFAULT_TASK, default_root

    root = default_root()
    assert (root / "bank").is_dir(), f"the default mini bank is missing from {root}"
    before = _listing(root)
    r = _demo(["--no-eval", "--json"], tmp_path, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["task"] == DEFAULT_TASK and doc["family_weight"] > 0.9 and doc["temperature"] == 0.25
    assert (tmp_path / "loramix-demo-adapter" / "adapter_model.safetensors").is_file()
    assert _listing(root) == before


def test_cli_help_states_the_demo_defaults(capsys):
    from loramix import cli, demo

    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {demo.DEFAULT_TASK}" in text and f"default: ./{demo.DEFAULT_OUT}" in text
    assert f"default: {demo.DEFAULT_TEMPERATURE:g}," in text and f"default: {demo.DEFAULT_EXAMPLES})" in text
