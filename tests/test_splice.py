"""`gateway.splice`: relaying through splice(2), end to end on real sockets.

Every test checks, through the admin endpoint's own counters, that the splice
path really carried the bytes (or, for small messages under ``auto``, that it
did not): a splice test that silently ran on recv/send would prove nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import selectors
import socket
import struct
import threading
import time
import urllib.request

import psutil
import pytest

from tests.backends import ThreadServer
from tests.helpers import recv_exact, wait_for
from tests.test_gateway import access_lines

pytestmark = pytest.mark.timeout(60)

MODES = ["on", "auto"]


class Gw:
    """A gateway process with its admin endpoint."""

    def __init__(self, spawn, backends: list[str], mode: str, *extra: str, conf_text: str = "",
                 **kw) -> None:
        # no active health checks: their sockets would come and go in the fd counts
        conf = os.path.join(_tmpdir(), f"gateway-{time.monotonic_ns()}.toml")
        with open(conf, "w") as f:
            f.write(conf_text + "[health]\nenabled = false\n")
        args = ["gateway", "--config", conf, "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
                "--splice", mode, "--max-connections", "200"]
        for b in backends:
            args += ["--backend", b]
        self.proc = spawn(*args, *extra, **kw)
        self.addr = self.proc.addr
        self.admin = self.proc.first_line.split()[-1].removeprefix("admin=")
        self.pid = self.proc.pid

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://{self.admin}{path}", timeout=5) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        return self.get("/stats")

    def syscalls(self) -> dict:
        return self.stats()["loop"]["syscalls"]

    def fds(self) -> int:
        """Open fds, once no TCP connection is open (called with no relay open:
        what may linger is the admin connection we asked on, closing after us)."""
        proc = psutil.Process(self.pid)

        def check():
            n = len(os.listdir(f"/proc/{self.pid}/fd"))
            busy = any(c.status != "LISTEN" for c in proc.net_connections("tcp"))
            return None if busy or n != len(os.listdir(f"/proc/{self.pid}/fd")) else n
        return wait_for(check, timeout=10, what="only listening sockets open")

    def pipe_fds(self) -> int:
        n = 0
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                n += os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("pipe:")
            except FileNotFoundError:
                pass  # closed since the listing (the admin connection we just asked on)
        return n

    def settled(self) -> dict:
        """Splice stats once no relay is open."""
        def check():
            st = self.stats()
            return None if st["connections"]["active"] else st["splice"]
        return wait_for(check, timeout=10, what="relays closed")

    def assert_no_leak(self, fds0: int, pipes0: int) -> dict:
        sp = self.settled()
        assert sp["pipes_in_use"] == 0
        assert sp["pipes_created"] == sp["pipes_pooled"] + sp["pipes_closed"]
        assert sp["pipes_pooled"] <= 16
        assert self.pipe_fds() == pipes0 + 2 * sp["pipes_pooled"], sp
        assert self.fds() == fds0 + 2 * sp["pipes_pooled"], sp
        return sp


_TMP: list[str] = []


def _tmpdir() -> str:
    if not _TMP:
        import tempfile

        _TMP.append(tempfile.mkdtemp(prefix="reactor-splice-test-"))
    return _TMP[0]


@pytest.fixture
def echo(spawn):
    return spawn("serve", "--listen", "127.0.0.1:0", "--mode", "echo")


def spec(p) -> str:
    return f"{p.addr[0]}:{p.addr[1]}"


# -- many clients, random sizes, half-close ----------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_20_clients_random_sizes_half_close_intact(spawn, echo, mode):
    g = Gw(spawn, [spec(echo)], mode, "--idle-timeout", "0", "--no-access-log")
    fds0, pipes0 = g.fds(), g.pipe_fds()
    rng = random.Random(11)
    sizes = [int(2 ** rng.uniform(4, 23)) for _ in range(20)]  # 16 B .. 8 MiB, log-uniform
    sizes[:3] = [8 << 20, 5 << 20, 10]
    sel = selectors.DefaultSelector()
    st = {}
    for i, size in enumerate(sizes):
        s = socket.create_connection(g.addr)
        s.setblocking(False)
        payload = struct.pack("!I", i) + os.urandom(size)  # a crossed stream shows up
        st[s] = [memoryview(payload), hashlib.sha256(payload).digest(), hashlib.sha256(), 0]
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    done, deadline = 0, time.monotonic() + 40
    while done < len(sizes):
        assert time.monotonic() < deadline, f"only {done} clients finished"
        for key, ev in sel.select(1):
            s, rec = key.fileobj, st[key.fileobj]
            if ev & selectors.EVENT_WRITE and rec[0]:
                try:
                    rec[0] = rec[0][s.send(rec[0][:1 << 20]):]
                except BlockingIOError:
                    pass
                if not rec[0]:
                    s.shutdown(socket.SHUT_WR)  # half-close; the echo must still come back
                    sel.modify(s, selectors.EVENT_READ)
            if ev & selectors.EVENT_READ:
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    continue
                if data:
                    rec[2].update(data)
                    rec[3] += len(data)
                else:
                    sel.unregister(s)
                    s.close()
                    done += 1
    for rec in st.values():
        assert rec[2].digest() == rec[1], "echo differs: corrupted, truncated or crossed"
    sc = g.syscalls()
    assert sc["splice"] > 0 and sc["pipe"] > 0, sc
    # every pipe given back: in use 0; the pool keeps some, the rest were closed
    sp = g.assert_no_leak(fds0, pipes0)
    if mode == "on":
        assert sp["pipes_closed"] > 0  # 40 pipes were in use at once; the pool keeps 16


# -- backpressure: a reader that stops -----------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_stalled_reader_blocks_the_sender_memory_bounded_all_bytes_arrive(spawn, mode):
    total = 48 << 20
    payload = os.urandom(total)
    sent = [0]

    def source(conn):
        view = memoryview(payload)
        for off in range(0, total, 1 << 18):
            conn.sendall(view[off:off + (1 << 18)])
            sent[0] = off + (1 << 18)
        conn.close()

    backend = ThreadServer(source)
    try:
        g = Gw(spawn, [backend.spec], mode)
        proc = psutil.Process(g.pid)
        rss0 = proc.memory_info().rss
        c = socket.create_connection(g.addr, timeout=10)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        got = bytearray(recv_exact(c, 1 << 20))
        # stop reading: the sender must stall well before the end
        last = [-1, time.monotonic()]

        def stalled():
            if sent[0] != last[0]:
                last[:] = [sent[0], time.monotonic()]
                return False
            return time.monotonic() - last[1] > 0.4
        wait_for(stalled, timeout=15, what="the backend to block on a full path")
        assert sent[0] < total, "nothing held the sender back"
        assert g.stats()["splice"]["directions_spliced"] >= 1
        peak = proc.memory_info().rss
        while True:  # the slow reader catches up
            data = c.recv(1 << 20)
            if not data:
                break
            got += data
        assert len(got) == total and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        # the bytes waited in the kernel (socket buffers, the pipe), not in our heap
        assert peak - rss0 < 4 << 20, f"gateway RSS grew {(peak - rss0) / 2**20:.1f} MiB"
        c.close()
    finally:
        backend.close()


# -- errors ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_client_rst_mid_stream_resets_backend_and_frees_the_pipe(spawn, mode):
    outcome = []
    got = [0]

    def slow_sink(conn):
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    outcome.append("eof")
                    return
                got[0] += len(data)
                time.sleep(0.01)
        except ConnectionResetError:
            outcome.append("reset")

    srv = ThreadServer(slow_sink)
    try:
        g = Gw(spawn, [srv.spec], mode)
        fds0, pipes0 = g.fds(), g.pipe_fds()
        c = socket.create_connection(g.addr, timeout=10)
        c.setblocking(False)
        chunk = os.urandom(1 << 16)
        pushed, deadline = 0, time.monotonic() + 10
        # keep pushing until the whole path is full (the pipe holds bytes too)
        while not g.stats()["splice"]["directions_spliced"] or pushed < (8 << 20):
            assert time.monotonic() < deadline
            try:
                pushed += c.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        assert got[0] < pushed
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # RST
        wait_for(lambda: outcome, timeout=10, what="the backend side to close")
        assert outcome == ["reset"]  # an abort, not a clean end
        (line,) = access_lines(g.proc, 1)
        assert "client_reset" in line[5]
        sp = g.assert_no_leak(fds0, pipes0)
        assert sp["pipes_closed"] >= 1  # the pipe still held bytes: closed, not pooled
    finally:
        srv.close()


@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_while_spliced(spawn, echo, mode):
    g = Gw(spawn, [spec(echo)], mode, "--idle-timeout", "0.6")
    with socket.create_connection(g.addr, timeout=10) as c:
        chunk = os.urandom(1 << 16)
        t_end = time.monotonic() + 1.5  # longer than the idle timeout: traffic keeps it open
        while time.monotonic() < t_end:
            c.sendall(chunk)
            assert recv_exact(c, len(chunk)) == chunk
            time.sleep(0.1)
        assert g.stats()["splice"]["directions_spliced"] == 2
        t0 = time.monotonic()
        assert c.recv(10) == b""  # now idle: closed by the gateway
        assert time.monotonic() - t0 < 3.0
    (line,) = access_lines(g.proc, 1)
    assert line[5] == "idle_timeout"
    assert int(line[2]) >= 15 * len(chunk) and line[2] == line[3]  # counted both ways


# -- auto: switches for bulk, not for small messages ------------------------------------

def test_auto_does_not_splice_small_messages_but_does_bulk(spawn, echo):
    g = Gw(spawn, [spec(echo)], "auto")
    with socket.create_connection(g.addr, timeout=10) as c:
        for i in range(300):
            msg = struct.pack("!I", i) + b"x" * 60
            c.sendall(msg)
            assert recv_exact(c, 64) == msg
        st = g.stats()
        assert st["loop"]["syscalls"]["splice"] == 0
        assert st["splice"]["pipes_created"] == 0 and st["splice"]["directions_spliced"] == 0
        # the same connection turns bulk: both directions switch
        blob = os.urandom(4 << 20)
        t = threading.Thread(target=c.sendall, args=(blob,))
        t.start()
        assert recv_exact(c, len(blob)) == blob
        t.join(10)
    st = g.stats()
    assert st["loop"]["syscalls"]["splice"] > 0
    assert st["splice"]["pipes_created"] == 2


def test_fds_roles_show_the_pipes(spawn, echo):
    g = Gw(spawn, [spec(echo)], "on")
    with socket.create_connection(g.addr, timeout=10) as c:
        c.sendall(b"ping")
        assert recv_exact(c, 4) == b"ping"
        wait_for(lambda: g.stats()["splice"]["directions_spliced"] == 2, what="both directions spliced")
        rows = [r for r in g.get("/fds")["fds"] if r["role"] == "splice_pipe"]
        assert len(rows) == 4 and all(r["type"] == "pipe" for r in rows)
        assert sorted(r["detail"] for r in rows) == ["backend->client"] * 2 + ["client->backend"] * 2
    sp = g.settled()
    rows = [r for r in g.get("/fds")["fds"] if r["role"] == "splice_pipe"]
    assert sp["pipes_pooled"] == 2 and [r["detail"] for r in rows] == ["pooled"] * 4


@pytest.mark.parametrize("mode", MODES)
def test_proxy_header_goes_first_then_splice_spoofcheck_client(spawn, mode):
    # the backend gets a PROXY v1 line through the write path, then spliced bytes;
    # the client is not a trusted source: its first bytes are checked, then spliced
    heads = []

    def backend(conn):
        f = conn.makefile("rb")
        heads.append(f.readline())
        while data := f.read1(1 << 16):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)

    srv = ThreadServer(backend)
    try:
        g = Gw(spawn, [], mode, conf_text=(
            '[gateway]\naccept_proxy = true\ntrusted_sources = ["10.0.0.0/8"]\n'
            f'[[backend]]\naddress = "{srv.spec}"\nsend_proxy = "v1"\n'))
        with socket.create_connection(g.addr, timeout=10) as c:
            blob = os.urandom(3 << 20)
            t = threading.Thread(target=c.sendall, args=(blob,))
            t.start()
            assert recv_exact(c, len(blob)) == blob
            t.join(10)
            assert g.stats()["splice"]["directions_spliced"] == 2
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""
        assert heads[0].startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    finally:
        srv.close()


# -- no pipe to be had: recv/send ----------------------------------------------------

def test_pipe_emfile_falls_back_to_recv_send(spawn, echo):
    g = Gw(spawn, [spec(echo)], "on")
    proc = psutil.Process(g.pid)
    _, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    # room for the client and backend sockets and an admin connection, not for a pipe
    proc.rlimit(psutil.RLIMIT_NOFILE, (g.fds() + 3, hard))
    with socket.create_connection(g.addr, timeout=10) as c:
        blob = os.urandom(2 << 20)
        t = threading.Thread(target=c.sendall, args=(blob,))
        t.start()
        assert recv_exact(c, len(blob)) == blob
        t.join(10)
        proc.rlimit(psutil.RLIMIT_NOFILE, (hard, hard))
        st = g.stats()
    assert st["splice"]["pipe_failures"] >= 1 and st["splice"]["directions_spliced"] == 0
    assert st["loop"]["syscalls"]["splice"] == 0 and st["loop"]["syscalls"]["recv"] > 0


def test_fd_budget_keeps_room_for_max_connections(spawn, echo):
    # 2 x 200 sockets (max_connections) + the reserve leave no fd for a pipe
    limit = 2 * 200 + 40

    def lower():
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # soft and hard: no raising

    g = Gw(spawn, [spec(echo)], "on", preexec_fn=lower)
    wait_for(lambda: "event=splice_disabled reason=fd_budget" in g.proc.stderr_text(), what="the warning")
    with socket.create_connection(g.addr, timeout=10) as c:
        c.sendall(b"x" * 100000)
        assert recv_exact(c, 100000) == b"x" * 100000
    sp = g.stats()["splice"]
    assert sp["max_pipes"] == 0 and sp["pipes_refused"] >= 1 and sp["pipes_created"] == 0


def test_gateway_raises_its_soft_fd_limit_to_the_hard_one(spawn, echo):
    """As Go's runtime and HAProxy do: a soft limit of 1024 would starve both
    the relays and the pipe budget while the hard limit allows more."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    g = Gw(spawn, [spec(echo)], "auto", preexec_fn=lower)
    with open(f"/proc/{g.proc.pid}/limits") as f:
        row = next(line for line in f if line.startswith("Max open files")).split()
    assert (row[3], row[4]) == (str(hard), str(hard))
    # and the pipe budget was reckoned from the raised limit
    assert g.stats()["splice"]["max_pipes"] > 0


# -- the pool itself, in process --------------------------------------------------------

def test_pipe_pool_budget_reuse_and_cap():
    import resource

    from reactor.loop import Loop
    from reactor.splice import FD_RESERVE, PipePool

    loop = Loop()
    try:
        pool = PipePool(loop)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        m = 100
        limit = pool.configure(m, 1 << 20, backends=3)
        assert limit == min(2 * m, (soft - pool.base_fds - FD_RESERVE - 3 - 2 * m) // 2)
        assert pool.size == min(1 << 20, int(open("/proc/sys/fs/pipe-max-size").read()))
        pool.limit, pool.keep = 3, 2
        pipes = [pool.acquire() for _ in range(3)]
        assert all(pipes) and pool.acquire() is None and pool.refused == 1
        import fcntl
        assert fcntl.fcntl(pipes[0].w, fcntl.F_GETPIPE_SZ) == pool.size
        pipes[0].queued = 5  # still holds bytes: closed, never pooled
        fds = [(p.r, p.w) for p in pipes]
        for p in pipes:
            pool.release(p)
        assert pool.in_use == 0 and len(pool.free) == 2 and pool.closed == 1
        for fd in fds[0]:
            with pytest.raises(OSError):
                os.fstat(fd)
        again = pool.acquire()
        assert again is pipes[2] and pool.reused == 1  # the last released comes back first
        pool.release(again)
        pool.clear()
        for fd in fds[1][0], fds[1][1], fds[2][0], fds[2][1]:
            with pytest.raises(OSError):
                os.fstat(fd)
        assert loop.syscalls["pipe"] == 3 and loop.syscalls["close"] == 6
    finally:
        loop.close()
