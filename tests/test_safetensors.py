"""Safetensors reader/writer: round trips with the safetensors library, hostile files,
atomic writes, mapping lifetime."""
from __future__ import annotations

import gc
import os
import struct

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file as np_save_file

from loramix.core.tensors import SafetensorsFile, SafetensorsWriter, TensorRef, f32_to_bf16, weighted_sum

HOSTILE = os.path.join(os.path.dirname(__file__), "data", "hostile")

# file -> a fragment the error message must contain (besides the file's path)
HOSTILE_EXPECT = {
    "empty": "0 bytes, too short",
    "seven_bytes": "7 bytes, too short",
    "truncated": "truncated file",
    "header_past_end": "runs past the end of the file",
    "absurd_header_length": "exceeds the limit",
    "header_over_limit": "exceeds the limit",
    "non_utf8_header": "not valid UTF-8",
    "non_json_header": "not a JSON object",
    "not_an_object": "not a JSON object",
    "leading_whitespace": "must start with '{'",
    "truncated_json": "unterminated string",
    "trailing_junk_in_header": "unexpected data after",
    "duplicate_keys": "duplicate key 'a'",
    "duplicate_metadata_keys": "duplicate key 'k' in __metadata__",
    "offsets_overlap": "overlap the previous tensor",
    "offsets_gap": "leave a gap",
    "offsets_not_from_zero": "expected to start at 0",
    "offsets_reversed": "end before they begin",
    "offsets_past_end": "offsets past the end",
    "trailing_data": "trailing data",
    "shape_dtype_mismatch": "needs 12",
    "negative_shape": "must be a non-negative integer",
    "float_shape": "must be a non-negative integer",
    "shape_overflow": "overflows 64 bits",
    "offset_overflow": "end before they begin",
    "three_offsets": "exactly 2 integers",
    "unknown_dtype": "unknown dtype 'F33'",
    "missing_dtype": "has no dtype",
    "nested_junk": "unknown field 'junk'",
    "metadata_not_strings": "is not a string",
    "tensor_not_object": "must be an object",
    "lone_surrogate": "surrogate",
    "control_char_in_string": "control character",
}


def test_hostile_folder_is_complete():
    names = sorted(f[: -len(".safetensors")] for f in os.listdir(HOSTILE) if f.endswith(".safetensors"))
    assert names == sorted(HOSTILE_EXPECT)


@pytest.mark.parametrize("name", sorted(HOSTILE_EXPECT))
def test_hostile_files_raise_valueerror(name):
    path = os.path.join(HOSTILE, name + ".safetensors")
    with pytest.raises(ValueError) as ei:
        SafetensorsFile(path)
    msg = str(ei.value)
    assert path in msg
    assert HOSTILE_EXPECT[name] in msg


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        SafetensorsFile(tmp_path / "nope.safetensors")


def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _entries_of(f: SafetensorsFile):
    return [(k, f.dtype(k), f.shape(k)) for k in f.keys()]


def _rewrite(src: str, dst: str, metadata="same") -> None:
    f = SafetensorsFile(src)
    md = (f.metadata if f.has_metadata else None) if metadata == "same" else metadata
    with SafetensorsWriter(dst, _entries_of(f), md) as w:
        for k in f.keys():
            w.write(k, f.numpy(k))


@pytest.mark.parametrize("with_metadata", [None, "empty", "full"])
def test_numpy_library_round_trip_byte_identical(tmp_path, rng, with_metadata):
    tensors = {
        "layer.0.lora_A.weight": rng.standard_normal((16, 33)).astype(np.float32),
        "layer.0.lora_B.weight": rng.standard_normal((7, 16)).astype(np.float16),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "z\u00e9\"\\\n": rng.standard_normal(5).astype(np.float32),
    }
    md = {None: None, "empty": {},
          "full": {"format": "pt", "note": 'quote " back \\ nl \n ctl \x01 del \x7f é ✓', "b": "2"}}[with_metadata]
    src = str(tmp_path / "lib.safetensors")
    np_save_file(tensors, src, metadata=md)
    f = SafetensorsFile(src)
    assert sorted(f.keys()) == sorted(tensors)
    assert len(f) == len(tensors) and "scalar" in f and "nope" not in f
    assert f.metadata == (md or {})
    assert f.has_metadata == (md is not None)
    for k, v in tensors.items():
        got = f.numpy(k)
        assert got.dtype == v.dtype and got.shape == v.shape
        np.testing.assert_array_equal(got, v)
        assert not got.flags.writeable
        np.testing.assert_array_equal(f.to_f32(k), v.astype(np.float32))
        assert f.nbytes(k) == v.nbytes
    dst = str(tmp_path / "ours.safetensors")
    _rewrite(src, dst)
    assert _read(dst) == _read(src)


def test_torch_bf16_round_trip_byte_identical(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(9, 5, generator=g).to(torch.bfloat16),
        "h": torch.randn(3, generator=g).to(torch.float16),
        "f": torch.randn(2, 2, generator=g),
    }
    src = str(tmp_path / "t.safetensors")
    save_file(tensors, src, metadata={"format": "pt"})
    f = SafetensorsFile(src)
    assert f.dtype("w") == "BF16"
    bits = f.numpy("w")
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal(bits, tensors["w"].view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(f.to_f32("w"), tensors["w"].float().numpy())
    dst = str(tmp_path / "o.safetensors")
    _rewrite(src, dst)
    assert _read(dst) == _read(src)
    back = load_file(dst)
    for k in tensors:
        assert torch.equal(back[k], tensors[k])


def test_writer_output_loads_with_safe_open(tmp_path, rng):
    import torch
    a = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    c = rng.standard_normal(3).astype(np.float32)
    p = str(tmp_path / "w.safetensors")
    with SafetensorsWriter(p, [("a", "F32", (4, 6)), ("b", "BF16", (10,)), ("c", "F16", (3,))],
                           {"format": "pt", "x": "y"}) as w:
        w.write("a", a)
        w.write("b", b)  # float32 -> BF16 conversion
        w.write("c", c)  # float32 -> F16 conversion
    with safe_open(p, "pt") as g:
        assert g.metadata() == {"format": "pt", "x": "y"}
        assert torch.equal(g.get_tensor("a"), torch.from_numpy(a))
        assert torch.equal(g.get_tensor("b"), torch.from_numpy(b).to(torch.bfloat16))
        assert torch.equal(g.get_tensor("c"), torch.from_numpy(c.astype(np.float16)))
    np.testing.assert_array_equal(SafetensorsFile(p).numpy("b"), f32_to_bf16(b))


def test_other_dtypes_listed_by_name_and_refused(tmp_path):
    p = str(tmp_path / "mixed.safetensors")
    np_save_file({"i": np.arange(5, dtype=np.int64), "u": np.arange(3, dtype=np.uint8),
                  "d": np.ones(2, np.float64), "f": np.ones(2, np.float32)}, p)
    f = SafetensorsFile(p)
    assert {k: f.dtype(k) for k in f.keys()} == {"i": "I64", "u": "U8", "d": "F64", "f": "F32"}
    assert f.shape("i") == (5,) and f.nbytes("i") == 40
    for k, name in [("i", "I64"), ("u", "U8"), ("d", "F64")]:
        with pytest.raises(ValueError, match=name):
            f.numpy(k)
        with pytest.raises(ValueError, match=name):
            f.to_f32(k)
        ref = f.tensor(k)
        assert ref.dtype == name
        with pytest.raises(ValueError, match=name):
            weighted_sum([ref], [1.0])
    with pytest.raises(KeyError):
        f.numpy("nope")


def test_mapping_outlives_file_object(tmp_path, rng):
    x = rng.standard_normal(1000).astype(np.float32)
    p = str(tmp_path / "m.safetensors")
    np_save_file({"x": x}, p)
    f = SafetensorsFile(p)
    view = f.numpy("x")
    ref = f.tensor("x")
    assert isinstance(ref, TensorRef) and ref.shape == (1000,) and ref.dtype == "F32"
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.keys()
    del f
    gc.collect()
    np.testing.assert_array_equal(view, x)
    np.testing.assert_array_equal(weighted_sum([ref], [2.0]), 2 * x)
    with SafetensorsFile(p) as g:
        v2 = g.numpy("x")
    np.testing.assert_array_equal(v2, x)


def _listing(d):
    return sorted(os.listdir(d))


def test_writer_exception_leaves_nothing(tmp_path):
    p = tmp_path / "out.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(p, [("a", "F32", (3,))]) as w:
            w.write("a", np.ones(3, np.float32))
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_writer_keeps_existing_file_until_commit(tmp_path):
    p = str(tmp_path / "out.safetensors")
    np_save_file({"a": np.zeros(3, np.float32)}, p)
    old = _read(p)
    w = SafetensorsWriter(p, [("a", "F32", (3,))])
    assert os.path.dirname(w.temp_path) == os.path.dirname(p)
    w.write("a", np.ones(3, np.float32))
    assert _read(p) == old
    w.commit()
    assert w.closed
    np.testing.assert_array_equal(SafetensorsFile(p).numpy("a"), np.ones(3, np.float32))
    assert _listing(tmp_path) == ["out.safetensors"]
    with pytest.raises(ValueError, match="already committed"):
        w.write("a", np.ones(3, np.float32))


def test_writer_refuses_commit_with_missing_tensor(tmp_path):
    p = tmp_path / "out.safetensors"
    w = SafetensorsWriter(p, [("a", "F32", (3,)), ("b", "F16", (2,))])
    w.write("a", np.ones(3, np.float32))
    with pytest.raises(ValueError, match="not written: 'b'"):
        w.commit()
    assert not p.exists()
    w.abort()
    assert _listing(tmp_path) == []


def test_writer_dropped_without_commit_removes_temp(tmp_path):
    w = SafetensorsWriter(tmp_path / "x.safetensors", [("a", "F32", (3,))])
    assert os.path.exists(w.temp_path)
    del w
    gc.collect()
    assert _listing(tmp_path) == []


def test_writer_validates_arrays(tmp_path):
    with SafetensorsWriter(tmp_path / "v.safetensors", [("a", "F16", (2, 3))]) as w:
        with pytest.raises(TypeError, match="float16 or float32"):
            w.write("a", np.ones((2, 3), np.float64))
        with pytest.raises(ValueError, match="does not match"):
            w.write("a", np.ones(6, np.float16))
        with pytest.raises(ValueError, match="C-contiguous"):
            w.write("a", np.ones((3, 2), np.float16).T)
        with pytest.raises(KeyError):
            w.write("b", np.ones((2, 3), np.float16))
        w.write("a", np.ones((2, 3), np.float16))
    with pytest.raises(ValueError, match="duplicate"):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", "F32", (1,)), ("a", "F32", (1,))])
    with pytest.raises(ValueError, match="dtype"):
        SafetensorsWriter(tmp_path / "d.safetensors", [("a", "I64", (1,))])
    assert _listing(tmp_path) == ["v.safetensors"]


def test_overwrite_mapped_file_keeps_old_view(tmp_path):
    p = str(tmp_path / "m.safetensors")
    old = np.arange(4096, dtype=np.float32)
    np_save_file({"x": old}, p)
    f = SafetensorsFile(p)
    view = f.numpy("x")
    ref = f.tensor("x")
    with SafetensorsWriter(p, [("x", "F32", (4096,))]) as w:
        w.write("x", -old)
    np.testing.assert_array_equal(view, old)
    np.testing.assert_array_equal(weighted_sum([ref], [1.0]), old)
    np.testing.assert_array_equal(SafetensorsFile(p).numpy("x"), -old)


def test_header_padding_and_layout(tmp_path):
    p = str(tmp_path / "h.safetensors")
    with SafetensorsWriter(p, [("a", "F32", (1,))]) as w:
        w.write("a", np.ones(1, np.float32))
    data = _read(p)
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    assert data[8:8 + n].rstrip(b" ") == b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert len(data) == 8 + n + 4


def test_fuzzed_headers_never_crash(rng):
    """Random byte edits, truncations and length-field edits of a valid file: the reader
    either accepts the file or raises ValueError naming it; never a crash or hang."""
    from loramix import _core_testing  # test hooks: built with LORAMIX_TESTING (pip builds)

    base = bytearray(struct.pack("<Q", 0))
    hdr = b'{"__metadata__":{"k":"v\\u00e9"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},' \
          b'"b":{"dtype":"BF16","shape":[5],"data_offsets":[24,34]}}'
    hdr += b" " * ((8 - len(hdr) % 8) % 8)
    base = bytearray(struct.pack("<Q", len(hdr)) + hdr + bytes(34))
    assert _core_testing.parse_safetensors_bytes(bytes(base), "fuzz") == ["a", "b"]
    n_ok = 0
    for i in range(3000):
        data = bytearray(base)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
        elif kind == 1:
            data = data[: rng.integers(0, len(data))]
        elif kind == 2:
            data[0:8] = struct.pack("<Q", int(rng.integers(0, 2**63)) >> int(rng.integers(0, 63)))
        else:
            pos = rng.integers(8, 8 + len(hdr))
            data[pos:pos] = bytes([rng.choice(list(b'{}[]",:-.e0123456789\\ '))])
        try:
            _core_testing.parse_safetensors_bytes(bytes(data), "fuzz-file")
            n_ok += 1
        except ValueError as e:
            assert "fuzz-file" in str(e)
    assert n_ok < 3000
