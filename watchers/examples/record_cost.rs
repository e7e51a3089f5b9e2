//! What turning one change event into its Kinesis record costs, stage by stage, on an insert
//! of a 1 KiB document shaped as the benchmark's backlog (`_id` and a 1,000-byte string).
//! Figures are nanoseconds per event on this machine; compare them within one run.
//!
//! `cargo run --release -p watchers --example record_cost [stage name filter]`

use std::hint::black_box;
use std::time::Instant;

use bson::{doc, RawDocumentBuf};
use watchers::record::{encode_raw, partition_key_raw, EventRecord, FieldPath, RecordFormat};

const ROUNDS: u32 = 200_000;

fn time(name: &str, f: impl Fn() -> usize) {
    // `record_cost <text>` times only the stages whose name holds it (for `perf record`).
    if std::env::args()
        .nth(1)
        .is_some_and(|only| !name.contains(&only))
    {
        return;
    }
    let started = Instant::now();
    let mut sum = 0;
    for _ in 0..ROUNDS {
        sum += black_box(f());
    }
    let ns = started.elapsed().as_secs_f64() * 1e9 / f64::from(ROUNDS);
    println!("{name:<34} {ns:>7.0} ns/event  ({sum} bytes in all)");
}

fn main() {
    let event = doc! {
        "_id": {"_data": "8263A1B2C3000000012B022C0100296E5A1004ABCDEF0123456789ABCDEF0123456789"},
        "operationType": "insert",
        "clusterTime": bson::Timestamp { time: 1_700_000_000, increment: 7 },
        "wallTime": bson::DateTime::from_millis(1_700_000_000_123),
        "fullDocument": {"_id": 12345_i64, "pad": "x".repeat(1000)},
        "ns": {"db": "bench", "coll": "events"},
        "documentKey": {"_id": 12345_i64},
    };
    let Ok(raw) = RawDocumentBuf::try_from(&event) else {
        panic!("the event is valid BSON");
    };
    let Some(key) = FieldPath::parse("documentKey._id") else {
        panic!("the key path is valid");
    };
    for format in [RecordFormat::Relaxed, RecordFormat::Legacy] {
        time(&format!("EventRecord::from_raw ({format:?})"), || {
            EventRecord::from_raw(&raw, &key, format).map_or(0, |r| r.data.len())
        });
    }
    time("encode_raw (Relaxed)", || {
        encode_raw(&raw, RecordFormat::Relaxed).map_or(0, |d| d.len())
    });
    time("partition_key_raw", || {
        partition_key_raw(&raw, &key).map_or(0, |k| k.len())
    });
    time("walk the top level (bson)", || raw.iter().count());
    time("walk the top level (bson_walk)", || {
        watchers::bson_walk::walk(raw.as_bytes()).map_or(0, Iterator::count)
    });
}
