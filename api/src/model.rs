//! The JSON bodies of the API (their schemas are what `/openapi.json` publishes).

use bson::DateTime;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;
use watchers::control::WatcherHandle;

use watchers::status::{Counters, Flow, State};

/// What a watcher is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WatcherState {
    Starting,
    Running,
    Paused,
    BackingOff,
    HistoryLost,
    Invalidated,
    Failed,
    Stopped,
    /// Another replica owns the watcher (leases); this one takes it over if that one goes.
    Standby,
}

impl From<State> for WatcherState {
    // Exhaustive on purpose: a new watcher state does not compile until it is published here.
    fn from(s: State) -> Self {
        match s {
            State::Starting => WatcherState::Starting,
            State::Running => WatcherState::Running,
            State::Paused => WatcherState::Paused,
            State::BackingOff => WatcherState::BackingOff,
            State::HistoryLost => WatcherState::HistoryLost,
            State::Invalidated => WatcherState::Invalidated,
            State::Failed => WatcherState::Failed,
            State::Stopped => WatcherState::Stopped,
            State::Standby => WatcherState::Standby,
        }
    }
}

/// Totals since the process started.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CountersView {
    pub events: u64,
    pub records_put: u64,
    pub put_retries: u64,
    pub records_skipped: u64,
    pub checkpoint_writes: u64,
}

impl From<Counters> for CountersView {
    fn from(c: Counters) -> Self {
        Self {
            events: c.events,
            records_put: c.records_put,
            put_retries: c.put_retries,
            records_skipped: c.records_skipped,
            checkpoint_writes: c.checkpoint_writes,
        }
    }
}

/// How the watcher is sending: its adaptive limit and what it holds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FlowView {
    /// PutRecords calls allowed in flight now: `max_in_flight` while calls get through,
    /// halved each time a call fails whole or has nothing acknowledged, at least 1.
    pub send_limit: usize,
    pub calls_in_flight: usize,
    /// Records read and not yet acknowledged (queued, in flight or waiting to be retried).
    pub pending_records: usize,
    /// Bytes of those records.
    pub pending_bytes: usize,
    /// Records Kinesis rejected that wait for their own retry delay.
    pub records_delayed: usize,
    /// Shards over their limit (Kinesis rejected records of theirs with
    /// `ProvisionedThroughputExceededException`) whose rejected records go again at 1.5 times
    /// what the shard accepted over the last second.
    pub paced_shards: Vec<String>,
    /// Records Kinesis rejected since the process started, by error code.
    pub rejected: BTreeMap<String, u64>,
}

impl From<Flow> for FlowView {
    fn from(f: Flow) -> Self {
        Self {
            send_limit: f.send_limit,
            calls_in_flight: f.calls_in_flight,
            pending_records: f.pending_records,
            pending_bytes: f.pending_bytes,
            records_delayed: f.records_delayed,
            paced_shards: f
                .paced_shards
                .iter()
                .map(|n| format!("shardId-{n:012}"))
                .collect(),
            rejected: f.rejected,
        }
    }
}

/// A stored checkpoint.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CheckpointView {
    /// The resume token (Extended JSON, opaque).
    #[schema(value_type = Option<Object>)]
    pub resume_token: Option<serde_json::Value>,
    /// Cluster time of the newest event at or before it (RFC 3339).
    #[schema(format = DateTime)]
    pub cluster_time: Option<String>,
}

/// An error the watcher showed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct LastErrorView {
    pub message: String,
    /// When it was first shown (RFC 3339).
    #[schema(format = DateTime)]
    pub at: Option<String>,
}

/// One watcher: what it watches, where it writes, and how it is doing.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct WatcherView {
    pub name: String,
    pub database: String,
    pub collection: String,
    /// The Kinesis stream.
    pub stream: String,
    pub state: WatcherState,
    /// Why the watcher is not running, in words an operator can act on.
    pub reason: Option<String>,
    /// Paused by an operator.
    pub paused: bool,
    /// Cluster time of the newest event Kinesis acknowledged (RFC 3339).
    #[schema(format = DateTime)]
    pub last_event_time: Option<String>,
    /// When the checkpoint was last written (RFC 3339).
    #[schema(format = DateTime)]
    pub last_checkpoint_at: Option<String>,
    /// Wall clock minus `last_event_time`; 0 when caught up or before the first event.
    pub lag_seconds: f64,
    /// Wall clock minus the newest event read; 0 when caught up.
    pub read_lag_seconds: f64,
    /// Wall clock minus the stored checkpoint's cluster time (what a restart would replay);
    /// 0 when caught up.
    pub committed_lag_seconds: f64,
    /// The stored checkpoint's cluster time (now when caught up) minus the oldest entry
    /// still in the oplog, sampled every 30 s: how long before a restart can no longer
    /// resume. Negative when history is already lost; null when unknown (no checkpoint
    /// with a time yet, no sample yet, or `local.oplog.rs` not readable).
    pub oplog_headroom_seconds: Option<f64>,
    /// The checkpoint this process last wrote: where a restart resumes.
    pub checkpoint: Option<CheckpointView>,
    /// The last error the watcher showed, with when.
    pub last_error: Option<LastErrorView>,
    /// With leases: the replica that owns the watcher (null while nobody does, and without
    /// leases).
    pub owner: Option<String>,
    /// Times the supervisor restarted the watcher after an error.
    pub restarts: u64,
    pub counters: CountersView,
    pub flow: FlowView,
    /// The initial snapshot (`snapshot: initial`) or an on-demand one (`POST
    /// /watchers/{name}/snapshot`) while it copies, and after it finished in this process;
    /// null otherwise.
    pub snapshot: Option<SnapshotView>,
}

/// Progress of a snapshot.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotView {
    /// `copying`, or `done` once every copied document is acknowledged and changes stream.
    pub state: String,
    /// Documents acknowledged by Kinesis, those copied before a restart included.
    pub documents_copied: u64,
    /// The collection's `estimatedDocumentCount` when the copy (re)started.
    pub estimated_total: Option<u64>,
    /// Documents per second since this process (re)started the copy.
    pub documents_per_second: f64,
    /// Seconds left at that rate; null without an estimate or a rate yet.
    pub eta_seconds: Option<f64>,
    /// `_id` ranges copied side by side.
    pub ranges: usize,
    /// The query filter of an on-demand snapshot that copies a subset (relaxed Extended JSON);
    /// null when every document is copied.
    #[schema(value_type = Option<Object>)]
    pub filter: Option<serde_json::Value>,
}

impl SnapshotView {
    fn new(s: &watchers::status::SnapshotStatus, now: DateTime) -> Self {
        Self {
            state: if s.done { "done" } else { "copying" }.to_owned(),
            documents_copied: s.copied,
            estimated_total: s.estimated_total,
            documents_per_second: s.rate(now),
            eta_seconds: s.eta_seconds(now),
            ranges: s.ranges,
            filter: s
                .filter
                .clone()
                .map(|f| bson::Bson::Document(f).into_relaxed_extjson()),
        }
    }
}

impl WatcherView {
    pub fn new(handle: &WatcherHandle, now: DateTime) -> Self {
        let status = handle.status();
        let spec = &handle.spec;
        Self {
            name: spec.name.clone(),
            database: spec.database.clone(),
            collection: spec.collection.clone(),
            stream: spec.stream.clone(),
            state: status.state.into(),
            lag_seconds: status.lag_seconds(now),
            read_lag_seconds: status.read_lag_seconds(now),
            committed_lag_seconds: status.committed_lag_seconds(now),
            oplog_headroom_seconds: status.oplog_headroom_seconds(now),
            checkpoint: status.checkpoint.clone().map(|c| CheckpointView {
                resume_token: c.token.and_then(|t| serde_json::from_str(&t).ok()),
                cluster_time: c.cluster_time.and_then(rfc3339),
            }),
            last_error: status
                .last_error
                .clone()
                .map(|(at, message)| LastErrorView {
                    message,
                    at: rfc3339(at),
                }),
            reason: status.reason,
            paused: status.paused,
            last_event_time: status.last_event_time.and_then(rfc3339),
            last_checkpoint_at: status.last_checkpoint_at.and_then(rfc3339),
            owner: status.owner,
            restarts: status.restarts,
            counters: status.counters.into(),
            flow: status.flow.into(),
            snapshot: status.snapshot.as_ref().map(|s| SnapshotView::new(s, now)),
        }
    }
}

pub(crate) fn rfc3339(t: DateTime) -> Option<String> {
    t.try_to_rfc3339_string().ok()
}

/// `GET /watchers`.
#[derive(Debug, Serialize, ToSchema)]
pub struct WatcherList {
    /// In config order.
    pub watchers: Vec<WatcherView>,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unhealthy`.
    pub status: HealthStatus,
    /// Why the process is unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The supervisor's last heartbeat (RFC 3339), when unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub last_heartbeat: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
    Unhealthy,
}

/// `GET /readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    pub status: ReadinessStatus,
    /// The watchers that are neither running nor paused by an operator (empty when ready).
    pub watchers: Vec<NotReady>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadinessStatus {
    Ready,
    NotReady,
}

/// A watcher that keeps the process from being ready.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotReady {
    pub name: String,
    pub state: WatcherState,
    pub reason: Option<String>,
}

/// `POST /watchers/{name}/rewind`: exactly one of `to` and `resume_token`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RewindRequest {
    /// An RFC 3339 time in the past to replay from, or `latest` to skip to now.
    #[schema(examples("2024-05-01T12:00:00Z", "latest"))]
    pub to: Option<String>,
    /// A change stream resume token (Extended JSON object) to replay after.
    #[schema(value_type = Option<Object>, examples(json!({"_data": "826..."})))]
    pub resume_token: Option<serde_json::Value>,
}

/// `POST /watchers/{name}/snapshot`: an empty body or `{}` copies every document.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// A query filter (as for `find`), in MongoDB Extended JSON, relaxed or canonical: only
    /// the documents it matches are copied.
    #[schema(value_type = Option<Object>, examples(
        json!({"status": "active"}),
        json!({"_id": {"$gte": {"$oid": "665f1c2e8b3e4a0012345678"}}})
    ))]
    pub filter: Option<serde_json::Value>,
}
