"""CSV read in bounded memory: a long record is parsed from the file in blocks, its long fields
left in the file.

The ``csv`` module builds each field in a buffer of 4 bytes per character and then a str: a
200 MB field costs over a GB. :func:`rows` reads a CSV file as
``csv.reader(open(path, newline="", encoding="utf-8-sig"))`` does (the excel dialect: ``,``,
``"`` quotes doubled inside quoted fields, no escape character, not strict), and
:func:`records` as ``csv.DictReader`` on it. Records go through the ``csv`` module itself
(the fast path) until one passes :data:`LONG_RECORD` bytes; that record is parsed again here
from its first byte, in blocks of :data:`BLOCK` bytes, and the next one goes back to the
``csv`` module. A field of more than :data:`SPAN` characters is decoded piece by piece (so it
is checked) and kept as a :class:`CsvSpan`, decoded again each time it is iterated.

What the long path gives is the ``csv`` module's, which reads lines (split at CR, LF, CRLF) and
runs a state machine over their characters; with such lines it amounts to:

- a record starting with CR or LF is empty (``[]``; ``DictReader`` skips it);
- a field starting with ``"`` is quoted: up to the next lone ``"``, with ``""`` read as ``"``,
  CR and LF kept; what follows a closing quote up to ``,``/CR/LF is added as is; the end of
  the file inside quotes ends the field and the record;
- any other field runs to the next ``,``, CR or LF, quotes in it kept as they are;
- a record ends at CR, LF or CRLF outside quotes (one line end), or at the end of the file;
- a field of more than ``csv.field_size_limit()`` characters is an error, and on Python 3.10
  a NUL character is ("line contains NUL").

Errors: a :class:`~loramix.data.errors.DatasetError` naming the file and the line, for text
that is not UTF-8 and for the ``csv`` module's errors. Memory: a few :data:`BLOCK` s, plus
the fields up to :data:`SPAN` characters and the field names (kept whole).
"""
from __future__ import annotations

import codecs
import csv
import re
import sys
from pathlib import Path
from typing import Iterator

from loramix.data.errors import DatasetError
from loramix.data.jsonstream import Span

__all__ = ["LONG_RECORD", "BLOCK", "SPAN", "CsvSpan", "rows", "records"]

#: a record longer than this (bytes) is parsed here rather than by the ``csv`` module
LONG_RECORD = 1 << 22
#: bytes read at a time by the long path
BLOCK = 1 << 20
#: a field of more characters than this is kept in the file (a :class:`CsvSpan`)
SPAN = 1 << 16

_QUOTED = re.compile(rb'[^"]*(?:""[^"]*)*')     # quoted content: up to a lone quote
_UNQUOTED = re.compile(rb"[^,\r\n]*")
_NUL = sys.version_info < (3, 11)                # 3.10's reader refuses a NUL character
_COMMA, _QUOTE, _CR, _LF = 0x2C, 0x22, 0x0D, 0x0A


class _Long(Exception):
    """Raised through the ``csv`` module's reader: the record is long, parse it here."""


class _Blocks:
    """A binary file from byte ``start`` on, read in blocks: ``buf[pos]`` is the next byte,
    ``base`` the file offset of ``buf[0]``; ``lines``: line ends passed inside quoted fields
    and between records."""

    def __init__(self, fh, start: int):
        fh.seek(start)
        self.fh, self.buf, self.base, self.pos, self.eof = fh, b"", start, 0, False
        self.lines, self.cr, self.end = 0, False, b""

    @property
    def at(self) -> int:
        return self.base + self.pos

    def more(self) -> bool:
        """Read a block, dropping the bytes before pos; False at the end of the file."""
        data = b"" if self.eof else self.fh.read(BLOCK)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data
        self.base += self.pos
        self.pos = 0
        return True

    def peek(self):
        if self.pos >= len(self.buf) and not self.more():
            return None
        return self.buf[self.pos]

    def newline(self) -> None:
        """Pass the line end at pos: CRLF, CR or LF."""
        c = self.peek()
        self.pos += 1
        self.lines += 1
        if c == _CR and self.peek() == _LF:
            self.pos += 1

    def _count(self, raw: bytes) -> None:
        """Count the line ends in raw quoted content (CRLF once, even across pieces)."""
        self.lines += raw.count(b"\n") + raw.count(b"\r") - raw.count(b"\r\n") - (self.cr and raw[:1] == b"\n")
        self.cr = raw[-1:] == b"\r"

    def field(self) -> Iterator[str]:
        """The content of the field at pos, decoded in pieces (``""`` read as ``"``); pos ends
        at what ends it, ``end``: ``b","``, ``b"\n"`` (a CR or LF) or ``b""`` (the end of the file)."""
        dec = codecs.getincrementaldecoder("utf-8")()
        for raw in self._raw_field():
            if raw is None:       # a closing quote: no UTF-8 sequence runs across it
                dec.decode(b"", final=True)
                continue
            if _NUL and b"\0" in raw:
                raise csv.Error("line contains NUL")
            yield dec.decode(raw)
        dec.decode(b"", final=True)

    def _raw_field(self) -> Iterator[bytes | None]:
        self.end = b""
        if self.peek() == _QUOTE:
            self.pos += 1
            self.cr = False
            while True:
                e = _QUOTED.match(self.buf, self.pos).end()
                if e > self.pos:
                    raw = self.buf[self.pos:e]
                    self._count(raw)
                    yield raw.replace(b'""', b'"')
                self.pos = e
                if e + 1 >= len(self.buf):      # the closing quote, or what follows it, not in hand
                    if self.more():
                        continue
                    self.pos = len(self.buf)    # the end of the file, inside quotes or after them
                    return
                c = self.buf[e + 1]
                self.pos = e + 1
                if c == _COMMA:
                    self.end = b","
                    return
                if c == _CR or c == _LF:
                    self.end = b"\n"
                    return
                yield None
                break                           # "a"b: what follows is added as is
        while True:
            e = _UNQUOTED.match(self.buf, self.pos).end()
            if e > self.pos:
                yield self.buf[self.pos:e]
            self.pos = e
            if e < len(self.buf):
                self.end = b"," if self.buf[e] == _COMMA else b"\n"
                return
            if not self.more():
                return

    def value(self, path: Path, line: int, limit: int):
        """The field at pos: a str, or a :class:`CsvSpan` when it has more than :data:`SPAN`
        characters."""
        start = self.at
        parts, chars, blank = [], 0, True
        for d in self.field():
            chars += len(d)
            blank = blank and (not d or d.isspace())
            if parts is not None and chars <= SPAN:
                parts.append(d)
            else:
                parts = None
            if chars > limit:
                raise csv.Error(f"field larger than field limit ({limit})")
        if parts is None:
            return CsvSpan(path, line, start, self.at, blank)
        return "".join(parts)

    def record(self, path: Path, line: int, limit: int) -> list | None:
        """The record at pos (``[]`` for an empty line, None at the end of the file)."""
        c = self.peek()
        if c is None:
            return None
        if c == _CR or c == _LF:
            self.newline()
            return []
        fields = []
        while True:
            fields.append(self.value(path, line, limit))
            if self.end == b",":
                self.pos += 1
                continue
            if self.end:
                self.newline()
            return fields


class CsvSpan(Span):
    """A CSV field left in its file: raw bytes ``start:end`` of the record starting on line
    ``line`` (checked when the record was read). Iterating decodes it again, piece by piece."""

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as fh:
            b = _Blocks(fh, self.start)
            try:
                yield from b.field()
                ok = b.at == self.end
            except ValueError:
                ok = False
            if not ok:
                raise DatasetError(f"dataset {self.path}: line {self.line} changed while it was read; "
                                   "run again on a file that is not being written")

    def __repr__(self) -> str:
        return f"CsvSpan({str(self.path)!r}, line={self.line}, bytes {self.start}:{self.end})"


class _Reader:
    """The file's lines for the ``csv`` module, as text mode with ``newline=""`` splits them,
    counted in bytes (``offset``) and lines (``fed``) from the current record's first byte
    (``start``) and line (``line``, the lines before it)."""

    def __init__(self, fh):
        self.fh = fh
        # utf-8-sig drops a leading byte-order mark, and reads a file that is a part of one as empty
        head = fh.read(3)
        self.offset = self.start = len(head) if codecs.BOM_UTF8.startswith(head) else 0
        fh.seek(self.offset)
        self.fed = self.line = 0

    def lines(self) -> Iterator[str]:
        fh = self.fh
        while raw := fh.readline(LONG_RECORD):
            subs = raw.splitlines(True) if b"\r" in raw else [raw]
            if len(raw) == LONG_RECORD and raw[-1] != _LF:     # its last line may go on
                if len(subs) == 1:
                    raise _Long
                del subs[-1]
                fh.seek(self.offset + sum(map(len, subs)))
            for sub in subs:
                self.offset += len(sub)
                self.fed += 1
                if self.offset - self.start > LONG_RECORD:
                    raise _Long
                yield sub.decode("utf-8")

    def done(self) -> None:
        """The ``csv`` module has returned a record: the next one starts here."""
        self.start, self.line = self.offset, self.fed


def rows(path) -> Iterator[list]:
    """The rows of the CSV file ``path`` as ``csv.reader`` gives them on the file opened with
    ``newline=""`` and ``encoding="utf-8-sig"``, except that a field of more than :data:`SPAN`
    characters in a record of more than :data:`LONG_RECORD` bytes comes as a :class:`CsvSpan`."""
    path, limit = Path(path), csv.field_size_limit()
    with open(path, "rb") as fh:
        r = _Reader(fh)
        while True:
            try:
                for row in csv.reader(r.lines()):
                    r.done()
                    yield row
                return
            except _Long:
                pass
            except (csv.Error, UnicodeDecodeError) as e:
                raise DatasetError(f"dataset {path}: line {r.fed} is not CSV ({e})") from None
            b = _Blocks(fh, r.start)
            try:
                row = b.record(path, r.line + 1, limit)
            except (csv.Error, UnicodeDecodeError) as e:
                raise DatasetError(f"dataset {path}: line {r.line + 1 + b.lines} is not CSV ({e})") from None
            if row is None:
                return
            r.offset, r.fed = b.at, r.line + b.lines
            r.done()
            fh.seek(r.offset)
            yield row


def _str(v) -> str:
    return v if isinstance(v, str) else "".join(v)


def records(path, lazy: bool = False) -> Iterator[dict]:
    """The records of the CSV file ``path`` as ``csv.DictReader`` gives them (the first row
    names the fields; empty rows skipped; extra values under the key None, missing ones None).
    ``lazy``: long fields stay :class:`CsvSpan` s; otherwise every value is a str."""
    it = rows(path)
    names = next(it, None)
    if names is None:
        return
    names = [_str(v) for v in names]
    n = len(names)
    for row in it:
        if not row:
            continue
        if not lazy:
            row = [_str(v) for v in row]
        d = dict(zip(names, row))
        if n < len(row):
            d[None] = row[n:]
        elif n > len(row):
            for key in names[len(row):]:
                d[key] = None
        yield d
