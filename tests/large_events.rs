//! Change events over 16 MiB (issue 9, part 5): with `split_large_events` `auto` or `on` the
//! change stream ends with `$changeStreamSplitLargeEvent`, the server delivers such an event as
//! fragments, and the watcher joins them into one event before encoding it; that event then
//! meets the record size rules (`on_oversized`) whole. Against SecantusDB (which has the stage,
//! splits an update of a 9 MB document with pre- and post-images into two fragments, and also
//! delivers the event whole without the stage), moto and the real binary; a wire proxy makes
//! the server refuse the stage, or slows its replies so that the watcher can be killed between
//! two fragments.

mod support;

use std::time::Duration;

use bson::{doc, Document};
use support::*;

/// The 9 MB string of the large document: an update with its pre- and post-image is about
/// 18 MB, over the 16 MiB that one BSON document may hold.
fn blob() -> String {
    "x".repeat(9_000_000)
}

const SIXTEEN_MIB: usize = 16 * 1024 * 1024;

async fn enable_pre_images(db: &mongodb::Database, coll: &str) {
    db.create_collection(coll).await.expect("create collection");
    db.run_command(doc! {
        "collMod": coll,
        "changeStreamPreAndPostImages": {"enabled": true},
    })
    .await
    .expect("collMod changeStreamPreAndPostImages");
}

/// The value of one series in the /metrics exposition (`name{labels}` as Prometheus writes
/// it, labels sorted), if exposed.
fn metric(port: u16, series: &str) -> Option<f64> {
    let body = request(port, "GET", "/metrics", None, "").body;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The number after `key=` in a log line.
fn number_after(line: &str, key: &str) -> Option<usize> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The log lines of `watcher` that contain `needle`.
fn lines_of(w: &Watcher, watcher: &str, needle: &str) -> Vec<String> {
    let tag = format!("watcher={watcher}");
    w.logs()
        .lines()
        .filter(|l| l.contains(&tag) && l.contains(needle))
        .map(str::to_owned)
        .collect()
}

const SKIPPED: &str = "record over the stream's limit skipped";
const REASSEMBLED: &str = "change event reassembled from fragments";

/// One collection with pre-images, watched three ways: `auto` with `on_oversized: skip`,
/// `off` with skip, and `on` with `on_oversized: fail`. On streams raised to 10 MiB, so the
/// 9 MB insert is delivered and only the ~18 MB update is oversized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_event_is_joined_and_then_skipped_or_failed_whole() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let (s_skip, s_off, s_fail) = (unique("skip"), unique("off"), unique("fail"));
    for s in [&s_skip, &s_off, &s_fail] {
        aws.create_stream(s, 1).await;
        aws.raise_record_size(s, 10 * 1024).await;
    }
    let client = mongo.client().await;
    let db = client.database("shop");
    enable_pre_images(&db, "items").await;

    let images = "    full_document_before_change: whenAvailable\n";
    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[
            // `auto` is the default: this watcher does not mention the field.
            watcher_yaml(
                "skip",
                "shop",
                "items",
                &s_skip,
                &format!("{images}    on_oversized: skip\n"),
            ),
            watcher_yaml(
                "off",
                "shop",
                "items",
                &s_off,
                &format!("{images}    on_oversized: skip\n    split_large_events: off\n"),
            ),
            watcher_yaml(
                "fail",
                "shop",
                "items",
                &s_fail,
                &format!("{images}    split_large_events: on\n"),
            ),
        ],
    );
    let port = free_port();
    let cfg = cfg.replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    let mut w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    for name in ["skip", "off", "fail"] {
        aws.wait_for_checkpoint(&table, name, WAIT, |_| true).await;
    }

    let items = db.collection::<Document>("items");
    let blob = blob();
    items
        .insert_one(doc! {"_id": 1_i64, "v": 1_i64, "blob": &blob})
        .await
        .unwrap();
    items
        .update_one(doc! {"_id": 1_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();
    items
        .insert_one(doc! {"_id": 2_i64, "v": 1_i64})
        .await
        .unwrap();
    // (Document 1 is left alone from here: SecantusDB looks its post-image up when the event
    // is read, so a later change to it would shrink the split event.)
    items
        .update_one(doc! {"_id": 2_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();

    // Skipped whole, once, with its full size; the events after it go on, in order by key.
    for (name, stream) in [("skip", &s_skip), ("off", &s_off)] {
        let recs = aws.wait_for_records(stream, WAIT, |r| r.len() >= 3).await;
        let of_key = |id: i64| -> Vec<&str> {
            recs.iter()
                .filter(|r| r.id() == Some(id))
                .map(Record::operation)
                .collect()
        };
        assert_eq!(of_key(1), ["insert"], "{name}");
        assert_eq!(of_key(2), ["insert", "update"], "{name}");
        assert_eq!(recs.len(), 3, "{name}");
        let insert = recs.iter().find(|r| r.id() == Some(1)).unwrap();
        assert_eq!(
            insert.json["fullDocument"]["blob"].as_str().map(str::len),
            Some(blob.len()),
            "{name}: the 9 MB insert is delivered whole"
        );
        let skipped = lines_of(&w, name, SKIPPED);
        assert_eq!(
            skipped.len(),
            1,
            "{name}: one oversized event: {skipped:#?}"
        );
        assert!(
            skipped[0].contains(r#"document_key={"_id":1}"#) && skipped[0].contains("update"),
            "{}",
            skipped[0]
        );
        let size = number_after(&skipped[0], "size=").expect("size in the skip line");
        assert!(
            size > SIXTEEN_MIB,
            "{name}: the skipped record is the whole event, {size} bytes: {}",
            skipped[0]
        );
        assert_eq!(
            metric(
                port,
                &format!("mongo_watcher_records_skipped_total{{reason=\"oversized\",watcher=\"{name}\"}}")
            ),
            Some(1.0),
            "{name}"
        );
    }
    // The stage is in the pipeline with `auto` and `on` (SecantusDB splits the event in two),
    // not with `off` (SecantusDB sends it whole, not enforcing 16 MiB).
    let reassembled = lines_of(&w, "skip", REASSEMBLED);
    assert_eq!(reassembled.len(), 1, "{reassembled:#?}");
    assert!(
        reassembled[0].contains("fragments=2")
            && number_after(&reassembled[0], "bytes=").is_some_and(|b| b > SIXTEEN_MIB),
        "{}",
        reassembled[0]
    );
    assert!(lines_of(&w, "off", REASSEMBLED).is_empty());
    let counted = |name: &str| {
        metric(
            port,
            &format!("mongo_watcher_events_reassembled_total{{watcher=\"{name}\"}}"),
        )
    };
    assert_eq!(counted("skip"), Some(1.0));
    assert_eq!(counted("off"), Some(0.0), "the series exists at 0");

    // `on_oversized: fail` stops at the joined event, naming its key and its whole size.
    let failed = wait_http(port, "/watchers/fail", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "failed"
    })
    .json();
    let reason = failed["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains(r#"document {"_id":1}"#), "{reason}");
    let size = number_after(&reason, " is ").expect("size in the reason");
    assert!(size > SIXTEEN_MIB, "{reason}");
    assert_eq!(counted("fail"), Some(1.0), "`on` has the stage too");
    let recs = aws.wait_for_records(&s_fail, WAIT, |r| !r.is_empty()).await;
    assert_eq!(ids_of(&recs), [1], "only the insert before it");

    // The checkpoint passed the skipped event: killed and started again, the watcher reads
    // neither it nor the insert after it again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.kill9();
    w.restart();
    items
        .insert_one(doc! {"_id": 3_i64, "v": 1_i64})
        .await
        .unwrap();
    for (name, stream) in [("skip", &s_skip), ("off", &s_off)] {
        let recs = aws
            .wait_for_records(stream, WAIT, |r| has_all(r, &[3]))
            .await;
        let mut ids = ids_of(&recs);
        ids.sort();
        assert_eq!(ids, [1, 2, 2, 3], "{name}: nothing read twice");
        assert_eq!(
            lines_of(&w, name, SKIPPED).len(),
            1,
            "{name}: not skipped again"
        );
    }
}

/// `tests/support/wire_proxy.py` in front of `mongo`, with `args`.
fn wire_proxy(mongo: &Mongo, args: &[&str]) -> (String, Proc) {
    let upstream = format!("127.0.0.1:{}", mongo.port);
    let mut all = vec!["--upstream", &upstream];
    all.extend_from_slice(args);
    let (port, proc) = start_listening_script("tests/support/wire_proxy.py", &all, "wire proxy");
    (
        format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
        proc,
    )
}

/// A server without the stage (SecantusDB behind a proxy that renames the stage on its way in,
/// so the server refuses it as MongoDB before 7.0 does, and names it back on the way out):
/// `auto` watches without it, `on` fails saying which setting to change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_stage_auto_watches_without_it_and_on_fails_naming_the_setting() {
    let mongo = Mongo::start();
    let (stage, renamed) = (
        "$changeStreamSplitLargeEvent",
        "$changeStreamSplitLargeEvenX",
    );
    let (uri, _proxy) = wire_proxy(
        &mongo,
        &[
            "--client-find",
            stage,
            "--client-replace-hex",
            &hex(renamed),
            "--find",
            renamed,
            "--replace-hex",
            &hex(stage),
        ],
    );
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (s_auto, s_on) = (unique("auto"), unique("on"));
    aws.create_stream(&s_auto, 1).await;
    aws.create_stream(&s_on, 1).await;
    let port = free_port();
    let cfg = config_yaml(
        &mongo,
        None,
        &[
            watcher_yaml("auto", "db", "c", &s_auto, ""),
            watcher_yaml("on", "db", "c", &s_on, "    split_large_events: on\n"),
        ],
    )
    .replace(&mongo.uri(), &uri)
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let w = Watcher::start(dir.path(), &cfg, &moto.endpoint());

    let failed = wait_http(port, "/watchers/on", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "failed"
    })
    .json();
    let reason = failed["reason"].as_str().unwrap_or_default();
    for needle in [
        "split_large_events: on",
        "refuses the `$changeStreamSplitLargeEvent` stage",
        "Unrecognized pipeline stage name",
        "split_large_events: auto",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in {reason}");
    }

    wait_http(port, "/watchers/auto", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "running"
    });
    w.wait_for_log("the server has no $changeStreamSplitLargeEvent", WAIT);
    let coll = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    insert_ids(&coll, [1, 2, 3]).await;
    let recs = aws.wait_for_ids(&s_auto, &[1, 2, 3], WAIT).await;
    assert_eq!(sorted_ids(&recs), [1, 2, 3], "each once");
    assert!(
        recs.iter().all(|r| r.json.get("splitEvent").is_none()),
        "{:?}",
        recs[0].json
    );
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The watcher is killed -9 after the first fragment of a split event and before the second
/// (the server's replies slowed down by the wire proxy): nothing of the event was handed on or
/// checkpointed, so the next start reads it whole from the first fragment, and it is skipped
/// once, at its full size, with the events around it delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_fragments_replays_the_whole_event() {
    let mongo = Mongo::start();
    // One document per reply, about 3 s per 9 MB fragment.
    let (uri, _proxy) = wire_proxy(&mongo, &["--rate", "3000000", "--getmore-batch-size", "1"]);
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    aws.create_stream(&stream, 1).await;
    let client = mongo.client().await;
    let db = client.database("shop");
    enable_pre_images(&db, "items").await;
    let items = db.collection::<Document>("items");
    // Before the watcher starts: its insert is not watched.
    items
        .insert_one(doc! {"_id": 9_i64, "v": 1_i64, "blob": blob()})
        .await
        .unwrap();

    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[watcher_yaml(
            "w",
            "shop",
            "items",
            &stream,
            "    full_document_before_change: whenAvailable\n    on_oversized: skip\n    \
             split_large_events: on\n",
        )],
    )
    .replace(&mongo.uri(), &uri);
    let mut w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    items
        .insert_one(doc! {"_id": 1_i64, "v": 1_i64})
        .await
        .unwrap();
    aws.wait_for_ids(&stream, &[1], WAIT).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    items
        .update_one(doc! {"_id": 9_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();
    items
        .insert_one(doc! {"_id": 2_i64, "v": 1_i64})
        .await
        .unwrap();
    w.wait_for_log("change event fragment read", WAIT);
    // Time for checkpoints (every 200 ms) while the second fragment is on its way (~3 s).
    std::thread::sleep(Duration::from_millis(1000));
    w.kill9();
    assert!(
        lines_of(&w, "w", "fragment=1 of=2").len() == 1
            && lines_of(&w, "w", REASSEMBLED).is_empty()
            && lines_of(&w, "w", SKIPPED).is_empty(),
        "killed between the fragments:\n{}",
        w.logs()
    );
    let recs = aws.read_stream(&stream).await;
    assert_eq!(
        ids_of(&recs),
        [1],
        "nothing after the first fragment was sent"
    );

    w.restart();
    let recs = aws.wait_for_ids(&stream, &[1, 2], WAIT).await;
    assert_eq!(sorted_ids(&recs), [1, 2], "nothing twice");
    let skipped = lines_of(&w, "w", SKIPPED);
    assert_eq!(skipped.len(), 1, "{skipped:#?}");
    assert!(
        skipped[0].contains(r#"document_key={"_id":9}"#),
        "{}",
        skipped[0]
    );
    assert!(
        number_after(&skipped[0], "size=").is_some_and(|s| s > SIXTEEN_MIB),
        "the whole event: {}",
        skipped[0]
    );
    assert_eq!(lines_of(&w, "w", REASSEMBLED).len(), 1);
}

/// With `on_oversized: s3` the joined event is written whole to S3 (both 9 MB images in one
/// object, no `splitEvent`) and its pointer takes its place in the stream; a kill -9 between
/// the fragments leaves nothing behind, and the next start writes the whole event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_event_reaches_s3_whole_after_a_kill_between_fragments() {
    let mongo = Mongo::start();
    let (uri, _proxy) = wire_proxy(&mongo, &["--rate", "3000000", "--getmore-batch-size", "1"]);
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let s3 = S3::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (table, stream, bucket) = (unique("cps"), unique("s"), unique("claims"));
    aws.create_checkpoint_table(&table).await;
    aws.create_stream(&stream, 1).await;
    s3.create_bucket(&bucket).await;
    let client = mongo.client().await;
    let db = client.database("shop");
    enable_pre_images(&db, "items").await;
    let items = db.collection::<Document>("items");
    let blob = blob();
    items
        .insert_one(doc! {"_id": 9_i64, "v": 1_i64, "blob": &blob})
        .await
        .unwrap();

    let port = free_port();
    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[watcher_yaml(
            "w",
            "shop",
            "items",
            &stream,
            &format!(
                "    full_document_before_change: whenAvailable\n    on_oversized: s3\n    \
                 s3: {{bucket: {bucket}, prefix: cdc/}}\n"
            ),
        )],
    )
    .replace(&mongo.uri(), &uri)
    .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    let mut w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    aws.wait_for_checkpoint(&table, "w", WAIT, |_| true).await;
    items
        .insert_one(doc! {"_id": 1_i64, "v": 1_i64})
        .await
        .unwrap();
    aws.wait_for_ids(&stream, &[1], WAIT).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;

    items
        .update_one(doc! {"_id": 9_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();
    items
        .insert_one(doc! {"_id": 2_i64, "v": 1_i64})
        .await
        .unwrap();
    w.wait_for_log("change event fragment read", WAIT);
    // Time for checkpoints (every 200 ms) while the second fragment is on its way (~3 s).
    std::thread::sleep(Duration::from_millis(1000));
    w.kill9();
    assert!(
        lines_of(&w, "w", REASSEMBLED).is_empty(),
        "killed between the fragments"
    );
    assert!(
        s3.keys(&bucket, "cdc/").await.is_empty(),
        "nothing in S3 yet"
    );
    assert_eq!(ids_of(&aws.read_stream(&stream).await), [1]);

    w.restart();
    let recs = aws.wait_for_ids(&stream, &[1, 9, 2], WAIT).await;
    assert_eq!(count(&recs, 9), 1, "one pointer");
    let pointer = recs.iter().find(|r| r.id() == Some(9)).unwrap();
    let cc = &pointer.json["claimCheck"];
    let key = cc["key"].as_str().expect("a pointer record");
    let body = s3.get_object(&bucket, key).await.expect("the object");
    assert!(body.len() > SIXTEEN_MIB, "{} bytes", body.len());
    assert_eq!(cc["bytes"].as_u64(), Some(body.len() as u64));
    let event: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        event["_id"], pointer.json["_id"],
        "the last fragment's token"
    );
    assert_eq!(event["operationType"], "update");
    assert!(event.get("splitEvent").is_none());
    for (image, v) in [("fullDocument", 2), ("fullDocumentBeforeChange", 1)] {
        assert_eq!(event[image]["v"], v, "{image}");
        assert_eq!(
            event[image]["blob"].as_str().map(str::len),
            Some(blob.len()),
            "{image} whole"
        );
    }
    assert_eq!(s3.keys(&bucket, "cdc/").await, [key], "one object");
    assert_eq!(lines_of(&w, "w", REASSEMBLED).len(), 1);
    let counted = |series: &str| metric(port, &format!("{series}{{watcher=\"w\"}}"));
    assert_eq!(counted("mongo_watcher_events_reassembled_total"), Some(1.0));
    assert_eq!(
        counted("mongo_watcher_records_claim_checked_total"),
        Some(1.0)
    );
}
