//! One life of a watcher: load the checkpoint, open the stream, move events to Kinesis,
//! checkpoint the ack frontier, and stop at a safe point. The supervisor calls [`run`] again
//! after a retryable error; everything a life needs is rebuilt from the checkpoint.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document};
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::Future;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::ack::{AckTracker, Position};
use crate::batch::{PendingRecord, Scheduler};
use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::control::Command;
use crate::error::WatcherError;
use crate::kinesis::{CallError, KinesisSink, RecordResult};
use crate::metrics::{Metrics, WatcherMetrics};
use crate::reader::{self, ReaderMsg, StartPosition};
use crate::record::{self, MAX_RECORD_BYTES};
use crate::retry::Backoff;
use crate::spec::{OnOversized, StartAt, WatcherSpec};
use crate::status::{State, StatusTx};

/// How long a stopping watcher keeps sending what it has read before it gives up (the rest is
/// read again after a restart: nothing past the frontier was checkpointed).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a checkpoint write may take before it is abandoned and tried at the next tick.
const CHECKPOINT_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Read-ahead between the reader task and the pipeline.
const READER_CHANNEL: usize = 1024;

/// The clients one watcher uses; cheap to clone, shared by all watchers.
#[derive(Clone)]
pub struct Deps {
    pub mongo: mongodb::Client,
    pub kinesis: aws_sdk_kinesis::Client,
    pub checkpoints: Option<CheckpointStore>,
    pub metrics: Metrics,
}

/// How a life ended without an error.
#[derive(Debug)]
pub enum Exit {
    /// Shutdown (the cancellation token fired).
    Cancelled,
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
    status.set(State::Starting, None);
    let metrics = deps.metrics.for_watcher(&spec.name);
    let mut cp = CheckpointState::default();
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
            cp.write(store, &spec.name, &tracker, true).await?;
            record_checkpoint(&status, &metrics);
        }
    }

    let (tx, rx) = mpsc::channel(READER_CHANNEL);
    let reader_cancel = cancel.child_token();
    let reader_task = tokio::spawn(reader::run(stream, tx, reader_cancel.clone()));
    status.update(|s| {
        s.state = State::Running;
        s.reason = None;
        s.paused = false;
    });
    info!("watcher running");

    let mut pipeline = Pipeline {
        spec: spec.clone(),
        sink: KinesisSink::new(deps.kinesis.clone(), spec.stream.clone()),
        status,
        tracker,
        scheduler: Scheduler::new(),
        inflight: FuturesUnordered::new(),
        backoff: Backoff::new(
            spec.batch.retry_initial_backoff,
            spec.batch.retry_max_backoff,
        ),
        retry_at: None,
        linger_deadline: None,
        reader_idle: false,
        stop: None,
        fatal: false,
        command: None,
        metrics,
        events_seen: 0,
    };
    let result = pipeline
        .run_loop(rx, &cancel, &deps.checkpoints, &mut cp, commands)
        .await;
    reader_cancel.cancel();
    let _ = reader_task.await;
    if let Some(p) = pipeline.tracker.frontier() {
        carry.position = Some(p.token.clone());
    }
    pipeline.publish();
    // Final checkpoint: whatever is acknowledged, never more.
    if let Some(store) = &deps.checkpoints {
        match cp.write(store, &spec.name, &pipeline.tracker, false).await {
            Ok(true) => record_checkpoint(&pipeline.status, &pipeline.metrics),
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
    result?;
    Ok(match pipeline.command.take() {
        Some(cmd) => Exit::Command(cmd),
        None => Exit::Cancelled,
    })
}

fn record_checkpoint(status: &StatusTx, metrics: &WatcherMetrics) {
    metrics.checkpoint_writes.inc();
    status.update(|s| {
        s.last_checkpoint_at = Some(bson::DateTime::now());
        s.counters.checkpoint_writes += 1;
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

#[derive(Debug, Default)]
struct CheckpointState {
    revision: Option<u64>,
    paused: bool,
    written_paused: bool,
    last_written: Option<Position>,
    /// A start position known only by time (no token yet).
    initial_time: Option<bson::Timestamp>,
}

impl CheckpointState {
    /// Writes the frontier if it moved, or the paused flag changed (or `force`); keeps the
    /// revision for the next write. Returns whether it wrote.
    async fn write(
        &mut self,
        store: &CheckpointStore,
        watcher: &str,
        tracker: &AckTracker,
        force: bool,
    ) -> Result<bool, WatcherError> {
        let frontier = tracker.frontier();
        if !force && frontier == self.last_written.as_ref() && self.paused == self.written_paused {
            return Ok(false);
        }
        let checkpoint = match frontier {
            Some(p) => Checkpoint {
                token: Some(p.token.clone()),
                cluster_time: p.cluster_time.or(tracker.frontier_event_time()),
                paused: self.paused,
            },
            None => match self.initial_time {
                Some(ts) => Checkpoint {
                    token: None,
                    cluster_time: Some(ts),
                    paused: self.paused,
                },
                // Nothing known yet; there is nothing to protect.
                None => return Ok(false),
            },
        };
        let write = store.save(watcher, self.revision, &checkpoint);
        let revision = match tokio::time::timeout(CHECKPOINT_WRITE_TIMEOUT, write).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(WatcherError::Checkpoint {
                    table: store.table().to_owned(),
                    operation: "PutItem",
                    message: format!("no answer within {CHECKPOINT_WRITE_TIMEOUT:?}"),
                })
            }
        };
        debug!(
            revision,
            token = %checkpoint
                .token
                .as_ref()
                .map(|t| t.clone().into_relaxed_extjson().to_string())
                .unwrap_or_default(),
            "checkpoint written"
        );
        self.revision = Some(revision);
        self.last_written = frontier.cloned();
        self.written_paused = checkpoint.paused;
        Ok(true)
    }
}

type PutFuture = Pin<
    Box<dyn Future<Output = (Vec<PendingRecord>, Result<Vec<RecordResult>, CallError>)> + Send>,
>;

struct Pipeline {
    spec: Arc<WatcherSpec>,
    sink: KinesisSink,
    status: StatusTx,
    tracker: AckTracker,
    scheduler: Scheduler,
    inflight: FuturesUnordered<PutFuture>,
    backoff: Backoff,
    /// No call is sent before this instant after a failure.
    retry_at: Option<Instant>,
    /// When the oldest ready record stops waiting for company.
    linger_deadline: Option<Instant>,
    /// The last read came back empty: send what is ready without lingering.
    reader_idle: bool,
    /// Set once the watcher is stopping: `Ok` for a requested stop, `Err` for a failure.
    stop: Option<Result<(), WatcherError>>,
    /// Stop sending (retries are exhausted); only wait for calls in flight.
    fatal: bool,
    /// The operator command that stopped this life, answered by the supervisor.
    command: Option<Command>,
    metrics: WatcherMetrics,
    /// Events read since the last status publication.
    events_seen: u64,
}

impl Pipeline {
    async fn run_loop(
        &mut self,
        mut rx: mpsc::Receiver<Result<ReaderMsg, WatcherError>>,
        cancel: &CancellationToken,
        store: &Option<CheckpointStore>,
        cp: &mut CheckpointState,
        commands: &mut mpsc::Receiver<Command>,
    ) -> Result<(), WatcherError> {
        let every = self.spec.checkpoint_interval;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut drain_deadline: Option<Instant> = None;
        let mut checkpoint_failures: u32 = 0;
        loop {
            self.dispatch();
            if self.stop.is_some() {
                let deadline =
                    *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
                let drained = self.scheduler.is_empty() || self.fatal;
                if self.inflight.is_empty() && (drained || Instant::now() >= deadline) {
                    if !drained {
                        warn!(
                            unsent = self.scheduler.len(),
                            "drain deadline passed; unsent records will be read again after restart"
                        );
                    }
                    break;
                }
            }
            let can_read =
                self.stop.is_none() && self.scheduler.len() < self.spec.batch.max_pending;
            let wake = self.next_wake();
            tokio::select! {
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
                msg = rx.recv(), if can_read => match msg {
                    Some(Ok(ReaderMsg::Event(event))) => self.on_event(event),
                    Some(Ok(ReaderMsg::Idle(token))) => {
                        tracing::trace!(
                            token = %token
                                .as_ref()
                                .map(|t| t.clone().into_relaxed_extjson().to_string())
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
                            self.stop = Some(Err(WatcherError::Mongo(
                                mongodb::error::Error::custom("change stream reader ended"),
                            )));
                        }
                    }
                },
                _ = sleep_until_opt(wake), if wake.is_some() => {}
                _ = sleep_until_opt(drain_deadline), if drain_deadline.is_some() => {}
                _ = tick.tick() => {
                    self.publish();
                    if let Some(store) = store {
                        match cp.write(store, &self.spec.name, &self.tracker, false).await {
                            Ok(wrote) => {
                                checkpoint_failures = 0;
                                if wrote {
                                    record_checkpoint(&self.status, &self.metrics);
                                }
                            }
                            Err(e @ WatcherError::CheckpointConflict { .. }) => {
                                self.fatal = true;
                                self.stop = Some(Err(e));
                            }
                            Err(e) => {
                                checkpoint_failures += 1;
                                if checkpoint_failures.is_power_of_two() {
                                    warn!(error = %e, failures = checkpoint_failures, "checkpoint write failed; will retry");
                                }
                            }
                        }
                    }
                }
            }
        }
        self.stop.take().unwrap_or(Ok(()))
    }

    fn next_wake(&self) -> Option<Instant> {
        if self.scheduler.ready_len() == 0 || self.fatal {
            return None;
        }
        match (self.retry_at, self.linger_deadline) {
            (Some(r), Some(l)) => Some(r.max(l)),
            (Some(r), None) => Some(r),
            (None, l) => l,
        }
    }

    fn on_event(&mut self, event: Document) {
        self.reader_idle = false;
        let Some(token) = event.get("_id").cloned() else {
            self.fatal = true;
            self.stop = Some(Err(WatcherError::MissingResumeToken));
            return;
        };
        let position = Position {
            token,
            cluster_time: event.get_timestamp("clusterTime").ok(),
        };
        let operation = event
            .get_str("operationType")
            .unwrap_or("unknown")
            .to_owned();
        self.metrics.event(&operation);
        self.events_seen += 1;
        let seq = self.tracker.push_event(position);
        tracing::trace!(
            seq,
            document_key = %event
                .get("documentKey")
                .map(|k| k.clone().into_relaxed_extjson().to_string())
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
        let data = record::encode(&event, self.spec.record_format);
        let size = data.len() + partition_key.len();
        if size > MAX_RECORD_BYTES {
            let document_key = event
                .get("documentKey")
                .map(|k| k.clone().into_relaxed_extjson().to_string())
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
            return;
        }
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

    /// Starts as many calls as the limits, the backoff and the linger allow.
    fn dispatch(&mut self) {
        if self.fatal {
            return;
        }
        let batch_cfg = &self.spec.batch;
        let now = Instant::now();
        while self.inflight.len() < batch_cfg.max_in_flight && self.scheduler.ready_len() > 0 {
            if self.retry_at.is_some_and(|t| now < t) {
                break;
            }
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
        let mut failures = 0usize;
        let mut accepted = 0u64;
        let mut last_error = String::new();
        match result {
            Ok(results) => {
                let mut codes: std::collections::HashMap<String, u64> = Default::default();
                for (record, outcome) in batch.into_iter().zip(results) {
                    match outcome {
                        RecordResult::Accepted => {
                            tracing::trace!(seq = record.seq, "acknowledged");
                            accepted += 1;
                            self.scheduler.ack(&record);
                            self.tracker.ack(record.seq);
                        }
                        RecordResult::Rejected {
                            error_code,
                            message,
                        } => {
                            failures += 1;
                            last_error = format!("{error_code}: {message}");
                            *codes.entry(error_code).or_default() += 1;
                            self.retry(record, &last_error);
                        }
                    }
                }
                for (code, n) in codes {
                    self.metrics.failures(&code, n);
                    self.metrics.retries(&code, n);
                }
            }
            Err(call_error) => {
                failures = batch.len();
                last_error = call_error.to_string();
                self.metrics.failures(&call_error.code, 1);
                self.metrics
                    .retries(&format!("call_{}", call_error.code), batch.len() as u64);
                for record in batch {
                    self.retry(record, &last_error);
                }
            }
        }
        self.metrics.records_put.inc_by(accepted);
        self.status.update(|s| {
            s.counters.records_put += accepted;
            s.counters.put_retries += failures as u64;
        });
        self.publish();
        if failures == 0 {
            self.backoff.reset();
            self.retry_at = None;
            if self.stop.is_none() && self.status.get().state == State::BackingOff {
                self.status.set(State::Running, None);
            }
            return;
        }
        let delay = self.backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        let attempts = self.backoff.attempts();
        if attempts.is_power_of_two() {
            warn!(failures, attempts, retry_in = ?delay, error = %last_error, "kinesis put failed; retrying");
        }
        if self.stop.is_none() && attempts >= 3 {
            self.status.set(
                State::BackingOff,
                Some(format!(
                    "kinesis stream `{}`: {last_error}",
                    self.sink.stream()
                )),
            );
        }
    }

    /// Publishes progress: events read, the newest acknowledged event time, caught up.
    fn publish(&mut self) {
        let events = std::mem::take(&mut self.events_seen);
        let event_time = self
            .tracker
            .frontier_event_time()
            .map(|ts| bson::DateTime::from_millis(i64::from(ts.time) * 1000));
        let caught_up = self.tracker.outstanding() == 0 && self.reader_idle;
        self.status.update(|s| {
            s.counters.events += events;
            if event_time.is_some() {
                s.last_event_time = event_time;
            }
            s.caught_up = caught_up;
        });
    }

    fn retry(&mut self, record: PendingRecord, last_error: &str) {
        let attempts = record.attempts + 1;
        self.scheduler.retry(record);
        if let Some(max) = self.spec.batch.max_put_retries {
            if attempts > max && !self.fatal {
                self.fatal = true;
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
