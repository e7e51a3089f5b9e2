//! Document images (issue 9): `full_document_before_change` asks the change stream for the
//! document as it was before each update, replace and delete (a pre-image, kept by the server
//! on collections with `changeStreamPreAndPostImages` enabled). Against SecantusDB, moto and
//! the real binary.

mod support;

use bson::{doc, Document};
use serde_json::json;
use support::*;

/// A watcher's status as the API shows it.
fn status(port: u16, name: &str) -> serde_json::Value {
    request(port, "GET", &format!("/watchers/{name}"), None, "").json()
}

async fn enable_pre_images(db: &mongodb::Database, coll: &str) {
    db.create_collection(coll).await.expect("create collection");
    db.run_command(doc! {
        "collMod": coll,
        "changeStreamPreAndPostImages": {"enabled": true},
    })
    .await
    .expect("collMod changeStreamPreAndPostImages");
}

/// The same collection with pre-images enabled is watched twice, with
/// `full_document_before_change: whenAvailable` and `off`; a third watcher requires pre-images
/// on a collection that has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_images_are_delivered_when_asked_for_and_a_missing_required_one_fails_the_watcher() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let (s_when, s_off, s_req) = (unique("when"), unique("off"), unique("req"));
    for s in [&s_when, &s_off, &s_req] {
        aws.create_stream(s, 1).await;
    }
    let client = mongo.client().await;
    let db = client.database("shop");
    enable_pre_images(&db, "items").await;
    db.create_collection("plain").await.expect("create plain");

    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[
            watcher_yaml(
                "when",
                "shop",
                "items",
                &s_when,
                "    full_document: off\n    full_document_before_change: whenAvailable\n",
            ),
            // `off` is the default: this watcher does not mention the field.
            watcher_yaml("off", "shop", "items", &s_off, "    full_document: off\n"),
            watcher_yaml(
                "req",
                "shop",
                "plain",
                &s_req,
                "    full_document: off\n    full_document_before_change: required\n",
            ),
        ],
    );
    let port = free_port();
    let cfg = cfg.replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    let _w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    for name in ["when", "off", "req"] {
        aws.wait_for_checkpoint(&table, name, WAIT, |_| true).await;
    }

    let items = db.collection::<Document>("items");
    items
        .insert_one(doc! {"_id": 1_i64, "v": 1_i64, "name": "first"})
        .await
        .unwrap();
    items
        .update_one(doc! {"_id": 1_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();
    items.delete_one(doc! {"_id": 1_i64}).await.unwrap();

    let recs = aws.wait_for_records(&s_when, WAIT, |r| r.len() >= 3).await;
    let ops: Vec<&str> = recs.iter().map(Record::operation).collect();
    assert_eq!(ops, ["insert", "update", "delete"]);
    assert!(
        recs[0].json.get("fullDocumentBeforeChange").is_none(),
        "an insert has no before: {}",
        recs[0].json
    );
    assert_eq!(
        recs[1].json["fullDocumentBeforeChange"],
        json!({"_id": 1, "v": 1, "name": "first"}),
        "update: {}",
        recs[1].json
    );
    assert_eq!(
        recs[2].json["fullDocumentBeforeChange"],
        json!({"_id": 1, "v": 2, "name": "first"}),
        "delete: {}",
        recs[2].json
    );

    let recs = aws.wait_for_records(&s_off, WAIT, |r| r.len() >= 3).await;
    let ops: Vec<&str> = recs.iter().map(Record::operation).collect();
    assert_eq!(ops, ["insert", "update", "delete"]);
    for r in &recs {
        assert!(
            r.json.get("fullDocumentBeforeChange").is_none(),
            "off asks for no pre-image: {}",
            r.json
        );
    }

    // `required` on a collection without pre-images: the insert passes, the update has no
    // pre-image, the server fails the stream there, and the watcher parks as `failed` saying
    // what to do instead of restarting into the same event forever.
    let plain = db.collection::<Document>("plain");
    plain
        .insert_one(doc! {"_id": 7_i64, "v": 1_i64})
        .await
        .unwrap();
    plain
        .update_one(doc! {"_id": 7_i64}, doc! {"$set": {"v": 2_i64}})
        .await
        .unwrap();
    let failed = wait_http(port, "/watchers/req", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "failed"
    })
    .json();
    let reason = failed["reason"].as_str().unwrap_or_default();
    for needle in [
        "pre-image",
        "full_document_before_change: whenAvailable",
        "changeStreamPreAndPostImages",
        "rewind",
    ] {
        assert!(reason.contains(needle), "{needle:?} not in {failed}");
    }
    let recs = aws.wait_for_records(&s_req, WAIT, |r| !r.is_empty()).await;
    assert_eq!(
        ids_of(&recs),
        [7],
        "the insert is delivered, the update is not"
    );
    assert_eq!(recs[0].operation(), "insert");
    // The other watchers are not affected.
    assert_eq!(status(port, "when")["state"], "running");
}

/// A key in `fullDocument` stays with its document when deletes carry the pre-image: with
/// `full_document_before_change: required` the delete is keyed by the pre-image's email, on
/// the same key as the document's insert and update; without pre-images it falls back to the
/// namespace (what `check-config` warns about).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_is_keyed_by_its_pre_image() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (s_pre, s_plain) = (unique("pre"), unique("plain"));
    for s in [&s_pre, &s_plain] {
        aws.create_stream(s, 1).await;
    }
    let client = mongo.client().await;
    let db = client.database("shop");
    enable_pre_images(&db, "users").await;
    let key = "    partition_key: fullDocument.email\n";
    let cfg = config_yaml(
        &mongo,
        None,
        &[
            watcher_yaml(
                "pre",
                "shop",
                "users",
                &s_pre,
                &format!("{key}    full_document_before_change: required\n"),
            ),
            watcher_yaml("plain", "shop", "users", &s_plain, key),
        ],
    );
    let w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let users = db.collection::<Document>("users");
    users
        .insert_one(doc! {"_id": 1_i64, "email": "ada@example.com"})
        .await
        .unwrap();
    users
        .update_one(doc! {"_id": 1_i64}, doc! {"$set": {"name": "Ada"}})
        .await
        .unwrap();
    // The update's `fullDocument` is looked up when the stream reads it: a delete before that
    // leaves it null (keyed by the namespace, as `check-config` warns). Delete only once both
    // watchers delivered the update, so this test sees the delete's key alone.
    for stream in [&s_pre, &s_plain] {
        aws.wait_for_records(stream, WAIT, |r| r.len() >= 2).await;
    }
    users.delete_one(doc! {"_id": 1_i64}).await.unwrap();
    for (stream, delete_key) in [(&s_pre, "ada@example.com"), (&s_plain, "shop.users")] {
        let recs = aws.wait_for_records(stream, WAIT, |r| r.len() >= 3).await;
        let mut keys: Vec<(&str, &str)> = recs
            .iter()
            .map(|r| (r.operation(), r.partition_key.as_str()))
            .collect();
        if stream == &s_plain {
            // Another key than the insert's and update's: nothing keeps the delete behind
            // them (it did overtake the update in a run of this test).
            let order = ["insert", "update", "delete"];
            keys.sort_by_key(|(op, _)| order.iter().position(|o| o == op));
        }
        assert_eq!(
            keys,
            [
                ("insert", "ada@example.com"),
                ("update", "ada@example.com"),
                ("delete", delete_key)
            ],
            "{stream}"
        );
    }
    assert!(
        w.logs()
            .contains("watcher `plain`: partition_key `fullDocument.email` is not in documentKey"),
        "run warns about the key that does not stay with its document"
    );
    assert!(!w.logs().contains("watcher `pre`: partition_key"));
}
