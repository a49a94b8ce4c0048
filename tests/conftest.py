"""Shared pytest fixtures. Area-specific helpers live in tests/_*.py modules."""
from __future__ import annotations

import numpy as np
import pytest

from loramix import _core

AVAILABLE_ISAS = list(_core.available_isas())


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
