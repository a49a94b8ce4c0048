"""Measurement helpers shared by the suites: timing, memory, machine facts, ceilings, subprocesses.

Timing: every case is run ``repeat`` times after one warm-up and reported as the median (and
min/max). Memory: peak RSS is ``VmHWM`` of a fresh process per case (so one case's peak never
hides in another's), plus the peak of ``RssAnon`` sampled every 5 ms (``VmHWM`` also counts
file pages mapped from the page cache, which the kernel can take back at any time).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import shutil
import threading
import time
from pathlib import Path

GB = 1e9


def times(fn, repeat: int = 3, warmup: int = 1, first: list | None = None, setup=None) -> list[float]:
    """``repeat`` timings of ``fn`` after ``warmup`` untimed calls (their times go to ``first``);
    ``setup()``, if given, runs untimed before every call (e.g. a fresh output folder)."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        if first is not None:
            first.append(time.perf_counter() - t0)
    out = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


class FreshOutputs:
    """A new output folder for every run of a mix (``next()``, the previous one removed): loramix
    skips an output already complete for the same inputs (``status == "skipped"``: a checksum
    check, not a mix), so timing the same call into the same folder twice would time the skip.
    :meth:`check` raises if a run's results say it skipped."""

    def __init__(self, root: Path, stem: str) -> None:
        self.root, self.stem, self.n, self.path = Path(root), stem, 0, None

    def next(self) -> Path:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        self.path = self.root / f"{self.stem}-{self.n}"
        self.n += 1
        return self.path

    @staticmethod
    def check(results) -> None:
        results = results if isinstance(results, (list, tuple)) else [results]
        bad = [str(r.out) for r in results if getattr(r, "status", "generated") != "generated"]
        if bad:
            raise RuntimeError(f"bench: a timed run skipped instead of mixing ({', '.join(bad)}); "
                               "every run needs a fresh output folder")


def run_threads(fns) -> None:
    """Call each of ``fns`` in its own Python thread and wait for all (numpy reductions release
    the GIL, so this spreads a read over the cores); one callable runs in this thread."""
    fns = list(fns)
    if len(fns) == 1:
        fns[0]()
        return
    ts = [threading.Thread(target=f) for f in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def summary(ts: list[float]) -> dict:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": len(ts)}


def proc_status(pid: str = "self") -> dict:
    """VmHWM, VmRSS, RssAnon, RssFile of a process, bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


class PeakSampler:
    """Samples this process's RssAnon / RssFile every ``dt`` seconds in a thread; keeps the peaks."""

    def __init__(self, dt: float = 0.005):
        self.dt = dt
        self.peak_anon = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            s = proc_status()
            self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, s.get("RssFile", 0))
            self._stop.wait(self.dt)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def drop_caches() -> bool:
    """Drop the page cache (root only); False when not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return True
    except OSError:
        return False


def evict(paths) -> None:
    """Drop the given files from the page cache (posix_fadvise DONTNEED): a cold start for them."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def machine() -> dict:
    """The machine in words: CPU model, cores, RAM, versions, BLAS kernel, loramix build."""
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        ls = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in ls.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache",
                             "Hypervisor vendor"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["ram_gb"] = round(meminfo()["MemTotal"] / 2**30, 1)
    info["cores"] = os.cpu_count()
    info["env"] = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                              "LORAMIX_ISA", "LORAMIX_NUM_THREADS") if k in os.environ}
    import numpy as np

    info["numpy"] = np.__version__
    try:
        import threadpoolctl

        info["blas"] = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                        for d in threadpoolctl.threadpool_info()]
    except ImportError:
        pass
    import loramix

    info["loramix"] = loramix.info()
    info["loramix"].pop("cpu", None)
    return info


# ----------------------------------------------------------------------------- subprocess cases
_PRIMED: set = set()


def bytecode_env(env: dict) -> dict:
    """``env`` with Python bytecode kept, as an installed package has it: ``pip install`` compiles
    every module, but a source tree run under ``PYTHONDONTWRITEBYTECODE`` (set on some machines)
    compiles all of loramix again in every fresh process (0.1-0.3 s of a small case, measured).
    The cases keep their bytecode in a folder of their own (``PYTHONPYCACHEPREFIX``, nothing is
    written into the tree), compiled once here before the first case."""
    import tempfile

    import loramix

    env = dict(env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / f"loramix-bench-pycache-{os.getuid()}"))
    pkg = str(Path(loramix.__file__).resolve().parent)
    if (pkg, env["PYTHONPYCACHEPREFIX"]) not in _PRIMED:
        subprocess.run([sys.executable, "-m", "compileall", "-q", pkg], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _PRIMED.add((pkg, env["PYTHONPYCACHEPREFIX"]))
    return env


def _env(extra: dict | None = None, unset=()) -> dict:
    env = bytecode_env(os.environ)
    import loramix

    # the harness (benches/) and the very loramix under test (installed, or a source tree)
    paths = [str(Path(__file__).resolve().parents[1]), str(Path(loramix.__file__).resolve().parents[1])]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for k in unset:
        env.pop(k, None)
    env.update(extra or {})
    return env


def run_case(spec: dict, *, timeout: float = 3600, env: dict | None = None, unset=()) -> dict:
    """Run one case (``loramix_bench.cases``) in a fresh Python process; its result dict, or
    ``{"error": ...}``. The process's own VmHWM is in the result (``peak_rss``)."""
    cmd = [sys.executable, "-m", "loramix_bench.cases", json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env, unset))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {p.returncode}: " + " | ".join(tail)}


# Spawns the command from a small process of its own and reports the command's rusage and wall
# time. Linux hands a child the high-water RSS of the memory it replaced at exec (the forking
# parent's): spawned straight from this harness (several hundred MB after the PEFT cases), every
# command's ru_maxrss read as the harness's size (564 MB for a 0.25 s generate).
_SPAWN = r"""
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as fh:
    json.dump({"wall_s": wall, "status": status, "maxrss_kb": ru.ru_maxrss, "minflt": ru.ru_minflt,
               "majflt": ru.ru_majflt, "utime": ru.ru_utime, "stime": ru.ru_stime}, fh)
"""


def run_command(cmd: list[str], *, env: dict | None = None, timeout: float = 3600) -> dict:
    """Wall time, peak RSS and faults of a command, measured around it by a small spawning
    process (``_SPAWN``: ``python -S``, ~10 MB, whose own size is what the command's
    ``ru_maxrss`` may include at most)."""
    import signal
    import tempfile

    fo, fe = tempfile.TemporaryFile(), tempfile.TemporaryFile()   # no pipe to fill up and block
    fd, stats = tempfile.mkstemp(prefix="loramix-bench-", suffix=".json")
    os.close(fd)
    try:
        p = subprocess.Popen([sys.executable, "-S", "-c", _SPAWN, stats, *cmd], stdout=fo, stderr=fe,
                             env=_env(env), start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        try:
            with open(stats) as fh:
                r = json.load(fh)
        except (OSError, ValueError):
            r = {"wall_s": float("nan"), "status": 9, "maxrss_kb": 0, "minflt": 0, "majflt": 0,
                 "utime": 0.0, "stime": 0.0}
    finally:
        os.unlink(stats)
    with fo, fe:
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    return {"wall_s": r["wall_s"], "peak_rss": r["maxrss_kb"] * 1024, "rc": os.waitstatus_to_exitcode(r["status"]),
            "minor_faults": r["minflt"], "major_faults": r["majflt"], "cpu_s": r["utime"] + r["stime"],
            "sys_s": r["stime"],
            "stdout": out[-2000:], "stderr": err[-2000:]}
