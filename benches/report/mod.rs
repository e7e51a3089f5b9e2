//! The benchmark report (`scripts/bench`, or `cargo bench --bench pipeline`): the scenarios of
//! `benches/README.md`, each measured `BENCH_RUNS` times on fresh SecantusDB and moto servers,
//! summarised as min / median / max with its target, and written as markdown to
//! `BENCH_REPORT` (scripts/bench sets `BENCHMARKS.md`). `BENCH_SMOKE=1` runs a tiny backlog and
//! the shard-throttling scenario instead, checks them, and writes nothing (the test suite runs
//! it so the bench cannot rot).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bson::{doc, Document, RawDocumentBuf};
use futures_util::StreamExt;
use mongodb::options::FullDocumentType;
use serde_json::json;

use super::support::*;
use super::{
    env_usize, metric, pause, resume, start_watcher, watch, watch_with, Calls, Env, Tail, WAIT,
};

/// How long the slow parts (1,000 watchers starting, a throttled backlog) may take.
const LONG_WAIT: Duration = Duration::from_secs(300);

/// Sizes of one report, from the environment.
#[derive(Clone, Debug)]
struct Sizes {
    runs: usize,
    backlog: usize,
    doc_bytes: usize,
    old_events: usize,
    shards: i32,
    latency_rate: usize,
    latency_secs: usize,
    moto_calls: usize,
    watchers: usize,
    throttle_docs: usize,
    throttle_bytes: usize,
    updates: usize,
    update_rate: usize,
    update_keys: usize,
    /// Scenario 10: updates of the one hot document, and small updates over `small_keys`.
    hot_updates: usize,
    small_updates: usize,
    small_keys: usize,
    /// Scenario 11: documents copied by `snapshot: initial`.
    snapshot_docs: usize,
    /// Scenario numbers to run (`BENCH_SCENARIOS`, default all).
    scenarios: Vec<u8>,
}

impl Sizes {
    fn from_env() -> Self {
        let scenarios = match std::env::var("BENCH_SCENARIOS") {
            Ok(v) => v
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("BENCH_SCENARIOS={v:?}: numbers 1 to 11"))
                })
                .collect(),
            Err(_) => (1..=11).collect(),
        };
        let s = Self {
            runs: env_usize("BENCH_RUNS", 3),
            backlog: env_usize("BENCH_BACKLOG", 20_000),
            doc_bytes: env_usize("BENCH_DOC_BYTES", 1024),
            old_events: env_usize("BENCH_OLD_EVENTS", 2_000),
            shards: env_usize("BENCH_SHARDS", 4) as i32,
            latency_rate: env_usize("BENCH_LATENCY_RATE", 1_000),
            latency_secs: env_usize("BENCH_LATENCY_SECS", 15),
            moto_calls: env_usize("BENCH_MOTO_CALLS", 200),
            watchers: env_usize("BENCH_WATCHERS", 1_000),
            throttle_docs: env_usize("BENCH_THROTTLE_DOCS", 6_000),
            throttle_bytes: 500,
            updates: env_usize("BENCH_UPDATES", 1_500),
            update_rate: env_usize("BENCH_UPDATE_RATE", 400),
            update_keys: env_usize("BENCH_UPDATE_KEYS", 50),
            hot_updates: env_usize("BENCH_HOT_UPDATES", 2_000),
            small_updates: env_usize("BENCH_SMALL_UPDATES", 20_000),
            small_keys: env_usize("BENCH_SMALL_KEYS", 50),
            snapshot_docs: env_usize("BENCH_SNAPSHOT_DOCS", 20_000),
            scenarios,
        };
        assert!(
            s.runs > 0
                && s.backlog > 0
                && s.old_events > 0
                && s.shards > 0
                && s.latency_rate > 0
                && s.latency_secs > 0
                && s.moto_calls > 0
                && s.watchers > 0
                && s.throttle_docs > 0
                && s.updates > 0
                && s.update_rate > 0
                && s.update_keys > 0
                && s.hot_updates > 0
                && s.small_updates > 0
                && s.small_keys > 0
                && s.snapshot_docs > 0,
            "sizes must be positive: {s:?}"
        );
        s
    }

    fn wants(&self, scenario: u8) -> bool {
        self.scenarios.contains(&scenario)
    }
}

// ------------------------------------------------------------------------------- figures

#[derive(Clone, Copy)]
enum Cmp {
    Ge,
    Le,
    Lt,
    Eq,
}

/// One figure of the report.
struct Fig {
    key: &'static str,
    scenario: u8,
    label: &'static str,
    unit: &'static str,
    target: Option<(Cmp, f64)>,
    decimals: usize,
}

const fn fig(
    key: &'static str,
    scenario: u8,
    label: &'static str,
    unit: &'static str,
    target: Option<(Cmp, f64)>,
    decimals: usize,
) -> Fig {
    Fig {
        key,
        scenario,
        label,
        unit,
        target,
        decimals,
    }
}

const FIGS: &[Fig] = &[
    fig(
        "read_ceiling",
        1,
        "bare change-stream reader (Rust, `mongodb` crate)",
        "events/s",
        None,
        0,
    ),
    fig(
        "put_seq",
        1,
        "bare PutRecords of the watcher's records, 500 a call, 1 at a time",
        "records/s",
        None,
        0,
    ),
    fig(
        "put_par",
        1,
        "bare PutRecords of the watcher's records, 500 a call, 4 in flight",
        "records/s",
        None,
        0,
    ),
    fig(
        "ceiling",
        1,
        "emulator ceiling = min(reader, best PutRecords)",
        "events/s",
        None,
        0,
    ),
    fig(
        "e2e",
        2,
        "mongo-watcher, backlog, resume until all in Kinesis",
        "events/s",
        None,
        0,
    ),
    fig(
        "share",
        2,
        "mongo-watcher / emulator ceiling",
        "",
        Some((Cmp::Ge, 0.8)),
        2,
    ),
    fig(
        "old",
        3,
        "old tool's loop (Python: PutRecord + UpdateItem per event)",
        "events/s",
        None,
        1,
    ),
    fig(
        "old_ratio",
        3,
        "mongo-watcher / old tool's loop",
        "x",
        Some((Cmp::Ge, 50.0)),
        1,
    ),
    fig(
        "cpu_us",
        4,
        "mongo-watcher CPU time per event (utime+stime)",
        "µs",
        Some((Cmp::Lt, 15.0)),
        1,
    ),
    fig(
        "cpu_us_net",
        4,
        "the same without answering the bench's status polls (their CPU measured on the idle watcher right after)",
        "µs",
        None,
        1,
    ),
    fig(
        "scrape_us",
        4,
        "CPU of one `GET /watchers/{name}` answer (the bench's poll), idle watcher",
        "µs",
        None,
        0,
    ),
    fig("lat_rate", 5, "writer's achieved rate", "events/s", None, 0),
    fig("lat_p50", 5, "commit -> Kinesis latency p50", "ms", None, 0),
    fig("lat_p99", 5, "commit -> Kinesis latency p99", "ms", None, 0),
    fig(
        "moto_p50",
        5,
        "moto's own PutRecords call p50",
        "ms",
        None,
        1,
    ),
    fig(
        "moto_p99",
        5,
        "moto's own PutRecords call p99",
        "ms",
        None,
        1,
    ),
    fig(
        "lat_over",
        5,
        "latency p99 minus moto's own p99",
        "ms",
        Some((Cmp::Lt, 100.0)),
        0,
    ),
    fig(
        "moto_call_records",
        5,
        "records per bare call (the watcher's mean)",
        "records",
        None,
        0,
    ),
    fig(
        "ready_ms",
        6,
        "spawn -> GET /readyz 200",
        "ms",
        Some((Cmp::Lt, 3000.0)),
        0,
    ),
    fig(
        "bare_open_ms",
        6,
        "bare: the same SecantusDB opening the same change streams from one Rust client (no watcher), all at once",
        "ms",
        None,
        0,
    ),
    fig(
        "ready_over_bare",
        6,
        "spawn -> ready / bare opens, same run",
        "x",
        None,
        2,
    ),
    fig(
        "rss_mib",
        6,
        "VmRSS once ready",
        "MiB",
        Some((Cmp::Lt, 128.0)),
        1,
    ),
    fig(
        "ddb_per_10k",
        7,
        "DynamoDB checkpoint writes per 10,000 events",
        "",
        Some((Cmp::Le, 20.0)),
        1,
    ),
    fig(
        "calls_per_10k",
        7,
        "PutRecords calls per 10,000 events",
        "",
        None,
        1,
    ),
    fig(
        "a_clean",
        8,
        "6,000-doc backlog via proxy, fault-free",
        "events/s",
        None,
        0,
    ),
    fig(
        "a_fault",
        8,
        "same, half of shard 0's records rejected",
        "events/s",
        None,
        0,
    ),
    fig(
        "a_ratio",
        8,
        "with faults / fault-free",
        "",
        Some((Cmp::Ge, 0.6)),
        2,
    ),
    fig(
        "a_long_clean",
        8,
        "the same with a 5x backlog (sustained), fault-free",
        "events/s",
        None,
        0,
    ),
    fig(
        "a_long_ratio",
        8,
        "5x backlog: with faults / fault-free (no target: the tail of retries weighs less)",
        "",
        None,
        2,
    ),
    fig(
        "c_share",
        8,
        "5x backlog into shards held to 1,000 records/s each: delivered / the shards' limit",
        "",
        None,
        2,
    ),
    fig(
        "c_thrown",
        8,
        "the same: records throttled per record delivered",
        "records",
        None,
        2,
    ),
    fig(
        "a_rejected",
        8,
        "records the proxy rejected",
        "records",
        None,
        0,
    ),
    fig(
        "a_lost",
        8,
        "records lost (all runs)",
        "records",
        Some((Cmp::Eq, 0.0)),
        0,
    ),
    fig(
        "a_dup",
        8,
        "records duplicated (all runs)",
        "records",
        Some((Cmp::Eq, 0.0)),
        0,
    ),
    fig(
        "b_writer",
        9,
        "writer's achieved rate (the slower half)",
        "events/s",
        None,
        0,
    ),
    fig("b_clean_s", 9, "all delivered, fault-free", "s", None, 2),
    fig(
        "b_fault_s",
        9,
        "all delivered, 25% records + 10% calls failing",
        "s",
        None,
        2,
    ),
    fig(
        "b_ratio",
        9,
        "with faults / fault-free",
        "",
        Some((Cmp::Le, 2.0)),
        2,
    ),
    fig(
        "b_rejected",
        9,
        "records + calls the proxy failed",
        "",
        None,
        0,
    ),
    fig(
        "b_bad_keys",
        9,
        "keys out of order or missing an update (both runs)",
        "keys",
        Some((Cmp::Eq, 0.0)),
        0,
    ),
    fig(
        "agg_hot_none",
        10,
        "one hot document, `aggregation: none` (one event per round trip)",
        "events/s",
        None,
        0,
    ),
    fig(
        "agg_hot_kpl",
        10,
        "one hot document, `aggregation: kpl`",
        "events/s",
        None,
        0,
    ),
    fig(
        "agg_hot_ratio",
        10,
        "hot document, kpl / none",
        "",
        Some((Cmp::Ge, 10.0)),
        1,
    ),
    fig(
        "agg_small_none",
        10,
        "small updates over few keys, one shard held to 1,000 records/s and 1 MiB/s, `none`",
        "events/s",
        None,
        0,
    ),
    fig(
        "agg_small_kpl",
        10,
        "the same, `aggregation: kpl`",
        "events/s",
        None,
        0,
    ),
    fig(
        "agg_small_records",
        10,
        "the same with kpl: Kinesis records written",
        "records/s",
        None,
        0,
    ),
    fig(
        "agg_small_ratio",
        10,
        "small updates, kpl / none",
        "",
        None,
        1,
    ),
    fig(
        "agg_bad",
        10,
        "events missing or out of order (all four runs, read back deaggregated)",
        "events",
        Some((Cmp::Eq, 0.0)),
        0,
    ),
    fig(
        "snap_rate",
        11,
        "`snapshot: initial` with `snapshot_parallelism: 4` copying a collection of 1 KiB documents, start until all acknowledged",
        "documents/s",
        None,
        0,
    ),
    fig(
        "snap_ratio",
        11,
        "snapshot rate / streaming backlog rate (2) of the same run",
        "",
        None,
        2,
    ),
    fig(
        "snap_rate_1",
        11,
        "the same copy with `snapshot_parallelism: 1` (one range, the default)",
        "documents/s",
        None,
        0,
    ),
    fig(
        "snap_parallel_gain",
        11,
        "4 ranges / 1 range, same run",
        "",
        None,
        2,
    ),
];

const TITLES: [&str; 12] = [
    "",
    "Emulator ceiling",
    "End-to-end backlog rate",
    "Old tool's loop",
    "CPU per event",
    "Latency at a steady rate",
    "Many watchers",
    "DynamoDB writes and PutRecords calls",
    "Throttling A: one hot shard",
    "Throttling B: random record and call failures",
    "Aggregation: a hot document, and small events against a shard's limits",
    "Initial snapshot",
];

fn met(target: (Cmp, f64), v: f64) -> bool {
    let (cmp, t) = target;
    match cmp {
        Cmp::Ge => v >= t,
        Cmp::Le => v <= t,
        Cmp::Lt => v < t,
        Cmp::Eq => (v - t).abs() < 1e-9,
    }
}

fn target_text(target: (Cmp, f64)) -> String {
    let (cmp, t) = target;
    let op = match cmp {
        Cmp::Ge => ">=",
        Cmp::Le => "<=",
        Cmp::Lt => "<",
        Cmp::Eq => "=",
    };
    format!("{op} {t}")
}

/// What one run measured: figures by key, problems by scenario, notes.
#[derive(Default)]
struct RunResult {
    values: BTreeMap<&'static str, f64>,
    errors: BTreeMap<u8, String>,
    notes: Vec<String>,
}

impl RunResult {
    fn set(&mut self, key: &'static str, v: f64) {
        assert!(FIGS.iter().any(|f| f.key == key), "unknown figure {key}");
        eprintln!("  {key} = {v:.3}");
        self.values.insert(key, v);
    }
}

fn min_med_max(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let med = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (s[0], med, s[n - 1])
}

/// The `p`-quantile (0..1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs a scenario as its own task, so a failure (a panic: a timeout, a lost record) becomes
/// a message in the report instead of ending the bench.
async fn attempt<T: Send + 'static>(
    what: &str,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    eprintln!("-- {what}");
    match tokio::spawn(fut).await {
        Ok(v) => Ok(v),
        Err(e) => {
            let msg = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panicked".into()),
                Err(e) => e.to_string(),
            };
            eprintln!("   failed: {msg}");
            Err(msg.lines().next().unwrap_or_default().to_owned())
        }
    }
}

// ------------------------------------------------------------------------------- helpers

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1000.0
}

/// A document of about `bytes` BSON bytes with `_id` `id` and the fields of `extra`.
fn sized_doc(id: i64, bytes: usize, extra: Document) -> Document {
    let mut d = doc! {
        "_id": id,
        "customer": format!("customer-{:05}", id % 997),
        "total": (id % 1000) as f64 * 1.25,
        "at": bson::DateTime::from_millis(1_700_000_000_000 + id),
    };
    d.extend(extra);
    d.insert("pad", "");
    let len = d.to_vec().expect("encode").len();
    d.insert("pad", "x".repeat(bytes.saturating_sub(len)));
    d
}

/// Inserts documents `ids` of about `bytes` bytes each, in `insert_many` batches of 500.
async fn write_backlog(
    coll: &mongodb::Collection<Document>,
    ids: std::ops::Range<i64>,
    bytes: usize,
) -> Duration {
    let t = Instant::now();
    let ids: Vec<i64> = ids.collect();
    for chunk in ids.chunks(500) {
        let docs: Vec<Document> = chunk
            .iter()
            .map(|&i| sized_doc(i, bytes, Document::new()))
            .collect();
        coll.insert_many(docs).await.expect("insert_many");
    }
    t.elapsed()
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/pid/stat");
    let after = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `after` starts at field 3.
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    command_output("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

/// VmRSS of a process in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/pid/status");
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/pid/status");
    kib / 1024.0
}

fn command_output(program: &str, args: &[&str]) -> String {
    match Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        Ok(o) => format!("unknown ({program} exited {})", o.status),
        Err(e) => format!("unknown ({program}: {e})"),
    }
}

/// The operation time of a fresh `ping`: a change stream opened at it sees every later write.
async fn operation_time(client: &mongodb::Client) -> bson::Timestamp {
    let r = client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .expect("ping");
    r.get_timestamp("operationTime")
        .unwrap_or_else(|_| panic!("ping answered without operationTime: {r}"))
}

fn entry(key: String, data: Vec<u8>) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .partition_key(key)
        .data(Blob::new(data))
        .build()
        .expect("PutRecords entry")
}

async fn put_call(aws: &Aws, stream: &str, records: Vec<PutRecordsRequestEntry>) -> Duration {
    let t = Instant::now();
    let out = aws
        .kinesis
        .put_records()
        .stream_name(stream)
        .set_records(Some(records))
        .send()
        .await
        .expect("put records");
    let took = t.elapsed();
    assert_eq!(
        out.failed_record_count().unwrap_or(0),
        0,
        "moto rejected records of a bare PutRecords call"
    );
    took
}

/// Records/s of `records` (partition key, data) in calls of 500 with `in_flight` calls at
/// once, to a new stream.
async fn put_ceiling(
    aws: &Aws,
    shards: i32,
    records: &[(String, Vec<u8>)],
    in_flight: usize,
) -> f64 {
    let stream = unique("bench-put");
    aws.create_stream(&stream, shards).await;
    let calls: Vec<Vec<PutRecordsRequestEntry>> = records
        .chunks(500)
        .map(|c| c.iter().map(|(k, d)| entry(k.clone(), d.clone())).collect())
        .collect();
    let t = Instant::now();
    let stream = &stream;
    futures_util::stream::iter(calls)
        .map(|c| put_call(aws, stream, c))
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
    records.len() as f64 / t.elapsed().as_secs_f64()
}

/// The records mongo-watcher makes of these events with its defaults (partition key
/// `documentKey._id`, relaxed Extended JSON): the bare PutRecords of the ceiling send the same
/// bytes and keys as the watcher does.
fn watcher_records(events: &[RawDocumentBuf]) -> Vec<(String, Vec<u8>)> {
    let key = watchers::record::FieldPath::parse("documentKey._id").expect("key path");
    events
        .iter()
        .map(|raw| {
            let r = watchers::record::EventRecord::from_raw(
                raw,
                &key,
                watchers::record::RecordFormat::Relaxed,
            )
            .expect("a bench event encodes");
            (r.partition_key, r.data)
        })
        .collect()
}

fn start_env() -> (Mongo, Moto) {
    (Mongo::start(), Moto::start())
}

async fn env() -> Arc<Env> {
    let (mongo, moto) = start_env();
    let aws = Aws::new(&moto).await;
    let client = mongo.client().await;
    Arc::new(Env {
        mongo,
        moto,
        aws,
        client,
    })
}

fn coll(e: &Env, name: &str) -> mongodb::Collection<Document> {
    e.client.database("bench").collection(name)
}

/// Waits until the watcher on `port` reports `n` more records acknowledged than `before`;
/// returns that moment, once the stream shows the records, each arrived (moto's
/// `ApproximateArrivalTimestamp`) no later than it. Fails after `timeout`.
///
/// The stream is read only after that, or when the count has not moved for [`STALLED`]:
/// moto serves GetRecords on the same core as the watcher's PutRecords, and reading the
/// records while they are written cost it about as much CPU as writing them (a 20k drain
/// measured with a per-request timer inside moto: 2.7 s of PutRecords, 1.8 s of the bench's
/// GetRecords). The emulator ceiling is measured without a reader, so the drain is too.
async fn wait_delivered(
    e: &Env,
    tail: &mut Tail,
    n: usize,
    port: u16,
    watcher: &str,
    before: f64,
    timeout: Duration,
) -> Instant {
    const STALLED: Duration = Duration::from_secs(5);
    let deadline = Instant::now() + timeout;
    let (mut last, mut moved) = (f64::NAN, Instant::now());
    loop {
        let acked = super::records_put(port, watcher) - before;
        let (now, wall) = (Instant::now(), wall_ms());
        if acked != last {
            (last, moved) = (acked, now);
        }
        if acked >= n as f64 || moved.elapsed() >= STALLED {
            // Done when both hold: the watcher counted them and the stream shows them.
            if tail.poll(&e.aws).await >= n && acked >= n as f64 {
                let newest = tail
                    .records
                    .iter()
                    .filter_map(|r| r.approximate_arrival_timestamp())
                    .map(|t| t.secs() as f64 * 1000.0 + t.subsec_nanos() as f64 / 1e6)
                    .fold(f64::MIN, f64::max);
                // moto's timestamps have millisecond precision.
                assert!(
                    newest <= wall + 1.0,
                    "{watcher}: reported {n} acknowledged {:.0} ms before the last record \
                     arrived",
                    newest - wall
                );
                return now;
            }
            moved = Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{watcher}: only {} of {n} records readable in Kinesis ({acked} acknowledged) after \
             {timeout:?}",
            tail.records.len()
        );
        tokio::time::sleep(super::poll_interval()).await;
    }
}

// ----------------------------------------------------------------------------- scenarios

/// Scenarios 1 to 4 and 7 on one backlog.
async fn backlog_scenarios(e: Arc<Env>, s: Sizes, r: &mut RunResult) {
    let n = s.backlog;
    let stream = unique("bench-e2e");
    e.aws.create_stream(&stream, s.shards).await;
    let coll_name = unique("backlog");
    let (w, port, _dir) = watch(&e, "e2e", &coll_name, &stream, &e.moto.endpoint()).await;
    pause(port, "e2e");
    let c = coll(&e, &coll_name);
    let bare = c
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .max_await_time(Duration::from_millis(500))
        .await
        .expect("open the bare change stream")
        .with_type::<RawDocumentBuf>();
    let start_time = operation_time(&e.client).await;
    let wrote = write_backlog(&c, 0..n as i64, s.doc_bytes).await;
    r.notes.push(format!(
        "backlog of {n} documents of {} B written in {:.1} s while the watcher was paused",
        s.doc_bytes,
        wrote.as_secs_f64()
    ));

    // 1a: the bare reader, opened before the backlog.
    let read = attempt("1a bare change-stream reader", async move {
        let mut bare = bare;
        let t = Instant::now();
        let mut seen = 0;
        let mut events = Vec::with_capacity(n);
        while seen < n {
            match tokio::time::timeout(WAIT, bare.next()).await {
                Ok(Some(Ok(event))) => {
                    seen += 1;
                    events.push(event);
                }
                Ok(Some(Err(err))) => panic!("bare reader: {err}"),
                Ok(None) => panic!("bare reader: stream ended after {seen} events"),
                Err(_) => panic!("bare reader: no event for {WAIT:?} after {seen}"),
            }
        }
        (n as f64 / t.elapsed().as_secs_f64(), events)
    })
    .await;
    let (read, events) = match read {
        Ok((rate, events)) => (Ok(rate), events),
        Err(err) => (Err(err), Vec::new()),
    };
    // 1b: bare PutRecords of the watcher's own records, 1 and 4 calls in flight.
    let e1 = e.clone();
    let shards = s.shards;
    let put = attempt("1b bare PutRecords", async move {
        assert!(!events.is_empty(), "no events read for the bare PutRecords");
        let records = watcher_records(&events);
        let mean = records
            .iter()
            .map(|(k, d)| k.len() + d.len())
            .sum::<usize>()
            / records.len();
        let seq = put_ceiling(&e1.aws, shards, &records, 1).await;
        let par = put_ceiling(&e1.aws, shards, &records, 4).await;
        (seq, par, mean)
    })
    .await;
    let mut ceiling = None;
    match (&read, &put) {
        (Ok(read), Ok((seq, par, mean))) => {
            r.notes.push(format!(
                "bare PutRecords sent the watcher's own records of these events ({mean} B \
                 with the key on average)"
            ));
            r.set("read_ceiling", *read);
            r.set("put_seq", *seq);
            r.set("put_par", *par);
            let best = seq.max(*par);
            r.notes.push(format!(
                "put ceiling used: {} ({best:.0} records/s)",
                if par >= seq {
                    "4 calls in flight"
                } else {
                    "1 call at a time"
                }
            ));
            let c = read.min(best);
            r.set("ceiling", c);
            ceiling = Some(c);
        }
        (Err(err), _) | (_, Err(err)) => {
            r.errors.insert(1, err.clone());
        }
    }

    // 2, 4, 7: the watcher drains the backlog.
    let pid = w.pid().expect("watcher running");
    let e2 = e.clone();
    let drained = attempt("2 mongo-watcher drains the backlog", async move {
        let mut tail = Tail::new(&e2.aws, &stream).await;
        let before = Calls::read(port, "e2e");
        let ddb_before = metric(port, "mongo_watcher_checkpoint_writes_total", "e2e");
        let cpu_before = cpu_seconds(pid);
        let scrapes_before = super::scrapes();
        let started = Instant::now();
        resume(port, "e2e");
        let done = wait_delivered(&e2, &mut tail, n, port, "e2e", before.acked, WAIT).await;
        let cpu = cpu_seconds(pid) - cpu_before;
        let polls = super::scrapes() - scrapes_before;
        let secs = (done - started).as_secs_f64();
        let calls = Calls::read(port, "e2e").since(before);
        let ddb = metric(port, "mongo_watcher_checkpoint_writes_total", "e2e") - ddb_before;
        let ids: std::collections::HashSet<i64> = tail
            .json()
            .iter()
            .filter_map(|j| j["documentKey"]["_id"].as_i64())
            .collect();
        assert_eq!(ids.len(), n, "every backlog document arrived once");
        // What one poll cost the watcher: the same requests, idle, right after.
        const PROBES: u32 = 1000;
        let probe_before = cpu_seconds(pid);
        for _ in 0..PROBES {
            super::records_put(port, "e2e");
        }
        let scrape = (cpu_seconds(pid) - probe_before) / f64::from(PROBES);
        (n as f64 / secs, cpu, calls, ddb, polls, scrape)
    })
    .await;
    let mut e2e_rate = None;
    match drained {
        Ok((rate, cpu, calls, ddb, polls, scrape)) => {
            r.set("e2e", rate);
            e2e_rate = Some(rate);
            if let Some(c) = ceiling {
                r.set("share", rate / c);
            }
            r.set("cpu_us", cpu * 1e6 / n as f64);
            r.set("scrape_us", scrape * 1e6);
            r.set(
                "cpu_us_net",
                (cpu - polls as f64 * scrape).max(0.0) * 1e6 / n as f64,
            );
            r.notes.push(format!(
                "the drain's CPU includes {polls} status polls of the bench, {:.0} µs \
                 each on the idle watcher",
                scrape * 1e6
            ));
            r.set("ddb_per_10k", ddb * 10_000.0 / n as f64);
            r.set("calls_per_10k", calls.calls * 10_000.0 / n as f64);
            r.notes.push(format!(
                "watcher: {:.0} PutRecords calls of {:.0} records on average, {:.0} ms each; \
                 CPU {:.2} s over the drain",
                calls.calls,
                calls.records / calls.calls.max(1.0),
                calls.seconds * 1000.0 / calls.calls.max(1.0),
                cpu
            ));
        }
        Err(err) => {
            for sc in [2, 4, 7] {
                r.errors.insert(sc, err.clone());
            }
        }
    }
    drop(w);

    // 3: the old tool's loop over the start of the same backlog.
    if s.wants(3) {
        let e3 = e.clone();
        let events = s.old_events.min(n);
        let old = attempt("3 old tool's loop", async move {
            let stream = unique("bench-old");
            e3.aws.create_stream(&stream, 1).await;
            let table = unique("bench-marker");
            e3.aws.create_marker_table(&table).await;
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/old_tool_loop.py");
            let args = vec![
                script.display().to_string(),
                "--mongo-uri".into(),
                e3.mongo.uri(),
                "--db".into(),
                "bench".into(),
                "--collection".into(),
                coll_name,
                "--start-at-time".into(),
                format!("{},{}", start_time.time, start_time.increment),
                "--aws-endpoint".into(),
                e3.moto.endpoint(),
                "--stream".into(),
                stream,
                "--table".into(),
                table,
                "--events".into(),
                events.to_string(),
                "--timeout".into(),
                "600".into(),
            ];
            let out = tokio::task::spawn_blocking(move || {
                Command::new(venv_bin().join("python"))
                    .args(&args)
                    .stdin(Stdio::null())
                    .output()
                    .expect("run old_tool_loop.py")
            })
            .await
            .expect("old tool task");
            assert!(
                out.status.success(),
                "old_tool_loop.py failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let v: serde_json::Value =
                serde_json::from_str(line.lines().last().unwrap_or_default())
                    .unwrap_or_else(|_| panic!("old_tool_loop.py printed {line:?}"));
            v["events"].as_f64().expect("events") / v["seconds"].as_f64().expect("seconds")
        })
        .await;
        match old {
            Ok(rate) => {
                r.set("old", rate);
                if let Some(e2e) = e2e_rate {
                    r.set("old_ratio", e2e / rate);
                }
                r.notes.push(format!(
                    "old loop: the first {events} events of the same backlog (of {n}), read from \
                     an operation time before it"
                ));
            }
            Err(err) => {
                r.errors.insert(3, err);
            }
        }
    }
}

/// Scenario 5: latency at a steady write rate, beside moto's own PutRecords latency.
async fn latency(e: Arc<Env>, s: Sizes) -> (Vec<(&'static str, f64)>, String) {
    let stream = unique("bench-lat");
    e.aws.create_stream(&stream, s.shards).await;
    let coll_name = unique("lat");
    let (_w, port, _dir) = watch(&e, "lat", &coll_name, &stream, &e.moto.endpoint()).await;
    let c = coll(&e, &coll_name);
    let total = s.latency_rate * s.latency_secs;
    let before = Calls::read(port, "lat");
    let started = Instant::now();
    let mut written = 0;
    while written < total {
        let due = ((started.elapsed().as_secs_f64() * s.latency_rate as f64) as usize).min(total);
        if due > written {
            let t = wall_ms() as i64;
            let docs: Vec<Document> = (written..due)
                .map(|i| sized_doc(i as i64, s.doc_bytes, doc! {"t_ms": t}))
                .collect();
            c.insert_many(docs).await.expect("insert_many");
            written = due;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let writer = started.elapsed().as_secs_f64();
    let mut tail = Tail::new(&e.aws, &stream).await;
    wait_delivered(&e, &mut tail, total, port, "lat", before.acked, WAIT).await;
    let calls = Calls::read(port, "lat").since(before);
    let mut lat: Vec<f64> = tail
        .records
        .iter()
        .map(|rec| {
            let j: serde_json::Value =
                serde_json::from_slice(rec.data().as_ref()).expect("record is JSON");
            let t = j["fullDocument"]["t_ms"]
                .as_f64()
                .expect("t_ms in the record");
            let at = rec
                .approximate_arrival_timestamp()
                .expect("ApproximateArrivalTimestamp");
            at.secs() as f64 * 1000.0 + at.subsec_nanos() as f64 / 1e6 - t
        })
        .collect();
    lat.sort_by(f64::total_cmp);
    // moto's own latency: calls of the watcher's mean size, with its records, one at a time.
    let per_call = (calls.records / calls.calls.max(1.0)).round().max(1.0) as usize;
    let bare = unique("bench-lat-bare");
    e.aws.create_stream(&bare, s.shards).await;
    let data: Vec<Vec<u8>> = tail
        .records
        .iter()
        .map(|rec| rec.data().as_ref().to_vec())
        .collect();
    let mut moto = Vec::new();
    for call in 0..s.moto_calls {
        let records = (0..per_call)
            .map(|k| {
                let i = call * per_call + k;
                entry(i.to_string(), data[i % data.len()].clone())
            })
            .collect();
        moto.push(put_call(&e.aws, &bare, records).await.as_secs_f64() * 1000.0);
    }
    moto.sort_by(f64::total_cmp);
    let p99 = quantile(&lat, 0.99);
    let moto_p99 = quantile(&moto, 0.99);
    let figures = vec![
        ("lat_rate", total as f64 / writer),
        ("lat_p50", quantile(&lat, 0.5)),
        ("lat_p99", p99),
        ("moto_p50", quantile(&moto, 0.5)),
        ("moto_p99", moto_p99),
        ("lat_over", p99 - moto_p99),
        ("moto_call_records", per_call as f64),
    ];
    let note = format!(
        "latency: {total} inserts in {writer:.1} s; the watcher made {:.0} calls of {:.1} records, \
         {:.1} ms each on average; {} bare calls of {per_call} records for moto's own figure",
        calls.calls,
        calls.records / calls.calls.max(1.0),
        calls.seconds * 1000.0 / calls.calls.max(1.0),
        s.moto_calls
    );
    (figures, note)
}

/// Scenario 6: `n` watchers, each on its own collection, on a SecantusDB allowing enough
/// connections: spawn until `/readyz` answers 200, and the RSS then.
async fn many_watchers(n: usize) -> (f64, f64, f64) {
    let max = n + 200;
    let (mongo_port, _server) = start_listening_script(
        "benches/secantus_server.py",
        &["--port", "0", "--max-connections", &max.to_string()],
        "secantus (many watchers)",
    );
    // Its own moto too: after the other scenarios, moto's DynamoDB answers the 2,000 calls of
    // 1,000 first starts (a load and a first write each) more slowly (15.8 s against 6.6 s
    // on a fresh one, one run each), which says more about moto than about the watcher.
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let table = unique("bench-many-cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("bench-many");
    aws.create_stream(&stream, 1).await;
    let port = free_port();
    // `BENCH_MANY_EXTRA`: watcher settings added to each of them (YAML lines, `\n`-separated),
    // e.g. "    split_large_events: off\n" to compare a setting's cost at start.
    let extra = std::env::var("BENCH_MANY_EXTRA")
        .unwrap_or_default()
        .replace("\\n", "\n");
    let watchers: String = (0..n)
        .map(|i| watcher_yaml(&format!("w{i}"), "many", &format!("c{i}"), &stream, &extra))
        .collect();
    // `BENCH_MANY_URI`: options added to the connection string, e.g. "&maxConnecting=16".
    let uri_extra = std::env::var("BENCH_MANY_URI").unwrap_or_default();
    // `BENCH_MANY_TABLE=0`: no checkpoint table (no DynamoDB call at start), to tell the
    // watcher's and SecantusDB's share of the start from moto's.
    let checkpoints = match std::env::var("BENCH_MANY_TABLE").as_deref() {
        Ok("0") => String::new(),
        _ => format!("checkpoints:\n  table: {table}\n"),
    };
    let cfg = format!(
        "mongodb:\n  uri: \"mongodb://127.0.0.1:{mongo_port}/?directConnection=true{uri_extra}\"\n\
         {checkpoints}http:\n  listen: 127.0.0.1:{port}\nwatchers:\n{watchers}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let mut w = start_watcher(dir.path(), &cfg, &moto.endpoint());
    let pid = w.pid().expect("running");
    let mut last = String::new();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let r = request(port, "GET", "/readyz", None, "");
            if r.status == 200 {
                break;
            }
            last = r.body.chars().take(400).collect();
        }
        if let Some(status) = w.exited() {
            panic!("mongo-watcher with {n} watchers exited: {status}");
        }
        assert!(
            started.elapsed() < LONG_WAIT,
            "{n} watchers: /readyz not 200 after {LONG_WAIT:?}; last answer: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed();
    let rss = rss_mib(pid);
    drop(w);
    let bare = bare_stream_opens(mongo_port, n).await;
    (
        ready.as_secs_f64() * 1000.0,
        rss,
        bare.as_secs_f64() * 1000.0,
    )
}

/// The floor under scenario 6's start: one `mongodb` client, with the pool the watcher sizes
/// for `n` watchers, opening the `n` change streams of scenario 6 with the watcher's default
/// options on the same SecantusDB at once, until every one is open (after the watcher has
/// stopped and closed its own).
async fn bare_stream_opens(mongo_port: u16, n: usize) -> Duration {
    let uri = format!("mongodb://127.0.0.1:{mongo_port}/?directConnection=true");
    let mut options = mongodb::options::ClientOptions::parse(&uri)
        .await
        .expect("parse the bare client's URI");
    options.max_pool_size = Some(n as u32 + 8);
    let client = mongodb::Client::with_options(options).expect("bare client");
    // The server lets go of the watcher's connections only as their waiting reads end (up to
    // the watcher's `MAX_AWAIT`); until then they count against its connection limit.
    let deadline = Instant::now() + WAIT;
    loop {
        let status = client
            .database("admin")
            .run_command(doc! {"serverStatus": 1})
            .await
            .expect("serverStatus");
        let current = status
            .get_document("connections")
            .ok()
            .and_then(|c| match c.get("current") {
                Some(bson::Bson::Int32(v)) => Some(i64::from(*v)),
                Some(bson::Bson::Int64(v)) => Some(*v),
                Some(bson::Bson::Double(v)) => Some(*v as i64),
                _ => None,
            })
            .unwrap_or(0);
        if current <= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{current} connections still open on SecantusDB {WAIT:?} after the watcher stopped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = client.database("many");
    let started = Instant::now();
    let opens = (0..n).map(|i| {
        let coll = db.collection::<Document>(&format!("c{i}"));
        async move {
            // As the watcher opens it by default: the current document looked up, events over
            // 16 MiB split.
            coll.watch()
                .full_document(FullDocumentType::UpdateLookup)
                .pipeline([doc! {"$changeStreamSplitLargeEvent": {}}])
                .await
                .expect("open a bare change stream")
        }
    });
    let streams = futures_util::future::join_all(opens).await;
    let took = started.elapsed();
    drop(streams);
    took
}

/// `BENCH_THROTTLE_EXTRA`: watcher settings added to the watchers of both throttling
/// scenarios, in both halves (YAML lines, `\n`-separated), e.g.
/// "    record_retry_max_backoff: 100ms\n" to see what a setting does under faults.
fn throttle_extra() -> String {
    std::env::var("BENCH_THROTTLE_EXTRA")
        .unwrap_or_default()
        .replace("\\n", "\n")
}

/// Kinesis's per-shard write limit in records per second, as the proxy's `shard_limit` holds it.
const LIMIT_RPS: f64 = 1000.0;

struct ThrottleA {
    rate: f64,
    lost: usize,
    dup: usize,
    rejected: f64,
}

/// Throttling A's two halves on `docs` documents, fault-free then with half of shard 0's
/// records rejected; `label` tells the pair apart in the bench's output.
async fn throttle_a_pair(
    e: &Arc<Env>,
    proxy: &Arc<Proxy>,
    label: &str,
    docs: usize,
    bytes: usize,
    shards: i32,
) -> (Result<ThrottleA, String>, Result<ThrottleA, String>) {
    let clean = attempt(
        &format!("8 throttling A{label}, fault-free"),
        throttle_a(e.clone(), proxy.clone(), docs, bytes, shards, None),
    )
    .await;
    let half = json!({"fail_shard": {"shard": 0, "of": shards, "rate": 0.5}});
    let fault = attempt(
        &format!("8 throttling A{label}, shard 0 half rejected"),
        throttle_a(e.clone(), proxy.clone(), docs, bytes, shards, Some(half)),
    )
    .await;
    (clean, fault)
}

/// Scenario 8, one run: a backlog of `docs` documents of `bytes` bytes into a stream of
/// `shards` shards through the proxy, with `faults` as its rules (none: fault-free).
async fn throttle_a(
    e: Arc<Env>,
    proxy: Arc<Proxy>,
    docs: usize,
    bytes: usize,
    shards: i32,
    faults: Option<serde_json::Value>,
) -> ThrottleA {
    proxy.reset();
    if let Some(rules) = faults {
        proxy.rules(rules);
    }
    let stream = unique("bench-thr-a");
    e.aws.create_stream(&stream, shards).await;
    let coll_name = unique("thr-a");
    let (_w, port, _dir) = watch_with(
        &e,
        "thra",
        &coll_name,
        &stream,
        &proxy.endpoint(),
        &throttle_extra(),
    )
    .await;
    pause(port, "thra");
    write_backlog(&coll(&e, &coll_name), 0..docs as i64, bytes).await;
    let mut tail = Tail::new(&e.aws, &stream).await;
    let before = Calls::read(port, "thra");
    let started = Instant::now();
    resume(port, "thra");
    let done = wait_delivered(&e, &mut tail, docs, port, "thra", before.acked, LONG_WAIT).await;
    let rate = docs as f64 / (done - started).as_secs_f64();
    // A moment for anything sent twice to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tail.poll(&e.aws).await;
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for j in tail.json() {
        if let Some(id) = j["documentKey"]["_id"].as_i64() {
            *seen.entry(id).or_default() += 1;
        }
    }
    let lost = (0..docs as i64).filter(|i| !seen.contains_key(i)).count();
    let dup = seen.values().map(|&c| c - 1).sum();
    let rejected = proxy.stats()["records_failed"].as_f64().unwrap_or(0.0);
    ThrottleA {
        rate,
        lost,
        dup,
        rejected,
    }
}

struct ThrottleB {
    secs: f64,
    writer: f64,
    bad_keys: usize,
    failed: f64,
}

/// Scenario 9, one half: `updates` `$inc` updates at `rate`/s round-robin over `keys`
/// documents, through the proxy with or without failures; time until all are delivered, and
/// each document's counters in order.
async fn throttle_b(e: Arc<Env>, proxy: Arc<Proxy>, s: Sizes, faults: bool) -> ThrottleB {
    proxy.reset();
    let stream = unique("bench-thr-b");
    e.aws.create_stream(&stream, s.shards).await;
    let coll_name = unique("thr-b");
    let c = coll(&e, &coll_name);
    let key = |k: usize| format!("k{k:03}");
    let docs: Vec<Document> = (0..s.update_keys)
        .map(|k| doc! {"_id": key(k), "n": 0_i64})
        .collect();
    c.insert_many(docs).await.expect("insert the documents");
    let (_w, port, _dir) = watch_with(
        &e,
        "thrb",
        &coll_name,
        &stream,
        &proxy.endpoint(),
        &throttle_extra(),
    )
    .await;
    if faults {
        proxy.rules(json!({"fail_record_rate": 0.25, "fail_call_rate": 0.1}));
    }
    let mut tail = Tail::new(&e.aws, &stream).await;
    let before = Calls::read(port, "thrb");
    let started = Instant::now();
    // Update i is due at i / rate. One update at a time cannot keep 400/s on this SecantusDB,
    // so WRITERS tasks share the keys (each key has one task, so its updates stay in order).
    const WRITERS: usize = 4;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (c, s) = (c.clone(), s.clone());
            tokio::spawn(async move {
                for i in (0..s.updates).filter(|i| (i % s.update_keys) % WRITERS == w) {
                    let due = Duration::from_secs_f64(i as f64 / s.update_rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                    c.update_one(
                        doc! {"_id": format!("k{:03}", i % s.update_keys)},
                        doc! {"$inc": {"n": 1_i64}},
                    )
                    .await
                    .expect("update");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    let writer = s.updates as f64 / started.elapsed().as_secs_f64();
    let done = wait_delivered(
        &e,
        &mut tail,
        s.updates,
        port,
        "thrb",
        before.acked,
        LONG_WAIT,
    )
    .await;
    let secs = (done - started).as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tail.poll(&e.aws).await;
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for j in tail.json() {
        if let (Some(k), Some(n)) = (
            j["documentKey"]["_id"].as_str(),
            j["updateDescription"]["updatedFields"]["n"].as_i64(),
        ) {
            per_key.entry(k.to_owned()).or_default().push(n);
        }
    }
    let bad_keys = (0..s.update_keys)
        .filter(|&k| {
            let expected =
                (s.updates / s.update_keys + usize::from(k < s.updates % s.update_keys)) as i64;
            per_key.get(&key(k)).map(Vec::as_slice) != Some(&(1..=expected).collect::<Vec<_>>()[..])
        })
        .count();
    let st = proxy.stats();
    let failed =
        st["records_failed"].as_f64().unwrap_or(0.0) + st["calls_failed"].as_f64().unwrap_or(0.0);
    ThrottleB {
        secs,
        writer,
        bad_keys,
        failed,
    }
}

struct AggRun {
    events_per_s: f64,
    /// Kinesis records written per second (acknowledged ones, as the stream holds them).
    records_per_s: f64,
    /// Events missing, or arriving before an earlier version of their document.
    bad: usize,
}

/// Scenario 10, one run: `updates` `$inc` updates round-robin over `keys` documents, written
/// while the watcher is paused, then timed from the resume until every event is readable
/// (deaggregated); `limit` puts the stream's one shard behind the proxy's `shard_limit`.
async fn aggregation_run(
    e: Arc<Env>,
    proxy: Arc<Proxy>,
    updates: usize,
    keys: usize,
    kpl: bool,
    limit: bool,
) -> AggRun {
    proxy.reset();
    if limit {
        proxy.rules(json!({"shard_limit": {
            "of": 1, "records_per_s": 1000, "bytes_per_s": 1_048_576
        }}));
    }
    let stream = unique("bench-agg");
    e.aws.create_stream(&stream, 1).await;
    let coll_name = unique("agg");
    let c = coll(&e, &coll_name);
    let key = |k: usize| format!("k{k:03}");
    let docs: Vec<Document> = (0..keys)
        .map(|k| doc! {"_id": key(k), "n": 0_i64})
        .collect();
    c.insert_many(docs).await.expect("insert the documents");
    let extra = if kpl { "    aggregation: kpl\n" } else { "" };
    let (_w, port, _dir) =
        watch_with(&e, "agg", &coll_name, &stream, &proxy.endpoint(), extra).await;
    pause(port, "agg");
    // Each key has one writer task, so its updates are written in order.
    const WRITERS: usize = 4;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let c = c.clone();
            tokio::spawn(async move {
                for i in (0..updates).filter(|i| (i % keys) % WRITERS == w) {
                    c.update_one(
                        doc! {"_id": format!("k{:03}", i % keys)},
                        doc! {"$inc": {"n": 1_i64}},
                    )
                    .await
                    .expect("update");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("writer task");
    }
    let mut tail = Tail::new(&e.aws, &stream).await;
    tail.poll(&e.aws).await;
    let records_before = tail.records.len();
    let acked_before = metric(port, "mongo_watcher_records_put_total", "agg");
    let started = Instant::now();
    resume(port, "agg");
    let deadline = started + LONG_WAIT;
    loop {
        let acked = metric(port, "mongo_watcher_records_put_total", "agg") - acked_before;
        if acked >= updates as f64 {
            tail.poll(&e.aws).await;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "aggregation (kpl: {kpl}): {acked} of {updates} events acknowledged after {LONG_WAIT:?}"
        );
        tokio::time::sleep(super::poll_interval()).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let records = tail.records.len() - records_before;
    let mut per_key: HashMap<String, Vec<i64>> = HashMap::new();
    for j in tail.users() {
        if let (Some(k), Some(n)) = (
            j["documentKey"]["_id"].as_str(),
            j["updateDescription"]["updatedFields"]["n"].as_i64(),
        ) {
            per_key.entry(k.to_owned()).or_default().push(n);
        }
    }
    let bad = (0..keys)
        .map(|k| {
            let expected = (updates / keys + usize::from(k < updates % keys)) as i64;
            let got = per_key.remove(&key(k)).unwrap_or_default();
            // First arrivals must be exactly 1..=expected.
            let mut firsts = Vec::new();
            for n in got {
                if !firsts.contains(&n) {
                    firsts.push(n);
                }
            }
            let want: Vec<i64> = (1..=expected).collect();
            if firsts == want {
                0
            } else {
                want.len().abs_diff(firsts.len()).max(1)
            }
        })
        .sum();
    AggRun {
        events_per_s: updates as f64 / secs,
        records_per_s: records as f64 / secs,
        bad,
    }
}

/// Scenario 10: a hot document and many small events, each with and without aggregation.
async fn aggregation(e: Arc<Env>, s: &Sizes, r: &mut RunResult) {
    let proxy = Arc::new(Proxy::start(&e.moto));
    let mut runs = Vec::new();
    for (updates, keys, limit) in [
        (s.hot_updates, 1, false),
        (s.small_updates, s.small_keys, true),
    ] {
        for kpl in [false, true] {
            let label = format!("10 aggregation ({keys} keys, kpl: {kpl})");
            let run = aggregation_run(e.clone(), proxy.clone(), updates, keys, kpl, limit);
            match attempt(&label, run).await {
                Ok(run) => runs.push(run),
                Err(err) => {
                    r.errors.insert(10, err);
                    return;
                }
            }
        }
    }
    let [hot_none, hot_kpl, small_none, small_kpl] = &runs[..] else {
        return;
    };
    r.set("agg_hot_none", hot_none.events_per_s);
    r.set("agg_hot_kpl", hot_kpl.events_per_s);
    r.set(
        "agg_hot_ratio",
        hot_kpl.events_per_s / hot_none.events_per_s,
    );
    r.set("agg_small_none", small_none.events_per_s);
    r.set("agg_small_kpl", small_kpl.events_per_s);
    r.set("agg_small_records", small_kpl.records_per_s);
    r.set(
        "agg_small_ratio",
        small_kpl.events_per_s / small_none.events_per_s,
    );
    r.set("agg_bad", runs.iter().map(|a| a.bad as f64).sum());
}

/// Scenario 11: `docs` documents of `bytes` bytes written before the watcher starts with
/// `snapshot: initial`; documents/s from the process start until every copied record is
/// acknowledged (the watcher's `/metrics`), and checked: every document once in the stream.
async fn snapshot_rate(
    e: Arc<Env>,
    docs: usize,
    bytes: usize,
    shards: i32,
    parallelism: usize,
) -> f64 {
    let stream = unique("bench-snap");
    e.aws.create_stream(&stream, shards).await;
    let coll_name = unique("snap");
    write_backlog(&coll(&e, &coll_name), 0..docs as i64, bytes).await;
    let started = Instant::now();
    let (_w, port, _dir) = watch_with(
        &e,
        "snap",
        &coll_name,
        &stream,
        &e.moto.endpoint(),
        &format!("    snapshot: initial\n    snapshot_parallelism: {parallelism}\n"),
    )
    .await;
    let deadline = started + LONG_WAIT;
    loop {
        let acked = metric(port, "mongo_watcher_records_put_total", "snap");
        if acked >= docs as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot: {acked} of {docs} documents acknowledged after {LONG_WAIT:?}"
        );
        tokio::time::sleep(super::poll_interval()).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut tail = Tail::new(&e.aws, &stream).await;
    tail.poll(&e.aws).await;
    let ids: std::collections::HashSet<i64> = tail
        .json()
        .iter()
        .filter(|j| j["operationType"] == "snapshot")
        .filter_map(|j| j["documentKey"]["_id"].as_i64())
        .collect();
    assert_eq!(ids.len(), docs, "snapshot: every document copied");
    docs as f64 / secs
}

/// One run of every selected scenario on fresh servers.
async fn one_run(s: &Sizes, run: usize) -> RunResult {
    eprintln!("== run {run} of {}", s.runs);
    let mut r = RunResult::default();
    let e = env().await;
    if s.wants(1) || s.wants(2) || s.wants(3) || s.wants(4) || s.wants(7) {
        backlog_scenarios(e.clone(), s.clone(), &mut r).await;
    }
    if s.wants(5) {
        match attempt("5 latency", latency(e.clone(), s.clone())).await {
            Ok((figures, note)) => {
                for (k, v) in figures {
                    r.set(k, v);
                }
                r.notes.push(note);
            }
            Err(err) => {
                r.errors.insert(5, err);
            }
        }
    }
    if s.wants(8) || s.wants(9) {
        let proxy = Arc::new(Proxy::start(&e.moto));
        if s.wants(8) {
            let (docs, bytes, shards) = (s.throttle_docs, s.throttle_bytes, s.shards);
            let (clean, fault) = throttle_a_pair(&e, &proxy, "", docs, bytes, shards).await;
            match (clean, fault) {
                (Ok(c), Ok(f)) => {
                    r.set("a_clean", c.rate);
                    r.set("a_fault", f.rate);
                    r.set("a_ratio", f.rate / c.rate);
                    r.set("a_rejected", f.rejected);
                    r.set("a_lost", (c.lost + f.lost) as f64);
                    r.set("a_dup", (c.dup + f.dup) as f64);
                }
                (Err(err), _) | (_, Err(err)) => add_error(&mut r.errors, 8, err),
            }
            // The same sustained for longer: the last records of shard 0 need ~11 attempts
            // (half rejected at random on each), ~0.5 s of their own delays whatever the
            // backlog, so on a fast machine that tail is most of a 6,000-doc drain.
            let long = docs * 5;
            let (clean, fault) =
                throttle_a_pair(&e, &proxy, ", 5x backlog", long, bytes, shards).await;
            match (clean, fault) {
                (Ok(c), Ok(f)) if c.lost + f.lost + c.dup + f.dup == 0 => {
                    r.set("a_long_clean", c.rate);
                    r.set("a_long_ratio", f.rate / c.rate);
                }
                (Ok(c), Ok(f)) => {
                    let err = format!(
                        "5x backlog: {} lost, {} duplicated",
                        c.lost + f.lost,
                        c.dup + f.dup
                    );
                    add_error(&mut r.errors, 8, err);
                }
                (Err(err), _) | (_, Err(err)) => add_error(&mut r.errors, 8, err),
            }
            // Every shard held to Kinesis's 1,000 records/s (the proxy's token buckets): how
            // close the watcher gets to the limit, and how many records the shards throw back
            // on the way (throttled records are paced per shard).
            let limited = json!({"shard_limit": {"of": shards, "records_per_s": LIMIT_RPS}});
            let run = throttle_a(e.clone(), proxy.clone(), long, bytes, shards, Some(limited));
            match attempt("8 throttling, shards held to their limit", run).await {
                Ok(c) if c.lost + c.dup == 0 => {
                    r.set("c_share", c.rate / (f64::from(shards) * LIMIT_RPS));
                    r.set("c_thrown", c.rejected / long as f64);
                }
                Ok(c) => {
                    let err = format!("shards held: {} lost, {} duplicated", c.lost, c.dup);
                    add_error(&mut r.errors, 8, err);
                }
                Err(err) => add_error(&mut r.errors, 8, err),
            }
        }
        if s.wants(9) {
            let clean = attempt(
                "9 throttling B, fault-free",
                throttle_b(e.clone(), proxy.clone(), s.clone(), false),
            )
            .await;
            let fault = attempt(
                "9 throttling B, 25% records and 10% calls failing",
                throttle_b(e.clone(), proxy.clone(), s.clone(), true),
            )
            .await;
            match (clean, fault) {
                (Ok(c), Ok(f)) => {
                    r.set("b_writer", c.writer.min(f.writer));
                    r.set("b_clean_s", c.secs);
                    r.set("b_fault_s", f.secs);
                    r.set("b_ratio", f.secs / c.secs);
                    r.set("b_rejected", f.failed);
                    r.set("b_bad_keys", (c.bad_keys + f.bad_keys) as f64);
                }
                (Err(err), _) | (_, Err(err)) => {
                    r.errors.insert(9, err);
                }
            }
        }
    }
    if s.wants(10) {
        aggregation(e.clone(), s, &mut r).await;
    }
    if s.wants(11) {
        let run = snapshot_rate(e.clone(), s.snapshot_docs, s.doc_bytes, s.shards, 4);
        match attempt("11 initial snapshot", run).await {
            Ok(rate) => {
                r.set("snap_rate", rate);
                if let Some(&stream) = r.values.get("e2e") {
                    r.set("snap_ratio", rate / stream);
                }
            }
            Err(err) => {
                r.errors.insert(11, err);
            }
        }
        let run = snapshot_rate(e.clone(), s.snapshot_docs, s.doc_bytes, s.shards, 1);
        match attempt("11 initial snapshot, one range", run).await {
            Ok(rate) => {
                r.set("snap_rate_1", rate);
                if let Some(&four) = r.values.get("snap_rate") {
                    r.set("snap_parallel_gain", four / rate);
                }
            }
            Err(err) => {
                r.errors.insert(11, err);
            }
        }
    }
    if s.wants(6) {
        match attempt("6 many watchers", many_watchers(s.watchers)).await {
            Ok((ready, rss, bare)) => {
                r.set("ready_ms", ready);
                r.set("rss_mib", rss);
                r.set("bare_open_ms", bare);
                r.set("ready_over_bare", ready / bare);
            }
            Err(err) => {
                r.errors.insert(6, err);
            }
        }
    }
    r
}

// -------------------------------------------------------------------------------- report

fn machine() -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or_else(
            || "unknown".into(),
            |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        );
    let root = env!("CARGO_MANIFEST_DIR");
    let commit = command_output("git", &["-C", root, "rev-parse", "HEAD"]);
    let dirty = !command_output(
        "git",
        &["-C", root, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    let py = venv_bin().join("python");
    let versions = command_output(
        &py.display().to_string(),
        &[
            "-c",
            "import secantus, moto, pymongo, boto3; print(secantus.__version__, moto.__version__, \
             pymongo.version, boto3.__version__)",
        ],
    );
    let v: Vec<&str> = versions.split_whitespace().collect();
    let get = |i: usize| v.get(i).copied().unwrap_or("unknown").to_owned();
    vec![
        (
            "machine".into(),
            format!(
                "{} cores (nproc: {}), {mem} memory, {cpu}",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                command_output("nproc", &[])
            ),
        ),
        (
            "mongo-watcher".into(),
            format!(
                "{} at commit {commit}{}, binary {}",
                env!("CARGO_PKG_VERSION"),
                if dirty {
                    " with uncommitted changes"
                } else {
                    ""
                },
                env!("CARGO_BIN_EXE_mongo-watcher")
            ),
        ),
        ("rustc".into(), command_output("rustc", &["--version"])),
        ("SecantusDB".into(), get(0)),
        ("moto".into(), get(1)),
        (
            "pymongo, boto3 (old loop)".into(),
            format!("{}, {}", get(2), get(3)),
        ),
        (
            "date".into(),
            command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ),
    ]
}

fn fmt_value(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn render(s: &Sizes, runs: &[RunResult], total: Duration) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `scripts/bench` (`cargo bench --bench pipeline`, see `benches/README.md` for \
         what each figure means). Every figure below was measured in this run; nothing is \
         carried over. SecantusDB and moto are Python servers on loopback sharing the machine \
         with mongo-watcher and the bench: these are **not AWS figures**; the ratios, each \
         taken within one run, are what carries over.\n"
    );
    let _ = writeln!(w, "| | |\n|---|---|");
    for (k, v) in machine() {
        let _ = writeln!(w, "| {k} | {v} |");
    }
    let _ = writeln!(
        w,
        "| runs | {} (`BENCH_RUNS`), each on fresh SecantusDB and moto servers; {:.0} s in all |",
        s.runs,
        total.as_secs_f64()
    );
    let _ = writeln!(
        w,
        "| sizes | backlog {} x {} B (`BENCH_BACKLOG`, `BENCH_DOC_BYTES`); old loop {} events; \
         {} shards; latency {} events/s for {} s; {} watchers; throttling A {} x {} B; \
         throttling B {} updates at {}/s over {} keys; aggregation {} updates of one \
         document (`BENCH_HOT_UPDATES`) and {} over {} keys (`BENCH_SMALL_UPDATES`, \
         `BENCH_SMALL_KEYS`); snapshot {} documents (`BENCH_SNAPSHOT_DOCS`) |",
        s.backlog,
        s.doc_bytes,
        s.old_events.min(s.backlog),
        s.shards,
        s.latency_rate,
        s.latency_secs,
        s.watchers,
        s.throttle_docs,
        s.throttle_bytes,
        s.updates,
        s.update_rate,
        s.update_keys,
        s.hot_updates,
        s.small_updates,
        s.small_keys,
        s.snapshot_docs
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "## Figures\n");
    let _ = writeln!(
        w,
        "min / median / max over the runs that measured the figure; a target is judged on the \
         median, with the number of runs that met it.\n"
    );
    let _ = writeln!(
        w,
        "| # | figure | unit | min | median | max | target | met |\n|---|---|---|---:|---:|---:|---|---|"
    );
    let mut missed = Vec::new();
    for f in FIGS {
        if !s.wants(f.scenario) {
            continue;
        }
        let vals: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.values.get(f.key).copied())
            .collect();
        let (lo, med, hi) = if vals.is_empty() {
            ("-".into(), "not measured".into(), "-".into())
        } else {
            let (a, b, c) = min_med_max(&vals);
            (
                fmt_value(a, f.decimals),
                fmt_value(b, f.decimals),
                fmt_value(c, f.decimals),
            )
        };
        let (target, verdict) = match f.target {
            None => (String::new(), String::new()),
            Some(t) if vals.is_empty() => (target_text(t), "not measured".into()),
            Some(t) => {
                let ok = vals.iter().filter(|&&v| met(t, v)).count();
                let (_, m, _) = min_med_max(&vals);
                let yes = met(t, m);
                if !yes {
                    missed.push(format!(
                        "{} {}: median {} against {}",
                        f.scenario,
                        f.label,
                        fmt_value(m, f.decimals),
                        target_text(t)
                    ));
                }
                (
                    target_text(t),
                    format!(
                        "{} ({ok}/{})",
                        if yes { "yes" } else { "**no**" },
                        vals.len()
                    ),
                )
            }
        };
        let _ = writeln!(
            w,
            "| {} | {} | {} | {lo} | {med} | {hi} | {target} | {verdict} |",
            f.scenario, f.label, f.unit
        );
    }
    let _ = writeln!(w);
    let errors: Vec<String> = runs
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            r.errors.iter().map(move |(sc, e)| {
                format!(
                    "- run {}, scenario {sc} ({}): {e}",
                    i + 1,
                    TITLES[*sc as usize]
                )
            })
        })
        .collect();
    let _ = writeln!(w, "## Targets missed\n");
    if missed.is_empty() {
        let _ = writeln!(w, "None.\n");
    } else {
        for m in &missed {
            let _ = writeln!(w, "- {m}");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "## Not measured\n");
    if errors.is_empty() {
        let _ = writeln!(w, "Every selected figure was measured in every run.\n");
    } else {
        let _ = writeln!(
            w,
            "These scenarios failed in a run, so their figures for that run are missing (the \
             message is the bench's own):\n"
        );
        for e in &errors {
            let _ = writeln!(w, "{e}");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w, "## Per run\n");
    let _ = write!(w, "| figure |");
    for i in 0..runs.len() {
        let _ = write!(w, " run {} |", i + 1);
    }
    let _ = writeln!(w, "\n|---|{}", "---:|".repeat(runs.len()));
    for f in FIGS {
        if !s.wants(f.scenario) {
            continue;
        }
        let _ = write!(w, "| {} {} |", f.scenario, f.key);
        for r in runs {
            let v = r
                .values
                .get(f.key)
                .map_or_else(|| "-".into(), |v| fmt_value(*v, f.decimals));
            let _ = write!(w, " {v} |");
        }
        let _ = writeln!(w);
    }
    let _ = writeln!(w);
    let _ = writeln!(w, "## Notes\n");
    let _ = writeln!(
        w,
        "- Latency (5) is moto's `ApproximateArrivalTimestamp` of each record (millisecond \
         precision) minus the writer's wall clock in milliseconds, taken just before the \
         `insert_many` that wrote the document; so it includes the insert itself. moto's own \
         figure is the duration of bare `PutRecords` calls from the bench, one at a time, \
         measured right after on the same moto.\n\
         - CPU per event (4) is the watcher process's utime + stime from `/proc/<pid>/stat` over \
         the backlog drain of scenario 2 (it includes answering the bench's status polls), \
         divided by the backlog's events.\n\
         - Throttling (8, 9) goes through `tests/support/kinesis_proxy.py` in both halves, so its \
         ratios compare like with like; (8) uses the proxy's `fail_shard` rule, then its \
         `shard_limit` rule (1,000 records/s per shard), (9) \
         `fail_record_rate: 0.25` and `fail_call_rate: 0.1`. Time (9) runs from the first update \
         until the watcher reports the last one acknowledged.\n\
         - Scenarios 2, 5, 8 and 9 end when the watcher reports every event acknowledged \
         (`GET /watchers/{{name}}`, every `BENCH_POLL_MS`); the stream is read after that, \
         untimed, and every record must have arrived (moto's `ApproximateArrivalTimestamp`) by \
         then. Reading it during the drain took moto's CPU from the watcher's PutRecords.\n\
         - Aggregation (10): the updates are written while the watcher is paused, then timed from \
         the resume until all are acknowledged, and read back deaggregated (every version once, \
         in order per document). The hot document goes straight to moto; the small updates go \
         through the proxy's `shard_limit` rule (1,000 records/s and 1 MiB/s on the stream's one \
         shard, Kinesis's per-shard limits), so without aggregation they are throttled as on \
         AWS."
    );
    for (i, r) in runs.iter().enumerate() {
        for n in &r.notes {
            let _ = writeln!(w, "- run {}: {n}", i + 1);
        }
    }
    md
}

/// `cargo bench --bench pipeline`: every scenario `BENCH_RUNS` times, then the report.
pub async fn report() {
    let s = Sizes::from_env();
    eprintln!(
        "mongo-watcher benchmark report, binary {}",
        env!("CARGO_BIN_EXE_mongo-watcher")
    );
    eprintln!("{s:?}");
    let total = Instant::now();
    let mut runs = Vec::new();
    for run in 1..=s.runs {
        runs.push(one_run(&s, run).await);
    }
    let md = render(&s, &runs, total.elapsed());
    println!("{md}");
    match std::env::var("BENCH_REPORT") {
        Ok(path) if !path.is_empty() => {
            std::fs::write(&path, &md).unwrap_or_else(|e| panic!("write {path}: {e}"));
            eprintln!("wrote {path}");
        }
        _ => eprintln!("BENCH_REPORT not set: report printed only"),
    }
}

/// `BENCH_SMOKE=1`: a 200-event backlog drained by the watcher, and throttling A at 200
/// documents, each checked (all delivered, none twice); nothing written. Fails by panicking.
pub async fn smoke() {
    let n = env_usize("BENCH_SMOKE_EVENTS", 200);
    let started = Instant::now();
    let e = env().await;
    // Scenario 2 at a tiny size.
    let stream = unique("smoke-e2e");
    e.aws.create_stream(&stream, 2).await;
    let coll_name = unique("smoke");
    let (w, port, _dir) = watch(&e, "e2e", &coll_name, &stream, &e.moto.endpoint()).await;
    pause(port, "e2e");
    write_backlog(&coll(&e, &coll_name), 0..n as i64, 1024).await;
    let mut tail = Tail::new(&e.aws, &stream).await;
    let before = Calls::read(port, "e2e");
    let pid = w.pid().expect("running");
    let cpu = cpu_seconds(pid);
    let t = Instant::now();
    resume(port, "e2e");
    let done = wait_delivered(&e, &mut tail, n, port, "e2e", before.acked, WAIT).await;
    let cpu = cpu_seconds(pid) - cpu;
    let ids: std::collections::HashSet<i64> = tail
        .json()
        .iter()
        .filter_map(|j| j["documentKey"]["_id"].as_i64())
        .collect();
    assert_eq!(ids.len(), n, "smoke: every document arrived");
    println!(
        "bench smoke: backlog of {n} in {:.2} s ({:.0} events/s, {:.0} µs CPU per event)",
        (done - t).as_secs_f64(),
        n as f64 / (done - t).as_secs_f64(),
        cpu * 1e6 / n as f64
    );
    drop(w);
    // Scenario 8 at a tiny size.
    let proxy = Arc::new(Proxy::start(&e.moto));
    let half = json!({"fail_shard": {"shard": 0, "of": 4, "rate": 0.5}});
    let a = throttle_a(e.clone(), proxy, n, 500, 4, Some(half)).await;
    assert_eq!(
        (a.lost, a.dup),
        (0, 0),
        "smoke: throttling A lost or duplicated records"
    );
    assert!(
        a.rejected > 0.0,
        "smoke: the proxy's fail_shard rule rejected nothing"
    );
    println!(
        "bench smoke: throttling A, {n} documents, {:.0} rejected by the proxy, {:.0} events/s, \
         none lost or duplicated",
        a.rejected, a.rate
    );
    // Scenario 10's aggregated hot document at a tiny size.
    let proxy = Arc::new(Proxy::start(&e.moto));
    let agg = aggregation_run(e.clone(), proxy, n, 1, true, false).await;
    assert_eq!(agg.bad, 0, "smoke: aggregation lost or reordered events");
    println!(
        "bench smoke: one hot document, aggregation kpl, {n} updates at {:.0} events/s in \
         {:.0} Kinesis records/s, in order",
        agg.events_per_s, agg.records_per_s
    );
    println!(
        "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        started.elapsed().as_secs_f64()
    );
}

/// Records a scenario's failure, after any it already had.
fn add_error(errors: &mut BTreeMap<u8, String>, scenario: u8, err: String) {
    let all = errors.entry(scenario).or_default();
    if !all.is_empty() {
        all.push_str("; ");
    }
    all.push_str(&err);
}
