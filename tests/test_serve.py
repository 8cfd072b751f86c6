"""`reactor serve`: the seed's first program, run as a user would."""

from __future__ import annotations

import hashlib
import os
import resource
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from reactor.commands.serve import Server
from reactor.listener import Listener, bind_socket
from reactor.loop import Loop
from tests.helpers import ROOT, wait_for


def test_close_mode_100_concurrent_clients_each_get_eof_no_fd_leak(spawn):
    p = spawn("serve", "--listen", "127.0.0.1:0", "--mode", "close")
    assert f"pid={p.pid}" in p.first_line and "mode=close" in p.first_line
    baseline = p.fd_count()
    clients = [socket.create_connection(p.addr, timeout=5) for _ in range(100)]
    try:
        for c in clients:
            assert c.recv(1) == b""  # EOF: handlerConnection closed it
    finally:
        for c in clients:
            c.close()
    # every accepted fd was closed: back to the listen socket, epoll, wake pair…
    wait_for(lambda: p.fd_count() == baseline, what=f"fd count back to {baseline}")
    p.signal(signal.SIGTERM)
    assert p.wait() == 0


def test_echo_100_clients_1mib_each_slow_readers_intact_and_rss_bounded(spawn):
    p = spawn("serve", "--listen", "127.0.0.1:0", "--mode", "echo")
    proc = psutil.Process(p.pid)
    rss0 = proc.memory_info().rss
    size = 1 << 20
    sel = selectors.DefaultSelector()
    state = {}
    for _i in range(100):
        s = socket.create_connection(p.addr, timeout=5)
        s.setblocking(False)
        payload = os.urandom(size)
        state[s] = {"out": memoryview(payload), "in": bytearray(), "want": hashlib.sha256(payload).digest()}
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    rss_max = rss0
    deadline = time.monotonic() + 60
    done = 0
    turn = 0
    while done < 100:
        assert time.monotonic() < deadline, "echo of 100 MiB did not finish in 60 s"
        turn += 1
        for key, ev in sel.select(timeout=1):
            s = key.fileobj
            st = state[s]
            if ev & selectors.EVENT_WRITE and st["out"]:
                try:
                    n = s.send(st["out"][:65536])
                    st["out"] = st["out"][n:]
                except BlockingIOError:
                    pass
                if not st["out"]:
                    s.shutdown(socket.SHUT_WR)
                    sel.modify(s, selectors.EVENT_READ)
            if ev & selectors.EVENT_READ:
                # slow reader: small reads, so the server's send queue backs up
                try:
                    data = s.recv(8192)
                except BlockingIOError:
                    continue
                if data:
                    st["in"] += data
                else:
                    sel.unregister(s)
                    done += 1
        if turn % 50 == 0:
            rss_max = max(rss_max, proc.memory_info().rss)
            time.sleep(0.001)
    rss_max = max(rss_max, proc.memory_info().rss)
    for s, st in state.items():
        assert len(st["in"]) == size
        assert hashlib.sha256(st["in"]).digest() == st["want"]
        s.close()
    growth = rss_max - rss0
    # 100 connections x 256 KiB high watermark = 25 MiB of queue at most, plus
    # allocator slack; without backpressure the server would queue up to the
    # full 100 MiB the clients send.
    assert growth < 48 * 2**20, f"server RSS grew by {growth / 2**20:.1f} MiB"
    p.signal(signal.SIGINT)
    assert p.wait() == 0


def test_watermarks_pause_reading_and_resume_in_process():
    """A client that stops reading: the echo stream pauses its reading of that client,
    and resumes once the client drains."""
    loop = Loop()
    sock = bind_socket("127.0.0.1", 0)
    server = Server(loop, sock, "echo")
    trace = []
    last = [None]
    c = socket.create_connection(sock.getsockname())
    stop_draining = threading.Event()

    def poll_state():
        (stream,) = server.conns or [None]
        if stream is None:
            loop.call_later(0.01, poll_state)
            return
        state = "reading" if stream.reading else "paused"
        if last[0] != state:
            last[0] = state
            trace.append(state)
        if state == "paused" and "drained" not in trace:
            trace.append("drained")
            threading.Thread(target=_drain_until, args=(c, stop_draining)).start()
        if len(trace) >= 4:
            loop.stop()
            return
        loop.call_later(0.005, poll_state)

    c.setblocking(False)

    def feed():
        # keep sending until the server has to stop reading us
        try:
            c.send(b"y" * 65536)
        except BlockingIOError:
            pass
        if "paused" not in trace:
            loop.call_later(0.001, feed)

    loop.call_soon(feed)
    loop.call_soon(poll_state)
    loop.call_later(20, loop.stop)
    loop.run()
    stop_draining.set()
    server.close()
    loop.close()
    assert trace == ["reading", "paused", "drained", "reading"]


def _drain_until(c: socket.socket, stop: threading.Event) -> None:
    # the socket stays non-blocking (the loop thread may still touch it):
    # wait with select, read what is there
    deadline = time.monotonic() + 20
    while not stop.is_set() and time.monotonic() < deadline:
        r, _, _ = select.select([c], [], [], 0.1)
        if not r:
            continue
        try:
            if not c.recv(1 << 20):
                break
        except BlockingIOError:
            continue
        except OSError:
            break
    c.close()


def test_emfile_does_not_spin_and_serves_again_after(spawn):
    limit = 40

    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    p = spawn("serve", "--listen", "127.0.0.1:0", "--mode", "echo", preexec_fn=lower_limit)
    held = []
    try:
        # hold more connections than the process has fds: the extra ones
        # wait in the kernel's accept queue while accept() says EMFILE
        for _ in range(limit + 20):
            held.append(socket.create_connection(p.addr, timeout=5))
        wait_for(lambda: p.fd_count() >= limit - 1, what="server to run out of fds")
        proc = psutil.Process(p.pid)
        t0 = proc.cpu_times()
        time.sleep(2.0)
        t1 = proc.cpu_times()
        cpu = (t1.user + t1.system) - (t0.user + t0.system)
        assert cpu < 0.4, f"server used {cpu / 2:.0%} of a core while out of fds"
        # an established connection still echoes
        held[0].sendall(b"still here")
        assert held[0].recv(100) == b"still here"
    finally:
        for c in held:
            c.close()
    # fds free up: a new client is served again
    def served():
        with socket.create_connection(p.addr, timeout=5) as c:
            c.sendall(b"ping")
            c.settimeout(2)
            return c.recv(4) == b"ping"
    assert wait_for(served, timeout=10, what="service after EMFILE")
    assert "accept_paused" in _stderr_after_stop(p)


def _stderr_after_stop(p) -> str:
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    return p.stderr_text()


def test_sigterm_and_sigint_exit_zero(spawn):
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = spawn("serve", "--listen", "127.0.0.1:0")
        p.signal(sig)
        assert p.wait() == 0


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reactor", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=20)


def test_port_in_use_is_one_line_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run_cli("serve", "--listen", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr.strip() == f"reactor serve: --listen 127.0.0.1:{port}: address already in use"


@pytest.mark.parametrize("addr,msg", [
    ("127.0.0.1:70000", "--listen: port 70000 out of range"),
    ("127.0.0.1", "missing port in '127.0.0.1' (expected HOST:PORT)"),
    ("::1:80", "IPv6 addresses need brackets: [::1]:80"),
    ("127.0.0.1:http", "invalid port 'http' (expected a number)"),
    ("no-such-host.invalid:80", "cannot resolve host"),
])
def test_bad_address_is_one_line_exit_2(addr, msg):
    r = _run_cli("serve", "--listen", addr)
    assert r.returncode == 2
    assert msg in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_ipv6_listen_serves(spawn):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 on this host")
    p = spawn("serve", "--listen", "[::1]:0", "--mode", "echo")
    assert p.first_line.split("listening on ")[1].startswith("[::1]:")
    with socket.create_connection(("::1", p.addr[1]), timeout=5) as c:
        c.sendall(b"v6")
        assert c.recv(2) == b"v6"


def test_python_dash_m_and_console_script_agree():
    r = _run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("reactor ")
    script = os.path.join(os.path.dirname(sys.executable), "reactor")
    if os.path.exists(script):
        r2 = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=20)
        assert r2.stdout == r.stdout


def test_listener_accepts_in_bounded_batches():
    loop = Loop()
    sock = bind_socket("127.0.0.1", 0)
    got = []
    lst = Listener(loop, sock, lambda c, a: (got.append(c)), batch=8)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(20)]
    wait_for(lambda: len(got) < 20 and (loop.call_soon(loop.stop), loop.run(), len(got))[2] >= 20,
             what="all accepted")
    # 20 connections in at most 8 per event: the listener needed >= 3 events
    assert loop.syscalls["accept"] >= 20
    for c in clients + got:
        c.close()
    lst.close()
    loop.close()
