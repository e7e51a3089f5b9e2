//! Every error the API answers, as JSON `{"error": "..."}` with the matching status.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;
use watchers::control::ControlError;

use crate::model::WatcherState;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// The known watcher names (only when the named watcher does not exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watchers: Option<Vec<String>>,
    /// The watcher's state when a command could not be carried out (503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<WatcherState>,
    /// Why the watcher is in that state, when it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, unknown fields, a bad or future time: 400.
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong bearer token: 401 with `WWW-Authenticate: Bearer`.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// No token is configured, so mutations are off: 403.
    #[error(
        "mutations are disabled because no API token is configured; set \
         MONGO_WATCHER_API_TOKEN or http.api_token_ssm_parameter to enable them"
    )]
    MutationsDisabled,
    /// 404 listing the watchers that do exist.
    #[error("unknown watcher `{name}`")]
    UnknownWatcher { name: String, known: Vec<String> },
    /// No route has this path: 404.
    #[error("no route for {method} {path}")]
    NoRoute { method: Method, path: String },
    /// The path exists but not with this method: 405.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: Method, path: String },
    /// The watcher refused the target (older than the oplog, unknown token): 409.
    #[error("{0}")]
    Conflict(String),
    /// Body over the limit: 413.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The watcher could not carry the command out, did not answer in time, or is gone: 503.
    #[error("{0}")]
    Unavailable(String),
    /// As [`ApiError::Unavailable`], with the watcher's state and reason so the caller sees
    /// why (e.g. MongoDB unreachable): 503.
    #[error("{message}")]
    WatcherUnavailable {
        message: String,
        state: WatcherState,
        reason: Option<String>,
    },
    /// A bug or an unexpected failure on our side: 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub(crate) fn body_too_large() -> Self {
        ApiError::PayloadTooLarge(format!(
            "request body is larger than {} bytes",
            crate::MAX_BODY_BYTES
        ))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::MutationsDisabled => StatusCode::FORBIDDEN,
            ApiError::UnknownWatcher { .. } | ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::WatcherUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let error = self.to_string();
        let unauthorized = matches!(self, ApiError::Unauthorized(_));
        let mut body = ErrorBody {
            error,
            watchers: None,
            state: None,
            reason: None,
        };
        match self {
            ApiError::UnknownWatcher { known, .. } => body.watchers = Some(known),
            ApiError::WatcherUnavailable { state, reason, .. } => {
                body.state = Some(state);
                body.reason = reason;
            }
            _ => {}
        }
        let mut response = (status, Json(body)).into_response();
        if unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> Self {
        match e {
            ControlError::Invalid(m) => ApiError::BadRequest(m),
            ControlError::Conflict(m) => ApiError::Conflict(m),
            ControlError::Unavailable(m) => ApiError::Unavailable(m),
            ControlError::Gone => ApiError::Unavailable(ControlError::Gone.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::body_too_large(),
            // Syntax errors (400) and well-formed JSON of the wrong shape, such as an unknown
            // field (axum's 422), are both the client's malformed request here.
            _ => ApiError::BadRequest(message),
        }
    }
}
