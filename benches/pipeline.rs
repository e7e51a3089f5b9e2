//! End-to-end figures of the real release binary against SecantusDB and moto on loopback.
//!
//! `cargo bench --bench pipeline` builds `mongo-watcher` in the bench profile (release) and
//! passes its path as `CARGO_BIN_EXE_mongo-watcher`, which the shared test fixtures
//! (`tests/support/mod.rs`) start. Every scenario runs its own mongo-watcher process with the
//! production defaults (`batch_linger: 50ms`, `max_in_flight: 4`, `checkpoint_interval: 1s`)
//! and `LOG_LEVEL=info`. See `benches/README.md` for what each figure means.
//!
//! Sizes: `BENCH_DOCS` (5000) documents for the many-keys and old-model runs, `BENCH_HOT` (300)
//! updates of one document, `BENCH_STARTUP` (`1,10,40`) watcher counts, `BENCH_SHARDS` (4)
//! shards of the many-keys and old-model streams, `BENCH_POLL_MS` (20) how often the bench
//! polls for the end of a timed run.
//!
//! By default it runs the benchmark report (`report/mod.rs`: the scenarios and targets of
//! `benches/README.md`, `BENCH_RUNS` times, written to `BENCH_REPORT`; `scripts/bench` runs it
//! and writes `BENCHMARKS.md`). `BENCH_SUITE=classic` runs the older table below instead
//! (start-up, many keys, hot key, old model). `BENCH_SMOKE=1` runs a tiny checked version of
//! two report scenarios in any profile (`scripts/test` runs it with `cargo test --bench
//! pipeline`).
//!
//! Run without `--bench` and without `BENCH_SMOKE=1` (as `cargo test --all-targets` does), it
//! prints a note and exits.

#[path = "report/mod.rs"]
mod report;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::Select;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::ShardIteratorType;
use bson::{doc, Document};
use serde_json::json;
use support::*;

/// Longest any one wait may take before the bench gives up with a message.
const WAIT: Duration = Duration::from_secs(120);
/// Bearer token of the watchers' control plane (the hot-key and backlog runs pause and resume).
const TOKEN: &str = "bench-token";
/// How often the bench reads a stream while records are still unacknowledged.
const TAIL_EVERY: Duration = Duration::from_millis(250);

/// How often the bench asks a watcher how many records Kinesis acknowledged (`BENCH_POLL_MS`,
/// default 20).
fn poll_interval() -> Duration {
    Duration::from_millis(env_usize("BENCH_POLL_MS", 20) as u64)
}

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a positive integer")),
        Err(_) => default,
    }
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}={v:?}: not a comma-separated list"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// A config with the production defaults (no `defaults:` block) and the control plane on
/// `port`.
fn config(mongo: &Mongo, table: &str, port: u16, watchers: &[String]) -> String {
    format!(
        "mongodb:\n  uri: \"{}\"\ncheckpoints:\n  table: {table}\nhttp:\n  listen: 127.0.0.1:{port}\nwatchers:\n{}",
        mongo.uri(),
        watchers.concat()
    )
}

/// Starts mongo-watcher in `dir` at info level (the fixtures default to debug), with the
/// control plane's mutations enabled by `TOKEN`.
fn start_watcher(dir: &Path, config: &str, aws_endpoint: &str) -> Watcher {
    Watcher::start_with_env(
        dir,
        config,
        aws_endpoint,
        &[("LOG_LEVEL", "info"), ("MONGO_WATCHER_API_TOKEN", TOKEN)],
    )
}

/// `GET /metrics` requests the bench has made, so that the watcher's CPU figure can take out
/// what answering them cost.
static SCRAPES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn scrapes() -> u64 {
    SCRAPES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sum of the samples of `name` for `watcher` in `GET /metrics` (0 when absent).
fn metric(port: u16, name: &str, watcher: &str) -> f64 {
    SCRAPES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = request(port, "GET", "/metrics", None, "");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    let label = format!("watcher=\"{watcher}\"");
    r.body
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(&label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Events the watcher on `port` has had acknowledged by Kinesis, from `GET /watchers/{watcher}`
/// (`counters.records_put`, counted where `mongo_watcher_records_put_total` is): a short JSON
/// answer where `/metrics` renders every series, so a bench waiting on it costs the watcher
/// less.
fn records_put(port: u16, watcher: &str) -> f64 {
    SCRAPES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let r = request(port, "GET", &format!("/watchers/{watcher}"), None, "");
    assert_eq!(r.status, 200, "GET /watchers/{watcher}: {}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("watcher status is JSON");
    v["counters"]["records_put"]
        .as_f64()
        .expect("counters.records_put in the watcher's status")
}

/// PutRecords calls, records in them, seconds spent in them, and records acknowledged, so far.
#[derive(Clone, Copy, Default)]
struct Calls {
    calls: f64,
    records: f64,
    seconds: f64,
    acked: f64,
}

impl Calls {
    fn read(port: u16, watcher: &str) -> Self {
        Self {
            calls: metric(port, "mongo_watcher_batch_records_count", watcher),
            records: metric(port, "mongo_watcher_batch_records_sum", watcher),
            seconds: metric(port, "mongo_watcher_put_duration_seconds_sum", watcher),
            acked: metric(port, "mongo_watcher_records_put_total", watcher),
        }
    }

    fn since(self, before: Self) -> Self {
        Self {
            calls: self.calls - before.calls,
            records: self.records - before.records,
            seconds: self.seconds - before.seconds,
            acked: self.acked - before.acked,
        }
    }
}

/// Reads a stream incrementally: each poll fetches only the records added since the last one,
/// so polling often costs moto little.
struct Tail {
    iterators: Vec<Option<String>>,
    records: Vec<aws_sdk_kinesis::types::Record>,
}

impl Tail {
    async fn new(aws: &Aws, stream: &str) -> Self {
        let shards = aws
            .kinesis
            .list_shards()
            .stream_name(stream)
            .send()
            .await
            .expect("list shards");
        let mut iterators = Vec::new();
        for shard in shards.shards() {
            let it = aws
                .kinesis
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(shard.shard_id())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("get shard iterator");
            iterators.push(it.shard_iterator().map(str::to_owned));
        }
        Self {
            iterators,
            records: Vec::new(),
        }
    }

    /// Fetches what is new; returns the total number of records seen.
    async fn poll(&mut self, aws: &Aws) -> usize {
        for slot in &mut self.iterators {
            while let Some(it) = slot.clone() {
                let page = aws
                    .kinesis
                    .get_records()
                    .shard_iterator(it)
                    .limit(10_000)
                    .send()
                    .await
                    .expect("get records");
                *slot = page.next_shard_iterator().map(str::to_owned);
                if page.records().is_empty() {
                    break;
                }
                self.records.extend(page.records().iter().cloned());
            }
        }
        self.records.len()
    }

    /// Waits until at least `n` records are readable; returns when the bench saw the last one.
    ///
    /// moto is one Python process that the watcher also needs, so the bench does not hammer
    /// it: it asks the watcher's `/metrics` (on `port`) every `BENCH_POLL_MS` how many records
    /// Kinesis has acknowledged, reads the stream when that reaches `acked_before + n`, and
    /// otherwise only every [`TAIL_EVERY`] to keep the final read short.
    async fn wait_for(
        &mut self,
        aws: &Aws,
        n: usize,
        port: u16,
        watcher: &str,
        acked_before: f64,
    ) -> Instant {
        let deadline = Instant::now() + WAIT;
        let mut last_read = Instant::now();
        loop {
            let acked = metric(port, "mongo_watcher_records_put_total", watcher) - acked_before;
            if acked >= n as f64 || last_read.elapsed() >= TAIL_EVERY {
                if self.poll(aws).await >= n {
                    return Instant::now();
                }
                last_read = Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "watcher {watcher}: only {} of {n} records readable in Kinesis ({acked} \
                 acknowledged) after {WAIT:?}",
                self.records.len()
            );
            tokio::time::sleep(poll_interval()).await;
        }
    }

    /// The user records, with aggregated records (`aggregation: kpl`) unpacked.
    fn users(&self) -> Vec<serde_json::Value> {
        self.records
            .iter()
            .flat_map(|r| {
                watchers::aggregate::deaggregate(r.data().as_ref()).expect("a valid aggregate")
            })
            .map(|d| serde_json::from_slice(&d).expect("user record is JSON"))
            .collect()
    }

    fn json(&self) -> Vec<serde_json::Value> {
        self.records
            .iter()
            .map(|r| serde_json::from_slice(r.data().as_ref()).expect("record is JSON"))
            .collect()
    }
}

struct Env {
    mongo: Mongo,
    moto: Moto,
    aws: Aws,
    client: mongodb::Client,
}

struct Startup {
    watchers: usize,
    pool: usize,
    first: Duration,
    all: Duration,
}

/// Process start until every one of `n` watchers (each on its own collection, all on one
/// stream) has stored its first checkpoint.
async fn startup(e: &Env, n: usize, stream: &str) -> Startup {
    let table = unique("bench-startup");
    e.aws.create_checkpoint_table(&table).await;
    let watchers: Vec<String> = (0..n)
        .map(|i| {
            watcher_yaml(
                &format!("w{i}"),
                "startup",
                &format!("c{n}_{i}"),
                stream,
                "",
            )
        })
        .collect();
    let cfg = config(&e.mongo, &table, free_port(), &watchers);
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let _w = start_watcher(dir.path(), &cfg, &e.moto.endpoint());
    let mut first = None;
    loop {
        let stored = e
            .aws
            .dynamodb
            .scan()
            .table_name(&table)
            .select(Select::Count)
            .consistent_read(true)
            .send()
            .await
            .expect("scan the checkpoint table")
            .count() as usize;
        if stored > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if stored >= n {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "start-up of {n} watchers: only {stored} checkpoints after {WAIT:?}"
        );
        tokio::time::sleep(poll_interval()).await;
    }
    let all = started.elapsed();
    Startup {
        watchers: n,
        pool: (n + 8).max(10),
        first: first.unwrap_or(all),
        all,
    }
}

struct Run {
    name: String,
    records: usize,
    elapsed: Duration,
    /// PutRecords calls as the watcher counted them (none for the old model).
    calls: Option<Calls>,
    note: String,
}

/// A watcher on `db.coll` → `stream` (already created), first checkpoint stored, control plane
/// ready on the returned port.
async fn watch(
    e: &Env,
    name: &str,
    coll: &str,
    stream: &str,
    aws_endpoint: &str,
) -> (Watcher, u16, tempfile::TempDir) {
    watch_with(e, name, coll, stream, aws_endpoint, "").await
}

/// [`watch`] with `extra` watcher fields (YAML lines indented by four spaces).
async fn watch_with(
    e: &Env,
    name: &str,
    coll: &str,
    stream: &str,
    aws_endpoint: &str,
    extra: &str,
) -> (Watcher, u16, tempfile::TempDir) {
    let table = unique("bench-cps");
    e.aws.create_checkpoint_table(&table).await;
    let port = free_port();
    let cfg = config(
        &e.mongo,
        &table,
        port,
        &[watcher_yaml(name, "bench", coll, stream, extra)],
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let w = start_watcher(dir.path(), &cfg, aws_endpoint);
    e.aws
        .wait_for_checkpoint(&table, name, WAIT, |_| true)
        .await;
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);
    (w, port, dir)
}

/// Inserts `_id`s `ids` in `insert_many` batches of 500; returns how long it took.
async fn insert_docs(coll: mongodb::Collection<Document>, ids: std::ops::Range<i64>) -> Duration {
    let t = Instant::now();
    let ids: Vec<i64> = ids.collect();
    for chunk in ids.chunks(500) {
        let batch: Vec<Document> = chunk
            .iter()
            .map(|&i| {
                doc! {
                    "_id": i,
                    "customer": format!("customer-{:05}", i % 997),
                    "total": (i % 1000) as f64 * 1.25,
                    "items": [{"sku": format!("sku-{}", i % 50), "qty": i % 5 + 1}],
                    "at": bson::DateTime::from_millis(1_700_000_000_000 + i),
                }
            })
            .collect();
        coll.insert_many(batch).await.expect("insert_many");
    }
    t.elapsed()
}

enum Writer {
    /// Still writing while the watcher delivers.
    Concurrent(tokio::task::JoinHandle<Duration>),
    /// Wrote everything, in this long, before the watcher resumed.
    Done(Duration),
}

/// `docs` inserts with distinct `_id`s in `insert_many` batches of 500, timed until all are
/// readable in Kinesis. `backlog == false`: a concurrent writer, timed from the first insert.
/// `backlog == true`: written while the watcher is paused, timed from the resume (the
/// pipeline's own rate, not bounded by the writer).
async fn many_keys(e: &Env, docs: usize, shards: i32, backlog: bool) -> (Run, Vec<Vec<u8>>) {
    let stream = unique("bench-many");
    e.aws.create_stream(&stream, shards).await;
    let coll_name = unique("many");
    let (_w, port, _dir) = watch(e, "many", &coll_name, &stream, &e.moto.endpoint()).await;
    let coll = e
        .client
        .database("bench")
        .collection::<Document>(&coll_name);
    let mut tail = Tail::new(&e.aws, &stream).await;
    let ids = 0..docs as i64;
    let (started, before, writer) = if backlog {
        pause(port, "many");
        let took = insert_docs(coll, ids).await;
        let before = Calls::read(port, "many");
        let started = Instant::now();
        resume(port, "many");
        (started, before, Writer::Done(took))
    } else {
        let before = Calls::read(port, "many");
        let started = Instant::now();
        let task = tokio::spawn(insert_docs(coll, ids));
        (started, before, Writer::Concurrent(task))
    };
    let done = tail
        .wait_for(&e.aws, docs, port, "many", before.acked)
        .await;
    let elapsed = done - started;
    let calls = Calls::read(port, "many").since(before);
    let note = match writer {
        Writer::Concurrent(task) => {
            let took = task.await.expect("writer task");
            format!("concurrent writer done after {:.2} s", took.as_secs_f64())
        }
        Writer::Done(took) => format!(
            "backlog written in {:.2} s while paused",
            took.as_secs_f64()
        ),
    };
    let ids: HashSet<i64> = tail
        .json()
        .iter()
        .filter_map(|j| j["documentKey"]["_id"].as_i64())
        .collect();
    assert_eq!(ids.len(), docs, "every inserted document arrived once");
    let data = tail
        .records
        .iter()
        .map(|r| r.data().as_ref().to_vec())
        .collect();
    let mode = if backlog { "backlog" } else { "live" };
    let run = Run {
        name: format!("many keys, {mode} ({shards} shards)"),
        records: docs,
        elapsed,
        calls: Some(calls),
        note,
    };
    (run, data)
}

fn pause(port: u16, watcher: &str) {
    let r = request(
        port,
        "POST",
        &format!("/watchers/{watcher}/pause"),
        Some(TOKEN),
        "",
    );
    assert_eq!(r.status, 200, "pause {watcher}: {}", r.body);
}

fn resume(port: u16, watcher: &str) {
    let r = request(
        port,
        "POST",
        &format!("/watchers/{watcher}/resume"),
        Some(TOKEN),
        "",
    );
    assert_eq!(r.status, 200, "resume {watcher}: {}", r.body);
}

/// `n` updates of one document: written while the watcher is paused, then timed from the
/// resume until all are readable, so the figure is the pipeline's and not the writer's.
async fn hot_key(e: &Env, n: usize, label: &str, aws_endpoint: &str) -> Run {
    let stream = unique("bench-hot");
    e.aws.create_stream(&stream, 1).await;
    let coll_name = unique("hot");
    let coll = e
        .client
        .database("bench")
        .collection::<Document>(&coll_name);
    coll.insert_one(doc! {"_id": "hot", "n": 0_i64})
        .await
        .expect("insert the hot document");
    let (_w, port, _dir) = watch(e, "hot", &coll_name, &stream, aws_endpoint).await;
    pause(port, "hot");
    let t = Instant::now();
    for _ in 0..n {
        coll.update_one(doc! {"_id": "hot"}, doc! {"$inc": {"n": 1_i64}})
            .await
            .expect("update");
    }
    let writer = t.elapsed();
    let mut tail = Tail::new(&e.aws, &stream).await;
    let before = Calls::read(port, "hot");
    let started = Instant::now();
    resume(port, "hot");
    let done = tail.wait_for(&e.aws, n, port, "hot", before.acked).await;
    let elapsed = done - started;
    let calls = Calls::read(port, "hot").since(before);
    let seen: Vec<i64> = tail
        .json()
        .iter()
        .filter_map(|j| j["updateDescription"]["updatedFields"]["n"].as_i64())
        .collect();
    let expected: Vec<i64> = (1..=n as i64).collect();
    assert_eq!(seen, expected, "{label}: updates out of order or missing");
    Run {
        name: format!("hot key, {label}"),
        records: n,
        elapsed,
        calls: Some(calls),
        note: format!(
            "backlog written in {:.2} s while paused; in order",
            writer.as_secs_f64()
        ),
    }
}

/// The old tool's model: one `PutRecord` per event, awaited before the next, constant
/// partition key, the same record bytes as the many-keys run.
async fn old_model(e: &Env, data: &[Vec<u8>], shards: i32) -> Run {
    let stream = unique("bench-old");
    e.aws.create_stream(&stream, shards).await;
    let started = Instant::now();
    for d in data {
        e.aws
            .kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key("bench.many")
            .data(Blob::new(d.clone()))
            .send()
            .await
            .expect("put record");
    }
    let elapsed = started.elapsed();
    let mut tail = Tail::new(&e.aws, &stream).await;
    assert_eq!(
        tail.poll(&e.aws).await,
        data.len(),
        "every PutRecord landed"
    );
    Run {
        name: "old model: PutRecord per event".into(),
        records: data.len(),
        elapsed,
        calls: None,
        note: "sequential, from the bench process".into(),
    }
}

/// The floor of a hot key on this moto: `PutRecords` calls of one record each, awaited one
/// after the other, from the bench process (no MongoDB, no watcher).
async fn hot_key_floor(e: &Env, data: &[Vec<u8>]) -> Run {
    let stream = unique("bench-floor");
    e.aws.create_stream(&stream, 1).await;
    let started = Instant::now();
    for d in data {
        let entry = aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
            .partition_key("hot")
            .data(Blob::new(d.clone()))
            .build()
            .expect("PutRecords entry");
        let out = e
            .aws
            .kinesis
            .put_records()
            .stream_name(&stream)
            .records(entry)
            .send()
            .await
            .expect("put records");
        assert_eq!(
            out.failed_record_count().unwrap_or(0),
            0,
            "moto rejected a record"
        );
    }
    let elapsed = started.elapsed();
    Run {
        name: "hot key floor: 1-record calls".into(),
        records: data.len(),
        elapsed,
        calls: None,
        note: "sequential PutRecords from the bench process".into(),
    }
}

fn print_table(startups: &[Startup], runs: &[Run]) {
    println!();
    println!("start-up: process start until every watcher's first checkpoint is stored");
    println!(
        "{:>9} {:>10} {:>18} {:>17}",
        "watchers", "mongo pool", "first checkpoint", "all checkpoints"
    );
    for s in startups {
        println!(
            "{:>9} {:>10} {:>15} ms {:>14} ms",
            s.watchers,
            s.pool,
            s.first.as_millis(),
            s.all.as_millis()
        );
    }
    println!();
    println!("throughput: until every record is readable in Kinesis");
    println!(
        "{:<32} {:>7} {:>8} {:>10} {:>6} {:>9} {:>8}  note",
        "scenario", "records", "seconds", "records/s", "calls", "recs/call", "call ms"
    );
    for r in runs {
        let secs = r.elapsed.as_secs_f64();
        let (calls, per_call, call_ms) = match r.calls {
            Some(c) if c.calls > 0.0 => (
                format!("{:.0}", c.calls),
                format!("{:.1}", c.records / c.calls),
                format!("{:.1}", c.seconds * 1000.0 / c.calls),
            ),
            _ => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<32} {:>7} {:>8.2} {:>10.0} {:>6} {:>9} {:>8}  {}",
            r.name,
            r.records,
            secs,
            r.records as f64 / secs,
            calls,
            per_call,
            call_ms,
            r.note
        );
    }
}

async fn bench() {
    let docs = env_usize("BENCH_DOCS", 5000);
    let hot = env_usize("BENCH_HOT", 300);
    let counts = env_list("BENCH_STARTUP", &[1, 10, 40]);
    let shards = env_usize("BENCH_SHARDS", 4) as i32;
    assert!(docs > 0 && hot > 0 && shards > 0, "sizes must be positive");

    println!("mongo-watcher pipeline bench");
    println!("  binary: {}", env!("CARGO_BIN_EXE_mongo-watcher"));
    println!(
        "  cores: {}; SecantusDB and moto (Python) on loopback: not AWS figures",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("  BENCH_DOCS={docs} BENCH_HOT={hot} BENCH_STARTUP={counts:?} BENCH_SHARDS={shards}");

    let total = Instant::now();
    let mongo = Mongo::start();
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let client = mongo.client().await;
    let e = Env {
        mongo,
        moto,
        aws,
        client,
    };

    let startup_stream = unique("bench-startup");
    e.aws.create_stream(&startup_stream, 1).await;
    let mut startups = Vec::new();
    for &n in &counts {
        let s = startup(&e, n, &startup_stream).await;
        eprintln!("start-up, {n} watchers: {} ms", s.all.as_millis());
        startups.push(s);
    }

    let mut runs = Vec::new();
    let (run, data) = many_keys(&e, docs, shards, false).await;
    eprintln!("many keys, live: {:.2} s", run.elapsed.as_secs_f64());
    runs.push(run);
    let (run, _) = many_keys(&e, docs, shards, true).await;
    eprintln!("many keys, backlog: {:.2} s", run.elapsed.as_secs_f64());
    runs.push(run);

    let run = hot_key(&e, hot, "direct to moto", &e.moto.endpoint()).await;
    eprintln!("hot key, direct: {:.2} s", run.elapsed.as_secs_f64());
    runs.push(run);
    let sample: Vec<Vec<u8>> = data.iter().cycle().take(hot).cloned().collect();
    let run = hot_key_floor(&e, &sample).await;
    eprintln!("hot key floor: {:.2} s", run.elapsed.as_secs_f64());
    runs.push(run);

    let proxy = Proxy::start(&e.moto);
    for delay in [0, 20] {
        proxy.rules(json!({"delay_ms": delay}));
        let label = format!("proxy delay_ms={delay}");
        let run = hot_key(&e, hot, &label, &proxy.endpoint()).await;
        eprintln!("hot key, {label}: {:.2} s", run.elapsed.as_secs_f64());
        runs.push(run);
    }
    drop(proxy);

    let run = old_model(&e, &data, shards).await;
    eprintln!("old model: {:.2} s", run.elapsed.as_secs_f64());
    runs.push(run);

    print_table(&startups, &runs);
    println!();
    println!("total bench time {:.0} s", total.elapsed().as_secs_f64());
}

fn main() {
    let smoke = std::env::var("BENCH_SMOKE").is_ok_and(|v| v == "1");
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
    if !smoke && !std::env::args().any(|a| a == "--bench") {
        println!(
            "benches/pipeline.rs: skipped (run it with `cargo bench --bench pipeline`, or \
             BENCH_SMOKE=1)"
        );
        return;
    }
    let classic = std::env::var("BENCH_SUITE").is_ok_and(|v| v == "classic");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(async {
            if smoke {
                report::smoke().await
            } else if classic {
                bench().await
            } else {
                report::report().await
            }
        });
}
