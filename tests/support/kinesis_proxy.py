#!/usr/bin/env python3
"""Fault-injection HTTP proxy for AWS Kinesis (awsJson1_1) in front of moto.

Standard library only (Python 3.11).

    python kinesis_proxy.py --upstream http://127.0.0.1:MOTO_PORT [--port 0] [-v]

Binds 127.0.0.1:PORT (0 = pick a free port), prints exactly one line
``LISTENING <port>`` to stdout (flushed) once ready; logs go to stderr.

Every request is forwarded verbatim (method, path+query, headers, body) to the
upstream, and the upstream status/headers/body are relayed back.  PutRecords
calls (``X-Amz-Target: Kinesis_20131202.PutRecords``) are subject to the Kinesis
fault rules; ``dynamo_hold`` takes calls of one other operation (mongo-watcher
uses one endpoint for Kinesis and DynamoDB, so its checkpoint writes pass here).

Control API (same port, JSON in/out):

  POST /_proxy/rules   replace the rules (missing keys = defaults), returns rules
  GET  /_proxy/rules   current rules (fail_keys shows remaining counts)
  GET  /_proxy/stats   counters
  POST /_proxy/reset   rules -> defaults, stats -> zero, releases held calls

Rules (defaults shown):

  fail_record_rate  0.0    P(entry is NOT forwarded and reported failed)
  fail_record_code  "ProvisionedThroughputExceededException"
  ack_lost_rate     0.0    P(entry IS forwarded but reported failed)
  fail_call_rate    0.0    P(whole call answered with an error, not forwarded)
  fail_call_status  500    500 InternalFailure / 400 ProvisionedThroughput... /
                           503 ServiceUnavailable / other -> InternalFailure
  delay_ms          0      sleep before handling each PutRecords call
  hold              false  forward, but withhold the reply until hold=false,
                           reset, or client disconnect
  fail_keys         {}     {"PartitionKey": N}: key fails its next N attempts
  fail_shard        null   {"shard": i, "of": n, "rate": p}: P(entry is NOT
                           forwarded and reported failed with fail_record_code)
                           for entries whose key hashes to shard i of n: hash
                           key = MD5(PartitionKey) as a 128-bit big-endian int,
                           shard i covers [i*2^128/n, (i+1)*2^128/n) (how a new
                           stream's range is split evenly; ExplicitHashKey is
                           not considered); the entry's ErrorMessage names
                           its shard as Kinesis does ("Rate exceeded for
                           shard shardId-000000000000 in stream ...")
  shard_limit       null   {"of": n, "records_per_s": r, "bytes_per_s": b}:
                           Kinesis's per-shard write limits (1,000 records/s
                           and 1 MiB/s on AWS) for a stream of n evenly split
                           shards (hash as fail_shard): each shard has a token
                           bucket per limit holding one second's worth, and an
                           entry that would be forwarded but finds either
                           bucket empty is NOT forwarded and reported failed
                           with ProvisionedThroughputExceededException
                           (counted in records_failed and records_throttled).
                           An entry's bytes are its data plus its partition
                           key. bytes_per_s may be null (no byte limit).
  dynamo_hold       null   {"target": "PutItem", "count": 1, "hold_ms": 6000,
                           "then": "answer"}: the next `count` calls whose
                           X-Amz-Target operation is `target` (any service,
                           e.g. DynamoDB_20120810.PutItem) are forwarded, so
                           the upstream applies them, then the answer is
                           withheld for hold_ms and sent ("answer") or the
                           connection is closed without one ("drop"); ends
                           early on reset or client disconnect.  count (default
                           1) counts down in GET /_proxy/rules; hold_ms
                           defaults to 0, then to "answer".
  access_denied     []     ["PutRecords", "GetItem", ...]: every call whose
                           X-Amz-Target operation is listed (any service:
                           Kinesis, DynamoDB, SSM GetParameter; and S3's
                           "PutObject", a path-style PUT /bucket/key, which
                           is answered 403 with S3's XML error, code
                           AccessDenied) is answered
                           as IAM refuses it, without reaching the upstream:
                           HTTP 400, {"__type": "AccessDeniedException",
                           "message": "User: ... is not authorized to perform:
                           <service>:<operation> on resource: <arn> ..."}, as
                           long as the rule stands (until the rules are
                           replaced or reset).  Counted in stats
                           access_denied.
  seed              null   RNG seed (the RNG is re-created on every rules POST)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import html
import json
import random
import select
import socket
import sys
import threading
import time
import urllib.parse
import uuid
import http.client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AMZ_JSON = "application/x-amz-json-1.1"
CONTROL_PREFIX = "/_proxy/"

# Hop-by-hop headers (RFC 7230 6.1) plus the ones we recompute ourselves.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "content-length",
    # Expect: 100-continue is answered by BaseHTTPRequestHandler itself; the
    # body has already been read when we forward, so do not pass it on.
    "expect",
}

DEFAULT_RULES = {
    "fail_record_rate": 0.0,
    "fail_record_code": "ProvisionedThroughputExceededException",
    "ack_lost_rate": 0.0,
    "fail_call_rate": 0.0,
    "fail_call_status": 500,
    "delay_ms": 0,
    "hold": False,
    "fail_keys": {},
    "fail_shard": None,
    "shard_limit": None,
    "dynamo_hold": None,
    "access_denied": [],
    "seed": None,
}

STAT_KEYS = (
    "put_calls",
    "calls_failed",
    "records_forwarded",
    "records_failed",
    "records_ack_lost",
    "records_throttled",
    "held_calls",
    "held_total",
    "other_calls",
    "dynamo_held",
    "access_denied",
)

VERBOSE = False


def log(msg: str) -> None:
    sys.stderr.write(f"[kinesis_proxy {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def vlog(msg: str) -> None:
    if VERBOSE:
        log(msg)


class RuleError(ValueError):
    pass


def validate_rules(raw: object) -> dict:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RuleError("rules body must be a JSON object")
    unknown = set(raw) - set(DEFAULT_RULES)
    if unknown:
        raise RuleError(f"unknown rule keys: {sorted(unknown)}")
    rules = copy.deepcopy(DEFAULT_RULES)
    rules.update(raw)
    for k in ("fail_record_rate", "ack_lost_rate", "fail_call_rate"):
        v = rules[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise RuleError(f"{k} must be a number in [0, 1]")
        rules[k] = float(v)
    if not isinstance(rules["fail_record_code"], str) or not rules["fail_record_code"]:
        raise RuleError("fail_record_code must be a non-empty string")
    st = rules["fail_call_status"]
    if isinstance(st, bool) or not isinstance(st, int) or not 400 <= st <= 599:
        raise RuleError("fail_call_status must be an int in 400..599")
    d = rules["delay_ms"]
    if isinstance(d, bool) or not isinstance(d, (int, float)) or d < 0:
        raise RuleError("delay_ms must be a non-negative number")
    if not isinstance(rules["hold"], bool):
        raise RuleError("hold must be a boolean")
    fk = rules["fail_keys"]
    if fk is None:
        fk = {}
    if not isinstance(fk, dict) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in fk.values()
    ):
        raise RuleError("fail_keys must be an object of {partition_key: non-negative int}")
    rules["fail_keys"] = {str(k): int(n) for k, n in fk.items()}
    fs = rules["fail_shard"]
    if fs is not None:
        if not isinstance(fs, dict) or set(fs) != {"shard", "of", "rate"}:
            raise RuleError('fail_shard must be null or {"shard": i, "of": n, "rate": p}')
        of, shard, rate = fs["of"], fs["shard"], fs["rate"]
        if isinstance(of, bool) or not isinstance(of, int) or of < 1:
            raise RuleError("fail_shard.of must be a positive int")
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < of:
            raise RuleError("fail_shard.shard must be an int in [0, of)")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise RuleError("fail_shard.rate must be a number in [0, 1]")
        rules["fail_shard"] = {"shard": shard, "of": of, "rate": float(rate)}
    sl = rules["shard_limit"]
    if sl is not None:
        if not isinstance(sl, dict) or not {"of", "records_per_s"} <= set(sl) \
                or not set(sl) <= {"of", "records_per_s", "bytes_per_s"}:
            raise RuleError('shard_limit must be null or {"of": n, "records_per_s": r, '
                            '"bytes_per_s": b}')
        of, rps, bps = sl["of"], sl["records_per_s"], sl.get("bytes_per_s")
        if isinstance(of, bool) or not isinstance(of, int) or of < 1:
            raise RuleError("shard_limit.of must be a positive int")
        if isinstance(rps, bool) or not isinstance(rps, (int, float)) or rps <= 0:
            raise RuleError("shard_limit.records_per_s must be a positive number")
        if bps is not None and (isinstance(bps, bool) or not isinstance(bps, (int, float))
                                or bps <= 0):
            raise RuleError("shard_limit.bytes_per_s must be null or a positive number")
        rules["shard_limit"] = {"of": of, "records_per_s": float(rps),
                                "bytes_per_s": None if bps is None else float(bps)}
    seed = rules["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, str))):
        raise RuleError("seed must be null, an int or a string")
    rules["dynamo_hold"] = validate_dynamo_hold(rules["dynamo_hold"])
    ad = rules["access_denied"]
    if ad is None:
        ad = []
    if not isinstance(ad, list) or not all(
        isinstance(op, str) and op and "." not in op for op in ad
    ):
        raise RuleError("access_denied must be a list of operation names such as PutRecords")
    rules["access_denied"] = list(ad)
    return rules


# X-Amz-Target prefixes -> IAM service prefixes, and the request field naming the resource.
SERVICES = {
    "Kinesis_20131202": ("kinesis", "StreamName", "stream/"),
    "DynamoDB_20120810": ("dynamodb", "TableName", "table/"),
    "AmazonSSM": ("ssm", "Name", "parameter"),
}


def access_denied_message(target: str, body: bytes | None) -> str:
    """The words IAM uses when no policy allows the call."""
    prefix, _, op = target.rpartition(".")
    service, field, kind = SERVICES.get(prefix, (prefix.lower() or "aws", "", ""))
    try:
        name = json.loads(body or b"{}").get(field, "") if field else ""
    except (ValueError, AttributeError):
        name = ""
    if kind == "parameter" and not str(name).startswith("/"):
        name = "/" + str(name)
    resource = f"arn:aws:{service}:us-east-1:123456789012:{kind}{name}"
    return (f"User: arn:aws:sts::123456789012:assumed-role/mongo-watcher-task/injected is not "
            f"authorized to perform: {service}:{op} on resource: {resource} because no "
            f"identity-based policy allows the {service}:{op} action")


def validate_dynamo_hold(dh: object) -> dict | None:
    if dh is None:
        return None
    keys = {"target", "count", "hold_ms", "then"}
    if not isinstance(dh, dict) or not set(dh) <= keys or "target" not in dh:
        raise RuleError('dynamo_hold must be null or {"target": op, "count": n, '
                        '"hold_ms": ms, "then": "answer"|"drop"}')
    target, count = dh["target"], dh.get("count", 1)
    hold_ms, then = dh.get("hold_ms", 0), dh.get("then", "answer")
    if not isinstance(target, str) or not target or "." in target:
        raise RuleError("dynamo_hold.target must be an operation name such as PutItem")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise RuleError("dynamo_hold.count must be a non-negative int")
    if isinstance(hold_ms, bool) or not isinstance(hold_ms, (int, float)) or hold_ms < 0:
        raise RuleError("dynamo_hold.hold_ms must be a non-negative number")
    if then not in ("answer", "drop"):
        raise RuleError('dynamo_hold.then must be "answer" or "drop"')
    return {"target": target, "count": count, "hold_ms": hold_ms, "then": then}


def shard_of(partition_key: str, shards: int) -> int:
    """Index of the shard a key lands on in a stream of `shards` evenly split shards."""
    return (int.from_bytes(hashlib.md5(partition_key.encode()).digest(), "big") * shards) >> 128


def throttle_message(shard: int, req: dict) -> str:
    """A throttled entry's ErrorMessage as Kinesis words it, naming the entry's shard."""
    stream = req.get("StreamName") or str(req.get("StreamARN", "")).rsplit("/", 1)[-1]
    return (f"Rate exceeded for shard shardId-{shard:012d} in stream {stream} "
            f"under account 123456789012.")


def entry_bytes(rec: dict) -> int:
    """What a PutRecords entry counts against a shard's byte limit: data plus partition key."""
    data = rec.get("Data")
    size = 0
    if isinstance(data, str):
        size = len(data) * 3 // 4 - data[-2:].count("=")
    return size + len(rec.get("PartitionKey") or "")


class State:
    """Rules, RNG and counters, shared by all handler threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.rules = copy.deepcopy(DEFAULT_RULES)
        self.rng = random.Random()
        self.stats = {k: 0 for k in STAT_KEYS}
        # Bumped whenever held calls must be released (hold -> false, reset).
        self.release_gen = 0
        # shard_limit's buckets: shard index -> [records, bytes, last refill (monotonic s)].
        self.buckets: dict[int, list[float]] = {}

    def take_shard_tokens(self, key: str, size: int) -> bool:
        """shard_limit: whether the key's shard has a record and `size` bytes left this
        second (taking them); call with the lock held."""
        sl = self.rules["shard_limit"]
        now = time.monotonic()
        rps, bps = sl["records_per_s"], sl["bytes_per_s"]
        b = self.buckets.setdefault(shard_of(key, sl["of"]), [rps, bps or 0.0, now])
        elapsed = now - b[2]
        b[0] = min(rps, b[0] + elapsed * rps)
        if bps is not None:
            b[1] = min(bps, b[1] + elapsed * bps)
        b[2] = now
        if b[0] < 1 or (bps is not None and b[1] < size):
            return False
        b[0] -= 1
        if bps is not None:
            b[1] -= size
        return True

    def set_rules(self, rules: dict) -> None:
        with self.cond:
            was_hold = self.rules["hold"]
            self.rules = rules
            self.buckets = {}
            self.rng = random.Random(rules["seed"]) if rules["seed"] is not None else random.Random()
            if was_hold and not rules["hold"]:
                self.release_gen += 1
                self.cond.notify_all()

    def reset(self) -> None:
        with self.cond:
            self.rules = copy.deepcopy(DEFAULT_RULES)
            self.buckets = {}
            self.rng = random.Random()
            held = self.stats["held_calls"]
            self.stats = {k: 0 for k in STAT_KEYS}
            # Still-held threads decrement held_calls when they leave; keep the
            # count of currently held calls so the number never goes negative.
            self.stats["held_calls"] = held
            self.release_gen += 1
            self.cond.notify_all()

    def snapshot_rules(self) -> dict:
        with self.lock:
            return copy.deepcopy(self.rules)

    def snapshot_stats(self) -> dict:
        with self.lock:
            return dict(self.stats)

    def bump(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                self.stats[k] += v


class Upstream:
    def __init__(self, url: str, timeout: float) -> None:
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit(f"--upstream must be http://host:port, got {url!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.netloc = f"{self.host}:{self.port}"
        self.timeout = timeout
        self.local = threading.local()

    def _conn(self, fresh: bool) -> http.client.HTTPConnection:
        c = getattr(self.local, "conn", None)
        if c is None or fresh:
            if c is not None:
                c.close()
            c = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.local.conn = c
        return c

    def request(self, method: str, path: str, headers: list[tuple[str, str]],
                body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send one request; returns (status, reason, headers, body)."""
        last_exc: Exception | None = None
        for attempt in range(2):
            reused = getattr(self.local, "conn", None) is not None and attempt == 0
            conn = self._conn(fresh=attempt > 0)
            try:
                has_host = any(k.lower() == "host" for k, _ in headers)
                conn.putrequest(method, path, skip_host=has_host, skip_accept_encoding=True)
                for k, v in headers:
                    conn.putheader(k, v)
                if body is not None:
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body if body else None)
                resp = conn.getresponse()
                data = resp.read()
                hdrs = resp.getheaders()
                if resp.will_close:
                    conn.close()
                    self.local.conn = None
                return resp.status, resp.reason, hdrs, data
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError, ConnectionAbortedError) as e:
                # A stale keep-alive connection: retry once on a fresh one.
                conn.close()
                self.local.conn = None
                last_exc = e
                if not reused:
                    break
            except Exception:
                conn.close()
                self.local.conn = None
                raise
        assert last_exc is not None
        raise last_exc


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are written separately; with Nagle and delayed ACKs each reply would
    # wait ~40 ms (benches/README.md measured 52 ms per call instead of 9).
    disable_nagle_algorithm = True
    server_version = "kinesis-fault-proxy/1"
    # set on the class by main()
    state: State
    upstream: Upstream

    # ------------------------------------------------------------------ utils
    def log_message(self, format: str, *args) -> None:  # noqa: A002
        vlog(f"{self.address_string()} {format % args}")

    def log_error(self, format: str, *args) -> None:  # noqa: A002
        log(f"{self.address_string()} {format % args}")

    def _read_body(self) -> bytes | None:
        te = self.headers.get("Transfer-Encoding", "")
        if "chunked" in te.lower():
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while True:
                        t = self.rfile.readline(65537)
                        if t in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return b"".join(chunks)
        cl = self.headers.get("Content-Length")
        if cl is not None:
            n = int(cl)
            return self.rfile.read(n) if n > 0 else b""
        return None

    def _forward_headers(self) -> list[tuple[str, str]]:
        conn_tokens = {
            t.strip().lower()
            for v in self.headers.get_all("Connection", []) for t in v.split(",")
        }
        return [
            (k, v) for k, v in self.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in conn_tokens
        ]

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
              reason: str | None = None) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            self.send_header(k, v)
        if self.command != "HEAD" or not any(k.lower() == "content-length" for k, _ in headers):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)
        self.wfile.flush()
        self.log_request(status, len(body))

    def _send_json(self, status: int, obj: object, content_type: str = "application/json",
                   extra: list[tuple[str, str]] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":")).encode()
        hdrs = [("Content-Type", content_type)] + (extra or [])
        self._send(status, hdrs, body)

    def _send_aws_error(self, status: int, type_: str, message: str) -> None:
        self._send_json(status, {"__type": type_, "message": message}, AMZ_JSON,
                        [("x-amzn-ErrorType", type_), ("x-amzn-RequestId", str(uuid.uuid4()))])

    def _relay(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        if self.command == "HEAD":
            out += [(k, v) for k, v in headers if k.lower() == "content-length"]
        self._send(status, out, body, reason)

    def _client_gone(self) -> bool:
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            data = self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            return data == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    # --------------------------------------------------------------- dispatch
    def _handle(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError) as e:
            self.close_connection = True
            self._send_json(400, {"error": f"bad request body: {e}"})
            return
        path = urllib.parse.urlsplit(self.path).path if self.path.startswith("http") else self.path
        if path.startswith(CONTROL_PREFIX):
            self._control(path.split("?", 1)[0], body)
            return
        target = self.headers.get("X-Amz-Target", "")
        if self._deny(target, body):
            return
        if self.command == "POST" and target.endswith(".PutRecords"):
            self._put_records(body or b"")
            return
        self.state.bump(other_calls=1)
        hold = self._take_dynamo_hold(target)
        if hold is not None:
            self._forward_then_withhold(body, hold)
            return
        self._forward_verbatim(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle

    def _forward_verbatim(self, body: bytes | None) -> None:
        try:
            res = self.upstream.request(self.command, self.path, self._forward_headers(), body)
        except Exception as e:  # upstream down etc.
            log(f"upstream error on {self.command} {self.path}: {e!r}")
            self._send_aws_error(502, "InternalFailure", f"proxy upstream error: {e}")
            return
        self._relay(*res)

    # ---------------------------------------------------------- access_denied
    def _s3_put_object(self) -> str | None:
        """`bucket/key` when the request is S3's PutObject in path style (`PUT /bucket/key`,
        no `X-Amz-Target`, not a copy); None otherwise."""
        if self.command != "PUT" or "X-Amz-Target" in self.headers \
                or "x-amz-copy-source" in self.headers:
            return None
        path = urllib.parse.urlsplit(self.path).path
        bucket, _, key = path.lstrip("/").partition("/")
        return f"{bucket}/{key}" if bucket and key else None

    def _deny(self, target: str, body: bytes | None) -> bool:
        """Answers the call as IAM refuses it when the access_denied rule names its operation."""
        s3_object = self._s3_put_object() if not target else None
        op = "PutObject" if s3_object else target.rsplit(".", 1)[-1]
        st = self.state
        with st.lock:
            if not op or op not in st.rules["access_denied"]:
                return False
            st.stats["access_denied"] += 1
        vlog(f"{target or 'S3 PutObject ' + str(s3_object)}: access denied (injected)")
        if s3_object:
            # S3 answers 403 with an XML error, code `AccessDenied` (no suffix).
            message = (f"User: arn:aws:sts::123456789012:assumed-role/mongo-watcher-task/injected "
                       f"is not authorized to perform: s3:PutObject on resource: "
                       f"\"arn:aws:s3:::{s3_object}\" because no identity-based policy allows "
                       f"the s3:PutObject action")
            request_id = uuid.uuid4().hex[:16].upper()
            xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                   f"<Message>{html.escape(message)}</Message><RequestId>{request_id}</RequestId>"
                   f"</Error>").encode()
            self._send(403, [("Content-Type", "application/xml"),
                             ("x-amz-request-id", request_id)], xml)
            return True
        self._send_aws_error(400, "AccessDeniedException", access_denied_message(target, body))
        return True

    # ------------------------------------------------------------ dynamo_hold
    def _take_dynamo_hold(self, target: str) -> dict | None:
        """Claims one call of the dynamo_hold rule when `target` names its operation."""
        st = self.state
        op = target.rsplit(".", 1)[-1]
        with st.lock:
            rule = st.rules["dynamo_hold"]
            if rule is None or rule["count"] <= 0 or op != rule["target"]:
                return None
            rule["count"] -= 1
            st.stats["dynamo_held"] += 1
            return dict(rule)

    def _forward_then_withhold(self, body: bytes | None, rule: dict) -> None:
        """Forwards the call (the upstream applies it), then withholds the answer: the client
        cannot know whether its call took effect."""
        st = self.state
        try:
            res = self.upstream.request(self.command, self.path, self._forward_headers(), body)
        except Exception as e:  # upstream down etc.
            log(f"upstream error on held {rule['target']}: {e!r}")
            self._send_aws_error(502, "InternalFailure", f"proxy upstream error: {e}")
            return
        vlog(f"{rule['target']}: applied upstream ({res[0]}); withholding the answer "
             f"{rule['hold_ms']} ms, then {rule['then']}")
        deadline = time.monotonic() + rule["hold_ms"] / 1000.0
        with st.cond:
            gen = st.release_gen
        gone = False
        while True:
            with st.cond:
                left = deadline - time.monotonic()
                if left <= 0 or st.release_gen != gen:
                    break
                st.cond.wait(min(left, 0.05))
            if self._client_gone():
                gone = True
                break
        if gone or rule["then"] == "drop":
            # Closing without a response: the client sees the connection end mid-call.
            vlog(f"{rule['target']}: {'client gone' if gone else 'dropping the connection'}")
            self.close_connection = True
            return
        try:
            self._relay(*res)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # ---------------------------------------------------------------- control
    def _control(self, path: str, body: bytes | None) -> None:
        st = self.state
        if path == "/_proxy/rules" and self.command in ("POST", "PUT"):
            try:
                raw = json.loads(body) if body else {}
                rules = validate_rules(raw)
            except (ValueError, RuleError) as e:
                self._send_json(400, {"error": str(e)})
                return
            st.set_rules(rules)
            log(f"rules set: {json.dumps(rules, sort_keys=True)}")
            self._send_json(200, st.snapshot_rules())
        elif path == "/_proxy/rules" and self.command in ("GET", "HEAD"):
            self._send_json(200, st.snapshot_rules())
        elif path == "/_proxy/stats" and self.command in ("GET", "HEAD"):
            self._send_json(200, st.snapshot_stats())
        elif path == "/_proxy/reset" and self.command == "POST":
            st.reset()
            log("reset")
            self._send_json(200, {"rules": st.snapshot_rules(), "stats": st.snapshot_stats()})
        else:
            self._send_json(404, {"error": f"unknown control endpoint {self.command} {path}"})

    # ------------------------------------------------------------ PutRecords
    def _put_records(self, body: bytes) -> None:
        st = self.state
        try:
            req = json.loads(body)
            records = req["Records"]
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("Records is not a list of objects")
        except (ValueError, KeyError, TypeError):
            # Not JSON (e.g. CBOR) or unexpected shape: forward untouched.
            st.bump(other_calls=1)
            self._forward_verbatim(body)
            return

        with st.lock:
            st.stats["put_calls"] += 1
            rules = st.rules
            delay_ms = rules["delay_ms"]
            code = rules["fail_record_code"]
            fail_call = rules["fail_call_rate"] > 0 and st.rng.random() < rules["fail_call_rate"]
            fail_status = rules["fail_call_status"]
            # per entry: "ok" | "fail" (not forwarded) | "lost" (forwarded, reported failed)
            fate: list[str] = []
            # Index of the shard named in a throttled entry's message (fail_shard, shard_limit).
            throttled_shard: dict[int, int] = {}
            fail_shard = rules["fail_shard"]
            if not fail_call:
                for rec in records:
                    key = rec.get("PartitionKey")
                    if isinstance(key, str) and rules["fail_keys"].get(key, 0) > 0:
                        rules["fail_keys"][key] -= 1
                        fate.append("fail")
                    elif fail_shard is not None and isinstance(key, str) \
                            and shard_of(key, fail_shard["of"]) == fail_shard["shard"] \
                            and st.rng.random() < fail_shard["rate"]:
                        throttled_shard[len(fate)] = fail_shard["shard"]
                        fate.append("fail")
                    elif rules["fail_record_rate"] > 0 and st.rng.random() < rules["fail_record_rate"]:
                        fate.append("fail")
                    elif rules["shard_limit"] is not None and isinstance(key, str) \
                            and not st.take_shard_tokens(key, entry_bytes(rec)):
                        throttled_shard[len(fate)] = shard_of(key, rules["shard_limit"]["of"])
                        fate.append("fail")
                        st.stats["records_throttled"] += 1
                    elif rules["ack_lost_rate"] > 0 and st.rng.random() < rules["ack_lost_rate"]:
                        fate.append("lost")
                    else:
                        fate.append("ok")

        if delay_ms:
            time.sleep(delay_ms / 1000.0)

        if fail_call:
            st.bump(calls_failed=1)
            type_, msg = {
                400: ("ProvisionedThroughputExceededException", "Rate exceeded (injected)"),
                503: ("ServiceUnavailable", "injected"),
            }.get(fail_status, ("InternalFailure", "injected"))
            vlog(f"PutRecords: injected call failure {fail_status} {type_}")
            self._send_aws_error(fail_status, type_, msg)
            return

        fwd_idx = [i for i, f in enumerate(fate) if f != "fail"]
        result_entries: list[dict | None] = [None] * len(records)
        top: dict = {}
        request_id = None
        if fwd_idx:
            sub = dict(req)
            sub["Records"] = [records[i] for i in fwd_idx]
            sub_body = json.dumps(sub, separators=(",", ":")).encode()
            try:
                status, reason, hdrs, data = self.upstream.request(
                    "POST", self.path, self._forward_headers(), sub_body)
            except Exception as e:
                log(f"upstream error on PutRecords: {e!r}")
                self._send_aws_error(502, "InternalFailure", f"proxy upstream error: {e}")
                return
            if status != 200:
                vlog(f"PutRecords: upstream returned {status}, relaying")
                self._hold_then(lambda: self._relay(status, reason, hdrs, data))
                return
            try:
                resp = json.loads(data)
                up_entries = resp["Records"]
                if len(up_entries) != len(fwd_idx):
                    raise ValueError("upstream Records length mismatch")
            except (ValueError, KeyError, TypeError) as e:
                log(f"PutRecords: cannot parse upstream response ({e}); relaying verbatim")
                self._hold_then(lambda: self._relay(status, reason, hdrs, data))
                return
            top = {k: v for k, v in resp.items() if k not in ("Records", "FailedRecordCount")}
            for i, ent in zip(fwd_idx, up_entries):
                result_entries[i] = ent
            request_id = next((v for k, v in hdrs if k.lower() == "x-amzn-requestid"), None)

        out_entries = []
        n_fail = n_lost = 0
        for i, f in enumerate(fate):
            if f == "fail":
                n_fail += 1
                shard = throttled_shard.get(i)
                message = "injected"
                if shard is not None and code == "ProvisionedThroughputExceededException":
                    message = throttle_message(shard, req)
                out_entries.append({"ErrorCode": code, "ErrorMessage": message})
            elif f == "lost":
                n_lost += 1
                out_entries.append({"ErrorCode": code, "ErrorMessage": "injected"})
            else:
                out_entries.append(result_entries[i])
        failed_count = sum(1 for e in out_entries if e.get("ErrorCode"))
        st.bump(records_forwarded=len(fwd_idx), records_failed=n_fail, records_ack_lost=n_lost)
        if n_fail or n_lost:
            vlog(f"PutRecords: {len(records)} entries, {n_fail} failed, {n_lost} ack-lost")
        out = {"FailedRecordCount": failed_count, "Records": out_entries}
        out.update(top)
        extra = [("x-amzn-RequestId", request_id or str(uuid.uuid4()))]
        self._hold_then(lambda: self._send_json(200, out, AMZ_JSON, extra))

    def _hold_then(self, send) -> None:
        st = self.state
        with st.cond:
            if not st.rules["hold"]:
                held = False
            else:
                held = True
                gen = st.release_gen
                st.stats["held_calls"] += 1
                st.stats["held_total"] += 1
        if held:
            vlog("PutRecords: holding response")
            gone = False
            try:
                while True:
                    with st.cond:
                        if not st.rules["hold"] or st.release_gen != gen:
                            break
                        st.cond.wait(0.05)
                    if self._client_gone():
                        gone = True
                        break
            finally:
                with st.cond:
                    st.stats["held_calls"] -= 1
            if gone:
                vlog("PutRecords: client disconnected while held; dropping response")
                self.close_connection = True
                return
        try:
            send()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def main(argv: list[str] | None = None) -> None:
    global VERBOSE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstream", required=True, help="http://127.0.0.1:MOTO_PORT")
    ap.add_argument("--port", type=int, default=0, help="listen port on 127.0.0.1 (0 = free port)")
    ap.add_argument("--upstream-timeout", type=float, default=120.0)
    ap.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    args = ap.parse_args(argv)
    VERBOSE = args.verbose

    upstream = Upstream(args.upstream, args.upstream_timeout)
    if upstream.host != "127.0.0.1":
        raise SystemExit("--upstream must be on 127.0.0.1")
    ProxyHandler.state = State()
    ProxyHandler.upstream = upstream
    srv = Server(("127.0.0.1", args.port), ProxyHandler)
    port = srv.server_address[1]
    log(f"proxying 127.0.0.1:{port} -> {upstream.netloc}")
    sys.stdout.write(f"LISTENING {port}\n")
    sys.stdout.flush()
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
