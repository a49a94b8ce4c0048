"""A .json document is read in bounded memory with json.loads's records (issue 10 #10).

The streaming reader (``loramix.data.jsondoc``) takes every document over ``LONG_DOC`` bytes;
here ``LONG_DOC`` is 0 and the windows and blocks are small, so that short documents take it,
values cross windows and strings stay in the file as spans. The oracle is the ``json.loads``
path of the same reader (``LONG_DOC`` left as it is).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from loramix.data import jsondoc, jsonstream, readers
from loramix.profiles import tokens

SHIPPED = Path(__file__).resolve().parents[1] / "python/loramix/minibank/shipped/base/tokenizer.json"
TEXT = 'plain "quoted" back\\slash \n\r\t é ß 日本語 \U0001F600 \u2028 ' * 3
ROWS = [{"input": TEXT, "output": ["first", "second"], "n": [1.5, -0.0, 1e300, None, True, 12345678901234567890]},
        {"output": "x", "input": ""}, {"input": "y", "output": {"nested": [TEXT]}}]


def write(path: Path, doc, **kw) -> Path:
    path.write_text(json.dumps(doc, **kw), encoding="utf-8")
    return path


def records(f):
    return [r for b in readers.iter_records(f) for r in b]


def loads_path(f):
    """The oracle: the json.loads path (the document under ``LONG_DOC``)."""
    saved = jsondoc.LONG_DOC
    jsondoc.LONG_DOC = 1 << 40
    try:
        return records(f)
    except readers.DatasetError as e:
        return str(e)
    finally:
        jsondoc.LONG_DOC = saved


@pytest.fixture
def stream(monkeypatch):
    def set_sizes(window=5, block=3, span=4):
        monkeypatch.setattr(jsondoc, "LONG_DOC", 0)
        monkeypatch.setattr(jsondoc, "WINDOW", window)
        monkeypatch.setattr(jsonstream, "BLOCK", block)
        monkeypatch.setattr(jsonstream, "SPAN", span)
    set_sizes()
    return set_sizes


DOCS = [ROWS, {"Instances": ROWS}, {"data": ROWS[:1], "Instances": 3, "rows": ROWS},
        None, [], {"examples": []}]      # (3: a duplicate key, written by hand below)


@pytest.mark.parametrize("sizes", [(1, 1, 0), (5, 3, 4), (70, 2, 8), (300, 7, 1), (1 << 20, 1 << 20, 1 << 16)])
@pytest.mark.parametrize("doc", range(len(DOCS)))
@pytest.mark.parametrize("indent", [None, 2])
def test_records_are_json_loads(tmp_path, stream, sizes, doc, indent):
    f = tmp_path / "d.json"
    if doc == 3:     # a duplicate key: the last one counts
        f.write_text('{"Instances": %s, "x": {"big": %s}, "Instances": %s}'
                     % (json.dumps(ROWS[:1]), json.dumps(TEXT), json.dumps(ROWS, indent=indent)))
    else:
        write(f, DOCS[doc], indent=indent, ensure_ascii=False)
    want = loads_path(f)
    stream(*sizes)
    assert records(f) == want and want == (ROWS[:1] if doc == 2 else [] if doc >= 4 else ROWS)


@pytest.mark.parametrize("text,line", [
    ('[{"input": "a"},\r\n {"input": "b"}\r\n 1 2]', 3),            # CRLF line ends
    ('[{"input": "a"},\r{"input": "b",\r"output": }]', 3),          # CR line ends
    ('{"Instances": [\n{"input": "a"}\n]\n}\n{"x": 1}', 5),           # extra data (and not JSON lines)
    ('[{"input": "unterminated\n', 1),
    ('\n\n[{"input": "a"},]', 3),
])
def test_errors_are_json_loads_with_the_line(tmp_path, stream, text, line):
    f = tmp_path / "d.json"
    f.write_bytes(text.encode())
    want = loads_path(f)
    assert f"d.json: line {line} is not JSON (" in want
    for sizes in [(5, 3, 4), (1 << 20, 1 << 20, 1 << 16)]:
        stream(*sizes)
        with pytest.raises(readers.DatasetError) as err:
            records(f)
        # the same file and line; json's words (which vary a little between Python versions)
        assert str(err.value).split(" (")[0] == want.split(" (")[0], (str(err.value), want)


def test_structure_errors_are_the_json_loads_paths(tmp_path, stream):
    for doc in ({"other": ROWS}, "text", [ROWS[0], 3], {"data": 3}):
        f = write(tmp_path / "d.json", doc)
        want = loads_path(f)
        assert isinstance(want, str) and str(f) in want
        stream()
        with pytest.raises(readers.DatasetError) as err:
            records(f)
        assert str(err.value) == want


def test_json_lines_in_a_json_file_are_still_read(tmp_path, stream):
    f = tmp_path / "d.json"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert loads_path(f) == ROWS
    assert records(f) == ROWS


def test_records_that_fit_a_window_use_jsons_scanner(tmp_path, monkeypatch):
    f = write(tmp_path / "d.json", {"data": [{"input": f"row {i}", "output": [i, 1.5]} for i in range(3000)]})
    monkeypatch.setattr(jsondoc, "LONG_DOC", 0)
    monkeypatch.setattr(jsondoc, "WINDOW", 4096)

    def refuse(*a, **k):
        raise AssertionError("a short record reached the streaming parser")

    monkeypatch.setattr(jsonstream, "parse_value", refuse)
    assert records(f) == loads_path(f)


def test_a_long_string_stays_in_the_file(tmp_path, stream):
    f = write(tmp_path / "d.json", [{"input": TEXT * 20, "output": "x"}, {"input": "a", "output": "b"}])
    stream(window=256, block=64, span=100)
    lazy = [r for b in readers._iter_file(f, 10, ("input", "output"), lazy=True) for r in b]
    assert isinstance(lazy[0]["input"], jsonstream.Span) and lazy[1] == {"input": "a", "output": "b"}
    texts = [t for b in readers.iter_texts(f, long_texts=True) for t in b]
    assert isinstance(texts[0], jsonstream.LongText) and str(texts[0]) == TEXT * 20 + "x"
    data = bytearray(f.read_bytes())
    data[data.rindex(b"back")] = ord('"')          # the string now ends earlier
    f.write_bytes(bytes(data))
    with pytest.raises(readers.DatasetError, match=r"d\.json: bytes \d+:\d+ changed while it was read"):
        str(texts[0])


@pytest.mark.parametrize("ascii_only", [True, False])
def test_a_long_json_document_profiles_like_json_loads_and_whole_text(tmp_path, monkeypatch, ascii_only):
    """Issue 10 #10: a .json document read by the streaming reader gives the profile file of the
    json.loads path byte for byte, and the counts of the tokenizer on each whole text."""
    rng = random.Random(5)
    words = ["the", "cat", "Hello,", '"q"', "é" if not ascii_only else "e", "日本" if not ascii_only else "jp",
             "don't", "\n", "  ", "123"]
    rows = [{"input": " ".join(rng.choice(words) for _ in range(n)), "output": ["the answer", "no"]}
            for n in (40000, 3, 5000)]
    data = write(tmp_path / "d.json", {"Instances": rows, "Definition": ["x"]}, ensure_ascii=ascii_only)
    normal = tokens.build_profile(data, SHIPPED).save(tmp_path / "normal.npz")

    monkeypatch.setattr(jsondoc, "LONG_DOC", 1000)
    monkeypatch.setattr(jsondoc, "WINDOW", 4099)
    monkeypatch.setattr(jsonstream, "BLOCK", 4099)
    monkeypatch.setattr(jsonstream, "SPAN", 512)
    lazy = [r for b in readers._iter_file(data, 10, ("input", "output"), lazy=True) for r in b]
    assert sum(isinstance(r["input"], jsonstream.Span) for r in lazy) == 2
    streamed = tokens.build_profile(data, SHIPPED)
    assert streamed.save(tmp_path / "streamed.npz").read_bytes() == normal.read_bytes()

    tok = tokens.load_tokenizer(SHIPPED)
    want = np.zeros(streamed.vocab_size, np.int64)
    for r in rows:
        want += np.bincount(tok.encode(r["input"] + r["output"][0]).ids, minlength=streamed.vocab_size)
    np.testing.assert_array_equal(streamed.dense(np.int64), want)
