//! What every handler shares: the watchers, the metrics, the token and the heartbeat.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use watchers::control::WatcherHandle;
use watchers::metrics::Metrics;

use crate::auth::ApiToken;

/// How long a command waits for the watcher's answer unless configured otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a command waits for a watcher that is starting or backing off (see
/// `handlers::command_wait`): long enough for a healthy start or a DynamoDB write, short
/// enough that an operator hears at once that MongoDB is unreachable.
pub const UNSETTLED_COMMAND_WAIT: Duration = Duration::from_secs(2);

/// The supervisor is considered dead when it has not beaten for this long.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(15);

/// Why an [`AppState`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("two watchers are named `{0}`; watcher names must be unique")]
    DuplicateWatcher(String),
    #[error("the API token is empty; leave it unset to disable mutations instead")]
    EmptyToken,
}

/// The supervisor's heartbeat: unix milliseconds of its last [`beat`](Liveness::beat).
///
/// `GET /healthz` answers 200 while the last beat is at most [`LIVENESS_WINDOW`] old, so a
/// wedged supervisor loop gets the process restarted; MongoDB and AWS play no part in it.
#[derive(Debug, Clone)]
pub struct Liveness(Arc<AtomicI64>);

impl Liveness {
    /// A heartbeat that has just beaten (so a process that is starting counts as alive).
    pub fn new() -> Self {
        Self(Arc::new(AtomicI64::new(now_millis())))
    }

    /// Records a beat now.
    pub fn beat(&self) {
        self.beat_at(now_millis());
    }

    /// Records a beat at the given unix time in milliseconds (tests, replays).
    pub fn beat_at(&self, unix_millis: i64) {
        self.0.store(unix_millis, Ordering::Relaxed);
    }

    /// Unix milliseconds of the last beat.
    pub fn last_beat_millis(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Milliseconds since the last beat at `now_millis` (never negative).
    pub fn age_millis(&self, now_millis: i64) -> i64 {
        (now_millis - self.last_beat_millis()).max(0)
    }

    /// Whether the supervisor has beaten within [`LIVENESS_WINDOW`].
    pub fn is_alive(&self) -> bool {
        self.age_millis(now_millis()) <= LIVENESS_WINDOW.as_millis() as i64
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn now_millis() -> i64 {
    bson::DateTime::now().timestamp_millis()
}

/// Everything the HTTP handlers share; cheap to clone. See the crate docs for how main
/// builds it.
#[derive(Clone)]
pub struct AppState {
    watchers: Arc<[WatcherHandle]>,
    index: Arc<HashMap<String, usize>>,
    pub(crate) registry: Registry,
    pub(crate) metrics: Metrics,
    pub(crate) token: Option<Arc<ApiToken>>,
    pub(crate) liveness: Liveness,
    pub(crate) command_timeout: Duration,
}

impl AppState {
    /// The watchers in config order (that is the order `GET /watchers` lists them in).
    /// Mutations stay disabled until [`with_api_token`](Self::with_api_token) sets a token.
    pub fn new(
        watchers: Vec<WatcherHandle>,
        registry: Registry,
        metrics: Metrics,
        liveness: Liveness,
    ) -> Result<Self, StateError> {
        let mut index = HashMap::with_capacity(watchers.len());
        for (i, w) in watchers.iter().enumerate() {
            if index.insert(w.name().to_owned(), i).is_some() {
                return Err(StateError::DuplicateWatcher(w.name().to_owned()));
            }
        }
        Ok(Self {
            watchers: watchers.into(),
            index: Arc::new(index),
            registry,
            metrics,
            token: None,
            liveness,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
        })
    }

    /// The bearer token that mutations require; `None` disables mutations (403).
    pub fn with_api_token(mut self, token: Option<String>) -> Result<Self, StateError> {
        self.token = token.map(ApiToken::new).transpose()?.map(Arc::new);
        Ok(self)
    }

    /// How long pause, resume and rewind wait for the watcher's answer.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    pub fn watchers(&self) -> &[WatcherHandle] {
        &self.watchers
    }

    pub fn watcher(&self, name: &str) -> Option<&WatcherHandle> {
        self.index.get(name).map(|&i| &self.watchers[i])
    }

    pub fn watcher_names(&self) -> Vec<String> {
        self.watchers.iter().map(|w| w.name().to_owned()).collect()
    }

    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    pub fn mutations_enabled(&self) -> bool {
        self.token.is_some()
    }
}

impl fmt::Debug for AppState {
    // By hand so that neither the token nor its digest ever reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState")
            .field("watchers", &self.watcher_names())
            .field("mutations_enabled", &self.mutations_enabled())
            .field("liveness", &self.liveness)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}
