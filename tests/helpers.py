"""Shared test helpers: real processes, real sockets, waits with deadlines."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDR_RE = re.compile(r"listening on (\S+)")


def wait_for(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.02, what: str = "condition"):
    """Poll ``pred`` until truthy or the deadline passes (then fail loudly)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def split_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Proc:
    """A `python -m reactor ...` subprocess; the first stdout line names its address."""

    def __init__(self, args: list[str], *, env: dict | None = None, preexec_fn=None,
                 ready_timeout: float = 10.0, expect_line: bool = True, stdin=subprocess.DEVNULL) -> None:
        e = dict(os.environ)
        e.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            e.update(env)
        self.args = args
        self.p = subprocess.Popen([sys.executable, "-m", "reactor", *args], cwd=ROOT, env=e,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=stdin,
                                  preexec_fn=preexec_fn)
        self.pid = self.p.pid
        # stderr is drained by a thread: a gateway logging one access line per
        # connection would otherwise block on a full pipe
        self._err = bytearray()
        self._err_lock = threading.Lock()
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self.first_line = ""
        self.addr: tuple[str, int] | None = None
        if expect_line:
            self.first_line = self.readline(ready_timeout)
            m = ADDR_RE.search(self.first_line)
            if not m:
                self.kill()
                raise AssertionError(f"no address in first line {self.first_line!r}; "
                                     f"stderr={self.stderr_text()!r}")
            self.addr = split_addr(m.group(1))

    def _drain_stderr(self) -> None:
        f = self.p.stderr
        while True:
            try:
                chunk = f.read1(65536)
            except (OSError, ValueError):
                return
            if not chunk:
                return
            with self._err_lock:
                self._err += chunk

    def stderr_text(self) -> str:
        with self._err_lock:
            return self._err.decode(errors="replace")

    def readline(self, timeout: float = 5.0) -> str:
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise AssertionError(f"no output from {self.args} within {timeout}s")
        return self.p.stdout.readline().decode()

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def signal(self, sig: int) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 10.0) -> int:
        return self.p.wait(timeout)

    def kill(self) -> None:
        if self.p.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.p.wait(5)
        if self.p.stdout:
            self.p.stdout.close()


def connect(addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    return s


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk


def fill_socket(sock: socket.socket) -> int:
    """Write into a non-blocking socket until the kernel refuses more (trio's helper)."""
    sock.setblocking(False)
    total = 0
    chunk = b"x" * 65536
    try:
        while True:
            total += sock.send(chunk)
    except BlockingIOError:
        pass
    return total


def drain_socket(sock: socket.socket) -> int:
    sock.setblocking(False)
    total = 0
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            total += len(data)
    except BlockingIOError:
        pass
    return total
