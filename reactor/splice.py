"""Relaying through splice(2): socket -> pipe -> socket, the bytes never in Python.

The gateway's ``splice`` option (``off`` | ``on`` | ``auto``) picks the stream
class for its relays:

* ``off`` -- the plain ``Stream``; nothing here runs.
* ``on``/``auto`` -- ``SpliceableStream``: the recv/send data path of ``Stream``
  plus a writer side that can drain a pipe. A *direction* (one stream reading,
  its peer writing) switches to splicing by changing the reading stream's class
  to ``SplicingStream`` (same slots, so ``__class__`` assignment is allowed and
  the loop's handler -- the stream itself -- needs no epoll_ctl). ``on``
  switches both directions once the backend is connected (the PROXY header and
  early data go out through the ordinary write path first; with
  ``accept_proxy``, the client direction once its first bytes were checked);
  ``auto`` switches a direction when its reads look like a bulk transfer (see
  ``SpliceableStream._big_read``) -- under ``on`` too, for a direction still
  on recv/send. A switch is for the rest of the relay.

Per spliced direction, the reading stream owns one pipe: an EPOLLIN event
splices the socket into the pipe, then -- unless the writer already waits for
EPOLLOUT, which means something is queued ahead -- the pipe into the writer's
socket. What the writer's socket will not take stays in the pipe ("queued"): it
counts in the writer's ``buffered``, the writer asks for EPOLLOUT, and when the
pipe is full the reader stops reading (backpressure; the pipe's capacity bounds
the memory). EOF becomes the writer's ``shutdown(SHUT_WR)`` once the pipe is
empty; an error closes the relay as on the recv/send path.

Discussion: why a class change and not a flag
---------------------------------------------
The recv/send hot path of a small-message relay must not pay for splicing,
not even an attribute test. A ``SpliceableStream`` reads with ``Stream``'s own
hot path, whose one comparison per read (``n >= BIG_READ``) calls the
``_big_read`` hook -- a no-op in ``Stream`` (``splice = "off"``), the bulk
detector here -- and nothing else; a spliced direction runs other code entirely.
The state a spliceable stream needs lives in one slot, ``_splice``: unset until
its first big read; before its direction switches, the ``bytes_in`` value after
its last big read (or None: never splice, e.g. no pipe could be had); once it
switches, its ``Pipe``.

Discussion: fds
---------------
Each pipe is two fds. Pipes never take an fd that ``max_connections`` may
need: the pool's budget is ``(RLIMIT_NOFILE - reserve - 2 x max_connections)
// 2`` pipes, in use plus pooled (``PipePool.configure``). A relay whose
direction finds no pipe (budget spent, EMFILE) stays on recv/send. Finished
relays give their pipes back to a small pool, empty; a pipe that still holds
bytes (an aborted relay), or one beyond the pool's size, is closed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource
import socket

from reactor.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop
from reactor.stream import _SHUT, Stream, _write

log = logging.getLogger("reactor.splice")

MODES = ("off", "on", "auto")

# bytes asked of one socket -> pipe splice; the kernel moves what the pipe holds
SPLICE_CHUNK = 1 << 20
POOL_KEEP = 16  # empty pipes kept for the next relays
FD_RESERVE = 64  # fds beyond the relays' sockets: admin connections, health checks, spare

DEFAULT_PIPE_SIZE = 65536  # what pipe2 gives (16 pages)
_PAGE = os.sysconf("SC_PAGE_SIZE")
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_splice = os.splice
_INET = (socket.AF_INET, socket.AF_INET6)


class Pipe:
    """One pipe pair; ``queued``: bytes spliced in and not yet out."""

    __slots__ = ("r", "w", "queued")

    def __init__(self, r: int, w: int) -> None:
        self.r = r
        self.w = w
        self.queued = 0

    def __repr__(self) -> str:
        return f"<Pipe r={self.r} w={self.w} queued={self.queued}>"


class PipePool:
    """Pipes for one loop: an fd budget, and a few empty pipes kept for reuse."""

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.free: list[Pipe] = []
        self.in_use = 0
        self.limit = 0  # pipes in use + pooled; 0 until configure()
        self.keep = POOL_KEEP
        self.created = 0
        self.reused = 0
        self.closed = 0
        self.refused = 0  # wanted, but the fd budget was spent
        self.failed = 0  # pipe2 failed (EMFILE, ENFILE)
        self.size = DEFAULT_PIPE_SIZE
        self.base_fds: int | None = None

    def configure(self, max_connections: int, buffer_limit: int = DEFAULT_PIPE_SIZE,
                  backends: int = 0) -> int:
        """Set the budget so that pipes never take an fd ``max_connections``
        relays (2 sockets each) may need; returns it (in pipes). The reserve
        is what is open at the first call (listeners, epoll, admin...) plus
        ``FD_RESERVE`` plus one per backend (health checks). Pipes hold
        ``buffer_limit`` bytes, as a recv/send direction queues at most that
        much (the kernel rounds up to a power of two pages; it caps at
        /proc/sys/fs/pipe-max-size for an unprivileged process). Called again
        on reload: pipes made before keep their size."""
        self.size = max(_PAGE, min(buffer_limit, _pipe_max_size()))
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if self.base_fds is None:
            self.base_fds = len(os.listdir("/proc/self/fd"))
        reserve = self.base_fds + FD_RESERVE + backends
        if soft == resource.RLIM_INFINITY:
            self.limit = 2 * max_connections
        else:
            self.limit = max(0, min(2 * max_connections, (soft - reserve - 2 * max_connections) // 2))
        self.keep = min(POOL_KEEP, self.limit)
        return self.limit

    def acquire(self) -> Pipe | None:
        """An empty pipe, or None (no budget, or the kernel refused one)."""
        if self.free:
            self.in_use += 1
            self.reused += 1
            return self.free.pop()
        if self.in_use >= self.limit:
            self.refused += 1
            return None
        sc = self.loop.syscalls
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            sc.pipe += 1
            self.failed += 1
            if self.failed == 1 or exc.errno not in (errno.EMFILE, errno.ENFILE):
                log.warning("event=pipe_failed error=%s failures=%d", exc, self.failed)
            return None
        sc.pipe += 1
        if self.size != DEFAULT_PIPE_SIZE:
            try:
                fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
            except OSError:
                pass  # EPERM beyond the user's pipe-page quota: keep the kernel's default
            sc.fcntl += 1
        self.created += 1
        self.in_use += 1
        return Pipe(r, w)

    def release(self, pipe: Pipe) -> None:
        self.in_use -= 1
        if pipe.queued or len(self.free) >= self.keep:
            self._close(pipe)
        else:
            self.free.append(pipe)

    def _close(self, pipe: Pipe) -> None:
        os.close(pipe.r)
        os.close(pipe.w)
        self.loop.syscalls.close += 2
        self.closed += 1
        pipe.r = pipe.w = -1

    def clear(self) -> None:
        """Close the pooled pipes (shutdown)."""
        while self.free:
            self._close(self.free.pop())

    def stats(self) -> dict[str, int]:
        return {
            "pipes_in_use": self.in_use,
            "pipes_pooled": len(self.free),
            "max_pipes": self.limit,
            "pipe_size": self.size,
            "pipes_created": self.created,
            "pipes_reused": self.reused,
            "pipes_closed": self.closed,
            "pipes_refused": self.refused,
            "pipe_failures": self.failed,
        }


def _pipe_max_size() -> int:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return DEFAULT_PIPE_SIZE


def pipe_pool(loop: Loop) -> PipePool:
    """The loop's pipe pool (one per loop, as the shared receive buffer)."""
    pool = getattr(loop, "_pipe_pool", None)
    if pool is None:
        pool = loop._pipe_pool = PipePool(loop)  # type: ignore[attr-defined]
    return pool


def start_splice(src: SpliceableStream) -> bool:
    """Switch the direction ``src`` -> ``src.peer`` to splicing; False if it
    stays on recv/send (closed, EOF seen, not TCP on both ends, no pipe)."""
    if src.__class__ is SplicingStream:
        return True
    dst = src.peer
    if (src._closed or src._eof_received or dst is None or dst._closed
            or not isinstance(dst, SpliceableStream)
            or src.sock.family not in _INET or dst.sock.family not in _INET):
        return False
    pipe = pipe_pool(src.loop).acquire()
    if pipe is None:
        src._splice = None  # do not ask again for this direction
        return False
    src._splice = pipe
    src.__class__ = SplicingStream
    return True


class SpliceableStream(Stream):
    """A relay stream that reads with recv (as ``Stream``) and can switch its
    reading to splice; as a writer it also drains its peer's pipe."""

    __slots__ = ("_splice",)

    # No __init__ of its own: ``_splice`` stays unset until the first big
    # read (``_big_read`` reads it with a default) -- a Python frame less per
    # stream, two per proxied connection.

    def _big_read(self, n: int) -> None:
        """auto: two big reads in a row make a bulk direction; splice it.

        The previous read was big too iff ``bytes_in`` before this read equals
        the mark left by the previous big read -- no per-read bookkeeping.
        """
        mark = getattr(self, "_splice", -1)
        if mark is None:
            return
        if mark == self.bytes_in - n:
            start_splice(self)
        else:
            self._splice = self.bytes_in

    # -- the writer side: a queued tail first, then the peer's pipe ----------

    def _inbound(self) -> Pipe | None:
        peer = self.peer
        if peer is not None and peer.__class__ is SplicingStream:
            return peer._splice  # type: ignore[return-value]
        return None

    @property
    def buffered(self) -> int:
        n = len(self._wbuf) if self._wbuf is not None else 0
        p = self._inbound()
        return n + p.queued if p is not None else n

    def _pipe_out(self, p: Pipe) -> None:
        try:
            m = _splice(p.r, self._fd, p.queued, flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            m = 0
        except OSError as exc:
            self._sc.splice += 1
            self._fatal(exc)
            return
        self._sc.splice += 1
        if m:
            self.bytes_out += m
            p.queued -= m
        if p.queued:
            self._set_mask(self._mask | EPOLLOUT)

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
            del wbuf[:n]
            if self._paused_peer and len(wbuf) <= self._high >> 2:
                self._paused_peer = False
                self.protocol.resume_writing()
                if self._closed:
                    return
            if wbuf:
                return
        if wbuf is not _SHUT:
            self._wbuf = None
        p = self._inbound()
        if p is not None and p.queued:
            self._pipe_out(p)
            if self._closed or p.queued:
                return
            self.peer.resume_reading()  # type: ignore[union-attr]  # it may have paused on a full pipe
            if self._closed:
                return
        self._set_mask(self._mask & ~EPOLLOUT)
        if self._eof_pending:
            self._shutdown_now()

    def write_eof(self) -> None:
        if self._closed or self._wbuf is _SHUT or self._eof_pending:
            return
        p = self._inbound()
        if self._wbuf or (p is not None and p.queued):
            self._eof_pending = True  # after the tail and the pipe
        else:
            self._shutdown_now()


class SplicingStream(SpliceableStream):
    """A ``SpliceableStream`` whose reading is spliced into ``_splice`` (a Pipe)."""

    __slots__ = ()

    def _on_event(self, events: int) -> None:
        if events == EPOLLIN:
            self._splice_in()
            return
        if events & EPOLLERR:
            self._read_error()
            return
        if events & EPOLLOUT:
            self._on_writable()
            if self._closed:
                return
        if events & EPOLLIN:
            self._splice_in()
        elif events & EPOLLHUP and not self._reading:
            self._park()  # see Stream._on_event

    handle_event = _on_event

    def _splice_in(self) -> None:
        if not self._reading:
            return  # an event of this batch from before a pause or EOF
        p: Pipe = self._splice  # type: ignore[assignment]
        try:
            n = _splice(self._fd, p.w, SPLICE_CHUNK, flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            self._sc.splice += 1
            if p.queued:
                self.pause_reading()  # the pipe is full: the writer's drain resumes us
            return
        except OSError as exc:
            self._sc.splice += 1
            self._fatal(exc)
            return
        self._sc.splice += 1
        if not n:
            self._got_eof()
            return
        self.bytes_in += n
        p.queued += n
        dst = self.peer
        if dst is not None and not dst._mask & EPOLLOUT:  # nothing queued ahead of these bytes
            dst._pipe_out(p)  # type: ignore[union-attr]

    def close(self, abort: bool = False) -> None:
        if self._closed:
            return
        Stream.close(self, abort)
        p = self._splice
        self._splice = None
        if p is not None:
            pipe_pool(self.loop).release(p)  # type: ignore[arg-type]
