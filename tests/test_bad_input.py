"""Bad input everywhere it enters, and the answer is always a clear one.

* At startup (port in use, no permission to bind, unknown host, unreadable or
  malformed config): one line on stderr naming the culprit, exit 2, no traceback.
* Config text (hypothesis, through the CLI entry point): exit 0 or 2, one line.
* PROXY headers (hypothesis, into a live gateway): every connection ends, the
  bytes echoed are exactly what ``reactor.proxyproto.parse`` says follows a
  valid header (nothing for an invalid one), and the gateway keeps serving.
* Admin request heads (hypothesis; once the admin endpoint is merged).
* /proc read while it changes under the reader (`reactor fds` during churn).

The unit-level fuzzing of the parsers lives with them: tests/test_config.py,
tests/test_proxyproto.py, tests/test_procnet.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reactor import procnet
from reactor.cli import main as cli_main
from reactor.proxyproto import ProxyProtocolError, encode_v1, encode_v2, parse
from tests.faults import (
    NOBODY,
    Baseline,
    RttProbe,
    admin_get,
    echo_backend,
    run_cli_as,
    spec,
    start_gateway,
    wait_access,
    write_config,
)
from tests.helpers import ROOT, recv_all

EXAMPLE = Path(ROOT) / "examples" / "gateway.toml"
FUZZ_SETTINGS = settings(max_examples=100, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.function_scoped_fixture])


def reactor(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reactor", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_one_line_exit_2(rc: int, out: str, err: str, expected: str) -> None:
    assert "Traceback" not in err, err
    assert (rc, out) == (2, ""), (rc, out, err)
    assert err == expected + "\n", err


# -- at startup -------------------------------------------------------------------------

def test_listen_port_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        r = reactor("gateway", "--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9",
                    "--admin", "off")
    assert_one_line_exit_2(r.returncode, r.stdout, r.stderr,
                           f"reactor gateway: listen 127.0.0.1:{port}: address already in use")


def test_no_permission_to_bind():
    if os.getuid() != 0:
        pytest.skip("needs root, to drop to nobody")
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 1:
        pytest.skip("every port is unprivileged here")
    rc, out, err = run_cli_as(NOBODY, ["gateway", "--listen", "127.0.0.1:1", "--backend",
                                       "127.0.0.1:9", "--admin", "off"])
    assert_one_line_exit_2(rc, out, err, "reactor gateway: listen 127.0.0.1:1: permission denied "
                                         "(ports below 1024 need privileges)")


def test_unknown_listen_host():
    r = reactor("gateway", "--listen", "no-such-host.invalid:0", "--backend", "127.0.0.1:9",
                "--admin", "off")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("reactor gateway: listen no-such-host.invalid:0: cannot resolve host")
    assert r.stderr.count("\n") == 1


def test_unknown_backend_host():
    r = reactor("gateway", "--listen", "127.0.0.1:0", "--backend", "no-such-host.invalid:9000",
                "--admin", "off")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("reactor gateway: ") and r.stderr.count("\n") == 1, r.stderr
    assert "cannot resolve" in r.stderr and "no-such-host.invalid" in r.stderr, r.stderr


def test_access_log_that_cannot_be_opened(tmp_path):
    path = tmp_path / "missing-dir" / "access.log"
    r = reactor("gateway", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                "--admin", "off", "--access-log", str(path))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == (f"reactor gateway: access_log: cannot open {path}: "
                        "No such file or directory\n"), r.stderr


def test_unknown_admin_host():
    pytest.importorskip("reactor.admin")
    r = reactor("gateway", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                "--admin", "no-such-host.invalid:0")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert "no-such-host.invalid" in r.stderr and r.stderr.count("\n") == 1


def test_admin_port_in_use():
    pytest.importorskip("reactor.admin")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        r = reactor("gateway", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                    "--admin", f"127.0.0.1:{port}")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert "address already in use" in r.stderr and r.stderr.count("\n") == 1


def test_unreadable_config(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root, to drop to nobody")
    path = tmp_path / "secret.toml"
    path.write_text(EXAMPLE.read_text())
    path.chmod(0o600)  # root's; nobody may not read it
    tmp_path.chmod(0o755)
    rc, out, err = run_cli_as(NOBODY, ["gateway", "--config", str(path)])
    assert_one_line_exit_2(rc, out, err, f"reactor gateway: {path}: cannot read: Permission denied")


@pytest.mark.parametrize("content,message", [
    (None, "cannot read: No such file or directory"),
    ("dir", "cannot read: Is a directory"),
    (b"\xff\xfe[gateway]\n", "not UTF-8 text (byte 0)"),
    (b"[gateway\n", "1:9: invalid TOML"),
])
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "gateway.toml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    r = reactor("gateway", "--config", str(path))
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"reactor gateway: {path}") and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


# -- config text through the CLI ------------------------------------------------------------

def _example_lines() -> list[str]:
    return EXAMPLE.read_text().splitlines()


toml_fragments = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "[gateway]", "[[backend]]", "[admin]", "listen = ", "= 1", "[", "]",
                     'address = "127.0.0.1:0"', 'address = ":80"', "weight = 0", "weight = 257",
                     "retries = -1", "connect_timeout = nan", "connect_timeout = inf",
                     "idle_timeout = -0.0", 'balance = "fastest"', "accept_proxy = true",
                     'trusted_sources = ["300.0.0.0/8"]', 'listen = ["[::1]:99999"]',
                     "max_connections = 0", 'access_log = ""', "workers = 1e3",
                     'address = "127.0.0.1:9001"', "\x00", "key = 'unterminated",
                     '"\\ud800" = 1', "a.b.c = 1", "[gateway.extra]"]),
)


@FUZZ_SETTINGS
@given(st.lists(st.tuples(st.integers(0, 200), st.booleans(), toml_fragments), max_size=4))
def test_mutated_config_files_exit_0_or_2_with_one_line(tmp_path, edits):
    """The example config with lines replaced or inserted: `reactor gateway --check`
    accepts it (exit 0) or refuses it in one line naming the file (exit 2)."""
    lines = _example_lines()
    for pos, replace, text in edits:
        pos %= len(lines)
        if replace:
            lines[pos] = text
        else:
            lines.insert(pos, text)
    path = tmp_path / "fuzz.toml"
    path.write_text("\n".join(lines), errors="surrogatepass")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli_main(["gateway", "--check", "--config", str(path)])
        except SystemExit as e:  # argparse; never expected here
            rc = e.code
    if rc == 0:
        assert out.getvalue().startswith(f"{path}: ok")
        return
    assert rc == 2, (rc, err.getvalue())
    msg = err.getvalue()
    assert msg.startswith(f"reactor gateway: {path}") and msg.count("\n") == 1, msg


# -- PROXY headers into a live gateway ----------------------------------------------------------

ips4 = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)


@st.composite
def proxy_inputs(draw) -> bytes:
    """Valid headers, corrupted ones, truncated ones, and plain garbage."""
    kind = draw(st.sampled_from(["v1", "v2", "garbage", "prefix"]))
    payload = draw(st.binary(max_size=64))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=120))
    if kind == "prefix":
        return draw(st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"\r\n\r\n\x00\r\nQUIT\n",
                                     b"PROXY UNKNOWN\r", b"PROXY TCP6 ::1 ::1 1 2\r\n"])) + payload
    src, dst = (draw(ips4), draw(ports)), (draw(ips4), draw(ports))
    header = encode_v1(src, dst) if kind == "v1" else encode_v2(src, dst)
    data = bytearray(header + payload)
    for _ in range(draw(st.integers(0, 3))):  # flip some bits, maybe
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= 1 << draw(st.integers(0, 7))
    cut = draw(st.integers(1, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


def expected_echo(data: bytes) -> bytes | None:
    """What the echo backend returns: the bytes after a valid header; None when
    the header is invalid or incomplete (the client half-closes after it)."""
    try:
        header = parse(data)
    except ProxyProtocolError:
        return None
    return header.rest


def test_garbage_proxy_headers_to_a_live_gateway(spawn, tmp_path):
    backend = echo_backend(spawn)
    cfg = write_config(tmp_path / "proxy.toml", """
[gateway]
accept_proxy = true
trusted_sources = ["127.0.0.0/8"]
""")
    g = start_gateway(spawn, spec(backend), extra=("--config", cfg))
    base = Baseline(g)
    count = {"n": 0, "valid": 0}

    @FUZZ_SETTINGS
    @given(proxy_inputs())
    def feed(data: bytes) -> None:
        count["n"] += 1
        want = expected_echo(data)
        count["valid"] += want is not None
        with socket.create_connection(g.addr, timeout=10) as c:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)  # nothing more: an incomplete header is refused at once
            try:
                got = recv_all(c)
            except ConnectionResetError:
                got = None  # refused with unread bytes in our direction: RST, not FIN
        # a valid header: the relay runs and echoes what followed it; otherwise no byte
        # reaches the backend
        assert got == (want if want is not None else b"") or (got is None and want is None), (
            data, got, want)

    header = encode_v1(("192.0.2.1", 1000), ("127.0.0.1", g.addr[1]))
    with RttProbe(g.addr, preamble=header) as probe:
        feed()
    probe.assert_ok(1.0, min_trips=1)
    assert count["valid"] >= 10, f"only {count['valid']} of {count['n']} inputs were valid headers"
    wait_access(g, count["n"] + 1)
    base.wait_back()


# -- admin request heads -------------------------------------------------------------------------

def _admin_parser():
    admin = pytest.importorskip("reactor.admin")
    parse_head = getattr(admin, "parse_request_head", None)
    bad = getattr(admin, "BadRequest", None)
    if parse_head is None or bad is None:
        httphead = pytest.importorskip("reactor.httphead")
        parse_head, bad = httphead.parse_request_head, httphead.BadRequest
    return parse_head, bad


tokens = st.text(alphabet="!#$%&'*+-.^_`|~abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
                 min_size=1, max_size=12)
paths = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=30).map(
    lambda s: "/" + s)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.builds(lambda m, p, hs: (f"{m} {p} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hs)
                                + "\r\n").encode(),
              tokens, paths, st.lists(st.tuples(tokens, st.text(max_size=20)), max_size=5)),
))
def test_admin_request_parser_returns_or_raises_bad_request(data):
    parse_head, bad = _admin_parser()
    try:
        req = parse_head(data)
    except bad as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert req.path.startswith("/")


def test_admin_request_parser_refuses_huge_heads():
    parse_head, bad = _admin_parser()
    with pytest.raises(bad):
        parse_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n")


def test_garbage_requests_to_live_admin_endpoint(spawn):
    pytest.importorskip("reactor.admin")
    backend = echo_backend(spawn)
    g = start_gateway(spawn, spec(backend), admin=True)
    garbage = [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
               b"GET /stats HTTP/1.1\r\nBad Header\r\n\r\n", b"\r\n" * 5000, b"G" * 20000,
               b"GET /stats HTTP/1.1\r\n X: folded\r\n\r\n", b"GET /\x00 HTTP/1.1\r\n\r\n",
               b"POST /stats HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"]
    for data in garbage:
        with socket.create_connection(g.admin_addr, timeout=10) as c:
            try:
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)
                reply = recv_all(c)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
        assert reply == b"" or reply.startswith(b"HTTP/1.") and reply[9:12] in (b"400", b"405", b"404",
                                                                               b"413", b"431", b"501")
        status, body = admin_get(g.admin_addr, "/stats")
        assert status == 200 and json.loads(body)["connections"]["active"] >= 0
    with socket.create_connection(g.addr, timeout=10) as c:
        c.sendall(b"still relaying")
        assert c.recv(100) == b"still relaying"


# -- /proc read while it changes -----------------------------------------------------------------

CHURN = """
import select, socket, sys
addr = (sys.argv[1], int(sys.argv[2]))
while not select.select([sys.stdin], [], [], 0)[0]:
    with socket.create_connection(addr, timeout=10) as c:
        c.sendall(b"x")
        c.recv(1)
"""


@pytest.mark.soak
def test_fd_table_of_a_churning_gateway_never_fails(spawn):
    """`reactor fds` reads /proc/PID/fd, then each link, then /proc/PID/net/*: under
    churn, fds vanish and appear between those reads. Every read must still succeed
    with a table that is consistent in itself."""
    backend = echo_backend(spawn)
    g = start_gateway(spawn, spec(backend))
    # the churn runs in its own process: in ours it would hold up the reads with the GIL
    churn = subprocess.Popen([sys.executable, "-c", CHURN, g.addr[0], str(g.addr[1])],
                             stdin=subprocess.PIPE)
    try:
        # each read walks the whole of /proc/net/tcp, TIME_WAITs included: seconds
        # under churn, hence `make soak`
        for _ in range(10):
            rows = procnet.fd_table(g.pid)
            assert [r.fd for r in rows] == sorted({r.fd for r in rows})
            assert any(r.state == "LISTEN" for r in rows)
        for _ in range(3):
            r = subprocess.run([sys.executable, "-m", "reactor", "fds", str(g.pid), "--json"],
                               capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert r.returncode == 0, r.stderr
            assert any(row["state"] == "LISTEN" for row in json.loads(r.stdout))
    finally:
        churn.stdin.close()
        try:
            churn.wait(10)
        except subprocess.TimeoutExpired:
            churn.kill()
            churn.wait()
    assert churn.returncode == 0
    assert g.p.poll() is None
