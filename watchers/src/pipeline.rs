//! One life of a watcher: load the checkpoint, open the stream, move events to Kinesis,
//! checkpoint the ack frontier, and stop at a safe point. The supervisor calls [`run`] again
//! after a retryable error; everything a life needs is rebuilt from the checkpoint.

// foldhash (hashbrown's default) rather than SipHash: the reservations, the per-operation
// counters and a copy's seqs are looked up for every event.
use hashbrown::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, Document, RawDocumentBuf};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::Future;
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::ack::{AckTracker, Position};
use crate::batch::{PendingRecord, Scheduler};
use crate::checkpoint::{
    self, Checkpoint, CheckpointBackend, CheckpointStore, Checkpointer, InDoubtWrites,
    SnapshotProgress, Stored,
};
use crate::claim_check::{ClaimCheck, EventHead, PutError, Upload};
use crate::control::Command;
use crate::error::{
    aws_refusal, is_foreign_resume_token, summary, AwsResource, MongoLogin, Retry, TokenOrigin,
    WatcherError,
};
use crate::flow::{
    record_delay, ByteBudget, Reservation, SendLimit, ShardPacer, THROTTLED_RECORD_INITIAL,
    THROTTLED_RECORD_MAX,
};
use crate::kinesis::{self, CallError, KinesisSink, RecordResult, RecordSink};
use crate::metrics::{Metrics, WatcherMetrics};
use crate::reader::{self, Decoded, ReaderMsg, StartPosition, Undecodable};
use crate::record::{self, EventRecord};
use crate::retry::Backoff;
use crate::snapshot;
use crate::spec::{Aggregation, OnOversized, OnUndeliverable, Snapshot, StartAt, WatcherSpec};
use crate::status::{wall_time, SnapshotStatus, State, StatusTx, StoredPosition};
use crate::stream_limits::{StreamLimits, StreamLimitsCache};

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
    /// Who `mongo` logs in as, for messages.
    pub mongo_login: MongoLogin,
    pub kinesis: aws_sdk_kinesis::Client,
    pub checkpoints: Option<CheckpointStore>,
    pub metrics: Metrics,
    /// Bytes read and not yet acknowledged, shared by every watcher of the process.
    pub memory: Arc<ByteBudget>,
    /// Each stream's record and call size, read once per stream per process.
    pub stream_limits: StreamLimitsCache,
    /// For `on_oversized: s3`; `None` when no watcher claim-checks.
    pub s3: Option<aws_sdk_s3::Client>,
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
    /// With leases: the lease the next life holds, set by the supervisor before each life.
    /// Every checkpoint write of the life is fenced by it, and the life's first act is a
    /// fencing write of the stored checkpoint, so a replica that held the lease before can
    /// no longer write.
    pub fence: Option<crate::lease::Fence>,
    /// Without a checkpoint table: the last life's unfinished copy, continued by the next.
    pub snapshot: Option<Arc<SnapshotProgress>>,
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
    let login = deps.mongo_login.clone();
    // A failed login can surface wherever the driver opens a connection (the stream's open,
    // a getMore after a reconnect): named once, here, for every way a life ends.
    life(spec, deps, status, cancel, carry, commands)
        .await
        .map_err(|e| e.with_login(&login))
}

async fn life(
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
    cp.namespace = Some(checkpoint::namespace(&spec));
    let stored = match &deps.checkpoints {
        Some(store) => {
            store.verify_table().await?;
            store.load(&spec.name).await?
        }
        None => None,
    };
    cp.fence = carry.fence.clone();
    if let (Some(store), Some(s), Some(fence)) = (&deps.checkpoints, &stored, &carry.fence) {
        // The stored checkpoint, written again under this lease: from here on no earlier
        // owner's write can land. It fails like any conditional write when an earlier owner
        // wrote since the load; the next life loads that and tries again.
        let snapshot = s.snapshot.as_ref();
        let revision = store
            .save_snapshot(
                &spec.name,
                Some(s.revision),
                &s.checkpoint,
                snapshot,
                Some(fence),
            )
            .await?;
        info!(
            epoch = fence.epoch,
            revision, "checkpoint fenced under this replica's lease"
        );
        cp.based_on(revision);
    }
    if let Some(s) = &stored {
        if cp.revision.is_none() {
            cp.based_on(s.revision);
        }
        cp.paused = s.checkpoint.paused;
        // Shown (and measured against the oplog) from the start, not only after this
        // process's first write: a watcher that comes back paused or parked writes none.
        let position = shown_position(&s.checkpoint);
        status.update(|st| st.checkpoint = Some(position));
    }
    let start_override = carry.start_override.take();
    if start_override.is_none() && stored.as_ref().is_some_and(|s| s.checkpoint.paused) {
        return Ok(Exit::StoredPaused);
    }
    cp.paused = false;
    let table = deps
        .checkpoints
        .as_ref()
        .map(|s| s.table())
        .unwrap_or_default();
    let Start {
        position: start,
        origin,
    } = resolve_start(
        &spec,
        table,
        stored.as_ref(),
        carry.position.as_ref(),
        start_override.clone(),
    )?;
    let first_start = stored.is_none() || start_override.is_some();
    // A copy to run beside the stream: the rest of one the checkpoint (or, without a table,
    // the last life) says is unfinished, whatever the start; else, with `snapshot: initial`,
    // a new one on the watcher's very first start.
    let carried_copy = carry.snapshot.take();
    let resumed_copy = match &deps.checkpoints {
        Some(_) => stored.as_ref().and_then(|s| s.snapshot.clone()),
        None => carried_copy.map(|p| (*p).clone()),
    };
    let new_copy = resumed_copy.is_none()
        && spec.snapshot == Snapshot::Initial
        && stored.is_none()
        && start_override.is_none()
        && carry.position.is_none();
    let limits = deps.stream_limits.get(&deps.kinesis, &spec.stream).await;
    info!(start = %start_label(&start), from_checkpoint = !first_start, "opening change stream");
    let stream = match reader::open(&deps.mongo, &spec, &start).await {
        Ok(stream) => stream,
        Err(e) => {
            carry.start_override = start_override;
            return Err(foreign_token(e, &spec, origin));
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
        if new_copy && initial.is_none() {
            // Refused before anything is stored, so the next life does not take the stored
            // start for a finished copy. The config refuses `start_at` times with it already.
            return Err(WatcherError::Mongo(mongodb::error::Error::custom(
                "snapshot: initial needs the change stream's start as a resume token, and the \
                 server sent none when the stream opened",
            )));
        }
        match (initial, &start) {
            (Some(token), _) => tracker.push_idle(token, None),
            (None, StartPosition::At(ts)) => cp.initial_time = Some(*ts),
            (None, _) => cp.initial_time = operation_time(&deps.mongo).await,
        }
    }
    let copy_progress = match (resumed_copy, new_copy) {
        (Some(progress), _) => Some(progress),
        (None, true) => Some(SnapshotProgress {
            cluster_time: operation_time(&deps.mongo).await,
            ..SnapshotProgress::default()
        }),
        (None, false) => None,
    };
    let copy_progress = match copy_progress {
        Some(mut progress) => {
            if progress.ranges.is_empty() {
                progress.ranges = snapshot::plan(
                    &deps.mongo,
                    &spec,
                    progress.filter.as_ref(),
                    spec.snapshot_parallelism,
                )
                .await;
            }
            let progress = Arc::new(progress);
            // The stored (or just recorded) position, now with the copy's progress: what
            // the first write stores before anything is read.
            if let Some(newest) = tracker.newest().cloned() {
                tracker.push_marker(Position {
                    snapshot: Some(progress.clone()),
                    ..newest
                });
            } else if let Some(token) = stored.as_ref().and_then(|s| s.checkpoint.token.clone()) {
                tracker.push_marker(Position {
                    token: token.into(),
                    cluster_time: stored.as_ref().and_then(|s| s.checkpoint.cluster_time),
                    snapshot: Some(progress.clone()),
                });
            }
            Some(progress)
        }
        None => None,
    };
    if let (Some(store), true) = (&deps.checkpoints, first_start || copy_progress.is_some()) {
        // Resolve the start once and store it (with a copy's plan) before reading anything,
        // so that a crash before the first acknowledged batch restarts here rather than at a
        // later `latest`.
        if let Err(e) = cp.write(store, &spec.name, &tracker, true).await {
            carry.in_doubt = cp.take_in_doubt();
            return Err(e);
        }
        record_checkpoint(&status, &metrics, &cp);
    }

    let (tx, rx) = mpsc::channel(READER_CHANNEL);
    let reader_cancel = cancel.child_token();
    let budgets = [
        ByteBudget::new(spec.batch.max_pending_bytes),
        deps.memory.clone(),
    ];
    // In the watcher's span, so that what the reader logs names the watcher.
    let reader_task = tokio::spawn(tracing::Instrument::in_current_span(reader::run(
        stream,
        tx,
        budgets.clone(),
        metrics.events_reassembled(),
        reader_cancel.clone(),
    )));
    status.update(|s| {
        s.state = State::Running;
        s.reason = None;
        s.paused = false;
    });
    info!("watcher running");

    let sink = KinesisSink::new(deps.kinesis.clone(), spec.stream.clone());
    let mut pipeline = Pipeline::new(spec.clone(), sink, status, tracker, metrics, limits);
    let [watcher_budget, process_budget] = budgets;
    pipeline.copier = Some(Copier {
        mongo: deps.mongo.clone(),
        budgets: snapshot::CopyBudgets {
            copy: ByteBudget::new((spec.batch.max_pending_bytes / 2).max(1)),
            watcher: watcher_budget,
            process: process_budget,
        },
        cancel: reader_cancel.clone(),
    });
    if let Some(progress) = copy_progress {
        pipeline.begin_copy(progress, !new_copy);
    }
    pipeline.claim_check = deps
        .s3
        .clone()
        .zip(spec.s3.as_ref())
        .map(|(client, target)| ClaimCheck::new(client, target, &spec.name));
    let result = pipeline
        .run_loop(rx, &cancel, deps.checkpoints.as_ref(), &mut cp, commands)
        .await;
    reader_cancel.cancel();
    let _ = reader_task.await;
    if let Some(p) = pipeline.tracker.frontier() {
        carry.position = Some(p.token.to_bson());
        carry.snapshot = p.snapshot.clone();
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

/// Where a life opens its stream.
#[derive(Debug, Clone, PartialEq)]
struct Start {
    position: StartPosition,
    /// Where the token of an `After` start came from, when it was not proven to belong to this
    /// collection (a rewind's target was probed; this life's own frontier is this collection's).
    origin: Option<TokenOrigin>,
}

/// The start of a life: an operator's override, else the stored checkpoint, else the last
/// life's frontier (no checkpoint table), else `start_at`. A checkpoint written for another
/// namespace is refused here, before any stream is opened: resuming from it cannot succeed
/// (or, from a time, would silently skip), and retrying cannot help.
fn resolve_start(
    spec: &WatcherSpec,
    table: &str,
    stored: Option<&Stored>,
    carried: Option<&Bson>,
    start_override: Option<StartPosition>,
) -> Result<Start, WatcherError> {
    let start = |position, origin| Start { position, origin };
    if let Some(position) = start_override {
        return Ok(start(position, None));
    }
    if let Some(s) = stored {
        let origin = TokenOrigin::Checkpoint {
            table: table.to_owned(),
        };
        let watching = checkpoint::namespace(spec);
        if let Some(written_for) = s.checkpoint.namespace.as_ref().filter(|n| **n != watching) {
            return Err(WatcherError::NamespaceMismatch {
                watcher: spec.name.clone(),
                origin,
                written_for: Some(written_for.clone()),
                watching,
                server: None,
            });
        }
        return Ok(match (&s.checkpoint.token, s.checkpoint.cluster_time) {
            (Some(token), _) => start(StartPosition::After(token.clone()), Some(origin)),
            (None, Some(ts)) => start(StartPosition::At(ts), None),
            (None, None) => start(StartPosition::Latest, None),
        });
    }
    if let Some(token) = carried {
        return Ok(start(StartPosition::After(token.clone()), None));
    }
    Ok(match &spec.start_at {
        StartAt::Latest => start(StartPosition::Latest, None),
        StartAt::Timestamp(dt) => start(StartPosition::At(reader::cluster_time_at(*dt)), None),
        StartAt::ResumeToken(t) => {
            start(StartPosition::After(t.clone()), Some(TokenOrigin::StartAt))
        }
    })
}

/// The server refusing a stored or configured token as another collection's is a namespace
/// mismatch (for checkpoints written before the namespace was stored with them): not retried,
/// since every retry would meet the same refusal.
fn foreign_token(
    error: WatcherError,
    spec: &WatcherSpec,
    origin: Option<TokenOrigin>,
) -> WatcherError {
    match (error, origin) {
        (WatcherError::Mongo(e), Some(origin)) if is_foreign_resume_token(&e) => {
            WatcherError::NamespaceMismatch {
                watcher: spec.name.clone(),
                origin,
                written_for: None,
                watching: checkpoint::namespace(spec),
                server: Some(summary(&e)),
            }
        }
        (error, _) => error,
    }
}

/// A checkpoint as `GET /watchers/{name}` shows it (and the headroom measures it).
fn shown_position(checkpoint: &Checkpoint) -> StoredPosition {
    StoredPosition {
        token: checkpoint.token.as_ref().map(record::to_text),
        cluster_time: checkpoint.cluster_time.map(wall_time),
    }
}

fn record_checkpoint(status: &StatusTx, metrics: &WatcherMetrics, cp: &Checkpointer) {
    metrics.checkpoint_writes.inc();
    let stored = cp.stored().map(shown_position);
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
        Command::Pause(r)
        | Command::Resume(r)
        | Command::Rewind(_, r)
        | Command::Snapshot(_, r) => r,
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
/// shows `backing_off`. A healthy stream answers at least every `reader::MAX_AWAIT` (2 s),
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
    /// Throttled shards' turns for their rejected records.
    pacer: ShardPacer,
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
    /// Why S3 takes no claim-checked event, while it does not.
    s3_trouble: Option<String>,
    /// Where `on_oversized: s3` writes events (set by [`life`] when the watcher has it).
    claim_check: Option<ClaimCheck>,
    /// The claim-check upload in flight; while there is one, nothing more is read.
    upload: Option<Upload>,
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
    /// The stream's record limit (data plus partition key); a larger record is oversized.
    record_bytes: usize,
    /// Bytes per call: `max_batch_bytes` within the stream's call limit, else that limit.
    batch_bytes: usize,
    /// Starts copies' readers; `None` in unit tests, which feed a copy's channel themselves.
    copier: Option<Copier>,
    /// The copy running beside the stream (an initial snapshot or an on-demand backfill).
    copy: Option<Copy>,
    /// Change stream messages taken in a row while a copy had documents waiting.
    stream_streak: usize,
}

/// What starting a copy's readers takes (see [`snapshot::start`]).
pub(crate) struct Copier {
    mongo: mongodb::Client,
    budgets: snapshot::CopyBudgets,
    /// The life's readers' token: a copy's readers stop with the change stream's.
    cancel: CancellationToken,
}

/// A copy running beside the stream.
pub(crate) struct Copy {
    /// Per range, the last `_id` read: entered with every position read while it runs.
    progress: Arc<SnapshotProgress>,
    rx: mpsc::Receiver<snapshot::CopyMsg>,
    /// Copied documents read and not yet acknowledged (to count them when they are).
    seqs: HashSet<u64>,
    /// The readers' channel is closed (all of them ended): nothing more to receive.
    closed: bool,
    /// Stops this copy's readers (when the copy ends, or the life).
    cancel: CancellationToken,
}

/// A copy's readers hold at most this share of `max_pending` records in the pipeline; the
/// change stream keeps the rest (and half the bytes: [`snapshot::CopyBudgets`]).
const COPY_SHARE_DIVISOR: usize = 2;
/// While a copy has documents waiting, one is taken after this many change stream messages
/// in a row, so that a busy stream slows a copy without stopping it.
const COPY_EVERY: usize = 8;

impl<S: RecordSink> Pipeline<S> {
    pub(crate) fn new(
        spec: Arc<WatcherSpec>,
        sink: S,
        status: StatusTx,
        tracker: AckTracker,
        metrics: WatcherMetrics,
        stream: StreamLimits,
    ) -> Self {
        let batch = &spec.batch;
        Self {
            record_bytes: stream.record_bytes,
            batch_bytes: batch
                .max_bytes
                .map_or(stream.request_bytes, |b| b.min(stream.request_bytes)),
            limit: SendLimit::new(batch.max_in_flight),
            pacer: ShardPacer::default(),
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
            s3_trouble: None,
            claim_check: None,
            upload: None,
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
            copier: None,
            copy: None,
            stream_streak: 0,
        }
    }

    /// Starts a copy beside the stream from `progress` (ranges planned), and shows it.
    /// `resumed`: the rest of a copy an earlier life began.
    fn begin_copy(&mut self, progress: Arc<SnapshotProgress>, resumed: bool) {
        let Some(copier) = &self.copier else {
            return;
        };
        let cancel = copier.cancel.child_token();
        let rx = snapshot::start(
            &copier.mongo,
            &self.spec,
            &progress,
            copier.budgets.clone(),
            &cancel,
        );
        info!(
            resumed,
            ranges = progress.ranges.len(),
            filter = %progress.filter.as_ref().map(|f| Bson::Document(f.clone()).into_relaxed_extjson().to_string()).unwrap_or_default(),
            "snapshot: copying beside the change stream"
        );
        self.status.update(|s| {
            s.snapshot = Some(SnapshotStatus {
                done: false,
                copied: 0,
                copied_before: 0,
                estimated_total: None,
                started_at: bson::DateTime::now(),
                finished_at: None,
                ranges: progress.ranges.len(),
                filter: progress.filter.clone(),
            })
        });
        // Counting can take a while on a big collection: shown when known.
        let (mongo, spec, status, counted) = (
            copier.mongo.clone(),
            self.spec.clone(),
            self.status.clone(),
            progress.clone(),
        );
        tokio::spawn(tracing::Instrument::in_current_span(async move {
            let (before, total) = snapshot::starting_counts(&mongo, &spec, &counted).await;
            status.update(|s| {
                if let Some(snap) = s.snapshot.as_mut() {
                    snap.copied += before;
                    snap.copied_before = before;
                    snap.estimated_total = total;
                }
            });
        }));
        self.attach_copy(progress, rx, cancel);
    }

    /// Makes `rx` the running copy's channel (unit tests feed one directly).
    pub(crate) fn attach_copy(
        &mut self,
        progress: Arc<SnapshotProgress>,
        rx: mpsc::Receiver<snapshot::CopyMsg>,
        cancel: CancellationToken,
    ) {
        self.copy = Some(Copy {
            progress,
            rx,
            seqs: HashSet::new(),
            closed: false,
            cancel,
        });
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
        // The checkpoint write in flight: it runs beside the loop (a slow DynamoDB answer,
        // up to the write timeout and a read-back, must not hold back reading and sending),
        // owning the checkpointer until it returns; one at a time, so revisions stay in order.
        let mut writing: Option<BoxFuture<'_, (Checkpointer, Result<bool, WatcherError>)>> = None;
        // A pause asked for while a write holds the checkpointer, applied when it returns.
        let mut pause_after_write = false;
        loop {
            self.turns.fetch_add(1, Ordering::Relaxed);
            if self.stop.is_some() {
                let deadline =
                    *drain_deadline.get_or_insert_with(|| Instant::now() + DRAIN_TIMEOUT);
                if !self.halted
                    && Instant::now() >= deadline
                    && (!self.scheduler.is_empty() || self.upload.is_some())
                {
                    // Nothing new starts; calls in flight still count when they return.
                    self.halted = true;
                }
            }
            self.dispatch();
            if self.stop.is_some() {
                // An upload in flight finishes within the drain deadline, its pointer sent.
                let drained = (self.scheduler.is_empty() && self.upload.is_none()) || self.halted;
                if self.inflight.is_empty() && drained {
                    if let Some(upload) = self.upload.take() {
                        self.unsent += 1;
                        warn!(document_key = %upload.document_key, key = %upload.claim.key,
                            "claim-check upload unfinished; the event will be read again after restart");
                    }
                    if !self.scheduler.is_empty() {
                        self.unsent += self.scheduler.len();
                        warn!(
                            unsent = self.unsent,
                            "drain deadline passed; unsent records will be read again after restart"
                        );
                    }
                    break;
                }
            }
            let can_read = self.can_read();
            let can_copy = self.can_copy();
            // Messages waiting in the channel: the stream answered, the loop was busy.
            self.watch_reader(can_read && rx.is_empty());
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
                    Command::Snapshot(request, reply) => {
                        let _ = reply.send(self.on_snapshot_request(request).await);
                    }
                    cmd => {
                        if matches!(cmd, Command::Pause(_)) {
                            info!("pausing: flushing records in flight");
                            if writing.is_some() {
                                pause_after_write = true;
                            } else {
                                cp.paused = true;
                            }
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
                result = upload_done(&mut self.upload), if self.upload.is_some() => {
                    self.on_upload(result);
                }
                _ = sleep_until_opt(wake), if wake.is_some() => {}
                _ = sleep_until_opt(drain_wake), if drain_wake.is_some() => {}
                _ = tick.tick() => {
                    self.publish();
                    if let (Some(store), None) = (store, writing.as_ref()) {
                        if let Some(due) = cp.due_on_tick(&self.tracker) {
                            let mut owned = std::mem::take(cp);
                            let name = self.spec.name.clone();
                            writing = Some(Box::pin(async move {
                                let result = owned.write_due(store, &name, due).await;
                                (owned, result)
                            }));
                        }
                    }
                }
                (owned, result) = async {
                    match writing.as_mut() {
                        Some(write) => write.await,
                        None => std::future::pending().await,
                    }
                }, if writing.is_some() => {
                    writing = None;
                    *cp = owned;
                    if std::mem::take(&mut pause_after_write) {
                        cp.paused = true;
                    }
                    self.on_checkpoint_written(result, cp, &mut checkpoint_failures);
                }
                // A copy reads what the stream leaves: when the stream has nothing waiting, or
                // after a run of its messages (see `COPY_EVERY`).
                msg = copy_recv(&mut self.copy),
                    if can_copy && (rx.is_empty() || self.stream_streak >= COPY_EVERY) =>
                {
                    self.stream_streak = 0;
                    self.on_copy_msg(msg);
                    for _ in 1..READ_BURST {
                        if !self.can_copy() || !rx.is_empty() {
                            break;
                        }
                        match self.copy.as_mut().map(|c| c.rx.try_recv()) {
                            Some(Ok(msg)) => self.on_copy_msg(Some(msg)),
                            Some(Err(mpsc::error::TryRecvError::Disconnected)) => {
                                self.on_copy_msg(None);
                                break;
                            }
                            _ => break,
                        }
                    }
                }
                msg = rx.recv(), if can_read => {
                    if self.copy.is_some() {
                        self.stream_streak += 1;
                    }
                    self.on_reader_msg(msg);
                    // Take what else the reader has ready in the same turn: one turn of the
                    // select (a timer and a cancellation waiter registered, then dropped) per
                    // burst instead of per event.
                    for _ in 1..READ_BURST {
                        // `can_read` also holds the reader back behind a claim-check upload.
                        if !self.can_read() {
                            break;
                        }
                        if self.copy.is_some() {
                            // A copy waits for its turn: see `COPY_EVERY`.
                            if self.stream_streak >= COPY_EVERY {
                                break;
                            }
                            self.stream_streak += 1;
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
        if let Some(write) = writing.take() {
            let (owned, result) = write.await;
            *cp = owned;
            if pause_after_write {
                cp.paused = true;
            }
            self.on_checkpoint_written(result, cp, &mut checkpoint_failures);
        }
        self.stop.take().unwrap_or(Ok(()))
    }

    /// Takes the answer of a checkpoint write made by the loop's tick.
    fn on_checkpoint_written(
        &mut self,
        result: Result<bool, WatcherError>,
        cp: &Checkpointer,
        checkpoint_failures: &mut u32,
    ) {
        match result {
            Ok(wrote) => {
                *checkpoint_failures = 0;
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
                if !matches!(self.stop, Some(Err(_))) {
                    self.stop = Some(Err(e));
                }
            }
            Err(e) => {
                *checkpoint_failures += 1;
                if checkpoint_failures.is_power_of_two() {
                    warn!(error = %e, failures = *checkpoint_failures, "checkpoint write failed; will retry");
                }
                // A failure that waits for a fix from outside (a permission, the table) is
                // shown at once; others once they persist.
                if *checkpoint_failures >= CHECKPOINT_FAILURES_SHOWN
                    || e.retry() == Retry::UntilFixed
                {
                    // Delivery goes on, but the stored position is frozen: a restart would
                    // replay everything since it.
                    self.checkpoint_trouble = Some(format!(
                        "checkpoints cannot be written ({checkpoint_failures} failed in a row; \
                         events are still delivered, a restart would replay them since the \
                         last stored checkpoint): {e}"
                    ));
                    self.show_health();
                }
            }
        }
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

    /// Enters an event read (`copied`: a copy's document) and queues its record.
    fn on_event(&mut self, raw: RawDocumentBuf, reservation: Reservation, copied: bool) {
        self.reader_idle = false;
        let (key, format) = (&self.spec.partition_key, self.spec.record_format);
        let event = match EventRecord::from_raw(&raw, key, format) {
            Ok(event) => event,
            // Malformed or not UTF-8 somewhere: decode leniently, or hand it to the policy.
            Err(_) => match reader::decode(&raw) {
                Ok((document, decoded)) => {
                    if decoded == Decoded::Utf8Repaired {
                        self.on_repaired(&document);
                    }
                    EventRecord::from_document(document, key, format)
                }
                Err(undecodable) => return self.on_undecodable(*undecodable),
            },
        };
        let Some(token) = event.token else {
            self.halted = true;
            self.stop = Some(Err(WatcherError::MissingResumeToken));
            return;
        };
        let snapshot = self.copy.as_ref().map(|c| c.progress.clone());
        let position = match (copied, self.tracker.newest()) {
            // A copied document: the newest stream position read, and the copy's progress.
            (true, Some(newest)) => Position {
                token: newest.token.clone(),
                cluster_time: newest.cluster_time,
                snapshot,
            },
            (true, None) => {
                // `can_copy` waits for a position; never reached.
                self.halted = true;
                self.stop = Some(Err(WatcherError::MissingResumeToken));
                return;
            }
            (false, _) => Position {
                token,
                cluster_time: event.cluster_time,
                snapshot,
            },
        };
        if position.cluster_time.is_some() {
            self.newest_read = position.cluster_time;
        }
        let operation = event.operation;
        match self.event_counters.get(&operation) {
            Some(counter) => counter.inc(),
            None => {
                let counter = self.metrics.events(&operation);
                counter.inc();
                self.event_counters.insert(operation.clone(), counter);
            }
        }
        self.events_seen += 1;
        let seq = self.tracker.push_event(position);
        tracing::trace!(seq, partition_key = %event.partition_key, "event read");
        if let (true, Some(copy)) = (copied, self.copy.as_mut()) {
            copy.seqs.insert(seq);
        }
        if operation == "invalidate" {
            // Not data: everything before it is flushed, and the checkpoint may move past it
            // so that a restart with `startAfter` continues on the new collection.
            self.tracker.ack(seq);
            warn!("change stream invalidated");
            self.stop = Some(Err(WatcherError::Invalidated));
            return;
        }
        let (partition_key, data) = (event.partition_key, event.data);
        let size = data.len() + partition_key.len();
        if size > self.record_bytes {
            let oversized = Oversized {
                seq,
                size,
                operation: &operation,
                document_key: event.document_key,
                partition_key,
                data,
                raw: &raw,
            };
            return self.on_oversized(oversized, reservation);
        }
        self.reservations.insert(seq, reservation);
        self.scheduler
            .push(PendingRecord::new(seq, partition_key, data));
        if self.linger_deadline.is_none() {
            self.linger_deadline = Some(Instant::now() + self.spec.batch.linger);
        }
    }

    /// Not while a claim-check upload is in flight: nothing read after the oversized event
    /// may overtake its pointer record.
    fn can_read(&self) -> bool {
        self.stop.is_none()
            && self.scheduler.len() < self.spec.batch.max_pending
            && self.upload.is_none()
    }

    /// A copy's next document may be read: as [`Self::can_read`], within the copy's share of
    /// `max_pending`, and once a stream position is known for its entry.
    fn can_copy(&self) -> bool {
        self.copy.as_ref().is_some_and(|c| {
            !c.closed && c.seqs.len() < (self.spec.batch.max_pending / COPY_SHARE_DIVISOR).max(1)
        }) && self.can_read()
            && self.tracker.newest().is_some()
    }

    /// A copy's message: a document enters the pipeline with the copy's progress moved to
    /// it; a range's end is entered as a marker, so the frontier carries it once everything
    /// before it is acknowledged.
    fn on_copy_msg(&mut self, msg: Option<snapshot::CopyMsg>) {
        let Some(copy) = self.copy.as_mut() else {
            return;
        };
        match msg {
            Some(snapshot::CopyMsg::Document {
                range,
                raw,
                reservation,
            }) => {
                let id = raw
                    .get("documentKey")
                    .ok()
                    .flatten()
                    .and_then(|k| k.as_document())
                    .and_then(|k| k.get("_id").ok().flatten())
                    .and_then(|id| Bson::try_from(bson::RawBson::from(id)).ok());
                if let Some(r) = Arc::make_mut(&mut copy.progress).ranges.get_mut(range) {
                    r.after = id;
                }
                self.on_event(raw, reservation, true);
            }
            Some(snapshot::CopyMsg::RangeDone(range)) => {
                let progress = Arc::make_mut(&mut copy.progress);
                if let Some(r) = progress.ranges.get_mut(range) {
                    r.done = true;
                }
                info!(range, "snapshot: range read");
                self.enter_copy_marker();
            }
            Some(snapshot::CopyMsg::Failed(e)) => {
                warn!(error = %e, "snapshot: reading the collection failed; flushing what was read");
                self.stop = Some(Err(e));
            }
            None => {
                copy.closed = true;
                if !copy.progress.all_done() && self.stop.is_none() {
                    self.stop = Some(Err(WatcherError::Mongo(mongodb::error::Error::custom(
                        "snapshot: the copy's readers ended before every range was read",
                    ))));
                }
            }
        }
    }

    /// Enters the newest stream position with the copy's current progress as a marker.
    fn enter_copy_marker(&mut self) {
        let Some(newest) = self.tracker.newest().cloned() else {
            return;
        };
        let snapshot = self.copy.as_ref().map(|c| c.progress.clone());
        self.tracker.push_marker(Position { snapshot, ..newest });
    }

    /// `POST /watchers/{name}/snapshot`: a new copy beside the stream, its plan stored with
    /// the next checkpoint (so that a restart continues it). One at a time.
    async fn on_snapshot_request(
        &mut self,
        request: crate::control::SnapshotRequest,
    ) -> Result<(), crate::control::ControlError> {
        use crate::control::ControlError;
        if self.copy.is_some() {
            return Err(ControlError::Conflict(format!(
                "watcher `{}` is already copying; wait until GET /watchers/{} shows snapshot.state \
                 `done`, then ask again",
                self.spec.name, self.spec.name
            )));
        }
        let Some(copier) = &self.copier else {
            return Err(ControlError::Unavailable(
                "no copier in this pipeline".into(),
            ));
        };
        if self.tracker.newest().is_none() {
            return Err(ControlError::Conflict(format!(
                "watcher `{}` has no change stream position yet to hold during a copy; try \
                 again in a few seconds",
                self.spec.name
            )));
        }
        let filter = request.filter;
        let progress = SnapshotProgress {
            ranges: snapshot::plan(
                &copier.mongo,
                &self.spec,
                filter.as_ref(),
                self.spec.snapshot_parallelism,
            )
            .await,
            cluster_time: operation_time(&copier.mongo).await,
            filter,
        };
        info!(action = "snapshot", "on-demand snapshot accepted");
        self.begin_copy(Arc::new(progress), false);
        self.enter_copy_marker();
        Ok(())
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
                 stream answers every {} s); the driver keeps trying",
                self.spec.database,
                self.spec.collection,
                (now - self.last_read).as_secs(),
                reader::MAX_AWAIT.as_secs()
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
            Some(Ok(ReaderMsg::Event(raw, reservation))) => self.on_event(raw, reservation, false),
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
                    let snapshot = self.copy.as_ref().map(|c| c.progress.clone());
                    self.tracker.push_idle(token, snapshot);
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
                    token: token.into(),
                    cluster_time: None,
                    snapshot: None,
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

    fn on_oversized(&mut self, event: Oversized<'_>, reservation: Reservation) {
        let (seq, size, operation) = (event.seq, event.size, event.operation);
        let document_key = event
            .document_key
            .as_ref()
            .map(record::to_text)
            .unwrap_or_else(|| "(none)".into());
        let limit = self.record_bytes;
        match (self.spec.on_oversized, &self.claim_check) {
            (OnOversized::S3, Some(cc)) => {
                let mut head = EventHead::from_raw(event.raw);
                let Some(position) = self.tracker.position(seq) else {
                    // Entered by `on_event` just before; never behind the frontier yet.
                    self.stop = Some(Err(WatcherError::MissingResumeToken));
                    return;
                };
                // The tracker's token is the one checkpointed; the raw read is best effort. A
                // copied document's entry holds the newest stream position, shared with the
                // events around it: its own `_id` (`{snapshot: <_id>}`) names it, and its S3
                // object.
                let copied = self.copy.as_ref().is_some_and(|c| c.seqs.contains(&seq));
                let token = match (copied, head.token.take()) {
                    (true, Some(own)) => own,
                    _ => position.token.to_bson(),
                };
                head.token = Some(token.clone());
                head.cluster_time = head.cluster_time.or(position.cluster_time);
                head.operation.get_or_insert_with(|| operation.to_owned());
                head.document_key = head.document_key.or(event.document_key);
                info!(%document_key, size, limit, operation, bucket = cc.bucket(),
                    "record over the stream's limit; writing the event to s3 (on_oversized: s3)");
                let batch = &self.spec.batch;
                self.upload = Some(Upload::start(
                    cc,
                    seq,
                    &head,
                    &token,
                    event.partition_key,
                    event.data,
                    self.spec.record_format,
                    Backoff::new(batch.retry_initial_backoff, batch.retry_max_backoff),
                    reservation,
                ));
            }
            (OnOversized::Skip, _) => {
                warn!(%document_key, size, limit, operation, "record over the stream's limit skipped (on_oversized: skip)");
                self.tracker.ack(seq);
                self.metrics.skipped("oversized");
                self.status.update(|s| s.counters.records_skipped += 1);
            }
            // `S3` without a client cannot happen: `Deps::s3` is built for any watcher with it.
            (OnOversized::Fail | OnOversized::S3, _) => {
                error!(%document_key, size, limit, operation, "record over the stream's limit; watcher stops (on_oversized: fail)");
                self.stop = Some(Err(WatcherError::Oversized {
                    document_key,
                    size,
                    limit,
                }));
            }
        }
    }

    /// A claim-check upload ended: once the object is written, the pointer record takes the
    /// event's place (its seq, so the event is acknowledged, and checkpointed, with it); a
    /// failure is retried after the watcher's backoff, the reader waiting meanwhile.
    fn on_upload(&mut self, result: Result<(), PutError>) {
        let (Some(mut upload), Some(cc)) = (self.upload.take(), self.claim_check.as_ref()) else {
            return;
        };
        match result {
            Ok(()) => {
                info!(document_key = %upload.document_key, bucket = %upload.claim.bucket,
                    key = %upload.claim.key, bytes = upload.claim.bytes,
                    "oversized event written to s3; its pointer record is queued");
                self.metrics.claim_checked();
                if self.s3_trouble.take().is_some() {
                    info!("s3 takes claim-checked events again");
                    self.show_health();
                }
                self.reservations.insert(upload.seq, upload.reservation);
                self.scheduler.push(PendingRecord::new(
                    upload.seq,
                    upload.partition_key,
                    upload.pointer,
                ));
                if self.linger_deadline.is_none() {
                    self.linger_deadline = Some(Instant::now() + self.spec.batch.linger);
                }
            }
            Err(e) => {
                let delay = upload.retry(cc);
                let failures = upload.failures;
                if failures.is_power_of_two() {
                    warn!(error = %e.detail, document_key = %upload.document_key,
                        bucket = %upload.claim.bucket, key = %upload.claim.key, failures,
                        retry_in = ?delay, "claim-check upload to s3 failed; reading waits");
                }
                let bucket = cc.bucket();
                if e.waits_for_fix(bucket) || failures >= BACKING_OFF_AFTER {
                    let error = match (e.refusal(bucket), &e.code) {
                        (Some(refusal), _) => refusal.to_string(),
                        (None, Some(code)) => {
                            format!("{code}: {}", e.message.as_deref().unwrap_or_default())
                        }
                        (None, None) => e.detail.clone(),
                    };
                    // The change stream waits behind this event: nothing after it moves.
                    self.s3_trouble = Some(format!(
                        "s3 bucket `{bucket}`: an event too large for a record (document key \
                         {}, {} bytes) cannot be written ({failures} failed in a row; retried, \
                         reading waits): {error}",
                        upload.document_key, upload.claim.bytes
                    ));
                    self.show_health();
                }
                self.upload = Some(upload);
            }
        }
    }

    /// Starts as many calls as the send limit, the stream backoff and the linger allow.
    fn dispatch(&mut self) {
        let now = Instant::now();
        if self.scheduler.promote(now) > 0 {
            // A retried record has waited its own delay already; it does not wait for company
            // again (the linger is for records that keep arriving from the reader, and while
            // the reader waits on an empty stream, up to `reader::MAX_AWAIT`, each retry
            // would otherwise add the whole linger).
            self.linger_deadline = Some(now);
        }
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
                .ready_fills_batch(batch_cfg.max_records, self.batch_bytes)
                || self.reader_idle
                || self.stop.is_some()
                || self.linger_deadline.is_some_and(|d| now >= d);
            if !flush {
                break;
            }
            let pack = (self.spec.aggregation == Aggregation::Kpl).then_some(self.record_bytes);
            let batch =
                self.scheduler
                    .next_batch_packed(batch_cfg.max_records, self.batch_bytes, pack);
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
        // Events acknowledged inside aggregated records.
        let mut aggregated = 0u64;
        // Snapshot records acknowledged.
        let mut copied = 0u64;
        let mut last_error = String::new();
        let mut refusal = None;
        // Every rejection came from a shard that took records in the last second: it is at its
        // limit (paced), which says nothing about the stream as a whole.
        let mut shards_at_limit = true;
        let call_failed = match result {
            Ok(results) => {
                let mut codes: HashMap<String, u64> = HashMap::new();
                for (record, outcome) in batch.into_iter().zip(results) {
                    match outcome {
                        RecordResult::Accepted { shard } => {
                            if let Some(shard) = shard {
                                self.pacer.accepted(shard, now);
                            }
                            tracing::trace!(
                                seq = record.seq,
                                events = record.events(),
                                "acknowledged"
                            );
                            accepted += record.events() as u64;
                            if !record.packed.is_empty() {
                                aggregated += record.events() as u64;
                            }
                            self.scheduler.ack(&record);
                            if let Some(copy) = self.copy.as_mut() {
                                copied +=
                                    record.seqs().filter(|s| copy.seqs.remove(s)).count() as u64;
                            }
                            for seq in record.seqs() {
                                self.tracker.ack(seq);
                                self.reservations.remove(&seq);
                            }
                        }
                        RecordResult::Rejected {
                            error_code,
                            message,
                        } => {
                            rejected += 1;
                            // A shard over its limit takes its records back at its own pace.
                            let shard = (error_code == kinesis::THROTTLED)
                                .then(|| kinesis::throttled_shard(&message))
                                .flatten();
                            let turn = match shard {
                                Some(shard) => {
                                    shards_at_limit &= self.pacer.accepting(shard, now);
                                    Some(self.pacer.throttled(shard, now))
                                }
                                None => {
                                    shards_at_limit = false;
                                    None
                                }
                            };
                            last_error = format!("{error_code}: {message}");
                            *codes.entry(error_code).or_default() += 1;
                            self.retry(record, &last_error, now, jitter, turn);
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
                shards_at_limit = false;
                rejected = batch.len() as u64;
                last_error = call_error.to_string();
                refusal = aws_refusal(
                    AwsResource::KinesisStream(self.sink.stream().to_owned()),
                    "PutRecords",
                    Some(&call_error.code),
                    Some(&call_error.message),
                );
                self.metrics.call_failed(&call_error.code);
                self.metrics
                    .retries(&format!("call_{}", call_error.code), rejected);
                for record in batch {
                    self.retry(record, &last_error, now, jitter, None);
                }
                true
            }
        };
        self.metrics.records_put.inc_by(accepted);
        if aggregated > 0 {
            self.metrics.records_aggregated.inc_by(aggregated);
        }
        if copied > 0 {
            self.metrics.snapshot_records(copied);
            self.status.update(|s| {
                if let Some(snap) = s.snapshot.as_mut() {
                    snap.copied += copied;
                }
            });
        }
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
        } else if (call_failed || rejected > 1) && !shards_at_limit {
            // Nothing got through: a signal about the stream. A lone record rejected on its
            // own is a signal about its key (a hot key or shard) and only delays that record;
            // records throttled by shards that are taking others are paced per shard.
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
            if let Some(refusal) = refusal {
                // A permission does not come back by itself: shown at once. The calls go on at
                // the stream backoff, so delivery resumes by itself once it is granted.
                self.kinesis_trouble = Some(refusal.to_string());
                self.show_health();
            } else if self.failing_calls >= BACKING_OFF_AFTER {
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
            .or(self.s3_trouble.as_ref())
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
        let paced_shards = self.pacer.paced(Instant::now());
        let calls_in_flight = self.inflight.len();
        // The copy is done once every range is read and its end behind the frontier (every
        // copied record acknowledged, or skipped by policy): the next positions carry no
        // progress, so the next checkpoint drops it.
        let copy_done = self.copy.as_ref().is_some_and(|c| c.progress.all_done())
            && self
                .tracker
                .frontier()
                .and_then(|p| p.snapshot.as_ref())
                .is_some_and(|p| p.all_done());
        if copy_done {
            if let Some(copy) = self.copy.take() {
                copy.cancel.cancel();
            }
            self.enter_copy_marker();
            info!("snapshot: every copied document acknowledged");
            self.status.update(|s| {
                if let Some(snap) = s.snapshot.as_mut() {
                    snap.done = true;
                    snap.finished_at = Some(bson::DateTime::now());
                }
            });
        }
        self.metrics.flow(
            limit,
            pending_records,
            pending_bytes,
            records_delayed,
            paced_shards.len(),
        );
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
            s.flow.paced_shards = paced_shards;
        });
    }

    /// Puts a rejected record back at the head of its key, to go again after its own delay and
    /// not before `turn` (its throttled shard's next turn).
    fn retry(
        &mut self,
        record: PendingRecord,
        last_error: &str,
        now: Instant,
        jitter: f64,
        turn: Option<Instant>,
    ) {
        let attempts = record.attempts + 1;
        let batch = &self.spec.batch;
        // A record its shard throttled (the answer names the shard) is paced by that shard's
        // turns; its own delay only spreads it. Any other rejection waits the configured one.
        let (initial, max) = match turn {
            Some(_) => (THROTTLED_RECORD_INITIAL, THROTTLED_RECORD_MAX),
            None => (
                batch.record_retry_initial_backoff,
                batch.record_retry_max_backoff,
            ),
        };
        let delay = record_delay(attempts, initial, max, jitter);
        let at = (now + delay).max(turn.unwrap_or(now));
        self.scheduler.retry(record, Some(at));
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

/// A running copy's next message; pending forever without one.
async fn copy_recv(copy: &mut Option<Copy>) -> Option<snapshot::CopyMsg> {
    match copy {
        Some(copy) => copy.rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The outcome of the claim-check upload in flight (never, without one).
async fn upload_done(upload: &mut Option<Upload>) -> Result<(), PutError> {
    match upload {
        Some(upload) => upload.done().await,
        None => std::future::pending().await,
    }
}

/// An event whose record is over the stream's limit, as `on_oversized` takes it.
struct Oversized<'a> {
    seq: u64,
    /// Record bytes: data plus partition key.
    size: usize,
    operation: &'a str,
    document_key: Option<Bson>,
    partition_key: String,
    /// The event's encoded record: what the claim-check object holds.
    data: Vec<u8>,
    raw: &'a bson::RawDocument,
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
