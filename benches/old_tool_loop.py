#!/usr/bin/env python3
"""The old tool's loop, reimplemented as it was, for the bench's "old loop" ratio.

For each change event of one collection, in order and one at a time:

1. one Kinesis ``PutRecord`` of the event as JSON (``bson.json_util.dumps`` with the legacy
   JSON options, as pymongo 3 wrote it) with the constant partition key ``"1"``;
2. one DynamoDB ``UpdateItem`` writing the event's resume token to the marker item
   (hash key ``collectionName`` = ``"<db>.<collection>"``, ``SET #id = :id`` with the token as
   the map ``{_data: <string>}``).

pymongo and boto3 from the project venv, against the bench's SecantusDB and moto:

    .venv/bin/python benches/old_tool_loop.py --mongo-uri URI --db DB --collection COLL \\
        --start-at-time SECONDS,INCREMENT --aws-endpoint http://127.0.0.1:PORT \\
        --stream STREAM --table MARKER_TABLE --events N

Reads from ``startAtOperationTime`` (so a backlog written before can be timed), stops after N
events (or fails after --timeout seconds) and prints one JSON line
``{"events": N, "seconds": S, "first_event_seconds": F}``: S is from the first ``next()`` on the
open change stream until the N-th event's marker write returned.
"""

import argparse
import json
import sys
import time

import boto3
import pymongo
from bson import json_util
from bson.timestamp import Timestamp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mongo-uri", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--collection", required=True)
    ap.add_argument("--start-at-time", required=True, help="SECONDS,INCREMENT of a BSON timestamp")
    ap.add_argument("--aws-endpoint", required=True)
    ap.add_argument("--stream", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--events", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    secs, inc = (int(x) for x in args.start_at_time.split(","))
    aws = dict(endpoint_url=args.aws_endpoint, region_name="us-east-1",
               aws_access_key_id="test", aws_secret_access_key="test")
    kinesis = boto3.client("kinesis", **aws)
    dynamodb = boto3.client("dynamodb", **aws)
    client = pymongo.MongoClient(args.mongo_uri)
    coll = client[args.db][args.collection]
    marker = f"{args.db}.{args.collection}"

    done = 0
    deadline = time.monotonic() + args.timeout
    with coll.watch(full_document="updateLookup",
                    start_at_operation_time=Timestamp(secs, inc),
                    max_await_time_ms=500) as stream:
        started = time.monotonic()
        first = None
        while done < args.events:
            if time.monotonic() > deadline:
                print(f"old_tool_loop: only {done} of {args.events} events after "
                      f"{args.timeout} s", file=sys.stderr)
                return 1
            event = stream.try_next()
            if event is None:
                continue
            if first is None:
                first = time.monotonic() - started
            kinesis.put_record(
                StreamName=args.stream,
                Data=json_util.dumps(event, json_options=json_util.LEGACY_JSON_OPTIONS).encode(),
                PartitionKey="1",
            )
            dynamodb.update_item(
                TableName=args.table,
                Key={"collectionName": {"S": marker}},
                UpdateExpression="SET #id = :id",
                ExpressionAttributeNames={"#id": "_id"},
                ExpressionAttributeValues={":id": {"M": {"_data": {"S": event["_id"]["_data"]}}}},
            )
            done += 1
        seconds = time.monotonic() - started
    client.close()
    print(json.dumps({"events": done, "seconds": seconds, "first_event_seconds": first}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
