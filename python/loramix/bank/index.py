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

Optional (written since issue 11; an index without them is still read): the prepared js index of
the profiles (``js_tile_rows``, ``js_tile_offset``, ``js_voff``, ``js_row``, ``js_x1``, ``js_x2``,
``js_c1``: :meth:`loramix.core.divergence.PreparedHistograms.export_js_index`), with
``meta["js_index"] = {"eps", "isa", "tiles"}``. ``generate`` queries it in place (a few ms for 502
members) instead of preparing the bank on every call (30-120 ms); it is used only with the same
eps and the same active ISA (the kernels' logs differ in the last bits between ISAs), else the
bank is prepared as before.

An index is used only when it is well formed and was written for this ``bank.json``; a member
whose files changed since (size or mtime) is read the slow way and named in a warning. Any
other problem makes :func:`load` return None with the reason, and the bank opens as before.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loramix import _core
from loramix.bank import integrity, peft_io
from loramix.core.divergence import EPS, PreparedHistograms
from loramix.core.files import atomic_path

INDEX_NAME = "bank.index"
# Index trouble is logged (INFO, logger "loramix.bank"), not warned: the bank opens correctly either
# way (only slower), and a bank edited on purpose must not change what the CLI prints.
_log = logging.getLogger("loramix.bank")
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
        # the exact bank.json it indexes: any edit of it (a path, a hash) retires the index
        "bank_json_sha256": hashlib.sha256((Path(bank_dir) / "bank.json").read_bytes()).hexdigest(),
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
    nnz = len(profiles.indices)
    if members and nnz <= JS_INDEX_MAX_ENTRIES:
        js, meta["js_index"] = js_index(profiles)
        arrays.update({"js_" + k: v for k, v in js.items()})
    elif members:
        _log.info("bank %s: %d profile entries: no stored js index (over %d; generate prepares the "
                  "bank per call)", bank_dir, nnz, JS_INDEX_MAX_ENTRIES)
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


#: tiles of a stored js index: a fixed count, so that its layout does not depend on the threads
JS_TILES = 8
#: above this many profile entries (~20 bytes each in the file, twice that while exporting: a bank of
#: ~20,000 members of 5,000 distinct tokens) the js index is not stored
JS_INDEX_MAX_ENTRIES = 100_000_000


def js_index(profiles) -> tuple[dict, dict]:
    """``(arrays, meta)`` of the prepared js index of ``profiles`` (N, V) at the default eps,
    built with the active ISA, for :func:`write`."""
    x = PreparedHistograms(profiles, EPS).export_js_index(JS_TILES)
    return x, {"eps": EPS, "isa": _core.active_isa(), "tiles": int(len(x["tile_rows"]) - 1)}


@dataclass
class BankIndex:
    """An opened index: ``meta`` (the JSON header's meta) and read-only mapped arrays."""

    path: Path
    meta: dict
    arrays: dict
    _js: object = field(default=None, repr=False, compare=False)  # stored js index once opened (False: unusable)

    def profiles(self, vocab_size: int | None = None, *, core: bool = False):
        """The stacked member profiles (N, V) of float64 counts, as indexed, ``V`` at least
        ``vocab_size``: a ``scipy.sparse.csr_array``, or with ``core`` or without scipy the
        core's own :class:`loramix.core.divergence.CSR` (what ``profiles.tokens.stack`` gives)."""
        from loramix.core.divergence import csr_matrix

        v = max(int(self.meta["vocab_size"]), int(vocab_size or 0))
        a = self.arrays
        return csr_matrix(a["prof_indptr"], a["prof_indices"], a["prof_data"], v, core=core)

    def prepared_js(self, eps: float):
        """The stored js index as a :class:`loramix.core.divergence.PreparedHistograms` over the
        mapped arrays (no copy), or None when there is none, or it was built for another eps or
        ISA, or it does not hold together (logged)."""
        info = self.meta.get("js_index")
        if not isinstance(info, dict) or "js_row" not in self.arrays:
            return None
        if info.get("eps") != eps or info.get("isa") != _core.active_isa():
            return None
        if self._js is None:
            arrays = {k[3:]: v for k, v in self.arrays.items() if k.startswith("js_")}
            shape = (len(self.meta["names"]), int(self.meta["vocab_size"]))
            try:
                self._js = PreparedHistograms.from_js_index(arrays, shape, eps, info["isa"])
            except (ValueError, TypeError) as e:
                _log.info("%s: not using its stored js index (%s)", self.path, e)
                self._js = False
        return self._js or None


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
    js = ["js_" + k for k in PreparedHistograms.JS_INDEX_ARRAYS] if isinstance(meta.get("js_index"), dict) else []
    for name in ("stat", "prof_indptr", "prof_indices", "prof_data", *js):
        s = spec.get(name)
        if not isinstance(s, dict) or s.get("dtype") not in _DTYPES:
            raise BankIndexError(f"{path}: array {name!r} is missing or of an unknown dtype")
        if name in js and s["dtype"] != PreparedHistograms.JS_INDEX_ARRAYS[name[3:]]:
            raise BankIndexError(f"{path}: array {name!r} is {s['dtype']}, not "
                                 f"{PreparedHistograms.JS_INDEX_ARRAYS[name[3:]]}")
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


class _SpecFactory:
    """Builds a member's AdapterSpec from its layout group's config and shared module table."""

    def __init__(self, cfg: dict, modules: dict, dtype: str):
        self.cfg, self.modules, self.dtype = cfg, modules, dtype

    def __call__(self, name: str, path: Path) -> peft_io.AdapterSpec:
        cfg = self.cfg
        return peft_io.AdapterSpec(
            name=name, path=path, base_model=cfg.get("base_model_name_or_path"),
            r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)),
            use_rslora=bool(cfg.get("use_rslora", False)), rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}), target_modules=cfg.get("target_modules"),
            layers_to_transform=cfg.get("layers_to_transform"), modules=self.modules, dtype=self.dtype,
            raw_config=cfg)


def load_current(path: Path, doc: dict):
    """The index of the bank at ``path`` (its bank.json content ``doc``) if present, well formed
    and written for this bank.json; else None (with a warning saying why, when an index file is
    there)."""
    f = path / INDEX_NAME
    if not f.is_file():
        return None
    try:
        idx = read(f)
    except BankIndexError as e:
        _log.info("bank %s: ignoring its index (%s); `loramix bank build` rewrites it", path, e)
        return None
    try:
        now = hashlib.sha256((Path(path) / "bank.json").read_bytes()).hexdigest()
    except OSError:
        now = None
    if idx.meta.get("bank_json_sha256") != now or idx.meta.get("bank_hash") != doc.get("bank_hash") or \
            idx.meta.get("names") != [m["name"] for m in doc["members"]]:
        _log.info("bank %s: %s was written for another bank.json; opening without it "
                     "(`loramix bank build` rewrites it)", path, INDEX_NAME)
        return None
    return idx


def open_members(path: Path, doc: dict, idx, check: bool, member_cls, open_into):
    """``(members, skipped, problems, specs, stale)`` of a bank opened from its index: one
    ``stat`` per member file, specs shared per layout (``specs`` holds one per layout, plus the
    members read in full). A member whose weights or config changed since indexing is read the
    full way and filed by ``open_into(path, info, check, members, skipped, problems, specs)``
    (``stale`` is then the list of their names, for one warning once the open succeeds); a
    missing member or a changed profile sets ``stale`` True (the bank then reads its profiles from the files). ``member_cls`` builds the
    others: ``member_cls(name, folder, spec_factory, profile_path, info)``."""
    meta, stat = idx.meta, idx.arrays["stat"].tolist()
    specs_by_key: dict = {}
    members, skipped, problems, reps, changed = [], [], [], [], []
    stale = False
    root = os.fspath(path)
    real_root = os.path.realpath(root)
    for i, info in enumerate(doc["members"]):
        # plain strings and tuples here: pathlib and numpy cost more than the stat calls
        ds = f"{root}/{info['path']}"
        now = file_stat((f"{ds}/{peft_io.WEIGHTS_NAME}", f"{ds}/{peft_io.CONFIG_NAME}",
                                    f"{root}/{info['profile']}"), as_list=True)
        if now[0] <= 0 or now[2] < 0:
            skipped.append(info["name"])
            stale = True
            continue
        if now[:4] != stat[i][:4]:
            changed.append(info["name"])
            stale = True
            open_into(path, info, check, members, skipped, problems, reps)
            continue
        if now[4] < 0:
            problems.append(f"member {info['name']!r}: profile {info['profile']} is missing")
            continue
        # bank.json is the indexed one, but a folder or profile may have been swapped for a link
        bad = [w for w in (integrity.path_problem(path, info.get(k), f"member {info.get('name')!r}: {k}",
                                                  real_root=real_root)
                           for k in ("path", "profile")) if w]
        if bad:
            problems += bad
            continue
        if now[4:] != stat[i][4:]:
            stale = True
        if check and now[0] != info.get("weights_size", now[0]):
            problems.append(f"member {info['name']!r}: {peft_io.WEIGHTS_NAME} changed size since "
                            "the bank was built; rebuild the bank")
            continue
        ci, li, _ = meta["members"][i]
        key = (ci, li)
        if key not in specs_by_key:
            cfg, lay = meta["configs"][ci], meta["layouts"][li]
            mods = {r[0]: peft_io.ModuleSpec(r[0], int(r[1]), int(r[2]), int(r[3]), float(r[4]), r[5], r[6])
                    for r in lay["modules"]}
            specs_by_key[key] = _SpecFactory(cfg, mods, lay["dtype"])
            first = True
        else:
            first = False
        m = member_cls(info["name"], ds, specs_by_key[key], f"{root}/{info['profile']}", info)
        members.append(m)
        if first:
            reps.append(m.spec)
    # members indexed together share their specs: checking one per (config, layout) checks all
    return members, skipped, problems, reps, changed if changed else stale
