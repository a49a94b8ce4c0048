"""Outputs hashed while the mix writes them.

A mix writes each output front to back: its header when it is created, then the tensors module
by module in file order. :class:`HashBehind` follows in a background thread: once a module is
written, every output's bytes up to that module's end are final, and the thread reads and hashes
them (SHA-256, and the NaN/inf test of :class:`loramix.bank.integrity.SafetensorsDigest`) while
the mix goes on with the next module (reads, hashlib and numpy release the GIL). What is left
after the last module is little, so the outputs' checksums no longer cost a pass of their own at
the end of a call (16 outputs: 300 MB of SHA-256, ~0.2 s on 2 cores). Each range read is also
handed to the disk (``sync_file_range(WRITE)`` where Linux has it: it starts the write-back and
does not wait), so the writer's fsync before its rename finds little left to write (16 outputs:
130-150 ms of fsyncs at the end, even side by side). Durability is unchanged: the writer still
fsyncs, and a write-back error still reaches its fsync.
"""
from __future__ import annotations

import json
import os
import sys
import threading

from loramix.bank.integrity import SafetensorsDigest, read_safetensors_header


def _start_writeback():
    """``f(fd, offset, nbytes)`` that starts writing a file range back to disk without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd, off, n: fn(fd, off, n, 2)   # SYNC_FILE_RANGE_WRITE; a hint: errors ignored


class HashBehind:
    """SHA-256 and finiteness of safetensors files being written, computed behind the writer.

    ``paths``: the files (their headers written, their sizes set: each tensor's place and dtype
    are read from the header); ``module_of``: the module a key belongs to. Call
    :meth:`written` after each module, then :meth:`finish` for ``[(sha256, finite) or None]``
    (None: that file could not be followed; hash it afresh). :meth:`close` stops at once.
    """

    def __init__(self, paths, module_of, chunk: int = 1 << 20) -> None:
        self._fds, self._digests, self._pos, self._ends, self._safe = [], [], [], [], []
        try:
            for p in paths:
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                self._fds.append(fd)
                with os.fdopen(os.dup(fd), "rb") as fh:
                    header, whole = read_safetensors_header(fh)
                tensors = _header_tensors(header) if whole else {}
                dtypes = {t["dtype"] for t in tensors.values()}
                self._digests.append(SafetensorsDigest(header, dtypes.pop() if len(dtypes) == 1 else None))
                self._pos.append(len(header))
                self._safe.append(len(header))
                ends: dict = {}   # per module: where its last tensor's data ends in the file
                for key, t in tensors.items():
                    m, end = module_of(key), len(header) + int(t["data_offsets"][1])
                    ends[m] = max(ends.get(m, 0), end)
                self._ends.append(ends)
        except BaseException:
            self._close_fds()
            raise
        self._chunk = chunk
        self._writeback = _start_writeback()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = self._final = False
        self._thread = threading.Thread(target=self._run, name="loramix-hash-behind", daemon=True)
        self._thread.start()

    def written(self, module: str) -> None:
        """Module ``module`` is written in every output that holds it: hash up to its end."""
        with self._lock:
            for q, ends in enumerate(self._ends):
                if module in ends:
                    self._safe[q] = max(self._safe[q], ends[module])
        self._wake.set()

    def finish(self) -> list:
        """Hash what is left (every file to its end); ``[(sha256, finite) or None]``."""
        with self._lock:
            self._final = True
        self._wake.set()
        self._thread.join()
        self._close_fds()
        return [d.result() if d is not None else None for d in self._digests]

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join()
        self._close_fds()

    def _run(self) -> None:
        buf = memoryview(bytearray(self._chunk - self._chunk % 4))
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                final, safe = self._final, list(self._safe)
            for q, fd in enumerate(self._fds):
                if self._stop:
                    return
                if self._digests[q] is None:
                    continue
                try:
                    upto = os.fstat(fd).st_size if final else safe[q]
                    self._catch_up(q, fd, upto, buf)
                except OSError:
                    self._digests[q] = None
            if final:
                return

    def _catch_up(self, q: int, fd: int, upto: int, buf) -> None:
        start = self._pos[q]
        while self._pos[q] < upto and not self._stop:
            k = os.preadv(fd, [buf[:min(len(buf), upto - self._pos[q])]], self._pos[q])
            if k <= 0:
                raise OSError(f"unexpected end of file at {self._pos[q]}")
            self._digests[q].update(buf[:k])
            self._pos[q] += k
        if self._writeback is not None and self._pos[q] > start:
            self._writeback(fd, start, self._pos[q] - start)

    def _close_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _header_tensors(header: bytes) -> dict:
    """``{key: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's first bytes (its 8
    length bytes and JSON header); {} where they do not parse (then nothing is hashed before
    :meth:`HashBehind.finish`, which hashes the whole file)."""
    try:
        meta = json.loads(header[8:])
        return {k: v for k, v in meta.items() if k != "__metadata__" and isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2}
    except (ValueError, AttributeError):
        return {}
