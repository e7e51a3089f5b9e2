//! Hard to break: data that real MongoDB can hold but a strict decoder refuses must not block
//! a watcher. Against SecantusDB (through a wire proxy that corrupts a string in the server's
//! replies, as an outside probe did) and moto.

mod support;

use std::time::Duration;

use bson::{doc, Document};
use support::*;

/// `tests/support/wire_proxy.py` in front of `mongo`: the watcher's view of the server, with
/// `POISON-AB` in any reply turned into `POISON-` + 0xC3 0x28 (invalid UTF-8).
struct WireProxy {
    port: u16,
    _proc: Proc,
}

impl WireProxy {
    fn start(mongo: &Mongo) -> Self {
        let (port, proc) = start_listening_script(
            "tests/support/wire_proxy.py",
            &["--upstream", &format!("127.0.0.1:{}", mongo.port)],
            "wire proxy",
        );
        Self { port, _proc: proc }
    }

    fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }
}

/// An insert whose document holds invalid UTF-8 (on the wire) is delivered with U+FFFD in
/// place of the bad bytes, counted, and the events after it keep flowing; the watcher stays
/// `running`. Before, the driver's strict decoding failed the stream on that event for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_document_does_not_block_the_watcher() {
    let mongo = Mongo::start();
    let wire = WireProxy::start(&mongo);
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let stream = unique("s");
    aws.create_stream(&stream, 1).await;
    let port = free_port();
    let cfg = config_yaml(
        &mongo,
        None,
        &[watcher_yaml(
            "w",
            "db",
            "c",
            &stream,
            "    full_document: off\n",
        )],
    )
    .replace(&mongo.uri(), &wire.uri())
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().unwrap();
    let w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);
    // The test writes straight to SecantusDB; only the watcher reads through the proxy.
    let coll = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    coll.insert_one(doc! {"_id": 1, "s": "fine"}).await.unwrap();
    coll.insert_one(doc! {"_id": 2, "s": "POISON-AB"})
        .await
        .unwrap();
    coll.insert_one(doc! {"_id": 3, "s": "fine"}).await.unwrap();
    let records = aws
        .wait_for_ids(&stream, &[1, 2, 3], Duration::from_secs(60))
        .await;
    assert_eq!(sorted_ids(&records), [1, 2, 3], "each once");
    let poisoned = records.iter().find(|r| r.id() == Some(2)).unwrap();
    assert_eq!(
        poisoned.json["fullDocument"]["s"], "POISON-\u{FFFD}(",
        "the invalid sequence is replaced, the rest kept"
    );
    let metrics = request(port, "GET", "/metrics", None, "").body;
    assert!(
        metrics.contains(
            "mongo_watcher_events_repaired_total{reason=\"invalid_utf8\",watcher=\"w\"} 1"
        ),
        "{metrics}"
    );
    let state = request(port, "GET", "/watchers/w", None, "").json();
    assert_eq!(state["state"], "running", "{state}");
    assert_eq!(state["restarts"], 0, "{state}");
    assert!(
        w.logs().contains("change event holds invalid UTF-8"),
        "the log names the event"
    );
}
