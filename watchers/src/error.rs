//! The one error type of the pipeline, classified once ([`WatcherError::retry`]): transient
//! errors and errors that wait for a fix from outside restart the watcher with backoff (shown
//! as `backing_off`); the others park it in a named state until an operator acts. Each message
//! names the resource and what to do.

use std::fmt;
use std::time::Duration;

use crate::status::State;

#[derive(Debug, thiserror::Error)]
pub enum WatcherError {
    /// Any other MongoDB failure. A change event whose required pre- or post-image the server
    /// does not have is one of these too, but is not retried (see [`missing_image`]).
    #[error("mongodb: {}{}", summary(.0), image_advice(.0))]
    Mongo(#[from] mongodb::error::Error),

    /// MongoDB refused the login (wrong user or password, wrong `authSource`, or no user for a
    /// server that requires one).
    #[error(
        "mongodb: authentication {} at {hosts} failed: {detail}; check mongodb.username, the \
         password (mongodb.password or mongodb.password_ssm_parameter) and the URI's authSource \
         against the user on the server",
        login_of(.user.as_deref())
    )]
    MongoAuth {
        user: Option<String>,
        hosts: String,
        detail: String,
    },

    /// AWS refused an operation to this process's credentials (an IAM policy).
    #[error(
        "access denied: grant `{action}` on {resource} to the task role (its IAM policy){hint} \
         (AWS said: {detail})",
        action = resource.action(.operation),
        hint = resource.hint()
    )]
    AccessDenied {
        resource: AwsResource,
        /// The API operation, as IAM names it after the service prefix (`PutRecords`).
        operation: &'static str,
        detail: String,
    },

    /// The watcher would resume from a token of another collection: its `database` or
    /// `collection` changed in the config under the same name (or `start_at` holds another
    /// collection's token). Resuming cannot succeed, so it is not retried.
    #[error(
        "{}",
        namespace_mismatch(.watcher, .origin, .written_for.as_deref(), .watching, .server.as_deref())
    )]
    NamespaceMismatch {
        watcher: String,
        origin: TokenOrigin,
        /// The namespace stored with the checkpoint; `None` for items written before it was
        /// stored, where only the server's refusal tells.
        written_for: Option<String>,
        watching: String,
        /// The server's refusal, when it was the server that found the mismatch.
        server: Option<String>,
    },

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

    /// `split_large_events: on` and the server refuses `$changeStreamSplitLargeEvent`.
    #[error(
        "split_large_events: on, but the server refuses the `$changeStreamSplitLargeEvent` \
         stage ({server}); it needs MongoDB 7.0 or 6.0.9 and later: set `split_large_events: \
         auto` to watch without it where the server lacks it (an event over 16 MiB then fails \
         the change stream)"
    )]
    SplitLargeEventsUnsupported { server: String },

    /// The fragments of an event split by `$changeStreamSplitLargeEvent` did not arrive in
    /// sequence. A new life reads the event whole again: the checkpoint is never inside one.
    #[error(
        "change event fragments (`$changeStreamSplitLargeEvent`) out of sequence: {message}; \
         the watcher restarts from its checkpoint, before the event"
    )]
    SplitEvent { message: String },

    /// A life of the watcher panicked (a bug). The supervisor caught it, so the watcher keeps
    /// its command channel and restarts from its checkpoint like after an outage.
    #[error(
        "the watcher panicked: {message}; it restarts from its checkpoint (a bug: please report \
         it with the log)"
    )]
    Panicked { message: String },
}

/// What retrying can do about a failure, decided once by the failure itself (as materialize's
/// `RetryResult`) and applied by the supervisor and the pipeline's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Likely to pass by itself (an outage, a lost answer): retried with backoff, and shown as
    /// `backing_off` once it persists.
    Transient,
    /// Waits for a fix from outside the process (a permission, a password, a missing table),
    /// which can come at any time: retried with a capped backoff, shown as `backing_off` at
    /// once, and the watcher recovers by itself once it is fixed.
    UntilFixed,
    /// Retrying cannot help: the watcher parks in this state until an operator acts.
    Never(State),
}

impl WatcherError {
    /// What retrying can do about this error: the one classification.
    pub fn retry(&self) -> Retry {
        match self {
            // The server fails at the same event after every restart: only an operator can
            // get past it.
            Self::Mongo(error) if missing_image(error).is_some() => Retry::Never(State::Failed),
            Self::Mongo(_)
            | Self::Checkpoint { .. }
            | Self::CheckpointInDoubt { .. }
            | Self::CheckpointNotApplied { .. }
            | Self::CheckpointUnconfirmed { .. }
            // The checkpoint never passes what Kinesis acknowledged, so a new life from it
            // loses nothing; a panic that recurs slows down with the restart backoff.
            | Self::Panicked { .. }
            // Read again whole from the checkpoint, which is never inside a split event.
            | Self::SplitEvent { .. } => Retry::Transient,
            Self::MongoAuth { .. }
            | Self::AccessDenied { .. }
            | Self::CheckpointTableMissing { .. } => Retry::UntilFixed,
            Self::HistoryLost { .. } => Retry::Never(State::HistoryLost),
            Self::Invalidated => Retry::Never(State::Invalidated),
            Self::NamespaceMismatch { .. }
            | Self::CheckpointConflict { .. }
            | Self::CorruptCheckpoint { .. }
            | Self::Oversized { .. }
            | Self::Undeliverable { .. }
            | Self::PutRetriesExhausted { .. }
            | Self::MissingResumeToken
            | Self::SplitLargeEventsUnsupported { .. } => Retry::Never(State::Failed),
        }
    }

    /// The state a watcher takes when it stops with this error.
    pub fn state(&self) -> State {
        match self.retry() {
            Retry::Transient | Retry::UntilFixed => State::BackingOff,
            Retry::Never(state) => state,
        }
    }

    /// Whether the supervisor should start the watcher again after a backoff.
    pub fn is_retryable(&self) -> bool {
        !matches!(self.retry(), Retry::Never(_))
    }

    /// A raw MongoDB error named by what it means (a failed login), with who logs in where;
    /// other errors are returned as they are. Applied to every error a watcher's life ends
    /// with, so a failed login is told apart wherever the driver met it.
    pub fn with_login(self, login: &MongoLogin) -> Self {
        match self {
            Self::Mongo(error) => match auth_failure(&error) {
                Some(detail) => Self::MongoAuth {
                    user: login.user.clone(),
                    hosts: login.hosts.clone(),
                    detail,
                },
                None => Self::Mongo(error),
            },
            other => other,
        }
    }
}

/// Who the watchers log in to MongoDB as, for messages (never the password).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MongoLogin {
    /// The user name, when credentials are configured.
    pub user: Option<String>,
    /// The seed hosts, `host:port` joined by commas.
    pub hosts: String,
}

fn login_of(user: Option<&str>) -> String {
    match user {
        Some(user) => format!("of user `{user}`"),
        None => "without a user (none is configured)".to_owned(),
    }
}

/// The server's words when `error` says the login failed: the driver's authentication error
/// (wrong password, unknown user), AuthenticationFailed (18), or Unauthorized (13) for a
/// command that "requires authentication" (no user configured on a server that needs one).
fn auth_failure(error: &mongodb::error::Error) -> Option<String> {
    const UNAUTHORIZED: i32 = 13;
    const AUTHENTICATION_FAILED: i32 = 18;
    match error.kind.as_ref() {
        mongodb::error::ErrorKind::Authentication { message, .. } => Some(message.clone()),
        mongodb::error::ErrorKind::Command(c) if c.code == AUTHENTICATION_FAILED => {
            Some(summary(error))
        }
        mongodb::error::ErrorKind::Command(c)
            if c.code == UNAUTHORIZED
                && c.message
                    .to_ascii_lowercase()
                    .contains("requires authentication") =>
        {
            Some(summary(error))
        }
        _ => None,
    }
}

/// An AWS resource the process needs, as operators and IAM policies name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AwsResource {
    KinesisStream(String),
    DynamoDbTable(String),
    SsmParameter(String),
    /// The bucket of `on_oversized: s3` (the claim-checked events' objects).
    S3Bucket(String),
}

impl AwsResource {
    /// The IAM action for `operation` on this resource (`kinesis:PutRecords`).
    pub fn action(&self, operation: &str) -> String {
        let service = match self {
            Self::KinesisStream(_) => "kinesis",
            Self::DynamoDbTable(_) => "dynamodb",
            Self::SsmParameter(_) => "ssm",
            Self::S3Bucket(_) => "s3",
        };
        format!("{service}:{operation}")
    }

    /// What else the grant needs, when the action alone is not enough.
    fn hint(&self) -> &'static str {
        match self {
            // A SecureString is decrypted with its KMS key on the caller's permissions.
            Self::SsmParameter(_) => ", and `kms:Decrypt` on its KMS key",
            // Granted on the objects, not on the bucket itself.
            Self::S3Bucket(_) => ", on its objects under the watcher's `s3.prefix`",
            Self::KinesisStream(_) | Self::DynamoDbTable(_) => "",
        }
    }
}

impl fmt::Display for AwsResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KinesisStream(name) => write!(f, "Kinesis stream `{name}`"),
            Self::DynamoDbTable(name) => write!(f, "DynamoDB table `{name}`"),
            Self::SsmParameter(name) => write!(f, "SSM parameter `{name}`"),
            Self::S3Bucket(name) => write!(f, "S3 bucket `{name}`"),
        }
    }
}

/// AWS error codes that say the caller's credentials may not do this (IAM). Other services
/// answer `AccessDenied` (no suffix); both mean the same to an operator.
const ACCESS_DENIED_CODES: [&str; 2] = ["AccessDeniedException", "AccessDenied"];

/// [`WatcherError::AccessDenied`] when the AWS error `code` says the credentials may not call
/// `operation` on `resource`; `None` for any other failure. The one place AWS refusals are
/// recognised, for Kinesis, DynamoDB, SSM and S3 alike.
pub fn aws_refusal(
    resource: AwsResource,
    operation: &'static str,
    code: Option<&str>,
    message: Option<&str>,
) -> Option<WatcherError> {
    let code = code.filter(|c| ACCESS_DENIED_CODES.contains(c))?;
    let detail = match message.filter(|m| !m.is_empty()) {
        Some(message) => format!("{code}: {message}"),
        None => code.to_owned(),
    };
    Some(WatcherError::AccessDenied {
        resource,
        operation,
        detail,
    })
}

/// Where the resume token a life opened its stream with came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOrigin {
    /// The watcher's checkpoint item in `table`.
    Checkpoint { table: String },
    /// The watcher's `start_at: {resume_token: ...}` setting (no checkpoint yet).
    StartAt,
}

fn namespace_mismatch(
    watcher: &str,
    origin: &TokenOrigin,
    written_for: Option<&str>,
    watching: &str,
    server: Option<&str>,
) -> String {
    let refused = server
        .map(|s| format!(" (the server refused it: {s})"))
        .unwrap_or_default();
    let rewind = format!(
        "`POST /watchers/{watcher}/rewind` with {{\"to\": \"latest\"}} or {{\"to\": \"<RFC 3339 \
         time>\"}}"
    );
    match origin {
        TokenOrigin::Checkpoint { table } => {
            let written = match written_for {
                Some(ns) => format!("was written for `{ns}`"),
                None => "holds a resume token of another collection".to_owned(),
            };
            format!(
                "the checkpoint of watcher `{watcher}` {written}{refused}, the watcher now watches \
                 `{watching}` (its database or collection changed in the config); move on with \
                 {rewind}, or delete its item from checkpoint table `{table}` (watcher = \
                 `{watcher}`) and `POST /watchers/{watcher}/resume`"
            )
        }
        TokenOrigin::StartAt => format!(
            "start_at.resume_token of watcher `{watcher}` is a token of another collection{refused}, \
             the watcher watches `{watching}`; give a token of `{watching}` in start_at, or move \
             on with {rewind}"
        ),
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

/// Which image of a change event the server was asked to require and did not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// `full_document_before_change: required`.
    Pre,
    /// `full_document: required`.
    Post,
}

/// The required image the server did not have for an event: mongod (6.0) and SecantusDB answer
/// NoMatchingDocument (47), without error labels, "Change stream was configured to require a
/// pre-image ... but the pre-image was not found for event: ...". Resuming at that event fails
/// the same way, so retrying cannot help.
pub fn missing_image(error: &mongodb::error::Error) -> Option<Image> {
    const NO_MATCHING_DOCUMENT: i32 = 47;
    let mongodb::error::ErrorKind::Command(command) = error.kind.as_ref() else {
        return None;
    };
    if command.code != NO_MATCHING_DOCUMENT {
        return None;
    }
    let message = command.message.to_ascii_lowercase();
    if message.contains("pre-image") {
        Some(Image::Pre)
    } else if message.contains("post-image") {
        Some(Image::Post)
    } else {
        None
    }
}

/// What an operator does about a missing required image; empty for other errors.
fn image_advice(error: &mongodb::error::Error) -> &'static str {
    match missing_image(error) {
        Some(Image::Pre) => {
            "; the event has no pre-image and `full_document_before_change: required` refuses \
             to go on without one: set `full_document_before_change: whenAvailable` and restart \
             (the event is then delivered with `fullDocumentBeforeChange: null`), or enable \
             pre-images on the collection (`collMod: <collection>, \
             changeStreamPreAndPostImages: {enabled: true}`; only later changes get one) and \
             rewind past this event (`POST /watchers/<name>/rewind`)"
        }
        Some(Image::Post) => {
            "; the event has no post-image and `full_document: required` refuses to go on \
             without one: set `full_document: whenAvailable` or `updateLookup` and restart, or \
             enable post-images on the collection (`collMod: <collection>, \
             changeStreamPreAndPostImages: {enabled: true}`) and rewind past this event \
             (`POST /watchers/<name>/rewind`)"
        }
        None => "",
    }
}

/// An AWS error in a line an operator reads: the service's code and words (`Code: message`),
/// or the SDK's context for an error the service did not answer. The SDK's full context of a
/// service error repeats them with the raw response, too long for a reason. (One `SdkError`
/// type serves every AWS SDK crate: Kinesis, DynamoDB and S3 errors alike.)
pub fn aws_message<E, R>(err: &aws_sdk_dynamodb::error::SdkError<E, R>) -> String
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
    match err {
        SdkError::ServiceError(e) => match (e.err().code(), e.err().message()) {
            (Some(code), Some(m)) if !m.is_empty() => format!("{code}: {m}"),
            (Some(code), _) => code.to_owned(),
            _ => DisplayErrorContext(err).to_string(),
        },
        _ => DisplayErrorContext(err).to_string(),
    }
}

/// [`aws_message`] without the code, for where the code travels beside the words (a
/// PutRecords failure's `error_code`): the service's message, or the SDK's context for an
/// error the service did not answer or answered without words.
pub fn aws_words<E, R>(err: &aws_sdk_dynamodb::error::SdkError<E, R>) -> String
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
    match err {
        SdkError::ServiceError(e) => match e.err().message() {
            Some(m) if !m.is_empty() => m.to_owned(),
            _ => DisplayErrorContext(err).to_string(),
        },
        _ => DisplayErrorContext(err).to_string(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn command_error(code: i32, code_name: &str, message: &str) -> mongodb::error::Error {
        let command: mongodb::error::CommandError = bson::deserialize_from_document(
            bson::doc! {"code": code, "codeName": code_name, "errmsg": message},
        )
        .expect("a command error");
        mongodb::error::ErrorKind::Command(command).into()
    }

    fn login() -> MongoLogin {
        MongoLogin {
            user: Some("app".into()),
            hosts: "db-1:27017,db-2:27017".into(),
        }
    }

    #[test]
    fn aws_errors_read_as_the_service_words_with_or_without_the_code() {
        use aws_sdk_kinesis::error::{ErrorMetadata, SdkError};
        use aws_sdk_kinesis::operation::put_records::PutRecordsError;
        let service = |code: &str, message: &str| {
            let meta = ErrorMetadata::builder().code(code).message(message).build();
            SdkError::<_, ()>::service_error(PutRecordsError::generic(meta), ())
        };
        let throttled = service("ProvisionedThroughputExceededException", "Rate exceeded");
        assert_eq!(aws_words(&throttled), "Rate exceeded");
        assert_eq!(
            aws_message(&throttled),
            "ProvisionedThroughputExceededException: Rate exceeded"
        );
        // No words from the service: its code alone, or the SDK's context without the code.
        let wordless = service("InternalFailure", "");
        assert_eq!(aws_message(&wordless), "InternalFailure");
        assert!(!aws_words(&wordless).is_empty());
        let timeout = SdkError::<PutRecordsError, ()>::timeout_error("attempt timeout");
        assert!(
            aws_words(&timeout).contains("attempt timeout"),
            "{}",
            aws_words(&timeout)
        );
        assert_eq!(aws_message(&timeout), aws_words(&timeout));
    }

    #[test]
    fn every_error_is_classified_once_into_a_state() {
        let denied = aws_refusal(
            AwsResource::KinesisStream("s".into()),
            "PutRecords",
            Some("AccessDeniedException"),
            None,
        )
        .expect("a refusal");
        assert_eq!(denied.retry(), Retry::UntilFixed);
        assert_eq!(denied.state(), State::BackingOff);
        assert!(denied.is_retryable());
        let mismatch = WatcherError::NamespaceMismatch {
            watcher: "w".into(),
            origin: TokenOrigin::StartAt,
            written_for: None,
            watching: "db.b".into(),
            server: None,
        };
        assert_eq!(mismatch.retry(), Retry::Never(State::Failed));
        assert!(!mismatch.is_retryable());
        let auth = WatcherError::MongoAuth {
            user: None,
            hosts: "h:1".into(),
            detail: "x".into(),
        };
        assert_eq!(auth.retry(), Retry::UntilFixed);
        let outage = WatcherError::Mongo(mongodb::error::Error::custom("connection refused"));
        assert_eq!(outage.retry(), Retry::Transient);
        let panicked = WatcherError::Panicked {
            message: "index out of bounds".into(),
        };
        assert_eq!(
            panicked.retry(),
            Retry::Transient,
            "restarted from the checkpoint"
        );
        assert_eq!(panicked.state(), State::BackingOff);
        assert!(panicked
            .to_string()
            .contains("panicked: index out of bounds"));
        assert_eq!(
            WatcherError::HistoryLost {
                message: String::new()
            }
            .retry(),
            Retry::Never(State::HistoryLost)
        );
    }

    /// A missing required image fails the watcher with what to do; code 47 without that
    /// wording stays an ordinary (transient) MongoDB error.
    #[test]
    fn a_missing_required_image_fails_and_says_what_to_do() {
        let pre = WatcherError::Mongo(command_error(
            47,
            "NoMatchingDocument",
            "Executor error during getMore :: caused by :: Change stream was configured to \
             require a pre-image for all update, delete and replace events, but the pre-image \
             was not found for event: {operationType: \"update\"}",
        ));
        assert_eq!(pre.retry(), Retry::Never(State::Failed));
        let text = pre.to_string();
        for needle in [
            "error 47 (NoMatchingDocument)",
            "full_document_before_change: whenAvailable",
            "changeStreamPreAndPostImages",
            "rewind",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        let post = WatcherError::Mongo(command_error(
            47,
            "NoMatchingDocument",
            "Change stream was configured to require a post-image for all update events, but \
             the post-image was not found for event: {}",
        ));
        assert_eq!(post.retry(), Retry::Never(State::Failed));
        assert!(post.to_string().contains("`full_document: required`"));
        let other = WatcherError::Mongo(command_error(47, "NoMatchingDocument", "no such thing"));
        assert_eq!(other.retry(), Retry::Transient);
        assert_eq!(
            other.to_string(),
            "mongodb: error 47 (NoMatchingDocument): no such thing"
        );
    }

    #[test]
    fn access_denied_is_recognised_by_its_code_and_says_what_to_grant() {
        let refusal = |code: &str| {
            aws_refusal(
                AwsResource::DynamoDbTable("cps".into()),
                "PutItem",
                Some(code),
                Some("User: arn:aws:sts::1:assumed-role/r/x is not authorized"),
            )
        };
        for code in ["AccessDeniedException", "AccessDenied"] {
            let e = refusal(code).unwrap_or_else(|| panic!("{code} is a refusal"));
            let text = e.to_string();
            assert!(
                text.starts_with(
                    "access denied: grant `dynamodb:PutItem` on DynamoDB table `cps` to the task role"
                ),
                "{text}"
            );
            assert!(text.contains(&format!("{code}: User: arn:aws")), "{text}");
        }
        for code in [
            "ResourceNotFoundException",
            "ProvisionedThroughputExceededException",
            "ThrottlingException",
            "UnrecognizedClientException",
        ] {
            assert!(refusal(code).is_none(), "{code} is not a refusal");
        }
        assert!(aws_refusal(
            AwsResource::KinesisStream("s".into()),
            "PutRecords",
            None,
            None
        )
        .is_none());
        let ssm = aws_refusal(
            AwsResource::SsmParameter("/prod/pw".into()),
            "GetParameter",
            Some("AccessDeniedException"),
            None,
        )
        .expect("a refusal")
        .to_string();
        assert!(
            ssm.contains("grant `ssm:GetParameter` on SSM parameter `/prod/pw`")
                && ssm.contains("`kms:Decrypt` on its KMS key"),
            "{ssm}"
        );
    }

    #[test]
    fn failed_logins_are_named_with_user_and_hosts() {
        // The driver's own authentication error cannot be built outside the driver
        // (`tests/error_states.rs` meets it against a SecantusDB that requires SCRAM); the
        // server's answers can.
        let failed = command_error(18, "AuthenticationFailed", "Authentication failed.");
        let e = WatcherError::Mongo(failed).with_login(&login());
        assert!(matches!(e, WatcherError::MongoAuth { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("authentication of user `app` at db-1:27017,db-2:27017 failed")
                && text.contains("error 18 (AuthenticationFailed): Authentication failed.")
                && text.contains("mongodb.username"),
            "{text}"
        );
        let no_user = command_error(
            13,
            "Unauthorized",
            "command aggregate requires authentication",
        );
        let e = WatcherError::Mongo(no_user).with_login(&MongoLogin {
            user: None,
            hosts: "h:1".into(),
        });
        assert!(
            e.to_string().contains("authentication without a user"),
            "{e}"
        );
        // Not logins: a foreign resume token (13 with the namespace wording), an outage, and
        // errors that are already named.
        let foreign = command_error(
            13,
            "Unauthorized",
            "Resume token namespace does not match the change-stream watch scope",
        );
        assert!(is_foreign_resume_token(&foreign));
        assert!(matches!(
            WatcherError::Mongo(foreign).with_login(&login()),
            WatcherError::Mongo(_)
        ));
        assert!(matches!(
            WatcherError::Mongo(mongodb::error::Error::custom("connection refused"))
                .with_login(&login()),
            WatcherError::Mongo(_)
        ));
        assert!(matches!(
            WatcherError::Invalidated.with_login(&login()),
            WatcherError::Invalidated
        ));
    }

    #[test]
    fn a_namespace_mismatch_names_both_namespaces_and_the_ways_out() {
        let stored = WatcherError::NamespaceMismatch {
            watcher: "orders".into(),
            origin: TokenOrigin::Checkpoint {
                table: "cps".into(),
            },
            written_for: Some("shop.orders".into()),
            watching: "shop.orders_v2".into(),
            server: None,
        }
        .to_string();
        assert_eq!(
            stored,
            "the checkpoint of watcher `orders` was written for `shop.orders`, the watcher now \
             watches `shop.orders_v2` (its database or collection changed in the config); move \
             on with `POST /watchers/orders/rewind` with {\"to\": \"latest\"} or {\"to\": \"<RFC \
             3339 time>\"}, or delete its item from checkpoint table `cps` (watcher = `orders`) \
             and `POST /watchers/orders/resume`"
        );
        let old_item = WatcherError::NamespaceMismatch {
            watcher: "orders".into(),
            origin: TokenOrigin::Checkpoint {
                table: "cps".into(),
            },
            written_for: None,
            watching: "shop.orders_v2".into(),
            server: Some("error 13 (Unauthorized): namespace does not match".into()),
        }
        .to_string();
        assert!(
            old_item.starts_with(
                "the checkpoint of watcher `orders` holds a resume token of another collection \
                 (the server refused it: error 13 (Unauthorized): namespace does not match), the \
                 watcher now watches `shop.orders_v2`"
            ),
            "{old_item}"
        );
        let start_at = WatcherError::NamespaceMismatch {
            watcher: "orders".into(),
            origin: TokenOrigin::StartAt,
            written_for: None,
            watching: "shop.orders_v2".into(),
            server: None,
        }
        .to_string();
        assert!(
            start_at.starts_with("start_at.resume_token of watcher `orders`")
                && start_at.contains("/watchers/orders/rewind"),
            "{start_at}"
        );
    }
}
