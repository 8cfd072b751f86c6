"""Backends the gateway tests control: real sockets on 127.0.0.1, in threads."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable


class ThreadServer:
    """Accepts on 127.0.0.1:0 and runs ``handler(conn)`` in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 128) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.addr = self.sock.getsockname()
        self.handler = handler
        self.conns: list[socket.socket] = []
        self.peers: list[tuple] = []
        self.probes = 0
        self._stop = False
        self._t = threading.Thread(target=self._accept_loop, daemon=True)
        self._t.start()

    @property
    def spec(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.peers.append(peer)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        # The gateway's health checks connect and close at once; they are not
        # traffic, so the handler never sees them.
        r, _, _ = select.select([conn], [], [], 0.05)
        if r:
            try:
                if conn.recv(1, socket.MSG_PEEK) == b"":
                    self.probes += 1
                    conn.close()
                    return
            except OSError:
                conn.close()
                return
        try:
            self.handler(conn)
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def free_port() -> int:
    """A port nobody listens on (bound then released: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
