"""Shared pytest fixtures. Area-specific helpers live in tests/_*.py modules."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from loramix import _core

AVAILABLE_ISAS = list(_core.available_isas())

# the benchmark harness lives outside the library (benches/loramix_bench); its input generator is tested
BENCHES = Path(__file__).resolve().parents[1] / "benches"
if str(BENCHES) not in sys.path:
    sys.path.insert(0, str(BENCHES))


@pytest.fixture(params=AVAILABLE_ISAS)
def isa(request):
    """Runs the test once per ISA this CPU/OS supports, restoring the active one after."""
    before = _core.active_isa()
    _core.set_active_isa(request.param)
    try:
        yield request.param
    finally:
        _core.set_active_isa(before)


@pytest.fixture
def rng():
    return np.random.default_rng(20250701)


@pytest.fixture(scope="session")
def w(tmp_path_factory):
    """The tiny world (tests/_tiny.py): tokenizer, a random 2-layer Mistral, real PEFT LoRAs with
    datasets, and a bank built from them — built once per session and shared (read-only)."""
    import _tiny

    return _tiny.world(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_minibank(tmp_path_factory):
    """The mini bank's ``tiny`` scale (a few tasks, a trained tiny Mistral and its LoRAs), built
    once per session; tests read it and never write into it (indexes go to their caches)."""
    from loramix.minibank.build import build

    root = tmp_path_factory.mktemp("mb") / "tiny"
    build("default", root, scale="tiny")
    return root


@pytest.fixture
def bank_copy(w, tmp_path):
    """A private copy of the tiny world's bank, free to break."""
    import shutil

    d = tmp_path / "bank"
    shutil.copytree(w.bank, d)
    return d
