//! Drop-in mode: the old tool's environment, its DynamoDB marker and its record format.
//! Switching from the old container to mongo-watcher and back loses no position.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use bson::{doc, Bson, Document};
use futures_util::StreamExt;
use support::*;

fn marker_token(item: &HashMap<String, AttributeValue>) -> String {
    let id = item.get("_id").expect("marker has _id");
    let map = id.as_m().expect("_id is a map, as the old tool wrote it");
    map.get("_data")
        .and_then(|v| v.as_s().ok())
        .expect("_id._data is a string")
        .clone()
}

async fn marker(aws: &Aws, table: &str, key: &str) -> Option<HashMap<String, AttributeValue>> {
    aws.dynamodb
        .get_item()
        .table_name(table)
        .key("collectionName", AttributeValue::S(key.into()))
        .consistent_read(true)
        .send()
        .await
        .expect("get marker")
        .item()
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_in_resumes_from_the_old_marker_and_keeps_it_current() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let table = unique("markers");
    aws.create_marker_table(&table).await;
    let stream = unique("out");
    aws.create_stream(&stream, 1).await;
    let client = mongo.client().await;
    let coll = client.database("shop").collection::<Document>("orders");

    // The old tool delivered event 0 and wrote its marker; 1..=5 happened after it stopped.
    let mut watch = coll.watch().await.unwrap();
    coll.insert_one(doc! {"_id": 0_i64}).await.unwrap();
    let event = watch.next().await.unwrap().unwrap();
    let token = watchers::reader::from_resume_token(&event.id).unwrap();
    let data = token
        .as_document()
        .unwrap()
        .get_str("_data")
        .unwrap()
        .to_owned();
    aws.dynamodb
        .update_item()
        .table_name(&table)
        .key("collectionName", AttributeValue::S("shop.orders".into()))
        .update_expression("SET #id = :id")
        .expression_attribute_names("#id", "_id")
        .expression_attribute_values(
            ":id",
            AttributeValue::M(HashMap::from([(
                "_data".to_owned(),
                AttributeValue::S(data.clone()),
            )])),
        )
        .send()
        .await
        .expect("write the old marker");
    let at = bson::DateTime::from_millis(1_700_000_000_123);
    for id in 1..=5_i64 {
        coll.insert_one(doc! {"_id": id, "at": at, "big": 9_007_199_254_740_993_i64})
            .await
            .unwrap();
    }

    let env = [
        ("MONGODB_URI", mongo.uri()),
        ("MONGODB_DATABASE", "shop".to_owned()),
        ("MONGODB_COLLECTION", "orders".to_owned()),
        ("OUT_KINESIS_STREAM", stream.clone()),
        ("KINESIS_PUT_RETRIES", "5".to_owned()),
        ("DYNAMODB_TABLE_NAME", table.clone()),
        ("AWS_DEFAULT_REGION", REGION.to_owned()),
        ("LOG_LEVEL", "INFO".to_owned()),
        (
            "MONGO_WATCHER_HTTP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut w = Watcher::start_drop_in(dir.path(), &moto.endpoint(), &env);
    let recs = aws.wait_for_records(&stream, WAIT, |r| r.len() >= 5).await;
    let ids: Vec<i64> = recs.iter().filter_map(Record::id).collect();
    assert_eq!(
        ids,
        vec![1, 2, 3, 4, 5],
        "resumed exactly after the old marker"
    );
    // The old record format: dates as epoch millis, 64-bit integers as plain numbers.
    let doc = &recs[0].json["fullDocument"];
    assert_eq!(
        doc["at"],
        serde_json::json!({"$date": 1_700_000_000_123_i64})
    );
    assert_eq!(doc["big"], serde_json::json!(9_007_199_254_740_993_i64));

    // The marker moves as the old tool would have moved it: same key, `_id` map, nothing else.
    let item = aws_wait_marker(&aws, &table, |i| marker_token(i) != data).await;
    let keys: Vec<&String> = {
        let mut k: Vec<&String> = item.keys().collect();
        k.sort();
        k
    };
    assert_eq!(
        keys,
        ["_id", "collectionName"],
        "only the old attributes are written"
    );

    coll.insert_one(doc! {"_id": 6_i64}).await.unwrap();
    aws.wait_for_records(&stream, WAIT, |r| r.iter().any(|r| r.id() == Some(6)))
        .await;
    let (code, _) = w.terminate();
    assert_eq!(code, Some(0));

    // Back to the old tool: it resumes after the marker, so 7 is next (6 was delivered).
    coll.insert_one(doc! {"_id": 7_i64}).await.unwrap();
    let item = marker(&aws, &table, "shop.orders").await.expect("marker");
    let token = Bson::Document(doc! {"_data": marker_token(&item)});
    let mut old_tool = coll
        .watch()
        .resume_after(watchers::reader::to_resume_token(&token).unwrap())
        .await
        .expect("the old tool can resume from the marker");
    let next = old_tool.next().await.unwrap().unwrap();
    assert_eq!(next.document_key.unwrap().get_i64("_id").ok(), Some(7));
}

async fn aws_wait_marker(
    aws: &Aws,
    table: &str,
    done: impl Fn(&HashMap<String, AttributeValue>) -> bool,
) -> HashMap<String, AttributeValue> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(item) = marker(aws, table, "shop.orders").await {
            if done(&item) {
                return item;
            }
        }
        assert!(std::time::Instant::now() < deadline, "marker never moved");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Without DYNAMODB_TABLE_NAME: no checkpoints, start at latest; missing variables are
/// listed by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_in_without_a_table_starts_at_latest_and_names_missing_variables() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let stream = unique("out");
    aws.create_stream(&stream, 1).await;
    let coll = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    insert_ids(&coll, [-1]).await;
    let uri = mongo.uri();
    let listen = format!("127.0.0.1:{}", free_port());
    let env = [
        ("MONGO_WATCHER_HTTP_LISTEN", listen.as_str()),
        ("MONGODB_URI", uri.as_str()),
        ("MONGODB_DATABASE", "db"),
        ("MONGODB_COLLECTION", "c"),
        ("OUT_KINESIS_STREAM", stream.as_str()),
    ];
    let w = Watcher::start_drop_in(dir.path(), &moto.endpoint(), &env);
    w.wait_for_log("watcher running", WAIT);
    insert_ids(&coll, [1, 2]).await;
    let recs = aws
        .wait_for_records(&stream, WAIT, |r| {
            r.iter().filter(|r| r.id().is_some()).count() >= 2
        })
        .await;
    let ids: Vec<i64> = recs.iter().filter_map(Record::id).collect();
    assert_eq!(ids, vec![1, 2]);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mongo-watcher"))
        .arg("run")
        .env_remove("MONGO_WATCHER_CONFIG")
        .env("MONGODB_URI", "mongodb://127.0.0.1:1")
        .env_remove("MONGODB_DATABASE")
        .env_remove("MONGODB_COLLECTION")
        .env_remove("OUT_KINESIS_STREAM")
        .env("KINESIS_PUT_RETRIES", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for name in [
        "MONGODB_DATABASE",
        "MONGODB_COLLECTION",
        "OUT_KINESIS_STREAM",
        "KINESIS_PUT_RETRIES",
    ] {
        assert!(err.contains(name), "{name} not named in: {err}");
    }
}
