"""Bind failures as one-line messages. (Parsing ``HOST:PORT`` lives in ``config.parse_address``.)"""

from __future__ import annotations

import errno
import socket

from reactor.errors import UsageError


def bind_error(what: str, text: str, exc: OSError) -> UsageError:
    """A bind/listen failure as the one-line message users expect."""
    if isinstance(exc, socket.gaierror):
        return UsageError(f"{what} {text}: cannot resolve host ({exc.strerror})")
    reason = {
        errno.EADDRINUSE: "address already in use",
        errno.EACCES: "permission denied (ports below 1024 need privileges)",
        errno.EADDRNOTAVAIL: "address not available on this machine",
    }.get(exc.errno, exc.strerror or str(exc))
    return UsageError(f"{what} {text}: {reason}")
