"""Safetensors I/O and streamed tensor kernels (the compiled core's `tensors` API).

- :class:`SafetensorsFile`: memory-mapped, validated like the reference reader; zero-copy
  read-only views; :meth:`SafetensorsFile.tensor` gives a :class:`TensorRef` for the kernels.
- :func:`weighted_sum`, :func:`gram`, :func:`mix_into` (:class:`MixPass`: many at once): streamed over the sources in chunks,
  f32 accumulation (Gram: f64), threads in C++, GIL released, Ctrl-C works.
- :class:`SafetensorsWriter`: header fixed up front, data streamed into a temporary file in
  the destination folder, fsync + atomic rename on commit.
- ``f32_to_bf16`` / ``bf16_to_f32`` / ``f32_to_f16`` / ``f16_to_f32``: the one source of truth
  for conversions (round to nearest even, NaN kept quiet). BF16 travels as ``uint16`` bits.

Numerical contracts: ``cpp/include/loramix/wsum.h`` and ``halfconv.h``.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from loramix import _core

TensorRef = _core.TensorRef

_OUT_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def _threads(threads: int | None) -> int:
    if threads is None:
        return 0
    threads = int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    return threads


def _weights(weights, k: int) -> np.ndarray:
    # Python sequences of numbers are fine; numpy arrays must already be float32/float64
    # (no silent cast of, say, an int or float16 array).
    w = weights if isinstance(weights, np.ndarray) else np.asarray(weights, dtype=np.float64)
    if w.dtype not in (np.float32, np.float64):
        raise TypeError(f"weights: expected float32 or float64, got {w.dtype}")
    if w.ndim not in (1, 2):
        raise ValueError(f"weights must be 1-D (K,) or 2-D (Q, K), got shape {w.shape}")
    if w.shape[-1] != k:
        raise ValueError(f"weights has {w.shape[-1]} columns for {k} sources")
    return np.ascontiguousarray(w, dtype=np.float32)


def _out_dtype(out_dtype: str) -> str:
    try:
        return _OUT_DTYPES[str(out_dtype).upper()]
    except KeyError:
        raise ValueError(f"out_dtype must be 'F32', 'F16' or 'BF16', got {out_dtype!r}") from None


def _source_shape(src) -> tuple:
    return tuple(src.shape)


class SafetensorsFile(_core.SafetensorsFile):
    """A memory-mapped, validated safetensors file.

    ``keys()`` lists tensors in the order of their data in the file. ``numpy(name)`` is a
    zero-copy read-only view (F32 -> float32, F16 -> float16, BF16 -> uint16 bits); views and
    :class:`TensorRef` objects keep the mapping alive after :meth:`close`. Malformed files raise
    ``ValueError`` naming the file and the problem.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(os.fspath(path))

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return iter(self.keys())


class SafetensorsWriter(_core.SafetensorsWriter):
    """Streamed, atomic safetensors writer.

    ``entries``: ``(name, dtype, shape)`` in file order, dtype ``"F32"``/``"F16"``/``"BF16"``.
    ``metadata``: ``dict[str, str]`` written as ``__metadata__`` in its order; None omits the
    key, ``{}`` writes it empty (exactly like ``safetensors``). Rewriting a file read with
    :class:`SafetensorsFile` with the same entries (``keys()`` order) and metadata gives the
    same bytes. As a context manager: commit on success, abort on exception.
    """

    def __init__(self, path: str | os.PathLike, entries: Iterable[tuple[str, str, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        entries = [(str(n), str(d), tuple(int(x) for x in s)) for n, d, s in entries]
        super().__init__(os.fspath(path), entries, None if metadata is None else dict(metadata))

    def write_weighted_sum(self, name: str, sources: Sequence, weights, *, threads: int | None = None) -> None:
        """Streams ``sum_k weights[k] * sources[k]`` into tensor ``name`` in its dtype."""
        sources = list(sources)
        w = _weights(weights, len(sources))
        if w.ndim != 1:
            raise ValueError(f"write_weighted_sum: weights must be 1-D (K,), got shape {w.shape}")
        super().write_weighted_sum(name, sources, w, _threads(threads))

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def weighted_sum(sources: Sequence, weights, out_dtype: str = "F32", *, threads: int | None = None) -> np.ndarray:
    """``out[q] = sum_k weights[q, k] * sources[k]``, streamed, f32 accumulation.

    ``sources``: :class:`TensorRef` or C-contiguous float32/float16 arrays, one element count.
    ``weights``: (Q, K) or (K,) float32/float64. Returns shape (Q, *shape) (or *shape for 1-D
    weights; shape of ``sources[0]``) as float32 / float16 / uint16 (BF16 bits). A zero weight
    skips its term (a source whose weights are all zero is never read).
    """
    sources = list(sources)
    if not sources:
        raise ValueError("weighted_sum: no sources")
    w = _weights(weights, len(sources))
    out = _core.weighted_sum(sources, w, _out_dtype(out_dtype), _threads(threads))
    shape = _source_shape(sources[0])
    return out.reshape(shape) if w.ndim == 1 else out.reshape((w.shape[0],) + shape)


def gram(sources: Sequence, *, threads: int | None = None) -> np.ndarray:
    """``G[i, j] = <sources[i], sources[j]>`` (float64, K x K), streamed, f64 accumulation."""
    sources = list(sources)
    if not sources:
        raise ValueError("gram: no sources")
    return _core.gram(sources, _threads(threads))


def mix_into(writers: Sequence[SafetensorsWriter], name: str, sources: Sequence, weights, *,
             threads: int | None = None) -> None:
    """One pass over ``sources``: row q of ``weights @ sources`` goes to ``writers[q]`` as ``name``."""
    sources = list(sources)
    writers = list(writers)
    if not sources:
        raise ValueError("mix_into: no sources")
    w = _weights(weights, len(sources))
    if w.ndim == 1:
        w = w[None, :]
    _core.mix_into(writers, name, sources, w, _threads(threads))


class MixPass:
    """Many :func:`mix_into` calls run as one pass over one set of threads.

    The calls' chunks are handed out in call order, so a thread that has finished its share of
    one tensor goes on with the next instead of waiting at the end of each call; each output is
    the bytes :func:`mix_into` writes. Calls may be :meth:`add`-ed from another Python thread
    while :meth:`run` goes on (it releases the GIL), until :meth:`close`::

        p = MixPass(threads=2)
        p.add(writers, "m.lora_A.weight", refs_a, W)   # -> 0
        p.add(writers, "m.lora_B.weight", refs_b, W)   # -> 1
        p.close()
        p.run(progress=lambda done: ...)                # calls [0, done) are written

    ``progress(done)`` is called on :meth:`run`'s thread as calls finish (at most every 5 ms)
    and once more after the last; Ctrl-C (or an error raised by ``progress``) stops the pass.
    """

    def __init__(self, threads: int | None = None) -> None:
        self._p = _core.MixPass(_threads(threads))

    @property
    def threads(self) -> int:
        return self._p.threads

    def add(self, writers: Sequence[SafetensorsWriter | None], name: str | Sequence[str], sources: Sequence,
            weights) -> int:
        """Add ``mix_into(writers, name, sources, weights)``; returns its index in the pass.

        ``name`` may also be one name per writer (rows of one call into differently named
        entries, e.g. of one file), and a writer may be None: its row is not written (a worker
        that owns only some rows of a batch). Either way the rows written are the bytes of the
        call with every row wanted."""
        sources = list(sources)
        if not sources:
            raise ValueError("mix_into: no sources")
        w = _weights(weights, len(sources))
        names = name if isinstance(name, str) else list(name)
        return self._p.add(list(writers), names, sources, w[None, :] if w.ndim == 1 else w)

    def close(self) -> None:
        """No more calls: :meth:`run` returns once every call added is done."""
        self._p.close()

    def done(self) -> int:
        """Calls finished in order: calls ``[0, done())`` are written."""
        return self._p.done()

    def __len__(self) -> int:
        return len(self._p)

    def run(self, progress=None) -> None:
        """Run the calls until :meth:`close` has been called and all are done."""
        self._p.run(progress)
        if progress is not None:
            progress(self._p.done())


def tensor_refs(files: Sequence[SafetensorsFile], names: Sequence[str]) -> list:
    """``[f.tensor(n) for f, n in zip(files, names)]`` in one call into the core (a module of
    every member of a bank: one call instead of one per member)."""
    return _core.tensor_refs(files, names)


def release_pages(refs: Sequence) -> None:
    """Drop the mapped pages of these :class:`TensorRef` sources from this process's memory
    (``MADV_DONTNEED``) once they have been read: a pass over a bank then holds only what it
    is mixing, whatever the bank's size. The bytes stay in the page cache and are mapped again
    on the next read; views and refs stay valid. Other objects in ``refs`` are ignored."""
    _core.release_pages([r for r in refs if isinstance(r, TensorRef)])


def _convert(fn, x, dtype, what):
    a = np.asarray(x)
    if a.dtype != dtype:
        raise TypeError(f"{what}: expected dtype {np.dtype(dtype)}, got {a.dtype} (convert with .astype() first)")
    return fn(np.ascontiguousarray(a))


def f32_to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even, NaN kept quiet."""
    return _convert(_core.f32_to_bf16, x, np.float32, "f32_to_bf16")


def bf16_to_f32(x) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exact."""
    return _convert(_core.bf16_to_f32, x, np.uint16, "bf16_to_f32")


def f32_to_f16(x) -> np.ndarray:
    """float32 -> float16, round to nearest even, NaN kept quiet."""
    return _convert(_core.f32_to_f16, x, np.float32, "f32_to_f16")


def f16_to_f32(x) -> np.ndarray:
    """float16 -> float32, exact (NaN made quiet)."""
    return _convert(_core.f16_to_f32, x, np.float16, "f16_to_f32")


__all__ = [
    "SafetensorsFile", "SafetensorsWriter", "TensorRef", "weighted_sum", "gram", "mix_into", "tensor_refs",
    "release_pages",
    "f32_to_bf16", "bf16_to_f32", "f32_to_f16", "f16_to_f32",
]
