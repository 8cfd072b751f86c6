"""What the stdlib proxy peers share: argument parsing, address parsing, fd limit."""

from __future__ import annotations

import argparse
import resource


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"address must be HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1", int(port))


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--listen", type=parse_addr, default=("127.0.0.1", 0))
    p.add_argument("--backend", type=parse_addr, action="append", required=True)
    p.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    return p.parse_args(argv)


def raise_nofile() -> None:
    # 10,000 idle client connections are 20,000 fds in a proxy.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def install_uvloop() -> None:
    import uvloop  # noqa: PLC0415 - optional, only with --uvloop

    uvloop.install()
