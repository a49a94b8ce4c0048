"""Reading a dataset's text, streamed in batches.

Formats: JSON lines (``.jsonl``/``.ndjson``), JSON (a list of records, ``{"data": [...]}`` or
Lots-of-LoRAs' ``{"Instances": [...]}``), CSV, parquet, and folders: one written by HF
``datasets`` ``save_to_disk`` (``state.json`` + arrow files, or ``dataset_dict.json`` + split
folders), or any folder of data files (e.g. a dataset repo from the Hub).

Each example's text is its text fields concatenated in order (default ``input`` then ``output``,
as the paper does: ``input + output[0]``); a field holding a list counts by its first element.
JSON lines, CSV, parquet and arrow are streamed (a dataset larger than memory works); a JSON
document over :data:`loramix.data.jsondoc.LONG_DOC` bytes is read by
:mod:`loramix.data.jsondoc`, one record at a time, its long strings left in the file. A JSON
line longer than :data:`loramix.data.jsonstream.LONG_LINE` bytes is parsed in bounded memory by
:mod:`loramix.data.jsonstream`, a CSV record longer than
:data:`loramix.data.csvstream.LONG_RECORD` bytes by :mod:`loramix.data.csvstream`; with
``iter_texts(long_texts=True)`` their long texts come as a
:class:`~loramix.data.jsonstream.LongText`, decoded piece by piece (the profiler's path).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

from loramix.data import csvstream, jsondoc, jsonstream
from loramix.data.errors import DatasetError

DEFAULT_FIELDS = ("input", "output")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".arrow")


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return _text(value[0]) if value else ""
    if isinstance(value, (str, jsonstream.Span)):
        return value
    return str(jsonstream.materialized(value))


def special_file_kind(p) -> str:
    """What a path that exists but is neither a regular file nor a folder is ("" otherwise)."""
    import stat

    try:
        mode = Path(p).stat().st_mode
    except OSError:
        return ""
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "" if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file"


def _json_object(f: Path) -> dict:
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"dataset file {f}: not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DatasetError(f"dataset file {f}: not a JSON object")
    return doc


def data_files(path, split: str = "train") -> list[Path]:
    """The files that hold a dataset at ``path`` (a file or a folder), in reading order."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        what = special_file_kind(p)
        if what:
            raise DatasetError(f"dataset {p}: is {what}, not a file or folder; loramix reads a dataset "
                               "twice (hash, then text), so save it to a file first")
        raise DatasetError(f"dataset {p}: no such file or folder")
    if (p / "dataset_dict.json").is_file():
        splits = _json_object(p / "dataset_dict.json").get("splits", [])
        if not isinstance(splits, list) or not all(isinstance(x, str) for x in splits):
            raise DatasetError(f"dataset {p}: dataset_dict.json 'splits' is not a list of names")
        pick = split if split in splits else (splits[0] if splits else None)
        if pick is None:
            raise DatasetError(f"dataset {p}: dataset_dict.json lists no splits")
        return data_files(p / pick, split)
    if (p / "state.json").is_file():
        entries = _json_object(p / "state.json").get("_data_files", [])
        if not isinstance(entries, list) or not all(isinstance(d, dict) and isinstance(d.get("filename"), str)
                                                    for d in entries):
            raise DatasetError(f"dataset {p}: state.json '_data_files' is not a list of "
                               "{'filename': ...} objects")
        files = [p / d["filename"] for d in entries]
        if files:
            return files
    found = sorted(
        (f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES
         and not any(part.startswith(".") for part in f.relative_to(p).parts)
         and f.name not in ("dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json")),
        key=lambda f: str(f))
    if not found:
        raise DatasetError(f"dataset {p}: no data files ({', '.join(DATA_SUFFIXES)}) in the folder")
    # a Hub dataset repo with splits as files: read the requested split when it is there
    chosen = [f for f in found if f.stem.startswith(split) or f.parent.name == split]
    return chosen or found


def fingerprint(path, split: str = "train") -> str:
    """A cheap key for "unchanged": file names, sizes and mtimes (no content read)."""
    h = hashlib.sha256()
    for f in data_files(path, split):
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def content_hash(path, split: str = "train", fields: Iterable[str] = DEFAULT_FIELDS) -> str:
    """SHA-256 over the data files' bytes (and the text fields chosen), streamed."""
    h = hashlib.sha256()
    h.update(("fields=" + "\0".join(fields) + "\n").encode())
    base = Path(path)
    for f in data_files(path, split):
        rel = f.name if base.is_file() else str(f.relative_to(base))
        h.update(f"{rel}\n".encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def iter_records(path, split: str = "train", batch_size: int = 1024,
                 columns: tuple | None = None) -> Iterator[list[dict]]:
    """Yield lists of records (dicts) from every data file of the dataset. ``columns``: for
    columnar files (parquet, arrow), read only these (a missing one is an error naming it)."""
    return _records(path, split, batch_size, columns, lazy=False)


def _records(path, split, batch_size, columns, lazy: bool) -> Iterator[list[dict]]:
    for f in data_files(path, split):
        yield from _iter_file(f, batch_size, columns, lazy)


def _check_columns(f, names, columns):
    if columns:
        missing = [c for c in columns if c not in names]
        if missing:
            raise DatasetError(f"dataset {f}: has no field {missing[0]!r} (fields present: "
                               f"{', '.join(names) or 'none'}); choose fields with --fields")


def _iter_file(f: Path, batch_size: int, columns: tuple | None = None,
               lazy: bool = False) -> Iterator[list[dict]]:
    suf = f.suffix.lower()
    try:
        if suf in (".jsonl", ".ndjson"):
            yield from _batched(_jsonl(f, columns if lazy else None), batch_size)
        elif suf == ".json":
            yield from _batched(_json(f, columns if lazy else None), batch_size)
        elif suf == ".csv":
            # a long example is a long field: lift the csv module's 128 KiB default cap
            csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
            # csv.DictReader on the file read as utf-8-sig (a byte-order mark, as Excel writes,
            # is not part of the first field's name); a long record parsed in bounded memory
            yield from _batched(csvstream.records(f, lazy), batch_size)
        elif suf == ".parquet":
            pq = require_pyarrow(f, "pyarrow.parquet")
            pf = pq.ParquetFile(f)
            _check_columns(f, pf.schema_arrow.names, columns)
            for rb in pf.iter_batches(batch_size=batch_size, columns=list(columns) if columns else None):
                yield rb.to_pylist()
        elif suf == ".arrow":
            yield from _arrow(f, batch_size, columns)
        else:
            raise DatasetError(f"dataset {f}: unsupported file type {suf or '(none)'}")
    except DatasetError:
        raise
    except (ValueError, OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"dataset {f}: cannot read it ({e})") from None
    except Exception as e:  # pyarrow raises its own ArrowInvalid etc.
        if type(e).__module__.startswith("pyarrow"):
            raise DatasetError(f"dataset {f}: cannot read it ({e})") from None
        raise


def _jsonl(f: Path, only: tuple | None = None):
    """The records of a JSON-lines file, read as text mode would (UTF-8, lines end at CR, LF or
    CRLF). A line of over ``jsonstream.LONG_LINE`` bytes is parsed by :mod:`jsonstream` in bounded
    memory; with ``only`` (the lazy path) its long strings stay :class:`jsonstream.Span` s and
    only the fields in ``only`` keep their values, else the record is as ``json.loads`` gives it."""
    with open(f, "rb") as fh:
        n = at = 0
        while raw := fh.readline(jsonstream.LONG_LINE):
            if len(raw) == jsonstream.LONG_LINE and raw[-1:] != b"\n":
                n += 1
                try:
                    rec, blank, at = jsonstream.parse_line(f, fh, at, n, only)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"dataset {f}: line {n} is not JSON ({e.msg})") from None
                fh.seek(at)
                if not blank:
                    yield _record(f, n, rec if only else jsonstream.materialized(rec))
                continue
            at += len(raw)
            for line in raw.splitlines(True) if b"\r" in raw else (raw,):
                n += 1
                line = line.decode("utf-8")
                if line.isspace() or not line:    # (strip() would copy a long line)
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"dataset {f}: line {n} is not JSON ({e.msg})") from None
                yield _record(f, n, rec)


def _record(f: Path, n: int, rec):
    if not isinstance(rec, dict):
        raise DatasetError(f"dataset {f}: line {n} is not a JSON object")
    return rec


def _json(f: Path, only: tuple | None = None):
    """The records of a JSON document, as ``json.loads`` gives them; one over
    ``jsondoc.LONG_DOC`` bytes is read by :mod:`jsondoc` in bounded memory (``only``, the lazy
    path: its long strings stay :class:`jsonstream.Span` s, as in :func:`_jsonl`)."""
    if f.stat().st_size > jsondoc.LONG_DOC:
        try:
            at = jsondoc.locate(f)
        except json.JSONDecodeError as e:
            yield from _json_lines_instead(f, e)
            return
        for rec in jsondoc.elements(f, at, only):
            if not isinstance(rec, dict):
                raise DatasetError(f"dataset {f}: a record is not a JSON object")
            yield rec if only else jsonstream.materialized(rec)
        return
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        yield from _json_lines_instead(f, e)
        return
    if isinstance(doc, dict):
        for key in jsondoc.RECORD_KEYS:
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
        else:
            raise DatasetError(
                f"dataset {f}: a JSON object without a list of records (expected 'Instances' or 'data')")
    if not isinstance(doc, list):
        raise DatasetError(f"dataset {f}: expected a list of records")
    for rec in doc:
        if not isinstance(rec, dict):
            raise DatasetError(f"dataset {f}: a record is not a JSON object")
        yield rec


def _json_lines_instead(f: Path, e: json.JSONDecodeError):
    """Maybe JSON lines saved with a .json suffix; else the document's error ``e``."""
    try:
        yield from _jsonl(f)
    except DatasetError:
        raise DatasetError(f"dataset {f}: line {e.lineno} is not JSON ({e.msg})") from None


def require_pyarrow(f, module: str = "pyarrow"):
    """``module`` (pyarrow or one of its submodules); without pyarrow a :class:`DatasetError`
    naming the file and the extra that installs it (the base install reads JSON and CSV only)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DatasetError(f"dataset {f}: reading {Path(f).suffix} files needs pyarrow, which is not "
                           "installed: pip install 'loramix[parquet]'") from None


def _arrow(f: Path, batch_size: int, columns: tuple | None = None):
    pa = require_pyarrow(f)

    def rows(rb):
        return (rb.select(list(columns)) if columns else rb).to_pylist()

    src = pa.memory_map(str(f), "r")
    try:
        reader = pa.ipc.open_stream(src)   # HF datasets writes the streaming format
        batches = iter(reader)
    except pa.ArrowInvalid:
        src = pa.memory_map(str(f), "r")
        reader = pa.ipc.open_file(src)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    _check_columns(f, reader.schema.names, columns)
    for rb in batches:
        yield from _split(rows(rb), batch_size)


def _split(rows, n):
    for i in range(0, len(rows), n):
        yield rows[i:i + n]


def _batched(it, n):
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def iter_texts(path, fields: Iterable[str] = DEFAULT_FIELDS, *, split: str = "train",
               batch_size: int = 1024, long_texts: bool = False) -> Iterator[list[str]]:
    """Yield batches of example texts: the ``fields`` of each record concatenated, lists by
    their first element. A record lacking a field is an error naming the field and the file.
    ``long_texts``: the text of a JSON line over ``jsonstream.LONG_LINE`` bytes or of a CSV
    record over ``csvstream.LONG_RECORD`` may come as a :class:`jsonstream.LongText` (iterating
    it decodes its pieces again, from the file)."""
    fields = tuple(fields)
    if not fields:
        raise DatasetError("no text fields given")
    n = nonblank = 0
    for batch in _records(path, split, batch_size, fields, lazy=long_texts):
        out = []
        for rec in batch:
            n += 1
            missing = [k for k in fields if k not in rec]
            if missing:
                raise DatasetError(
                    f"dataset {path}: example {n} has no field {missing[0]!r} "
                    f"(fields present: {', '.join(map(str, rec)) or 'none'}); choose fields with --fields")
            parts = [t for t in (_text(rec[k]) for k in fields) if t]
            if all(isinstance(t, str) for t in parts):
                # one non-empty field: its string itself, not a copy (a long example is held once)
                out.append(parts[0] if len(parts) == 1 else "".join(parts))
                nonblank += not out[-1].isspace() and bool(out[-1])
            else:
                text = jsonstream.LongText(parts)
                out.append(text if long_texts else str(text))
                nonblank += not text.blank
        batch.clear()      # the records' strings live on only in ``out``
        yield out
    if n == 0:
        raise DatasetError(f"dataset {path}: it holds no examples")
    if nonblank == 0:
        raise DatasetError(f"dataset {path}: all {n} examples are empty in fields {', '.join(fields)} "
                           "(nothing to profile); choose fields with --fields")


def dataset_name(path) -> str:
    """A short name for a dataset path (used for output folders)."""
    p = Path(path)
    name = p.name if p.is_dir() else p.stem
    for suf in (".jsonl", ".json"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name or "dataset"


def is_dataset_path(p) -> bool:
    p = Path(p)
    return p.is_dir() or p.suffix.lower() in DATA_SUFFIXES


#: names of a bank member's training data, as a file (``train.jsonl``, ...) or a folder
MEMBER_DATASET_NAMES = ("dataset", "train", "data")


def find_member_dataset(member_dir: Path) -> Path | None:
    """The member's training data: ``dataset``/``train``/``data`` as a file or a folder."""
    for stem in MEMBER_DATASET_NAMES:
        d = member_dir / stem
        if d.is_dir():
            return d
        for suf in DATA_SUFFIXES:
            f = member_dir / f"{stem}{suf}"
            if f.is_file():
                return f
    return None
