//! `POST /watchers/{name}/snapshot` end to end, against SecantusDB and moto: a running watcher
//! (`snapshot: never`) copies the documents a filter matches on demand, once each, while its
//! change stream keeps its position; the endpoint's authentication, 409 (a copy running, a
//! paused watcher), 400 and 404.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use bson::{doc, Document};
use support::*;

const TOKEN: &str = "backfill-token-8812";

/// Documents before the watcher starts: even `_id`s are `kind: "a"`, odd ones `kind: "b"`.
const DOCS: i64 = 3_000;

/// Small calls, one at a time: the copy of 1,500 documents takes a second or more, so the
/// second request meets it running.
const SLOW: &str =
    "    snapshot: never\n    max_batch_records: 100\n    max_in_flight: 1\n    max_pending: 500\n";

fn kind(id: i64) -> &'static str {
    if id % 2 == 0 {
        "a"
    } else {
        "b"
    }
}

/// The snapshot records of each document `_id`.
fn snapshots_by_id(records: &[Record]) -> HashMap<i64, Vec<&Record>> {
    let mut out: HashMap<i64, Vec<&Record>> = HashMap::new();
    for r in records.iter().filter(|r| r.operation() == "snapshot") {
        let id = r
            .id()
            .unwrap_or_else(|| panic!("snapshot record without an integer key: {}", r.json));
        out.entry(id).or_default().push(r);
    }
    out
}

/// Ids with a record of `operation`.
fn ids_with(records: &[Record], operation: &str) -> HashSet<i64> {
    records
        .iter()
        .filter(|r| r.operation() == operation)
        .filter_map(Record::id)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_snapshot_copies_what_the_filter_matches_while_the_stream_goes_on() {
    let Env {
        mongo,
        moto,
        aws,
        dir,
        table,
        stream,
        ..
    } = Env::start("backfill", 2).await;
    let client = mongo.client().await;
    let coll = client.database("shop").collection::<Document>("items");
    let docs: Vec<Document> = (0..DOCS)
        .map(|i| doc! {"_id": i, "kind": kind(i), "v": 0_i64})
        .collect();
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await.expect("insert_many");
    }

    let port = free_port();
    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[watcher_yaml("items", "shop", "items", &stream, SLOW)],
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let _w = Watcher::start_with_env(
        dir.path(),
        &cfg,
        &moto.endpoint(),
        &[("MONGO_WATCHER_API_TOKEN", TOKEN)],
    );
    wait_http(port, "/watchers/items", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "running"
    });
    // The stream is live and, with `snapshot: never`, nothing was copied.
    let live = 100_000_i64;
    coll.insert_one(doc! {"_id": live, "kind": "c", "v": 0_i64})
        .await
        .expect("insert");
    let records = aws.wait_for_ids(&stream, &[live], WAIT).await;
    assert!(
        records.iter().all(|r| r.operation() != "snapshot"),
        "snapshot records before any request"
    );

    let path = "/watchers/items/snapshot";
    let filter_a = r#"{"filter": {"kind": "a"}}"#;
    // (a) Without the token: 401, and nothing starts.
    let r = request(port, "POST", path, None, filter_a);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        r.headers
    );

    // (b) Accepted once the copy has begun, answering the watcher's view.
    let r = request(port, "POST", path, Some(TOKEN), filter_a);
    assert_eq!(r.status, 202, "{}", r.body);
    let view = r.json();
    assert_eq!(view["name"], "items", "{view}");
    eprintln!("snapshot in the 202's view: {}", view["snapshot"]);

    // (c) A second request while the copy runs is refused, whatever it asks for.
    let r = request(port, "POST", path, Some(TOKEN), "");
    assert_eq!(r.status, 409, "{}", r.body);
    eprintln!("409 while copying: {}", r.json()["error"]);

    // (d) Writes during the copy arrive as change events: the stream kept its position. The
    // new documents are of neither kind, so the copy never matches them.
    let updated: Vec<i64> = (0..DOCS).step_by(101).collect();
    for id in &updated {
        coll.update_one(doc! {"_id": id}, doc! {"$set": {"v": 1_i64}})
            .await
            .expect("update");
    }
    let inserted: Vec<i64> = (DOCS..DOCS + 20).collect();
    let fresh: Vec<Document> = inserted
        .iter()
        .map(|i| doc! {"_id": i, "kind": "c", "v": 2_i64})
        .collect();
    coll.insert_many(fresh).await.expect("insert_many");

    // (e) Every `kind: "a"` document arrives once as a snapshot record, and every write as its
    // event.
    let want_copied = (DOCS / 2) as usize;
    let records = aws
        .wait_for_records(&stream, Duration::from_secs(120), |records| {
            let updates = ids_with(records, "update");
            let inserts = ids_with(records, "insert");
            snapshots_by_id(records).len() >= want_copied
                && updated.iter().all(|id| updates.contains(id))
                && inserted.iter().all(|id| inserts.contains(id))
        })
        .await;
    let view = wait_http(port, "/watchers/items", WAIT, |r| {
        r.status == 200 && r.json()["snapshot"]["state"] == "done"
    })
    .json();
    eprintln!("snapshot when done: {}", view["snapshot"]);
    assert_eq!(view["state"], "running", "{view}");
    // Read again once done, so that a late duplicate would show.
    let records = match aws.read_stream(&stream).await {
        again if again.len() >= records.len() => again,
        _ => records,
    };
    let copied = snapshots_by_id(&records);
    let wrong_kind: Vec<i64> = copied
        .keys()
        .copied()
        .filter(|id| kind(*id) != "a")
        .collect();
    assert!(
        wrong_kind.is_empty(),
        "copied though not `kind: a`: {wrong_kind:?}"
    );
    let missing: Vec<i64> = (0..DOCS)
        .step_by(2)
        .filter(|id| !copied.contains_key(id))
        .collect();
    assert!(missing.is_empty(), "never copied: {missing:?}");
    let twice: Vec<i64> = copied
        .iter()
        .filter(|(_, rs)| rs.len() > 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(twice.is_empty(), "copied more than once: {twice:?}");
    assert_eq!(copied.len(), want_copied);
    for (id, rs) in &copied {
        let r = &rs[0].json;
        assert_eq!(r["_id"], serde_json::json!({"snapshot": id}), "{r}");
        assert_eq!(
            r["ns"],
            serde_json::json!({"db": "shop", "coll": "items"}),
            "{r}"
        );
        assert_eq!(r["documentKey"], serde_json::json!({"_id": id}), "{r}");
        assert_eq!(r["fullDocument"]["_id"], *id, "{r}");
        assert_eq!(r["fullDocument"]["kind"], "a", "{r}");
        assert!(r["clusterTime"].is_object(), "clusterTime: {r}");
        assert_eq!(rs[0].partition_key, id.to_string());
    }
    if let Some(n) = view["snapshot"]["documents_copied"].as_u64() {
        assert_eq!(n, want_copied as u64, "{view}");
    }

    // (f) A filter that is not an object.
    let r = request(port, "POST", path, Some(TOKEN), r#"{"filter": 5}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("filter"),
        "{}",
        r.body
    );
    // (g) An unknown watcher.
    let r = request(
        port,
        "POST",
        "/watchers/nope/snapshot",
        Some(TOKEN),
        filter_a,
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        r.json()["watchers"],
        serde_json::json!(["items"]),
        "{}",
        r.body
    );

    // A paused watcher refuses, saying what to do, and stays paused.
    let r = request(port, "POST", "/watchers/items/pause", Some(TOKEN), "");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(port, "POST", path, Some(TOKEN), "");
    assert_eq!(r.status, 409, "{}", r.body);
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("`items` is paused") && error.contains("resume it first"),
        "{error}"
    );
    assert_eq!(
        request(port, "GET", "/watchers/items", None, "").json()["state"],
        "paused"
    );
}
