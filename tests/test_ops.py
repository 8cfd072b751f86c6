"""Operations: config errors, reload, drain, PROXY protocol, discovery, workers.

Real processes and real sockets on 127.0.0.1; the in-process tests run a real
``Loop`` and ``Gateway`` on a background thread (no signal handlers needed
there) so counters the CLI does not print can be read directly.
"""

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
import subprocess
import sys
import threading
import time

import psutil
import pytest

from reactor import config as configmod
from reactor.discovery import Discovery
from reactor.gateway import Gateway
from reactor.listener import bind_socket
from reactor.loop import Loop
from tests.backends import ThreadServer
from tests.helpers import ROOT, recv_all, wait_for

ACCESS_RE = re.compile(r"event=access client=(\S+) backend=(\S+) bytes_in=(\d+) bytes_out=(\d+) "
                       r"duration=(\S+) reason=(\S+)")


# -- helpers -------------------------------------------------------------------------


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)
    conn.close()


def echo_server() -> ThreadServer:
    return ThreadServer(echo_handler)


def toml(path, text: str) -> str:
    """Write ``text`` to ``path`` so that a poller surely sees a change: a new
    file replaces the old one by rename (as editors and consul-template do),
    which gives it a new inode whatever the clock's resolution."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return str(path)


def backends_toml(*specs: str, extra: str = "") -> str:
    out = []
    for s in specs:
        out.append(f'[[backend]]\naddress = "{s}"\n{extra}')
    return "\n".join(out)


def gateway_toml(*specs: str, gateway: str = "", backend_extra: str = "", rest: str = "") -> str:
    return (f'[gateway]\nlisten = "127.0.0.1:0"\nidle_timeout = 0\n{gateway}\n'
            f'[admin]\nlisten = ""\n{rest}\n' + backends_toml(*specs, extra=backend_extra))


def access(proc) -> list[tuple]:
    return ACCESS_RE.findall(proc.stderr_text())


def wait_access(proc, n: int, timeout: float = 10.0) -> list[tuple]:
    def enough():
        lines = access(proc)
        return lines if len(lines) >= n else None
    return wait_for(enough, timeout=timeout, what=f"{n} access lines")


def wait_log(proc, text: str, count: int = 1, timeout: float = 10.0) -> None:
    wait_for(lambda: proc.stderr_text().count(text) >= count, timeout=timeout,
             what=f"{count}x {text!r} in the log")


def one_exchange(addr, payload: bytes = b"ping", source: str | None = None) -> bytes:
    kw = {"source_address": (source, 0)} if source else {}
    with socket.create_connection(addr, timeout=5, **kw) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        return recv_all(c)


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reactor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# -- 1. config errors ------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    ('[[backend]]\naddress = "127.0.0.1:9001"\n[[backend]]\naddress = "127.0.0.1:9002"\n'
     '[[backend]]\naddress = "127.0.0.1:70000"\n',
     "backend[2].address: port 70000 out of range (1..65535)"),
    ('[gateway]\nconect_timeout = 1\n[[backend]]\naddress = "127.0.0.1:9001"\n',
     "gateway.conect_timeout: unknown key (did you mean connect_timeout?)"),
    ('[gateway]\nretries = "2"\n[[backend]]\naddress = "127.0.0.1:9001"\n',
     "gateway.retries: expected an integer, got a string ('2')"),
    ('[gateway]\naccept_proxy = true\n[[backend]]\naddress = "127.0.0.1:9001"\n',
     "gateway.trusted_sources: must list the networks allowed to send PROXY headers "
     "when accept_proxy = true"),
    ('[[backend]]\naddress = "127.0.0.1:9001"\nsend_proxy = "v3"\n',
     "backend[0].send_proxy: 'v3' is not one of '', v1, v2"),
    ('[admin]\nlisten = "127.0.0.1:99999"\n[[backend]]\naddress = "127.0.0.1:9001"\n',
     "admin.listen: port 99999 out of range (0..65535)"),
    ('[[backend]]\naddress = "127.0.0.1:9001"\nresolve_interval = 0\n',
     "backend[0].resolve_interval: must be > 0, got 0"),
])
def test_check_rejects_bad_config_with_one_line_naming_the_key(tmp_path, text, message):
    path = toml(tmp_path / "gateway.toml", text)
    r = run_cli("gateway", "--check", "--config", path)
    assert r.returncode == 2, r
    assert r.stdout == ""
    assert r.stderr == f"reactor gateway: {path}: {message}\n"


def test_check_reads_the_backends_file(tmp_path):
    (tmp_path / "b.txt").write_text("127.0.0.1:9001\n127.0.0.1:9002@3\n")
    path = toml(tmp_path / "gateway.toml",
                '[gateway]\nbackends_file = "b.txt"\n[[backend]]\naddress = "127.0.0.1:9000"\n')
    r = run_cli("gateway", "--check", "--config", path)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{path}: ok (3 backends, 2 from {tmp_path}/b.txt, balance=round_robin)\n"
    # a bad line in the file is found by --check too, named by file and line
    (tmp_path / "b.txt").write_text("127.0.0.1:9001\n127.0.0.1:0\n")
    r = run_cli("gateway", "--check", "--config", path)
    assert r.returncode == 2
    assert r.stderr == (f"reactor gateway: {tmp_path}/b.txt:2: port 0 out of range (1..65535)\n")
    # so is an address both lists hold
    (tmp_path / "b.txt").write_text("127.0.0.1:9000\n")
    r = run_cli("gateway", "--check", "--config", path)
    assert r.returncode == 2
    assert r.stderr == (f"reactor gateway: {tmp_path}/b.txt: 127.0.0.1:9000 is also backend[0] "
                        f"in {path}\n")


def test_example_config_checks_ok():
    r = run_cli("gateway", "--check", "--config", os.path.join(ROOT, "examples", "gateway.toml"))
    assert r.returncode == 0, r.stderr
    assert "ok (3 backends" in r.stdout


# -- 2. reload ---------------------------------------------------------------------------


class Streamers:
    """``n`` clients streaming random bytes through ``addr`` and checking the
    echo, all in one thread, until ``finish()``: then each half-closes and
    reads to EOF. Bounded: at most 128 KiB in flight per client."""

    def __init__(self, addr, n: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.pool = os.urandom(1 << 20)
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(addr, timeout=5)
            s.setblocking(False)
            self.socks.append(s)
        self.sent = [0] * n
        self.recvd = [0] * n
        self.h_sent = [hashlib.sha256() for _ in range(n)]
        self.h_recv = [hashlib.sha256() for _ in range(n)]
        self.eof = [False] * n
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        idx = {s: i for i, s in enumerate(self.socks)}
        pending: dict[int, memoryview] = {}
        shut = set()
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + 60
        while not all(self.eof) and time.monotonic() < deadline:
            stopping = self._stop.is_set()
            for key, ev in sel.select(0.05):
                s = key.fileobj
                i = idx[s]
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        data = None
                    except OSError as exc:
                        self.errors.append(f"client {i}: {exc!r}")
                        self.eof[i] = True
                        sel.unregister(s)
                        continue
                    if data == b"":
                        if i not in shut:
                            self.errors.append(f"client {i}: EOF before it finished sending")
                        self.eof[i] = True
                        sel.unregister(s)
                        continue
                    if data:
                        self.recvd[i] += len(data)
                        self.h_recv[i].update(data)
                if ev & selectors.EVENT_WRITE and i not in shut:
                    if i not in pending:
                        if stopping:
                            s.shutdown(socket.SHUT_WR)
                            shut.add(i)
                            sel.modify(s, selectors.EVENT_READ)
                            continue
                        if self.sent[i] - self.recvd[i] > 131072:
                            continue
                        off = self.rng.randrange(len(self.pool) - 32768)
                        chunk = self.pool[off:off + self.rng.randint(1, 32768)]
                        self.h_sent[i].update(chunk)
                        self.sent[i] += len(chunk)
                        pending[i] = memoryview(chunk)
                    try:
                        n = s.send(pending[i])
                    except BlockingIOError:
                        n = 0
                    except OSError as exc:
                        self.errors.append(f"client {i}: {exc!r}")
                        self.eof[i] = True
                        sel.unregister(s)
                        continue
                    rest = pending[i][n:]
                    if rest:
                        pending[i] = rest
                    else:
                        del pending[i]
        for s in self.socks:
            s.close()

    def finish(self, timeout: float = 20) -> None:
        self._stop.set()
        self._t.join(timeout)
        assert not self._t.is_alive(), "streaming clients did not finish"

    def check(self) -> None:
        assert not self.errors, self.errors
        for i in range(len(self.socks)):
            assert self.recvd[i] == self.sent[i], f"client {i}: sent {self.sent[i]} got {self.recvd[i]}"
            assert self.h_recv[i].digest() == self.h_sent[i].digest(), f"client {i}: bytes differ"


def test_reload_under_load_drops_nothing_and_routes_new_connections(spawn, tmp_path):
    """20 clients stream checksummed echo traffic while SIGHUP swaps the
    backend list three times: every byte comes back, no connection is cut
    (including those on a backend the reload removed), and after each reload
    new connections go to exactly the new list."""
    a, b, c = echo_server(), echo_server(), echo_server()
    name = {a.spec: "a", b.spec: "b", c.spec: "c"}
    try:
        conf = tmp_path / "gateway.toml"
        toml(conf, gateway_toml(a.spec, b.spec))
        g = spawn("gateway", "--config", str(conf))
        load = Streamers(g.addr, 20)
        wait_for(lambda: sum(load.recvd) > 1 << 20, what="traffic flowing")
        short_seen = 0
        for k, new in enumerate([(b.spec, c.spec), (c.spec, a.spec), (a.spec, b.spec, c.spec)], 1):
            toml(conf, gateway_toml(*new))
            g.signal(signal.SIGHUP)
            wait_log(g, "event=reloaded", k)
            before = list(load.recvd)
            n = 3 * len(new)
            for _ in range(n):
                assert one_exchange(g.addr, b"hello") == b"hello"
            lines = wait_access(g, short_seen + n)[short_seen:]
            short_seen += n
            assert {name[x[1]] for x in lines} == {name[x] for x in new}, f"after reload {k}"
            # the long-lived relays kept moving while we reloaded (those on a
            # removed backend too)
            wait_for(lambda b=before: all(r > r0 for r, r0 in zip(load.recvd, b)), timeout=10,
                     what="every streaming client to make progress")
        load.finish()
        load.check()
        assert sum(load.sent) > 4 << 20
        print(f"reload under load: 3 reloads, 20 streams, {sum(load.sent) / 2**20:.1f} MiB echoed intact")
        streamed = wait_access(g, short_seen + 20)[short_seen:]
        assert collections.Counter(x[5] for x in streamed) == {"client_eof": 20}
        # the 20 relays were spread over a and b at the start and ended intact
        assert {name[x[1]] for x in streamed} == {"a", "b"}
        assert "reload_rejected" not in g.stderr_text()
    finally:
        for s in (a, b, c):
            s.close()


def test_bad_reload_is_rejected_and_the_old_config_stays(spawn, tmp_path):
    a, b = echo_server(), echo_server()
    try:
        conf = tmp_path / "gateway.toml"
        toml(conf, gateway_toml(a.spec))
        g = spawn("gateway", "--config", str(conf))
        toml(conf, gateway_toml(b.spec, "127.0.0.1:70000"))
        g.signal(signal.SIGHUP)
        wait_log(g, "event=reload_rejected")
        assert (f"event=reload_rejected error={conf}: backend[1].address: port 70000 out of range "
                "(1..65535)") in g.stderr_text()
        assert one_exchange(g.addr) == b"ping"
        assert wait_access(g, 1)[0][1] == a.spec  # still the old list
        # a good file afterwards is taken
        toml(conf, gateway_toml(b.spec))
        g.signal(signal.SIGHUP)
        wait_log(g, "event=reloaded")
        assert one_exchange(g.addr) == b"ping"
        assert wait_access(g, 2)[1][1] == b.spec
        assert g.p.poll() is None
    finally:
        a.close()
        b.close()


# -- 3. drain ----------------------------------------------------------------------------


def slow_responder(delay: float, got: list):
    def handler(conn):
        data = conn.recv(100)
        got.append(data)
        time.sleep(delay)
        conn.sendall(b"response to " + data)
        conn.close()
    return handler


def test_sigterm_frees_the_port_at_once_and_finishes_in_flight_responses(spawn, tmp_path):
    got: list = []
    srv = ThreadServer(slow_responder(1.0, got))
    try:
        g = spawn("gateway", "--config", toml(tmp_path / "g.toml", gateway_toml(srv.spec)),
                  "--grace", "10")
        c = socket.create_connection(g.addr, timeout=10)
        c.sendall(b"req1")
        wait_for(lambda: got, what="request at the backend")
        t0 = time.monotonic()
        g.signal(signal.SIGTERM)
        # a new instance can bind the port while the old one still finishes
        s = wait_for(lambda: _try_bind(g.addr), timeout=2, what="port free after SIGTERM")
        assert g.p.poll() is None, "the gateway must still be draining"
        s.close()
        assert recv_all(c) == b"response to req1"
        c.close()
        assert g.wait(10) == 0
        took = time.monotonic() - t0
        assert took < 3.0, f"exit {took:.2f}s after SIGTERM; the response took ~1s"
        (line,) = wait_access(g, 1)
        assert line[5] == "backend_eof"
        assert "event=drain_start relays=1" in g.stderr_text()
    finally:
        srv.close()


def _try_bind(addr):
    try:
        return bind_socket(addr[0], addr[1])  # what a new gateway does (no SO_REUSEPORT)
    except OSError:
        return None


def test_grace_expiry_closes_the_rest_and_exits_zero(spawn, tmp_path):
    got: list = []
    srv = ThreadServer(slow_responder(30, got))
    try:
        g = spawn("gateway", "--config", toml(tmp_path / "g.toml", gateway_toml(srv.spec)),
                  "--grace", "0.5")
        c = socket.create_connection(g.addr, timeout=10)
        c.sendall(b"req")
        wait_for(lambda: got, what="request at the backend")
        t0 = time.monotonic()
        g.signal(signal.SIGTERM)
        try:
            assert c.recv(100) == b""
        except ConnectionResetError:
            pass
        assert g.wait(10) == 0
        took = time.monotonic() - t0
        assert 0.4 <= took < 3.0, took
        (line,) = wait_access(g, 1)
        assert line[5] == "shutdown"
        c.close()
    finally:
        srv.close()


def test_second_sigterm_stops_at_once(spawn, tmp_path):
    got: list = []
    srv = ThreadServer(slow_responder(30, got))
    try:
        g = spawn("gateway", "--config", toml(tmp_path / "g.toml", gateway_toml(srv.spec)),
                  "--grace", "30")
        c = socket.create_connection(g.addr, timeout=10)
        c.sendall(b"req")
        wait_for(lambda: got, what="request at the backend")
        g.signal(signal.SIGTERM)
        wait_log(g, "event=drain_start")
        t0 = time.monotonic()
        g.signal(signal.SIGTERM)
        assert g.wait(10) == 0
        assert time.monotonic() - t0 < 2.0
        c.close()
    finally:
        srv.close()


# -- 4. PROXY protocol -------------------------------------------------------------------


def header_recorder(store: list, want: int):
    """A backend that keeps the first ``want`` bytes it gets, then answers 'ok'."""
    def handler(conn):
        buf = b""
        while len(buf) < want:
            chunk = conn.recv(4096)
            if not chunk:
                break
            buf += chunk
        store.append(buf)
        conn.sendall(b"ok")
        conn.close()
    return handler


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_gives_the_backend_the_real_client_address(spawn, tmp_path, version):
    from reactor.proxyproto import parse

    got: list = []
    port_holder = {}

    def expected(cport: int) -> bytes:
        gport = port_holder["g"]
        if version == "v1":
            return b"PROXY TCP4 127.0.0.5 127.0.0.1 %d %d\r\n" % (cport, gport)
        # spec section 2.2: signature, 0x21 (v2, PROXY), 0x11 (INET, STREAM), length 12,
        # then src addr, dst addr, src port, dst port, all network byte order
        return (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([127, 0, 0, 5])
                + bytes([127, 0, 0, 1]) + struct.pack("!HH", cport, gport))

    hlen = 16 + 12 if version == "v2" else None
    srv = ThreadServer(header_recorder(got, 200 if hlen is None else hlen + 5))
    try:
        g = spawn("gateway", "--config", toml(tmp_path / "g.toml", gateway_toml(
            srv.spec, backend_extra=f'send_proxy = "{version}"\n')))
        port_holder["g"] = g.addr[1]
        c = socket.create_connection(g.addr, timeout=5, source_address=("127.0.0.5", 0))
        cport = c.getsockname()[1]
        c.sendall(b"hello")
        if version == "v1":
            c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"ok"
        c.close()
        want = expected(cport)
        assert got[0] == want + b"hello"
        h = parse(got[0])
        assert h.src == ("127.0.0.5", cport) and h.dst == ("127.0.0.1", g.addr[1])
        assert h.rest == b"hello"
    finally:
        srv.close()


SPEC_V1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"  # proxy-protocol.txt 2.1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_accept_proxy_then_send_proxy_passes_the_spec_example_on(spawn, tmp_path, version):
    """A trusted load balancer sends the spec's example header; the backend
    (send_proxy) sees the same client and destination, byte for byte."""
    got: list = []
    want = SPEC_V1 if version == "v1" else (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([192, 168, 0, 1]) + bytes([192, 168, 0, 11])
        + struct.pack("!HH", 56324, 443))
    srv = ThreadServer(header_recorder(got, len(want) + 5))
    try:
        g = spawn("gateway", "--config", toml(tmp_path / "g.toml", gateway_toml(
            srv.spec, gateway='accept_proxy = true\ntrusted_sources = ["127.0.0.1/32"]\n',
            backend_extra=f'send_proxy = "{version}"\n')))
        with socket.create_connection(g.addr, timeout=5) as c:
            c.sendall(SPEC_V1 + b"hello")
            assert recv_all(c) == b"ok"
        assert got == [want + b"hello"]
        (line,) = wait_access(g, 1)
        assert line[0] == "192.168.0.1:56324"  # the access log names the real client
    finally:
        srv.close()


# -- in-process gateways ---------------------------------------------------------------------


def make_config(backends: list[dict], **gateway) -> configmod.Config:
    gw = {"listen": "127.0.0.1:0", "idle_timeout": 0, "access_log": False}
    gw.update(gateway)
    return configmod.from_dict({"gateway": gw, "health": {"enabled": False}, "admin": {"listen": ""},
                                "backend": backends}, "test.toml")


@pytest.fixture
def inproc():
    """Start a Gateway on a real Loop in a background thread; stopped afterwards."""
    started = []

    def start(cfg: configmod.Config) -> Gateway:
        loop = Loop()
        gw = Gateway(loop, cfg)
        gw.start()
        t = threading.Thread(target=loop.run, daemon=True)
        t.start()
        started.append((loop, gw, t))
        return gw

    yield start
    for loop, gw, t in started:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        gw.shutdown()
        loop.close()


def listen_addr(gw: Gateway) -> tuple[str, int]:
    return gw.listeners[0].address[:2]


def closed_by_gateway(addr, data: bytes, source: str = "127.0.0.1") -> bool:
    """Send ``data``; True if the gateway then closes (FIN or RST) without a reply."""
    with socket.create_connection(addr, timeout=5, source_address=(source, 0)) as c:
        c.sendall(data)
        try:
            return c.recv(100) == b""
        except ConnectionResetError:
            return True


V2_HDR = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes([203, 0, 113, 9]) + bytes([10, 0, 0, 1])
          + struct.pack("!HH", 4000, 443))


def test_proxy_header_from_an_untrusted_source_is_refused_and_counted(inproc):
    seen: list[bytes] = []

    def recording_echo(conn):
        while data := conn.recv(65536):
            seen.append(data)
            conn.sendall(data)
        conn.close()

    srv = ThreadServer(recording_echo)
    try:
        gw = inproc(make_config([{"address": srv.spec}], accept_proxy=True,
                                trusted_sources=["127.0.0.1/32"]))
        addr = listen_addr(gw)
        # a client that is not the load balancer may still connect directly...
        assert one_exchange(addr, b"plain", source="127.0.0.2") == b"plain"
        assert gw.proxy_rejected == 0
        # ...but not claim another address
        assert closed_by_gateway(addr, b"PROXY TCP4 203.0.113.9 10.0.0.1 4000 443\r\nhi", "127.0.0.2")
        assert closed_by_gateway(addr, V2_HDR + b"hi", "127.0.0.3")
        wait_for(lambda: gw.reasons.get("proxy_error", 0) == 2, what="two PROXY headers rejected")
        assert gw.proxy_rejected == 2
        assert b"".join(seen) == b"plain"  # the spoofed headers never reached the backend
        # an untrusted client that half-closes before sending a byte is not a bad header
        assert one_exchange(addr, b"", source="127.0.0.4") == b""
        wait_for(lambda: gw.reasons.get("client_eof", 0) == 2, what="clean close of the empty exchange")
        assert gw.proxy_rejected == 2 and gw.reasons.get("proxy_error", 0) == 2
    finally:
        srv.close()


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 203.0.113.9 10.0.0.1 99999 443\r\n",     # port out of range
    b"PROXY TCP4 203.0.113.9 10.0.0.1 4000\r\n",          # a field missing
    b"PROXY TCP6 203.0.113.9 10.0.0.1 4000 443\r\n",      # family and addresses disagree
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                # no header at all
    b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12),  # v2 signature, version 3
    b"PROXY " + b"x" * 120,                                 # no CRLF within 107 bytes
], ids=["port", "missing", "family", "http", "v2-version", "long"])
def test_malformed_proxy_header_from_a_trusted_source_is_refused_and_counted(inproc, data):
    srv = echo_server()
    try:
        gw = inproc(make_config([{"address": srv.spec}], accept_proxy=True,
                                trusted_sources=["127.0.0.0/8"]))
        assert closed_by_gateway(listen_addr(gw), data)
        wait_for(lambda: gw.reasons.get("proxy_error", 0) == 1, what="connection closed as proxy_error")
        assert gw.proxy_rejected == 1
        assert srv.peers == []  # no backend connection was even opened
    finally:
        srv.close()


def test_trusted_proxy_header_stands_for_the_client_in_per_ip_limits(inproc):
    """All connections come from 127.0.0.1, but carry different client
    addresses: the per-IP limit of 1 applies to those addresses."""
    srv = echo_server()
    try:
        gw = inproc(make_config([{"address": srv.spec}], accept_proxy=True,
                                trusted_sources=["127.0.0.1/32"], max_connections_per_ip=1))
        addr = listen_addr(gw)
        held = []
        for ip in ("203.0.113.7", "203.0.113.8"):
            c = socket.create_connection(addr, timeout=5)
            c.sendall(f"PROXY TCP4 {ip} 10.0.0.1 5555 443\r\nhi".encode())
            assert c.recv(2) == b"hi"
            held.append(c)
        assert sorted(gw.per_ip) == ["203.0.113.7", "203.0.113.8"]
        assert closed_by_gateway(addr, b"PROXY TCP4 203.0.113.7 10.0.0.1 5556 443\r\nhi")
        wait_for(lambda: gw.rejected_per_ip == 1, what="per-IP rejection of the repeated client")
        assert gw.proxy_rejected == 0
        for c in held:
            c.close()
    finally:
        srv.close()


# -- 5. discovery ----------------------------------------------------------------------------


class FakeDNS:
    """A resolver the test controls: answers from ``names``; may fail or stall."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.calls = 0
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def __call__(self, host, port, family=0, type=0, *rest):
        with self.lock:
            self.calls += 1
        self.gate.wait(10)
        if self.fail or host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        fam = lambda ip: socket.AF_INET6 if ":" in ip else socket.AF_INET  # noqa: E731
        return [(fam(ip), socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.names[host]]


def run_until(loop: Loop, pred, timeout: float = 5.0, what: str = "condition", tick=None) -> None:
    """Run ``loop`` until ``pred()`` holds, checking every 5 ms."""
    deadline = time.monotonic() + timeout
    result = {}

    def check():
        if tick is not None:
            tick()
        if pred():
            result["ok"] = True
            loop.stop()
        elif time.monotonic() > deadline:
            loop.stop()
        else:
            loop.call_later(0.005, check)

    loop.call_soon(check)
    loop.run()
    assert result.get("ok"), f"timed out after {timeout}s waiting for {what}"


def addresses(gw: Gateway) -> set[str]:
    return {f"{b.address[0]}:{b.address[1]}" for b in gw.balancer.backends}


def test_dns_discovery_adds_and_drains_backends_off_the_loop_thread():
    dns = FakeDNS({"game.svc": ["10.0.0.1", "10.0.0.2"]})
    cfg = make_config([{"address": "game.svc:7000", "resolve": True, "resolve_interval": 0.05},
                       {"address": "127.0.0.1:9"}], balance="maglev")
    loop = Loop()
    d = Discovery(loop, cfg, resolver=dns)
    gw = Gateway(loop, d.load(), resolved=d.resolved)
    d.attach(gw)
    d.start()
    try:
        assert addresses(gw) == {"10.0.0.1:7000", "10.0.0.2:7000", "127.0.0.1:9"}
        by = {b.address[0]: b for b in gw.balancer.backends}
        assert by["10.0.0.1"].name == "game.svc:7000#10.0.0.1:7000"
        b1, b2 = by["10.0.0.1"], by["10.0.0.2"]
        b1.active = 1  # as if a relay were still running through it
        b2.total = 42

        # an address leaves the answer, another joins: added, drained, survivor kept
        dns.names["game.svc"] = ["10.0.0.2", "10.0.0.3"]
        run_until(loop, lambda: addresses(gw) == {"10.0.0.2:7000", "10.0.0.3:7000", "127.0.0.1:9"},
                  what="the new DNS answer applied")
        assert b1.draining and gw.draining_backends == {("10.0.0.1", 7000): b1}
        assert [b for b in gw.balancer.backends if b.address[0] == "10.0.0.2"] == [b2]
        assert b2.total == 42
        assert all(gw.balancer.pick(f"198.51.100.{i}", loop.now) is not b1 for i in range(200))
        assert d.dns_changes == 1

        # a failing lookup keeps the last answer
        dns.fail = True
        failures = d.lookup_failures
        run_until(loop, lambda: d.lookup_failures >= failures + 3, what="failed lookups")
        assert addresses(gw) == {"10.0.0.2:7000", "10.0.0.3:7000", "127.0.0.1:9"}
        dns.fail = False

        # a resolver that hangs blocks neither the loop nor stacks lookups
        dns.gate.clear()
        calls = dns.calls
        gaps, last = [], [time.monotonic()]

        def tick():
            now = time.monotonic()
            gaps.append(now - last[0])
            last[0] = now

        t0 = time.monotonic()
        run_until(loop, lambda: time.monotonic() - t0 > 0.5, tick=tick, what="0.5 s of stalled DNS")
        assert dns.calls == calls + 1, "one lookup in flight per name, not one per interval"
        assert max(gaps) < 0.1, f"the loop stalled {max(gaps):.3f}s"

        # the address comes back while still draining: the same object, revived
        dns.names["game.svc"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
        dns.gate.set()
        run_until(loop, lambda: len(gw.balancer.backends) == 4, what="10.0.0.1 back")
        assert b1 in gw.balancer.backends and not b1.draining and b1.active == 1
        assert gw.draining_backends == {}
        stats = gw.stats()["discovery"]
        assert stats["names"]["game.svc:7000"] == ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]
        assert stats["lookup_failures"] >= 3
    finally:
        d.stop()
        gw.shutdown()
        loop.close()


def test_reload_with_a_name_that_does_not_resolve_keeps_the_old_config(caplog):
    dns = FakeDNS({"a.svc": ["10.0.0.1"]})
    cfg = make_config([{"address": "a.svc:80"}])
    loop = Loop()
    d = Discovery(loop, cfg, resolver=dns)
    gw = Gateway(loop, d.load(), resolved=d.resolved)
    d.attach(gw)
    d.start()
    try:
        assert addresses(gw) == {"10.0.0.1:80"}
        d.reload(make_config([{"address": "a.svc:80"}, {"address": "gone.svc:80"}]))
        run_until(loop, lambda: gw.reload_failures == 1, what="reload rejected")
        assert addresses(gw) == {"10.0.0.1:80"} and gw.reloads == 0
        assert ("event=reload_rejected error=test.toml: backend[1].address: cannot resolve "
                "'gone.svc' (Name or service not known)") in caplog.text
        dns.names["gone.svc"] = ["10.0.0.9"]
        d.reload(make_config([{"address": "a.svc:80"}, {"address": "gone.svc:80"}]))
        run_until(loop, lambda: gw.reloads == 1, what="reload applied")
        assert addresses(gw) == {"10.0.0.1:80", "10.0.0.9:80"}
    finally:
        d.stop()
        gw.shutdown()
        loop.close()


def test_backends_file_and_watched_config_are_reread_on_change(spawn, tmp_path):
    a, b, c = echo_server(), echo_server(), echo_server()
    try:
        bfile = tmp_path / "backends.txt"
        toml(bfile, f"{a.spec}\n")
        conf = tmp_path / "gateway.toml"
        toml(conf, '[gateway]\nlisten = "127.0.0.1:0"\nbackends_file = "backends.txt"\n'
                   'watch = true\n[admin]\nlisten = ""\n')
        g = spawn("gateway", "--config", str(conf))
        assert "backends=1" in g.first_line
        assert one_exchange(g.addr) == b"ping"
        assert wait_access(g, 1)[0][1] == a.spec
        # consul-template rewrites the file: no signal needed
        toml(bfile, f"# zone b\n{b.spec}@2\n")
        wait_log(g, "event=backends_file_reloaded")
        assert one_exchange(g.addr) == b"ping"
        assert wait_access(g, 2)[1][1] == b.spec
        # a broken file is refused; the last good list stays
        toml(bfile, f"{b.spec}\n127.0.0.1:0\n")
        wait_log(g, "event=backends_file_rejected")
        assert f"{bfile}:2: port 0 out of range" in g.stderr_text()
        assert one_exchange(g.addr) == b"ping"
        assert wait_access(g, 3)[2][1] == b.spec
        # watch = true: editing the config file itself is a reload
        toml(conf, '[gateway]\nlisten = "127.0.0.1:0"\nwatch = true\n[admin]\nlisten = ""\n'
                   + backends_toml(c.spec))
        wait_log(g, "event=reloaded")
        assert one_exchange(g.addr) == b"ping"
        assert wait_access(g, 4)[3][1] == c.spec
    finally:
        for s in (a, b, c):
            s.close()


# -- 6. workers ------------------------------------------------------------------------------


def workers_of(sup_pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(sup_pid).children() if p.status() != psutil.STATUS_ZOMBIE}


def established_on(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED)


def test_workers_share_the_port_survive_a_kill_and_drain_on_sigterm(spawn):
    srv = echo_server()
    try:
        g = spawn("gateway", "--listen", "127.0.0.1:0", "--backend", srv.spec, "--admin", "off",
                  "--workers", "2", "--idle-timeout", "0")
        assert f"pid={g.pid} " in g.first_line and g.first_line.rstrip().endswith("workers=2")
        pids = workers_of(g.pid)
        assert len(pids) == 2
        # the kernel spreads connections over both workers' sockets
        held = []
        for _ in range(24):
            c = socket.create_connection(g.addr, timeout=5)
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            held.append(c)
        per_worker = {pid: established_on(pid, g.addr[1]) for pid in pids}
        assert sum(per_worker.values()) == 24 and all(per_worker.values()), per_worker
        for c in held:
            c.close()

        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        # (a SIGKILL lands asynchronously: connections queued on the victim's socket
        # until its exit closes it are reset -- SO_REUSEPORT without tcp_migrate_req)
        wait_for(lambda: not _alive(victim), what="the victim gone")
        # the port keeps serving while the supervisor restarts the dead worker
        for i in range(20):
            assert one_exchange(g.addr, b"after kill %d" % i) == b"after kill %d" % i
        new = wait_for(lambda: (workers_of(g.pid) - pids) or None, timeout=10, what="a new worker")
        assert workers_of(g.pid) == (pids - {victim}) | new and len(new) == 1
        wait_log(g, "event=worker_ready", 3)
        assert "event=worker_exited slot=" in g.stderr_text() and "signal=9" in g.stderr_text()

        # SIGTERM: a live relay finishes, the port is released at once, exit 0
        live = socket.create_connection(g.addr, timeout=5)
        live.sendall(b"before")
        assert live.recv(6) == b"before"
        g.signal(signal.SIGTERM)
        s = wait_for(lambda: _try_bind(g.addr), timeout=3, what="port free after SIGTERM")
        s.close()
        live.sendall(b"during drain")
        assert recv_exact_or_eof(live, 12) == b"during drain"
        assert g.p.poll() is None
        live.close()
        assert g.wait(10) == 0
        assert not any(_alive(p) for p in pids | new)
    finally:
        srv.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def recv_exact_or_eof(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_sighup_to_the_supervisor_reloads_every_worker(spawn, tmp_path):
    a, b = echo_server(), echo_server()
    try:
        conf = tmp_path / "gateway.toml"
        toml(conf, gateway_toml(a.spec, gateway="workers = 2"))
        g = spawn("gateway", "--config", str(conf))
        assert "workers=2" in g.first_line
        toml(conf, gateway_toml(b.spec, gateway="workers = 3"))
        g.signal(signal.SIGHUP)
        wait_log(g, "event=reloaded", 2)  # one line per worker
        assert "event=reload_ignored key=gateway.workers reason=needs_restart" in g.stderr_text()
        for i in range(8):
            assert one_exchange(g.addr, b"%d" % i) == b"%d" % i
        assert {line[1] for line in wait_access(g, 8)} == {b.spec}
        g.signal(signal.SIGTERM)
        assert g.wait(10) == 0
    finally:
        a.close()
        b.close()


def test_workers_of_a_killed_supervisor_exit_by_themselves(spawn):
    g = spawn("gateway", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9", "--admin", "off",
              "--workers", "2", "--no-access-log")
    pids = workers_of(g.pid)
    assert len(pids) == 2
    g.kill()
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=10, what="orphaned workers to exit")
    assert g.stderr_text().count("event=supervisor_gone") == 2


def test_workers_port_in_use_is_a_one_line_error(spawn):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        r = run_cli("gateway", "--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9",
                    "--admin", "off", "--workers", "2")
        assert r.returncode == 2
        assert r.stderr.splitlines()[-1] == f"reactor gateway: listen 127.0.0.1:{port}: address already in use"
        assert r.stdout == ""
    finally:
        busy.close()


def test_sum_stats_adds_real_gateway_stats(inproc):
    from reactor.supervisor import sum_stats

    srv = echo_server()
    try:
        gws = [inproc(make_config([{"address": srv.spec}, {"address": "127.0.0.1:9", "weight": 3}]))
               for _ in range(2)]
        for gw, n in zip(gws, (3, 5)):
            for _ in range(n):
                assert one_exchange(listen_addr(gw), b"12345") == b"12345"
        wait_for(lambda: [g.accepted_total for g in gws] == [3, 5] and not any(g.relays for g in gws),
                 what="relays done")
        st = [g.stats() for g in gws]
        total = sum_stats(st)
        assert total["connections"]["accepted_total"] == 8
        assert total["connections"]["closed_by_reason"] == {"client_eof": 8}
        assert total["bytes"] == {"in": 40, "out": 40}
        by_name = {b["name"]: b for b in total["backends"]}
        assert by_name[srv.spec]["total"] == 8 and by_name[srv.spec]["bytes_in"] == 40
        assert by_name["127.0.0.1:9"]["weight"] == 3  # not summed
        assert len(total["listeners"]) == 2  # two in-process gateways: two addresses
        assert total["loop"]["lag_max"] == max(s["loop"]["lag_max"] for s in st)
        assert total["loop"]["syscalls"]["accept"] == sum(s["loop"]["syscalls"]["accept"] for s in st)
        assert total["balance"] == "round_robin" and total["draining"] is False
    finally:
        srv.close()


def test_supervisor_admin_sums_the_workers_stats(spawn):
    pytest.importorskip("reactor.admin")
    import json
    import urllib.request

    srv = echo_server()
    try:
        g = spawn("gateway", "--listen", "127.0.0.1:0", "--backend", srv.spec,
                  "--admin", "127.0.0.1:0", "--workers", "2")
        admin = re.search(r"admin=(\S+)", g.first_line).group(1)
        for i in range(10):
            assert one_exchange(g.addr, b"%d" % i) == b"%d" % i

        def stats():
            with urllib.request.urlopen(f"http://{admin}/stats", timeout=5) as r:
                return json.loads(r.read())
        st = wait_for(lambda: (s := stats())["connections"]["accepted_total"] == 10 and s,
                      what="summed stats")
        assert len(st["workers"]) == 2 and all(w["stats"] == "ok" for w in st["workers"])
        assert st["supervisor"]["pid"] == g.pid
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
            assert b"reactor_connections_accepted_total 10" in r.read()
    finally:
        srv.close()


# -- 7. many instances, one answer -------------------------------------------------------------


def test_two_gateways_with_maglev_pick_the_same_backend_per_client(spawn):
    """No shared state: the maglev table is a function of the backend set, so
    two instances (given the list in different orders) agree per client IP."""
    from reactor.balancer import Backend, Balancer

    servers = [echo_server() for _ in range(3)]
    try:
        specs = [s.spec for s in servers]
        g1 = spawn("gateway", "--listen", "127.0.0.1:0", "--admin", "off", "--balance", "maglev",
                   *(x for s in specs for x in ("--backend", s)))
        g2 = spawn("gateway", "--listen", "127.0.0.1:0", "--admin", "off", "--balance", "maglev",
                   *(x for s in reversed(specs) for x in ("--backend", s)))
        ips = [f"127.0.{1 + i // 200}.{10 + i % 200}" for i in range(60)]
        for ip in ips:
            for g in (g1, g2):
                assert one_exchange(g.addr, b"hi", source=ip) == b"hi"
        choice = []
        for g in (g1, g2):
            lines = wait_access(g, len(ips))
            choice.append({line[0].rsplit(":", 1)[0]: line[1] for line in lines})
        assert choice[0] == choice[1]
        assert set(choice[0].values()) == set(specs)  # and the clients are spread
        # the same answer again, computed from the backend list alone
        bal = Balancer([Backend(s.addr) for s in servers], "maglev")
        assert {ip: bal.maglev_owner(ip).name for ip in ips} == choice[0]
    finally:
        for s in servers:
            s.close()


def test_every_gateway_flag_given_to_the_supervisor_reaches_its_workers():
    """A flag the supervisor forgot to hand on would silently not apply with
    --workers N: the worker's command line must carry every one of them."""
    import argparse

    from reactor import config as C
    from reactor.supervisor import worker_argv

    sample = {"balance": "p2c", "splice": "off", "workers": "3"}
    argv = []
    for dest, (_key, flag) in C.CLI_GATEWAY.items():
        if dest != "access_log":
            argv += [flag, sample.get(dest, "7")]
    ap = argparse.ArgumentParser()
    C.add_cli_options(ap)
    args = ap.parse_args(argv + ["--access-log", "x.log", "--backend", "127.0.0.1:1"])
    got = worker_argv(args, ["127.0.0.1:8080"], "off", 0)
    pairs = {got[i]: got[i + 1] for i in range(4, len(got) - 1)}
    for dest, (_key, flag) in C.CLI_GATEWAY.items():
        if dest == "workers":
            assert pairs[flag] == "1"  # a worker is one process
        elif dest == "access_log":
            assert pairs[flag] == os.path.abspath("x.log")
        elif dest in sample:
            assert pairs[flag] == sample[dest], flag
        else:
            assert float(pairs[flag]) == 7, flag
