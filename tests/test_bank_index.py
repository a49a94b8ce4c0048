"""bank.index: `bank build` writes it, `Bank.open` uses it when current and falls back (per
member, or whole) when it is stale, foreign or damaged; what a bank opened from it gives is what
the full read gives."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest

from loramix.bank import index as bank_index
from loramix.bank.bank import Bank
from loramix.mixing.local import mix_adapters




def _without_index(src, dst):
    shutil.copytree(src, dst)
    (dst / bank_index.INDEX_NAME).unlink()
    return dst


def _same_bank(a: Bank, b: Bank):
    assert a.names == b.names
    for ma, mb in zip(a.members, b.members):
        assert ma.path.relative_to(a.path) == mb.path.relative_to(b.path) and ma.info == mb.info
        assert ma.profile_path.relative_to(a.path) == mb.profile_path.relative_to(b.path)
        assert ma.modules == mb.modules
        sa, sb = ma.spec, mb.spec
        for f in ("name", "base_model", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
                  "target_modules", "layers_to_transform", "dtype", "raw_config"):
            assert getattr(sa, f) == getattr(sb, f), f
        assert sa.path == ma.path and sb.path == mb.path
    assert a.module_index() == b.module_index()
    pa, pb = a.profiles(), b.profiles()
    assert pa.shape == pb.shape
    np.testing.assert_array_equal(pa.toarray(), pb.toarray())


def test_build_writes_an_index_that_open_uses_and_that_equals_the_full_read(w, tmp_path):
    assert (w.bank / bank_index.INDEX_NAME).is_file()
    fast = Bank.open(w.bank)
    assert fast._index is not None
    full = Bank.open(_without_index(w.bank, tmp_path / "plain"))
    assert full._index is None
    _same_bank(fast, full)


def test_mix_through_the_index_is_byte_identical(w, tmp_path):
    plain = _without_index(w.bank, tmp_path / "plain")
    weights = {"m0": 0.5, "m1": 0.2, "m2": 0.3}
    for mode in ("factors", "concat", "svd"):
        a = mix_adapters(w.bank, weights, tmp_path / f"a-{mode}", mode=mode, rank=2)[0]
        b = mix_adapters(plain, weights, tmp_path / f"b-{mode}", mode=mode, rank=2)[0]
        assert (a.out / "adapter_model.safetensors").read_bytes() == \
            (b.out / "adapter_model.safetensors").read_bytes()
        assert (a.out / "adapter_config.json").read_text() == (b.out / "adapter_config.json").read_text()


def test_changed_member_is_read_in_full_and_named_once(w, bank_copy, caplog):
    cfgp = bank_copy / "m2" / "adapter_config.json"
    cfg = json.loads(cfgp.read_text())
    cfg["alpha_pattern"] = {}                      # a real change: m2's scaling differs now
    cfgp.write_text(json.dumps(cfg))
    with caplog.at_level(logging.INFO, logger="loramix.bank"):
        b = Bank.open(bank_copy)
    assert len(caplog.records) == 1
    assert re.search(r"1 member\(s\) changed since bank.index.*: m2;.*bank build", caplog.records[0].getMessage())
    assert b._index is None                        # profiles then come from the files
    m2 = b.members[b.index("m2")]
    assert m2.spec.alpha_pattern == {}
    assert m2.modules["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(
        cfg["lora_alpha"] / m2.modules["model.layers.0.self_attn.v_proj"].rank)


def test_touched_profile_is_read_from_its_file(w, bank_copy):
    from loramix.profiles import tokens as prof

    pp = bank_copy / "m1" / "profile.npz"
    p = prof.Profile.load(pp)
    p.counts = p.counts * 3
    p.save(pp)
    b = Bank.open(bank_copy)
    assert b._index is None
    np.testing.assert_array_equal(b.profiles().toarray()[1][p.ids], p.counts)


@pytest.mark.parametrize("damage,match", [
    ("magic", "bad magic"),
    ("truncated", "outside the file|past the end"),
    ("header", "not the expected JSON"),
])
def test_damaged_index_is_ignored_with_a_warning(w, bank_copy, damage, match, caplog):
    f = bank_copy / bank_index.INDEX_NAME
    data = bytearray(f.read_bytes())
    if damage == "magic":
        data[:8] = b"NOTANIDX"
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[16:20] = b"}}}}"
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.INFO, logger="loramix.bank"):
        b = Bank.open(bank_copy)
    assert re.search(f"ignoring its index.*({match})", caplog.records[0].getMessage())
    assert b._index is None
    _same_bank(b, Bank.open(w.bank))


def test_index_of_another_bank_json_is_not_used(w, bank_copy, caplog):
    doc = json.loads((bank_copy / "bank.json").read_text())
    (bank_copy / "bank.json").write_text(json.dumps(doc, indent=2))   # same content, other bytes
    with caplog.at_level(logging.INFO, logger="loramix.bank"):
        b = Bank.open(bank_copy)
    assert "written for another bank.json" in caplog.records[0].getMessage()
    assert b._index is None and b.names == ["m0", "m1", "m2", "m3"]


def test_bank_without_index_opens_as_before(w, tmp_path):
    b = Bank.open(_without_index(w.bank, tmp_path / "old"))
    assert b._index is None and b.names == ["m0", "m1", "m2", "m3"]
    assert b.profiles().shape == (4, b.vocab_size)


def test_index_file_layout(w):
    idx = bank_index.read(w.bank / bank_index.INDEX_NAME)
    doc = json.loads((w.bank / "bank.json").read_text())
    assert idx.meta["bank_hash"] == doc["bank_hash"] and idx.meta["names"] == ["m0", "m1", "m2", "m3"]
    assert idx.arrays["stat"].shape == (4, 6)
    for i, m in enumerate(doc["members"]):
        wpath = w.bank / m["path"] / "adapter_model.safetensors"
        st = os.stat(wpath)
        assert tuple(idx.arrays["stat"][i, :2]) == (st.st_size, st.st_mtime_ns)
        # the recorded data start and tensor offsets locate every tensor's bytes in the file
        ci, li, start = idx.meta["members"][i]
        raw = wpath.read_bytes()
        from safetensors.numpy import load_file
        t = load_file(str(wpath))
        for key, dtype, shape, b0, b1 in idx.meta["layouts"][li]["tensors"]:
            assert dtype == "F32" and tuple(shape) == t[key].shape
            np.testing.assert_array_equal(np.frombuffer(raw[start + b0: start + b1], np.float32).reshape(shape),
                                          t[key])


# ---- the stored js index (issue 11, goal 7: 1 x N js as generate calls it) ---------------------
def test_index_stores_the_prepared_js_index_and_generate_distances_use_it(w, tmp_path):
    from loramix import _core
    from loramix.core.divergence import EPS, divergence
    from loramix.profiles import tokens as prof
    from loramix.weights import metrics

    idx = bank_index.read(w.bank / bank_index.INDEX_NAME)
    assert idx.meta["js_index"] == {"eps": EPS, "isa": _core.active_isa(), "tiles": 4}   # min(8, N)
    b = Bank.open(w.bank)
    stored = b.prepared("js", EPS)
    assert stored is not None and stored.shape == b.profiles(core=True).shape
    assert b.prepared("kl", EPS) is None and b.prepared("js", 1e-9) is None
    assert Bank.open(_without_index(w.bank, tmp_path / "plain")).prepared("js", EPS) is None
    # the arrays are the mapped file's, not copies
    assert not idx.arrays["js_x1"].flags.writeable and not idx.arrays["js_x1"].flags.owndata
    queries = [prof.query_profile(d, b, fields=b.fields) for d in list(w.queries.values())[:3]]
    qm, bm = prof.stack_against(queries, b, core=True)
    seen = []
    real = metrics.distances
    try:
        metrics.distances = lambda q, r, m, **kw: seen.append(r) or real(q, r, m, **kw)
        got = metrics.bank_distances(qm, b, bm, "js")
    finally:
        metrics.distances = real
    assert seen == [stored]
    np.testing.assert_array_equal(got, divergence(qm, bm, "js"))     # bit for bit
    np.testing.assert_array_equal(metrics.bank_distances(qm, b, bm, "kl"), divergence(qm, bm, "kl"))


def test_stale_or_foreign_isa_index_falls_back_to_preparing_the_bank(w, bank_copy, monkeypatch):
    from loramix import _core
    from loramix.core.divergence import EPS

    pp = bank_copy / "m1" / "profile.npz"
    os.utime(pp, ns=(os.stat(pp).st_atime_ns, os.stat(pp).st_mtime_ns + 10**9))   # touched: stale
    assert Bank.open(bank_copy).prepared("js", EPS) is None
    fresh = Bank.open(w.bank)
    others = [i for i in _core.available_isas() if i != _core.active_isa()]
    for other in others:
        monkeypatch.setattr(_core, "active_isa", lambda other=other: other)
        assert Bank.open(w.bank).prepared("js", EPS) is None      # built with other kernels
    monkeypatch.undo()
    assert fresh.prepared("js", EPS) is not None


def _rewrite_index(path, edit):
    """Re-emit an index file with `edit(meta, arrays)` applied (arrays copied out of the map)."""
    idx = bank_index.read(path)
    meta, arrays = json.loads(json.dumps(idx.meta)), {k: np.array(v) for k, v in idx.arrays.items()}
    del idx
    edit(meta, arrays)
    spec, off = {}, 0
    for name, a in arrays.items():
        spec[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": off}
        off += -(-a.nbytes // 64) * 64
    header = json.dumps({"meta": meta, "arrays": spec}).encode()
    start = -(-(16 + len(header)) // 64) * 64
    buf = bytearray(start + off)
    buf[:16 + len(header)] = b"LMXIDX01" + len(header).to_bytes(8, "little") + header
    for name, a in arrays.items():
        o = start + spec[name]["offset"]
        buf[o:o + a.nbytes] = a.tobytes()
    path.write_bytes(bytes(buf))


def test_index_without_a_js_index_still_opens_fast(w, bank_copy):
    """An index written before the js index existed: used as before, the bank prepared per call."""
    from loramix.core.divergence import EPS

    def strip(meta, arrays):
        del meta["js_index"]
        for k in [k for k in arrays if k.startswith("js_")]:
            del arrays[k]
    _rewrite_index(bank_copy / bank_index.INDEX_NAME, strip)
    b = Bank.open(bank_copy)
    assert b._index is not None and b.prepared("js", EPS) is None
    _same_bank(b, Bank.open(w.bank))


@pytest.mark.parametrize("damage,match", [
    ("row", "row number lies outside"), ("dtype", "'js_row' is <i8, not <i4"),
    ("missing", "'js_c1' is missing"),
])
def test_damaged_js_index_is_never_followed(w, bank_copy, damage, match, caplog):
    from loramix.core.divergence import EPS

    def edit(meta, arrays):
        if damage == "row":
            arrays["js_row"][3] = 10**6
        elif damage == "dtype":
            arrays["js_row"] = arrays["js_row"].astype(np.int64)
        else:
            del arrays["js_c1"]
    _rewrite_index(bank_copy / bank_index.INDEX_NAME, edit)
    with caplog.at_level(logging.INFO, logger="loramix.bank"):
        b = Bank.open(bank_copy)
        if damage == "row":      # well formed as a file: the bank uses the index, not its js part
            assert b._index is not None and b.prepared("js", EPS) is None
        else:                    # a malformed file: the whole index is ignored
            assert b._index is None and b.prepared("js", EPS) is None
    assert re.search(match, " ".join(r.getMessage() for r in caplog.records))
    _same_bank(b, Bank.open(w.bank))


def test_a_bank_too_large_for_a_stored_js_index_gets_none_and_still_works(w, tmp_path, monkeypatch, caplog):
    from loramix.bank.bank import build_bank
    from loramix.core.divergence import EPS

    import shutil

    bank = tmp_path / "b"
    shutil.copytree(w.bank, bank)
    (bank / bank_index.INDEX_NAME).unlink()
    monkeypatch.setattr(bank_index, "JS_INDEX_MAX_ENTRIES", 10)
    with caplog.at_level(logging.INFO, logger="loramix.bank"):
        build_bank(bank, w.tokenizer)
    assert "no stored js index" in caplog.text
    idx = bank_index.read(bank / bank_index.INDEX_NAME)
    assert "js_index" not in idx.meta and not any(k.startswith("js_") for k in idx.arrays)
    b = Bank.open(bank)
    assert b._index is not None and b.prepared("js", EPS) is None
    _same_bank(b, Bank.open(w.bank))
