//! Flow control end to end, against SecantusDB, moto and the Kinesis fault-injection proxy:
//! a throttled key does not hold back the others, a shard over its limit is paced, a failed
//! call comes back to the watcher (no hidden SDK retries), memory stays bounded in bytes per
//! watcher and for the whole process while Kinesis is down, and a shutdown whose drain cannot
//! finish says so in its exit code.

mod support;

use std::time::{Duration, Instant};

use bson::{doc, Document};
use serde_json::json;
use support::*;

/// The value of one sample of `/metrics`, e.g. `mongo_watcher_send_limit{watcher="w"}`.
fn metric(port: u16, sample: &str) -> Option<f64> {
    let r = request(port, "GET", "/metrics", None, "");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

struct Env {
    mongo: Mongo,
    proxy: Proxy,
    aws: Aws,
    dir: tempfile::TempDir,
    stream: String,
    port: u16,
    _moto: Moto,
}

impl Env {
    async fn new(shards: i32) -> Self {
        let mongo = Mongo::start();
        let moto = Moto::start();
        let proxy = Proxy::start(&moto);
        let aws = Aws::new(&moto).await;
        let stream = unique("s");
        aws.create_stream(&stream, shards).await;
        Self {
            mongo,
            proxy,
            aws,
            dir: tempfile::tempdir().expect("tempdir"),
            stream,
            port: free_port(),
            _moto: moto,
        }
    }

    fn config(&self, top: &str, extra: &str) -> String {
        let cfg = config_yaml(
            &self.mongo,
            None,
            &[watcher_yaml("w", "db", "c", &self.stream, extra)],
        );
        format!("{top}{cfg}").replace("127.0.0.1:0", &format!("127.0.0.1:{}", self.port))
    }

    async fn coll(&self) -> mongodb::Collection<Document> {
        self.mongo
            .client()
            .await
            .database("db")
            .collection::<Document>("c")
    }
}

/// One key rejected on every attempt (a hot key on a throttled shard): the other keys written
/// after it keep arriving at once, the watcher stays `running` with the rejections counted, and
/// once the key gets through its records arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_key_does_not_hold_back_the_others() {
    let e = Env::new(2).await;
    // A stream-wide backoff would reach 10 s within the test; the per-record one stays short.
    let cfg = e.config("", "    full_document: off\n    retry_max_backoff: 10s\n");
    let coll = e.coll().await;
    e.proxy.rules(json!({"fail_keys": {"1": 1_000_000}}));
    let _w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    wait_http(e.port, "/readyz", WAIT, |r| r.status == 200);
    insert_ids(&coll, [1]).await;
    coll.update_one(doc! {"_id": 1}, doc! {"$set": {"v": 1}})
        .await
        .unwrap();
    // Long enough for a watcher-wide backoff to have grown to seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for round in 0..8i64 {
        let ids: Vec<i64> = (0..5).map(|i| 100 + round * 5 + i).collect();
        let written = Instant::now();
        insert_ids(&coll, ids.clone()).await;
        e.aws
            .wait_for_ids(&e.stream, &ids, Duration::from_secs(20))
            .await;
        let took = written.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "round {round}: other keys took {took:?} while key 1 is throttled"
        );
    }
    let records = e.aws.read_stream(&e.stream).await;
    assert_eq!(count(&records, 1), 0, "key 1 was never accepted");
    let w = request(e.port, "GET", "/watchers/w", None, "").json();
    assert_eq!(w["state"], "running", "{w}");
    assert!(
        w["flow"]["rejected"]["ProvisionedThroughputExceededException"]
            .as_u64()
            .unwrap_or(0)
            >= 3,
        "{w}"
    );
    assert_eq!(
        w["flow"]["send_limit"], 4,
        "partial rejections leave the limit: {w}"
    );
    let rejected = metric(
        e.port,
        "mongo_watcher_records_rejected_total{error_code=\"ProvisionedThroughputExceededException\",watcher=\"w\"}",
    );
    assert!(rejected.unwrap_or(0.0) >= 3.0, "{rejected:?}");
    assert_eq!(
        metric(e.port, "mongo_watcher_send_limit{watcher=\"w\"}"),
        Some(4.0)
    );

    e.proxy.reset();
    let records = e
        .aws
        .wait_for_records(&e.stream, Duration::from_secs(30), |r| count(r, 1) == 2)
        .await;
    let ops: Vec<&str> = records
        .iter()
        .filter(|r| r.id() == Some(1))
        .map(|r| r.operation())
        .collect();
    assert_eq!(ops, ["insert", "update"], "key 1 in order");
    assert_eq!(ids_of(&records).len(), 42, "each record exactly once");
}

/// One shard over Kinesis's per-shard limit with a backlog of distinct keys (the case for more
/// shards): once the shard's accepted rate is known (after a second), its throttled records go
/// again at about 1.5 times that rate rather than each on its own ~50 ms delay, so the shard
/// is not sent many times what it takes. The shard is shown as paced, and every document
/// arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_over_its_limit_gets_its_records_back_at_its_pace() {
    const DOCS: i64 = 1000;
    const LIMIT: f64 = 100.0;
    let e = Env::new(1).await;
    let cfg = e.config("", "    full_document: off\n");
    let coll = e.coll().await;
    e.proxy
        .rules(json!({"shard_limit": {"of": 1, "records_per_s": LIMIT}}));
    let _w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    wait_http(e.port, "/readyz", WAIT, |r| r.status == 200);
    let docs: Vec<Document> = (0..DOCS).map(|i| doc! {"_id": i, "v": 0_i64}).collect();
    coll.insert_many(docs).await.unwrap();
    // The first second is not paced (the shard's rate is not known yet).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let throttled = || e.proxy.stats()["records_throttled"].as_f64().unwrap_or(0.0);
    let (before, from) = (throttled(), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per_second = (throttled() - before) / from.elapsed().as_secs_f64();
    eprintln!("throttled by a shard taking {LIMIT}/s: {per_second:.0} records a second");
    let w = request(e.port, "GET", "/watchers/w", None, "").json();
    assert!(
        w["flow"]["pending_records"].as_u64().unwrap_or(0) > 100,
        "the backlog must outlast the measurement: {w}"
    );
    // Paced at 1.5 x 100/s, about 50 throttled a second; each record on its own delay would
    // be thousands.
    assert!(
        per_second < 5.0 * LIMIT,
        "{per_second:.0} records throttled a second by a shard that takes {LIMIT}/s"
    );
    assert_eq!(
        w["flow"]["paced_shards"],
        json!(["shardId-000000000000"]),
        "{w}"
    );
    assert_eq!(w["state"], "running", "{w}");
    assert_eq!(
        metric(e.port, "mongo_watcher_shards_paced{watcher=\"w\"}"),
        Some(1.0)
    );
    let ids: Vec<i64> = (0..DOCS).collect();
    e.aws
        .wait_for_ids(&e.stream, &ids, Duration::from_secs(60))
        .await;
    let records = e.aws.read_stream(&e.stream).await;
    assert_eq!(records.len(), DOCS as usize, "each document once");
    wait_http(e.port, "/watchers/w", WAIT, |r| {
        r.json()["flow"]["paced_shards"] == json!([])
    });
}

/// A PutRecords call that fails whole (a server error, a throttled call) comes back to the
/// watcher at once: the SDK does not retry it out of sight (its backoff starts at 1 s), the
/// watcher retries the records itself within its send limit. So every call Kinesis failed is
/// counted by the watcher under its error code, and each document arrives once when calls
/// succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_call_comes_back_to_the_watcher() {
    let e = Env::new(1).await;
    let cfg = e.config("", "    full_document: off\n    retry_max_backoff: 500ms\n");
    let coll = e.coll().await;
    let _w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    wait_http(e.port, "/readyz", WAIT, |r| r.status == 200);
    let mut failed_before = 0;
    for (round, (status, code)) in [
        (500, "InternalFailure"),
        (400, "ProvisionedThroughputExceededException"),
    ]
    .into_iter()
    .enumerate()
    {
        e.proxy
            .rules(json!({"fail_call_rate": 1.0, "fail_call_status": status}));
        let ids: Vec<i64> = (0..3).map(|i| round as i64 * 10 + i).collect();
        insert_ids(&coll, ids.clone()).await;
        let deadline = Instant::now() + WAIT;
        while e.proxy.stats()["calls_failed"].as_u64().unwrap_or(0) < failed_before + 4 {
            assert!(Instant::now() < deadline, "{}", e.proxy.stats());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The rules replaced, the counts kept: calls go through again.
        e.proxy.rules(json!({}));
        e.aws.wait_for_ids(&e.stream, &ids, WAIT).await;
        let failed = e.proxy.stats()["calls_failed"].as_u64().unwrap_or(0);
        let seen = metric(
            e.port,
            &format!("mongo_watcher_put_calls_failed_total{{error_code=\"{code}\",watcher=\"w\"}}"),
        );
        assert_eq!(
            seen,
            Some((failed - failed_before) as f64),
            "calls the proxy failed with {status} {code} and calls the watcher saw fail"
        );
        failed_before = failed;
    }
    let records = e.aws.read_stream(&e.stream).await;
    assert_eq!(ids_of(&records).len(), 6, "each document once");
    assert_eq!(records.len(), 6, "no duplicates");
}

/// Kinesis down while 200 KB documents keep coming: reading stops at the watcher's byte bound,
/// memory stays flat, and everything arrives once Kinesis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_in_bytes_while_kinesis_is_down() {
    const DOCS: i64 = 300;
    const DOC_BYTES: usize = 200 * 1024;
    const BOUND: f64 = 4.0 * 1024.0 * 1024.0;
    let e = Env::new(1).await;
    let cfg = e.config(
        "limits:\n  max_pending_bytes: 8MiB\n",
        "    full_document: off\n    max_pending_bytes: 4MiB\n",
    );
    let coll = e.coll().await;
    e.proxy.rules(json!({"fail_call_rate": 1.0}));
    let w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    wait_http(e.port, "/readyz", WAIT, |r| r.status == 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = w.rss_bytes().expect("rss");
    let filler = "x".repeat(DOC_BYTES);
    let mut peak_rss = 0;
    let mut peak_pending = 0.0f64;
    for chunk in 0..(DOCS / 20) {
        let docs: Vec<Document> = (0..20)
            .map(|i| doc! {"_id": chunk * 20 + i, "blob": &filler})
            .collect();
        coll.insert_many(docs).await.unwrap();
        peak_rss = peak_rss.max(w.rss_bytes().unwrap_or(0));
        peak_pending = peak_pending
            .max(metric(e.port, "mongo_watcher_pending_bytes{watcher=\"w\"}").unwrap_or(0.0));
    }
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak_rss = peak_rss.max(w.rss_bytes().unwrap_or(0));
        peak_pending = peak_pending
            .max(metric(e.port, "mongo_watcher_pending_bytes{watcher=\"w\"}").unwrap_or(0.0));
    }
    // The bound counts each event's BSON size; the record (Extended JSON) is about as large,
    // so one document's worth of slack.
    assert!(
        peak_pending > 0.0 && peak_pending <= BOUND + 2.0 * DOC_BYTES as f64,
        "pending bytes peaked at {peak_pending}"
    );
    // 60 MB of documents went by. What stays resident is the bound (records, their events
    // in the read-ahead, the SDK's copies of a call) plus the driver's getMore batch.
    let grown = peak_rss.saturating_sub(baseline);
    assert!(
        grown < 48 * 1024 * 1024,
        "RSS grew by {} MiB (baseline {} MiB, peak {} MiB)",
        grown / (1024 * 1024),
        baseline / (1024 * 1024),
        peak_rss / (1024 * 1024)
    );
    eprintln!(
        "rss baseline {} MiB, peak {} MiB; pending bytes peak {peak_pending}",
        baseline / (1024 * 1024),
        peak_rss / (1024 * 1024)
    );
    e.proxy.reset();
    let ids: Vec<i64> = (0..DOCS).collect();
    let records = e
        .aws
        .wait_for_ids(&e.stream, &ids, Duration::from_secs(120))
        .await;
    assert_eq!(ids_of(&records).len(), DOCS as usize, "each document once");
}

/// The process-wide bound binds across watchers: two watchers, each allowed 4 MiB, share a
/// process bound of 4 MiB, so while Kinesis is down and large documents reach both, the bytes
/// both hold stay under 4 MiB together; everything arrives once Kinesis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_byte_bound_is_shared_by_all_watchers() {
    const DOCS: i64 = 60;
    const DOC_BYTES: usize = 200 * 1024;
    const BOUND: f64 = 4.0 * 1024.0 * 1024.0;
    let e = Env::new(1).await;
    let extra = "    full_document: off\n    max_pending_bytes: 4MiB\n";
    let cfg = format!(
        "limits:\n  max_pending_bytes: 4MiB\n{}",
        config_yaml(
            &e.mongo,
            None,
            &[
                watcher_yaml("w1", "db", "c1", &e.stream, extra),
                watcher_yaml("w2", "db", "c2", &e.stream, extra),
            ],
        )
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{}", e.port));
    let client = e.mongo.client().await;
    let colls = ["c1", "c2"].map(|c| client.database("db").collection::<Document>(c));
    e.proxy.rules(json!({"fail_call_rate": 1.0}));
    let _w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    wait_http(e.port, "/readyz", WAIT, |r| r.status == 200);
    let filler = "x".repeat(DOC_BYTES);
    let pending = |w: &str| {
        metric(
            e.port,
            &format!("mongo_watcher_pending_bytes{{watcher=\"{w}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let mut peak = 0.0f64;
    for chunk in 0..(DOCS / 10) {
        for (k, coll) in colls.iter().enumerate() {
            let docs: Vec<Document> = (0..10)
                .map(|i| doc! {"_id": k as i64 * 1000 + chunk * 10 + i, "blob": &filler})
                .collect();
            coll.insert_many(docs).await.unwrap();
        }
        peak = peak.max(pending("w1") + pending("w2"));
    }
    // Nothing is acknowledged while Kinesis is down, so what each holds only grows: the sum
    // of two readings is never above what both held at the second.
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(pending("w1") + pending("w2"));
    }
    assert!(
        peak > 0.0 && peak <= BOUND + 2.0 * DOC_BYTES as f64,
        "the two watchers held {peak} bytes together against a process bound of {BOUND}"
    );
    e.proxy.reset();
    let ids: Vec<i64> = (0..2)
        .flat_map(|k| (0..DOCS).map(move |i| k * 1000 + i))
        .collect();
    let records = e
        .aws
        .wait_for_ids(&e.stream, &ids, Duration::from_secs(120))
        .await;
    assert_eq!(ids_of(&records).len(), ids.len(), "each document once");
}

/// SIGTERM while Kinesis fails every call: the drain gives up at its deadline, the process
/// exits 3 (not 0), and a restart delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_finish_exits_3_and_loses_nothing() {
    let e = Env::new(1).await;
    let table = unique("cps");
    e.aws.create_checkpoint_table(&table).await;
    let cfg = e.config("", "    full_document: off\n").replace(
        "mongodb:\n",
        &format!("checkpoints:\n  table: {table}\nmongodb:\n"),
    );
    let coll = e.coll().await;
    let mut w = Watcher::start(e.dir.path(), &cfg, &e.proxy.endpoint());
    wait_http(e.port, "/readyz", WAIT, |r| r.status == 200);
    e.proxy.rules(json!({"fail_call_rate": 1.0}));
    let ids: Vec<i64> = (0..20).collect();
    insert_ids(&coll, ids.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, took) = w.terminate();
    assert_eq!(
        code,
        Some(3),
        "exit code of a shutdown that left records unsent"
    );
    assert!(
        took >= Duration::from_secs(14) && took < Duration::from_secs(19),
        "took {took:?}"
    );
    assert!(w.logs().contains("shutdown was not clean"), "{}", w.logs());
    e.proxy.reset();
    w.restart();
    let records = e
        .aws
        .wait_for_ids(&e.stream, &ids, Duration::from_secs(60))
        .await;
    assert_eq!(ids_of(&records).len(), ids.len(), "each once");
    let (code, _) = w.terminate();
    assert_eq!(code, Some(0), "a clean shutdown still exits 0");
}
