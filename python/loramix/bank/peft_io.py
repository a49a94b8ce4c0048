"""PEFT LoRA adapters on disk: read a member's config and tensors, write a mixed adapter's config.

Only plain LoRA on linear layers is supported, because only there is a mix exact and well
defined: DoRA (magnitude vectors), ``lora_bias``, LoRA on embeddings, ``modules_to_save``,
trainable tokens and other PEFT variants raise :class:`AdapterError` naming the member.

Scaling is PEFT's: ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where ``r`` and
``alpha`` of a module come from ``rank_pattern`` / ``alpha_pattern`` when a key matches the
module name the way PEFT matches it (``re.match(rf"(.*\\.)?({key})$", module)``, first key in
the dict's order wins), else from ``r`` / ``lora_alpha``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")

# config keys whose non-default value means a variant we cannot mix exactly
_UNSUPPORTED = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "trainable_token_indices": (None, {}, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "use_qalora": (False, None),
}


class AdapterError(ValueError):
    """A member adapter that cannot be read or mixed; the message names the member."""


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-wrapped linear layer of a member: ``ΔW = scaling · B @ A``."""

    name: str          # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    rank: int
    in_features: int
    out_features: int
    scaling: float
    a_key: str
    b_key: str


@dataclass
class AdapterSpec:
    """What loramix needs from one PEFT LoRA adapter folder."""

    name: str
    path: Path
    base_model: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    target_modules: object
    layers_to_transform: object
    modules: dict[str, ModuleSpec] = field(default_factory=dict)
    dtype: str = "F32"
    raw_config: dict = field(default_factory=dict)


def pattern_key(pattern_keys, module: str) -> str | None:
    """The first key of ``rank_pattern``/``alpha_pattern`` that matches ``module``, as PEFT does."""
    for key in pattern_keys:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except (re.error, TypeError) as e:
            raise ValueError(f"pattern key {key!r} is not a valid regular expression ({e})") from None
    return None


def module_scaling(cfg: dict, module: str, rank: int) -> float:
    """PEFT's ``scaling`` of ``module`` in an adapter with config ``cfg`` and actual ``rank``."""
    rp = cfg.get("rank_pattern") or {}
    k = pattern_key(rp.keys(), module)
    r = int(rp[k]) if k is not None else int(cfg.get("r", 8))
    if r != rank:
        raise ValueError(f"module {module}: tensors have rank {rank} but the config says r={r}")
    alpha = module_alpha(cfg, module)
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def module_alpha(cfg: dict, module: str) -> float:
    """PEFT's ``alpha`` of ``module``: its ``alpha_pattern`` entry, else ``lora_alpha``."""
    ap = cfg.get("alpha_pattern") or {}
    k = pattern_key(ap.keys(), module)
    return float(ap[k]) if k is not None else float(cfg.get("lora_alpha", 8))


def read_config(path: Path, name: str) -> dict:
    p = Path(path) / CONFIG_NAME
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise AdapterError(f"member {name!r}: no {CONFIG_NAME} in {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"member {name!r}: {CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"member {name!r}: {CONFIG_NAME} is not a JSON object")
    check_config(cfg, name)
    return cfg


def _is_num(v, integer: bool = False) -> bool:
    return not isinstance(v, bool) and isinstance(v, int if integer else (int, float))


def check_config_values(cfg: dict, name: str) -> None:
    """The numbers and patterns of an ``adapter_config.json`` have the types PEFT gives them:
    ``r`` a positive integer, ``lora_alpha`` a number, ``rank_pattern`` / ``alpha_pattern``
    objects whose keys are regular expressions and whose values are positive integers / numbers."""
    where = f"member {name!r}: {CONFIG_NAME}"
    if "r" in cfg and not (_is_num(cfg["r"], True) and cfg["r"] >= 1):
        raise AdapterError(f"{where} has r={cfg['r']!r}; a positive integer is expected")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{where} has base_model_name_or_path={base!r}; a string or null is expected")
    if "lora_alpha" in cfg and not _is_num(cfg["lora_alpha"]):
        raise AdapterError(f"{where} has lora_alpha={cfg['lora_alpha']!r}; a number is expected")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise AdapterError(f"{where} has {key}={str(pat)[:60]!r}; an object (pattern -> value) is expected")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise AdapterError(f"{where}: {key} key {k!r} is not a valid regular expression ({e})") from None
            if not (_is_num(v, integer) and (v >= 1 if integer else True)):
                raise AdapterError(f"{where}: {key}[{k!r}] = {v!r}; "
                                   f"{'a positive integer' if integer else 'a number'} is expected")


def check_config(cfg: dict, name: str) -> None:
    check_config_values(cfg, name)
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise AdapterError(f"member {name!r}: peft_type {ptype} is not LoRA")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda")):
        raise AdapterError(
            f"member {name!r}: init_lora_weights={init!r} changes the base weights; convert it to a "
            "plain LoRA (PEFT's path_initial_model_for_weight_conversion) before mixing")
    if cfg.get("alora_invocation_tokens"):
        raise AdapterError(f"member {name!r}: activated LoRA (alora_invocation_tokens) is not supported")
    for key, ok in _UNSUPPORTED.items():
        if key not in cfg:
            continue
        if cfg[key] not in ok:
            raise AdapterError(
                f"member {name!r}: {key}={cfg[key]!r} is not supported (only plain LoRA on linear "
                "layers can be mixed exactly)")


def read_adapter(path, name: str | None = None, *, check_tensors: bool = True) -> AdapterSpec:
    """Read and validate a PEFT LoRA adapter folder; returns its modules with shapes and scalings."""
    from loramix.core import tensors

    path = Path(path)
    name = name or path.name
    cfg = read_config(path, name)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise AdapterError(f"member {name!r}: no {WEIGHTS_NAME} in {path}")
    try:
        f = tensors.SafetensorsFile(str(wpath))
    except (ValueError, OSError) as e:
        raise AdapterError(f"member {name!r}: {WEIGHTS_NAME} is unreadable: {e}") from None
    return spec_from_file(cfg, f, path, name)


def spec_from_file(cfg: dict, f, path: Path, name: str) -> AdapterSpec:
    pairs: dict[str, dict[str, str]] = {}
    dtypes: dict[str, int] = {}
    for key in f.keys():
        m = _KEY_RE.match(key)
        if m is None or not key.startswith(KEY_PREFIX):
            what = "DoRA magnitude" if "lora_magnitude_vector" in key else (
                "LoRA on an embedding" if "lora_embedding" in key else "a non-LoRA tensor")
            raise AdapterError(f"member {name!r}: tensor {key!r} is {what}; not supported")
        if key.count(".lora_") != 1:
            raise AdapterError(f"member {name!r}: unexpected tensor {key!r}")
        mod = m.group("module")[len(KEY_PREFIX):]
        pairs.setdefault(mod, {})[m.group("ab")] = key
        dt = f.dtype(key)
        if dt not in ("F32", "F16", "BF16"):
            raise AdapterError(f"member {name!r}: tensor {key!r} has dtype {dt}; F32/F16/BF16 only")
        dtypes[dt] = dtypes.get(dt, 0) + 1
    if not pairs:
        raise AdapterError(f"member {name!r}: {WEIGHTS_NAME} holds no LoRA tensors")
    modules = {}
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"member {name!r}: module {mod} lacks lora_{'B' if 'A' in ab else 'A'}")
        sa, sb = f.shape(ab["A"]), f.shape(ab["B"])
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise AdapterError(
                f"member {name!r}: module {mod} has lora_A {sa} and lora_B {sb}; not a linear LoRA pair")
        if min(sa[0], sa[1], sb[0]) < 1:
            raise AdapterError(f"member {name!r}: module {mod} has lora_A {sa} and lora_B {sb}; rank, "
                               "in_features and out_features must be at least 1")
        try:
            s = module_scaling(cfg, mod, sa[0])
        except ValueError as e:
            raise AdapterError(f"member {name!r}: {e}") from None
        modules[mod] = ModuleSpec(mod, sa[0], sa[1], sb[0], s, ab["A"], ab["B"])
    return AdapterSpec(
        name=name, path=Path(path), base_model=cfg.get("base_model_name_or_path"),
        r=int(cfg.get("r", 8)), lora_alpha=float(cfg.get("lora_alpha", 8)),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=dict(cfg.get("rank_pattern") or {}),
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
        target_modules=cfg.get("target_modules"), layers_to_transform=cfg.get("layers_to_transform"),
        modules=dict(sorted(modules.items(), key=lambda kv: _natural(kv[0]))),
        dtype=max(dtypes, key=dtypes.get), raw_config=cfg)


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def natural_key(s: str):
    """Sort key that puts layers.2 before layers.10."""
    return _natural(s)


def tensor_key(module: str, ab: str) -> str:
    return f"{KEY_PREFIX}{module}.lora_{ab}.weight"


def _pattern_name(module: str) -> str:
    """A rank/alpha pattern key for one module that both old and new PEFT match exactly.

    PEFT < 0.15 matched ``.*\\.{key}$`` (a dot required before the key), newer PEFT matches
    ``(.*\\.)?({key})$``; dropping the first path component satisfies both.
    """
    parts = module.split(".")
    return ".".join(parts[1:]) if len(parts) > 1 else module


def target_modules_for(modules: list[str], member_specs: list[AdapterSpec]) -> list[str]:
    """``target_modules`` for an adapter that holds exactly ``modules``.

    When every member used targets a plain list of names over all layers, the union of those
    names matches exactly the union of their modules, so it is written (short, readable).
    Otherwise the exact module paths are written: PEFT matches a list entry equal to the full
    name, so no module outside ``modules`` gets a LoRA layer (and none would load as missing).
    """
    plain = all(isinstance(s.target_modules, list) and not s.layers_to_transform
                and not s.raw_config.get("exclude_modules") for s in member_specs)
    if plain:
        names = sorted({t for s in member_specs for t in s.target_modules})
        covered = {m for m in modules}
        claimed = {m for s in member_specs for m in s.modules}
        if covered == claimed:
            return names
    return sorted(modules, key=_natural)


def output_config(base_model: str | None, ranks: dict[str, int], target_modules: list[str],
                  *, task_type: str | None = "CAUSAL_LM", revision: str | None = None) -> dict:
    """``adapter_config.json`` of a mixed adapter: scaling exactly 1 on every module.

    ``r`` is the most common module rank; modules of another rank get ``rank_pattern`` and an
    equal ``alpha_pattern`` entry, so ``lora_alpha / r == 1`` everywhere and the mixed factors
    carry every scale themselves. Only keys PEFT >= 0.14 accepts are written.
    """
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(sorted(counts), key=lambda r: counts[r]) if counts else 8
    pattern = {_pattern_name(m): r for m, r in sorted(ranks.items(), key=lambda kv: _natural(kv[0]))
               if r != r0}
    cfg = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "revision": revision,
        "r": int(r0),
        "lora_alpha": int(r0),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": target_modules,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return cfg
