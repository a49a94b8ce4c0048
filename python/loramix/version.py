"""The installed version of loramix (``0.0.0+local`` when running from a source tree).

Looked up on first use (:func:`version`, or the ``__version__`` attribute here and on
:mod:`loramix`): ``importlib.metadata`` is ~15 ms of a fresh process's start, and a command
needs the version only when it writes an output (``generate`` looks it up in the background
while it profiles the datasets) or prints it.
"""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as _pkg_version

    try:
        return _pkg_version("loramix")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+local"


def __getattr__(name: str):
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
