//! What a watcher is doing, published through a `watch` channel for the supervisor, the logs
//! and (later) the HTTP API. One enum, one place that moves between states.

use std::fmt;

use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Starting,
    Running,
    Paused,
    BackingOff,
    HistoryLost,
    Invalidated,
    Failed,
    Stopped,
}

impl State {
    pub const ALL: [State; 8] = [
        State::Starting,
        State::Running,
        State::Paused,
        State::BackingOff,
        State::HistoryLost,
        State::Invalidated,
        State::Failed,
        State::Stopped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Paused => "paused",
            State::BackingOff => "backing_off",
            State::HistoryLost => "history_lost",
            State::Invalidated => "invalidated",
            State::Failed => "failed",
            State::Stopped => "stopped",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of one watcher.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub state: State,
    /// Why the watcher is not running, in words an operator can act on.
    pub reason: Option<String>,
    /// Times the supervisor restarted this watcher after an error.
    pub restarts: u64,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: State::Starting,
            reason: None,
            restarts: 0,
        }
    }
}

/// The writing side, owned by the watcher's task.
#[derive(Debug, Clone)]
pub struct StatusTx(watch::Sender<Status>);

impl StatusTx {
    pub fn channel() -> (Self, watch::Receiver<Status>) {
        let (tx, rx) = watch::channel(Status::default());
        (Self(tx), rx)
    }

    pub fn set(&self, state: State, reason: Option<String>) {
        self.0.send_modify(|s| {
            s.state = state;
            s.reason = reason;
        });
    }

    pub fn restarted(&self) {
        self.0.send_modify(|s| s.restarts += 1);
    }

    pub fn get(&self) -> Status {
        self.0.borrow().clone()
    }
}
