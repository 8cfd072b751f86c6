"""A round-robin TCP proxy on asyncio streams: the way most asyncio code is written.

    python bench/peers/asyncio_streams.py --listen 127.0.0.1:0 --backend 127.0.0.1:9001 ...

Flow control is `await writer.drain()`: a direction stops reading while its writer is
above the transport's high-water mark. EOF half-closes the other side; an error closes both.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import install_uvloop, parse_args, raise_nofile  # noqa: E402


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    raise_nofile()
    rr = itertools.cycle(args.backend)

    async def handle(creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        host, port = next(rr)
        try:
            breader, bwriter = await asyncio.open_connection(host, port)
        except OSError:
            cwriter.transport.abort()
            return
        try:
            await asyncio.gather(pump(creader, bwriter), pump(breader, cwriter))
        finally:
            cwriter.close()
            bwriter.close()

    server = await asyncio.start_server(handle, *args.listen, backlog=4096)
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
