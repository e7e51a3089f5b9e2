//! One mongo-watcher pipeline: a MongoDB change stream into a Kinesis stream, with the resume
//! token checkpointed in DynamoDB only once Kinesis has acknowledged everything before it.
//!
//! Roles, one module each: [`reader`] (change stream), [`snapshot`] (the initial copy),
//! [`split`] (split events joined),
//! [`record`] (event to record),
//! [`batch`] (per-key scheduling), [`aggregate`] (KPL aggregated records), [`kinesis`] (one PutRecords call), [`ack`] (the frontier),
//! [`checkpoint`] (DynamoDB), [`flow`] (retry delays, the send limit, byte budgets),
//! [`pipeline`] (the loop), [`lease`] (which replica owns a watcher), [`status`] (what it is doing), [`stream_limits`] (each stream's
//! record and call size), [`claim_check`] (events too large for a record, to S3); [`fault`] holds the faults tests
//! inject (compiled in only with the `fault-injection` feature).

pub mod ack;
pub mod aggregate;
pub mod batch;
pub mod bson_walk;
pub mod checkpoint;
pub mod claim_check;
pub mod control;
pub mod error;
pub mod fault;
pub mod flow;
pub mod kinesis;
pub mod lease;
pub mod metrics;
pub mod pipeline;
pub mod reader;
pub mod record;
pub mod retry;
pub mod snapshot;
pub mod spec;
pub mod split;
pub mod status;
pub mod stream_limits;

pub use error::WatcherError;
pub use pipeline::Deps;
pub use spec::WatcherSpec;
pub use status::{State, Status, StatusTx};
