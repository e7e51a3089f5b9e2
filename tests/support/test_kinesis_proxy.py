#!/usr/bin/env python3
"""End-to-end check of kinesis_proxy.py against a real moto server, via boto3.

Run with the project venv (needs moto[server] + boto3):

    /work/main/.venv/bin/python tests/support/test_kinesis_proxy.py

Also collectable by pytest (single test function ``test_kinesis_proxy``).
Starts moto_server on a free 127.0.0.1 port and the proxy in front of it, and
stops both at the end.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = os.path.join(HERE, "kinesis_proxy.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_moto_server() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "moto_server")
    if os.path.exists(cand):
        return cand
    found = shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server not found (use the venv python)")
    return found


class Env:
    def __init__(self) -> None:
        import boto3
        from botocore.config import Config

        self.moto_port = free_port()
        self.moto = subprocess.Popen(
            [find_moto_server(), "-H", "127.0.0.1", "-p", str(self.moto_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.moto_port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or self.moto.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.1)
        self.proxy = subprocess.Popen(
            [sys.executable, PROXY, "--upstream", f"http://127.0.0.1:{self.moto_port}", "--port", "0"],
            stdout=subprocess.PIPE, stderr=None, text=True)
        line = self.proxy.stdout.readline().strip()
        assert line.startswith("LISTENING "), line
        self.port = int(line.split()[1])
        self.base = f"http://127.0.0.1:{self.port}"

        def client(read_timeout: float = 30):
            return boto3.client(
                "kinesis", endpoint_url=self.base, region_name="us-east-1",
                aws_access_key_id="testing", aws_secret_access_key="testing",
                config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                              read_timeout=read_timeout, connect_timeout=5))
        self.client = client
        self.kin = client()

    def close(self) -> None:
        for p in (self.proxy, self.moto):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    # control API
    def ctl(self, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def rules(self, **kw) -> dict:
        st, body = self.ctl("POST", "/_proxy/rules", kw)
        assert st == 200, body
        return body

    def stats(self) -> dict:
        return self.ctl("GET", "/_proxy/stats")[1]

    def reset(self) -> None:
        assert self.ctl("POST", "/_proxy/reset")[0] == 200

    # kinesis helpers
    def new_stream(self, name: str) -> None:
        self.kin.create_stream(StreamName=name, ShardCount=2)
        self.kin.get_waiter("stream_exists").wait(StreamName=name,
                                                  WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})

    def read_all(self, name: str) -> list[bytes]:
        out = []
        shards = self.kin.list_shards(StreamName=name)["Shards"]
        assert len(shards) == 2
        for sh in shards:
            it = self.kin.get_shard_iterator(StreamName=name, ShardId=sh["ShardId"],
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
            while it:
                r = self.kin.get_records(ShardIterator=it, Limit=1000)
                out += [rec["Data"] for rec in r["Records"]]
                if not r["Records"]:
                    break
                it = r.get("NextShardIterator")
        return out


def recs(prefix: str, n: int, key: str | None = None) -> list[dict]:
    return [{"Data": f"{prefix}-{i}".encode(), "PartitionKey": key or f"pk-{i}"} for i in range(n)]


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)
    print(f"  ok: {msg}")


def run(env: Env) -> None:
    from botocore.exceptions import ClientError, ReadTimeoutError

    kin = env.kin

    print("pass-through")
    env.new_stream("s-pass")
    check(any(s == "s-pass" for s in kin.list_streams()["StreamNames"]), "list_streams via proxy")
    r = kin.put_records(StreamName="s-pass", Records=recs("pass", 20))
    check(r["FailedRecordCount"] == 0 and len(r["Records"]) == 20, "no failures without rules")
    check(all("SequenceNumber" in e and "ShardId" in e for e in r["Records"]), "seq/shard present")
    check(sorted(env.read_all("s-pass")) == sorted(d["Data"] for d in recs("pass", 20)),
          "all 20 records readable")
    shard_ids = {e["ShardId"] for e in r["Records"]}
    check(len(shard_ids) == 2, "records spread over both shards")
    # StreamARN form also passes through
    arn = kin.describe_stream_summary(StreamName="s-pass")["StreamDescriptionSummary"]["StreamARN"]
    r = kin.put_records(StreamARN=arn, Records=recs("arn", 3))
    check(r["FailedRecordCount"] == 0, "put_records by StreamARN")
    st = env.stats()
    check(st["put_calls"] == 2 and st["records_forwarded"] == 23 and st["other_calls"] > 0,
          f"stats {st}")

    for code in ("ProvisionedThroughputExceededException", "InternalFailure"):
        print(f"fail_record_rate=0.5 code={code}")
        env.reset()
        name = f"s-frr-{code[:8]}"
        env.new_stream(name)
        env.rules(fail_record_rate=0.5, fail_record_code=code, seed=1234)
        batch = recs("frr", 40)
        r = kin.put_records(StreamName=name, Records=batch)
        failed = [b["Data"] for b, e in zip(batch, r["Records"]) if "ErrorCode" in e]
        okd = [b["Data"] for b, e in zip(batch, r["Records"]) if "ErrorCode" not in e]
        check(0 < r["FailedRecordCount"] < 40 and r["FailedRecordCount"] == len(failed),
              f"FailedRecordCount={r['FailedRecordCount']}")
        check(all(e["ErrorCode"] == code and e["ErrorMessage"] == "injected"
                  for e in r["Records"] if "ErrorCode" in e), "ErrorCode/ErrorMessage")
        check(all("SequenceNumber" in e for e in r["Records"] if "ErrorCode" not in e),
              "successful entries keep SequenceNumber")
        check(sorted(env.read_all(name)) == sorted(okd), "exactly the non-failed records landed")
        st = env.stats()
        check(st["records_failed"] == len(failed) and st["records_forwarded"] == len(okd), f"stats {st}")
        # reproducibility: same seed -> same failure pattern
        env.rules(fail_record_rate=0.5, fail_record_code=code, seed=1234)
        r2 = kin.put_records(StreamName=name, Records=batch)
        check([("ErrorCode" in e) for e in r2["Records"]] == [("ErrorCode" in e) for e in r["Records"]],
              "same seed -> same pattern")

    print("fail_record_rate=1.0 (nothing forwarded)")
    env.reset()
    env.new_stream("s-allfail")
    env.rules(fail_record_rate=1.0)
    r = kin.put_records(StreamName="s-allfail", Records=recs("allfail", 5))
    check(r["FailedRecordCount"] == 5, "all 5 failed")
    check(env.read_all("s-allfail") == [], "nothing landed")
    check(env.stats()["records_forwarded"] == 0, "nothing forwarded")

    print("ack_lost_rate")
    env.reset()
    env.new_stream("s-ack")
    env.rules(ack_lost_rate=1.0)
    batch = recs("ack", 6)
    r = kin.put_records(StreamName="s-ack", Records=batch)
    check(r["FailedRecordCount"] == 6, "all reported failed")
    check(sorted(env.read_all("s-ack")) == sorted(b["Data"] for b in batch), "but all landed")
    # client resends -> duplicates
    env.rules()
    kin.put_records(StreamName="s-ack", Records=batch)
    data = env.read_all("s-ack")
    check(len(data) == 12 and len(set(data)) == 6, "resend produces duplicates")
    st = env.stats()
    check(st["records_ack_lost"] == 6 and st["records_forwarded"] == 12, f"stats {st}")
    # mixed with fail_record_rate
    env.reset()
    env.new_stream("s-mix")
    env.rules(fail_record_rate=0.3, ack_lost_rate=0.3, seed=7)
    batch = recs("mix", 50)
    r = kin.put_records(StreamName="s-mix", Records=batch)
    st = env.stats()
    landed = sorted(env.read_all("s-mix"))
    ok_reported = [b["Data"] for b, e in zip(batch, r["Records"]) if "ErrorCode" not in e]
    check(st["records_failed"] > 0 and st["records_ack_lost"] > 0, f"both kinds occurred {st}")
    check(r["FailedRecordCount"] == st["records_failed"] + st["records_ack_lost"], "count = fail+lost")
    check(len(landed) == 50 - st["records_failed"] and set(ok_reported) <= set(landed),
          "landed = ok + ack-lost")

    print("fail_keys")
    env.reset()
    env.new_stream("s-keys")
    env.rules(fail_keys={"k1": 2})
    results = []
    for attempt in range(4):
        r = kin.put_records(StreamName="s-keys", Records=[
            {"Data": f"k1-{attempt}".encode(), "PartitionKey": "k1"},
            {"Data": f"k2-{attempt}".encode(), "PartitionKey": "k2"}])
        results.append(["ErrorCode" in e for e in r["Records"]])
    check(results == [[True, False], [True, False], [False, False], [False, False]],
          f"k1 fails exactly 2 attempts: {results}")
    check(sorted(env.read_all("s-keys")) == sorted([b"k1-2", b"k1-3"] + [f"k2-{i}".encode() for i in range(4)]),
          "landed records match")
    check(env.ctl("GET", "/_proxy/rules")[1]["fail_keys"] == {"k1": 0}, "countdown visible")

    print("fail_call_status")
    env.reset()
    env.new_stream("s-call")
    for status, code in ((500, "InternalFailure"), (400, "ProvisionedThroughputExceededException"),
                         (503, "ServiceUnavailable")):
        env.rules(fail_call_rate=1.0, fail_call_status=status)
        try:
            kin.put_records(StreamName="s-call", Records=recs("call", 3))
            raise AssertionError("expected ClientError")
        except ClientError as e:
            check(e.response["ResponseMetadata"]["HTTPStatusCode"] == status
                  and e.response["Error"]["Code"] == code, f"{status} -> {code}")
    check(env.read_all("s-call") == [], "nothing landed")
    st = env.stats()
    check(st["calls_failed"] == 3 and st["put_calls"] == 3, f"stats {st}")

    print("delay_ms")
    env.rules(delay_ms=300)
    t = time.time()
    kin.put_records(StreamName="s-call", Records=recs("delay", 1))
    check(time.time() - t >= 0.3, "delayed >= 300ms")

    print("hold (client times out)")
    env.reset()
    env.new_stream("s-hold")
    env.rules(hold=True)
    short = env.client(read_timeout=1)
    t = time.time()
    try:
        short.put_records(StreamName="s-hold", Records=recs("hold", 4))
        raise AssertionError("expected read timeout")
    except ReadTimeoutError:
        check(time.time() - t < 5, "client read timeout while held")
    check(sorted(env.read_all("s-hold")) == sorted(b["Data"] for b in recs("hold", 4)),
          "held records are readable")
    deadline = time.time() + 5
    while env.stats()["held_calls"] and time.time() < deadline:
        time.sleep(0.05)
    check(env.stats()["held_calls"] == 0, "held call dropped after client disconnect")

    print("hold (released)")
    box = {}

    def bg():
        box["r"] = env.client().put_records(StreamName="s-hold", Records=recs("rel", 2))
    th = threading.Thread(target=bg)
    th.start()
    deadline = time.time() + 5
    while env.stats()["held_calls"] != 1 and time.time() < deadline:
        time.sleep(0.05)
    check(env.stats()["held_calls"] == 1, "one call held")
    time.sleep(0.3)
    check("r" not in box, "response withheld")
    env.rules(hold=False)
    th.join(5)
    check(box.get("r", {}).get("FailedRecordCount") == 0, "released with real response")

    print("hold (released by reset)")
    env.rules(hold=True)
    box.clear()
    th = threading.Thread(target=bg)
    th.start()
    deadline = time.time() + 5
    while env.stats()["held_calls"] != 1 and time.time() < deadline:
        time.sleep(0.05)
    env.reset()
    th.join(5)
    check(box.get("r", {}).get("FailedRecordCount") == 0, "reset releases hold")

    print("reset")
    env.rules(fail_record_rate=1.0, hold=False, fail_keys={"x": 1})
    kin.put_records(StreamName="s-hold", Records=recs("x", 1))
    env.reset()
    st = env.stats()
    check(all(v == 0 for v in st.values()), f"stats zero {st}")
    st_, rules = env.ctl("GET", "/_proxy/rules")
    check(rules["fail_record_rate"] == 0.0 and rules["fail_keys"] == {} and rules["hold"] is False,
          "rules default")
    r = kin.put_records(StreamName="s-hold", Records=recs("after", 3))
    check(r["FailedRecordCount"] == 0, "no failures after reset")

    print("control API errors / raw HTTP")
    check(env.ctl("POST", "/_proxy/rules", {"fail_record_rat": 1})[0] == 400, "unknown key -> 400")
    check(env.ctl("POST", "/_proxy/rules", {"fail_record_rate": 2})[0] == 400, "bad rate -> 400")
    check(env.ctl("GET", "/_proxy/nope")[0] == 404, "unknown endpoint -> 404")
    c = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    hdr = {"Content-Type": "application/x-amz-json-1.1",
           "X-Amz-Target": "Kinesis_20131202.PutRecords",
           "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/kinesis/aws4_request, "
                            "SignedHeaders=host, Signature=00"}
    before = env.stats()["other_calls"]
    c.request("POST", "/", body=b"\x00not json", headers=hdr)
    resp = c.getresponse()
    resp.read()
    check(resp.status >= 400 and env.stats()["other_calls"] == before + 1,
          f"non-JSON PutRecords forwarded verbatim (upstream said {resp.status})")
    # same connection reused (keep-alive), chunked request body
    hdr["X-Amz-Target"] = "Kinesis_20131202.ListStreams"
    c.request("POST", "/", body=iter([b"{", b"}"]), headers=hdr, encode_chunked=True)
    resp = c.getresponse()
    body = json.loads(resp.read())
    check(resp.status == 200 and "StreamNames" in body, "keep-alive + chunked request forwarded")
    hdr["X-Amz-Target"] = "Kinesis_20131202.PutRecords"
    c.request("POST", "/", body=json.dumps({"StreamName": "s-hold", "Records": [
        {"Data": "aGk=", "PartitionKey": "p"}]}).encode(), headers=hdr)
    resp = c.getresponse()
    body = json.loads(resp.read())
    check(resp.status == 200 and resp.getheader("Content-Type") == "application/x-amz-json-1.1"
          and body["FailedRecordCount"] == 0, "synthesized response content-type")
    hdr["X-Amz-Target"] = "Kinesis_20131202.PutRecords"
    c.request("POST", "/", body=json.dumps({"StreamName": "no-such-stream", "Records": [
        {"Data": "aGk=", "PartitionKey": "p"}]}).encode(), headers=hdr)
    resp = c.getresponse()
    body = json.loads(resp.read())
    check(resp.status == 400 and "ResourceNotFound" in body.get("__type", ""),
          f"upstream error relayed verbatim: {resp.status} {body}")
    c.close()

    print("fail_shard")
    env.reset()
    kin.create_stream(StreamName="s-shard", ShardCount=4)
    kin.get_waiter("stream_exists").wait(StreamName="s-shard",
                                         WaiterConfig={"Delay": 0.2, "MaxAttempts": 50})
    shards = kin.list_shards(StreamName="s-shard")["Shards"]
    check([(int(s["HashKeyRange"]["StartingHashKey"]), int(s["HashKeyRange"]["EndingHashKey"]))
           for s in shards] == [(i * 2**128 // 4, (i + 1) * 2**128 // 4 - 1) for i in range(4)],
          "moto splits 4 shards evenly: shard i covers [i*2^128/4, (i+1)*2^128/4)")

    def shard_index(key: str) -> int:
        return int.from_bytes(hashlib.md5(key.encode()).digest(), "big") * 4 >> 128

    batch = recs("shard", 40)
    r = kin.put_records(StreamName="s-shard", Records=batch)
    ids = [s["ShardId"] for s in shards]
    check(all(ids.index(e["ShardId"]) == shard_index(b["PartitionKey"])
              for b, e in zip(batch, r["Records"])), "MD5 hash key predicts moto's shard")
    env.rules(fail_shard={"shard": 0, "of": 4, "rate": 1.0})
    r = kin.put_records(StreamName="s-shard", Records=batch)
    failed = [shard_index(b["PartitionKey"]) == 0 for b in batch]
    check(0 < sum(failed) < 40 and ["ErrorCode" in e for e in r["Records"]] == failed,
          f"rate 1.0: exactly the {sum(failed)} records of shard 0 failed")
    check(all(e["ErrorCode"] == "ProvisionedThroughputExceededException"
              for e in r["Records"] if "ErrorCode" in e), "fail_record_code used")
    check(all(e["ErrorMessage"] == "Rate exceeded for shard shardId-000000000000 in stream "
              "s-shard under account 123456789012."
              for e in r["Records"] if "ErrorCode" in e), "the message names shard 0 as AWS does")
    env.rules(fail_shard={"shard": 0, "of": 4, "rate": 0.5}, seed=3)
    r = kin.put_records(StreamName="s-shard", Records=recs("half", 400))
    bad = [shard_index(f"pk-{i}") for i, e in enumerate(r["Records"]) if "ErrorCode" in e]
    on0 = sum(shard_index(f"pk-{i}") == 0 for i in range(400))
    check(set(bad) == {0} and 0.3 * on0 < len(bad) < 0.7 * on0,
          f"rate 0.5: {len(bad)} of {on0} shard-0 records failed, no other shard")
    check(env.stats()["records_failed"] == sum(failed) + len(bad), "counted as records_failed")
    check(env.ctl("POST", "/_proxy/rules", {"fail_shard": {"shard": 4, "of": 4, "rate": 1}})[0]
          == 400, "shard out of range -> 400")
    check(env.ctl("GET", "/_proxy/rules")[1]["fail_shard"] == {"shard": 0, "of": 4, "rate": 0.5},
          "rules unchanged by a rejected POST")
    env.reset()
    check(env.ctl("GET", "/_proxy/rules")[1]["fail_shard"] is None, "reset clears fail_shard")

    print("shard_limit")
    # 100 records/s per shard: a burst of 40 records per shard passes, the rest of a burst of
    # 400 spread over 4 shards fails on the shards that ran out, and a second later the
    # buckets are full again.
    env.rules(shard_limit={"of": 4, "records_per_s": 40})
    per_shard = [0] * 4
    batch = recs("lim", 400)
    for b in batch:
        per_shard[shard_index(b["PartitionKey"])] += 1
    r = kin.put_records(StreamName="s-shard", Records=batch)
    ok = [0] * 4
    for b, e in zip(batch, r["Records"]):
        if "ErrorCode" not in e:
            ok[shard_index(b["PartitionKey"])] += 1
    check(all(e["ErrorCode"] == "ProvisionedThroughputExceededException"
              for e in r["Records"] if "ErrorCode" in e), "throttled with Kinesis's code")
    check(all(40 <= n <= 41 for n in ok), f"about one second's 40 records per shard: {ok}")
    check(all(e["ErrorMessage"].startswith(
                  f"Rate exceeded for shard shardId-{shard_index(b['PartitionKey']):012d} ")
              for b, e in zip(batch, r["Records"]) if "ErrorCode" in e),
          "each throttled entry's message names its own shard")
    check(env.stats()["records_throttled"] == 400 - sum(ok), "counted as records_throttled")
    time.sleep(1.1)
    r = kin.put_records(StreamName="s-shard", Records=recs("again", 100))
    check(r["FailedRecordCount"] < 100 - 4 * 20, "the buckets refill within a second")
    # 1000 bytes/s: records of 300 bytes (data) + key: three pass on one key's shard.
    env.rules(shard_limit={"of": 4, "records_per_s": 1000, "bytes_per_s": 1000})
    big = [{"Data": b"x" * 300, "PartitionKey": "same"} for _ in range(5)]
    r = kin.put_records(StreamName="s-shard", Records=big)
    check([("ErrorCode" in e) for e in r["Records"]] == [False, False, False, True, True],
          f"byte limit: {r['Records']}")
    check(env.ctl("POST", "/_proxy/rules", {"shard_limit": {"of": 0, "records_per_s": 1}})[0]
          == 400, "shard_limit.of 0 -> 400")
    env.reset()
    check(env.ctl("GET", "/_proxy/rules")[1]["shard_limit"] is None, "reset clears shard_limit")


def run_dynamo_hold(env: Env) -> None:
    """dynamo_hold: DynamoDB passes verbatim; the named operation is applied upstream, then
    its answer is withheld (and sent) or the connection dropped."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ConnectionClosedError, ReadTimeoutError

    def ddb(read_timeout: float = 30):
        return boto3.client(
            "dynamodb", endpoint_url=env.base, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                          read_timeout=read_timeout, connect_timeout=5))

    def item(rev: int) -> dict:
        return {"watcher": {"S": "w"}, "revision": {"N": str(rev)}}

    def stored_rev() -> int | None:
        r = db.get_item(TableName="cps", Key={"watcher": {"S": "w"}}, ConsistentRead=True)
        return int(r["Item"]["revision"]["N"]) if "Item" in r else None

    print("dynamo_hold")
    env.reset()
    db = ddb()
    db.create_table(TableName="cps",
                    KeySchema=[{"AttributeName": "watcher", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "watcher", "AttributeType": "S"}],
                    BillingMode="PAY_PER_REQUEST")
    db.put_item(TableName="cps", Item=item(1))
    check(stored_rev() == 1 and env.stats()["dynamo_held"] == 0,
          "DynamoDB passes verbatim without the rule")

    env.rules(dynamo_hold={"target": "PutItem", "hold_ms": 3000})
    check(env.ctl("GET", "/_proxy/rules")[1]["dynamo_hold"]
          == {"target": "PutItem", "count": 1, "hold_ms": 3000, "then": "answer"}, "defaults filled")
    t = time.time()
    try:
        ddb(read_timeout=1).put_item(TableName="cps", Item=item(2))
        raise AssertionError("expected a read timeout")
    except ReadTimeoutError:
        check(time.time() - t < 2.5, "answer withheld past the client's read timeout")
    check(stored_rev() == 2, "but the held PutItem was applied")
    check(env.stats()["dynamo_held"] == 1
          and env.ctl("GET", "/_proxy/rules")[1]["dynamo_hold"]["count"] == 0, "count spent")
    t = time.time()
    db.put_item(TableName="cps", Item=item(3))
    check(time.time() - t < 1 and stored_rev() == 3, "the next PutItem passes at once")

    env.rules(dynamo_hold={"target": "PutItem", "hold_ms": 500, "then": "answer"})
    t = time.time()
    r = db.put_item(TableName="cps", Item=item(4), ReturnValues="ALL_OLD")
    check(time.time() - t >= 0.5 and r["Attributes"]["revision"]["N"] == "3",
          "a patient client gets upstream's answer after hold_ms")

    env.rules(dynamo_hold={"target": "PutItem", "count": 2, "then": "drop"})
    for rev in (5, 6):
        try:
            db.put_item(TableName="cps", Item=item(rev))
            raise AssertionError("expected the connection to drop")
        except ConnectionClosedError:
            pass
        check(stored_rev() == rev, f"dropped PutItem {rev} was applied")
    db.put_item(TableName="cps", Item=item(7))
    check(stored_rev() == 7 and env.stats()["dynamo_held"] == 4, "count 2: two dropped, then through")

    print("dynamo_hold leaves other operations alone")
    env.rules(dynamo_hold={"target": "GetItem", "then": "drop"})
    db.put_item(TableName="cps", Item=item(8))
    env.new_stream("s-dh")
    check(env.kin.put_records(StreamName="s-dh", Records=recs("dh", 2))["FailedRecordCount"] == 0,
          "PutRecords unaffected")
    try:
        stored_rev()
        raise AssertionError("expected GetItem to drop")
    except ConnectionClosedError:
        check(stored_rev() == 8, "only the named operation is taken")

    for bad in ({"count": 1}, {"target": "PutItem", "then": "explode"},
                {"target": "PutItem", "count": -1}, {"target": "DynamoDB_20120810.PutItem"},
                {"target": "PutItem", "extra": 1}):
        check(env.ctl("POST", "/_proxy/rules", {"dynamo_hold": bad})[0] == 400, f"{bad} -> 400")
    env.reset()
    check(env.ctl("GET", "/_proxy/rules")[1]["dynamo_hold"] is None
          and env.stats()["dynamo_held"] == 0, "reset clears dynamo_hold")


def run_access_denied(env: Env) -> None:
    """access_denied: the listed operations are refused as IAM refuses them (400,
    AccessDeniedException naming the action and the resource), nothing reaches the upstream,
    other operations pass, and clearing the rule lets the same calls through."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    def aws(service: str):
        return boto3.client(
            service, endpoint_url=env.base, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))

    def refused(call) -> dict:
        try:
            call()
        except ClientError as e:
            return {"status": e.response["ResponseMetadata"]["HTTPStatusCode"],
                    "code": e.response["Error"]["Code"],
                    "message": e.response["Error"].get("Message", "")}
        raise AssertionError("expected AccessDeniedException")

    print("access_denied")
    env.reset()
    db, ssm = aws("dynamodb"), aws("ssm")
    env.new_stream("s-ad")
    db.create_table(TableName="cps-ad",
                    KeySchema=[{"AttributeName": "watcher", "KeyType": "HASH"}],
                    AttributeDefinitions=[{"AttributeName": "watcher", "AttributeType": "S"}],
                    BillingMode="PAY_PER_REQUEST")
    ssm.put_parameter(Name="/ad/pw", Value="s3cret", Type="SecureString")

    env.rules(access_denied=["PutRecords", "PutItem", "GetParameter"])
    r = refused(lambda: env.kin.put_records(StreamName="s-ad", Records=recs("ad", 3)))
    check(r["status"] == 400 and r["code"] == "AccessDeniedException", "PutRecords: 400 AccessDenied")
    check("kinesis:PutRecords" in r["message"] and "stream/s-ad" in r["message"],
          "the message names the action and the stream")
    check(env.read_all("s-ad") == [], "a refused PutRecords reaches nothing")
    r = refused(lambda: db.put_item(TableName="cps-ad", Item={"watcher": {"S": "w"}}))
    check(r["code"] == "AccessDeniedException" and "dynamodb:PutItem" in r["message"]
          and "table/cps-ad" in r["message"], "PutItem refused, naming the table")
    check("Item" not in db.get_item(TableName="cps-ad", Key={"watcher": {"S": "w"}}),
          "the refused PutItem was not applied; GetItem passes")
    r = refused(lambda: ssm.get_parameter(Name="/ad/pw", WithDecryption=True))
    check(r["code"] == "AccessDeniedException" and "ssm:GetParameter" in r["message"]
          and "parameter/ad/pw" in r["message"], "GetParameter refused, naming the parameter")
    check(env.stats()["access_denied"] == 3, "refusals counted")

    for bad in ("PutRecords", [""], ["Kinesis_20131202.PutRecords"], [1]):
        check(env.ctl("POST", "/_proxy/rules", {"access_denied": bad})[0] == 400, f"{bad!r} -> 400")
    check(env.ctl("GET", "/_proxy/rules")[1]["access_denied"]
          == ["PutRecords", "PutItem", "GetParameter"], "rules unchanged by a rejected POST")

    env.rules(access_denied=[])
    check(env.kin.put_records(StreamName="s-ad", Records=recs("ad", 3))["FailedRecordCount"] == 0,
          "cleared: PutRecords passes")
    db.put_item(TableName="cps-ad", Item={"watcher": {"S": "w"}})
    check(ssm.get_parameter(Name="/ad/pw", WithDecryption=True)["Parameter"]["Value"] == "s3cret",
          "cleared: PutItem and GetParameter pass")
    # S3's PutObject (path style, as mongo-watcher addresses S3 under an endpoint override):
    # 403 with S3's XML error, code AccessDenied; nothing stored; other S3 calls pass.
    s3 = boto3.client(
        "s3", endpoint_url=env.base, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1, "mode": "standard"},
                      s3={"addressing_style": "path"}))
    s3.create_bucket(Bucket="claims-ad")
    env.rules(access_denied=["PutObject"])
    before = env.stats()["access_denied"]
    r = refused(lambda: s3.put_object(Bucket="claims-ad", Key="k/1", Body=b"x"))
    check(r["status"] == 403 and r["code"] == "AccessDenied"
          and "s3:PutObject" in r["message"] and "arn:aws:s3:::claims-ad/k/1" in r["message"],
          "PutObject refused: 403 AccessDenied naming the action and the object")
    check(s3.list_objects_v2(Bucket="claims-ad").get("KeyCount") == 0,
          "the refused PutObject stored nothing; ListObjects passes")
    check(env.stats()["access_denied"] == before + 1, "the refusal counted")
    env.rules(access_denied=[])
    s3.put_object(Bucket="claims-ad", Key="k/1", Body=b"x")
    check(s3.get_object(Bucket="claims-ad", Key="k/1")["Body"].read() == b"x",
          "cleared: PutObject passes")
    env.rules(access_denied=["GetItem"])
    env.reset()
    check(env.ctl("GET", "/_proxy/rules")[1]["access_denied"] == []
          and env.stats()["access_denied"] == 0, "reset clears access_denied")


def test_kinesis_proxy() -> None:
    env = Env()
    try:
        run(env)
        run_dynamo_hold(env)
        run_access_denied(env)
    finally:
        env.close()


if __name__ == "__main__":
    test_kinesis_proxy()
    print("ALL OK")
