"""Tiny real components for the generation tests: a trained word-level tokenizer, a random
2-layer Mistral, real PEFT LoRA adapters on it (random non-zero A and B; different ranks,
target modules, rsLoRA, rank/alpha patterns, layers_to_transform) with small jsonl datasets,
and a bank built from them. Built once per test session (``world(tmp_path_factory)``).

torch/transformers/peft are imported here only: the library itself never imports them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Where the loramix under test was imported from: the source tree (dev loop, PYTHONPATH=python)
# or site-packages (CI installs the package). Subprocesses must import the same one.
import loramix as _loramix  # noqa: E402

PKG_PARENT = Path(_loramix.__file__).resolve().parents[1]

TOPICS = {
    "animals": "cat dog horse cow sheep goat bird fish mouse lion tiger bear wolf fox deer".split(),
    "food": "bread cheese apple pear rice soup cake milk egg meat salt sugar tea wine bean".split(),
    "code": "int float loop class def return import list dict set tuple print while for if".split(),
    "sport": "ball goal team run jump swim race win lose score match coach field net kick".split(),
    "music": "song note drum piano guitar band tune beat voice sing chord tempo bass rock jazz".split(),
}
COMMON = "the a is and of to in it".split()


def make_examples(topic: str, n: int, seed: int, mix: str | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = TOPICS[topic] + COMMON
    if mix:
        words = words + TOPICS[mix][:5]
    out = []
    for _ in range(n):
        inp = " ".join(rng.choice(words, size=int(rng.integers(5, 12))))
        outp = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
        out.append({"input": inp, "output": [outp, "ignored second answer"]})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def build_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    text = [" ".join(v + COMMON) for v in TOPICS.values()] + ["ignored second answer"]
    tok.train_from_iterator(text, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def build_model(path: Path, vocab: int, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                        max_position_embeddings=64, tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return path


def load_base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()


MEMBER_CONFIGS = {
    # name: (topic, LoraConfig kwargs)
    "m0": ("animals", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "m1": ("food", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True)),
    "m2": ("code", dict(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 4})),
    "m3": ("sport", dict(r=2, lora_alpha=4, target_modules=["o_proj", "q_proj"], layers_to_transform=[0])),
}


def build_adapter(model_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = load_base(model_dir)
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    pm = get_peft_model(base, cfg)
    with torch.no_grad():   # make B (and A) clearly non-zero but small
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(0.5)
    pm.save_pretrained(str(out))
    for extra in out.glob("README.md"):
        extra.unlink()
    return out


@dataclass
class World:
    root: Path
    model: Path
    tokenizer: Path
    bank: Path
    members: dict = field(default_factory=dict)     # name -> member dir
    queries: dict = field(default_factory=dict)     # name -> dataset path


_WORLD: World | None = None


def world(tmp_path_factory) -> World:
    global _WORLD
    if _WORLD is None:
        root = tmp_path_factory.mktemp("tiny")
        model = root / "model"
        tok = build_tokenizer(model)
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_file(str(tok)).get_vocab_size()
        build_model(model, vocab)
        bank = root / "bank"
        members = {}
        for i, (name, (topic, kw)) in enumerate(MEMBER_CONFIGS.items()):
            d = build_adapter(model, bank / name, seed=100 + i, **kw)
            write_jsonl(d / "dataset.jsonl", make_examples(topic, 24, seed=i))
            members[name] = d
        queries = {
            "animals_q": write_jsonl(root / "q" / "animals_q.jsonl", make_examples("animals", 16, 50, mix="food")),
            "music_q": write_jsonl(root / "q" / "music_q.jsonl", make_examples("music", 16, 51, mix="code")),
        }
        from loramix.bank.bank import build_bank

        build_bank(bank, tok)
        _WORLD = World(root, model, tok, bank, members, queries)
    return _WORLD


# ---------------------------------------------------------------- PEFT-side oracles

INPUT_IDS = [[1, 5, 9, 12, 7, 3, 20, 4, 11, 30]]


def logits_base(model_dir, state_delta: dict | None = None):
    """Logits of the base model, optionally with dense deltas added to its linear weights."""
    import torch

    m = load_base(model_dir)
    if state_delta:
        sd = m.state_dict()
        with torch.no_grad():
            for mod, delta in state_delta.items():
                sd[f"{mod}.weight"].add_(torch.as_tensor(delta, dtype=sd[f"{mod}.weight"].dtype))
    with torch.no_grad():
        return m(torch.tensor(INPUT_IDS)).logits.double().numpy()


def logits_adapter(model_dir, adapter_dir):
    import torch
    from peft import PeftModel

    pm = PeftModel.from_pretrained(load_base(model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        return pm(torch.tensor(INPUT_IDS)).logits.double().numpy()


def load_report(model_dir, adapter_dir):
    """(missing LoRA keys, unexpected keys) when the adapter's tensors are set into a fresh PEFT model."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(adapter_dir))
    pm = get_peft_model(load_base(model_dir), cfg)
    res = set_peft_model_state_dict(pm, load_file(str(Path(adapter_dir) / "adapter_model.safetensors")))
    missing = [k for k in res.missing_keys if "lora_" in k]
    return missing, list(res.unexpected_keys)


def merged_delta(model_dir, adapter_dir) -> dict:
    """Dense ΔW per module from PEFT's own merge_and_unload (float64)."""
    from peft import PeftModel

    base = load_base(model_dir)
    before = {k: v.double().clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = {}
    for k, v in merged.state_dict().items():
        d = (v.double() - before[k]).numpy()
        if k.endswith(".weight") and np.any(d != 0):
            out[k[: -len(".weight")]] = d
    return out


def peft_weighted_logits(model_dir, adapters: dict, weights: list, combination_type="cat"):
    """Logits with PEFT's add_weighted_adapter over ``adapters`` (name -> dir)."""
    import torch
    from peft import PeftModel

    names = list(adapters)
    pm = PeftModel.from_pretrained(load_base(model_dir), str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    pm.add_weighted_adapter(names, weights, "mix", combination_type=combination_type)
    pm.set_adapter("mix")
    with torch.no_grad():
        return pm(torch.tensor(INPUT_IDS)).logits.double().numpy()


def copy_bank(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_cli(*args, env=None, cwd=None):
    """``python -m loramix.cli ARGS`` in a subprocess importing the loramix under test."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(PKG_PARENT), str(ROOT / "tests")])
    e.pop("HF_HUB_OFFLINE", None)
    if env:
        e.update(env)
    cmd = [sys.executable, "-m", "loramix.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=cwd, timeout=300)
