"""One long JSON line parsed in bounded memory: its long strings stay in the file.

``json.loads`` needs a line's text and its parsed strings at once, so a 200 MB example is held
twice. :func:`parse_line` reads one line of a JSON-lines file in blocks of :data:`BLOCK` bytes;
a string of more than :data:`SPAN` raw bytes is decoded piece by piece (so it is checked) and
kept as a :class:`Span`: where it sits in the file and whether it is blank. A
:class:`LongText` joins an example's text fields and decodes its spans again, piece by piece,
each time it is iterated. The JSON-lines reader sends a line here when it is longer than
:data:`LONG_LINE` bytes; shorter lines go to ``json.loads``. :func:`parse_value` does the
same for one value of a JSON document (:mod:`loramix.data.jsondoc`).

What is accepted, and every value, is what ``json.loads`` gives on the same line read in text
mode:

- a line ends at CR, LF or CRLF (text mode's universal newlines), and one holding only
  whitespace (``str.isspace``) is blank;
- strings are decoded by ``json``'s own ``scanstring``, in pieces cut only between escapes
  (never inside one, never between the two ``\\uXXXX`` halves of a surrogate pair, never inside
  a UTF-8 sequence), so the pieces join to ``json.loads``'s string;
- numbers, ``true``/``false``/``null`` and ``NaN``/``Infinity`` as ``json`` parses them;
  duplicate keys: the last value wins.

Errors are ``json.JSONDecodeError`` with ``json``'s messages (without the position), or
``UnicodeDecodeError`` for bytes that are not UTF-8. Memory: a few :data:`BLOCK` s, plus what is
kept: strings up to :data:`SPAN` raw bytes, keys, numbers, and the containers of kept values.
"""
from __future__ import annotations

import codecs
import json
import re
from json.decoder import scanstring
from pathlib import Path
from typing import Iterator

from loramix.data.errors import DatasetError

__all__ = ["LONG_LINE", "BLOCK", "SPAN", "Span", "LongText", "parse_line", "parse_value", "materialized"]

#: a JSON line longer than this (bytes) is parsed here
LONG_LINE = 1 << 22
#: bytes read at a time; raw string bytes are decoded about this many at once
BLOCK = 1 << 20
#: a string with more raw bytes than this is kept in the file (a :class:`Span`)
SPAN = 1 << 16

_WS = re.compile(rb"[ \t]*")
_WS_DOCUMENT = re.compile(rb"[ \t\r\n]*")
_EOL = re.compile(rb"[\r\n]")
_STRING_STOP = re.compile(rb'["\r\n]')
_NUMBER = re.compile(rb"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")
_LITERALS = ((b"null", None), (b"true", True), (b"false", False), (b"NaN", float("nan")),
             (b"Infinity", float("inf")), (b"-Infinity", float("-inf")))
_BACKSLASH = 0x5C


def _error(msg: str) -> json.JSONDecodeError:
    return json.JSONDecodeError(msg, "", 0)


def _cut(buf: bytes, lo: int, c: int) -> int:
    """The last position in ``(lo, c]`` where the raw string bytes ``buf[lo:]`` (``lo`` being
    such a position) can be cut so that both sides decode alone: outside every escape, not
    between the halves of a ``\\uXXXX`` surrogate pair, not inside a UTF-8 sequence. ``lo``
    when there is none. ``c < len(buf)``."""
    while c > lo:
        while c > lo and buf[c] & 0xC0 == 0x80:     # a UTF-8 continuation byte
            c -= 1
        j = buf.rfind(b"\\", max(lo, c - 6), c)
        if j < 0:
            return c     # no escape starts in the 6 bytes before c (\uXXXX is 6): c follows a character
        # In valid JSON an escape starts at the first backslash of a run (the byte before it,
        # not a backslash, ends whatever came before) and every two bytes after it.
        k = j
        while k > lo and buf[k - 1] == _BACKSLASH:
            k -= 1
        p = k + (j + 1 - k) // 2 * 2
        if p > lo and not (p == k and p - 6 >= lo and _HIGH_SURROGATE.match(buf, p - 6)):
            return p
        c = p - 1          # right after a high surrogate's escape (or at lo): look further back
    return lo


def _decode(raw: bytes) -> str:
    return scanstring(raw.decode("utf-8") + '"', 0)[0]


class _Line:
    """One line of a binary file from byte ``start`` on, read in blocks: ``buf[pos]`` is the
    next byte, ``base`` the file offset of ``buf[0]``. The line ends at CR or LF (or the end)."""

    WS = _WS

    def __init__(self, fh, start: int):
        fh.seek(start)
        self.fh, self.buf, self.base, self.pos, self.eof = fh, b"", start, 0, False

    def more(self, keep: int) -> int:
        """Read a block, dropping the bytes before ``keep``: the shift of every index, -1 at the end."""
        data = b"" if self.eof else self.fh.read(BLOCK)
        if not data:
            self.eof = True
            return -1
        self.buf = self.buf[keep:] + data
        self.base += keep
        self.pos -= keep
        return keep

    def peek(self):
        if self.pos >= len(self.buf) and self.more(self.pos) < 0:
            return None
        return self.buf[self.pos]

    def ws(self) -> None:
        while True:
            self.pos = self.WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.more(self.pos) < 0:
                return

    def next_line(self) -> int:
        """The offset of the next line (pos at this one's end of line)."""
        c = self.peek()
        if c is not None:
            self.pos += 1
            if c == 0x0D and self.peek() == 0x0A:
                self.pos += 1
        return self.base + self.pos

    def rest_is_space(self) -> bool:
        """Whether the line from pos to its end is whitespace (``str.isspace``); pos ends there."""
        dec, space = codecs.getincrementaldecoder("utf-8")(), True
        while True:
            m = _EOL.search(self.buf, self.pos)
            end = m.start() if m else len(self.buf)
            t = dec.decode(self.buf[self.pos:end], final=m is not None)
            space = space and (not t or t.isspace())
            self.pos = end
            if m or self.more(self.pos) < 0:
                dec.decode(b"", final=True)
                return space

    def raw_string(self) -> Iterator[bytes]:
        """The raw bytes of the string whose opening quote pos has just passed, in pieces that
        decode alone (at most about :data:`BLOCK` bytes each); pos ends past its closing quote."""
        lo = search = self.pos
        while True:
            m = _STRING_STOP.search(self.buf, search)
            if m is None:
                if len(self.buf) - lo > BLOCK:
                    c = _cut(self.buf, lo, len(self.buf) - 1)
                    if c > lo:
                        yield self.buf[lo:c]
                        lo = c
                search = len(self.buf)
                shift = self.more(lo)
                if shift < 0:
                    raise _error("Unterminated string starting at")
                lo, search = lo - shift, search - shift
                continue
            q = m.start()
            if self.buf[q] != 0x22:     # the line ends inside the string
                raise _error("Invalid control character at")
            k = q
            while k > lo and self.buf[k - 1] == _BACKSLASH:
                k -= 1
            if (q - k) % 2:             # an escaped quote
                search = q + 1
                continue
            yield self.buf[lo:q]
            self.pos = q + 1
            return

    def string(self, path, line: int, keep: bool, whole: bool = False):
        """The string at pos (its opening quote): a str; a :class:`Span` when it has more than
        :data:`SPAN` raw bytes (unless ``whole``); None when not ``keep`` (only checked)."""
        self.pos += 1
        start = self.base + self.pos
        parts, size, blank = [], 0, True
        for raw in self.raw_string():
            d = _decode(raw)
            size += len(raw)
            blank = blank and (not d or d.isspace())
            if parts is not None and (whole or size <= SPAN):
                parts.append(d)
            else:
                parts = None
        if not keep:
            return None
        if parts is None:
            return Span(Path(path), line, start, self.base + self.pos - 1, blank)
        return parts[0] if len(parts) == 1 else "".join(parts)

    def value(self, path, line: int, keep: bool, only=None):
        """The JSON value at pos (None when not ``keep``: only checked); an object keeps the
        values of the keys in ``only`` alone when it is given."""
        c = self.peek()
        if c == 0x22:
            return self.string(path, line, keep)
        if c == 0x7B or c == 0x5B:
            return self.container(path, line, keep, only, c == 0x7B)
        self.ensure(16)
        for word, v in _LITERALS:
            if self.buf.startswith(word, self.pos):
                self.pos += len(word)
                return v
        while True:
            m = _NUMBER.match(self.buf, self.pos)
            if m is None:
                raise _error("Expecting value")
            # final once 3 bytes follow it (".5", "e+5" may still come) or at the end of the file
            if len(self.buf) - m.end() > 3 or self.more(self.pos) < 0:
                break
        self.pos = m.end()
        i, f, e = m.groups()
        return float(i + (f or b"") + (e or b"")) if f or e else int(i)

    def ensure(self, n: int) -> None:
        while len(self.buf) - self.pos < n and self.more(self.pos) >= 0:
            pass

    def container(self, path, line: int, keep: bool, only, is_object: bool):
        close = 0x7D if is_object else 0x5D
        out = ({} if is_object else []) if keep else None
        self.pos += 1
        self.ws()
        if self.peek() == close:
            self.pos += 1
            return out
        while True:
            self.ws()
            if is_object:
                if self.peek() != 0x22:
                    raise _error("Expecting property name enclosed in double quotes")
                key = self.string(path, line, True, whole=True)
                self.ws()
                if self.peek() != 0x3A:
                    raise _error("Expecting ':' delimiter")
                self.pos += 1
                self.ws()
                v = self.value(path, line, keep and (only is None or key in only))
                if keep:
                    out[key] = v
            else:
                v = self.value(path, line, keep)
                if keep:
                    out.append(v)
            self.ws()
            c = self.peek()
            self.pos += 1
            if c == close:
                return out
            if c != 0x2C:
                raise _error("Expecting ',' delimiter")


def parse_line(path, fh, start: int, line: int, only=None) -> tuple[object, bool, int]:
    """Parse line number ``line`` of the JSON-lines file ``path`` (open in binary as ``fh``),
    which starts at byte ``start``: ``(value, blank, next)``. ``blank``: the line holds only
    whitespace (no value); ``next``: the offset of the following line. Strings over
    :data:`SPAN` raw bytes come as :class:`Span` s; of a top-level object only the values of the
    keys in ``only`` are kept when it is given (the others are None, checked all the same)."""
    r = _Line(fh, start)
    try:
        r.ensure(3)
        if r.buf.startswith(codecs.BOM_UTF8):
            raise _error("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        r.ws()
        value = r.value(path, line, True, only) if r.peek() == 0x7B else r.value(path, line, False)
        r.ws()
        c = r.peek()
        if c is not None and c not in b"\r\n":
            raise _error("Extra data")
    except json.JSONDecodeError:
        r = _Line(fh, start)
        if r.rest_is_space():
            return None, True, r.next_line()
        raise
    return value, False, r.next_line()


class _Document(_Line):
    """A JSON document: line ends are whitespace between values."""

    WS = _WS_DOCUMENT


def parse_value(path, fh, start: int, keep: bool = True, only=None) -> tuple[object, int]:
    """The JSON value at byte ``start`` of the JSON document ``path`` (open in binary as ``fh``),
    read in blocks: ``(value, next)``, ``next`` the offset just after it. As :func:`parse_line`:
    strings over :data:`SPAN` raw bytes come as :class:`Span` s (line 0), an object keeps only
    the values of the keys in ``only`` when it is given, nothing is kept without ``keep``.
    A ``json.JSONDecodeError``'s ``pos`` is the offset in the file where it was found."""
    r = _Document(fh, start)
    try:
        value = r.value(path, 0, keep, only)
    except json.JSONDecodeError as e:
        raise _at(e.msg, r.base + r.pos) from None
    return value, r.base + r.pos


def _at(msg: str, pos: int) -> json.JSONDecodeError:
    e = _error(msg)
    e.pos = pos
    return e


class Span:
    """A JSON string left in its file: raw bytes ``start:end`` of line ``line`` (checked when
    the line was parsed). Iterating decodes it again, piece by piece."""

    def __init__(self, path: Path, line: int, start: int, end: int, blank: bool):
        self.path, self.line, self.start, self.end, self.blank = path, line, start, end, blank

    def __iter__(self) -> Iterator[str]:
        with open(self.path, "rb") as fh:
            r = _Line(fh, self.start)
            try:
                for raw in r.raw_string():
                    yield _decode(raw)
                ok = r.base + r.pos - 1 == self.end
            except ValueError:
                ok = False
            if not ok:
                where = f"line {self.line}" if self.line else f"bytes {self.start}:{self.end}"
                raise DatasetError(f"dataset {self.path}: {where} changed while it was read; "
                                   "run again on a file that is not being written")

    def __repr__(self) -> str:
        return f"Span({str(self.path)!r}, line={self.line}, bytes {self.start}:{self.end})"


class LongText:
    """An example's text as parts (str and :class:`Span`): iterating yields it in pieces, each
    span decoded again; ``str()`` joins it; ``blank``: empty or only whitespace."""

    def __init__(self, parts):
        self.parts = tuple(parts)

    @property
    def blank(self) -> bool:
        return all(p.blank if isinstance(p, Span) else (not p or p.isspace()) for p in self.parts)

    def __iter__(self) -> Iterator[str]:
        for p in self.parts:
            if isinstance(p, str):
                yield p
            else:
                yield from p

    def __str__(self) -> str:
        return "".join(self)


def materialized(value):
    """``value`` with every :class:`Span` in it decoded to a str (as ``json.loads`` gives it)."""
    if isinstance(value, Span):
        return "".join(value)
    if isinstance(value, dict):
        return {k: materialized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [materialized(v) for v in value]
    return value
