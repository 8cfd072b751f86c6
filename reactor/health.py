"""Active health checks: a TCP connect to every backend every ``interval``.

HAProxy semantics (``check inter … rise … fall …``): a backend that is up is
marked down after ``fall`` consecutive failed checks; a backend that is down
comes back only after ``rise`` consecutive good checks. A check is a
non-blocking connect bounded by ``timeout``, then an immediate close. The
checks run on the gateway's loop; they never block it.

Passive ejection (``max_fails`` within ``fail_timeout``, nginx semantics)
lives in the balancer's ``Backend.record_failure``; the relay feeds it.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING

from reactor.loop import EPOLLOUT

if TYPE_CHECKING:  # pragma: no cover
    from reactor.balancer import Backend
    from reactor.gateway import Gateway

log = logging.getLogger("reactor.health")

_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY)


class _Check:
    __slots__ = ("checker", "backend", "sock", "timer")

    def __init__(self, checker: HealthChecker, backend: Backend) -> None:
        self.checker = checker
        self.backend = backend
        self.sock: socket.socket | None = None
        self.timer = None


class HealthChecker:
    """Runs the checks and keeps each backend's streak of results."""

    def __init__(self, loop, gateway: Gateway) -> None:
        self.loop = loop
        self.gateway = gateway
        self.streaks: dict[Backend, list[int]] = {}  # backend -> [ok streak, fail streak]
        self.checks_total = 0
        self.checks_failed = 0
        self.in_flight: dict[int, _Check] = {}  # fd -> check, for /fds roles
        self._timer = None
        self._running = False

    @property
    def cfg(self):
        return self.gateway.config.health

    def start(self) -> None:
        self._running = True
        self._timer = self.loop.call_soon(self._round)

    def stop(self) -> None:
        self._running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for check in list(self.in_flight.values()):
            self._end(check)

    def reconfigure(self) -> None:
        """After a reload: forget removed backends; start or stop as configured."""
        live = set(self.gateway.balancer.backends)
        for b in list(self.streaks):
            if b not in live:
                del self.streaks[b]
        if self.cfg.enabled and not self._running:
            self.start()
        elif not self.cfg.enabled and self._running:
            self.stop()
            for b in live:
                b.healthy = True

    def state_of(self, backend: Backend) -> dict:
        ok, fail = self.streaks.get(backend, (0, 0))
        return {"checked": self._running, "ok_streak": ok, "fail_streak": fail}

    def _round(self) -> None:
        self._timer = None
        if not self._running:
            return
        busy = {c.backend for c in self.in_flight.values()}
        for backend in list(self.gateway.balancer.backends):
            if backend not in busy and not backend.draining:
                self._check(backend)
        self._timer = self.loop.call_later(self.cfg.interval, self._round)

    def _check(self, backend: Backend) -> None:
        check = _Check(self, backend)
        sc = self.loop.syscalls
        try:
            sock = socket.socket(backend.family,  # type: ignore[attr-defined]
                                 socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sc.socket += 1
            err = sock.connect_ex(backend.address)
            sc.connect += 1
        except OSError as exc:
            log.warning("event=health_check_error backend=%s error=%s", backend.name, exc)
            return
        self.checks_total += 1
        if err and err not in _IN_PROGRESS:
            sock.close()
            sc.close += 1
            self._result(backend, False, errno.errorcode.get(err, str(err)))
            return
        check.sock = sock
        fd = sock.fileno()
        self.in_flight[fd] = check
        self.loop.register(fd, EPOLLOUT, lambda mask, c=check: self._on_event(c))
        check.timer = self.loop.call_later(self.cfg.timeout, self._on_timeout, check)

    def _on_event(self, check: _Check) -> None:
        err = check.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.loop.syscalls.getsockopt += 1
        self._end(check)
        self._result(check.backend, err == 0, errno.errorcode.get(err, str(err)) if err else "")

    def _on_timeout(self, check: _Check) -> None:
        check.timer = None
        if check.sock is None:
            return
        self._end(check)
        self._result(check.backend, False, "timeout")

    def _end(self, check: _Check) -> None:
        if check.timer is not None:
            self.loop.cancel_timer(check.timer)
            check.timer = None
        sock = check.sock
        if sock is None:
            return
        check.sock = None
        fd = sock.fileno()
        self.in_flight.pop(fd, None)
        self.loop.unregister(fd)
        sock.close()
        self.loop.syscalls.close += 1

    def _result(self, backend: Backend, ok: bool, why: str) -> None:
        if not self._running:
            return
        streak = self.streaks.setdefault(backend, [0, 0])
        cfg = self.cfg
        if ok:
            streak[0] += 1
            streak[1] = 0
            if not backend.healthy and streak[0] >= cfg.rise:
                backend.healthy = True
                log.warning("event=backend_up backend=%s checks_ok=%d", backend.name, streak[0])
        else:
            self.checks_failed += 1
            streak[1] += 1
            streak[0] = 0
            if backend.healthy and streak[1] >= cfg.fall:
                backend.healthy = False
                log.warning("event=backend_down backend=%s checks_failed=%d reason=%s",
                            backend.name, streak[1], why)
