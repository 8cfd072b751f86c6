"""Who holds which socket: ``/proc/PID/fd`` joined on inode with ``/proc/PID/net/*``.

Every open fd of a process is a symlink in ``/proc/PID/fd`` whose target names what
it is: ``socket:[INODE]``, ``pipe:[INODE]``, ``anon_inode:[eventpoll]``, a path…  A
socket's inode is the key into the kernel's socket tables, ``/proc/PID/net/tcp``,
``tcp6``, ``udp``, ``udp6``, ``udplite*``, ``raw*`` and ``unix``.  They are read through
``/proc/PID/net`` (not ``/proc/net``, which is ``/proc/self/net``) so that a process in
another network namespace is joined with its own tables.

The inet tables are decoded as the kernel's ``Documentation/networking/proc_net_tcp.rst``
and ``net/ipv4/tcp_ipv4.c`` (``get_tcp4_sock``, ``get_openreq4``, ``get_timewait4_sock``)
write them:

* addresses are ``__be32`` words printed as host integers (``%08X``): on a little-endian
  host ``0100007F`` is 127.0.0.1; IPv6 is four such words, each one in host order;
* ports are plain hex (``%04X`` of the host-order port);
* ``st`` is the state code (``TCP_STATES``).  TIME_WAIT (06) rows are timewait sockets;
  half-open request sockets — NEW_SYN_RECV (0C) inside the kernel — are printed by
  ``get_openreq4`` with state SYN_RECV (03), timer 1 and the listener's uid.  Both have
  inode 0 and belong to no fd.  0C is decoded too, should a kernel ever print it;
* ``tx_queue:rx_queue``: bytes not yet acked / not yet read.  For a LISTEN socket
  ``rx_queue`` is the current accept backlog (connections waiting for ``accept``) and
  ``tx_queue`` is 0 — ``ss`` shows the *maximum* backlog there, but it gets it from
  inet_diag (netlink); ``/proc/net/tcp`` does not carry it;
* ``tr:tm->when``: timer kind (``TIMER_KINDS``) and clock ticks (USER_HZ, i.e.
  ``os.sysconf('SC_CLK_TCK')``, 100 on Linux) until it fires;
* ``retrnsmt`` (retransmits, hex), ``uid``, ``timeout`` (unanswered zero-window probes),
  ``inode`` — all decimal but ``retrnsmt``.

What ``/proc/net/tcp`` does NOT hold: socket options.  SO_REUSEADDR, SO_REUSEPORT,
TCP_NODELAY, SO_KEEPALIVE, buffer sizes… are nowhere in it (nor anywhere else in /proc);
only the process that owns the socket can read them, with getsockopt — see
``socket_options``.  (The seed write-up says the "listening file" holds them; it does not.)

Parsers are pure functions of text (``parse_inet_line``, ``parse_inet_table``,
``parse_unix_line``, ``parse_unix_table``, ``listen_inodes``, ``classify_target``,
``parse_epoll_fdinfo``, ``reactor_subcommand``) so recorded samples can be tested;
readers (``fd_table``, ``fd_tables``, ``process_summary``, ``listening_pids``,
``find_reactor_pids``) are thin.

Malformed lines: a line parser raises ``ParseError`` (a ValueError) naming the table
and quoting the line.  A table parser skips such a line with a logged warning and goes
on: the kernel never writes one, so one means a format we do not know; the socket it
described then shows as TYPE ``socket`` (kind unknown) rather than disappearing.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import psutil

from reactor.errors import RuntimeFailure

log = logging.getLogger(__name__)

CLK_TCK: int = os.sysconf("SC_CLK_TCK")

# include/net/tcp_states.h
TCP_STATES: dict[int, str] = {
    0x01: "ESTABLISHED",
    0x02: "SYN_SENT",
    0x03: "SYN_RECV",
    0x04: "FIN_WAIT1",
    0x05: "FIN_WAIT2",
    0x06: "TIME_WAIT",
    0x07: "CLOSE",
    0x08: "CLOSE_WAIT",
    0x09: "LAST_ACK",
    0x0A: "LISTEN",
    0x0B: "CLOSING",
    0x0C: "NEW_SYN_RECV",
    0x0D: "BOUND_INACTIVE",
}

# Documentation/networking/proc_net_tcp.rst, "timer_active"
TIMER_KINDS: dict[int, str] = {
    0: "none",
    1: "retransmit",
    2: "keepalive",
    3: "timewait",
    4: "zero_window_probe",
}

# include/uapi/linux/net.h socket_state, as shown by /proc/net/unix "St"
_UNIX_STATES = {1: "UNCONN", 2: "CONNECTING", 3: "ESTABLISHED", 4: "DISCONNECTING"}
_UNIX_TYPES = {1: "stream", 2: "dgram", 3: "raw", 4: "rdm", 5: "seqpacket"}
_SO_ACCEPTCON = 1 << 16  # __SO_ACCEPTCON in /proc/net/unix Flags: a listening socket

# table file name -> (proto, family)
INET_TABLES: dict[str, tuple[str, str]] = {
    "tcp": ("tcp", "inet"),
    "tcp6": ("tcp", "inet6"),
    "udp": ("udp", "inet"),
    "udp6": ("udp", "inet6"),
    "udplite": ("udplite", "inet"),
    "udplite6": ("udplite", "inet6"),
    "raw": ("raw", "inet"),
    "raw6": ("raw", "inet6"),
}

# Every state name a row can carry; `reactor fds --state` accepts these (and aliases).
STATE_NAMES: frozenset[str] = frozenset(TCP_STATES.values()) | frozenset(_UNIX_STATES.values())

# FdRow.type of a socket fd: the table it was found in (tcp, tcp6…), unix, or socket.
SOCKET_TYPES: frozenset[str] = frozenset(INET_TABLES) | {"unix", "socket"}


class ParseError(ValueError):
    """A line that is not in the kernel's format."""


class NoSuchProcess(RuntimeFailure):
    """The pid does not exist (or exited while we read it)."""


class AccessDenied(RuntimeFailure):
    """We may not read the process's fds (another user's process, without root)."""


# --------------------------------------------------------------------------- parsers

_HEX = "[0-9A-Fa-f]"
_INET_RE = re.compile(
    rf"""\s*(\d+):\s+
    ({_HEX}{{32}}|{_HEX}{{8}}):({_HEX}{{4}})\s+      # local address:port
    ({_HEX}{{32}}|{_HEX}{{8}}):({_HEX}{{4}})\s+      # remote address:port
    ({_HEX}{{2}})\s+                                # st
    ({_HEX}{{8}}):({_HEX}{{8}})\s+                  # tx_queue:rx_queue
    ({_HEX}{{2}}):({_HEX}{{8,16}})\s+               # tr:tm->when
    ({_HEX}{{8}})\s+                                # retrnsmt
    (\d+)\s+(-?\d+)\s+(\d+)                         # uid timeout inode
    (?:\s|$)""",
    re.ASCII | re.VERBOSE,
)

_UNIX_RE = re.compile(
    rf"""({_HEX}+):\s+({_HEX}{{8}})\s+({_HEX}{{8}})\s+({_HEX}{{8}})\s+
    ({_HEX}{{4}})\s+({_HEX}{{2}})\s+(\d+)(?:\ (.*))?$""",
    re.ASCII | re.VERBOSE,
)


def decode_address(hexaddr: str, byteorder: str = sys.byteorder) -> str:
    """``0100007F`` → ``127.0.0.1``; 32 hex digits → IPv6, word by word in host order."""
    try:
        if len(hexaddr) == 8:
            return socket.inet_ntop(socket.AF_INET, int(hexaddr, 16).to_bytes(4, byteorder))
        if len(hexaddr) == 32:
            raw = b"".join(
                int(hexaddr[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, 32, 8)
            )
            return socket.inet_ntop(socket.AF_INET6, raw)
    except ValueError:
        pass
    raise ParseError(f"not a kernel address: {hexaddr!r}")


def encode_address(addr: str, byteorder: str = sys.byteorder) -> str:
    """The inverse of ``decode_address``: how the kernel prints ``addr`` on this host."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    raw = socket.inet_pton(family, addr)
    return "".join(
        f"{int.from_bytes(raw[i : i + 4], byteorder):08X}" for i in range(0, len(raw), 4)
    )


def format_endpoint(addr: str, port: int) -> str:
    """``HOST:PORT``, or ``[v6]:PORT``."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _unspecified(addr: str) -> bool:
    return addr in ("0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class InetSocket:
    """One row of /proc/net/{tcp,tcp6,udp,udp6,udplite*,raw*}."""

    proto: str  # tcp | udp | udplite | raw
    family: str  # inet | inet6
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    state_code: int
    state: str
    tx_queue: int
    rx_queue: int
    timer_kind: int
    timer: str  # TIMER_KINDS name
    timer_ticks: int  # USER_HZ ticks until the timer fires (0 if none)
    timer_expires: float  # the same in seconds
    retransmits: int
    uid: int
    probes: int  # the "timeout" column: unanswered zero-window probes
    inode: int

    @property
    def local(self) -> str:
        return format_endpoint(self.local_addr, self.local_port)

    @property
    def remote(self) -> str | None:
        """None when there is no peer (a listener, an unconnected UDP socket)."""
        if _unspecified(self.remote_addr) and self.remote_port == 0:
            return None
        return format_endpoint(self.remote_addr, self.remote_port)


def _state_name(proto: str, code: int) -> str:
    if proto != "tcp" and code == 0x07:
        return "UNCONN"  # UDP/raw sockets sit in TCP_CLOSE until connect(); ss says UNCONN
    return TCP_STATES.get(code, f"UNKNOWN_{code:02X}")


def parse_inet_line(
    line: str, proto: str = "tcp", *, hz: int = CLK_TCK, byteorder: str = sys.byteorder
) -> InetSocket:
    """Decode one data line of an inet table; raise ``ParseError`` if it is not one."""
    m = _INET_RE.match(line)
    if m is None:
        raise ParseError(f"{proto}: malformed line: {line[:120]!r}")
    (_, laddr, lport, raddr, rport, st, txq, rxq, tr, when, retr, uid, probes, inode) = m.groups()
    if len(laddr) != len(raddr):
        raise ParseError(f"{proto}: local and remote families differ: {line[:120]!r}")
    ticks = int(when, 16)
    if ticks >= 1 << 63:  # old kernels printed an overdue timer as a negative long
        ticks = 0
    state_code = int(st, 16)
    timer_kind = int(tr, 16)
    return InetSocket(
        proto=proto,
        family="inet" if len(laddr) == 8 else "inet6",
        local_addr=decode_address(laddr, byteorder),
        local_port=int(lport, 16),
        remote_addr=decode_address(raddr, byteorder),
        remote_port=int(rport, 16),
        state_code=state_code,
        state=_state_name(proto, state_code),
        tx_queue=int(txq, 16),
        rx_queue=int(rxq, 16),
        timer_kind=timer_kind,
        timer=TIMER_KINDS.get(timer_kind, f"unknown_{timer_kind}"),
        timer_ticks=ticks,
        timer_expires=ticks / hz,
        retransmits=int(retr, 16),
        uid=int(uid),
        probes=int(probes),
        inode=int(inode),
    )


def _is_header(line: str, first_word: str) -> bool:
    words = line.split(None, 1)
    return bool(words) and words[0] == first_word


def parse_inet_table(
    text: str,
    proto: str = "tcp",
    *,
    inodes: Iterable[int] | None = None,
    hz: int = CLK_TCK,
    byteorder: str = sys.byteorder,
) -> list[InetSocket]:
    """All rows of an inet table (header and malformed lines skipped).

    With ``inodes``, only rows whose inode is in it are decoded — a busy host's
    table has many thousand rows and we usually want a handful.
    """
    wanted = None if inodes is None else {str(i) for i in inodes}
    out: list[InetSocket] = []
    for line in text.split("\n"):
        if not line.strip() or _is_header(line, "sl"):
            continue
        if wanted is not None:
            fields = line.split()
            if len(fields) > 9 and fields[9] not in wanted:
                continue
        try:
            out.append(parse_inet_line(line, proto, hz=hz, byteorder=byteorder))
        except ParseError as e:
            log.warning("procnet: skipped line table=%s error=%s", proto, e)
    return out


@dataclass(frozen=True, slots=True)
class UnixSocket:
    """One row of /proc/net/unix."""

    refcount: int
    flags: int
    type_code: int
    type: str  # stream | dgram | seqpacket | …
    state_code: int
    state: str  # LISTEN | ESTABLISHED | UNCONN | CONNECTING | DISCONNECTING
    inode: int
    path: str | None  # None for an unnamed socket; abstract names start with '@'


def parse_unix_line(line: str) -> UnixSocket:
    """Decode one data line of /proc/net/unix; raise ``ParseError`` if it is not one."""
    m = _UNIX_RE.match(line.rstrip("\n"))
    if m is None:
        raise ParseError(f"unix: malformed line: {line[:120]!r}")
    _, ref, _proto, flags, typ, st, inode, path = m.groups()
    flags_i, type_i, st_i = int(flags, 16), int(typ, 16), int(st, 16)
    state = "LISTEN" if flags_i & _SO_ACCEPTCON else _UNIX_STATES.get(st_i, f"UNKNOWN_{st_i:02X}")
    return UnixSocket(
        refcount=int(ref, 16),
        flags=flags_i,
        type_code=type_i,
        type=_UNIX_TYPES.get(type_i, f"type{type_i}"),
        state_code=st_i,
        state=state,
        inode=int(inode),
        path=path if path else None,
    )


def parse_unix_table(text: str, *, inodes: Iterable[int] | None = None) -> list[UnixSocket]:
    """All rows of /proc/net/unix (header and malformed lines skipped)."""
    wanted = None if inodes is None else {str(i) for i in inodes}
    out: list[UnixSocket] = []
    # Not splitlines(): a socket path may hold \x0b, \x1c… which it would split on.
    for line in text.split("\n"):
        if not line.strip() or _is_header(line, "Num"):
            continue
        if wanted is not None:
            fields = line.split(None, 7)
            if len(fields) > 6 and fields[6] not in wanted:
                continue
        try:
            out.append(parse_unix_line(line))
        except ParseError as e:
            log.warning("procnet: skipped line table=unix error=%s", e)
    return out


_LINK_RE = re.compile(r"([A-Za-z_][\w-]*):\[(\d+)\]$", re.ASCII)


def classify_target(target: str) -> tuple[str, int | None]:
    """An fd's readlink target → (kind, inode or None).

    kinds: socket, pipe, epoll, anon (other anon_inode: eventfd, timerfd, signalfd,
    inotify…), file (any path; refined by stat), other (net:[…], mnt:[…] namespace fds…).
    """
    if target.startswith("anon_inode:"):
        return ("epoll" if target == "anon_inode:[eventpoll]" else "anon"), None
    if target.startswith("/"):
        return "file", None
    m = _LINK_RE.match(target)
    if m:
        kind, inode = m.group(1), int(m.group(2))
        if kind in ("socket", "pipe"):
            return kind, inode
        return "other", inode
    return "other", None


def parse_epoll_fdinfo(text: str) -> list[int]:
    """The fds an epoll instance watches, from its /proc/PID/fdinfo/FD (``tfd:`` lines)."""
    out = []
    for line in text.split("\n"):
        words = line.split()
        if len(words) >= 2 and words[0] == "tfd:" and words[1].isdigit():
            out.append(int(words[1]))
    return out


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True, slots=True)
class Timer:
    kind: str  # TIMER_KINDS name
    expires: float  # seconds until it fires
    retransmits: int

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "expires": round(self.expires, 2),
            "retransmits": self.retransmits,
        }

    def __str__(self) -> str:
        if self.kind == "none":
            return "-"
        s = f"{self.kind} {self.expires:.2f}s"
        return f"{s} ({self.retransmits} retrans)" if self.retransmits else s


@dataclass(frozen=True, slots=True)
class FdRow:
    """One open fd of a process, joined with its socket-table row when it is a socket.

    Fields that do not apply are None (``send_q`` of a file, ``uid`` of a unix socket…).
    ``as_dict()`` gives the ``reactor fds --json`` object (schema in reactor/commands/fds.py).
    """

    pid: int
    fd: int
    type: str  # tcp tcp6 udp udp6 udplite udplite6 raw raw6 unix socket pipe epoll anon file dir chr blk fifo other
    target: str  # the readlink text
    local: str | None = None
    remote: str | None = None
    state: str | None = None
    send_q: int | None = None
    recv_q: int | None = None
    inode: int | None = None
    uid: int | None = None
    timer: Timer | None = None
    family: str | None = None  # inet | inet6 | unix
    proto: str | None = None  # tcp | udp | udplite | raw | stream | dgram | seqpacket | NETLINK…
    watches: tuple[int, ...] | None = None  # epoll only: the fds it watches

    @property
    def is_socket(self) -> bool:
        return self.type in SOCKET_TYPES

    def as_dict(self) -> dict:
        return {
            "pid": self.pid,
            "fd": self.fd,
            "type": self.type,
            "local": self.local,
            "remote": self.remote,
            "state": self.state,
            "send_q": self.send_q,
            "recv_q": self.recv_q,
            "inode": self.inode,
            "uid": self.uid,
            "timer": self.timer.as_dict() if self.timer else None,
            "family": self.family,
            "proto": self.proto,
            "target": self.target,
            "watches": list(self.watches) if self.watches is not None else None,
        }


def _inet_row(pid: int, fd: int, target: str, s: InetSocket) -> FdRow:
    return FdRow(
        pid=pid,
        fd=fd,
        type=s.proto + ("6" if s.family == "inet6" else ""),
        target=target,
        local=s.local,
        remote=s.remote,
        state=s.state,
        send_q=s.tx_queue,
        recv_q=s.rx_queue,
        inode=s.inode,
        uid=s.uid,
        timer=Timer(s.timer, s.timer_expires, s.retransmits),
        family=s.family,
        proto=s.proto,
    )


def _unix_row(pid: int, fd: int, target: str, s: UnixSocket) -> FdRow:
    return FdRow(
        pid=pid,
        fd=fd,
        type="unix",
        target=target,
        local=s.path,
        state=s.state,
        inode=s.inode,
        family="unix",
        proto=s.type,
    )


# --------------------------------------------------------------------------- readers


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def _proc_error(pid: int, e: OSError, what: str) -> RuntimeFailure:
    if isinstance(e, PermissionError):
        return AccessDenied(f"pid {pid}: permission denied reading {what}")
    return NoSuchProcess(f"no such process: {pid}")


def read_fd_targets(pid: int) -> list[tuple[int, str]]:
    """(fd, readlink target) for every open fd, sorted; fds closed meanwhile are left out."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError as e:
        raise _proc_error(pid, e, base) from None
    out = []
    for name in names:
        try:
            out.append((int(name), os.readlink(f"{base}/{name}")))
        except FileNotFoundError:
            continue  # closed between listdir and readlink
        except OSError as e:
            raise _proc_error(pid, e, f"{base}/{name}") from None
    out.sort()
    return out


def read_socket_tables(
    pid: int, inodes: Iterable[int] | None = None
) -> tuple[dict[int, InetSocket], dict[int, UnixSocket]]:
    """The rows of the pid's network namespace, keyed by inode (optionally only ``inodes``)."""
    wanted = None if inodes is None else set(inodes)
    inet: dict[int, InetSocket] = {}
    for name, (proto, _family) in INET_TABLES.items():
        text = _read_table(pid, name)
        if text is not None:
            for s in parse_inet_table(text, proto, inodes=wanted):
                if s.inode:  # TIME_WAIT and NEW_SYN_RECV rows have inode 0: no fd owns them
                    inet[s.inode] = s
    unix: dict[int, UnixSocket] = {}
    text = _read_table(pid, "unix")
    if text is not None:
        for u in parse_unix_table(text, inodes=wanted):
            unix[u.inode] = u
    return inet, unix


def _read_table(pid: int, name: str) -> str | None:
    path = f"/proc/{pid}/net/{name}"
    try:
        return _read(path)
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            raise NoSuchProcess(f"no such process: {pid}") from None
        return None  # a table this kernel does not have (no IPv6, no udplite)
    except OSError as e:
        raise _proc_error(pid, e, path) from None


def _file_kind(path: str) -> tuple[str, int | None]:
    try:
        st = os.stat(path)
    except OSError:
        return "file", None
    mode = st.st_mode
    kind = (
        "dir"
        if stat.S_ISDIR(mode)
        else "chr"
        if stat.S_ISCHR(mode)
        else "blk"
        if stat.S_ISBLK(mode)
        else "fifo"
        if stat.S_ISFIFO(mode)
        else "file"
    )
    return kind, st.st_ino


def fd_table(pid: int) -> list[FdRow]:
    """Every open fd of ``pid``, socket fds joined with their table rows; sorted by fd.

    Raises ``NoSuchProcess`` or ``AccessDenied`` (both RuntimeFailure) rather than
    return a partial table.
    """
    return fd_tables([pid])[pid]


def fd_tables(pids: Iterable[int], *, skip_gone: bool = False) -> dict[int, list[FdRow]]:
    """``fd_table`` for several pids at once, reading each network namespace's tables once.

    All fds are listed first and the tables read after, so every socket seen in an fd
    list already exists when its table is read.  (A busy host's /proc/net/tcp is
    megabytes, and gateway workers share one namespace.)  With ``skip_gone``, a pid
    that does not exist or exits meanwhile is left out of the result instead of
    raising ``NoSuchProcess`` — for pids that were discovered, not asked for.
    """
    targets: dict[int, list[tuple[int, str]]] = {}
    for pid in dict.fromkeys(pids):
        try:
            targets[pid] = read_fd_targets(pid)
        except NoSuchProcess:
            if not skip_gone:
                raise
    pids = list(targets)
    # namespace -> (a pid to read it through, socket inodes wanted from it)
    spaces: dict[str, tuple[int, set[int]]] = {}
    ns_of: dict[int, str] = {}
    for pid in pids:
        inodes = {i for _, t in targets[pid] for k, i in [classify_target(t)] if k == "socket"}
        if not inodes:
            continue
        try:
            ns = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            ns = f"pid:{pid}"  # unknown: read its tables through itself, unshared
        ns_of[pid] = ns
        spaces.setdefault(ns, (pid, set()))[1].update(inodes)
    tables = {}
    for ns, (via, inodes) in spaces.items():
        try:
            tables[ns] = read_socket_tables(via, inodes)
        except NoSuchProcess:
            # the pid we read through exited; another in the namespace may still serve
            others = [p for p in pids if ns_of.get(p) == ns and p != via]
            for other in others:
                try:
                    tables[ns] = read_socket_tables(other, inodes)
                    break
                except NoSuchProcess:
                    continue
            else:
                if not skip_gone:
                    raise
    out = {}
    for pid in pids:
        if pid in ns_of and ns_of[pid] not in tables:
            continue  # skip_gone: its whole namespace went away
        inet, unix = tables[ns_of[pid]] if pid in ns_of else ({}, {})
        rows = _rows(pid, targets[pid], inet, unix)
        if not os.path.exists(f"/proc/{pid}"):
            if skip_gone:
                continue
            raise NoSuchProcess(f"no such process: {pid} (exited while being read)")
        out[pid] = rows
    return out


def _rows(
    pid: int,
    targets: list[tuple[int, str]],
    inet: dict[int, InetSocket],
    unix: dict[int, UnixSocket],
) -> list[FdRow]:
    rows: list[FdRow] = []
    for fd, target in targets:
        kind, inode = classify_target(target)
        if kind == "socket":
            assert inode is not None
            if inode in inet:
                rows.append(_inet_row(pid, fd, target, inet[inode]))
            elif inode in unix:
                rows.append(_unix_row(pid, fd, target, unix[inode]))
            else:
                rows.append(
                    FdRow(pid, fd, "socket", target, inode=inode, proto=_sockprotoname(pid, fd))
                )
        elif kind == "file":
            kind, ino = _file_kind(f"/proc/{pid}/fd/{fd}")
            rows.append(FdRow(pid, fd, kind, target, local=target, inode=ino))
        elif kind == "epoll":
            try:
                watches = tuple(parse_epoll_fdinfo(_read(f"/proc/{pid}/fdinfo/{fd}")))
            except OSError:
                watches = None
            rows.append(FdRow(pid, fd, kind, target, local=target, watches=watches))
        else:
            rows.append(FdRow(pid, fd, kind, target, local=target, inode=inode))
    return rows


def _sockprotoname(pid: int, fd: int) -> str | None:
    """The socket's protocol name (NETLINK, PACKET, UNIX-STREAM…), known even without a table."""
    try:
        raw = os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname")
    except OSError:
        return None
    return raw.rstrip(b"\0").decode("ascii", "replace") or None


def _fd_limits(proc: psutil.Process) -> tuple[int | None, int | None]:
    """(soft, hard) RLIMIT_NOFILE; None = unlimited."""
    try:
        soft, hard = proc.rlimit(psutil.RLIMIT_NOFILE)
    except psutil.AccessDenied:
        # prlimit() on another user's process needs CAP_SYS_RESOURCE; /proc/PID/limits does not.
        soft, hard = _limits_from_proc(proc.pid)
    inf = psutil.RLIM_INFINITY
    return (None if soft == inf else soft), (None if hard == inf else hard)


def _limits_from_proc(pid: int) -> tuple[int, int]:
    for line in _read(f"/proc/{pid}/limits").split("\n"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            conv = [psutil.RLIM_INFINITY if v == "unlimited" else int(v) for v in (soft, hard)]
            return conv[0], conv[1]
    raise AccessDenied(f"pid {pid}: no 'Max open files' in /proc/{pid}/limits")


def process_summary(pid: int, rows: list[FdRow] | None = None) -> dict:
    """Process facts (psutil) and fd counts.

    Keys: pid, name, user, cmdline (list), fds_in_use, fd_soft_limit, fd_hard_limit
    (None = unlimited), sockets_by_state ({state: count}; sockets of unknown kind count
    as UNKNOWN), fds_by_type ({type: count}).  Pass ``rows`` from ``fd_table`` to
    avoid reading the fds twice.
    """
    if rows is None:
        rows = fd_table(pid)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            name = proc.name()
            user = proc.username()
            try:
                cmdline = proc.cmdline()
            except psutil.AccessDenied:
                cmdline = []
            soft, hard = _fd_limits(proc)
    except psutil.NoSuchProcess:
        raise NoSuchProcess(f"no such process: {pid}") from None
    except psutil.AccessDenied:
        raise AccessDenied(f"pid {pid}: permission denied reading process facts") from None
    by_state = Counter(r.state or "UNKNOWN" for r in rows if r.is_socket)
    return {
        "pid": pid,
        "name": name,
        "user": user,
        "cmdline": cmdline,
        "fds_in_use": len(rows),
        "fd_soft_limit": soft,
        "fd_hard_limit": hard,
        "sockets_by_state": dict(sorted(by_state.items())),
        "fds_by_type": dict(sorted(Counter(r.type for r in rows).items())),
    }


# --------------------------------------------------------------------------- finding pids


def _all_pids() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit())


def listen_inodes(text: str, port: int) -> set[int]:
    """Inodes of the LISTEN rows on ``port`` in a tcp/tcp6 table's text.

    Lines are screened on their raw state and port fields before being decoded: a busy
    host's table holds tens of thousands of rows and we want one or two.
    """
    suffix = f":{port:04X}"
    out = set()
    for line in text.split("\n"):
        f = line.split(None, 4)
        if len(f) > 3 and f[3] == "0A" and f[1].upper().endswith(suffix):
            try:
                s = parse_inet_line(line, "tcp")
            except ParseError:
                continue
            if s.state == "LISTEN" and s.local_port == port and s.inode:
                out.add(s.inode)
    return out


def listening_pids(port: int) -> tuple[list[int], int]:
    """Pids holding a TCP LISTEN socket on ``port`` (any address, v4 or v6).

    Returns (pids, denied): ``denied`` counts the processes we could not inspect,
    so an empty list with denied > 0 may not mean "nobody".  Tables are read once
    per network namespace.
    """
    by_ns: dict[str, set[int]] = {}
    found: list[int] = []
    denied = 0
    for pid in _all_pids():
        try:
            ns = os.readlink(f"/proc/{pid}/ns/net")
            if ns not in by_ns:
                by_ns[ns] = {
                    ino
                    for name in ("tcp", "tcp6")
                    if (text := _read_table(pid, name)) is not None
                    for ino in listen_inodes(text, port)
                }
            if not by_ns[ns]:
                continue
            held = {
                ino
                for _, t in read_fd_targets(pid)
                for k, ino in [classify_target(t)]
                if k == "socket"
            }
        except (FileNotFoundError, NoSuchProcess):
            continue  # exited meanwhile
        except (PermissionError, AccessDenied):
            denied += 1
            continue
        if held & by_ns[ns]:
            found.append(pid)
    return found, denied


_PYTHON_RE = re.compile(r"(python|pypy)[\d.]*$")
_OPTS_WITH_ARG = {"-W", "-X", "-Q"}
INTROSPECTION_COMMANDS = frozenset({"fds", "stats"})


def reactor_subcommand(cmdline: list[str]) -> str | None:
    """For a command line that runs reactor (``reactor …``, ``python path/to/reactor …``,
    ``python -m reactor …``), its subcommand ('' if none); else None."""
    if not cmdline:
        return None
    rest: list[str] | None = None
    if os.path.basename(cmdline[0]) == "reactor":
        rest = cmdline[1:]
    elif _PYTHON_RE.match(os.path.basename(cmdline[0])):
        args = cmdline[1:]
        i = 0
        while i < len(args):
            a = args[i]
            if a == "-m" or (a.startswith("-m") and len(a) > 2):
                mod = args[i + 1] if a == "-m" and i + 1 < len(args) else a[2:]
                if mod in ("reactor", "reactor.cli", "reactor.__main__"):
                    rest = args[i + 2 if a == "-m" else i + 1 :]
                break
            if a == "-c" or a == "-":
                break
            if a in _OPTS_WITH_ARG:
                i += 2
                continue
            if a.startswith("-"):
                i += 1
                continue
            if os.path.basename(a) == "reactor":
                rest = args[i + 1 :]
            break
    if rest is None:
        return None
    return next((a for a in rest if not a.startswith("-")), "")


def find_reactor_pids(exclude: Iterable[int] = ()) -> list[int]:
    """Running reactor processes, except introspection clients (``reactor fds``,
    ``reactor stats``), this process and ``exclude``."""
    skip = {os.getpid(), *exclude}
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] in skip:
            continue
        sub = reactor_subcommand(proc.info["cmdline"] or [])
        if sub is not None and sub not in INTROSPECTION_COMMANDS:
            out.append(proc.info["pid"])
    return sorted(out)


# --------------------------------------------------------------------------- socket options


def socket_options(sock: socket.socket | int) -> dict:
    """The options of a socket this process owns, read with getsockopt.

    This is the only way to see them: ``/proc/net/tcp`` does NOT hold socket options
    (SO_REUSEADDR, SO_REUSEPORT, TCP_NODELAY, SO_KEEPALIVE, buffer sizes…), whatever
    the seed write-up says; no /proc file does.  So the owning process reports them
    (the admin endpoint joins them with ``fd_table`` rows by ``fd``).

    Keys: fd, family (AF_INET…), type (SOCK_STREAM…), proto (tcp | udp | None),
    acceptconn, reuseaddr, reuseport, keepalive (bools), nodelay (bool, TCP only, else
    None), sndbuf, rcvbuf (bytes as the kernel reports them: setsockopt's value doubled
    for bookkeeping overhead).  An option the socket does not support is None.
    ``sock`` may be a socket object or a raw fd.
    """
    if isinstance(sock, int):
        s = socket.socket(fileno=sock)
        try:
            return socket_options(s)
        finally:
            s.detach()  # the fd is the caller's: never close it

    def opt(level: int, name: int) -> int | None:
        try:
            return sock.getsockopt(level, name)
        except OSError:
            return None

    def flag(level: int, name: int) -> bool | None:
        v = opt(level, name)
        return None if v is None else bool(v)

    family = _enum_name(
        socket.AddressFamily, opt(socket.SOL_SOCKET, socket.SO_DOMAIN) or sock.family
    )
    type_ = _enum_name(socket.SocketKind, opt(socket.SOL_SOCKET, socket.SO_TYPE) or sock.type)
    proto_num = opt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    inet = family in ("AF_INET", "AF_INET6")
    proto = None
    if inet and proto_num == socket.IPPROTO_TCP:
        proto = "tcp"
    elif inet and proto_num == socket.IPPROTO_UDP:
        proto = "udp"
    return {
        "fd": sock.fileno(),
        "family": family,
        "type": type_,
        "proto": proto,
        "acceptconn": flag(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
        "reuseaddr": flag(socket.SOL_SOCKET, socket.SO_REUSEADDR),
        "reuseport": flag(socket.SOL_SOCKET, socket.SO_REUSEPORT),
        "keepalive": flag(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "nodelay": flag(socket.IPPROTO_TCP, socket.TCP_NODELAY) if proto == "tcp" else None,
        "sndbuf": opt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        "rcvbuf": opt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    }


def _enum_name(enum: type, value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return str(int(value))
