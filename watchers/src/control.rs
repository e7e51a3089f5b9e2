//! How the outside (the HTTP API) talks to a watcher: a command channel answered through a
//! oneshot, and a `watch` receiver of its status. The API never touches pipeline internals;
//! the pipeline never knows HTTP.

use std::sync::Arc;
use std::time::Duration;

use bson::{Bson, DateTime};
use tokio::sync::{mpsc, oneshot, watch};

use crate::spec::WatcherSpec;
use crate::status::{State, Status};

/// Where a rewind sends a watcher.
#[derive(Debug, Clone, PartialEq)]
pub enum RewindTarget {
    /// Replay from this wall-clock time (startAtOperationTime).
    Time(DateTime),
    /// Skip to now.
    Latest,
    /// Replay after this resume token.
    Token(Bson),
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request itself is wrong (e.g. a time in the future, a malformed token): 400.
    #[error("{0}")]
    Invalid(String),
    /// The target exists no more (older than the oplog window, unknown token): 409.
    #[error("{0}")]
    Conflict(String),
    /// The watcher could not carry the command out (MongoDB or DynamoDB unreachable): 503.
    #[error("{0}")]
    Unavailable(String),
    /// The watcher task is gone (shutting down): 503.
    #[error("watcher is shutting down")]
    Gone,
}

/// A command and where its answer goes.
#[derive(Debug)]
pub enum Command {
    /// Flush in-flight records, write the checkpoint (marked paused), stop reading.
    Pause(oneshot::Sender<Result<(), ControlError>>),
    /// Continue from the checkpoint.
    Resume(oneshot::Sender<Result<(), ControlError>>),
    /// Flush, then restart the stream at the target (a paused watcher stays paused there).
    Rewind(RewindTarget, oneshot::Sender<Result<(), ControlError>>),
    /// Copy the collection's documents (those matching the filter, if any) again as snapshot
    /// records while the change stream keeps its position; answered once the copy has begun.
    /// Refused (409) while a copy runs, and by a watcher that is not running.
    Snapshot(SnapshotRequest, oneshot::Sender<Result<(), ControlError>>),
}

/// An on-demand backfill (`POST /watchers/{name}/snapshot`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotRequest {
    /// Only documents matching this query filter (as for `find`); `None` copies them all.
    pub filter: Option<bson::Document>,
}

/// The API's view of one watcher.
#[derive(Debug, Clone)]
pub struct WatcherHandle {
    pub spec: Arc<WatcherSpec>,
    pub status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
}

/// Commands queued per watcher before senders wait.
const COMMAND_QUEUE: usize = 16;

impl WatcherHandle {
    /// A handle and the receiving end the watcher's task owns.
    pub fn new(
        spec: Arc<WatcherSpec>,
        status: watch::Receiver<Status>,
    ) -> (Self, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        (
            Self {
                spec,
                status,
                commands: tx,
            },
            rx,
        )
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The state alone, and the reason only where the watcher is not running: what a
    /// readiness probe reads, without copying the whole status of every watcher.
    pub fn state(&self) -> (State, Option<String>) {
        let status = self.status.borrow();
        let reason = match status.state {
            State::Running => None,
            _ => status.reason.clone(),
        };
        (status.state, reason)
    }

    pub async fn pause(&self, timeout: Duration) -> Result<(), ControlError> {
        self.send(Command::Pause, timeout).await
    }

    pub async fn resume(&self, timeout: Duration) -> Result<(), ControlError> {
        self.send(Command::Resume, timeout).await
    }

    pub async fn rewind(
        &self,
        target: RewindTarget,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        if let RewindTarget::Time(t) = &target {
            if *t > DateTime::now() {
                return Err(ControlError::Invalid(format!(
                    "rewind target {} is in the future",
                    t.try_to_rfc3339_string().unwrap_or_default()
                )));
            }
        }
        self.send(|reply| Command::Rewind(target, reply), timeout)
            .await
    }

    /// Starts an on-demand backfill (see [`Command::Snapshot`]).
    pub async fn snapshot(
        &self,
        request: SnapshotRequest,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        self.send(|reply| Command::Snapshot(request, reply), timeout)
            .await
    }

    async fn send(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), ControlError>>) -> Command,
        timeout: Duration,
    ) -> Result<(), ControlError> {
        let (tx, rx) = oneshot::channel();
        let exchange = async {
            self.commands
                .send(make(tx))
                .await
                .map_err(|_| ControlError::Gone)?;
            rx.await.map_err(|_| ControlError::Gone)?
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ControlError::Unavailable(format!(
                "watcher `{}` did not answer within {timeout:?}; the command may still complete \
                 (check GET /watchers/{})",
                self.spec.name, self.spec.name
            ))),
        }
    }
}
