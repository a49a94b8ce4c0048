"""A numpy stand-in for the compiled core's Python API (docs/DEVELOPING.md), test-only.

Installed into ``sys.modules`` only when ``loramix.divergence`` / ``loramix.tensors`` cannot be
imported (the core branches are written in parallel). It follows the documented contract so
that the generation path can be tested before the kernels land; once they land it is unused.
"""
from __future__ import annotations

import importlib
import json
import os
import struct
import sys
import tempfile
import types

import numpy as np

_DT = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _f32_to_bf16(x):
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def _bf16_to_f32(x):
    return (np.asarray(x, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class TensorRef:
    def __init__(self, f, name):
        self.file, self.name = f, name

    def f32(self):
        return self.file.to_f32(self.name)


class SafetensorsFile:
    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: file too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or 8 + n > size:
                raise ValueError(f"{self.path}: header length {n} exceeds the file")
            try:
                hdr = json.loads(fh.read(n))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{self.path}: header is not valid JSON ({e})") from None
        self.metadata = dict(hdr.pop("__metadata__", {}) or {})
        self._h = hdr
        end = 0
        for k, v in sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = v["data_offsets"]
            if a != end:
                raise ValueError(f"{self.path}: tensor {k} offsets not contiguous")
            item = np.dtype(_DT.get(v["dtype"], np.uint8)).itemsize
            if b - a != item * int(np.prod(v["shape"], dtype=np.int64)):
                raise ValueError(f"{self.path}: tensor {k} byte size does not match dtype x shape")
            end = b
        if 8 + n + end != size:
            raise ValueError(f"{self.path}: file length {size} does not match header ({8 + n + end})")
        self._base = 8 + n
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size else None

    def keys(self):
        return [k for k, _ in sorted(self._h.items(), key=lambda kv: kv[1]["data_offsets"][0])]

    def __contains__(self, k):
        return k in self._h

    def __len__(self):
        return len(self._h)

    def dtype(self, k):
        return self._h[k]["dtype"]

    def shape(self, k):
        return tuple(self._h[k]["shape"])

    def nbytes(self, k):
        a, b = self._h[k]["data_offsets"]
        return b - a

    def numpy(self, k):
        d = self._h[k]
        if d["dtype"] not in ("F32", "F16", "BF16"):
            raise ValueError(f"{self.path}: tensor {k} has unsupported dtype {d['dtype']}")
        a, b = d["data_offsets"]
        return self._mm[self._base + a:self._base + b].view(_DT[d["dtype"]]).reshape(d["shape"])

    def to_f32(self, k):
        x = self.numpy(k)
        if x.dtype == np.uint16:
            return _bf16_to_f32(x).reshape(x.shape)
        return x.astype(np.float32)

    def tensor(self, k):
        return TensorRef(self, k)


def _as_f32(s):
    if isinstance(s, TensorRef):
        return s.f32().ravel()
    return np.asarray(s).astype(np.float32).ravel()


def _shape(s):
    return s.file.shape(s.name) if isinstance(s, TensorRef) else np.asarray(s).shape


def _convert(x, dtype):
    if dtype == "F32":
        return x.astype(np.float32)
    if dtype == "F16":
        return x.astype(np.float16)
    if dtype == "BF16":
        return _f32_to_bf16(x)
    raise ValueError(dtype)


def weighted_sum(sources, weights, out_dtype="F32", *, threads=None):
    w = np.asarray(weights, dtype=np.float64)
    one = w.ndim == 1
    w2 = w[None] if one else w
    if w2.shape[1] != len(sources):
        raise ValueError("weights do not match the number of sources")
    shape = _shape(sources[0])
    acc = np.zeros((w2.shape[0], int(np.prod(shape))), np.float32)
    for k, s in enumerate(sources):
        if np.all(w2[:, k] == 0):
            continue
        x = _as_f32(s)
        acc += w2[:, k:k + 1].astype(np.float32) * x[None]
    out = _convert(acc, out_dtype).reshape((w2.shape[0],) + tuple(shape))
    return out[0] if one else out


def gram(sources, *, threads=None):
    xs = [_as_f32(s).astype(np.float64) for s in sources]
    return np.array([[a @ b for b in xs] for a in xs])


class SafetensorsWriter:
    def __init__(self, path, entries, metadata=None):
        self.path = str(path)
        self.entries = {n: (d, tuple(s)) for n, d, s in entries}
        self.order = [n for n, _, _ in entries]
        self.metadata = metadata or {}
        self.data = {}
        self._done = False

    def write(self, name, array):
        d, s = self.entries[name]
        a = np.asarray(array)
        if a.dtype == np.float32 and d != "F32":
            a = _convert(a, d)
        if tuple(a.shape) != s:
            raise ValueError(f"tensor {name}: shape {a.shape} != {s}")
        self.data[name] = np.ascontiguousarray(a)

    def write_weighted_sum(self, name, sources, weights_1d):
        d, _ = self.entries[name]
        self.write(name, weighted_sum(sources, weights_1d, d))

    def commit(self):
        missing = [n for n in self.order if n not in self.data]
        if missing:
            raise ValueError(f"tensors not written: {missing}")
        hdr, off = {}, 0
        for n in self.order:
            d, s = self.entries[n]
            nb = self.data[n].nbytes
            hdr[n] = {"dtype": d, "shape": list(s), "data_offsets": [off, off + nb]}
            off += nb
        if self.metadata:
            hdr["__metadata__"] = self.metadata
        h = json.dumps(hdr, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)), suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(h)) + h)
            for n in self.order:
                fh.write(self.data[n].tobytes())
        os.replace(tmp, self.path)
        self._done = True

    def abort(self):
        self.data.clear()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            self.commit()
        else:
            self.abort()
        return False


def mix_into(writers, name, sources, weights_QxK, *, threads=None):
    for q, w in enumerate(writers):
        w.write_weighted_sum(name, sources, np.asarray(weights_QxK)[q])


def divergence(P, R=None, metric="js", eps=1e-10, *, threads=None):
    def dense(x):
        if hasattr(x, "toarray"):
            x = x.toarray()
        x = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(x)) or np.any(x < 0):
            raise ValueError("counts must be finite and non-negative")
        s = x.sum(1, keepdims=True)
        if np.any(s == 0):
            raise ValueError("all-zero row")
        return x / s

    p = dense(P)
    q = p if R is None else dense(R)
    if p.shape[1] != q.shape[1]:
        raise ValueError("width mismatch")
    if metric == "wd":
        cp, cq = np.cumsum(p, 1), np.cumsum(q, 1)
        return np.abs(cp[:, None, :] - cq[None, :, :]).sum(-1)
    pe, qe = p + eps, q + eps
    if metric == "kl":
        return (pe[:, None, :] * (np.log(pe)[:, None, :] - np.log(qe)[None])).sum(-1)
    if metric == "js":
        m = 0.5 * (pe[:, None, :] + qe[None])
        lm = np.log(m)
        kl1 = (pe[:, None, :] * (np.log(pe)[:, None, :] - lm)).sum(-1)
        kl2 = (qe[None] * (np.log(qe)[None] - lm)).sum(-1)
        return 0.5 * (kl1 + kl2)
    raise ValueError(f"unknown metric {metric!r}")


def install():
    """Install the stand-ins where the real modules are missing; returns the names installed."""
    import loramix

    done = []
    for mod, names in (
        ("divergence", {"divergence": divergence}),
        ("tensors", {
            "SafetensorsFile": SafetensorsFile, "SafetensorsWriter": SafetensorsWriter,
            "weighted_sum": weighted_sum, "gram": gram, "mix_into": mix_into, "TensorRef": TensorRef,
            "f32_to_bf16": _f32_to_bf16, "bf16_to_f32": _bf16_to_f32,
            "f32_to_f16": lambda x: np.asarray(x, np.float32).astype(np.float16),
            "f16_to_f32": lambda x: np.asarray(x, np.float16).astype(np.float32),
        }),
    ):
        full = f"loramix.{mod}"
        try:
            m = importlib.import_module(full)
            if all(hasattr(m, n) for n in names):
                continue
        except ImportError:
            pass
        m = types.ModuleType(full)
        m.__dict__.update(names)
        m.__fake__ = True
        sys.modules[full] = m
        setattr(loramix, mod, m)
        done.append(mod)
    return done
