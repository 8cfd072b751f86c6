"""The access log: one line per finished connection, written once per loop turn
(or, with ``access_log_buffer``, once per that many bytes).

    2026-12-03 20:14:07,412 event=access client=127.0.0.1:52870 backend=alpha bytes_in=8 bytes_out=15 duration=0.001 reason=client_eof

Discussion: why not ``logging``
-------------------------------
Through the ``logging`` module a line cost a ``LogRecord``, a formatter call
with ``strftime``, a handler lock and a ``write`` + ``flush`` -- about 30 µs
of a connection's 120 in the churn bench, a third of it the write syscall.
Here a line is one f-string with a timestamp prefix rebuilt once per second,
and the lines of one loop turn go out in a single ``write`` at the end of
the turn (nginx's ``access_log ... buffer=``, with the turn as the flush
interval). Nothing is held longer than the turn that produced it, so a
reader tailing the log sees a connection's line as soon as it is closed.

With ``access_log_buffer = N`` (nginx's ``buffer=``) lines are held across
turns instead: written when N bytes are waiting, when the oldest has waited
``access_log_flush`` seconds (nginx's ``flush=``), and on reload, drain and
shutdown. At low connection rates, where nearly every turn closes one
connection, that is one write per N bytes instead of one per connection
(paced churn at 2,000 connections/s: the log was ~10% of the gateway's CPU);
the price is a tail that lags by up to ``access_log_flush``, and the held
lines are lost if the process is killed (SIGKILL; SIGTERM flushes). With
``--workers N`` writing to one pipe, keep N bytes <= 4096 (PIPE_BUF) so
writes of two workers cannot interleave inside a line; a file opened for
append has no such limit.

The write is blocking, as nginx's is to a file: a stderr pipe whose reader
stops would eventually stall the loop. Lines that cannot be written (EPIPE,
ENOSPC) are dropped and counted, never raised into the loop.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from reactor.errors import UsageError

log = logging.getLogger("reactor.gateway")

_FLUSH_LINES = 256  # a turn that closes more than this writes early


class AccessLog:
    """Lines buffered for the current loop turn; ``flush`` writes them."""

    __slots__ = ("loop", "dest", "fd", "_own_fd", "_lines", "_scheduled", "_second", "_prefix",
                 "_ms", "_stamp_text", "lines_written", "lines_dropped", "writes", "buffer",
                 "flush_after", "_size", "_timer")

    def __init__(self, loop: Any, dest: bool | str, buffer: int = 0, flush: float = 1.0) -> None:
        """``dest``: True for stderr, or a file path (opened for append).
        ``buffer``: 0 = the lines of a turn at its end; else hold up to that many
        bytes, for at most ``flush`` seconds (nginx's ``buffer=`` and ``flush=``)."""
        self.loop = loop
        self.dest = dest
        self.buffer = buffer
        self.flush_after = flush
        self._size = 0
        self._timer = None
        if dest is True:
            self.fd = 2
            self._own_fd = False
        else:
            try:
                self.fd = os.open(str(dest), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                  0o644)
            except OSError as exc:
                raise UsageError(f"access_log: cannot open {dest}: {exc.strerror}") from None
            self._own_fd = True
        self._lines: list[str] = []
        self._scheduled = False
        self._second = -1
        self._prefix = ""
        self._ms = -1
        self._stamp_text = ""
        self.lines_written = 0
        self.lines_dropped = 0
        self.writes = 0

    def _new_stamp(self, ms: int) -> None:
        # The format logging's asctime used: "2026-12-03 20:14:07,412", made
        # once per millisecond (a busy turn closes many connections in one).
        self._ms = ms
        sec = ms // 1000
        if sec != self._second:
            self._second = sec
            self._prefix = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        self._stamp_text = f"{self._prefix},{ms % 1000:03d}"

    def access(self, client: str, backend: str, bytes_in: int, bytes_out: int,
               duration: float, reason: str) -> None:
        """One connection's line. The stamp and the queueing are inlined, the
        line is one f-string: this runs once per proxied connection."""
        ms = int(time.time() * 1000)
        if ms != self._ms:
            self._new_stamp(ms)
        lines = self._lines
        line = (f"{self._stamp_text} event=access client={client} backend={backend} "
                f"bytes_in={bytes_in} bytes_out={bytes_out} duration={duration:.3f} "
                f"reason={reason}\n")
        lines.append(line)
        if self.buffer:
            self._size += len(line)
            if self._size >= self.buffer:
                self.flush()
            elif self._timer is None:
                self._timer = self.loop.call_later(self.flush_after, self._flush_due)
            return
        if len(lines) >= _FLUSH_LINES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def _flush_due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        self._scheduled = False
        self._size = 0
        if self._timer is not None:
            self.loop.cancel_timer(self._timer)
            self._timer = None
        lines = self._lines
        if not lines:
            return
        data = "".join(lines).encode()
        n = len(lines)
        lines.clear()
        view = memoryview(data)
        sc = self.loop.syscalls
        try:
            while view:
                # a blocking fd: a short write only happens on a signal or a full disk
                sc.write += 1
                self.writes += 1
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            if not self.lines_dropped:
                log.warning("event=access_log_error error=%s", exc.strerror or exc)
            self.lines_dropped += n
            return
        self.lines_written += n

    def close(self) -> None:
        self.flush()
        if self._own_fd:
            self._own_fd = False
            os.close(self.fd)
