"""Hostile clients: each attack runs while a well-behaved client (``RttProbe``)
does echo round trips through the same gateway on one long-lived connection.
Throughout, every one of its round trips must succeed and stay under
``RTT_BOUND``; afterwards the gateway is back to its baseline (fds, sockets,
relays) and has logged exactly one access line per attacking connection.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import struct
import threading
import time

import pytest

from reactor.proxyproto import encode_v1
from tests.backends import ThreadServer
from tests.faults import (
    Baseline,
    RttProbe,
    access_records,
    admin_get,
    admin_stats,
    echo_backend,
    rss,
    spec,
    start_gateway,
    wait_access,
    write_config,
)
from tests.helpers import wait_for

# A well-behaved client's echo round trip (64 bytes) must stay under this while
# the gateway is under attack. Measured here (2 cores, shared): p99 of a few ms,
# worst cases of tens of ms under churn; the bound allows for a noisy machine.
RTT_BOUND = 0.5

LINGER_RST = struct.pack("ii", 1, 0)


def rst_close(s: socket.socket) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    s.close()


def wait_closed(socks: dict[socket.socket, float], timeout: float) -> dict[socket.socket, float]:
    """Wait until the gateway closed each socket (EOF or RST); return when,
    relative to the time given for it."""
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks):
        assert time.monotonic() < deadline, f"{len(socks) - len(closed)} sockets still open"
        r, _, _ = select.select([s for s in socks if s not in closed], [], [], 0.1)
        for s in r:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if data == b"":
                closed[s] = time.monotonic() - socks[s]
    return closed


@pytest.fixture
def backend(spawn):
    return echo_backend(spawn)


# -- a client that connects and sends nothing -----------------------------------------------

def test_silent_clients_closed_at_idle_timeout_busy_client_kept(spawn, backend):
    g = start_gateway(spawn, spec(backend), extra=("--idle-timeout", "0.5"))
    base = Baseline(g)
    with RttProbe(g.addr, interval=0.05) as probe:
        opened = {}
        for _ in range(100):
            s = socket.create_connection(g.addr, timeout=10)
            opened[s] = time.monotonic()
        # the sweep runs every idle_timeout/4: closed between 0.5 and ~0.75 s after connect
        took = wait_closed(opened, timeout=10)
        for s in opened:
            s.close()
        # the busy client has outlived three idle timeouts by now, and stays up
        wait_for(lambda: time.monotonic() - min(opened.values()) > 1.5, timeout=5,
                 what="three idle timeouts")
    probe.assert_ok(RTT_BOUND)
    assert 0.45 <= min(took.values()) and max(took.values()) < 1.5, sorted(took.values())
    reasons = collections.Counter(r[5] for r in wait_access(g, 101))
    assert reasons == {"idle_timeout": 100, "client_eof": 1}, reasons
    base.wait_back()
    print(f"\nsilent clients closed after {min(took.values()):.2f}..{max(took.values()):.2f}s; "
          f"probe {probe.summary()}")


# -- clients that never read --------------------------------------------------------------------

def test_clients_that_never_read_hold_gateway_memory_bounded(spawn):
    """Backends stream without end to clients that never read: the gateway's
    queue toward each client stops at buffer_limit and it stops reading the
    backend, so the backend's sends block; the gateway's memory stays bounded."""
    limit, hogs_n = 65536, 20
    sent = [0]
    lock = threading.Lock()
    chunk = os.urandom(65536)

    def source(conn: socket.socket) -> None:
        if select.select([conn], [], [], 0.3)[0]:  # the probe speaks first: echo it
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.close()  # the probe's EOF, answered: the relay can finish
            return
        while True:
            conn.sendall(chunk)  # blocks once the whole path is full
            with lock:
                sent[0] += len(chunk)

    srv = ThreadServer(source)
    try:
        g = start_gateway(spawn, srv.spec, extra=("--buffer-limit", str(limit)))
        base = Baseline(g)
        rss0 = rss(g.pid)
        hogs = []
        with RttProbe(g.addr) as probe:
            for _ in range(hogs_n):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # a small window
                s.connect(g.addr)
                hogs.append(s)
            # until nothing moves any more: the backends' sends are all blocked
            last, still, peak = -1, 0, rss0
            deadline = time.monotonic() + 20
            while still < 3:
                assert time.monotonic() < deadline, f"still streaming after 20 s: {sent[0]}"
                time.sleep(0.1)  # the sampling period, not a synchronisation
                with lock:
                    now = sent[0]
                still = still + 1 if now == last and len(srv.conns) > hogs_n else 0
                last = now
                peak = max(peak, rss(g.pid))
        probe.assert_ok(RTT_BOUND)
        growth = peak - rss0
        # Per stalled relay the gateway queues at most buffer_limit plus one read
        # (64 KiB) toward the client; allow twice that, and 4 MiB of allocator slack.
        bound = hogs_n * 2 * (limit + 65536) + (4 << 20)
        print(f"\n{hogs_n} clients that never read: backends got {sent[0] / 2**20:.1f} MiB out before "
              f"the path filled; gateway RSS grew {growth / 2**20:.2f} MiB (bound "
              f"{bound / 2**20:.1f} MiB); probe {probe.summary()}")
        assert growth < bound
        for s in hogs:
            s.close()  # with unread data: the kernel sends RST
        base.wait_back()
        reasons = {r[5] for r in wait_access(g, hogs_n + 1)}
        assert reasons <= {"client_reset", "client_eof"}, reasons
    finally:
        srv.close()


# -- RST mid-stream ----------------------------------------------------------------------------

def test_rst_mid_stream(spawn, backend):
    g = start_gateway(spawn, spec(backend))
    base = Baseline(g)
    n = 300
    with RttProbe(g.addr) as probe:
        for _ in range(n // 20):
            batch = [socket.create_connection(g.addr, timeout=10) for _ in range(20)]
            for s in batch:
                s.sendall(os.urandom(128 * 1024))
            for s in batch:
                assert s.recv(1024)  # the echo is flowing back through the relay...
            for s in batch:
                rst_close(s)  # ...and the client resets it mid-stream
    probe.assert_ok(RTT_BOUND)
    records = wait_access(g, n + 1)
    assert len(records) == n + 1
    reasons = collections.Counter(r[5] for r in records)
    assert reasons["client_reset"] == n, reasons
    base.wait_back()
    print(f"\nprobe {probe.summary()}")


# -- 1-byte writes -----------------------------------------------------------------------------

def test_one_byte_writes_arrive_whole_and_in_order(spawn, backend):
    g = start_gateway(spawn, spec(backend))
    base = Baseline(g)
    clients, size = 20, 2000
    socks = {}
    for i in range(clients):
        s = socket.create_connection(g.addr, timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks[s] = (bytes([65 + i]) + os.urandom(size - 1), bytearray())
    with RttProbe(g.addr) as probe:
        for k in range(size):  # one byte per send(), round robin over the clients
            for s, (payload, got) in socks.items():
                s.send(payload[k:k + 1])
                r, _, _ = select.select([s], [], [], 0)
                if r:
                    got += s.recv(65536)
        for s, (_, got) in socks.items():
            s.shutdown(socket.SHUT_WR)
            s.settimeout(10)
            while True:
                data = s.recv(65536)
                if not data:
                    break
                got += data
    probe.assert_ok(RTT_BOUND)
    for s, (payload, got) in socks.items():
        assert bytes(got) == payload
        s.close()
    base.wait_back()
    print(f"\nprobe {probe.summary()}")


# -- churn: connect and close at once, as fast as possible -----------------------------------

def test_connect_close_churn(spawn, backend):
    g = start_gateway(spawn, spec(backend))
    base = Baseline(g)
    accepted_before = admin_stats(g)["connections"]["accepted_total"]
    per_thread, threads = 600, 2
    errors: list[str] = []

    def churn(k: int) -> None:
        for i in range(per_thread):
            s = socket.socket()
            try:
                s.connect(g.addr)
            except OSError as exc:
                errors.append(repr(exc))
                s.close()
                continue
            if (i + k) % 2:
                s.close()
            else:
                rst_close(s)

    with RttProbe(g.addr) as probe:
        t0 = time.monotonic()
        ts = [threading.Thread(target=churn, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        took = time.monotonic() - t0
    probe.assert_ok(RTT_BOUND)
    assert not errors, errors[:5]
    n = per_thread * threads
    clean = n // 2 + 1  # the FIN-closed half, and the probe
    wait_access(g, clean)
    base.wait_back()  # every relay has ended
    accepted = admin_stats(g)["connections"]["accepted_total"] - accepted_before
    wait_access(g, accepted)
    records = access_records(g)
    reasons = collections.Counter(r[5] for r in records)
    assert len(records) == accepted, "one access line per accepted connection, no more, no less"
    assert reasons["client_eof"] == clean, reasons
    # A client that resets right after connect() returned can die in the kernel before
    # accept(): if its handshake's last ACK found the accept queue busy, the RST then
    # kills the half-open request, and no process ever sees it (seen here under CPU
    # load: 1 of 600). The kernel counts those, we cannot; all others are logged.
    assert n // 2 - n // 100 <= reasons["client_reset"] <= n // 2, reasons
    print(f"\n{n} connect/close in {took:.1f}s ({n / took:.0f}/s), {n + 1 - accepted} never "
          f"accepted; probe {probe.summary()}")


# -- slowloris --------------------------------------------------------------------------------

def slowloris(addr: tuple[str, int], text: bytes, n: int, every: float, until: float) -> dict:
    """``n`` clients each sending ``text`` one byte every ``every`` seconds; returns
    {socket: seconds from its connect to the gateway closing it}."""
    opened = {}
    for _ in range(n):
        s = socket.create_connection(addr, timeout=10)
        opened[s] = time.monotonic()
    closed: dict[socket.socket, float] = {}
    k, next_at, deadline = 0, time.monotonic(), time.monotonic() + until
    while len(closed) < n:
        now = time.monotonic()
        assert now < deadline, f"{n - len(closed)} slow clients still open after {until}s"
        if now >= next_at and k < len(text):
            for s in opened:
                if s not in closed:
                    try:
                        s.send(text[k:k + 1])
                    except OSError:
                        closed[s] = now - opened[s]
            k += 1
            next_at += every
        r, _, _ = select.select([s for s in opened if s not in closed], [], [],
                                max(0.0, min(0.05, next_at - now)))
        for s in r:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if data == b"":
                closed[s] = time.monotonic() - opened[s]
    for s in opened:
        s.close()
    return closed


def test_slowloris_on_accept_proxy_listener(spawn, backend, tmp_path):
    """A PROXY header dribbled a byte at a time never completes: the client is
    closed at proxy_timeout (counted from accept, not reset by each byte),
    while a client that sends its header at once is served throughout."""
    cfg = write_config(tmp_path / "proxy.toml", """
[gateway]
accept_proxy = true
trusted_sources = ["127.0.0.0/8"]
proxy_timeout = 1.0
""")
    g = start_gateway(spawn, spec(backend), extra=("--config", cfg))
    base = Baseline(g)
    header = encode_v1(("192.0.2.7", 4242), ("127.0.0.1", g.addr[1]))
    with RttProbe(g.addr, preamble=header) as probe:
        took = slowloris(g.addr, header[:-2], 50, every=0.1, until=10)
    probe.assert_ok(RTT_BOUND)
    assert 0.9 <= min(took.values()) and max(took.values()) < 2.5, sorted(took.values())
    records = wait_access(g, 51)
    reasons = collections.Counter(r[5] for r in records)
    assert reasons == {"proxy_timeout": 50, "client_eof": 1}, reasons
    # the probe was logged under the address its PROXY header carried
    assert [r[0] for r in records if r[5] == "client_eof"] == ["192.0.2.7:4242"]
    base.wait_back()
    print(f"\nslow PROXY clients closed after {min(took.values()):.2f}..{max(took.values()):.2f}s; "
          f"probe {probe.summary()}")


def _good_admin_client(addr, stop: threading.Event, answered: list, failures: list) -> None:
    while not stop.wait(0.2):
        t0 = time.monotonic()
        try:
            status, _ = admin_get(addr, "/stats", timeout=5)
        except OSError as exc:
            failures.append(repr(exc))
            return
        if status != 200:
            failures.append(f"status {status}")
        answered.append(time.monotonic() - t0)


def test_slowloris_on_admin_endpoint(spawn, backend):
    """Admin requests dribbled a byte at a time, as many as the admin's connection
    cap leaves room for: another client's complete request is still answered at
    once, relays are unaffected, and each slow client is closed at head_timeout
    (counted from accept, not reset by each byte)."""
    admin = pytest.importorskip("reactor.admin")
    head_timeout, cap = admin.HEAD_TIMEOUT, admin.MAX_CONNECTIONS
    g = start_gateway(spawn, spec(backend), admin=True)
    assert g.admin_addr is not None, g.first_line
    base = Baseline(g)
    answered: list[float] = []
    failures: list[str] = []
    stop = threading.Event()
    text = b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4000
    t = threading.Thread(target=_good_admin_client, args=(g.admin_addr, stop, answered, failures),
                         daemon=True)
    with RttProbe(g.addr) as probe:
        t.start()
        try:
            # room left for the well-behaved admin client (one) and the test's baseline check
            took = slowloris(g.admin_addr, text, cap - 4, every=0.1, until=head_timeout + 5)
        finally:
            stop.set()
            t.join(10)
    probe.assert_ok(RTT_BOUND)
    assert not failures, failures
    assert len(answered) >= 10 and max(answered) < RTT_BOUND * 2, answered
    assert head_timeout - 0.1 <= min(took.values()) and max(took.values()) < head_timeout + 1.5, \
        sorted(took.values())
    stats = admin_stats(g)
    assert stats["admin"]["head_timeouts"] == cap - 4, stats["admin"]
    base.wait_back()
    print(f"\n{cap - 4} slow admin clients closed after {min(took.values()):.2f}.."
          f"{max(took.values()):.2f}s (head_timeout {head_timeout}s); good admin requests: "
          f"{len(answered)}, slowest {1000 * max(answered):.1f} ms; probe {probe.summary()}")


def _hold_admin(g, n: int) -> list[socket.socket]:
    """``n`` admin connections that send nothing."""
    return [socket.create_connection(g.admin_addr, timeout=10) for _ in range(n)]


def test_admin_connection_cap_evicts_oldest_relays_unaffected(spawn, backend):
    """More silent admin connections than the cap: each newcomer evicts the
    oldest silent one at once, the admin never holds more than its cap of fds,
    and relays are unaffected throughout."""
    admin = pytest.importorskip("reactor.admin")
    cap = admin.MAX_CONNECTIONS
    g = start_gateway(spawn, spec(backend), admin=True)
    base = Baseline(g)
    with RttProbe(g.addr) as probe:
        full = base.fds + 2 + cap  # the probe's relay, and the admin's cap
        held = _hold_admin(g, cap)
        wait_for(lambda: g.fd_count() >= full, what="the admin to accept its cap")
        t0 = time.monotonic()
        extra = _hold_admin(g, 8)
        oldest = {s: t0 for s in held[:8]}
        took = wait_closed(oldest, timeout=5)
        assert max(took.values()) < 0.5, sorted(took.values())  # evicted at once
        assert g.fd_count() == full  # never more than the cap
        t1 = time.monotonic()  # relays meanwhile: the probe keeps going while the admin is full
        wait_for(lambda: time.monotonic() - t1 > 0.5, what="half a second with the admin full")
        for s in held + extra:
            s.close()
    probe.assert_ok(RTT_BOUND)
    base.wait_back()
    st = admin_stats(g)["admin"]
    assert (st["evicted"], st["rejected"]) == (8, 0)


def test_admin_answers_while_slow_clients_hold_every_slot(spawn, backend):
    admin = pytest.importorskip("reactor.admin")
    g = start_gateway(spawn, spec(backend), admin=True)
    base_fds = Baseline(g).fds
    held = _hold_admin(g, admin.MAX_CONNECTIONS)
    try:
        wait_for(lambda: g.fd_count() >= base_fds + admin.MAX_CONNECTIONS,
                 what="the admin to accept its cap")
        status, _ = admin_get(g.admin_addr, "/stats", timeout=2)
        assert status == 200
    finally:
        for s in held:
            s.close()
