"""`reactor gateway` end to end: real processes, real sockets on 127.0.0.1."""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import selectors
import signal
import socket
import struct
import time

import psutil
import pytest

from tests.backends import ThreadServer, free_port
from tests.helpers import recv_all, wait_for

ACCESS_RE = re.compile(r"event=access client=(\S+) backend=(\S+) bytes_in=(\d+) bytes_out=(\d+) "
                       r"duration=(\S+) reason=(\S+)")


def access_lines(proc, n: int, timeout: float = 10.0) -> list[tuple]:
    """Wait until the gateway logged ``n`` access lines; return their fields."""
    def found():
        lines = ACCESS_RE.findall(proc.stderr_text())
        return lines if len(lines) >= n else None
    return wait_for(found, timeout=timeout, what=f"{n} access lines")


def gateway(spawn, *backends: str, extra: tuple = ()):
    args = ["gateway", "--listen", "127.0.0.1:0", "--admin", "off"]
    for b in backends:
        args += ["--backend", b]
    return spawn(*args, *extra)


@pytest.fixture
def echo_backends(spawn):
    return [spawn("serve", "--listen", "127.0.0.1:0", "--mode", "echo") for _ in range(3)]


def spec(p) -> str:
    return f"{p.addr[0]}:{p.addr[1]}"


# -- distribution ---------------------------------------------------------------

@pytest.mark.parametrize("policy,tol", [
    ("round_robin", 0.01), ("random", 0.07), ("least_conn", 0.07), ("p2c", 0.07), ("maglev", 0.07),
])
def test_weighted_distribution_per_policy(spawn, echo_backends, policy, tol):
    """600 connections (held open 20 at a time, from 600 distinct loopback
    source addresses) over backends weighted 1/1/2: each policy within ``tol``
    of the expected 25/25/50 shares, counted from the access log."""
    b = echo_backends
    g = gateway(spawn, spec(b[0]), spec(b[1]), spec(b[2]) + "@2",
                extra=("--balance", policy, "--idle-timeout", "0"))
    n, held = 600, collections.deque()
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
        s.connect(g.addr)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        held.append(s)
        if len(held) > 20:
            held.popleft().close()
    for s in held:
        s.close()
    lines = access_lines(g, n)
    counts = collections.Counter(line[1] for line in lines)
    shares = [counts[spec(p)] / n for p in b]
    for got, want in zip(shares, (0.25, 0.25, 0.5)):
        assert abs(got - want) <= tol, f"{policy}: shares {shares}"


# -- integrity --------------------------------------------------------------------

def test_200_clients_random_sizes_echo_intact_none_crossed(spawn, echo_backends):
    g = gateway(spawn, *(spec(p) for p in echo_backends), extra=("--idle-timeout", "0"))
    rng = random.Random(7)
    sizes = [int(2 ** rng.uniform(10, 22)) for _ in range(200)]  # log-uniform, 1 KiB .. 4 MiB
    sizes[:3] = [4 << 20, 3 << 20, 1]
    sel = selectors.DefaultSelector()
    st = {}
    for i, size in enumerate(sizes):
        s = socket.create_connection(g.addr)
        s.setblocking(False)
        # a per-client header makes a crossed stream detectable even by size
        payload = struct.pack("!I", i) + os.urandom(size)
        st[s] = [memoryview(payload), hashlib.sha256(payload).hexdigest(), hashlib.sha256(), 0]
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    done, deadline = 0, time.monotonic() + 90
    while done < len(sizes):
        assert time.monotonic() < deadline, f"only {done} clients finished"
        for key, ev in sel.select(1):
            s = key.fileobj
            rec = st[s]
            if ev & selectors.EVENT_WRITE and rec[0]:
                try:
                    rec[0] = rec[0][s.send(rec[0][:262144]):]
                except BlockingIOError:
                    pass
                if not rec[0]:
                    s.shutdown(socket.SHUT_WR)  # half-close after sending
                    sel.modify(s, selectors.EVENT_READ)
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(262144)
                except BlockingIOError:
                    continue
                if data:
                    rec[2].update(data)
                    rec[3] += len(data)
                else:
                    sel.unregister(s)
                    s.close()
                    done += 1
    for _s, (_, want, got, _n) in st.items():
        assert got.hexdigest() == want, "echo differs: corrupted or crossed"


def test_slow_client_reading_50mib_keeps_gateway_rss_bounded(spawn):
    size = 50 << 20
    chunk = os.urandom(1 << 20)

    def source(conn):
        for _ in range(size // len(chunk)):
            conn.sendall(chunk)
        conn.close()

    backend = ThreadServer(source)
    try:
        g = gateway(spawn, backend.spec, extra=("--buffer-limit", "262144"))
        proc = psutil.Process(g.pid)
        rss0 = proc.memory_info().rss
        c = socket.create_connection(g.addr)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        got, peak, deadline = 0, rss0, time.monotonic() + 60
        while got < size:
            assert time.monotonic() < deadline
            data = c.recv(32768)
            if not data:
                break
            got += len(data)
            if got % (1 << 20) < 32768:
                peak = max(peak, proc.memory_info().rss)
                time.sleep(0.002)  # a slow reader
        assert got == size
        growth = peak - rss0
        # the relay holds at most ~buffer_limit per direction; allow a few limits
        # of allocator slack -- without backpressure this would be ~50 MiB
        assert growth < 8 * 262144 + 4 * 2**20, f"gateway RSS grew {growth / 2**20:.1f} MiB"
        c.close()
    finally:
        backend.close()


# -- failures ---------------------------------------------------------------------

def test_refusing_backend_is_retried_elsewhere_client_does_not_notice(spawn, echo_backends):
    dead = f"127.0.0.1:{free_port()}"
    g = gateway(spawn, dead, spec(echo_backends[0]), extra=("--retries", "2"))
    for i in range(6):
        with socket.create_connection(g.addr, timeout=5) as c:
            c.sendall(b"ping%d" % i)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"ping%d" % i
    lines = access_lines(g, 6)
    assert {line[1] for line in lines} == {spec(echo_backends[0])}


def test_blackholed_backend_connect_timeout_honoured(spawn):
    # a listener that never accepts, its tiny backlog filled: SYNs go unanswered
    bh = socket.socket()
    bh.bind(("127.0.0.1", 0))
    bh.listen(0)
    fillers = []
    for _ in range(8):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(bh.getsockname())
        fillers.append(f)
    time.sleep(0.2)
    try:
        g = gateway(spawn, f"127.0.0.1:{bh.getsockname()[1]}",
                    extra=("--connect-timeout", "0.5", "--retries", "0"))
        t0 = time.monotonic()
        with socket.create_connection(g.addr, timeout=10) as c:
            c.sendall(b"hello")
            assert c.recv(10) == b""
        took = time.monotonic() - t0
        assert 0.4 <= took < 2.0, f"closed after {took:.2f}s, connect_timeout is 0.5s"
        (line,) = access_lines(g, 1)
        assert line[5] == "connect_failed"
    finally:
        for f in fillers:
            f.close()
        bh.close()


def test_all_backends_down_client_closed_at_once(spawn):
    g = gateway(spawn, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                extra=("--connect-timeout", "2"))
    for _ in range(5):
        t0 = time.monotonic()
        with socket.create_connection(g.addr, timeout=10) as c:
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass
        assert time.monotonic() - t0 < 0.5
    reasons = {line[5] for line in access_lines(g, 5)}
    # first: both refused; then both passively ejected -> no backend at all
    assert reasons <= {"connect_failed", "no_backend"} and "no_backend" in reasons


def test_active_health_check_rise_and_fall(spawn):
    port = free_port()
    echo = spawn("serve", "--listen", "127.0.0.1:0", "--mode", "echo")
    g = gateway(spawn, f"127.0.0.1:{port}", spec(echo), extra=("--config", _health_toml(port, echo)))
    # the dead backend goes down after `fall` failed checks...
    wait_for(lambda: b"event=backend_down backend=127.0.0.1:%d" % port in _peek_stderr(g), timeout=5,
             what="backend_down")
    # ...and comes back only after `rise` good ones
    srv = spawn("serve", "--listen", f"127.0.0.1:{port}", "--mode", "echo")
    wait_for(lambda: b"event=backend_up backend=127.0.0.1:%d checks_ok=2" % port in _peek_stderr(g),
             timeout=5, what="backend_up after rise=2")
    srv.kill()


def _peek_stderr(proc) -> bytes:
    return proc.stderr_text().encode()


def _health_toml(port: int, echo) -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    f.write(f"""
[gateway]
listen = "127.0.0.1:0"
[health]
interval = 0.1
timeout = 0.2
rise = 2
fall = 2
[admin]
listen = ""
[[backend]]
address = "127.0.0.1:{port}"
[[backend]]
address = "{spec(echo)}"
""")
    f.close()
    return f.name


# -- half-close, idle, limits --------------------------------------------------------

def test_half_close_client_first_backend_still_answers(spawn):
    def backend(conn):
        data = recv_all(conn)             # until the client's EOF arrives through the gateway
        conn.sendall(b"got:" + data)      # the other direction still works
        conn.close()

    srv = ThreadServer(backend)
    try:
        g = gateway(spawn, srv.spec)
        with socket.create_connection(g.addr, timeout=5) as c:
            c.sendall(b"request")
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b"got:request"
        (line,) = access_lines(g, 1)
        assert line[5] == "client_eof" and line[2:4] == ("7", "11")
    finally:
        srv.close()


def test_half_close_backend_first_client_still_sends(spawn):
    received = []

    def backend(conn):
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)     # backend is done talking, still listening
        received.append(recv_all(conn))
        conn.close()

    srv = ThreadServer(backend)
    try:
        g = gateway(spawn, srv.spec)
        with socket.create_connection(g.addr, timeout=5) as c:
            assert recv_all(c) == b"banner"   # EOF from the backend reached us
            c.sendall(b"late data")
            c.shutdown(socket.SHUT_WR)
            wait_for(lambda: received, what="backend to receive the late data")
        assert received == [b"late data"]
        (line,) = access_lines(g, 1)
        assert line[5] == "backend_eof"
    finally:
        srv.close()


def test_rst_from_client_closes_backend(spawn):
    seen = []

    def backend(conn):
        try:
            seen.append(conn.recv(100))
            seen.append(conn.recv(100))
        except ConnectionResetError:
            seen.append("reset")

    srv = ThreadServer(backend)
    try:
        g = gateway(spawn, srv.spec)
        c = socket.create_connection(g.addr, timeout=5)
        c.sendall(b"abc")
        wait_for(lambda: seen, what="backend got data")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        wait_for(lambda: len(seen) == 2, what="backend side closed")
        assert seen[0] == b"abc" and seen[1] in (b"", "reset")
        (line,) = access_lines(g, 1)
        assert "client_reset" in line[5]
    finally:
        srv.close()


def test_idle_timeout_closes_both(spawn):
    closed = []

    def backend(conn):
        closed.append(conn.recv(10))  # blocks until the gateway closes us

    srv = ThreadServer(backend)
    try:
        g = gateway(spawn, srv.spec, extra=("--idle-timeout", "0.5"))
        t0 = time.monotonic()
        with socket.create_connection(g.addr, timeout=10) as c:
            assert c.recv(10) == b""
        took = time.monotonic() - t0
        assert 0.4 <= took < 2.5, took
        wait_for(lambda: closed == [b""], what="backend side closed too")
        (line,) = access_lines(g, 1)
        assert line[5] == "idle_timeout"
    finally:
        srv.close()


def test_max_connections_and_per_ip_caps(spawn, echo_backends):
    g = gateway(spawn, spec(echo_backends[0]),
                extra=("--max-connections", "5", "--max-connections-per-ip", "3"))
    held = []
    for _ in range(3):
        c = socket.create_connection(g.addr, timeout=5)
        c.sendall(b"x")
        assert c.recv(1) == b"x"
        held.append(c)
    # a 4th from the same IP is refused at once
    with socket.create_connection(g.addr, timeout=5) as c:
        assert c.recv(1) == b""
    # other source IPs still get in, up to the global cap of 5
    for ip in ("127.0.0.2", "127.0.0.3"):
        c = socket.create_connection(g.addr, timeout=5, source_address=(ip, 0))
        c.sendall(b"y")
        assert c.recv(1) == b"y"
        held.append(c)
    with socket.create_connection(g.addr, timeout=5, source_address=("127.0.0.4", 0)) as c:
        assert c.recv(1) == b""
    for c in held:
        c.close()
    reasons = collections.Counter(line[5] for line in access_lines(g, 7))
    assert reasons["max_connections_per_ip"] == 1 and reasons["max_connections"] == 1
    # the slots free up again
    with socket.create_connection(g.addr, timeout=5) as c:
        c.sendall(b"z")
        assert c.recv(1) == b"z"


def test_early_data_held_until_backend_connects(spawn):
    """The first backend is blackholed: the client's bytes wait in the relay
    through a connect timeout and a retry, then reach the second backend."""
    got = []

    def backend(conn):
        got.append(recv_all(conn))
        conn.close()

    bh = socket.socket()
    bh.bind(("127.0.0.1", 0))
    bh.listen(0)
    fillers = []
    for _ in range(8):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(bh.getsockname())
        fillers.append(f)
    srv = ThreadServer(backend)
    try:
        g = gateway(spawn, f"127.0.0.1:{bh.getsockname()[1]}", srv.spec,
                    extra=("--connect-timeout", "0.3", "--retries", "1", "--balance", "round_robin"))
        t0 = time.monotonic()
        with socket.create_connection(g.addr, timeout=5) as c:
            c.sendall(b"early" * 1000)
            c.shutdown(socket.SHUT_WR)
            assert recv_all(c) == b""
        assert time.monotonic() - t0 >= 0.3  # it did wait out the blackhole
        wait_for(lambda: got, what="backend got data")
        assert got == [b"early" * 1000]
    finally:
        srv.close()
        for f in fillers:
            f.close()
        bh.close()


def test_gateway_sigterm_with_no_relays_exits_zero(spawn, echo_backends):
    g = gateway(spawn, spec(echo_backends[0]))
    g.signal(signal.SIGTERM)
    assert g.wait() == 0


def test_finished_relays_are_freed_by_refcount_not_gc():
    """A finished relay holds no reference cycle: with the cyclic GC off, no
    Relay or Stream object survives its connection."""
    import dataclasses
    import gc

    from reactor import config as C
    from reactor.commands.serve import Server
    from reactor.gateway import Gateway
    from reactor.listener import bind_socket
    from reactor.loop import Loop
    from reactor.relay import Relay
    from reactor.stream import Stream

    loop = Loop()
    bsock = bind_socket("127.0.0.1", 0)
    srv = Server(loop, bsock, "echo")
    cfg = C.Config(
        gateway=dataclasses.replace(C.GatewayConfig(), listen=(("127.0.0.1", 0),), access_log=False),
        admin=C.AdminConfig(listen=None),
        health=dataclasses.replace(C.HealthConfig(), enabled=False),
        backends=(C.BackendConfig(host="127.0.0.1", port=bsock.getsockname()[1]),))
    gw = Gateway(loop, cfg)
    gw.start()
    addr = gw.listeners[0].sock.getsockname()

    def live(kind):
        return sum(1 for o in gc.get_objects() if type(o) is kind)

    def turn():
        loop.call_later(0.005, loop.stop)
        loop.run()

    gc.collect()
    gc.disable()
    try:
        for _ in range(20):
            c = socket.create_connection(addr)
            c.setblocking(False)
            c.sendall(b"ping")
            got = b""
            deadline = time.monotonic() + 5
            while got != b"ping" and time.monotonic() < deadline:
                turn()
                try:
                    got += c.recv(4)
                except BlockingIOError:
                    pass
            assert got == b"ping"
            c.close()
        deadline = time.monotonic() + 5
        while (gw.relays or srv.conns) and time.monotonic() < deadline:
            turn()
        assert not gw.relays
        assert live(Relay) == 0 and live(Stream) == 0
    finally:
        gc.enable()
        gw.shutdown()
        srv.close()
        loop.close()
