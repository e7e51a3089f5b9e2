#!/usr/bin/env python3
"""SecantusDB started through its Python API, for the bench's many-watchers scenario.

secantusd-py (the CLI the tests use) caps the server at 1000 connections, and every open
change stream holds one, so 1,000 watchers need a higher cap: this starts
``secantus.server.SecantusDBServer(..., max_connections=N)`` in memory on 127.0.0.1, prints
``LISTENING <port>`` (flushed) once it accepts connections, and serves until SIGTERM/SIGINT.

    .venv/bin/python benches/secantus_server.py --port 0 --max-connections 1200
"""

import argparse
import signal
import sys

from secantus.server import SecantusDBServer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = a free one)")
    ap.add_argument("--max-connections", type=int, required=True)
    args = ap.parse_args()
    server = SecantusDBServer(
        host="127.0.0.1",
        port=args.port,
        storage_path=":memory:",
        enable_test_commands=True,
        max_connections=args.max_connections,
    )

    def stop(signum, frame):
        server.stop()
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    server.start()
    sys.stdout.write(f"LISTENING {server.port}\n")
    sys.stdout.flush()
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
