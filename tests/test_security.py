"""Security defaults: who may listen where, who may claim another address,
what the admin endpoint will never do, and what `reactor fds` will not pretend.

Parts that need the admin endpoint (branch admin) skip until it is merged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest

from reactor import config as configmod
from reactor import procnet
from reactor.proxyproto import encode_v1, encode_v2
from tests.backends import ThreadServer
from tests.faults import (
    NOBODY,
    admin_get,
    echo_backend,
    run_cli_as,
    spec,
    start_gateway,
    wait_access,
    write_config,
)
from tests.helpers import ADDR_RE, ROOT, Proc, recv_all, wait_for

# -- the admin endpoint binds loopback unless told otherwise --------------------------------

def _cli(*argv: str) -> configmod.Config:
    p = argparse.ArgumentParser()
    configmod.add_cli_options(p)
    return configmod.from_cli(p.parse_args(list(argv)))


def test_admin_defaults_to_loopback(tmp_path):
    assert configmod.Config().admin.listen == ("127.0.0.1", 9901)
    assert _cli("--backend", "127.0.0.1:9").admin.listen == ("127.0.0.1", 9901)
    # a config file without an [admin] table: loopback too
    f = write_config(tmp_path / "g.toml", '[[backend]]\naddress = "127.0.0.1:9"\n')
    assert configmod.load(f).admin.listen == ("127.0.0.1", 9901)
    assert _cli("--config", f).admin.listen == ("127.0.0.1", 9901)


def test_live_gateway_admin_listens_on_loopback_by_default():
    """Started without --admin, in a network namespace of its own (so port 9901 is
    free and nothing else can answer there): its admin socket is 127.0.0.1:9901."""
    pytest.importorskip("reactor.admin")
    if os.getuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare and ip to make a network namespace")
    script = (f"ip link set lo up && exec {sys.executable} -m reactor gateway "
              "--listen 127.0.0.1:0 --backend 127.0.0.1:9")
    p = subprocess.Popen(["unshare", "--net", "sh", "-c", script], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = p.stdout.readline().decode()
        m = re.search(r"pid=(\d+)", line)
        assert m and ADDR_RE.search(line), (line, p.stderr.read1(4096) if not m else "")
        pid = int(m.group(1))

        def listeners():
            return sorted(r.local for r in procnet.fd_table(pid) if r.state == "LISTEN")
        found = wait_for(lambda: len(listeners()) >= 2 and listeners(), what="two listeners")
        assert "127.0.0.1:9901" in found, found
        assert not any(a.startswith(("0.0.0.0:", "[::]:")) for a in found), found
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(5)
        p.stdout.close()
        p.stderr.close()


ADMIN_WARNING = re.compile(r"WARNING.*admin", re.IGNORECASE)


@pytest.mark.parametrize("where,loud", [("127.0.0.1:0", False), ("0.0.0.0:0", True), (":0", True)])
def test_admin_elsewhere_than_loopback_is_announced_loudly(spawn, where, loud):
    pytest.importorskip("reactor.admin")
    backend = echo_backend(spawn)
    g = spawn("gateway", "--listen", "127.0.0.1:0", "--backend", spec(backend), "--admin", where)
    if loud:
        line = wait_for(lambda: next((x for x in g.stderr_text().splitlines() if ADMIN_WARNING.search(x)),
                                     None), timeout=5, what="a warning about the admin address")
        assert "0.0.0.0" in line or "all interfaces" in line or "[::]" in line, line
    else:
        # the banner line is out, so is anything logged at startup
        assert not [x for x in g.stderr_text().splitlines() if ADMIN_WARNING.search(x)]


# -- PROXY headers only from trusted sources ---------------------------------------------------

@pytest.fixture
def recording_backend():
    """Echoes, and records every byte any connection sent it."""
    got: list[bytes] = []
    lock = threading.Lock()

    def handler(conn: socket.socket) -> None:
        data = bytearray()
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            conn.sendall(chunk)
        with lock:
            got.append(bytes(data))
        conn.close()

    srv = ThreadServer(handler)
    srv.got = got
    yield srv
    srv.close()


def _exchange(addr, data: bytes, source: str) -> bytes | None:
    """Send, half-close, read all; None if the gateway reset us."""
    with socket.create_connection(addr, timeout=10, source_address=(source, 0)) as c:
        try:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            return recv_all(c)
        except (ConnectionResetError, BrokenPipeError):
            return None


def test_proxy_headers_only_from_trusted_sources(spawn, tmp_path, recording_backend):
    cfg = write_config(tmp_path / "proxy.toml", """
[gateway]
accept_proxy = true
trusted_sources = ["127.0.0.2/32"]
[health]
enabled = false
""")
    g = start_gateway(spawn, recording_backend.spec, extra=("--config", cfg))
    v1 = encode_v1(("203.0.113.9", 1111), ("127.0.0.1", g.addr[1]))
    v2 = encode_v2(("203.0.113.9", 1111), ("127.0.0.1", g.addr[1]))
    # untrusted: a header is a spoofing attempt -> closed, nothing reaches the backend
    assert _exchange(g.addr, v1 + b"spoof1", "127.0.0.1") in (b"", None)
    assert _exchange(g.addr, v2 + b"spoof2", "127.0.0.1") in (b"", None)
    # untrusted, plain data: relayed as is, under its own address
    assert _exchange(g.addr, b"plain", "127.0.0.1") == b"plain"
    # trusted, with a header: relayed, header stripped, logged under the header's address
    assert _exchange(g.addr, v1 + b"proxied", "127.0.0.2") == b"proxied"
    # trusted, without a header: refused
    assert _exchange(g.addr, b"no header here\r\n", "127.0.0.2") in (b"", None)
    records = wait_access(g, 5)
    by_reason = {}
    for r in records:
        by_reason.setdefault(r[5], []).append(r[0])
    assert len(by_reason.get("proxy_error", [])) == 3, records
    assert [c for c in by_reason.get("client_eof", [])
            if c.startswith("127.0.0.1:")], records  # the plain one, under its real address
    assert "203.0.113.9:1111" in by_reason.get("client_eof", []), records
    wait_for(lambda: len(recording_backend.got) >= 2, what="the backend to see both relays end")
    seen = b"|".join(recording_backend.got)
    assert b"spoof" not in seen and b"PROXY" not in seen and b"no header" not in seen, seen
    assert b"plain" in seen and b"proxied" in seen


def test_accept_proxy_without_trusted_sources_is_refused_at_startup(tmp_path):
    cfg = write_config(tmp_path / "open.toml", '[gateway]\naccept_proxy = true\n'
                                               '[[backend]]\naddress = "127.0.0.1:9"\n')
    r = subprocess.run([sys.executable, "-m", "reactor", "gateway", "--config", cfg],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (f"reactor gateway: {cfg}: gateway.trusted_sources: must list the networks "
                        "allowed to send PROXY headers when accept_proxy = true\n")


# -- no endpoint reads arbitrary files or runs commands -------------------------------------------

def test_admin_never_reads_files_or_runs_commands(spawn, tmp_path):
    admin = pytest.importorskip("reactor.admin")
    backend = echo_backend(spawn)
    g = start_gateway(spawn, spec(backend), admin=True)
    secret_marker = os.urandom(8).hex()
    secret = tmp_path / "secret.txt"
    secret.write_text(secret_marker)
    canary = tmp_path / "canary"
    other_pid = backend.pid
    targets = [
        str(secret), "/" + str(secret), "/.." * 8 + str(secret), "/stats/../../../.." + str(secret),
        "/%2e%2e" * 8 + urllib.parse.quote(str(secret)), "/etc/passwd", "//etc/passwd",
        "/..%2f..%2f..%2f..%2fetc%2fpasswd", "/proc/self/environ", "/proc/self/cmdline",
        f"/fds?pid={other_pid}", f"/fds?pid={other_pid}&path={secret}", f"/stats?file={secret}",
        f"/metrics?path={secret}", f"/fds/{other_pid}", "/fds?pid=1",
        f"/$(touch%20{canary})", f"/stats;touch%20{canary}", f"/stats?x=%60touch%20{canary}%60",
        f"/stats|touch%20{canary}", "/stats%00.json", "/../", "/?" + "a" * 1000,
    ]
    for path in targets:
        status, body = admin_get(g.admin_addr, path)
        assert secret_marker.encode() not in body, path
        assert b"root:x:0:0" not in body, path
        if status == 200 and path.startswith("/fds"):
            rows = json.loads(body)
            rows = rows if isinstance(rows, list) else rows.get("fds", rows.get("rows", []))
            assert all(r.get("pid", g.pid) == g.pid for r in rows), f"{path}: another process's fds"
    assert not canary.exists(), "a request made the gateway run a command"
    # writes are not a thing the endpoint does
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        with socket.create_connection(g.admin_addr, timeout=10) as c:
            c.sendall(f"{method} /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
            reply = recv_all(c)
        assert not reply.startswith(b"HTTP/1.1 200") and not reply.startswith(b"HTTP/1.0 200"), method
    # and the module has nothing to run commands with
    src = Path(admin.__file__).read_text()
    for forbidden in ("subprocess", "os.system", "os.popen", "eval(", "exec(", "pickle"):
        assert forbidden not in src, forbidden


# -- reactor fds: a permission error, never partial data --------------------------------------------

@pytest.fixture(scope="module")
def root_gateway():
    """One root-owned gateway with a live relay, shared by the tests below (they
    only read it); killed by pid at the end of the module."""
    if os.getuid() != 0:
        pytest.skip("needs root, to look at a root process as nobody")
    procs = []
    try:
        backend = Proc(["serve", "--listen", "127.0.0.1:0", "--mode", "echo"])
        procs.append(backend)
        g = Proc(["gateway", "--listen", "127.0.0.1:0", "--admin", "off", "--backend", spec(backend)])
        procs.append(g)
        with socket.create_connection(g.addr, timeout=10) as c:  # something worth hiding
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            yield g
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("extra", [(), ("--json",), ("--watch", "0.1", "--count", "2"),
                                   ("--state", "LISTEN")])
def test_fds_of_another_users_process_is_a_permission_error(root_gateway, extra):
    pid = root_gateway.pid
    rc, out, err = run_cli_as(NOBODY, ["fds", str(pid), *extra])
    assert (rc, out) == (1, ""), (rc, out, err)  # nothing printed: no table passes for complete
    assert err == f"reactor fds: pid {pid}: permission denied reading /proc/{pid}/fd\n"


def test_fds_by_port_of_another_users_process_says_it_could_not_look(root_gateway):
    port = root_gateway.addr[1]
    rc, out, err = run_cli_as(NOBODY, ["fds", "--port", str(port)])
    assert (rc, out) == (1, ""), (rc, out, err)
    m = re.fullmatch(rf"reactor fds: no readable process listens on TCP port {port} "
                     r"\((\d+) process\(es\) could not be read: permission denied\)\n", err)
    assert m and int(m.group(1)) >= 1, err


def test_fds_discovery_with_an_unreadable_reactor_process_fails_whole(root_gateway):
    """With no target, `reactor fds` shows every reactor process: one it may not read
    makes the whole command fail rather than show the others as if they were all."""
    rc, out, err = run_cli_as(NOBODY, ["fds"])
    assert (rc, out) == (1, ""), (rc, out, err)
    assert re.fullmatch(r"reactor fds: pid \d+: permission denied reading /proc/\d+/fd\n", err), err


def test_fds_as_root_reads_the_same_process(root_gateway):
    """The control: the same process read by its own user gives the full table."""
    rows = procnet.fd_table(root_gateway.pid)
    assert any(r.state == "LISTEN" for r in rows) and any(r.state == "ESTABLISHED" for r in rows)
