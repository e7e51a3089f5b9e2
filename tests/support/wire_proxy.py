#!/usr/bin/env python3
"""MongoDB wire-protocol proxy that corrupts strings in the server's replies.

Standard library only.

    python wire_proxy.py --upstream 127.0.0.1:MONGO_PORT --find POISON-AB --replace-hex 504f49534f4e2dc328

Binds 127.0.0.1 on a free port, prints one line ``LISTENING <port>`` once ready, and forwards
every connection to the upstream. Client-to-server bytes pass untouched. Server-to-client
bytes are read one whole wire message at a time (the first four bytes of each are its length),
and every occurrence of ``--find`` in a message is replaced by the bytes of ``--replace-hex``,
which must have the same length so that no length field changes. With the default replacement,
``POISON-AB`` becomes ``POISON-`` followed by 0xC3 0x28, an invalid UTF-8 sequence: MongoDB
can hold such strings (older drivers wrote them), SecantusDB refuses to store them, so a test
makes them on the wire.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import sys


async def pipe_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def pipe_messages(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, find: bytes, replace: bytes
) -> None:
    try:
        while True:
            header = await reader.readexactly(4)
            (length,) = struct.unpack("<i", header)
            body = await reader.readexactly(length - 4)
            message = header + body
            if find in message:
                message = message.replace(find, replace)
            writer.write(message)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True, help="127.0.0.1:PORT")
    ap.add_argument("--find", default="POISON-AB")
    ap.add_argument("--replace-hex", default=b"POISON-\xc3\x28".hex())
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    if host != "127.0.0.1":
        raise SystemExit("--upstream must be on 127.0.0.1")
    find = args.find.encode()
    replace = bytes.fromhex(args.replace_hex)
    if len(find) != len(replace):
        raise SystemExit("--find and --replace-hex must have the same length")

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(
            pipe_raw(client_r, server_w),
            pipe_messages(server_r, client_w, find, replace),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    listen_port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"LISTENING {listen_port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
