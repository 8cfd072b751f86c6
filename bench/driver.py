"""Drive the C load generator through its gates, and the processes around it.

The load generator prints a JSON "ready" line once connected, warmed up and quiet, then
waits for a line on stdin; after the measured window it prints a JSON "result" line and
waits again. Between the two gates the harness samples CPU, RSS, counters, or attaches
strace, while nothing moves.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import procstat


class RunError(Exception):
    pass


def pin(cpus: set[int]) -> Callable[[], None]:
    """A preexec_fn: pin the child to cpus before it execs."""

    def _pin() -> None:
        os.sched_setaffinity(0, cpus)

    return _pin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(
    port: int, proc: subprocess.Popen | None, deadline_s: float, log: Path | None
) -> None:
    """Poll until something accepts on 127.0.0.1:port; fail early if proc exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            lines = (
                log.read_text(errors="replace").strip().splitlines() if log and log.exists() else []
            )
            last = lines[-1].strip()[:300] if lines else "(no output)"
            raise RunError(f"exited with {proc.returncode} before listening: {last}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RunError(f"nothing listening on 127.0.0.1:{port} after {deadline_s:.0f} s")


def stop(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGINT the process and every descendant (by pid), SIGKILL what outlives grace_s.

    SIGINT, not SIGTERM: the gateway drains on SIGTERM (seconds of grace), and every
    peer takes SIGINT as "stop now"."""
    if proc.poll() is not None:
        return
    pids = procstat.tree(proc.pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGINT)
        except ProcessLookupError:
            pass
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        pass


class LineReader:
    """Lines from a pipe, with a deadline (select + os.read: no threads)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def readline(self, timeout_s: float) -> str | None:
        end = time.monotonic() + timeout_s
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0:
                raise RunError(f"no output for {timeout_s:.0f} s")
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode(errors="replace")


class Loadgen:
    """One gated run of the C load generator."""

    def __init__(
        self,
        exe: Path,
        mode: str,
        port: int,
        conns: int,
        cpus: set[int],
        *,
        duration: float | None = None,
        count: int | None = None,
        size: int | None = None,
        warmup: float = 0.5,
        timeout: float = 120.0,
        rate: float | None = None,
    ) -> None:
        self.argv = [
            str(exe),
            "--mode",
            mode,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--conns",
            str(conns),
            "--warmup",
            str(warmup),
            "--timeout",
            str(timeout),
            "--gate",
        ]
        if count is not None:
            self.argv += ["--count", str(count)]
        elif duration is not None:
            self.argv += ["--duration", str(duration)]
        if size is not None:
            self.argv += ["--size", str(size)]
        if rate:
            self.argv += ["--rate", str(rate)]
        self.cpus = cpus
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.reader: LineReader | None = None

    def __enter__(self) -> Loadgen:
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=pin(self.cpus),
        )
        self.reader = LineReader(self.proc.stdout.fileno())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def event(self, want: str, timeout_s: float | None = None) -> dict:
        """The next JSON event line; RunError on an "error" event, EOF, or the deadline."""
        line = self.reader.readline(self.timeout + 10 if timeout_s is None else timeout_s)
        if line is None:
            raise RunError(f"load generator exited ({self.proc.wait()}) before {want!r}")
        try:
            ev = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"load generator printed {line[:200]!r}") from e
        if ev.get("event") != want:
            raise RunError(f"load generator: {ev.get('error') or ev}")
        return ev

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
