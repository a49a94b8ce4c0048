"""Outputs that fit the tools users already run: a base model reference that resolves from any
folder (PEFT's AutoPeftModelForCausalLM loads it), cards the Hub parses the way PEFT's own card
parses, and recipes that make an adapter again bit for bit."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import _tiny
from loramix.bank.bank import Bank, build_bank
from loramix.pipeline import generate

HUB_ID = "tiny-org/tiny-mistral"


def _rebased(w, root, base_ref: str):
    """A copy of the tiny bank whose members name their base model ``base_ref`` (as the mini
    bank's ``../../base``), with the base model at ROOT/base."""
    shutil.copytree(w.model, root / "base")
    for name, d in w.members.items():
        dst = root / "bank" / name
        shutil.copytree(d, dst)
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = base_ref
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    build_bank(root / "bank", root / "base" / "tokenizer.json")
    return root / "bank"


@pytest.fixture(scope="module")
def relbank(w, tmp_path_factory):
    return _rebased(w, tmp_path_factory.mktemp("rel"), "../../base")


@pytest.fixture(scope="module")
def hubbank(w, tmp_path_factory):
    return _rebased(w, tmp_path_factory.mktemp("hub"), HUB_ID)


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(_tiny.INPUT_IDS)).logits.double().numpy()


def test_relative_base_becomes_absolute_and_loads_from_another_folder(w, relbank, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    assert Bank.open(relbank).base_model == "../../base"   # what the members say
    out = tmp_path / "out"
    generate(w.queries["animals_q"], relbank, out, mode="concat")
    base = os.path.abspath(relbank.parent / "base")
    cfg = json.loads((out / "adapter_config.json").read_text())
    prov = json.loads((out / "loramix.json").read_text())
    assert cfg["base_model_name_or_path"] == base and prov["base_model"] == base
    assert prov["bank_base_model"] == "../../base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)   # PEFT resolves the base against the working directory
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    np.testing.assert_array_equal(_logits(auto), _tiny.logits_adapter(relbank.parent / "base", out))
    assert not np.array_equal(_logits(auto), _tiny.logits_base(relbank.parent / "base"))   # the LoRA is on


def test_shipped_bank_outputs_load_from_another_folder(tmp_path, monkeypatch):
    """The issue's case: the mini bank indexed in the cache (members symlinked) names ../../base."""
    from peft import AutoPeftModelForCausalLM
    from loramix.evaluation.bankpaths import default_bank_root, resolve_bank, train_split

    bp = resolve_bank("default", cache=tmp_path / "cache")
    bank = Bank.open(bp.bank)
    task = bank.members[0]
    out = tmp_path / "out"
    generate(train_split(task.path), bank, out, exclude=[task.name], top_k=4)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(default_bank_root() / "base")
    monkeypatch.chdir(tmp_path / "cache")
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(auto).__name__ == "PeftModelForCausalLM" and auto.peft_config["default"].r == cfg["r"]


def test_hub_id_kept_and_override(w, hubbank, relbank, tmp_path, monkeypatch):
    res = generate(w.queries["music_q"], hubbank, tmp_path / "hub")
    assert json.loads((res.out / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    # an override: a Hub id as given, a folder as an absolute path
    generate(w.queries["music_q"], relbank, tmp_path / "o1", base_model="someone/other-base")
    assert json.loads((tmp_path / "o1" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "someone/other-base"
    monkeypatch.chdir(relbank.parent)
    generate(w.queries["music_q"], relbank, tmp_path / "o2", base_model="base")
    assert json.loads((tmp_path / "o2" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        os.path.abspath(relbank.parent / "base")
    r = _tiny.run_cli("generate", w.queries["music_q"], "--bank", relbank, "-o", tmp_path / "o3",
                      "--base-model", "someone/cli-base", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o3" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "someone/cli-base"


def test_card_matches_what_peft_writes(w, hubbank, tmp_path, monkeypatch):
    """Parsed with huggingface_hub's ModelCard, our card carries PEFT's own metadata (PEFT's card
    of the same adapter, saved by PEFT, is the reference) plus the provenance."""
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    res = generate(w.queries["animals_q"], hubbank, out, top_k=2)
    ours = ModelCard.load(out / "README.md")
    # PEFT's card for the same adapter: the base model found under its Hub id (a local folder here)
    (tmp_path / HUB_ID).parent.mkdir(parents=True)
    shutil.copytree(w.model, tmp_path / HUB_ID)
    monkeypatch.chdir(tmp_path)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HUB_ID), str(out))
    pm.save_pretrained(str(tmp_path / "peft-saved"))
    ref = ModelCard.load(tmp_path / "peft-saved" / "README.md")
    for key in ("library_name", "base_model", "pipeline_tag"):
        assert ref.data.get(key) is not None and ours.data.get(key) == ref.data.get(key), key
    assert set(ref.data.tags) <= set(ours.data.tags) and "loramix" in ours.data.tags
    assert f"base_model:adapter:{HUB_ID}" in ours.data.tags
    # provenance stays: members and weights, metric, bank hash
    prov = json.loads((out / "loramix.json").read_text())
    for m, wt in res.top(2):
        assert f"| {m} | {wt:.6f} |" in ours.text
    assert prov["bank_hash"] in ours.text and f"`{prov['metric']}`" in ours.text


def test_card_with_a_local_base_names_no_hub_model(w, relbank, tmp_path):
    from huggingface_hub import ModelCard

    generate(w.queries["animals_q"], relbank, tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model is None   # the Hub rejects a path there
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert sorted(card.data.tags) == ["lora", "loramix", "transformers"]
    assert os.path.abspath(relbank.parent / "base") in card.text and "--base-model" in card.text


@pytest.mark.parametrize("kw", [dict(mode="factors"), dict(mode="svd", rank=2, top_k=3, dtype="bf16"),
                                dict(mode="concat", pipeline="attentional", metric="kl", temperature=0.5)])
def test_recipe_replays_bit_for_bit(w, relbank, tmp_path, kw):
    from loramix.recipe import replay

    out = tmp_path / "orig"
    generate(w.queries["animals_q"], relbank, out, exclude=["m1"], **kw)
    res, check = replay(out / "loramix.json", tmp_path / "again")
    a, b = ((d / "adapter_model.safetensors").read_bytes() for d in (out, tmp_path / "again"))
    assert a == b and check["identical"] is True and res.status == "generated"
    assert (tmp_path / "again" / "adapter_config.json").read_bytes() == (out / "adapter_config.json").read_bytes()


def test_recipe_of_a_batch_member_and_cli(w, relbank, tmp_path):
    qs = [w.queries["animals_q"], w.queries["music_q"]]
    generate(qs, relbank, tmp_path / "batch", top_k=3)
    src = tmp_path / "batch" / "music_q" / "loramix.json"
    assert json.loads(src.read_text())["recipe"]["index"] == 1
    r = _tiny.run_cli("generate", "--from", src, "-o", tmp_path / "again", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["identical"] is True
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "batch" / "music_q" / "adapter_model.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no staging left
    # a missing recipe and a changed bank are refused, naming the file
    r = _tiny.run_cli("generate", "--from", tmp_path / "nope" / "loramix.json", "-o", tmp_path / "x")
    assert r.returncode == 1 and "nope/loramix.json: no such file" in r.stderr
    from loramix.recipe import RecipeError, replay

    prov = json.loads(src.read_text())
    prov["recipe"]["bank_hash"] = "0" * 64
    (tmp_path / "stale.json").write_text(json.dumps(prov))
    with pytest.raises(RecipeError, match="stale.json: the bank .* changed since"):
        replay(tmp_path / "stale.json", tmp_path / "y")
    assert not (tmp_path / "y").exists()
