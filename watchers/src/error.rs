//! The one error type of the pipeline, classified once: retryable errors restart the watcher
//! with backoff; the others park it in a named state until an operator acts.

use std::time::Duration;

use crate::status::State;

#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    #[error("mongodb: {}", summary(.0))]
    Mongo(#[from] mongodb::error::Error),

    #[error("change stream history lost: the resume point is no longer in the oplog ({message})")]
    HistoryLost { message: String },

    #[error("the change stream was invalidated (collection dropped or renamed)")]
    Invalidated,

    #[error(
        "checkpoint table `{table}` does not exist; create it with one string hash key named \
         `{key}` (see migrations/)"
    )]
    CheckpointTableMissing { table: String, key: &'static str },

    #[error("checkpoint table `{table}`: {operation} failed: {message}")]
    Checkpoint {
        table: String,
        operation: &'static str,
        message: String,
    },

    #[error(
        "checkpoint of watcher `{watcher}` was changed by another writer (expected revision \
         {expected}, found {found}); is a second instance running?"
    )]
    CheckpointConflict {
        watcher: String,
        expected: u64,
        found: String,
    },

    /// A checkpoint write that may or may not have been applied; only reading the item back
    /// can tell (see `checkpoint::Checkpointer`).
    #[error("checkpoint table `{table}`: {operation} outcome unknown: {cause}")]
    CheckpointInDoubt {
        table: String,
        operation: &'static str,
        cause: InDoubt,
    },

    /// A write with an unknown outcome that the read-back showed was not applied.
    #[error(
        "checkpoint table `{table}`: the write of revision {revision} was not applied ({cause}); \
         it is retried at the next checkpoint"
    )]
    CheckpointNotApplied {
        table: String,
        revision: u64,
        cause: InDoubt,
    },

    /// A write whose outcome could not be settled because the item could not be read back;
    /// the next write settles it.
    #[error(
        "checkpoint table `{table}`: whether the write of revision {revision} was applied is \
         unknown, and reading the item back failed: {read_back}"
    )]
    CheckpointUnconfirmed {
        table: String,
        revision: u64,
        read_back: Box<WatcherError>,
    },

    #[error("stored checkpoint of watcher `{watcher}` is unreadable: {message}")]
    CorruptCheckpoint { watcher: String, message: String },

    #[error(
        "record of document {document_key} is {size} bytes, over Kinesis's limit of {limit} \
         bytes (on_oversized: fail)"
    )]
    Oversized {
        document_key: String,
        size: usize,
        limit: usize,
    },

    #[error(
        "change event with resume token {token} (document {document_key}) cannot be decoded: \
         {error}; set `on_undeliverable: skip` to skip exactly this event, or rewind past it"
    )]
    Undeliverable {
        token: String,
        document_key: String,
        error: String,
    },

    #[error("kinesis stream `{stream}` rejected a record {attempts} times (max_put_retries): {last_error}")]
    PutRetriesExhausted {
        stream: String,
        attempts: u32,
        last_error: String,
    },

    #[error("change event without a resume token (`_id`); was it removed by the pipeline?")]
    MissingResumeToken,
}

impl WatcherError {
    /// The state a watcher takes when it stops with this error.
    pub fn state(&self) -> State {
        match self {
            Self::HistoryLost { .. } => State::HistoryLost,
            Self::Invalidated => State::Invalidated,
            Self::Mongo(_)
            | Self::CheckpointTableMissing { .. }
            | Self::Checkpoint { .. }
            | Self::CheckpointInDoubt { .. }
            | Self::CheckpointNotApplied { .. }
            | Self::CheckpointUnconfirmed { .. } => State::BackingOff,
            Self::CheckpointConflict { .. }
            | Self::CorruptCheckpoint { .. }
            | Self::Oversized { .. }
            | Self::Undeliverable { .. }
            | Self::PutRetriesExhausted { .. }
            | Self::MissingResumeToken => State::Failed,
        }
    }

    /// Whether the supervisor should start the watcher again after a backoff.
    pub fn is_retryable(&self) -> bool {
        self.state() == State::BackingOff
    }
}

/// Why a checkpoint write's outcome is unknown: the request may have reached DynamoDB and been
/// applied even though no success came back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InDoubt {
    /// Our own deadline passed before any answer.
    #[error("no answer within {after:?}")]
    NoAnswer { after: Duration },
    /// The connection failed or the SDK timed out after the request may have been sent.
    #[error("the request may have been sent, then the connection failed: {detail}")]
    Transport { detail: String },
    /// An answer came that could not be read.
    #[error("the answer could not be read: {detail}")]
    UnreadableAnswer { detail: String },
    /// A 5xx: DynamoDB documents that such a request may or may not have succeeded.
    #[error("server error (HTTP {status}): {detail}")]
    ServerError { status: u16, detail: String },
}

/// MongoDB's ChangeStreamHistoryLost, and the older codes for a resume point that fell off
/// the oplog.
pub fn is_history_lost(error: &mongodb::error::Error) -> bool {
    const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
    const CAPPED_POSITION_LOST: i32 = 136;
    const CHANGE_STREAM_FATAL_ERROR: i32 = 280;
    let mongodb::error::ErrorKind::Command(command) = error.kind.as_ref() else {
        return false;
    };
    match command.code {
        CHANGE_STREAM_HISTORY_LOST | CAPPED_POSITION_LOST => true,
        // 280 is raised for several fatal conditions; only "resume point not found" means
        // history is gone.
        CHANGE_STREAM_FATAL_ERROR => {
            let message = command.message.to_ascii_lowercase();
            message.contains("resume") && message.contains("not found")
        }
        _ => false,
    }
}

/// A MongoDB error in one line an operator can read: the server's code, name and message for
/// command errors (the driver's Display also dumps the raw reply), else the driver's text.
pub fn summary(error: &mongodb::error::Error) -> String {
    match error.kind.as_ref() {
        mongodb::error::ErrorKind::Command(c) => {
            format!("error {} ({}): {}", c.code, c.code_name, c.message)
        }
        _ => error.to_string(),
    }
}

/// Whether the server refused a resume token because it belongs to another collection (a
/// rewind given another watcher's token). SecantusDB answers Unauthorized (13) saying the
/// token's namespace does not match; MongoDB refuses such a token with one of the
/// resume-token codes the rewind probe already reports as a refused token.
pub fn is_foreign_resume_token(error: &mongodb::error::Error) -> bool {
    const UNAUTHORIZED: i32 = 13;
    let mongodb::error::ErrorKind::Command(command) = error.kind.as_ref() else {
        return false;
    };
    // Only with the namespace wording: a plain Unauthorized is a permissions problem.
    command.code == UNAUTHORIZED && command.message.to_ascii_lowercase().contains("namespace")
}
