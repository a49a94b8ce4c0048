"""Reaching a Dask scheduler: the address checked before any work, the connection bounded in time.

``dask.distributed.Client("not a url")`` raises only after it has started a client that then
hangs for twice its timeout while being collected, and an unreachable scheduler takes the Dask
default (30 s) to fail; both print tracebacks. :func:`check_scheduler_address` refuses a
malformed address at once with one line; :func:`connect` gives up after ``timeout`` seconds
(:data:`DEFAULT_CONNECT_TIMEOUT` by default) with one line naming the address.
"""
from __future__ import annotations

import re

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "SchedulerError", "check_scheduler_address", "connect"]

#: seconds to wait for a scheduler to answer (``loramix generate --connect-timeout``)
DEFAULT_CONNECT_TIMEOUT = 10.0
_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
_HOSTPORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


class SchedulerError(RuntimeError):
    """A Dask scheduler that cannot be used: a malformed address or no answer in time."""


def check_scheduler_address(address: str) -> str:
    """``address`` itself when it has the form ``[tcp|tls|ws|wss|ucx]://HOST:PORT`` (scheme
    optional, ``tcp`` then) or ``inproc://...``; else :class:`SchedulerError`."""
    if not isinstance(address, str) or not address.strip():
        raise SchedulerError(f"scheduler address {address!r}: expected tcp://HOST:PORT")
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme == "inproc" and rest:
        return address
    m = _HOSTPORT.match(rest)
    if scheme not in _SCHEMES or m is None or not 0 < int(m.group(1)) < 65536:
        raise SchedulerError(f"scheduler address {address!r}: expected tcp://HOST:PORT "
                             f"(scheme one of {', '.join(_SCHEMES)}, a port 1-65535)")
    return address


def connect(address: str, timeout: float | None = None):
    """A ``dask.distributed.Client`` on ``address``, or :class:`SchedulerError` after ``timeout``
    seconds without an answer."""
    check_scheduler_address(address)
    timeout = DEFAULT_CONNECT_TIMEOUT if timeout is None else float(timeout)
    if not timeout > 0:
        raise SchedulerError(f"connect timeout must be > 0 seconds, got {timeout}")
    try:
        from dask.distributed import Client
    except ImportError:
        raise SchedulerError("a Dask scheduler was given but dask.distributed is not installed; "
                             "pip install 'loramix[dask]'") from None
    try:
        return Client(address, set_as_default=False, timeout=timeout)
    except (OSError, TimeoutError) as e:
        raise SchedulerError(f"scheduler {address}: no answer within {timeout:g} s "
                             f"({' '.join(str(e).split())[:160]}); is it running and reachable?") from None
