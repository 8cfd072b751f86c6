"""Helpers for the fault-injection tests: a gateway under test, its baseline,
a well-behaved client that times round trips while others misbehave.

Nothing here mocks the kernel: fds are counted in /proc/PID/fd, sockets are
read from the gateway's own /proc tables (the code behind ``reactor fds``),
memory is the process's RSS.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import math
import os
import re
import resource
import select
import statistics
import subprocess
import sys
import time
import urllib.request

import psutil

from reactor import procnet
from tests.helpers import wait_for

ACCESS_RE = re.compile(r"event=access client=(\S+) backend=(\S+) bytes_in=(\d+) bytes_out=(\d+) "
                       r"duration=(\S+) reason=(\S+)")
ADMIN_RE = re.compile(r"admin=(\S+)")


def have_admin() -> bool:
    """The admin endpoint (branch admin) is merged: the checks that read /stats run."""
    return importlib.util.find_spec("reactor.admin") is not None


def spec(proc) -> str:
    return f"{proc.addr[0]}:{proc.addr[1]}"


def echo_backend(spawn, port: int = 0):
    return spawn("serve", "--listen", f"127.0.0.1:{port}", "--mode", "echo")


def write_config(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def start_gateway(spawn, *backends: str, extra: tuple = (), admin: bool | None = None, **kw):
    """`reactor gateway` on 127.0.0.1:0. With ``admin`` (default: when the
    module exists) the admin endpoint listens on 127.0.0.1:0 and
    ``proc.admin_addr`` is set; otherwise it is off."""
    if admin is None:
        admin = have_admin()
    args = ["gateway", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0" if admin else "off"]
    for b in backends:
        args += ["--backend", b]
    g = spawn(*args, *extra, **kw)
    g.admin_addr = None
    m = ADMIN_RE.search(g.first_line)
    if admin and m and m.group(1) != "off":
        host, _, port = m.group(1).rpartition(":")
        g.admin_addr = (host.strip("[]"), int(port))
    return g


def admin_get(addr: tuple[str, int], path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP GET to the admin endpoint: (status, body)."""
    url = f"http://{addr[0]}:{addr[1]}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def admin_stats(g) -> dict | None:
    if g.admin_addr is None:
        return None
    status, body = admin_get(g.admin_addr, "/stats")
    assert status == 200, body[:200]
    return json.loads(body)


# -- the gateway's resources ------------------------------------------------------------

def inet_states(pid: int) -> collections.Counter:
    """States of a process's TCP/UDP sockets, from its own /proc tables (the code
    behind `reactor fds`). A TCP socket the kernel has already unhashed (reset or
    closed under the process, not yet closed by it) is in no table: "UNLISTED"."""
    c: collections.Counter = collections.Counter()
    for r in procnet.fd_table(pid):
        if r.family in ("inet", "inet6"):
            c[r.state] += 1
        elif r.type == "socket":  # (or closed while the tables were read: proto unknown)
            c["UNLISTED"] += 1
    return c


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class Baseline:
    """What an idle gateway holds: its fd count (and its listeners). After a
    fault, ``wait_back`` polls until the gateway is back there: same fd count,
    no connected socket left, and (with the admin endpoint) no live relay.

    With ``--workers`` the gateway's children count too: fds and sockets are
    summed over the process and its descendants.
    """

    def __init__(self, g) -> None:
        self.g = g
        # health checks open short-lived sockets, relays of a warm-up may still be
        # closing: wait for the fd count to hold still, then read the socket tables
        # (a walk of the host's whole /proc/net/tcp: once, not per poll)
        prev = [-1]

        def settled():
            n = self.fd_count()
            if n != prev[0]:
                prev[0] = n
                return None
            return self._quiet_sample()
        self.fds, self.states = wait_for(settled, timeout=10, interval=0.1, what="an idle gateway")

    def pids(self) -> list[int]:
        try:
            kids = psutil.Process(self.g.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            kids = []
        return [self.g.pid] + [k.pid for k in kids]

    def fd_count(self) -> int:
        return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in self.pids())

    def states_now(self) -> collections.Counter:
        c: collections.Counter = collections.Counter()
        for pid in self.pids():
            c += inet_states(pid)
        return c

    def rss(self) -> int:
        return sum(rss(pid) for pid in self.pids())

    def _quiet_sample(self) -> tuple[int, dict] | None:
        """(fd count, socket states) when no connection is open, else None. Sockets
        in no table ("UNLISTED") are allowed: a supervisor's bound, never-listening
        port reservation is one."""
        # the count must not move while the tables are read: closing relays race the read
        n = self.fd_count()
        states = dict(self.states_now())
        if set(states) <= {"LISTEN", "UNLISTED"} and self.fd_count() == n:
            return n, states
        return None

    def check(self) -> str | None:
        """None when back at baseline, else what differs (for the failure message)."""
        if self.g.p.poll() is not None:
            raise AssertionError(f"gateway exited with {self.g.p.returncode}: "
                                 f"{self.g.stderr_text()[-2000:]}")
        n = self.fd_count()
        if n != self.fds:  # cheap: the socket tables are read only once the count is right
            return f"fds {n} (baseline {self.fds})"
        states = dict(self.states_now())
        stats = admin_stats(self.g)
        active = stats["connections"]["active"] if stats is not None else 0
        if states == self.states and active == 0:
            return None
        return f"fds {n} (baseline {self.fds}), sockets {states} (baseline {self.states}), relays {active}"

    def wait_back(self, timeout: float = 10.0) -> None:
        last = {"why": ""}

        def back():
            why = self.check()
            last["why"] = why or ""
            return why is None
        try:
            wait_for(back, timeout=timeout, interval=0.05, what="baseline")
        except AssertionError:
            raise AssertionError(f"gateway not back to baseline after {timeout}s: {last['why']}") from None


def fds_cli_json(pid: int) -> list[dict]:
    """`reactor fds PID --json`, as a user would run it."""
    import subprocess

    from tests.helpers import ROOT

    r = subprocess.run([sys.executable, "-m", "reactor", "fds", str(pid), "--json"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def access_records(g) -> list[tuple]:
    return ACCESS_RE.findall(g.stderr_text())


def wait_access(g, n: int, timeout: float = 10.0) -> list[tuple]:
    def found():
        lines = access_records(g)
        return lines if len(lines) >= n else None
    try:
        return wait_for(found, timeout=timeout, what=f"{n} access lines")
    except AssertionError:
        lines = access_records(g)
        other = [x for x in g.stderr_text().splitlines() if "event=access" not in x]
        raise AssertionError(
            f"{len(lines)} of {n} access lines after {timeout}s; reasons "
            f"{dict(collections.Counter(r[5] for r in lines))}; gateway fds {g.fd_count()}, "
            f"sockets {dict(inet_states(g.pid))}; other log lines: {other[-10:]}") from None


# -- limits -------------------------------------------------------------------------

@contextlib.contextmanager
def nofile(n: int):
    """Raise this process's RLIMIT_NOFILE to ``n`` (children inherit it); restore after.
    Needs root (CAP_SYS_RESOURCE) when ``n`` is above the hard limit."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, old[1])))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def can_raise_nofile(n: int) -> bool:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= n:
        return True
    try:
        with nofile(n):
            return True
    except (ValueError, OSError):
        return False


# -- a well-behaved client ------------------------------------------------------------

class RttProbe:
    """A well-behaved client that does one echo round trip every ``interval``
    through the gateway on its own connection, timing each, while the test
    attacks the gateway. It runs in its own process (tests/rtt_probe.py), so
    the test's own work cannot hold it up and inflate the figures.

    A round trip that fails (reset, EOF, timeout) is recorded as an error: the
    well-behaved client must never be disturbed by the misbehaving ones. The
    probe keeps one connection for its whole life, so an idle timeout or a
    relay torn down by mistake shows up as an error too.
    """

    def __init__(self, addr: tuple[str, int], interval: float = 0.02, size: int = 64,
                 source: str | None = None, preamble: bytes = b"") -> None:
        self.args = [sys.executable, os.path.join(os.path.dirname(__file__), "rtt_probe.py"),
                     addr[0], str(addr[1]), str(interval), str(size), source or "-"]
        if preamble:
            self.args.append(preamble.hex())
        self.rtts: list[float] = []
        self.errors: list[str] = []

    def __enter__(self) -> RttProbe:
        self.p = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        try:
            r, _, _ = select.select([self.p.stdout], [], [], 10)
            line = self.p.stdout.readline() if r else b""
            if line.strip() != b"ready":
                raise AssertionError(f"probe did not start: {line!r} {self._stderr()}")
        except BaseException:
            self._kill()
            raise
        return self

    def _stderr(self) -> str:
        self.p.kill()
        return self.p.stderr.read().decode(errors="replace")[-2000:]

    def _kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(5)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            with contextlib.suppress(OSError):
                f.close()

    def __exit__(self, *exc) -> None:
        try:
            self.p.stdin.close()
            r, _, _ = select.select([self.p.stdout], [], [], 15)
            line = self.p.stdout.readline() if r else b""
            if line:
                result = json.loads(line)
                self.rtts, self.errors = result["rtts"], result["errors"]
            else:
                self.errors.append(f"probe gave no result: {self._stderr()}")
        finally:
            self._kill()

    def summary(self) -> str:
        if not self.rtts:
            return "no round trips"
        s = sorted(self.rtts)
        p99 = s[max(0, math.ceil(0.99 * len(s)) - 1)]  # nearest rank
        return (f"{len(s)} round trips, p50 {1000 * statistics.median(s):.1f} ms, "
                f"p99 {1000 * p99:.1f} ms, max {1000 * s[-1]:.1f} ms")

    def assert_ok(self, bound: float, min_trips: int = 5) -> None:
        assert not self.errors, f"well-behaved client failed: {self.errors}"
        assert len(self.rtts) >= min_trips, f"well-behaved client starved: {self.summary()}"
        assert max(self.rtts) < bound, f"round trip over {bound}s: {self.summary()}"


# -- dropping privileges ----------------------------------------------------------------

NOBODY = 65534


def run_cli_as(uid: int, argv: list[str], timeout: float = 30.0) -> tuple[int, str, str]:
    """``reactor.cli.main(argv)`` in a forked child running as ``uid``: (exit, stdout, stderr).

    A fork, not an exec: our interpreter may live where nobody may not run it
    (/root). For commands that exit at once with a message (outputs fit a pipe).
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        rc = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            # import while still root: the stdlib may live where nobody may not read
            import encodings.idna  # noqa: F401 - getaddrinfo() encodes host names with it
            import tomllib  # noqa: F401

            from reactor.cli import build_parser, main
            build_parser()  # imports every command module
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            rc = main(argv)
        except BaseException:  # a traceback is exactly what the test must see
            import traceback

            traceback.print_exc()
            rc = 98
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    os.close(out_w)
    os.close(err_w)
    with open(out_r, "rb") as o, open(err_r, "rb") as e:
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError(f"{argv} as uid {uid} did not exit within {timeout}s")
            time.sleep(0.02)
        out, err = o.read(), e.read()
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace"), err.decode(errors="replace")
