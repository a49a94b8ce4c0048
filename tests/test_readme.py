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


def test_readme_api_examples_run_as_doctests(tmp_path, monkeypatch):
    """Every ``>>>`` example of the README runs, on a copy of the shipped mini bank, and prints
    what the README shows (``...`` elides digits, whitespace is normalized)."""
    import doctest
    import shutil

    from loramix.bank.bank import build_bank
    from loramix.minibank import DEFAULT_DIR

    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if b.lstrip().startswith(">>>")]
    assert blocks, "README.md has no >>> examples"
    shutil.copytree(DEFAULT_DIR, tmp_path / "mb")   # bank/ and base/ (members name ../../base)
    build_bank(tmp_path / "mb" / "bank", tmp_path / "mb" / "base" / "tokenizer.json")
    monkeypatch.chdir(tmp_path / "mb")
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs: dict = {}
    for i, block in enumerate(blocks):
        runner.run(parser.get_doctest(block, globs, f"README block {i}", "README.md", 0))
    res = runner.summarize(verbose=False)
    assert res.attempted > 0 and res.failed == 0, f"{res.failed} of {res.attempted} README examples failed (see above)"
