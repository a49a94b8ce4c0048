"""The shape of ``bank.json``: every key the library reads, checked once when a bank is opened.

:func:`problems` returns one sentence per defect, each naming the file, the member (by position
and name) and the key with what was expected, so a hand-edited or truncated ``bank.json`` gives
``bank.json member 3 ('x') lacks 'path' (a string)`` instead of a bare ``KeyError: 'path'``.
"""
from __future__ import annotations

__all__ = ["problems"]

_TOP = (("format", int, "an integer"), ("tokenizer", dict, "an object"), ("members", list, "a list"))
_TOKENIZER = (("file", str, "a string"), ("sha256", str, "a string"), ("vocab_size", int, "an integer"))
_MEMBER = (("name", str, "a string"), ("path", str, "a string"), ("profile", str, "a string"))
_OPTIONAL_TOP = (("rank", int, "an integer"), ("dtype", str, "a string"), ("fields", list, "a list"),
                 ("modules", dict, "an object"), ("bank_hash", str, "a string"))


def _bad(value, typ) -> bool:
    return not isinstance(value, typ) or (typ is int and isinstance(value, bool))


def _need(obj: dict, keys, where: str) -> list[str]:
    out = []
    for key, typ, what in keys:
        if key not in obj:
            out.append(f"{where} lacks {key!r} ({what})")
        elif _bad(obj[key], typ):
            out.append(f"{where} has {key!r} = {str(obj[key])[:40]!r}, not {what}")
    return out


def problems(doc, file: str = "bank.json") -> list[str]:
    """The defects of a parsed ``bank.json`` (empty when the library can use it)."""
    if not isinstance(doc, dict):
        return [f"{file} holds {type(doc).__name__ if doc is not None else 'null'}, not a JSON object "
                "(rebuild the bank with `loramix bank build`)"]
    out = _need(doc, _TOP, file)
    out += [p for p in _need(doc, _OPTIONAL_TOP, file) if "lacks" not in p]
    if isinstance(doc.get("tokenizer"), dict):
        out += _need(doc["tokenizer"], _TOKENIZER, f"{file} 'tokenizer'")
        v = doc["tokenizer"].get("vocab_size")
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            out.append(f"{file} 'tokenizer' has 'vocab_size' = {v}, not a positive integer")
    for k, v in (doc.get("modules") or {}).items() if isinstance(doc.get("modules"), dict) else ():
        if not (isinstance(v, list) and len(v) == 2 and all(not _bad(x, int) and x > 0 for x in v)):
            out.append(f"{file} 'modules' entry {k!r} is {str(v)[:40]!r}, not [in_features, out_features]")
            break
    if doc.get("base_model") is not None and not isinstance(doc.get("base_model"), str):
        out.append(f"{file} has 'base_model' = {str(doc['base_model'])[:40]!r}, not a string or null")
    if isinstance(doc.get("fields"), list) and not all(isinstance(f, str) for f in doc["fields"]):
        out.append(f"{file} 'fields' holds a non-string")
    for i, m in enumerate(doc.get("members") or [] if isinstance(doc.get("members"), list) else []):
        if not isinstance(m, dict):
            out.append(f"{file} member {i} is not a JSON object")
            continue
        name = m.get("name")
        out += _need(m, _MEMBER, f"{file} member {i}" + (f" ({name!r})" if isinstance(name, str) else ""))
        for key in ("dataset", "dataset_hash", "weights_sha256", "config_sha256"):
            if m.get(key) is not None and not isinstance(m[key], str):
                out.append(f"{file} member {i} ({name!r}) has {key!r} = {str(m[key])[:40]!r}, not a string")
        ws = m.get("weights_size")
        if ws is not None and (_bad(ws, int) or ws < 0):
            out.append(f"{file} member {i} ({name!r}) has 'weights_size' = {str(ws)[:40]!r}, "
                       "not a non-negative integer")
    return out
