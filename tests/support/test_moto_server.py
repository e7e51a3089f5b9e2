#!/usr/bin/env python3
"""Self-test of moto_server.py's DynamoDB transactions: a cancelled TransactWriteItems leaves
every item it named as it was (new ones absent, changed ones unchanged, deleted ones back),
and a transaction that succeeds applies every item. The shim rolls a cancelled transaction
back item by item instead of restoring a copy of the whole table, so this is what holds the
checkpoint store's all-or-nothing writes up in the end-to-end tests.

    .venv/bin/python tests/support/test_moto_server.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

SHIM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moto_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)
    print(f"ok: {msg}")


def main() -> None:
    import boto3
    from botocore.exceptions import ClientError

    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, SHIM, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.time() > deadline or moto.poll() is not None:
                    raise RuntimeError("moto_server.py did not start")
                time.sleep(0.1)
        db = boto3.client(
            "dynamodb",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        db.create_table(
            TableName="t",
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        # Many items, so a rollback that lost the table's other items would show.
        for i in range(50):
            db.put_item(TableName="t", Item={"k": {"S": f"other-{i}"}, "v": {"N": str(i)}})
        db.put_item(TableName="t", Item={"k": {"S": "changed"}, "v": {"N": "1"}})
        db.put_item(TableName="t", Item={"k": {"S": "deleted"}, "v": {"N": "1"}})

        def items() -> dict[str, str]:
            out = {}
            for page in db.get_paginator("scan").paginate(TableName="t", ConsistentRead=True):
                for it in page["Items"]:
                    out[it["k"]["S"]] = it["v"]["N"]
            return out

        # A Put of a new item, an Update and a Delete: what both transactions below write.
        writes = [
            {"Put": {"TableName": "t", "Item": {"k": {"S": "new"}, "v": {"N": "1"}}}},
            {
                "Update": {
                    "TableName": "t",
                    "Key": {"k": {"S": "changed"}},
                    "UpdateExpression": "SET v = :v",
                    "ExpressionAttributeValues": {":v": {"N": "2"}},
                }
            },
            {"Delete": {"TableName": "t", "Key": {"k": {"S": "deleted"}}}},
        ]
        refused = {
            "Put": {
                "TableName": "t",
                "Item": {"k": {"S": "refused"}, "v": {"N": "1"}},
                "ConditionExpression": "attribute_exists(k)",
            }
        }

        before = items()
        try:
            db.transact_write_items(TransactItems=writes + [refused])
            cancelled = False
        except ClientError as err:
            cancelled = err.response["Error"]["Code"] == "TransactionCanceledException"
        check(cancelled, "a transaction with a failed condition is cancelled")
        check(items() == before, "a cancelled transaction leaves every item as it was")

        db.transact_write_items(TransactItems=writes)
        after = items()
        expected = {k: v for k, v in before.items() if k != "deleted"}
        expected.update({"new": "1", "changed": "2"})
        check(after == expected, "a transaction that succeeds applies every item")
    finally:
        moto.terminate()
        moto.wait(timeout=10)


if __name__ == "__main__":
    main()
