"""Task suites for the mini bank: the format, the operations, and deterministic data generation.

A suite is plain data (see ``default_suite.py``): a dict with

- ``name``, ``seed``;
- ``prompt``: the prompt template, with ``{instruction}`` and ``{input}``; the Lots-of-LoRAs
  ``input`` field is the rendered template, ``output`` is ``[answer]``;
- ``splits``: examples per split, e.g. ``{"train": 300, "valid": 40, "test": 60}``;
- ``lexicons``: name -> {word: value} (knowledge the base model is pre-trained on as facts);
- ``vocabularies``: name -> [word, ...];
- ``families``: list of ``{"name", "op", "vocab", "tasks": [task, ...], **op params}``; each task is
  ``{"name", "instruction", **overrides}`` (any family key may be overridden per task, e.g. ``sep``,
  ``n_items``, ``subset``);
- ``pretrain``: the base model's corpus: ``ops`` (other operations, same template, generic
  instructions), ``facts`` (sentence templates per lexicon), its size and the model/training
  configs (read by ``build.py``).

Operations (``OPS``) take ``(rng, spec, suite)`` and return ``(input_text, answer)``. Add one by
adding a function to ``OPS``; everything else is data. Every example is a pure function of the
suite seed, the task name and the split, so the data never depends on build order.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

__all__ = ["OPS", "load_suite", "task_specs", "generate_task", "generate_pretrain", "seed_for",
           "suite_fingerprint", "render"]


def seed_for(*parts: object) -> int:
    """A 63-bit seed from any labels (stable across runs and Python versions, unlike hash())."""
    h = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def suite_fingerprint(suite: dict) -> str:
    return hashlib.sha256(json.dumps(suite, sort_keys=True).encode()).hexdigest()


def _pool(spec: dict, suite: dict) -> list[str]:
    if "words" in spec:  # set by generate_task to keep lookup test words out of training
        return spec["words"]
    words = suite["vocabularies"][spec["vocab"]] if "vocab" in spec else list(
        suite["lexicons"][spec["lexicon"]])
    sub = spec.get("subset")
    if sub is None:
        return list(words)
    # a fixed, task-specific subset (e.g. 0.7 of the family's vocabulary)
    r = random.Random(seed_for("subset", spec["name"]))
    k = max(4, round(sub * len(words)))
    return sorted(r.sample(list(words), k), key=list(words).index)


def _items(rng: random.Random, spec: dict, suite: dict, distinct: bool = True) -> list[str]:
    lo, hi = spec.get("n_items", [3, 5])
    n = rng.randint(lo, hi)
    pool = _pool(spec, suite)
    return rng.sample(pool, n) if distinct else [rng.choice(pool) for _ in range(n)]


def _join(items: list[str], spec: dict) -> str:
    return spec.get("sep", ", ").join(items)


def op_last(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), it[-1]


def op_second(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), it[1]


def op_reverse(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), _join(it[::-1], spec)


def op_tail(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), _join(it[1:], spec)


def op_duplicate(rng, spec, suite):
    it = _items(rng, spec, suite)
    d = rng.choice(it)
    it.insert(rng.randrange(len(it) + 1), d)
    return _join(it, spec), d


def op_after(rng, spec, suite):
    it = _items(rng, spec, suite)
    i = rng.randrange(len(it) - 1)
    return f"{_join(it, spec)}{spec.get('query_sep', ' ; ')}{it[i]}", it[i + 1]


def op_join(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), spec["joiner"].join(it)


def op_lookup(rng, spec, suite):
    lex = suite["lexicons"][spec["lexicon"]]
    w = rng.choice(_pool(spec, suite))
    return w, lex[w]


# --- operations used only for pre-training (generic skills and the format) ---------------------

def op_copy(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), _join(it, spec)


def op_first(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), it[0]


def op_count(rng, spec, suite):
    it = _items(rng, spec, suite)
    return _join(it, spec), str(len(it))


def op_contains(rng, spec, suite):
    it = _items(rng, spec, suite)
    pool = _pool(spec, suite)
    q = rng.choice(pool)
    return f"{_join(it, spec)}{spec.get('query_sep', ' ; ')}{q}", "yes" if q in it else "no"


OPS: dict[str, Callable] = {
    "last": op_last, "second": op_second, "reverse": op_reverse, "tail": op_tail,
    "duplicate": op_duplicate, "after": op_after, "join": op_join, "lookup": op_lookup,
    "copy": op_copy, "first": op_first, "count": op_count, "contains": op_contains,
}


def render(suite: dict, instruction: str, inp: str) -> str:
    return suite["prompt"].format(instruction=instruction, input=inp)


def task_specs(suite: dict) -> list[dict]:
    """Flattened task specs: family keys overridden by task keys, plus ``family``."""
    out, seen = [], set()
    for fam in suite["families"]:
        for t in fam["tasks"]:
            spec = {k: v for k, v in fam.items() if k not in ("tasks", "name")}
            spec.update(t)
            spec["family"] = fam["name"]
            if spec["name"] in seen:
                raise ValueError(f"duplicate task name {spec['name']!r}")
            if spec["op"] not in OPS:
                raise ValueError(f"task {spec['name']!r}: unknown op {spec['op']!r}")
            seen.add(spec["name"])
            out.append(spec)
    return out


def generate_task(suite: dict, spec: dict, splits: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """``{split: [{"input", "output": [answer]}, ...]}``; splits hold distinct inputs where the
    task has enough of them (test inputs never appear in train)."""
    splits = splits or suite["splits"]
    rng = random.Random(seed_for(suite["seed"], "task", spec["name"]))
    op = OPS[spec["op"]]
    specs = {k: spec for k in splits}
    if spec["op"] == "lookup":
        # a lookup task has few distinct inputs: hold out a fixed share of its words for test, so
        # test asks for facts the task's adapter never saw (it must have learnt the operation)
        pool = _pool(spec, suite)
        rng.shuffle(pool)
        k = max(1, round(spec.get("test_share", 0.3) * len(pool)))
        specs = {s: dict(spec, words=pool[:k] if s == "test" else pool[k:]) for s in splits}
    out: dict[str, list[dict]] = {}
    seen: set[str] = set()
    for split in ("test", "valid", "train"):  # test first, so its inputs are the distinct ones
        if split not in splits:
            continue
        n, rows, tries = splits[split], [], 0
        while len(rows) < n:
            tries += 1
            inp, ans = op(rng, specs[split], suite)
            if inp in seen and tries < 20 * n:  # few distinct inputs: allow repeats late
                continue
            seen.add(inp)
            rows.append({"input": render(suite, spec["instruction"], inp), "output": [ans]})
        out[split] = rows
    return {k: out[k] for k in splits}


def generate_pretrain(suite: dict, n: int) -> list[str]:
    """The base model's corpus: ``n`` lines, each a prompt + answer of a pre-training op or a fact
    sentence. The suite's task instructions never appear in it."""
    pt = suite["pretrain"]
    rng = random.Random(seed_for(suite["seed"], "pretrain"))
    facts = [(lex, tpl) for lex, tpls in pt["facts"].items() for tpl in tpls]
    lines = []
    for _ in range(n):
        if rng.random() < pt["fact_fraction"]:
            lex, tpl = rng.choice(facts)
            k, v = rng.choice(sorted(suite["lexicons"][lex].items()))
            lines.append(tpl.format(k=k, v=v))
            continue
        op = rng.choice(pt["ops"])
        spec = dict(op)
        if "lexicon" not in spec:
            spec["vocab"] = rng.choice(pt["vocabs"])
        spec["sep"] = rng.choice(pt["seps"])
        spec["name"] = "pretrain"
        inp, ans = OPS[spec["op"]](rng, spec, suite)
        lines.append(render(suite, rng.choice(op["instructions"]), inp) + " " + ans)
    return lines


def load_suite(name_or_path: str) -> dict:
    """``"default"`` (the shipped suite), a ``.json`` file, or a Python file/module defining
    ``SUITE``."""
    if name_or_path == "default":
        from loramix.minibank.default_suite import SUITE
        return SUITE
    if name_or_path.endswith(".json"):
        with open(name_or_path) as fh:
            return json.load(fh)
    import importlib
    import importlib.util
    if name_or_path.endswith(".py"):
        sp = importlib.util.spec_from_file_location("_loramix_suite", name_or_path)
        mod = importlib.util.module_from_spec(sp)
        sp.loader.exec_module(mod)
    else:
        mod = importlib.import_module(name_or_path)
    return mod.SUITE
