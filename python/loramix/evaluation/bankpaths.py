"""Locating an evaluation bank: a bank folder, or member folders indexed in the cache (read-only
banks such as the shipped mini bank), and the train/valid/test splits of its members."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path


from loramix.core.files import make_stage_dir
from loramix.bank.bank import BANK_FILE, TOKENIZER_NAME, build_bank

SPLIT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


# --------------------------------------------------------------------------- locating a bank

def cache_root() -> Path:
    """``$LORAMIX_CACHE`` or ``~/.cache/loramix``: where bank indexes of read-only banks go."""
    return Path(os.environ.get("LORAMIX_CACHE") or Path.home() / ".cache" / "loramix")


@dataclass
class BankPaths:
    bank: Path            # a folder with bank.json (the given one, or an index in the cache)
    members: Path         # the folder holding the member folders as given
    base: Path | None     # the base model folder, if found
    manifest: dict | None  # build_manifest.json of a mini bank, if any


def _fingerprint(members: Path, tokenizer: Path) -> str:
    h = hashlib.sha256(str(members.resolve()).encode())
    h.update(hashlib.sha256(tokenizer.read_bytes()).hexdigest().encode())
    for d in sorted(p for p in members.iterdir() if p.is_dir()):
        for f in sorted(p for p in d.iterdir() if p.is_file()):
            st = f.stat()
            h.update(f"{d.name}/{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src.resolve(), dst)
    except (OSError, NotImplementedError):
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copyfile(src, dst)


def index_in_cache(members: Path, tokenizer: Path, cache: Path | None = None) -> Path:
    """A bank index (bank.json + profiles) for the member folders in ``members``, built in the
    cache and reused while nothing changed; nothing is written under ``members``, which may be
    read-only (an installed package). Member files are symlinked (copied where links fail)."""
    members = Path(members)
    root = Path(cache) if cache else cache_root()
    dest = root / "banks" / f"{members.parent.name or 'bank'}-{members.name}-{_fingerprint(members, tokenizer)[:16]}"
    if (dest / BANK_FILE).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_stage_dir(dest.parent, dest.name)
    try:
        for d in sorted(p for p in members.iterdir() if p.is_dir() and not p.name.startswith(".")):
            (tmp / d.name).mkdir()
            for f in d.iterdir():
                if f.name == "profile.npz":   # copied: the index may refresh it, never the source
                    shutil.copyfile(f, tmp / d.name / f.name)
                else:
                    _link_or_copy(f, tmp / d.name / f.name)
        build_bank(tmp, tokenizer)
        try:
            os.rename(tmp, dest)
        except OSError:   # another process finished first: use its index
            if not (dest / BANK_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def default_bank_root() -> Path:
    """The mini bank shipped with the package (``loramix/minibank/shipped``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("loramix").joinpath("minibank", "shipped")))


def resolve_bank(path, *, base=None, cache=None) -> BankPaths:
    """``path``: a mini-bank folder (``base/`` + ``bank/<task>/``), a bank folder of member
    folders (with or without ``bank.json``), or ``"default"`` (the shipped mini bank). Without a
    ``bank.json`` the index is built in the cache (:func:`index_in_cache`) with the base
    model's tokenizer."""
    p = default_bank_root() if str(path) == "default" else Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"bank {p}: no such folder")
    if (p / "bank").is_dir() and not (p / BANK_FILE).is_file():
        root, members = p, p / "bank"
    else:
        members = p
        root = p.parent if (p.parent / "base" / "config.json").is_file() else None
    if base is not None:
        base = Path(base)
    elif root is not None and (root / "base" / "config.json").is_file():
        base = root / "base"
    manifest = None
    if root is not None and (root / "build_manifest.json").is_file():
        manifest = json.loads((root / "build_manifest.json").read_text())
    if (members / BANK_FILE).is_file():
        return BankPaths(members, members, base, manifest)
    tok = None
    for cand in ([base / "tokenizer.json"] if base else []) + [members / TOKENIZER_NAME]:
        if cand.is_file():
            tok = cand
            break
    if tok is None:
        raise FileNotFoundError(f"bank {members}: no {BANK_FILE} and no tokenizer.json to build one "
                                "(give the base model folder)")
    return BankPaths(index_in_cache(members, tok, cache), members, base, manifest)


def eval_split(member_dir: Path, split: str = "test") -> Path | None:
    """The member's ``<split>.jsonl`` (or .json/.csv/.parquet), if it has one."""
    for suf in SPLIT_SUFFIXES:
        if (Path(member_dir) / f"{split}{suf}").is_file():
            return Path(member_dir) / f"{split}{suf}"
    return None


def test_split(member_dir: Path) -> Path | None:
    return eval_split(member_dir, "test")


def train_split(member_dir: Path) -> Path | None:
    from loramix.data.readers import find_member_dataset

    return find_member_dataset(member_dir)
