"""The production module loramix._core carries no test hooks; they live in loramix._core_testing
(built with LORAMIX_TESTING=ON, which pip builds turn on: see docs/DEVELOPING.md)."""
from __future__ import annotations

from loramix import _core


def test_core_has_no_private_hooks():
    hooks = [n for n in dir(_core) if n.startswith("_") and not n.startswith("__")]
    assert hooks == [], f"test hooks in the production module: {hooks}"


def test_testing_module_is_built():
    from loramix import _core_testing  # missing means the build lacked -DLORAMIX_TESTING=ON

    assert {"divergence_log", "divergence_log_abs", "divergence_js_row", "divergence_check_row", "parse_safetensors_bytes",
            "scalar_f32_to_bf16", "scalar_f32_to_f16"} <= set(dir(_core_testing))
    assert _core_testing.__name__ == "loramix._core_testing"
