//! End-to-end guarantees of the core pipeline, against SecantusDB, moto and the Kinesis
//! fault-injection proxy. Each test fails if the guarantee it names breaks.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bson::{doc, Document};
use serde_json::json;
use support::*;

struct Env {
    mongo: Mongo,
    moto: Moto,
    proxy: Proxy,
    aws: Aws,
    dir: tempfile::TempDir,
}

async fn env() -> Env {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let proxy = Proxy::start(&moto);
    let aws = Aws::new(&moto).await;
    Env {
        mongo,
        moto,
        proxy,
        aws,
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_deliver_every_operation_to_their_own_streams() {
    let e = env().await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    let (s1, s2) = (unique("orders"), unique("users"));
    e.aws.create_stream(&s1, 2).await;
    e.aws.create_stream(&s2, 1).await;
    let cfg = config_yaml(
        &e.mongo,
        Some(&table),
        &[
            watcher_yaml("orders", "shop", "orders", &s1, ""),
            watcher_yaml(
                "users",
                "shop",
                "users",
                &s2,
                "    partition_key: fullDocument.email\n",
            ),
        ],
    );
    let _w = Watcher::start(e.dir.path(), &cfg, &e.moto.endpoint());
    for name in ["orders", "users"] {
        e.aws
            .wait_for_checkpoint(&table, name, WAIT, |_| true)
            .await;
    }
    let client = e.mongo.client().await;
    let orders = client.database("shop").collection::<Document>("orders");
    let users = client.database("shop").collection::<Document>("users");
    let oid = bson::oid::ObjectId::new();
    orders
        .insert_one(
            doc! {"_id": oid, "total": 10, "at": bson::DateTime::from_millis(1_700_000_000_123)},
        )
        .await
        .unwrap();
    orders
        .update_one(doc! {"_id": oid}, doc! {"$set": {"total": 12}})
        .await
        .unwrap();
    orders
        .replace_one(doc! {"_id": oid}, doc! {"total": 13, "note": "é"})
        .await
        .unwrap();
    orders.delete_one(doc! {"_id": oid}).await.unwrap();
    users
        .insert_one(doc! {"_id": 1, "email": "a@example.com"})
        .await
        .unwrap();
    users
        .insert_one(doc! {"_id": 2, "email": "b@example.com"})
        .await
        .unwrap();

    let recs = e.aws.wait_for_records(&s1, WAIT, |r| r.len() >= 4).await;
    let ops: Vec<&str> = recs.iter().map(Record::operation).collect();
    assert_eq!(ops, ["insert", "update", "replace", "delete"]);
    for r in &recs {
        assert_eq!(r.partition_key, oid.to_hex(), "ObjectId keys are their hex");
        assert_eq!(r.json["documentKey"]["_id"]["$oid"], oid.to_hex());
        assert_eq!(r.json["ns"], json!({"db": "shop", "coll": "orders"}));
    }
    assert_eq!(
        recs[0].json["fullDocument"]["at"],
        json!({"$date": "2023-11-14T22:13:20.123Z"})
    );
    assert_eq!(
        recs[1].json["updateDescription"]["updatedFields"],
        json!({"total": 12})
    );
    // updateLookup is the default: update events carry `fullDocument` (looked up when read,
    // so it may already be null after the delete).
    assert!(
        recs[1].json.get("fullDocument").is_some(),
        "no fullDocument on update"
    );
    assert_eq!(recs[2].json["fullDocument"]["note"], "é");
    assert!(
        String::from_utf8_lossy(&recs[2].raw).contains(r#""note": "\u00e9""#),
        "python json.dumps layout"
    );

    let recs = e.aws.wait_for_records(&s2, WAIT, |r| r.len() >= 2).await;
    let keys: Vec<&str> = recs.iter().map(|r| r.partition_key.as_str()).collect();
    assert_eq!(keys, ["a@example.com", "b@example.com"]);
    // Nothing from one collection went to the other's stream.
    assert!(recs.iter().all(|r| r.json["ns"]["coll"] == "users"));
    // The checkpoint moves once the records are acknowledged.
    e.aws
        .wait_for_checkpoint(&table, "orders", WAIT, |item| revision(item) >= 2)
        .await;
}

/// Acks held back by the proxy (records in Kinesis, watcher not told) and records rejected
/// outright must both keep the checkpoint where it was; after kill -9 nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_never_moves_ahead_of_acks() {
    let e = env().await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    e.aws.create_stream(&stream, 2).await;
    let cfg = config_yaml(
        &e.mongo,
        Some(&table),
        &[watcher_yaml("w", "db", "c", &stream, "")],
    );
    let coll = e
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    let mut w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    e.aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    insert_ids(&coll, [0]).await;
    e.aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &[0]))
        .await;
    let acked = e
        .aws
        .wait_for_checkpoint(&table, "w", WAIT, |i| revision(i) >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let acked = e.aws.checkpoint(&table, "w").await.unwrap_or(acked);

    // Phase A: the records land but their acks are held. Which of them land depends on how
    // the reads fell into calls (a held call keeps its slot, so under load the later ones may
    // wait behind it): one landed is enough, phase C checks that all arrive.
    e.proxy.rules(json!({"hold": true}));
    let a: Vec<i64> = (1..=10).collect();
    insert_ids(&coll, a.clone()).await;
    e.aws
        .wait_for_records(&stream, WAIT, |r| a.iter().any(|&id| count(r, id) > 0))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = e.aws.checkpoint(&table, "w").await.expect("checkpoint");
    assert_eq!(
        token_text(&now),
        token_text(&acked),
        "checkpoint moved while acks were held"
    );
    w.kill9();
    e.proxy.reset();

    // Phase B: every record is rejected; the restarted watcher must not pass them either.
    e.proxy.rules(json!({"fail_record_rate": 1.0}));
    w.restart();
    let b: Vec<i64> = (11..=20).collect();
    insert_ids(&coll, b.clone()).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let now = e.aws.checkpoint(&table, "w").await.expect("checkpoint");
    assert_eq!(
        token_text(&now),
        token_text(&acked),
        "checkpoint moved past rejected records"
    );
    assert!(e.proxy.stats()["records_failed"].as_u64().unwrap_or(0) > 0);
    w.kill9();
    e.proxy.reset();

    // Phase C: a healthy restart delivers everything that was never acknowledged.
    w.restart();
    let all: Vec<i64> = (0..=20).collect();
    e.aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &all))
        .await;
    e.aws
        .wait_for_checkpoint(&table, "w", WAIT, |i| token_text(i) != token_text(&acked))
        .await;
}

/// A first start at `latest` stores its position before anything else, so a crash before the
/// first acknowledged batch re-reads what was written meanwhile instead of skipping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_first_ack_after_latest_skips_nothing() {
    let e = env().await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    e.aws.create_stream(&stream, 1).await;
    // No periodic checkpoint can help: only the position stored at the first start can.
    let cfg = config_yaml(
        &e.mongo,
        Some(&table),
        &[watcher_yaml(
            "w",
            "db",
            "c",
            &stream,
            "    checkpoint_interval: 1h\n",
        )],
    );
    let coll = e
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    insert_ids(&coll, [-1]).await; // before the first start: not expected
    e.proxy.rules(json!({"fail_record_rate": 1.0}));
    let mut w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    w.wait_for_log("watcher running", WAIT);
    let first = e
        .aws
        .checkpoint(&table, "w")
        .await
        .expect("start position stored");
    let ids: Vec<i64> = (1..=10).collect();
    insert_ids(&coll, ids.clone()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        token_text(&e.aws.checkpoint(&table, "w").await.unwrap()),
        token_text(&first)
    );
    w.kill9();
    e.proxy.reset();
    w.restart();
    let recs = e
        .aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &ids))
        .await;
    assert!(
        !ids_of(&recs).contains(&-1),
        "a write before the first start was delivered"
    );
}

/// SIGTERM flushes and writes the final checkpoint: a restart sends nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_delivers_each_event_exactly_once() {
    let e = env().await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    e.aws.create_stream(&stream, 2).await;
    // A long checkpoint interval: only the shutdown checkpoint can prevent duplicates.
    let cfg = config_yaml(
        &e.mongo,
        Some(&table),
        &[watcher_yaml(
            "w",
            "db",
            "c",
            &stream,
            "    checkpoint_interval: 1h\n",
        )],
    );
    let coll = e
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    let mut w = Watcher::start(e.dir.path(), &cfg, &e.moto.endpoint());
    e.aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    let first: Vec<i64> = (0..50).collect();
    insert_ids(&coll, first.clone()).await;
    e.aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &first))
        .await;
    let (code, took) = w.terminate();
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
    let second: Vec<i64> = (50..100).collect();
    insert_ids(&coll, second.clone()).await;
    w.restart();
    let all: Vec<i64> = (0..100).collect();
    e.aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &all))
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let recs = e.aws.read_stream(&stream).await;
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for id in ids_of(&recs) {
        *counts.entry(id).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "duplicates after SIGTERM restart: {dups:?}"
    );
    assert_eq!(recs.len(), 100);
}

/// Under partial failures and lost acks, each key's records reach Kinesis in write order:
/// duplicates may repeat a record, but a later version never precedes an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_under_partial_failures() {
    let e = env().await;
    let stream = unique("s");
    e.aws.create_stream(&stream, 2).await;
    let cfg = config_yaml(
        &e.mongo,
        None,
        &[watcher_yaml(
            "w",
            "db",
            "c",
            &stream,
            "    full_document: off\n",
        )],
    );
    let coll = e
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    e.proxy.rules(json!({
        "fail_record_rate": 0.3, "ack_lost_rate": 0.1, "fail_call_rate": 0.05, "seed": 7
    }));
    let _w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    tokio::time::sleep(Duration::from_secs(2)).await;
    const KEYS: i64 = 20;
    const VERSIONS: i64 = 25;
    insert_ids(&coll, 0..KEYS).await;
    for v in 1..=VERSIONS {
        for k in 0..KEYS {
            coll.update_one(doc! {"_id": k}, doc! {"$set": {"v": v}})
                .await
                .unwrap();
        }
    }
    let recs = e
        .aws
        .wait_for_records(&stream, Duration::from_secs(120), |r| {
            let mut seen: HashMap<i64, HashSet<i64>> = HashMap::new();
            for rec in r.iter().filter(|r| r.operation() == "update") {
                if let (Some(k), Some(v)) = (
                    rec.id(),
                    rec.json["updateDescription"]["updatedFields"]["v"].as_i64(),
                ) {
                    seen.entry(k).or_default().insert(v);
                }
            }
            seen.len() == KEYS as usize && seen.values().all(|s| s.len() == VERSIONS as usize)
        })
        .await;
    let stats = e.proxy.stats();
    assert!(
        stats["records_failed"].as_u64().unwrap_or(0) > 0,
        "no failures injected: {stats}"
    );
    assert!(
        stats["records_ack_lost"].as_u64().unwrap_or(0) > 0,
        "no lost acks injected: {stats}"
    );
    let mut last: HashMap<i64, i64> = HashMap::new();
    for rec in &recs {
        let Some(k) = rec.id() else { continue };
        let v = match rec.operation() {
            "insert" => 0,
            _ => rec.json["updateDescription"]["updatedFields"]["v"]
                .as_i64()
                .unwrap_or(-1),
        };
        let prev = last.insert(k, v).unwrap_or(-1);
        assert!(v >= prev, "key {k}: version {v} arrived after {prev}");
    }
}

/// Repeated kill -9 under a steady write load loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loss_over_repeated_kill9_under_load() {
    let e = env().await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    e.aws.create_stream(&stream, 2).await;
    let cfg = config_yaml(
        &e.mongo,
        Some(&table),
        &[watcher_yaml("w", "db", "c", &stream, "")],
    );
    let coll = e
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    e.proxy.rules(json!({"fail_record_rate": 0.05, "seed": 3}));
    let mut w = Watcher::start_with_env(
        e.dir.path(),
        &cfg,
        &e.proxy.endpoint(),
        &[("RUST_LOG", "info,watchers=trace")],
    );
    e.aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    let writer = {
        let coll = coll.clone();
        tokio::spawn(async move {
            let mut next = 0_i64;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
            while tokio::time::Instant::now() < deadline {
                coll.insert_one(doc! {"_id": next, "v": 0_i64})
                    .await
                    .expect("insert");
                next += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            next
        })
    };
    for pause in [1500_u64, 900, 2200, 700] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        w.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        w.restart();
    }
    let written = writer.await.expect("writer");
    assert!(written > 200, "the load was too light: {written}");
    let all: Vec<i64> = (0..written).collect();
    let recs = e
        .aws
        .wait_for_ids(&stream, &all, Duration::from_secs(180))
        .await;
    assert!(ids_of(&recs).len() >= written as usize);
}

/// A missing checkpoint table is named in the logs, retried, and picked up once created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_checkpoint_table_is_named_and_retried() {
    let e = env().await;
    let table = unique("late-table");
    let stream = unique("s");
    e.aws.create_stream(&stream, 1).await;
    let cfg = config_yaml(
        &e.mongo,
        Some(&table),
        &[watcher_yaml("w", "db", "c", &stream, "")],
    );
    let w = Watcher::start(e.dir.path(), &cfg, &e.moto.endpoint());
    w.wait_for_log(&format!("checkpoint table `{table}` does not exist"), WAIT);
    assert!(
        w.logs().contains("hash key named `watcher`"),
        "no hint on how to create it"
    );
    e.aws.create_checkpoint_table(&table).await;
    e.aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    let coll = e
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    insert_ids(&coll, [1, 2, 3]).await;
    e.aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &[1, 2, 3]))
        .await;
}

/// Forty watchers on one client: every stream opens and delivers (the pool is sized to the
/// watchers), and JSON logs carry each watcher's name; restarted, they load their checkpoints
/// together and each resumes at its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_watchers_on_one_client_with_json_logs() {
    let e = env().await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    let stream = unique("many");
    e.aws.create_stream(&stream, 4).await;
    let watchers: Vec<String> = (0..40)
        .map(|i| watcher_yaml(&format!("w{i}"), "many", &format!("c{i}"), &stream, ""))
        .collect();
    let cfg = config_yaml(&e.mongo, Some(&table), &watchers);
    let started = std::time::Instant::now();
    let mut w = Watcher::start_with_env(
        e.dir.path(),
        &cfg,
        &e.moto.endpoint(),
        &[("LOG_FORMAT", "json"), ("LOG_LEVEL", "info")],
    );
    for i in 0..40 {
        e.aws
            .wait_for_checkpoint(&table, &format!("w{i}"), WAIT, |_| true)
            .await;
    }
    eprintln!(
        "40 watchers stored their start positions after {:?}",
        started.elapsed()
    );
    let client = e.mongo.client().await;
    for i in 0..40_i64 {
        let coll = client
            .database("many")
            .collection::<Document>(&format!("c{i}"));
        insert_ids(&coll, [i]).await;
    }
    let all: Vec<i64> = (0..40).collect();
    e.aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &all))
        .await;
    let logs = w.logs();
    let mut named = HashSet::new();
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        if let Some(name) = v["span"]["watcher"].as_str() {
            named.insert(name.to_owned());
        }
    }
    assert_eq!(named.len(), 40, "watcher names in logs: {named:?}");

    // Restarted, the forty load their checkpoints together (BatchGetItem, up to 100 a call)
    // and each resumes at its own: a second insert each arrives, and nothing again.
    let together = |w: &Watcher| w.logs().matches("checkpoints loaded together").count();
    let before = together(&w);
    let (code, _) = w.terminate();
    assert_eq!(code, Some(0));
    w.restart();
    let deadline = std::time::Instant::now() + WAIT;
    while together(&w) <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no BatchGetItem of the checkpoints after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..40_i64 {
        let coll = client
            .database("many")
            .collection::<Document>(&format!("c{i}"));
        insert_ids(&coll, [100 + i]).await;
    }
    let all: Vec<i64> = (0..40).chain(100..140).collect();
    let records = e
        .aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &all))
        .await;
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for r in &records {
        if let Some(id) = r.id() {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert!(
        seen.values().all(|&n| n == 1),
        "delivered more than once after the restart: {:?}",
        seen.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
    assert!(!w.logs().contains("BatchGetItem is not granted"));
    assert!(
        w.logs().contains("first checkpoints written together"),
        "the forty first checkpoints were written one PutItem each"
    );
}

/// First checkpoints of watchers starting together are written together (TransactWriteItems,
/// up to 100 a call), each keeping its own condition: a watcher whose item appeared since it
/// loaded gets its conflict, naming the revision found, and the others are written. A
/// transaction whose answer is lost leaves each of its writes in doubt (each watcher's
/// checkpointer reads back), and a refused one falls back to PutItem each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_checkpoints_are_written_together_each_with_its_own_condition() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use watchers::checkpoint::{Checkpoint, CheckpointStore};
    use watchers::WatcherError;
    let e = env().await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    // A second writer got to `w3` first.
    e.aws
        .dynamodb
        .put_item()
        .table_name(&table)
        .item("watcher", AttributeValue::S("w3".into()))
        .item("revision", AttributeValue::N("7".into()))
        .item("paused", AttributeValue::Bool(false))
        .item(
            "resume_token",
            AttributeValue::S(r#"{"_data": "00"}"#.into()),
        )
        .send()
        .await
        .expect("second writer");
    let through_proxy = Aws::at(&e.proxy.endpoint()).await;
    let store = CheckpointStore::new(through_proxy.dynamodb.clone(), &table);
    let at = Checkpoint {
        token: Some(bson::Bson::Document(doc! {"_data": "0001"})),
        cluster_time: None,
        paused: false,
        namespace: Some("db.c".into()),
    };
    let save_all = |names: Vec<String>| {
        let (store, at) = (&store, &at);
        futures_util::future::join_all(names.into_iter().map(move |name| async move {
            let result = store.save(&name, None, at, None).await;
            (name, result)
        }))
    };
    // Counts the TransactWriteItems calls (held for 0 ms, then answered).
    e.proxy.rules(json!({"dynamo_hold": {
        "target": "TransactWriteItems", "count": 100, "hold_ms": 0, "then": "answer",
    }}));
    let names: Vec<String> = (0..150).map(|i| format!("w{i}")).collect();
    for (name, result) in save_all(names).await {
        if name == "w3" {
            match result {
                Err(WatcherError::CheckpointConflict { found, .. }) => assert_eq!(found, "7"),
                other => panic!("w3: {other:?}"),
            }
            continue;
        }
        assert_eq!(result.expect(&name), 1, "{name}");
        let item = e.aws.checkpoint(&table, &name).await.expect(&name);
        assert_eq!(revision(&item), 1, "{name}");
        assert_eq!(item["namespace"].as_s().unwrap(), "db.c");
    }
    let calls = e.proxy.stats()["dynamo_held"].as_u64().unwrap();
    assert!(
        (2..=10).contains(&calls),
        "150 first writes made {calls} TransactWriteItems calls"
    );

    // The answer of a transaction is lost: each of its writes is in doubt, and applied.
    e.proxy.reset();
    e.proxy.rules(json!({"dynamo_hold": {
        "target": "TransactWriteItems", "count": 1, "hold_ms": 0, "then": "drop",
    }}));
    let names: Vec<String> = (0..20).map(|i| format!("lost{i}")).collect();
    let results = save_all(names).await;
    let in_doubt = results
        .iter()
        .filter(|(_, r)| matches!(r, Err(WatcherError::CheckpointInDoubt { .. })))
        .count();
    assert!(
        in_doubt >= 2,
        "no write of the lost transaction was in doubt: {results:?}"
    );
    for (name, result) in &results {
        assert!(
            matches!(result, Ok(1) | Err(WatcherError::CheckpointInDoubt { .. })),
            "{name}: {result:?}"
        );
        assert_eq!(
            revision(&e.aws.checkpoint(&table, name).await.expect(name)),
            1
        );
    }

    // Refused (a policy denying it): PutItem each, all written.
    e.proxy.reset();
    e.proxy
        .rules(json!({"access_denied": ["TransactWriteItems"]}));
    let names: Vec<String> = (0..20).map(|i| format!("denied{i}")).collect();
    for (name, result) in save_all(names).await {
        assert_eq!(result.expect(&name), 1, "{name}");
    }
    assert!(e.proxy.stats()["access_denied"].as_u64().unwrap() >= 1);
}

/// A password in the URI or the config never reaches a log line, whatever the server says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_reach_the_logs() {
    let e = env().await;
    let stream = unique("s");
    e.aws.create_stream(&stream, 1).await;
    for (i, (uri_pw, cfg_pw)) in [
        ("pw-in-uri-4711", None),
        ("pw-uri-4713", Some("pw-in-config-4712")),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = e.dir.path().join(format!("run{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let uri = format!(
            "mongodb://app:{uri_pw}@127.0.0.1:{}/?directConnection=true",
            e.mongo.port
        );
        let mut cfg = config_yaml(&e.mongo, None, &[watcher_yaml("w", "db", "c", &stream, "")])
            .replace(&format!("\"{}\"", e.mongo.uri()), &format!("\"{uri}\""));
        if let Some(pw) = cfg_pw {
            cfg = cfg.replace("mongodb:\n", &format!("mongodb:\n  password: \"{pw}\"\n"));
        }
        let w = Watcher::start(&dir, &cfg, &e.moto.endpoint());
        tokio::time::sleep(Duration::from_secs(4)).await;
        let logs = w.logs();
        assert!(
            logs.contains("opening change stream") || logs.contains("mongodb"),
            "{logs}"
        );
        for secret in [uri_pw, cfg_pw.unwrap_or(uri_pw)] {
            assert!(!logs.contains(secret), "secret {secret} in logs:\n{logs}");
        }
    }
}
