"""reactor.procnet and `reactor fds`: recorded kernel samples, property tests, live /proc.

Recorded samples are in the exact kernel format (net/ipv4/tcp_ipv4.c get_tcp4_sock,
get_timewait4_sock, get_openreq4; tcp_ipv6.c; udp.c; af_unix.c) with hand-decoded
answers.  Live tests start tests/fds_holder.py (a plain python socket holder) and check
`python -m reactor fds` against `ss -tanpe` inode by inode.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reactor import procnet
from reactor.commands import fds as fds_cmd
from reactor.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
HOLDER = Path(__file__).resolve().parent / "fds_holder.py"
HZ = 100


def _kernel_pad(lines: list[str], width: int) -> str:
    # seq_pad(): the kernel pads every line (header too) with spaces to a fixed width.
    return "\n".join(line.ljust(width) for line in lines) + "\n"


# --------------------------------------------------------------------------- recorded samples
# fmt: off

TCP4 = _kernel_pad(
    [
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
        "   0: 00000000:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000  1000        0 41230 1 0000000000000000 100 0 0 10 0",
        "   1: 0100007F:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41231 1 0000000000000000 100 0 0 10 0",
        "   2: 0100007F:1F90 0100007F:C822 01 00000010:00000200 01:00000014 00000002  1000        0 41235 2 0000000000000000 20 4 30 10 -1",
        "   3: 0A01A8C0:1F90 0302010A:9C40 01 00000000:00000000 02:000AFC80 00000000  1000        0 41236 2 0000000000000000 20 4 0 10 -1",
        "   4: 0500000A:AD21 22D8B85D:01BB 06 00000000:00000000 03:00000BB8 00000000     0        0 0 3 0000000000000000",
        "   5: 0100007F:1F90 0100007F:C828 03 00000000:00000000 01:0000003A 00000001  1000        0 0 0 0000000000000000",
        "   6: 0100007F:1F90 0100007F:C82A 0C 00000000:00000000 01:00000064 00000000  1000        0 0 0 0000000000000000",
        "   7: 0100007F:1F90 0100007F:C832 01 0001F400:00000000 04:00000064 00000000  1000        3 41237 2 0000000000000000 20 4 0 10 -1",
        "   8: 0100007F:1F90 0100007F:C83C 08 00000000:00000007 00:00000000 00000000  1000        0 41238 2 0000000000000000 20 4 0 10 -1",
    ],
    149,
)

# (local, remote, state, tx, rx, timer, ticks, retransmits, uid, probes, inode), hand-decoded:
# 0100007F = bytes 7F 00 00 01 read as a little-endian word; 0A01A8C0 -> C0 A8 01 0A;
# 0302010A -> 0A 01 02 03; 22D8B85D -> 5D B8 D8 22 = 93.184.216.34; 1F90 = 8080, C822 = 51234…
TCP4_EXPECTED = [
    ("0.0.0.0:8080", None, "LISTEN", 0, 3, "none", 0, 0, 1000, 0, 41230),
    ("127.0.0.1:9090", None, "LISTEN", 0, 0, "none", 0, 0, 0, 0, 41231),
    ("127.0.0.1:8080", "127.0.0.1:51234", "ESTABLISHED", 16, 512, "retransmit", 20, 2, 1000, 0, 41235),
    ("192.168.1.10:8080", "10.1.2.3:40000", "ESTABLISHED", 0, 0, "keepalive", 720000, 0, 1000, 0, 41236),
    # get_timewait4_sock: timer 3, uid 0, inode 0
    ("10.0.0.5:44321", "93.184.216.34:443", "TIME_WAIT", 0, 0, "timewait", 3000, 0, 0, 0, 0),
    # get_openreq4 prints a request socket as SYN_RECV (03), timer 1, the listener's uid, inode 0
    ("127.0.0.1:8080", "127.0.0.1:51240", "SYN_RECV", 0, 0, "retransmit", 58, 1, 1000, 0, 0),
    # the same with the internal NEW_SYN_RECV code (0C), as the issue asks us to decode
    ("127.0.0.1:8080", "127.0.0.1:51242", "NEW_SYN_RECV", 0, 0, "retransmit", 100, 0, 1000, 0, 0),
    ("127.0.0.1:8080", "127.0.0.1:51250", "ESTABLISHED", 128000, 0, "zero_window_probe", 100, 0, 1000, 3, 41237),
    ("127.0.0.1:8080", "127.0.0.1:51260", "CLOSE_WAIT", 0, 7, "none", 0, 0, 1000, 0, 41238),
]

TCP6 = (
    "\n".join(
        [
            "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
            "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 52000 1 0000000000000000 100 0 0 10 0",
            "   1: 00000000000000000000000001000000:2382 00000000000000000000000000000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 52001 1 0000000000000000 100 0 0 10 0",
            "   2: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:C864 01 00000000:00000000 00:00000000 00000000  1000        0 52002 2 0000000000000000 20 4 0 10 -1",
            "   3: B80D0120000000000000000001000000:01BB B80D0120000000000000000002000000:C350 01 00000020:00000000 01:00000028 00000001  1000        0 52003 2 0000000000000000 20 4 0 10 -1",
            "   4: 00000000000000000000000001000000:2382 00000000000000000000000001000000:C8C8 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000",
        ]
    )
    + "\n"
)

# ::1 is words 0,0,0,00000001 -> the last word's bytes 00 00 00 01 read little-endian = 01000000;
# ::ffff:127.0.0.1: word 2 bytes 00 00 FF FF -> FFFF0000, word 3 bytes 7F 00 00 01 -> 0100007F;
# 2001:db8::1: word 0 bytes 20 01 0D B8 -> B80D0120.
TCP6_EXPECTED = [
    ("[::]:8080", None, "LISTEN", 0, 0, "none", 0, 0, 1000, 0, 52000),
    ("[::1]:9090", None, "LISTEN", 0, 1, "none", 0, 0, 0, 0, 52001),
    ("[::ffff:127.0.0.1]:8080", "[::ffff:127.0.0.1]:51300", "ESTABLISHED", 0, 0, "none", 0, 0, 1000, 0, 52002),
    ("[2001:db8::1]:443", "[2001:db8::2]:50000", "ESTABLISHED", 32, 0, "retransmit", 40, 1, 1000, 0, 52003),
    ("[::1]:9090", "[::1]:51400", "TIME_WAIT", 0, 0, "timewait", 6000, 0, 0, 0, 0),
]

UDP4 = _kernel_pad(
    [
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops",
        "    7: 00000000:14E9 00000000:0000 07 00000000:00000300 00:00000000 00000000     0        0 60000 2 0000000000000000 2",
        "   12: 0100007F:9C40 3500007F:0035 01 00000000:00000000 00:00000000 00000000  1000        0 60001 2 0000000000000000 0",
    ],
    127,
)
UDP6 = (
    "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"
    "    3: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   107        0 60002 2 0000000000000000 0\n"
)

UNIX = """\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 70000 /run/reactor/admin.sock
0000000000000000: 00000003 00000000 00000000 0001 03 70001 /run/reactor/admin.sock
0000000000000000: 00000003 00000000 00000000 0001 03 70002
0000000000000000: 00000002 00000000 00000000 0002 01 70003 @/tmp/.X11-unix/X0
0000000000000000: 00000002 00000000 00000000 0005 01 70004 /tmp/with space.sock
0000000000000000: 00000002 00000000 00000000 0001 02  1569
"""


# fmt: on


def _decoded(s: procnet.InetSocket) -> tuple:
    return (
        s.local,
        s.remote,
        s.state,
        s.tx_queue,
        s.rx_queue,
        s.timer,
        s.timer_ticks,
        s.retransmits,
        s.uid,
        s.probes,
        s.inode,
    )


def test_tcp4_sample_decodes_to_known_answers():
    rows = procnet.parse_inet_table(TCP4, "tcp", hz=HZ, byteorder="little")
    assert [_decoded(r) for r in rows] == TCP4_EXPECTED
    assert {r.family for r in rows} == {"inet"}
    assert rows[2].timer_expires == pytest.approx(0.20)
    assert rows[3].timer_expires == pytest.approx(7200.0)
    assert rows[4].timer_expires == pytest.approx(30.0)  # TIME_WAIT time left
    assert rows[4].timer_kind == 3 and rows[4].inode == 0
    assert rows[6].state_code == 0x0C and rows[5].state_code == 0x03
    assert rows[7].timer_kind == 4 and rows[7].probes == 3


def test_tcp6_sample_decodes_to_known_answers():
    rows = procnet.parse_inet_table(TCP6, "tcp", hz=HZ, byteorder="little")
    assert [_decoded(r) for r in rows] == TCP6_EXPECTED
    assert {r.family for r in rows} == {"inet6"}
    assert rows[4].timer_expires == pytest.approx(60.0)


def test_udp_samples():
    v4 = procnet.parse_inet_table(UDP4, "udp", hz=HZ, byteorder="little")
    assert [(r.local, r.remote, r.state, r.rx_queue, r.uid, r.inode) for r in v4] == [
        ("0.0.0.0:5353", None, "UNCONN", 768, 0, 60000),
        ("127.0.0.1:40000", "127.0.0.53:53", "ESTABLISHED", 0, 1000, 60001),
    ]
    v6 = procnet.parse_inet_table(UDP6, "udp", hz=HZ, byteorder="little")
    assert [(r.local, r.state, r.uid, r.inode, r.family) for r in v6] == [
        ("[::]:5353", "UNCONN", 107, 60002, "inet6")
    ]


def test_unix_sample():
    rows = procnet.parse_unix_table(UNIX)
    assert [(r.inode, r.type, r.state, r.path) for r in rows] == [
        (70000, "stream", "LISTEN", "/run/reactor/admin.sock"),  # Flags has __SO_ACCEPTCON
        (70001, "stream", "ESTABLISHED", "/run/reactor/admin.sock"),
        (70002, "stream", "ESTABLISHED", None),
        (70003, "dgram", "UNCONN", "@/tmp/.X11-unix/X0"),
        (70004, "seqpacket", "UNCONN", "/tmp/with space.sock"),
        (1569, "stream", "CONNECTING", None),
    ]


def test_inode_filter_decodes_only_wanted_rows():
    rows = procnet.parse_inet_table(TCP4, "tcp", inodes={41235, 41238}, hz=HZ, byteorder="little")
    assert [r.inode for r in rows] == [41235, 41238]
    assert [r.inode for r in procnet.parse_unix_table(UNIX, inodes=[70003])] == [70003]


def test_address_byte_order():
    assert procnet.decode_address("0100007F", "little") == "127.0.0.1"
    assert procnet.decode_address("7F000001", "big") == "127.0.0.1"
    assert procnet.decode_address("00000000000000000000000001000000", "little") == "::1"
    assert procnet.decode_address("00000000000000000000000000000001", "big") == "::1"
    assert (
        procnet.encode_address("::ffff:127.0.0.1", "little") == "0000000000000000FFFF00000100007F"
    )
    with pytest.raises(procnet.ParseError):
        procnet.decode_address("0100007", "little")


def test_overdue_timer_from_old_kernels_is_zero():
    # Kernels before jiffies_delta_to_clock_t printed an overdue timer as a negative long.
    line = "   0: 0100007F:1F90 0100007F:C822 01 00000000:00000000 01:FFFFFFFFFFFFFFF6 00000000     0        0 1 2 0"
    assert procnet.parse_inet_line(line, "tcp", hz=HZ).timer_expires == 0.0


@pytest.mark.parametrize(
    "line",
    [
        "",
        "garbage",
        "   0: 0100007F:1F90 0100007F:C822 01 00000000:00000000 01:00000000 00000000     0        0",  # no inode
        "   0: 0100007F:1F9 0100007F:C822 01 00000000:00000000 01:00000000 00000000     0        0 1",  # short port
        "   0: 0100007G:1F90 0100007F:C822 01 00000000:00000000 01:00000000 00000000     0        0 1",  # not hex
        "   0: 0100007F:1F90 00000000000000000000000001000000:C822 01 00000000:00000000 01:00000000 00000000 0 0 1",
        "   0: 0100007F:1F90 0100007F:C822 01 00000000:00000000 01:00000000 00000000     0        0 1_0",
    ],
)
def test_malformed_inet_lines_raise_parse_error(line):
    with pytest.raises(procnet.ParseError):
        procnet.parse_inet_line(line, "tcp")


def test_table_skips_malformed_lines_and_keeps_the_rest(caplog):
    text = TCP4 + "   9: this is not a kernel line\n" + TCP4.split("\n")[3] + "\n"
    rows = procnet.parse_inet_table(text, "tcp", hz=HZ, byteorder="little")
    assert len(rows) == len(TCP4_EXPECTED) + 1
    assert "skipped line table=tcp" in caplog.text


def test_classify_target():
    assert procnet.classify_target("socket:[123]") == ("socket", 123)
    assert procnet.classify_target("pipe:[77]") == ("pipe", 77)
    assert procnet.classify_target("anon_inode:[eventpoll]") == ("epoll", None)
    assert procnet.classify_target("anon_inode:[eventfd]") == ("anon", None)
    assert procnet.classify_target("anon_inode:inotify") == ("anon", None)
    assert procnet.classify_target("/dev/null") == ("file", None)
    assert procnet.classify_target("net:[4026531840]") == ("other", 4026531840)


def test_listen_inodes_screens_the_table():
    assert procnet.listen_inodes(TCP4, 8080) == {41230}  # not the ESTABLISHED rows on 8080
    assert procnet.listen_inodes(TCP6, 9090) == {52001}  # not the TIME_WAIT row on 9090
    assert procnet.listen_inodes(TCP4, 1234) == set()


def test_epoll_fdinfo():
    text = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\ntfd:        4 events:       19 data:                4  pos:0 ino:22d0 sdev:9\ntfd:       15 events:       1c data:                f  pos:0 ino:22d1 sdev:9\n"
    assert procnet.parse_epoll_fdinfo(text) == [4, 15]


# --------------------------------------------------------------------------- property tests

_U32 = st.integers(0, 2**32 - 1)


@st.composite
def inet_rows(draw):
    v6 = draw(st.booleans())
    addr = st.ip_addresses(v=6 if v6 else 4)
    return {
        "sl": draw(st.integers(0, 99999)),
        "laddr": draw(addr),
        "lport": draw(st.integers(0, 65535)),
        "raddr": draw(addr),
        "rport": draw(st.integers(0, 65535)),
        "st": draw(st.integers(0, 255)),
        "tx": draw(_U32),
        "rx": draw(_U32),
        "tr": draw(st.integers(0, 255)),
        "when": draw(st.integers(0, 2**63 - 1)),
        "retr": draw(_U32),
        "uid": draw(_U32),
        "probes": draw(st.integers(0, 2**31 - 1)),
        "inode": draw(st.integers(0, 2**64 - 1)),
        "tail": draw(st.lists(st.integers(-1, 2**32), max_size=7)),
        "byteorder": draw(st.sampled_from(["little", "big"])),
        "proto": draw(st.sampled_from(["tcp", "udp", "raw", "udplite"])),
    }


def _kernel_line(r: dict) -> str:
    """The row as seq_printf would write it (%4d: %08X:%04X … %lu …)."""
    la = procnet.encode_address(str(r["laddr"]), r["byteorder"])
    ra = procnet.encode_address(str(r["raddr"]), r["byteorder"])
    head = (
        f"{r['sl']:4d}: {la}:{r['lport']:04X} {ra}:{r['rport']:04X} {r['st']:02X} "
        f"{r['tx']:08X}:{r['rx']:08X} {r['tr']:02X}:{r['when']:08X} {r['retr']:08X} "
        f"{r['uid']:5d} {r['probes']:8d} {r['inode']}"
    )
    return " ".join([head, *map(str, r["tail"])])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inet_rows())
def test_random_valid_lines_round_trip(r):
    line = _kernel_line(r)
    s = procnet.parse_inet_line(line, r["proto"], hz=HZ, byteorder=r["byteorder"])
    assert ipaddress.ip_address(s.local_addr) == r["laddr"]
    assert ipaddress.ip_address(s.remote_addr) == r["raddr"]
    assert s.family == ("inet6" if r["laddr"].version == 6 else "inet")
    assert (s.local_port, s.remote_port, s.state_code) == (r["lport"], r["rport"], r["st"])
    assert (s.tx_queue, s.rx_queue, s.timer_kind, s.timer_ticks) == (
        r["tx"],
        r["rx"],
        r["tr"],
        r["when"],
    )
    assert s.timer_expires == r["when"] / HZ
    assert (s.retransmits, s.uid, s.probes, s.inode) == (
        r["retr"],
        r["uid"],
        r["probes"],
        r["inode"],
    )
    assert s.state  # every code gets a name, known or UNKNOWN_XX
    # the whole table path agrees with the line path
    assert procnet.parse_inet_table(line + "\n", r["proto"], hz=HZ, byteorder=r["byteorder"]) == [s]


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_garbage_never_crashes(text):
    assert isinstance(procnet.parse_inet_table(text, "tcp"), list)
    assert isinstance(procnet.parse_unix_table(text), list)
    for line in text.split("\n"):
        try:
            procnet.parse_inet_line(line, "tcp")
        except procnet.ParseError:
            pass
        try:
            procnet.parse_unix_line(line)
        except procnet.ParseError:
            pass


@settings(max_examples=150, deadline=None)
@given(inet_rows(), st.data())
def test_mutated_lines_parse_or_raise_parse_error(r, data):
    line = _kernel_line(r)
    i = data.draw(st.integers(0, len(line)))
    j = data.draw(st.integers(i, min(len(line), i + 5)))
    junk = data.draw(st.text(max_size=3))
    mutated = line[:i] + junk + line[j:]
    try:
        procnet.parse_inet_line(mutated, "tcp")
    except procnet.ParseError:
        pass
    assert isinstance(procnet.parse_inet_table(mutated, "tcp"), list)


# --------------------------------------------------------------------------- in-process /proc


def test_fd_table_of_this_process():
    """Real fds of every kind in this process, checked against what we know of them."""
    a, b = socket.socketpair()
    r, w = os.pipe()
    ep = select.epoll()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    try:
        ep.register(a.fileno(), select.EPOLLIN)
        ep.register(r, select.EPOLLIN)
        rows = {row.fd: row for row in procnet.fd_table(os.getpid())}
        assert rows[a.fileno()].type == "unix" and rows[a.fileno()].state == "ESTABLISHED"
        assert rows[a.fileno()].inode == os.fstat(a.fileno()).st_ino
        assert rows[r].type == "pipe" and rows[r].inode == os.fstat(r).st_ino
        assert rows[ep.fileno()].type == "epoll"
        assert sorted(rows[ep.fileno()].watches) == sorted([a.fileno(), r])
        u = rows[udp.fileno()]
        assert (u.type, u.local, u.remote, u.state) == (
            "udp",
            f"127.0.0.1:{udp.getsockname()[1]}",
            None,
            "UNCONN",
        )
        n = rows[nl.fileno()]
        assert (n.type, n.proto, n.inode) == ("socket", "NETLINK", os.fstat(nl.fileno()).st_ino)
        t = rows[lst.fileno()]
        assert (t.type, t.local, t.state, t.uid) == (
            "tcp",
            f"127.0.0.1:{lst.getsockname()[1]}",
            "LISTEN",
            os.getuid(),
        )
        d = t.as_dict()
        assert set(d) == {
            "pid",
            "fd",
            "type",
            "local",
            "remote",
            "state",
            "send_q",
            "recv_q",
            "inode",
            "uid",
            "timer",
            "family",
            "proto",
            "target",
            "watches",
        }
        assert d["timer"] == {"kind": "none", "expires": 0.0, "retransmits": 0}
        json.dumps([row.as_dict() for row in rows.values()])  # all JSON-serialisable

        summary = procnet.process_summary(os.getpid(), list(rows.values()))
        assert summary["fds_in_use"] == len(rows)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert summary["fd_soft_limit"] == (None if soft == resource.RLIM_INFINITY else soft)
        assert summary["sockets_by_state"]["LISTEN"] >= 1
        assert summary["fds_by_type"]["epoll"] >= 1
    finally:
        for s in (a, b, udp, nl, lst, ep):
            s.close()
        os.close(r)
        os.close(w)


def test_fd_tables_gone_pids():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    me = os.getpid()
    assert list(procnet.fd_tables([me, p.pid], skip_gone=True)) == [me]
    with pytest.raises(procnet.NoSuchProcess, match=f"no such process: {p.pid}"):
        procnet.fd_tables([me, p.pid])


def test_socket_options():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        o = procnet.socket_options(s)
        assert o["family"] == "AF_INET" and o["type"] == "SOCK_STREAM" and o["proto"] == "tcp"
        assert (o["reuseaddr"], o["reuseport"], o["nodelay"], o["keepalive"], o["acceptconn"]) == (
            True,
            False,
            True,
            False,
            True,
        )
        assert o["sndbuf"] == 2 * 65536  # the kernel doubles it
        assert procnet.socket_options(s.fileno()) == o  # by raw fd too…
        os.fstat(s.fileno())  # …which stays open
        ou = procnet.socket_options(u)
        assert (ou["family"], ou["type"], ou["proto"], ou["nodelay"]) == (
            "AF_UNIX",
            "SOCK_DGRAM",
            None,
            None,
        )
    finally:
        s.close()
        u.close()


def _wait_for_row(local_port: int, remote_port: int, pred=lambda r: True, deadline_s=5.0):
    """Poll /proc/self/net/tcp for the row of that 4-tuple (the whole table path, real text)."""
    key = f":{local_port:04X} "  # screen the text: the host's table may hold many thousand rows
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        text = Path("/proc/self/net/tcp").read_text()
        text = "\n".join(line for line in text.split("\n") if key in line)
        rows = [
            r
            for r in procnet.parse_inet_table(text, "tcp")
            if r.local_port == local_port and r.remote_port == remote_port and pred(r)
        ]
        if rows:
            return rows
        time.sleep(0.01)
    raise AssertionError("no such row in /proc/self/net/tcp before the deadline")


def test_live_time_wait_row():
    lst = socket.create_server(("127.0.0.1", 0))
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    sport, cport = lst.getsockname()[1], c.getsockname()[1]
    s.close()  # active close on the server side: the server's end ends in TIME_WAIT
    c.close()
    lst.close()
    [row] = _wait_for_row(sport, cport, lambda r: r.state == "TIME_WAIT")
    assert (row.inode, row.timer, row.timer_kind) == (0, "timewait", 3)
    assert 0 < row.timer_expires <= 60


def test_live_syn_recv_request_socket():
    # TCP_DEFER_ACCEPT: the kernel keeps a silent client as a request socket.
    lst = socket.socket()
    lst.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    c = socket.create_connection(lst.getsockname())
    try:
        [row] = _wait_for_row(lst.getsockname()[1], c.getsockname()[1])
        # printed by get_openreq4: SYN_RECV (not the internal NEW_SYN_RECV code), timer 1, inode 0
        assert (row.state, row.inode, row.timer) == ("SYN_RECV", 0, "retransmit")
        assert row.timer_expires < 10
    finally:
        c.close()
        lst.close()


# --------------------------------------------------------------------------- live, subprocesses


class Holder:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid = proc.pid
        self._buf = b""
        self.ports: dict[str, int] = {}

    def readline(self, deadline: float) -> str:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"holder {self.pid}: no line before the deadline")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"holder {self.pid} exited: {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def wait_accepted(self, port: int, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            words = self.readline(deadline).split()
            if words[0] == "accepted" and int(words[2]) == port and int(words[3]) == n:
                return


@pytest.fixture
def holder():
    procs: list[subprocess.Popen] = []

    def start(*specs: str, script: Path = HOLDER) -> Holder:
        p = subprocess.Popen(
            [sys.executable, str(script), *specs], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(p)
        h = Holder(p)
        deadline = time.monotonic() + 10
        while (line := h.readline(deadline)) != "ready":
            _, host, port = line.split()
            h.ports[host] = int(port)
        return h

    yield start
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


@pytest.fixture
def clients():
    held: list[socket.socket] = []
    yield held
    for s in held:
        s.close()


def reactor_fds(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reactor", "fds", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        **kw,
    )


def fds_json(*args: str) -> list[dict]:
    r = reactor_fds(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


_SS_STATES = {
    "ESTAB": "ESTABLISHED",
    "LISTEN": "LISTEN",
    "SYN-RECV": "SYN_RECV",
    "TIME-WAIT": "TIME_WAIT",
}


def ss_rows(pid: int) -> dict[int, dict]:
    """`ss -tanpe` rows owned by pid, by inode."""
    out = subprocess.run(
        ["ss", "-tanpe"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        if f"pid={pid}," not in line:
            continue
        f = line.split()
        ino = int(re.search(r"\bino:(\d+)", line).group(1))
        peer = f[4]
        rows[ino] = {
            "state": _SS_STATES.get(f[0], f[0]),
            "recv_q": int(f[1]),
            "local": f[3],
            "remote": None if peer.endswith(":*") else peer,
        }
    return rows


def _ep(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return procnet.format_endpoint(host, port)


def assert_agrees_with_ss(pid: int, rows: list[dict]) -> None:
    ours = {r["inode"]: r for r in rows if r["proto"] == "tcp"}
    theirs = ss_rows(pid)
    assert set(ours) == set(theirs)
    for ino, s in theirs.items():
        o = ours[ino]
        assert (o["state"], o["local"], o["remote"], o["recv_q"]) == (
            s["state"],
            s["local"],
            s["remote"],
            s["recv_q"],
        ), ino


needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed")


@needs_ss
def test_live_100_connections_match_ss(holder, clients):
    h = holder("127.0.0.1,100,keepalive")
    port = h.ports["127.0.0.1"]
    for _ in range(100):
        clients.append(socket.create_connection(("127.0.0.1", port)))
    h.wait_accepted(port, 100)
    # two more: the holder stops accepting at 100, so they wait in the accept queue, which
    # is what a LISTEN row's rx_queue counts (polled: the handshake ends in softirq context)
    for _ in range(2):
        clients.append(socket.create_connection(("127.0.0.1", port)))
    deadline = time.monotonic() + 5
    while [r["recv_q"] for r in fds_json(str(h.pid), "--state", "LISTEN")] != [2]:
        assert time.monotonic() < deadline, "accept backlog never reached 2"
        time.sleep(0.02)

    rows = fds_json(str(h.pid))
    tcp = [r for r in rows if r["type"] == "tcp"]
    listen = [r for r in tcp if r["state"] == "LISTEN"]
    est = [r for r in tcp if r["state"] == "ESTABLISHED"]
    assert len(listen) == 1 and len(est) == 100 and len(tcp) == 101
    assert listen[0]["local"] == f"127.0.0.1:{port}" and listen[0]["remote"] is None
    assert listen[0]["recv_q"] == 2 and listen[0]["send_q"] == 0
    assert {r["local"] for r in est} == {f"127.0.0.1:{port}"}
    assert {r["remote"] for r in est} == {_ep(c) for c in clients[:100]}
    assert all(r["pid"] == h.pid and r["uid"] == os.getuid() for r in tcp)
    assert all(r["target"] == f"socket:[{r['inode']}]" for r in tcp)
    timers = [r["timer"] for r in est]
    ka = [t for t in timers if t["kind"] == "keepalive"]
    assert len(ka) == 1 and 590 < ka[0]["expires"] <= 600  # TCP_KEEPIDLE=600 on the first one
    assert sum(t["kind"] == "none" for t in timers) == 99
    assert any(r["type"] == "epoll" for r in rows)  # the holder's selector

    assert_agrees_with_ss(h.pid, rows)


def _have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@needs_ss
@pytest.mark.skipif(not _have_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_live_ipv6_and_v4_mapped(holder, clients):
    h = holder("::1,1", "::ffff:127.0.0.1,1")
    p6, pm = h.ports["::1"], h.ports["::ffff:127.0.0.1"]
    clients.append(socket.create_connection(("::1", p6)))
    h.wait_accepted(p6, 1)
    clients.append(socket.create_connection(("127.0.0.1", pm)))  # a v4 client of a v6 socket
    h.wait_accepted(pm, 1)

    rows = [r for r in fds_json(str(h.pid)) if r["family"] == "inet6"]
    got = sorted((r["type"], r["state"], r["local"], r["remote"]) for r in rows)
    assert got == sorted(
        [
            ("tcp6", "LISTEN", f"[::1]:{p6}", None),
            ("tcp6", "ESTABLISHED", f"[::1]:{p6}", f"[::1]:{clients[0].getsockname()[1]}"),
            ("tcp6", "LISTEN", f"[::ffff:127.0.0.1]:{pm}", None),
            (
                "tcp6",
                "ESTABLISHED",
                f"[::ffff:127.0.0.1]:{pm}",
                f"[::ffff:127.0.0.1]:{clients[1].getsockname()[1]}",
            ),
        ]
    )
    assert_agrees_with_ss(h.pid, rows)


def test_port_finds_the_pid_and_state_filters(holder, clients):
    h = holder("127.0.0.1,2")
    port = h.ports["127.0.0.1"]
    for _ in range(2):
        clients.append(socket.create_connection(("127.0.0.1", port)))
    h.wait_accepted(port, 2)

    rows = fds_json("--port", str(port))
    assert {r["pid"] for r in rows} == {h.pid}
    assert [r["state"] for r in fds_json("--port", str(port), "--state", "LISTEN")] == ["LISTEN"]
    assert [r["state"] for r in fds_json(str(h.pid), "--state", "estab")] == ["ESTABLISHED"] * 2

    table = reactor_fds(str(h.pid), "--state", "listen")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].startswith(f"pid {h.pid} ")
    assert lines[1].split() == [
        "FD",
        "TYPE",
        "LOCAL",
        "REMOTE",
        "STATE",
        "SEND-Q",
        "RECV-Q",
        "INODE",
        "UID",
        "TIMER",
    ]
    body = [line.split() for line in lines[3:] if line[:1].isdigit()]
    assert [(b[1], b[2], b[3], b[4]) for b in body] == [("tcp", f"127.0.0.1:{port}", "*", "LISTEN")]
    assert re.search(r"^fds: \d+ in use / (\d+ soft limit|unlimited)", table.stdout, re.M)
    assert "sockets by state: ESTABLISHED 2, LISTEN 1" in table.stdout
    assert "shown: 1 of" in table.stdout

    # a port that is bound but not listening: nobody listens there
    with socket.socket() as idle:
        idle.bind(("127.0.0.1", 0))
        r = reactor_fds("--port", str(idle.getsockname()[1]))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "listens on TCP port" in r.stderr


def test_watch_count(holder):
    h = holder("127.0.0.1,1")
    r = reactor_fds(str(h.pid), "--json", "--watch", "0.05", "--count", "3")
    assert r.returncode == 0, r.stderr
    samples = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(samples) == 3 and all(any(x["state"] == "LISTEN" for x in s) for s in samples)
    r = reactor_fds(str(h.pid), "--watch", "0.05", "--count", "2")
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r"^--- \d\d:\d\d:\d\d sample \d+$", r.stdout, re.M)) == 2


def test_missing_pid_is_one_line_exit_1():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid is gone
    r = reactor_fds(str(p.pid))
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"reactor fds: no such process: {p.pid}\n")


def test_usage_errors():
    for args in (
        ["1", "--port", "80"],
        ["--count", "2"],
        ["--state", "bogus"],
        ["0"],
        ["--port", "70000"],
    ):
        r = reactor_fds(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, (args, r.stderr)
    with pytest.raises(UsageError):
        fds_cmd.normalize_state("nope")
    assert fds_cmd.normalize_state("time-wait") == "TIME_WAIT"
    assert fds_cmd.normalize_state("Estab") == "ESTABLISHED"


def _cli_as_nobody(argv: list[str]) -> tuple[int, str, str]:
    """Run reactor.cli.main(argv) in a forked child that has dropped root for nobody.

    A fork, not an exec: our interpreter may live where nobody may not run it (/root).
    """
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        rc = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            # import everything while still root: the checkout may live in a
            # directory nobody may read (a CI clone under mktemp -d is 0700)
            from reactor.cli import build_parser, main

            build_parser()
            os.setgid(65534)
            os.setuid(65534)
            rc = main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(rc)
    try:
        os.close(out_w)
        os.close(err_w)
        with open(out_r) as o, open(err_r) as e:  # outputs are a line at most: no pipe deadlock
            out, err = o.read(), e.read()
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out, err
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_permission_denied_is_one_line_exit_1(holder):
    if os.getuid() == 0:
        # root may read anything: let nobody try to read a root-owned process of ours
        target = holder("127.0.0.1,1").pid
        rc, out, err = _cli_as_nobody(["fds", str(target)])
    elif os.stat("/proc/1").st_uid != os.getuid():
        target = 1
        r = reactor_fds("1")
        rc, out, err = r.returncode, r.stdout, r.stderr
    else:
        pytest.skip("no process here that we may not read")
    assert (rc, out) == (1, ""), err
    assert err == f"reactor fds: pid {target}: permission denied reading /proc/{target}/fd\n"


def test_reactor_cmdline_recognition():
    sub = procnet.reactor_subcommand
    assert sub(["/usr/bin/python3", "/venv/bin/reactor", "serve", "--listen", ":8080"]) == "serve"
    assert sub(["python3.11", "-u", "-m", "reactor", "gateway"]) == "gateway"
    assert sub(["python", "-mreactor", "--version"]) == ""
    assert sub(["/opt/reactor", "fds"]) == "fds"
    assert sub(["python3", "-X", "dev", "-m", "reactor", "demo"]) == "demo"
    assert sub(["python3", "-m", "pytest", "reactor"]) is None
    assert sub(["python3", "-c", "import reactor"]) is None
    assert sub(["python3", "/work/reactor/bench.py"]) is None
    assert sub(["bash", "reactor"]) is None
    assert sub([]) is None


def test_no_target_finds_reactor_processes(holder, tmp_path):
    # A process whose command line is `python …/reactor ARGS`, like the console script.
    fake = tmp_path / "reactor"
    fake.write_text(HOLDER.read_text())
    h1 = holder("127.0.0.1,1", script=fake)
    h2 = holder("127.0.0.1,1", script=fake)
    pids = {r["pid"] for r in fds_json()}
    assert {h1.pid, h2.pid} <= pids  # several: each is shown
    table = reactor_fds()
    assert f"pid {h1.pid} " in table.stdout and f"pid {h2.pid} " in table.stdout


def test_no_reactor_process_is_one_line_exit_1():
    # A fresh pid namespace holds no reactor process at all (needs root or user namespaces).
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) not installed")
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True
    )
    if probe.returncode != 0:
        pytest.skip("cannot create a pid namespace here")
    r = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "reactor", "fds"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "reactor fds: no running reactor process found (give a PID or --port)\n"


@needs_ss
def test_reactor_serve_100_connections_fds_json_matches_ss(spawn):
    """The issue's own check: 100 connections to `reactor serve`; `reactor fds PID --json`
    lists 1 LISTEN + 100 ESTABLISHED sockets, the loop's epoll fd watching them all, and
    agrees with `ss -tanpe` on every inode, address, port and state."""
    p = spawn("serve", "--listen", "127.0.0.1:0", "--mode", "echo")
    port = p.addr[1]
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
    try:
        for c in conns:  # a round trip each: every connection is accepted and registered
            c.sendall(b"x")
            assert c.recv(1) == b"x"
        rows = fds_json(str(p.pid))
        tcp = [r for r in rows if r["proto"] == "tcp"]
        assert [r["state"] for r in tcp].count("LISTEN") == 1
        est = [r for r in tcp if r["state"] == "ESTABLISHED"]
        assert len(est) == 100 and len(tcp) == 101
        assert {r["remote"] for r in est} == {_ep(c) for c in conns}
        assert {r["local"] for r in est} == {f"127.0.0.1:{port}"}
        epoll = [r for r in rows if r["type"] == "epoll"]
        assert len(epoll) == 1  # the loop's own epoll fd
        assert_agrees_with_ss(p.pid, rows)
    finally:
        for c in conns:
            c.close()
