"""Property-based fuzzing of every parser loramix points at user files (hypothesis).

Each target is a hypothesis strategy plus a check function; the check feeds one input to the
library and asserts the contract: the input is accepted, or refused with the parser's own
``ValueError`` subclass naming the file, and never any other exception, a crash or a hang.

- ``safetensors``: :class:`loramix.core.tensors.SafetensorsFile` on random headers (JSON built
  from hostile numbers and dtypes) and on byte-level mutations of valid files; accepted files
  have every tensor read (``numpy``/``to_f32``).
- ``bank_json``: :meth:`loramix.bank.bank.Bank.open` on a real bank whose ``bank.json`` has a
  random sub-tree replaced, a key dropped, or its bytes mutated.
- ``adapter_config``: :func:`loramix.bank.peft_io.read_config` + ``spec_from_file`` on random
  configs next to a valid ``adapter_model.safetensors``.
- ``datasets``: :func:`loramix.data.readers.iter_texts` on random JSON lines, JSON, CSV and
  parquet files (structured and raw bytes).
- ``json_lines``: the streaming parser of long JSON lines (:mod:`loramix.data.jsonstream`, made
  to take every line, in blocks of a few bytes) against ``json.loads`` on the same lines read in
  text mode: the same lines accepted, the same records, the same text fields when kept as spans.
- ``csv_records``: the CSV reader (:mod:`loramix.data.csvstream`, made to parse records itself
  in blocks of a few bytes, or to hand back to the ``csv`` module after each long one) against
  ``csv.reader`` / ``csv.DictReader`` on the file read as text (``newline=""``, utf-8-sig).
- ``json_documents``: the streaming reader of ``.json`` documents (:mod:`loramix.data.jsondoc`,
  made to take every document, in windows and blocks of a few bytes) against ``json.loads``'s
  path on the same file: the same records, or both refused.

Used by ``tests/test_fuzz.py`` (a short derandomized run) and ``tools/fuzz.py`` (a long run).
"""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

_COUNTER = itertools.count()


def fresh(dirpath: Path, suffix: str) -> Path:
    """A new file name for each example: a file still memory-mapped is never rewritten."""
    return Path(dirpath) / f"f{next(_COUNTER)}{suffix}"


# ------------------------------------------------------------------ safetensors

DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "", "f32", "X" * 40]
HOSTILE_INTS = st.one_of(st.integers(-3, 70), st.sampled_from(
    [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -2**63]))


def _tensor_entry():
    return st.fixed_dictionaries({
        "dtype": st.one_of(st.sampled_from(DTYPES), st.integers(), st.none()),
        "shape": st.one_of(st.lists(HOSTILE_INTS, max_size=4), st.text(max_size=3), st.none()),
        "data_offsets": st.one_of(st.lists(HOSTILE_INTS, min_size=0, max_size=3), st.none(), st.text(max_size=2)),
    })


def _header_doc():
    names = st.one_of(st.sampled_from(["a", "b", "__metadata__", "", "a.lora_A.weight"]), st.text(max_size=6))
    meta = st.one_of(st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=4), st.integers()), max_size=2),
                     st.integers(), st.none())
    entries = st.dictionaries(names, st.one_of(_tensor_entry(), meta), max_size=4)
    return entries


@st.composite
def safetensors_bytes(draw) -> bytes:
    """A safetensors-like file: a random header (JSON or raw), a declared length that may lie,
    and a data section of random size."""
    kind = draw(st.sampled_from(["json", "raw", "valid-mutated"]))
    if kind == "valid-mutated":
        return draw(mutated(valid_safetensors(draw)))
    header = json.dumps(draw(_header_doc())).encode() if kind == "json" else draw(st.binary(max_size=64))
    header += b" " * draw(st.integers(0, 8))
    n = draw(st.one_of(st.just(len(header)), HOSTILE_INTS.filter(lambda v: 0 <= v < 2**64)))
    data = draw(st.binary(max_size=96))
    return struct.pack("<Q", n) + header + data


def valid_safetensors(draw=None) -> bytes:
    """A valid file with tensors of each float dtype (made with the reference writer)."""
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    return save({"base_model.model.l.0.q.lora_A.weight": rng.standard_normal((2, 3)).astype(np.float32),
                 "base_model.model.l.0.q.lora_B.weight": rng.standard_normal((3, 2)).astype(np.float16),
                 "x": np.zeros((0, 4), np.float32), "i": np.arange(3, dtype=np.int64)},
                metadata={"format": "pt"})


def mutated(data: bytes):
    """Byte-level mutations of ``data``: flips, overwrites, truncation, insertion, length lies."""
    @st.composite
    def go(draw):
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "length"]))
            if op == "flip" and b:
                i = draw(st.integers(0, len(b) - 1))
                b[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "set" and b:
                i = draw(st.integers(0, len(b) - 1))
                b[i] = draw(st.sampled_from([0, 0x22, 0x2C, 0x30, 0x39, 0x5B, 0x7B, 0x7D, 0xFF]))
            elif op == "truncate":
                del b[draw(st.integers(0, len(b))):]
            elif op == "insert":
                i = draw(st.integers(0, len(b)))
                b[i:i] = draw(st.binary(min_size=1, max_size=8))
            elif op == "length" and len(b) >= 8:
                b[:8] = struct.pack("<Q", draw(HOSTILE_INTS.filter(lambda v: 0 <= v < 2**64)))
        return bytes(b)
    return go()


def check_safetensors(data: bytes, dirpath: Path) -> str:
    """``SafetensorsFile`` accepts ``data`` (and every tensor reads) or raises ValueError naming the file."""
    from loramix.core.tensors import SafetensorsFile

    f = fresh(dirpath, ".safetensors")
    f.write_bytes(data)
    try:
        try:
            sf = SafetensorsFile(str(f))
        except ValueError as e:
            assert str(f) in str(e), f"error does not name the file: {e}"
            return "refused"
        for k in sf.keys():
            shape, dt, nb = sf.shape(k), sf.dtype(k), sf.nbytes(k)
            assert isinstance(shape, tuple) and isinstance(dt, str) and nb >= 0
            if dt in ("F32", "F16", "BF16"):
                a = sf.numpy(k)
                assert a.shape == shape and a.nbytes == nb
                assert sf.to_f32(k).shape == shape
            else:
                try:
                    sf.numpy(k)
                    raise AssertionError(f"dtype {dt} read without error")
                except ValueError as e:
                    assert dt in str(e), e
        assert isinstance(sf.metadata, dict)
        del sf
        return "accepted"
    finally:
        f.unlink()


# ------------------------------------------------------------------ JSON values

JSON_LEAVES = st.one_of(st.none(), st.booleans(), HOSTILE_INTS, st.floats(allow_nan=False),
                        st.text(max_size=8), st.sampled_from(["..", "/", "/etc", "m0", "tokenizer.json", "[", "(?P<"]))
JSON = st.recursive(JSON_LEAVES, lambda c: st.one_of(st.lists(c, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), c, max_size=3)),
                    max_leaves=8)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated_json(draw, doc):
    """``doc`` with one to three sub-trees replaced by random JSON or deleted."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        if not path:
            doc = draw(JSON)
            continue
        parent = doc
        try:
            for p in path[:-1]:
                parent = parent[p]
            if draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(JSON)
        except (KeyError, IndexError, TypeError):
            continue
    return doc


def bank_json_input(doc):
    """A bank.json text: a mutated document, or mutated bytes of the real one."""
    text = json.dumps(doc).encode()
    return st.one_of(mutated_json(doc).map(lambda d: json.dumps(d).encode()), mutated(text))


def check_bank_json(data: bytes, bank: Path, scratch: Path) -> str:
    """``Bank.open`` on a copy of ``bank`` with ``bank.json`` = ``data``: a Bank or a ValueError."""
    from loramix.bank.bank import Bank

    (bank / "bank.json").write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = Bank.open(bank)
            b.summary()
            _ = (b.vocab_size, b.rank, b.dtype, b.fields, b.hash, b.tokenizer_path, b.module_index())
            b.profiles()
        return "accepted"
    except ValueError as e:
        assert str(e), "empty error message"
        return "refused"


# ------------------------------------------------------------------ adapter_config.json

def config_input(base: dict):
    return st.one_of(mutated_json(base), JSON, st.fixed_dictionaries(
        {}, optional={"r": JSON_LEAVES, "lora_alpha": JSON_LEAVES, "use_rslora": JSON_LEAVES,
                      "rank_pattern": st.one_of(JSON, st.dictionaries(st.text(max_size=8), JSON_LEAVES, max_size=3)),
                      "alpha_pattern": st.one_of(JSON, st.dictionaries(st.text(max_size=8), JSON_LEAVES, max_size=3)),
                      "peft_type": JSON_LEAVES, "init_lora_weights": JSON_LEAVES, "target_modules": JSON,
                      "use_dora": JSON_LEAVES, "modules_to_save": JSON}))


def check_adapter_config(cfg, member: Path) -> str:
    """``read_config`` + ``spec_from_file`` on ``cfg``: a spec with finite positive scalings, or AdapterError."""
    from loramix.bank import peft_io
    from loramix.core.tensors import SafetensorsFile

    (member / peft_io.CONFIG_NAME).write_text(json.dumps(cfg))
    try:
        c = peft_io.read_config(member, "fz")
        spec = peft_io.spec_from_file(c, SafetensorsFile(str(member / peft_io.WEIGHTS_NAME)), member, "fz")
    except peft_io.AdapterError as e:
        assert "member 'fz'" in str(e), e
        return "refused"
    for m in spec.modules.values():
        assert m.rank >= 1
    return "accepted"


# ------------------------------------------------------------------ datasets

_VALUE = st.one_of(st.text(max_size=8), JSON_LEAVES, st.lists(JSON_LEAVES, max_size=2), JSON)
_GOOD = st.fixed_dictionaries({"input": _VALUE, "output": _VALUE}, optional={"x": JSON})
# three in four records have both text fields, so that whole files are often accepted too
RECORD = st.one_of(_GOOD, _GOOD, _GOOD, st.dictionaries(st.sampled_from(["input", "output", "x", ""]), _VALUE,
                                                     max_size=3))
_GOOD_COLS = st.just(["input", "output"])


@st.composite
def dataset_file(draw):
    """(suffix, bytes) of a dataset file: structured records in each format, or raw bytes."""
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
    if draw(st.integers(0, 4)) == 0:
        return suffix, draw(st.binary(max_size=200))
    rows = draw(st.lists(RECORD, min_size=draw(st.sampled_from([0, 1, 1])), max_size=5))
    if suffix == ".jsonl":
        lines = [json.dumps(r) if draw(st.integers(0, 6)) else draw(st.text(max_size=10)) for r in rows]
        return suffix, ("\n".join(lines)).encode("utf-8", "surrogatepass")
    if suffix == ".json":
        doc = draw(st.sampled_from([rows, {"Instances": rows}, {"data": rows}, {"other": rows}, rows[:1]]))
        return suffix, json.dumps(doc).encode()
    if suffix == ".csv":
        cols = draw(st.one_of(_GOOD_COLS, _GOOD_COLS,
                              st.lists(st.sampled_from(["input", "output", "x", "", "input"]), min_size=1, max_size=3)))
        cells = st.text(max_size=8).filter(lambda s: "\x00" not in s)
        body = [",".join(cols)] + [",".join(draw(cells) for _ in cols) for _ in range(len(rows))]
        text = ("\ufeff" if draw(st.booleans()) else "") + "\n".join(body)
        return suffix, text.encode("utf-8", "surrogatepass")
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = draw(st.one_of(_GOOD_COLS, _GOOD_COLS,
                          st.lists(st.sampled_from(["input", "output", "x"]), min_size=1, max_size=3, unique=True)))
    kind = draw(st.sampled_from(["str", "int", "list", "null"]))
    n = len(rows)
    vals = {"str": [draw(st.text(max_size=6)) for _ in range(n)], "int": list(range(n)),
            "list": [[draw(st.text(max_size=4))] for _ in range(n)], "null": [None] * n}[kind]
    buf = io.BytesIO()
    pq.write_table(pa.table({c: vals for c in cols}), buf)
    data = buf.getvalue()
    return suffix, (draw(mutated(data)) if draw(st.booleans()) else data)


def check_dataset(item, dirpath: Path) -> str:
    """``iter_texts`` on the file: text batches, or a DatasetError naming the dataset."""
    from loramix.data import readers

    suffix, data = item
    f = fresh(dirpath, suffix)
    f.write_bytes(data)
    try:
        n = 0
        for batch in readers.iter_texts(f):
            assert all(isinstance(t, str) for t in batch)
            n += len(batch)
        return "accepted"
    except readers.DatasetError as e:
        assert str(f) in str(e), f"error does not name the file: {e}"
        return "refused"
    finally:
        f.unlink()


# ------------------------------------------------------------------ long JSON lines

# every character json may meet: escapes, quotes, control characters, lone surrogates, non-BMP
_CHARS = st.characters(blacklist_categories=())
_STRING = st.one_of(st.text(_CHARS, max_size=12),
                    st.text(st.sampled_from(list('\\"\n\t \x01/éß日\U0001F600\ud83d\ude00\ud800a')), max_size=30))
_LINE_VALUE = st.recursive(st.one_of(JSON_LEAVES, _STRING, st.floats()),
                           lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(_STRING, c, max_size=3)),
                           max_leaves=10)


@st.composite
def json_line(draw):
    """``(file bytes, block, span)``: JSON lines of records with string-heavy text fields,
    written compact or spaced, escaped (``ensure_ascii``) or raw, CR/LF/CRLF ends, sometimes
    mutated; ``block`` and ``span``: the streaming parser's sizes for the run."""
    lines = []
    for _ in range(draw(st.integers(1, 3))):
        rec = draw(st.dictionaries(st.sampled_from(["input", "output", "x", ""]),
                                   st.one_of(_STRING, _STRING, _LINE_VALUE), max_size=4))
        seps = draw(st.sampled_from([None, (",", ":"), (" ,\t", " :  ")]))
        text = json.dumps(rec, ensure_ascii=draw(st.booleans()), separators=seps)
        # a lone surrogate cannot be UTF-8: written as its escape
        text = re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
        lines.append(draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " \t"])))
        if draw(st.integers(0, 5)) == 0:
            lines.append(draw(st.sampled_from(["", "  ", "\x0c", "[1]", '"s"'])))
    data = b"".join((line + draw(st.sampled_from(["\n", "\r\n", "\r"]))).encode() for line in lines)
    if draw(st.integers(0, 3)) == 0:
        data = draw(mutated(data))
    return data, draw(st.integers(1, 13)), draw(st.integers(0, 8))


def same_json(a, b) -> bool:
    """Equal values of the same types (NaN equal to NaN, dict keys in the same order)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_json(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_json, a, b))
    return type(a) is type(b) and a == b


def check_json_line(item, dirpath: Path) -> str:
    """Every line through :mod:`loramix.data.jsonstream` (tiny blocks) vs ``json.loads``."""
    from loramix.data import jsonstream as js
    from loramix.data import readers

    data, block, span = item
    f = fresh(dirpath, ".jsonl")
    f.write_bytes(data)
    try:
        with open(f, encoding="utf-8") as fh:
            want = [json.loads(line) for line in fh if not line.isspace()]
        want_ok = all(isinstance(r, dict) for r in want)
    except ValueError:        # not JSON, not UTF-8
        want, want_ok = None, False
    saved = js.LONG_LINE, js.BLOCK, js.SPAN
    js.LONG_LINE, js.BLOCK, js.SPAN = 1, block, span
    try:
        got = [r for b in readers.iter_records(f) for r in b]
    except readers.DatasetError as e:
        assert str(f) in str(e), f"error does not name the file: {e}"
        got = None
    try:
        assert (got is not None) == want_ok, (data, got, want)
        if got is None:
            return "refused"
        assert all(same_json(g, w) for g, w in zip(got, want, strict=True)), (data, got, want)
        # the lazy path: the text fields alone, long strings left in the file and decoded again
        lazy = [r for b in readers._iter_file(f, 10, ("input", "output"), lazy=True) for r in b]
        for r, w in zip(lazy, want, strict=True):
            assert list(r) == list(w)
            for k in set(r) & {"input", "output"}:
                text = readers._text(r[k])
                assert str(js.LongText([text])) == readers._text(w[k]), (data, k)
        return "accepted"
    finally:
        js.LONG_LINE, js.BLOCK, js.SPAN = saved
        f.unlink()


# ------------------------------------------------------------------ CSV records

_CSV_CELL = st.one_of(st.text(max_size=8),
                      st.text(st.sampled_from(list(',"\r\n \tab\x00é日\U0001F600\ufeff')), max_size=12))
# the characters that decide how CSV is read, often
_CSV_RAW = st.text(st.sampled_from(list(',,""\r\n\r\n ab\x00é\U0001F600')), max_size=40)


@st.composite
def csv_document(draw):
    """``(file bytes, long_record, block, span)``: CSV written by ``csv.writer`` (every quoting
    style, CR/LF/CRLF line ends) or raw text heavy in quotes, commas and line ends (quotes
    inside unquoted fields, unclosed quotes, text after a closing quote), a byte-order mark or
    not, sometimes mutated bytes; then the reader's sizes for the run."""
    import csv
    import io

    if draw(st.integers(0, 2)):
        cols = draw(st.integers(1, 3))
        rows = [["input", "output", "x"][:cols]] + draw(st.lists(st.lists(_CSV_CELL, min_size=0, max_size=4),
                                                                  max_size=4))
        buf = io.StringIO(newline="")
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
        csv.writer(buf, quoting=quoting, lineterminator=draw(st.sampled_from(["\r\n", "\n", "\r"]))).writerows(rows)
        text = buf.getvalue()
        if draw(st.booleans()):
            text = text.rstrip("\r\n")
    else:
        text = draw(st.sampled_from(["input,output\n", "", "\r\n"])) + draw(_CSV_RAW)
    data = (("\ufeff" if draw(st.integers(0, 3)) == 0 else "") + text).encode()
    if draw(st.integers(0, 4)) == 0:
        data = draw(mutated(data))
    long_record = draw(st.sampled_from([1, 2, 3, 5, 8, 13, 40, 1 << 22]))
    return data, long_record, draw(st.integers(1, 13)), draw(st.integers(0, 8))


def check_csv_document(item, dirpath: Path) -> str:
    """:mod:`loramix.data.csvstream` (tiny sizes) vs ``csv.reader`` and ``csv.DictReader``: the
    same rows and records, or a DatasetError naming the file and a line where csv raises."""
    import csv

    from loramix.data import csvstream as cs
    from loramix.data import readers

    data, long_record, block, span = item
    f = fresh(dirpath, ".csv")
    f.write_bytes(data)

    def oracle(reader):
        with open(f, newline="", encoding="utf-8-sig") as fh:
            return list(reader(fh))

    try:
        want, want_dicts = oracle(csv.reader), oracle(csv.DictReader)
    except (csv.Error, UnicodeDecodeError):
        want = want_dicts = None
    saved = cs.LONG_RECORD, cs.BLOCK, cs.SPAN
    cs.LONG_RECORD, cs.BLOCK, cs.SPAN = long_record, block, span
    try:
        try:
            got = [[v if isinstance(v, str) else "".join(v) for v in row] for row in cs.rows(f)]
        except readers.DatasetError as e:
            assert str(f) in str(e) and " line " in str(e), f"error does not name the file and line: {e}"
            got = None
        assert got == want, (data, got, want)
        if got is None:
            return "refused"
        assert [r for b in readers.iter_records(f) for r in b] == want_dicts, data
        # the lazy path: long fields left in the file, decoded again when iterated
        lazy = [r for b in readers._iter_file(f, 3, ("input",), lazy=True) for r in b]
        def joined(v):
            return [joined(x) for x in v] if isinstance(v, list) else v if v is None or isinstance(v, str) \
                else "".join(v)

        for r, w in zip(lazy, want_dicts, strict=True):
            assert list(r) == list(w) and {k: joined(v) for k, v in r.items()} == w
        return "accepted"
    finally:
        cs.LONG_RECORD, cs.BLOCK, cs.SPAN = saved
        f.unlink()


# ------------------------------------------------------------------ .json documents

@st.composite
def json_document(draw):
    """``(file bytes, window, block, span)``: a ``.json`` dataset (a list of records, the list
    under ``Instances``/``data``/... with other keys and duplicates around it, or another value),
    compact or indented, escaped or raw, CR/LF/CRLF between values, sometimes mutated; then the
    streaming reader's sizes."""
    record = st.dictionaries(st.sampled_from(["input", "output", "x", ""]), st.one_of(_STRING, _STRING, _LINE_VALUE),
                             max_size=4)
    rows = draw(st.lists(st.one_of(record, _LINE_VALUE) if draw(st.integers(0, 5)) == 0 else record, max_size=4))
    keys = st.sampled_from(["Instances", "instances", "data", "examples", "rows", "Definition", "x"])
    doc = draw(st.one_of(st.just(rows), st.just(rows), st.just(rows), _LINE_VALUE,
                         st.lists(st.tuples(keys, st.one_of(st.just(rows), _LINE_VALUE)), max_size=4)))
    if isinstance(doc, list) and doc and all(isinstance(kv, tuple) for kv in doc):   # an object, keys repeated
        text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in doc) + "}"
    else:
        text = json.dumps(doc, indent=draw(st.sampled_from([None, 1, "\t"])), ensure_ascii=draw(st.booleans()))
    text = re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
    text = text.replace("\n", draw(st.sampled_from(["\n", "\r\n", "\r"])))
    text = draw(st.sampled_from(["", " ", "\r\n"])) + text + draw(st.sampled_from(["", "", "\n", "\r\n\t", " x", ",", "\ufeff"]))
    data = text.encode()
    if draw(st.integers(0, 4)) == 0:
        data = draw(mutated(data))
    return data, draw(st.sampled_from([1, 2, 3, 7, 20, 70, 200, 1 << 20])), draw(st.integers(1, 13)), \
        draw(st.integers(0, 8))


def check_json_document(item, dirpath: Path) -> str:
    """:mod:`loramix.data.jsondoc` (tiny sizes, every document) vs the ``json.loads`` path."""
    from loramix.data import jsondoc as jd
    from loramix.data import jsonstream as js
    from loramix.data import readers

    data, window, block, span = item
    f = fresh(dirpath, ".json")
    f.write_bytes(data)

    def records():
        try:
            return [r for b in readers.iter_records(f) for r in b]
        except readers.DatasetError as e:
            assert str(f) in str(e), f"error does not name the file: {e}"
            return None

    saved = jd.LONG_DOC, jd.WINDOW, js.BLOCK, js.SPAN
    try:
        want = records()
        jd.LONG_DOC, jd.WINDOW, js.BLOCK, js.SPAN = 0, window, block, span
        got = records()
        assert (got is None) == (want is None), (data, got, want)
        if got is None:
            return "refused"
        assert len(got) == len(want) and all(same_json(g, w) for g, w in zip(got, want)), (data, got, want)
        lazy = [r for b in readers._iter_file(f, 10, ("input", "output"), lazy=True) for r in b]
        for r, w in zip(lazy, want, strict=True):
            assert list(r) == list(w)
            for k in set(r) & {"input", "output"}:
                assert str(js.LongText([readers._text(r[k])])) == readers._text(w[k]), (data, k)
        return "accepted"
    finally:
        jd.LONG_DOC, jd.WINDOW, js.BLOCK, js.SPAN = saved
        f.unlink()


def copy_bank(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst
