"""The admin endpoint and `reactor stats`, against real gateways on 127.0.0.1."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from reactor.admin import AdminServer, is_loopback
from reactor.config import BackendConfig, Config, GatewayConfig, HealthConfig
from reactor.gateway import Gateway
from reactor.httphead import MAX_HEAD, BadRequest, HeadReader, parse_request_head
from reactor.loop import Loop
from tests.backends import free_port
from tests.helpers import ROOT, Proc, recv_exact, split_addr, wait_for

pytestmark = pytest.mark.timeout(60)

ADMIN_RE = re.compile(r"admin=(\S+)")


# -- helpers ------------------------------------------------------------------

def start(spawn, *extra: str):
    """An echo backend and a gateway in front of it with the admin on an
    ephemeral port. Returns (gateway proc, admin (host, port))."""
    echo = spawn("serve", "--listen", "127.0.0.1:0", "--mode", "echo")
    g = spawn("gateway", "--listen", "127.0.0.1:0", "--backend", f"{echo.addr[0]}:{echo.addr[1]}",
              "--admin", "127.0.0.1:0", *extra)
    m = ADMIN_RE.search(g.first_line)
    assert m, g.first_line
    return g, split_addr(m.group(1))


@pytest.fixture(scope="module")
def shared():
    """One gateway for the tests that only add requests (they compare deltas)."""
    procs: list[Proc] = []

    def _spawn(*args: str) -> Proc:
        p = Proc(list(args))
        procs.append(p)
        return p

    try:
        yield start(_spawn)
    finally:
        for p in procs:
            p.kill()


def bad_count(admin) -> int:
    return get_json(admin, "/stats")["admin"]["requests"].get("-", {}).get("400", 0)


def exchange(admin, raw: bytes, timeout: float = 5.0) -> bytes:
    """Send ``raw``, read to EOF; everything the server sent."""
    with socket.create_connection(admin, timeout=timeout) as s:
        s.sendall(raw)
        buf = bytearray()
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            buf += chunk
        return bytes(buf)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return status, headers, body


def get(admin, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return parse_response(exchange(admin, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


def get_json(admin, path: str) -> dict:
    status, headers, body = get(admin, path)
    assert status == 200 and headers["content-type"] == "application/json"
    return json.loads(body)


def metrics(admin) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    status, headers, body = get(admin, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def echo_once(addr, payload: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(payload)
        return recv_exact(s, len(payload))


def reactor_cmd(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reactor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# -- /metrics -----------------------------------------------------------------

def test_metrics_parse_and_counters_move_with_traffic(spawn):
    g, admin = start(spawn)
    before = metrics(admin)
    names = {k[0] for k in before}
    for want in ("reactor_connections_active", "reactor_connections_accepted_total",
                 "reactor_client_received_bytes_total", "reactor_backend_sent_bytes_total",
                 "reactor_backend_state", "reactor_backend_up", "reactor_syscalls_total",
                 "reactor_loop_iterations_total", "reactor_loop_lag_seconds",
                 "reactor_loop_events_per_wait", "reactor_process_cpu_seconds_total",
                 "reactor_process_context_switches_total", "process_open_fds",
                 "reactor_listener_connections_total", "reactor_connections_rejected_total"):
        assert want in names, want
    backend = next(dict(k[1])["backend"] for k in before if k[0] == "reactor_backend_up")
    bl = (("address", backend), ("backend", backend))
    assert before[("reactor_backend_up", bl)] == 1
    assert before[("reactor_backend_state", tuple(sorted(bl + (("state", "up"),))))] == 1
    assert before[("reactor_backend_state", tuple(sorted(bl + (("state", "down"),))))] == 0

    n = 100_000
    payload = os.urandom(n)
    with socket.create_connection(g.addr, timeout=5) as s:
        s.sendall(payload)
        assert recv_exact(s, n) == payload
        # while the relay is still open, the counters already include its bytes
        live = metrics(admin)
        assert live[("reactor_connections_active", ())] == 1
        assert live[("reactor_backend_connections_active", bl)] == 1
        assert live[("reactor_client_received_bytes_total", ())] - before[
            ("reactor_client_received_bytes_total", ())] == n
        assert live[("reactor_backend_sent_bytes_total", bl)] - before[("reactor_backend_sent_bytes_total", bl)] == n
        assert live[("reactor_backend_received_bytes_total", bl)] == n
    def closed():
        m = metrics(admin)
        return m if m[("reactor_connections_active", ())] == 0 else None
    after = wait_for(closed, what="relay closed")
    assert after[("reactor_client_sent_bytes_total", ())] == n
    assert after[("reactor_backend_sent_bytes_total", bl)] == n  # no double count at close
    assert after[("reactor_connections_accepted_total", ())] == 1
    assert after[("reactor_backend_connections_total", bl)] == 1
    assert after[("reactor_connections_closed_total", (("reason", "client_eof"),))] == 1
    recv = ("reactor_syscalls_total", (("name", "recv"),))
    assert after[recv] > before[recv] + 2  # at least: the client's data, the backend's, two EOFs
    assert after[("reactor_loop_iterations_total", ())] > before[("reactor_loop_iterations_total", ())]
    # each scrape is counted under its own path
    assert after[("reactor_admin_requests_total", (("code", "200"), ("path", "/metrics")))] >= 3


def test_stats_json_has_process_facts_and_counts_admin_requests(spawn):
    g, admin = start(spawn)
    get(admin, "/nope")
    st1 = get_json(admin, "/stats")
    proc = st1["process"]
    assert proc["pid"] == g.pid
    assert abs(proc["num_fds"] - g.fd_count()) <= 2  # a health check may be in flight
    assert proc["fd_soft_limit"] is None or proc["fd_soft_limit"] > 0
    assert proc["rss"] > 1 << 20
    assert proc["cpu_user"] > 0
    assert st1["admin"]["requests"]["other"] == {"404": 1}
    assert st1["admin"]["requests"]["/stats"] == {"200": 1}
    assert st1["connections"]["active"] == 0
    assert st1["loop"]["syscalls"]["accept"] >= 2


# -- /fds ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
SYS_pidfd_open, SYS_pidfd_getfd = 434, 438  # the same number on every architecture


def steal_fd(pid: int, fd: int) -> socket.socket:
    """A duplicate of another process's fd (pidfd_getfd): the same socket, so
    getsockopt here reads exactly what the gateway's getsockopt reads."""
    pidfd = _libc.syscall(SYS_pidfd_open, pid, 0)
    if pidfd < 0:
        pytest.skip(f"pidfd_open: {os.strerror(ctypes.get_errno())}")
    try:
        nfd = _libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)
        if nfd < 0:
            err = ctypes.get_errno()
            if err in (errno.EPERM, errno.ENOSYS):
                pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
            raise OSError(err, os.strerror(err))
    finally:
        os.close(pidfd)
    return socket.socket(fileno=nfd)


def test_fds_roles_and_socket_options_match_getsockopt(spawn):
    g, admin = start(spawn)
    with socket.create_connection(g.addr, timeout=5) as c:
        c.sendall(b"x")
        assert c.recv(1) == b"x"  # the backend side is connected
        first = get_json(admin, "/fds")
        rows = {r["fd"]: r for r in first["fds"]}
        by_role: dict[str, list[dict]] = {}
        for r in first["fds"]:
            by_role.setdefault(r["role"], []).append(r)
        for role in ("listener", "client", "backend", "admin", "epoll", "wakeup"):
            assert role in by_role, (role, first["roles"])
        assert first["summary"]["pid"] == g.pid

        [lst] = by_role["listener"]
        assert lst["local"] == f"{g.addr[0]}:{g.addr[1]}" and lst["state"] == "LISTEN"
        assert lst["options"]["reuseaddr"] is True and lst["options"]["acceptconn"] is True
        [client] = by_role["client"]
        assert client["remote"] == "{}:{}".format(*c.getsockname())  # the 4-tuple is ours
        [backend] = by_role["backend"]
        assert client["options"]["nodelay"] is True and backend["options"]["nodelay"] is True
        assert {r["detail"] for r in by_role["admin"]} == {"listener", "connection"}
        admin_lst = next(r for r in by_role["admin"] if r["detail"] == "listener")
        assert admin_lst["local"] == f"{admin[0]}:{admin[1]}"
        [ep] = by_role["epoll"]
        assert lst["fd"] in ep["watches"] and client["fd"] in ep["watches"]
        assert len(by_role["wakeup"]) == 2 and all(r["type"] == "unix" for r in by_role["wakeup"])

        # Definitive: the same sockets, duplicated into this process, read the same.
        names = {"reuseaddr": (socket.SOL_SOCKET, socket.SO_REUSEADDR),
                 "reuseport": (socket.SOL_SOCKET, socket.SO_REUSEPORT),
                 "keepalive": (socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                 "nodelay": (socket.IPPROTO_TCP, socket.TCP_NODELAY),
                 "sndbuf": (socket.SOL_SOCKET, socket.SO_SNDBUF),
                 "rcvbuf": (socket.SOL_SOCKET, socket.SO_RCVBUF)}
        for row in (lst, client, backend):
            dup = steal_fd(g.pid, row["fd"])
            try:
                for key, (level, opt) in names.items():
                    want = dup.getsockopt(level, opt)
                    got = row["options"][key]
                    assert (int(got) if isinstance(got, bool) else got) == (
                        bool(want) if isinstance(got, bool) else want), (row["role"], key)
            finally:
                dup.close()
        # ...and a change made through the duplicate shows up in the next /fds
        dup = steal_fd(g.pid, client["fd"])
        try:
            assert rows[client["fd"]]["options"]["keepalive"] is False
            dup.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        finally:
            dup.close()
        second = {r["fd"]: r for r in get_json(admin, "/fds")["fds"]}
        assert second[client["fd"]]["options"]["keepalive"] is True
        assert second[client["fd"]]["role"] == "client"


def test_fds_roles_connecting_and_health_check(spawn, tmp_path):
    """A backend whose SYNs go unanswered (a listener that never accepts, its
    backlog full): the relay's connect and the health check stay in flight,
    so /fds shows them in SYN_SENT with their roles."""
    bh = socket.socket()
    bh.bind(("127.0.0.1", 0))
    bh.listen(0)
    fillers = []
    for _ in range(8):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(bh.getsockname())
        fillers.append(f)
    time.sleep(0.2)  # let the fillers fill the accept queue (as in test_gateway)
    port = bh.getsockname()[1]
    conf = tmp_path / "gw.toml"
    conf.write_text(f"""
[gateway]
listen = "127.0.0.1:0"
connect_timeout = 20
[health]
interval = 0.2
timeout = 20
[admin]
listen = "127.0.0.1:0"
[[backend]]
address = "127.0.0.1:{port}"
""")
    try:
        g = spawn("gateway", "--config", str(conf))
        admin = split_addr(ADMIN_RE.search(g.first_line).group(1))
        with socket.create_connection(g.addr, timeout=5):
            def both():
                rows = get_json(admin, "/fds")["fds"]
                roles = {r["role"]: r for r in rows}
                return roles if {"connecting", "health_check"} <= set(roles) else None
            roles = wait_for(both, what="connecting and health_check roles")
        for role in ("connecting", "health_check"):
            r = roles[role]
            assert r["state"] == "SYN_SENT" and r["remote"] == f"127.0.0.1:{port}", r
            assert r["detail"] == f"127.0.0.1:{port}" and r["options"]["proto"] == "tcp"
        assert roles["client"]["state"] == "ESTABLISHED"
        assert "backend" not in roles
    finally:
        for f in fillers:
            f.close()
        bh.close()


def test_fds_asker_leaving_early_is_harmless(shared):
    g, admin = shared
    for _ in range(5):
        s = socket.create_connection(admin, timeout=5)
        s.sendall(b"GET /fds HTTP/1.1\r\n\r\n")
        s.close()
    body = get_json(admin, "/fds")
    assert body["pid"] == g.pid and body["roles"]["listener"] == 1
    assert echo_once(g.addr, b"ok") == b"ok"


# -- bad requests ---------------------------------------------------------------

MALFORMED = [
    b"garbage\r\n\r\n",
    b"GET /metrics\r\n\r\n",  # HTTP/0.9
    b"GET /metrics HTTP/2.0\r\n\r\n",
    b"GET metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello: no newline at all
]


def test_malformed_requests_400_and_relaying_goes_on(shared):
    g, admin = shared
    bad0 = bad_count(admin)
    with socket.create_connection(g.addr, timeout=5) as relay:
        for i, raw in enumerate(MALFORMED):
            t0 = time.monotonic()
            status, _, body = parse_response(exchange(admin, raw))
            assert status == 400 and body.startswith(b"bad request"), raw
            assert time.monotonic() - t0 < 2, raw  # answered at once, not by the timeout
            # a relay that was open all along still echoes, straight after each
            msg = b"still relaying %d" % i
            relay.sendall(msg)
            assert recv_exact(relay, len(msg)) == msg
    assert echo_once(g.addr, b"new relay") == b"new relay"
    assert bad_count(admin) - bad0 == len(MALFORMED)


def test_oversized_head_400(shared):
    g, admin = shared
    bad0 = bad_count(admin)
    big = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert parse_response(exchange(admin, big))[0] == 400
    # no terminator ever: refused once the cap is passed, not after the timeout
    with socket.create_connection(admin, timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 100))
        time.sleep(0.2)  # still under the cap: no answer yet
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)
        s.setblocking(True)
        s.sendall(b"a" * 200)  # now over the cap
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    assert parse_response(bytes(data))[0] == 400
    assert echo_once(g.addr, b"ok") == b"ok"
    assert bad_count(admin) - bad0 == 2


@contextlib.contextmanager
def inproc_gateway(**admin_kw):
    """A Gateway and AdminServer on a real Loop in a thread of this process,
    for what a spawned gateway cannot be made to do quickly (a short head
    timeout) or at all (stay up, admin open, while draining)."""
    sink = socket.socket()  # the backend: accepts into its backlog, never reads
    sink.bind(("127.0.0.1", 0))
    sink.listen()
    cfg = Config(gateway=GatewayConfig(listen=(("127.0.0.1", 0),), access_log=False),
                 health=HealthConfig(enabled=False),
                 backends=(BackendConfig(host="127.0.0.1", port=sink.getsockname()[1]),))
    loop = Loop()
    gw = Gateway(loop, cfg)
    gw.start()
    adm = AdminServer(loop, gw, ("127.0.0.1", 0), **admin_kw)
    t = threading.Thread(target=loop.run, daemon=True)
    t.start()
    try:
        yield gw, split_addr(adm.name), loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        adm.close()
        gw.shutdown()
        loop.close()
        sink.close()


def trickle_until_closed(admin, every: float, limit: float) -> tuple[float, bytes]:
    """Send a request head one header line per ``every`` seconds, never
    finishing it; return (seconds until the server closed, what it sent)."""
    s = socket.create_connection(admin, timeout=10)
    t0 = time.monotonic()
    try:
        for i in range(int(limit / every) + 1):
            try:
                s.sendall(b"GET /metrics HTTP/1.1\r\n" if i == 0 else b"X-%d: y\r\n" % i)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0, b""
            s.settimeout(every)
            try:
                data = s.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            return time.monotonic() - t0, data
        raise AssertionError(f"the trickling client was not closed within {limit}s")
    finally:
        s.close()


def test_slowloris_trickle_is_closed_by_the_head_timeout():
    with inproc_gateway(head_timeout=1.0) as (gw, admin, loop):
        took, data = trickle_until_closed(admin, 0.1, 5.0)
        assert data == b"", f"a response to an incomplete head: {data!r}"
        assert 0.9 <= took <= 2.5, took
        st = get_json(admin, "/stats")
        assert st["admin"]["head_timeouts"] == 1 and st["admin"]["connections_active"] == 1


@pytest.mark.soak
def test_slowloris_closed_by_the_default_timeout_on_a_real_gateway(spawn):
    g, admin = start(spawn)
    took, data = trickle_until_closed(admin, 0.4, 10.0)
    assert data == b"" and 4.9 <= took <= 8.0, (took, data)
    assert get_json(admin, "/stats")["admin"]["head_timeouts"] == 1
    assert echo_once(g.addr, b"ok") == b"ok"


def test_404_405_and_healthz(shared):
    g, admin = shared
    assert get(admin, "/nope")[0] == 404
    assert get(admin, "/metrics/")[0] == 404
    status, headers, _ = get(admin, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET"
    assert get(admin, "/stats", method="HEAD")[0] == 405
    status, headers, body = get(admin, "/healthz")
    assert (status, body) == (200, b"ok\n")
    # a query string does not change the route; HTTP/1.0 and bare LF lines work
    assert get(admin, "/healthz?verbose=1")[0] == 200
    assert parse_response(exchange(admin, b"GET /healthz HTTP/1.0\n\n"))[0] == 200


def test_healthz_503_while_draining():
    """In-process: a draining gateway answers 503 (see also the spawned test below)."""
    with inproc_gateway() as (gw, admin, loop):
        assert get(admin, "/healthz")[:1] == (200,)
        loop.call_soon_threadsafe(gw.drain, 5.0)
        wait_for(lambda: get(admin, "/healthz")[0] == 503, what="/healthz 503")
        assert get(admin, "/healthz")[2] == b"draining\n"
        assert get_json(admin, "/stats")["draining"] is True


def test_admin_connections_never_block_relays(spawn):
    """32 admin clients that connect and send nothing (one stuck half-way through
    a head): echoes through the gateway still complete promptly, and the endpoint
    still answers -- at the cap, the oldest incomplete connection is evicted for
    the newcomer, so idle clients cannot lock operators out."""
    g, admin = start(spawn)
    idle = [socket.create_connection(admin, timeout=5) for _ in range(31)]
    half = socket.create_connection(admin, timeout=5)
    half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x")
    idle.append(half)
    try:
        wait_for(lambda: g.fd_count() >= 32, what="admin connections at the cap")
        st = get_json_quiet(admin)  # the 33rd connection: served, not refused
        assert st is not None and st["admin"]["evicted"] >= 1
        assert idle[0].recv(1) == b""  # the oldest silent one made room
        worst = 0.0
        with socket.create_connection(g.addr, timeout=5) as c:
            for i in range(50):
                msg = b"ping %d" % i
                t0 = time.monotonic()
                c.sendall(msg)
                assert recv_exact(c, len(msg)) == msg
                worst = max(worst, time.monotonic() - t0)
        assert worst < 0.5, f"slowest echo round trip {worst:.3f}s"
    finally:
        for s in idle:
            s.close()
    st = wait_for(lambda: get_json_quiet(admin), what="admin serving again")
    assert st["admin"]["rejected"] == 0


def get_json_quiet(admin):
    """/stats, or None when the endpoint refuses (closes without answering)."""
    try:
        data = exchange(admin, b"GET /stats HTTP/1.1\r\n\r\n", timeout=2)
    except OSError:
        return None
    return json.loads(parse_response(data)[2]) if data else None


def test_admin_bind_failure_is_one_line_usage_error(spawn):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = reactor_cmd("gateway", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                        "--admin", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        f"reactor gateway: admin 127.0.0.1:{port}: address already in use"
    assert "Traceback" not in r.stderr


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.3.4.5") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    for host in ("0.0.0.0", "::", "", "10.0.0.1", "192.168.1.1", "fe80::1%lo", "localhost"):
        assert not is_loopback(host), host


# -- reactor stats ---------------------------------------------------------------

def test_reactor_stats_table_json_and_watch(spawn):
    g, admin = start(spawn)
    spec = f"{admin[0]}:{admin[1]}"
    assert echo_once(g.addr, b"hello") == b"hello"
    backend = get_json(admin, "/stats")["backends"][0]["name"]
    wait_for(lambda: get_json(admin, "/stats")["connections"]["active"] == 0, what="relay closed")

    r = reactor_cmd("stats", "--admin", spec)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert f"gateway pid {g.pid} (running)" in text
    for header in ("active", "accepted", "backend", "state", "syscall", "per second", "cpu",
                   "context switches", "events per wait"):
        assert header in text, header
    assert re.search(rf"^{re.escape(backend)}\s+up\s+0\s+1\s+0\s+5 B\s+5 B\s", text, re.M), text
    assert re.search(r"^epoll_wait\s+\d+\s+\d+\.\d$", text, re.M), text

    # --json while traffic flows: the rates move
    stop = threading.Event()
    moved = [0]

    def traffic():
        chunk = b"z" * 4096
        with socket.create_connection(g.addr, timeout=5) as c:
            deadline = time.monotonic() + 10
            while not stop.is_set() and time.monotonic() < deadline:
                c.sendall(chunk)
                recv_exact(c, len(chunk))
                moved[0] += len(chunk)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        wait_for(lambda: moved[0] > 0, what="traffic flowing")
        r = reactor_cmd("stats", "--admin", spec, "--json")
    finally:
        stop.set()
        t.join(10)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rates = out["rates"]
    assert 0.9 <= rates["interval"] <= 3.0
    assert rates["bytes_in"] > 0 and rates["bytes_out"] > 0
    assert rates["syscalls"]["recv"] > 0 and rates["syscalls"]["send"] > 0
    assert rates["events_per_wait"] > 0
    assert out["process"]["pid"] == g.pid
    assert out["connections"]["active"] == 1
    assert rates["backends"][backend]["bytes_in"] > 0

    r = reactor_cmd("stats", "--admin", spec, "--json", "--watch", "0.2", "--count", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    a, b = (json.loads(x) for x in lines)
    assert b["process"]["monotonic"] > a["process"]["monotonic"]
    assert 0.1 < b["rates"]["interval"] < 2


def test_reactor_stats_unreachable_is_one_line_exit_1():
    port = free_port()
    r = reactor_cmd("stats", "--admin", f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"reactor stats: cannot reach the admin endpoint at 127.0.0.1:{port}: connection refused"]
    assert r.stdout == ""
    r = reactor_cmd("stats", "--admin", "nonsense")
    assert r.returncode == 2 and "Traceback" not in r.stderr


# -- the request parser ------------------------------------------------------------

def test_parse_request_head_basics():
    req = parse_request_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nX-Y:  b c \r\n\r\n")
    assert (req.method, req.path, req.query, req.version) == ("GET", "/metrics", "x=1", "1.1")
    assert req.headers == (("host", "a"), ("x-y", "b c"))
    assert req.header("X-Y") == "b c" and req.header("nope") is None
    assert parse_request_head(b"\r\nGET / HTTP/1.0\n\n").version == "1.0"
    for bad in (b"", b"\r\n\r\n", b"GET / HTTP/1.1\rX: y\r\n\r\n", b"GET  / HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1 \r\n\r\n", b"G\xc3T / HTTP/1.1\r\n\r\n", b"GET /\xff HTTP/1.1\r\n\r\n",
                b"GET / HTTP/1.1\r\n: x\r\n\r\n", b"GET / HTTP/1.1\r\nA: b\r\n\r\nC: d\r\n\r\n",
                b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 101 + b"\r\n",
                b"GET / HTTP/1.1\r\nA: " + b"b" * MAX_HEAD + b"\r\n\r\n"):
        with pytest.raises(BadRequest):
            parse_request_head(bad)


_token = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=12)
_vchar = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.lists(st.integers(1, 50), max_size=20))
def test_fuzz_arbitrary_bytes_only_ever_badrequest(data, cuts):
    try:
        parse_request_head(data)
    except BadRequest:
        pass
    reader = HeadReader()
    pos = 0
    try:
        for n in cuts + [len(data)]:
            if reader.feed(data[pos:pos + n]) is not None:
                break
            pos += n
            if pos >= len(data):
                break
    except BadRequest:
        pass


@settings(max_examples=300, deadline=None)
@given(_token, _vchar, st.sampled_from(["0", "1"]),
       st.lists(st.tuples(_token, _vchar), max_size=10), st.sampled_from([b"\r\n", b"\n"]),
       st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_fuzz_valid_heads_parse_identically_in_any_chunking(method, target, minor, headers, eol, cuts):
    raw = f"{method} /{target} HTTP/1.{minor}".encode() + eol
    for k, v in headers:
        raw += f"{k}: {v}".encode() + eol
    raw += eol
    whole = parse_request_head(raw)
    assert whole.method == method and whole.target == "/" + target and whole.version == "1." + minor
    assert whole.headers == tuple((k.lower(), v) for k, v in headers)
    reader = HeadReader()
    pos, got = 0, None
    i = 0
    while got is None:
        n = cuts[i % len(cuts)]
        i += 1
        got = reader.feed(raw[pos:pos + n])
        pos += n
        assert got is not None or pos < len(raw)
    assert got == whole


def test_healthz_503_after_sigterm_while_relays_drain(spawn):
    """The admin stays up during a drain: a load balancer polling /healthz sees
    503 and stops sending; the gateway exits 0 once the last relay ends."""
    g, admin = start(spawn)
    c = socket.create_connection(g.addr, timeout=5)
    c.sendall(b"x")
    assert recv_exact(c, 1) == b"x"
    assert get(admin, "/healthz")[0] == 200
    g.signal(signal.SIGTERM)
    wait_for(lambda: get(admin, "/healthz")[0] == 503, what="/healthz 503 while draining")
    assert get_json(admin, "/stats")["draining"] is True
    c.close()
    assert g.wait(10) == 0
