"""The admin endpoint: a tiny HTTP server on the gateway's own loop.

    GET /metrics   Prometheus text exposition format 0.0.4
    GET /stats     JSON: the gateway's stats plus process facts (psutil)
    GET /fds       JSON: our own fd table (procnet), each socket with its role
                   and the options read with getsockopt from our socket objects
    GET /healthz   200 "ok", 503 "draining" while the gateway drains

Anything else: 404; a method other than GET: 405; a malformed or oversized
(> 8 KiB) head: 400. Every response carries ``Connection: close`` and a
Content-Length; we half-close after it and close once the client has closed
too (or after ``linger``), never with unread bytes racing the response out.

Discussion: never slow the relays
---------------------------------
The admin shares the relays' thread, so it follows their rules: a
``Listener`` and ``Stream``s on the same epoll, nothing blocking, no threads.
A client that trickles its head (slowloris) or never sends one is closed
after ``head_timeout``; at most ``max_connections`` admin connections are
open at once (when full, the oldest idle or incomplete one is evicted for the
newcomer); a head is bounded by ``MAX_HEAD`` bytes before it is complete.
/metrics and /stats are built in one go: O(backends + relays) plus one
psutil read (measured: 4-6 ms with 1000 open relays). /fds is not: it reads
the namespace's socket tables, which on a busy host hold a hundred thousand
rows, so it is built in slices over several loop turns (see ``_FdsJob``).

The syscall counters (``loop.syscalls``) include the admin's own socket
work (accept, recv, send, shutdown, close, epoll_ctl) and the getsockopt
calls made for /fds -- an idle gateway's syscall rate is largely its admin
and health checks. The /proc reads of /fds and psutil's are not counted:
they are file reads, not the loop's socket calls.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import resource
import socket
import time
from typing import TYPE_CHECKING, Any

import psutil

from reactor import procnet
from reactor.addr import bind_error
from reactor.httphead import MAX_HEAD, BadRequest, HeadReader, Request, parse_request_head
from reactor.listener import Listener, bind_socket, format_address
from reactor.loop import Loop
from reactor.splice import Pipe
from reactor.stream import Stream

if TYPE_CHECKING:  # pragma: no cover
    from reactor.gateway import Gateway

__all__ = ["AdminServer", "BadRequest", "Request", "parse_request_head", "MAX_HEAD",
           "render_metrics", "is_loopback", "fd_roles"]

log = logging.getLogger("reactor.admin")

HEAD_TIMEOUT = 5.0  # seconds for the whole request head, from accept
LINGER = 10.0  # seconds, after the response, to drain it and see the client close
MAX_CONNECTIONS = 32
DISCARD_LIMIT = 65536  # bytes read after the head before we stop being polite

PATHS = ("/metrics", "/stats", "/fds", "/healthz")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}
CT_METRICS = "text/plain; version=0.0.4; charset=utf-8"
CT_JSON = "application/json"
CT_TEXT = "text/plain; charset=utf-8"
BACKEND_STATES = ("up", "down", "ejected", "draining")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8 and ::1 (and v4-mapped loopback); False for
    wildcards and every other address."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


class AdminServer:
    """Serves /metrics, /stats, /fds, /healthz for ``gateway`` on ``loop``."""

    def __init__(self, loop: Loop, gateway: Gateway, address: tuple[str, int], *,
                 head_timeout: float = HEAD_TIMEOUT, linger: float = LINGER,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        host, port = address
        try:
            sock = bind_socket(host, port, backlog=64)
        except OSError as exc:
            raise bind_error("admin", format_address((host or "*", port)), exc) from None
        self.loop = loop
        self.gateway = gateway
        self.head_timeout = head_timeout
        self.linger = linger
        self.max_connections = max_connections
        self.listener = Listener(loop, sock, self._on_accept, batch=16)
        # insertion-ordered: the oldest connection is the first evicted when full
        self.conns: dict[_AdminConn, None] = {}
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.connections_total = 0
        self.rejected = 0  # over max_connections, nothing evictable
        self.evicted = 0  # closed to make room (see _evict_one)
        self.timeouts = 0  # head not complete in time
        self._fds_job: _FdsJob | None = None
        self.process = psutil.Process()
        self._closed = False
        bound = self.listener.address[0]
        if not is_loopback(bound):
            log.warning("event=admin_exposed address=%s admin endpoint exposed on %s: "
                        "anyone who can reach it can read stats", self.name, self.name)

    @property
    def name(self) -> str:
        return self.listener.name

    def __repr__(self) -> str:
        return f"<AdminServer {self.name} conns={len(self.conns)}>"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.listener.close()
        self.close_fds_job()
        for conn in list(self.conns):
            conn.close()

    # -- connections ----------------------------------------------------------

    def _on_accept(self, sock: socket.socket, addr: tuple) -> None:
        if len(self.conns) >= self.max_connections and not self._evict_one():
            self.rejected += 1
            sock.close()
            self.loop.syscalls.close += 1
            return
        self.connections_total += 1
        self.conns[_AdminConn(self, sock)] = None

    def _evict_one(self) -> bool:
        """Full: make room for the newcomer rather than refuse it.

        Discussion: refusing at the cap would let 32 silent or trickling
        clients (slowloris) lock every operator out of /stats and /metrics for
        ``head_timeout`` -- forever, if they reconnect. So the oldest
        connection that is merely lingering after its answer goes first, then
        the oldest that has not completed its request head. A connection whose
        request is being answered is never cut.
        """
        victim = next((c for c in self.conns if c.answered), None)
        if victim is None:
            victim = next((c for c in self.conns if not c.got_request), None)
        if victim is None:
            return False
        self.evicted += 1
        victim.close()
        self.conns.pop(victim, None)
        return True

    def _forget(self, conn: _AdminConn) -> None:
        self.conns.pop(conn, None)

    # -- requests -------------------------------------------------------------

    def handle(self, req: Request, conn: _AdminConn | None = None
               ) -> tuple[int, str, bytes, dict[str, str]] | None:
        """(status, content type, body, extra headers) for a parsed request, or
        None when the answer comes later (/fds: ``conn`` is answered when its
        table is built, over several loop turns)."""
        path = req.path
        label = path if path in PATHS else "other"
        if req.method != "GET":
            self.requests[(label, 405)] += 1
            return 405, CT_TEXT, b"method not allowed\n", {"Allow": "GET"}
        if path not in PATHS:
            self.requests[(label, 404)] += 1
            return 404, CT_TEXT, b"not found\n", {}
        if path == "/healthz":
            status = 503 if self.gateway.draining else 200
            self.requests[(label, status)] += 1
            return status, CT_TEXT, (b"draining\n" if status == 503 else b"ok\n"), {}
        try:
            if path == "/metrics":
                self.requests[(label, 200)] += 1  # before building: the response counts itself
                return 200, CT_METRICS, render_metrics(self.stats()).encode(), {}
            if path == "/stats":
                self.requests[(label, 200)] += 1
                return 200, CT_JSON, _json(self.stats()), {}
            if conn is None:
                raise ValueError("/fds needs a connection to answer later")
            if self._fds_job is None:
                self._fds_job = _FdsJob(self)
            self._fds_job.waiters.append(conn)  # a request during a build shares its result
            return None
        except Exception:
            log.exception("event=admin_error path=%s", path)
            self.requests[(label, 500)] += 1
            return 500, CT_TEXT, b"internal error\n", {}

    def _fds_done(self, job: _FdsJob, body: bytes | None) -> None:
        if self._fds_job is job:
            self._fds_job = None
        status = 200 if body is not None else 500
        for conn in job.waiters:
            if not conn.closed:
                self.requests[("/fds", status)] += 1
                if body is None:
                    conn.answer(500, CT_TEXT, b"internal error\n", {})
                else:
                    conn.answer(200, CT_JSON, body, {})

    def count_bad(self) -> None:
        self.requests[("-", 400)] += 1

    def stats(self) -> dict[str, Any]:
        """``gateway.stats()``, with live bytes per backend, plus process and admin facts."""
        gw = self.gateway
        st = gw.stats()
        # Backend byte counters are folded in when a relay ends; add the live
        # relays so the counters move while a long session runs (and stay
        # monotonic: the live share moves into the counter in the same call).
        live: dict[int, list[int]] = {}
        for relay in gw.relays:
            b = relay.backend
            if b is not None and relay.backend_info is not None:
                acc = live.setdefault(id(relay.backend_info), [0, 0])
                acc[0] += b.bytes_out
                acc[1] += b.bytes_in
        for b, d in zip(gw.balancer.backends, st["backends"]):
            add = live.get(id(b))
            if add:
                d["bytes_in"] += add[0]
                d["bytes_out"] += add[1]
        st["listeners"] = self._listener_stats(st["listeners"])
        st["health_checks"] = {"total": gw.health.checks_total, "failed": gw.health.checks_failed}
        st["process"] = self.process_facts()
        st["admin"] = {
            "address": self.name,
            "connections_active": len(self.conns),
            "connections_total": self.connections_total,
            "rejected": self.rejected,
            "evicted": self.evicted,
            "head_timeouts": self.timeouts,
            "requests": _nest(self.requests),
        }
        return st

    def _listener_stats(self, rows: list[dict]) -> list[dict]:
        listeners = self.gateway.listeners
        if len(listeners) == 1:
            active = {listeners[0].name: len(self.gateway.relays)}
        else:
            # Which listener a relay came through is not recorded; its
            # client socket's local address says (one getsockname each).
            active = collections.Counter()
            for relay in self.gateway.relays:
                try:
                    local = relay.client.sock.getsockname()
                except OSError:
                    continue
                finally:
                    self.loop.syscalls.getsockname += 1
                active[format_address(local)] += 1
        out = []
        for row in rows:
            row = dict(row)
            row["active"] = active.get(row["address"], 0)
            out.append(row)
        return out

    def process_facts(self) -> dict[str, Any]:
        p = self.process
        with p.oneshot():
            cpu = p.cpu_times()
            ctx = p.num_ctx_switches()
            rss = p.memory_info().rss
            nfds = p.num_fds()
            threads = p.num_threads()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return {
            "pid": p.pid,
            "cpu_user": cpu.user,
            "cpu_system": cpu.system,
            "ctx_switches_voluntary": ctx.voluntary,
            "ctx_switches_involuntary": ctx.involuntary,
            "rss": rss,
            "num_fds": nfds,
            "fd_soft_limit": None if soft == resource.RLIM_INFINITY else soft,
            "fd_hard_limit": None if hard == resource.RLIM_INFINITY else hard,
            "threads": threads,
            "start_time": p.create_time(),
            "time": time.time(),
            "monotonic": time.monotonic(),
        }

    def close_fds_job(self) -> None:
        if self._fds_job is not None:
            self._fds_job.cancel()
            self._fds_job = None


class _FdsJob:
    """Builds one /fds answer over several loop turns.

    Discussion: the socket tables are the namespace's, not ours
    ------------------------------------------------------------
    ``/proc/self/net/tcp`` lists every TCP socket of the network namespace,
    TIME_WAIT included: on a busy host a hundred thousand rows, megabytes of
    text whose generation and parsing cost hundreds of milliseconds. Done in
    one go (``procnet.fd_table``), that would freeze every relay for as long.
    So the job works in slices of at most ``BUDGET`` seconds per loop turn,
    and relays run between them:

    1. our fds: the list (one listdir) and the roles (our objects) at once,
       then per fd, sliced: readlink, and the options of the socket object
       that holds it -- if it still holds it (an fd closed meanwhile, or
       closed and reused, gets no role rather than a wrong one);
    2. the tables, raw reads (the kernel serves a page per read), rows
       screened by inode before procnet decodes the few that are ours;
    3. the join (procnet's own, so rows are exactly ``reactor fds`` rows) and
       the JSON, in one turn: O(our fds).

    A socket closed after its slice shows with type ``socket`` (its table
    row is gone); an fd opened after the listing is not listed.
    """

    BUDGET = 0.002  # seconds of work per loop turn
    READ = 65536

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.loop = server.loop
        self.pid = os.getpid()
        self.waiters: list[_AdminConn] = []
        self.cancelled = False
        self.pending = collections.deque(sorted(int(n) for n in os.listdir(f"/proc/{self.pid}/fd")))
        self.roles = fd_roles(server.loop, server.gateway, server)
        self.targets: list[tuple[int, str]] = []
        self.options: dict[int, dict] = {}
        self.wanted: set[bytes] = set()
        self.tables: list[tuple[str, str | None]] = []
        self.inet: dict[int, Any] = {}
        self.unix: dict[int, Any] = {}
        self.fd: int | None = None
        self.carry = b""
        self.turns = 0
        self.phase = "fds"  # then "tables", "join", "done"
        self.rows: list[procnet.FdRow] = []
        self.parts: list[str] = []
        self.counts: collections.Counter[str] = collections.Counter()
        self.handle = self.loop.call_soon(self._step)

    def cancel(self) -> None:
        self.cancelled = True
        self.handle.cancel()
        self._close_table()

    def _close_table(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.carry = b""

    def _step(self) -> None:
        if self.cancelled:
            return
        if not any(not c.closed for c in self.waiters):
            self.cancel()  # every asker left: stop
            self.server._fds_done(self, None)
            return
        self.turns += 1
        try:
            now = time.perf_counter
            deadline = now() + self.BUDGET
            while self.phase != "done" and now() < deadline:
                if self.phase == "fds":
                    if self.pending:
                        self._one_fd(self.pending.popleft())
                    else:
                        self._start_tables()
                elif self.phase == "tables":
                    if self.tables:
                        self._read_some()
                    else:
                        self.phase = "join"
                        self.pending.extend(self.targets)
                elif self.pending:
                    self._join_one(self.pending.popleft())
                else:
                    self.phase = "done"
            if self.phase != "done":
                self.handle = self.loop.call_soon(self._step)
                return
            body = self._body()
        except Exception:
            log.exception("event=admin_error path=/fds")
            self.cancel()
            self.server._fds_done(self, None)
            return
        self.server._fds_done(self, body)

    def _one_fd(self, fd: int) -> None:
        try:
            target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
        except FileNotFoundError:
            self.roles.pop(fd, None)
            return  # closed since the listing
        self.targets.append((fd, target))
        role = self.roles.get(fd)
        if role is not None and role[0] == "splice_pipe" and not target.startswith("pipe:"):
            del self.roles[fd]  # the pipe was closed and its number reused since the roles were taken
            return
        if role is not None and role[1] is not None:
            if role[1].fileno() == fd:
                self.options[fd] = procnet.socket_options(_CountingSocket(role[1], self.loop.syscalls))
            else:
                del self.roles[fd]  # that object let go of the fd since the roles were taken

    def _start_tables(self) -> None:
        self.wanted = {str(i).encode() for _, t in self.targets
                       for k, i in [procnet.classify_target(t)] if k == "socket"}
        if self.wanted:
            self.tables = [(name, proto) for name, (proto, _) in procnet.INET_TABLES.items()]
            self.tables.append(("unix", None))
        self.phase = "tables"

    def _read_some(self) -> None:
        name, proto = self.tables[0]
        if self.fd is None:
            try:
                self.fd = os.open(f"/proc/{self.pid}/net/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:  # a table this kernel lacks (no IPv6, no udplite)
                self.tables.pop(0)
                return
        data = os.read(self.fd, self.READ)
        if data:
            data, _, self.carry = (self.carry + data).rpartition(b"\n")  # lines straddle reads
        else:
            data = self.carry
            self._close_table()
            self.tables.pop(0)
        # Screen on the raw inode column; procnet decodes only our rows.
        col, maxsplit = (9, 10) if proto is not None else (6, 7)
        wanted = self.wanted
        for line in data.split(b"\n"):
            f = line.split(None, maxsplit)
            if len(f) <= col or f[col] not in wanted:
                continue
            text = line.decode("utf-8", "surrogateescape")
            try:
                if proto is None:
                    u = procnet.parse_unix_line(text)
                    self.unix[u.inode] = u
                else:
                    row = procnet.parse_inet_line(text, proto)
                    if row.inode:
                        self.inet[row.inode] = row
            except procnet.ParseError as exc:
                log.warning("event=fds_skipped_line table=%s error=%s", name, exc)

    def _join_one(self, item: tuple[int, str]) -> None:
        # procnet's own join, so /fds rows are exactly `reactor fds` rows
        [row] = procnet._rows(self.pid, [item], self.inet, self.unix)
        self.rows.append(row)
        d = row.as_dict()
        role, _, detail = self.roles.get(row.fd, (None, None, None))
        d["role"] = role
        d["detail"] = detail
        d["options"] = self.options.get(row.fd)
        self.counts[role or "other"] += 1
        self.parts.append(json.dumps(d, separators=(",", ":"), default=str))

    def _body(self) -> bytes:
        head = json.dumps({
            "pid": self.pid,
            "summary": procnet.process_summary(self.pid, self.rows),
            "roles": dict(sorted(self.counts.items())),
            "loop_turns": self.turns,
        }, separators=(",", ":"))
        return (head[:-1] + ',"fds":[' + ",".join(self.parts) + "]}\n").encode()


def fd_roles(loop: Loop, gateway: Gateway, admin: AdminServer | None = None
             ) -> dict[int, tuple[str, socket.socket | None, str | None]]:
    """fd -> (role, our socket object or None, detail) from the objects we hold.

    Roles: listener, client, backend, connecting (backend connect in
    progress), health_check, admin (its listener and its connections),
    epoll, wakeup (the loop's self-pipe socketpair), splice_pipe (both ends
    of a spliced direction's pipe, detail ``client->backend`` or
    ``backend->client``, or ``pooled`` for an idle pipe kept for reuse).
    """
    roles: dict[int, tuple[str, socket.socket | None, str | None]] = {}
    roles[loop.epoll_fd] = ("epoll", None, None)
    for s in (loop._wake_r, loop._wake_w):
        if s.fileno() >= 0:
            roles[s.fileno()] = ("wakeup", s, None)
    for lst in gateway.listeners:
        if lst.sock.fileno() >= 0:
            roles[lst.fd] = ("listener", lst.sock, lst.name)
    for relay in gateway.relays:
        backend = relay.backend_info.name if relay.backend_info is not None else None
        c = relay.client
        if not c.closed:
            roles[c.fd] = ("client", c.sock, backend)
        b = relay.backend
        if b is not None and not b.closed:
            roles[b.fd] = ("backend", b.sock, backend)
        cs = relay.connect_sock
        if cs is not None and cs.fileno() >= 0:
            roles[cs.fileno()] = ("connecting", cs, backend)
        for stream, way in ((c, "client->backend"), (b, "backend->client")):
            pipe = getattr(stream, "_splice", None)
            if isinstance(pipe, Pipe):
                roles[pipe.r] = roles[pipe.w] = ("splice_pipe", None, way)
    pool = getattr(loop, "_pipe_pool", None)
    if pool is not None:
        for pipe in pool.free:
            roles[pipe.r] = roles[pipe.w] = ("splice_pipe", None, "pooled")
    for fd, check in gateway.health.in_flight.items():
        if check.sock is not None:
            roles[fd] = ("health_check", check.sock, check.backend.name)
    if admin is not None:
        if admin.listener.sock.fileno() >= 0:
            roles[admin.listener.fd] = ("admin", admin.listener.sock, "listener")
        for conn in admin.conns:
            if not conn.stream.closed:
                roles[conn.stream.fd] = ("admin", conn.stream.sock, "connection")
    return roles


class _CountingSocket:
    """Hands ``procnet.socket_options`` our socket, counting its getsockopt
    calls into the loop's counters (they are real syscalls the loop issues)."""

    __slots__ = ("_sock", "_sc", "family", "type")

    def __init__(self, sock: socket.socket, syscalls: dict[str, int]) -> None:
        self._sock = sock
        self._sc = syscalls
        self.family = sock.family
        self.type = sock.type

    def fileno(self) -> int:
        return self._sock.fileno()

    def getsockopt(self, *args: Any) -> Any:
        self._sc.getsockopt += 1
        return self._sock.getsockopt(*args)


class _AdminConn:
    """One admin connection: read a head, answer once, half-close, linger."""

    __slots__ = ("server", "stream", "reader", "timer", "got_request", "answered", "discarded", "closed")

    def __init__(self, server: AdminServer, sock: socket.socket) -> None:
        self.server = server
        self.reader = HeadReader(MAX_HEAD)
        self.got_request = False
        self.answered = False
        self.discarded = 0
        self.closed = False
        self.timer = server.loop.call_later(server.head_timeout, self._timeout)
        self.stream = Stream(server.loop, sock, self, role="admin")

    # -- protocol ------------------------------------------------------------

    def data_received(self, view: memoryview) -> None:
        if self.got_request:
            # The client has its answer coming; bytes after the head (a body,
            # pipelined requests) are read and dropped, up to a limit.
            self.discarded += len(view)
            if self.discarded > DISCARD_LIMIT:
                self.close()
            return
        try:
            req = self.reader.feed(view)
        except BadRequest as exc:
            self.server.count_bad()
            log.info("event=admin_bad_request error=%r", str(exc))
            self.got_request = True
            self.answer(400, CT_TEXT, f"bad request: {exc}\n".encode(), {})
            return
        if req is None:
            return
        self.got_request = True
        # the head is in: from here ``linger`` bounds the wait for the answer (/fds)
        self.server.loop.cancel_timer(self.timer)
        self.timer = self.server.loop.call_later(self.server.linger, self._timeout)
        result = self.server.handle(req, self)
        if result is not None:
            self.answer(*result)

    def eof_received(self) -> None:
        if not self.got_request:
            self.close()  # gave up before a complete head
        elif self.stream.eof_sent:
            self.close()
        # else: the client half-closed after its request; answer, then close

    def eof_sent(self) -> None:
        if self.stream.eof_received:
            self.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        pass  # one response, then close: nothing further to hold back

    def resume_writing(self) -> None:
        pass

    # -- our side ------------------------------------------------------------

    def answer(self, status: int, ctype: str, body: bytes, extra: dict[str, str]) -> None:
        if self.answered or self.closed:
            return
        self.answered = True
        loop = self.server.loop
        if self.timer is not None:
            loop.cancel_timer(self.timer)
        self.timer = loop.call_later(self.server.linger, self._timeout)  # drain and see the close
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
                f"Content-Type: {ctype}", f"Content-Length: {len(body)}", "Connection: close",
                "Cache-Control: no-store"]
        head += [f"{k}: {v}" for k, v in extra.items()]
        self.stream.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        if not self.closed:
            self.stream.write_eof()

    def _timeout(self) -> None:
        self.timer = None
        if not self.got_request:
            self.server.timeouts += 1
            log.info("event=admin_head_timeout after=%.1fs", self.server.head_timeout)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.server.loop.cancel_timer(self.timer)
            self.timer = None
        self.stream.close()
        self.stream.protocol = None  # break the cycle: freed by refcount
        self.server._forget(self)


# -- rendering -----------------------------------------------------------------

def _json(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


def _nest(counter: collections.Counter[tuple[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (path, status), n in sorted(counter.items()):
        if n:
            out.setdefault(path, {})[str(status)] = n
    return out


def _esc_label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _fmt_value(v: float | int | bool | None) -> str:
    if v is None:
        return "NaN"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


class _Exposition:
    """Prometheus text format 0.0.4: HELP and TYPE once per family, then samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, typ: str, help_: str,
               samples: list[tuple[dict[str, object], float | int | bool | None]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {typ}")
        for labels, value in samples:
            if labels:
                lab = ",".join(f'{k}="{_esc_label(v)}"' for k, v in labels.items())
                self.lines.append(f"{name}{{{lab}}} {_fmt_value(value)}")
            else:
                self.lines.append(f"{name} {_fmt_value(value)}")

    def one(self, name: str, typ: str, help_: str, value: float | int | bool | None) -> None:
        self.family(name, typ, help_, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(st: dict[str, Any]) -> str:
    """The /metrics body from an ``AdminServer.stats()`` dict."""
    m = _Exposition()
    conns = st["connections"]
    backends = st["backends"]
    loop = st["loop"]
    proc = st["process"]
    m.one("reactor_connections_active", "gauge", "Relays open now.", conns["active"])
    m.one("reactor_connections_accepted_total", "counter", "Client connections accepted.",
          conns["accepted_total"])
    m.family("reactor_connections_rejected_total", "counter", "Client connections refused, by reason.", [
        ({"reason": "max_connections"}, conns["rejected_max_connections"]),
        ({"reason": "max_connections_per_ip"}, conns["rejected_per_ip"]),
        ({"reason": "proxy_protocol"}, conns["proxy_rejected"]),
    ])
    m.family("reactor_connections_closed_total", "counter", "Relays ended, by close reason.",
             [({"reason": r}, n) for r, n in sorted(conns["closed_by_reason"].items())])
    m.one("reactor_connect_failures_total", "counter", "Backend connects that failed or timed out.",
          conns["connect_failures"])
    m.one("reactor_client_received_bytes_total", "counter", "Bytes read from clients.", st["bytes"]["in"])
    m.one("reactor_client_sent_bytes_total", "counter", "Bytes written to clients.", st["bytes"]["out"])
    lst = st["listeners"]
    m.family("reactor_listener_connections_active", "gauge", "Relays open now, per listener.",
             [({"listener": x["address"]}, x.get("active", 0)) for x in lst])
    m.family("reactor_listener_connections_total", "counter", "Connections accepted, per listener.",
             [({"listener": x["address"]}, x["accepted"]) for x in lst])
    m.family("reactor_listener_accept_paused_total", "counter",
             "Episodes of accept paused for fd exhaustion (EMFILE...), per listener.",
             [({"listener": x["address"]}, x["accept_paused_episodes"]) for x in lst])

    def per_backend(key: str) -> list[tuple[dict[str, object], object]]:
        return [({"backend": b["name"], "address": b["address"]}, b[key]) for b in backends]

    m.family("reactor_backend_connections_active", "gauge", "Relays open now, per backend.",
             per_backend("active"))
    m.family("reactor_backend_connections_total", "counter", "Connections sent to the backend.",
             per_backend("total"))
    m.family("reactor_backend_connect_failures_total", "counter", "Failed connects to the backend.",
             per_backend("failures_total"))
    m.family("reactor_backend_sent_bytes_total", "counter", "Bytes written to the backend.",
             per_backend("bytes_in"))
    m.family("reactor_backend_received_bytes_total", "counter", "Bytes read from the backend.",
             per_backend("bytes_out"))
    m.family("reactor_backend_weight", "gauge", "Configured weight.", per_backend("weight"))
    m.family("reactor_backend_up", "gauge", "1 if the backend takes new connections (state up).",
             [({"backend": b["name"], "address": b["address"]}, b["state"] == "up") for b in backends])
    m.family("reactor_backend_state", "gauge", "1 for the backend's current state, 0 for the others.",
             [({"backend": b["name"], "address": b["address"], "state": s}, b["state"] == s)
              for b in backends for s in BACKEND_STATES])
    hc = st.get("health_checks", {})
    m.one("reactor_health_checks_total", "counter", "Active health checks started.", hc.get("total", 0))
    m.one("reactor_health_checks_failed_total", "counter", "Active health checks failed.", hc.get("failed", 0))
    m.one("reactor_draining", "gauge", "1 while the gateway drains (SIGTERM).", st["draining"])
    m.one("reactor_reloads_total", "counter", "Configuration reloads applied.", st["reloads"])
    m.one("reactor_reload_failures_total", "counter", "Configuration reloads rejected.", st["reload_failures"])
    m.one("reactor_loop_iterations_total", "counter", "Loop turns (one epoll_wait each).", loop["iterations"])
    m.one("reactor_loop_events_total", "counter", "I/O events dispatched.", loop["events_total"])
    m.one("reactor_loop_events_per_wait", "gauge", "Mean events returned per epoll_wait.",
          loop["events_per_wait"])
    m.one("reactor_loop_events_max", "gauge", "Most events returned by one epoll_wait.", loop["events_max"])
    m.one("reactor_loop_lag_seconds", "gauge", "How late the last timer ran.", loop["lag_last"])
    m.one("reactor_loop_lag_max_seconds", "gauge", "The latest any timer has run.", loop["lag_max"])
    m.one("reactor_loop_ready", "gauge", "Callbacks in the ready queue.", loop["ready"])
    m.one("reactor_loop_timers", "gauge", "Live timers.", loop["timers"])
    m.one("reactor_loop_fds_registered", "gauge", "Fds registered with epoll.", loop["fds_registered"])
    m.family("reactor_syscalls_total", "counter", "System calls issued by the loop, by name.",
             [({"name": k}, v) for k, v in sorted(loop["syscalls"].items())])
    sp = st.get("splice") or {}
    m.family("reactor_splice_pipes", "gauge", "Splice pipes (2 fds each), by state.", [
        ({"state": "in_use"}, sp.get("pipes_in_use", 0)), ({"state": "pooled"}, sp.get("pipes_pooled", 0))])
    m.one("reactor_splice_directions", "gauge", "Relay directions moving bytes with splice(2) now.",
          sp.get("directions_spliced", 0))
    m.family("reactor_splice_pipes_unavailable_total", "counter",
             "Directions left on recv/send for want of a pipe, by cause.", [
                 ({"cause": "fd_budget"}, sp.get("pipes_refused", 0)),
                 ({"cause": "pipe_failed"}, sp.get("pipe_failures", 0))])
    adm = st.get("admin", {})
    m.family("reactor_admin_requests_total", "counter", "Admin requests, by path and status.",
             [({"path": p, "code": c}, n) for p, codes in adm.get("requests", {}).items()
              for c, n in codes.items()])
    m.one("reactor_admin_head_timeouts_total", "counter", "Admin connections closed for a slow head.",
          adm.get("head_timeouts", 0))
    m.family("reactor_process_cpu_seconds_total", "counter", "CPU time of the process, by mode.", [
        ({"mode": "user"}, proc["cpu_user"]), ({"mode": "system"}, proc["cpu_system"])])
    m.family("reactor_process_context_switches_total", "counter", "Context switches, by kind.", [
        ({"kind": "voluntary"}, proc["ctx_switches_voluntary"]),
        ({"kind": "involuntary"}, proc["ctx_switches_involuntary"])])
    m.one("process_open_fds", "gauge", "Open file descriptors.", proc["num_fds"])
    m.one("process_max_fds", "gauge", "RLIMIT_NOFILE soft limit.", proc["fd_soft_limit"])
    m.one("process_resident_memory_bytes", "gauge", "Resident set size.", proc["rss"])
    m.one("process_start_time_seconds", "gauge", "Start time, seconds since the epoch.", proc["start_time"])
    m.one("reactor_uptime_seconds", "gauge", "Seconds since the gateway started.", st["uptime"])
    return m.text()
