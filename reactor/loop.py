"""The reactor: one epoll, a FIFO ready queue, a timer heap, signals as callbacks.

The loop runs in plain phases, as curio's kernel does::

    1. poll I/O      epoll_wait, with a timeout that is 0 when work is ready,
                     the first timer's deadline otherwise, or forever
    2. dispatch      every event of that one wait, in a batch: handler(mask)
    3. expire timers move due timers to the ready queue, in deadline order
    4. run ready     only what was ready when this phase began (FIFO); what
                     those callbacks schedule runs next turn, so one busy
                     callback chain cannot starve I/O

Nothing here knows about protocols. Sockets register a handler per fd and an
interest mask; the mask is changed with ``modify`` (one epoll_ctl), never by
unregister/register churn.

Every syscall the loop and its streams issue is counted in ``loop.syscalls``
(a plain dict: name -> count). Those counters are how we answer the seed's
question "does Listen/Accept switch to kernel mode?" with data rather than prose:
each count is one user->kernel->user round trip.

Discussion: fd reuse and epoll
------------------------------
epoll registers the *open file description*, not the fd number. If a socket is
closed while still registered, the kernel drops it from the interest list
silently -- but only when the last fd referring to that description is gone.
Meanwhile the fd number may be handed out again by the very next accept(), and
our ``_handlers`` dict, keyed by number, would dispatch the new socket's events
to the old handler. The rule that keeps this straight: *forget the handler
before close*, in the same call (``Stream.close`` does both), so the number is
free in our tables before the kernel can reuse it.

Forgetting the handler (``forget``) is a dict pop, not an ``EPOLL_CTL_DEL``:
the close itself removes the registration, because the gateway's sockets are
CLOEXEC, never dup'ed and the gateway never forks -- its close is the last
reference. That saves two of a proxied connection's syscalls (HAProxy skips
the DEL the same way). Were a registration to outlive its close all the same
(a child between fork and exec holding the fd for a moment), its events would
carry a number that is either unknown (dropped below) or reused by a new
stream, which then sees a spurious readiness: ``recv`` gives EAGAIN and
``SO_ERROR`` gives 0, and streams treat both as "nothing happened". Shared
fds (a listener a supervisor also holds, a parked fd) still ``unregister``.

A second trap: EPOLLHUP and EPOLLERR are reported whatever the interest mask
says -- even mask 0. A level-triggered fd whose reading is paused for
backpressure and whose peer then hangs up would be reported on every wait, a
busy loop. Streams therefore treat ERR as fatal at once, and on HUP while
paused they park the fd (unregister it) until reading resumes; see
``Stream._on_event``.
"""

from __future__ import annotations

import collections
import heapq
import logging
import os
import select
import signal
import socket
import threading
import time
import types
from collections.abc import Callable, MutableMapping
from typing import Any

log = logging.getLogger("reactor.loop")

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP

# Names of the syscalls we count, so statistics() shows zeros too.
SYSCALLS = (
    "epoll_wait", "epoll_ctl", "accept", "recv", "send", "connect", "shutdown",
    "close", "socket", "setsockopt", "getsockopt", "getsockname", "ioctl", "splice", "pipe", "fcntl", "read", "write",
)



class SyscallCounts(MutableMapping):
    """``loop.syscalls``: a mapping name -> count, stored in slots.

    Discussion: the relay's hot path counts a ``recv`` and a ``send`` per
    event. As ``counts["recv"] += 1`` on a dict that is two hash lookups, and
    measured with callgrind it was ~700 instructions of a forwarded message's
    ~5,000 of Python overhead; as ``counts.recv += 1`` on a slot it is two
    pointer loads. Everything else reads and writes it as the mapping it
    always was (``dict(loop.syscalls)``, ``loop.syscalls.close += 1``).

    The relay's hot path goes one step further: it reads and then writes once
    per event, and counts that pair once, in ``relayed``; ``recv`` and
    ``send`` read through the mapping include it, while their slots hold the
    calls made elsewhere. A Python int increment allocates (~290 instructions),
    and this one is per forwarded message.
    """

    __slots__ = SYSCALLS + ("relayed",)

    def __init__(self) -> None:
        for name in SYSCALLS:
            setattr(self, name, 0)
        self.relayed = 0  # recv + send pairs of the relay's hot path

    def __getitem__(self, name: str) -> int:
        if name not in SYSCALLS:
            raise KeyError(name)
        value = getattr(self, name)
        if name == "recv" or name == "send":
            value += self.relayed
        return value

    def __setitem__(self, name: str, value: int) -> None:
        if name not in SYSCALLS:
            raise KeyError(name)
        if name == "recv" or name == "send":
            value -= self.relayed
        setattr(self, name, value)

    def __delitem__(self, name: str) -> None:
        raise TypeError("syscall counters cannot be removed")

    def __iter__(self):
        return iter(SYSCALLS)

    def __len__(self) -> int:
        return len(SYSCALLS)

    def __repr__(self) -> str:
        return f"SyscallCounts({dict(self)!r})"


_WAKE = b"\0"  # a byte that is not a signal number: "look at the ready queue"


class Handle:
    """A scheduled callback; ``cancel()`` makes it a no-op."""

    __slots__ = ("callback", "args", "when", "cancelled")

    def __init__(self, callback: Callable[..., Any], args: tuple, when: float = 0.0) -> None:
        self.callback = callback
        self.args = args
        self.when = when
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = None  # drop references: a cancelled timer must not pin a relay
        self.args = ()

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else getattr(self.callback, "__qualname__", "?")
        return f"<Handle {state} when={self.when:.3f}>"


class Loop:
    """A single-threaded epoll reactor."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        # fd -> an object with handle_event(mask): a Stream is its own handler
        # (called through LOAD_METHOD: no bound method per fd, and as fast as
        # calling one); plain callables are wrapped once, at register time.
        self._handlers: dict[int, Any] = {}
        self._ready: collections.deque[Handle] = collections.deque()
        # Timers: heap of (when, seq, handle). seq keeps equal deadlines FIFO.
        self._timers: list[tuple[float, int, Handle]] = []
        self._seq = 0
        self._cancelled_timers = 0
        self._running = False
        self._stopping = False
        self._thread_id: int | None = None
        self._signal_handlers: dict[int, Callable[[], Any]] = {}
        self._old_signal: dict[int, Any] = {}
        self._old_wakeup_fd: int | None = None
        self.now = time.monotonic()
        self.syscalls = SyscallCounts()
        # statistics
        self.events_total = 0
        self.events_max = 0
        self.lag_last = 0.0
        self.lag_max = 0.0
        # Self-pipe for signals and call_soon_threadsafe (a socketpair: both
        # ends non-blocking, so neither a flood of signals nor of wake-ups can
        # block a writer).
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.register(self._wake_r.fileno(), EPOLLIN, self._on_wake)

    # -- fds ---------------------------------------------------------------

    def register(self, fd: int, mask: int, handler: Any) -> None:
        """Watch ``fd`` for ``mask``; on readiness ``handler.handle_event(events)``
        runs -- or ``handler(events)`` for a plain callable."""
        self._epoll.register(fd, mask)
        self.syscalls.epoll_ctl += 1
        # a stream or relay (their types are remembered): stored as is,
        # without a call to _as_handler -- twice per proxied connection
        self._handlers[fd] = handler if type(handler) in _HANDLER_TYPES else _as_handler(handler)

    def modify(self, fd: int, mask: int) -> None:
        """Change the interest mask (one epoll_ctl).

        The loop keeps no table of masks -- a dict entry per fd is memory an
        idle connection should not pay for. Callers that own an fd know its
        mask and call this only when it really changes (``Stream._set_mask``).
        """
        self._epoll.modify(fd, mask)
        self.syscalls.epoll_ctl += 1

    def set_handler(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        """Hand a registered fd to a new handler with a new mask: one
        epoll_ctl instead of unregister + register (a connect completing)."""
        self._handlers[fd] = handler if type(handler) in _HANDLER_TYPES else _as_handler(handler)
        self.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is None:
            return
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # already closed elsewhere: nothing to undo
            pass
        self.syscalls.epoll_ctl += 1

    def forget(self, fd: int) -> None:
        """Drop ``fd``'s handler without a syscall, just before closing an fd
        nobody else holds: the close removes the registration (see "fd reuse
        and epoll")."""
        self._handlers.pop(fd, None)

    def is_registered(self, fd: int) -> bool:
        return fd in self._handlers

    @property
    def epoll_fd(self) -> int:
        return self._epoll.fileno()

    # -- callbacks and timers -----------------------------------------------

    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Handle:
        h = Handle(callback, args)
        self._ready.append(h)
        return h

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Handle:
        return self.call_at(self.now + delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Handle:
        h = Handle(callback, args, when)
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, h))
        return h

    def cancel_timer(self, handle: Handle) -> None:
        """Cancel a timer and let the heap shed dead entries when they pile up."""
        if handle.cancelled:
            return
        handle.cancel()
        self._cancelled_timers += 1
        # Discussion: idle relays cancel and re-arm timers constantly. Dead
        # entries cost heap depth until their deadline; when they are the
        # majority, rebuilding (O(n)) is cheaper than carrying them.
        if self._cancelled_timers > 64 and self._cancelled_timers * 2 > len(self._timers):
            self._timers = [t for t in self._timers if not t[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> Handle:
        """Schedule from another thread and wake the loop (deque.append is atomic)."""
        h = Handle(callback, args)
        self._ready.append(h)
        self._write_wake(_WAKE)
        return h

    def _write_wake(self, byte: bytes) -> None:
        try:
            self._wake_w.send(byte)
        except (BlockingIOError, OSError):
            pass  # the pipe is full: the loop is awake already

    # -- signals -----------------------------------------------------------

    def add_signal_handler(self, signum: int, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` in the loop, as an ordinary callback, on ``signum``.

        The C-level handler only writes the signal number to our wake-up
        socket (``signal.set_wakeup_fd``); the Python-level handler does
        nothing. The loop reads the byte and runs the callback between events,
        so a handler never interrupts a relay half-way through a buffer.
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        self._signal_handlers[signum] = callback
        if signum not in self._old_signal:
            self._old_signal[signum] = signal.getsignal(signum)
        signal.signal(signum, _noop_signal_handler)
        signal.siginterrupt(signum, False)

    def remove_signal_handlers(self) -> None:
        for signum, old in self._old_signal.items():
            try:
                signal.signal(signum, old)
            except (OSError, ValueError, TypeError):
                pass
        self._old_signal.clear()
        self._signal_handlers.clear()
        if self._old_wakeup_fd is not None:
            try:
                signal.set_wakeup_fd(self._old_wakeup_fd)
            except ValueError:
                pass
            self._old_wakeup_fd = None

    def _on_wake(self, _mask: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        self.syscalls.recv += 1
        for signum in data:
            if signum:
                cb = self._signal_handlers.get(signum)
                if cb is not None:
                    self._ready.append(Handle(cb, ()))

    # -- running ------------------------------------------------------------

    @property
    def iterations(self) -> int:
        """Loop turns: one ``epoll_wait`` each, so that counter is the count
        (a second one would be another int allocated per turn)."""
        return self.syscalls.epoll_wait

    def stop(self) -> None:
        """Make ``run()`` return after the current turn."""
        self._stopping = True
        if self._thread_id is not None and self._thread_id != threading.get_ident():
            self._write_wake(_WAKE)

    def run(self) -> None:
        """Run until ``stop()``."""
        if self._running:
            raise RuntimeError("loop is already running")
        self._running = True
        self._stopping = False
        self._thread_id = threading.get_ident()
        # Hot names cached in locals: each attribute lookup saved is saved
        # per event, and there are millions of events.
        poll = self._epoll.poll
        handlers = self._handlers
        ready = self._ready
        timers = self._timers
        syscalls = self.syscalls
        monotonic = time.monotonic
        heappop = heapq.heappop
        try:
            while not self._stopping:
                # 1. poll I/O
                if ready:
                    timeout = 0.0
                elif self._timers:
                    timers = self._timers  # cancel_timer may have rebuilt it
                    timeout = timers[0][0] - monotonic()
                    if timeout < 0.0:
                        timeout = 0.0
                else:
                    timeout = -1.0
                try:
                    events = poll(timeout)
                except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                    events = []
                syscalls.epoll_wait += 1  # also the loop's turn count: see ``iterations``
                self.now = now = monotonic()
                n = len(events)
                if n:
                    self.events_total += n
                    if n > self.events_max:
                        self.events_max = n
                    # 2. dispatch, all events of this wait in one batch
                    for fd, mask in events:
                        try:
                            handlers[fd].handle_event(mask)
                        except KeyError as exc:
                            # unregistered by an earlier event of this batch -- unless
                            # the KeyError came from inside the handler (its traceback
                            # goes deeper than this frame): "fd in handlers" cannot
                            # tell, a handler may have closed its own fd before raising
                            if exc.__traceback__.tb_next is not None:
                                log.exception("event=handler_error fd=%d", fd)
                        except Exception:
                            log.exception("event=handler_error fd=%d", fd)
                # 3. expire timers
                timers = self._timers
                while timers and timers[0][0] <= now:
                    when, _, h = heappop(timers)
                    if h.cancelled:
                        self._cancelled_timers -= 1
                        continue
                    lag = now - when
                    self.lag_last = lag
                    if lag > self.lag_max:
                        self.lag_max = lag
                    ready.append(h)
                # 4. run what is ready now; later additions wait a turn (the
                # test first: most turns have nothing ready, and a range and its
                # iterator per turn, with the turn counter ``iterations`` now
                # reads, were ~1,200 instructions of a turn's ~5,000, callgrind)
                if ready:
                    for _ in range(len(ready)):
                        h = ready.popleft()
                        if h.cancelled:
                            continue
                        try:
                            h.callback(*h.args)
                        except Exception:
                            log.exception("event=callback_error callback=%r", h.callback)
        finally:
            self._running = False
            self._thread_id = None

    def close(self) -> None:
        """Release the epoll fd and the wake-up pair (after ``run`` returned)."""
        self.remove_signal_handlers()
        self.unregister(self._wake_r.fileno())
        self._wake_r.close()
        self._wake_w.close()
        self._epoll.close()

    # -- introspection ------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """What the loop has done: a snapshot, cheap enough to serve per request."""
        waits = self.syscalls.epoll_wait
        return {
            "pid": os.getpid(),
            "iterations": self.iterations,
            "events_total": self.events_total,
            "events_per_wait": (self.events_total / waits) if waits else 0.0,
            "events_max": self.events_max,
            "ready": len(self._ready),
            "timers": len(self._timers) - self._cancelled_timers,
            "fds_registered": len(self._handlers),
            "lag_last": self.lag_last,
            "lag_max": self.lag_max,
            "syscalls": dict(self.syscalls),
        }

    def __repr__(self) -> str:
        return (f"<Loop epoll_fd={self._epoll.fileno()} fds={len(self._handlers)} "
                f"ready={len(self._ready)} timers={len(self._timers)} "
                f"running={self._running}>")


class _FnHandler:
    """A plain callback as a handler (listeners, connects, checks: rare events)."""

    __slots__ = ("handle_event",)

    def __init__(self, fn: Callable[[int], None]) -> None:
        self.handle_event = fn


_PLAIN = frozenset((types.MethodType, types.FunctionType, types.BuiltinMethodType))


def _as_handler(handler: Any) -> Any:
    # a bound method (a connect, a listener) is wrapped at once: hasattr on
    # its type would build and discard an AttributeError, message and all --
    # a few thousand instructions per proxied connection
    t = type(handler)
    if t in _PLAIN:
        return _FnHandler(handler)
    if hasattr(t, "handle_event"):
        _HANDLER_TYPES.add(t)
        return handler
    return _FnHandler(handler)


# Types whose instances are handlers themselves (they have ``handle_event``),
# as _as_handler found them: a handful of classes, so the set stays small.
_HANDLER_TYPES: set[type] = set()


def _noop_signal_handler(signum: int, frame: Any) -> None:
    """The real work happens in the loop; see ``Loop.add_signal_handler``."""
