"""A plain socket holder for tests/test_procnet.py (not a test module).

    python fds_holder.py HOST,LIMIT[,keepalive] ...

For each spec: listen on HOST port 0 (an IPv6 or v4-mapped HOST gives an AF_INET6
socket) and accept up to LIMIT connections, holding them open; with ``keepalive``
the first accepted connection gets SO_KEEPALIVE with TCP_KEEPIDLE=600.  Prints
``listen HOST PORT`` per spec, then ``ready``, then ``accepted HOST PORT TOTAL``
after every accept.  Exits when stdin reaches EOF.
"""

import selectors
import socket
import sys


def main() -> None:
    sel = selectors.DefaultSelector()  # epoll: the table shows an anon_inode:[eventpoll] fd
    held = []  # listeners and accepted connections: closed only at exit
    for spec in sys.argv[1:]:
        host, limit, *flags = spec.split(",")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET6:
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        ls.bind((host, 0))
        ls.listen(128)
        held.append(ls)
        port = ls.getsockname()[1]
        sel.register(ls, selectors.EVENT_READ, (host, port, int(limit), "keepalive" in flags))
        print(f"listen {host} {port}", flush=True)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    print("ready", flush=True)
    counts: dict = {}
    while True:
        for key, _ in sel.select():
            if key.data is None:
                if not sys.stdin.readline():
                    return
                continue
            host, port, limit, keepalive = key.data
            conn, _ = key.fileobj.accept()
            n = counts[port] = counts.get(port, 0) + 1
            if keepalive and n == 1:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 600)
            held.append(conn)
            print(f"accepted {host} {port} {n}", flush=True)
            if n >= limit:  # leave later clients in the accept queue (the LISTEN rx_queue)
                sel.unregister(key.fileobj)


if __name__ == "__main__":
    main()
