"""Regenerates tests/data/hostile/*.safetensors: malformed files the reader must reject with a
ValueError naming the file and the problem (tests/test_safetensors.py lists what each one
must say). Run: python tests/data/make_hostile.py"""
from __future__ import annotations

import json
import os
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostile")


def raw_header(text: bytes, data: bytes = b"", n: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if n is None else n) + text + data


def header(obj, data: bytes = b"") -> bytes:
    return raw_header(json.dumps(obj, separators=(",", ":")).encode(), data)


def t(dtype, shape, a, b):
    return {"dtype": dtype, "shape": shape, "data_offsets": [a, b]}


GOOD = header({"a": t("F32", [2], 0, 8), "b": t("F16", [2], 8, 12)}, bytes(12))

FILES = {
    "empty": b"",
    "seven_bytes": b"\x08\x00\x00\x00\x00\x00\x00",
    "truncated": GOOD[:-3],
    "header_past_end": raw_header(b'{"a":{}}', n=4096),
    "absurd_header_length": struct.pack("<Q", 2**63 + 5) + b"{}",
    "header_over_limit": struct.pack("<Q", 100_000_001) + b"{}",
    "non_utf8_header": raw_header(b'{"a\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "non_json_header": raw_header(b"this is not json at all!", b""),
    "not_an_object": raw_header(b"[1, 2, 3]"),
    "leading_whitespace": raw_header(b' {"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "truncated_json": raw_header(b'{"a":{"dtype":"F32","shape":[1],"data_off'),
    "trailing_junk_in_header": raw_header(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}} x', bytes(4)),
    "duplicate_keys": raw_header(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        bytes(8)),
    "duplicate_metadata_keys": raw_header(
        b'{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "offsets_overlap": header({"a": t("F32", [2], 0, 8), "b": t("F32", [2], 4, 12)}, bytes(12)),
    "offsets_gap": header({"a": t("F32", [1], 0, 4), "b": t("F32", [1], 8, 12)}, bytes(12)),
    "offsets_not_from_zero": header({"a": t("F32", [1], 4, 8)}, bytes(8)),
    "offsets_reversed": header({"a": t("F32", [1], 8, 4)}, bytes(8)),
    "offsets_past_end": header({"a": t("F32", [4], 0, 16)}, bytes(8)),
    "trailing_data": header({"a": t("F32", [1], 0, 4)}, bytes(12)),
    "shape_dtype_mismatch": header({"a": t("F32", [3], 0, 8)}, bytes(8)),
    "negative_shape": header({"a": t("F32", [-1], 0, 4)}, bytes(4)),
    "float_shape": header({"a": t("F32", [1.5], 0, 4)}, bytes(4)),
    "shape_overflow": header({"a": t("F32", [2**40, 2**40], 0, 4)}, bytes(4)),
    "offset_overflow": header({"a": t("F32", [1], 2**64 - 1, 3)}, bytes(4)),
    "three_offsets": header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, bytes(4)),
    "unknown_dtype": header({"a": t("F33", [1], 0, 4)}, bytes(4)),
    "missing_dtype": header({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "nested_junk": raw_header(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"junk":' + b"[" * 5000 + b"]" * 5000 + b"}}",
        bytes(4)),
    "metadata_not_strings": header({"__metadata__": {"k": {"x": [1, 2]}}, "a": t("F32", [1], 0, 4)}, bytes(4)),
    "tensor_not_object": header({"a": [1, 2, 3]}, b""),
    "lone_surrogate": raw_header(b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "control_char_in_string": raw_header(b'{"a\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
}


def main() -> None:
    os.makedirs(HERE, exist_ok=True)
    for name in os.listdir(HERE):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(HERE, name))
    for name, data in FILES.items():
        with open(os.path.join(HERE, name + ".safetensors"), "wb") as f:
            f.write(data)
    print(f"wrote {len(FILES)} files to {HERE}")


if __name__ == "__main__":
    main()
