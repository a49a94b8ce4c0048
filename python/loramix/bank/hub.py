"""Pulling a bank from the Hugging Face Hub (``loramix bank pull``).

Each adapter repo (e.g. ``Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task022``) becomes a
member folder ``TO/<repo name>/`` with its ``adapter_config.json``, ``adapter_model.safetensors``
and card; its training dataset (a dataset repo such as
``Lots-of-LoRAs/task022_cosmosqa_passage_inappropriate_binary``) goes to
``TO/<repo name>/dataset/``. The dataset repo is the one given for it, else the one the
adapter's model card lists under ``datasets:``.

Downloads go through ``huggingface_hub.snapshot_download`` and its cache, so ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens behave as everywhere else in the HF stack.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Sequence

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
DATASET_PATTERNS = ["*.json", "*.jsonl", "*.parquet", "*.csv", "*.arrow", "**/*.json", "**/*.jsonl",
                    "**/*.parquet", "**/*.csv", "**/*.arrow"]


class HubError(ValueError):
    pass


def _place(src: Path, dst: Path) -> None:
    """Hard-link a cached file when possible (no second copy of a 40 MB tensor file), else copy."""
    src = src.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _check_pulled(dst: Path, new: list) -> None:
    """A member's ``dataset/`` folder is replaced only when it holds nothing but the files this
    pull places there (a previous pull of the same dataset): never a user's own data."""
    if dst.is_symlink() or not dst.is_dir():
        raise HubError(f"{dst} is not a folder this pull made; not replaced (move it away first)")
    want = {Path(p) for p in new}
    extra = sorted(str(p.relative_to(dst)) for p in dst.rglob("*")
                   if not p.is_dir() and p.relative_to(dst) not in want)
    if extra:
        raise HubError(f"{dst} holds files this pull did not place there ({', '.join(extra[:4])}"
                       f"{' ...' if len(extra) > 4 else ''}); not replaced (move them away first)")


def card_datasets(readme: Path) -> list[str]:
    """``datasets:`` from a model card's YAML header (no YAML library needed for this list)."""
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---", text, re.S)
    if not m:
        return []
    out, inside = [], False
    for line in m.group(1).splitlines():
        if re.match(r"^datasets\s*:", line):
            rest = line.split(":", 1)[1].strip()
            if rest.startswith("["):
                return [s.strip().strip("'\"") for s in rest.strip("[]").split(",") if s.strip()]
            if rest:
                return [rest.strip("'\"")]
            inside = True
            continue
        if inside:
            mm = re.match(r"^\s*-\s*(.+)$", line)
            if mm:
                out.append(mm.group(1).strip().strip("'\""))
            elif line.strip() and not line.startswith(" "):
                break
    return out


def _lots_of_loras_dataset(repo_id: str, token=None) -> str | None:
    """Lots-of-LoRAs names adapters ``<org>/<model>-taskNNN`` and datasets ``<org>/taskNNN_<name>``:
    find that dataset repo on the Hub (needs the network; None when it cannot be found)."""
    m = re.match(r"^(?P<org>[^/]+)/.*-(?P<task>task\d+)$", repo_id)
    if m is None:
        return None
    try:
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return None
        hits = [d.id for d in HfApi(token=token).list_datasets(author=m.group("org"),
                                                                search=m.group("task") + "_", limit=20)]
    except Exception:  # noqa: BLE001 - any failure: the caller asks the user for --dataset
        return None
    hits = [h for h in hits if h.split("/")[-1].startswith(m.group("task") + "_")]
    return hits[0] if len(hits) == 1 else None


def pull(repo_ids: Sequence[str], to, *, datasets: Sequence[str | None] | dict | None = None,
         cache_dir=None, revision: str | None = None, token=None, with_datasets: bool = True,
         progress: bool = False) -> list[dict]:
    """Download adapters (and their datasets) into bank folder ``to``; returns one record per member.

    ``datasets``: dataset repo ids, one per adapter (``None`` = from the card), or a dict
    adapter repo id → dataset repo id.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    if isinstance(datasets, dict):
        mapping = dict(datasets)
    elif datasets:
        if len(datasets) != len(repo_ids):
            raise HubError(f"{len(datasets)} dataset ids for {len(repo_ids)} adapters")
        mapping = dict(zip(repo_ids, datasets))
    else:
        mapping = {}
    records = []
    it = repo_ids
    if progress:
        from tqdm import tqdm
        it = tqdm(repo_ids, desc="bank pull", unit="adapter", file=sys.stderr)
    for rid in it:
        name = rid.split("/")[-1]
        try:
            snap = Path(snapshot_download(rid, revision=revision, cache_dir=cache_dir, token=token,
                                          allow_patterns=ADAPTER_FILES))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
            raise HubError(f"adapter {rid}: cannot download ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        member = to / name
        for f in ADAPTER_FILES:
            if (snap / f).is_file():
                _place(snap / f, member / f)
        if not (member / "adapter_config.json").is_file() or not (member / "adapter_model.safetensors").is_file():
            raise HubError(f"adapter {rid}: the repo has no adapter_config.json / adapter_model.safetensors")
        rec = {"name": name, "adapter": rid, "dataset": None}
        if with_datasets:
            did = mapping.get(rid) or next(iter(card_datasets(member / "README.md")), None) \
                or _lots_of_loras_dataset(rid, token)
            if did is None:
                raise HubError(f"adapter {rid}: no dataset repo given and none named in its card; "
                               "pass --dataset REPO_ID for it")
            try:
                dsnap = Path(snapshot_download(did, repo_type="dataset", cache_dir=cache_dir, token=token,
                                               allow_patterns=DATASET_PATTERNS))
            except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
                raise HubError(f"dataset {did} (for {rid}): cannot download "
                               f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
            dst = member / "dataset"
            new = [f.relative_to(dsnap) for f in sorted(dsnap.rglob("*"))
                   if f.is_file() and not any(p.startswith(".") for p in f.relative_to(dsnap).parts)
                   and f.suffix in (".json", ".jsonl", ".parquet", ".csv", ".arrow")]
            if not new:
                raise HubError(f"dataset {did} (for {rid}): no data files in the repo")
            if dst.exists() or dst.is_symlink():
                _check_pulled(dst, new)
                shutil.rmtree(dst)
            for f in new:
                _place(dsnap / f, dst / f)
            rec["dataset"] = did
        records.append(rec)
    return records
