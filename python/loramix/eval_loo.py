"""Leave-one-out evaluation over a bank whose members carry a test split
(``loramix eval leave-one-out``), the paper's protocol (arXiv 2507.01806, Table 1).

For every task of the bank (or a chosen subset), its adapter and dataset are held out: every
member trained on that task's data (the task itself and any member with the same dataset hash)
gets weight 0, and an adapter is mixed from the rest for the task's train split. On the task's
test split (the first ``limit`` examples) it is compared with

- ``base``: the base model alone; ``task-lora``: the task's own adapter (the upper bound);
- ``<pipeline>-<metric>``: every registered pipeline × every registered metric (discovered
  from :mod:`loramix.weights` at run time; ``cosine`` comes from :mod:`loramix.semantic`),
  ``factors`` mode (the paper's mix);
- ``neural-<metrics>``: the neural combiner, one system per feature set (``neural-js``,
  ``neural-js+cosine``), its combiners trained K-fold over the tasks so that none has seen the
  task it mixes for (:func:`neural_loo_weights`);
- ``<pipeline>-<metric>-<mode>``: the other mix modes (``concat``, ``svd``) for the default
  pipeline and metric;
- ``uniform`` (plain average of every other member) and ``nearest-<metric>`` (the single
  nearest member, weight 1).

How it runs: the base model is loaded once. Per held-out task the weights of every system are
computed together (the member profiles *are* the train-split profiles, so the distance rows
are those :func:`loramix.generate.generate` computes for ``train.jsonl`` with
``exclude=[task]``), every system of one mix mode is mixed in one pass over the bank
(:func:`loramix.generate.mix_adapters`, one output per row), all adapters are attached to the
one model under their own names, and every system's predictions come from the same batched
greedy generation with PEFT's mixed-adapter batches (``adapter_names`` per row; ``__base__`` is
the bare model), which gives the same tokens as one adapter at a time at a fraction of the cost.

Outputs in ``out``: ``results.csv`` (one row per task × system: per-task means, appended and
flushed as each task finishes, so an interrupted run resumes where it stopped),
``examples.jsonl`` (per-example scores and predictions), ``weights.json`` (every system's
weights per task), ``run.json`` (the settings; a resume with other settings is refused),
``table.md`` and ``summary.json`` (means over tasks with bootstrap 95 % CIs over tasks, and the
HF-``evaluate``-style bootstrap over pooled examples, labelled as such).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import weights as wts
from .bank import BANK_FILE, TOKENIZER_NAME, Bank, build_bank

__all__ = ["System", "BankPaths", "resolve_bank", "plan_systems", "loo_weights", "generate_mixed",
           "leave_one_out", "summarize_results", "markdown_table", "DEFAULT_PIPELINE", "DEFAULT_METRIC"]

DEFAULT_PIPELINE = "normalized"
DEFAULT_METRIC = "js"
MODES = ("factors", "concat", "svd")
SPLIT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# modules that register extra pipelines/metrics when imported (if present in this install)
PLUGIN_MODULES = ("neural", "semantic", "embed", "embedding", "combiner")
NEURAL_METRICS = ("js",)   # feature sets of the neural systems (``+`` joins metrics)
NEURAL_FOLDS = 6
_PIPELINE_ORDER = ("attentional", "normalized", "neural")
_METRIC_ORDER = ("js", "kl", "wd", "mmd", "cosine")


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
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
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
    """The mini bank shipped with the package (``loramix/data/minibank``)."""
    import importlib.resources

    return Path(str(importlib.resources.files("loramix").joinpath("data", "minibank")))


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
    from .bank import find_member_dataset

    return find_member_dataset(member_dir)


# --------------------------------------------------------------------------- systems

@dataclass(frozen=True)
class System:
    """One row of the comparison. ``kind``: ``base``, ``task`` (own LoRA), ``mix`` (pipeline
    weights), ``uniform`` or ``nearest``; mixed kinds have a ``mode``."""

    name: str
    kind: str   # base, task, mix, neural, uniform, nearest
    pipeline: str | None = None
    metric: str | None = None
    mode: str | None = None
    temperature: float | None = None   # None: the run's temperature

    @property
    def mixed(self) -> bool:
        return self.kind in ("mix", "neural", "uniform", "nearest")


def load_plugins() -> None:
    """Import the optional modules that register pipelines/metrics, where this install has them."""
    for name in PLUGIN_MODULES:
        full = f"{__package__}.{name}"
        if importlib.util.find_spec(full) is not None:
            try:
                importlib.import_module(full)
            except ImportError:   # an optional dependency is missing: its entries stay unregistered
                pass


def _ordered(names, order) -> list[str]:
    return [n for n in order if n in names] + sorted(n for n in names if n not in order)


def available_pipelines() -> list[str]:
    load_plugins()
    return _ordered(wts.PIPELINES, _PIPELINE_ORDER)


def available_metrics() -> list[str]:
    load_plugins()
    return _ordered(wts.METRICS, _METRIC_ORDER)


def plan_systems(pipelines: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                 modes: Sequence[str] = MODES, *, default_pipeline: str = DEFAULT_PIPELINE,
                 default_metric: str = DEFAULT_METRIC, baselines: bool = True,
                 temperatures: Sequence[float] = (),
                 neural_metrics: Sequence[str] | None = NEURAL_METRICS) -> list[System]:
    """The systems compared: base, task LoRA, baselines, every pipeline × metric (``factors``),
    the other modes and any extra ``temperatures`` (``<p>-<m>-T<t>``) for the default pair.
    The ``neural`` pipeline is not crossed with every metric: it gets one system per feature set
    in ``neural_metrics`` (``neural-js``, ``neural-js+cosine``; fold-trained combiners, see
    :func:`neural_loo_weights`), when it is among the pipelines."""
    explicit = bool(pipelines)
    pipelines = list(pipelines) if pipelines else available_pipelines()
    metrics = list(metrics) if metrics else available_metrics()
    out = [System("base", "base"), System("task-lora", "task")]
    if baselines:
        out.append(System("uniform", "uniform", mode="factors"))
        out.append(System(f"nearest-{default_metric}", "nearest", metric=default_metric, mode="factors"))
    for p in pipelines:
        if p == "neural":
            continue
        for m in metrics:
            out.append(System(f"{p}-{m}", "mix", p, m, "factors"))
    if "neural" in pipelines or (not explicit and neural_metrics):
        for spec in neural_metrics or ():
            parts = _neural_parts(spec)
            out.append(System(f"neural-{'+'.join(parts)}", "neural", "neural", "+".join(parts), "factors"))
    for mode in modes:
        if mode != "factors":
            out.append(System(f"{default_pipeline}-{default_metric}-{mode}", "mix",
                              default_pipeline, default_metric, mode))
    for t in temperatures:
        out.append(System(f"{default_pipeline}-{default_metric}-T{t:g}", "mix", default_pipeline,
                          default_metric, "factors", temperature=float(t)))
    return out


# --------------------------------------------------------------------------- weights

def _distances(bank: Bank, rows: list[int], metric: str, train_paths: list) -> np.ndarray:
    fn, kind = wts.METRICS[metric]
    if kind == "histogram":
        bm = bank.profiles()
        return wts.distances(bm[rows], bm, metric)
    D = np.atleast_2d(np.asarray(fn(train_paths, bank, fields=bank.fields, split="train"), np.float64))
    if D.shape != (len(rows), len(bank.members)) or not np.all(np.isfinite(D)):
        raise wts.WeightsError(f"metric {metric} gave distances of shape {D.shape} or non-finite ones")
    return D


def _neural_parts(spec: str) -> list[str]:
    parts = [x for x in re.split(r"[+,]", str(spec)) if x]
    if not parts:
        raise ValueError(f"empty neural feature set {spec!r}")
    return parts


def fold_assignment(tasks: Sequence[str], k: int = NEURAL_FOLDS, *, seed: int = 0,
                 families: dict | None = None) -> dict[str, int]:
    """Task → fold (0..k-1), seeded. Stratified by family where families are known: the tasks
    are shuffled, grouped by family, and dealt round-robin, so each family is spread across the
    folds and a fold's combiner has trained on the held-out task's siblings — as the paper's
    leave-one-out training (and a bank that gets one new dataset) does. ``k >= len(tasks)``:
    one task per fold (leave-one-out)."""
    tasks = list(tasks)
    k = max(1, min(int(k), len(tasks)))
    rng = np.random.default_rng(seed)
    order = [tasks[i] for i in rng.permutation(len(tasks))]
    if families:
        fam_rank = {}
        for t in order:
            fam_rank.setdefault(families.get(t) or "", len(fam_rank))
        order = sorted(order, key=lambda t: fam_rank[families.get(t) or ""])   # stable: shuffled within
    return {t: j % k for j, t in enumerate(order)}


def fold_members(bank: Bank, tasks: Sequence[str], fold_of: dict) -> list[dict]:
    """Per fold: its held-out tasks and the members its combiner may train on — every member but
    the held-out tasks and those trained on the same data as one of them (:func:`exclusion_mask`)."""
    mask = exclusion_mask(bank, [bank.index(t) for t in tasks])
    out = []
    for f in range(max(fold_of.values()) + 1):
        q = [k for k, t in enumerate(tasks) if fold_of[t] == f]
        train = np.flatnonzero(~mask[q].any(axis=0))
        out.append({"held_out": [tasks[k] for k in q], "train_members": [bank.names[i] for i in train]})
    return out


def neural_loo_weights(bank: Bank, tasks: Sequence[str], systems: Sequence[System], *, folds: int = NEURAL_FOLDS,
                       seed: int = 0, hidden: int = 16, families: dict | None = None, gram=None,
                       metric_options: dict | None = None, threads=None,
                       log: Callable[[str], None] | None = None) -> tuple[dict, dict, dict]:
    """Weights of the ``neural`` systems with K-fold combiners: ``(weights, errors, info)``.

    The tasks are split into ``folds`` (:func:`fold_assignment`). For each fold, a combiner is
    trained (:func:`loramix.neural.fit_combiner`, seed ``seed``) on the bank-vs-bank distances and
    the Gram matrix restricted to the fold's *training members*: every member except the fold's
    held-out tasks and any member trained on the same data as one of them (same dataset hash,
    :func:`exclusion_mask`). Each held-out task then gets the combiner's weights over the whole
    bank, its own adapter and same-data members excluded — exactly ``generate(...,
    pipeline="neural", exclude=[task])`` with that fold's combiner. The Gram matrix (factor space,
    as the ``factors`` mix) is computed once and sliced per fold. ``info``: folds, training
    members per fold, feature names, training summaries and the combiners themselves."""
    from . import neural

    log = log or (lambda m: None)
    todo = [s for s in systems if s.kind == "neural"]
    W, errors = {}, {}
    info = {"folds": int(folds), "seed": int(seed), "hidden": int(hidden), "space": "factors", "systems": {}}
    if not todo:
        return W, errors, info
    rows = [bank.index(t) for t in tasks]
    mask = exclusion_mask(bank, rows)
    fold_of = fold_assignment(tasks, folds, seed=seed, families=families)
    info["fold_of"] = fold_of
    nf = max(fold_of.values()) + 1
    try:
        G = np.asarray(gram if gram is not None else neural.bank_gram(bank, "factors", threads), np.float64)
    except Exception as e:   # noqa: BLE001
        return W, {s.name: f"{type(e).__name__}: {e}" for s in todo}, info
    D: dict[str, np.ndarray] = {}
    folds_doc = info["fold_members"] = fold_members(bank, tasks, fold_of)
    for s in todo:
        parts = _neural_parts(s.metric)
        try:
            for m in parts:
                if m not in D:
                    D.update(neural.distance_matrices(bank, [m], metric_options=metric_options))
            dists = {m: D[m] for m in parts}
            w = np.zeros((len(rows), len(bank.members)))
            combs, hists = [], []
            for f in range(nf):
                q = [k for k, t in enumerate(tasks) if fold_of[t] == f]
                train = np.array([bank.index(n) for n in folds_doc[f]["train_members"]], dtype=np.int64)
                comb, hist, fnames = neural.fit_combiner(dists, G, train, hidden=hidden, seed=seed + f,
                                                         threads=threads)
                qr = [rows[k] for k in q]
                X, xnames = neural.features_from({m: dists[m][qr] for m in parts}, exclude=mask[q])
                if xnames != comb.feature_names:
                    raise wts.WeightsError(f"features {xnames} differ from the combiner's {comb.feature_names}")
                w[q] = comb.weights(X, mask[q])
                combs.append(comb)
                hists.append({"epochs": len(hist.epoch), "best_epoch": hist.best_epoch,
                              "best_val_loss": hist.best_val_loss, "normalized_val_loss": hist.baseline_val_loss,
                              "seconds": round(hist.seconds, 2)})
                log(f"{s.name}: fold {f + 1}/{nf}: trained on {len(train)} members, held out {len(q)}; "
                    f"val loss {hist.best_val_loss:.4f} (normalized pipeline {hist.baseline_val_loss:.4f})")
            wts.check_weights(w)
            W[s.name] = {t: w[k] for k, t in enumerate(tasks)}
            info["systems"][s.name] = {"metrics": parts, "features": fnames, "training": hists,
                                       "combiners": combs}
        except Exception as e:   # noqa: BLE001 - one broken system must not end the run
            errors[s.name] = f"{type(e).__name__}: {e}"
    return W, errors, info


def exclusion_mask(bank: Bank, rows: list[int]) -> np.ndarray:
    """Per held-out task: the task itself and every member trained on the same data."""
    hashes = np.array([m.info.get("dataset_hash", "") for m in bank.members])
    mask = np.zeros((len(rows), len(bank.members)), bool)
    for q, i in enumerate(rows):
        mask[q, i] = True
        if hashes[i]:
            mask[q, hashes == hashes[i]] = True
    return mask


def loo_weights(bank: Bank, tasks: Sequence[str], systems: Sequence[System], *,
                temperature: float = 1.0, top_k: int | None = None,
                pipeline_options: dict | None = None) -> tuple[dict, dict, dict]:
    """``(weights, distances, errors)``: ``weights[system][task]`` (N,) for every mixed system,
    ``distances[metric]`` (T, N), and ``errors[system]`` for systems that could not be computed
    (e.g. a pipeline that needs options it was not given): those are skipped, not fatal."""
    rows = [bank.index(t) for t in tasks]
    train = [train_split(bank.members[i].path) for i in rows]
    mask = exclusion_mask(bank, rows)
    D, W, errors = {}, {}, {}
    for s in systems:
        if not s.mixed or s.kind == "neural":
            continue
        try:
            if s.kind == "uniform":
                w = (~mask).astype(np.float64)
                w /= w.sum(axis=1, keepdims=True)
            else:
                if s.metric not in D:
                    D[s.metric] = _distances(bank, rows, s.metric, train)
                d = D[s.metric]
                if s.kind == "nearest":
                    w = np.zeros_like(d)
                    dd = np.where(mask, np.inf, d)
                    w[np.arange(len(rows)), np.argmin(dd, axis=1)] = 1.0
                else:
                    w = wts.mixing_weights(d, s.pipeline, top_k=top_k,
                                           temperature=s.temperature or temperature,
                                           exclude=mask, **(pipeline_options or {}))
            wts.check_weights(w)
            W[s.name] = {t: w[q] for q, t in enumerate(tasks)}
        except Exception as e:   # noqa: BLE001 - one broken system must not end the run
            errors[s.name] = f"{type(e).__name__}: {e}"
    return W, D, errors


def weight_stats(w: np.ndarray, members: Sequence[str], task: str, families: dict | None) -> dict:
    """Top-1 weight, effective number of members ``1/Σw²``, and (for a mini bank) the weight on
    the held-out task's own family."""
    out = {"top1": float(w.max()), "effective_members": float(1.0 / np.sum(w * w))}
    if families and task in families:
        fam = families[task]
        out["family_mass"] = float(sum(x for m, x in zip(members, w) if families.get(m) == fam))
    return out


# --------------------------------------------------------------------------- generation

@contextmanager
def quiet_hf():
    """No transformers progress bars or version-migration FutureWarnings on our output."""
    tl = None
    try:
        from transformers.utils import logging as tl

        was = tl.is_progress_bar_enabled()
        tl.disable_progress_bar()
    except ImportError:   # pragma: no cover
        pass
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
            warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
            yield
    finally:
        if tl is not None and was:
            tl.enable_progress_bar()


def load_base(path, threads=None):
    from .evaluation import load_base as _load

    with quiet_hf():
        return _load(path, threads=threads)


def generate_mixed(model, tok, prompts: Sequence[str], adapter_names: Sequence[str] | None = None, *,
                   max_new_tokens: int = 24, max_prompt_tokens: int = 512,
                   batch_size: int = 512) -> list[str]:
    """Greedy continuations (:func:`loramix.evaluation.generate`), each prompt through its own
    adapter of a PeftModel (``adapter_names``, ``"__base__"`` for the bare model), so many
    systems share one decoding loop. The eval harness's defaults: short answers, big batches."""
    from .evaluation import generate

    return generate(model, tok, prompts, max_new_tokens=max_new_tokens,
                    max_prompt_tokens=max_prompt_tokens, batch_size=batch_size,
                    adapter_names=adapter_names)


def _adapter_config(folder) -> dict:
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    for k in ("base_model_name_or_path", "revision", "inference_mode"):
        cfg.pop(k, None)
    return cfg


class AdapterSet:
    """A base model with named adapter slots, for scoring many adapters with one model.

    :meth:`predict` attaches the given adapters (name → folder) and generates for every one of
    them (and the base model) in mixed-adapter batches. Slots stay attached between calls: an
    adapter whose config equals its slot's has only its tensors copied in (PEFT's
    ``load_adapter`` re-walks the whole model per adapter, which costs more than generating on
    a small model); otherwise the slot is loaded afresh. :meth:`close` removes every LoRA layer
    and returns the plain base model."""

    def __init__(self, model):
        self.model = model
        self.pm = None
        self.slots: dict[str, tuple[str, dict]] = {}
        self._count = 0

    def _n_tensors(self, an: str) -> int:
        return sum(1 for n, _ in self.pm.named_parameters()
                   if n.endswith(f".{an}.weight") and (".lora_A." in n or ".lora_B." in n))

    def _attach(self, name: str, folder) -> str:
        from peft import PeftModel, set_peft_model_state_dict
        from safetensors.torch import load_file

        cfg = _adapter_config(folder)
        slot = self.slots.get(name)
        if slot is not None and slot[1] == cfg:
            an = slot[0]
            sd = load_file(str(Path(folder) / "adapter_model.safetensors"))
            try:
                if len(sd) == self._n_tensors(an):   # every tensor of the slot is replaced
                    set_peft_model_state_dict(self.pm, sd, adapter_name=an)
                    return an
            except RuntimeError:   # shapes differ after all: load afresh
                pass
        if slot is not None:
            self.pm.delete_adapter(slot[0])
            del self.slots[name]
        self._count += 1
        an = f"a{self._count}"   # plain module keys
        if self.pm is None:
            self.pm = PeftModel.from_pretrained(self.model, str(folder), adapter_name=an, is_trainable=False)
        else:
            self.pm.load_adapter(str(folder), adapter_name=an, is_trainable=False)
        self.slots[name] = (an, cfg)
        return an

    def predict(self, tok, examples: Sequence[dict], adapters: dict, *, with_base: bool = True,
                **gen_kw) -> dict[str, list[str]]:
        prompts = [e["input"] for e in examples]
        names = (["base"] if with_base else []) + list(adapters)
        with quiet_hf():
            if not adapters and self.pm is None:
                out = generate_mixed(self.model, tok, prompts, None, **gen_kw)
            else:
                peft_names = {name: self._attach(name, folder) for name, folder in adapters.items()}
                rows, an_rows = [], []
                for name in names:
                    rows += prompts
                    an_rows += [peft_names.get(name, "__base__")] * len(prompts)
                out = generate_mixed(self.pm, tok, rows, an_rows, **gen_kw)
        n = len(prompts)
        return {name: out[k * n:(k + 1) * n] for k, name in enumerate(names)}

    def close(self):
        if self.pm is not None:
            with quiet_hf():
                self.model = self.pm.unload()   # LoRA layers out again: the plain base model
            self.pm = None
            self.slots.clear()
        return self.model


def predict_systems(model, tok, examples: Sequence[dict], adapters: dict, *, with_base: bool = True,
                    **gen_kw):
    """Predictions of the base model (key ``"base"`` if ``with_base``) and of each adapter
    folder in ``adapters`` (name → folder) on ``examples``, in one mixed-adapter generation.
    Returns ``(predictions by name, model)``: the model as it was, adapters removed again."""
    aset = AdapterSet(model)
    try:
        preds = aset.predict(tok, examples, adapters, with_base=with_base, **gen_kw)
    finally:
        model = aset.close()
    return preds, model


# --------------------------------------------------------------------------- the run

RESULT_KEYS = ("split", "limit", "temperature", "top_k", "max_new_tokens", "max_prompt_tokens", "bank_hash",
               "pipeline_options", "neural")


def _check_run(out: Path, cfg: dict) -> None:
    f = out / "run.json"
    if f.is_file():
        old = json.loads(f.read_text())
        diff = {k: (old.get(k), cfg.get(k)) for k in RESULT_KEYS if old.get(k) != cfg.get(k)}
        if diff:
            raise ValueError(f"{out} holds results of a run with other settings "
                             f"({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                             "use another --out folder or remove it")
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(cfg, indent=1) + "\n")
    os.replace(tmp, f)


def _load_examples_file(path: Path) -> dict:
    res = {}
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:   # a line cut by an interruption
                    continue
                res[(r["task"], r["system"])] = r
    return res


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def leave_one_out(bank, out, *, tasks: Sequence[str] | None = None, split: str = "test",
                  limit: int | None = 48, temperatures: Sequence[float] = (),
                  base=None, pipelines: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
                  modes: Sequence[str] = MODES, systems: Sequence[str] | None = None,
                  temperature: float = 1.0, top_k: int | None = None, pipeline_options: dict | None = None,
                  max_new_tokens: int = 24, max_prompt_tokens: int = 512, batch_size: int = 512,
                  threads: int | None = None, keep_adapters: bool = False, cache=None,
                  neural_metrics: Sequence[str] | None = NEURAL_METRICS, neural_folds: int = NEURAL_FOLDS,
                  neural_seed: int = 0, neural_hidden: int = 16,
                  log: Callable[[str], None] | None = None) -> dict:
    """Run the leave-one-out comparison; returns the summary (also written to ``out``)."""
    from . import evaluation as ev
    from .generate import mix_adapters

    log = log or (lambda m: None)
    t0 = time.time()
    bp = resolve_bank(bank, base=base, cache=cache)
    if bp.base is None:
        raise FileNotFoundError("no base model folder found next to the bank; pass --base")
    b = Bank.open(bp.bank)
    with_test = [m.name for m in b.members if eval_split(m.path, split) is not None]
    if tasks:
        missing = [t for t in tasks if t not in b.names]
        if missing:
            raise ValueError(f"no such task(s) in the bank: {', '.join(missing)}")
        no_test = [t for t in tasks if t not in with_test]
        if no_test:
            raise ValueError(f"task(s) without a {split} split: {', '.join(no_test)}")
        tasks = list(tasks)
    else:
        tasks = with_test
    if not tasks:
        raise ValueError(f"bank {bp.members}: no member has a {split} split ({split}.jsonl ...)")
    plan = plan_systems(pipelines, metrics, modes, temperatures=temperatures, neural_metrics=neural_metrics)
    if systems:
        unknown = set(systems) - {s.name for s in plan}
        if unknown:
            raise ValueError(f"unknown system(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(s.name for s in plan)}")
        plan = [s for s in plan if s.name in systems or s.kind in ("base", "task")]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"bank": str(bp.members), "index": str(bp.bank), "base": str(bp.base), "bank_hash": b.hash,
           "split": split, "limit": limit, "temperature": temperature, "top_k": top_k,
           "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
           "pipeline_options": pipeline_options or None,
           "tasks": tasks, "systems": [asdict(s) for s in plan]}
    families = {t: v.get("family") for t, v in (bp.manifest or {}).get("tasks", {}).items()} or None
    neural_sys = [s for s in plan if s.kind == "neural"]
    if neural_sys:
        from .neural import feature_names_for

        fold_of = fold_assignment(tasks, neural_folds, seed=neural_seed, families=families)
        cfg["neural"] = {"folds": max(fold_of.values()) + 1, "seed": neural_seed, "hidden": neural_hidden,
                         "space": "factors", "stratified_by_family": bool(families),
                         "features": {s.name: feature_names_for(_neural_parts(s.metric)) for s in neural_sys},
                         "fold_of": fold_of}
    _check_run(out, cfg)

    W, _, errors = loo_weights(b, tasks, plan, temperature=temperature, top_k=top_k,
                               pipeline_options=pipeline_options)
    if neural_sys:
        NW, nerr, ninfo = neural_loo_weights(b, tasks, neural_sys, folds=neural_folds, seed=neural_seed,
                                             hidden=neural_hidden, families=families, threads=threads, log=log)
        W.update(NW)
        errors.update(nerr)
        ndoc = {k: v for k, v in ninfo.items() if k != "systems"}
        ndoc["systems"] = {n: {k: v for k, v in d.items() if k != "combiners"} for n, d in ninfo["systems"].items()}
        (out / "neural.json").write_text(json.dumps(ndoc, indent=1) + "\n")
    for name, err in errors.items():
        log(f"skipping system {name}: {err}")
    plan = [s for s in plan if s.name not in errors]
    wdoc = {s: {t: [float(x) for x in w] for t, w in per.items()} for s, per in W.items()}
    (out / "weights.json").write_text(json.dumps({"members": b.names, "families": families,
                                                  "weights": wdoc}) + "\n")

    table = ev.ResultsTable(out / "results.csv")
    ex_file = out / "examples.jsonl"
    aset = tok = None
    adapters_root = out / "adapters" if keep_adapters else Path(tempfile.mkdtemp(prefix="loramix-loo-"))
    try:
        for k, task in enumerate(tasks, 1):
            todo = [s for s in plan if not table.done(task, s.name)]
            if not todo:
                continue
            tt = time.time()
            examples = ev.load_examples(eval_split(b.members[b.index(task)].path, split), limit=limit)
            adapters = {}
            tdir = adapters_root / task
            for mode in MODES:
                group = [s for s in todo if s.mixed and s.mode == mode]
                if group:
                    outs = [tdir / s.name for s in group]
                    mix_adapters(b, np.stack([W[s.name][task] for s in group]), outs, mode=mode,
                                 overwrite=True, provenance=[{"pipeline": s.pipeline, "metric": s.metric,
                                                              "temperature": s.temperature or temperature,
                                                              "top_k": top_k,
                                                              "dataset": task, "exclude": [task]}
                                                             for s in group])
                    adapters.update({s.name: o for s, o in zip(group, outs)})
            if any(s.kind == "task" for s in todo):
                adapters["task-lora"] = b.members[b.index(task)].path
            if aset is None:
                model, tok = load_base(bp.base, threads=threads)
                aset = AdapterSet(model)
            preds = aset.predict(tok, examples, adapters, with_base=any(s.kind == "base" for s in todo),
                                 max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
                                 batch_size=batch_size)
            refs = [e["output"] for e in examples]
            lines, scores = [], {}
            for s in todo:
                sc = ev.score(preds[s.name], refs)
                scores[s.name] = sc
                lines.append({"task": task, "system": s.name,
                              **{m: [float(x) for x in v] for m, v in sc.items()},
                              "predictions": preds[s.name]})
            _append_jsonl(ex_file, lines)   # first the examples, then the row that marks them done
            for s in todo:
                table.add(task, s.name, scores[s.name])
            if not keep_adapters:
                shutil.rmtree(tdir, ignore_errors=True)
            show = [n for n in ("base", f"{DEFAULT_PIPELINE}-{DEFAULT_METRIC}", "task-lora") if n in scores]
            log(f"[{k}/{len(tasks)}] {task}: {len(todo)} systems x {len(examples)} examples in "
                f"{time.time() - tt:.1f}s; Rouge-L " + ", ".join(f"{n} {scores[n]['rougeL'].mean():.3f}"
                                                                 for n in show))
    finally:
        if not keep_adapters:
            shutil.rmtree(adapters_root, ignore_errors=True)
    summary = summarize_results(out, tasks=tasks, systems=[s.name for s in plan])
    summary["skipped_systems"] = errors
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# --------------------------------------------------------------------------- summary

def _ci(vals):
    from .evaluation import bootstrap_ci

    return list(bootstrap_ci(vals))


def summarize_results(out, *, tasks: Sequence[str] | None = None, systems: Sequence[str] | None = None) -> dict:
    """Aggregate ``out/results.csv`` (+ ``examples.jsonl``, ``weights.json``) into
    ``summary.json``-style numbers and write ``out/table.md``. Every system is compared with the
    base model on the tasks both have."""
    from .evaluation import ResultsTable, evaluate_style_ci

    out = Path(out)
    tab = ResultsTable(out / "results.csv")
    examples = _load_examples_file(out / "examples.jsonl")
    wfile = out / "weights.json"
    wdoc = json.loads(wfile.read_text()) if wfile.is_file() else {}
    rows: dict[str, dict[str, dict]] = {}
    for (t, s), r in tab.rows.items():
        if (tasks is None or t in tasks) and (systems is None or s in systems):
            rows.setdefault(s, {})[t] = r
    order = list(systems) if systems else list(rows)
    base = rows.get("base", {})
    res = {}
    for s in order:
        per = rows.get(s)
        if not per:
            continue
        ts = sorted(per)
        r_l = [float(per[t]["rougeL"]) for t in ts]
        d = {"tasks": len(ts), "examples": int(sum(int(per[t]["n"]) for t in ts)),
             "rougeL": _ci(r_l),
             "exact": _ci([float(per[t]["exact"]) for t in ts]),
             "subseq": _ci([float(per[t]["subseq"]) for t in ts]),
             "per_task": {t: float(per[t]["rougeL"]) for t in ts}}
        paired = [t for t in ts if t in base]
        if paired:
            d["delta_vs_base"] = _ci([float(per[t]["rougeL"]) - float(base[t]["rougeL"]) for t in paired])
            d["delta_tasks"] = len(paired)
        pooled = [x for t in ts if (t, s) in examples for x in examples[(t, s)]["rougeL"]]
        if pooled:
            d["evaluate_style"] = list(evaluate_style_ci(pooled))
        ws = wdoc.get("weights", {}).get(s)
        if ws:
            st = [weight_stats(np.asarray(ws[t]), wdoc["members"], t, wdoc.get("families"))
                  for t in ts if t in ws]
            d["weights"] = {k: float(np.mean([x[k] for x in st])) for k in st[0]}
        res[s] = d
    fams = wdoc.get("families") or None
    summary = {"systems": res, "findings": _findings(res),
               "by_family": _by_family(res, fams) if fams else None,
               "ci": "percentile bootstrap of the mean over per-task means (10,000 resamples, seed 0)",
               "evaluate_style_ci": "scipy.stats.bootstrap BCa over pooled examples, as HF evaluate "
                                    "reports strategy='bootstrap'; ignores clustering by task"}
    (out / "table.md").write_text(markdown_table(summary) + "\n")
    return summary


def _is_generated(name: str) -> bool:
    """A generated system at the run's settings (not a baseline, not a temperature-sweep variant:
    the headline must not pick its temperature on the test split)."""
    return (name not in ("base", "task-lora", "uniform") and not name.startswith("nearest-")
            and not re.search(r"-T[0-9.e+-]+$", name))


def _findings(res: dict) -> dict:
    gen = {s: d for s, d in res.items() if _is_generated(s)}
    if not gen or "base" not in res:
        return {}
    best = max(gen, key=lambda s: gen[s]["rougeL"][0])
    b, bl = gen[best]["rougeL"], res["base"]["rougeL"]
    f = {"best_generated": best, "best_rougeL": b[0], "base_rougeL": bl[0],
         "best_above_base_ci_disjoint": b[1] > bl[2]}
    if "task-lora" in res:
        tl = res["task-lora"]["rougeL"]
        f.update({"task_lora_rougeL": tl[0], "best_below_task_lora_ci_disjoint": b[2] < tl[1],
                  "gap_closed": (b[0] - bl[0]) / (tl[0] - bl[0]) if tl[0] != bl[0] else None})
        pb, pt = gen[best]["per_task"], res["task-lora"]["per_task"]
        common = [t for t in pb if t in pt]
        if common:   # paired over tasks: task heterogeneity cancels
            f["task_lora_minus_best"] = _ci([pt[t] - pb[t] for t in common])
    if "delta_vs_base" in gen[best]:
        f["best_minus_base"] = gen[best]["delta_vs_base"]
    return f


def _by_family(res: dict, families: dict) -> dict:
    """Mean per-task Rouge-L per family of held-out tasks, per system."""
    out = {}
    for s, d in res.items():
        acc: dict[str, list] = {}
        for t, v in d["per_task"].items():
            if families.get(t):
                acc.setdefault(families[t], []).append(v)
        out[s] = {f: float(np.mean(v)) for f, v in sorted(acc.items())}
    return out


def _fmt_ci(v) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def markdown_table(summary: dict) -> str:
    res = summary["systems"]
    lines = ["| system | tasks | Rouge-L mean [95% CI over tasks] | EM | subseq | "
             "Δ Rouge-L vs base [95% CI] | Rouge-L, evaluate-style [95% CI over examples] |",
             "|---|---|---|---|---|---|---|"]
    best = summary.get("findings", {}).get("best_generated")
    for s, d in res.items():
        delta = _fmt_ci(d["delta_vs_base"]) if "delta_vs_base" in d and s != "base" else "—"
        es = _fmt_ci(d["evaluate_style"]) if "evaluate_style" in d else "—"
        name = f"**{s}**" if s == best else s
        lines.append(f"| {name} | {d['tasks']} | {_fmt_ci(d['rougeL'])} | {d['exact'][0]:.3f} | "
                     f"{d['subseq'][0]:.3f} | {delta} | {es} |")
    wrows = [(s, d["weights"]) for s, d in res.items() if "weights" in d]
    if wrows:
        fam = any("family_mass" in w for _, w in wrows)
        lines += ["", "Mixing weights (means over held-out tasks): top-1 weight, effective number of "
                  "members 1/Σw²" + (", weight on the held-out task's own family" if fam else "") + ".", "",
                  "| system | top-1 weight | effective members |" + (" own-family weight |" if fam else ""),
                  "|---|---|---|" + ("---|" if fam else "")]
        for s, w in wrows:
            lines.append(f"| {s} | {w['top1']:.3f} | {w['effective_members']:.1f} |"
                         + (f" {w.get('family_mass', float('nan')):.3f} |" if fam else ""))
    bf = summary.get("by_family")
    if bf:
        show = [x for x in ("base", "uniform", f"nearest-{DEFAULT_METRIC}", f"{DEFAULT_PIPELINE}-{DEFAULT_METRIC}",
                            summary.get("findings", {}).get("best_generated"), "task-lora") if x in bf]
        show = list(dict.fromkeys(show))
        fams = sorted({f for s in show for f in bf[s]})
        lines += ["", "Rouge-L by family of the held-out task (mean over its tasks):", "",
                  "| family | " + " | ".join(show) + " |", "|---|" + "---|" * len(show)]
        for fam in fams:
            lines.append(f"| {fam} | " + " | ".join(f"{bf[s].get(fam, float('nan')):.3f}" for s in show) + " |")
    f = summary.get("findings") or {}
    if f:
        lines += ["", f"Best generated system: **{f['best_generated']}**, Rouge-L {f['best_rougeL']:.3f} "
                  f"vs base {f['base_rougeL']:.3f}: 95% CIs "
                  f"{'do not overlap' if f['best_above_base_ci_disjoint'] else 'overlap (or it is not above)'}."]
        if "best_minus_base" in f:
            lines.append(f"Paired over tasks, best generated − base: {_fmt_ci(f['best_minus_base'])}.")
        if "task_lora_minus_best" in f:
            lines.append(f"Paired over tasks, task LoRA − best generated: {_fmt_ci(f['task_lora_minus_best'])}.")
        if "task_lora_rougeL" in f:
            gap = f.get("gap_closed")
            lines.append(f"Task-trained LoRAs: {f['task_lora_rougeL']:.3f}; best generated below them with "
                         f"{'disjoint' if f['best_below_task_lora_ci_disjoint'] else 'overlapping'} CIs; "
                         f"share of the base→task-LoRA gap closed: "
                         f"{'n/a' if gap is None else f'{100 * gap:.0f}%'}.")
    return "\n".join(lines)
