//! Records over 1 MiB on a stream whose limit was raised (`UpdateMaxRecordSize`, emulated by
//! the moto shim): the watcher reads each stream's limit at start and holds records to it, so
//! a 2 MiB document reaches a stream raised to 4 MiB intact, while on a stream at the default
//! the same document is oversized as before.

mod support;

use bson::{doc, Document};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_stream_takes_records_up_to_its_limit() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let (s_raised, s_default) = (unique("raised"), unique("default"));
    aws.create_stream(&s_raised, 1).await;
    aws.create_stream(&s_default, 1).await;
    aws.raise_record_size(&s_raised, 4096).await;
    let cfg = config_yaml(
        &mongo,
        Some(&table),
        &[
            watcher_yaml("raised", "db", "r", &s_raised, ""),
            watcher_yaml("default", "db", "d", &s_default, "    on_oversized: skip\n"),
        ],
    );
    let w = Watcher::start(dir.path(), &cfg, &moto.endpoint());
    for name in ["raised", "default"] {
        aws.wait_for_checkpoint(&table, name, WAIT, |_| true).await;
    }
    let client = mongo.client().await;
    let big = "x".repeat(2 * 1024 * 1024);
    for name in ["r", "d"] {
        let c = client.database("db").collection::<Document>(name);
        c.insert_one(doc! {"_id": 1_i64}).await.unwrap();
        c.insert_one(doc! {"_id": 2_i64, "blob": &big})
            .await
            .unwrap();
        c.insert_one(doc! {"_id": 3_i64}).await.unwrap();
    }

    let recs = aws
        .wait_for_records(&s_raised, WAIT, |r| has_all(r, &[1, 2, 3]))
        .await;
    assert_eq!(sorted_ids(&recs), vec![1, 2, 3]);
    let two = recs.iter().find(|r| r.id() == Some(2)).unwrap();
    assert!(two.raw.len() > 2 * 1024 * 1024, "the 2 MiB record");
    assert_eq!(
        two.json["fullDocument"]["blob"].as_str(),
        Some(big.as_str()),
        "the 2 MiB document arrived intact"
    );
    assert!(
        w.logs().contains("stream size limits read"),
        "the limit was read from the stream's summary"
    );

    // The same document on a stream at 1 MiB is oversized (skipped here), as before.
    let recs = aws
        .wait_for_records(&s_default, WAIT, |r| has_all(r, &[1, 3]))
        .await;
    assert!(!ids_of(&recs).contains(&2));
    w.wait_for_log("record over the stream's limit skipped", WAIT);
    assert!(w.logs().contains(r#"document_key={"_id":2}"#));
    assert!(
        w.logs().contains("limit=1048576"),
        "skip log names the 1 MiB limit"
    );
}
