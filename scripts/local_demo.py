"""Local demo of mongo-watcher, started by scripts/run-local (run it with .venv/bin/python).

Starts SecantusDB and moto on free 127.0.0.1 ports, creates the Kinesis streams and the
checkpoint table, runs mongo-watcher with examples/local.yaml, writes sample documents and
prints the records as they arrive. `--once` (or RUN_LOCAL_ONCE=1) exits once the sample
records are in; otherwise it keeps printing new records until Ctrl-C. Every child process is
stopped on the way out: mongo-watcher first (SIGTERM, so it flushes and checkpoints).
"""

import argparse, ctypes, json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import boto3
import pymongo
from boto3.dynamodb.types import TypeDeserializer

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
BINARY = ROOT / "target" / "debug" / "mongo-watcher"
CONFIG = ROOT / "examples" / "local.yaml"
LOG_DIR = ROOT / ".tmp" / "local"
REGION = "us-east-1"
TABLE = "mongo-watcher-checkpoints"
# Watcher name -> Kinesis stream, as in examples/local.yaml.
WATCHERS = {"orders": "orders-events", "users": "users-events"}
TIMEOUT = 60


class Stop(Exception):
    """SIGTERM or SIGHUP: leave the way Ctrl-C does."""


def raise_stop(signum, _frame):
    raise Stop(signal.Signals(signum).name)


def die_with_parent():
    # Linux: a child gets SIGTERM if this process dies without cleaning up (kill -9).
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Children:
    def __init__(self):
        self.procs = []  # (name, Popen), in start order

    def start(self, name, argv, log):
        # Own session: Ctrl-C reaches only this script, which then stops the children in order.
        p = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=die_with_parent)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for name, p in reversed(self.procs):  # mongo-watcher, then moto, then SecantusDB
            if p.poll() is None:
                print(f"stopping {name} (pid {p.pid})", flush=True)
                p.terminate()
                try:
                    p.wait(timeout=30 if name == "mongo-watcher" else 10)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not exit after SIGTERM; killing it", flush=True)
                    p.kill()
                    p.wait()
            if name == "mongo-watcher":
                print(f"mongo-watcher exited with {p.returncode}", flush=True)


def wait_until(what, check, alive=()):
    deadline = time.monotonic() + TIMEOUT
    while not check():
        for name, p in alive:
            if p.poll() is not None:
                sys.exit(f"error: {name} exited with {p.returncode} while waiting for {what}; "
                         f"see {LOG_DIR / name}.log")
        if time.monotonic() > deadline:
            sys.exit(f"error: timed out after {TIMEOUT} s waiting for {what}")
        time.sleep(0.2)


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def start_server(children, name, argv, port):
    log = open(LOG_DIR / f"{name}.log", "wb")
    p = children.start(name, argv, log)
    wait_until(f"{name} to listen on 127.0.0.1:{port}", lambda: listening(port), [(name, p)])


class StreamReader:
    """Reads every shard of a stream from TRIM_HORIZON on, continuing where it left off."""

    def __init__(self, kinesis, stream):
        self.kinesis, self.stream, self.iterators, self.count = kinesis, stream, {}, 0
        for shard in kinesis.list_shards(StreamName=stream)["Shards"]:
            self.iterators[shard["ShardId"]] = kinesis.get_shard_iterator(
                StreamName=stream, ShardId=shard["ShardId"],
                ShardIteratorType="TRIM_HORIZON")["ShardIterator"]

    def poll(self):
        new = []
        for shard, iterator in list(self.iterators.items()):
            while iterator:
                page = self.kinesis.get_records(ShardIterator=iterator, Limit=1000)
                iterator = page.get("NextShardIterator")
                new += [(r["PartitionKey"], json.loads(r["Data"])) for r in page["Records"]]
                if not page["Records"]:
                    break
            self.iterators[shard] = iterator
        # Shards are read one after the other; print in the order the changes happened.
        def cluster_time(record):
            ts = record[1].get("clusterTime", {}).get("$timestamp", {})
            return ts.get("t", 0), ts.get("i", 0)
        new.sort(key=cluster_time)
        for key, event in new:
            print(f"{self.stream}  key={key}  {json.dumps(event, ensure_ascii=False)}", flush=True)
        self.count += len(new)


def write_samples(db):
    """7 changes: 4 on shop.orders, 3 on shop.users."""
    orders, users = db.orders, db.users
    first = orders.insert_one({"item": "coffee beans", "qty": 2, "total": 23.5}).inserted_id
    second = orders.insert_one({"item": "grinder", "qty": 1, "total": 89.0}).inserted_id
    orders.update_one({"_id": first}, {"$set": {"qty": 3, "total": 35.25}})
    orders.delete_one({"_id": second})
    users.insert_one({"_id": 1, "email": "ada@example.com", "name": "Ada"})
    users.insert_one({"_id": 2, "email": "grace@example.com", "name": "Grace"})
    users.update_one({"_id": 1}, {"$set": {"name": "Ada Lovelace"}})
    return {"orders-events": 4, "users-events": 3}


def print_checkpoints(dynamodb):
    print("\ncheckpoints in DynamoDB table", TABLE)
    des = TypeDeserializer()
    number = lambda n: int(n) if n == int(n) else float(n)  # DynamoDB numbers are Decimals
    for item in dynamodb.scan(TableName=TABLE, ConsistentRead=True)["Items"]:
        plain = {k: des.deserialize(v) for k, v in item.items()}
        print("  " + json.dumps(plain, sort_keys=True, default=number), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true",
                        help="exit once the sample records arrived (also RUN_LOCAL_ONCE=1)")
    once = parser.parse_args().once or os.environ.get("RUN_LOCAL_ONCE", "") in ("1", "true")
    # Ctrl-C raises KeyboardInterrupt even if SIGINT was ignored when we started (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_stop)
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    children = Children()
    try:
        return run(children, once)
    except (KeyboardInterrupt, Stop):
        print("\ninterrupted: shutting down", flush=True)
        return 130 if once else 0  # Ctrl-C is how an interactive run ends
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # let the clean-up finish
        children.stop_all()


def run(children, once):
    mongo_port, moto_port, http_port = free_port(), free_port(), free_port()
    mongo_uri = f"mongodb://127.0.0.1:{mongo_port}/?directConnection=true"
    aws_endpoint = f"http://127.0.0.1:{moto_port}"
    start_server(children, "secantusd", [VENV_BIN / "secantusd-py", "--host", "127.0.0.1",
                 "--port", str(mongo_port), "--storage-path", ":memory:",
                 "--enable-test-commands"], mongo_port)
    start_server(children, "moto", [VENV_BIN / "python", ROOT / "tests/support/moto_server.py", "-H", "127.0.0.1",
                 "-p", str(moto_port)], moto_port)

    # The environment of mongo-watcher (and of boto3 here); nothing from the user's real AWS
    # setup (profiles, session tokens, endpoints) leaks in.
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(AWS_ENDPOINT_URL=aws_endpoint, AWS_REGION=REGION,
                      AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_EC2_METADATA_DISABLED="true", MONGODB_URI=mongo_uri,
                      CHECKPOINT_TABLE=TABLE, HTTP_PORT=str(http_port), LOG_FORMAT="text",
                      NO_COLOR="1")  # plain text in the log file
    session = boto3.Session(region_name=REGION)
    kinesis = session.client("kinesis", endpoint_url=aws_endpoint)
    dynamodb = session.client("dynamodb", endpoint_url=aws_endpoint)
    for stream in WATCHERS.values():
        kinesis.create_stream(StreamName=stream, ShardCount=2)
    for stream in WATCHERS.values():
        kinesis.get_waiter("stream_exists").wait(StreamName=stream, WaiterConfig={"Delay": 1})
    dynamodb.create_table(TableName=TABLE, BillingMode="PAY_PER_REQUEST",
                          KeySchema=[{"AttributeName": "watcher", "KeyType": "HASH"}],
                          AttributeDefinitions=[{"AttributeName": "watcher",
                                                 "AttributeType": "S"}])
    dynamodb.get_waiter("table_exists").wait(TableName=TABLE)
    print(f"created Kinesis streams {', '.join(WATCHERS.values())} (2 shards each) "
          f"and DynamoDB table {TABLE}\n")

    check = subprocess.run([BINARY, "check-config", "--config", CONFIG])
    if check.returncode != 0:
        sys.exit(f"error: mongo-watcher check-config failed ({check.returncode})")
    log_path = LOG_DIR / "mongo-watcher.log"
    watcher = children.start("mongo-watcher", [BINARY, "run", "--config", CONFIG],
                             open(log_path, "wb"))
    print(f"\nmongo-watcher running (pid {watcher.pid}); its log: {log_path}", flush=True)

    # Each watcher writes its first checkpoint once its change stream is open; documents
    # written before that would not be seen (start_at: latest).
    def checkpoint(name):
        return dynamodb.get_item(TableName=TABLE, Key={"watcher": {"S": name}},
                                 ConsistentRead=True).get("Item")
    alive = [("mongo-watcher", watcher)]
    wait_until("the change streams to open", lambda: all(map(checkpoint, WATCHERS)), alive)

    client = pymongo.MongoClient(mongo_uri, serverSelectionTimeoutMS=10_000)
    expected = write_samples(client.shop)
    print("wrote sample changes to shop.orders and shop.users; records:\n", flush=True)
    readers = [StreamReader(kinesis, s) for s in WATCHERS.values()]

    def all_arrived():
        for r in readers:
            r.poll()
        return all(r.count >= expected[r.stream] for r in readers)
    try:
        wait_until("the sample records in Kinesis", all_arrived, alive)
    except SystemExit:
        counts = ", ".join(f"{r.stream} {r.count}/{expected[r.stream]}" for r in readers)
        print(f"records so far: {counts}; see {log_path}", file=sys.stderr)
        raise
    # Give the checkpoints a moment to move past the sample records (checkpoint_interval 1s).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(
            int(checkpoint(n)["revision"]["N"]) >= 2 for n in WATCHERS):
        time.sleep(0.5)
    print_checkpoints(dynamodb)
    if once:
        print("\nall sample records arrived (--once): done", flush=True)
        return 0

    print(f"""
Watching for more changes; Ctrl-C stops everything.
  MongoDB:  {mongo_uri}
    mongosh "{mongo_uri}" --eval 'db.getSiblingDB("shop").orders.insertOne({{item: "tea"}})'
    .venv/bin/python -c 'import pymongo; pymongo.MongoClient("{mongo_uri}").shop.users.insert_one({{"email": "me@example.com"}})'
  AWS (moto): {aws_endpoint}  region {REGION}, keys test/test
  mongo-watcher log: {log_path}
""", flush=True)
    while True:
        time.sleep(1)
        if watcher.poll() is not None:
            sys.exit(f"error: mongo-watcher exited with {watcher.returncode}; see {log_path}")
        for r in readers:
            r.poll()


if __name__ == "__main__":
    sys.exit(main())
