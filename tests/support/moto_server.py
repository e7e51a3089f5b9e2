#!/usr/bin/env python3
"""moto_server with Kinesis made safe for concurrent PutRecords calls.

moto's Kinesis ``Shard.put_record`` says of itself "this function is not safe for
concurrency": two PutRecords calls served at once by moto's threaded server can compute the
same sequence number for a shard, and one record silently replaces the other while both calls
report success. Real Kinesis has no such race, and mongo-watcher sends several calls at once
(``max_in_flight``), so the end-to-end tests and local runs start moto through this shim,
which serialises appends to a shard. Everything else is moto's own ``moto_server``.

    python moto_server.py -H 127.0.0.1 -p PORT
"""

import sys
import threading

from moto.kinesis import models
from moto.server import main

_append_lock = threading.Lock()
_put_record = models.Shard.put_record


def _locked_put_record(self, *args, **kwargs):
    with _append_lock:
        return _put_record(self, *args, **kwargs)


models.Shard.put_record = _locked_put_record

if __name__ == "__main__":
    sys.exit(main())
