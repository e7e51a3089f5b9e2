#!/usr/bin/env python3
"""Reproduce: change stream resumed after SecantusDB SIGKILL + restart never sees new inserts.

Each trial: start secantusd-py on a free 127.0.0.1 port with a fresh temp data dir, watch a
collection, insert documents (optionally under concurrent write load), remember the last
event token, SIGKILL the server, restart it on the same data dir, inspect local.oplog.rs and
the surviving documents, then resume with startAfter / resumeAfter / startAtOperationTime and
insert new documents, recording whether (and after how many extra inserts) events arrive.

    .venv/bin/python scripts/investigate/secantus_kill9_resume.py --trials 20 --out /tmp/res.jsonl

Scratch investigation code; writes only to a temp dir and --out.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import bson
from bson.timestamp import Timestamp
from pymongo import MongoClient
from pymongo.errors import PyMongoError
from pymongo.write_concern import WriteConcern

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECANTUSD = os.path.join(ROOT, ".venv", "bin", "secantusd-py")
NEW_BASE = 10_000_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, datadir, extra, env_extra):
        self.port = free_port()
        self.datadir = datadir
        self.extra = extra
        self.env = dict(os.environ, **env_extra)
        self.proc = None
        self.log = open(os.path.join(os.path.dirname(datadir), "server.log"), "ab")

    def start(self):
        self.proc = subprocess.Popen(
            [SECANTUSD, "--host", "127.0.0.1", "--port", str(self.port),
             "--storage-path", self.datadir, "--enable-test-commands", *self.extra],
            stdout=self.log, stderr=self.log, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited rc={self.proc.returncode}")
                time.sleep(0.05)
        raise RuntimeError("server did not listen")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def term(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self, sst=5000):
        return MongoClient(f"mongodb://127.0.0.1:{self.port}/?directConnection=true",
                           serverSelectionTimeoutMS=sst, socketTimeoutMS=20000)


def decode_token(tok):
    """SecantusDB-specific: _data is hex BSON {s: seq, t: ts, n: ns, k: key}."""
    d = bson.decode(bytes.fromhex(tok["_data"]))
    return {"seq": int(d["s"]), "ts": d["t"]}


def ts_j(ts):
    return None if ts is None else [ts.time, ts.inc]


def run_trial(i, args, mode, load, server_extra, env_extra, journal):
    tmp = tempfile.mkdtemp(prefix="secantus_kill9_")
    datadir = os.path.join(tmp, "data")
    srv = Server(datadir, server_extra, env_extra)
    rec = {"trial": i, "mode": mode, "load": load, "server_extra": server_extra,
           "env": env_extra, "journal": journal}
    try:
        srv.start()
        c = srv.client(sst=1000)
        wc = WriteConcern(w=1, j=True) if journal else WriteConcern(w=1)
        coll = c.inv.get_collection("c", write_concern=wc)
        other = c.inv.get_collection("load", write_concern=wc)
        coll.insert_one({"_id": 0})

        state = {"last_token": None, "last_id": None, "events": 0, "pbrt": None}
        stop_read = threading.Event()
        ready = threading.Event()

        def reader():
            rc = MongoClient(f"mongodb://127.0.0.1:{srv.port}/?directConnection=true",
                             serverSelectionTimeoutMS=500, socketTimeoutMS=5000)
            try:
                with rc.inv.c.watch(max_await_time_ms=100) as s:
                    ready.set()
                    while not stop_read.is_set():
                        ch = s.try_next()
                        if ch is not None:
                            state["last_token"] = ch["_id"]
                            state["last_id"] = ch["documentKey"]["_id"]
                            state["events"] += 1
                        state["pbrt"] = s.resume_token
            except PyMongoError as e:
                state["reader_error"] = type(e).__name__
            finally:
                ready.set()
                rc.close()

        rt = threading.Thread(target=reader, daemon=True)
        rt.start()
        ready.wait(10)
        time.sleep(0.2)

        acked = []
        acked_lock = threading.Lock()
        stop_write = threading.Event()

        def writer(base, target, batch):
            n = 0
            while not stop_write.is_set():
                try:
                    if batch > 1:
                        ids = list(range(base + n, base + n + batch))
                        target.insert_many([{"_id": x, "pad": "x" * 200} for x in ids])
                    else:
                        ids = [base + n]
                        target.insert_one({"_id": ids[0], "pad": "x" * 200})
                except PyMongoError:
                    return
                n += batch
                if target is coll:
                    with acked_lock:
                        acked.extend(ids)

        if mode.startswith("burst"):
            # Like tests/failures.rs: an idle server, a few inserts, wait until the stream
            # delivered them, then SIGKILL N ms later.
            time.sleep(3.0)
            t_ins = time.time()
            for x in range(1, 6):
                coll.insert_one({"_id": x})
                acked.append(x)
            last_ack_t = time.time()
            deadline = time.time() + 10
            while time.time() < deadline and state["events"] < len(acked):
                time.sleep(0.001)
            rec["stream_latency_ms"] = round((time.time() - t_ins) * 1000, 1)
            time.sleep(int(mode[5:]) / 1000.0)
            tok, last_id = state["last_token"], state["last_id"]
            srv.kill9()
            rec["ms_since_last_ack"] = round((time.time() - last_ack_t) * 1000, 1)
            threads = []
        else:
            threads = [threading.Thread(target=writer, args=(1, coll, 1), daemon=True)]

        if load and threads:
            threads += [threading.Thread(target=writer, args=(1_000_000 * (k + 1), coll, 10),
                                         daemon=True) for k in range(2)]
            threads += [threading.Thread(target=writer, args=(1, other, 20), daemon=True)]
        for t in threads:
            t.start()
        if threads:
            time.sleep(args.write_seconds)

        if mode.startswith("burst"):
            pass
        elif mode == "hot":  # kill while writers are still running
            tok, last_id = state["last_token"], state["last_id"]
            srv.kill9()
            stop_write.set()
            rec["ms_since_last_ack"] = 0
        else:
            stop_write.set()
            for t in threads:
                t.join()
            last_ack_t = time.time()
            if mode == "caught_up" or mode == "idle2s":
                # let the reader catch up with every acknowledged insert, then kill
                deadline = time.time() + 10
                while time.time() < deadline and state["events"] < len(acked):
                    time.sleep(0.001)
                if mode == "idle2s":
                    time.sleep(2.0)
            elif mode.startswith("ack"):  # ackN: kill N ms after the last ack
                time.sleep(int(mode[3:]) / 1000.0)
            tok, last_id = state["last_token"], state["last_id"]
            srv.kill9()
            rec["ms_since_last_ack"] = round((time.time() - last_ack_t) * 1000, 1)
        kill_t = time.time()
        stop_read.set()
        for t in threads:
            t.join(5)
        rt.join(10)
        c.close()

        rec["acked"] = len(acked)
        rec["events_seen"] = state["events"]
        rec["last_seen_id"] = last_id
        td = decode_token(tok)
        rec["token_seq"], rec["token_ts"] = td["seq"], ts_j(td["ts"])

        t_start = time.time()
        srv.start()
        rec["restart_s"] = round(time.time() - t_start, 2)
        c = srv.client()
        coll = c.inv.c
        oplog = c.local["oplog.rs"]
        first = next(iter(oplog.find().sort("$natural", 1).limit(1)), None)
        last = next(iter(oplog.find().sort("$natural", -1).limit(1)), None)
        rec["oplog_first_ts"] = ts_j(first and first["ts"])
        rec["oplog_last_ts"] = ts_j(last and last["ts"])
        rec["oplog_count"] = oplog.count_documents({})
        rec["token_entry_exists"] = oplog.count_documents({"ts": td["ts"]}) > 0
        rec["token_newer_than_oplog"] = last is None or td["ts"] > last["ts"]
        hello = c.admin.command("hello")
        rec["restart_cluster_time"] = ts_j(hello.get("$clusterTime", {}).get("clusterTime"))

        present = set(d["_id"] for d in coll.find({}, {"_id": 1}))
        lost = [x for x in acked if x not in present]
        rec["acked_lost"] = len(lost)
        rec["last_seen_doc_exists"] = last_id in present
        # docs that a change stream delivered before the kill but which are gone now
        rec["streamed_but_lost_ids_sample"] = sorted(lost)[-3:]

        # Resume three ways, then insert new docs.
        streams = {}
        errors = {}
        for kind, kw in (("startAfter", {"start_after": tok}),
                         ("resumeAfter", {"resume_after": tok}),
                         ("startAtOpTime", {"start_at_operation_time": td["ts"]})):
            try:
                streams[kind] = coll.watch(max_await_time_ms=100, **kw)
            except PyMongoError as e:
                errors[kind] = f"{type(e).__name__}: code={getattr(e, 'code', None)} {e}"[:200]
        rec["resume_open_errors"] = errors

        t0 = time.time()
        new_ids = list(range(NEW_BASE, NEW_BASE + args.new_docs))
        for x in new_ids:
            coll.insert_one({"_id": x})
        got = {k: {} for k in streams}  # kind -> {id: seconds}
        replayed_old = {k: 0 for k in streams}
        deadline = t0 + args.wait
        while time.time() < deadline and any(
                len([x for x in got[k] if x >= NEW_BASE]) < len(new_ids) for k in streams):
            for k, s in streams.items():
                try:
                    ch = s.try_next()
                except PyMongoError as e:
                    errors[k + "_next"] = f"{type(e).__name__}: code={getattr(e, 'code', None)}"
                    continue
                if ch is not None:
                    dk = ch.get("documentKey", {}).get("_id")
                    if isinstance(dk, int) and dk >= NEW_BASE:
                        got[k].setdefault(dk, round(time.time() - t0, 3))
                    else:
                        replayed_old[k] += 1
        rec["resume"] = {k: {"new_seen": len([x for x in got[k] if x >= NEW_BASE]),
                             "first_new_s": min(got[k].values()) if got[k] else None,
                             "old_events_replayed": replayed_old[k]}
                         for k in streams}
        rec["hang"] = {k: rec["resume"][k]["new_seen"] == 0 for k in streams}

        # How many more inserts until the startAfter stream sees anything new?
        if "startAfter" in streams and rec["hang"].get("startAfter"):
            s = streams["startAfter"]
            extra = 0
            seen = None
            next_id = NEW_BASE + args.new_docs
            while extra < args.max_extra and seen is None:
                coll.insert_one({"_id": next_id})
                next_id += 1
                extra += 1
                while True:
                    ch = s.try_next()
                    if ch is None:
                        break
                    seen = ch["documentKey"]["_id"]
                    break
            rec["extra_inserts_until_event"] = extra if seen is not None else None
            rec["first_event_id_after_hang"] = seen
            if seen is not None:
                rec["first_event_token_seq"] = decode_token(s.resume_token)["seq"]
        for s in streams.values():
            s.close()
        c.close()
    except Exception as e:  # record and continue
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        srv.term()
        shutil.rmtree(tmp, ignore_errors=True)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--modes", default="hot,ack0,ack100,caught_up,idle2s")
    ap.add_argument("--load", default="0,1")
    ap.add_argument("--server-extra", default="", help="e.g. --sync-on-commit")
    ap.add_argument("--env", default="", help="K=V,K2=V2 for the server process")
    ap.add_argument("--journal", action="store_true", help="write with j:true")
    ap.add_argument("--write-seconds", type=float, default=1.5)
    ap.add_argument("--new-docs", type=int, default=5)
    ap.add_argument("--wait", type=float, default=10.0)
    ap.add_argument("--max-extra", type=int, default=3000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env_extra = dict(kv.split("=", 1) for kv in args.env.split(",") if kv)
    extra = args.server_extra.split() if args.server_extra else []
    with open(args.out, "a") as out:
        for mode in args.modes.split(","):
            for load in (bool(int(x)) for x in args.load.split(",")):
                for i in range(args.trials):
                    rec = run_trial(i, args, mode, load, extra, env_extra, args.journal)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    short = {k: rec.get(k) for k in (
                        "mode", "load", "ms_since_last_ack", "restart_s", "acked", "events_seen", "acked_lost", "token_seq", "token_ts",
                        "oplog_last_ts", "token_entry_exists", "hang",
                        "extra_inserts_until_event", "resume_open_errors", "error")}
                    print(json.dumps(short), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
