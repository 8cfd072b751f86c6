"""`reactor serve`: the seed's first program, on the reactor.

    ln, _ := net.Listen("tcp", ":8080")
    for { conn, _ := ln.Accept(); go handlerConnection(conn) }   // handler: conn.Close()

``--mode close`` does exactly that (accept, then close); ``echo`` sends every
byte back (with backpressure: a client that reads slowly stops our reading
of it); ``discard`` reads and drops. One line on stdout says the pid and the
bound address, so ``--listen 127.0.0.1:0`` is usable from scripts::

    $ reactor serve --listen 127.0.0.1:0 --mode echo
    reactor serve: pid=4242 listening on 127.0.0.1:39017 mode=echo
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from reactor.addr import bind_error
from reactor.config import parse_address
from reactor.listener import Listener, bind_socket, format_address
from reactor.loop import Loop
from reactor.stream import Stream

log = logging.getLogger("reactor.serve")


class Echo:
    """Send back what arrives; stop reading while the client is not reading."""

    __slots__ = ("stream", "conns")

    def __init__(self, stream: Stream, conns: set) -> None:
        self.stream = stream
        self.conns = conns

    def data_received(self, view: memoryview) -> None:
        self.stream.write(view)

    def eof_received(self) -> None:
        self.stream.write_eof()

    def eof_sent(self) -> None:
        if self.stream.eof_received:
            self._done()

    def pause_writing(self) -> None:
        self.stream.pause_reading()

    def resume_writing(self) -> None:
        self.stream.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._done()

    def _done(self) -> None:
        self.stream.close()
        self.conns.discard(self.stream)
        self.stream.detach()  # no cycle left: freed by refcount


class Discard(Echo):
    __slots__ = ()

    def data_received(self, view: memoryview) -> None:
        pass

    def eof_received(self) -> None:
        self._done()


class Server:
    """The listener plus the live streams of one ``reactor serve``."""

    def __init__(self, loop: Loop, sock: socket.socket, mode: str) -> None:
        self.loop = loop
        self.mode = mode
        self.conns: set[Stream] = set()
        self.listener = Listener(loop, sock, self._on_accept)

    def _on_accept(self, conn: socket.socket, addr: tuple) -> None:
        if self.mode == "close":
            conn.close()
            self.loop.syscalls.close += 1
            return
        stream = Stream(self.loop, conn, None, start=False)
        proto = Echo(stream, self.conns) if self.mode == "echo" else Discard(stream, self.conns)
        self.conns.add(stream)
        stream.start(proto)

    def close(self) -> None:
        self.listener.close()
        for s in list(self.conns):
            s.close()
        self.conns.clear()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=":8080", metavar="HOST:PORT",
                   help="address to listen on (default :8080, all interfaces)")
    p.add_argument("--mode", choices=("close", "echo", "discard"), default="close",
                   help="what to do with each connection (default close, like the seed)")
    p.add_argument("--backlog", type=int, default=511, help="listen backlog (default 511)")
    p.add_argument("--reuseport", action="store_true", help="set SO_REUSEPORT")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s",
                        stream=sys.stderr)
    host, port = parse_address(args.listen, what="--listen")
    try:
        sock = bind_socket(host, port, backlog=args.backlog, reuseport=args.reuseport)
    except OSError as exc:
        raise bind_error("--listen", args.listen, exc) from None
    loop = Loop()
    server = Server(loop, sock, args.mode)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, loop.stop)
    print(f"reactor serve: pid={os.getpid()} listening on {format_address(sock.getsockname())} "
          f"mode={args.mode}", flush=True)
    try:
        loop.run()
    finally:
        server.close()
        loop.close()
    return 0

