"""Sources in files are read with pread (wsum.h): the same bytes as through the mapping, every
element's terms in source order whatever the chunking, no pages of the sources in the process,
and a file truncated under an open reader is an error, not a crash."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from loramix.core import tensors

SHAPES = [(16, 4096), (1024, 16), (3, 1001), (17,)]


def _bank(tmp_path, rng, k=13, nonfinite=False):
    paths = []
    for i in range(k):
        dt = ("BF16", "F16", "F32")[i % 3]
        p = tmp_path / f"m{i}.safetensors"
        with tensors.SafetensorsWriter(p, [(f"t{j}", dt, s) for j, s in enumerate(SHAPES)]) as w:
            for j, s in enumerate(SHAPES):
                x = (rng.standard_normal(s) * (1 + i)).astype(np.float32)
                if nonfinite and i == 4 and j == 2:
                    x[1, 7] = np.inf
                w.write(f"t{j}", x)
        paths.append(p)
    return paths


def _chain(W, xs, dense_first):
    """Each row's sum as one chain of f32 multiply-adds in the kernel's order (no FMA: scalar)."""
    Q, K = W.shape
    nz = (W != 0).sum(axis=0)
    dense = [k for k in range(K) if nz[k] and Q >= 4 and 2 * nz[k] >= Q] if dense_first else []
    rows = [k for k in range(K) if nz[k] and k not in dense]
    out = np.zeros((Q, xs[0].size), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        for q in range(Q):
            for k in dense + rows:
                if W[q, k] != 0 or np.isfinite(xs[k]).all():   # a zero weight adds 0 * x (finite)
                    out[q] = out[q] + W[q, k] * xs[k]
    return out


@pytest.mark.parametrize("Q", [1, 2, 5, 16])
def test_file_sources_sum_in_source_order(tmp_path, rng, Q):
    from loramix import _core

    paths = _bank(tmp_path, rng, nonfinite=True)
    files = [tensors.SafetensorsFile(p) for p in paths]
    W = rng.standard_normal((Q, len(files))).astype(np.float32)
    W[rng.random(W.shape) < 0.3] = 0
    before = _core.active_isa()
    _core.set_active_isa("scalar")
    try:
        for j in range(len(SHAPES)):
            xs = [f.to_f32(f"t{j}").ravel() for f in files]
            want = _chain(W, xs, dense_first=True)
            for threads in (1, 2, 3):
                got = tensors.weighted_sum([f.tensor(f"t{j}") for f in files], W, threads=threads)
                assert got.reshape(Q, -1).tobytes() == want.tobytes(), (j, threads)
    finally:
        _core.set_active_isa(before)


def test_file_sources_equal_memory_sources(tmp_path, rng, isa):
    paths = _bank(tmp_path, rng)
    files = [tensors.SafetensorsFile(p) for p in paths]
    for Q in (1, 3, 8):
        W = rng.standard_normal((Q, len(files))).astype(np.float32)
        for j in range(len(SHAPES)):
            from_files = tensors.weighted_sum([f.tensor(f"t{j}") for f in files], W, "BF16")
            from_memory = tensors.weighted_sum([f.to_f32(f"t{j}") for f in files], W, "BF16")
            assert from_files.tobytes() == from_memory.tobytes(), (Q, j)


_CHILD = textwrap.dedent("""
    import resource, sys
    import numpy as np
    lim = int(sys.argv[1])
    if lim:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lim, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    from loramix.core import tensors
    files = [tensors.SafetensorsFile(p) for p in sys.argv[3:]]
    assert sum(f.tensor("t0").pread for f in files) == (min(len(files), lim // 2) if lim else len(files))
    W = np.linspace(-1, 1, 4 * len(files), dtype=np.float32).reshape(4, -1)
    np.save(sys.argv[2], np.concatenate([tensors.weighted_sum([f.tensor(k) for f in files], W[:q], "BF16").ravel()
                                         for k in ("t0", "t2") for q in (1, 4)]))
""")


def test_descriptor_budget_falls_back_to_the_mapping_with_the_same_bytes(tmp_path, rng):
    """Beyond half the RLIMIT_NOFILE, files are read through the mapping: same output bytes."""
    paths = [str(p) for p in _bank(tmp_path, rng, k=40)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    outs = []
    for lim in (0, 64):   # 0: the default limit (all files pread); 64: budget 32 (the rest mapped)
        out = tmp_path / f"out{lim}.npy"
        subprocess.run([sys.executable, "-c", _CHILD, str(lim), str(out), *paths], env=env, check=True)
        outs.append(np.load(out))
    assert outs[0].tobytes() == outs[1].tobytes()


def _rss_file_kb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile")


def test_file_sources_never_enter_the_process(tmp_path, rng):
    """A 64 MB source is summed without mapping its pages (the data come by pread)."""
    p = tmp_path / "big.safetensors"
    x = rng.standard_normal(16 << 20).astype(np.float32)
    with tensors.SafetensorsWriter(p, [("x", "F32", x.shape)]) as w:
        w.write("x", x)
    f = tensors.SafetensorsFile(p)
    assert f.tensor("x").pread
    before = _rss_file_kb()
    out = tensors.weighted_sum([f.tensor("x"), f.tensor("x")], [0.5, 0.5])
    assert _rss_file_kb() - before < 16 << 10          # far below the file's 64 MB
    assert out.tobytes() == x.tobytes()                 # 0.5 x + 0.5 x == x exactly


def test_truncated_source_is_an_error(tmp_path, rng):
    p = tmp_path / "t.safetensors"
    with tensors.SafetensorsWriter(p, [("x", "F32", (1000,))]) as w:
        w.write("x", rng.standard_normal(1000).astype(np.float32))
    f = tensors.SafetensorsFile(p)
    ref = f.tensor("x")
    os.truncate(p, os.path.getsize(p) - 400)   # another process shortens the file under us
    with pytest.raises(OSError, match="short read"):
        tensors.weighted_sum([ref], [1.0])


def test_tensor_refs_is_file_tensor_in_one_call(tmp_path, rng):
    files = [tensors.SafetensorsFile(p) for p in _bank(tmp_path, rng, k=4)]
    names = ["t0", "t1", "t2", "t3"]
    refs = tensors.tensor_refs(files, names)
    for f, n, r in zip(files, names, refs):
        assert (r.path, r.name, r.dtype, r.shape) == (f.tensor(n).path, n, f.dtype(n), f.shape(n))
        assert r.numpy().tobytes() == f.numpy(n).tobytes()
    with pytest.raises(ValueError, match="4 files but 3 names"):
        tensors.tensor_refs(files, names[:3])
    with pytest.raises(TypeError, match=r"files\[1\] is not a SafetensorsFile"):
        tensors.tensor_refs([files[0], "x"], names[:2])
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        tensors.tensor_refs(files[:1], ["nope"])
