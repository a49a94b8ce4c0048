"""Build a BERT-family sentence encoder as an ONNX graph from safetensors weights, without torch.

The graph maps ``input_ids`` (B, S) int64 and ``attention_mask`` (B, S) int64 to
``sentence_embedding`` (B, hidden) float32: embeddings (word + position + token type 0) →
LayerNorm → ``num_hidden_layers`` × [multi-head self-attention with the padding mask → residual →
LayerNorm → FFN with exact (erf) GELU → residual → LayerNorm] → mean pooling over the mask →
L2 normalization. This is what sentence-transformers computes for BERT encoders with
``pooling_mode_mean_tokens`` and a ``Normalize`` module (all-MiniLM-L6-v2 and its kin).

Two flavours:

* ``fused=False``: standard ONNX ops only (opset 17), laid out like a torch export so that
  onnxruntime's own graph optimizer recognizes the usual patterns. Runs anywhere.
* ``fused=True``: onnxruntime's contrib ops (``com.microsoft`` ``Attention``,
  ``SkipLayerNormalization``, ``BiasGelu``) emitted directly, which is what onnxruntime's
  transformers optimizer would produce, without relying on its pattern matching. Needs
  onnxruntime (the CPU provider has all three).

The fused flavour can also be emitted with 8-bit linear layers (``quantize``): ``"int8"``, dynamic
int8 with per-row activation ranges where they matter (:func:`build_bert_onnx`), or
``"int8-block"``, 8-bit ``MatMulNBits`` with block-wise scales.

Single sentences only use token type 0, so its embedding row is folded into the position table
(identical arithmetic up to float rounding order).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

# ``onnx`` is imported where a graph is built, not here: importing it costs ~0.5 s (ml_dtypes),
# and reading an encoder's config or a cached graph's key must not pay for it.
if TYPE_CHECKING:
    import onnx

#: Bumped whenever the emitted graph changes, so cached .onnx files are rebuilt.
GRAPH_VERSION = "3"
OPSET = 17

_PREFIXES = ("bert.", "roberta.", "model.", "0.auto_model.")


def load_config(folder: str | Path) -> dict:
    """Read ``config.json`` of a BERT-family encoder folder and check it is one we can build."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    model_type = cfg.get("model_type", "bert")
    if model_type not in ("bert", "roberta", "xlm-roberta"):
        raise ValueError(f"{folder}: model_type {model_type!r} is not a BERT-family encoder loramix can build")
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{folder}: hidden_act {act!r} unsupported (only exact 'gelu')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{folder}: only absolute position embeddings are supported")
    return cfg


def normalize_weight_names(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip a model-class prefix (``bert.``, ...) so names start at ``embeddings.`` / ``encoder.``."""
    out = {}
    for name, arr in weights.items():
        for p in _PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
                break
        out[name] = arr
    if "embeddings.word_embeddings.weight" not in out:
        raise ValueError("weights lack embeddings.word_embeddings.weight: not a BERT-family checkpoint")
    return out


class _G:
    """Tiny helper that names nodes and collects initializers."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, base: str, arr) -> str:
        from onnx import numpy_helper

        n = self.name(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def op(self, op_type: str, inputs, base: str | None = None, n_out: int = 1, domain: str | None = None, **attrs):
        from onnx import helper

        outs = [self.name(base or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name("n_" + op_type),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def build_bert_onnx(weights: Mapping[str, np.ndarray], config: Mapping, *, fused: bool = False,
                    quantize: str | None = None, block: int = 32, weight_bits: int = 8,
                    max_positions: int | None = None) -> onnx.ModelProto:
    """Return the ONNX sentence-encoder graph (see module docstring) for these BERT weights.

    ``weights`` maps safetensors names to float arrays (any float dtype; cast to float32).
    Embeddings, LayerNorm, softmax and the attention products stay fp32 in every mode. With
    ``fused=True``, ``quantize`` may be:

    * ``"int8"``: every linear layer in int8 (weights symmetric per output column, ``weight_bits``
      8 or 7; activations quantized at run time, asymmetric uint8). The QKV projection runs in
      ``QAttention`` and the attention output in ``DynamicQuantizeMatMul``, one activation range
      per batch; the FFN input and output projections get one range per row (token), see
      :func:`_rows_int8`: a per-batch range there is what cost accuracy (a token with large
      values coarsens every other token of the batch).
    * ``"int8-block"``: every linear layer as an 8-bit ``MatMulNBits`` with block-wise scales.

    ``weight_bits=7`` (onnxruntime's ``reduce_range``) keeps u8 x s8 products of pairs inside
    int16 on x86 CPUs without VNNI, whose int8 GEMM kernels saturate there.
    """
    from onnx import TensorProto, helper

    if quantize not in (None, "int8", "int8-block"):
        raise ValueError(f"quantize must be None, 'int8' or 'int8-block', not {quantize!r}")
    if weight_bits not in (7, 8):
        raise ValueError("weight_bits must be 8 or 7")
    if quantize and not fused:
        raise ValueError(f"quantize={quantize!r} needs fused=True (onnxruntime contrib ops)")
    block8 = quantize == "int8-block"
    rows = quantize == "int8"
    w = {k: np.asarray(v) for k, v in normalize_weight_names(weights).items()}

    def get(name: str) -> np.ndarray:
        if name not in w:
            raise ValueError(f"weights lack {name!r}")
        return w[name].astype(np.float32)

    H = int(config["hidden_size"])
    nh = int(config["num_attention_heads"])
    if H % nh:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    dh = H // nh
    L = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    pad_offset = 0
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        # RoBERTa numbers positions from padding_idx + 1 (no left padding here, so it is a shift).
        pad_offset = int(config.get("pad_token_id", 1)) + 1

    g = _G()
    ids, mask = "input_ids", "attention_mask"

    # --- embeddings ---------------------------------------------------------------------------
    word = g.const("word_emb", get("embeddings.word_embeddings.weight"))
    pos_table = get("embeddings.position_embeddings.weight")[pad_offset:]
    if max_positions is not None:
        pos_table = pos_table[:max_positions]
    if "embeddings.token_type_embeddings.weight" in w:
        pos_table = pos_table + get("embeddings.token_type_embeddings.weight")[0][None, :]
    pos = g.const("pos_emb", pos_table)
    seq_len = g.op("Gather", [g.op("Shape", [ids]), g.const("one", np.array([1], np.int64))], axis=0)
    pos_s = g.op("Slice", [pos, g.const("zero", np.array([0], np.int64)), seq_len,
                            g.const("axis0", np.array([0], np.int64))])
    x = g.op("Add", [g.op("Gather", [word, ids], axis=0), pos_s])
    x = g.op("LayerNormalization", [x, g.const("emb_ln_g", get("embeddings.LayerNorm.weight")),
                                    g.const("emb_ln_b", get("embeddings.LayerNorm.bias"))],
             axis=-1, epsilon=eps)

    if fused:
        mask_i32 = g.op("Cast", [mask], to=TensorProto.INT32)
    else:
        # (1 - mask) * -10000, broadcast as (B, 1, 1, S): as HF BERT exported it for years.
        m = g.op("Unsqueeze", [mask, g.const("ax12", np.array([1, 2], np.int64))])
        m = g.op("Cast", [m], to=TensorProto.FLOAT)
        m = g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), m])
        add_mask = g.op("Mul", [m, g.const("neg", np.array(-10000.0, np.float32))])

    if not fused:
        split_shape = g.const("split_shape", np.array([0, 0, nh, dh], np.int64))
        merge_shape = g.const("merge_shape", np.array([0, 0, H], np.int64))
        sqrt_dh = g.const("sqrt_dh", np.array(math.sqrt(dh), np.float32))

    def matmul(inp, W_in_out: np.ndarray, role: str):
        """inp @ W (no bias): fp32 MatMul, or int8 MatMulNBits (8-bit weights, symmetric per
        block of ``block`` input rows and output column; activations quantized per block of the
        same size on the fly, accuracy_level 4), far more accurate than per-tensor dynamic
        quantization of the activations."""
        if not block8:
            return g.op("MatMul", [inp, g.const(role, np.ascontiguousarray(W_in_out, np.float32))])
        Kd, Nd = W_in_out.shape
        if Kd % block:
            raise ValueError(f"int8: input width {Kd} is not a multiple of the block size {block}")
        Wt = W_in_out.T.astype(np.float64).reshape(Nd, Kd // block, block)
        scale = np.abs(Wt).max(axis=-1) / 127.0
        scale[scale == 0] = 1.0
        qw = (np.clip(np.rint(Wt / scale[..., None]), -127, 127) + 128).astype(np.uint8)
        return g.op("MatMulNBits", [inp, g.const(role + "_q8", qw), g.const("Ws", scale.reshape(-1).astype(np.float32))],
                    domain="com.microsoft", K=Kd, N=Nd, bits=8, block_size=block, accuracy_level=4)

    def qweight(W_in_out: np.ndarray, role: str):
        """Symmetric per-output-column int8 weights: (int8 name, float scales, int8 zero points,
        the dequantized weights)."""
        qmax = 127 if weight_bits == 8 else 63
        W = W_in_out.astype(np.float64)
        scale = np.abs(W).max(axis=0) / qmax
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(W / scale), -qmax, qmax).astype(np.int8)
        return (g.const(role + "_s8", q), g.const(role + "_scale", scale.astype(np.float32)),
                g.const(role + "_zp", np.zeros(q.shape[1], np.int8)), q * scale)

    def dyn_matmul(inp, W_in_out: np.ndarray, role: str, per_row: bool):
        """inp @ W with int8 weights and activations quantized at run time: one range per batch
        (a ``DynamicQuantizeMatMul``) or, ``per_row``, one per row (:func:`_rows_int8`)."""
        wq, ws, wz, deq = qweight(W_in_out, role)
        if not per_row:
            return g.op("DynamicQuantizeMatMul", [inp, wq, ws, wz], domain="com.microsoft")
        return _rows_int8(g, inp, wq, ws, wz, deq.sum(axis=0).astype(np.float32))

    def linear_in(inp, W_in_out: np.ndarray, role: str):
        """The FFN projections: fp32, per-row int8 or MatMulNBits."""
        if rows:
            return dyn_matmul(inp, W_in_out, role, per_row=True)
        return matmul(inp, W_in_out, role)

    def skip_ln(inp, residual, prefix, names, per_row=True):
        """LayerNorm(inp @ dense.W + dense.b + residual) as one fused SkipLayerNormalization;
        ``names``: the constants' names (gamma, beta, dense bias)."""
        W = get(prefix + "dense.weight").T
        if rows:
            mm = dyn_matmul(inp, W, prefix + "dense.W", per_row=per_row)
        else:
            mm = matmul(inp, W, prefix + "dense.W")
        return g.op("SkipLayerNormalization",
                    [mm, residual, g.const(names[0], get(prefix + "LayerNorm.weight")),
                     g.const(names[1], get(prefix + "LayerNorm.bias")),
                     g.const(names[2], get(prefix + "dense.bias"))],
                    domain="com.microsoft", epsilon=eps)

    def linear(inp, prefix):
        W = g.const(prefix + ".W", get(prefix + ".weight").T.copy())
        b = g.const(prefix + ".b", get(prefix + ".bias"))
        return g.op("Add", [g.op("MatMul", [inp, W]), b])

    for i in range(L):
        p = f"encoder.layer.{i}."
        if fused:
            Wq, Wk, Wv = (get(p + f"attention.self.{t}.weight").T for t in ("query", "key", "value"))
            bq, bk, bv = (get(p + f"attention.self.{t}.bias") for t in ("query", "key", "value"))
            if block8:
                qkv = g.op("Add", [matmul(x, np.concatenate([Wq, Wk, Wv], axis=1), p + "attention.self.qkv"),
                                   g.const("bqkv", np.concatenate([bq, bk, bv]))])
                q, k, v = g.op("Split", [qkv, g.const("split3", np.array([H, H, H], np.int64))], n_out=3, axis=-1)
                ctx = g.op("MultiHeadAttention", [q, k, v, "", mask_i32], domain="com.microsoft", num_heads=nh)
            elif rows:
                # QAttention: the fused attention with int8 QKV weights, one activation range per
                # batch (it takes a scalar input scale); accurate enough here (LayerNorm output).
                wq, ws, wz, _ = qweight(np.concatenate([Wq, Wk, Wv], axis=1), p + "attention.self.qkv")
                xq, xs, xz = g.op("DynamicQuantizeLinear", [x], n_out=3)
                ctx = g.op("QAttention", [xq, wq, g.const("bqkv", np.concatenate([bq, bk, bv])), xs, ws,
                                          mask_i32, xz, wz], domain="com.microsoft", num_heads=nh)
            else:
                ctx = g.op("Attention", [x, g.const(p + "attention.self.qkv", np.concatenate([Wq, Wk, Wv], axis=1)),
                                         g.const("bqkv", np.concatenate([bq, bk, bv])), mask_i32],
                           domain="com.microsoft", num_heads=nh)
            # the attention output's range per batch costs little accuracy (measured): no row ranges
            x = skip_ln(ctx, x, p + "attention.output.", ("ln1_g", "ln1_b", "bo"), per_row=False)
            h = g.op("BiasGelu", [linear_in(x, get(p + "intermediate.dense.weight").T, p + "intermediate.dense.W"),
                                  g.const("b1", get(p + "intermediate.dense.bias"))], domain="com.microsoft")
            x = skip_ln(h, x, p + "output.", ("ln2_g", "ln2_b", "b2"))
            continue
        q = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.query"), split_shape])], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.key"), split_shape])], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [g.op("Reshape", [linear(x, p + "attention.self.value"), split_shape])], perm=[0, 2, 1, 3])
        s = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), sqrt_dh]), add_mask])
        a = g.op("Softmax", [s], axis=-1)
        ctx = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [a, v])], perm=[0, 2, 1, 3]), merge_shape])
        x = g.op("LayerNormalization", [g.op("Add", [linear(ctx, p + "attention.output.dense"), x]),
                                        g.const("ln1_g", get(p + "attention.output.LayerNorm.weight")),
                                        g.const("ln1_b", get(p + "attention.output.LayerNorm.bias"))],
                 axis=-1, epsilon=eps)
        h = linear(x, p + "intermediate.dense")
        # exact GELU: 0.5 x (1 + erf(x / sqrt 2))
        e = g.op("Erf", [g.op("Div", [h, g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))])])
        h = g.op("Mul", [g.op("Mul", [h, g.op("Add", [e, g.const("one_g", np.array(1.0, np.float32))])]),
                         g.const("half", np.array(0.5, np.float32))])
        x = g.op("LayerNormalization", [g.op("Add", [linear(h, p + "output.dense"), x]),
                                        g.const("ln2_g", get(p + "output.LayerNorm.weight")),
                                        g.const("ln2_b", get(p + "output.LayerNorm.bias"))],
                 axis=-1, epsilon=eps)

    # --- mean pooling over the mask, then L2 normalize (as sentence-transformers) --------------
    mf = g.op("Unsqueeze", [g.op("Cast", [mask], to=TensorProto.FLOAT), g.const("ax2", np.array([2], np.int64))])
    summed = g.op("ReduceSum", [g.op("Mul", [x, mf]), g.const("ax1", np.array([1], np.int64))], keepdims=0)
    count = g.op("Max", [g.op("ReduceSum", [mf, g.const("ax1b", np.array([1], np.int64))], keepdims=0),
                         g.const("cnt_eps", np.array(1e-9, np.float32))])
    pooled = g.op("Div", [summed, count])
    norm = g.op("Max", [g.op("ReduceL2", [pooled], axes=[-1], keepdims=1),
                        g.const("norm_eps", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Div", [pooled, norm], ["sentence_embedding"], name="l2norm"))

    graph = helper.make_graph(
        g.nodes, "loramix_bert_encoder",
        [helper.make_tensor_value_info(ids, TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info(mask, TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", H])],
        initializer=g.inits,
    )
    opsets = [helper.make_opsetid("", OPSET)]
    if fused:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="loramix")
    model.ir_version = 8
    return model


def _rows_int8(g: _G, x: str, wq: str, ws: str, wz: str, colsum: np.ndarray) -> str:
    """``x @ W`` with one activation range per row, from standard ops around onnxruntime's
    per-batch ``DynamicQuantizeMatMul``: each row is mapped onto [0, 1] by its own min and range
    (``xn = (x - min_r) / range_r``), so the kernel's one per-batch uint8 range is every row's own;
    then ``x @ W = range_r * (xn @ W) + min_r * colsum(W)`` (``colsum`` of the dequantized
    weights), exact up to the uint8 rounding of ``xn``. Costs two reductions and two passes over
    ``x``, three over the output; ``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul`` accept only
    a scalar activation scale (onnxruntime 1.32)."""
    mx = g.op("ReduceMax", [x], axes=[-1], keepdims=1)
    mn = g.op("ReduceMin", [x], axes=[-1], keepdims=1)
    rg = g.op("Max", [g.op("Sub", [mx, mn]), g.const("tiny", np.array(1e-30, np.float32))])
    xn = g.op("Div", [g.op("Sub", [x, mn]), rg])
    yn = g.op("DynamicQuantizeMatMul", [xn, wq, ws, wz], domain="com.microsoft")
    return g.op("Add", [g.op("Mul", [yn, rg]), g.op("Mul", [mn, g.const("colsum", colsum)])])


#: Linear layers whose int8 dynamic quantization with one activation range per batch costs the
#: most accuracy (measured on all-MiniLM-L6-v2: worst-case cosine to fp32 0.99 -> 0.95); the
#: encoder's int8 gives the FFN ones per-row ranges instead (:func:`_rows_int8`).
SENSITIVE_LINEARS = ("attention.self", "intermediate.dense")


def int8_dynamic_exclusions(model: onnx.ModelProto, *, sensitive: bool = True) -> list[str]:
    """MatMul nodes that :func:`onnxruntime.quantization.quantize_dynamic` should leave in fp32:
    activation-by-activation products (attention) and, with ``sensitive``, the sensitive linears."""
    inits = {t.name for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type != "MatMul":
            continue
        w = [i for i in n.input if i in inits]
        if not w or (sensitive and any(tag in w[0] for tag in SENSITIVE_LINEARS)):
            out.append(n.name)
    return out
