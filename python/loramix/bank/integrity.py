"""A bank's integrity: what ``bank.json`` may name, and whether the members are still what was built.

- Every path ``bank.json`` names (a member's ``path``, ``profile``, ``dataset``, the tokenizer
  ``file``) is relative, without ``..``, and resolves (symbolic links followed) inside the bank
  folder; member names are unique.
- At build every member's tensors are read once: a NaN or infinite value, or a non-finite
  scaling from its config (``lora_alpha: NaN``), refuses the member, naming tensor and index.
- At build each member's weights file gets a SHA-256 (``weights_sha256``) and a quick signature
  (``weights_sig``: SHA-256 of its safetensors header and of its first and last 4 KiB of data).
  Every open checks size and signature (two small reads per member; a copied bank whose files
  got new mtimes still opens); :func:`verify` (``loramix bank verify``, ``generate --verify``)
  checks every byte.
"""
from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import numpy as np

__all__ = ["path_problem", "duplicate_names", "nonfinite_problem", "first_nonfinite", "weights_signature", "file_sha256",
           "file_digest", "stream_digest", "safetensors_sha256_finite", "SafetensorsDigest", "read_safetensors_header",
           "changed_problem", "verify", "SIG_EDGE"]

#: Bytes at each end of the data section that the quick signature covers.
SIG_EDGE = 1 << 12


def file_digest(path, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of a file's bytes with a ``hashlib`` algorithm, read in chunks."""
    with open(path, "rb") as fh:
        return stream_digest(fh, algorithm, chunk)


def stream_digest(fh, algorithm: str = "sha256", chunk: int = 1 << 22) -> str:
    """Hex digest of what is left to read in the binary file ``fh``, read into one reused buffer
    of ``chunk`` bytes (hashlib releases the GIL on it: threads hash files side by side)."""
    h = hashlib.new(algorithm)
    buf = memoryview(bytearray(chunk))
    while n := fh.readinto(buf):
        h.update(buf[:n])
    return h.hexdigest()


def file_sha256(path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    return file_digest(path, "sha256", chunk)


def path_problem(bank_path, value, what: str, *, links_out: bool = False, real_root: str | None = None) -> str | None:
    """Why ``value`` (a path read from bank.json, naming ``what``) may not be used; None if fine.
    ``links_out``: only the name is checked (relative, no ``..``), symbolic links may lead out
    of the bank (datasets, which loramix only reads: a bank index links its members' data).
    ``real_root``: ``os.path.realpath(bank_path)`` when the caller checks many paths of one bank."""
    if not isinstance(value, str) or not value:
        return f"{what} is {value!r}, not a path inside the bank"
    p = Path(value)
    if p.is_absolute() or ".." in p.parts or value.startswith(("/", "\\")) or ":" in p.parts[0]:
        return f"{what} {value!r} is not a relative path inside the bank (absolute paths and '..' are refused)"
    if links_out:
        return None
    root_s = real_root or os.path.realpath(bank_path)
    if _no_link_below(root_s, p.parts):   # the common case, without realpath's walk from /
        return None
    root = Path(root_s)
    real = Path(os.path.realpath(root / p))
    if real != root and root not in real.parents:
        return f"{what} {value!r} resolves to {real}, outside the bank (a symbolic link out of it)"
    return None


def _no_link_below(real_root: str, parts) -> bool:
    """Whether no component of ``real_root/parts...`` below the (already resolved) root is a
    symbolic link, so that the path stays inside the root (``parts`` hold no ``..``). A missing
    component counts as no link: realpath resolves it in place too."""
    cur = real_root
    for part in parts:
        cur = os.path.join(cur, part)
        try:
            if stat.S_ISLNK(os.lstat(cur).st_mode):
                return False
        except FileNotFoundError:
            return True
        except OSError:
            return False
    return True


def duplicate_names(members) -> list[str]:
    """Member names listed more than once in bank.json."""
    seen, dup = set(), []
    for m in members:
        n = m.get("name") if isinstance(m, dict) else None
        if n in seen and n not in dup:
            dup.append(n)
        seen.add(n)
    return dup


#: per safetensors dtype: the unsigned view of its bits and its exponent mask (all ones: inf or NaN)
_EXPONENT = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00), "F32": (np.uint32, 0x7F800000)}


def first_nonfinite(a: np.ndarray, dtype: str) -> int | None:
    """Flat index of the first NaN or infinite value of ``a`` (safetensors dtype ``dtype``; BF16
    as raw uint16 bits), or None."""
    flat = a.reshape(-1)
    if dtype == "BF16":   # raw bits: exponent all ones is inf or NaN
        mask = _EXPONENT["BF16"][1]
        bad = (flat & mask) == mask
    else:
        bad = ~np.isfinite(flat)
    if not bad.any():
        return None
    return int(np.flatnonzero(bad)[0])


class SafetensorsDigest:
    """SHA-256 of a safetensors file fed in order (its ``header``: the 8 length bytes and the JSON
    header, then :meth:`update` with the data), and whether no value of its data is inf or NaN
    (every tensor of ``dtype``; a value is inf or NaN iff its exponent bits are all ones).
    ``finite`` is None where that is not decided (another dtype, data fed in pieces that split a
    value): then check it tensor by tensor (:func:`first_nonfinite`)."""

    def __init__(self, header: bytes, dtype: str | None) -> None:
        self._h = hashlib.sha256(header)
        self._view, self._mask = _EXPONENT.get(dtype, (None, 0))
        self._size = np.dtype(self._view).itemsize if self._view is not None else 1
        self.finite: bool | None = True if self._view is not None else None

    def update(self, data) -> None:
        self._h.update(data)
        if self.finite:
            if len(data) % self._size:
                self.finite = None
            elif (np.frombuffer(data, self._view) & self._view(self._mask)).max(initial=0) == self._mask:
                self.finite = False

    def result(self) -> tuple[str, bool | None]:
        return self._h.hexdigest(), self.finite


def read_safetensors_header(fh) -> tuple[bytes, bool]:
    """The first bytes of the safetensors file ``fh``: its 8 length bytes and its JSON header,
    and whether they were whole (a shorter file gives what there was)."""
    head = fh.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    header = fh.read(n) if 0 <= n <= 100_000_000 else b""
    return head + header, len(header) == n


def safetensors_sha256_finite(fh, dtype: str, chunk: int = 1 << 20) -> tuple[str, bool | None]:
    """``(SHA-256, finite)`` of the safetensors file open in ``fh`` (at its start) whose tensors
    are all of ``dtype``, in one read (:class:`SafetensorsDigest`)."""
    header, whole = read_safetensors_header(fh)
    d = SafetensorsDigest(header, dtype if whole else None)
    buf = memoryview(bytearray(chunk - chunk % 4))
    while k := fh.readinto(buf):
        d.update(buf[:k])
    return d.result()


def nonfinite_problem(spec, sf) -> str | None:
    """The first non-finite scaling or tensor value of a member (its spec and open
    ``SafetensorsFile``), as a sentence naming member, module / tensor and flat index."""
    for m in spec.modules.values():
        if not np.isfinite(m.scaling):
            return (f"member {spec.name!r}: module {m.name} has scaling {m.scaling} (lora_alpha / r from "
                    "adapter_config.json); a finite number is expected")
    for key in sf.keys():
        dt = sf.dtype(key)
        if dt not in ("F32", "F16", "BF16"):
            continue
        i = first_nonfinite(sf.numpy(key), dt)
        if i is not None:
            shape = sf.shape(key)
            idx = tuple(int(x) for x in np.unravel_index(i, shape)) if shape else ()
            return (f"member {spec.name!r}: tensor {key} of adapter_model.safetensors holds a non-finite "
                    f"value at index {list(idx)} (flat {i}); every A and B value must be finite")
    return None


def weights_signature(path) -> str:
    """SHA-256 of a safetensors file's header and of the first and last :data:`SIG_EDGE` bytes of
    its data: catches a replaced file or a changed header in two small reads."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        start = 8 + min(n, max(size - 8, 0))
        fh.seek(0)
        h.update(fh.read(start))                        # length + header
        h.update(fh.read(min(SIG_EDGE, size - start)))  # first bytes of the data
        tail = max(start, size - SIG_EDGE)
        fh.seek(tail)
        h.update(fh.read())                             # last bytes of the data
    return h.hexdigest()


def changed_problem(name: str, path: Path, info: dict) -> str | None:
    """Whether member ``name``'s weights file at ``path`` differs from what bank.json records,
    by size and quick signature (:func:`weights_signature`)."""
    size = path.stat().st_size
    why = f"member {name!r}: adapter_model.safetensors changed since the bank was built"
    if "weights_size" in info and size != info["weights_size"]:
        return f"{why} (size {size}, bank.json says {info['weights_size']}); rebuild the bank"
    if info.get("weights_sig") and weights_signature(path) != info["weights_sig"]:
        return f"{why} (its header or data differ); rebuild the bank"
    return None


def verify(bank) -> list[str]:
    """Every byte of every member's weights and config against the SHA-256 recorded at build.
    Returns the problems (empty: the bank is what was built)."""
    out = []
    for m in bank.members:
        for fname, key in (("adapter_model.safetensors", "weights_sha256"), ("adapter_config.json", "config_sha256")):
            want = m.info.get(key)
            if not want:
                out.append(f"member {m.name!r}: bank.json records no {key}; rebuild the bank")
                continue
            if file_sha256(m.path / fname) != want:
                out.append(f"member {m.name!r}: {fname} differs from the one the bank was built with "
                           "(SHA-256); rebuild the bank")
    return out
