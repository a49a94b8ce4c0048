"""Filesystem primitives every writer in loramix uses: atomic writes that respect the umask.

A file is written to a temporary file in the same folder and renamed over its target, so a
reader sees the old file or the new one, never half of one, and a file that may still be
memory-mapped is never truncated in place. ``tempfile`` creates files 0600 and folders 0700;
loramix gives them the permissions ordinary tools give (``0666 & ~umask``, ``0777 & ~umask``),
so a bank written by one user stays readable by the others and by Dask workers.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["current_umask", "file_mode", "dir_mode", "atomic_path", "atomic_write", "write_json_atomic",
           "make_stage_dir"]


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    """A new hidden staging folder ``parent/.NAME.tmp-XXXX`` with umask permissions (``mkdtemp``
    alone makes it 0700). Renamed into place once complete."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    os.chmod(d, dir_mode())
    return d
