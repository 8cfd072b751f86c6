"""Many idle connections: held open through the gateway, then all closed.

Each connection is proven live (one echoed byte) before it idles. While they
are open the gateway holds exactly two fds per relay; its RSS growth divided
by the count is the memory an idle connection costs, reported and bounded.
When all are closed, fds, sockets and relays return to baseline.

1,000 connections in `make test`; 10,000 in `make soak` (RLIMIT_NOFILE is
raised for the test and the processes it starts: the gateway needs two fds
per connection).
"""

from __future__ import annotations

import importlib.util
import random
import resource
import socket
import time

import pytest

from tests.faults import Baseline, can_raise_nofile, echo_backend, nofile, spec, start_gateway

# Bound on the gateway's RSS growth per idle connection (client + backend socket,
# two Streams, a Relay). Measured on CPython 3.11 / x86-64: 2.0-2.4 KiB before the
# idle-memory work on main, 0.7-1.2 KiB after it (1,000 and 10,000 connections);
# the bound leaves room for allocator noise and interpreter versions.
RSS_PER_CONN_BOUND = 4 * 1024
BATCH = 256  # connects outstanding at once: below the listen backlog (511)


def open_idle(addr: tuple[str, int], n: int) -> list[socket.socket]:
    """``n`` connections, each with one byte echoed through the gateway."""
    socks: list[socket.socket] = []
    try:
        for start in range(0, n, BATCH):
            batch = [socket.create_connection(addr, timeout=10) for _ in range(min(BATCH, n - start))]
            socks += batch
            for s in batch:
                s.sendall(b"x")
            for s in batch:
                assert s.recv(1) == b"x", "a new connection was not relayed"
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def have_workers() -> bool:
    """`--workers N` (branch ops) is merged: N processes share the port."""
    return importlib.util.find_spec("reactor.supervisor") is not None


def nofile_hard() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def idle_connections(spawn, n: int, timeout: float, workers: int = 1) -> None:
    backend = echo_backend(spawn)
    extra = ("--idle-timeout", "0", "--max-connections", str(2 * n))
    if workers > 1:
        extra += ("--workers", str(workers))
    g = start_gateway(spawn, spec(backend), extra=extra, admin=None if workers == 1 else False)
    # warm up: the first relays allocate what every later one shares (receive buffer,
    # log handler state, the balancer's structures)
    for s in open_idle(g.addr, 50 * workers):
        s.close()
    base = Baseline(g)
    rss0 = base.rss()
    t0 = time.monotonic()
    socks = open_idle(g.addr, n)
    opened = time.monotonic() - t0
    try:
        # exactly two fds per relay: the client's and the backend's
        assert base.fd_count() == base.fds + 2 * n
        rss1 = base.rss()
        per_conn = (rss1 - rss0) / n
        # still live after all were opened: a sample of them echoes again
        for s in random.Random(3).sample(socks, min(100, n)):
            s.sendall(b"again")
            assert s.recv(16) == b"again"
        print(f"\n{n} idle connections (--workers {workers}) opened in {opened:.1f}s: "
              f"gateway RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB, "
              f"{per_conn / 1024:.2f} KiB per idle connection (bound {RSS_PER_CONN_BOUND / 1024:.0f} KiB)")
        assert per_conn <= RSS_PER_CONN_BOUND, f"{per_conn:.0f} bytes per idle connection"
    finally:
        t1 = time.monotonic()
        for s in socks:
            s.close()
    base.wait_back(timeout=timeout)
    print(f"all closed and back to baseline in {time.monotonic() - t1:.1f}s "
          f"(gateway RSS now {base.rss() / 2**20:.1f} MiB)")


def test_1000_idle_connections_memory_bounded_and_released(spawn):
    idle_connections(spawn, 1000, timeout=15)


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_10000_idle_connections_memory_bounded_and_released(spawn):
    """One gateway process needs 2 fds per connection: 20,000 and some. Where the
    hard RLIMIT_NOFILE is lower and cannot be raised (no CAP_SYS_RESOURCE, as in
    some containers), two workers (`--workers 2`, SO_REUSEPORT) share the load."""
    n = 10_000
    need = 2 * n + 1000
    if can_raise_nofile(need):
        with nofile(need):
            idle_connections(spawn, n, timeout=60)
    elif have_workers():
        with nofile(nofile_hard()):
            idle_connections(spawn, n, timeout=60, workers=2)
    else:
        pytest.skip(f"one gateway process needs RLIMIT_NOFILE {need} (hard limit here "
                    f"{nofile_hard()}, cannot be raised), and --workers is not available")


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_idle_connections_up_to_the_fd_limit(spawn):
    """As many idle connections as one gateway process can hold within the hard
    fd limit (10,000 at most; 9,950 where the hard limit is 20,000)."""
    hard = nofile_hard()
    n = min(10_000, (hard - 100) // 2)
    with nofile(min(hard, 2 * n + 1000)):
        idle_connections(spawn, n, timeout=60)
