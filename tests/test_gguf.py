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

    generate(w.queries["music_q"], w.bank, tmp_path / "mixed")   # members of ranks 2..8: per-module ranks
    with pytest.raises(GGUFExportError, match=r"mixed/adapter_config.json: modules of ranks"):
        export_gguf(tmp_path / "mixed")
    generate(w.queries["music_q"], w.bank, tmp_path / "hub", mode="svd", rank=2, base_model="org/not-here")
    with pytest.raises(GGUFExportError, match=r"hub/adapter_config.json: base model 'org/not-here' .* --base"):
        export_gguf(tmp_path / "hub")
    p = export_gguf(tmp_path / "hub", base=w.model)   # --base gives the config
    assert {t.name for t in gguf.GGUFReader(str(p)).tensors}
    assert sorted(x.name for x in (tmp_path / "hub").iterdir() if x.name.startswith(".")) == []
