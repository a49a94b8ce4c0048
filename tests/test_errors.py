"""Hostile or broken inputs end in one clear line, never a traceback or a hang (issue 10 #11-#15).

CLI cases run ``loramix.cli.main([...])`` and check its exit code and its stderr: exactly one
``loramix: error: ...`` line naming the file/member/key and what was expected.
"""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest

import _tiny
from loramix import cli
from loramix.bank.bank import Bank, BankError
from loramix.data import readers
from loramix.pipeline import generate


@pytest.fixture
def bank(bank_copy):
    """A private copy of the tiny bank (conftest's ``bank_copy``), free to break."""
    return bank_copy


def run(capsys, *argv):
    """(exit code, stderr lines) of ``loramix ARGV``; stdout is dropped."""
    rc = cli.main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def one_error(capsys, *argv) -> str:
    rc, err = run(capsys, *argv)
    assert rc != 0, err
    assert len(err) == 1 and err[0].startswith("loramix: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def edit_json(path, fn):
    doc = json.loads(path.read_text())
    doc = fn(doc)
    path.write_text(json.dumps(doc))


# ------------------------------------------------------------------ 11: tracebacks

def test_bank_json_holding_a_list(w, bank, capsys, tmp_path):
    (bank / "bank.json").write_text("[]")
    for argv in (["bank", "info", bank], ["generate", w.queries["animals_q"], "--bank", bank, "-o", tmp_path / "o"]):
        msg = one_error(capsys, *argv)
        assert "bank.json holds list, not a JSON object" in msg and str(bank) in msg
    with pytest.raises(BankError, match="bank.json holds list"):
        Bank.open(bank)


def _zero_rank_member(d, r_config):
    from safetensors.numpy import save_file

    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = r_config
    cfg["rank_pattern"], cfg["alpha_pattern"] = {}, {}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_"
    save_file({key + "A.weight": np.zeros((0, 32), np.float32), key + "B.weight": np.zeros((32, 0), np.float32)},
              str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("r_config", [0, 4])
def test_member_with_rank_zero_tensors(w, bank, capsys, tmp_path, r_config):
    _zero_rank_member(bank / "m0", r_config)
    msg = one_error(capsys, "bank", "build", bank, "--tokenizer", w.tokenizer)
    assert "member 'm0'" in msg
    assert ("r=0" in msg) if r_config == 0 else ("rank" in msg and "at least 1" in msg)


def test_member_with_rank_zero_tensors_at_open(w, bank, capsys, tmp_path):
    _zero_rank_member(bank / "m0", 4)          # bank.json still lists the old member
    msg = one_error(capsys, "generate", w.queries["animals_q"], "--bank", bank, "-o", tmp_path / "o")
    assert "member 'm0'" in msg and "at least 1" in msg


def test_rank_pattern_key_not_a_regex(w, bank, capsys):
    edit_json(bank / "m2" / "adapter_config.json", lambda c: {**c, "rank_pattern": {"q_proj[": 2}})
    msg = one_error(capsys, "bank", "build", bank, "--tokenizer", w.tokenizer)
    assert "member 'm2'" in msg and "rank_pattern key 'q_proj['" in msg and "regular expression" in msg


@pytest.mark.parametrize("content", ['{"model_max_length": 512}', "not json at all", ""])
def test_tokenizer_library_errors_name_the_file(w, bank, capsys, tmp_path, content):
    bad = tmp_path / "base" / "tokenizer_config.json"
    bad.parent.mkdir()
    bad.write_text(content)
    msg = one_error(capsys, "profile", w.queries["animals_q"], "--tokenizer", bad, "-o", tmp_path / "p.npz")
    assert f"tokenizer {bad}: not a tokenizer.json the `tokenizers` library can load" in msg
    # bank build loads the tokenizer before it copies anything in: the message names the user's file
    msg = one_error(capsys, "bank", "build", bank, "--tokenizer", bad)
    assert f"tokenizer {bad}: not a tokenizer.json the `tokenizers` library can load" in msg


# ------------------------------------------------------------------ 12: unclear one-liners

@pytest.mark.parametrize("edit, expect", [
    (lambda d: {k: v for k, v in d.items() if k != "tokenizer"}, "bank.json lacks 'tokenizer' (an object)"),
    (lambda d: {**d, "tokenizer": {k: v for k, v in d["tokenizer"].items() if k != "vocab_size"}},
     "bank.json 'tokenizer' lacks 'vocab_size' (an integer)"),
    (lambda d: {**d, "members": [{k: v for k, v in d["members"][0].items() if k != "path"}] + d["members"][1:]},
     "bank.json member 0 ('m0') lacks 'path' (a string)"),
    (lambda d: {**d, "members": "m0"}, "bank.json has 'members' = 'm0', not a list"),
    (lambda d: {**d, "tokenizer": {**d["tokenizer"], "vocab_size": "big"}}, "'vocab_size' = 'big', not an integer"),
    # found by tools/fuzz.py: a non-string base model crashed the base-model comparison
    (lambda d: {**d, "base_model": True}, "bank.json has 'base_model' = 'True', not a string or null"),
])
def test_bank_json_missing_keys_are_named(w, bank, capsys, tmp_path, edit, expect):
    edit_json(bank / "bank.json", edit)
    for argv in (["bank", "info", bank], ["generate", w.queries["animals_q"], "--bank", bank, "-o", tmp_path / "o"]):
        msg = one_error(capsys, *argv)
        assert expect in msg and str(bank) in msg


def test_profile_header_missing_key(w, capsys, tmp_path):
    from loramix.profiles.tokens import build_profile

    p = build_profile(w.queries["animals_q"], w.tokenizer).save(tmp_path / "q.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(bytes(arrays["header"]).decode())
    del header["vocab_size"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    np.savez(tmp_path / "bad.npz", **arrays)
    msg = one_error(capsys, "generate", tmp_path / "bad.npz", "--bank", w.bank, "-o", tmp_path / "o")
    assert f"profile {tmp_path / 'bad.npz'}: its header lacks 'vocab_size'" in msg


@pytest.mark.parametrize("cfg_edit, expect", [
    ({"r": "eight"}, "adapter_config.json has r='eight'; a positive integer is expected"),
    ({"lora_alpha": None}, "lora_alpha=None; a number is expected"),
    ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern['q_proj'] = '2'; a positive integer is expected"),
    ({"alpha_pattern": [1, 2]}, "alpha_pattern='[1, 2]'; an object"),
    ({"base_model_name_or_path": 7}, "base_model_name_or_path=7; a string or null is expected"),
])
def test_adapter_config_values_are_named(w, bank, capsys, cfg_edit, expect):
    edit_json(bank / "m1" / "adapter_config.json", lambda c: {**c, **cfg_edit})
    msg = one_error(capsys, "bank", "build", bank, "--tokenizer", w.tokenizer)
    assert "member 'm1'" in msg and expect in msg


def test_exclude_accepts_one_name_as_a_string(w, tmp_path):
    a = generate(w.queries["animals_q"], w.bank, tmp_path / "a", exclude="m0")
    b = generate(w.queries["animals_q"], w.bank, tmp_path / "b", exclude=["m0"])
    names = a.members
    assert a.weights[names.index("m0")] == 0 and np.all(np.delete(a.weights, names.index("m0")) > 0)
    np.testing.assert_array_equal(a.weights, b.weights)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_fifo_and_device_as_dataset_say_what_they_are(w, capsys, tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    msg = one_error(capsys, "generate", fifo, "--bank", w.bank, "-o", tmp_path / "o")
    assert f"dataset {fifo}: is a FIFO (named pipe)" in msg
    msg = one_error(capsys, "generate", "/dev/zero", "--bank", w.bank, "-o", tmp_path / "o2")
    assert "dataset /dev/zero: is a character device" in msg
    msg = one_error(capsys, "profile", fifo, "--bank", w.bank, "-o", tmp_path / "p.npz")
    assert "FIFO" in msg


def test_dataset_dict_and_state_json_garbage(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "dataset_dict.json").write_text('{"splits": "train"}')
    with pytest.raises(readers.DatasetError, match="dataset_dict.json 'splits' is not a list"):
        readers.data_files(d)
    (d / "dataset_dict.json").unlink()
    (d / "state.json").write_text("[1, 2]")
    with pytest.raises(readers.DatasetError, match=r"state.json: not a JSON object"):
        readers.data_files(d)
    (d / "state.json").write_text('{"_data_files": [{"file": "x.arrow"}]}')
    with pytest.raises(readers.DatasetError, match="'_data_files' is not a list"):
        readers.data_files(d)


# ------------------------------------------------------------------ 13: Dask scheduler

def test_scheduler_address_checked_at_once(w, capsys, tmp_path):
    for bad in ("not a url", "tcp://host", "http://127.0.0.1:8786", "tcp://127.0.0.1:99999"):
        msg = one_error(capsys, "generate", w.queries["animals_q"], "--bank", w.bank, "-o", tmp_path / "o",
                        "--scheduler", bad)
        assert f"scheduler address {bad!r}: expected tcp://HOST:PORT" in msg
    assert not (tmp_path / "o").exists()


def test_unreachable_scheduler_times_out_with_one_line(w, capsys, tmp_path):
    import dask.distributed  # noqa: F401
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                      # a closed loopback port: nothing answers
    msg = one_error(capsys, "generate", w.queries["animals_q"], "--bank", w.bank, "-o", tmp_path / "o",
                    "--scheduler", f"tcp://127.0.0.1:{port}", "--connect-timeout", "1")
    assert f"scheduler tcp://127.0.0.1:{port}: no answer within 1 s" in msg
    assert not (tmp_path / "o").exists()


def test_scheduler_address_forms():
    from loramix.mixing.scheduler import SchedulerError, check_scheduler_address

    for ok in ("tcp://127.0.0.1:8786", "127.0.0.1:8786", "tls://sched.example:443", "tcp://[::1]:8786",
               "inproc://10.0.0.1/123/1"):
        assert check_scheduler_address(ok) == ok
    for bad in ("", "tcp://:8786", "tcp://a b:1", "ftp://h:1", "tcp://h:0"):
        with pytest.raises(SchedulerError):
            check_scheduler_address(bad)


# ------------------------------------------------------------------ 14, 15: data and ranks

def test_csv_with_a_byte_order_mark(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes("\ufeffinput,output\nhello ,world\nsecond,row\n".encode("utf-8"))
    assert [t for b in readers.iter_texts(f) for t in b] == ["hello world", "secondrow"]


def test_rank_with_factors_or_concat_is_refused(w, capsys, tmp_path):
    for mode in ("factors", "concat"):
        msg = one_error(capsys, "generate", w.queries["animals_q"], "--bank", w.bank, "-o", tmp_path / mode,
                        "--mode", mode, "--rank", "4")
        assert "rank=4 applies to mode svd only" in msg
        assert not (tmp_path / mode).exists()


def test_svd_rank_beyond_the_mix_warns(w, capsys, tmp_path):
    rc, err = run(capsys, "generate", w.queries["animals_q"], "--bank", w.bank, "-o", tmp_path / "o",
                  "--mode", "svd", "--rank", "100000")
    assert rc == 0
    assert len(err) == 1 and err[0].startswith("loramix: warning: rank 100000 is more than the exact mix holds")
    res = json.loads((tmp_path / "o" / "loramix.json").read_text())
    assert res["mode"] == "svd"
    rc, err = run(capsys, "generate", w.queries["animals_q"], "--bank", w.bank, "-o", tmp_path / "o2",
                  "--mode", "svd", "--rank", "2")
    assert rc == 0 and err == []


@pytest.mark.parametrize("rows", [[{"input": "", "output": ""}] * 3, [{"input": " ", "output": ["\n"]}] * 2])
def test_dataset_of_empty_texts_is_refused(w, capsys, tmp_path, rows):
    d = _tiny.write_jsonl(tmp_path / "empty.jsonl", rows)
    msg = one_error(capsys, "generate", d, "--bank", w.bank, "-o", tmp_path / "o")
    assert f"dataset {d}: all {len(rows)} examples are empty in fields input, output" in msg
    assert not (tmp_path / "o").exists()


def test_csv_with_a_long_field_is_read(tmp_path):
    f = tmp_path / "d.csv"
    long = "word " * 60000                 # 300 KB: over the csv module's default 128 KiB field cap
    f.write_text(f"input,output\n{long},x\n")
    assert [t for b in readers.iter_texts(f) for t in b] == [long + "x"]


@pytest.mark.parametrize("prov", ["[]", '{"mode": "factors"}', '{"weights": {"m0": "big"}}'])
def test_explain_on_a_foreign_provenance_file(capsys, tmp_path, prov):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "loramix.json").write_text(prov)
    msg = one_error(capsys, "explain", tmp_path / "o")
    assert f"{tmp_path / 'o' / 'loramix.json'}: lacks 'weights'" in msg
