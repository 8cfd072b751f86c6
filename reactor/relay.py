"""The buffer pair: one client stream coupled with one backend stream, both ways.

This is the seed's ``go io.Copy(server, client); go io.Copy(client, server)``
done in one loop, with what the sketch leaves out:

* **Backpressure.** Each direction's queue is bounded by ``buffer_limit``:
  when the backend's outbound queue passes it, we stop reading the client
  (and the other way round), so memory stays bounded whatever peers do.
* **Early data.** Bytes the client sends before the backend has connected
  are held (up to the limit; then the client is paused) and delivered first.
* **Half-close.** EOF from one side becomes ``shutdown(SHUT_WR)`` toward the
  other once its queue drains; when both directions are done both sockets
  close, once. An RST on one side aborts the other (RST, not a clean FIN, so
  the peer cannot mistake a broken stream for a complete one).
* **Retries.** A failed or timed-out connect is retried on another backend,
  up to ``retries`` times, before the client notices anything.

Close reasons (the access log's ``reason=``): ``client_eof`` and
``backend_eof`` (who finished first on a clean close), ``client_reset``,
``backend_reset``, ``connect_failed``, ``no_backend``, ``idle_timeout``,
``proxy_timeout``, ``proxy_error``, ``shutdown``.

Discussion: the hot path
------------------------
Once both ends are up, the client stream's ``peer`` *is* the backend
stream's bound ``write`` (and vice versa): a readable event costs one
``recv_into``, one ``send``, and no relay code in between. The relay only
runs for the rare events: connect, EOF, errors, watermarks, close. With
``splice = on|auto`` a bulk direction skips even that copy: reactor/splice.py.
"""

from __future__ import annotations

import _socket
import errno
import logging
import socket
import sys
from typing import TYPE_CHECKING, Any

from reactor.loop import EPOLLOUT
from reactor.splice import start_splice
from reactor.stream import _SHUT, Stream

if TYPE_CHECKING:  # pragma: no cover
    from reactor.balancer import Backend
    from reactor.gateway import Gateway

_intern = sys.intern

log = logging.getLogger("reactor.relay")

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)
_STREAM_NONBLOCK = socket.SOCK_STREAM | socket.SOCK_NONBLOCK


class _BackendSide:
    """The backend stream's protocol: the rare events go to the relay.
    (The data itself does not pass here: see "the hot path" above.)
    The relay itself is the client stream's protocol."""

    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, view: memoryview) -> None:  # pragma: no cover
        self.relay.client.write(view)  # the backend stream starts with peer = client

    def eof_received(self) -> None:
        self.relay._eof(False)

    def eof_sent(self) -> None:
        self.relay._maybe_done()

    def pause_writing(self) -> None:
        # the backend's outbound queue is full: stop reading the client
        self.relay.client.pause_reading()

    def resume_writing(self) -> None:
        self.relay.client.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.relay._lost(False, exc)


class Relay:
    """One proxied connection: client stream, backend stream, and their state."""

    __slots__ = (
        "gateway", "loop", "client", "backend", "client_ip", "client_port", "backend_info", "started",
        "reason", "closed", "pending", "tried", "connect_sock", "timer",
        "_client_eof", "idle_mark", "idle_since", "proxy_parser",
        "local_addr", "ip_key",
    )

    def __init__(self, gateway: Gateway, sock: socket.socket | int, addr: tuple) -> None:
        self.gateway = gateway
        self.loop = gateway.loop
        # host and port, not accept()'s tuple: 56 bytes less per relay; the
        # host interned, so the clients behind one address (a NAT, a test
        # rig) share one string instead of 58 bytes each
        self.client_ip: str = _intern(addr[0])
        self.client_port: int = addr[1]
        self.local_addr: tuple | None = None
        self.ip_key: str | None = None
        self.started = self.loop.now  # shared float: no allocation per relay
        self.reason = ""
        self.closed = False
        self.pending: bytearray | None = None
        self.tried: tuple[Backend, ...] = ()  # a set would cost 216 bytes per relay
        self.backend_info: Backend | None = None
        self.backend: Stream | None = None
        self.connect_sock: socket.socket | None = None
        self.timer = None
        self.proxy_parser = None
        self._client_eof = False
        self.idle_mark = -1
        self.idle_since = self.started
        # nodelay: the gateway's listeners set TCP_NODELAY, which accepted
        # sockets inherit (Listener(nodelay=True)); a socket object handed in
        # (tests, embedders) gets it set here
        # (by position: see Stream.__init__)
        self.client = gateway.stream_class(self.loop, sock, self, "client",
                                           gateway.buffer_limit, not isinstance(sock, int))

    def __repr__(self) -> str:
        b = self.backend_info.name if self.backend_info else "-"
        return f"<Relay {_fmt(self.client_addr)} -> {b} client={self.client!r} backend={self.backend!r}>"

    @property
    def client_addr(self) -> tuple[str, int]:
        """The client's address (from the PROXY header, when one was accepted)."""
        return (self.client_ip, self.client_port)

    # -- the client stream's protocol ---------------------------------------

    # (``data_received`` and ``eof_sent`` are aliases, below: a call less each)

    def eof_received(self) -> None:
        self._eof(True)

    def pause_writing(self) -> None:
        # the client's outbound queue is full: stop reading the backend
        if self.backend is not None:
            self.backend.pause_reading()

    def resume_writing(self) -> None:
        if self.backend is not None:
            self.backend.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost(True, exc)

    # -- helpers ------------------------------------------------------------

    def _hold(self, view: memoryview) -> None:
        """Client data before the backend is connected: keep it, within the limit."""
        if self.proxy_parser is not None:
            self._proxy_feed(view)
            return
        if self.pending is None:
            self.pending = bytearray(view)
        else:
            self.pending += view
        if len(self.pending) >= self.gateway.buffer_limit:
            self.client.pause_reading()

    # the client stream's data, only until the backend is connected: then
    # client.peer takes over
    data_received = _hold

    # -- connecting -----------------------------------------------------------

    def connect_next(self) -> None:
        """Pick a backend and connect: ``start`` (the gateway, after accept),
        and again after a failed attempt while retries remain."""
        gw = self.gateway
        backend = gw.balancer.pick(self.client_ip, self.loop.now, self.tried)
        if backend is None:
            self.finish("no_backend" if not self.tried else "connect_failed")
            return
        self.tried += (backend,)
        self.backend_info = backend
        backend.active += 1
        backend.total += 1
        try:
            # the C socket type, created non-blocking: no ioctl, and none of
            # socket.socket's Python-level __init__/close wrappers per connection
            sock = _socket.socket(backend.family, _STREAM_NONBLOCK)
            self.loop.syscalls.socket += 1
            err = sock.connect_ex(backend.address)
            self.loop.syscalls.connect += 1
        except OSError as exc:  # EMFILE and friends: this backend is not at fault
            log.warning("event=connect_error backend=%s error=%s", backend.name, exc)
            backend.active -= 1
            self.finish("connect_failed")
            return
        if err and err not in _IN_PROGRESS:
            sock.close()
            self.loop.syscalls.close += 1
            self._connect_failed(backend, err)
            return
        self.connect_sock = sock
        loop = self.loop
        # the relay is the connect's handler itself (``handle_event``): no
        # bound method and no wrapper object per connection
        loop.register(sock.fileno(), EPOLLOUT, self)
        self.timer = loop.call_at(loop.now + gw.connect_timeout, self._connect_timeout)

    start = connect_next

    def _on_connect_event(self, mask: int) -> None:
        sock = self.connect_sock
        if mask == EPOLLOUT:
            # writable and neither ERR nor HUP: the handshake completed (a
            # failed connect always sets ERR) -- no SO_ERROR round trip
            err = 0
        else:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.loop.syscalls.getsockopt += 1
        self.loop.cancel_timer(self.timer)
        self.timer = None
        if err:
            self._abandon_connect()
            self._connect_failed(self.backend_info, err)
            return
        self.connect_sock = None
        self._connected(sock)

    handle_event = _on_connect_event  # the loop calls the relay while it connects

    def _connect_timeout(self) -> None:
        self.timer = None
        if self.connect_sock is None:
            return
        self._abandon_connect()
        self._connect_failed(self.backend_info, errno.ETIMEDOUT)

    def _abandon_connect(self) -> None:
        sock = self.connect_sock
        self.connect_sock = None
        if sock is not None:
            self.loop.forget(sock.fileno())  # the close drops it from epoll
            sock.close()
            self.loop.syscalls.close += 1

    def _connect_failed(self, backend: Backend, err: int) -> None:
        gw = self.gateway
        backend.active -= 1
        backend.failures_total += 1
        gw.connect_failures += 1
        now = self.loop.now
        if backend.record_failure(now, gw.max_fails_for(backend), gw.fail_timeout_for(backend)):
            log.warning("event=backend_ejected backend=%s failures=%d for=%.1fs",
                        backend.name, backend.fails, gw.fail_timeout_for(backend))
        log.info("event=connect_failed client=%s backend=%s error=%s attempt=%d",
                 _fmt(self.client_addr), backend.name, errno.errorcode.get(err, err), len(self.tried))
        if self.closed:
            return
        if len(self.tried) > gw.retries:
            self.finish("connect_failed")
            return
        self.connect_next()

    def _connected(self, sock: socket.socket) -> None:
        backend = self.backend_info
        backend.record_success(self.loop.now)
        client = self.client
        # started on the connect's epoll entry, re-aimed (registered=True)
        b = self.gateway.stream_class(self.loop, sock, _BackendSide(self), "backend",
                                      self.gateway.buffer_limit, True, True, True)
        b.peer = client
        self.backend = b
        if backend.send_proxy:
            b.write(self.gateway.proxy_header(backend.send_proxy, self))
        if self.pending:
            b.write(self.pending)
            self.pending = None
        # the hot path: from now on a read on one side is a write on the other
        # (unless a PROXY-spoofing check still wants to see the first bytes)
        if self.proxy_parser is None:
            client.peer = b
        if self.gateway.splice == "on":
            # after the PROXY header and early data: they went out by write()
            start_splice(b)
            if self.proxy_parser is None:
                start_splice(client)
        if self._client_eof:
            b.write_eof()
        elif (not client._reading and not client._eof_received
              and b.buffered < self.gateway.buffer_limit):
            client.resume_reading()

    # -- PROXY protocol in ----------------------------------------------------

    def _proxy_feed(self, view: memoryview) -> None:
        from reactor.proxyproto import ProxyProtocolError

        try:
            header = self.proxy_parser.feed(view)
        except ProxyProtocolError as exc:
            self.gateway.proxy_rejected += 1
            log.info("event=proxy_rejected client=%s error=%s", _fmt(self.client_addr), exc)
            self.finish("proxy_error")
            return
        if header is None:
            return
        self.proxy_parser = None
        if self.timer is not None:
            self.loop.cancel_timer(self.timer)
            self.timer = None
        if header.src is not None:
            self.client_ip, self.client_port = header.src[0], header.src[1]
            self.local_addr = header.dst
        if header.rest:
            self.pending = bytearray(header.rest)
        if not self.gateway.admit(self):
            return
        self.start()

    def expect_proxy(self) -> None:
        from reactor.proxyproto import ProxyHeaderParser

        self.proxy_parser = ProxyHeaderParser()
        self.timer = self.loop.call_later(self.gateway.proxy_timeout, self._proxy_timeout)

    def _proxy_timeout(self) -> None:
        self.timer = None
        if self.proxy_parser is not None and not self.closed:
            self.gateway.proxy_rejected += 1
            self.finish("proxy_timeout")

    # -- events -------------------------------------------------------------

    def _eof(self, from_client: bool) -> None:
        if not self.reason:
            self.reason = "client_eof" if from_client else "backend_eof"
        if from_client:
            self._client_eof = True
            if self.proxy_parser is not None:
                if not getattr(self.proxy_parser, "eof_ok", False):
                    self.finish("proxy_error")
                    return
                self.proxy_parser = None  # an untrusted client's EOF before any byte: no header to check
            src, dst = self.client, self.backend
        else:
            src, dst = self.backend, self.client
        if dst is None:
            return
        # The streams' slots, not their properties (``eof_received``,
        # ``eof_sent``): each property read is a Python call, and the end of a
        # relay made a dozen of them (~8,000 instructions per connection).
        if dst._eof_received and src._wbuf is _SHUT and not src._closed and not dst.buffered:
            # the last direction ends and nothing is queued: close() sends
            # the FIN a shutdown() would (the receive queue is empty after
            # EOF, so no RST) -- one syscall fewer per connection
            self.finish(self.reason)
            return
        dst.write_eof()
        self._maybe_done()

    def _maybe_done(self) -> None:
        c, b = self.client, self.backend
        if (b is not None and c._eof_received and b._eof_received
                and c._wbuf is _SHUT and b._wbuf is _SHUT and not c._closed and not b._closed):
            self.finish(self.reason)

    eof_sent = _maybe_done  # the client stream's protocol: our FIN went out

    def _lost(self, from_client: bool, exc: BaseException | None) -> None:
        reason = "client_reset" if from_client else "backend_reset"
        self.finish(reason if not self.reason else self.reason + "," + reason, abort=True)

    def idle_check(self, now: float, idle_timeout: float) -> bool:
        """Called by the gateway's sweep; no per-byte bookkeeping is needed:
        the streams' byte counters tell whether anything moved since last time."""
        mark = self.client.bytes_in + self.client.bytes_out
        if mark != self.idle_mark:
            self.idle_mark = mark
            self.idle_since = now
            return False
        if now - self.idle_since >= idle_timeout:
            self.finish("idle_timeout")
            return True
        return False

    # -- the end -------------------------------------------------------------

    def finish(self, reason: str, abort: bool = False) -> None:
        """Close both sides, exactly once; log one access line."""
        if self.closed:
            return
        self.closed = True
        if reason:
            self.reason = reason
        if self.timer is not None:
            self.loop.cancel_timer(self.timer)
            self.timer = None
        if self.connect_sock is not None:
            self._abandon_connect()
            self.backend_info.active -= 1
        self.client.close(abort=abort)
        if self.backend is not None:
            self.backend.close(abort=abort)
            self.backend_info.active -= 1
            self.backend_info.bytes_in += self.backend.bytes_out
            self.backend_info.bytes_out += self.backend.bytes_in
        self.pending = None
        self.gateway.relay_finished(self)
        self.client.detach()
        if self.backend is not None:
            self.backend.detach()

    def log_access(self, access: Any) -> None:
        """This connection's access line: its fields straight from the relay,
        no dict of them and no ``round`` (a float to decimal and back) -- the
        line was a sixth of a churned connection's Python (callgrind)."""
        b = self.backend_info
        ip = self.client_ip
        c = self.client
        access.access(f"[{ip}]:{self.client_port}" if ":" in ip else f"{ip}:{self.client_port}",
                      b.name if b is not None and (self.backend is not None or self.tried) else "-",
                      c.bytes_in, c.bytes_out, self.loop.now - self.started, self.reason)


def _fmt(addr: Any) -> str:
    if not addr:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
