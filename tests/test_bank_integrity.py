"""Bad banks are refused or detected (issue 10, items 5-9): non-finite values, members changed
after the build, paths out of the bank, duplicate members, replaced profiles."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import _tiny
from loramix.bank import integrity
from loramix.bank.bank import Bank, BankError, build_bank
from loramix.pipeline import OutputError, generate


@pytest.fixture
def bank(bank_copy):
    """A private copy of the tiny bank (conftest's ``bank_copy``), free to break."""
    return bank_copy


def _set_value(st, key_part: str, index, value):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(st))
    key = sorted(k for k in t if key_part in k)[0]
    t[key] = t[key].copy()
    t[key][index] = value
    save_file(t, str(st), metadata={"format": "pt"})
    return key


def _doc(bank):
    return json.loads((bank / "bank.json").read_text())


def _write_doc(bank, doc):
    (bank / "bank.json").write_text(json.dumps(doc, indent=1) + "\n")


def _no_output(tmp_path, out):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------- 5. non-finite values

@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_tensor_value_refused_at_build_naming_member_tensor_index(bank, value):
    key = _set_value(bank / "m2" / "adapter_model.safetensors", "lora_B", (3, 1), value)
    with pytest.raises(BankError, match=rf"member 'm2': tensor {key} .* non-finite value at index \[3, 1\]"):
        build_bank(bank, bank / "tokenizer.json")


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
def test_nonfinite_alpha_refused_at_build(bank, field):
    cfg_path = bank / "m0" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if field == "lora_alpha":
        cfg["lora_alpha"] = float("nan")
    else:
        cfg["alpha_pattern"] = {"v_proj": float("inf")}
    cfg_path.write_text(json.dumps(cfg))          # json writes NaN / Infinity, and reads them back
    with pytest.raises(BankError, match=r"member 'm0': module .* scaling (nan|inf)"):
        build_bank(bank, bank / "tokenizer.json")


def test_a_nonfinite_output_is_never_written(w, bank, tmp_path):
    """A bank built before loramix recorded signatures (no weights_sig) whose member got a NaN
    afterwards: the mix would hold NaN; nothing is written."""
    doc = _doc(bank)
    for m in doc["members"]:
        m.pop("weights_sig", None)
    _write_doc(bank, doc)
    _set_value(bank / "m0" / "adapter_model.safetensors", "lora_A", (0, 0), np.nan)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="non-finite value"):
        generate(w.queries["animals_q"], bank, out, mode="factors")
    _no_output(tmp_path, out)
    res = generate(w.queries["animals_q"], bank, out, exclude=["m0"])   # m0 left out: fine
    assert res.weights[0] == 0


# ---------------------------------------------------------------- 6. members verified by content

def test_same_size_replacement_is_detected_at_open(bank):
    m0, m1 = bank / "m0" / "adapter_model.safetensors", bank / "m1" / "adapter_model.safetensors"
    assert m0.stat().st_size == m1.stat().st_size
    shutil.copy2(m0, m1)                            # same size, mtime kept
    with pytest.raises(BankError, match="member 'm1': adapter_model.safetensors changed since the bank was built"):
        Bank.open(bank)


@pytest.mark.parametrize("where", ["flip", "nan"])
def test_verify_reads_every_byte(w, bank, tmp_path, where):
    st = bank / "m3" / "adapter_model.safetensors"
    doc = _doc(bank)
    for m in doc["members"]:       # a change the quick signature cannot see (it covers the edges)
        m.pop("weights_sig", None)
    _write_doc(bank, doc)
    data = bytearray(st.read_bytes())
    i = len(data) // 2
    data[i:i + 4] = np.float32(np.nan).tobytes() if where == "nan" else bytes(b ^ 1 for b in data[i:i + 4])
    st.write_bytes(bytes(data))
    b = Bank.open(bank)
    assert any("member 'm3'" in p for p in integrity.verify(b))
    r = _tiny.run_cli("bank", "verify", bank)
    assert r.returncode == 1 and r.stderr.startswith("loramix: error: bank") and "'m3'" in r.stderr
    with pytest.raises(BankError, match="member 'm3': adapter_model.safetensors differs"):
        generate(w.queries["animals_q"], bank, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists()


def test_verify_passes_on_an_intact_bank_and_provenance_says_so(w, bank, tmp_path):
    r = _tiny.run_cli("bank", "verify", bank, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"bank": str(bank), "members": 4, "ok": True}
    res = generate(w.queries["animals_q"], bank, tmp_path / "v", verify=True)
    assert json.loads((res.out / "loramix.json").read_text())["verified"] is True
    res = generate(w.queries["animals_q"], bank, tmp_path / "n")
    assert "verified" not in json.loads((res.out / "loramix.json").read_text())


def test_build_records_hash_and_signature_of_each_member(w, bank):
    doc = build_bank(bank, bank / "tokenizer.json")
    for m in doc["members"]:
        f = bank / m["path"] / "adapter_model.safetensors"
        assert m["weights_sha256"] == integrity.file_sha256(f)
        assert m["weights_sig"] == integrity.weights_signature(f) and len(m["weights_sig"]) == 64


# ---------------------------------------------------------------- 7. paths stay inside the bank

@pytest.mark.parametrize("key,value", [("path", "/etc"), ("path", "../outside"), ("profile", "../p.npz"),
                                       ("profile", "/tmp/p.npz"), ("dataset", "../d.jsonl")])
def test_bank_json_paths_outside_the_bank_are_refused(bank, tmp_path, key, value):
    outside = tmp_path / "outside"
    shutil.copytree(bank / "m0", outside)
    doc = _doc(bank)
    doc["members"][0][key] = value
    _write_doc(bank, doc)
    with pytest.raises(BankError, match=f"member 'm0': {key} .*not a relative path inside the bank"):
        Bank.open(bank)


def test_symbolic_links_out_of_the_bank_are_refused(w, bank, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(str(bank / "m1"), outside)
    (bank / "m1").symlink_to(outside)
    with pytest.raises(BankError, match="member 'm1': path 'm1' resolves to .*outside the bank"):
        Bank.open(bank)
    with pytest.raises(BankError, match="member 'm1': folder 'm1' resolves to .*outside the bank"):
        build_bank(bank, bank / "tokenizer.json")
    # a profile linked out of the bank (which --metric cosine would rewrite) too
    (bank / "m1").unlink()
    shutil.move(str(outside), bank / "m1")
    shutil.move(str(bank / "m2" / "profile.npz"), tmp_path / "p.npz")
    (bank / "m2" / "profile.npz").symlink_to(tmp_path / "p.npz")
    before = (tmp_path / "p.npz").read_bytes()
    with pytest.raises(BankError, match="member 'm2': profile 'm2/profile.npz' resolves to .*outside"):
        generate(w.queries["animals_q"], bank, tmp_path / "out", metric="cosine")
    assert (tmp_path / "p.npz").read_bytes() == before


def test_tokenizer_file_outside_the_bank_is_refused(bank):
    doc = _doc(bank)
    doc["tokenizer"]["file"] = "../tokenizer.json"
    _write_doc(bank, doc)
    with pytest.raises(BankError, match="tokenizer file '../tokenizer.json' is not a relative path"):
        Bank.open(bank)


# ---------------------------------------------------------------- 8. duplicate members

def test_duplicate_member_names_are_refused(w, bank, tmp_path):
    doc = _doc(bank)
    doc["members"].append(dict(doc["members"][1]))
    _write_doc(bank, doc)
    with pytest.raises(BankError, match="lists member\\(s\\) 'm1' more than once"):
        generate(w.queries["animals_q"], bank, tmp_path / "out", exclude=["m1"])
    r = _tiny.run_cli("bank", "info", bank)
    assert r.returncode == 1 and "more than once" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- 9. replaced profiles

def test_a_replaced_profile_is_refused(w, bank, tmp_path):
    shutil.copyfile(bank / "m1" / "profile.npz", bank / "m0" / "profile.npz")
    out = tmp_path / "out"
    with pytest.raises(BankError, match="member 'm0': profile.npz is of another dataset"):
        generate(w.queries["animals_q"], bank, out)
    _no_output(tmp_path, out)
    build_bank(bank, bank / "tokenizer.json")       # the rebuild makes it right again
    generate(w.queries["animals_q"], bank, out)
    assert os.path.isfile(out / "adapter_model.safetensors")


def test_provenance_records_the_hash_of_every_member_mixed(w, tmp_path):
    """The provenance names what was really mixed: each member with a non-zero weight and the
    SHA-256 of its weights file (computed here from the file itself), and no other member."""
    import hashlib

    from loramix.bank.bank import Bank
    from loramix.pipeline import generate

    bank = Bank.open(w.bank)
    res = generate(w.queries["animals_q"], bank, tmp_path / "out", metric="js", top_k=2)
    prov = json.loads((tmp_path / "out" / "loramix.json").read_text())
    used = [n for n, x in zip(res.members, res.weights) if x != 0]
    assert len(used) == 2 and sorted(prov["members_sha256"]) == sorted(used)
    for name in used:
        f = bank.members[bank.index(name)].path / "adapter_model.safetensors"
        assert prov["members_sha256"][name] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_a_nonfinite_output_in_a_batch_finished_in_threads_is_never_written(w, bank, tmp_path, monkeypatch):
    """Outputs are finished side by side (threads): one output with a NaN fails the whole batch,
    naming that output; nothing is written, not even the other, finite outputs."""
    doc = _doc(bank)
    for m in doc["members"]:
        m.pop("weights_sig", None)
    _write_doc(bank, doc)
    _set_value(bank / "m0" / "adapter_model.safetensors", "lora_A", (0, 0), np.nan)
    monkeypatch.setenv("LORAMIX_NUM_THREADS", "2")
    out = tmp_path / "out"
    qs = [w.queries["animals_q"], w.queries["music_q"]]
    with pytest.raises(OutputError, match="music_q: tensor .* non-finite value"):
        generate(qs, bank, out, exclude=[["m0"], []])
    _no_output(tmp_path, out)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_hash_and_finite_check_in_one_read_agree_with_the_separate_ones(tmp_path, dtype):
    """The output's SHA-256 and its NaN/inf check from one read: the same digest as
    file_sha256, and not finite exactly when first_nonfinite finds a value in some tensor (every
    position class: first, inside, last value of the file; chunks that split no value)."""
    from loramix.core import tensors

    rng = np.random.default_rng(3)
    shapes = [(3, 5), (7,), (64, 33), (1,)]
    for case in range(12):
        vals = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        bad = case % 4   # 0: all finite; 1: first value; 2: inside; 3: the file's last value
        if bad:
            i = {1: 0, 2: 2, 3: 3}[bad]
            vals[i].reshape(-1)[0 if bad == 1 else -1] = [np.nan, np.inf, -np.inf][case % 3]
        name = "x" * (case % 7)   # header lengths of every parity
        path = tmp_path / f"{case}.safetensors"
        with tensors.SafetensorsWriter(path, [(f"t{j}{name}", dtype, s) for j, s in enumerate(shapes)],
                                       {"k": "v" * case}) as wr:
            for j, v in enumerate(vals):
                wr.write(f"t{j}{name}", v)
        f = tensors.SafetensorsFile(path)
        expect = all(integrity.first_nonfinite(f.numpy(k), dtype) is None for k in f.keys())
        for chunk in (8, 64, 1 << 20):
            with open(path, "rb") as fh:
                sha, finite = integrity.safetensors_sha256_finite(fh, dtype, chunk)
            assert sha == integrity.file_sha256(path)
            assert finite is expect and expect is (bad == 0)
        with open(path, "rb") as fh:   # another dtype than the file's: not decided
            assert integrity.safetensors_sha256_finite(fh, "I8")[1] is None
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with open(path, "rb") as fh:
        assert integrity.safetensors_sha256_finite(fh, "BF16") == (integrity.file_sha256(path), None)
