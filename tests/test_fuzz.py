"""A short, deterministic fuzz run of every parser of user files (the harness: tests/_fuzz.py).

``derandomize=True``: the same examples every run (a failure here is reproducible as is); the
long, random run is ``python tools/fuzz.py`` (docs/SECURITY-FUZZING.md). Each test also keeps
count of accepted and refused inputs, so a strategy that no longer reaches the parser (everything
refused at the first check, or everything accepted) fails instead of passing vacuously.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import Counter

# hypothesis caches (character tables, constants) go to the temp folder, not into the checkout
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "loramix-hypothesis"))

import pytest
from hypothesis import HealthCheck, example, given, settings

import _fuzz
import _tiny

# no example database: a derandomized run needs none, and nothing is written into the checkout
settings.register_profile("loramix-fuzz", database=None)
settings.load_profile("loramix-fuzz")
# Note: hypothesis also draws literal constants from the modules under test, so the examples of a
# derandomized run change when the library's source does; the floors below leave a wide margin.
RUN = settings(derandomize=True, deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_safetensors_reader(scratch):
    seen = Counter()

    @settings(RUN, max_examples=300)
    @given(_fuzz.safetensors_bytes())
    def run(data):
        seen[_fuzz.check_safetensors(data, scratch)] += 1

    run()
    assert seen["refused"] > 50 and seen["accepted"] > 0, seen
    assert _fuzz.check_safetensors(_fuzz.valid_safetensors(), scratch) == "accepted"


def test_bank_json(tmp_path_factory, scratch):
    w = _tiny.world(tmp_path_factory)
    bank = _fuzz.copy_bank(w.bank, scratch / "bank")
    doc = json.loads((bank / "bank.json").read_text())
    seen = Counter()

    @settings(RUN, max_examples=100)
    @given(_fuzz.bank_json_input(doc))
    def run(data):
        seen[_fuzz.check_bank_json(data, bank, scratch)] += 1

    run()
    assert seen["refused"] > 20 and seen["accepted"] > 5, seen


def test_adapter_config(tmp_path_factory, scratch):
    w = _tiny.world(tmp_path_factory)
    member = _fuzz.copy_bank(w.members["m2"], scratch / "m2")
    base = json.loads((member / "adapter_config.json").read_text())
    seen = Counter()

    @settings(RUN, max_examples=300)
    @given(_fuzz.config_input(base))
    def run(cfg):
        seen[_fuzz.check_adapter_config(cfg, member)] += 1

    run()
    assert seen["refused"] > 20 and seen["accepted"] > 5, seen


def _valid_parquet() -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"input": ["hi"], "output": ["there"]}), buf)
    return buf.getvalue()


def test_dataset_readers(scratch):
    seen = Counter()

    # one valid and one broken file per format always run too: which generated examples are
    # drawn depends on hypothesis's constant pool (taken from the source tree), so the
    # accepted/refused count below must not hinge on them alone
    @settings(RUN, max_examples=300)
    @given(_fuzz.dataset_file())
    @example((".jsonl", b'{"input": "hi", "output": ["there"]}\n'))
    @example((".jsonl", b"{not json"))
    @example((".json", b'[{"input": "hi", "output": "there"}]'))
    @example((".json", b'{"other": 1}'))
    @example((".csv", b"input,output\nhi,there\n"))
    @example((".csv", b"x\n1\n"))
    @example((".parquet", _valid_parquet()))
    @example((".parquet", b"PAR1 not parquet"))
    def run(item):
        seen[(item[0], _fuzz.check_dataset(item, scratch))] += 1

    run()
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        assert seen[(suffix, "refused")] > 0 and seen[(suffix, "accepted")] > 0, seen


def test_long_json_lines(scratch):
    """The streaming JSON-line parser against ``json.loads`` (tests/_fuzz.py ``json_line``)."""
    seen = Counter()

    @settings(RUN, max_examples=300)
    @given(_fuzz.json_line())
    @example((b'{"input": "a\\u00e9\\ud83d\\ude00\\"\\\\", "output": ["x"]}\n', 1, 0))
    @example((b'{"input": "a", "output": "b"} x\n', 2, 1))
    def run(item):
        seen[_fuzz.check_json_line(item, scratch)] += 1

    run()
    assert seen["refused"] > 20 and seen["accepted"] > 100, seen


def test_long_csv_records(scratch):
    """The CSV reader, its long-record path forced, against the csv module (tests/_fuzz.py
    ``csv_document``)."""
    seen = Counter()

    @settings(RUN, max_examples=400)
    @given(_fuzz.csv_document())
    @example((b'input,output\r\n"a,""b""\r\nc",d\n"e"f,g"h"\r', 1, 1, 0))
    @example((b'input\n"\xff"\n', 1, 2, 1))
    @example((b'\xef\xbb\xbfinput\r\n,,0,"""\xc2"\x80"\r\n', 1, 1, 0))   # no UTF-8 across a closing quote
    @example((b'\xef\xbb', 1, 1, 0))        # utf-8-sig reads a part of a byte-order mark as nothing
    def run(item):
        seen[_fuzz.check_csv_document(item, scratch)] += 1

    run()
    assert seen["refused"] > 10 and seen["accepted"] > 200, seen


def test_json_documents(scratch):
    """The streaming reader of .json documents against json.loads (tests/_fuzz.py ``json_document``)."""
    seen = Counter()

    @settings(RUN, max_examples=300)
    @given(_fuzz.json_document())
    @example((b'{"data": [{"input": "a\\u00e9", "output": ["x"]}], "Instances": [1], "Instances": 2}', 1, 1, 0))
    @example((b'\r\n[{"input": "a", "output": 1.5}\r\n,{"input": "b", "output": -Infinity}]', 7, 2, 1))
    def run(item):
        seen[_fuzz.check_json_document(item, scratch)] += 1

    run()
    assert seen["refused"] > 20 and seen["accepted"] > 50, seen
