"""A long JSON line is parsed in bounded memory with ``json.loads``'s result (issue 10 #10).

The streaming parser (``loramix.data.jsonstream``) takes every line over ``LONG_LINE`` bytes; here
``LONG_LINE``, ``BLOCK`` and ``SPAN`` are made tiny so that short lines take it, blocks end at
every byte of an escape or a UTF-8 sequence, and most strings stay in the file as spans. The
oracle is ``json.loads`` on the line as text mode reads it.
"""
from __future__ import annotations

import json
import re

import pytest

from _fuzz import same_json
from loramix.data import jsonstream as js
from loramix.data import readers

ESCAPES = 'plain "quoted" back\\slash /slash \b\f\n\r\t tab\x01 é ß 日本語 \U0001F600 \U00010348 \u2028 \ud800 lone'


@pytest.fixture
def stream(monkeypatch):
    """Every line streamed, in 1-byte blocks, strings of more than 3 raw bytes kept as spans."""
    def set_sizes(block=1, span=3, long_line=2):
        monkeypatch.setattr(js, "BLOCK", block)
        monkeypatch.setattr(js, "SPAN", span)
        monkeypatch.setattr(js, "LONG_LINE", long_line)
    set_sizes()
    return set_sizes


def lines_of(path):
    """The oracle: each text-mode line that is not blank, through ``json.loads``."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if not line.isspace()]


def write(path, text: str):
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return path


RECORDS = [
    {"input": ESCAPES * 3, "output": ["first " + ESCAPES, "second"], "id": 7},
    {"output": "é" * 40, "input": "\U0001F600" * 30, "nums": [0, -1, 2.5, 1e300, -0.0, 12345678901234567890],
     "lits": [True, False, None, float("nan"), float("inf"), float("-inf")], "deep": {"a": [{"b": [[]]}, {}]}},
    {"input": "", "output": "", "": "empty key", "dup": 1},
    {"input": "\\" * 33 + '"' * 5 + "\\", "output": "\ud83d\ude00 \udbff\udfff \ud800\ud800 \udc00"},
]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 6, 7, 11, 13])
@pytest.mark.parametrize("ascii_only", [True, False])
def test_records_equal_json_loads(tmp_path, stream, block, ascii_only):
    stream(block=block)
    text = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in RECORDS)
    # lone surrogates cannot be UTF-8: as \uXXXX escapes beside the raw characters
    text = re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
    f = write(tmp_path / "d.jsonl", text.replace('"dup": 1', '"dup": 1, "dup": [2]'))
    got = [r for b in readers.iter_records(f) for r in b]
    want = lines_of(f)
    assert want[2]["dup"] == [2] and len(got) == len(RECORDS)
    assert all(same_json(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("block", [1, 4, 6, 12])
def test_long_strings_stay_in_the_file_and_decode_alike(tmp_path, stream, block):
    stream(block=block)
    f = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in RECORDS))
    lazy = [t for b in readers.iter_texts(f, long_texts=True) for t in b]
    assert isinstance(lazy[0], js.LongText) and any(isinstance(p, js.Span) for p in lazy[0].parts)
    assert isinstance(lazy[2], str)        # nothing long in it: a plain str
    want = [readers._text(r["input"]) + readers._text(r["output"]) for r in lines_of(f)]
    assert [str(t) for t in lazy] == want
    assert ["".join(t) for t in lazy] == want          # iterated again: decoded again
    assert [t for b in readers.iter_texts(f) for t in b] == want    # without long_texts: str


def test_normal_lines_are_read_as_before(tmp_path):
    """The reader now reads bytes: lines still end at CR, LF or CRLF, blank ones are skipped."""
    f = write(tmp_path / "d.jsonl", '{"input": "a", "output": "b"}\r{"input": "c", "output": "d"}\r\n'
                                    ' \t\n\x0c\r{"input": "e", "output": "\u2028f"}')
    assert [t for b in readers.iter_texts(f) for t in b] == ["ab", "cd", "e\u2028f"]


@pytest.mark.parametrize("long_line", [2, 1 << 20])
def test_line_endings_and_blank_lines_when_streamed(tmp_path, stream, long_line):
    stream(block=3, long_line=long_line)
    text = ('{"input": "a", "output": "b"}\r{"input": "c", "output": "d"}  \t\r\n'
            + " \t\x0c\u3000\u00a0" * 5 + '\n\r\n{"input": "e", "output": "f"}')
    f = write(tmp_path / "d.jsonl", text)
    assert [t for b in readers.iter_texts(f) for t in b] == ["ab", "cd", "ef"]


BAD_LINES = [
    '{"input": "a", "output": "b",}', '{"input" "a"}', '{"input": "a" "output": 1}', '["a" "b"]', '[1,]',
    '{"input": "\\x"}', '{"input": "\\u12g4"}', '{"input": "a\tb"}', '{"input": "a', '{"input": "a\rb"}',
    '{"input": "a"} x', '{"input": nul}', '{"input": 01}', '{"input": -}', '{1: 2}', '{', '{"a":',
    '\ufeff{"input": "a"}', '{"input": "a"}}', '{"input": "\\ud83d\\u"}', '{"input": tru}',
]


@pytest.mark.parametrize("bad", BAD_LINES)
def test_bad_lines_are_refused_with_json_words(tmp_path, stream, bad):
    stream(block=2)
    f = write(tmp_path / "d.jsonl", '{"input": "ok", "output": "fine"}\n' + bad + "\n")
    try:
        json.loads(bad.split("\r")[0] + "\n")     # the line as text mode reads it
    except json.JSONDecodeError as e:
        msg = e.msg
    with pytest.raises(readers.DatasetError) as err:
        list(readers.iter_texts(f))
    assert str(err.value) == f"dataset {f}: line 2 is not JSON ({msg})"


def test_not_an_object_and_not_utf8(tmp_path, stream):
    f = write(tmp_path / "a.jsonl", '["a list", "of strings"]\n')
    with pytest.raises(readers.DatasetError, match=r"a\.jsonl: line 1 is not a JSON object"):
        list(readers.iter_texts(f))
    g = tmp_path / "b.jsonl"
    g.write_bytes(b'{"input": "ok", "output": "x"}\n{"input": "caf\xe9", "output": "x"}\n')
    with pytest.raises(readers.DatasetError, match=r"b\.jsonl: cannot read it \('utf-8' codec"):
        list(readers.iter_texts(g))


def test_missing_field_is_named_in_a_long_line(tmp_path, stream):
    f = write(tmp_path / "d.jsonl", json.dumps({"input": "x" * 50, "answer": "y"}) + "\n")
    with pytest.raises(readers.DatasetError, match=r"example 1 has no field 'output' \(fields present: input, answer\)"):
        list(readers.iter_texts(f, long_texts=True))


def test_a_file_changed_after_its_line_was_read_is_refused(tmp_path, stream):
    f = write(tmp_path / "d.jsonl", json.dumps({"input": "a" * 50, "output": "b"}) + "\n")
    (text,) = [t for b in readers.iter_texts(f, long_texts=True) for t in b]
    f.write_text(json.dumps({"input": "a" * 20, "output": "b"}) + "\n")
    with pytest.raises(readers.DatasetError, match=r"line 1 changed while it was read"):
        str(text)


@pytest.mark.parametrize("raw", [b'\\\\\\"', b"ab\\u00e9\\ud83d\\ude00cd", b"\\ud83d\\ude00" * 5,
                                 b"\\\\" * 9, "日本\U0001F600".encode() * 3, b"\\n\\n\\t\\u2028" * 4])
def test_every_cut_decodes_to_the_whole(raw):
    """``_cut`` at every position of raw string bytes: both sides decode alone, and join to the whole."""
    whole = json.loads(b'"' + raw + b'"')
    for c in range(1, len(raw)):
        p = js._cut(raw, 0, c)
        assert 0 <= p <= c
        if p:
            assert js._decode(raw[:p]) + js._decode(raw[p:]) == whole, (raw, c, p)
