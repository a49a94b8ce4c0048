"""The README's two opening commands are the project's contract with a newcomer and with CI."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no code block"
    first = [ln.strip() for ln in blocks[0].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return first


def test_readme_opens_with_demo_and_test_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("loramix demo"), cmds[0]
    assert "pytest" in cmds[1], cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_cmd = _readme_commands()[1]
    assert test_cmd in [ln.strip() for ln in ci], f".ci/run does not run the README's test command: {test_cmd}"
