"""A JSON document (a ``.json`` dataset) read in bounded memory: its records one at a time, its
long strings left in the file.

``json.loads`` holds the document's text and every parsed record at once. For a document
larger than :data:`LONG_DOC` bytes, :func:`locate` reads it once in windows of :data:`WINDOW`
bytes, checking it all, and finds its records: the top-level array, or the array under the
first of ``Instances``, ``instances``, ``data``, ``examples``, ``rows`` whose value is an
array (the last of duplicate keys counts, as in ``json.loads``'s dict); :func:`elements` then
reads that array's values again, one at a time. A value that fits in a window is parsed by
``json``'s own scanner (``JSONDecoder.raw_decode``); a longer one by
:func:`loramix.data.jsonstream.parse_value`, in blocks, its strings over
``jsonstream.SPAN`` raw bytes kept as :class:`~loramix.data.jsonstream.Span` s.

What is accepted, and every value, is ``json.loads``'s on the file read as UTF-8 text (a
leading byte-order mark is refused as ``json`` refuses it). Errors are ``json.JSONDecodeError``
with ``json``'s message, ``pos`` the byte offset and ``lineno`` the line (CR, LF, CRLF) where
it was found, or ``UnicodeDecodeError``. Memory: a few windows, one record, and, of the
top-level object, its keys.
"""
from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Iterator

from loramix.data import jsonstream
from loramix.data.errors import DatasetError

__all__ = ["LONG_DOC", "WINDOW", "RECORD_KEYS", "locate", "elements"]

#: a ``.json`` file larger than this (bytes) is read here; a smaller one by ``json.loads``
LONG_DOC = 1 << 22
#: bytes decoded at a time; a value shorter than about this is parsed by ``json``'s scanner
WINDOW = 1 << 20
#: the keys of a top-level object that may hold the list of records, in the order tried
RECORD_KEYS = ("Instances", "instances", "data", "examples", "rows")

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
# a value ending closer than this to the window's end is parsed again from a new window (a
# number may go on: "1" of "1.5", "-Inf" of "-Infinity")
_MARGIN = 64


class _Doc:
    """The document in a window of decoded text: ``text[idx]`` is the next character, ``base``
    the byte offset of ``text[0]``, ``eof``: the window reaches the end of the file."""

    def __init__(self, path: Path, fh):
        self.path, self.fh = path, fh
        self.text, self.idx, self.base, self.eof = "", 0, 0, False

    def seek(self, offset: int) -> None:
        """A new window at byte ``offset``."""
        self.fh.seek(offset)
        size = max(WINDOW, 4)           # (a whole UTF-8 character at least)
        data = self.fh.read(size)
        self.eof = len(data) < size
        dec = codecs.getincrementaldecoder("utf-8")()
        self.text, self.idx, self.base = dec.decode(data, final=self.eof), 0, offset

    def offset(self, idx: int | None = None) -> int:
        idx = self.idx if idx is None else idx
        return self.base + (idx if self.text.isascii() else len(self.text[:idx].encode("utf-8")))

    def refill(self) -> bool:
        """Move the window to start at idx; False at the end of the file."""
        if self.eof:
            return False
        self.seek(self.offset())
        return True

    def ws(self) -> None:
        while True:
            self.idx = _WS.match(self.text, self.idx).end()
            if self.idx < len(self.text) or not self.refill():
                return

    def peek(self) -> str | None:
        self.ws()
        return self.text[self.idx] if self.idx < len(self.text) else None

    def error(self, msg: str, offset: int | None = None) -> json.JSONDecodeError:
        e = json.JSONDecodeError(msg, "", 0)
        e.pos = self.offset() if offset is None else offset
        e.lineno = _line_at(self.fh, e.pos)
        return e

    def value(self, keep: bool = True, only=None):
        """The value at idx (whitespace passed): ``json``'s scanner on the window when it fits,
        else the streaming parser."""
        if not self.eof and len(self.text) - self.idx < _MARGIN:
            self.refill()
        for again in (False, True):
            try:
                v, end = _DECODER.raw_decode(self.text, self.idx)
                if self.eof or len(self.text) - end >= _MARGIN:
                    self.idx = end
                    return v
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.error(e.msg, self.offset(e.pos)) from None
            if again or self.idx == 0:
                break
            self.refill()               # a window that starts at the value
        try:
            v, after = jsonstream.parse_value(self.path, self.fh, self.offset(), keep, only)
        except json.JSONDecodeError as e:
            raise self.error(e.msg, e.pos) from None
        self.seek(after)
        return v

    def array(self, keep: bool = True, only=None) -> Iterator:
        """The values of the array at idx, one at a time; idx ends past its ``]``."""
        self.idx += 1
        if self.peek() == "]":
            self.idx += 1
            return
        while True:
            self.ws()
            yield self.value(keep, only)
            c = self.peek()
            self.idx += 1
            if c == "]":
                return
            if c != ",":
                raise self.error("Expecting ',' delimiter", self.offset(self.idx - 1))

    def top_object(self) -> dict:
        """Checks the object at idx: for each key, the offset of its value when that is an array."""
        found = {}
        self.idx += 1
        if self.peek() == "}":
            self.idx += 1
            return found
        while True:
            if self.peek() != '"':
                raise self.error("Expecting property name enclosed in double quotes")
            key = jsonstream.materialized(self.value())      # (a key is kept whole)
            if self.peek() != ":":
                raise self.error("Expecting ':' delimiter")
            self.idx += 1
            if self.peek() == "[":
                at = self.offset()
                for _ in self.array(False):
                    pass
            else:
                self.value(False)
                at = None
            found[key] = at
            c = self.peek()
            self.idx += 1
            if c == "}":
                return found
            if c != ",":
                raise self.error("Expecting ',' delimiter", self.offset(self.idx - 1))


def _line_at(fh, offset: int) -> int:
    """The line (1-based; CR, LF and CRLF end lines) of byte ``offset``."""
    fh.seek(0)
    n, left, cr = 1, offset, False
    while left > 0:
        data = fh.read(min(left, 1 << 20))
        if not data:
            break
        n += data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n") - (cr and data[:1] == b"\n")
        cr, left = data[-1:] == b"\r", left - len(data)
    return n


def locate(path) -> int:
    """Check the JSON document ``path`` whole and return the byte offset of its array of records.
    Raises ``json.JSONDecodeError`` (not JSON), ``UnicodeDecodeError``, or a
    :class:`~loramix.data.errors.DatasetError` for JSON that holds no list of records."""
    path = Path(path)
    with open(path, "rb") as fh:
        d = _Doc(path, fh)
        d.seek(0)
        if d.text.startswith("\ufeff"):
            raise d.error("Unexpected UTF-8 BOM (decode using utf-8-sig)", 0)
        c = d.peek()
        found, at = None, d.offset()
        if c == "[":
            for _ in d.array(False):
                pass
        elif c == "{":
            found = d.top_object()
        else:
            d.value(False)
        if d.peek() is not None:
            raise d.error("Extra data")
    if found is not None:
        for key in RECORD_KEYS:
            if found.get(key) is not None:
                return found[key]
        raise DatasetError(
            f"dataset {path}: a JSON object without a list of records (expected 'Instances' or 'data')")
    if c != "[":
        raise DatasetError(f"dataset {path}: expected a list of records")
    return at


def elements(path, at: int, only=None) -> Iterator:
    """The values of the array at byte ``at`` of the JSON document ``path`` (checked by
    :func:`locate`), one at a time; strings over ``jsonstream.SPAN`` raw bytes in a value
    longer than a window come as spans; of an object in such a value, only the keys in
    ``only`` keep their values when it is given."""
    path = Path(path)
    with open(path, "rb") as fh:
        d = _Doc(path, fh)
        d.seek(at)
        yield from d.array(True, only)
