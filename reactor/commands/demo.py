"""`reactor demo` (what `make run` runs): the gateway and three demo backends
in one loop, so a newcomer sees load balancing work in one command.

Each backend answers every line with its own name and the line, so
``nc 127.0.0.1 8080`` shows who served you; connect again and the round-robin
policy hands you to the next one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from reactor.addr import bind_error
from reactor.commands.gateway import run_gateway, setup_logging
from reactor.config import AdminConfig, BackendConfig, Config, GatewayConfig, parse_address
from reactor.listener import Listener, bind_socket, format_address
from reactor.loop import Loop
from reactor.stream import Stream

NAMES = ("alpha", "beta", "gamma")


class LineNamer:
    """Demo backend protocol: ``hello`` -> ``alpha: hello``, line by line."""

    __slots__ = ("stream", "name", "partial")

    def __init__(self, stream: Stream, name: str) -> None:
        self.stream = stream
        self.name = name.encode()
        self.partial = b""

    def data_received(self, view: memoryview) -> None:
        data = self.partial + bytes(view)
        *lines, self.partial = data.split(b"\n")
        if len(self.partial) > 65536:  # no newline in 64 KiB: answer what we have
            lines.append(self.partial)
            self.partial = b""
        out = b"".join(self.name + b": " + line.rstrip(b"\r") + b"\n" for line in lines)
        if out:
            self.stream.write(out)

    def eof_received(self) -> None:
        if self.partial:
            self.stream.write(self.name + b": " + self.partial + b"\n")
            self.partial = b""
        self.stream.write_eof()

    def eof_sent(self) -> None:
        if self.stream.eof_received:
            self.stream.close()

    def pause_writing(self) -> None:
        self.stream.pause_reading()

    def resume_writing(self) -> None:
        self.stream.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        pass


def attach_demo_backend(loop: Loop, sock, name: str) -> Listener:
    def on_accept(conn, addr) -> None:
        stream = Stream(loop, conn, None, role="backend", start=False)
        stream.start(LineNamer(stream, name))

    return Listener(loop, sock, on_accept)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                   help="gateway address (default 127.0.0.1:8080)")
    p.add_argument("--admin", default="127.0.0.1:9901", metavar="HOST:PORT",
                   help="admin endpoint, or 'off' (default 127.0.0.1:9901)")
    p.add_argument("--balance", default="round_robin",
                   choices=("random", "round_robin", "least_conn", "p2c", "maglev"))


def run(args: argparse.Namespace) -> int:
    setup_logging()
    listen = parse_address(args.listen, what="--listen")
    admin = None if args.admin == "off" else parse_address(args.admin, what="--admin")
    backend_socks = [bind_socket("127.0.0.1", 0) for _ in NAMES]
    backends = tuple(
        BackendConfig(host="127.0.0.1", port=s.getsockname()[1], name=name)
        for name, s in zip(NAMES, backend_socks)
    )
    cfg = Config(gateway=dataclasses.replace(GatewayConfig(), listen=(listen,), balance=args.balance),
                 admin=AdminConfig(listen=admin), backends=backends, source="demo")
    try:
        gw_sock = bind_socket(*listen)
    except OSError as exc:
        for s in backend_socks:
            s.close()
        err = bind_error("--listen", args.listen, exc)
        raise type(err)(f"{err} (another demo running? try --listen 127.0.0.1:0)") from None

    def setup(loop: Loop, gw) -> None:
        for name, s in zip(NAMES, backend_socks):
            attach_demo_backend(loop, s, name)
        addr = gw.addresses[0]
        host, port = addr.rsplit(":", 1)
        lines = ["backends: " + ", ".join(f"{n} {format_address(s.getsockname())}"
                                           for n, s in zip(NAMES, backend_socks)),
                 "try:",
                 f"  nc {host.strip('[]')} {port}{'':16}type a line: the backend that served you answers",
                 f"  reactor fds {os.getpid()}{'':14}this process's fds joined with /proc/net/tcp"]
        if admin is not None:
            a = format_address(admin)
            lines += [f"  reactor stats --admin {a}   the live loop: connections, syscalls, CPU",
                      f"  curl -s {a}/metrics{'':7}Prometheus metrics"]
        lines.append("Ctrl-C stops.")
        text = "\n".join(lines)
        loop.call_soon(lambda: print(text, flush=True))

    return run_gateway(cfg, None, sockets=[gw_sock], banner="reactor demo", extra_setup=setup)
