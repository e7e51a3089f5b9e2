//! Runs one task per watcher: restarts the ones that fail with a retryable error (capped
//! exponential backoff with jitter), parks the others in their named state, carries out
//! operator commands (pause, resume, rewind), and on shutdown waits for every watcher to reach
//! a safe point.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bson::{doc, Document, Timestamp};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};
use watchers::checkpoint::{Checkpoint, Layout};
use watchers::control::{Command, ControlError, RewindTarget, WatcherHandle};
use watchers::pipeline::{Carry, Exit};
use watchers::reader::{self, StartPosition};
use watchers::retry::Backoff;
use watchers::spec::{OnHistoryLost, OnInvalidate, WatcherSpec};
use watchers::{Deps, State, StatusTx, WatcherError};

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
    pub fn start(specs: Vec<WatcherSpec>, deps: Deps, shutdown: &CancellationToken) -> Self {
        let tracker = TaskTracker::new();
        let unsent = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for spec in specs {
            let spec = Arc::new(spec);
            let (status, rx) = StatusTx::channel();
            let (handle, commands) = WatcherHandle::new(spec.clone(), rx);
            handles.push(handle);
            let span = info_span!("watcher", watcher = %spec.name);
            let task = Task {
                spec,
                deps: deps.clone(),
                status,
                cancel: shutdown.child_token(),
                commands,
                carry: Carry::default(),
                unsent: unsent.clone(),
            };
            tracker.spawn(task.supervise().instrument(span));
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
                Next::Run => {
                    let started = Instant::now();
                    let result = self.life().await;
                    if started.elapsed() > HEALTHY_LIFE {
                        backoff.reset();
                    }
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
            };
        }
    }

    /// One life of the pipeline, in its own task so that a panic becomes a state.
    async fn life(&mut self) -> Result<Exit, WatcherError> {
        let (spec, deps, status, cancel) = (
            self.spec.clone(),
            self.deps.clone(),
            self.status.clone(),
            self.cancel.clone(),
        );
        // A panic loses what the life carried: the next one starts from the checkpoint.
        let mut carry = std::mem::take(&mut self.carry);
        let (tx, mut commands) = mpsc::channel(1);
        std::mem::swap(&mut commands, &mut self.commands);
        let life = tokio::spawn(
            async move {
                let result =
                    watchers::pipeline::run(spec, deps, status, cancel, &mut carry, &mut commands)
                        .await;
                (result, carry, commands)
            }
            .in_current_span(),
        );
        drop(tx);
        match life.await {
            Ok((result, carry, commands)) => {
                self.carry = carry;
                self.commands = commands;
                result
            }
            Err(join_error) => {
                error!(error = %join_error, "watcher task panicked");
                // The command receiver died with the task: the handle's senders now fail with
                // `Gone`; the watcher keeps running without a control channel.
                Err(WatcherError::Mongo(mongodb::error::Error::custom(format!(
                    "watcher task panicked: {join_error}"
                ))))
            }
        }
    }

    async fn after_error(&mut self, error: WatcherError, backoff: &mut Backoff) -> Next {
        if matches!(error, WatcherError::Invalidated)
            && self.spec.on_invalidate == OnInvalidate::Continue
        {
            info!("change stream invalidated; continuing after it (on_invalidate: continue)");
            self.status.restarted();
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
            self.status.restarted();
            return Next::Run;
        }
        if !error.is_retryable() {
            let state = error.state();
            error!(error = %error, %state, "watcher stopped; it needs an operator");
            return Next::Park(state, Some(error.to_string()));
        }
        let delay = backoff.next_delay();
        error!(error = %error, retry_in = ?delay, "watcher failed; restarting");
        self.status.set(State::BackingOff, Some(error.to_string()));
        self.status.restarted();
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return Next::Stop,
                _ = &mut sleep => return Next::Run,
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Resume(reply) => {
                        let _ = reply.send(Ok(()));
                    }
                    cmd => return self.after_command(cmd).await,
                },
            }
        }
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
        }
    }

    /// Waits in `state` for an operator command or shutdown.
    async fn park(&mut self, state: State, reason: Option<String>) -> Next {
        self.status.update(|s| {
            s.state = state;
            s.reason = reason.clone();
            s.paused = state == State::Paused;
            s.caught_up = false;
        });
        loop {
            let cmd = tokio::select! {
                _ = self.cancel.cancelled() => return Next::Stop,
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
            let checkpoint = match &position.1 {
                StartPosition::After(token) => Checkpoint {
                    token: Some(token.clone()),
                    cluster_time: None,
                    paused: true,
                },
                StartPosition::At(ts) => Checkpoint {
                    token: None,
                    cluster_time: Some(*ts),
                    paused: true,
                },
                StartPosition::Latest => Checkpoint {
                    token: position.0.clone(),
                    cluster_time: None,
                    paused: true,
                },
            };
            if let Some(store) = &self.deps.checkpoints {
                let revision = store
                    .load(&self.spec.name)
                    .await
                    .map_err(|e| ControlError::Unavailable(e.to_string()))?
                    .map(|s| s.revision);
                store
                    .save(&self.spec.name, revision, &checkpoint)
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
        if matches!(store.layout(), Layout::LegacyMarker { .. }) {
            warn!("drop-in mode: the old marker cannot hold the paused flag; a restart resumes");
            return Ok(());
        }
        let unavailable = |e: WatcherError| ControlError::Unavailable(e.to_string());
        let stored = store.load(&self.spec.name).await.map_err(unavailable)?;
        let Some(stored) = stored else {
            return Ok(());
        };
        if stored.checkpoint.paused == paused {
            return Ok(());
        }
        let checkpoint = Checkpoint {
            paused,
            ..stored.checkpoint
        };
        store
            .save(&self.spec.name, Some(stored.revision), &checkpoint)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
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
            let ts = Timestamp {
                time: (t.timestamp_millis().max(0) / 1000) as u32,
                increment: 0,
            };
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
    let oldest = client
        .database("local")
        .collection::<Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! {"$natural": 1})
        .await
        .ok()??;
    oldest.get_timestamp("ts").ok()
}
