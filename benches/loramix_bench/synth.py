"""Synthetic paper-scale inputs: a bank shaped like Lots-of-LoRAs, token profiles, a target dataset.

The bank is what :class:`loramix.bank.Bank` opens and :func:`loramix.pipeline.generate` mixes:

    ROOT/<scale>-<dtype>/           the bank (``bank.json`` written by ``build_bank``)
        tokenizer.json              a WordLevel tokenizer, V = 32,000 ("<unk>", "<s>", "</s>", "t3"...)
        m000/adapter_config.json    PEFT LoRA, r=16, lora_alpha=32, q/k/v of every layer
        m000/adapter_model.safetensors
        m000/profile.npz            a synthetic token profile (no dataset: the bank uses the profile)
    ROOT/target-1000.jsonl          1,000 examples ({"input", "output": [..]}) over the same vocabulary

Shapes are Mistral-7B's (hidden 4096, 32 layers, k/v out 1024): 9,437,184 values per adapter,
37.7 MB in F32 (as published), 18.9 MB in BF16. Values: ``A`` uniform in ``±1/sqrt(in)`` (the
kaiming-uniform scale PEFT initializes A with) times a per-member factor in [0.8, 1.2], ``B``
normal with std 2e-3 times a per-member factor (small, non-zero, as after training). Each
tensor is a window of a shared random pool at a random offset, scaled: generation costs a copy
per value, not a random draw, so 19 GB are written at disk speed.

Token profiles: :func:`make_histograms` (Zipf-like global popularity, 2,000-8,000 distinct
tokens per dataset, 30k-150k tokens; the same generator as ``benches/bench_divergence.py``, so
the distance benchmarks and the bank share one distribution).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BASE_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
VOCAB = 32000
SPECIALS = ("<unk>", "<s>", "</s>")
SCALES = {"laptop": 64, "paper": 502}
TARGET_NAME = "target-1000.jsonl"


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    layers: int = 32
    kv_out: int = 1024
    r: int = 16
    alpha: int = 32

    def modules(self) -> list[tuple[str, int, int]]:
        """``(module path, in_features, out_features)`` in the file order PEFT writes."""
        out = []
        for i in range(self.layers):
            for proj, o in (("q_proj", self.hidden), ("k_proj", self.kv_out), ("v_proj", self.kv_out)):
                out.append((f"model.layers.{i}.self_attn.{proj}", self.hidden, o))
        return out

    @property
    def params(self) -> int:
        """Values per adapter (A and B of every module)."""
        return sum(self.r * i + o * self.r for _, i, o in self.modules())


MISTRAL = Shape()
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}


def adapter_bytes(dtype: str = "F32", shape: Shape = MISTRAL) -> int:
    return shape.params * DTYPE_BYTES[dtype]


# ----------------------------------------------------------------------------- profiles
def make_histograms(n: int = 502, V: int = VOCAB, seed: int = 20250701, lo: int = 2000, hi: int = 8000):
    """CSR counts (n, V): a global Zipf popularity (s = 1.1) over shuffled ids; each dataset keeps
    k ~ U[lo, hi] distinct tokens (Gumbel top-k by popularity, so common tokens are shared),
    reweights them with its own log-normal taste and draws n_tok ~ U[30k, 150k] tokens (every
    kept token at least once). Ids below ``len(SPECIALS)`` are never drawn."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, V + 1) ** 1.1
    pop = pop[rng.permutation(V)]
    pop[: len(SPECIALS)] = 0.0
    logpop = np.log(np.maximum(pop, 1e-300))
    logpop[: len(SPECIALS)] = -np.inf
    indptr, indices, data = [0], [], []
    for _ in range(n):
        k = int(rng.integers(lo, hi + 1))
        ntok = int(rng.integers(30000, 150001))
        keys = logpop + rng.gumbel(size=V)
        keep = np.sort(np.argpartition(-keys, k)[:k])
        w = pop[keep] * rng.lognormal(0.0, 1.0, size=k)
        counts = 1 + rng.multinomial(ntok - k, w / w.sum())
        indices.append(keep)
        data.append(counts.astype(np.float64))
        indptr.append(indptr[-1] + k)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.array(indptr)), shape=(n, V))


# ----------------------------------------------------------------------------- tokenizer, dataset
def make_tokenizer(path, V: int = VOCAB) -> Path:
    """A WordLevel tokenizer with exactly ``V`` entries: specials, then ``t<id>`` for every id;
    whitespace pre-tokenizer; ``<s>`` prepended to each text (as Mistral's does)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), V)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def make_dataset(path, n_examples: int = 1000, V: int = VOCAB, seed: int = 7) -> Path:
    """``n_examples`` jsonl rows ``{"input": ..., "output": [answer, other]}`` whose tokens follow
    one synthetic dataset distribution (like a bank member's, a different draw)."""
    h = make_histograms(1, V, seed=seed)
    ids, p = h.indices, h.data / h.data.sum()
    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for _ in range(n_examples):
            x = rng.choice(ids, size=int(rng.integers(40, 160)), p=p)
            y = rng.choice(ids, size=int(rng.integers(3, 30)), p=p)
            # the profile joins input + output[0] with nothing between: end the input with a space
            fh.write(json.dumps({"input": " ".join(f"t{i}" for i in x) + " ",
                                 "output": [" ".join(f"t{i}" for i in y), "t5 t6"]}) + "\n")
    return path


# ----------------------------------------------------------------------------- adapters
def adapter_config(shape: Shape = MISTRAL) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": BASE_MODEL,
        "r": shape.r, "lora_alpha": shape.alpha, "lora_dropout": 0.05, "use_rslora": False,
        "use_dora": False, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["q_proj", "k_proj", "v_proj"], "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


class _Pool:
    """A shared window of random values; tensors are scaled windows of it at random offsets."""

    def __init__(self, rng, size: int = 1 << 23):
        self.u = rng.uniform(-1.0, 1.0, size).astype(np.float32)
        self.g = rng.standard_normal(size, dtype=np.float32)
        self.rng = rng

    def take(self, src: np.ndarray, n: int, scale: float) -> np.ndarray:
        off = int(self.rng.integers(0, src.size - n))
        return src[off: off + n] * np.float32(scale)


def write_adapter(member_dir, pool: _Pool, dtype: str = "BF16", shape: Shape = MISTRAL) -> Path:
    from loramix.core import tensors
    from loramix.bank.peft_io import CONFIG_NAME, WEIGHTS_NAME, tensor_key

    d = Path(member_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_NAME).write_text(json.dumps(adapter_config(shape), indent=2) + "\n")
    mods = shape.modules()
    entries = []
    for name, inn, out in mods:
        entries.append((tensor_key(name, "A"), dtype, (shape.r, inn)))
        entries.append((tensor_key(name, "B"), dtype, (out, shape.r)))
    fa = 0.8 + 0.4 * pool.rng.random()
    fb = 0.5 + pool.rng.random()
    with tensors.SafetensorsWriter(d / WEIGHTS_NAME, entries, {"format": "pt"}) as w:
        for name, inn, out in mods:
            for ab, shp, src, s in (("A", (shape.r, inn), pool.u, fa / np.sqrt(inn)),
                                    ("B", (out, shape.r), pool.g, 2e-3 * fb)):
                x = pool.take(src, shp[0] * shp[1], s).reshape(shp)
                w.write(tensor_key(name, ab), x if dtype == "F32" else
                        tensors.f32_to_bf16(x) if dtype == "BF16" else tensors.f32_to_f16(x))
    return d


def bank_path(root, scale: str, dtype: str) -> Path:
    return Path(root) / f"{scale}-{dtype.lower()}"


def make_bank(bank_dir, n: int = 502, dtype: str = "BF16", *, shape: Shape = MISTRAL,
              seed: int = 0, progress: bool = False) -> Path:
    """Write a synthetic bank of ``n`` members into ``bank_dir`` and build its ``bank.json``.

    Members already complete (their weights file has the expected size) are kept, so an
    interrupted run resumes. Returns the bank folder.
    """
    from loramix.profiles import tokens as prof
    from loramix.bank.bank import build_bank
    from loramix.bank.peft_io import WEIGHTS_NAME

    dtype = dtype.upper()
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: use F32, BF16 or F16")
    bank_dir = Path(bank_dir)
    bank_dir.mkdir(parents=True, exist_ok=True)
    tok = bank_dir / "tokenizer.json"
    if not tok.is_file():
        make_tokenizer(tok)
    tok_hash = prof.tokenizer_hash(tok)
    H = make_histograms(n)
    rng = np.random.default_rng(seed)
    pool = _Pool(rng)
    expect = adapter_bytes(dtype, shape)
    t0 = time.perf_counter()
    for i in range(n):
        d = bank_dir / f"m{i:03d}"
        row = H.getrow(i)
        p = prof.Profile(ids=row.indices.astype(np.int64), counts=row.data.astype(np.int64),
                         vocab_size=VOCAB, tokenizer_hash=tok_hash, dataset_hash=f"synthetic-{seed}-{i}",
                         n_examples=1000, source=f"synthetic://{i}")
        w = d / WEIGHTS_NAME
        if not (w.is_file() and expect < w.stat().st_size < expect + (1 << 20)):
            write_adapter(d, pool, dtype, shape)
        else:
            pool.rng.random(2)   # keep the stream of later members unchanged
        p.save(d / "profile.npz")
        if progress and (i + 1) % 16 == 0:
            el = time.perf_counter() - t0
            print(f"  synth bank {bank_dir.name}: {i + 1}/{n} members, {el:.0f} s", file=sys.stderr)
    build_bank(bank_dir, tok)
    return bank_dir


def ensure_inputs(root, scale: str = "laptop", dtype: str = "BF16", *, n: int | None = None,
                  progress: bool = False) -> tuple[Path, Path]:
    """The bank for ``scale``/``dtype`` under ``root`` (made if missing) and the target dataset."""
    n = n or SCALES[scale]
    b = bank_path(root, scale, dtype)
    if not (b / "bank.json").is_file() or len(json.loads((b / "bank.json").read_text())["members"]) != n:
        make_bank(b, n, dtype, progress=progress)
    target = Path(root) / TARGET_NAME
    if not target.is_file():
        make_dataset(target)
    return b, target
