//! The loop's timing on tokio's paused clock, against an in-memory sink and checkpoint store:
//! linger, per-record retry delays, the adaptive send limit, the stream backoff, the drain
//! deadline, `max_put_retries`, the checkpoint interval, and that the loop sleeps while
//! nothing can be sent.

use std::collections::HashMap;
use std::sync::Mutex;

use bson::{doc, Timestamp};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;
use crate::checkpoint::Stored;
use crate::record::{FieldPath, RecordFormat};
use crate::spec::{BatchSettings, FullDocument, OnHistoryLost, OnInvalidate};
use crate::status::Status;

/// What the fake sink does with one record of a call.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    Accept,
    Reject,
    /// Accepted by the numbered shard (the answer names it).
    AcceptOn(u64),
    /// Rejected by the numbered shard as over its limit, in Kinesis's words.
    ThrottledOn(u64),
    /// The whole call fails (an error answer).
    FailCall,
}

type Decide = Arc<dyn Fn(&PendingRecord, usize) -> Fate + Send + Sync>;

#[derive(Default)]
struct SinkLog {
    /// When each call started, with the sequence numbers it carried.
    calls: Vec<(Instant, Vec<u64>)>,
    /// Acknowledged records in acknowledgement order: (when, key, seq).
    delivered: Vec<(Instant, String, u64)>,
}

/// Kinesis in memory: every call takes `latency`, waits while `gate` is closed, and each
/// record's fate comes from `decide(record, call number)`.
#[derive(Clone)]
struct FakeSink {
    log: Arc<Mutex<SinkLog>>,
    decide: Decide,
    latency: Duration,
    gate: watch::Receiver<bool>,
}

impl FakeSink {
    fn new(decide: impl Fn(&PendingRecord, usize) -> Fate + Send + Sync + 'static) -> Self {
        let (_open, gate) = watch::channel(true);
        Self {
            log: Arc::default(),
            decide: Arc::new(decide),
            latency: Duration::from_millis(10),
            gate,
        }
    }

    fn accept_all() -> Self {
        Self::new(|_, _| Fate::Accept)
    }

    /// Rejects the first `times` attempts at records of `key` (counted over all its records);
    /// accepts everything else.
    fn rejecting(key: &'static str, times: u32) -> Self {
        let attempts = Mutex::new(HashMap::<String, u32>::new());
        Self::new(move |r, _| {
            let mut attempts = attempts.lock().unwrap();
            let n = attempts.entry(r.partition_key.clone()).or_default();
            *n += 1;
            if r.partition_key == key && *n <= times {
                Fate::Reject
            } else {
                Fate::Accept
            }
        })
    }

    /// Calls wait until the returned sender sends `true`.
    fn gated(mut self) -> (Self, watch::Sender<bool>) {
        let (open, gate) = watch::channel(false);
        self.gate = gate;
        (self, open)
    }

    fn calls(&self) -> Vec<(Instant, Vec<u64>)> {
        self.log.lock().unwrap().calls.clone()
    }

    fn delivered(&self) -> Vec<(Instant, String, u64)> {
        self.log.lock().unwrap().delivered.clone()
    }
}

impl RecordSink for FakeSink {
    fn stream(&self) -> &str {
        "fake-stream"
    }

    async fn put(&self, records: &[PendingRecord]) -> Result<Vec<RecordResult>, CallError> {
        let call = {
            let mut log = self.log.lock().unwrap();
            log.calls
                .push((Instant::now(), records.iter().map(|r| r.seq).collect()));
            log.calls.len() - 1
        };
        let mut gate = self.gate.clone();
        let _ = gate.wait_for(|open| *open).await;
        tokio::time::sleep(self.latency).await;
        let fates: Vec<Fate> = records.iter().map(|r| (self.decide)(r, call)).collect();
        if fates.contains(&Fate::FailCall) {
            return Err(CallError {
                code: "InternalFailure".into(),
                message: "injected".into(),
            });
        }
        let mut log = self.log.lock().unwrap();
        Ok(records
            .iter()
            .zip(fates)
            .map(|(r, fate)| match fate {
                Fate::Accept | Fate::AcceptOn(_) => {
                    log.delivered
                        .push((Instant::now(), r.partition_key.clone(), r.seq));
                    let shard = match fate {
                        Fate::AcceptOn(shard) => Some(shard),
                        _ => None,
                    };
                    RecordResult::Accepted { shard }
                }
                Fate::ThrottledOn(shard) => RecordResult::Rejected {
                    error_code: "ProvisionedThroughputExceededException".into(),
                    message: format!(
                        "Rate exceeded for shard shardId-{shard:012} in stream fake-stream \
                         under account 123456789012."
                    ),
                },
                _ => RecordResult::Rejected {
                    error_code: "ProvisionedThroughputExceededException".into(),
                    message: "injected".into(),
                },
            })
            .collect())
    }
}

/// DynamoDB in memory: compare-and-set on the revision, every write kept.
#[derive(Clone, Default)]
struct MemoryStore {
    saves: Arc<Mutex<Vec<(Instant, Checkpoint)>>>,
    /// Every save fails (as with the table deleted) while set.
    failing: Arc<std::sync::atomic::AtomicBool>,
    /// How long each save takes (a slow DynamoDB), in milliseconds.
    delay_ms: Arc<AtomicU64>,
}

impl CheckpointBackend for MemoryStore {
    fn table(&self) -> &str {
        "memory"
    }

    async fn load(&self, _watcher: &str) -> Result<Option<Stored>, WatcherError> {
        Ok(None)
    }

    async fn save(
        &self,
        _watcher: &str,
        expected: Option<u64>,
        checkpoint: &Checkpoint,
        _fence: Option<&crate::lease::Fence>,
    ) -> Result<u64, WatcherError> {
        tokio::time::sleep(ms(self.delay_ms.load(Ordering::Relaxed))).await;
        if self.failing.load(Ordering::Relaxed) {
            return Err(WatcherError::CheckpointTableMissing {
                table: "memory".into(),
                key: "watcher",
            });
        }
        let mut saves = self.saves.lock().unwrap();
        saves.push((Instant::now(), checkpoint.clone()));
        Ok(expected.unwrap_or(0) + 1)
    }
}

use crate::checkpoint::Checkpoint;

fn spec(batch: BatchSettings) -> WatcherSpec {
    WatcherSpec {
        name: "w".into(),
        database: "db".into(),
        collection: "c".into(),
        stream: "fake-stream".into(),
        partition_key: FieldPath::parse("documentKey._id").unwrap(),
        full_document: FullDocument::Off,
        full_document_before_change: Default::default(),
        pipeline: Vec::new(),
        start_at: StartAt::Latest,
        on_history_lost: OnHistoryLost::Fail,
        on_invalidate: OnInvalidate::Stop,
        on_oversized: OnOversized::Fail,
        s3: None,
        aggregation: Default::default(),
        split_large_events: Default::default(),
        snapshot: Default::default(),
        snapshot_parallelism: 1,
        on_undeliverable: OnUndeliverable::Fail,
        record_format: RecordFormat::Relaxed,
        batch,
        checkpoint_interval: Duration::from_secs(1),
    }
}

/// A running loop and the handles a test drives it with.
/// The metrics of watcher `w`, in a registry of the test's own.
fn test_metrics() -> crate::metrics::WatcherMetrics {
    crate::metrics::Metrics::register(&prometheus::Registry::new())
        .unwrap()
        .for_watcher("w")
}

struct Run {
    events: mpsc::Sender<Result<ReaderMsg, WatcherError>>,
    cancel: CancellationToken,
    status: watch::Receiver<Status>,
    turns: Arc<AtomicU64>,
    task: JoinHandle<(Result<(), WatcherError>, usize)>,
    budget: Arc<ByteBudget>,
    next_seq: u64,
    _commands: mpsc::Sender<Command>,
}

impl Run {
    /// A loop fed by a healthy reader: an empty read (idle) every 400 ms between events.
    fn start(spec: WatcherSpec, sink: FakeSink, store: Option<MemoryStore>) -> Self {
        let run = Self::start_silent(spec, sink, store);
        let events = run.events.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ms(400)).await;
                if events.send(Ok(ReaderMsg::Idle(None))).await.is_err() {
                    return;
                }
            }
        });
        run
    }

    /// A loop whose reader says nothing unless the test sends something.
    fn start_silent(spec: WatcherSpec, sink: FakeSink, store: Option<MemoryStore>) -> Self {
        Self::start_on_stream(spec, sink, store, StreamLimits::default())
    }

    /// As [`Self::start_silent`], on a stream with these size limits.
    fn start_on_stream(
        spec: WatcherSpec,
        sink: FakeSink,
        store: Option<MemoryStore>,
        limits: StreamLimits,
    ) -> Self {
        let (status_tx, status) = StatusTx::channel();
        let pipeline = Pipeline::new(
            Arc::new(spec),
            sink,
            status_tx,
            AckTracker::new(),
            test_metrics(),
            limits,
        );
        Self::drive(pipeline, status, store)
    }

    /// Runs `pipeline`'s loop in a task, with checkpoints in `store`.
    fn drive(
        mut pipeline: Pipeline<FakeSink>,
        status: watch::Receiver<Status>,
        store: Option<MemoryStore>,
    ) -> Self {
        let turns = pipeline.turns.clone();
        let (events, rx) = mpsc::channel(4096);
        let (commands_tx, mut commands) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                let mut cp = Checkpointer::default();
                let result = pipeline
                    .run_loop(rx, &cancel, store.as_ref(), &mut cp, &mut commands)
                    .await;
                (result, pipeline.unsent)
            }
        });
        Self {
            events,
            cancel,
            status,
            turns,
            task,
            budget: ByteBudget::new(usize::MAX),
            next_seq: 0,
            _commands: commands_tx,
        }
    }

    /// Sends an insert of document `key` into the loop.
    async fn insert(&mut self, key: &str) {
        self.insert_sized(key, 0).await;
    }

    /// Sends an insert of document `key` whose record carries `blob` bytes more.
    async fn insert_sized(&mut self, key: &str, blob: usize) {
        self.next_seq += 1;
        let n = self.next_seq;
        let mut event = doc! {
            "_id": {"_data": format!("{n:08}")},
            "operationType": "insert",
            "clusterTime": Timestamp { time: 1_700_000_000 + n as u32, increment: 1 },
            "documentKey": {"_id": key},
        };
        if blob > 0 {
            event.insert("blob", "x".repeat(blob));
        }
        let reservation = Reservation::take(&self.budget, &self.budget, 100).await;
        self.events
            .send(Ok(ReaderMsg::Event(
                RawDocumentBuf::try_from(&event).unwrap(),
                reservation,
            )))
            .await
            .unwrap();
    }

    async fn idle(&self) {
        self.events.send(Ok(ReaderMsg::Idle(None))).await.unwrap();
    }

    fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    async fn stop(self) -> (Result<(), WatcherError>, usize) {
        self.cancel.cancel();
        self.task.await.unwrap()
    }
}

fn batch() -> BatchSettings {
    BatchSettings::default()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Lets every task that can run, run (no time passes on the paused clock).
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_small_batch_lingers_until_its_deadline() {
    let sink = FakeSink::accept_all();
    let mut run = Run::start(
        spec(BatchSettings {
            linger: ms(50),
            ..batch()
        }),
        sink.clone(),
        None,
    );
    let start = Instant::now();
    for key in ["a", "b", "c"] {
        run.insert(key).await;
    }
    tokio::time::sleep(ms(49)).await;
    assert!(sink.calls().is_empty(), "sent before the linger deadline");
    tokio::time::sleep(ms(2)).await;
    let calls = sink.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1, vec![0, 1, 2]);
    assert!(calls[0].0 - start >= ms(50));
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_idle_reader_sends_at_once() {
    let sink = FakeSink::accept_all();
    let mut run = Run::start(spec(batch()), sink.clone(), None);
    run.insert("a").await;
    run.idle().await;
    settle().await;
    assert_eq!(
        sink.calls().len(),
        1,
        "an idle reader means nothing more is coming"
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_loop_sleeps_while_calls_are_at_the_limit() {
    let (sink, open) = FakeSink::accept_all().gated();
    let mut run = Run::start(
        spec(BatchSettings {
            max_in_flight: 1,
            max_records: 10,
            linger: ms(50),
            ..batch()
        }),
        sink.clone(),
        None,
    );
    // 10 records fill a call that goes at once and is held; 5 more are ready but the one
    // call allowed is out.
    for i in 0..15 {
        run.insert(&format!("k{i}")).await;
    }
    settle().await;
    // `advance`, not `sleep`: a spinning loop never lets the paused clock auto-advance, and
    // this test must fail, not hang.
    tokio::time::advance(ms(500)).await;
    settle().await;
    assert_eq!(sink.calls().len(), 1);
    // The linger deadline of the 5 is long past. A loop that woke for it would turn on every
    // yield from here on.
    let before = run.turns();
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    let turned = run.turns() - before;
    assert!(
        turned < 5,
        "the loop turned {turned} times with nothing to do"
    );
    open.send(true).unwrap();
    tokio::time::sleep(ms(100)).await;
    assert_eq!(sink.calls().len(), 2);
    assert_eq!(sink.delivered().len(), 15);
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_rejected_record_waits_alone_while_other_keys_flow() {
    // Key `a` is rejected on its first three attempts; everything else is accepted.
    let sink = FakeSink::rejecting("a", 3);
    let settings = BatchSettings {
        linger: ms(5),
        retry_initial_backoff: ms(100),
        record_retry_initial_backoff: ms(100),
        record_retry_max_backoff: ms(1000),
        ..batch()
    };
    let mut run = Run::start(spec(settings), sink.clone(), None);
    let start = Instant::now();
    for key in ["a", "b", "c", "a", "b"] {
        run.insert(key).await;
    }
    tokio::time::sleep(ms(60)).await;
    // b's second record went right after b's first was acknowledged, while a waits.
    let delivered = sink.delivered();
    let keys: Vec<(&str, u64)> = delivered.iter().map(|(_, k, s)| (k.as_str(), *s)).collect();
    assert_eq!(keys, vec![("b", 1), ("c", 2), ("b", 4)]);
    assert!(delivered[2].0 - start < ms(60));
    // a has been rejected once or twice by now (its delays are jittered).
    assert!(run.status.borrow().flow.records_delayed <= 1);
    assert!(run.status.borrow().flow.rejected["ProvisionedThroughputExceededException"] >= 1);
    // Three rejections with delays under 100, 200 and 400 ms (jittered), then a's two
    // records in read order.
    tokio::time::sleep(ms(1000)).await;
    let keys: Vec<(String, u64)> = sink
        .delivered()
        .into_iter()
        .map(|(_, k, s)| (k, s))
        .collect();
    assert_eq!(
        keys[3..],
        [("a".to_owned(), 0), ("a".to_owned(), 3)],
        "a's records arrive in order, after its retries"
    );
    // A partial rejection is not a stream failure: the limit stays where it was.
    assert_eq!(run.status.borrow().flow.send_limit, 4);
    assert_eq!(run.status.borrow().state, State::Starting);
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_shard_over_its_limit_gets_its_throttled_records_at_its_pace() {
    // Keys `s0-*` go to shard 0, which takes 100 records a second (a bucket of one second's
    // worth); keys `s1-*` to shard 1, which takes everything.
    let throttled = Arc::new(AtomicU64::new(0));
    let bucket = Mutex::new((100.0f64, Instant::now()));
    let sink = FakeSink::new({
        let throttled = throttled.clone();
        move |r, _| {
            if r.partition_key.starts_with("s1-") {
                return Fate::AcceptOn(1);
            }
            let mut b = bucket.lock().unwrap();
            let now = Instant::now();
            b.0 = (b.0 + (now - b.1).as_secs_f64() * 100.0).min(100.0);
            b.1 = now;
            if b.0 >= 1.0 {
                b.0 -= 1.0;
                Fate::AcceptOn(0)
            } else {
                throttled.fetch_add(1, Ordering::Relaxed);
                Fate::ThrottledOn(0)
            }
        }
    });
    let mut run = Run::start(spec(batch()), sink.clone(), None);
    for i in 0..600 {
        run.insert(&format!("s0-{i}")).await;
    }
    run.idle().await;
    // The first second is not paced: the shard's rate is not known yet.
    tokio::time::sleep(ms(2000)).await;
    let before = throttled.load(Ordering::Relaxed);
    // Other shards' keys are not held back.
    let delivered = sink.delivered().len();
    for i in 0..5 {
        run.insert(&format!("s1-{i}")).await;
    }
    run.idle().await;
    tokio::time::sleep(ms(100)).await;
    let s1 = sink.delivered()[delivered..]
        .iter()
        .filter(|(_, k, _)| k.starts_with("s1-"))
        .count();
    assert_eq!(s1, 5, "shard 1's records went at once");
    tokio::time::sleep(ms(1900)).await;
    // Two seconds at 150 turns a second for a shard that takes 100: ~100 throttled. Each of
    // the ~400 waiting records on its own 20 ms delay would be ~40,000.
    let paced = throttled.load(Ordering::Relaxed) - before;
    assert!(
        paced < 400,
        "{paced} records throttled in 2 s by a shard taking 100/s"
    );
    assert_eq!(run.status.borrow().flow.paced_shards, vec![0]);
    // A shard at its limit is not the stream failing: the send limit and state stay.
    assert_eq!(run.status.borrow().flow.send_limit, 4);
    assert_ne!(run.status.borrow().state, State::BackingOff);
    // Pacing does not leave the shard idle: 600 records at 100 a second (the first 100 at
    // once) are all in by ~5 s.
    tokio::time::sleep(ms(1500)).await;
    assert_eq!(sink.delivered().len(), 605);
    tokio::time::sleep(ms(1000)).await;
    assert!(run.status.borrow().flow.paced_shards.is_empty());
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn calls_a_shard_at_its_limit_throttles_whole_do_not_count_against_the_stream() {
    // Every key on shard 0, which takes one record in every third call and throttles the
    // rest: two calls in three have nothing accepted, while the shard plainly takes records.
    let last_call = Mutex::new(None);
    let sink = FakeSink::new(move |_, call| {
        let mut last = last_call.lock().unwrap();
        let first_of_call = *last != Some(call);
        *last = Some(call);
        if call % 3 == 0 && first_of_call {
            Fate::AcceptOn(0)
        } else {
            Fate::ThrottledOn(0)
        }
    });
    let mut run = Run::start(spec(batch()), sink.clone(), None);
    for i in 0..300 {
        run.insert(&format!("k-{i}")).await;
    }
    run.idle().await;
    tokio::time::sleep(ms(3000)).await;
    let calls = sink.calls().len();
    assert!(calls > 30, "{calls} calls");
    let status = run.status.borrow().clone();
    assert_eq!(status.flow.send_limit, 4, "the send limit was cut");
    assert_ne!(status.state, State::BackingOff, "{:?}", status.reason);
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_record_its_shard_throttled_goes_again_within_milliseconds() {
    // Key `t` is throttled three times by shard 0 (the answer names it); long configured
    // delays are for other rejections.
    let attempts = Mutex::new(0u32);
    let sink = FakeSink::new(move |r, _| {
        if r.partition_key != "t" {
            return Fate::Accept;
        }
        let mut n = attempts.lock().unwrap();
        *n += 1;
        if *n <= 3 {
            Fate::ThrottledOn(0)
        } else {
            Fate::AcceptOn(0)
        }
    });
    let settings = BatchSettings {
        record_retry_initial_backoff: ms(100),
        record_retry_max_backoff: ms(1000),
        ..batch()
    };
    let mut run = Run::start(spec(settings), sink.clone(), None);
    let start = Instant::now();
    run.insert("t").await;
    run.idle().await;
    tokio::time::sleep(ms(100)).await;
    // Four calls of 10 ms and three delays under 1, 2 and 4 ms.
    let delivered = sink.delivered();
    assert_eq!(delivered.len(), 1, "{:?}", sink.calls());
    assert!(
        delivered[0].0 - start <= ms(50),
        "{:?}",
        delivered[0].0 - start
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_retried_record_does_not_linger_again() {
    // Key `a` is rejected once; the reader is not idle (it waits on an empty stream).
    let sink = FakeSink::rejecting("a", 1);
    let settings = BatchSettings {
        linger: ms(50),
        retry_initial_backoff: ms(20),
        record_retry_initial_backoff: ms(20),
        record_retry_max_backoff: ms(20),
        ..batch()
    };
    let mut run = Run::start(spec(settings), sink.clone(), None);
    let start = Instant::now();
    run.insert("a").await;
    run.insert("b").await;
    tokio::time::sleep(ms(200)).await;
    let calls = sink.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].0 - start >= ms(50), "the first call lingered");
    // Sent once its own delay (0-20 ms, jittered) after the answer (10 ms, the fake's
    // latency) was over, not a linger (50 ms) later.
    let again = calls[1].0 - calls[0].0;
    assert!(again <= ms(30), "the retry went {again:?} after the call");
    assert_eq!(sink.delivered().len(), 2);
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn calls_failing_whole_halve_the_limit_and_back_off_the_stream() {
    // The first six calls fail whole; then everything is accepted.
    let sink = FakeSink::new(|_, call| {
        if call < 6 {
            Fate::FailCall
        } else {
            Fate::Accept
        }
    });
    let settings = BatchSettings {
        linger: ms(5),
        max_in_flight: 4,
        retry_initial_backoff: ms(100),
        record_retry_initial_backoff: ms(100),
        retry_max_backoff: ms(800),
        record_retry_max_backoff: ms(100),
        ..batch()
    };
    let mut run = Run::start(spec(settings), sink.clone(), None);
    run.insert("a").await;
    let mut limits = Vec::new();
    let mut states = Vec::new();
    let mut status = run.status.clone();
    let watcher = tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let s = status.borrow().clone();
            limits.push(s.flow.send_limit);
            states.push(s.state);
        }
        (limits, states)
    });
    tokio::time::sleep(ms(10_000)).await;
    let calls = sink.calls();
    assert_eq!(
        sink.delivered().len(),
        1,
        "delivered once the stream recovers"
    );
    assert!(calls.len() >= 7);
    // From the second failure in a row on, the gaps between calls follow the stream backoff,
    // which grows (jittered within [ceiling/2, ceiling]).
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].0 - w[0].0).collect();
    assert!(gaps[2] >= ms(100), "gaps {gaps:?}");
    assert!(gaps[4] >= ms(200), "gaps {gaps:?}");
    run.stop().await.0.unwrap();
    let (limits, states) = watcher.await.unwrap();
    assert!(limits.contains(&1), "limit halved down to 1: {limits:?}");
    assert!(states.contains(&State::BackingOff), "{states:?}");
    assert_eq!(
        states.last(),
        Some(&State::Running),
        "recovered: {states:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_limit_climbs_back_after_the_stream_recovers() {
    let sink = FakeSink::new(|_, call| {
        if call < 3 {
            Fate::FailCall
        } else {
            Fate::Accept
        }
    });
    let settings = BatchSettings {
        linger: ms(1),
        max_in_flight: 4,
        retry_initial_backoff: ms(10),
        record_retry_initial_backoff: ms(10),
        record_retry_max_backoff: ms(10),
        ..batch()
    };
    let mut run = Run::start(spec(settings), sink.clone(), None);
    run.insert("k0").await;
    tokio::time::sleep(ms(1000)).await;
    // 4 -> 2 -> 1 -> 1 over three failed calls, then +1 for the call that got through.
    assert_eq!(sink.delivered().len(), 1);
    assert_eq!(run.status.borrow().flow.send_limit, 2);
    for i in 1..10 {
        run.insert(&format!("k{i}")).await;
        tokio::time::sleep(ms(50)).await;
    }
    assert_eq!(sink.delivered().len(), 10);
    assert_eq!(run.status.borrow().flow.send_limit, 4);
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn max_put_retries_stops_the_watcher() {
    let sink = FakeSink::new(|r, _| {
        if r.partition_key == "a" {
            Fate::Reject
        } else {
            Fate::Accept
        }
    });
    let settings = BatchSettings {
        linger: ms(1),
        max_put_retries: Some(2),
        retry_initial_backoff: ms(10),
        record_retry_initial_backoff: ms(10),
        ..batch()
    };
    let mut run = Run::start(spec(settings), sink.clone(), None);
    run.insert("a").await;
    run.insert("b").await;
    let (result, _) = tokio::time::timeout(ms(5_000), &mut run.task)
        .await
        .expect("the loop stops by itself")
        .unwrap();
    match result {
        Err(WatcherError::PutRetriesExhausted { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected PutRetriesExhausted, got {other:?}"),
    }
    assert_eq!(
        sink.calls().len(),
        3,
        "a sent three times, b with the first"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_cannot_finish_stops_at_the_deadline_and_counts_the_unsent() {
    let sink = FakeSink::new(|_, _| Fate::FailCall);
    let settings = BatchSettings {
        linger: ms(1),
        ..batch()
    };
    let mut run = Run::start(spec(settings), sink.clone(), None);
    for key in ["a", "b", "c"] {
        run.insert(key).await;
    }
    tokio::time::sleep(ms(100)).await;
    let stopping = Instant::now();
    let (result, unsent) = run.stop().await;
    result.unwrap();
    assert_eq!(unsent, 3);
    let took = Instant::now() - stopping;
    assert!(
        took >= DRAIN_TIMEOUT && took < DRAIN_TIMEOUT + ms(100),
        "stopped after {took:?}"
    );
    let last_call = sink.calls().last().unwrap().0;
    assert!(
        last_call - stopping < DRAIN_TIMEOUT,
        "no call after the deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_flushes_what_was_read() {
    let sink = FakeSink::accept_all();
    let mut run = Run::start(
        spec(BatchSettings {
            linger: ms(10_000),
            ..batch()
        }),
        sink.clone(),
        None,
    );
    for key in ["a", "b", "a"] {
        run.insert(key).await;
    }
    settle().await;
    let (result, unsent) = run.stop().await;
    result.unwrap();
    assert_eq!(unsent, 0);
    assert_eq!(sink.delivered().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_checkpoint_is_written_each_interval_while_the_frontier_moves() {
    let sink = FakeSink::accept_all();
    let store = MemoryStore::default();
    let mut run = Run::start(
        spec(BatchSettings {
            linger: ms(1),
            ..batch()
        }),
        sink.clone(),
        Some(store.clone()),
    );
    let start = Instant::now();
    run.insert("a").await;
    tokio::time::sleep(ms(1500)).await;
    run.insert("b").await;
    tokio::time::sleep(ms(3000)).await;
    let saves = store.saves.lock().unwrap().clone();
    // One write after the first interval (a), one after the second (b), none while nothing
    // moved.
    assert_eq!(saves.len(), 2, "{saves:?}");
    assert_eq!(saves[0].0 - start, ms(1000));
    assert_eq!(saves[1].0 - start, ms(2000));
    assert_eq!(
        saves[1].1.token,
        Some(Bson::Document(doc! {"_data": "00000002"}))
    );
    run.stop().await.0.unwrap();
}

/// On MongoDB an idle stream's post-batch token follows the cluster time: it moves at every
/// getMore. Such moves are written once per `IDLE_CHECKPOINT_INTERVAL`, not every interval;
/// a delivered event is written at the next tick as before. (The final write at shutdown is
/// `Checkpointer::write`, outside the loop, which writes any move.)
#[tokio::test(start_paused = true)]
async fn idle_token_moves_are_checkpointed_once_a_minute_events_at_once() {
    let store = MemoryStore::default();
    let mut run = Run::start_silent(
        spec(BatchSettings {
            linger: ms(1),
            ..batch()
        }),
        FakeSink::accept_all(),
        Some(store.clone()),
    );
    let start = Instant::now();
    let idle_token = |i: u32| Bson::Document(doc! {"_data": format!("idle{i:04}")});
    // 90 s of an idle stream whose token moves every 2 s.
    for i in 0..45 {
        run.events
            .send(Ok(ReaderMsg::Idle(Some(idle_token(i)))))
            .await
            .unwrap();
        tokio::time::sleep(ms(2000)).await;
    }
    let times = |store: &MemoryStore| -> Vec<Duration> {
        store
            .saves
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| *at - start)
            .collect()
    };
    // The first position at the first tick, the next a minute later: 2 writes, not 45.
    assert_eq!(times(&store), [ms(1000), ms(61_000)]);
    run.insert("a").await;
    tokio::time::sleep(ms(1500)).await;
    let saves = store.saves.lock().unwrap().clone();
    assert_eq!(saves.len(), 3, "the event is written at the next tick");
    assert_eq!(
        saves[2].1.token,
        Some(Bson::Document(doc! {"_data": "00000001"}))
    );
    run.stop().await.0.unwrap();
}

/// A checkpoint write that takes seconds (a slow DynamoDB, up to the write timeout and a
/// read-back) runs beside the loop: events read meanwhile are sent at once, the stream is not
/// taken for silent, and the next write, after it returns, stores the newest frontier.
#[tokio::test(start_paused = true)]
async fn a_slow_checkpoint_write_holds_back_neither_delivery_nor_reading() {
    let sink = FakeSink::accept_all();
    let store = MemoryStore::default();
    // Under the write timeout (5 s), after which a write is in doubt.
    store.delay_ms.store(4_000, Ordering::Relaxed);
    let mut run = Run::start(
        spec(BatchSettings {
            linger: ms(1),
            ..batch()
        }),
        sink.clone(),
        Some(store.clone()),
    );
    let start = Instant::now();
    run.insert("a").await;
    // The first write starts at 1 s and returns at 5 s.
    tokio::time::sleep(ms(1500)).await;
    for (i, key) in ["b", "c", "d"].into_iter().enumerate() {
        run.insert(key).await;
        tokio::time::sleep(ms(1000)).await;
        assert_eq!(
            sink.delivered().len(),
            i + 2,
            "`{key}` was not sent while a checkpoint write was out"
        );
        assert_ne!(run.status.borrow().state, State::BackingOff);
    }
    assert!(
        store.saves.lock().unwrap().is_empty(),
        "the first write is still out"
    );
    tokio::time::sleep(ms(8000)).await;
    let saves = store.saves.lock().unwrap().clone();
    assert_eq!(saves.len(), 2, "{saves:?}");
    // Saves are stamped when they return; the second starts at the first tick after.
    assert_eq!(saves[0].0 - start, ms(5000));
    assert_eq!(saves[1].0 - start, ms(10000));
    assert_eq!(
        saves[1].1.token,
        Some(Bson::Document(doc! {"_data": "00000004"})),
        "the second write stores the newest frontier"
    );
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn failing_checkpoint_writes_show_backing_off_while_delivery_goes_on() {
    let sink = FakeSink::accept_all();
    let store = MemoryStore::default();
    store.failing.store(true, Ordering::Relaxed);
    let mut run = Run::start(
        spec(BatchSettings {
            linger: ms(1),
            ..batch()
        }),
        sink.clone(),
        Some(store.clone()),
    );
    for i in 0..4 {
        run.insert(&format!("k{i}")).await;
        tokio::time::sleep(ms(1000)).await;
    }
    {
        let status = run.status.borrow();
        assert_eq!(status.state, State::BackingOff);
        let reason = status.reason.clone().unwrap_or_default();
        assert!(
            reason.contains("checkpoints cannot be written") && reason.contains("memory"),
            "{reason}"
        );
    }
    assert_eq!(sink.delivered().len(), 4, "delivery goes on");
    store.failing.store(false, Ordering::Relaxed);
    run.insert("k9").await;
    tokio::time::sleep(ms(1100)).await;
    assert_eq!(run.status.borrow().state, State::Running);
    assert_eq!(run.status.borrow().reason, None);
    assert!(!store.saves.lock().unwrap().is_empty());
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_change_stream_shows_backing_off_until_it_answers() {
    let sink = FakeSink::accept_all();
    let mut run = Run::start_silent(spec(batch()), sink.clone(), None);
    run.insert("a").await;
    tokio::time::sleep(ms(4900)).await;
    assert_ne!(
        run.status.borrow().state,
        State::BackingOff,
        "4.9 s is not silence yet"
    );
    tokio::time::sleep(ms(200)).await;
    {
        let status = run.status.borrow();
        assert_eq!(status.state, State::BackingOff);
        let reason = status.reason.clone().unwrap_or_default();
        assert!(reason.contains("has not answered"), "{reason}");
    }
    let turns = run.turns();
    tokio::time::sleep(ms(10_000)).await;
    assert!(
        run.turns() - turns < 20,
        "shown once, no wake-ups while silent"
    );
    run.idle().await;
    settle().await;
    assert_eq!(run.status.borrow().state, State::Running);
    run.stop().await.0.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_wins_over_the_reader_closing_at_the_same_time() {
    // At shutdown the reader stops with the watcher and closes its channel: the loop must
    // see a requested stop (reported with its drain), not a failed change stream.
    for _ in 0..20 {
        let sink = FakeSink::accept_all();
        let mut run = Run::start_silent(spec(batch()), sink, None);
        run.insert("a").await;
        settle().await;
        let Run {
            events,
            cancel,
            task,
            ..
        } = run;
        drop(events);
        cancel.cancel();
        let (result, unsent) = task.await.unwrap();
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(unsent, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn reading_pauses_at_max_pending() {
    let (sink, open) = FakeSink::accept_all().gated();
    let mut run = Run::start(
        spec(BatchSettings {
            max_pending: 5,
            linger: ms(1),
            ..batch()
        }),
        sink.clone(),
        None,
    );
    for i in 0..20 {
        run.insert(&format!("k{i}")).await;
    }
    // The status is published on the checkpoint tick (1 s) while no call returns.
    tokio::time::sleep(ms(1100)).await;
    assert_eq!(run.status.borrow().flow.pending_records, 5);
    assert_eq!(sink.calls().len(), 1);
    open.send(true).unwrap();
    tokio::time::sleep(ms(1000)).await;
    assert_eq!(sink.delivered().len(), 20);
    run.stop().await.0.unwrap();
}

// ---- Where a life starts, and a token of another collection (issue 8) ----

fn stored_at(namespace: Option<&str>) -> Stored {
    Stored {
        checkpoint: crate::checkpoint::Checkpoint {
            token: Some(doc! {"_data": "82AA"}.into()),
            cluster_time: None,
            paused: false,
            namespace: namespace.map(str::to_owned),
        },
        revision: 4,
        updated_at: None,
        snapshot: None,
    }
}

fn checkpoint_origin() -> Option<TokenOrigin> {
    Some(TokenOrigin::Checkpoint {
        table: "cps".into(),
    })
}

#[test]
fn a_checkpoint_written_for_another_namespace_is_refused_before_any_stream_opens() {
    let spec = spec(batch());
    let err = resolve_start(&spec, "cps", Some(&stored_at(Some("db.old"))), None, None)
        .expect_err("another namespace");
    assert!(
        matches!(
            &err,
            WatcherError::NamespaceMismatch { written_for: Some(w), watching, origin, .. }
                if w == "db.old" && watching == "db.c" && Some(origin) == checkpoint_origin().as_ref()
        ),
        "{err}"
    );
    assert_eq!(err.state(), State::Failed);
    assert!(!err.is_retryable());
    // A checkpoint known only by time would silently skip on the new collection: refused too.
    let mut by_time = stored_at(Some("db.old"));
    by_time.checkpoint.token = None;
    by_time.checkpoint.cluster_time = Some(Timestamp {
        time: 5,
        increment: 1,
    });
    assert!(resolve_start(&spec, "cps", Some(&by_time), None, None).is_err());
}

#[test]
fn a_checkpoint_of_this_namespace_or_of_none_resumes_after_its_token() {
    let spec = spec(batch());
    for namespace in [Some("db.c"), None] {
        let start = resolve_start(&spec, "cps", Some(&stored_at(namespace)), None, None)
            .unwrap_or_else(|e| panic!("{namespace:?}: {e}"));
        assert_eq!(
            start,
            Start {
                position: StartPosition::After(doc! {"_data": "82AA"}.into()),
                origin: checkpoint_origin(),
            },
            "{namespace:?}"
        );
    }
}

#[test]
fn an_operators_rewind_wins_over_a_checkpoint_of_another_namespace() {
    let spec = spec(batch());
    let target = StartPosition::At(Timestamp {
        time: 9,
        increment: 0,
    });
    let start = resolve_start(
        &spec,
        "cps",
        Some(&stored_at(Some("db.old"))),
        None,
        Some(target.clone()),
    )
    .expect("the rewind target was probed on this collection");
    assert_eq!(
        start,
        Start {
            position: target,
            origin: None
        }
    );
}

#[test]
fn tokens_from_start_at_are_marked_and_this_processs_own_frontier_is_not() {
    let mut spec = spec(batch());
    let token: Bson = doc! {"_data": "82BB"}.into();
    spec.start_at = StartAt::ResumeToken(token.clone());
    let start = resolve_start(&spec, "", None, None, None).unwrap();
    assert_eq!(start.origin, Some(TokenOrigin::StartAt));
    let carried: Bson = doc! {"_data": "82CC"}.into();
    let start = resolve_start(&spec, "", None, Some(&carried), None).unwrap();
    assert_eq!(
        start,
        Start {
            position: StartPosition::After(carried),
            origin: None
        }
    );
}

#[test]
fn the_servers_refusal_of_a_foreign_token_is_a_namespace_mismatch_where_it_came_from_outside() {
    let spec = spec(batch());
    let foreign = || {
        let command: mongodb::error::CommandError = bson::deserialize_from_document(doc! {
            "code": 13,
            "codeName": "Unauthorized",
            "errmsg": "Resume token namespace does not match the change-stream watch scope",
        })
        .unwrap();
        WatcherError::Mongo(mongodb::error::ErrorKind::Command(command).into())
    };
    let err = foreign_token(foreign(), &spec, checkpoint_origin());
    assert!(
        matches!(
            &err,
            WatcherError::NamespaceMismatch { written_for: None, server: Some(s), .. }
                if s.contains("error 13 (Unauthorized)")
        ),
        "{err}"
    );
    assert_eq!(err.state(), State::Failed);
    // A rewind target or this process's own frontier: left as the server's error.
    assert!(matches!(
        foreign_token(foreign(), &spec, None),
        WatcherError::Mongo(_)
    ));
    let outage = WatcherError::Mongo(mongodb::error::Error::custom("connection refused"));
    assert!(matches!(
        foreign_token(outage, &spec, checkpoint_origin()),
        WatcherError::Mongo(_)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_checkpoint_write_that_waits_for_a_fix_is_shown_at_the_first_failure() {
    let sink = FakeSink::accept_all();
    // Fails with the table missing: a fix must come from outside (as a refused permission).
    let store = MemoryStore::default();
    store.failing.store(true, Ordering::Relaxed);
    let mut run = Run::start(spec(batch()), sink.clone(), Some(store.clone()));
    run.insert("k").await;
    // One checkpoint tick (1 s), one failed write.
    tokio::time::sleep(ms(1100)).await;
    let status = run.status.borrow().clone();
    assert_eq!(status.state, State::BackingOff, "{status:?}");
    let reason = status.reason.unwrap_or_default();
    assert!(
        reason.contains("(1 failed in a row;") && reason.contains("does not exist"),
        "{reason}"
    );
    run.stop().await.0.unwrap();
}

const MIB: usize = 1024 * 1024;

#[tokio::test(start_paused = true)]
async fn a_record_is_oversized_against_its_streams_limit() {
    // 2 MiB: delivered on a stream raised to 4 MiB.
    let sink = FakeSink::accept_all();
    let limits = StreamLimits::with_record_bytes(4 * MIB);
    let mut run = Run::start_on_stream(spec(batch()), sink.clone(), None, limits);
    run.insert_sized("a", 2 * MIB).await;
    run.idle().await;
    tokio::time::sleep(ms(100)).await;
    assert_eq!(
        sink.delivered().len(),
        1,
        "a 2 MiB record on a 4 MiB stream"
    );
    assert!(run.stop().await.0.is_ok());

    // The same record on a stream at the default fails the watcher, naming 1 MiB.
    let sink = FakeSink::accept_all();
    let mut run = Run::start_on_stream(spec(batch()), sink.clone(), None, StreamLimits::default());
    run.insert_sized("a", 2 * MIB).await;
    run.idle().await;
    tokio::time::sleep(ms(100)).await;
    assert!(sink.calls().is_empty());
    match run.task.await.unwrap().0 {
        Err(WatcherError::Oversized { limit, .. }) => assert_eq!(limit, MIB),
        other => panic!("expected oversized, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_call_carries_up_to_the_streams_request_limit() {
    let three = 3 * MIB;
    let calls = |limits: StreamLimits, max_bytes: Option<usize>| async move {
        let sink = FakeSink::accept_all();
        let spec = spec(BatchSettings {
            max_bytes,
            ..batch()
        });
        let mut run = Run::start_on_stream(spec, sink.clone(), None, limits);
        run.insert_sized("a", three).await;
        run.insert_sized("b", three).await;
        run.idle().await;
        tokio::time::sleep(ms(100)).await;
        assert_eq!(sink.delivered().len(), 2);
        assert!(run.stop().await.0.is_ok());
        sink.calls().len()
    };
    // 5 MiB calls: the two 3 MiB records go one by one.
    assert_eq!(
        calls(StreamLimits::with_record_bytes(4 * MIB), None).await,
        2
    );
    // A stream raised to 8 MiB takes 8 MiB calls: both in one.
    assert_eq!(
        calls(StreamLimits::with_record_bytes(8 * MIB), None).await,
        1
    );
    // `max_batch_bytes` still caps a call, and never lifts it over the stream's.
    assert_eq!(
        calls(StreamLimits::with_record_bytes(8 * MIB), Some(5 * MIB)).await,
        2
    );
    assert_eq!(
        calls(StreamLimits::with_record_bytes(4 * MIB), Some(10 * MIB)).await,
        2
    );
}

/// `on_oversized: s3` in the loop.
mod claim_check;

/// `snapshot: initial` in the loop.
mod snapshot;
