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
                Fate::Accept => {
                    log.delivered
                        .push((Instant::now(), r.partition_key.clone(), r.seq));
                    RecordResult::Accepted
                }
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
    ) -> Result<u64, WatcherError> {
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
        pipeline: Vec::new(),
        start_at: StartAt::Latest,
        on_history_lost: OnHistoryLost::Fail,
        on_invalidate: OnInvalidate::Stop,
        on_oversized: OnOversized::Fail,
        on_undeliverable: OnUndeliverable::Fail,
        record_format: RecordFormat::Relaxed,
        batch,
        checkpoint_interval: Duration::from_secs(1),
    }
}

/// A running loop and the handles a test drives it with.
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
        let (status_tx, status) = StatusTx::channel();
        let metrics = crate::metrics::Metrics::register(&prometheus::Registry::new())
            .unwrap()
            .for_watcher("w");
        let mut pipeline =
            Pipeline::new(Arc::new(spec), sink, status_tx, AckTracker::new(), metrics);
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
        self.next_seq += 1;
        let n = self.next_seq;
        let event = doc! {
            "_id": {"_data": format!("{n:08}")},
            "operationType": "insert",
            "clusterTime": Timestamp { time: 1_700_000_000 + n as u32, increment: 1 },
            "documentKey": {"_id": key},
        };
        let reservation = Reservation::take(&self.budget, &self.budget, 100).await;
        self.events
            .send(Ok(ReaderMsg::Event(event, reservation, Decoded::Exact)))
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
    let attempts = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let sink = FakeSink::new({
        let attempts = attempts.clone();
        move |r, _| {
            let mut attempts = attempts.lock().unwrap();
            let n = attempts.entry(r.partition_key.clone()).or_default();
            *n += 1;
            if r.partition_key == "a" && *n <= 3 {
                Fate::Reject
            } else {
                Fate::Accept
            }
        }
    });
    let settings = BatchSettings {
        linger: ms(5),
        retry_initial_backoff: ms(100),
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
