"""Chaos under load: 200 clients stream checksummed data through the gateway
while its backends are killed (SIGKILL) and restarted on the same port.

The property, for every session of every client: it either receives exactly
its own bytes back, in order, or sees its connection closed, having received a
prefix of them. A byte that differs from what that client sent (corrupted,
duplicated, or another client's) fails the test. Each session's payload is
unique random bytes headed by (client, session), so a crossed stream cannot
pass by accident. The gateway must never exit, and afterwards its fds, sockets
and relays return to baseline.

The short run is in `make test`; the 20 s run in `make soak`.
"""

from __future__ import annotations

import errno
import os
import random
import selectors
import signal
import socket
import struct
import threading
import time

import pytest

from tests.faults import (
    Baseline,
    echo_backend,
    fds_cli_json,
    spec,
    start_gateway,
    wait_access,
    write_config,
)

CLIENTS = 200
BACKENDS = 4
WINDOW = 128 * 1024  # bytes a client keeps in flight (sent, not yet echoed)
STALL = 15.0  # seconds without progress before a session counts as hung

# the reasons a relay may end with when its backend is killed under it
CHAOS_REASONS = {"client_eof", "backend_eof", "client_reset", "backend_reset", "connect_failed",
                 "no_backend"}


class Session:
    __slots__ = ("client", "n", "payload", "sent", "got", "last", "eof_sent")

    def __init__(self, client: int, n: int, rng: random.Random) -> None:
        # log-uniform, 16 KiB .. 1 MiB: long enough to be cut mid-stream, few enough
        # sessions that their TIME_WAITs do not swamp the host's /proc/net/tcp
        size = int(2 ** rng.uniform(14, 20))
        self.client, self.n = client, n
        self.payload = struct.pack("!II", client, n) + rng.randbytes(size)
        self.sent = 0
        self.got = 0
        self.last = time.monotonic()
        self.eof_sent = False


class Monkey(threading.Thread):
    """Kills a random backend with SIGKILL, then restarts it on the same port."""

    def __init__(self, spawn, backends: list, seed: int, pause: tuple[float, float]) -> None:
        super().__init__(daemon=True)
        self.spawn = spawn
        self.backends = backends
        self.ports = [b.addr[1] for b in backends]
        self.rng = random.Random(seed)
        self.pause = pause
        self.kills = 0
        self.restarts = 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(*self.pause)):
                i = self.rng.randrange(len(self.backends))
                victim = self.backends[i]
                os.kill(victim.pid, signal.SIGKILL)
                victim.p.wait(5)
                self.kills += 1
                # down for a while: new connections to it are refused meanwhile
                if self.stop.wait(self.rng.uniform(0.0, 0.3)):
                    break
                self.backends[i] = self._restart(self.ports[i])
                self.restarts += 1
        except Exception as exc:  # reported by the test, never silently lost
            self.errors.append(repr(exc))

    def _restart(self, port: int):
        deadline = time.monotonic() + 10
        while True:
            try:
                return echo_backend(self.spawn, port)
            except AssertionError:
                # the port may still be held for an instant by the dying process
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def _config(tmp_path) -> str:
    # Short health intervals and ejections: a killed backend leaves the
    # rotation quickly and a restarted one comes back within a second.
    return write_config(tmp_path / "chaos.toml", """
[gateway]
connect_timeout = 1.0
retries = 3
idle_timeout = 0
[health]
interval = 0.2
timeout = 0.2
rise = 1
fall = 1
max_fails = 1
fail_timeout = 0.5
""")


def run_chaos(spawn, tmp_path, duration: float, seed: int) -> None:
    backends = [echo_backend(spawn) for _ in range(BACKENDS)]
    g = start_gateway(spawn, *(spec(b) for b in backends),
                      extra=("--config", _config(tmp_path), "--balance", "least_conn"))
    base = Baseline(g)
    rng = random.Random(seed)
    monkey = Monkey(spawn, backends, seed, pause=(0.2, 0.6))

    sel = selectors.DefaultSelector()
    live: dict[socket.socket, Session] = {}
    outcome = {"complete": 0, "cut": 0, "refused": 0}
    next_n = [0] * CLIENTS
    bytes_echoed = 0
    started = time.monotonic()
    stop_new = started + duration

    def open_session(client: int) -> None:
        s = socket.socket()
        s.setblocking(False)
        err = s.connect_ex(g.addr)
        assert err in (0, errno.EINPROGRESS), os.strerror(err)
        sess = Session(client, next_n[client], rng)
        next_n[client] += 1
        live[s] = sess
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def end_session(s: socket.socket, sess: Session, how: str) -> None:
        sel.unregister(s)
        s.close()
        del live[s]
        if how == "closed":
            how = "complete" if sess.got == len(sess.payload) else ("cut" if sess.got or sess.sent
                                                                   else "refused")
        outcome[how] += 1
        if time.monotonic() < stop_new:
            open_session(sess.client)

    for c in range(CLIENTS):
        open_session(c)
    monkey.start()
    try:
        while live:
            now = time.monotonic()
            assert now < stop_new + 30, f"{len(live)} sessions still open 30 s after the run"
            assert g.p.poll() is None, f"gateway exited: {g.stderr_text()[-2000:]}"
            if now >= stop_new and not monkey.stop.is_set():
                monkey.stop.set()  # the tail of the run: let in-flight sessions finish
            for key, ev in sel.select(0.5):
                s = key.fileobj
                sess = live[s]
                sess.last = now
                if ev & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        data = None
                    except (ConnectionResetError, BrokenPipeError):
                        end_session(s, sess, "closed")
                        continue
                    if data == b"":
                        end_session(s, sess, "closed")
                        continue
                    if data:
                        end = sess.got + len(data)
                        # the one property: what comes back is our own bytes, in order
                        assert end <= len(sess.payload), (
                            f"client {sess.client} session {sess.n}: {end - len(sess.payload)} "
                            "bytes more than it sent (duplicated or crossed)")
                        assert data == sess.payload[sess.got:end], (
                            f"client {sess.client} session {sess.n}: bytes {sess.got}..{end} differ "
                            "from what it sent (corrupted or crossed)")
                        sess.got = end
                        bytes_echoed += len(data)
                if ev & selectors.EVENT_WRITE and not sess.eof_sent:
                    room = min(len(sess.payload) - sess.sent, sess.got + WINDOW - sess.sent, 65536)
                    if room > 0:
                        try:
                            sess.sent += s.send(sess.payload[sess.sent:sess.sent + room])
                        except BlockingIOError:
                            pass
                        except (ConnectionResetError, BrokenPipeError):
                            end_session(s, sess, "closed")
                            continue
                    if sess.sent == len(sess.payload):
                        # half-close: the echo backend finishes and the relay closes cleanly
                        try:
                            s.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        sess.eof_sent = True
                # write interest only while there is something we may send
                want = selectors.EVENT_READ
                if not sess.eof_sent and sess.sent < sess.got + WINDOW:
                    want |= selectors.EVENT_WRITE
                if sel.get_key(s).events != want:
                    sel.modify(s, want)
            stalled = [x for x in live.values() if now - x.last > STALL]
            assert not stalled, (f"{len(stalled)} sessions made no progress for {STALL}s, e.g. client "
                                 f"{stalled[0].client} sent {stalled[0].sent} got {stalled[0].got}")
    finally:
        monkey.stop.set()
        monkey.join(15)
        for s in list(live):
            s.close()
        sel.close()

    took = time.monotonic() - started
    sessions = sum(outcome.values())
    print(f"\nchaos {duration:.0f}s: {sessions} sessions in {took:.1f}s: {outcome}; "
          f"{bytes_echoed / 2**20:.1f} MiB echoed and checked; {monkey.kills} backend kills, "
          f"{monkey.restarts} restarts")
    assert not monkey.errors, monkey.errors
    # a cycle is a pause, a downtime and a restart (a new process): about a second
    assert monkey.kills >= max(3, duration / 2.5), f"only {monkey.kills} backend kills"
    assert outcome["cut"] > 0, "no session was cut: the chaos did not reach live relays"
    assert outcome["complete"] >= CLIENTS, f"too few sessions completed: {outcome}"
    assert g.p.poll() is None, "the gateway exited"

    # every accepted connection was accounted for: one access line each, and the reasons are
    # the ones a killed backend explains
    records = wait_access(g, sessions)
    assert len(records) == sessions, f"{len(records)} access lines for {sessions} sessions"
    reasons = {r for rec in records for r in rec[5].split(",")}
    assert reasons <= CHAOS_REASONS, reasons

    # afterwards: no relay, no socket but the listener, the same fd count as before
    base.wait_back(timeout=10)
    rows = fds_cli_json(g.pid)
    assert [r for r in rows if r["family"] in ("inet", "inet6") and r["state"] != "LISTEN"] == []


def test_chaos_backends_killed_under_200_clients(spawn, tmp_path):
    run_chaos(spawn, tmp_path, duration=5.0, seed=1)


@pytest.mark.soak
@pytest.mark.timeout(180)
def test_chaos_soak_20s(spawn, tmp_path):
    run_chaos(spawn, tmp_path, duration=20.0, seed=2)
