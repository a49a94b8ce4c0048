"""The bank: build, open, and every bad member named with its problem."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import _tiny
from loramix.bank import bank as bankmod
from loramix.bank.bank import Bank, BankError


@pytest.fixture
def bank_copy(w, tmp_path):
    d = tmp_path / "bank"
    shutil.copytree(w.bank, d)
    return d


def test_open_and_summary(w):
    b = Bank.open(w.bank)
    assert b.names == ["m0", "m1", "m2", "m3"]
    s = b.summary()
    assert s["members"] == 4 and s["rank"] in (2, 4, 8) and s["dtype"] == "F32"
    assert b.base_model == str(w.model)
    doc = json.loads((w.bank / "bank.json").read_text())
    assert set(doc["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(len(m["weights_sha256"]) == 64 for m in doc["members"])
    m2 = b.members[b.index("m2")]
    # rank_pattern and alpha_pattern read as PEFT does
    assert m2.modules["model.layers.1.self_attn.q_proj"].rank == 2
    assert m2.modules["model.layers.1.self_attn.q_proj"].scaling == pytest.approx(8 / 2)
    assert m2.modules["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(4 / 8)
    m1 = b.members[b.index("m1")]
    assert m1.modules["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(16 / 2)  # rsLoRA
    assert b.profiles().shape == (4, b.vocab_size)


def _rewrite(path, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(path))
    save_file(fn(t), str(path))


def test_module_ranks_are_each_members_rank(w, tmp_path):
    """``Bank.module_ranks`` (what ``plan`` reads) against each member's own module spec, for a
    bank opened from its index (members share module tables) and one opened member by member."""
    from loramix.bank import index as bank_index

    for b in (Bank.open(w.bank), _open_without_index(w, tmp_path, bank_index)):
        got = b.module_ranks()
        assert list(got) == list(b.module_index())
        ranks = set()
        for name, holders in b.module_index().items():
            want = [b.members[i].modules[name].rank for i in holders]
            assert got[name].dtype == np.int64 and got[name].tolist() == want
            ranks.update(want)
        assert len(ranks) > 1   # the tiny world's members have different ranks
        assert b.module_ranks() is got


def _open_without_index(w, tmp_path, bank_index):
    root = tmp_path / "noindex"
    shutil.copytree(w.bank, root)
    (root / bank_index.INDEX_NAME).unlink()
    b = Bank.open(root)
    assert b._index is None
    return b


@pytest.mark.parametrize("problem,match", [
    ("base", "base model 'other/base-model'"),
    ("shape", "module model.layers.0.self_attn.q_proj is 32x40"),
    ("corrupt", "unreadable"),
    ("truncated", "unreadable"),
    ("dora", "use_dora"),
    ("bias", "lora_bias"),
    ("no_lora_b", "lacks lora_B"),
])
def test_bad_member_is_named(w, bank_copy, problem, match):
    bad = bank_copy / "zbad"
    shutil.copytree(bank_copy / "m0", bad)
    st = bad / "adapter_model.safetensors"
    cfgp = bad / "adapter_config.json"
    cfg = json.loads(cfgp.read_text())
    if problem == "base":
        cfg["base_model_name_or_path"] = "other/base-model"
    elif problem == "shape":
        _rewrite(st, lambda t: {k: (np.zeros((v.shape[0], 40), np.float32) if "lora_A" in k else v)
                                for k, v in t.items()})
    elif problem == "corrupt":
        st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    elif problem == "truncated":
        data = st.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif problem == "dora":
        cfg["use_dora"] = True
    elif problem == "bias":
        cfg["lora_bias"] = True
    elif problem == "no_lora_b":
        _rewrite(st, lambda t: {k: v for k, v in t.items() if "lora_B" not in k})
    cfgp.write_text(json.dumps(cfg))
    with pytest.raises(BankError, match="zbad") as ei:
        bankmod.build_bank(bank_copy, w.tokenizer)
    assert match in str(ei.value)
    assert "'m0'" not in str(ei.value)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
def test_embedding_lora_is_refused(w, tmp_path):
    d = _tiny.build_adapter(w.model, tmp_path / "bank" / "emb", seed=7, r=2, lora_alpha=2,
                            target_modules=["embed_tokens", "q_proj"])
    _tiny.write_jsonl(d / "dataset.jsonl", _tiny.make_examples("food", 4, 1))
    with pytest.raises(BankError, match="'emb'.*embed"):
        bankmod.build_bank(tmp_path / "bank", w.tokenizer)


def test_open_checks_members_after_build(w, bank_copy):
    # a member replaced after the build by one of another shape: named on open
    _rewrite(bank_copy / "m1" / "adapter_model.safetensors",
             lambda t: {k: (np.zeros((v.shape[0], 40), np.float32) if "lora_A" in k else v) for k, v in t.items()})
    with pytest.raises(BankError, match="'m1'"):
        Bank.open(bank_copy)


def test_missing_and_empty_members_skipped_with_one_warning(w, bank_copy):
    shutil.rmtree(bank_copy / "m1")
    (bank_copy / "m3" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 missing or empty member\(s\): m1, m3") as rec:
        b = Bank.open(bank_copy)
    assert len(rec) == 1
    assert b.names == ["m0", "m2"]


def test_build_skips_empty_member_folders(w, bank_copy):
    (bank_copy / "m3" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 1 member folder.*: m3"):
        doc = bankmod.build_bank(bank_copy, w.tokenizer)
    assert [m["name"] for m in doc["members"]] == ["m0", "m1", "m2"]


@pytest.mark.parametrize("key,value,match", [
    ("init_lora_weights", "pissa_niter_4", "changes the base weights"),
    ("peft_type", "IA3", "not LoRA"),
    ("modules_to_save", ["lm_head"], "modules_to_save"),
])
def test_variant_configs_refused(w, bank_copy, key, value, match):
    cfgp = bank_copy / "m1" / "adapter_config.json"
    cfg = json.loads(cfgp.read_text())
    cfg[key] = value
    cfgp.write_text(json.dumps(cfg))
    with pytest.raises(BankError, match="'m1'.*" + match):
        bankmod.build_bank(bank_copy, w.tokenizer)


def test_member_without_dataset_or_with_profile(w, bank_copy):
    (bank_copy / "m0" / "dataset.jsonl").unlink()   # its saved profile is enough
    doc = bankmod.build_bank(bank_copy, w.tokenizer)
    assert [m["name"] for m in doc["members"]] == ["m0", "m1", "m2", "m3"]
    (bank_copy / "m0" / "profile.npz").unlink()
    with pytest.raises(BankError, match="'m0': no dataset"):
        bankmod.build_bank(bank_copy, w.tokenizer)


def test_member_profile_from_another_tokenizer_is_refused(w, bank_copy, tmp_path):
    other = _tiny.build_tokenizer(tmp_path / "tok2")
    j = json.loads(other.read_text())
    j["model"]["vocab"]["zzz"] = len(j["model"]["vocab"])
    other.write_text(json.dumps(j))
    (bank_copy / "m2" / "dataset.jsonl").unlink()
    with pytest.raises(BankError, match="'m2'.*another tokenizer"):
        bankmod.build_bank(bank_copy, other)
