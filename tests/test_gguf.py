"""GGUF output: the llama.cpp LoRA adapter written for a generated PEFT folder, read back with the
gguf library's own reader and compared tensor for tensor with the PEFT folder under the
conventions of llama.cpp's convert_lora_to_gguf.py (names, metadata, q/k row permutation, f16)."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import _tiny
from loramix.pipeline import generate

import gguf  # noqa: E402  (the test extra installs it: a missing one fails, never skips)
from safetensors.numpy import load_file  # noqa: E402  (an independent reader of the PEFT folder)

ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.self_attn\.(\w_proj)\.lora_([AB])\.weight$")


def _ggml_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """The rows of a q/k projection in GGML's rotary order, index by index: within head h of
    size d, GGML row h·d + 2k + j is HF row h·d + j·d/2 + k."""
    d = b.shape[0] // n_head
    out = np.empty_like(b)
    for h in range(n_head):
        for k in range(d // 2):
            for j in range(2):
                out[h * d + 2 * k + j] = b[h * d + j * (d // 2) + k]
    return out


def _expected(adapter, model_cfg, dtype=np.float16) -> dict:
    exp = {}
    for key, t in load_file(str(adapter / "adapter_model.safetensors")).items():
        m = KEY.match(key)
        assert m, key
        layer, proj, ab = m.groups()
        t = t.astype(np.float32)
        if ab == "B" and proj == "q_proj":
            t = _ggml_rows(t, model_cfg["num_attention_heads"])
        elif ab == "B" and proj == "k_proj":
            t = _ggml_rows(t, model_cfg["num_key_value_heads"])
        exp[f"blk.{layer}.{ATTN[proj]}.weight.lora_{ab.lower()}"] = t.astype(dtype)
    return exp


def _field(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]


@pytest.mark.parametrize("kw", [dict(mode="factors", exclude=["m2", "m3"]), dict(mode="svd", rank=2)])
def test_gguf_equals_the_converters_output(w, tmp_path, kw):
    from loramix.mixing.gguf_export import export_gguf

    out = tmp_path / "a"
    generate(w.queries["animals_q"], w.bank, out, **kw)
    path = export_gguf(out)
    assert path == out / "adapter_model.gguf"
    model_cfg = json.loads((w.model / "config.json").read_text())
    cfg = json.loads((out / "adapter_config.json").read_text())
    r = gguf.GGUFReader(str(path))
    assert _field(r, "general.type") == "adapter" and _field(r, "adapter.type") == "lora"
    assert _field(r, "general.architecture") == "llama"
    assert float(_field(r, "adapter.lora.alpha")) == float(cfg["lora_alpha"])
    exp = _expected(out, model_cfg)
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(exp)
    for name, e in exp.items():
        t = got[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
        assert tuple(int(x) for x in t.shape) == e.shape[::-1], name   # GGUF stores ne (reversed)
        np.testing.assert_array_equal(np.asarray(t.data).reshape(e.shape), e, err_msg=name)


def test_gguf_from_the_cli_and_f32(w, tmp_path):
    r = _tiny.run_cli("generate", w.queries["music_q"], "--bank", w.bank, "-o", tmp_path / "g", "--mode", "svd",
                      "--rank", "2", "--format", "gguf", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["gguf"] == str(tmp_path / "g" / "adapter_model.gguf")
    r = _tiny.run_cli("export", tmp_path / "g", "--format", "gguf", "-o", tmp_path / "x.gguf", "--outtype", "f32",
                      "--json")
    assert r.returncode == 0, r.stderr
    model_cfg = json.loads((w.model / "config.json").read_text())
    exp = _expected(tmp_path / "g", model_cfg, np.float32)
    got = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "x.gguf")).tensors}
    for name, e in exp.items():
        assert got[name].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(got[name].data).reshape(e.shape), e, err_msg=name)


def test_gguf_refusals_name_the_file(w, tmp_path):
    from loramix.mixing.gguf_export import GGUFExportError, export_gguf

    generate(w.queries["music_q"], w.bank, tmp_path / "hub", mode="svd", rank=2, base_model="org/not-here")
    with pytest.raises(GGUFExportError, match=r"hub/adapter_config.json: base model 'org/not-here' .* --base"):
        export_gguf(tmp_path / "hub")
    p = export_gguf(tmp_path / "hub", base=w.model)   # --base gives the config
    assert {t.name for t in gguf.GGUFReader(str(p)).tensors}
    assert sorted(x.name for x in (tmp_path / "hub").iterdir() if x.name.startswith(".")) == []


def _peft_deltas(model_dir, adapter_dir) -> dict:
    """(ΔW, scaling, rank) per module: ΔW = scaling · B @ A in float64, with PEFT's own scaling
    (its reading of r, lora_alpha, rank_pattern, alpha_pattern, use_rslora) and its loaded factors."""
    import torch
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_tiny.load_base(model_dir), str(adapter_dir))
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            m = re.search(r"layers\.(\d+)\.self_attn\.(\w_proj)$", name)
            with torch.no_grad():
                b = mod.lora_B["default"].weight.double().numpy()
                a = mod.lora_A["default"].weight.double().numpy()
            s = mod.scaling["default"]
            out[(int(m.group(1)), m.group(2))] = (s * (b @ a), s, a.shape[0])
    return out


def _llama_cpp_deltas(path) -> tuple[dict, float]:
    """ΔW per module as llama.cpp computes it from the file: (alpha / rank) · B @ A, with one alpha
    per file and rank taken per tensor from B (``b->ne[0]``); alpha 0 means scale 1."""
    r = gguf.GGUFReader(str(path))
    alpha = float(_field(r, "adapter.lora.alpha"))
    t = {x.name: np.asarray(x.data).reshape(tuple(int(d) for d in x.shape[::-1])).astype(np.float64)
         for x in r.tensors}
    names = {ggml: proj for proj, ggml in ATTN.items()}
    out = {}
    for key, a in t.items():
        m = re.match(r"^blk\.(\d+)\.(\w+)\.weight\.lora_a$", key)
        if m is None:
            continue
        b = t[key[:-1] + "b"]
        rank = b.shape[1]          # B is out × r here; ggml's ne[0] is r
        out[(int(m.group(1)), names[m.group(2)])] = (alpha / rank if alpha else 1.0) * (b @ a)
    return out, alpha


@pytest.mark.parametrize("case", ["generated", "m2", "m1"])
def test_gguf_mixed_ranks_alphas_and_rslora_scale_like_peft(w, tmp_path, case):
    """Adapters llama.cpp's one alpha / rank would mis-scale: a generated factors mix over members
    of ranks 2..8 (per-module ranks), member m2 (rank_pattern and alpha_pattern), member m1 (rsLoRA).
    The file's ΔW, computed the way llama.cpp does, is PEFT's in float64 up to the f32 rounding of
    the folded B (relative 2**-24 per entry)."""
    from loramix.mixing.gguf_export import export_gguf

    if case == "generated":
        src = tmp_path / "mixed"
        generate(w.queries["music_q"], w.bank, src)
    else:
        src = w.members[case]
    path = export_gguf(src, tmp_path / "x.gguf", base=w.model, outtype="f32")
    model_cfg = json.loads((w.model / "config.json").read_text())
    peft = _peft_deltas(w.model, src)
    got, alpha = _llama_cpp_deltas(path)
    assert set(got) == set(peft)
    for (layer, proj), (d, _, _) in peft.items():
        if proj in ("q_proj", "k_proj"):
            d = _ggml_rows(d, model_cfg["num_attention_heads" if proj == "q_proj" else "num_key_value_heads"])
        np.testing.assert_allclose(got[(layer, proj)], d, rtol=1e-6, atol=1e-6 * np.abs(d).max(),
                                   err_msg=f"layer {layer} {proj}")
    # the case needs the fold: one alpha / rank would give some module another scale than PEFT's
    assert any(abs(alpha / rank - s) > 1e-6 * s for _, s, rank in peft.values())
    if case == "generated":
        assert len({rank for _, _, rank in peft.values()}) > 1
