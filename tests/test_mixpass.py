"""MixPass: many ``mix_into`` calls run as one pass of the core. Each output must be the bytes
``mix_into`` writes for the same call (itself held to the float64 oracle in test_wsum.py), on
every ISA this CPU supports and for any thread count, with calls added while the pass runs;
errors stop the pass and leave the writers abortable."""
from __future__ import annotations

import os
import threading

from pathlib import Path

import numpy as np
import pytest

from loramix.core.tensors import MixPass, SafetensorsFile, SafetensorsWriter, f32_to_bf16, mix_into

U32 = 2.0**-24
OUT_DTYPES = ["BF16", "F32", "F16", "BF16", "F32"]   # one per output


def _bank_file(tmp_path, rng, specs):
    """A safetensors file holding ``specs`` = {name: (dtype, n)}; returns its reader and the
    float64 values of each tensor."""
    path = tmp_path / "bank.safetensors"
    arrays, values = {}, {}
    for name, (dt, n) in specs.items():
        x = (rng.standard_normal(n) * 3).astype(np.float32)
        if dt == "BF16":
            arrays[name] = f32_to_bf16(x)
            values[name] = (arrays[name].astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            arrays[name] = x.astype(np.float32 if dt == "F32" else np.float16)
            values[name] = arrays[name].astype(np.float64)
    entries = [(k, dt, (n,)) for k, (dt, n) in specs.items()]
    with SafetensorsWriter(str(path), entries) as w:
        for k, a in arrays.items():
            w.write(k, a)
    return SafetensorsFile(str(path)), values


def _calls(tmp_path, rng):
    """Tensors of the outputs and the calls that fill them: the per-row path (Q < 4), the GEMM
    panel (Q = 5, a zero weight, a source holding NaN where some weights are zero), sources in
    memory and in files (pread), a one-element and an empty tensor; ``[(targets, name, sources,
    W, X)]`` with X the sources' float64 values."""
    dts = ["BF16", "F16", "F32"]
    specs = {f"s{t}_{k}": (dts[(t + k) % 3], n) for t, (n, kk) in
             enumerate([(10_007, 7), (65_539, 9), (1, 3), (33, 4), (0, 2), (20_000, 12)]) for k in range(kk)}
    f, values = _bank_file(tmp_path, rng, specs)
    calls = []
    for t, (n, kk, targets) in enumerate([(10_007, 7, [0, 1, 2, 3, 4]), (65_539, 9, [1, 3]), (1, 3, [0, 1, 2, 3, 4]),
                                          (33, 4, [0, 1, 2, 3, 4]), (0, 2, [2]), (20_000, 12, [4, 0, 3])]):
        srcs, X = [], []
        for k in range(kk):
            name = f"s{t}_{k}"
            if k % 3 == 1 and specs[name][0] != "BF16":   # in memory (numpy) instead of the file
                srcs.append(f.numpy(name).copy())
            else:
                srcs.append(f.tensor(name))
            X.append(values[name])
        W = rng.standard_normal((len(targets), kk))
        if t == 0:
            W[0, 3] = 0.0
        if t == 3:   # a NaN in a panel source with a zero weight for some rows: they stay finite
            nan_src = np.array(X[2], dtype=np.float32)
            nan_src[5] = np.nan
            srcs[2], X[2] = nan_src, nan_src.astype(np.float64)
            W[[0, 2], 2] = 0.0
        calls.append((targets, f"m{t}", srcs, W, np.stack(X) if n else np.zeros((kk, 0))))
    return calls


def _writers(tmp_path, tag, calls):
    out = []
    for q, dt in enumerate(OUT_DTYPES):
        entries = [(name, dt, (X.shape[1],)) for targets, name, _, _, X in calls if q in targets]
        out.append(SafetensorsWriter(str(tmp_path / f"{tag}{q}.safetensors"), entries, {"q": str(q)}))
    return out


def _commit(writers):
    for w in writers:
        w.commit()
    return [Path(w.path).read_bytes() for w in writers]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pass_writes_mix_into_bytes(isa, tmp_path, rng, threads):
    calls = _calls(tmp_path, rng)
    ref = _writers(tmp_path, "ref", calls)
    for targets, name, srcs, W, _ in calls:
        mix_into([ref[q] for q in targets], name, srcs, W, threads=threads)
    ref_bytes = _commit(ref)

    ws = _writers(tmp_path, "pass", calls)
    p = MixPass(threads=threads)
    assert p.threads == threads
    seen = []
    for i, (targets, name, srcs, W, _) in enumerate(calls):
        assert p.add([ws[q] for q in targets], name, srcs, W) == i
    p.close()
    p.run(progress=seen.append)
    assert len(p) == p.done() == len(calls) and seen[-1] == len(calls) and seen == sorted(seen)
    assert _commit(ws) == ref_bytes

    # and the oracle, for the outputs that hold no NaN term (error bound of wsum.h)
    for targets, name, _, W, X in calls:
        for j, q in enumerate(targets):
            row = SafetensorsFile(ws[q].path).numpy(name)
            got = ((row.astype(np.uint32) << 16).view(np.float32) if OUT_DTYPES[q] == "BF16" else row).astype(np.float64)
            w32 = W[j].astype(np.float32).astype(np.float64)
            terms = np.where(w32[:, None] != 0, w32[:, None] * X, 0.0)
            exact = terms.sum(axis=0)
            bound = (X.shape[0] + 1) * U32 * np.abs(terms).sum(axis=0)
            rel = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 0.0}[OUT_DTYPES[q]]
            finite = np.isfinite(exact)
            assert np.all(np.abs(got[finite] - exact[finite]) <= bound[finite] + rel * np.abs(exact[finite]) + 2.0**-24)
            assert np.all(np.isnan(got[~finite]))


def test_calls_added_while_the_pass_runs(tmp_path, rng):
    """A feeder thread adds the calls while run() goes on in this thread (the GIL is released);
    progress only grows, calls [0, done) are written, and the bytes are mix_into's."""
    calls = _calls(tmp_path, rng)
    ref = _writers(tmp_path, "ref", calls)
    for targets, name, srcs, W, _ in calls:
        mix_into([ref[q] for q in targets], name, srcs, W)
    ref_bytes = _commit(ref)
    ws = _writers(tmp_path, "pass", calls)
    p = MixPass(threads=2)
    started, seen = threading.Event(), []

    def feed():
        started.wait()
        try:
            for targets, name, srcs, W, _ in calls:
                p.add([ws[q] for q in targets], name, srcs, W)
        finally:
            p.close()

    t = threading.Thread(target=feed)
    t.start()
    started.set()
    p.run(progress=seen.append)
    t.join()
    assert seen and seen == sorted(seen) and seen[-1] == len(calls)
    assert _commit(ws) == ref_bytes


def test_pass_errors(tmp_path, rng):
    calls = _calls(tmp_path, rng)
    targets, name, srcs, W, _ = calls[0]
    ws = _writers(tmp_path, "e", calls)
    p = MixPass(threads=2)
    with pytest.raises(ValueError, match="elements but the sources have"):
        p.add([ws[0]], "m5", srcs, W[:1])   # output 0's m5 has 20,000 elements
    with pytest.raises(ValueError, match="weights has 4 rows for 5 writers"):
        p.add([ws[q] for q in targets], name, srcs, W[:4])
    with pytest.raises(KeyError, match="no tensor 'nope' among the entries of the writer"):
        p.add([ws[q] for q in targets], "nope", srcs, W)
    with pytest.raises(ValueError, match="no sources"):
        p.add([ws[0]], name, [], W[:1])
    assert len(p) == 0
    p.add([ws[q] for q in targets], name, srcs, W)
    p.close()
    with pytest.raises(RuntimeError, match="added after close"):
        p.add([ws[q] for q in targets], name, srcs, W)
    p.run()
    with pytest.raises(RuntimeError, match="run\\(\\) called twice"):
        p.run()
    with pytest.raises(RuntimeError, match="after run\\(\\) returned"):
        p.add([ws[q] for q in targets], name, srcs, W)
    for w in ws:
        w.abort()


def test_truncated_source_stops_the_pass(tmp_path, rng):
    """A source file shortened under the pass: OSError naming it; the writers are unpinned (abortable)."""
    calls = _calls(tmp_path, rng)
    path = tmp_path / "short.safetensors"
    with SafetensorsWriter(str(path), [("x", "F32", (65_539,))]) as w:
        w.write("x", rng.standard_normal(65_539).astype(np.float32))
    short = SafetensorsFile(str(path)).tensor("x")
    os.truncate(path, os.path.getsize(path) - 4000)
    ws = _writers(tmp_path, "t", calls)
    p = MixPass(threads=2)
    for i, (targets, name, srcs, W, _) in enumerate(calls):
        if i == 1:
            srcs = srcs[:-1] + [short]
        p.add([ws[q] for q in targets], name, srcs, W)
    p.close()
    with pytest.raises(OSError, match="short read") as e:
        p.run()
    assert str(path) in str(e.value)
    assert p.done() <= 1
    for w in ws:
        w.abort()   # abort_checked would refuse while a write is pinned
    assert not any(os.path.exists(w.temp_path) for w in ws)


class _Stop(Exception):
    pass


def test_progress_error_stops_the_pass(tmp_path, rng):
    calls = _calls(tmp_path, rng)
    ws = _writers(tmp_path, "p", calls)
    p = MixPass(threads=2)
    for targets, name, srcs, W, _ in calls:
        p.add([ws[q] for q in targets], name, srcs, W)
    p.close()

    def progress(done):
        raise _Stop(done)

    with pytest.raises(_Stop):
        p.run(progress)
    for w in ws:
        w.abort()


def test_a_signal_stops_the_pass(tmp_path):
    """A signal handler that raises (Ctrl-C) stops a long pass: its error propagates, the
    threads stop within a few chunks, and the writers can be aborted (nothing left behind)."""
    import signal

    x = np.ones(2_000_000, np.float32)
    srcs = [x] * 500
    ws = [SafetensorsWriter(str(tmp_path / f"s{q}.safetensors"), [(f"m{i}", "F32", (x.size,)) for i in range(40)])
          for q in range(8)]
    p = MixPass(threads=2)
    for i in range(40):   # 40 calls of 8 rows x 500 sources x 2M elements: minutes if not stopped
        p.add(ws, f"m{i}", srcs, np.ones((8, 500), np.float32))
    p.close()

    def handler(signum, frame):
        raise _Stop()

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(_Stop):
            p.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert p.done() < 40
    for w in ws:
        w.abort()
    assert not list(tmp_path.iterdir())


def test_rows_discarded_or_renamed_are_the_full_calls_bytes(isa, tmp_path, rng):
    """A writer None discards its row, and rows may go to differently named entries of one
    file (what the distributed batch's workers do): the rows written are the bytes of the call
    with every row wanted, on the per-row path and the GEMM panel alike."""
    calls = _calls(tmp_path, rng)
    ref = _writers(tmp_path, "ref", calls)
    for targets, name, srcs, W, _ in calls:
        mix_into([ref[q] for q in targets], name, srcs, W)
    _commit(ref)
    want = {(q, name): SafetensorsFile(ref[q].path).numpy(name) for targets, name, *_ in calls for q in targets}

    kept = {t: [q for j, q in enumerate(targets) if (j + t) % 2 == 0] for t, (targets, *_) in enumerate(calls)}
    ws = []
    for q, dt in enumerate(OUT_DTYPES):
        entries = [(name, dt, (X.shape[1],)) for t, (targets, name, _, _, X) in enumerate(calls) if q in kept[t]]
        ws.append(SafetensorsWriter(str(tmp_path / f"part{q}.safetensors"), entries) if entries else None)
    one = SafetensorsWriter(str(tmp_path / "one.safetensors"),
                            [(f"t{q}/{name}", OUT_DTYPES[q], (X.shape[1],)) for targets, name, _, _, X in calls
                             for q in targets])
    p = MixPass(threads=2)
    for t, (targets, name, srcs, W, _) in enumerate(calls):
        p.add([ws[q] if q in kept[t] else None for q in targets], name, srcs, W)
        p.add([one] * len(targets), [f"t{q}/{name}" for q in targets], srcs, W)
    p.close()
    p.run()
    for w in ws + [one]:
        if w is not None:
            w.commit()
    f = SafetensorsFile(one.path)
    for (q, name), arr in want.items():
        assert f.numpy(f"t{q}/{name}").tobytes() == arr.tobytes()
    for t, (targets, name, *_) in enumerate(calls):
        for q in kept[t]:
            assert SafetensorsFile(ws[q].path).numpy(name).tobytes() == want[q, name].tobytes()

    targets, name, srcs, W, _ = calls[0]
    p = MixPass()
    with pytest.raises(ValueError, match="every writer is None"):
        p.add([None] * len(targets), name, srcs, W)
    w0 = SafetensorsWriter(str(tmp_path / "x.safetensors"), [(name, "F32", (10_007,))])
    with pytest.raises(ValueError, match="3 names for 5 writers"):
        p.add([w0] + [None] * 4, ["a", "b", "c"], srcs, W)
    w0.abort()
