"""Datasets in every format, and profiles built exactly as the paper does."""
from __future__ import annotations

import csv
import json
import os
import time

import numpy as np
import pytest

import _tiny
from loramix.data import readers as ds
from loramix.profiles import tokens as prof


ROWS = _tiny.make_examples("food", 7, seed=3)


def _paper_counts(tok_path, rows):
    """The paper: per example input + output[0], tokenized with special tokens, pooled counts."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    ids = []
    for r in rows:
        out = r["output"][0] if isinstance(r["output"], list) else r["output"]
        ids += tok.encode(r["input"] + out).ids
    return np.bincount(ids, minlength=tok.get_vocab_size())


def _write_all_formats(d):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    out = {"jsonl": _tiny.write_jsonl(d / "a.jsonl", ROWS)}
    (d / "b.json").write_text(json.dumps(ROWS))
    out["json"] = d / "b.json"
    (d / "c.json").write_text(json.dumps({"Definition": ["x"], "Instances": ROWS}))
    out["lots-of-loras"] = d / "c.json"
    with open(d / "d.csv", "w", newline="") as fh:
        wr = csv.DictWriter(fh, ["input", "output"])
        wr.writeheader()
        for r in ROWS:
            wr.writerow({"input": r["input"], "output": r["output"][0]})
    out["csv"] = d / "d.csv"
    table = pa.Table.from_pylist(ROWS)
    pq.write_table(table, d / "e.parquet", row_group_size=3)
    out["parquet"] = d / "e.parquet"
    # HF datasets save_to_disk layout: arrow IPC stream files + state.json
    hf = d / "hf"
    hf.mkdir()
    for i, part in enumerate((ROWS[:4], ROWS[4:])):
        with pa.OSFile(str(hf / f"data-0000{i}-of-00002.arrow"), "wb") as sink:
            t = pa.Table.from_pylist(part)
            with pa.ipc.new_stream(sink, t.schema) as wr:
                wr.write_table(t)
    (hf / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": "data-00000-of-00002.arrow"}, {"filename": "data-00001-of-00002.arrow"}]}))
    (hf / "dataset_info.json").write_text("{}")
    out["hf-save_to_disk"] = hf
    dd = d / "hfdict"
    (dd / "train").mkdir(parents=True)
    (dd / "test").mkdir()
    for split, rows in (("train", ROWS), ("test", ROWS[:1])):
        with pa.OSFile(str(dd / split / "data-00000-of-00001.arrow"), "wb") as sink:
            t = pa.Table.from_pylist(rows)
            with pa.ipc.new_stream(sink, t.schema) as wr:
                wr.write_table(t)
        (dd / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    out["hf-datasetdict"] = dd
    with pa.OSFile(str(d / "f.arrow"), "wb") as sink:     # the IPC file format too
        with pa.ipc.new_file(sink, table.schema) as wr:
            wr.write_table(table, max_chunksize=3)
    out["arrow-file"] = d / "f.arrow"
    hub = d / "hubrepo" / "data"
    hub.mkdir(parents=True)
    pq.write_table(table, hub / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), hub / "test-00000-of-00001.parquet")
    out["hub-folder"] = d / "hubrepo"
    return out


def test_every_format_gives_the_papers_histogram(w, tmp_path):
    ref = _paper_counts(w.tokenizer, ROWS)
    for fmt, path in _write_all_formats(tmp_path).items():
        p = prof.build_profile(path, w.tokenizer, batch_size=2)
        np.testing.assert_array_equal(p.dense(np.int64)[: ref.size], ref, err_msg=fmt)
        assert p.n_examples == len(ROWS), fmt
        assert p.ids.size == np.count_nonzero(ref)


def test_streamed_in_batches(tmp_path):
    path = _tiny.write_jsonl(tmp_path / "x.jsonl", ROWS)
    batches = list(ds.iter_texts(path, batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert batches[0][0] == ROWS[0]["input"] + ROWS[0]["output"][0]


def test_custom_fields_and_errors(w, tmp_path):
    rows = [{"q": "cat dog", "a": "bird", "n": 3}]
    path = _tiny.write_jsonl(tmp_path / "f.jsonl", rows)
    assert list(ds.iter_texts(path, ("q", "a"))) == [["cat dogbird"]]
    with pytest.raises(ds.DatasetError, match="no field 'input'"):
        prof.build_profile(path, w.tokenizer)
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "f.parquet")
    with pytest.raises(ds.DatasetError, match="no field 'input'"):
        prof.build_profile(tmp_path / "f.parquet", w.tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ds.DatasetError, match="no examples"):
        prof.build_profile(empty, w.tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x", "output": "y"}\n{oops\n')
    with pytest.raises(ds.DatasetError, match="line 2"):
        prof.build_profile(bad, w.tokenizer)
    with pytest.raises(ds.DatasetError, match="no such"):
        prof.build_profile(tmp_path / "nope.jsonl", w.tokenizer)


def test_profile_roundtrip_cache_and_tokenizer_mismatch(w, tmp_path):
    data = _tiny.write_jsonl(tmp_path / "d.jsonl", ROWS)
    cache = tmp_path / "d.npz"
    p1 = prof.profile_dataset(data, w.tokenizer, cache=cache)
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    time.sleep(0.01)
    p2 = prof.profile_dataset(data, w.tokenizer, cache=cache)
    assert cache.stat().st_mtime_ns == mtime            # reused, not rebuilt
    np.testing.assert_array_equal(p1.counts, p2.counts)
    # touched but same content: reused via the content hash
    os.utime(data)
    prof.profile_dataset(data, w.tokenizer, cache=cache)
    # changed content: rebuilt
    _tiny.write_jsonl(data, ROWS[:3])
    p3 = prof.profile_dataset(data, w.tokenizer, cache=cache)
    assert p3.n_examples == 3 and p3.dataset_hash != p1.dataset_hash
    # another tokenizer: refused when loading the saved profile
    other = _tiny.build_tokenizer(tmp_path / "tok2")
    j = json.loads(other.read_text())
    j["model"]["vocab"]["zzz"] = len(j["model"]["vocab"])
    other.write_text(json.dumps(j))
    with pytest.raises(prof.ProfileError, match="another tokenizer"):
        prof.profile_dataset(cache, other)
    loaded = prof.Profile.load(cache)
    assert loaded.tokenizer_hash == prof.tokenizer_hash(w.tokenizer)


def test_tokenizer_loaded_and_hashed_once_per_file_version(tmp_path):
    tok_file = _tiny.build_tokenizer(tmp_path / "tok")
    t1, h1 = prof.load_tokenizer(tok_file), prof.tokenizer_hash(tok_file)
    assert prof.load_tokenizer(tok_file.parent) is t1          # the same file through its folder
    assert prof.tokenizer_hash(tok_file) == h1
    j = json.loads(tok_file.read_text())
    j["model"]["vocab"]["zzz"] = len(j["model"]["vocab"])
    tok_file.write_text(json.dumps(j))                         # edited in place: a new version
    assert prof.tokenizer_hash(tok_file) != h1
    t2 = prof.load_tokenizer(tok_file)
    assert t2 is not t1 and t2.get_vocab_size() == t1.get_vocab_size() + 1


def test_batch_profiles_in_threads_equal_one_by_one(w, tmp_path, monkeypatch):
    from loramix import pipeline
    from loramix.bank.bank import Bank

    bank = Bank.open(w.bank)
    data = [_tiny.write_jsonl(tmp_path / f"d{i}.jsonl", ROWS[i:]) for i in range(5)]
    kw = dict(fields=bank.fields, split="train", cache=None, progress=False)
    monkeypatch.setenv("LORAMIX_NUM_THREADS", "3")
    many = pipeline._query_profiles(data, bank, **kw)
    one = [prof.query_profile(d, bank, **kw) for d in data]
    assert [p.source for p in many] == [str(d) for d in data]
    for a, b in zip(many, one):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.counts, b.counts)
    with pytest.raises(Exception, match="missing"):
        pipeline._query_profiles(data[:2] + [tmp_path / "missing.jsonl"], bank, **kw)
