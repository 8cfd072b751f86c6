"""One non-blocking socket: read into a shared buffer, write now or queue the tail.

A ``Stream`` calls its *protocol* (any object with the methods below) as
asyncio's selector transports do:

    protocol.data_received(view)   a memoryview into the loop's shared receive
                                   buffer, valid only during the call: consume
                                   or copy it before returning
    protocol.eof_received()        the peer sent FIN (we stop reading)
    protocol.connection_lost(exc)  a fatal error (RST, EPIPE…); the stream is
                                   already closed when this runs
    protocol.pause_writing()       our outbound queue passed the high watermark
    protocol.resume_writing()      …and drained to the low watermark

The data path is deliberately short: one read per readiness event (never a
second, speculative one that would return EAGAIN), and ``write`` tries the
send at once, queueing only the unsent tail and asking epoll for
*writable* only while a tail exists.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Any

from reactor.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop

log = logging.getLogger("reactor.stream")

RECV_SIZE = 65536
# A relayed read this big calls ``_big_read``: two in a row make a bulk flow
# that ``splice = auto`` moves to splice(2) (HAProxy's splice-auto, in spirit).
BIG_READ = 16384
DEFAULT_HIGH_WATER = 256 * 1024

_TCP_NODELAY = socket.TCP_NODELAY
_SHUT_WR = socket.SHUT_WR
_IPPROTO_TCP = socket.IPPROTO_TCP

# The data path's two syscalls.
#
# Discussion: which call for which side
# -------------------------------------
# ``os.write`` takes its arguments by METH_FASTCALL, where ``socket.send``
# builds an argument tuple and parses a format string on every call: callgrind
# counts 492 instructions fewer per write, and in the kernel write() costs
# what sendto() does (perf, pingpong 50: VFS layer 2.7% of the proxy's CPU vs
# sendto's 2.2%). So every send is a ``write``.
#
# Reading is the other way round. ``os.readv`` saves only 207 instructions
# over ``recv_into`` but pays the VFS layer's readv path -- iovec import,
# rw_verify_area, fdget_pos: perf put readv at 4.4% of the proxy's CPU
# beyond the TCP work, recvfrom at 1.9%, a net loss of ~0.1 us per read. So a
# stream with a socket object (every backend: we create those) reads with
# ``recv_into``; only a stream built from a bare fd (an accepted client, see
# ``sock``) uses ``readv``, because a socket object for it would cost a
# ``getsockname`` per connection.
_readv = os.readv
_write = os.write


SMALL_VIEWS = 1025  # views cached for reads of 0..1024 bytes
WHOLE = SMALL_VIEWS  # views[WHOLE]: the whole shared buffer (recv_into, slicing)
IOVEC = SMALL_VIEWS + 1  # views[IOVEC]: [the whole buffer], the list os.readv fills


def shared_views(loop: Loop) -> list[Any]:
    """The loop's one receive buffer, as the views a stream needs, in one list
    it holds in one slot: ``views[n] == buffer[:n]`` for n < SMALL_VIEWS, then
    ``views[WHOLE]`` (the buffer) and ``views[IOVEC]`` (``[buffer]``).

    Discussion: one buffer for every stream
    ---------------------------------------
    A relay consumes what it reads before the handler returns (it sends it
    on, or copies the unsent tail into the peer's queue), so one buffer
    serves every connection. Per-connection memory then holds only data the
    kernel would not take -- the lever that keeps an idle connection well
    under a kilobyte of Python state.

    Discussion: cached views
    ------------------------
    The relay hands the peer's ``write`` exactly the bytes it read, a slice
    of that buffer. Slicing a memoryview makes two objects (a slice and the
    view) and releases them after the write: ~350 instructions of a forwarded
    message's ~7,200 (callgrind). A game's messages are small, so the views of
    the first KiB are made once per loop (1,025 views, ~190 KB) and reused;
    larger reads slice as before. A cached view is only ever passed to
    ``os.write`` or copied (a queued tail), never handed to a protocol, which
    might keep or release it.
    """
    views = getattr(loop, "_views", None)
    if views is None:
        buf = memoryview(bytearray(RECV_SIZE))
        views = [buf[:n] for n in range(SMALL_VIEWS)]
        views.append(buf)
        views.append([buf])
        loop._views = views  # type: ignore[attr-defined]
    return views


class _Shut:
    """Sentinel for ``Stream._wbuf``: nothing may be written any more."""

    __slots__ = ()

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<shut>"


_SHUT = _Shut()


class _Detached:
    """The protocol of a stream whose owner let go of it (see ``detach``)."""

    __slots__ = ()

    def _ignore(self, *args: object) -> None:
        pass

    data_received = eof_received = eof_sent = pause_writing = resume_writing = _ignore
    connection_lost = _ignore


_DETACHED = _Detached()


class Stream:
    """A connected, non-blocking TCP (or UNIX) socket driven by the loop.

    Discussion: one test on the write path
    --------------------------------------
    ``_wbuf`` carries three states in one slot, so ``write`` decides with a
    single ``is None`` test: ``None`` (nothing queued: send now), a
    ``bytearray`` (a tail is queued: append behind it), or ``_SHUT`` (EOF
    sent or stream closed: drop). Likewise a relay sets ``peer``: what is
    read is written straight to the peer stream, with no protocol call between.
    """

    __slots__ = (
        "loop", "_fd", "_sock", "protocol", "peer", "role", "_mask", "_wbuf", "_reading",
        "_eof_pending", "_eof_received", "_closed", "_paused_peer", "_high",
        "_parked", "_views", "_sc", "bytes_in", "bytes_out",
    )

    def __init__(self, loop: Loop, sock: socket.socket | int, protocol: Any = None,
                 role: str = "client", high_water: int = DEFAULT_HIGH_WATER,
                 nodelay: bool = True, start: bool = True, registered: bool = False) -> None:
        """``sock``: a socket object, or the bare fd of a connected, non-blocking
        socket (the gateway's accepted connections: see ``sock``). ``start``
        and ``registered``: as ``start()`` (which this inlines).

        The options may be given by position: a relay does, twice per
        connection, because calling a class with keywords builds a dict of
        them for ``__init__`` (~1,600 instructions per connection, callgrind)."""
        self.loop = loop
        if isinstance(sock, int):
            self._fd = sock
            self._sock: socket.socket | None = None
        else:
            self._fd = sock.fileno()
            self._sock = sock
        self.protocol = protocol
        self.peer: Stream | None = None
        self.role = role
        self._mask = 0
        self._wbuf: bytearray | _Shut | None = None
        self._reading = False
        self._eof_pending = False
        self._eof_received = False
        self._closed = False
        self._paused_peer = False
        self._parked = False
        self._high = high_water
        self._views = getattr(loop, "_views", None) or shared_views(loop)
        self._sc = loop.syscalls
        self.bytes_in = 0
        self.bytes_out = 0
        if nodelay:
            s = self._sock or self.sock
            if s.family != socket.AF_UNIX:
                try:
                    s.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
                    self._sc.setsockopt += 1
                except OSError:
                    pass
        if start:  # start(), inlined: a call less per stream
            self._reading = True
            self._mask = EPOLLIN
            if registered:
                loop.set_handler(self._fd, EPOLLIN, self)
            else:
                loop.register(self._fd, EPOLLIN, self)

    # -- setup -------------------------------------------------------------

    def start(self, protocol: Any, *, registered: bool = False) -> None:
        """Begin reading and delivering to ``protocol`` (``registered``: the fd
        is in epoll already, e.g. from a connect -- re-aim it, one epoll_ctl)."""
        self.protocol = protocol
        self._reading = True
        self._mask = EPOLLIN
        # The stream itself is the loop's handler (``handle_event``): a bound
        # method per fd would cost 64 bytes per idle connection.
        if registered:
            self.loop.set_handler(self._fd, EPOLLIN, self)
        else:
            self.loop.register(self._fd, EPOLLIN, self)

    # -- state -------------------------------------------------------------

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def sock(self) -> socket.socket:
        """The socket object, made on first use for a stream built from a bare fd.

        Discussion: why accepted connections start as bare fds
        -------------------------------------------------------
        Wrapping an fd in a socket object costs a syscall CPython does not
        show: ``socket(fileno=fd)`` validates the fd with ``getsockname`` --
        one of a churned connection's 20 syscalls, missing from our own
        counters until strace showed it -- and 64 bytes per connection. The
        data path needs only the fd (``os.readv``/``os.write``); the rare
        control operations (``shutdown``, ``SO_LINGER``, ``SO_ERROR``, the
        admin's getsockopt) make the object here, once, paying that
        ``getsockname`` then. From then on the object owns the fd: ``close``
        closes through it, so the fd is closed exactly once.
        """
        s = self._sock
        if s is None:
            s = self._sock = socket.socket(fileno=self._fd)
            self._sc.getsockname += 1
        return s

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buffered(self) -> int:
        """Bytes queued for the kernel, not yet sent."""
        return len(self._wbuf) if self._wbuf is not None else 0

    @property
    def reading(self) -> bool:
        return self._reading

    @property
    def eof_sent(self) -> bool:
        return self._wbuf is _SHUT and not self._closed

    @property
    def eof_received(self) -> bool:
        return self._eof_received

    def __repr__(self) -> str:
        if self._closed:
            return f"<Stream {self.role} closed in={self.bytes_in} out={self.bytes_out}>"
        read = "polling" if self._reading else ("eof" if self._eof_received else "paused")
        if self._wbuf is _SHUT:
            write = "shut"
        elif self._wbuf:
            write = f"<polling, bufsize={len(self._wbuf)}>"
        else:
            write = "<idle, bufsize=0>"
        return (f"<Stream {self.role} fd={self.fd} read={read} write={write} "
                f"in={self.bytes_in} out={self.bytes_out}>")

    # -- epoll ------------------------------------------------------------

    def _set_mask(self, mask: int) -> None:
        # Only a real change costs an epoll_ctl (the loop keeps no mask table).
        if mask != self._mask:
            self._mask = mask
            if not self._parked:
                self.loop.modify(self._fd, mask)

    def _on_event(self, events: int) -> None:
        if events == EPOLLIN:
            # The hot path, inlined: one read, then straight to the
            # receiver -- for a relay, the peer's ``write``, itself inlined
            # while the peer has nothing queued (a Python call less per
            # message, ~700 instructions of the ~6,400 it costs now).
            views = self._views
            sock = self._sock
            try:
                if sock is None:
                    n = _readv(self._fd, views[IOVEC])
                else:
                    n = sock.recv_into(views[WHOLE])
            except (BlockingIOError, InterruptedError):
                self._sc.recv += 1
                return
            except OSError as exc:
                self._sc.recv += 1
                self._fatal(exc)
                return
            sc = self._sc
            if n:
                self.bytes_in += n
                peer = self.peer
                if peer is None:
                    sc.recv += 1
                    self.protocol.data_received(views[WHOLE][:n])
                    return
                view = views[n] if n < SMALL_VIEWS else views[WHOLE][:n]
                if peer._wbuf is None:
                    try:
                        m = _write(peer._fd, view)
                    except (BlockingIOError, InterruptedError):
                        m = 0
                    except OSError as exc:
                        sc.relayed += 1
                        peer._fatal(exc)
                        return
                    sc.relayed += 1  # this recv and that write: one counter
                    peer.bytes_out += m
                    if m != n:
                        peer._queue(view[m:])
                else:
                    sc.recv += 1
                    peer._write_behind(view)
                if n >= BIG_READ:
                    self._big_read(n)
            else:
                sc.recv += 1
                self._got_eof()
            return
        if events & EPOLLERR:
            # The kernel has a pending error (RST, unreachable): SO_ERROR gives
            # the real errno for the log and the close reason.
            self._read_error()
            return
        if events & EPOLLOUT:
            self._on_writable()
            if self._closed:
                return
        if events & EPOLLIN:
            self._on_event(EPOLLIN)
        elif events & EPOLLHUP and not self._reading:
            # HUP is reported whatever the mask says; with reading paused the
            # fd would be reported on every wait (a busy loop). Park it: out of
            # epoll until reading resumes. See loop.py "fd reuse and epoll".
            self._park()

    handle_event = _on_event  # the loop calls the stream itself

    def _big_read(self, n: int) -> None:
        """A relayed read of ``BIG_READ`` bytes or more: the hook with which
        ``splice.SpliceableStream`` detects bulk flows (``splice = auto``)."""

    def _park(self) -> None:
        if not self._parked:
            self.loop.unregister(self._fd)
            self._parked = True

    def _read_error(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._sc.getsockopt += 1
        if not err:
            # no error pending: a stale registration's event (see loop.py,
            # "fd reuse and epoll"); if the socket did break, the next wait
            # reports what is left of it (EOF, HUP)
            return
        self._fatal(ConnectionResetError(err, errno.errorcode.get(err, str(err))))

    # -- reading -----------------------------------------------------------

    def _got_eof(self) -> None:
        self._eof_received = True
        self._reading = False
        # the protocol first: when this EOF ends a relay the stream is closed
        # by now, and the epoll_ctl that would stop the (level-triggered)
        # EOF from being reported again is not needed
        self.protocol.eof_received()
        if not self._closed:
            self._set_mask(self._mask & ~EPOLLIN)

    def pause_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._set_mask(self._mask & ~EPOLLIN)

    def resume_reading(self) -> None:
        if not self._reading and not self._eof_received and not self._closed:
            self._reading = True
            mask = self._mask | EPOLLIN
            if self._parked:
                self._parked = False
                self._mask = mask
                self.loop.register(self._fd, mask, self)
            else:
                self._set_mask(mask)

    # -- writing -----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send now; queue only what the kernel did not take."""
        if self._wbuf is not None:
            self._write_behind(data)
            return
        try:
            n = _write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._sc.send += 1
            self._fatal(exc)
            return
        self._sc.send += 1
        self.bytes_out += n
        if n != len(data):
            self._queue(data[n:])

    def _queue(self, tail: bytes | bytearray | memoryview) -> None:
        """The kernel took part of a write: copy the tail, ask for EPOLLOUT."""
        self._wbuf = wbuf = bytearray(tail)
        self._set_mask(self._mask | EPOLLOUT)
        if len(wbuf) > self._high:
            self._paused_peer = True
            self.protocol.pause_writing()

    def _write_behind(self, data: bytes | bytearray | memoryview) -> None:
        wbuf = self._wbuf
        if wbuf is _SHUT or self._eof_pending:
            return  # after write_eof/close nothing more may go out
        wbuf += data
        if not self._paused_peer and len(wbuf) > self._high:
            self._paused_peer = True
            self.protocol.pause_writing()

    def _on_writable(self) -> None:
        wbuf = self._wbuf
        if wbuf:
            try:
                n = _write(self._fd, wbuf)
            except (BlockingIOError, InterruptedError):
                self._sc.send += 1
                return
            except OSError as exc:
                self._sc.send += 1
                self._fatal(exc)
                return
            self._sc.send += 1
            self.bytes_out += n
            del wbuf[:n]  # O(1): bytearray trims its head in place
            if self._paused_peer and len(wbuf) <= self._high >> 2:  # low watermark: a quarter
                self._paused_peer = False
                self.protocol.resume_writing()
                if self._closed:
                    return
            if wbuf:
                return
        if wbuf is not _SHUT:
            self._wbuf = None
        self._set_mask(self._mask & ~EPOLLOUT)
        if self._eof_pending:
            self._shutdown_now()

    def write_eof(self) -> None:
        """Half-close: ``shutdown(SHUT_WR)`` once the queue has drained."""
        if self._closed or self._wbuf is _SHUT or self._eof_pending:
            return
        if self._wbuf:
            self._eof_pending = True
        else:
            self._shutdown_now()

    def _shutdown_now(self) -> None:
        self._eof_pending = False
        self._wbuf = _SHUT
        try:
            (self._sock or self.sock).shutdown(_SHUT_WR)
        except OSError as exc:
            # ENOTCONN here means the peer reset us meanwhile: that is a lost
            # connection too -- staying silent would leave the relay waiting
            # for an eof_sent that never comes
            self._sc.shutdown += 1
            self._fatal(exc)
            return
        self._sc.shutdown += 1
        on_sent = getattr(self.protocol, "eof_sent", None)
        if on_sent is not None:
            on_sent()

    # -- closing -----------------------------------------------------------

    def close(self, abort: bool = False) -> None:
        """Close exactly once; forget the fd's handler first (fd reuse, see loop.py).

        ``abort`` sends RST instead of FIN (SO_LINGER 0), dropping anything
        queued -- used when the other side of a relay was reset, so the peer
        learns the stream is broken rather than seeing a clean end.
        """
        if self._closed:
            return
        self._closed = True
        self._reading = False
        # a parked fd is out of epoll already; otherwise the close below
        # removes it, so only the handler goes (no EPOLL_CTL_DEL)
        self.loop.forget(self._fd)
        self._parked = False
        if abort:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                self._sc.setsockopt += 1
            except OSError:
                pass
        self._wbuf = _SHUT
        self.peer = None
        sock = self._sock
        self._sc.close += 1
        if sock is not None:
            sock.close()  # the object owns the fd (see ``sock``)
            return
        try:
            os.close(self._fd)
        except OSError:  # Linux has released the fd even then (close(2))
            pass

    def detach(self) -> None:
        """Forget the protocol and the peer (after ``close``).

        Discussion: a relay and its streams point at each other (stream ->
        protocol -> relay -> stream). Left as is, every finished connection is
        a reference cycle that only the cyclic GC can free -- garbage that
        piles up between collections and collections that scan it. Cutting the
        links lets plain reference counting free a relay the moment it ends.
        """
        self.protocol = _DETACHED
        self.peer = None

    def _fatal(self, exc: BaseException) -> None:
        if self._closed:
            return
        self.close()
        self.protocol.connection_lost(exc)

