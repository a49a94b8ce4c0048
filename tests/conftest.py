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
