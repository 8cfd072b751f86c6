"""What one proxied connection costs in syscalls, counted by the loop itself --
and whether the loop's counters are the whole truth, counted by strace.

The figures are the budget the churn benchmark depends on; each line of the
expected table is a syscall we once made and removed, or the floor:

    epoll_ctl 4   ADD client, ADD backend (connect), MOD backend -> read,
                  MOD client (its EOF); no DEL: close() drops the fd from epoll
    shutdown  1   the second direction ends with close(), which sends the FIN
    getsockopt 0  a connect reported EPOLLOUT without ERR/HUP has succeeded
    setsockopt 1  TCP_NODELAY on the backend socket only: accepted sockets
                  inherit it from the listener
    getsockname 0 the accepted fd is never wrapped in a socket object, whose
                  constructor would validate it with getsockname (strace
                  showed that one; our counters had not)
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from bench.strace import parse_summary
from reactor import config as C
from reactor import procnet
from reactor.gateway import Gateway
from reactor.loop import Loop
from tests.backends import ThreadServer
from tests.faults import admin_stats, start_gateway, write_config
from tests.helpers import recv_all, recv_exact, wait_for

N = 30


def echo_until_eof(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()


def quiet_gateway() -> tuple[ThreadServer, Loop, Gateway, tuple]:
    """An in-process gateway in front of one echo backend, with nothing that
    makes syscalls of its own (no access log, admin or health checks)."""
    backend = ThreadServer(echo_until_eof)
    loop = Loop()
    cfg = C.Config(
        gateway=dataclasses.replace(C.GatewayConfig(), listen=(("127.0.0.1", 0),), access_log=False),
        admin=C.AdminConfig(listen=None),
        health=dataclasses.replace(C.HealthConfig(), enabled=False),
        backends=(C.BackendConfig(host="127.0.0.1", port=backend.addr[1]),))
    gw = Gateway(loop, cfg)
    gw.start()
    return backend, loop, gw, gw.listeners[0].sock.getsockname()


def test_one_connection_costs_the_syscall_floor():
    backend, loop, gw, addr = quiet_gateway()
    done = threading.Event()
    after: dict[str, int] = {}

    def check_done() -> None:
        # stopped from a timer, not call_soon_threadsafe: its wake-up read
        # would be one more recv in the count
        if done.is_set():
            after.update(loop.syscalls)
            loop.stop()
        else:
            loop.call_later(0.01, check_done)

    loop.call_soon(check_done)
    t = threading.Thread(target=loop.run, daemon=True)
    before = dict(loop.syscalls)
    t.start()
    try:
        for i in range(N):
            with socket.create_connection(addr, timeout=5) as c:
                c.sendall(b"x")
                c.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := c.recv(16):
                    got += chunk
                assert got == b"x", i
            # the gateway closes its side before the client sees EOF: wait
            # until the relay is gone, so its close is counted in this round
            for _ in range(500):
                if not gw.relays:
                    break
                threading.Event().wait(0.002)
    finally:
        done.set()
        t.join(5)
        counted = {k: (after.get(k, 0) - before.get(k, 0)) / N for k in
                   ("epoll_ctl", "shutdown", "getsockopt", "close", "connect", "socket", "send",
                    "recv", "setsockopt", "ioctl", "getsockname")}
        gw.shutdown()
        loop.close()
        backend.close()
    assert counted == {"epoll_ctl": 4, "shutdown": 1, "getsockopt": 0, "close": 2, "connect": 1,
                       "socket": 1, "send": 2, "recv": 4, "setsockopt": 1, "ioctl": 1,
                       "getsockname": 0}


def test_accepted_sockets_inherit_nodelay():
    """The per-connection setsockopt went away only because Linux copies
    TCP_NODELAY from the listener to each accepted socket: check the real
    client-side socket of a live relay."""
    backend, loop, gw, addr = quiet_gateway()
    c = socket.create_connection(addr, timeout=5)
    try:
        for _ in range(200):
            loop.call_later(0.005, loop.stop)
            loop.run()
            if gw.relays and next(iter(gw.relays)).backend is not None:
                break
        relay = next(iter(gw.relays))
        assert relay.client.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert relay.backend.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        c.close()
        gw.shutdown()
        loop.close()
        backend.close()


# strace name -> our counter's name; several kernel names are one of ours
_STRACE_AS_OURS = {
    "epoll_wait": "epoll_wait", "epoll_pwait": "epoll_wait", "epoll_ctl": "epoll_ctl",
    "accept4": "accept", "accept": "accept", "recvfrom": "recv", "readv": "recv", "read": "recv",
    "sendto": "send", "write": "send", "connect": "connect", "shutdown": "shutdown",
    "close": "close", "socket": "socket", "setsockopt": "setsockopt", "getsockopt": "getsockopt",
    "getsockname": "getsockname", "ioctl": "ioctl", "splice": "splice", "pipe2": "pipe",
    "fcntl": "fcntl",
}
# the allocator's: CPython's, not the loop's, and not on the data path
_MEMORY = {"mmap", "munmap", "brk", "madvise", "mprotect", "mremap"}


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed (make test installs it)")
def test_own_counters_match_strace(spawn, tmp_path):
    """Every syscall the gateway makes on the loop is in its own counters:
    strace -c over churned and ping-ponged connections must agree, name by
    name. A syscall CPython makes behind our back (as socket(fileno=)'s
    getsockname did) shows up here as a difference."""
    backend = ThreadServer(echo_until_eof)
    g = start_gateway(spawn, f"127.0.0.1:{backend.addr[1]}",
                      extra=("--no-access-log", "--idle-timeout", "0", "--config",
                             write_config(tmp_path / "g.toml", "[health]\nenabled = false\n")),
                      admin=True)
    out = tmp_path / "strace.txt"
    tracer = None
    try:
        wait_for(lambda: admin_stats(g)["connections"]["active"] == 0, what="a quiet gateway")
        before = admin_stats(g)["loop"]["syscalls"]
        time.sleep(0.3)  # the /stats connection's own close and the admin's linger
        tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(g.pid)],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        wait_for(lambda: _traced(g.pid), what="strace attached")
        for i in range(N):  # churn: connect, one byte, half-close, read to EOF
            with socket.create_connection(g.addr, timeout=5) as c:
                c.sendall(b"x")
                c.shutdown(socket.SHUT_WR)
                assert recv_all(c) == b"x", i
        conns = [socket.create_connection(g.addr, timeout=5) for _ in range(5)]
        for _ in range(40):  # ping-pong
            for c in conns:
                c.sendall(b"p" * 64)
            for c in conns:
                assert recv_exact(c, 64) == b"p" * 64
        for c in conns:
            c.close()
        wait_for(lambda: not _open_relays(g.pid), what="relays closed")
        time.sleep(0.2)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(15)
        tracer = None
        seen = parse_summary(out.read_text())
        after = admin_stats(g)["loop"]["syscalls"]
    finally:
        if tracer is not None:
            tracer.kill()
            tracer.wait()
        backend.close()
    ours = {k: after[k] - before.get(k, 0) for k in after}
    ours["send"] += ours.pop("write", 0)  # os.write serves both the data path and the log
    ours["recv"] += ours.pop("read", 0)
    theirs: dict[str, int] = {}
    unknown = {}
    for name, row in seen.items():
        if name in _MEMORY:
            continue
        if name not in _STRACE_AS_OURS:
            unknown[name] = row["calls"]
            continue
        key = _STRACE_AS_OURS[name]
        theirs[key] = theirs.get(key, 0) + row["calls"]
    assert not unknown, f"syscalls the loop does not count: {unknown}"
    assert theirs.get("accept", 0) >= N + 5  # the window really held the traffic
    # the /stats request that read "before" is the only slack: its response's
    # send and close land after the snapshot, before or after the attach
    diff = {k: (ours.get(k, 0), theirs.get(k, 0)) for k in set(ours) | set(theirs)
            if abs(ours.get(k, 0) - theirs.get(k, 0)) > 3}
    assert not diff, f"(ours, strace) per syscall: {diff}"


def _open_relays(pid: int) -> int:
    # the gateway's ESTABLISHED sockets, from /proc (no admin request: it would be traced)
    return sum(1 for r in procnet.fd_table(pid) if r.family in ("inet", "inet6") and r.state == "ESTABLISHED")
