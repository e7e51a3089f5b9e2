//! `on_oversized: s3` (claim-check) against SecantusDB and moto (Kinesis, DynamoDB and S3 on
//! one endpoint): an event over the stream's record limit is written whole to S3 and a small
//! pointer record takes its place in the stream, in order with the events of its key; the
//! event is checkpointed only once the object is written and the pointer acknowledged, so an
//! S3 outage holds the watcher (`backing_off`, nothing read after the event overtakes it), an
//! IAM refusal of `s3:PutObject` is named as such, and a kill -9 loses nothing.

mod support;

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use bson::doc;
use sha2::{Digest, Sha256};
use support::*;

/// Over the default 1 MiB record limit, well under MongoDB's 16 MiB.
const BIG: usize = 1536 * 1024;

/// `full_document: off`, so that only the event that carries the large value is oversized
/// (with `updateLookup` every later update of the document would be too).
fn claim_yaml(bucket: &str) -> String {
    format!(
        "    on_oversized: s3\n    s3: {{bucket: {bucket}, prefix: cdc/}}\n    full_document: off\n"
    )
}

/// A one-watcher config (`w` on `db.c`) with the API on `port`.
fn config(mongo: &Mongo, table: &str, stream: &str, bucket: &str, port: u16) -> String {
    config_yaml(
        mongo,
        Some(table),
        &[watcher_yaml("w", "db", "c", stream, &claim_yaml(bucket))],
    )
    .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"))
}

/// A test's services: the fixtures' [`Env`] (a 1-shard stream, a checkpoint table, a port for
/// the control plane), S3 on the same moto, and a bucket name (the test creates the bucket, or
/// leaves it missing).
struct Claims {
    env: Env,
    s3: S3,
    bucket: String,
}

impl Claims {
    async fn new() -> Self {
        let env = Env::start("s", 1).await;
        let s3 = S3::new(&env.moto).await;
        Self {
            env,
            s3,
            bucket: unique("claims"),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The records of partition key `key`, in stream order.
fn of_key<'a>(records: &'a [Record], key: &str) -> Vec<&'a Record> {
    records.iter().filter(|r| r.partition_key == key).collect()
}

fn is_pointer(r: &Record) -> bool {
    r.json.get("claimCheck").is_some()
}

/// `(t, i)` of an Extended JSON timestamp.
fn ts(v: &serde_json::Value) -> (u64, u64) {
    let t = &v["$timestamp"];
    (
        t["t"].as_u64().expect("timestamp t"),
        t["i"].as_u64().expect("timestamp i"),
    )
}

/// `(t, i)` of the checkpoint item's `cluster_time`: the newest event at or behind it.
fn checkpoint_ts(item: &HashMap<String, AttributeValue>) -> Option<(u64, u64)> {
    let m = item.get("cluster_time")?.as_m().ok()?;
    let n = |k: &str| m.get(k)?.as_n().ok()?.parse().ok();
    Some((n("t")?, n("i")?))
}

/// The pointer's object holds the whole event, as its record would have been: its length and
/// digest are the pointer's, and it is the event the pointer stands for. Returns its JSON.
async fn check_object(s3: &S3, bucket: &str, pointer: &Record) -> serde_json::Value {
    let cc = &pointer.json["claimCheck"];
    assert_eq!(cc["bucket"], bucket, "{}", pointer.json);
    let key = cc["key"].as_str().expect("claimCheck.key");
    assert!(
        key.starts_with("cdc/w/") && key.ends_with(".json"),
        "key {key}"
    );
    let body = s3
        .get_object(bucket, key)
        .await
        .unwrap_or_else(|| panic!("object {key} missing"));
    assert_eq!(Some(body.len() as u64), cc["bytes"].as_u64(), "bytes");
    assert_eq!(
        cc["sha256"].as_str(),
        Some(sha256_hex(&body).as_str()),
        "sha256"
    );
    let event: serde_json::Value = serde_json::from_slice(&body).expect("the object is JSON");
    for field in ["_id", "operationType", "ns", "documentKey", "clusterTime"] {
        assert_eq!(event[field], pointer.json[field], "{field}");
    }
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_goes_to_s3_and_a_pointer_takes_its_place_in_order() {
    let Claims { env, s3, bucket } = Claims::new().await;
    let c = env.coll().await;
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        port,
    } = env;
    s3.create_bucket(&bucket).await;
    let w = Watcher::start(
        dir.path(),
        &config(&mongo, &table, &stream, &bucket, port),
        &moto.endpoint(),
    );
    aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;

    let big = "x".repeat(BIG);
    c.insert_one(doc! {"_id": 1_i64, "v": 0_i64}).await.unwrap();
    c.insert_one(doc! {"_id": 2_i64, "v": 0_i64}).await.unwrap();
    c.update_one(doc! {"_id": 1_i64}, doc! {"$set": {"blob": &big}})
        .await
        .unwrap();
    c.insert_one(doc! {"_id": 3_i64, "v": 0_i64}).await.unwrap();
    c.update_one(doc! {"_id": 1_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();

    let recs = aws
        .wait_for_records(&stream, WAIT, |r| count(r, 1) >= 3 && has_all(r, &[2, 3]))
        .await;
    assert_eq!(count(&recs, 1), 3, "each event of key 1 once");
    let ones = of_key(&recs, "1");
    assert_eq!(
        ones.iter().map(|r| r.operation()).collect::<Vec<_>>(),
        ["insert", "update", "update"]
    );
    assert_eq!(
        ones.iter().map(|r| is_pointer(r)).collect::<Vec<_>>(),
        [false, true, false],
        "the pointer sits between the smaller events of its key"
    );
    assert_eq!(ones[2].json["updateDescription"]["updatedFields"]["v"], 2);
    assert!(recs.iter().filter(|r| is_pointer(r)).count() == 1);

    let pointer = ones[1];
    let fields: Vec<&str> = pointer
        .json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "_id",
            "operationType",
            "ns",
            "documentKey",
            "clusterTime",
            "claimCheck"
        ]
    );
    let claim: Vec<&str> = pointer.json["claimCheck"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(claim, ["bucket", "key", "bytes", "sha256"]);
    assert_eq!(
        pointer.json["ns"],
        serde_json::json!({"db": "db", "coll": "c"})
    );
    assert_eq!(pointer.json["documentKey"], serde_json::json!({"_id": 1}));
    assert!(
        pointer.raw.len() < 1024,
        "a small pointer: {}",
        pointer.raw.len()
    );
    let event = check_object(&s3, &bucket, pointer).await;
    assert_eq!(
        event["updateDescription"]["updatedFields"]["blob"].as_str(),
        Some(big.as_str()),
        "the object holds the whole event"
    );
    assert!(pointer.json["claimCheck"]["bytes"].as_u64().unwrap() > BIG as u64);

    // Checkpointed past the pointer and everything after it.
    let last = recs
        .iter()
        .map(|r| ts(&r.json["clusterTime"]))
        .max()
        .unwrap();
    aws.wait_for_checkpoint(&table, "w", WAIT, |item| {
        checkpoint_ts(item).is_some_and(|t| t >= last)
    })
    .await;
    let metrics = request(port, "GET", "/metrics", None, "").body;
    assert!(
        metrics.contains("mongo_watcher_records_claim_checked_total{watcher=\"w\"} 1"),
        "claim-checked events counted"
    );
    assert!(w.logs().contains("oversized event written to s3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_failure_holds_the_watcher_backing_off_then_delivers_without_loss() {
    let Claims { env, s3, bucket } = Claims::new().await;
    let c = env.coll().await;
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        port,
    } = env;
    // The bucket does not exist yet.
    let _w = Watcher::start(
        dir.path(),
        &config(&mongo, &table, &stream, &bucket, port),
        &moto.endpoint(),
    );
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);

    c.insert_one(doc! {"_id": 1_i64, "v": 0_i64}).await.unwrap();
    c.insert_one(doc! {"_id": 2_i64, "blob": "x".repeat(BIG)})
        .await
        .unwrap();
    c.insert_one(doc! {"_id": 3_i64, "v": 0_i64}).await.unwrap();
    c.update_one(doc! {"_id": 2_i64}, doc! {"$set": {"v": 1_i64}})
        .await
        .unwrap();

    let shown = wait_http(port, "/watchers/w", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "backing_off"
    })
    .json();
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!("s3 bucket `{bucket}`")) && reason.contains("NoSuchBucket"),
        "{shown}"
    );
    let r = request(port, "GET", "/readyz", None, "");
    assert_eq!(r.status, 503, "{}", r.body);
    // Held a while: the event before it is delivered, nothing from it on is.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let recs = aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &[1]))
        .await;
    assert_eq!(
        ids_of(&recs),
        [1],
        "nothing read after the held event overtakes it"
    );

    s3.create_bucket(&bucket).await;
    let recs = aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &[1, 3]) && count(r, 2) >= 2)
        .await;
    for (id, n) in [(1, 1), (2, 2), (3, 1)] {
        assert_eq!(count(&recs, id), n, "{id}");
    }
    let twos = of_key(&recs, "2");
    assert!(is_pointer(twos[0]) && !is_pointer(twos[1]), "pointer first");
    assert_eq!(twos[1].operation(), "update");
    check_object(&s3, &bucket, twos[0]).await;
    wait_http(port, "/watchers/w", WAIT, |r| {
        r.json()["state"] == "running"
    });
    let last = recs
        .iter()
        .map(|r| ts(&r.json["clusterTime"]))
        .max()
        .unwrap();
    aws.wait_for_checkpoint(&table, "w", WAIT, |item| {
        checkpoint_ts(item).is_some_and(|t| t >= last)
    })
    .await;
    let w = request(port, "GET", "/watchers/w", None, "").json();
    assert!(
        w["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("NoSuchBucket")),
        "{w}"
    );
}

/// IAM refusing `s3:PutObject` (S3's 403 `AccessDenied`, injected by the proxy in front of
/// moto) holds the watcher `backing_off` at once, with a reason that names the permission and
/// the bucket; nothing read after the event overtakes it; once the permission is granted the
/// event goes to S3 and its pointer to the stream, and the watcher is `running` again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_access_denied_names_the_permission_then_delivers_once_granted() {
    let Claims { env, s3, bucket } = Claims::new().await;
    let c = env.coll().await;
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        port,
    } = env;
    let proxy = Proxy::start(&moto);
    s3.create_bucket(&bucket).await;
    proxy.rules(serde_json::json!({"access_denied": ["PutObject"]}));
    let _w = Watcher::start(
        dir.path(),
        &config(&mongo, &table, &stream, &bucket, port),
        &proxy.endpoint(),
    );
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);

    c.insert_one(doc! {"_id": 1_i64, "v": 0_i64}).await.unwrap();
    c.insert_one(doc! {"_id": 2_i64, "blob": "x".repeat(BIG)})
        .await
        .unwrap();
    c.insert_one(doc! {"_id": 3_i64, "v": 0_i64}).await.unwrap();

    let shown = wait_http(port, "/watchers/w", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "backing_off"
    })
    .json();
    let reason = shown["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("access denied")
            && reason.contains("s3:PutObject")
            && reason.contains(&format!("S3 bucket `{bucket}`")),
        "{shown}"
    );
    let r = request(port, "GET", "/readyz", None, "");
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(proxy.stats()["access_denied"].as_u64() >= Some(1));
    // Held a while: the event before it is delivered, nothing from it on is.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let recs = aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &[1]))
        .await;
    assert_eq!(
        ids_of(&recs),
        [1],
        "nothing read after the held event overtakes it"
    );

    // The permission granted: the same event goes to S3, its pointer in order.
    proxy.rules(serde_json::json!({}));
    let recs = aws
        .wait_for_records(&stream, WAIT, |r| has_all(r, &[1, 2, 3]))
        .await;
    assert_eq!(ids_of(&recs), [1, 2, 3], "each once, in order");
    let twos = of_key(&recs, "2");
    assert!(is_pointer(twos[0]), "the oversized event became a pointer");
    check_object(&s3, &bucket, twos[0]).await;
    wait_http(port, "/watchers/w", WAIT, |r| {
        r.json()["state"] == "running"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_an_upload_loses_nothing() {
    let Claims { env, s3, bucket } = Claims::new().await;
    let c = env.coll().await;
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        port,
    } = env;
    let mut w = Watcher::start(
        dir.path(),
        &config(&mongo, &table, &stream, &bucket, port),
        &moto.endpoint(),
    );
    aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;

    c.insert_one(doc! {"_id": 1_i64, "v": 0_i64}).await.unwrap();
    c.insert_one(doc! {"_id": 2_i64, "blob": "y".repeat(BIG)})
        .await
        .unwrap();
    c.insert_one(doc! {"_id": 3_i64, "v": 0_i64}).await.unwrap();
    // The upload of 2 is failing (no bucket) while 1 is delivered and checkpointed.
    w.wait_for_log("claim-check upload to s3 failed", WAIT);
    aws.wait_for_records(&stream, WAIT, |r| has_all(r, &[1]))
        .await;
    w.kill9();
    // Not checkpointed past the held event: the stream ends at 1.
    let held = aws.checkpoint(&table, "w").await.expect("checkpoint");
    let before = aws.read_stream(&stream).await;
    let one = ts(&before[0].json["clusterTime"]);
    // Either 1's position or, killed before the next checkpoint tick, the start stored before
    // reading (a token without a cluster time): never past 2.
    assert!(checkpoint_ts(&held).is_none_or(|t| t <= one), "{held:?}");
    assert_eq!(ids_of(&before), [1]);

    s3.create_bucket(&bucket).await;
    w.restart();
    c.insert_one(doc! {"_id": 4_i64, "blob": "z".repeat(BIG)})
        .await
        .unwrap();
    c.insert_one(doc! {"_id": 5_i64, "v": 0_i64}).await.unwrap();
    let recs = aws.wait_for_ids(&stream, &[1, 2, 3, 4, 5], WAIT).await;
    for id in 2..=5 {
        assert_eq!(count(&recs, id), 1, "{id} once");
    }
    for id in ["2", "4"] {
        let rs = of_key(&recs, id);
        assert!(is_pointer(rs[0]), "{id} is claim-checked");
        check_object(&s3, &bucket, rs[0]).await;
    }
    assert_eq!(
        s3.keys(&bucket, "cdc/w/").await.len(),
        2,
        "one object per event"
    );
    let last = recs
        .iter()
        .map(|r| ts(&r.json["clusterTime"]))
        .max()
        .unwrap();
    aws.wait_for_checkpoint(&table, "w", WAIT, |item| {
        checkpoint_ts(item).is_some_and(|t| t >= last)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_failing_upload_leaves_the_event_to_the_next_start() {
    let Claims { env, s3, bucket } = Claims::new().await;
    let c = env.coll().await;
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        port,
    } = env;
    let mut w = Watcher::start(
        dir.path(),
        &config(&mongo, &table, &stream, &bucket, port),
        &moto.endpoint(),
    );
    aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    c.insert_one(doc! {"_id": 1_i64, "v": 0_i64}).await.unwrap();
    c.insert_one(doc! {"_id": 2_i64, "blob": "y".repeat(BIG)})
        .await
        .unwrap();
    aws.wait_for_records(&stream, WAIT, |r| has_all(r, &[1]))
        .await;
    w.wait_for_log("claim-check upload to s3 failed", WAIT);

    // The loop still answers while the upload is held: SIGTERM drains (the upload keeps
    // failing through the drain deadline) and exits 3, nothing lost but not clean.
    let (code, took) = w.terminate();
    assert_eq!(code, Some(3), "took {took:?}");
    assert!(
        w.logs()
            .contains("claim-check upload unfinished; the event will be read again after restart"),
        "the unfinished upload is named"
    );
    let one = ts(&aws.read_stream(&stream).await[0].json["clusterTime"]);
    let item = aws.checkpoint(&table, "w").await.expect("checkpoint");
    assert!(checkpoint_ts(&item).is_some_and(|t| t <= one), "{item:?}");

    s3.create_bucket(&bucket).await;
    w.restart();
    let recs = aws.wait_for_ids(&stream, &[1, 2], WAIT).await;
    assert_eq!(count(&recs, 2), 1);
    check_object(&s3, &bucket, of_key(&recs, "2")[0]).await;
}
