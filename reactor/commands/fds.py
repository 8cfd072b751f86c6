"""`reactor fds`: a process's open fds, each socket joined with its /proc/net row.

Usage::

    reactor fds [PID | --port PORT] [--json] [--state STATE] [--watch SECONDS [--count N]]

Target: PID; or ``--port PORT``, the process(es) holding a TCP LISTEN socket on PORT
(every readable pid is searched, v4 and v6, in its own network namespace); or, with
neither, every running reactor process — a python process whose command line runs
``reactor …`` (the console script) or ``python -m reactor …`` — except this one and
other introspection clients (``reactor fds``, ``reactor stats``).  Several processes
(``--workers N``, forked children, SO_REUSEPORT siblings) are each shown in turn, one
table each; with ``--json`` their rows share one list, told apart by ``pid``.  A found
process that exits before it is read is left out; none found (or none left): a one-line
error, exit 1.

A missing pid or a process whose fds we may not read (``/proc/PID/fd`` is readable by
the process's user and root only): a one-line error, exit 1.  Nothing is printed for
that sample, so no partial table passes for a complete one.

``--state`` keeps socket rows in that state (case-insensitive; ``ss`` spellings such as
``ESTAB`` or ``time-wait`` are accepted); the summary still counts every fd.
``--watch S`` repeats every S seconds until Ctrl-C, or ``--count N`` samples.

JSON (``--json``): one line per sample, a JSON array with one object per fd, in fd order::

    pid      int          the process
    fd       int          the fd number
    type     str          tcp tcp6 udp udp6 udplite udplite6 raw raw6 unix | socket (a socket
                          in none of those tables: netlink, packet…) | pipe | epoll | anon
                          (eventfd, timerfd, signalfd, inotify…) | file dir chr blk fifo
                          (a path, by stat) | other (net:[…] and other namespace fds)
    local    str|null     inet: "HOST:PORT" or "[v6]:PORT"; unix: path ("@name" abstract,
                          null unnamed); others: the readlink target
    remote   str|null     inet: the peer, null if none (a listener, unconnected UDP)
    state    str|null     ESTABLISHED SYN_SENT SYN_RECV FIN_WAIT1 FIN_WAIT2 TIME_WAIT CLOSE
                          CLOSE_WAIT LAST_ACK LISTEN CLOSING NEW_SYN_RECV BOUND_INACTIVE;
                          UNCONN (unconnected udp/raw/unix); CONNECTING DISCONNECTING (unix)
    send_q   int|null     inet: tx_queue, bytes sent and not acked (LISTEN: 0 — /proc does
                          not carry the max backlog that ss shows there)
    recv_q   int|null     inet: rx_queue, bytes received and not read; LISTEN: connections
                          waiting in the accept queue
    inode    int|null     socket/pipe inode; files: st_ino
    uid      int|null     inet: the socket's uid
    timer    obj|null     inet: {"kind": none|retransmit|keepalive|timewait|zero_window_probe,
                          "expires": seconds (float), "retransmits": int}
    family   str|null     inet | inet6 | unix
    proto    str|null     tcp udp udplite raw | stream dgram seqpacket (unix) | the kernel's
                          protocol name for type "socket" (NETLINK, PACKET…)
    target   str          the fd's readlink text, verbatim
    watches  [int]|null   epoll: the fds this epoll instance watches

Keys are never removed or renamed; new keys may be added.

Real output (tests/fds_holder.py listening on 127.0.0.1 and ::1, holding four accepted
connections; the first has SO_KEEPALIVE with TCP_KEEPIDLE=600 and 5 unread bytes; two
more clients wait in the accept queue — the LISTEN row's RECV-Q, and the two ``ino:0``
rows in ss: accepted by the kernel, not yet by the process, so no fd.  SEND-Q of LISTEN
is 0 here and 128, the max backlog, in ss: see reactor/procnet.py)::

    $ reactor fds 13562
    pid 13562 python user=root: /work/wt/procnet/.venv/bin/python tests/fds_holder.py 127.0.0.1,3,keepalive ::1,1
    FD    TYPE    LOCAL                   REMOTE           STATE        SEND-Q    RECV-Q    INODE    UID    TIMER
    ----  ------  ----------------------  ---------------  -----------  --------  --------  -------  -----  -----------------
    0     pipe    pipe:[999937]                                                             999937
    1     pipe    pipe:[999938]                                                             999938
    2     chr     /dev/null                                                                 3
    3     epoll   anon_inode:[eventpoll]  watches 1 fds
    4     tcp     127.0.0.1:48061         *                LISTEN       0         2         1000318  0      -
    5     tcp6    [::1]:42577             *                LISTEN       0         0         1000319  0      -
    6     tcp     127.0.0.1:48061         127.0.0.1:42696  ESTABLISHED  0         5         1000321  0      keepalive 599.39s
    7     tcp     127.0.0.1:48061         127.0.0.1:42704  ESTABLISHED  0         0         1000325  0      -
    8     tcp6    [::1]:42577             [::1]:39110      ESTABLISHED  0         0         1000326  0      -
    9     tcp     127.0.0.1:48061         127.0.0.1:42708  ESTABLISHED  0         0         1000327  0      -
    fds: 10 in use / 20000 soft limit (0.1%)
    sockets by state: ESTABLISHED 4, LISTEN 2

    $ reactor fds --port 48061 --state listen
    pid 13562 python user=root: /work/wt/procnet/.venv/bin/python tests/fds_holder.py 127.0.0.1,3,keepalive ::1,1
    FD    TYPE    LOCAL            REMOTE    STATE    SEND-Q    RECV-Q    INODE    UID    TIMER
    ----  ------  ---------------  --------  -------  --------  --------  -------  -----  -------
    4     tcp     127.0.0.1:48061  *         LISTEN   0         2         1000318  0      -
    5     tcp6    [::1]:42577      *         LISTEN   0         0         1000319  0      -
    fds: 10 in use / 20000 soft limit (0.1%)
    sockets by state: ESTABLISHED 4, LISTEN 2
    shown: 2 of 10 fds (--state LISTEN)

    $ ss -tanoe sport = 48061     # the same sockets as ss sees them (inet_diag)
    State  Recv-Q Send-Q Local Address:Port  Peer Address:Port Process
    LISTEN 2      128        127.0.0.1:48061      0.0.0.0:*     ino:1000318 sk:27c71 cgroup:/ <->
    ESTAB  0      0          127.0.0.1:48061    127.0.0.1:42714 ino:0 sk:27c72 cgroup:/ <->
    ESTAB  0      0          127.0.0.1:48061    127.0.0.1:42704 ino:1000325 sk:27c73 cgroup:/ <->
    ESTAB  5      0          127.0.0.1:48061    127.0.0.1:42696 timer:(keepalive,9min58sec,0) ino:1000321 sk:27c74 cgroup:/ <->
    ESTAB  0      0          127.0.0.1:48061    127.0.0.1:42722 ino:0 sk:27c75 cgroup:/ <->
    ESTAB  0      0          127.0.0.1:48061    127.0.0.1:42708 ino:1000327 sk:27c76 cgroup:/ <->
"""

from __future__ import annotations

import argparse
import json
import time

from tabulate import tabulate

from reactor import procnet
from reactor.errors import RuntimeFailure, UsageError

HEADERS = ["FD", "TYPE", "LOCAL", "REMOTE", "STATE", "SEND-Q", "RECV-Q", "INODE", "UID", "TIMER"]

# ss spellings -> ours (after upper-casing and '-' -> '_')
_STATE_ALIASES = {"ESTAB": "ESTABLISHED", "FIN_WAIT_1": "FIN_WAIT1", "FIN_WAIT_2": "FIN_WAIT2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pid", nargs="?", type=int, help="process id (default: reactor processes)")
    parser.add_argument(
        "--port", type=int, metavar="PORT", help="the process listening on TCP PORT"
    )
    parser.add_argument("--json", action="store_true", help="one JSON array per sample")
    parser.add_argument("--state", metavar="STATE", help="only sockets in STATE (e.g. LISTEN)")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS")
    parser.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N samples")


def normalize_state(state: str) -> str:
    s = state.strip().upper().replace("-", "_")
    s = _STATE_ALIASES.get(s, s)
    if s not in procnet.STATE_NAMES:
        raise UsageError(
            f"--state: unknown state {state!r} (one of {', '.join(sorted(procnet.STATE_NAMES))})"
        )
    return s


def _check(args: argparse.Namespace) -> None:
    if args.pid is not None and args.port is not None:
        raise UsageError("give a PID or --port, not both")
    if args.pid is not None and args.pid <= 0:
        raise UsageError(f"PID must be positive, got {args.pid}")
    if args.port is not None and not 1 <= args.port <= 65535:
        raise UsageError(f"--port: {args.port} out of range 1-65535")
    if args.watch is not None and not args.watch > 0:
        raise UsageError(f"--watch: must be > 0 seconds, got {args.watch}")
    if args.count is not None:
        if args.watch is None:
            raise UsageError("--count needs --watch")
        if args.count < 1:
            raise UsageError(f"--count: must be >= 1, got {args.count}")


def targets(args: argparse.Namespace) -> list[int]:
    if args.pid is not None:
        return [args.pid]
    if args.port is not None:
        pids, denied = procnet.listening_pids(args.port)
        if not pids:
            msg = f"no process listens on TCP port {args.port}"
            if denied:
                msg = (
                    f"no readable process listens on TCP port {args.port} "
                    f"({denied} process(es) could not be read: permission denied)"
                )
            raise RuntimeFailure(msg)
        return pids
    pids = procnet.find_reactor_pids()
    if not pids:
        raise RuntimeFailure("no running reactor process found (give a PID or --port)")
    return pids


def _cells(r: procnet.FdRow) -> list:
    inet = r.family in ("inet", "inet6")
    remote = r.remote if r.remote is not None else ("*" if inet else "")
    if r.watches is not None:
        remote = f"watches {len(r.watches)} fds"
    return [
        r.fd,
        r.type if r.type != "socket" or not r.proto else f"socket ({r.proto})",
        r.local or "",
        remote,
        r.state or "",
        "" if r.send_q is None else r.send_q,
        "" if r.recv_q is None else r.recv_q,
        "" if r.inode is None else r.inode,
        "" if r.uid is None else r.uid,
        "" if r.timer is None else str(r.timer),
    ]


def render_table(
    summary: dict, rows: list[procnet.FdRow], shown: list[procnet.FdRow], state: str | None
) -> str:
    cmd = " ".join(summary["cmdline"]) or summary["name"]
    lines = [f"pid {summary['pid']} {summary['name']} user={summary['user']}: {cmd}"]
    lines.append(
        tabulate(
            [_cells(r) for r in shown], headers=HEADERS, tablefmt="simple", disable_numparse=True
        )
    )
    soft = summary["fd_soft_limit"]
    if soft is None:
        limit = "unlimited"
    else:
        limit = f"{soft} soft limit" + (f" ({100 * len(rows) / soft:.1f}%)" if soft > 0 else "")
    lines.append(f"fds: {summary['fds_in_use']} in use / {limit}")
    by_state = summary["sockets_by_state"]
    if by_state:
        lines.append("sockets by state: " + ", ".join(f"{k} {v}" for k, v in by_state.items()))
    else:
        lines.append("sockets by state: no sockets")
    if state is not None:
        lines.append(f"shown: {len(shown)} of {len(rows)} fds (--state {state})")
    return "\n".join(lines)


def sample(pids: list[int], state: str | None, as_json: bool, discovered: bool = False) -> str:
    """Read every target first, then format: an error leaves nothing half-printed.

    ``discovered`` pids (found by search, not named by the user) that exit meanwhile
    are dropped: they are simply no longer running.  If none is left, that is an error.
    """
    tables = procnet.fd_tables(pids, skip_gone=discovered)
    parts: list[tuple[dict, list[procnet.FdRow], list[procnet.FdRow]]] = []
    for pid, rows in tables.items():
        try:
            summary = procnet.process_summary(pid, rows)
        except procnet.NoSuchProcess:
            if not discovered:
                raise
            continue
        shown = rows if state is None else [r for r in rows if r.state == state]
        parts.append((summary, rows, shown))
    if not parts:
        gone = ", ".join(map(str, pids))
        raise RuntimeFailure(f"no such process: {gone} (exited)")
    if as_json:
        return json.dumps([r.as_dict() for _, _, shown in parts for r in shown])
    return "\n\n".join(render_table(s, rows, shown, state) for s, rows, shown in parts)


def run(args: argparse.Namespace) -> int:
    _check(args)
    state = normalize_state(args.state) if args.state is not None else None
    pids = targets(args)
    discovered = args.pid is None
    if args.watch is None:
        print(sample(pids, state, args.json, discovered))
        return 0
    n = 0
    next_at = time.monotonic()
    while args.count is None or n < args.count:
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # the --watch period itself, not synchronisation
        out = sample(pids, state, args.json, discovered)
        if not args.json:
            out = f"--- {time.strftime('%H:%M:%S')} sample {n + 1}\n{out}\n"
        print(out, flush=True)
        n += 1
        # keep the period; after a slow sample, restart from now rather than burst
        next_at = max(next_at + args.watch, time.monotonic())
    return 0
