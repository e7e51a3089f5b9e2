//! The validated settings of one watcher. The binary builds these from its config file; the
//! pipeline only ever sees typed, checked values.

use std::time::Duration;

use bson::{Bson, DateTime, Document};

use crate::record::{FieldPath, RecordFormat};

/// Where a watcher starts when it has no checkpoint. A stored checkpoint always wins.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAt {
    /// Only changes after the watcher first starts; resolved once and stored at once.
    Latest,
    /// Changes from this wall-clock time on (`startAtOperationTime`).
    Timestamp(DateTime),
    /// Changes after this resume token.
    ResumeToken(Bson),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullDocument {
    Off,
    #[default]
    UpdateLookup,
    WhenAvailable,
    Required,
}

/// Whether events carry `fullDocumentBeforeChange`, the document as it was before the change.
/// The server has one only on a collection with `changeStreamPreAndPostImages` enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullDocumentBeforeChange {
    #[default]
    Off,
    /// The pre-image when the server has one; events without one are sent without it.
    WhenAvailable,
    /// The server fails the change stream at an event whose pre-image is missing.
    Required,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnHistoryLost {
    #[default]
    Fail,
    RestartFromLatest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInvalidate {
    #[default]
    Stop,
    Continue,
}

/// What to do with a change event that cannot be decoded even leniently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUndeliverable {
    /// Stop the watcher (`failed`), naming the event's token and document key.
    #[default]
    Fail,
    /// Skip exactly that event (logged and counted) and go on.
    Skip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnOversized {
    #[default]
    Fail,
    Skip,
    /// The whole event to S3 ([`WatcherSpec::s3`]), a pointer record in its place.
    S3,
}

/// Where `on_oversized: s3` puts events too large for a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Target {
    pub bucket: String,
    /// Prepended to every object key as is (`cdc/` gives `cdc/<watcher>/...`).
    pub prefix: String,
}

/// How records reach Kinesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// One event per Kinesis record.
    #[default]
    None,
    /// A key's pending events packed into one record in the KPL aggregated format.
    Kpl,
}

/// Whether the change stream ends with `$changeStreamSplitLargeEvent`, so that an event over
/// 16 MiB arrives as fragments (reassembled before encoding) instead of failing the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitLargeEvents {
    /// Where the server supports the stage.
    #[default]
    Auto,
    On,
    Off,
}

/// Whether a watcher copies its collection before it streams changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Snapshot {
    /// Only changes (the stream starts at `start_at`).
    #[default]
    Never,
    /// On a first start (no checkpoint), the stream's start is stored, then the collection is
    /// copied in `_id` ranges as `operationType: "snapshot"` records while the stream is read
    /// from the stored start. The copy's progress is checkpointed, so a restart continues it.
    Initial,
}

/// Everything one watcher needs to know about its job.
#[derive(Debug, Clone)]
pub struct WatcherSpec {
    /// `[a-z0-9_-]+`, unique; the checkpoint key.
    pub name: String,
    pub database: String,
    pub collection: String,
    pub stream: String,
    pub partition_key: FieldPath,
    pub full_document: FullDocument,
    pub full_document_before_change: FullDocumentBeforeChange,
    pub pipeline: Vec<Document>,
    pub start_at: StartAt,
    pub on_history_lost: OnHistoryLost,
    pub on_invalidate: OnInvalidate,
    pub on_oversized: OnOversized,
    /// Set when `on_oversized` is `s3` (the config refuses `s3` without it).
    pub s3: Option<S3Target>,
    pub aggregation: Aggregation,
    pub split_large_events: SplitLargeEvents,
    /// Copy the collection on a first start, beside the stream (`snapshot`, default `never`).
    pub snapshot: Snapshot,
    /// `_id` ranges a copy reads side by side (`snapshot_parallelism`, 1..=16, default 1).
    pub snapshot_parallelism: usize,
    pub on_undeliverable: OnUndeliverable,
    pub record_format: RecordFormat,
    pub batch: BatchSettings,
    pub checkpoint_interval: Duration,
}

/// How records are grouped into PutRecords calls and retried.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSettings {
    /// Records per call, at most 500.
    pub max_records: usize,
    /// Bytes per call (`max_batch_bytes`), kept within the stream's call limit; `None` takes
    /// that limit (5 MiB, or up to 10 MiB on a stream with raised record size).
    pub max_bytes: Option<usize>,
    /// How long a ready record may wait for more to fill its call.
    pub linger: Duration,
    /// PutRecords calls in flight at once (they never share a partition key).
    pub max_in_flight: usize,
    /// Records read but not yet acknowledged before reading pauses.
    pub max_pending: usize,
    /// Bytes of events read but not yet acknowledged before reading pauses.
    pub max_pending_bytes: usize,
    /// Failed attempts of one record before the watcher fails; `None` retries forever.
    pub max_put_retries: Option<u32>,
    /// First delay of the stream backoff, once calls fail whole; doubles with jitter.
    pub retry_initial_backoff: Duration,
    /// Longest stream backoff, once calls fail whole in a row.
    pub retry_max_backoff: Duration,
    /// First retry delay of one rejected record while the stream accepts others; doubles
    /// with the record's attempts, with full jitter.
    pub record_retry_initial_backoff: Duration,
    /// Longest delay of one rejected record while the stream accepts others.
    pub record_retry_max_backoff: Duration,
}

/// Default of `max_pending_bytes` for one watcher.
pub const DEFAULT_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;
/// Default of the process-wide `limits.max_pending_bytes`, shared by all watchers.
pub const DEFAULT_PROCESS_MAX_PENDING_BYTES: usize = 256 * 1024 * 1024;

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_records: crate::batch::MAX_BATCH_RECORDS,
            max_bytes: None,
            linger: Duration::from_millis(50),
            max_in_flight: 4,
            max_pending: 10_000,
            max_pending_bytes: DEFAULT_MAX_PENDING_BYTES,
            max_put_retries: None,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(10),
            record_retry_initial_backoff: Duration::from_millis(10),
            record_retry_max_backoff: Duration::from_millis(40),
        }
    }
}
