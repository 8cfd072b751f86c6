"""A round-robin TCP proxy on asyncio protocols and transports (optionally on uvloop).

    python bench/peers/asyncio_protocol.py --listen 127.0.0.1:0 --backend 127.0.0.1:9001 ... [--uvloop]

The fast way to write an asyncio proxy: no coroutine per chunk, `data_received` writes
straight to the other transport. Flow control: when one transport passes its high-water
mark (`pause_writing`), the other side stops reading until it drains (`resume_writing`).
EOF half-closes the other side (`write_eof` after the buffer is flushed); the connection
is closed when both directions are done or either side is lost.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import install_uvloop, parse_args, raise_nofile  # noqa: E402


class Side(asyncio.Protocol):
    """One socket of a proxied pair; `peer` is the other one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.got_eof = False
        self.early: list[bytes] = []  # bytes that came before the peer existed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            # uvloop may deliver data although connection_made paused reading
            self.early.append(data)
            return
        self.peer.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.got_eof = True
        peer = self.peer
        if peer is None:
            return True  # the backend is still being dialled: it gets the EOF then
        if peer.got_eof:
            return False  # both directions done: let asyncio close this side
        if peer.transport.can_write_eof():  # type: ignore[union-attr]
            peer.transport.write_eof()  # type: ignore[union-attr]
        return True  # keep the other direction flowing

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.transport.is_closing():  # type: ignore[union-attr]
            self.peer.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            if exc is None:
                peer.transport.close()  # flushes what is buffered, then closes
            else:
                peer.transport.abort()


class Client(Side):
    backends: itertools.cycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        host, port = next(self.backends)
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(Side, host, port))
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is not None:
            self.transport.abort()  # type: ignore[union-attr]
            return
        _, backend = task.result()
        if self.transport.is_closing():  # type: ignore[union-attr]
            backend.transport.close()
            return
        backend.peer = self
        self.peer = backend
        for data in self.early:
            backend.transport.write(data)
        self.early.clear()
        if self.got_eof:
            backend.transport.write_eof()
        else:
            self.transport.resume_reading()  # type: ignore[union-attr]


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    raise_nofile()
    Client.backends = itertools.cycle(args.backend)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Client, *args.listen, backlog=4096)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        install_uvloop()
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
