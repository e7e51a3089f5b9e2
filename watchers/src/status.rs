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
    /// Another replica owns the watcher (leases); this one waits to take it over.
    Standby,
}

impl State {
    pub const ALL: [State; 9] = [
        State::Starting,
        State::Running,
        State::Paused,
        State::BackingOff,
        State::HistoryLost,
        State::Invalidated,
        State::Failed,
        State::Stopped,
        State::Standby,
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
            State::Standby => "standby",
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
    /// Cluster time (as wall time) of the newest event read from the change stream.
    pub last_read_event_time: Option<DateTime>,
    /// What this process last wrote as the checkpoint.
    pub checkpoint: Option<StoredPosition>,
    /// The last error the watcher showed (`backing_off`, `failed`, ...), with when.
    pub last_error: Option<(DateTime, String)>,
    /// Cluster time (as wall time) of the oldest entry still in the oplog, as last sampled
    /// (one sampler per MongoDB deployment, every 30 s); None until the first sample, where
    /// the server does not let us read `local.oplog.rs`, or after a failed read.
    pub oplog_oldest: Option<DateTime>,
    /// With leases: the replica that owns the watcher (this one while it runs here), if any.
    pub owner: Option<String>,
    pub counters: Counters,
    pub flow: Flow,
    /// The initial snapshot (`snapshot: initial`), once one ran or runs in this process.
    pub snapshot: Option<SnapshotStatus>,
}

/// Progress of a copy: an initial snapshot, or an on-demand backfill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStatus {
    /// Still copying, or every copied document acknowledged and the stream reading.
    pub done: bool,
    /// Documents whose records Kinesis acknowledged, counting those an earlier process copied
    /// before a restart (`copied_before`).
    pub copied: u64,
    /// Of `copied`, those acknowledged before this life began (a resumed copy).
    pub copied_before: u64,
    /// The collection's `estimatedDocumentCount` when the copy (re)started.
    pub estimated_total: Option<u64>,
    /// When this life's copy began: the rate counts from here.
    pub started_at: DateTime,
    /// When every copied record was acknowledged.
    pub finished_at: Option<DateTime>,
    /// `_id` ranges copied side by side (`snapshot_parallelism`, fewer for a small
    /// collection).
    pub ranges: usize,
    /// The on-demand backfill's filter, if it copies a subset.
    pub filter: Option<bson::Document>,
}

impl SnapshotStatus {
    /// Documents per second this life has copied (to `now`, or to the end).
    pub fn rate(&self, now: DateTime) -> f64 {
        let end = self.finished_at.unwrap_or(now);
        let secs = (end.timestamp_millis() - self.started_at.timestamp_millis()) as f64 / 1000.0;
        match secs > 0.0 {
            true => (self.copied - self.copied_before) as f64 / secs,
            false => 0.0,
        }
    }

    /// Seconds left at the current rate; `None` without an estimate or a rate.
    pub fn eta_seconds(&self, now: DateTime) -> Option<f64> {
        if self.done {
            return Some(0.0);
        }
        let rate = self.rate(now);
        let left = self.estimated_total?.saturating_sub(self.copied) as f64;
        (rate > 0.0).then(|| left / rate)
    }

    /// `copied` over the estimated total, at most 1 (1 once done); `None` without an estimate.
    pub fn progress(&self) -> Option<f64> {
        if self.done {
            return Some(1.0);
        }
        let total = self.estimated_total?;
        Some(match total {
            0 => 0.0,
            t => (self.copied as f64 / t as f64).min(1.0),
        })
    }
}

/// A checkpoint as written: where a restart resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPosition {
    /// The resume token as relaxed Extended JSON text (opaque).
    pub token: Option<String>,
    /// Cluster time (as wall time) of the newest event at or before it.
    pub cluster_time: Option<DateTime>,
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
    /// Shards over their limit whose rejected records are being paced, by number
    /// (`shardId-000000000003` is 3).
    pub paced_shards: Vec<u64>,
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

    /// Wall clock minus the cluster time of the newest event read; 0 when caught up or before
    /// the first event, so a quiet collection reads 0, not a growing number.
    pub fn read_lag_seconds(&self, now: DateTime) -> f64 {
        match self.last_read_event_time {
            Some(t) if !self.caught_up => since(now, t),
            _ => 0.0,
        }
    }

    /// Wall clock minus the cluster time of the stored checkpoint: how much a restart would
    /// replay. 0 when caught up (the next checkpoint, within one `checkpoint_interval`, then
    /// holds everything read) or before the first checkpoint with a time.
    pub fn committed_lag_seconds(&self, now: DateTime) -> f64 {
        match self.checkpoint.as_ref().and_then(|c| c.cluster_time) {
            Some(t) if !self.caught_up => since(now, t),
            _ => 0.0,
        }
    }

    /// How long before a restart can no longer resume: the cluster time of the stored
    /// checkpoint minus the oldest entry still in the oplog. A caught-up watcher's next
    /// checkpoint (within one `checkpoint_interval`) holds the post-batch token of its last
    /// empty read, so its checkpoint counts as now. None when either side is unknown (no
    /// checkpoint loaded or written, or none with a time yet; no oplog sample);
    /// negative when the checkpoint is already older than the oplog (history lost).
    ///
    /// The checkpoint's time is that of the newest event at or before it, so a stopped or
    /// paused watcher of a quiet collection shows less headroom than its token really has.
    pub fn oplog_headroom_seconds(&self, now: DateTime) -> Option<f64> {
        let oldest = self.oplog_oldest?;
        let checkpoint = self.checkpoint.as_ref()?;
        let resume = if self.caught_up {
            now
        } else {
            checkpoint.cluster_time?
        };
        Some((resume.timestamp_millis() - oldest.timestamp_millis()) as f64 / 1000.0)
    }

    /// Seconds since the last checkpoint write, if any.
    pub fn checkpoint_age_seconds(&self, now: DateTime) -> Option<f64> {
        self.last_checkpoint_at
            .map(|t| ((now.timestamp_millis() - t.timestamp_millis()).max(0) as f64) / 1000.0)
    }
}

/// A cluster time as wall time (its seconds).
pub fn wall_time(ts: bson::Timestamp) -> DateTime {
    DateTime::from_millis(i64::from(ts.time) * 1000)
}

fn since(now: DateTime, t: DateTime) -> f64 {
    ((now.timestamp_millis() - t.timestamp_millis()).max(0) as f64) / 1000.0
}

/// The writing side, owned by the watcher's task.
#[derive(Debug, Clone)]
pub struct StatusTx(watch::Sender<Status>);

impl StatusTx {
    pub fn channel() -> (Self, watch::Receiver<Status>) {
        let (tx, rx) = watch::channel(Status::default());
        (Self(tx), rx)
    }

    /// Moves to `state`. A reason given with a state that is not `running`, `starting`,
    /// `paused` or `stopped` is also kept as the last error, with the time.
    pub fn set(&self, state: State, reason: Option<String>) {
        self.0.send_modify(|s| {
            let is_error = !matches!(
                state,
                State::Running | State::Starting | State::Paused | State::Stopped | State::Standby
            );
            if let (true, Some(r)) = (is_error, &reason) {
                let repeated = s.last_error.as_ref().is_some_and(|(_, last)| last == r);
                if !repeated {
                    s.last_error = Some((DateTime::now(), r.clone()));
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime {
        DateTime::from_millis(secs * 1000)
    }

    #[test]
    fn lags_count_from_the_newest_read_and_the_checkpoint_and_are_0_when_caught_up() {
        let mut s = Status {
            last_read_event_time: Some(at(100)),
            checkpoint: Some(StoredPosition {
                token: None,
                cluster_time: Some(at(90)),
            }),
            ..Status::default()
        };
        assert_eq!(s.read_lag_seconds(at(103)), 3.0);
        assert_eq!(s.committed_lag_seconds(at(103)), 13.0);
        s.caught_up = true;
        assert_eq!(
            s.read_lag_seconds(at(1000)),
            0.0,
            "a quiet collection reads 0"
        );
        assert_eq!(s.committed_lag_seconds(at(1000)), 0.0);
    }

    #[test]
    fn oplog_headroom_is_the_checkpoint_minus_the_oldest_entry_and_unknown_without_either() {
        let mut s = Status {
            checkpoint: Some(StoredPosition {
                token: Some("{\"_data\": \"00\"}".into()),
                cluster_time: Some(at(1000)),
            }),
            ..Status::default()
        };
        assert_eq!(s.oplog_headroom_seconds(at(5000)), None, "no sample yet");
        s.oplog_oldest = Some(at(400));
        assert_eq!(s.oplog_headroom_seconds(at(5000)), Some(600.0));
        s.caught_up = true;
        assert_eq!(
            s.oplog_headroom_seconds(at(5000)),
            Some(4600.0),
            "caught up: the next checkpoint is now"
        );
        s.caught_up = false;
        s.oplog_oldest = Some(at(1300));
        assert_eq!(
            s.oplog_headroom_seconds(at(5000)),
            Some(-300.0),
            "the oplog moved past the checkpoint: history lost"
        );
        s.checkpoint = Some(StoredPosition {
            token: Some("{\"_data\": \"00\"}".into()),
            cluster_time: None,
        });
        assert_eq!(s.oplog_headroom_seconds(at(5000)), None, "no time known");
        s.checkpoint = None;
        s.caught_up = true;
        assert_eq!(s.oplog_headroom_seconds(at(5000)), None, "no checkpoint");
    }

    #[test]
    fn errors_are_kept_with_their_time_and_running_keeps_the_last_one() {
        let (tx, rx) = StatusTx::channel();
        tx.set(State::BackingOff, Some("kinesis down".into()));
        let first = rx.borrow().last_error.clone().expect("kept");
        assert_eq!(first.1, "kinesis down");
        tx.set(State::BackingOff, Some("kinesis down".into()));
        assert_eq!(
            rx.borrow().last_error,
            Some(first.clone()),
            "same error, first time kept"
        );
        tx.set(State::Running, None);
        assert_eq!(rx.borrow().last_error, Some(first), "history, not state");
        tx.set(State::Paused, Some("operator".into()));
        assert_eq!(
            rx.borrow().last_error.as_ref().map(|e| e.1.as_str()),
            Some("kinesis down")
        );
        tx.set(State::Failed, Some("conflict".into()));
        assert_eq!(
            rx.borrow().last_error.as_ref().map(|e| e.1.as_str()),
            Some("conflict")
        );
    }
}
