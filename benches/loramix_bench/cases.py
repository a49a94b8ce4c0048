"""One benchmark case per process: ``python -m loramix_bench.cases '{"case": ..., ...}'``.

Each case prints ``RESULT {json}`` as its last line with its timings (median of ``repeat`` runs
after a warm-up), the bytes it read, and its memory: ``peak_rss`` (VmHWM of this fresh process),
``peak_anon`` (sampled RssAnon peak) and ``base_rss`` (VmRSS after imports, before the work).
Cases that use torch import it themselves; loramix cases never do (torch alone is ~300 MB RSS).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from loramix_bench import _common as C

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- helpers
def subset_bank(bank, layers: int | None):
    """The bank restricted to the modules of its first ``layers`` layers (all when None)."""
    if layers is None:
        return bank
    import copy

    from loramix.bank.bank import Bank

    def keep(name):
        parts = name.split(".")
        return "layers" not in parts or int(parts[parts.index("layers") + 1]) < layers

    members = []
    for m in bank.members:
        spec = dataclasses.replace(m.spec, modules={k: v for k, v in m.spec.modules.items() if keep(k)})
        members.append(m.with_spec(spec))
    doc = copy.copy(bank.doc)
    doc["modules"] = {k: v for k, v in bank.doc.get("modules", {}).items() if keep(k)}
    return Bank(bank.path, doc, members, bank.skipped)


def tensor_bytes(bank, idx) -> int:
    total = 0
    for i in idx:
        m = bank.members[i]
        for ms in m.modules.values():
            total += m.file.nbytes(ms.a_key) + m.file.nbytes(ms.b_key)
    return total


def target_weights(bank, n: int, top_k: int | None, seed: int = 0) -> np.ndarray:
    """One weight row over the first ``n`` members: the paper's normalized pipeline on the
    JS distances of a synthetic target profile (so top-k picks a realistic set)."""
    from loramix import weights as wts
    from loramix_bench import synth

    q = synth.make_histograms(1, seed=1234 + seed)
    D = wts.distances(q, bank.profiles()[:n], "js")
    return wts.mixing_weights(D, "normalized", top_k=top_k)[0]


def loo_weights(bank, n: int) -> np.ndarray:
    """All ``n`` leave-one-out rows (Q = n): JS within the bank, normalized pipeline, self excluded."""
    from loramix import weights as wts
    from loramix.core.divergence import divergence

    P = bank.profiles()[:n]
    D = divergence(P, None, "js")
    W = np.empty((n, n))
    for q in range(n):
        ex = np.zeros(n, bool)
        ex[q] = True
        W[q] = wts.mixing_weights(D[q:q + 1], "normalized", exclude=ex)[0]
    return W


def member_flat(m, keys) -> np.ndarray:
    """One member's tensors as one float32 vector (the paper's flattened row)."""
    return np.concatenate([m.file.to_f32(k).reshape(-1) for k in keys])


def _profile(fn, top: int = 12) -> list[str]:
    """cProfile of one untimed call: the ``top`` functions by own time, one line each."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [f"{tt:8.3f} s own {ct:8.3f} s cum {nc:7d} calls  {Path(f).name}:{ln}({fn_})"
            for (f, ln, fn_), (cc, nc, tt, ct, _) in rows]


def _finish(res: dict, sampler: C.PeakSampler, base: dict) -> dict:
    st = C.proc_status()
    res.update({"peak_rss": st["VmHWM"], "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file,
                "base_rss": base["VmRSS"]})
    return res


# ----------------------------------------------------------------------------- ceilings
@case
def ceiling_read(nbytes: int = 2 * 10**9, threads: int = 2, repeat: int = 5, **_):
    """Read bandwidth: numpy sum over a large float32 array (split over ``threads`` threads)."""
    a = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(a, threads)
    ts = C.times(lambda: C.run_threads(p.sum for p in parts), repeat)
    uparts = np.array_split(a.view(np.uint64), threads)
    tu = C.times(lambda: C.run_threads(p.max for p in uparts), repeat)
    return {**C.summary(ts), "gb_per_s": a.nbytes / min(ts) / C.GB, "gb_per_s_median": a.nbytes / np.median(ts) / C.GB,
            "u64_max_gb_per_s": a.nbytes / min(tu) / C.GB}


@case
def ceiling_read_mmap(bank: str, nbytes: int = 4 * 10**9, threads: int = 2, repeat: int = 3, **_):
    """Read bandwidth of the bank's own files through mmap (page cache): numpy ``max`` over
    ``np.memmap`` views of its safetensors files as uint64 (its bf16 bytes are not valid
    float32 values to sum), split over threads; compare with ``ceiling_read``'s uint64 rate.
    The first pass also maps the pages (minor faults); later passes find them mapped."""
    files = sorted(Path(bank).glob("*/adapter_model.safetensors"))
    views, total = [], 0
    for f in files:
        n = (f.stat().st_size // 8) * 8
        views.append(np.memmap(f, dtype=np.uint64, mode="r", shape=(n // 8,)))
        total += n
        if total >= nbytes:
            break
    parts = [views[i::threads] for i in range(threads)]

    def work(vs):
        for v in vs:
            np.asarray(v).view(np.uint64).max()   # bf16 bytes read as f32 may be inf: no float op

    def run():
        C.run_threads([lambda p=p: work(p) for p in parts])

    first: list = []
    ts = C.times(run, repeat, 1, first)
    return {**C.summary(ts), "bytes": total, "gb_per_s": total / min(ts) / C.GB,
            "first_gb_per_s": total / first[0] / C.GB}


@case
def ceiling_gemm(lib: str = "numpy", n: int = 4096, repeat: int = 3, **_):
    """fp32 GEMM n x n x n: numpy (OpenBLAS; its kernel reported) or torch.matmul."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    extra = {}
    if lib == "torch":
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fn = lambda: torch.matmul(ta, tb)  # noqa: E731
        extra = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                 "config": [ln for ln in torch.__config__.show().splitlines() if "BLAS" in ln or "CPU capability" in ln]}
    else:
        import threadpoolctl

        fn = lambda: a @ b  # noqa: E731
        extra = {"blas": [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                          for d in threadpoolctl.threadpool_info()],
                 "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}
    ts = C.times(fn, repeat)
    return {**C.summary(ts), "gflop_per_s": 2.0 * n**3 / min(ts) / 1e9,
            "gflop_per_s_median": 2.0 * n**3 / np.median(ts) / 1e9, **extra}


# ----------------------------------------------------------------------------- one adapter
@case
def loramix_mix(bank: str, mode: str = "factors", top_k: int | None = None, repeat: int = 3,
                out: str = "", layers: int | None = None, dtype: str | None = None, warmup: int = 1,
                profile: bool = False, **_):
    """``mix_adapters`` (the library path of ``loramix generate`` after the weights), public API only.
    With ``warmup=0`` the timed runs include the first one in this fresh process."""
    from loramix.bank.bank import Bank
    from loramix.mixing.local import mix_adapters

    base = C.proc_status()
    with C.PeakSampler() as s:
        t0 = time.perf_counter()
        b = subset_bank(Bank.open(bank), layers)
        t_open = time.perf_counter() - t0
        w = target_weights(b, len(b.members), top_k)
        used = np.flatnonzero(w)
        outdir = Path(out or tempfile.mkdtemp(prefix="lmx-bench-"))
        import resource

        first: list = []
        fresh = C.FreshOutputs(outdir, "adapter")   # a skipped (already complete) output is not a mix

        def mix():
            fresh.check(mix_adapters(b, w, fresh.path, mode=mode, dtype=dtype))

        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        ts = C.times(mix, repeat, warmup, first, setup=fresh.next)
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        faults = (ru1.ru_minflt - ru0.ru_minflt) / max(1, repeat + warmup)
        sys_s = (ru1.ru_stime - ru0.ru_stime) / max(1, repeat + warmup)
        outsize = (fresh.path / "adapter_model.safetensors").stat().st_size
        if profile:
            fresh.next()
        prof_top = _profile(mix) if profile else None
        nread = tensor_bytes(b, used)
        shutil.rmtree(outdir, ignore_errors=True)
    return _finish({**C.summary(ts), "first_s": first[0] if first else None,
                    "profile": prof_top, "minor_faults_per_run": faults, "sys_s_per_run": sys_s,
                    "open_s": t_open, "members_read": int(used.size), "bytes_read": nread,
                    "gb_per_s": nread / np.median(ts) / C.GB, "out_bytes": outsize}, s, base)


@case
def paper_matmul(bank: str, n: int, repeat: int = 3, layers: int | None = None, **_):
    """The paper's approach: the first ``n`` members as one in-RAM fp32 (n, P) matrix, then
    ``torch.matmul(coefficients, bank)``. Load time reported apart."""
    import torch

    from loramix.bank.bank import Bank

    torch.set_num_threads(os.cpu_count() or 1)
    base = C.proc_status()
    with C.PeakSampler() as s:
        b = subset_bank(Bank.open(bank), layers)
        keys = [k for ms in b.members[0].modules.values() for k in (ms.a_key, ms.b_key)]
        P = sum(int(np.prod(b.members[0].file.shape(k))) for k in keys)
        t0 = time.perf_counter()
        M = torch.empty((n, P), dtype=torch.float32)
        Mn = M.numpy()
        for i in range(n):
            Mn[i] = member_flat(b.members[i], keys)
        t_load = time.perf_counter() - t0
        w = torch.from_numpy(target_weights(b, n, None).astype(np.float32))[None, :]
        ts = C.times(lambda: torch.matmul(w, M), repeat)
    return _finish({**C.summary(ts), "load_s": t_load, "n": n, "P": P, "bytes_read": M.numel() * 4,
                    "gb_per_s": M.numel() * 4 / np.median(ts) / C.GB}, s, base)


class _Skeleton:
    """A torch module with Mistral's q/k/v Linear shapes per layer and no real base weights
    (stride-0 expanded zeros: 4 bytes each), so PEFT's own memory is what is measured."""

    @staticmethod
    def build(layers: int, hidden: int, kv_out: int):
        import torch
        from torch import nn

        def lin(i, o):
            m = nn.Linear(i, o, bias=False, device="meta")
            m.weight = nn.Parameter(torch.zeros(1).expand(o, i), requires_grad=False)
            return m

        attn = lambda: nn.ModuleDict({"q_proj": lin(hidden, hidden), "k_proj": lin(hidden, kv_out),  # noqa: E731
                                      "v_proj": lin(hidden, kv_out)})
        inner = nn.Module()
        inner.layers = nn.ModuleList([nn.ModuleDict({"self_attn": attn()}) for _ in range(layers)])
        root = nn.Module()
        root.model = inner
        return root


@case
def peft_mix(bank: str, n: int, combination: str = "cat", repeat: int = 1, layers: int | None = None,
             weights: str = "target", **_):
    """PEFT ``add_weighted_adapter`` over the first ``n`` members loaded into a PeftModel on a
    skeleton with the same q/k/v shapes (first ``layers`` layers). Load time reported apart."""
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from loramix.bank.bank import Bank

    torch.set_num_threads(os.cpu_count() or 1)
    base = C.proc_status()
    with C.PeakSampler() as s:
        b = Bank.open(bank)
        L = layers or max(int(k.split(".")[2]) for k in b.members[0].modules) + 1
        ms0 = next(iter(b.members[0].modules.values()))
        kv = next(v.out_features for k, v in b.members[0].modules.items() if k.endswith("k_proj"))
        skel = _Skeleton.build(L, ms0.in_features, kv)
        cfg = b.members[0].spec.raw_config
        lcfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                          init_lora_weights=False)
        names = [f"m{i}" for i in range(n)]
        t0 = time.perf_counter()
        model = None
        for i, name in enumerate(names):
            sd = load_file(str(b.members[i].path / "adapter_model.safetensors"))
            sd = {k: v for k, v in sd.items() if int(k.split(".")[4]) < L}
            if model is None:
                model = get_peft_model(skel, lcfg, adapter_name=name)
            else:
                model.add_adapter(name, lcfg)
            set_peft_model_state_dict(model, sd, adapter_name=name)
            del sd
        t_load = time.perf_counter() - t0
        w = target_weights(b, n, None)
        wl = [float(x) for x in w]
        kw = {"svd_rank": cfg["r"]} if combination == "svd" else {}

        def run():
            model.add_weighted_adapter(names, wl, "mixed", combination_type=combination, **kw)
            model.delete_adapter("mixed")

        ts = C.times(run, repeat, warmup=0)
    import peft

    return _finish({**C.summary(ts), "load_s": t_load, "n": n, "layers": L, "peft": peft.__version__,
                    "bytes_read": tensor_bytes(subset_bank(b, L), range(n))}, s, base)


# ----------------------------------------------------------------------------- many adapters
@case
def loramix_loo(bank: str, repeat: int = 1, out: str = "", layers: int | None = None,
                dtype: str | None = None, **_):
    """All N leave-one-out adapters in one pass (Q = N factors mix through ``mix_into``)."""
    from loramix.bank.bank import Bank
    from loramix.mixing.local import mix_adapters

    base = C.proc_status()
    with C.PeakSampler() as s:
        b = subset_bank(Bank.open(bank), layers)
        n = len(b.members)
        W = loo_weights(b, n)
        P = tensor_bytes(b, [0]) // {"F32": 4, "BF16": 2, "F16": 2}[b.dtype]
        root = Path(out or tempfile.mkdtemp(prefix="lmx-loo-"))
        root.mkdir(parents=True, exist_ok=True)

        def run():
            d = Path(tempfile.mkdtemp(dir=root))
            mix_adapters(b, W, [d / f"loo{q:03d}" for q in range(n)], mode="factors", dtype=dtype)
            shutil.rmtree(d)

        ts = C.times(run, repeat, warmup=0)
        shutil.rmtree(root, ignore_errors=True)
    flops = 2.0 * n * n * P
    return _finish({**C.summary(ts), "Q": n, "K": n, "P": P, "flops": flops,
                    "gflop_per_s": flops / np.median(ts) / 1e9}, s, base)


@case
def loramix_loo_kernel(bank: str, repeat: int = 3, tensors: int = 6, **_):
    """The mix kernel alone: ``weighted_sum`` of Q = N LOO rows over N members for a few
    tensors, output in memory (no file writes)."""
    from loramix.bank.bank import Bank
    from loramix.core.tensors import weighted_sum

    base = C.proc_status()
    with C.PeakSampler() as s:
        b = Bank.open(bank)
        n = len(b.members)
        W = loo_weights(b, n).astype(np.float32)
        keys = [k for ms in list(b.members[0].modules.values())[:tensors // 2] for k in (ms.a_key, ms.b_key)]
        srcs = [[m.file.tensor(k) for m in b.members] for k in keys]
        P = sum(int(np.prod(b.members[0].file.shape(k))) for k in keys)

        def run():
            for src in srcs:
                weighted_sum(src, W)

        ts = C.times(run, repeat)
    flops = 2.0 * n * n * P
    return _finish({**C.summary(ts), "Q": n, "K": n, "P": P, "gflop_per_s": flops / min(ts) / 1e9,
                    "gflop_per_s_median": flops / np.median(ts) / 1e9}, s, base)


@case
def torch_loo(bank: str, n: int, repeat: int = 1, layers: int | None = None, **_):
    """Q = n LOO rows @ the first n members in RAM (fp32), ``torch.matmul`` per tensor block."""
    import torch

    from loramix.bank.bank import Bank

    torch.set_num_threads(os.cpu_count() or 1)
    base = C.proc_status()
    with C.PeakSampler() as s:
        b = subset_bank(Bank.open(bank), layers)
        keys = [k for ms in b.members[0].modules.values() for k in (ms.a_key, ms.b_key)]
        sizes = [int(np.prod(b.members[0].file.shape(k))) for k in keys]
        P = sum(sizes)
        M = torch.empty((n, P), dtype=torch.float32)
        Mn = M.numpy()
        t0 = time.perf_counter()
        for i in range(n):
            Mn[i] = member_flat(b.members[i], keys)
        t_load = time.perf_counter() - t0
        W = torch.from_numpy(loo_weights(b, n).astype(np.float32))
        blocks, o = [], 0
        for sz in sizes:
            blocks.append(M[:, o:o + sz])
            o += sz
        outbuf = torch.empty((n, max(sizes)), dtype=torch.float32)

        def run():
            for blk in blocks:
                torch.matmul(W, blk, out=outbuf[:, :blk.shape[1]])

        ts = C.times(run, repeat)
    flops = 2.0 * n * n * P
    return _finish({**C.summary(ts), "Q": n, "K": n, "P": P, "load_s": t_load,
                    "gflop_per_s": flops / np.median(ts) / 1e9}, s, base)


# ----------------------------------------------------------------------------- end to end
@case
def e2e_breakdown(bank: str, dataset: str, repeat: int = 3, out: str = "", **_):
    """``generate`` stage by stage, in-process: open, profile, bank profiles, distances, weights, mix."""
    from loramix.profiles import tokens as prof
    from loramix import weights as wts
    from loramix.bank.bank import Bank
    from loramix.mixing.local import mix_adapters

    base = C.proc_status()
    outdir = Path(out or tempfile.mkdtemp(prefix="lmx-e2e-"))
    fresh = C.FreshOutputs(outdir, "adapter")   # a skipped (already complete) output is not a mix
    stages: dict[str, list] = {}
    with C.PeakSampler() as s:
        for r in range(repeat + 1):
            t = {}
            t0 = time.perf_counter()
            b = Bank.open(bank)
            t["open"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            q = prof.build_profile(dataset, b.tokenizer_path, fields=b.fields)
            t["profile"] = time.perf_counter() - t0
            t0 = time.perf_counter()   # as generate does: the core's CSR, the bank's stored js index
            qm, bm = prof.stack_against([q], b, core=True)
            t["bank_profiles"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            D = wts.bank_distances(qm, b, bm, "js")
            t["distances"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            W = wts.mixing_weights(D, "normalized")
            t["weights"] = time.perf_counter() - t0
            dest = fresh.next()
            t0 = time.perf_counter()
            res = mix_adapters(b, W, [dest])
            t["mix_write"] = time.perf_counter() - t0
            fresh.check(res)
            del b   # unmap this iteration's files: VmHWM is then one generate's, not the sum of all
            gc.collect()
            if r:
                for k, v in t.items():
                    stages.setdefault(k, []).append(v)
    from loramix.pipeline import generate

    prof_top = _profile(lambda: fresh.check(generate(dataset, bank, fresh.next(), metric="js", temperature=1.0)),
                        top=16)   # the paper's pipeline, as before
    shutil.rmtree(outdir, ignore_errors=True)
    med = {k: float(np.median(v)) for k, v in stages.items()}
    total = sum(v for k, v in med.items() if not k.startswith("("))
    return _finish({"stages_median_s": med, "total_median_s": total, "profile": prof_top}, s, base)


def main(argv=None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    name = spec.pop("case")
    try:
        res = CASES[name](**spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which prints it in the table
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    res.setdefault("peak_rss", C.proc_status()["VmHWM"])
    print("RESULT " + json.dumps(res, default=float), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
