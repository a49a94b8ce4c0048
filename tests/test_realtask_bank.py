"""``python -m loramix.minibank build --tasks DIR``: a real-task mini bank, deterministic, in the
layout leave-one-out reads (tiny scale: seconds)."""
from __future__ import annotations

import json

import pytest


def _task_folder(root):
    d = root / "tasks"
    d.mkdir(parents=True)
    labels = []
    specs = {"Question Generation": ["qg_a", "qg_b", "qg_c"], "Summarization": ["sum_a", "sum_b"]}
    for cat, names in specs.items():
        for k, n in enumerate(names):
            rows = [{"input": f"Definition: {cat.lower()} task {k}.\n\nNow complete the following example -\n"
                              f"Input: item {i} of {n} with words {i * 7 % 13}\nOutput: ",
                     "output": [f"answer {i % 5} {cat.split()[0].lower()}"]} for i in range(20)]
            (d / f"{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            labels.append({"name": n, "categories": [cat], "sources": [n]})
    (root / "tasks.json").write_text(json.dumps(labels))
    return d, specs


def test_tasks_bank_tiny_is_deterministic_and_complete(tmp_path):
    from loramix.minibank.__main__ import main
    from loramix.minibank.build import MANIFEST, file_hashes
    from loramix.minibank.realtasks import tasks_suite

    d, specs = _task_folder(tmp_path)
    s = tasks_suite(d, scale="tiny")
    want = specs["Question Generation"][:2] + specs["Summarization"][:2]
    assert [t["name"] for f in s["families"] for t in f["tasks"]] == want
    for out, jobs in (("a", "1"), ("b", "2")):   # the LoRAs in one process, then in two
        assert main(["build", "--tasks", str(d), "-o", str(tmp_path / out), "--scale", "tiny", "--jobs", jobs]) == 0
    ma = json.loads((tmp_path / "a" / MANIFEST).read_text())
    mb = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert ma["files"] == mb["files"] == file_hashes(tmp_path / "a")   # byte-identical rebuild, whatever --jobs
    assert ma["suite_fingerprint"] == mb["suite_fingerprint"]
    assert {t: v["family"] for t, v in ma["tasks"].items()} == {
        "qg_a": "Question Generation", "qg_b": "Question Generation", "sum_a": "Summarization", "sum_b": "Summarization"}
    cfg = json.loads((tmp_path / "a" / "base" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"]
    # splits: disjoint, together exactly the task file's examples
    src = [json.loads(x) for x in (d / "qg_a.jsonl").read_text().splitlines()]
    got = []
    for split, n in (("test", 4), ("valid", 2), ("train", 14)):
        rows = [json.loads(x) for x in (tmp_path / "a" / "bank" / "qg_a" / f"{split}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        got += rows
    key = lambda r: r["input"]   # noqa: E731
    assert sorted(got, key=key) == sorted(src, key=key)
    adapter = json.loads((tmp_path / "a" / "bank" / "qg_a" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["base_model_name_or_path"] == "../../base"


def test_tasks_suite_errors_name_the_folder(tmp_path):
    from loramix.minibank.realtasks import split_task, tasks_suite

    with pytest.raises(FileNotFoundError, match="no <task>.jsonl"):
        tasks_suite(tmp_path)
    (tmp_path / "t.jsonl").write_text(json.dumps({"input": "x", "output": ["y"]}) + "\n")
    s = tasks_suite(tmp_path)
    with pytest.raises(ValueError, match="t.jsonl: 1 examples; at least"):
        split_task(s, "t")
