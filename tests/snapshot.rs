//! `snapshot: initial` end to end, against SecantusDB and moto: the copy, in ranges side by
//! side, delivers every document while the change stream is read beside it; a consumer that
//! keeps per key the record with the newest `clusterTime` (a change event over a snapshot
//! record at the same time) ends with every document's final state; a kill -9 mid-copy
//! continues every range from its checkpointed `_id` instead of starting over.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bson::{doc, Document};
use support::*;

/// Documents in the collection before the watcher starts.
const EXISTING: i64 = 50_000;

async fn fill(coll: &mongodb::Collection<Document>, ids: std::ops::Range<i64>) {
    let docs: Vec<Document> = ids.map(|i| doc! {"_id": i, "v": 0_i64}).collect();
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await.expect("insert_many");
    }
}

/// Slow enough (small calls, one at a time) that a copy of 50k documents takes seconds.
const SLOW: &str = "    snapshot: initial\n    snapshot_parallelism: 4\n    max_batch_records: 100\n    max_in_flight: 1\n    max_pending: 500\n";

/// The records of each id, in stream order (one key is one shard, read in order).
fn by_id(records: &[Record]) -> HashMap<i64, Vec<&Record>> {
    let mut out: HashMap<i64, Vec<&Record>> = HashMap::new();
    for r in records {
        if let Some(id) = r.id() {
            out.entry(id).or_default().push(r);
        }
    }
    out
}

/// A stored range: `min`, `max` and the last acknowledged `_id` (`after`).
type StoredRange = (Option<i64>, Option<i64>, Option<i64>);

/// Per range of the stored copy progress: its bounds and the last acknowledged `_id`.
fn ranges(
    item: &HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
) -> Option<Vec<StoredRange>> {
    let text = item.get("snapshot_progress")?.as_s().ok()?;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let int = |v: &serde_json::Value| {
        v["$numberLong"]
            .as_str()
            .or(v["$numberInt"].as_str())
            .and_then(|s| s.parse::<i64>().ok())
    };
    Some(
        v["ranges"]
            .as_array()?
            .iter()
            .map(|r| (int(&r["min"]), int(&r["max"]), int(&r["after"])))
            .collect(),
    )
}

/// Documents acknowledged by the stored progress: per range, those up to its `after`.
fn acknowledged(item: &HashMap<String, aws_sdk_dynamodb::types::AttributeValue>) -> Option<i64> {
    let ranges = ranges(item)?;
    Some(
        ranges
            .iter()
            .map(|(min, _, after)| after.map_or(0, |a| a - min.unwrap_or(0) + 1))
            .sum(),
    )
}

/// `clusterTime` of a record as `(t, i)`.
fn cluster_time(r: &Record) -> (u64, u64) {
    let ts = &r.json["clusterTime"]["$timestamp"];
    (
        ts["t"].as_u64().unwrap_or_default(),
        ts["i"].as_u64().unwrap_or_default(),
    )
}

/// What a consumer following the README's rule holds for a key: of its records in stream
/// order, the one with the newest `clusterTime`, a change event winning over a snapshot
/// record of the same time, a later record over an earlier one otherwise.
fn consumer_state<'a>(records: &[&'a Record]) -> Option<&'a Record> {
    let rank = |r: &Record| (cluster_time(r), r.operation() != "snapshot");
    let mut held: Option<&Record> = None;
    for r in records {
        if held.is_none_or(|h| rank(r) >= rank(h)) {
            held = Some(r);
        }
    }
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_and_the_writes_made_during_it_all_arrive_in_key_order() {
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        ..
    } = Env::start("snap", 2).await;
    let client = mongo.client().await;
    let coll = client.database("shop").collection::<Document>("items");
    fill(&coll, 0..EXISTING).await;

    let port = free_port();
    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[watcher_yaml("items", "shop", "items", &stream, SLOW)],
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let _w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    // The start is stored, with the copy marked unfinished, before anything is read.
    let first = aws
        .wait_for_checkpoint(&table, "items", WAIT, |_| true)
        .await;
    assert_eq!(
        first
            .get("snapshot")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("copying"),
        "first checkpoint: {first:?}"
    );
    assert!(token_text(&first).is_some(), "the stream's start is stored");

    // Writes during the copy: updates spread over the whole range (some already copied,
    // some not yet), new documents, and deletes.
    for i in (0..EXISTING).step_by(97) {
        coll.update_one(doc! {"_id": i}, doc! {"$set": {"v": 1_i64}})
            .await
            .unwrap();
    }
    let fresh: Vec<Document> = (EXISTING..EXISTING + 300)
        .map(|i| doc! {"_id": i, "v": 2_i64})
        .collect();
    coll.insert_many(fresh).await.unwrap();
    for i in (5..EXISTING).step_by(1009) {
        coll.delete_one(doc! {"_id": i}).await.unwrap();
    }
    // Keys written three times during the copy: their change events keep their order.
    for v in 10..13_i64 {
        for i in (3..EXISTING).step_by(499) {
            coll.update_one(doc! {"_id": i}, doc! {"$set": {"v": v}})
                .await
                .unwrap();
        }
    }
    // Progress while copying: counted, with the collection's estimated size.
    let view = wait_http(port, "/watchers/items", WAIT, |r| r.status == 200).json();
    let snap = &view["snapshot"];
    eprintln!("status while copying: {snap}");
    if snap["state"] == "copying" {
        assert!(
            snap["estimated_total"]
                .as_u64()
                .is_some_and(|n| n >= EXISTING as u64),
            "{snap}"
        );
        assert!(snap["documents_copied"].as_u64().is_some(), "{snap}");
    }
    let still_copying = aws
        .checkpoint(&table, "items")
        .await
        .is_some_and(|item| item.contains_key("snapshot"));
    eprintln!("writes finished while the copy was still running: {still_copying}");

    let mut last: HashMap<i64, Option<i64>> = (0..EXISTING + 300).map(|i| (i, Some(0))).collect();
    for i in (0..EXISTING).step_by(97) {
        last.insert(i, Some(1));
    }
    for i in EXISTING..EXISTING + 300 {
        last.insert(i, Some(2));
    }
    for i in (5..EXISTING).step_by(1009) {
        last.insert(i, None);
    }
    for i in (3..EXISTING).step_by(499) {
        if last[&i].is_some() {
            last.insert(i, Some(12));
        }
    }
    // Every document's final state is what the consumer's rule keeps.
    let final_state = |ids: &HashMap<i64, Vec<&Record>>, id: &i64, want: &Option<i64>| {
        ids.get(id)
            .and_then(|rs| consumer_state(rs))
            .is_some_and(|r| match want {
                None => r.operation() == "delete",
                Some(v) => r.json["fullDocument"]["v"].as_i64() == Some(*v),
            })
    };
    let records = aws
        .wait_for_records(&stream, Duration::from_secs(300), |records| {
            let ids = by_id(records);
            last.iter().all(|(id, want)| final_state(&ids, id, want))
        })
        .await;
    let ids = by_id(&records);
    for id in 0..EXISTING {
        let rs = &ids[&id];
        let snapshots: Vec<&&Record> = rs.iter().filter(|r| r.operation() == "snapshot").collect();
        // A document deleted during the copy may be gone before its range reached it.
        let deleted = last[&id].is_none();
        assert!(
            snapshots.len() == 1 || (deleted && snapshots.is_empty()),
            "id {id}: {} snapshot records",
            snapshots.len()
        );
        let Some(r) = snapshots.first() else { continue };
        let r = &r.json;
        assert_eq!(r["ns"]["db"], "shop");
        assert_eq!(r["ns"]["coll"], "items");
        assert_eq!(r["documentKey"]["_id"], r["fullDocument"]["_id"]);
        assert!(r["clusterTime"].is_object(), "clusterTime: {r}");
        assert_eq!(snapshots[0].partition_key, id.to_string());
    }
    for id in (0..EXISTING).step_by(97) {
        assert!(
            ids[&id].iter().any(|r| r.operation() == "update"),
            "id {id}: the update made during the copy is missing"
        );
    }
    // Per key, change events in the order they were written (10, 11, 12).
    for i in (3..EXISTING).step_by(499) {
        let versions: Vec<i64> = ids[&i]
            .iter()
            .filter(|r| r.operation() == "update")
            // What each update set (its looked-up `fullDocument` may be a later state).
            .filter_map(|r| r.json["updateDescription"]["updatedFields"]["v"].as_i64())
            .filter(|v| *v >= 10)
            .collect();
        if last[&i].is_some() {
            assert_eq!(versions, [10, 11, 12], "id {i}: updates out of order");
        }
    }
    // The stream was read during the copy, not after it: in some shard a change event comes
    // before a snapshot record.
    let mut shards: HashMap<&str, Vec<&Record>> = HashMap::new();
    for r in &records {
        shards.entry(r.shard.as_str()).or_default().push(r);
    }
    let interleaved = shards.values().any(|rs| {
        let first_change = rs.iter().position(|r| r.operation() != "snapshot");
        let last_copied = rs.iter().rposition(|r| r.operation() == "snapshot");
        matches!((first_change, last_copied), (Some(c), Some(s)) if c < s)
    });
    assert!(
        interleaved,
        "every change event came after the whole copy: the stream was not read beside it"
    );
    // Once the copy is acknowledged the checkpoint no longer says copying.
    aws.wait_for_checkpoint(&table, "items", WAIT, |item| !item.contains_key("snapshot"))
        .await;
    let view = wait_http(port, "/watchers/items", WAIT, |r| {
        r.json()["snapshot"]["state"] == "done"
    })
    .json();
    assert_eq!(
        view["snapshot"]["documents_copied"].as_u64(),
        Some(
            ids.values()
                .filter(|rs| rs.iter().any(|r| r.operation() == "snapshot"))
                .count() as u64
        ),
        "{view}"
    );
    let metrics = request(port, "GET", "/metrics", None, "").body;
    assert!(
        metrics.contains("mongo_watcher_snapshot_progress_ratio{watcher=\"items\"} 1"),
        "{metrics}"
    );
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mongo_watcher_snapshot_records_total{watcher=\"items\"} "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert_eq!(counted, view["snapshot"]["documents_copied"].as_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_killed_midway_continues_from_its_checkpoint() {
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        ..
    } = Env::start("snap", 2).await;
    let client = mongo.client().await;
    let coll = client.database("shop").collection::<Document>("items");
    fill(&coll, 0..EXISTING).await;

    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[watcher_yaml("items", "shop", "items", &stream, SLOW)],
    );
    let mut w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    let item = aws
        .wait_for_checkpoint(&table, "items", WAIT, |item| {
            acknowledged(item).is_some_and(|n| n >= 10_000)
        })
        .await;
    w.kill9();
    let killed_at = ranges(&item).unwrap_or_default();
    let before = aws.read_stream(&stream).await.len();
    assert!(
        (before as i64) < EXISTING,
        "the copy finished before the kill ({before} records)"
    );
    assert!(killed_at.len() > 1, "copied in one range: {killed_at:?}");

    w.restart();
    let done = aws
        .wait_for_checkpoint(&table, "items", Duration::from_secs(300), |item| {
            !item.contains_key("snapshot")
        })
        .await;
    assert!(token_text(&done).is_some());
    let records = aws
        .wait_for_records(&stream, WAIT, |r| by_id(r).len() as i64 >= EXISTING)
        .await;
    let ids = by_id(&records);
    let twice: Vec<i64> = (0..EXISTING)
        .filter(|id| ids.get(id).map_or(0, Vec::len) > 1)
        .collect();
    for id in 0..EXISTING {
        assert!(ids.contains_key(&id), "id {id} never copied");
    }
    eprintln!(
        "killed with ranges {killed_at:?} checkpointed, {before} records in the stream; {} copied twice",
        twice.len()
    );
    // Recopied: per range, what was read but not checkpointed when the process died, at
    // most one `find` batch (1000) per range; a range that started over would recopy every
    // document up to its checkpointed `_id`.
    assert!(
        twice.len() <= 1_000 * killed_at.len(),
        "{} documents copied twice after the restart (ranges {killed_at:?}); first: {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    for id in &twice {
        let (_, _, after) = killed_at
            .iter()
            .find(|(min, max, _)| min.is_none_or(|m| *id >= m) && max.is_none_or(|m| *id < m))
            .expect("every id is in a range");
        assert!(
            after.is_none_or(|a| *id > a),
            "id {id} at or before its range's checkpointed `_id` {after:?} was copied again"
        );
    }
}
