//! What a watcher is doing, published through a `watch` channel for the supervisor, the logs
//! and (later) the HTTP API. One enum, one place that moves between states.

use std::collections::BTreeMap;
use std::fmt;

use bson::DateTime;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum State {
    #[default]
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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Status {
    pub state: State,
    /// Why the watcher is not running, in words an operator can act on.
    pub reason: Option<String>,
    /// Paused by an operator (stored with the checkpoint).
    pub paused: bool,
    /// Times the supervisor restarted this watcher after an error.
    pub restarts: u64,
    /// Cluster time (as wall time) of the newest event acknowledged by Kinesis.
    pub last_event_time: Option<DateTime>,
    /// Nothing read is waiting for Kinesis and the last read came back empty.
    pub caught_up: bool,
    /// When the checkpoint was last written.
    pub last_checkpoint_at: Option<DateTime>,
    pub counters: Counters,
    pub flow: Flow,
}

/// How the watcher is sending: its adaptive limit and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Flow {
    /// PutRecords calls allowed in flight now (1 to `max_in_flight`; halved when calls fail
    /// whole, raised by one per call that gets through).
    pub send_limit: usize,
    pub calls_in_flight: usize,
    /// Records read and not yet acknowledged (queued, in flight or waiting to be retried).
    pub pending_records: usize,
    /// Bytes of those records.
    pub pending_bytes: usize,
    /// Records Kinesis rejected that wait for their own retry delay.
    pub records_delayed: usize,
    /// Records Kinesis rejected since the process started, by error code.
    pub rejected: BTreeMap<String, u64>,
}

/// Totals since the process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counters {
    pub events: u64,
    pub records_put: u64,
    pub put_retries: u64,
    pub records_skipped: u64,
    pub checkpoint_writes: u64,
}

impl Status {
    /// Wall clock minus the cluster time of the newest acknowledged event; 0 when caught up
    /// or before the first event.
    pub fn lag_seconds(&self, now: DateTime) -> f64 {
        match self.last_event_time {
            Some(t) if !self.caught_up => {
                ((now.timestamp_millis() - t.timestamp_millis()).max(0) as f64) / 1000.0
            }
            _ => 0.0,
        }
    }

    /// Seconds since the last checkpoint write, if any.
    pub fn checkpoint_age_seconds(&self, now: DateTime) -> Option<f64> {
        self.last_checkpoint_at
            .map(|t| ((now.timestamp_millis() - t.timestamp_millis()).max(0) as f64) / 1000.0)
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

    /// Any other change, in one notification.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        self.0.send_modify(f);
    }

    pub fn get(&self) -> Status {
        self.0.borrow().clone()
    }
}
