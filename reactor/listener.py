"""A non-blocking listening socket that accepts in bounded batches.

Like asyncio's ``_accept_connection``, one readiness event accepts up to
``batch`` connections (or until EAGAIN), so a burst of connects costs one
epoll_wait, not one per client, while one busy listener cannot starve the
relays already running.

Discussion: EMFILE
------------------
When the process is out of fds, ``accept`` fails with EMFILE while the
connection stays in the kernel's accept queue. The listening socket therefore
stays readable, and a level-triggered loop would spin at 100% CPU retrying.
We stop watching the listener for a back-off (10 ms doubling to 1 s), log
once per episode, and resume; established relays are untouched and new
clients wait in the backlog rather than being dropped. (nginx does the same
with ``accept_mutex_delay``-style disabling; the "reserve fd" trick of
closing a spare fd to accept-and-close would instead refuse them.)
"""

from __future__ import annotations

import _socket
import errno
import fcntl
import logging
import os
import socket
import termios
from collections.abc import Callable

from reactor.loop import EPOLLIN, Loop

log = logging.getLogger("reactor.listener")

_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# Errors about one connection that died in the queue: skip it, keep accepting.
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
              errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
              errno.EOPNOTSUPP, errno.ENETUNREACH}

_ioctl = fcntl.ioctl
_FIONBIO = termios.FIONBIO
# FIONBIO takes a pointer to an int: 1 = non-blocking. A *bytearray*:
# fcntl.ioctl tries its argument as a writable buffer first, and a bytes
# object fails that parse -- an error message formatted and thrown away per
# accepted connection (340 ns of the call's 760, timeit).
_ON = bytearray(b"\1\0\0\0")
_close = os.close

BACKOFF_MIN = 0.01
BACKOFF_MAX = 1.0


def bind_socket(host: str, port: int, *, backlog: int = 511, reuseport: bool = False) -> socket.socket:
    """Create, bind and listen. ``host == ""`` means every interface (dual-stack).

    Raises OSError from bind/listen; the caller turns it into a usage error.
    """
    if host in ("", "*"):
        family, addr = _all_interfaces(port)
    else:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("", "*"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _all_interfaces(port: int) -> tuple[int, tuple]:
    # Go's net.Listen("tcp", ":8080") listens dual-stack on [::]; do the same
    # when the host has IPv6, else fall back to 0.0.0.0.
    if socket.has_ipv6:
        try:
            probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            probe.close()
            return socket.AF_INET6, ("::", port)
        except OSError:
            pass
    return socket.AF_INET, ("0.0.0.0", port)


def format_address(addr: tuple) -> str:
    """('::1', 80, 0, 0) -> '[::1]:80'; ('1.2.3.4', 80) -> '1.2.3.4:80'."""
    host, port = addr[0], addr[1]
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class Listener:
    """Accepts connections and hands each ``(sock, addr)`` to ``on_accept``."""

    def __init__(self, loop: Loop, sock: socket.socket,
                 on_accept: Callable[[socket.socket | int, tuple], None], *, batch: int = 64,
                 bare: bool = False, nodelay: bool = False) -> None:
        """``bare``: hand ``on_accept`` the accepted connection's fd, already
        non-blocking, instead of a socket object (see ``Stream.sock``: the
        object costs a hidden ``getsockname``). ``nodelay``: set TCP_NODELAY
        on the listening socket, which accepted sockets inherit on Linux --
        one setsockopt per listener instead of one per connection."""
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.on_accept = on_accept
        self.batch = batch
        self.bare = bare
        self.address = sock.getsockname()
        self.nodelay = False
        if nodelay and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop.syscalls.setsockopt += 1
            self.nodelay = True
        self.accepted = 0
        self.exhausted_episodes = 0
        self._family = sock.family
        self._backoff = BACKOFF_MIN
        self._paused = False
        self._resume_handle = None
        self._closed = False
        loop.register(self.fd, EPOLLIN, self._on_event)

    @property
    def name(self) -> str:
        return format_address(self.address)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("paused" if self._paused else "polling")
        return f"<Listener {self.name} fd={self.fd} accept={state} accepted={self.accepted}>"

    def _on_event(self, _mask: int) -> None:
        accept = self.sock._accept  # raw (fd, addr): no socket object until we want one
        sc = self.loop.syscalls
        family = self._family
        on_accept = self.on_accept
        bare = self.bare
        for _ in range(self.batch):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                sc.accept += 1
                break
            except OSError as exc:
                sc.accept += 1
                if exc.errno in _EXHAUSTED:
                    self._exhausted(exc)
                    return
                if exc.errno in _TRANSIENT:
                    continue
                self._exhausted(exc)  # unknown: back off rather than spin
                return
            sc.accept += 1
            # accept4 gets no SOCK_NONBLOCK from CPython (only CLOEXEC): one
            # ioctl(FIONBIO) either way, the one setblocking(False) makes
            if bare:
                try:
                    _ioctl(fd, _FIONBIO, _ON)
                except OSError:
                    sc.ioctl += 1
                    _close(fd)
                    sc.close += 1
                    continue
                sc.ioctl += 1
                conn = fd
            else:
                # The C socket type (no Python-level wrapper to build and tear
                # down); family/type/proto given skip CPython's getsockopt
                # probes, but not the getsockname that validates the fd.
                conn = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
                sc.getsockname += 1
                conn.setblocking(False)
                sc.ioctl += 1
            self.accepted += 1
            self._backoff = BACKOFF_MIN
            try:
                on_accept(conn, addr)
            except Exception:
                log.exception("event=accept_handler_error client=%s", addr)
                self.loop.forget(fd)  # a handler it registered must not outlive the fd
                if bare:
                    _close(fd)
                else:
                    conn.close()
                sc.close += 1

    def _exhausted(self, exc: OSError) -> None:
        if not self._paused:
            if self._backoff == BACKOFF_MIN:
                self.exhausted_episodes += 1
                log.warning("event=accept_paused listener=%s error=%s backoff=%.3fs",
                            self.name, errno.errorcode.get(exc.errno, exc.errno), self._backoff)
            self._paused = True
            self.loop.modify(self.fd, 0)
            self._resume_handle = self.loop.call_later(self._backoff, self._resume)
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _resume(self) -> None:
        self._resume_handle = None
        if self._closed:
            return
        self._paused = False
        self.loop.modify(self.fd, EPOLLIN)

    def close(self) -> None:
        """Stop accepting and release the port at once (drain needs that)."""
        if self._closed:
            return
        self._closed = True
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        self.loop.unregister(self.fd)
        self.sock.close()
        self.loop.syscalls.close += 1
