#!/usr/bin/env python3
"""moto_server with Kinesis made safe for concurrent PutRecords calls.

moto's Kinesis ``Shard.put_record`` says of itself "this function is not safe for
concurrency": two PutRecords calls served at once by moto's threaded server can compute the
same sequence number for a shard, and one record silently replaces the other while both calls
report success. Real Kinesis has no such race, and mongo-watcher sends several calls at once
(``max_in_flight``), so the end-to-end tests and local runs start moto through this shim,
which serialises appends to a shard (and DynamoDB's conditional writes, see below).

It also emulates records larger than 1 MiB (2025): moto 5.2 knows only 1 MiB. A stream's
limit is raised with ``UpdateMaxRecordSize`` (``MaxRecordSizeInKiB``, 1024 to 10240, by
``StreamARN``), ``DescribeStreamSummary`` reports ``MaxRecordSizeInKiB`` (1024 for a stream
never raised; the field only reaches the answer with botocore >= 1.40, whose model moto
serialises through), and PutRecords accepts records up to the stream's limit in calls of up
to max(5 MiB, that limit). Everything else is moto's own ``moto_server``.

    python moto_server.py -H 127.0.0.1 -p PORT
"""

import sys
import threading
from base64 import b64decode

from moto.core.exceptions import JsonRESTError
from moto.core.responses import EmptyResult
from moto.kinesis import exceptions, models, responses
from moto.server import main

_append_lock = threading.Lock()
_put_record = models.Shard.put_record


def _locked_put_record(self, *args, **kwargs):
    with _append_lock:
        return _put_record(self, *args, **kwargs)


models.Shard.put_record = _locked_put_record


# moto finds a shard's newest sequence number with `list(self.records.keys())[-1]`, once per
# appended record: each append costs time in proportion to what the shard holds, a drain of
# 50k records is quadratic, and a benchmark's rate fell from ~7,500 to ~2,000 records/s as
# its stream filled (moto at one core throughout). Kinesis has no such cost: the ends of
# the shard's ordered dict are read in O(1) here instead.
def _max_sequence_number(self) -> int:
    return next(reversed(self.records), 0)


def _min_sequence_number(self) -> int:
    return next(iter(self.records), 0)


_scan_get_records = models.Shard.get_records


def _get_records_from(self, last_sequence_id, limit):
    """moto's `get_records` scans the shard from its first record on every call; sequence
    numbers are consecutive integers here (see `put_record`), so the scan starts after
    `last_sequence_id`. Same answer: the records after it, up to `limit`, the last one's
    sequence number, and milliseconds behind the newest record."""
    last = int(last_sequence_id)
    first = next(iter(self.records), None)
    if first is None:
        return [], last, 0
    seq = max(last + 1, first)
    results = []
    newest = self.records[next(reversed(self.records))]
    behind = 0.0
    while seq in self.records and (limit is None or len(results) < limit):
        record = self.records[seq]
        results.append(record)
        last = seq
        behind = newest.created_at - record.created_at
        seq += 1
    if seq <= newest.sequence_number and seq not in self.records:
        # A gap (never made by `put_record`): moto's own scan.
        return _scan_get_records(self, last_sequence_id, limit)
    return results, last, int(behind * 1000)


models.Shard.get_max_sequence_number = _max_sequence_number
models.Shard.get_min_sequence_number = _min_sequence_number
models.Shard.get_records = _get_records_from

# Reads of a shard take the same lock: moto's GetRecords walks the shard's records while an
# append may change them (a 500 "Internal Server Error" seen while a test polled a stream that
# 50k records were being written to).
_get_records = models.Shard.get_records


def _locked_get_records(self, *args, **kwargs):
    with _append_lock:
        return _get_records(self, *args, **kwargs)


models.Shard.get_records = _locked_get_records

# DynamoDB's conditional writes are atomic; moto checks a condition and then writes, so two
# requests served at once by its threaded server can both pass `attribute_not_exists` (two
# replicas both claiming one lease at the same epoch, seen in tests/leases.rs under load).
# Every DynamoDB write is serialised here, as one table's writes are by DynamoDB.
from moto.dynamodb import models as dynamodb_models  # noqa: E402

_dynamodb_lock = threading.RLock()  # transact_write_items calls put_item


def _serialised(method):
    def locked(self, *args, **kwargs):
        with _dynamodb_lock:
            return method(self, *args, **kwargs)

    return locked


# moto's transact_write_items deep-copies a table once per item of the transaction (to roll
# back a cancelled one): a transaction of 100 Puts into a table of 1,000 items copied 100,000
# items, and 1,000 watchers' first checkpoints kept moto busy for minutes while every other
# answer waited. Copying the table once per transaction still cost in proportion to the
# table: 1,000 watchers' first checkpoints went in 67 transactions of ~15 items, one after
# the other, and each took 11 ms of moto's CPU at the first and 40 ms at the last (2.4 s in
# all, timed inside moto). DynamoDB's cost does not grow with the table, so here a
# transaction keeps the items it names as they were, and a cancelled one puts those back
# (or deletes those that did not exist): the same rollback, in proportion to the
# transaction. Every DynamoDB write holds `_dynamodb_lock`, so nothing else can change
# those items in between.
import copy as _copy  # noqa: E402

_transact_write_items = dynamodb_models.DynamoDBBackend.transact_write_items


class _NoCopy:
    """Stands in for the `copy` module inside moto's transact_write_items."""

    @staticmethod
    def deepcopy(value, memo=None):
        return value


def _named_items(self, transact_items):
    """(table name, key, the item's attributes as they are, or None) for each item a
    transaction names in a table that exists; moto itself refuses the rest."""
    named = []
    for entry in transact_items:
        op = next(iter(entry.values()), None)
        if not isinstance(op, dict) or op.get("TableName") not in self.tables:
            continue
        table = self.tables[op["TableName"]]
        try:
            if "Item" in op:
                key = {table.hash_key_attr: op["Item"][table.hash_key_attr]}
                if table.range_key_attr is not None:
                    key[table.range_key_attr] = op["Item"][table.range_key_attr]
            else:
                key = op["Key"]
            current = self.get_item(op["TableName"], key)
        except Exception:  # moto refuses it with its own error
            continue
        attrs = _copy.deepcopy(current.to_json()["Attributes"]) if current else None
        named.append((op["TableName"], key, attrs))
    return named


def _transact_rolling_back_items(self, transact_items):
    named = _named_items(self, transact_items)
    dynamodb_models.copy = _NoCopy
    try:
        return _transact_write_items(self, transact_items)
    except Exception:
        for table_name, key, attrs in reversed(named):
            if attrs is None:
                if self.get_item(table_name, key) is not None:
                    self.delete_item(table_name, key)
            else:
                self.put_item(table_name, attrs)
        raise
    finally:
        dynamodb_models.copy = _copy


dynamodb_models.DynamoDBBackend.transact_write_items = _transact_rolling_back_items

for _name in ("put_item", "update_item", "delete_item", "transact_write_items", "batch_write_item"):
    _method = getattr(dynamodb_models.DynamoDBBackend, _name)
    setattr(dynamodb_models.DynamoDBBackend, _name, _serialised(_method))

MIB = 1024 * 1024
DEFAULT_RECORD_KIB = 1024


def _record_kib(stream) -> int:
    return getattr(stream, "max_record_size_in_kib", DEFAULT_RECORD_KIB)


def _update_max_record_size(self):
    kib = self._get_param("MaxRecordSizeInKiB")
    if not isinstance(kib, int) or not 1024 <= kib <= 10240:
        raise exceptions.InvalidArgumentError(
            f"MaxRecordSizeInKiB must be 1024 to 10240, not {kib!r}"
        )
    stream = self.kinesis_backend.describe_stream(
        stream_arn=self._get_param("StreamARN"),
        stream_name=self._get_param("StreamName"),
    )
    stream.max_record_size_in_kib = kib
    return EmptyResult()


responses.KinesisResponse.update_max_record_size = _update_max_record_size

_to_json_summary = models.Stream.to_json_summary


def _summary_with_record_size(self):
    summary = _to_json_summary(self)
    summary["StreamDescriptionSummary"]["MaxRecordSizeInKiB"] = _record_kib(self)
    return summary


models.Stream.to_json_summary = _summary_with_record_size

_put_records = models.KinesisBackend.put_records


def _put_records_up_to_stream_limit(self, stream_arn, stream_name, records):
    """moto's own checks hold records to 1 MiB and calls to 5 MiB: checked here against the
    stream's limit instead, then moto appends the records with its limits lifted."""
    stream = self.describe_stream(stream_arn=stream_arn, stream_name=stream_name)
    record_limit = _record_kib(stream) * 1024
    request_limit = min(max(5 * MIB, record_limit), 10 * MIB)
    sizes = [
        len(b64decode(r.get("Data", ""))) + len(r.get("PartitionKey", ""))
        for r in records
    ]
    if len(records) <= 500 and sum(sizes) > request_limit:
        raise exceptions.InvalidArgumentError(
            f"Records size exceeds {request_limit // MIB} MB limit"
        )
    for position, size in enumerate(sizes, start=1):
        if size > record_limit:
            raise JsonRESTError(
                "ValidationException",
                f"1 validation error detected: Value at 'records.{position}.member.data' "
                f"failed to satisfy constraint: Member must have length less than or equal "
                f"to {record_limit}",
            )
    if max(sizes, default=0) <= MIB and sum(sizes) <= 5 * MIB:
        return _put_records(self, stream_arn, stream_name, records)
    # moto's own checks would refuse what the raised stream accepts: append as moto does
    # (through the locked Shard.put_record), without its 1 MiB and 5 MiB checks.
    response = {"FailedRecordCount": 0, "Records": []}
    for record in records:
        sequence_number, shard_id = stream.put_record(
            record.get("PartitionKey"), record.get("ExplicitHashKey"), record.get("Data")
        )
        response["Records"].append(
            {"SequenceNumber": sequence_number, "ShardId": shard_id}
        )
    return response


models.KinesisBackend.put_records = _put_records_up_to_stream_limit

if __name__ == "__main__":
    sys.exit(main())
