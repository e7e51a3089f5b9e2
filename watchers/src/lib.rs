//! One mongo-watcher pipeline: a MongoDB change stream into a Kinesis stream, with the resume
//! token checkpointed in DynamoDB only once Kinesis has acknowledged everything before it.
//!
//! Roles, one module each: [`reader`] (change stream), [`record`] (event to record),
//! [`batch`] (per-key scheduling), [`kinesis`] (one PutRecords call), [`ack`] (the frontier),
//! [`checkpoint`] (DynamoDB), [`flow`] (retry delays, the send limit, byte budgets),
//! [`pipeline`] (the loop), [`status`] (what it is doing).

pub mod ack;
pub mod batch;
pub mod checkpoint;
pub mod control;
pub mod error;
pub mod flow;
pub mod kinesis;
pub mod metrics;
pub mod pipeline;
pub mod reader;
pub mod record;
pub mod retry;
pub mod spec;
pub mod status;

pub use error::WatcherError;
pub use pipeline::Deps;
pub use spec::WatcherSpec;
pub use status::{State, Status, StatusTx};
