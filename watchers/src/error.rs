//! The one error type of the pipeline, classified once: retryable errors restart the watcher
//! with backoff; the others park it in a named state until an operator acts.

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
            Self::Mongo(_) | Self::CheckpointTableMissing { .. } | Self::Checkpoint { .. } => {
                State::BackingOff
            }
            Self::CheckpointConflict { .. }
            | Self::CorruptCheckpoint { .. }
            | Self::Oversized { .. }
            | Self::PutRetriesExhausted { .. }
            | Self::MissingResumeToken => State::Failed,
        }
    }

    /// Whether the supervisor should start the watcher again after a backoff.
    pub fn is_retryable(&self) -> bool {
        self.state() == State::BackingOff
    }
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
