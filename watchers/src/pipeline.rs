//! One life of a watcher: load the checkpoint, open the stream, move events to Kinesis,
//! checkpoint the ack frontier, and stop at a safe point. The supervisor calls [`run`] again
//! after a retryable error; everything a life needs is rebuilt from the checkpoint.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::Future;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ack::{AckTracker, Position};
use crate::batch::{PendingRecord, Scheduler};
use crate::checkpoint::{CheckpointBackend, CheckpointStore, Checkpointer, InDoubtWrites};
use crate::control::Command;
use crate::error::WatcherError;
use crate::flow::{record_delay, ByteBudget, Reservation, SendLimit};
use crate::kinesis::{CallError, KinesisSink, RecordResult, RecordSink};
use crate::metrics::{Metrics, WatcherMetrics};
use crate::reader::{self, Decoded, ReaderMsg, StartPosition, Undecodable};
use crate::record::{self, MAX_RECORD_BYTES};
use crate::retry::Backoff;
use crate::spec::{OnOversized, OnUndeliverable, StartAt, WatcherSpec};
use crate::status::{wall_time, State, StatusTx, StoredPosition};

/// How long a stopping watcher keeps sending what it has read before it gives up (the rest is
/// read again after a restart: nothing past the frontier was checkpointed).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Read-ahead between the reader task and the pipeline.
const READER_CHANNEL: usize = 1024;
/// Reader messages taken in one turn of the loop at most.
const READ_BURST: usize = 256;

/// The clients one watcher uses; cheap to clone, shared by all watchers.
#[derive(Clone)]
pub struct Deps {
    pub mongo: mongodb::Client,
    pub kinesis: aws_sdk_kinesis::Client,
    pub checkpoints: Option<CheckpointStore>,
    pub metrics: Metrics,
    /// Bytes read and not yet acknowledged, shared by every watcher of the process.
    pub memory: Arc<ByteBudget>,
}

/// How a life ended without an error.
#[derive(Debug)]
pub enum Exit {
    /// Shutdown (the cancellation token fired). `unsent` records were still waiting when the
    /// drain deadline passed: nothing is lost (they are past the checkpoint and read again
    /// after a restart), but the shutdown was not clean.
    Cancelled { unsent: usize },
    /// The stored checkpoint says paused: the stream was not opened.
    StoredPaused,
    /// An operator's pause or rewind: everything in flight was flushed and the checkpoint
    /// written; the supervisor carries the command out and answers it.
    Command(Command),
}

/// What one life of a watcher hands the next (the supervisor keeps it between lives).
#[derive(Debug, Default)]
pub struct Carry {
    /// The last ack frontier, used when there is no checkpoint table.
    pub position: Option<Bson>,
    /// Start the next life here, ignoring the stored checkpoint, and store it as the new
    /// checkpoint before reading (history lost with `restart_from_latest`, or a rewind).
    pub start_override: Option<StartPosition>,
    /// Checkpoint writes of the last life whose outcome is unknown (they may still land).
    pub in_doubt: InDoubtWrites,
}

/// Runs the watcher until `cancel` fires (Ok) or it fails (Err, with its state).
pub async fn run(
    spec: Arc<WatcherSpec>,
    deps: Deps,
    status: StatusTx,
    cancel: CancellationToken,
    carry: &mut Carry,
    commands: &mut mpsc::Receiver<Command>,
) -> Result<Exit, WatcherError> {
    // A life that follows a failure keeps showing `backing_off` and its reason until its
    // stream is open: opening waits out MongoDB's server selection (30 s by default), and
    // `starting` with no reason would hide an outage.
    status.update(|s| {
        if s.state != State::BackingOff {
            s.state = State::Starting;
            s.reason = None;
        }
    });
    let metrics = deps.metrics.for_watcher(&spec.name);
    let mut cp = Checkpointer::with_in_doubt(std::mem::take(&mut carry.in_doubt));
    let stored = match &deps.checkpoints {
        Some(store) => {
            store.verify_table().await?;
            store.load(&spec.name).await?
        }
        None => None,
    };
    if let Some(s) = &stored {
        cp.revision = Some(s.revision);
        cp.paused = s.checkpoint.paused;
    }
    let start_override = carry.start_override.take();
    if start_override.is_none() && stored.as_ref().is_some_and(|s| s.checkpoint.paused) {
        return Ok(Exit::StoredPaused);
    }
    cp.paused = false;
    let start = match (&stored, &carry.position) {
        _ if start_override.is_some() => start_override.clone().unwrap_or(StartPosition::Latest),
        (Some(s), _) => match (&s.checkpoint.token, s.checkpoint.cluster_time) {
            (Some(token), _) => StartPosition::After(token.clone()),
            (None, Some(ts)) => StartPosition::At(ts),
            (None, None) => StartPosition::Latest,
        },
        (None, Some(token)) => StartPosition::After(token.clone()),
        (None, None) => match &spec.start_at {
            StartAt::Latest => StartPosition::Latest,
            StartAt::Timestamp(dt) => StartPosition::At(bson::Timestamp {
                time: (dt.timestamp_millis().max(0) / 1000) as u32,
                increment: 0,
            }),
            StartAt::ResumeToken(t) => StartPosition::After(t.clone()),
        },
    };
    let first_start = stored.is_none() || start_override.is_some();
    info!(start = %start_label(&start), from_checkpoint = !first_start, "opening change stream");
    let stream = match reader::open(&deps.mongo, &spec, &start).await {
        Ok(stream) => stream,
        Err(e) => {
            carry.start_override = start_override;
            return Err(e);
        }
    };

    let mut tracker = AckTracker::new();
    if first_start {
        // Resolve the start once and store it before reading anything, so that a crash before
        // the first acknowledged batch restarts here rather than at a later `latest`.
        let initial = match (&start, reader::current_token(&stream)) {
            // A start at a time is stored as that time: a server may report a token past
            // events it has not returned yet, and a crash must replay them.
            (StartPosition::At(_), _) => None,
            (_, Some(token)) => Some(token),
            (StartPosition::After(token), None) => Some(token.clone()),
            _ => None,
        };
        match (initial, &start) {
            (Some(token), _) => tracker.push_idle(token),
            (None, StartPosition::At(ts)) => cp.initial_time = Some(*ts),
            (None, _) => cp.initial_time = operation_time(&deps.mongo).await,
        }
        if let Some(store) = &deps.checkpoints {
            if let Err(e) = cp.write(store, &spec.name, &tracker, true).await {
                carry.in_doubt = cp.take_in_doubt();
                return Err(e);
            }
            record_checkpoint(&status, &metrics, &cp);
        }
    }

    let (tx, rx) = mpsc::channel(READER_CHANNEL);
    let reader_cancel = cancel.child_token();
    let budgets = [
        ByteBudget::new(spec.batch.max_pending_bytes),
        deps.memory.clone(),
    ];
    let reader_task = tokio::spawn(reader::run(stream, tx, budgets, reader_cancel.clone()));
    status.update(|s| {
        s.state = State::Running;
        s.reason = None;
        s.paused = false;
    });
    info!("watcher running");

    let sink = KinesisSink::new(deps.kinesis.clone(), spec.stream.clone());
    let mut pipeline = Pipeline::new(spec.clone(), sink, status, tracker, metrics);
    let result = pipeline
        .run_loop(rx, &cancel, deps.checkpoints.as_ref(), &mut cp, commands)
        .await;
    reader_cancel.cancel();
    let _ = reader_task.await;
    if let Some(p) = pipeline.tracker.frontier() {
        carry.position = Some(p.token.clone());
    }
    pipeline.publish();
    // Final checkpoint: whatever is acknowledged, never more.
    if let Some(store) = &deps.checkpoints {
        let written = cp.write(store, &spec.name, &pipeline.tracker, false).await;
        carry.in_doubt = cp.take_in_doubt();
        match written {
            Ok(true) => record_checkpoint(&pipeline.status, &pipeline.metrics, &cp),
            Ok(false) => {}
            Err(e) => {
                error!(error = %e, "final checkpoint write failed");
                if result.is_ok() {
                    if let Some(cmd) = pipeline.command.take() {
                        answer(
                            cmd,
                            Err(crate::control::ControlError::Unavailable(e.to_string())),
                        );
                    }
                    return Err(e);
                }
            }
        }
    }
    if let (Err(e), true) = (&result, cancel.is_cancelled()) {
        // Whatever ended the life during shutdown, the process is stopping: report the drain,
        // not an error to restart from.
        info!(error = %e, "stopped during shutdown");
        return Ok(Exit::Cancelled {
            unsent: pipeline.unsent,
        });
    }
    result?;
    Ok(match pipeline.command.take() {
        Some(cmd) => Exit::Command(cmd),
        None => Exit::Cancelled {
            unsent: pipeline.unsent,
        },
    })
}

fn record_checkpoint(status: &StatusTx, metrics: &WatcherMetrics, cp: &Checkpointer) {
    metrics.checkpoint_writes.inc();
    let stored = cp.stored().map(|c| StoredPosition {
        token: c.token.as_ref().map(record::to_text),
        cluster_time: c.cluster_time.map(wall_time),
    });
    status.update(|s| {
        s.last_checkpoint_at = Some(bson::DateTime::now());
        s.counters.checkpoint_writes += 1;
        if stored.is_some() {
            s.checkpoint = stored;
        }
    });
}

/// Answers a command that the pipeline cannot carry out itself.
pub fn answer(cmd: Command, result: Result<(), crate::control::ControlError>) {
    let reply = match cmd {
        Command::Pause(r) | Command::Resume(r) | Command::Rewind(_, r) => r,
    };
    let _ = reply.send(result);
}

fn start_label(start: &StartPosition) -> String {
    match start {
        StartPosition::Latest => "latest".into(),
        StartPosition::After(_) => "resume_token".into(),
        StartPosition::At(ts) => format!("cluster_time {}.{}", ts.time, ts.increment),
    }
}

/// Current cluster time, for a start at `latest` on a server that sent no initial token.
async fn operation_time(client: &mongodb::Client) -> Option<bson::Timestamp> {
    let mut session = client.start_session().await.ok()?;
    client
        .database("admin")
        .run_command(bson::doc! {"ping": 1})
        .session(&mut session)
        .await
        .ok()?;
    session.operation_time()
}

type PutFuture = Pin<
    Box<dyn Future<Output = (Vec<PendingRecord>, Result<Vec<RecordResult>, CallError>)> + Send>,
>;

/// Calls in a row that failed whole (an error answer, or two or more records and none
/// acknowledged) before no call starts until the stream backoff has passed.
const STREAM_BACKOFF_AFTER: u32 = 2;
/// Calls in a row with nothing acknowledged before the watcher shows `backing_off`.
const BACKING_OFF_AFTER: u32 = 3;
/// Checkpoint writes failed in a row before the watcher shows `backing_off`.
const CHECKPOINT_FAILURES_SHOWN: u32 = 3;
/// Silence of the change stream, while the loop is ready to read, after which the watcher
/// shows `backing_off`. A healthy stream answers at least every `reader::MAX_AWAIT` (0.5 s),
/// with events or an empty read; the driver itself gives up on a lost server only after its
/// server selection timeout (30 s by default).
const READER_STALL: Duration = Duration::from_secs(5);

/// One life's loop and everything it holds: the scheduler, the ack tracker, the calls in
/// flight and the flow-control state. Generic over the sink so that the timing logic is
/// tested on tokio's paused clock against an in-memory sink.
pub(crate) struct Pipeline<S: RecordSink> {
    spec: Arc<WatcherSpec>,
    sink: S,
    status: StatusTx,
    tracker: AckTracker,
    scheduler: Scheduler,
    inflight: FuturesUnordered<PutFuture>,
    /// Calls allowed in flight now (AIMD between 1 and `max_in_flight`).
    limit: SendLimit,
    /// Grows while calls fail whole in a row; reset by any acknowledged record.
    stream_backoff: Backoff,
    /// After [`STREAM_BACKOFF_AFTER`] failed calls in a row, no call starts before this.
    stream_retry_at: Option<Instant>,
    /// Calls in a row with nothing acknowledged.
    failing_calls: u32,
    /// Why Kinesis takes nothing, while it does not.
    kinesis_trouble: Option<String>,
    /// Why checkpoints cannot be written, while they cannot.
    checkpoint_trouble: Option<String>,
    /// Why the change stream is silent, while it is.
    mongo_trouble: Option<String>,
    /// Cluster time of the newest event read.
    newest_read: Option<bson::Timestamp>,
    /// The last reader message, or the last moment the loop was not ready to read (a reader
    /// held back by a full pipeline is not silent).
    last_read: Instant,
    /// When the oldest ready record stops waiting for company.
    linger_deadline: Option<Instant>,
    /// The last read came back empty: send what is ready without lingering.
    reader_idle: bool,
    /// Set once the watcher is stopping: `Ok` for a requested stop, `Err` for a failure.
    stop: Option<Result<(), WatcherError>>,
    /// No new calls (retries exhausted, a checkpoint conflict, or the drain deadline passed);
    /// only wait for calls in flight.
    halted: bool,
    /// Records left unsent when the drain deadline passed.
    unsent: usize,
    /// The operator command that stopped this life, answered by the supervisor.
    command: Option<Command>,
    metrics: WatcherMetrics,
    /// Events read since the last status publication.
    events_seen: u64,
    /// Budget bytes of each event not yet acknowledged, by sequence number.
    reservations: HashMap<u64, Reservation>,
    /// Turns of the loop, so tests can tell sleeping from spinning.
    turns: Arc<AtomicU64>,
    /// `mongo_watcher_events_total` by operation, looked up once per operation type.
    event_counters: HashMap<String, IntCounter>,
}

impl<S: RecordSink> Pipeline<S> {
    pub(crate) fn new(
        spec: Arc<WatcherSpec>,
        sink: S,
        status: StatusTx,
        tracker: AckTracker,
        metrics: WatcherMetrics,
    ) -> Self {
        let batch = &spec.batch;
        Self {
            limit: SendLimit::new(batch.max_in_flight),
            stream_backoff: Backoff::new(batch.retry_initial_backoff, batch.retry_max_backoff),
            spec: spec.clone(),
            sink,
            status,
            tracker,
            scheduler: Scheduler::new(),
            inflight: FuturesUnordered::new(),
            stream_retry_at: None,
            failing_calls: 0,
            kinesis_trouble: None,
            checkpoint_trouble: None,
            mongo_trouble: None,
            newest_read: None,
            last_read: Instant::now(),
            linger_deadline: None,
            reader_idle: false,
            stop: None,
            halted: false,
            unsent: 0,
            command: None,
            metrics,
            events_seen: 0,
            reservations: HashMap::new(),
            turns: Arc::default(),
            event_counters: HashMap::new(),
        }
    }

    async fn run_loop(
        &mut self,
        mut rx: mpsc::Receiver<Result<ReaderMsg, WatcherError>>,
        cancel: &CancellationToken,
        store: Option<&impl CheckpointBackend>,
        cp: &mut Checkpointer,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<(), WatcherError> {
        let every = self.spec.checkpoint_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut drain_deadline: Option<Instant> = None;
        let mut checkpoint_failures: u32 = 0;
        loop {
            self.turns.fetch_add(1, Ordering::Relaxed);
            if self.stop.is_some() {
                let deadline =
                    *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
                if !self.halted && Instant::now() >= deadline && !self.scheduler.is_empty() {
                    // Nothing new starts; calls in flight still count when they return.
                    self.halted = true;
                }
            }
            self.dispatch();
            if self.stop.is_some() {
                let drained = self.scheduler.is_empty() || self.halted;
                if self.inflight.is_empty() && drained {
                    if !self.scheduler.is_empty() {
                        self.unsent = self.scheduler.len();
                        warn!(
                            unsent = self.unsent,
                            "drain deadline passed; unsent records will be read again after restart"
                        );
                    }
                    break;
                }
            }
            let can_read = self.can_read();
            self.watch_reader(can_read);
            let wake = self.next_wake();
            let drain_wake = drain_deadline.filter(|_| !self.halted);
            tokio::select! {
                // In this order: cancellation first (at shutdown the reader stops too, and its
                // closed channel must not be taken for a failed stream); the reader last, so a
                // long backlog cannot starve the timers and the checkpoint tick.
                biased;
                _ = cancel.cancelled(), if self.stop.is_none() => {
                    info!("stopping: flushing records in flight");
                    self.stop = Some(Ok(()));
                }
                Some(cmd) = commands.recv(), if self.stop.is_none() => match cmd {
                    Command::Resume(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                    cmd => {
                        if matches!(cmd, Command::Pause(_)) {
                            info!("pausing: flushing records in flight");
                            cp.paused = true;
                        } else {
                            info!("rewinding: flushing records in flight");
                        }
                        self.command = Some(cmd);
                        self.stop = Some(Ok(()));
                    }
                },
                Some((batch, result)) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.on_put_result(batch, result);
                }
                _ = sleep_until_opt(wake), if wake.is_some() => {}
                _ = sleep_until_opt(drain_wake), if drain_wake.is_some() => {}
                _ = tick.tick() => {
                    self.publish();
                    if let Some(store) = store {
                        match cp.write(store, &self.spec.name, &self.tracker, false).await {
                            Ok(wrote) => {
                                checkpoint_failures = 0;
                                if wrote {
                                    record_checkpoint(&self.status, &self.metrics, cp);
                                }
                                if self.checkpoint_trouble.take().is_some() {
                                    info!("checkpoint writes succeed again");
                                    self.show_health();
                                }
                            }
                            Err(e @ WatcherError::CheckpointConflict { .. }) => {
                                self.halted = true;
                                self.stop = Some(Err(e));
                            }
                            Err(e) => {
                                checkpoint_failures += 1;
                                if checkpoint_failures.is_power_of_two() {
                                    warn!(error = %e, failures = checkpoint_failures, "checkpoint write failed; will retry");
                                }
                                if checkpoint_failures >= CHECKPOINT_FAILURES_SHOWN {
                                    // Delivery goes on, but the stored position is frozen: a
                                    // restart would replay everything since it.
                                    self.checkpoint_trouble = Some(format!(
                                        "checkpoints cannot be written ({checkpoint_failures} \
                                         attempts in a row; events are still delivered, a \
                                         restart would replay them since the last stored \
                                         checkpoint): {e}"
                                    ));
                                    self.show_health();
                                }
                            }
                        }
                    }
                }
                msg = rx.recv(), if can_read => {
                    self.on_reader_msg(msg);
                    // Take what else the reader has ready in the same turn: one turn of the
                    // select (a timer and a cancellation waiter registered, then dropped) per
                    // burst instead of per event.
                    for _ in 1..READ_BURST {
                        if self.stop.is_some()
                            || self.scheduler.len() >= self.spec.batch.max_pending
                        {
                            break;
                        }
                        match rx.try_recv() {
                            Ok(msg) => self.on_reader_msg(Some(msg)),
                            Err(mpsc::error::TryRecvError::Empty) => break,
                            Err(mpsc::error::TryRecvError::Disconnected) => {
                                self.on_reader_msg(None);
                                break;
                            }
                        }
                    }
                }
            }
        }
        self.stop.take().unwrap_or(Ok(()))
    }

    /// When the loop must wake by itself: a delayed record's retry time, or the moment a call
    /// can start (linger and stream backoff over). `None` while nothing could be sent then
    /// anyway (calls at the limit, nothing waiting), so the loop sleeps until a call returns,
    /// an event arrives or a command comes.
    fn next_wake(&self) -> Option<Instant> {
        // The moment a silent change stream is to be shown (once).
        let stall = (self.mongo_trouble.is_none() && self.can_read())
            .then_some(self.last_read + READER_STALL);
        match (self.next_send_wake(), stall) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn next_send_wake(&self) -> Option<Instant> {
        if self.halted || self.inflight.len() >= self.limit.current() {
            return None;
        }
        let send_at = if self.scheduler.ready_len() > 0 {
            match (self.linger_deadline, self.stream_retry_at) {
                (Some(l), Some(r)) => Some(l.max(r)),
                (l, r) => l.or(r),
            }
        } else {
            None
        };
        match (send_at, self.scheduler.next_retry_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn on_event(&mut self, event: Document, reservation: Reservation) {
        self.reader_idle = false;
        let Some(token) = event.get("_id").cloned() else {
            self.halted = true;
            self.stop = Some(Err(WatcherError::MissingResumeToken));
            return;
        };
        let position = Position {
            token,
            cluster_time: event.get_timestamp("clusterTime").ok(),
        };
        if position.cluster_time.is_some() {
            self.newest_read = position.cluster_time;
        }
        let operation = event.get_str("operationType").unwrap_or("unknown");
        match self.event_counters.get(operation) {
            Some(counter) => counter.inc(),
            None => {
                let counter = self.metrics.events(operation);
                counter.inc();
                self.event_counters.insert(operation.to_owned(), counter);
            }
        }
        self.events_seen += 1;
        let seq = self.tracker.push_event(position);
        tracing::trace!(
            seq,
            document_key = %event
                .get("documentKey")
                .map(record::to_text)
                .unwrap_or_default(),
            "event read"
        );
        if operation == "invalidate" {
            // Not data: everything before it is flushed, and the checkpoint may move past it
            // so that a restart with `startAfter` continues on the new collection.
            self.tracker.ack(seq);
            warn!("change stream invalidated");
            self.stop = Some(Err(WatcherError::Invalidated));
            return;
        }
        let partition_key = record::partition_key(&event, &self.spec.partition_key);
        let operation = operation.to_owned();
        let document_key = event.get("documentKey").cloned();
        let data = record::encode_owned(event, self.spec.record_format);
        let size = data.len() + partition_key.len();
        if size > MAX_RECORD_BYTES {
            self.on_oversized(document_key.as_ref(), seq, size, &operation);
            return;
        }
        self.reservations.insert(seq, reservation);
        self.scheduler.push(PendingRecord {
            seq,
            partition_key,
            data,
            attempts: 0,
        });
        if self.linger_deadline.is_none() {
            self.linger_deadline = Some(Instant::now() + self.spec.batch.linger);
        }
    }

    fn can_read(&self) -> bool {
        self.stop.is_none() && self.scheduler.len() < self.spec.batch.max_pending
    }

    /// Shows a change stream that has been silent for [`READER_STALL`] while the loop was
    /// ready to read.
    fn watch_reader(&mut self, can_read: bool) {
        let now = Instant::now();
        if !can_read {
            self.last_read = now;
        } else if self.mongo_trouble.is_none() && now >= self.last_read + READER_STALL {
            warn!(silent_for = ?(now - self.last_read), "the change stream is not answering");
            self.mongo_trouble = Some(format!(
                "mongodb: the change stream on `{}.{}` has not answered for {} s (a healthy \
                 stream answers every 0.5 s); the driver keeps trying",
                self.spec.database,
                self.spec.collection,
                (now - self.last_read).as_secs()
            ));
            self.show_health();
        }
    }

    fn on_reader_msg(&mut self, msg: Option<Result<ReaderMsg, WatcherError>>) {
        self.last_read = Instant::now();
        if self.mongo_trouble.take().is_some() {
            info!("the change stream answers again");
            self.show_health();
        }
        match msg {
            Some(Ok(ReaderMsg::Event(event, reservation, decoded))) => {
                if decoded == Decoded::Utf8Repaired {
                    self.on_repaired(&event);
                }
                self.on_event(event, reservation)
            }
            Some(Ok(ReaderMsg::Undecodable(undecodable))) => self.on_undecodable(*undecodable),
            Some(Ok(ReaderMsg::Idle(token))) => {
                tracing::trace!(
                    token = %token
                        .as_ref()
                        .map(record::to_text)
                        .unwrap_or_default(),
                    "idle"
                );
                self.reader_idle = true;
                if let Some(token) = token {
                    self.tracker.push_idle(token);
                }
                self.publish();
            }
            Some(Err(e)) => {
                warn!(error = %e, "change stream failed; flushing what was read");
                self.stop = Some(Err(e));
            }
            None => {
                if self.stop.is_none() {
                    self.stop = Some(Err(WatcherError::Mongo(mongodb::error::Error::custom(
                        "change stream reader ended",
                    ))));
                }
            }
        }
    }

    fn on_repaired(&self, event: &Document) {
        warn!(
            token = %event.get("_id").map(record::to_text).unwrap_or_default(),
            document_key = %event
                .get("documentKey")
                .map(record::to_text)
                .unwrap_or_default(),
            "change event holds invalid UTF-8; delivered with U+FFFD in place of each invalid sequence"
        );
        self.metrics.repaired("invalid_utf8");
    }

    /// An event that does not decode at all: skipped past exactly (its token is acknowledged
    /// as if delivered) with `on_undeliverable: skip`, else the watcher stops naming it.
    fn on_undecodable(&mut self, u: Undecodable) {
        self.reader_idle = false;
        let token_text = u
            .token
            .as_ref()
            .map(record::to_text)
            .unwrap_or_else(|| "(unreadable)".to_owned());
        match (self.spec.on_undeliverable, u.token) {
            (OnUndeliverable::Skip, Some(token)) => {
                warn!(token = %token_text, document_key = %u.document_key, error = %u.error,
                    "change event cannot be decoded; skipped (on_undeliverable: skip)");
                let seq = self.tracker.push_event(Position {
                    token,
                    cluster_time: None,
                });
                self.tracker.ack(seq);
                self.metrics.skipped("undeliverable");
                self.status.update(|s| s.counters.records_skipped += 1);
            }
            _ => {
                error!(token = %token_text, document_key = %u.document_key, error = %u.error,
                    "change event cannot be decoded; watcher stops");
                self.stop = Some(Err(WatcherError::Undeliverable {
                    token: token_text,
                    document_key: u.document_key,
                    error: u.error,
                }));
            }
        }
    }

    fn on_oversized(
        &mut self,
        document_key: Option<&Bson>,
        seq: u64,
        size: usize,
        operation: &str,
    ) {
        let document_key = document_key
            .map(record::to_text)
            .unwrap_or_else(|| "(none)".into());
        match self.spec.on_oversized {
            OnOversized::Skip => {
                warn!(%document_key, size, operation, "record over 1 MiB skipped (on_oversized: skip)");
                self.tracker.ack(seq);
                self.metrics.skipped("oversized");
                self.status.update(|s| s.counters.records_skipped += 1);
            }
            OnOversized::Fail => {
                error!(%document_key, size, operation, "record over 1 MiB; watcher stops (on_oversized: fail)");
                self.stop = Some(Err(WatcherError::Oversized {
                    document_key,
                    size,
                    limit: MAX_RECORD_BYTES,
                }));
            }
        }
    }

    /// Starts as many calls as the send limit, the stream backoff and the linger allow.
    fn dispatch(&mut self) {
        let now = Instant::now();
        self.scheduler.promote(now);
        if self.halted {
            return;
        }
        let batch_cfg = &self.spec.batch;
        if self.stream_retry_at.is_some_and(|t| now >= t) {
            self.stream_retry_at = None;
        }
        while self.inflight.len() < self.limit.current()
            && self.scheduler.ready_len() > 0
            && self.stream_retry_at.is_none()
        {
            let flush = self
                .scheduler
                .ready_fills_batch(batch_cfg.max_records, batch_cfg.max_bytes)
                || self.reader_idle
                || self.stop.is_some()
                || self.linger_deadline.is_some_and(|d| now >= d);
            if !flush {
                break;
            }
            let batch = self
                .scheduler
                .next_batch(batch_cfg.max_records, batch_cfg.max_bytes);
            if batch.is_empty() {
                break;
            }
            let sink = self.sink.clone();
            self.metrics.batch_records.observe(batch.len() as f64);
            let timer = self.metrics.put_duration.clone();
            self.inflight.push(Box::pin(async move {
                let started = std::time::Instant::now();
                let result = sink.put(&batch).await;
                timer.observe(started.elapsed().as_secs_f64());
                (batch, result)
            }));
        }
        self.linger_deadline = match self.scheduler.ready_len() {
            0 => None,
            _ => Some(self.linger_deadline.unwrap_or(now + batch_cfg.linger)),
        };
    }

    fn on_put_result(
        &mut self,
        batch: Vec<PendingRecord>,
        result: Result<Vec<RecordResult>, CallError>,
    ) {
        let now = Instant::now();
        // One draw per call: the records it failed become ready together.
        let jitter = rand::random::<f64>();
        let mut rejected = 0u64;
        let mut accepted = 0u64;
        let mut last_error = String::new();
        let call_failed = match result {
            Ok(results) => {
                let mut codes: HashMap<String, u64> = HashMap::new();
                for (record, outcome) in batch.into_iter().zip(results) {
                    match outcome {
                        RecordResult::Accepted => {
                            tracing::trace!(seq = record.seq, "acknowledged");
                            accepted += 1;
                            self.scheduler.ack(&record);
                            self.tracker.ack(record.seq);
                            self.reservations.remove(&record.seq);
                        }
                        RecordResult::Rejected {
                            error_code,
                            message,
                        } => {
                            rejected += 1;
                            last_error = format!("{error_code}: {message}");
                            *codes.entry(error_code).or_default() += 1;
                            self.retry(record, &last_error, now, jitter);
                        }
                    }
                }
                for (code, n) in &codes {
                    self.metrics.records_rejected(code, *n);
                    self.metrics.retries(code, *n);
                }
                if !codes.is_empty() {
                    self.status.update(|s| {
                        for (code, n) in codes {
                            *s.flow.rejected.entry(code).or_default() += n;
                        }
                    });
                }
                false
            }
            Err(call_error) => {
                rejected = batch.len() as u64;
                last_error = call_error.to_string();
                self.metrics.call_failed(&call_error.code);
                self.metrics
                    .retries(&format!("call_{}", call_error.code), rejected);
                for record in batch {
                    self.retry(record, &last_error, now, jitter);
                }
                true
            }
        };
        self.metrics.records_put.inc_by(accepted);
        self.status.update(|s| {
            s.counters.records_put += accepted;
            s.counters.put_retries += rejected;
        });
        if accepted > 0 {
            self.failing_calls = 0;
            self.stream_backoff.reset();
            self.stream_retry_at = None;
            self.limit.on_success();
            if self.kinesis_trouble.take().is_some() {
                self.show_health();
            }
        } else if call_failed || rejected > 1 {
            // Nothing got through: a signal about the stream. A lone record rejected on its
            // own is a signal about its key (a hot key or shard) and only delays that record.
            self.failing_calls += 1;
            self.limit.on_stream_failure();
            if self.failing_calls >= STREAM_BACKOFF_AFTER {
                let delay = self.stream_backoff.next_delay();
                self.stream_retry_at = Some(now + delay);
                let attempts = self.stream_backoff.attempts();
                if attempts.is_power_of_two() {
                    warn!(
                        failing_calls = self.failing_calls,
                        send_limit = self.limit.current(),
                        retry_in = ?delay,
                        error = %last_error,
                        "kinesis calls failing; backing off"
                    );
                }
            }
            if self.failing_calls >= BACKING_OFF_AFTER {
                self.kinesis_trouble = Some(format!(
                    "kinesis stream `{}`: nothing acknowledged in the last {} calls: {last_error}",
                    self.sink.stream(),
                    self.failing_calls
                ));
                self.show_health();
            }
        }
        self.publish();
    }

    /// `backing_off` with its reason while Kinesis takes nothing, the change stream is silent
    /// or checkpoints cannot be written (in that order: the first two stop delivery), `running`
    /// again once none holds.
    fn show_health(&self) {
        if self.stop.is_some() {
            return;
        }
        let trouble = self
            .kinesis_trouble
            .as_ref()
            .or(self.mongo_trouble.as_ref())
            .or(self.checkpoint_trouble.as_ref());
        match trouble {
            Some(reason) => self.status.set(State::BackingOff, Some(reason.clone())),
            None => {
                if self.status.get().state == State::BackingOff {
                    self.status.set(State::Running, None);
                }
            }
        }
    }

    /// Publishes progress: events read, the newest acknowledged event time, caught up, and
    /// the flow-control figures.
    fn publish(&mut self) {
        let events = std::mem::take(&mut self.events_seen);
        let event_time = self.tracker.frontier_event_time().map(wall_time);
        let read_time = self.newest_read.map(wall_time);
        let caught_up = self.tracker.outstanding() == 0 && self.reader_idle;
        let limit = self.limit.current();
        let pending_records = self.scheduler.len();
        let pending_bytes = self.scheduler.held_bytes();
        let records_delayed = self.scheduler.delayed_len();
        let calls_in_flight = self.inflight.len();
        self.metrics
            .flow(limit, pending_records, pending_bytes, records_delayed);
        self.status.update(|s| {
            s.counters.events += events;
            if event_time.is_some() {
                s.last_event_time = event_time;
            }
            if read_time.is_some() {
                s.last_read_event_time = read_time;
            }
            s.caught_up = caught_up;
            s.flow.send_limit = limit;
            s.flow.calls_in_flight = calls_in_flight;
            s.flow.pending_records = pending_records;
            s.flow.pending_bytes = pending_bytes;
            s.flow.records_delayed = records_delayed;
        });
    }

    /// Puts a rejected record back at the head of its key, to go again after its own delay.
    fn retry(&mut self, record: PendingRecord, last_error: &str, now: Instant, jitter: f64) {
        let attempts = record.attempts + 1;
        let batch = &self.spec.batch;
        let delay = record_delay(
            attempts,
            batch.retry_initial_backoff,
            batch.record_retry_max_backoff,
            jitter,
        );
        self.scheduler.retry(record, Some(now + delay));
        if let Some(max) = batch.max_put_retries {
            if attempts > max && !self.halted {
                self.halted = true;
                self.stop = Some(Err(WatcherError::PutRetriesExhausted {
                    stream: self.sink.stream().to_owned(),
                    attempts,
                    last_error: last_error.to_owned(),
                }));
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
