"""`reactor gateway --workers N`: one supervisor, N single-loop workers on one port.

Go's scheduler runs one P (a run queue) per core and lets every M steal from
the others. We get the same "one loop per core" without sharing anything:
N worker processes, each an ordinary single-threaded ``reactor gateway``, each
with its *own* listening socket bound to the same address with
``SO_REUSEPORT``. The kernel hashes every new connection's 4-tuple onto one of
the sockets in the group, so accepts are spread without a shared accept queue,
a lock, or a thundering herd. There is no work stealing: a connection stays on
the worker that accepted it, which is what a long-lived game session wants.

What the supervisor does
------------------------
* **Chooses the port once.** Before any worker starts it binds every listen
  address itself (``SO_REUSEADDR`` + ``SO_REUSEPORT``, bound but never
  listening, so the kernel hands it no connections). A port in use, or not
  ours to take, is therefore a one-line error and exit 2 before anything runs,
  ``:0`` becomes a concrete port that every worker shares, and between a
  worker's death and its restart no foreign process can grab the port.
* **Starts workers** as ``python -m reactor gateway ... --listen HOST:PORT
  --worker-id I`` (a fresh interpreter each: no state inherited through fork),
  waits for each one's ready line, then prints its own::

      reactor gateway: pid=4242 listening on 127.0.0.1:8080 backends=3 balance=maglev admin=127.0.0.1:9901 workers=4

* **Restarts a worker that dies**, at once the first time, with a doubling
  delay (0.1 s .. 10 s) while a slot keeps dying within 5 s of its start.
* **Forwards signals.** SIGHUP goes to every worker (each re-reads the config
  and applies it as a single gateway would). SIGTERM: the supervisor releases
  its reservation sockets at once and forwards; workers close their listeners,
  drain for ``grace``, exit 0; the supervisor exits 0 when the last one has.
  A second SIGTERM, or SIGINT, is forwarded and stops them at once.
* **Sums statistics.** Each worker serves its own admin endpoint on the admin
  host with a kernel-chosen port (``--admin HOST:0``); the supervisor serves
  the configured admin address: ``/stats`` fetches every worker's ``/stats``
  over loopback and sums them (counters add up, backends and listeners are
  matched by name and address, maxima such as ``lag_max`` take the max,
  per-worker rows are under ``workers``); ``/metrics`` renders the sum in the
  same Prometheus format; ``/healthz`` says ok. The supervisor
  is not on the data path, so its admin endpoint is a plain threaded
  ``http.server``.

Workers watch their parent: if the supervisor disappears (SIGKILL), each
worker drains and exits as on SIGTERM rather than lingering as an orphan.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from reactor.addr import bind_error
from reactor.config import CLI_GATEWAY, Config
from reactor.errors import UsageError
from reactor.listener import _all_interfaces, bind_socket, format_address
from reactor.loop import EPOLLIN, Loop

log = logging.getLogger("reactor.supervisor")

READY_TIMEOUT = 15.0
QUICK_DEATH = 5.0  # a worker that dies sooner than this after its start backs off
BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
BANNER_RE = re.compile(r"pid=(\d+) listening on (\S+(?: \S+)*?) backends=(\d+) balance=(\S+) admin=(\S+)")

# flag dest -> flag, for rebuilding a worker's command line from ours
# every flag that sets a [gateway] key, but the two a worker gets its own way:
# --workers (pinned to 1) and --access-log (a switch or a path, see below)
_VALUE_FLAGS = {dest: flag for dest, (_key, flag) in CLI_GATEWAY.items()
                if dest not in ("workers", "access_log")}


def worker_argv(args: argparse.Namespace, listen: list[str], admin: str, slot: int) -> list[str]:
    """A worker's command line: our flags, with listen, admin and workers pinned."""
    argv = [sys.executable, "-m", "reactor", "gateway"]
    if getattr(args, "config", None):
        argv += ["--config", os.path.abspath(args.config)]
    for spec in getattr(args, "backend", None) or []:
        argv += ["--backend", spec]
    for dest, flag in _VALUE_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            argv += [flag, str(value)]
    access = getattr(args, "access_log", None)
    if access is True:
        argv += ["--access-log"]
    elif access is False:
        argv += ["--no-access-log"]
    elif access is not None:
        argv += ["--access-log", os.path.abspath(access)]
    for addr in listen:
        argv += ["--listen", addr]
    argv += ["--admin", admin, "--workers", "1", "--worker-id", str(slot)]
    return argv


def reserve(host: str, port: int) -> socket.socket:
    """Bind (never listen) with SO_REUSEPORT: the port is ours, workers may
    join it, and this socket takes no connections. Raises OSError."""
    if host in ("", "*"):
        family, addr = _all_interfaces(port)
    else:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("", "*"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


# -- summing statistics ----------------------------------------------------------------

_FIRST = {"weight", "fd_soft_limit", "fd_hard_limit", "time", "monotonic", "pid",
          "ok_streak", "fail_streak", "checked", "address"}
_MAX = {"lag_max", "lag_last", "events_max", "ejected_for", "uptime"}
_MIN = {"start_time"}
_ROW_KEYS = ("name", "address")  # how list rows (backends, listeners) are matched


def sum_stats(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Several workers' ``/stats`` as one: numbers add up (maxima and a few
    per-process facts excepted), booleans are "any", strings come from the
    first worker, list rows are matched by ``name`` (else ``address``)."""
    out = _merge(items, "")
    loop = out.get("loop") if isinstance(out, dict) else None
    if isinstance(loop, dict):
        waits = (loop.get("syscalls") or {}).get("epoll_wait", 0)
        loop["events_per_wait"] = loop.get("events_total", 0) / waits if waits else 0.0
    return out


def _merge(values: list[Any], key: str) -> Any:
    values = [v for v in values if v is not None]
    if not values:
        return None
    first = values[0]
    if isinstance(first, bool):
        return first if key in _FIRST else any(bool(v) for v in values)
    if isinstance(first, int | float):
        nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if key in _FIRST:
            return first
        if key in _MAX:
            return max(nums)
        if key in _MIN:
            return min(nums)
        return sum(nums)
    if isinstance(first, dict):
        keys: dict[str, None] = {}
        for v in values:
            if isinstance(v, dict):
                keys.update(dict.fromkeys(v))
        return {k: _merge([v.get(k) for v in values if isinstance(v, dict)], k) for k in keys}
    if isinstance(first, list):
        rows = [x for v in values if isinstance(v, list) for x in v]
        if rows and all(isinstance(x, dict) for x in rows):
            for rk in _ROW_KEYS:
                if all(rk in x for x in rows):
                    groups: dict[Any, list] = {}
                    for x in rows:
                        groups.setdefault(x[rk], []).append(x)
                    return [_merge(g, key) for g in groups.values()]
        return first
    return first


def fetch_stats(admin: str, timeout: float = 2.0) -> dict[str, Any]:
    """GET http://ADMIN/stats (blocking; the supervisor's admin threads call it)."""
    with urllib.request.urlopen(f"http://{admin}/stats", timeout=timeout) as r:
        return json.loads(r.read())


# -- workers ---------------------------------------------------------------------------


class Worker:
    """One slot: the process currently filling it and what we know of it."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: subprocess.Popen | None = None
        self.pid = 0
        self.started = 0.0
        self.ready = False
        self.admin = ""
        self.backends = 0
        self.balance = ""
        self.restarts = 0
        self.quick_deaths = 0
        self.restart_timer = None
        self._buf = b""
        self._fd = -1

    def as_dict(self) -> dict[str, Any]:
        p = self.proc  # read once: the loop thread may clear it meanwhile
        return {"slot": self.slot, "pid": self.pid, "ready": self.ready, "admin": self.admin or None,
                "restarts": self.restarts, "alive": p is not None and p.returncode is None}


class Supervisor:
    def __init__(self, cfg: Config, args: argparse.Namespace, *, loop: Loop | None = None) -> None:
        self.cfg = cfg
        self.args = args
        self.loop = loop or Loop()
        self.n = cfg.gateway.workers
        self.workers = [Worker(i) for i in range(self.n)]
        self.reservations: list[socket.socket] = []
        self.listen: list[str] = []
        self.phase = "starting"  # -> running -> stopping
        self.terms = 0
        self.exit_code = 0
        self.restarts_total = 0
        self.admin_server: _AdminHTTP | None = None
        self.started = time.time()

    # -- start ----------------------------------------------------------------

    def reserve_ports(self) -> None:
        g = self.cfg.gateway
        for host, port in g.listen:
            try:
                sock = reserve(host, port)
            except OSError as exc:
                self.release_ports()
                raise bind_error("listen", format_address((host or "*", port)), exc) from None
            self.reservations.append(sock)
            bound = sock.getsockname()
            self.listen.append(f":{bound[1]}" if host in ("", "*") else format_address((host, bound[1])))

    def release_ports(self) -> None:
        for s in self.reservations:
            s.close()
        self.reservations = []

    def worker_admin(self) -> str:
        a = self.cfg.admin.listen
        if a is None:
            return "off"
        return ":0" if a[0] == "" else format_address((a[0], 0))

    def spawn(self, w: Worker) -> None:
        w.restart_timer = None
        if self.phase == "stopping":
            return
        argv = worker_argv(self.args, self.listen, self.worker_admin(), w.slot)
        w.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        w.pid = w.proc.pid
        w.started = time.monotonic()
        w.ready = False
        w.admin = ""
        w._buf = b""
        w._fd = w.proc.stdout.fileno()
        os.set_blocking(w._fd, False)
        self.loop.register(w._fd, EPOLLIN, lambda _m, w=w: self._on_stdout(w))
        log.info("event=worker_started slot=%d pid=%d", w.slot, w.pid)

    def _on_stdout(self, w: Worker) -> None:
        try:
            data = os.read(w._fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_stdout(w)
            return
        if w.ready:
            return  # workers print one line; anything else is dropped
        w._buf += data
        line, nl, _ = w._buf.partition(b"\n")
        if not nl:
            return
        m = BANNER_RE.search(line.decode(errors="replace"))
        if not m:
            log.warning("event=worker_bad_banner slot=%d line=%r", w.slot, line[:200])
            return
        w.ready = True
        w.backends = int(m.group(3))
        w.balance = m.group(4)
        w.admin = "" if m.group(5) == "off" else m.group(5)
        log.info("event=worker_ready slot=%d pid=%d admin=%s", w.slot, w.pid, w.admin or "off")
        if self.phase == "starting" and all(x.ready for x in self.workers):
            self.phase = "running"
            self.loop.stop()  # back to run(): print the banner

    def _close_stdout(self, w: Worker) -> None:
        if w._fd >= 0:
            self.loop.unregister(w._fd)
            w._fd = -1
        if w.proc is not None and w.proc.stdout is not None:
            w.proc.stdout.close()

    def _reap(self) -> None:
        for w in self.workers:
            if w.proc is None:
                continue
            rc = w.proc.poll()
            if rc is None:
                continue
            self._close_stdout(w)
            w.proc = None
            self._exited(w, rc)
        if self.phase == "stopping" and all(w.proc is None for w in self.workers):
            self.loop.stop()

    def _exited(self, w: Worker, rc: int) -> None:
        how = f"signal={-rc}" if rc < 0 else f"code={rc}"
        if self.phase == "stopping":
            log.info("event=worker_exited slot=%d pid=%d %s", w.slot, w.pid, how)
            # killed by the forwarded signal before it could install handlers: still a clean stop
            if rc not in (0, -signal.SIGTERM, -signal.SIGINT) and self.exit_code == 0:
                self.exit_code = 1
            return
        if self.phase == "starting" and not w.ready:
            # a worker that cannot start (its own message is on stderr already)
            log.error("event=worker_failed slot=%d pid=%d %s", w.slot, w.pid, how)
            self.exit_code = rc if rc > 0 else 1
            self._stop_all(signal.SIGKILL)
            self.phase = "stopping"
            return
        lived = time.monotonic() - w.started
        w.quick_deaths = w.quick_deaths + 1 if lived < QUICK_DEATH else 0
        delay = 0.0 if w.quick_deaths <= 1 else min(BACKOFF_MIN * 2 ** (w.quick_deaths - 2), BACKOFF_MAX)
        log.warning("event=worker_exited slot=%d pid=%d %s lived=%.1fs restart_in=%.1fs",
                    w.slot, w.pid, how, lived, delay)
        w.restarts += 1
        self.restarts_total += 1
        w.restart_timer = self.loop.call_later(delay, self.spawn, w)

    # -- signals ----------------------------------------------------------------

    def _send(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                try:
                    os.kill(w.pid, sig)
                except ProcessLookupError:
                    pass

    def _stop_all(self, sig: int) -> None:
        for w in self.workers:
            if w.restart_timer is not None:
                self.loop.cancel_timer(w.restart_timer)
                w.restart_timer = None
        self._send(sig)

    def on_hup(self) -> None:
        if self.phase != "running":
            return
        # Each worker re-reads and applies (or rejects) the config itself; we
        # read it too only to say what a reload cannot change here.
        from reactor.commands.gateway import load_config

        try:
            new = load_config(self.args)
        except UsageError:
            pass  # every worker logs the rejection
        else:
            if new.gateway.workers != self.n:
                log.warning("event=reload_ignored key=gateway.workers reason=needs_restart")
        log.info("event=reload_forwarded workers=%d", sum(w.proc is not None for w in self.workers))
        self._send(signal.SIGHUP)

    def on_term(self) -> None:
        self.terms += 1
        if self.terms == 1:
            log.info("event=drain_start workers=%d", self.n)
            self.phase = "stopping"
            self.release_ports()  # a new instance may bind as soon as the workers let go
            if self.admin_server is not None:
                self.admin_server.close()
                self.admin_server = None
        self._stop_all(signal.SIGTERM)
        self._reap()

    def on_int(self) -> None:
        self.phase = "stopping"
        self.release_ports()
        self._stop_all(signal.SIGINT)
        self._reap()

    # -- run ------------------------------------------------------------------------

    def run(self) -> int:
        loop = self.loop
        self.reserve_ports()
        if self.cfg.admin.listen is not None:
            try:
                self.admin_server = _AdminHTTP(self, self.cfg.admin.listen)
            except BaseException:
                self.release_ports()
                raise
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        loop.add_signal_handler(signal.SIGTERM, self.on_term)
        loop.add_signal_handler(signal.SIGINT, self.on_int)
        loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        try:
            for w in self.workers:
                self.spawn(w)
            timer = loop.call_later(READY_TIMEOUT, self._ready_timeout)
            loop.run()
            loop.cancel_timer(timer)
            if self.phase == "running":
                w0 = self.workers[0]
                admin = self.admin_server.name if self.admin_server is not None else "off"
                print(f"reactor gateway: pid={os.getpid()} listening on {' '.join(self.listen)} "
                      f"backends={w0.backends} balance={w0.balance} admin={admin} workers={self.n}",
                      flush=True)
                self._tick()
                loop.run()
            elif self.phase == "stopping" and any(w.proc is not None for w in self.workers):
                loop.run()  # a failed start: wait for the others to go
        finally:
            self._stop_all(signal.SIGKILL)
            for w in self.workers:
                if w.proc is not None:
                    w.proc.wait()
                    self._close_stdout(w)
            self.release_ports()
            if self.admin_server is not None:
                self.admin_server.close()
            loop.close()
        return self.exit_code

    def _ready_timeout(self) -> None:
        if self.phase == "starting":
            log.error("event=workers_not_ready after=%.0fs", READY_TIMEOUT)
            self.exit_code = 1
            self.phase = "stopping"
            self._stop_all(signal.SIGKILL)

    def _tick(self) -> None:
        # SIGCHLD can be coalesced; a slow poll catches anything it missed
        self._reap()
        if self.phase != "stopping":
            self.loop.call_later(1.0, self._tick)

    # -- statistics -----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Every ready worker's /stats, summed (called from an admin thread)."""
        rows, parts = [], []
        for w in list(self.workers):
            row = w.as_dict()
            if w.ready and w.admin:
                try:
                    parts.append(fetch_stats(w.admin))
                    row["stats"] = "ok"
                except (OSError, ValueError) as exc:
                    row["stats"] = f"error: {exc}"
            rows.append(row)
        out = sum_stats(parts) if parts else {}
        out["supervisor"] = {"pid": os.getpid(), "workers": self.n, "restarts": self.restarts_total,
                             "listen": list(self.listen), "phase": self.phase,
                             "uptime": time.time() - self.started}
        out["workers"] = rows
        return out


class _AdminHTTP:
    """The supervisor's admin endpoint: a threaded stdlib HTTP server."""

    def __init__(self, sup: Supervisor, address: tuple[str, int]) -> None:
        host, port = address
        try:
            sock = bind_socket(host, port, backlog=64)
        except OSError as exc:
            raise bind_error("admin", format_address((host or "*", port)), exc) from None
        sock.setblocking(True)
        sup_ref = sup

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    draining = sup_ref.phase == "stopping"
                    return self._send(503 if draining else 200, "text/plain; charset=utf-8",
                                      b"draining\n" if draining else b"ok\n")
                if path == "/stats":
                    body = json.dumps(sup_ref.stats(), indent=1, sort_keys=True).encode() + b"\n"
                    return self._send(200, "application/json", body)
                if path == "/metrics":
                    try:
                        from reactor.admin import render_metrics
                        text = render_metrics(sup_ref.stats())
                    except (ImportError, KeyError, TypeError) as exc:
                        return self._send(500, "text/plain; charset=utf-8", f"{exc}\n".encode())
                    return self._send(200, "text/plain; version=0.0.4; charset=utf-8", text.encode())
                return self._send(404, "text/plain; charset=utf-8", b"not found\n")

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        srv = http.server.ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
        srv.socket.close()
        srv.socket = sock
        srv.address_family = sock.family
        srv.daemon_threads = True
        self.server = srv
        self.name = format_address(sock.getsockname())
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="reactor-supervisor-admin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_supervisor(cfg: Config, args: argparse.Namespace) -> int:
    return Supervisor(cfg, args).run()
