"""The bank's index (``BANK/bank.index``): what :meth:`Bank.open` needs, in one mapped file.

Written by ``loramix bank build`` next to ``bank.json``; opening a bank then costs one ``stat``
per member file instead of parsing 500 configs, 500 safetensors headers and 500 profiles.

Layout (little endian)::

    8 bytes   b"LMXIDX01"
    8 bytes   u64 length H of the JSON header
    H bytes   JSON: {"meta": {...}, "arrays": {name: {"dtype", "shape", "offset"}}}
    data      each array at ``offset`` (from the start of the data, 64-byte aligned);
              the data start at 16 + H rounded up to 64

``meta`` holds the ``bank_hash`` of the ``bank.json`` it indexes, the members' distinct configs
and tensor layouts (a bank of 502 adapters trained alike has one of each: module specs are
shared, not rebuilt per member), and per member its config and layout ids and the byte offset of
its data section. Arrays: ``stat`` (N × 6 int64: size and mtime in ns of each member's weights,
config and profile, as they were when indexed) and the stacked profiles in CSR form
(``prof_indptr``, ``prof_indices``, ``prof_data``).

An index is used only when it is well formed and was written for this ``bank.json``; a member
whose files changed since (size or mtime) is read the slow way and named in a warning. Any
other problem makes :func:`load` return None with the reason, and the bank opens as before.
"""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramix.core.files import atomic_path

INDEX_NAME = "bank.index"
INDEX_FORMAT = 1
_MAGIC = b"LMXIDX01"
_ALIGN = 64
_DTYPES = {"<i8", "<f8", "<i4", "<f4", "|u1"}
STAT_COLUMNS = ("weights_size", "weights_mtime_ns", "config_size", "config_mtime_ns",
                "profile_size", "profile_mtime_ns")


class BankIndexError(ValueError):
    """A malformed index file (the bank then opens without it)."""


def file_stat(paths, *, as_list: bool = False):
    """``(size, mtime_ns)`` of each path, flattened (int64 array, or a list); ``-1, -1`` for a
    missing file."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out += [st.st_size, st.st_mtime_ns]
        except OSError:
            out += [-1, -1]
    return out if as_list else np.asarray(out, dtype=np.int64)


def data_start(path) -> int:
    """Byte offset of a safetensors file's data section (8 + header length)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) != 8:
        raise BankIndexError(f"{path}: shorter than a safetensors header")
    return 8 + int.from_bytes(head, "little")


def tensor_layout(f) -> list[list]:
    """``[key, dtype, shape, begin, end]`` of every tensor of an open safetensors file, in data
    order (offsets relative to its data section: tensors are contiguous from 0)."""
    out, pos = [], 0
    for k in f.keys():
        n = int(f.nbytes(k))
        out.append([k, f.dtype(k), list(f.shape(k)), pos, pos + n])
        pos += n
    return out


def write(bank_dir, doc: dict, members: list[dict], profiles) -> Path:
    """Write ``bank_dir/bank.index`` for ``doc`` (the bank.json content being written).

    ``members``: per member, in ``doc["members"]`` order, a dict with ``config`` (the raw
    adapter_config dict), ``modules`` (``[name, rank, in, out, scaling, a_key, b_key]`` rows),
    ``dtype``, ``tensors`` (:func:`tensor_layout`), ``data_start`` and ``stat`` (6 ints, see
    :data:`STAT_COLUMNS`). ``profiles``: the stacked CSR (N, V) of the members' counts.
    """
    configs, layouts, rows = {}, {}, []
    for m in members:
        ck = json.dumps(m["config"], sort_keys=True)
        lk = json.dumps([m["dtype"], m["modules"], m["tensors"]])
        ci = configs.setdefault(ck, len(configs))
        li = layouts.setdefault(lk, len(layouts))
        rows.append([ci, li, int(m["data_start"])])
    meta = {
        "format": INDEX_FORMAT,
        "bank_hash": doc["bank_hash"],
        "n_members": len(members),
        "names": [m["name"] for m in doc["members"]],
        "configs": [json.loads(k) for k in configs],
        "layouts": [dict(zip(("dtype", "modules", "tensors"), json.loads(k))) for k in layouts],
        "members": rows,          # [config id, layout id, data start]
        "vocab_size": int(profiles.shape[1]),
    }
    arrays = {
        "stat": np.asarray([m["stat"] for m in members], dtype=np.int64).reshape(len(members), 6),
        "prof_indptr": np.asarray(profiles.indptr, dtype=np.int64),
        "prof_indices": np.asarray(profiles.indices, dtype=np.int64),
        "prof_data": np.asarray(profiles.data, dtype=np.float64),
    }
    spec, off = {}, 0
    for name, a in arrays.items():
        spec[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": off}
        off += -(-a.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"meta": meta, "arrays": spec}, separators=(",", ":")).encode()
    start = -(-(16 + len(header)) // _ALIGN) * _ALIGN
    path = Path(bank_dir) / INDEX_NAME
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            fh.write(b"\0" * (start - 16 - len(header)))
            for name, a in arrays.items():
                fh.seek(start + spec[name]["offset"])
                fh.write(np.ascontiguousarray(a).tobytes())
            fh.truncate(start + off)
    return path


@dataclass
class BankIndex:
    """An opened index: ``meta`` (the JSON header's meta) and read-only mapped arrays."""

    path: Path
    meta: dict
    arrays: dict

    def profiles(self):
        """The stacked member profiles (CSR (N, V), float64 counts), as indexed."""
        import scipy.sparse as sp

        n = self.meta["n_members"]
        return sp.csr_array((self.arrays["prof_data"], self.arrays["prof_indices"], self.arrays["prof_indptr"]),
                            shape=(n, self.meta["vocab_size"]))


def read(path) -> BankIndex:
    """Map and check an index file; :class:`BankIndexError` naming the file and the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise BankIndexError(f"{path}: cannot be mapped ({e})") from None
    size = len(buf)
    if size < 16 or buf[:8] != _MAGIC:
        raise BankIndexError(f"{path}: not a loramix bank index (bad magic)")
    h = int.from_bytes(buf[8:16], "little")
    if 16 + h > size:
        raise BankIndexError(f"{path}: header of {h} bytes runs past the end of the file ({size} bytes)")
    try:
        head = json.loads(bytes(buf[16:16 + h]))
        meta, spec = head["meta"], head["arrays"]
    except (ValueError, KeyError, TypeError) as e:
        raise BankIndexError(f"{path}: header is not the expected JSON ({e})") from None
    if meta.get("format") != INDEX_FORMAT:
        raise BankIndexError(f"{path}: format {meta.get('format')} is not {INDEX_FORMAT}")
    start = -(-(16 + h) // _ALIGN) * _ALIGN
    arrays = {}
    for name in ("stat", "prof_indptr", "prof_indices", "prof_data"):
        s = spec.get(name)
        if not isinstance(s, dict) or s.get("dtype") not in _DTYPES:
            raise BankIndexError(f"{path}: array {name!r} is missing or of an unknown dtype")
        dt = np.dtype(s["dtype"])
        shape = tuple(int(x) for x in s["shape"])
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        off = int(s["offset"])
        if off < 0 or off % _ALIGN or start + off + n > size:
            raise BankIndexError(f"{path}: array {name!r} ({n} bytes at {off}) lies outside the file")
        arrays[name] = np.frombuffer(buf, dtype=dt, count=n // dt.itemsize, offset=start + off).reshape(shape)
    N = int(meta.get("n_members", -1))
    if arrays["stat"].shape != (N, 6) or arrays["prof_indptr"].shape != (N + 1,) or \
            len(meta.get("members", ())) != N or len(meta.get("names", ())) != N:
        raise BankIndexError(f"{path}: member tables disagree on the number of members ({N})")
    ip = arrays["prof_indptr"]
    if N and (ip[0] != 0 or np.any(np.diff(ip) < 0) or ip[-1] != arrays["prof_indices"].size
              or arrays["prof_data"].size != arrays["prof_indices"].size):
        raise BankIndexError(f"{path}: the stacked profiles are inconsistent")
    return BankIndex(path, meta, arrays)
