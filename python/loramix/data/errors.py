"""The one error of the data room (:mod:`loramix.data.readers` re-exports it)."""
from __future__ import annotations


class DatasetError(ValueError):
    """A dataset that cannot be read: the message names the file and the problem."""
