"""The installed version of loramix (``0.0.0+local`` when running from a source tree)."""
from importlib.metadata import PackageNotFoundError, version as _pkg_version

try:
    __version__ = _pkg_version("loramix")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+local"
