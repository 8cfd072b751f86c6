"""What one proxied connection costs in syscalls, counted by the loop itself.

The figures are the budget the churn benchmark depends on; each line of the
expected table is a syscall we once made and removed, or the floor:

    epoll_ctl 4   ADD client, ADD backend (connect), MOD backend -> read,
                  MOD client (its EOF); no DEL: close() drops the fd from epoll
    shutdown  1   the second direction ends with close(), which sends the FIN
    getsockopt 0  a connect reported EPOLLOUT without ERR/HUP has succeeded
"""

from __future__ import annotations

import dataclasses
import socket
import threading

from reactor import config as C
from reactor.gateway import Gateway
from reactor.loop import Loop
from tests.backends import ThreadServer

N = 30


def echo_until_eof(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()


def test_one_connection_costs_the_syscall_floor():
    backend = ThreadServer(echo_until_eof)
    loop = Loop()
    cfg = C.Config(
        gateway=dataclasses.replace(C.GatewayConfig(), listen=(("127.0.0.1", 0),), access_log=False),
        admin=C.AdminConfig(listen=None),
        health=dataclasses.replace(C.HealthConfig(), enabled=False),
        backends=(C.BackendConfig(host="127.0.0.1", port=backend.addr[1]),))
    gw = Gateway(loop, cfg)
    gw.start()
    addr = gw.listeners[0].sock.getsockname()
    done = threading.Event()
    after: dict[str, int] = {}

    def check_done() -> None:
        # stopped from a timer, not call_soon_threadsafe: its wake-up read
        # would be one more recv in the count
        if done.is_set():
            after.update(loop.syscalls)
            loop.stop()
        else:
            loop.call_later(0.01, check_done)

    loop.call_soon(check_done)
    t = threading.Thread(target=loop.run, daemon=True)
    before = dict(loop.syscalls)
    t.start()
    try:
        for i in range(N):
            with socket.create_connection(addr, timeout=5) as c:
                c.sendall(b"x")
                c.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := c.recv(16):
                    got += chunk
                assert got == b"x", i
            # the gateway closes its side before the client sees EOF: wait
            # until the relay is gone, so its close is counted in this round
            for _ in range(500):
                if not gw.relays:
                    break
                threading.Event().wait(0.002)
    finally:
        done.set()
        t.join(5)
        counted = {k: (after.get(k, 0) - before.get(k, 0)) / N for k in
                   ("epoll_ctl", "shutdown", "getsockopt", "close", "connect", "socket", "send",
                    "recv", "setsockopt", "ioctl")}
        gw.shutdown()
        loop.close()
        backend.close()
    assert counted == {"epoll_ctl": 4, "shutdown": 1, "getsockopt": 0, "close": 2, "connect": 1,
                       "socket": 1, "send": 2, "recv": 4, "setsockopt": 2, "ioctl": 1}
