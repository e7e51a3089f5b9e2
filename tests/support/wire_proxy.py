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

``--client-find``/``--client-replace-hex`` do the same to the client's messages (so a test can
make the server see another stage name), and ``--rate BYTES_PER_SECOND`` slows the server's
replies down (so a test can act while one large reply is still arriving).
``--getmore-batch-size N`` adds ``batchSize: N`` to every ``getMore`` that has none, so that a
server answers one document per reply (the split fragments of one event in separate replies).
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


OP_MSG = 2013


def with_getmore_batch_size(message: bytes, size: int) -> bytes:
    """An OP_MSG ``getMore`` without a batch size, given one; any other message as it is."""
    (length, request_id, response_to, op_code) = struct.unpack("<iiii", message[:16])
    (flags,) = struct.unpack("<I", message[16:20])
    # Only a message without a checksum whose first section is the command body (kind 0).
    if op_code != OP_MSG or flags & 1 or message[20] != 0:
        return message
    (doc_len,) = struct.unpack("<i", message[21:25])
    doc = message[21 : 21 + doc_len]
    if doc[4:13] != b"\x12getMore\x00" or b"\x10batchSize\x00" in doc:
        return message
    doc = doc[:-1] + b"\x10batchSize\x00" + struct.pack("<i", size) + b"\x00"
    doc = struct.pack("<i", len(doc)) + doc[4:]
    rest = message[21 + doc_len :]
    body = message[16:21] + doc + rest
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, op_code) + body


async def pipe_messages(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    find: bytes,
    replace: bytes,
    rate: int = 0,
    getmore_batch_size: int = 0,
) -> None:
    try:
        while True:
            header = await reader.readexactly(4)
            (length,) = struct.unpack("<i", header)
            body = await reader.readexactly(length - 4)
            message = header + body
            if find and find in message:
                message = message.replace(find, replace)
            if getmore_batch_size > 0:
                message = with_getmore_batch_size(message, getmore_batch_size)
            if rate <= 0:
                writer.write(message)
                await writer.drain()
                continue
            chunk = 65536
            for at in range(0, len(message), chunk):
                writer.write(message[at : at + chunk])
                await writer.drain()
                await asyncio.sleep(min(chunk, len(message) - at) / rate)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--upstream", required=True, help="127.0.0.1:PORT")
    ap.add_argument("--find", default="POISON-AB")
    ap.add_argument("--replace-hex", default=b"POISON-\xc3\x28".hex())
    ap.add_argument("--client-find", default="")
    ap.add_argument("--client-replace-hex", default="")
    ap.add_argument("--rate", type=int, default=0, help="reply bytes per second (0: no limit)")
    ap.add_argument("--getmore-batch-size", type=int, default=0)
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    if host != "127.0.0.1":
        raise SystemExit("--upstream must be on 127.0.0.1")
    find = args.find.encode()
    replace = bytes.fromhex(args.replace_hex)
    if len(find) != len(replace):
        raise SystemExit("--find and --replace-hex must have the same length")
    client_find = args.client_find.encode()
    client_replace = bytes.fromhex(args.client_replace_hex)
    if len(client_find) != len(client_replace):
        raise SystemExit("--client-find and --client-replace-hex must have the same length")

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        upstream = (
            pipe_messages(
                client_r,
                server_w,
                client_find,
                client_replace,
                getmore_batch_size=args.getmore_batch_size,
            )
            if client_find or args.getmore_batch_size
            else pipe_raw(client_r, server_w)
        )
        await asyncio.gather(
            upstream,
            pipe_messages(server_r, client_w, find, replace, args.rate),
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
