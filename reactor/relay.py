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
Once both ends are up, ``client.protocol.data_received`` *is* the backend
stream's bound ``write`` (and vice versa): a readable event costs one
``recv_into``, one ``send``, and no relay code in between. The relay only
runs for the rare events: connect, EOF, errors, watermarks, close.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from reactor.loop import EPOLLOUT
from reactor.stream import Stream

if TYPE_CHECKING:  # pragma: no cover
    from reactor.balancer import Backend
    from reactor.gateway import Gateway

log = logging.getLogger("reactor.relay")
access_log = logging.getLogger("reactor.access")

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


class _Side:
    """Protocol for one stream of the pair; calls go to the relay or straight
    to the peer stream (``data_received`` is rebound to ``peer.write``)."""

    __slots__ = ("relay", "is_client", "data_received")

    def __init__(self, relay: Relay, is_client: bool) -> None:
        self.relay = relay
        self.is_client = is_client
        self.data_received = relay._hold if is_client else relay._unexpected

    def eof_received(self) -> None:
        self.relay._eof(self.is_client)

    def eof_sent(self) -> None:
        self.relay._maybe_done()

    def pause_writing(self) -> None:
        # this side's outbound queue is full: stop reading the other side
        self.relay._other(self.is_client).pause_reading()

    def resume_writing(self) -> None:
        other = self.relay._other(self.is_client)
        if other is not None:
            other.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.relay._lost(self.is_client, exc)


class Relay:
    """One proxied connection: client stream, backend stream, and their state."""

    __slots__ = (
        "gateway", "loop", "client", "backend", "client_addr", "backend_info", "started",
        "reason", "closed", "pending", "tried", "connect_sock", "connect_timer", "_cside",
        "_bside", "_client_eof", "idle_mark", "idle_since", "proxy_parser", "proxy_timer",
        "local_addr", "ip_key",
    )

    def __init__(self, gateway: Gateway, sock: socket.socket, addr: tuple) -> None:
        self.gateway = gateway
        self.loop = gateway.loop
        self.client_addr = addr
        self.local_addr: tuple | None = None
        self.ip_key: str | None = None
        self.started = time.time()
        self.reason = ""
        self.closed = False
        self.pending: bytearray | None = None
        self.tried: set[Backend] = set()
        self.backend_info: Backend | None = None
        self.backend: Stream | None = None
        self.connect_sock: socket.socket | None = None
        self.connect_timer = None
        self.proxy_parser = None
        self.proxy_timer = None
        self._client_eof = False
        self.idle_mark = -1
        self.idle_since = self.loop.now
        self._cside = _Side(self, True)
        self._bside = _Side(self, False)
        self.client = Stream(self.loop, sock, self._cside, role="client",
                             high_water=gateway.buffer_limit)

    def __repr__(self) -> str:
        b = self.backend_info.name if self.backend_info else "-"
        return f"<Relay {_fmt(self.client_addr)} -> {b} client={self.client!r} backend={self.backend!r}>"

    # -- helpers ------------------------------------------------------------

    def _other(self, is_client: bool) -> Stream | None:
        return self.backend if is_client else self.client

    def _unexpected(self, view: memoryview) -> None:  # pragma: no cover - backend side starts bound
        self.client.write(view)

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

    # -- connecting -----------------------------------------------------------

    def start(self) -> None:
        """Pick a backend and connect (called by the gateway after accept)."""
        self.connect_next()

    def connect_next(self) -> None:
        gw = self.gateway
        backend = gw.balancer.pick(self.client_addr[0], self.loop.now, self.tried)
        if backend is None:
            self.finish("no_backend" if not self.tried else "connect_failed")
            return
        self.tried.add(backend)
        self.backend_info = backend
        backend.active += 1
        backend.total += 1
        try:
            sock = socket.socket(backend.family, socket.SOCK_STREAM)
            self.loop.syscalls["socket"] += 1
            sock.setblocking(False)
            self.loop.syscalls["ioctl"] += 1
            err = sock.connect_ex(backend.address)
            self.loop.syscalls["connect"] += 1
        except OSError as exc:  # EMFILE and friends: this backend is not at fault
            log.warning("event=connect_error backend=%s error=%s", backend.name, exc)
            backend.active -= 1
            self.finish("connect_failed")
            return
        if err and err not in _IN_PROGRESS:
            sock.close()
            self.loop.syscalls["close"] += 1
            self._connect_failed(backend, err)
            return
        self.connect_sock = sock
        self.loop.register(sock.fileno(), EPOLLOUT, self._on_connect_event)
        self.connect_timer = self.loop.call_later(gw.connect_timeout, self._connect_timeout)

    def _on_connect_event(self, _mask: int) -> None:
        sock = self.connect_sock
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.loop.syscalls["getsockopt"] += 1
        self.loop.cancel_timer(self.connect_timer)
        self.connect_timer = None
        if err:
            self._abandon_connect()
            self._connect_failed(self.backend_info, err)
            return
        self.connect_sock = None
        self._connected(sock)

    def _connect_timeout(self) -> None:
        self.connect_timer = None
        if self.connect_sock is None:
            return
        self._abandon_connect()
        self._connect_failed(self.backend_info, errno.ETIMEDOUT)

    def _abandon_connect(self) -> None:
        sock = self.connect_sock
        self.connect_sock = None
        if sock is not None:
            self.loop.unregister(sock.fileno())
            sock.close()
            self.loop.syscalls["close"] += 1

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
        self.loop.unregister(sock.fileno())
        b = Stream(self.loop, sock, self._bside, role="backend",
                   high_water=self.gateway.buffer_limit)
        self.backend = b
        client = self.client
        if backend.send_proxy:
            b.write(self.gateway.proxy_header(backend.send_proxy, self))
        if self.pending:
            b.write(self.pending)
            self.pending = None
        # the hot path: from now on a read on one side is a write on the other
        # (unless a PROXY-spoofing check still wants to see the first bytes)
        if self.proxy_parser is None:
            self._cside.data_received = b.write
        self._bside.data_received = client.write
        if self._client_eof:
            b.write_eof()
        elif not client.reading and not client.eof_received and b.buffered < self.gateway.buffer_limit:
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
        if self.proxy_timer is not None:
            self.loop.cancel_timer(self.proxy_timer)
            self.proxy_timer = None
        if header.src is not None:
            self.client_addr = header.src
            self.local_addr = header.dst
        if header.rest:
            self.pending = bytearray(header.rest)
        if not self.gateway.admit(self):
            return
        self.start()

    def expect_proxy(self) -> None:
        from reactor.proxyproto import ProxyHeaderParser

        self.proxy_parser = ProxyHeaderParser()
        self.proxy_timer = self.loop.call_later(self.gateway.proxy_timeout, self._proxy_timeout)

    def _proxy_timeout(self) -> None:
        self.proxy_timer = None
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
            if self.backend is not None:
                self.backend.write_eof()
        else:
            self.client.write_eof()
        self._maybe_done()

    def _maybe_done(self) -> None:
        c, b = self.client, self.backend
        if b is not None and c.eof_received and b.eof_received and c.eof_sent and b.eof_sent:
            self.finish(self.reason)

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
        if self.connect_timer is not None:
            self.loop.cancel_timer(self.connect_timer)
            self.connect_timer = None
        if self.proxy_timer is not None:
            self.loop.cancel_timer(self.proxy_timer)
            self.proxy_timer = None
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
        # break the cycles so the relay is freed by refcounting, not the GC
        self._cside.data_received = None
        self._bside.data_received = None
        self.gateway.relay_finished(self)

    def access_record(self) -> dict[str, Any]:
        b = self.backend_info
        return {
            "client": _fmt(self.client_addr),
            "backend": b.name if b is not None and (self.backend is not None or self.tried) else "-",
            "bytes_in": self.client.bytes_in,
            "bytes_out": self.client.bytes_out,
            "duration": round(time.time() - self.started, 6),
            "reason": self.reason,
        }


def _fmt(addr: Any) -> str:
    if not addr:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
