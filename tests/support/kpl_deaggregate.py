"""Reads Kinesis records back the way a KPL consumer does: AWS's own deaggregation library
(PyPI aws-kinesis-agg, `deaggregator.deaggregate_records`) over the records the test read
from the stream, as a Lambda consumer receives them.

stdin:  JSON list of {"shard", "partitionKey", "sequenceNumber", "data" (hex)}
stdout: JSON list of {"shard", "partitionKey", "sequenceNumber", "subSequenceNumber",
        "aggregated", "data" (hex)}, one per user record, in stream order.
"""

import base64
import json
import sys

from aws_kinesis_agg.deaggregator import deaggregate_records


def main():
    records = json.load(sys.stdin)
    out = []
    for r in records:
        lambda_record = {
            "eventSource": "aws:kinesis",
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": r["partitionKey"],
                "sequenceNumber": r["sequenceNumber"],
                "approximateArrivalTimestamp": 0,
                "data": base64.b64encode(bytes.fromhex(r["data"])).decode(),
            },
        }
        for user in deaggregate_records([lambda_record]):
            k = user["kinesis"]
            data = base64.b64decode(k["data"]).hex()
            out.append(
                {
                    "shard": r["shard"],
                    "partitionKey": k["partitionKey"],
                    "sequenceNumber": k["sequenceNumber"],
                    "subSequenceNumber": k.get("subSequenceNumber"),
                    "aggregated": bool(k.get("aggregated", False)),
                    "data": data,
                }
            )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
