//! Runs one task per watcher: restarts the ones that fail with a retryable error (capped
//! exponential backoff with jitter), parks the others in their named state, carries out
//! operator commands (pause, resume, rewind), and on shutdown waits for every watcher to reach
//! a safe point.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document, Timestamp};
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};
use watchers::checkpoint::Checkpoint;
use watchers::control::{Command, ControlError, RewindTarget, WatcherHandle};
use watchers::lease::Fence;
use watchers::metrics::SupervisionMetrics;
use watchers::pipeline::{Carry, Exit};
use watchers::reader::{self, StartPosition};
use watchers::retry::Backoff;
use watchers::spec::{OnHistoryLost, OnInvalidate, WatcherSpec};
use watchers::{Deps, State, StatusTx, WatcherError};

use crate::leases::{Grant, LeaseLink, Released};

/// Restart delays after a retryable failure.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A life longer than this resets the restart backoff.
const HEALTHY_LIFE: Duration = Duration::from_secs(120);
/// How long a rewind waits for MongoDB to answer a ping before it is refused (503). Without
/// it the probe would wait out the driver's 30 s server selection while MongoDB is down; a
/// healthy server answers in milliseconds.
const REACH_TIMEOUT: Duration = Duration::from_millis(1500);

pub struct Supervisor {
    tracker: TaskTracker,
    handles: Vec<WatcherHandle>,
    /// Records the watchers left unsent at shutdown (their drain deadline passed).
    unsent: Arc<AtomicUsize>,
}

/// How a shutdown ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// Every watcher flushed what it had read and wrote its final checkpoint.
    Clean,
    /// Records were left unsent or watchers were still running at the deadline. Nothing is
    /// lost (nothing past a checkpoint was acknowledged as delivered; it is read again after a
    /// restart), but the orchestrator should know the shutdown was not clean.
    Incomplete { unsent: usize, running: Vec<String> },
}

impl Supervisor {
    /// Starts a task per watcher. With leases, `links` holds each watcher's end of the lease
    /// coordinator (`leases.rs`), and a watcher runs only while this replica holds its lease.
    pub fn start(
        specs: Vec<WatcherSpec>,
        deps: Deps,
        shutdown: &CancellationToken,
        mut links: std::collections::HashMap<String, LeaseLink>,
    ) -> Self {
        let tracker = TaskTracker::new();
        let unsent = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        let mut statuses = Vec::new();
        for spec in specs {
            let spec = Arc::new(spec);
            let (status, rx) = StatusTx::channel();
            let (handle, commands) = WatcherHandle::new(spec.clone(), rx);
            handles.push(handle);
            statuses.push(status.clone());
            let span = info_span!("watcher", watcher = %spec.name);
            let metrics = deps.metrics.supervision(&spec.name);
            let lease = links.remove(&spec.name);
            let task = Task {
                spec,
                deps: deps.clone(),
                status,
                cancel: shutdown.child_token(),
                commands,
                carry: Carry::default(),
                unsent: unsent.clone(),
                metrics,
                lease,
                revoked: None,
                handed_over: None,
            };
            tracker.spawn(task.supervise().instrument(span));
        }
        if !statuses.is_empty() {
            // One sampler for the deployment: every watcher shares the process's client.
            let sampler = OplogSampler::new(deps.mongo.clone(), statuses);
            tracker.spawn(
                sampler
                    .run(shutdown.child_token())
                    .instrument(info_span!("oplog_sampler")),
            );
        }
        tracker.close();
        Self {
            tracker,
            handles,
            unsent,
        }
    }

    pub fn handles(&self) -> &[WatcherHandle] {
        &self.handles
    }

    /// Waits for every watcher to stop, at most `deadline`; names the ones still running.
    pub async fn wait(&self, deadline: Duration) -> Shutdown {
        let finished = tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok();
        let running: Vec<_> = if finished {
            Vec::new()
        } else {
            self.handles
                .iter()
                .filter(|h| h.status().state != State::Stopped)
                .map(|h| h.name().to_owned())
                .collect()
        };
        if !running.is_empty() {
            error!(
                ?running,
                "shutdown deadline passed with watchers still running"
            );
        }
        let unsent = self.unsent.load(Ordering::Acquire);
        if running.is_empty() && unsent == 0 {
            Shutdown::Clean
        } else {
            Shutdown::Incomplete { unsent, running }
        }
    }
}

/// Beats the liveness clock every second for as long as the runtime schedules tasks, so that
/// `/healthz` turns unhealthy if the process wedges.
pub async fn heartbeat(liveness: api::Liveness) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        liveness.beat();
    }
}

/// One watcher's supervising task and everything it owns.
struct Task {
    spec: Arc<WatcherSpec>,
    deps: Deps,
    status: StatusTx,
    cancel: CancellationToken,
    commands: mpsc::Receiver<Command>,
    carry: Carry,
    unsent: Arc<AtomicUsize>,
    metrics: SupervisionMetrics,
    /// With leases: the coordinator's grants and where to report a release.
    lease: Option<LeaseLink>,
    /// Set when the lease was taken away (or is being handed over) during a life.
    revoked: Option<Grant>,
    /// The lease this task last reported released, so that it reports it once.
    handed_over: Option<Fence>,
}

/// Resolves with the new grant once it is no longer `Owned(fence)`; never without leases.
async fn revocation(lease: Option<&mut LeaseLink>, fence: Option<Fence>) -> Grant {
    let (Some(link), Some(fence)) = (lease, fence) else {
        return std::future::pending().await;
    };
    let held = Grant::Owned(fence);
    loop {
        let grant = link.grants.borrow_and_update().clone();
        if grant != held {
            return grant;
        }
        if link.grants.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// What to do after a life or a parked spell.
enum Next {
    Run,
    Park(State, Option<String>),
    Stop,
}

impl Task {
    async fn supervise(mut self) {
        let mut backoff = Backoff::new(RESTART_INITIAL, RESTART_MAX);
        let mut next = Next::Run;
        loop {
            next = match next {
                Next::Stop => {
                    self.status.set(State::Stopped, None);
                    info!("watcher stopped");
                    return;
                }
                Next::Park(state, reason) => self.park(state, reason).await,
                Next::Run if !self.holds_lease() => self.standby().await,
                Next::Run => {
                    let started = Instant::now();
                    let result = self.life().await;
                    if started.elapsed() > HEALTHY_LIFE {
                        backoff.reset();
                    }
                    if let Some(grant) = self.revoked.take() {
                        if self.cancel.is_cancelled() {
                            Next::Stop
                        } else {
                            if let Err(e) = &result {
                                info!(error = %e, "life ended as the lease went");
                            }
                            self.on_revoked(grant);
                            Next::Run
                        }
                    } else {
                        match result {
                            Ok(Exit::Cancelled { unsent }) => {
                                self.unsent.fetch_add(unsent, Ordering::AcqRel);
                                Next::Stop
                            }
                            Ok(Exit::StoredPaused) => {
                                info!("the checkpoint says paused; staying paused");
                                Next::Park(State::Paused, None)
                            }
                            Ok(Exit::Command(cmd)) => self.after_command(cmd).await,
                            Err(_) if self.cancel.is_cancelled() => Next::Stop,
                            Err(e) => self.after_error(e, &mut backoff).await,
                        }
                    }
                }
            };
        }
    }

    /// One life of the pipeline. A panic in it is caught here, in the task that owns the
    /// command receiver and the carry, so both survive it: pause, resume and rewind keep
    /// working, and the next life restarts from the checkpoint (a retryable error).
    async fn life(&mut self) -> Result<Exit, WatcherError> {
        let (spec, deps, status) = (self.spec.clone(), self.deps.clone(), self.status.clone());
        // Per life, so that after a panic what the life spawned (its reader, which would
        // otherwise hold its change stream open until it next sends) is stopped; shutdown
        // still reaches the life through it.
        let life_cancel = self.cancel.child_token();
        let _stop_leftovers = life_cancel.clone().drop_guard();
        let fence = self.carry.fence.clone();
        let run = watchers::pipeline::run(
            spec,
            deps,
            status,
            life_cancel.clone(),
            &mut self.carry,
            &mut self.commands,
        );
        // Never resolves in a production build (see watchers/src/fault.rs).
        let injected = watchers::fault::injected_panic(&self.spec.name);
        // A lease taken away, or to hand over, stops the life as shutdown does: flush, final
        // checkpoint (refused by the fence once the next owner wrote).
        let revoked = revocation(self.lease.as_mut(), fence);
        let revoked_slot = &mut self.revoked;
        let life = async {
            tokio::pin!(run, injected, revoked);
            let mut revoking = false;
            loop {
                tokio::select! {
                    result = &mut run => break result,
                    never = &mut injected => match never {},
                    grant = &mut revoked, if !revoking => {
                        revoking = true;
                        info!(grant = ?grant, "lease no longer held here; stopping the watcher");
                        *revoked_slot = Some(grant);
                        life_cancel.cancel();
                    }
                }
            }
        };
        // AssertUnwindSafe: what the life shares with this task is safe to use after a panic.
        // The carry's fields are replaced whole (a panic leaves each as the last life left
        // it: at worst an older position, read again, or a rewind target not yet stored,
        // applied by the next life); the receiver and the status channel are tokio's, whose
        // state a panic cannot tear; the pipeline holds no std lock another task could find
        // poisoned; byte reservations are given back as the unwinding drops them.
        match AssertUnwindSafe(life).catch_unwind().await {
            Ok(result) => result,
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                self.metrics.panics.inc();
                error!(panic = %message, "watcher panicked; restarting from its checkpoint");
                Err(WatcherError::Panicked { message })
            }
        }
    }

    async fn after_error(&mut self, error: WatcherError, backoff: &mut Backoff) -> Next {
        if matches!(error, WatcherError::Invalidated)
            && self.spec.on_invalidate == OnInvalidate::Continue
        {
            info!("change stream invalidated; continuing after it (on_invalidate: continue)");
            self.restarted();
            return Next::Run;
        }
        if matches!(error, WatcherError::HistoryLost { .. })
            && self.spec.on_history_lost == OnHistoryLost::RestartFromLatest
        {
            error!(
                error = %error,
                "change stream history lost: events between the checkpoint and now are NOT \
                 delivered; restarting from latest (on_history_lost: restart_from_latest)"
            );
            self.carry.start_override = Some(StartPosition::Latest);
            self.restarted();
            return Next::Run;
        }
        // With leases a conflict is another replica's write: the last write of an earlier
        // owner racing this life's fencing write (the next life loads it and fences again),
        // or a newer owner's fence (the coordinator's renewal then finds the lease gone, and
        // the next life waits in standby).
        let fenced =
            self.lease.is_some() && matches!(error, WatcherError::CheckpointConflict { .. });
        if !error.is_retryable() && !fenced {
            let state = error.state();
            error!(error = %error, %state, "watcher stopped; it needs an operator");
            return Next::Park(state, Some(error.to_string()));
        }
        let delay = backoff.next_delay();
        error!(error = %error, retry_in = ?delay, "watcher failed; restarting");
        self.status.set(State::BackingOff, Some(error.to_string()));
        self.restarted();
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            let fence = self.carry.fence.clone();
            tokio::select! {
                _ = self.cancel.cancelled() => return Next::Stop,
                _ = &mut sleep => return Next::Run,
                grant = revocation(self.lease.as_mut(), fence) => {
                    self.on_revoked(grant);
                    return Next::Run;
                }
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Resume(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                    // Refused here rather than in `after_command`, which would end the
                    // backoff early by starting the next life.
                    Command::Snapshot(_, reply) => {
                        let _ = reply.send(Err(ControlError::Conflict(format!(
                            "watcher `{}` is {}; request the snapshot once it is running again",
                            self.spec.name,
                            State::BackingOff
                        ))));
                    }
                    cmd => return self.after_command(cmd).await,
                },
            }
        }
    }

    /// Whether this replica may run the watcher now: always without leases; with them, while
    /// it holds the lease (whose fence the next life then writes under).
    fn holds_lease(&mut self) -> bool {
        let Some(link) = &self.lease else {
            return true;
        };
        let grant = link.grants.borrow().clone();
        match grant {
            Grant::Owned(fence) => {
                let me = fence.owner.clone();
                self.carry.fence = Some(fence);
                self.status.update(|s| s.owner = Some(me));
                true
            }
            _ => false,
        }
    }

    /// After the lease went (or was handed over) while the watcher ran or was parked here.
    fn on_revoked(&mut self, grant: Grant) {
        self.carry.fence = None;
        if let (Grant::HandOver(fence), Some(link)) = (grant, &self.lease) {
            self.handed_over = Some(fence.clone());
            let _ = link.released.send(Released {
                watcher: self.spec.name.clone(),
                fence,
            });
        }
    }

    /// Waits while another replica owns the watcher, answering commands with 409 naming it.
    async fn standby(&mut self) -> Next {
        loop {
            let Some(link) = self.lease.as_mut() else {
                return Next::Run;
            };
            let grant = link.grants.borrow_and_update().clone();
            let owner = match grant {
                Grant::Owned(_) => return Next::Run,
                Grant::HandOver(fence) => {
                    // Not running here: give it up at once (once), then wait for the
                    // coordinator to take it back.
                    if self.handed_over.as_ref() != Some(&fence) {
                        self.on_revoked(Grant::HandOver(fence));
                    }
                    None
                }
                Grant::Standby { owner } => owner,
            };
            let reason = match &owner {
                Some(o) => {
                    format!("owned by replica `{o}`; this replica takes it over if that one goes")
                }
                None => "waiting for its lease".to_owned(),
            };
            self.status.set(State::Standby, Some(reason));
            self.status.update(|s| {
                s.owner = owner.clone();
                s.caught_up = false;
            });
            let Some(link) = self.lease.as_mut() else {
                return Next::Run;
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return Next::Stop,
                changed = link.grants.changed() => {
                    if changed.is_err() {
                        self.cancel.cancelled().await;
                        return Next::Stop;
                    }
                }
                Some(cmd) = self.commands.recv() => {
                    let message = match &owner {
                        Some(o) => format!(
                            "watcher `{}` runs on replica `{o}` (this is `{}`); send the command there",
                            self.spec.name, link.replica
                        ),
                        None => format!(
                            "watcher `{}` is not running on any replica yet; try again in a few seconds",
                            self.spec.name
                        ),
                    };
                    let (Command::Pause(reply)
                    | Command::Resume(reply)
                    | Command::Rewind(_, reply)
                    | Command::Snapshot(_, reply)) = cmd;
                    let _ = reply.send(Err(ControlError::Conflict(message)));
                }
            }
        }
    }

    /// Counts a restart, in the API's view and in the metric.
    fn restarted(&self) {
        self.status.restarted();
        self.metrics.restarts.inc();
    }

    /// Carries out a pause or rewind after the pipeline flushed and checkpointed.
    async fn after_command(&mut self, cmd: Command) -> Next {
        match cmd {
            Command::Pause(reply) => {
                let result = self.persist_paused(true).await;
                info!(action = "pause", "watcher paused");
                let ok = result.is_ok();
                if ok {
                    // Before the answer, so the API's response already shows `paused`.
                    self.status.set(State::Paused, None);
                }
                let _ = reply.send(result);
                if ok {
                    Next::Park(State::Paused, None)
                } else {
                    Next::Run
                }
            }
            Command::Resume(reply) => {
                let _ = reply.send(Ok(()));
                Next::Run
            }
            Command::Rewind(target, reply) => match self.rewind(&target, false).await {
                Ok(()) => {
                    let _ = reply.send(Ok(()));
                    Next::Run
                }
                Err(e) => {
                    warn!(error = %e, "rewind refused; the watcher keeps its position");
                    let _ = reply.send(Err(e));
                    Next::Run
                }
            },
            // The running pipeline answers snapshots itself and never stops for one; this
            // arm only keeps the match whole.
            Command::Snapshot(_, reply) => {
                let _ = reply.send(Err(ControlError::Conflict(format!(
                    "watcher `{}` is restarting; request the snapshot once it is running again",
                    self.spec.name
                ))));
                Next::Run
            }
        }
    }

    /// Waits in `state` for an operator command or shutdown.
    async fn park(&mut self, state: State, reason: Option<String>) -> Next {
        // `set` also records a failure as the last error.
        self.status.set(state, reason.clone());
        self.status.update(|s| {
            s.paused = state == State::Paused;
            s.caught_up = false;
        });
        loop {
            let fence = self.carry.fence.clone();
            let cmd = tokio::select! {
                _ = self.cancel.cancelled() => return Next::Stop,
                grant = revocation(self.lease.as_mut(), fence) => {
                    self.on_revoked(grant);
                    return Next::Run;
                }
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => {
                        self.cancel.cancelled().await;
                        return Next::Stop;
                    }
                },
            };
            match cmd {
                Command::Pause(reply) => {
                    let result = self.persist_paused(true).await;
                    let ok = result.is_ok();
                    if ok {
                        self.status.set(State::Paused, None);
                    }
                    let _ = reply.send(result);
                    if ok && state != State::Paused {
                        return Next::Park(State::Paused, None);
                    }
                }
                Command::Resume(reply) => {
                    let result = self.persist_paused(false).await;
                    let ok = result.is_ok();
                    let _ = reply.send(result);
                    if ok {
                        info!(action = "resume", "watcher resuming from its checkpoint");
                        return Next::Run;
                    }
                }
                Command::Rewind(target, reply) => {
                    let paused = state == State::Paused;
                    let result = self.rewind(&target, paused).await;
                    let ok = result.is_ok();
                    let _ = reply.send(result);
                    if ok && !paused {
                        return Next::Run;
                    }
                }
                // A copy runs inside a life, so only a running watcher can take one.
                Command::Snapshot(_, reply) => {
                    let _ = reply.send(Err(ControlError::Conflict(format!(
                        "watcher `{}` is {state}; {}, then request the snapshot",
                        self.spec.name,
                        match state {
                            State::Paused => "resume it first",
                            // Resuming meets the same lost history or invalidate again.
                            State::HistoryLost | State::Invalidated => "rewind it first",
                            _ => "resume or rewind it first",
                        }
                    ))));
                }
            }
        }
    }

    /// Checks that `target` can be reached, then makes it the watcher's next start: for a
    /// running watcher through the next life (which stores it before reading), for a paused
    /// one by storing it as the checkpoint, still paused.
    async fn rewind(&mut self, target: &RewindTarget, paused: bool) -> Result<(), ControlError> {
        let position = probe(&self.deps.mongo, &self.spec, target).await?;
        info!(action = "rewind", target = %describe(target), paused, "rewind accepted");
        if paused {
            let (token, cluster_time) = match &position.1 {
                StartPosition::After(token) => (Some(token.clone()), None),
                StartPosition::At(ts) => (None, Some(*ts)),
                StartPosition::Latest => (position.0.clone(), None),
            };
            let checkpoint = Checkpoint {
                token,
                cluster_time,
                paused: true,
                namespace: Some(watchers::checkpoint::namespace(&self.spec)),
            };
            if let Some(store) = &self.deps.checkpoints {
                store
                    .replace(&self.spec.name, &checkpoint, self.carry.fence.as_ref())
                    .await
                    .map_err(|e| ControlError::Unavailable(e.to_string()))?;
            }
            self.carry.position = checkpoint.token.clone();
            if checkpoint.token.is_none() {
                self.carry.start_override = Some(position.1);
            }
            return Ok(());
        }
        self.carry.start_override = Some(match (position.1, position.0) {
            // Latest is pinned to the probed position so that nothing between the probe and
            // the restart is skipped.
            (StartPosition::Latest, Some(token)) => StartPosition::After(token),
            (start, _) => start,
        });
        Ok(())
    }

    /// Stores the paused flag with the checkpoint, so a replaced task comes back paused.
    async fn persist_paused(&self, paused: bool) -> Result<(), ControlError> {
        self.status.update(|s| s.paused = paused);
        let Some(store) = &self.deps.checkpoints else {
            return Ok(());
        };
        store
            .mark_paused(&self.spec.name, paused, self.carry.fence.as_ref())
            .await
            .map_err(|e| ControlError::Unavailable(e.to_string()))
    }
}

/// The text a panic was raised with (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

fn describe(target: &RewindTarget) -> String {
    match target {
        RewindTarget::Latest => "latest".into(),
        RewindTarget::Time(t) => t.try_to_rfc3339_string().unwrap_or_default(),
        RewindTarget::Token(t) => watchers::record::to_text(t),
    }
}

/// Opens a throwaway change stream at the target to prove it exists, before the watcher
/// gives up its position. Returns the stream's initial token and the start position.
async fn probe(
    client: &mongodb::Client,
    spec: &WatcherSpec,
    target: &RewindTarget,
) -> Result<(Option<bson::Bson>, StartPosition), ControlError> {
    reachable(client).await?;
    let start = match target {
        RewindTarget::Latest => StartPosition::Latest,
        RewindTarget::Token(t) => {
            if t.as_document().is_none_or(|d| d.is_empty()) {
                return Err(ControlError::Invalid(
                    "resume_token must be a non-empty object such as {\"_data\": \"...\"}".into(),
                ));
            }
            StartPosition::After(t.clone())
        }
        RewindTarget::Time(t) => {
            let ts = reader::cluster_time_at(*t);
            // MongoDB answers 286 for a time before the oplog; some servers silently start at
            // the oldest entry instead, so compare with the oldest entry ourselves. By whole
            // seconds: the target is truncated to `{second, 0}`, so a time inside the oldest
            // entry's second (after it, possibly) would otherwise compare as older.
            if let Some(oldest) = oldest_oplog_time(client).await {
                if ts.time < oldest.time {
                    return Err(ControlError::Conflict(format!(
                        "rewind target {} is older than the oplog window (oldest entry at {})",
                        t.try_to_rfc3339_string().unwrap_or_default(),
                        watchers::status::wall_time(oldest)
                            .try_to_rfc3339_string()
                            .unwrap_or_default()
                    )));
                }
            }
            StartPosition::At(ts)
        }
    };
    match reader::open(client, spec, &start).await {
        Ok(stream) => Ok((reader::current_token(&stream), start)),
        Err(WatcherError::HistoryLost { message }) => Err(ControlError::Conflict(format!(
            "rewind target is no longer in the oplog: {message}"
        ))),
        Err(WatcherError::Mongo(e)) if watchers::error::is_foreign_resume_token(&e) => {
            Err(ControlError::Invalid(format!(
                "resume_token belongs to another namespace: this watcher watches `{}.{}`; give \
                 a token of this collection's change stream (the server said: {})",
                spec.database,
                spec.collection,
                watchers::error::summary(&e)
            )))
        }
        Err(WatcherError::Mongo(e)) => match e.kind.as_ref() {
            mongodb::error::ErrorKind::Command(c) if REFUSED_TOKEN_CODES.contains(&c.code) => {
                Err(ControlError::Conflict(format!(
                    "the server does not accept this resume token: {}",
                    c.message
                )))
            }
            _ => Err(ControlError::Unavailable(format!(
                "cannot reach MongoDB: {e}"
            ))),
        },
        Err(e) => Err(ControlError::Unavailable(e.to_string())),
    }
}

/// Server codes for a resume token the server cannot use: FailedToParse (9),
/// InvalidResumeToken (260), ChangeStreamFatalError (280).
const REFUSED_TOKEN_CODES: [i32; 3] = [9, 260, 280];

/// A quick ping, so that a rewind while MongoDB is down is refused in about a second with the
/// reason instead of after the driver's server selection timeout.
async fn reachable(client: &mongodb::Client) -> Result<(), ControlError> {
    let admin = client.database("admin");
    match tokio::time::timeout(REACH_TIMEOUT, admin.run_command(doc! {"ping": 1})).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(ControlError::Unavailable(format!(
            "cannot reach MongoDB: {}; the watcher keeps its position",
            watchers::error::summary(&e)
        ))),
        Err(_) => Err(ControlError::Unavailable(format!(
            "MongoDB did not answer a ping within {REACH_TIMEOUT:?}; the watcher keeps its \
             position"
        ))),
    }
}

/// Cluster time of the oldest oplog entry, where the server lets us read it.
async fn oldest_oplog_time(client: &mongodb::Client) -> Option<Timestamp> {
    read_oldest_oplog(client).await.ok().flatten()
}

/// Cluster time of the oldest entry still in the oplog (None for an empty oplog).
async fn read_oldest_oplog(
    client: &mongodb::Client,
) -> Result<Option<Timestamp>, mongodb::error::Error> {
    let oldest = client
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! {"$natural": 1})
        .await?;
    Ok(oldest.and_then(|entry| entry.get_timestamp("ts").ok()))
}

/// How often the oldest oplog entry is read for `mongo_watcher_oplog_headroom_seconds`.
const OPLOG_SAMPLE_INTERVAL: Duration = Duration::from_secs(30);
/// How long one read may take; a slower one counts as failed (the driver's own server
/// selection would wait 30 s, a whole interval, while MongoDB is down).
const OPLOG_SAMPLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Server code for an operation the user's roles do not allow (Unauthorized).
const UNAUTHORIZED: i32 = 13;

/// What one read of the oplog's oldest entry found.
#[derive(Debug)]
enum OplogSample {
    Oldest(Timestamp),
    /// An empty oplog (or an entry without `ts`): nothing to measure against.
    Empty,
    /// The server does not let this user read `local.oplog.rs`.
    NotPermitted(String),
    Failed(String),
}

/// Reads the oldest entry of the oplog every [`OPLOG_SAMPLE_INTERVAL`] and hands its time to
/// every watcher's status, where each watcher's headroom is measured from its own checkpoint
/// (`Status::oplog_headroom_seconds`). One per MongoDB deployment (the process has one
/// client), not one per watcher: the oplog is the deployment's. Where the server does not
/// let us read it, the sampler says so once and stops, and the headroom stays unknown (the
/// gauge absent, the API's `oplog_headroom_seconds` null); a failed read makes it unknown
/// until the next read succeeds.
struct OplogSampler {
    client: mongodb::Client,
    statuses: Vec<StatusTx>,
    /// The last read failed (a warning is logged at the first failure of a run).
    failing: bool,
}

impl OplogSampler {
    fn new(client: mongodb::Client, statuses: Vec<StatusTx>) -> Self {
        Self {
            client,
            statuses,
            failing: false,
        }
    }

    async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(OPLOG_SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sample = tokio::select! {
                _ = cancel.cancelled() => return,
                sample = sample_oplog(&self.client) => sample,
            };
            if !self.publish(sample) {
                return;
            }
        }
    }

    /// Publishes the sample to every watcher; false when sampling should stop.
    fn publish(&mut self, sample: OplogSample) -> bool {
        let (oldest, go_on) = match sample {
            OplogSample::Oldest(ts) => {
                if std::mem::take(&mut self.failing) {
                    info!("the oldest oplog entry is readable again");
                }
                (Some(watchers::status::wall_time(ts)), true)
            }
            OplogSample::Empty => {
                self.failing = false;
                (None, true)
            }
            OplogSample::NotPermitted(error) => {
                // Once: asking again every 30 s would only fill the server's audit log. A
                // grant takes effect at the next start.
                warn!(
                    %error,
                    "not permitted to read local.oplog.rs: mongo_watcher_oplog_headroom_seconds \
                     stays absent; grant the user {{role: \"read\", db: \"local\"}} and \
                     restart to see how long before a stopped watcher's history is lost"
                );
                (None, false)
            }
            OplogSample::Failed(error) => {
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(
                        %error,
                        "cannot read the oldest oplog entry; oplog headroom unknown until a read \
                         succeeds"
                    );
                }
                (None, true)
            }
        };
        for status in &self.statuses {
            status.update(|s| s.oplog_oldest = oldest);
        }
        go_on
    }
}

async fn sample_oplog(client: &mongodb::Client) -> OplogSample {
    match tokio::time::timeout(OPLOG_SAMPLE_TIMEOUT, read_oldest_oplog(client)).await {
        Err(_) => OplogSample::Failed(format!("no answer within {OPLOG_SAMPLE_TIMEOUT:?}")),
        Ok(Ok(Some(ts))) => OplogSample::Oldest(ts),
        Ok(Ok(None)) => OplogSample::Empty,
        Ok(Err(e)) => match e.kind.as_ref() {
            mongodb::error::ErrorKind::Command(c) if c.code == UNAUTHORIZED => {
                OplogSample::NotPermitted(watchers::error::summary(&e))
            }
            _ => OplogSample::Failed(watchers::error::summary(&e)),
        },
    }
}
