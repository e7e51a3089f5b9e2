//! Runs one task per watcher, restarts the ones that fail with a retryable error (capped
//! exponential backoff with jitter), parks the others in their named state, and on shutdown
//! waits for all of them to reach a safe point.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument};
use watchers::pipeline::Carry;
use watchers::retry::Backoff;
use watchers::spec::{OnHistoryLost, OnInvalidate, WatcherSpec};
use watchers::{Deps, State, Status, StatusTx, WatcherError};

/// Restart delays after a retryable failure.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A life longer than this resets the restart backoff.
const HEALTHY_LIFE: Duration = Duration::from_secs(120);

/// What the rest of the process sees of one watcher.
#[derive(Clone)]
pub struct WatcherHandle {
    pub spec: Arc<WatcherSpec>,
    pub status: watch::Receiver<Status>,
}

pub struct Supervisor {
    tracker: TaskTracker,
    handles: Vec<WatcherHandle>,
}

impl Supervisor {
    pub fn start(specs: Vec<WatcherSpec>, deps: Deps, shutdown: &CancellationToken) -> Self {
        let tracker = TaskTracker::new();
        let mut handles = Vec::new();
        for spec in specs {
            let spec = Arc::new(spec);
            let (status, rx) = StatusTx::channel();
            handles.push(WatcherHandle {
                spec: spec.clone(),
                status: rx,
            });
            let span = info_span!("watcher", watcher = %spec.name);
            tracker.spawn(
                supervise(spec, deps.clone(), status, shutdown.child_token()).instrument(span),
            );
        }
        tracker.close();
        Self { tracker, handles }
    }

    #[allow(dead_code)] // read by the control plane (api crate)
    pub fn handles(&self) -> &[WatcherHandle] {
        &self.handles
    }

    /// Waits for every watcher to stop, at most `deadline`; names the ones still running.
    pub async fn wait(&self, deadline: Duration) -> bool {
        if tokio::time::timeout(deadline, self.tracker.wait())
            .await
            .is_ok()
        {
            return true;
        }
        let running: Vec<_> = self
            .handles
            .iter()
            .filter(|h| h.status.borrow().state != State::Stopped)
            .map(|h| h.spec.name.clone())
            .collect();
        error!(
            ?running,
            "shutdown deadline passed with watchers still running"
        );
        false
    }
}

async fn supervise(
    spec: Arc<WatcherSpec>,
    deps: Deps,
    status: StatusTx,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(RESTART_INITIAL, RESTART_MAX);
    let mut carry = Carry::default();
    loop {
        let started = Instant::now();
        // Its own task, so that a panic becomes a state rather than a dead supervisor.
        let life = {
            let (spec, deps, status, cancel) =
                (spec.clone(), deps.clone(), status.clone(), cancel.clone());
            // A panic loses what the life carried: the next one starts from the checkpoint.
            let mut carry = std::mem::take(&mut carry);
            tokio::spawn(
                async move {
                    let result =
                        watchers::pipeline::run(spec, deps, status, cancel, &mut carry).await;
                    (result, carry)
                }
                .in_current_span(),
            )
        };
        let result = match life.await {
            Ok((result, returned)) => {
                carry = returned;
                result
            }
            Err(join_error) => {
                error!(error = %join_error, "watcher task panicked");
                Err(WatcherError::Mongo(mongodb::error::Error::custom(format!(
                    "watcher task panicked: {join_error}"
                ))))
            }
        };
        if cancel.is_cancelled() {
            if let Err(e) = &result {
                warn!(error = %e, "watcher stopped with an error during shutdown");
            }
            status.set(State::Stopped, None);
            info!("watcher stopped");
            return;
        }
        if started.elapsed() > HEALTHY_LIFE {
            backoff.reset();
        }
        let error = match result {
            Ok(()) => {
                status.set(State::Stopped, None);
                return;
            }
            Err(e) => e,
        };
        if matches!(error, WatcherError::Invalidated)
            && spec.on_invalidate == OnInvalidate::Continue
        {
            info!("change stream invalidated; continuing after it (on_invalidate: continue)");
            status.restarted();
            continue;
        }
        if matches!(error, WatcherError::HistoryLost { .. })
            && spec.on_history_lost == OnHistoryLost::RestartFromLatest
        {
            error!(
                error = %error,
                "change stream history lost: events between the checkpoint and now are NOT \
                 delivered; restarting from latest (on_history_lost: restart_from_latest)"
            );
            carry.start_latest = true;
            status.restarted();
            continue;
        }
        if error.is_retryable() {
            let delay = backoff.next_delay();
            error!(error = %error, retry_in = ?delay, "watcher failed; restarting");
            status.set(State::BackingOff, Some(error.to_string()));
            status.restarted();
            tokio::select! {
                _ = cancel.cancelled() => {
                    status.set(State::Stopped, None);
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
            continue;
        }
        let state = error.state();
        error!(error = %error, %state, "watcher stopped; it needs an operator");
        status.set(state, Some(error.to_string()));
        cancel.cancelled().await;
        status.set(State::Stopped, None);
        return;
    }
}
