"""The mini-bank suite, builder determinism, and the shipped default bank against its manifest."""
from __future__ import annotations

import json

import pytest

from loramix.minibank import DEFAULT_DIR
from loramix.minibank.build import MANIFEST, file_hashes, scaled_suite
from loramix.minibank.suite import generate_pretrain, generate_task, load_suite, suite_fingerprint, task_specs

SUITE = load_suite("default")


def test_default_suite_shape():
    specs = task_specs(SUITE)
    fams = {s["family"] for s in specs}
    assert len(specs) >= 48 and len(fams) >= 8
    for f in fams:
        assert sum(s["family"] == f for s in specs) >= 4
    instructions = [s["instruction"] for s in specs]
    assert len(set(instructions)) == len(instructions)
    # the pre-training corpus never shows a task instruction
    corpus = "\n".join(generate_pretrain(SUITE, 2000))
    assert not any(i in corpus for i in instructions)


@pytest.mark.parametrize("spec", task_specs(SUITE)[::5], ids=lambda s: s["name"])
def test_task_data_format_and_splits(spec):
    d = generate_task(SUITE, spec)
    assert {k: len(v) for k, v in d.items()} == SUITE["splits"]
    for rows in d.values():
        for r in rows:
            assert set(r) == {"input", "output"} and isinstance(r["input"], str)
            assert isinstance(r["output"], list) and len(r["output"]) == 1 and r["output"][0]
            assert r["input"].startswith(spec["instruction"]) and r["input"].endswith("\nOutput:")
    test_inputs = {r["input"] for r in d["test"]}
    if spec["op"] == "lookup":  # test asks about words never seen in training
        words = lambda rows: {r["input"].split("Input: ")[1] for r in rows}  # noqa: E731
        assert not words(d["test"]) & words(d["train"])
    else:
        assert not test_inputs & {r["input"] for r in d["train"]}
    assert generate_task(SUITE, spec) == d  # pure function of the suite


def test_tiny_build_is_deterministic(tmp_path):
    import peft  # noqa: F401
    from loramix.minibank.build import build

    m1 = build("default", tmp_path / "a", scale="tiny")
    m2 = build("default", tmp_path / "b", scale="tiny")
    assert m1["files"] == m2["files"]
    assert m1["suite_fingerprint"] == suite_fingerprint(scaled_suite(SUITE, "tiny"))
    for t in m1["tasks"]:
        for f in ("adapter_config.json", "adapter_model.safetensors", "train.jsonl", "valid.jsonl", "test.jsonl"):
            assert f"bank/{t}/{f}" in m1["files"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert f"base/{f}" in m1["files"]
    cfg = json.loads((tmp_path / "a" / "bank" / t / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "../../base" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert cfg["target_modules"] == ["k_proj", "q_proj", "v_proj"]


# --- the shipped bank ---------------------------------------------------------------------------

shipped = pytest.mark.skipif(not (DEFAULT_DIR / MANIFEST).exists(), reason="default bank not built")


@shipped
def test_shipped_bank_matches_manifest():
    man = json.loads((DEFAULT_DIR / MANIFEST).read_text())
    assert file_hashes(DEFAULT_DIR) == man["files"]  # no file added, lost or changed


@shipped
def test_shipped_manifest_matches_builder_spec():
    man = json.loads((DEFAULT_DIR / MANIFEST).read_text())
    assert man["suite"] == SUITE["name"] and man["scale"] == "full"
    assert man["suite_fingerprint"] == suite_fingerprint(SUITE)
    assert man["seed"] == SUITE["seed"]
    assert man["config"] == {k: SUITE[k] for k in ("splits", "tokenizer", "model", "base_training", "lora")}
    specs = task_specs(SUITE)
    assert sorted(man["tasks"]) == sorted(s["name"] for s in specs)
    assert {s["name"]: s["family"] for s in specs} == {t: v["family"] for t, v in man["tasks"].items()}


@shipped
@pytest.mark.parametrize("spec", task_specs(SUITE)[::7], ids=lambda s: s["name"])
def test_shipped_data_is_what_the_suite_generates(spec):
    d = generate_task(SUITE, spec)
    for split, rows in d.items():
        path = DEFAULT_DIR / "bank" / spec["name"] / f"{split}.jsonl"
        assert [json.loads(x) for x in path.read_text().splitlines()] == rows


@shipped
def test_shipped_adapter_loads_with_peft():
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(DEFAULT_DIR / "base", dtype=torch.float32)
    task = task_specs(SUITE)[0]["name"]
    pm = PeftModel.from_pretrained(base, str(DEFAULT_DIR / "bank" / task))
    n = sum(1 for k, _ in pm.named_parameters() if "lora_" in k)
    assert n == 2 * 3 * SUITE["model"]["num_hidden_layers"]


@shipped
def test_shipped_tokenizer_is_what_the_suite_trains():
    from loramix.minibank.build import _train_tokenizer

    specs = task_specs(SUITE)
    corpus = generate_pretrain(SUITE, SUITE["pretrain"]["lines"])
    texts = corpus + [r["input"] + " " + r["output"][0]
                      for s in specs for r in generate_task(SUITE, s)["train"]]
    tok = json.loads(_train_tokenizer(texts, SUITE["tokenizer"]).to_str())
    shipped = json.loads((DEFAULT_DIR / "base" / "tokenizer.json").read_text())
    assert tok["model"]["vocab"] == shipped["model"]["vocab"]
    assert tok["model"]["merges"] == shipped["model"]["merges"]


@shipped
def test_shipped_task_lora_beats_base():
    import peft  # noqa: F401
    from loramix.evaluation.generation import evaluate_adapter, load_base, load_examples

    model, tok = load_base(DEFAULT_DIR)
    task = "last_fruit_1"
    ex = load_examples(DEFAULT_DIR / "bank" / task / "test.jsonl", limit=16)
    base = evaluate_adapter(None, None, ex, model=model, tokenizer=tok, max_new_tokens=8)
    own = evaluate_adapter(None, DEFAULT_DIR / "bank" / task, ex, model=model, tokenizer=tok, max_new_tokens=8)
    assert own["rougeL"].mean() > base["rougeL"].mean() + 0.5
