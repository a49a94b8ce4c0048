"""release_pages: mapped tensors dropped from the process after a read still read correctly."""
from __future__ import annotations

import numpy as np
import pytest

from loramix import _core
from loramix.core import tensors


def test_released_tensors_read_the_same_and_mix_the_same(tmp_path, rng):
    shapes = {"a": (3, 1000), "b": (5000,), "c": (7, 3)}     # edges off page boundaries
    data = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    p = tmp_path / "t.safetensors"
    with tensors.SafetensorsWriter(p, [(k, "F32", s) for k, s in shapes.items()]) as w:
        for k, v in data.items():
            w.write(k, v)
    f = tensors.SafetensorsFile(p)
    refs = [f.tensor(k) for k in shapes]
    views = [r.numpy() for r in refs]
    before = tensors.weighted_sum([f.tensor("a")] * 2, [0.5, 0.25])
    tensors.release_pages(refs + [np.zeros(3, np.float32), None])   # non-refs are ignored
    for k, v in zip(shapes, views):
        np.testing.assert_array_equal(v, data[k])                    # views map the pages again
        np.testing.assert_array_equal(f.numpy(k), data[k])
    after = tensors.weighted_sum([f.tensor("a")] * 2, [0.5, 0.25])
    assert after.tobytes() == before.tobytes()
    tensors.release_pages([])


def test_core_release_pages_names_a_wrong_argument():
    with pytest.raises(TypeError, match="release_pages: expected TensorRef objects, got int"):
        _core.release_pages([1])
