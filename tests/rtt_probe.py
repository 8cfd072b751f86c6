"""A well-behaved client in its own process (so the test's own work cannot
delay it): one connection through the gateway, one echo round trip every
INTERVAL seconds, timed, until stdin closes; then one JSON line on stdout.

    python tests/rtt_probe.py HOST PORT INTERVAL SIZE [SOURCE_IP|-] [PREAMBLE_HEX]

Prints "ready" once the first round trip succeeded.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time


def main() -> int:
    host, port, interval, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    source = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    preamble = bytes.fromhex(sys.argv[6]) if len(sys.argv) > 6 else b""
    sock = socket.create_connection((host, port), timeout=10,
                                    source_address=(source, 0) if source else None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if preamble:  # e.g. a PROXY header: not echoed
        sock.sendall(preamble)
    rtts: list[float] = []
    errors: list[str] = []

    def round_trip(i: int) -> None:
        msg = (b"%08d" % i) * max(1, size // 8)
        t0 = time.monotonic()
        sock.sendall(msg)
        got = bytearray()
        while len(got) < len(msg):
            chunk = sock.recv(len(msg) - len(got))
            if not chunk:
                raise ConnectionError("EOF from the gateway")
            got += chunk
        rtts.append(time.monotonic() - t0)
        if got != msg:
            raise AssertionError("echo differs")

    round_trip(0)
    rtts.clear()
    print("ready", flush=True)
    i = 1
    while True:
        r, _, _ = select.select([sys.stdin], [], [], interval)
        if r and not sys.stdin.buffer.read1(1):
            break  # the test closed our stdin: done
        try:
            round_trip(i)
        except (OSError, ConnectionError, AssertionError) as exc:
            errors.append(repr(exc))
            break
        i += 1
    print(json.dumps({"rtts": rtts, "errors": errors}), flush=True)
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
