"""Batch generation on a real Dask cluster (2 worker processes on 127.0.0.1): results equal a
local run to the bit, a worker killed mid-batch changes nothing, failed batches leave finished
adapters or nothing, re-runs skip verified outputs."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import _tiny

import distributed

from loramix.mixing import distributed as ld  # noqa: E402
from loramix.core import tensors  # noqa: E402
from loramix.bank.bank import Bank  # noqa: E402
from loramix.pipeline import OutputError, generate  # noqa: E402

WAIT = 120   # seconds: the bound on every wait in this file (a failure, never a sleep)


@pytest.fixture(scope="module")
def queries(w, tmp_path_factory):
    """8 query datasets (≥ 8 targets per batch)."""
    root = tmp_path_factory.mktemp("dq")
    topics = list(_tiny.TOPICS)
    return [_tiny.write_jsonl(root / f"q{i}.jsonl",
                              _tiny.make_examples(topics[i % 5], 12, 200 + i, mix=topics[(i + 2) % 5]))
            for i in range(8)]


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    # without a dashboard the scheduler still serves /health, by default on port 8787, which a
    # concurrent test run may hold (a warning, and a leaked socket): a free loopback port instead
    cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                           dashboard_address=None,
                           scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"})
    try:
        c = Client(cluster, set_as_default=False)
        try:
            yield c
        finally:
            c.close()
    finally:
        cluster.close()


_LOCAL: dict = {}


def local_ref(w, queries, tmp_path_factory, **kw):
    """The local run of the batch (cached per settings)."""
    key = json.dumps(kw, sort_keys=True)
    if key not in _LOCAL:
        out = tmp_path_factory.mktemp("local") / "out"
        generate(queries, w.bank, out, **kw)
        _LOCAL[key] = out
    return _LOCAL[key]


def assert_same(a: Path, b: Path):
    """Two batch folders hold the same adapters: every tensor, header, config and card."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and len(names) >= 8
    for n in names:
        fa, fb = tensors.SafetensorsFile(a / n / "adapter_model.safetensors"), \
            tensors.SafetensorsFile(b / n / "adapter_model.safetensors")
        assert fa.keys() == fb.keys() and fa.metadata == fb.metadata
        for k in fa.keys():
            assert fa.dtype(k) == fb.dtype(k) and fa.shape(k) == fb.shape(k)
            assert fa.numpy(k).tobytes() == fb.numpy(k).tobytes(), (n, k)
        for f in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
            assert (a / n / f).read_bytes() == (b / n / f).read_bytes(), (n, f)
        pa, pb = (json.loads((d / n / "loramix.json").read_text()) for d in (a, b))
        pa.pop("batch", None), pb.pop("batch", None)
        assert pa == pb


def no_litter(folder: Path):
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------------------------ the core is deterministic

def test_weighted_sum_is_thread_independent(rng, isa):
    """Per element, the core's sum does not depend on the thread count (chunking is fixed)."""
    n = 3 * 8192 + 5
    src = [rng.standard_normal(n).astype(np.float32) for _ in range(7)]
    W = rng.standard_normal((6, 7))
    W[1, 2] = W[4, 5] = W[0, 6] = 0.0   # mixed: panel sources and per-row sources
    ref = tensors.weighted_sum(src, W, threads=1)
    for t in (2, 3, 5):
        assert tensors.weighted_sum(src, W, threads=t).tobytes() == ref.tobytes()


def test_module_slices_cover_the_bank_in_order(w):
    b = Bank.open(w.bank)
    W = np.ones((2, len(b.members)))
    order = list(b.module_index())
    for n in (1, 2, 3, 100):
        sl = ld.module_slices(b, W, n)
        assert [m for s in sl for m in s] == order and all(sl) and len(sl) <= n


def test_auto_split_follows_the_cost_model(w):
    b = Bank.open(w.bank)
    for q, hosts, split in ((1, 1, "targets"),    # one page cache: never worth part files
                            (1, 4, "modules"),    # (4-1)·B > 2·Q·O
                            (8, 2, "targets")):   # 4 members, 8 targets: outputs outweigh the bank
        W = np.full((q, len(b.members)), 0.25)
        assert ld.choose_split(b, W, ld.mixmod.plan(b, W, "factors"), "F32", hosts=hosts) == split


# ------------------------------------------------------------------ bit-identical to local

@pytest.mark.parametrize("split,kw", [
    ("modules", {}),
    ("targets", {"top_k": 2}),
    ("modules", {"mode": "svd", "rank": 2, "dtype": "bf16", "top_k": 3}),
    ("targets", {"mode": "concat", "dtype": "f16"}),
])
def test_batch_equals_local_run(w, queries, client, tmp_path, tmp_path_factory, split, kw):
    ref = local_ref(w, queries, tmp_path_factory, **kw)
    res = generate(queries, w.bank, tmp_path / "out", client=client,
                   distributed_options={"split": split, "parts": 3, "timeout": WAIT}, **kw)
    assert [r.status for r in res] == ["generated"] * 8
    assert_same(ref, tmp_path / "out")
    no_litter(tmp_path / "out")
    no_litter(tmp_path)


# ------------------------------------------------------------------ faults

def _install_block(marker: str):
    """In a worker: the first call of ``factors_inputs`` in the cluster records its pid and
    blocks (until the test kills this process); every other call runs normally."""
    import loramix.mixing.factors as m

    orig = m.__dict__.setdefault("_orig_factors_inputs", m.factors_inputs)

    def hook(*a, **k):
        try:
            fd = os.open(marker + ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return orig(*a, **k)
        os.close(fd)
        with open(marker + ".tmp", "w") as fh:
            fh.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        time.sleep(WAIT)   # the test kills this process long before
        return orig(*a, **k)

    m.factors_inputs = hook


def _uninstall_block():
    import loramix.mixing.factors as m

    if "_orig_factors_inputs" in m.__dict__:
        m.factors_inputs = m.__dict__.pop("_orig_factors_inputs")


@pytest.mark.parametrize("split", ["modules", "targets"])
def test_worker_killed_mid_batch(w, queries, client, tmp_path, tmp_path_factory, split):
    ref = local_ref(w, queries, tmp_path_factory)
    client.wait_for_workers(2, timeout=WAIT)   # a worker killed by the previous case is back
    marker = str(tmp_path / "blocked.pid")
    pids = set(client.run(os.getpid).values())
    client.run(_install_block, marker)
    out, errors = tmp_path / "out", []

    def batch():
        try:
            generate(queries, w.bank, out, client=client,
                     distributed_options={"split": split, "parts": 2, "timeout": WAIT})
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=batch, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        while not os.path.exists(marker):
            assert time.monotonic() - t0 < WAIT and th.is_alive(), errors or "no task blocked"
            time.sleep(0.05)
        pid = int(Path(marker).read_text())
        assert pid in pids and th.is_alive()   # a worker, mid-batch
        os.kill(pid, signal.SIGKILL)
        th.join(WAIT)
        assert not th.is_alive(), "batch did not finish after the kill"
    finally:
        client.run(_uninstall_block)
    assert not errors, errors
    assert_same(ref, out)
    no_litter(out)
    no_litter(tmp_path)


def _install_fail(target_name: str):
    """In a worker: finishing the output named ``target_name`` raises."""
    import loramix.mixing.distributed as d

    orig = d.__dict__.setdefault("_orig_finish_stage", d.finish_stage)

    def hook(bank, w_row, info, stage, out, *a, **k):
        if Path(out).name == target_name:
            raise RuntimeError(f"injected failure for {target_name}")
        return orig(bank, w_row, info, stage, out, *a, **k)

    d.finish_stage = hook


def _uninstall_fail():
    import loramix.mixing.distributed as d

    if "_orig_finish_stage" in d.__dict__:
        d.finish_stage = d.__dict__.pop("_orig_finish_stage")


def test_failed_batch_then_rerun_skips_complete(w, queries, client, tmp_path, tmp_path_factory):
    ref = local_ref(w, queries, tmp_path_factory)
    out = tmp_path / "out"
    opts = {"split": "modules", "parts": 3, "retries": 0, "timeout": WAIT}
    from loramix.core.files import make_stage_dir

    out.mkdir()
    foreign = make_stage_dir(out, "q3")   # another live process writing q3: not this batch's to remove
    (foreign / "theirs.bin").write_bytes(b"x")
    client.wait_for_workers(2, timeout=WAIT)   # a worker killed by a previous case is back: it gets the hook too
    client.run(_install_fail, "q3")
    try:
        with pytest.raises(RuntimeError, match="injected failure for q3"):
            generate(queries, w.bank, out, client=client, distributed_options=opts)
    finally:
        client.run(_uninstall_fail)
    assert (foreign / "theirs.bin").read_bytes() == b"x"
    shutil.rmtree(foreign)
    assert not (out / "q3").exists()
    keys = {}
    for d in out.iterdir():   # each target: a finished, verified adapter or nothing
        prov = json.loads((d / "loramix.json").read_text())
        keys[d.name] = prov["batch"]["target_key"]
        assert ld.is_complete(d, keys[d.name])
    no_litter(out)
    no_litter(tmp_path)
    done_before = set(keys)

    res = generate(queries, w.bank, out, client=client, distributed_options=opts)
    assert {r.out.name for r in res if r.status == "skipped"} == done_before
    assert "q3" in {r.out.name for r in res if r.status == "generated"}
    assert_same(ref, out)

    res = generate(queries, w.bank, out, client=client, distributed_options=opts)
    assert [r.status for r in res] == ["skipped"] * 8

    # a damaged output is no longer "complete": refused, then replaced with --overwrite
    st = out / "q5" / "adapter_model.safetensors"
    data = bytearray(st.read_bytes())
    data[-1] ^= 1
    st.write_bytes(bytes(data))
    with pytest.raises(OutputError, match="q5"):
        generate(queries, w.bank, out, client=client, distributed_options=opts)
    res = generate(queries, w.bank, out, client=client, overwrite=True, distributed_options=opts)
    assert [r.out.name for r in res if r.status == "generated"] == ["q5"]
    assert_same(ref, out)
    no_litter(out)


# ------------------------------------------------------------------ CLI and imports

def test_cli_scheduler(w, queries, client, tmp_path, tmp_path_factory):
    ref = local_ref(w, queries, tmp_path_factory)
    addr = client.scheduler.address
    assert addr.startswith("tcp://127.0.0.1:")
    r = _tiny.run_cli("generate", *queries, "--bank", w.bank, "-o", tmp_path / "out",
                      "--scheduler", addr, "--json")
    assert r.returncode == 0, r.stderr
    assert [a["status"] for a in json.loads(r.stdout)["adapters"]] == ["generated"] * 8
    assert_same(ref, tmp_path / "out")


def test_core_never_imports_dask():
    code = ("import sys, loramix.pipeline, loramix.cli, loramix.mixing.modes, loramix.bank\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')]\n")
    env = {**os.environ, "PYTHONPATH": f"{_tiny.PKG_PARENT}:{_tiny.ROOT / 'tests'}"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=WAIT)
    assert r.returncode == 0, r.stderr
