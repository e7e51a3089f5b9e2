//! `aggregation: kpl` end to end, read back the way consumers read it: every Kinesis record
//! goes through AWS's own deaggregation library (aws-kinesis-agg), and each event must come
//! out once, with its own partition key, in its key's order: under partial failures and lost
//! acknowledgements (the fault proxy), across kill -9, and within the stream's record limit.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bson::{doc, Document};
use serde_json::json;
use support::*;

/// The KPL's magic bytes, which start an aggregated record's data.
const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// The version an event carries: 0 for an insert, `v` of an update.
fn version(r: &Record) -> Option<i64> {
    match r.operation() {
        "insert" => Some(0),
        "update" => r.json["updateDescription"]["updatedFields"]["v"].as_i64(),
        _ => None,
    }
}

/// Each key's versions in the order of their first arrival.
fn first_arrivals(users: &[Record]) -> HashMap<i64, Vec<i64>> {
    let mut seen: HashMap<i64, Vec<i64>> = HashMap::new();
    for r in users {
        let (Some(k), Some(v)) = (r.id(), version(r)) else {
            continue;
        };
        let list = seen.entry(k).or_default();
        if !list.contains(&v) {
            list.push(v);
        }
    }
    seen
}

fn complete(users: &[Record], keys: &[(i64, i64)]) -> bool {
    let seen = first_arrivals(users);
    keys.iter()
        .all(|(k, last)| seen.get(k).is_some_and(|v| v.len() as i64 == last + 1))
}

/// Under 30 % failed records, 10 % lost acknowledgements and 5 % failed calls, a hot key's
/// updates travel many to a record; the KPL library reads every one back (first arrivals
/// exactly 0..=N) with its own key. Each Kinesis record holds consecutive versions of one
/// key and never starts past where its key stood: a resend after a lost acknowledgement may
/// repeat versions, but no version ever overtakes an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_arrives_whole_and_in_order_under_partial_failures() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let proxy = Proxy::start(&moto);
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = unique("agg");
    aws.create_stream(&stream, 2).await;
    let cfg = config_yaml(
        &mongo,
        None,
        &[watcher_yaml(
            "w",
            "db",
            "c",
            &stream,
            "    full_document: off\n    aggregation: kpl\n",
        )],
    );
    let coll = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    proxy.rules(json!({
        "fail_record_rate": 0.3, "ack_lost_rate": 0.1, "fail_call_rate": 0.05, "seed": 11,
        "delay_ms": 30
    }));
    let _w = Watcher::start(dir.path(), &cfg, &proxy.endpoint());
    tokio::time::sleep(Duration::from_secs(2)).await;
    const HOT: i64 = 0;
    const HOT_VERSIONS: i64 = 1500;
    insert_ids(&coll, [HOT, 1, 2]).await;
    for v in 1..=HOT_VERSIONS {
        coll.update_one(doc! {"_id": HOT}, doc! {"$set": {"v": v}})
            .await
            .unwrap();
        if v % 100 == 0 {
            for k in [1, 2] {
                coll.update_one(doc! {"_id": k}, doc! {"$set": {"v": v / 100}})
                    .await
                    .unwrap();
            }
        }
    }
    let expect = [
        (HOT, HOT_VERSIONS),
        (1, HOT_VERSIONS / 100),
        (2, HOT_VERSIONS / 100),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (raw, users) = loop {
        let raw = aws.read_stream_raw(&stream).await;
        let users = deaggregate_with_kpl(&raw);
        if complete(&users, &expect) {
            break (raw, users);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every version arrived: {:?}",
            first_arrivals(&users)
                .iter()
                .map(|(k, v)| (*k, v.len()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let stats = proxy.stats();
    assert!(
        stats["records_failed"].as_u64().unwrap_or(0) > 0
            && stats["records_ack_lost"].as_u64().unwrap_or(0) > 0,
        "no faults injected: {stats}"
    );
    // Every user record carries its own key, and first arrivals are exactly in write order.
    for u in &users {
        assert_eq!(
            u.partition_key,
            u.id().expect("an integer _id").to_string(),
            "a user record with another key's partition key"
        );
    }
    for (k, last) in expect {
        assert_eq!(
            first_arrivals(&users)[&k],
            (0..=last).collect::<Vec<_>>(),
            "key {k}: first arrivals out of order"
        );
    }
    // Per Kinesis record: its events are consecutive versions of one key, and the record
    // either continues the key or repeats an earlier record whole.
    let aggregated = raw.iter().filter(|r| r.data.starts_with(&MAGIC)).count();
    assert!(aggregated > 0, "nothing was aggregated");
    let hot_events = HOT_VERSIONS as usize + 1;
    let hot_records = raw.iter().filter(|r| r.partition_key == "0").count();
    assert!(
        hot_records * 5 < hot_events,
        "{hot_records} Kinesis records for {hot_events} hot-key events: hardly aggregated"
    );
    let mut by_record: Vec<(String, Vec<&Record>)> = Vec::new();
    for u in &users {
        let record = u.sequence.rsplit_once(':').map(|(s, _)| s).unwrap_or("");
        let record = format!("{}/{record}", u.shard);
        match by_record.last_mut() {
            Some((seq, list)) if *seq == record => list.push(u),
            _ => by_record.push((record, vec![u])),
        }
    }
    let mut stood: HashMap<i64, i64> = HashMap::new();
    for (seq, events) in &by_record {
        let key = events[0].id().unwrap();
        let versions: Vec<i64> = events.iter().filter_map(|e| version(e)).collect();
        assert!(
            events.iter().all(|e| e.id() == Some(key)),
            "record {seq} mixes keys"
        );
        assert!(
            versions.windows(2).all(|w| w[1] == w[0] + 1),
            "record {seq}: versions not consecutive: {versions:?}"
        );
        let at = stood.get(&key).copied().unwrap_or(-1);
        assert!(
            versions[0] <= at + 1,
            "key {key}: record {seq} starts at {} while the key stood at {at}",
            versions[0]
        );
        stood.insert(key, at.max(*versions.last().unwrap()));
    }
}

/// kill -9 while a hot key is being written: after restarts from the checkpoint every version
/// arrives (first arrivals exactly in order); nothing an aggregate carried is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loses_nothing_an_aggregate_carried() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("agg");
    aws.create_stream(&stream, 1).await;
    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[watcher_yaml(
            "w",
            "db",
            "c",
            &stream,
            "    full_document: off\n    aggregation: kpl\n",
        )],
    );
    let coll = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    let mut w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    insert_ids(&coll, [0]).await;
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move {
            let mut v = 0_i64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
            while tokio::time::Instant::now() < deadline {
                v += 1;
                coll.update_one(doc! {"_id": 0_i64}, doc! {"$set": {"v": v}})
                    .await
                    .expect("update");
            }
            v
        })
    };
    for pause in [1500_u64, 1800, 1200] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        w.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.restart();
    }
    let last = writer.await.expect("writer");
    assert!(last > 200, "the load was too light: {last}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let users = loop {
        let users = deaggregate_with_kpl(&aws.read_stream_raw(&stream).await);
        if complete(&users, &[(0, last)]) {
            break users;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} versions arrived",
            first_arrivals(&users).get(&0).map_or(0, Vec::len),
            last + 1
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(first_arrivals(&users)[&0], (0..=last).collect::<Vec<_>>());
}

/// Aggregates stay within the stream's record limit: a hot key's 120 KiB events travel
/// several to a record and never more than 1 MiB, while an event that alone is over the
/// limit is still oversized (skipped here) and its neighbours go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_stay_within_the_record_limit() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let proxy = Proxy::start(&moto);
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = unique("agg");
    aws.create_stream(&stream, 1).await;
    let cfg = config_yaml(
        &mongo,
        None,
        &[watcher_yaml(
            "w",
            "db",
            "c",
            &stream,
            "    full_document: off\n    aggregation: kpl\n    on_oversized: skip\n",
        )],
    );
    // Slow calls let the key's events pile up behind the one in flight.
    proxy.rules(json!({"delay_ms": 300}));
    let w = Watcher::start(dir.path(), &cfg, &proxy.endpoint());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let coll = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    let blob = "b".repeat(120 * 1024);
    insert_ids(&coll, [0]).await;
    for v in 1..=40_i64 {
        let set = if v == 20 {
            doc! {"v": v, "blob": "o".repeat(1100 * 1024)}
        } else {
            doc! {"v": v, "blob": format!("{v}{blob}")}
        };
        coll.update_one(doc! {"_id": 0_i64}, doc! {"$set": set})
            .await
            .unwrap();
    }
    let expect: Vec<i64> = (0..=40).filter(|v| *v != 20).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let raw = loop {
        let raw = aws.read_stream_raw(&stream).await;
        let users = deaggregate_with_kpl(&raw);
        if first_arrivals(&users).get(&0).map_or(0, Vec::len) == expect.len() {
            assert_eq!(first_arrivals(&users)[&0], expect);
            break raw;
        }
        assert!(tokio::time::Instant::now() < deadline, "events missing");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for r in &raw {
        assert!(
            r.data.len() + r.partition_key.len() <= 1024 * 1024,
            "a record of {} bytes on a 1 MiB stream",
            r.data.len() + r.partition_key.len()
        );
    }
    assert!(
        raw.iter()
            .any(|r| r.data.starts_with(&MAGIC) && r.data.len() > 3 * 120 * 1024),
        "no aggregate held several large events"
    );
    w.wait_for_log("record over the stream's limit skipped", WAIT);
}
