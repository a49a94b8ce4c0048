"""A generated (PEFT) LoRA adapter as a llama.cpp LoRA adapter (GGUF), written with the ``gguf``
library (``pip install 'loramix[gguf]'``).

The file holds what llama.cpp's ``convert_lora_to_gguf.py`` writes for the same PEFT folder:

- metadata ``general.architecture`` (the base model's llama.cpp architecture), ``general.type =
  adapter``, ``adapter.type = lora``, ``adapter.lora.alpha`` (the adapter's ``lora_alpha``), and
  ``general.name``;
- per module two tensors named after gguf's own tensor map for the architecture, with the
  converter's suffixes: ``model.layers.N.self_attn.q_proj`` → ``blk.N.attn_q.weight.lora_a`` (A,
  r × in) and ``blk.N.attn_q.weight.lora_b`` (B, out × r);
- the converter's per-architecture rewrites, which apply to B only (ΔW = B·A and they permute the
  rows of ΔW): for the llama family (Llama, Mistral) the rows of ``q_proj`` / ``k_proj`` are
  permuted from HF's rotary layout to GGML's, as ``convert_hf_to_gguf.py`` does to the base weights;
- tensors as f16 (the default here: the converter's ``--outtype f16``) or f32 (the converter's own
  default in the llama.cpp that llama-cpp-python 0.3.36 vendors).

Scales. llama.cpp multiplies each module's ``B·A`` by ``alpha / rank`` with one ``alpha`` per file
(``adapter.lora.alpha``) and ``rank`` read per tensor from B's shape (``llama_adapter_lora_weight::
get_scale``: ``alpha ? adapter_scale * alpha / b->ne[0] : adapter_scale``). PEFT's scaling is per
module: ``alpha_m / r_m`` from ``rank_pattern`` / ``alpha_pattern``, ``alpha_m / sqrt(r_m)`` with
rsLoRA. So B of each module is multiplied by ``scaling_m · r_m / alpha`` (:func:`b_factor`), which
makes llama.cpp's ΔW PEFT's exactly for adapters of mixed ranks and alphas and for rsLoRA (the
converter writes the file's ``lora_alpha`` and ignores all three, mis-scaling such adapters). For a
plain adapter (one rank, one alpha, no rsLoRA) the factor is exactly 1 and B is left untouched, so
the file equals the converter's.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np

from loramix.bank import peft_io
from loramix.core.files import make_stage_dir

GGUF_NAME = "adapter_model.gguf"
OUTTYPES = ("f16", "f32")
# HF architectures → (llama.cpp architecture, whether q/k rows are permuted like LlamaModel does)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", True), "MistralForCausalLM": ("llama", True)}


class GGUFExportError(ValueError):
    """An adapter that cannot be written as GGUF; the message names the file and the reason."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("writing GGUF needs the gguf package, which is not installed: "
                          "pip install 'loramix[gguf]'") from None
    return gguf


def permute_rows(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF's rotary row order → GGML's (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``), on the
    rows of ``w`` (out × k): within each head, the two halves are interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    out = w.shape[0]
    return (w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def b_factor(spec, ms, alpha: float) -> float:
    """What B of module ``ms`` is multiplied by in the GGUF file so that llama.cpp's scale,
    ``alpha / rank`` (``rank``: this tensor's; 1 when ``alpha`` is 0), gives PEFT's ``ms.scaling``.
    Exactly 1 for a module with the file's alpha and no rsLoRA."""
    if alpha == 0:
        return float(ms.scaling)
    alpha_m = peft_io.module_alpha(spec.raw_config, ms.name)
    scaled_rank = alpha_m * math.sqrt(ms.rank) if spec.use_rslora else alpha_m   # scaling_m · r_m
    return 1.0 if scaled_rank == alpha else scaled_rank / alpha


def base_config(adapter_dir: Path, base=None) -> tuple[Path, dict]:
    """The base model's ``config.json``: from ``base`` (a folder), else the adapter's
    ``base_model_name_or_path`` when that is a local folder."""
    cfg = json.loads((adapter_dir / peft_io.CONFIG_NAME).read_text())
    ref = base if base is not None else cfg.get("base_model_name_or_path")
    p = Path(os.fspath(ref)) / "config.json" if ref else None
    if p is None or not p.is_file():
        raise GGUFExportError(
            f"{adapter_dir / peft_io.CONFIG_NAME}: base model {ref!r} is not a local folder with config.json; "
            "the GGUF writer needs the base model's config (its architecture, layers and heads): pass "
            "--base DIR (base=...)")
    return p, json.loads(p.read_text())


def export_gguf(adapter_dir, out=None, *, base=None, outtype: str = "f16") -> Path:
    """Write the PEFT LoRA adapter in ``adapter_dir`` as a llama.cpp GGUF LoRA adapter at ``out``
    (default ``adapter_dir/adapter_model.gguf``); written to a temporary file and renamed.
    ``base``: the base model folder (default: the adapter's ``base_model_name_or_path``)."""
    from loramix.core import tensors

    gguf = _gguf()
    adapter_dir = Path(adapter_dir)
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    spec = peft_io.read_adapter(adapter_dir)
    cfg_path, bcfg = base_config(adapter_dir, base)
    archs = bcfg.get("architectures") or []
    if not archs or archs[0] not in ARCHITECTURES:
        raise GGUFExportError(f"{cfg_path}: architecture {archs[:1] or '(none)'} is not supported for GGUF "
                              f"adapters yet (supported: {', '.join(ARCHITECTURES)})")
    arch, permute = ARCHITECTURES[archs[0]]
    n_blocks = int(bcfg["num_hidden_layers"])
    n_head = int(bcfg["num_attention_heads"])
    n_kv = int(bcfg.get("num_key_value_heads") or n_head)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    dtype = np.float16 if outtype == "f16" else np.float32
    f = tensors.SafetensorsFile(str(adapter_dir / peft_io.WEIGHTS_NAME))
    out = Path(out) if out is not None else adapter_dir / GGUF_NAME
    out = Path(os.path.abspath(out))
    stage = make_stage_dir(out.parent, out.name)
    try:
        tmp = stage / out.name
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        alpha = float(spec.lora_alpha)
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(adapter_dir.name)
        for name, ms in spec.modules.items():
            mapped = tmap.get_name(f"{name}.weight", try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise GGUFExportError(f"{adapter_dir / peft_io.WEIGHTS_NAME}: module {name} has no {arch} GGUF "
                                      "tensor name")
            a, b = f.to_f32(ms.a_key), f.to_f32(ms.b_key)
            k = b_factor(spec, ms, alpha)
            if k != 1.0:
                b = (b.astype(np.float64) * k).astype(np.float32)
            if permute and re.search(r"\.(q_proj)$", name):
                b = permute_rows(b, n_head, n_head)
            elif permute and re.search(r"\.(k_proj)$", name):
                b = permute_rows(b, n_head, n_kv)
            w.add_tensor(f"{mapped}.lora_a", np.ascontiguousarray(a.astype(dtype)))
            w.add_tensor(f"{mapped}.lora_b", np.ascontiguousarray(b.astype(dtype)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        for p in stage.iterdir() if stage.exists() else ():
            p.unlink()
        if stage.exists():
            stage.rmdir()
    return out
