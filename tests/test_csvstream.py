"""A long CSV record is parsed in bounded memory with the csv module's result (issue 10 #10).

The long-record path (``loramix.data.csvstream``) takes every record over ``LONG_RECORD`` bytes;
here the sizes are made tiny so that short records take it, blocks end at every byte of a
quote pair, a line end or a UTF-8 sequence, and most fields stay in the file as spans. The
oracle is ``csv.reader`` / ``csv.DictReader`` on the file opened with ``newline=""`` and
``encoding="utf-8-sig"`` (what the reader did before).
"""
from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import numpy as np
import pytest

from loramix.data import csvstream as cs
from loramix.data import jsonstream
from loramix.data import readers
from loramix.profiles import tokens

SHIPPED = Path(__file__).resolve().parents[1] / "python/loramix/minibank/shipped/base/tokenizer.json"

DOCUMENTS = [
    'input,output\r\n"a,""b""\r\nc",d\n"e"f,g"h"\r\n',          # quotes doubled, CRLF inside quotes, text after a quote
    'input,output\n\n\r\n x "y",z\n,\n"",""\n"\n',                # empty lines skipped, quote mid-field, unclosed quote
    '\ufeffinput,output\rone,two\r\r"3\r\n4","5\r"\r',            # byte-order mark, CR line ends
    'input,output\nlast,"open quote to the end\n',
    'input,output,x\na\nb,c,d,e,f\n"é日本語🙂","\ufeff"\n',      # short and long rows, unicode, a BOM inside
    'input,input\n1,2\n"q""",\n',                                  # a duplicate name: the last wins
    'input,output\nno line end,"at the end"',
    '\ninput,output\nx,y\n',                                       # an empty first line: no field names
    '',
    '\ufeff',
]
SIZES = [(1, 1, 0), (2, 3, 1), (5, 2, 4), (13, 7, 2), (1 << 22, 1 << 20, 1 << 16)]


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def oracle(path, reader=csv.reader):
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return list(reader(fh))


def joined(row):
    return [v if isinstance(v, str) else "".join(v) for v in row]


@pytest.fixture
def sizes(monkeypatch):
    def set_sizes(long_record, block, span):
        monkeypatch.setattr(cs, "LONG_RECORD", long_record)
        monkeypatch.setattr(cs, "BLOCK", block)
        monkeypatch.setattr(cs, "SPAN", span)
    return set_sizes


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("doc", range(len(DOCUMENTS)))
def test_rows_and_records_are_the_csv_modules(tmp_path, sizes, size, doc):
    f = write(tmp_path / "d.csv", DOCUMENTS[doc])
    sizes(*size)
    assert [joined(r) for r in cs.rows(f)] == oracle(f)
    assert [r for b in readers.iter_records(f) for r in b] == oracle(f, csv.DictReader)


def test_every_block_boundary_and_cut(tmp_path, sizes):
    """csv.writer's output for awkward values, read with every block size from 1 to 9 bytes."""
    values = ['a""b', '"', '""', "x,\r\n,y", "\r", "\n\r", "é\r\n日🙂", " ", "", "a" * 30, '"start', 'end"']
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([["input", "output"]] + [[a, b] for a in values for b in values[:4]])
    f = write(tmp_path / "d.csv", buf.getvalue())
    want = oracle(f)
    for block in range(1, 10):
        sizes(1, block, 2)
        assert [joined(r) for r in cs.rows(f)] == want, block


def test_short_records_stay_on_the_csv_modules_path(tmp_path, monkeypatch):
    f = write(tmp_path / "d.csv", "input,output\n" + "".join(f'"row {i}\nof two lines",{i}\n' for i in range(500)))

    def refuse(*a):
        raise AssertionError("a short record reached the long-record path")

    monkeypatch.setattr(cs, "_Blocks", refuse)
    assert [r for b in readers.iter_records(f) for r in b] == oracle(f, csv.DictReader)


def test_a_long_record_among_short_ones(tmp_path, sizes):
    """Records before and after a long one go through the csv module; the long one is parsed in
    blocks, its long field kept as a span and its short ones as str."""
    long = "word, \"quoted\" and\r\nmore " * 200
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([["input", "output", "x"], ["a", "b", "c"], [long, "short", "1"], ["d\ne", "f", "g"]])
    f = write(tmp_path / "d.csv", buf.getvalue())
    sizes(1000, 97, 100)
    got = list(cs.rows(f))
    assert [joined(r) for r in got] == oracle(f)
    assert [type(v).__name__ for v in got[2]] == ["CsvSpan", "str", "str"] and got[2][0].line == 3
    assert all(isinstance(v, str) for r in got[:2] + got[3:] for v in r)
    texts = [t for b in readers.iter_texts(f, long_texts=True) for t in b]
    assert isinstance(texts[1], jsonstream.LongText) and str(texts[1]) == long + "short"
    assert [t for b in readers.iter_texts(f) for t in b] == ["ab", long + "short", "d\nef"]


@pytest.mark.parametrize("size", [(1 << 22, 1 << 20, 1 << 16), (1, 3, 2)])
def test_errors_name_the_file_and_the_line(tmp_path, sizes, size):
    sizes(*size)
    f = tmp_path / "d.csv"
    f.write_bytes(b'input,output\r\n"a\r\nb",c\n\rx,"y\n\xff z"\n')     # the bad byte is on line 6
    with pytest.raises(readers.DatasetError, match=r"d\.csv: line 6 is not CSV \('utf-8' codec"):
        list(cs.rows(f))
    with pytest.raises(readers.DatasetError, match=r"d\.csv: line 6 is not CSV \('utf-8' codec"):
        list(readers.iter_texts(f))


@pytest.mark.parametrize("size", [(1 << 22, 1 << 20, 1 << 16), (1, 2, 1)])
def test_the_field_size_limit_is_the_csv_modules(tmp_path, sizes, size):
    sizes(*size)
    f = write(tmp_path / "d.csv", 'input\n"0123456789"\n"01234567890"\n')
    old = csv.field_size_limit(10)
    try:
        with pytest.raises(csv.Error):
            oracle(f)
        with pytest.raises(readers.DatasetError, match=r"line 3 is not CSV \(field larger than field limit \(10\)\)"):
            list(cs.rows(f))
    finally:
        csv.field_size_limit(old)


def test_a_file_changed_under_a_span_is_an_error(tmp_path, sizes):
    f = write(tmp_path / "d.csv", 'input,output\n"' + "long text " * 50 + '",x\n')
    sizes(10, 16, 20)
    row = list(cs.rows(f))[1]
    f.write_bytes(f.read_bytes().replace(b'",x', b'x",'))
    with pytest.raises(readers.DatasetError, match=r"d\.csv: line 2 changed while it was read"):
        "".join(row[0])


@pytest.mark.parametrize("ascii_only", [True, False])
def test_a_long_csv_field_profiles_like_the_csv_module_and_whole_text(tmp_path, monkeypatch, ascii_only):
    """Issue 10 #10: a long CSV record read in blocks (``LONG_RECORD`` lowered) gives the profile
    of the same texts read by the csv module, and the counts of the tokenizer on each whole text."""
    rng = random.Random(3)
    words = ["the", "cat", "Hello,", '"quoted"', "line\r\nend", "123", "naïve" if not ascii_only else "naive",
             "日本語" if not ascii_only else "jp", "don't", "\n", "  "]
    texts = [" ".join(rng.choice(words) for _ in range(n)) for n in (40000, 3, 5000)]
    buf = io.StringIO(newline="")
    csv.writer(buf).writerows([["input", "output"], [texts[0], "the answer"], [texts[1], "x"], [texts[2], ""]])
    data = write(tmp_path / "d.csv", buf.getvalue())
    normal = tokens.build_profile(data, SHIPPED).save(tmp_path / "normal.npz")

    monkeypatch.setattr(cs, "LONG_RECORD", 1000)
    monkeypatch.setattr(cs, "BLOCK", 4099)
    monkeypatch.setattr(cs, "SPAN", 512)
    spans = [v for r in cs.rows(data) for v in r if isinstance(v, cs.CsvSpan)]
    assert len(spans) == 2
    streamed = tokens.build_profile(data, SHIPPED)
    assert streamed.save(tmp_path / "streamed.npz").read_bytes() == normal.read_bytes()

    tok = tokens.load_tokenizer(SHIPPED)
    want = np.zeros(streamed.vocab_size, np.int64)
    for r in oracle(data, csv.DictReader):
        want += np.bincount(tok.encode(r["input"] + r["output"]).ids, minlength=streamed.vocab_size)
    np.testing.assert_array_equal(streamed.dense(np.int64), want)
    assert streamed.n_examples == 3
