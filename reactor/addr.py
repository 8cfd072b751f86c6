"""Addresses as users write them: ``HOST:PORT``, ``[v6]:PORT``, ``:PORT``."""

from __future__ import annotations

import errno
import socket

from reactor.errors import UsageError


def parse_address(text: str, *, what: str, allow_zero_port: bool = True) -> tuple[str, int]:
    """``"127.0.0.1:80"`` -> ("127.0.0.1", 80); ``":80"`` -> ("", 80) meaning all
    interfaces; ``"[::1]:80"`` -> ("::1", 80). Errors name ``what``."""
    if not isinstance(text, str) or not text:
        raise UsageError(f"{what}: expected HOST:PORT, got {text!r}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise UsageError(f"{what}: {text!r}: expected [IPV6]:PORT")
        host, port_s = text[1:end], text[end + 2:]
        try:
            socket.inet_pton(socket.AF_INET6, host.split("%")[0])
        except OSError:
            raise UsageError(f"{what}: {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep:
            raise UsageError(f"{what}: {text!r}: expected HOST:PORT (port missing)")
        if ":" in host:
            raise UsageError(f"{what}: {text!r}: put an IPv6 address in brackets, as [::1]:PORT")
    if host == "*":
        host = ""
    if not port_s.isdigit():
        raise UsageError(f"{what}: {text!r}: port {port_s!r} is not a number")
    port = int(port_s)
    lo = 0 if allow_zero_port else 1
    if not lo <= port <= 65535:
        raise UsageError(f"{what}: port {port} out of range")
    return host, port


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
