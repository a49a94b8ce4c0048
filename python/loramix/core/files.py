"""Filesystem primitives every writer in loramix uses: atomic writes that respect the umask.

A file is written to a temporary file in the same folder and renamed over its target, so a
reader sees the old file or the new one, never half of one, and a file that may still be
memory-mapped is never truncated in place. ``tempfile`` creates files 0600 and folders 0700;
loramix gives them the permissions ordinary tools give (``0666 & ~umask``, ``0777 & ~umask``),
so a bank written by one user stays readable by the others and by Dask workers.

Staging folders and temporary files carry their owner in their name
(``.NAME.tmp-PID-HOST-XXXX``): one left by a process that was killed (SIGKILL, power loss) is
removed by the next run that writes next to it, once that owner is known to be gone (same host,
and a dead PID or another boot). Those of a live process, or of another host sharing the file
system, are never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["current_umask", "file_mode", "dir_mode", "atomic_path", "atomic_write", "write_json_atomic",
           "make_stage_dir", "clean_stale_stages", "missing_dirs", "remove_empty_dirs", "STAGE_LEGACY_AGE_S",
           "StagedFiles"]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)   # elsewhere: the classic set-and-restore (not thread-safe, but brief)
    os.umask(old)
    return old


def file_mode() -> int:
    """Permissions of a new regular file under the current umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Permissions of a new folder under the current umask."""
    return 0o777 & ~current_umask()


@contextmanager
def atomic_path(path, *, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it is renamed over ``path`` (with
    umask permissions), on any exception it is removed and ``path`` is left untouched."""
    path = Path(path)
    fd, tmp = _mkstemp_owned(path, suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mkstemp_owned(path: Path, suffix: str = ".tmp"):
    """``mkstemp`` next to ``path``, named ``.NAME.tmp-PID-HOST-XXXX.tmp`` (its owner, so a file
    left by a killed process is removed by the next write there); stale ones are removed first."""
    clean_stale_stages(path.parent)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-{_host_tag()}-",
                            suffix=suffix)


def atomic_write(path, data: bytes | str) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
    return path


def write_json_atomic(path, obj, *, indent: int | None = 1, **kw) -> Path:
    """``json.dump`` to ``path`` atomically, with a final newline."""
    return atomic_write(path, json.dumps(obj, indent=indent, **kw) + "\n")


def make_stage_dir(parent, name: str) -> Path:
    """A new hidden staging folder ``parent/.NAME.tmp-PID-HOST-XXXX`` with umask permissions
    (``mkdtemp`` alone makes it 0700). Renamed into place once complete. Staging folders that
    dead processes left in ``parent`` are removed first (:func:`clean_stale_stages`)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_stages(parent)
    d = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-{os.getpid()}-{_host_tag()}-", dir=parent))
    os.chmod(d, dir_mode())
    return d


#: A staging folder named by an older loramix (``.NAME.tmp-XXXXXXXX``, no owner in its name)
#: is removed only when nothing in it changed for this long and it holds only what loramix
#: stages (an adapter's files, temporary files).
STAGE_LEGACY_AGE_S = 24 * 3600

_STAGE_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})(?P<boot>[0-9a-f]{6})-[a-z0-9_]{8}(\.tmp)?$")
_LEGACY_RE = re.compile(r"^\..+\.tmp-[a-z0-9_]{8}$")
_STAGED_NAMES = {"adapter_config.json", "adapter_model.safetensors", "loramix.json", "README.md",
                 "weights.png", "bank.json", "tokenizer.json"}


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """The PID namespace (containers on one host sharing a volume number PIDs apart)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _host_tag() -> str:
    """8 hex digits of the host name and PID namespace (where this process's PIDs mean
    something), then 6 of the boot id: who owns a staging folder."""
    host = f"{socket.gethostname()}\0{_pid_namespace()}"
    return hashlib.sha1(host.encode()).hexdigest()[:8] + hashlib.sha1(_boot_id().encode()).hexdigest()[:6]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True   # someone else's process, or not knowable: keep its folder
    return True


def _stale(entry: os.DirEntry, me: str) -> bool:
    m = _STAGE_RE.match(entry.name)
    if m is not None:
        if m["host"] != me[:8]:
            return False            # another machine's (or container's) process: its PIDs mean nothing here
        if m["boot"] != me[8:]:
            return True             # this machine rebooted since: the owner is gone
        return int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
    if _LEGACY_RE.match(entry.name):
        return _legacy_stale(Path(entry.path))
    return False


def _legacy_stale(d: Path) -> bool:
    """An owner-less staging folder: stale when old and holding only what loramix stages."""
    try:
        newest = d.lstat().st_mtime
        with os.scandir(d) as it:
            for f in it:
                if f.is_dir(follow_symlinks=False) or not (f.name in _STAGED_NAMES or f.name.startswith(".")):
                    return False
                newest = max(newest, f.stat(follow_symlinks=False).st_mtime)
    except OSError:
        return False
    return time.time() - newest > STAGE_LEGACY_AGE_S


def clean_stale_stages(parent) -> list[Path]:
    """Remove the staging folders and temporary files in ``parent`` whose owner process is
    gone; returns them.

    Only loramix's own names count (``.NAME.tmp-PID-HOST-XXXX``, files with ``.tmp`` after it);
    those of a live process or of another host are kept. Best effort: what cannot be removed
    is left."""
    removed = []
    me = _host_tag()
    try:
        with os.scandir(parent) as it:
            entries = [e for e in it if e.name.startswith(".") and ".tmp-" in e.name]
    except OSError:
        return removed
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False) and _stale(e, me):
                shutil.rmtree(e.path)
                removed.append(Path(e.path))
            elif e.is_file(follow_symlinks=False) and _STAGE_RE.match(e.name) and _stale(e, me):
                os.unlink(e.path)   # a temporary file (atomic write) of a killed process
                removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def missing_dirs(path) -> list[Path]:
    """``path`` and those of its ancestors that do not exist yet, deepest first: the folders a
    ``mkdir(parents=True)`` would create (for :func:`remove_empty_dirs` after a failure)."""
    out = []
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def remove_empty_dirs(dirs) -> None:
    """Remove each folder of ``dirs`` (deepest first) that exists and is empty. A folder that
    holds anything (put there by someone else meanwhile) is kept, and so are its ancestors."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            continue


class StagedFiles:
    """Files written next to their targets under temporary names, then renamed into place all
    together by :meth:`commit` (after everything was validated) or removed by :meth:`abort`.

    A failure before the commit leaves every target exactly as it was. The commit itself is a
    series of renames in the order the files were staged (put the file that makes the others
    count last); a crash inside it leaves each file whole, old or new. As a context manager:
    abort on leaving without a commit."""

    def __init__(self) -> None:
        self._items: list[tuple[Path, Path]] = []

    def path_for(self, target) -> Path:
        """A new temporary file next to ``target``, renamed over it on commit."""
        target = Path(target)
        fd, tmp = _mkstemp_owned(target)
        os.close(fd)
        self._items.append((Path(tmp), target))
        return Path(tmp)

    def write(self, target, data: bytes) -> Path:
        """Stage ``data`` as the new content of ``target``."""
        tmp = self.path_for(target)
        tmp.write_bytes(data)
        return tmp

    def commit(self) -> None:
        while self._items:
            tmp, target = self._items[0]
            os.chmod(tmp, file_mode())
            os.replace(tmp, target)
            self._items.pop(0)

    def abort(self) -> None:
        for tmp, _ in self._items:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        self._items.clear()

    def __enter__(self) -> "StagedFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()
