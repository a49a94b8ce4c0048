"""Generated adapter folders: staging, atomic swap-in, provenance (``loramix.json``) and card.

Every output is written into a hidden staging folder next to it and renamed into place when
complete, so an interrupted run never leaves a half-written adapter; an existing output is
swapped, never half-overwritten. :class:`GenerateResult` is what one output holds.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loramix.bank import peft_io
from loramix.bank.baseref import is_hub_id, resolve_base_model
from loramix.core.files import make_stage_dir
from loramix.mixing import guard
from loramix.bank.bank import Bank, file_sha256
from loramix.version import version
from loramix import weights as wts

PROVENANCE_NAME = "loramix.json"


class OutputError(ValueError):
    pass


@dataclass
class GenerateResult:
    """One generated adapter: where it is, and how it was mixed."""

    out: Path
    members: list[str]
    weights: np.ndarray
    distances: np.ndarray | None = None
    pipeline: str | None = None
    metric: str | None = None
    mode: str = "factors"
    dataset: str | None = None
    ranks: dict = field(default_factory=dict)
    status: str = "generated"   # or "skipped": a verified output of the same inputs was there

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        order = np.argsort(-self.weights, kind="stable")[:k]
        return [(self.members[i], float(self.weights[i])) for i in order if self.weights[i] != 0]

    def to_dict(self) -> dict:
        return {
            "out": str(self.out), "dataset": self.dataset, "pipeline": self.pipeline,
            "metric": self.metric, "mode": self.mode,
            "weights": {m: float(w) for m, w in zip(self.members, self.weights)},
            "distances": None if self.distances is None else
            {m: float(d) for m, d in zip(self.members, self.distances)},
            "top": [[m, w] for m, w in self.top(10)],
            "rank": max(self.ranks.values()) if self.ranks else None,
            "status": self.status,
        }


def output_names(names: list[str], sources: list) -> list[str]:
    """Unique, readable folder names for a batch: each dataset's ``names[q]``; where several share
    one (``a/train.jsonl``, ``b/train.jsonl``), the parent folders of ``sources[q]`` are prepended
    (``a-train``, ``b-train``) until they differ; an index is appended only as a last resort."""
    out = list(names)
    parts = [Path(os.path.abspath(s)).parent.parts if s else () for s in sources]
    depth = 1
    while len(set(out)) != len(out) and depth <= max((len(p) for p in parts), default=0):
        dup = {n for n in out if out.count(n) > 1}
        out = ["-".join([*(x for x in parts[q][-depth:] if x != os.sep), names[q]]) if out[q] in dup
               else out[q] for q in range(len(out))]
        depth += 1
    if len(set(out)) != len(out):
        seen: dict[str, int] = {}
        for q, n in enumerate(out):
            seen[n] = seen.get(n, 0) + 1
            out[q] = n if seen[n] == 1 else f"{n}-{seen[n]}"
    return out


def check_output(out, bank: Bank, overwrite: bool, protect=(), *, replace: bool = True) -> Path:
    """``out`` as an absolute path, or :class:`OutputError` when it may not be written: inside
    or holding the bank, existing without ``overwrite``, or (``replace``: it would be replaced)
    existing but not replaceable (:func:`loramix.mixing.guard.replace_refusal`: only an empty
    folder or a previous loramix output is; ``protect``: more paths, e.g. the input datasets, it
    must not be or hold)."""
    out = Path(os.path.abspath(out))
    real, bank_real = Path(os.path.realpath(out)), Path(os.path.realpath(bank.path))
    if bank.contains(out) or bank_real in real.parents:
        raise OutputError(f"output {out} is inside the bank {bank.path}; choose a folder outside it")
    if os.path.abspath(bank.path).startswith(str(out) + os.sep) or guard.within(bank_real, real):
        raise OutputError(f"output {out} contains the bank {bank.path}")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")
    if replace and os.path.lexists(out):
        why = guard.replace_refusal(out, [bank.path, *protect])
        if why:
            raise OutputError(f"output {out} not replaced: {why}")
    return out


def stage_folder(out: Path) -> Path:
    """A new hidden staging folder next to ``out`` (same file system, so renaming is atomic)."""
    return make_stage_dir(out.parent, out.name)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place. An existing output is swapped with it in one
    atomic step where the OS allows (then the old one, now at ``tmp``, is removed); elsewhere
    the old output is moved aside first and removed last. The old output is checked again
    (:func:`loramix.mixing.guard.replace_refusal`) right before: it may have changed since."""
    why = guard.replace_refusal(out) if os.path.lexists(out) else None
    if why:
        raise OutputError(f"output {out} not replaced: {why}")
    if out.exists() and _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if out.exists():
        import uuid   # only here (no atomic exchange): not on every start

        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def weight_matrix(bank: Bank, weights, outs):
    """``(W, outs)``: explicit weights as a checked (Q, N) float64 matrix, one row per output.

    ``weights`` is a (Q, N) or (N,) array, or a dict member name → weight for one output.
    """
    if isinstance(weights, dict):
        w = np.zeros(len(bank.members))
        for name, v in weights.items():
            w[bank.index(name)] = v
        weights = w
    W = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if isinstance(outs, (str, os.PathLike)):
        outs = [outs]
    outs = list(outs)
    if W.shape != (len(outs), len(bank.members)):
        raise wts.WeightsError(f"weights have shape {W.shape}, expected ({len(outs)}, {len(bank.members)})")
    wts.check_weights(W)
    return W, outs


def weights_metadata(bank: Bank, mode: str) -> dict:
    """``__metadata__`` of a generated adapter_model.safetensors (after ``format``)."""
    return {"loramix_version": version(), "loramix_mode": mode, "loramix_bank_hash": bank.hash}


def finish_stage(bank: Bank, w_row, info, stage: Path, out: Path, mode: str, dtype_name: str,
                 extra: dict, *, key: str | None = None, split: str | None = None) -> GenerateResult:
    """Write config, provenance and card of one output into its stage folder (weights are there).
    ``key``: the provenance is sealed in the same write (what :func:`seal` adds, the same bytes),
    with the weights' SHA-256 from ``info.sha256`` when the mix took it. The weights are checked
    for NaN/inf here unless the mix found them all finite (``info.finite``) as it hashed them."""
    bad = None if info.finite is True else guard.nonfinite_tensor(stage / peft_io.WEIGHTS_NAME)
    if bad:
        raise OutputError(f"output {out}: tensor {bad[0]} would hold a non-finite value (flat index {bad[1]}): "
                          "a member used holds NaN/inf (rebuild the bank to find it) or the sum overflows; "
                          "nothing written")
    used = [bank.members[i].spec for i in info.members]
    used_with_modules = [s for s in used if any(m in info.ranks for m in s.modules)]
    tm = peft_io.target_modules_for(list(info.ranks), used_with_modules)
    task = used[0].raw_config.get("task_type", "CAUSAL_LM") if used else "CAUSAL_LM"
    base = extra.get("base_model") or resolve_base_model(bank)   # resolves from any folder
    extra = {**extra, "base_model": base, "task_type": task}
    cfg = peft_io.output_config(base, info.ranks, tm, task_type=task)
    (stage / peft_io.CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    res = GenerateResult(out=out, members=bank.names, weights=w_row, mode=mode,
                         ranks=info.ranks, pipeline=extra.get("pipeline"),
                         metric=extra.get("metric"), dataset=extra.get("dataset"),
                         distances=extra.get("distances"))
    prov = _provenance(res, bank, dtype_name, extra)
    card = _card(prov)
    if key is not None:
        prov["batch"] = _batch(stage, key, split, info.sha256 or None)
    (stage / PROVENANCE_NAME).write_text(json.dumps(prov, indent=1) + "\n")
    (stage / "README.md").write_text(card)
    return res


def _provenance(res: GenerateResult, bank: Bank, dtype: str, extra: dict) -> dict:
    d = res.to_dict()
    d.pop("out")
    d.update({
        "loramix_version": version(), "dtype": dtype, "bank": str(bank.path),
        "bank_hash": bank.hash, "base_model": extra.get("base_model"), "bank_base_model": bank.base_model,
        "temperature": extra.get("temperature"), "top_k": extra.get("top_k"),
        "exclude": extra.get("exclude"), "ranks": sorted(set(res.ranks.values())),
    })
    # what was really mixed: the SHA-256 recorded at build of every member with a non-zero weight
    # (checked against the files by `bank verify` / `generate --verify`, then "verified": true)
    sha = {m.name: m.info.get("weights_sha256") for m, w in zip(bank.members, res.weights)
           if w != 0 and m.info.get("weights_sha256")}
    if sha:
        d["members_sha256"] = sha
    for k in ("metric_options", "combiner", "verified", "protocol", "task_type", "recipe"):
        # cosine's encoder options, neural's model, --verify, --protocol paper, replay
        if extra.get(k):
            d[k] = extra[k]
    return d


PIPELINE_TAGS = {"CAUSAL_LM": "text-generation"}   # what PEFT's own card sets (for causal LMs)


def card_metadata(p: dict) -> dict:
    """The card's YAML metadata, as PEFT writes it for a LoRA adapter: ``library_name: peft``,
    ``pipeline_tag``, ``base_model`` and the ``base_model:adapter:<id>`` tag (only for a Hub id:
    the Hub rejects a local path there), ``lora``, ``transformers``, plus ``loramix``."""
    base = p.get("base_model")
    hub = is_hub_id(base)
    tags = sorted({"lora", "transformers", "loramix"} | ({f"base_model:adapter:{base}"} if hub else set()))
    meta = {"library_name": "peft"}
    if hub:
        meta["base_model"] = base
    tag = PIPELINE_TAGS.get(p.get("task_type") or "CAUSAL_LM")
    if tag:
        meta["pipeline_tag"] = tag
    meta["tags"] = tags
    return meta


def _yaml(meta: dict) -> str:
    lines = []
    for k, v in meta.items():   # JSON strings are valid YAML scalars: no quoting surprises
        if isinstance(v, list):
            lines.append(f"{k}:")
            lines += [f"- {json.dumps(x)}" for x in v]
        else:
            lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines)


def _card(p: dict) -> str:
    rows = "\n".join(f"| {i} | {m} | {w:.6f} |" for i, (m, w) in enumerate(p["top"], 1))
    what = {"factors": "A and B mixed separately with the same weights (the paper's mix)",
            "concat": "exact weighted sum of the members' updates (rank = sum of ranks)",
            "svd": "best low-rank approximation of the exact weighted sum"}.get(p["mode"], p["mode"])
    base = p.get("base_model")
    where = (f"Base model: [`{base}`](https://huggingface.co/{base})." if is_hub_id(base) else
             f"Base model: the local folder `{base}` (not a Hub id, so the metadata names none; "
             "generate with `--base-model HUB_ID` before uploading).")
    load = ("```python\nfrom peft import AutoPeftModelForCausalLM\n\n"
            "model = AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/folder\")\n```\n")
    return f"""---
{_yaml(card_metadata(p))}
---

# LoRA adapter generated by loramix

Mixed from a bank of LoRA adapters without gradient training (arXiv 2507.01806). {where}

{load}
- dataset: `{p.get('dataset')}`
- pipeline: `{p.get('pipeline')}`, metric: `{p.get('metric')}`, temperature: {p.get('temperature')}, top-k: {p.get('top_k')}
- mode: `{p['mode']}` — {what}
- rank(s): {p.get('ranks')}, dtype: {p.get('dtype')}
- bank: `{p.get('bank')}` (hash `{p.get('bank_hash')}`)
- loramix version: {p.get('loramix_version')}

## Top contributors

| # | member | weight |
|---|---|---|
{rows}

All weights are in `{PROVENANCE_NAME}`.
"""


# ------------------------------------------------------------------ resume: keys and verification

def content_key(header: list, weights) -> str:
    """SHA-256 of a JSON ``header`` (the settings) followed by ``weights`` as little-endian float64."""
    h = hashlib.sha256()
    h.update(json.dumps(header).encode())
    h.update(np.ascontiguousarray(weights, dtype="<f8").tobytes())
    return h.hexdigest()


def target_key(bank_hash: str, w_row, mode: str, rank, dtype: str) -> str:
    """What one output is a function of, hashed: the bank, its weight row and the settings."""
    return content_key([bank_hash, mode, rank, dtype, version()], w_row)


def is_complete(out, key: str) -> bool:
    """Whether ``out`` holds a finished adapter for ``key`` whose files match their checksums."""
    out = Path(out)
    try:
        b = json.loads((out / PROVENANCE_NAME).read_text()).get("batch") or {}
        return (b.get("target_key") == key
                and file_sha256(out / peft_io.WEIGHTS_NAME) == b.get("weights_sha256")
                and file_sha256(out / peft_io.CONFIG_NAME) == b.get("config_sha256"))
    except (OSError, ValueError, AttributeError):
        return False


def _batch(stage: Path, key: str, split: str, weights_sha256: str | None = None) -> dict:
    """The provenance's ``batch`` entry: the key and the checksums of the staged weights and config."""
    return {"target_key": key, "split": split,
            "weights_sha256": weights_sha256 or file_sha256(stage / peft_io.WEIGHTS_NAME),
            "config_sha256": file_sha256(stage / peft_io.CONFIG_NAME)}


def seal(stage: Path, key: str, split: str) -> str:
    """Add the key and the checksums of weights and config to the staged provenance."""
    p = stage / PROVENANCE_NAME
    prov = json.loads(p.read_text())
    prov["batch"] = _batch(stage, key, split)
    p.write_text(json.dumps(prov, indent=1) + "\n")
    return prov["batch"]["weights_sha256"]


def resumable(out) -> bool:
    """Whether ``out`` is an adapter loramix sealed (its ``loramix.json`` records a target key):
    a re-run of the same inputs skips it after verifying it (:func:`is_complete`)."""
    try:
        return bool(json.loads((Path(out) / PROVENANCE_NAME).read_text()).get("batch"))
    except (OSError, ValueError, AttributeError):
        return False
