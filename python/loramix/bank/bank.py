"""The bank: a folder of PEFT LoRA adapters, one per subfolder, each with its dataset or profile.

Layout::

    BANK/
      bank.json               written by `loramix bank build` (members, hashes, shapes)
      tokenizer.json          the base model's tokenizer, copied in (the profiles' vocabulary)
      <member>/adapter_config.json
      <member>/adapter_model.safetensors
      <member>/profile.npz    the member's token profile (built from its dataset, or given)
      <member>/dataset[.jsonl|.json|.csv|.parquet] or <member>/dataset/   its training data

:meth:`Bank.open` checks that members fit together (same base model, same shapes per module)
and names each bad member and its problem; members whose folder is missing or empty are
skipped with one warning that lists them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np

from loramix.core.divergence import CSR
from loramix.core.files import StagedFiles, clean_stale_stages
from loramix.data import readers as ds
from loramix.data.readers import find_member_dataset
from loramix.bank import index as bank_index
from loramix.bank import peft_io, schema
from loramix.profiles import tokens as prof
from loramix.bank import integrity
from loramix.bank.integrity import file_sha256

BANK_FILE = "bank.json"
BANK_FORMAT = 1
PROFILE_NAME = "profile.npz"
TOKENIZER_NAME = "tokenizer.json"


class BankError(ValueError):
    """A bank that cannot be used; the message names every bad member and its problem."""




def _is_member_dir(d: Path) -> bool:
    return d.is_dir() and not d.name.startswith(".") and (
        (d / peft_io.CONFIG_NAME).exists() or (d / peft_io.WEIGHTS_NAME).exists())


def build_bank(bank_dir, tokenizer, *, fields: Iterable[str] = ds.DEFAULT_FIELDS,
               base_model: str | None = None, split: str = "train", progress: bool = False) -> dict:
    """Scan ``bank_dir``, profile each member's dataset, write ``bank.json``; returns its content.

    Every member is validated; all problems are collected and raised together as
    :class:`BankError`. Profiles are reused when nothing changed. Nothing in the bank changes
    until everything is validated: new profiles and the tokenizer are staged next to their
    places and renamed in together with ``bank.json`` last, so a failed build leaves the bank
    exactly as it was.
    """
    bank_dir = Path(bank_dir)
    if not bank_dir.is_dir():
        raise BankError(f"bank {bank_dir}: no such folder")
    index_rows: list[dict] = []
    with StagedFiles() as staged:
        doc = _build(bank_dir, tokenizer, tuple(fields), base_model, split, progress, staged, index_rows)
        staged.write(bank_dir / BANK_FILE, (json.dumps(doc, indent=1) + "\n").encode())   # renamed last
        staged.commit()
    _write_index(bank_dir, doc, index_rows)   # after the commit: it records the files as they are now
    return doc


def _build(bank_dir: Path, tokenizer, fields: tuple, base_model, split, progress, staged,
           index_rows: list) -> dict:
    """``build_bank``'s work; every file it would change is staged in ``staged``."""
    tok_src = prof.tokenizer_file(tokenizer)
    # a file that is not a tokenizer is refused (naming it) before anything is staged
    vocab = int(prof.load_tokenizer(tok_src).get_vocab_size(with_added_tokens=True))
    tok_dst = bank_dir / TOKENIZER_NAME
    tok_use = tok_dst
    if tok_src.resolve() != tok_dst.resolve():
        tok_use = staged.write(tok_dst, tok_src.read_bytes())
    tok_hash = prof.tokenizer_hash(tok_use)

    dirs = sorted((d for d in bank_dir.iterdir() if _is_member_dir(d)), key=lambda d: d.name)
    if not dirs:
        raise BankError(f"bank {bank_dir}: no adapter subfolders (each needs {peft_io.CONFIG_NAME} "
                        f"and {peft_io.WEIGHTS_NAME})")
    problems, members = [], []
    specs = []
    it = dirs
    if progress:
        from tqdm import tqdm
        it = tqdm(dirs, desc="bank build", unit="member", file=__import__("sys").stderr)
    skipped = []
    for d in it:
        clean_stale_stages(d)   # temporary files of a build that was killed
        w = d / peft_io.WEIGHTS_NAME
        if not w.is_file() or w.stat().st_size == 0:
            skipped.append(d.name)
            continue
        why = integrity.path_problem(bank_dir, d.name, f"member {d.name!r}: folder")
        if why:
            problems.append(why)
            continue
        try:
            spec = peft_io.read_adapter(d, d.name)
            why = integrity.nonfinite_problem(spec, _open_weights(w, d.name))
        except peft_io.AdapterError as e:
            why = str(e)
        if why:
            problems.append(why)
            continue
        pfile = d / PROFILE_NAME
        data = find_member_dataset(d)
        try:
            if data is not None:
                p, fresh = prof.cached_profile(data, tok_use, cache=pfile, fields=fields, split=split)
                if fresh:
                    p.save(staged.path_for(pfile))
            elif pfile.is_file():
                p = prof.Profile.load(pfile)
                p.check_tokenizer(tok_hash, str(pfile))
            else:
                problems.append(f"member {d.name!r}: no dataset ({'/'.join(ds.MEMBER_DATASET_NAMES)}.*) "
                                f"and no {PROFILE_NAME}")
                continue
        except (ds.DatasetError, prof.ProfileError) as e:
            problems.append(f"member {d.name!r}: {e}")
            continue
        specs.append(spec)
        index_rows.append(_index_row(d, spec, p))
        members.append({
            "name": d.name,
            "path": d.name,
            "base_model": spec.base_model,
            "r": spec.r, "lora_alpha": spec.lora_alpha, "use_rslora": spec.use_rslora,
            "rank_pattern": spec.rank_pattern, "alpha_pattern": spec.alpha_pattern,
            "target_modules": spec.target_modules,
            "dtype": spec.dtype,
            "n_modules": len(spec.modules),
            "ranks": sorted({m.rank for m in spec.modules.values()}),
            "profile": f"{d.name}/{PROFILE_NAME}",
            "dataset": str(data.relative_to(bank_dir)) if data is not None else None,
            "dataset_hash": p.dataset_hash,
            "n_tokens": p.n_tokens,
            "n_examples": p.n_examples,
            "config_sha256": file_sha256(d / peft_io.CONFIG_NAME),
            "weights_sha256": file_sha256(d / peft_io.WEIGHTS_NAME),
            "weights_size": (d / peft_io.WEIGHTS_NAME).stat().st_size,
            "weights_sig": integrity.weights_signature(d / peft_io.WEIGHTS_NAME),
        })
    problems += _fit_problems(specs, base_model)
    if problems:
        raise BankError(f"bank {bank_dir}: " + "; ".join(problems))
    if skipped:
        warnings.warn(f"bank {bank_dir}: skipped {len(skipped)} member folder(s) without "
                      f"{peft_io.WEIGHTS_NAME} or with an empty one: " + ", ".join(skipped), stacklevel=2)
    if not specs:
        raise BankError(f"bank {bank_dir}: no usable members")
    bases = Counter(s.base_model for s in specs)
    base = base_model or bases.most_common(1)[0][0]
    shapes = {}
    for s in specs:
        for m in s.modules.values():
            shapes[m.name] = [m.in_features, m.out_features]
    rank = Counter(m.rank for s in specs for m in s.modules.values()).most_common(1)[0][0]
    h = hashlib.sha256(tok_hash.encode())
    for m in members:
        h.update(f"{m['name']}\0{m['config_sha256']}\0{m['weights_sha256']}\0{m['dataset_hash']}\n".encode())
    doc = {
        "format": BANK_FORMAT,
        "base_model": base,
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": tok_hash, "vocab_size": vocab},
        "fields": list(fields),
        "rank": int(rank),
        "dtype": Counter(s.dtype for s in specs).most_common(1)[0][0],
        "target_modules": sorted({m.split(".")[-1] for m in shapes}),
        "modules": dict(sorted(shapes.items(), key=lambda kv: peft_io.natural_key(kv[0]))),
        "members": members,
        "bank_hash": h.hexdigest(),
    }
    return doc


def _open_weights(w: Path, name: str):
    from loramix.core import tensors

    try:
        return tensors.SafetensorsFile(str(w))
    except (ValueError, OSError) as e:
        raise peft_io.AdapterError(f"member {name!r}: {peft_io.WEIGHTS_NAME} is unreadable: {e}") from None


def _index_row(d: Path, spec: peft_io.AdapterSpec, p) -> dict:
    """What :mod:`loramix.bank.index` records of one member (file stats are taken at write)."""
    w = d / peft_io.WEIGHTS_NAME
    return {
        "dir": d, "config": spec.raw_config, "dtype": spec.dtype,
        "modules": [[m.name, m.rank, m.in_features, m.out_features, m.scaling, m.a_key, m.b_key]
                    for m in spec.modules.values()],
        "tensors": bank_index.tensor_layout(_open_weights(w, d.name)),
        "data_start": bank_index.data_start(w),
        "profile": p, "vocab": p.vocab_size,
    }


def _write_index(bank_dir: Path, doc: dict, rows: list[dict]) -> None:
    for row, m in zip(rows, doc["members"]):
        d = row.pop("dir")
        row["name"] = m["name"]
        row["stat"] = bank_index.file_stat([d / peft_io.WEIGHTS_NAME, d / peft_io.CONFIG_NAME,
                                            d / PROFILE_NAME]).tolist()
    vocab = max([int(doc["tokenizer"]["vocab_size"])] + [r["vocab"] for r in rows])
    bank_index.write(bank_dir, doc, rows, prof.stack([r.pop("profile") for r in rows], vocab))


def same_base_model(a: str | None, b: str | None) -> bool:
    """Hub id and local copy of one model count as the same base model: the names are equal, or
    their last path components are (``mistralai/Mistral-7B-v0.1`` vs ``/models/Mistral-7B-v0.1``).
    Shapes are checked separately, module by module."""
    if a == b:
        return True
    if not a or not b:
        return False
    return a.rstrip("/").replace("\\", "/").split("/")[-1].lower() == \
        b.rstrip("/").replace("\\", "/").split("/")[-1].lower()


def _fit_problems(specs, base_model=None) -> list[str]:
    """Members that do not fit the rest: another base model, or a module of another shape."""
    if not specs:
        return []
    problems = []
    bases = Counter(s.base_model for s in specs)
    base = base_model or bases.most_common(1)[0][0]
    shapes: dict[str, Counter] = {}
    for s in specs:
        for m in s.modules.values():
            shapes.setdefault(m.name, Counter())[(m.in_features, m.out_features)] += 1
    ref = {k: c.most_common(1)[0][0] for k, c in shapes.items()}
    for s in specs:
        if not same_base_model(s.base_model, base):
            problems.append(f"member {s.name!r}: base model {s.base_model!r} is not the bank's {base!r}")
            continue
        for m in s.modules.values():
            if (m.in_features, m.out_features) != ref[m.name]:
                problems.append(
                    f"member {s.name!r}: module {m.name} is {m.out_features}x{m.in_features}, "
                    f"the bank's is {ref[m.name][1]}x{ref[m.name][0]}")
                break
    return problems


class Member:
    """One member of an opened bank: its name, folder, adapter spec, profile file and bank.json
    entry. Members opened from the bank's index build their folder path and spec on first use
    (the module table is shared by every member of one layout), so opening stays cheap."""

    def __init__(self, name: str, path, spec, profile_path, info: dict | None = None, _file=None):
        self.name = name
        self._path = path
        self._spec = spec             # an AdapterSpec, or a callable building it from the path
        self._profile_path = profile_path
        self.info = info if info is not None else {}
        self._file = _file

    @property
    def path(self) -> Path:
        if not isinstance(self._path, Path):
            self._path = Path(self._path)
        return self._path

    @property
    def profile_path(self) -> Path:
        if not isinstance(self._profile_path, Path):
            self._profile_path = Path(self._profile_path)
        return self._profile_path

    @property
    def spec(self) -> peft_io.AdapterSpec:
        if not isinstance(self._spec, peft_io.AdapterSpec):
            self._spec = self._spec(self.name, self.path)
        return self._spec

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {str(self._path)!r})"

    def with_spec(self, spec: peft_io.AdapterSpec) -> "Member":
        """A copy of this member with another adapter spec (e.g. a subset of its modules), sharing
        its mapped file."""
        return Member(self.name, self._path, spec, self._profile_path, self.info, self._file)

    @property
    def modules(self):
        s = self._spec
        return s.modules if isinstance(s, peft_io.AdapterSpec) else s.modules

    @property
    def file(self):
        """The member's mmapped, validated ``adapter_model.safetensors``."""
        if self._file is None:
            from loramix.core import tensors

            self._file = tensors.SafetensorsFile(str(self.path / peft_io.WEIGHTS_NAME))
        return self._file

    def padded(self, key: str, rank: int, axis: int) -> np.ndarray:
        """Tensor ``key`` as float32, zero-padded along ``axis`` to ``rank`` (a lower-rank
        member mixed with higher-rank ones: the extra rows of A / columns of B are zero)."""
        x = self.file.to_f32(key)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (0, rank - x.shape[axis])
        return np.ascontiguousarray(np.pad(x, pad))


def _open_into(path: Path, info: dict, check: bool, members: list, skipped: list, problems: list,
               specs: list) -> None:
    """Read one member the full way (:func:`_open_member`) and file it: into ``members`` (and its
    spec into ``specs``), ``skipped`` (missing or empty) or ``problems``."""
    m, problem = _open_member(path, info, check)
    if problem:
        problems.append(problem)
    elif m is None:
        skipped.append(info["name"])
    else:
        members.append(m)
        specs.append(m.spec)


def _open_member(path: Path, info: dict, check: bool):
    """``(Member, None)``, ``(None, None)`` for a missing/empty member (skipped), or
    ``(None, problem)``: one member read the full way (paths, config, safetensors header, specs,
    size and signature against bank.json, profile)."""
    bad = [w for w in (integrity.path_problem(path, info.get(k), f"member {info.get('name')!r}: {k}",
                                              links_out=k == "dataset")
                       for k in ("path", "profile", "dataset") if k != "dataset" or info.get(k)) if w]
    if bad:
        return None, "; ".join(bad)
    d = path / info["path"]
    w = d / peft_io.WEIGHTS_NAME
    if not d.is_dir() or not w.is_file() or w.stat().st_size == 0 or \
            not (d / peft_io.CONFIG_NAME).is_file():
        return None, None
    try:
        cfg = peft_io.read_config(d, info["name"])
        sf = _open_weights(w, info["name"])
        spec = peft_io.spec_from_file(cfg, sf, d, info["name"])
    except peft_io.AdapterError as e:
        return None, str(e)
    why = integrity.changed_problem(info["name"], w, info) if check else None
    if why:
        return None, why
    pp = path / info["profile"]
    if not pp.is_file():
        return None, f"member {info['name']!r}: profile {info['profile']} is missing"
    return Member(info["name"], d, spec, pp, info, sf), None


class Bank:
    """An opened, checked bank. ``members`` in bank.json order."""

    def __init__(self, path: Path, doc: dict, members: list[Member], skipped: list[str]):
        self.path = path
        self.doc = doc
        self.members = members
        self.skipped = skipped
        self._profiles = None
        self._module_index = None
        self._module_ranks = None
        self._index = None      # the bank.index this bank was opened from, while it is current

    def module_index(self) -> dict[str, list[int]]:
        """Module name → indices of the members holding it, in natural module order. Computed
        once (members never change after :meth:`open`): a mix asks for it several times."""
        if self._module_index is None:
            out: dict[str, list[int]] = {}
            groups: dict[int, tuple] = {}   # members opened from the index share module tables
            for i, m in enumerate(self.members):
                groups.setdefault(id(m.modules), (m.modules, []))[1].append(i)
            for mods, idx in groups.values():
                for name in mods:
                    out.setdefault(name, []).extend(idx)
            for v in out.values():
                v.sort()
            self._module_index = dict(sorted(out.items(), key=lambda kv: peft_io.natural_key(kv[0])))
        return self._module_index

    def module_ranks(self) -> dict[str, np.ndarray]:
        """Module name → the rank of each member of ``module_index()[name]``, in that order (int64).
        Computed once, a module table at a time (members opened from a bank.index share theirs):
        a plan over N = 502 members asked each member for each module's rank, ~30 ms a call."""
        if self._module_ranks is None:
            index = self.module_index()
            full = {name: np.zeros(len(self.members), dtype=np.int64) for name in index}
            groups: dict[int, tuple] = {}
            for i, m in enumerate(self.members):
                groups.setdefault(id(m.modules), (m.modules, []))[1].append(i)
            for mods, idx in groups.values():
                rows = np.asarray(idx)
                for name, ms in mods.items():
                    full[name][rows] = ms.rank
            self._module_ranks = {name: full[name][np.asarray(h)] for name, h in index.items()}
        return self._module_ranks

    def module_shape(self, name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of module ``name`` (the same in every member holding
        it: :meth:`open` checks that they fit)."""
        ms = self.members[self.module_index()[name][0]].modules[name]
        return ms.in_features, ms.out_features

    # ------------------------------------------------------------ open
    @classmethod
    def coerce(cls, bank) -> "Bank":
        """``bank`` itself if it is a :class:`Bank`, else :meth:`open` it (a path)."""
        return bank if isinstance(bank, cls) else cls.open(bank)

    @classmethod
    def open(cls, path, *, check: bool = True) -> "Bank":
        """Open and check the bank at ``path`` (its ``bank.json``, and ``bank.index`` when current)."""
        path = Path(path)
        f = path / BANK_FILE
        if not f.is_file():
            raise BankError(f"bank {path}: no {BANK_FILE}; run `loramix bank build {path} --tokenizer ...`")
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BankError(f"bank {path}: {BANK_FILE} is not valid JSON ({e})") from None
        bad = schema.problems(doc, BANK_FILE)
        if bad and not (isinstance(doc, dict) and doc.get("format") not in (None, BANK_FORMAT)):
            raise BankError(f"bank {path}: " + "; ".join(bad))
        if doc.get("format") != BANK_FORMAT:
            raise BankError(f"bank {path}: {BANK_FILE} format {doc.get('format')} is not {BANK_FORMAT}")
        why = integrity.path_problem(path, doc["tokenizer"]["file"], "tokenizer file")
        if why:
            raise BankError(f"bank {path}: {BANK_FILE}: {why}")
        tok = path / doc["tokenizer"]["file"]
        if not tok.is_file():
            raise BankError(f"bank {path}: tokenizer file {tok.name} is missing")
        if check and prof.tokenizer_hash(tok) != doc["tokenizer"]["sha256"]:
            raise BankError(f"bank {path}: {tok.name} changed since the bank was built; rebuild it")
        dup = integrity.duplicate_names(doc["members"])
        if dup:
            raise BankError(f"bank {path}: {BANK_FILE} lists member(s) {', '.join(map(repr, dup))} more than "
                            "once; member names must be unique (rebuild the bank)")
        idx = bank_index.load_current(path, doc)
        if idx is not None:
            members, skipped, problems, specs, stale = bank_index.open_members(
                path, doc, idx, check, Member, _open_into)
        else:
            members, skipped, problems, specs, stale = [], [], [], [], False
            for info in doc["members"]:
                _open_into(path, info, check, members, skipped, problems, specs)
        problems += _fit_problems(specs, doc.get("base_model"))
        for n, (inn, out) in doc.get("modules", {}).items():
            for s in specs:
                m = s.modules.get(n)
                if m is not None and (m.in_features, m.out_features) != (inn, out) and \
                        not any(s.name in p for p in problems):
                    problems.append(f"member {s.name!r}: module {n} is {m.out_features}x{m.in_features}, "
                                    f"the bank's is {out}x{inn}")
        if problems:
            raise BankError(f"bank {path}: " + "; ".join(problems))
        if skipped:
            warnings.warn(f"bank {path}: skipped {len(skipped)} missing or empty member(s): "
                          + ", ".join(skipped), stacklevel=2)
        if not members:
            raise BankError(f"bank {path}: no usable members")
        if isinstance(stale, list):   # the open succeeded; say once that the index is behind
            logging.getLogger("loramix.bank").info(
                "bank %s: %d member(s) changed since %s was written and were read without it: %s%s; "
                "`loramix bank build` refreshes the index", path, len(stale), bank_index.INDEX_NAME,
                ", ".join(stale[:10]), " ..." if len(stale) > 10 else "")
        bank = cls(path, doc, members, skipped)
        bank._index = idx if idx is not None and not stale else None
        return bank

    # ------------------------------------------------------------ facts
    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def base_model(self) -> str | None:
        return self.doc.get("base_model")

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.doc["tokenizer"]["file"]

    @property
    def tokenizer_hash(self) -> str:
        return self.doc["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.doc["tokenizer"]["vocab_size"])

    @property
    def rank(self) -> int:
        return int(self.doc.get("rank", 8))

    @property
    def dtype(self) -> str:
        return self.doc.get("dtype", "F32")

    @property
    def fields(self) -> tuple:
        return tuple(self.doc.get("fields", ds.DEFAULT_FIELDS))

    @property
    def hash(self) -> str:
        return self.doc.get("bank_hash", "")

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise BankError(f"bank {self.path}: no member named {name!r}") from None

    def profiles(self, *, core: bool = False):
        """The members' profiles as a CSR matrix (N, V) of counts (``core``: as the core's
        :class:`loramix.core.divergence.CSR`, which needs no scipy import)."""
        if core:
            if self._profiles is None and self._index is not None and not self.skipped:
                return self._index.profiles(self.vocab_size, core=True)
            m = self.profiles()
            return m if isinstance(m, CSR) else CSR(m.indptr, m.indices, m.data, m.shape[1])
        if self._profiles is None and self._index is not None and not self.skipped:
            self._profiles = self._index.profiles(self.vocab_size)
        if self._profiles is None:
            ps = []
            for m in self.members:
                p = prof.Profile.load(m.profile_path)
                p.check_tokenizer(self.tokenizer_hash, str(m.profile_path))
                want = m.info.get("dataset_hash")
                if want and p.dataset_hash != want:
                    raise BankError(f"bank {self.path}: member {m.name!r}: {m.profile_path.name} is of another "
                                    f"dataset (hash {p.dataset_hash[:12]}, {BANK_FILE} says {want[:12]}); it was "
                                    "replaced after the build: rebuild the bank")
                ps.append(p)
            self._profiles = prof.stack(ps, max(self.vocab_size, max(p.vocab_size for p in ps)))
        return self._profiles

    def prepared(self, metric: str, eps: float):
        """The bank's stored prepared index for ``metric`` at ``eps`` (a
        :class:`loramix.core.divergence.PreparedHistograms` over the mapped ``bank.index``, as
        wide as the indexed profiles), or None: only ``js`` is stored, and only an index that is
        current, for the active ISA and this eps is used. Distances through it equal those
        against :meth:`profiles` bit for bit."""
        if metric != "js" or self._index is None or self.skipped:
            return None
        return self._index.prepared_js(eps)

    def contains(self, path) -> bool:
        """Whether ``path`` lies inside the bank folder."""
        try:
            Path(os.path.abspath(path)).relative_to(os.path.abspath(self.path))
            return True
        except ValueError:
            return False

    def summary(self) -> dict:
        ranks = Counter(m.rank for mem in self.members for m in mem.modules.values())
        return {
            "path": str(self.path), "base_model": self.base_model, "members": len(self.members),
            "skipped": self.skipped, "tokenizer_sha256": self.tokenizer_hash,
            "vocab_size": self.vocab_size, "rank": self.rank, "ranks": dict(sorted(ranks.items())),
            "dtype": self.dtype, "target_modules": self.doc.get("target_modules"),
            "modules": len(self.doc.get("modules", {})), "bank_hash": self.hash,
            "member_names": self.names,
        }


def open_bank(path, **kw) -> Bank:
    return Bank.open(path, **kw)

