//! The endpoints. Each carries its `#[utoipa::path]`, from which both the axum route and the
//! OpenAPI document are built (see [`crate::api_routes`]), so the two cannot drift.

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bson::{Bson, DateTime};
use prometheus::{Encoder, TextEncoder};
use serde::de::DeserializeOwned;
use watchers::control::{self, ControlError, RewindTarget, WatcherHandle};
use watchers::status::State as WatcherStateKind;

use crate::auth::Authorized;
use crate::error::{ApiError, ErrorBody};
use crate::model::{
    rfc3339, Health, HealthStatus, NotReady, Readiness, ReadinessStatus, RewindRequest,
    SnapshotRequest, WatcherList, WatcherView,
};
use crate::state::{now_millis, AppState, LIVENESS_WINDOW, UNSETTLED_COMMAND_WAIT};

/// A JSON body, whatever its `Content-Type` says: `curl -d '{"to": "latest"}'` sends
/// `application/x-www-form-urlencoded`, and refusing it with 415 only puzzled operators. A body
/// that is not JSON of the right shape is 400; rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        // `from_bytes` skips the Content-Type check that `Json`'s extractor makes.
        let Json(value) = Json::<T>::from_bytes(&bytes)?;
        Ok(Self(value))
    }
}

/// As [`ApiJson`], for a body that may be left out: an empty one (or JSON `null`, which the
/// OpenAPI document allows for an optional body) is `T::default()`, so `curl -X POST` with no
/// `-d` works.
pub struct OptionalApiJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(T::default()));
        }
        let Json(value) = Json::<Option<T>>::from_bytes(&bytes)?;
        Ok(Self(value.unwrap_or_default()))
    }
}

/// The request's body, at most [`crate::MAX_BODY_BYTES`].
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    // Refuse a body announced as too large at once instead of waiting for it to arrive
    // (the body limit alone only trips once that many bytes were read).
    let announced = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > crate::MAX_BODY_BYTES as u64) {
        return Err(ApiError::body_too_large());
    }
    Bytes::from_request(req, state)
        .await
        .map_err(|rejection| match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::body_too_large(),
            _ => ApiError::BadRequest(rejection.body_text()),
        })
}

/// The `{name}` path segment, with a JSON rejection.
pub struct WatcherName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for WatcherName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        Ok(Self(name))
    }
}

fn lookup<'a>(state: &'a AppState, name: &str) -> Result<&'a WatcherHandle, ApiError> {
    state.watcher(name).ok_or_else(|| ApiError::UnknownWatcher {
        name: name.to_owned(),
        known: state.watcher_names(),
    })
}

/// Liveness: whether the supervisor loop still beats. Never touches MongoDB or AWS.
#[utoipa::path(
    get, path = "/healthz", tag = "probes",
    responses(
        (status = 200, description = "The supervisor beat within the last 15 s", body = Health,
         example = json!({"status": "ok"})),
        (status = 503, description = "The supervisor has not beaten for over 15 s", body = Health),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    let liveness = state.liveness();
    if liveness.is_alive() {
        let ok = Health {
            status: HealthStatus::Ok,
            reason: None,
            last_heartbeat: None,
        };
        return (StatusCode::OK, Json(ok));
    }
    let age = liveness.age_millis(now_millis()) as f64 / 1000.0;
    let unhealthy = Health {
        status: HealthStatus::Unhealthy,
        reason: Some(format!(
            "the supervisor's last heartbeat is {age:.1} s old (limit {} s)",
            LIVENESS_WINDOW.as_secs()
        )),
        last_heartbeat: rfc3339(DateTime::from_millis(liveness.last_beat_millis())),
    };
    (StatusCode::SERVICE_UNAVAILABLE, Json(unhealthy))
}

/// Readiness: every watcher is running or paused by an operator.
#[utoipa::path(
    get, path = "/readyz", tag = "probes",
    responses(
        (status = 200, description = "Every watcher is running or paused", body = Readiness,
         example = json!({"status": "ready", "watchers": []})),
        (status = 503, description = "Some watchers are neither running nor paused",
         body = Readiness,
         example = json!({"status": "not_ready", "watchers": [
             {"name": "orders", "state": "history_lost",
              "reason": "the checkpoint is older than the oplog window"}]})),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let not_ready: Vec<NotReady> = state
        .watchers()
        .iter()
        .filter_map(|w| {
            let (state, reason) = w.state();
            match state {
                // A standby replica is ready: the watcher runs on its owner.
                WatcherStateKind::Running
                | WatcherStateKind::Paused
                | WatcherStateKind::Standby => None,
                other => Some(NotReady {
                    name: w.name().to_owned(),
                    state: other.into(),
                    reason,
                }),
            }
        })
        .collect();
    let (code, status) = if not_ready.is_empty() {
        (StatusCode::OK, ReadinessStatus::Ready)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, ReadinessStatus::NotReady)
    };
    let body = Readiness {
        status,
        watchers: not_ready,
    };
    (code, Json(body))
}

/// Prometheus metrics, text exposition format 0.0.4.
#[utoipa::path(
    get, path = "/metrics", tag = "probes",
    responses(
        (status = 200, description = "Prometheus text format", body = String,
         content_type = "text/plain; version=0.0.4"),
        (status = 500, description = "The metrics could not be encoded", body = ErrorBody),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let now = DateTime::now();
    for w in state.watchers() {
        state.metrics.observe_status(w.name(), &w.status(), now);
    }
    let encoder = TextEncoder::new();
    let text = encoder
        .encode_to_string(&state.registry.gather())
        .map_err(|e| {
            tracing::error!(error = %e, "cannot encode the metrics");
            ApiError::Internal(format!("cannot encode the metrics: {e}"))
        })?;
    Ok(([(CONTENT_TYPE, encoder.format_type().to_owned())], text).into_response())
}

/// This document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object))
)]
pub async fn openapi_document() -> Response {
    (
        [(CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

/// Every watcher, in config order.
#[utoipa::path(
    get, path = "/watchers", tag = "watchers",
    responses((status = 200, description = "All watchers", body = WatcherList))
)]
pub async fn list_watchers(State(state): State<AppState>) -> Json<WatcherList> {
    let now = DateTime::now();
    let watchers = state
        .watchers()
        .iter()
        .map(|w| WatcherView::new(w, now))
        .collect();
    Json(WatcherList { watchers })
}

/// One watcher.
#[utoipa::path(
    get, path = "/watchers/{name}", tag = "watchers",
    params(("name" = String, Path, description = "The watcher's name")),
    responses(
        (status = 200, description = "The watcher", body = WatcherView),
        (status = 404, description = "No watcher has this name", body = ErrorBody,
         example = json!({"error": "unknown watcher `x`", "watchers": ["orders"]})),
    )
)]
pub async fn get_watcher(
    State(state): State<AppState>,
    WatcherName(name): WatcherName,
) -> Result<Json<WatcherView>, ApiError> {
    let handle = lookup(&state, &name)?;
    Ok(Json(WatcherView::new(handle, DateTime::now())))
}

/// Flush in-flight records, write the checkpoint (marked paused) and stop reading.
///
/// Idempotent: pausing a paused watcher answers 200 again.
#[utoipa::path(
    post, path = "/watchers/{name}/pause", tag = "watchers",
    params(("name" = String, Path, description = "The watcher's name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Paused; the watcher after the command", body = WatcherView),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "No API token is configured", body = ErrorBody),
        (status = 404, description = "No watcher has this name", body = ErrorBody),
        (status = 503, description = "The watcher could not pause, did not answer in time \
         (the command may still complete; 2 s for a watcher that is starting or backing off) \
         or is shutting down; `state` and `reason` say what the watcher is doing",
         body = ErrorBody),
    )
)]
pub async fn pause(
    _auth: Authorized,
    State(state): State<AppState>,
    WatcherName(name): WatcherName,
) -> Result<Json<WatcherView>, ApiError> {
    let handle = lookup(&state, &name)?;
    let timeout = command_wait(&state, handle);
    command(handle, "pause", "-", handle.pause(timeout)).await?;
    Ok(Json(WatcherView::new(handle, DateTime::now())))
}

/// Continue from the checkpoint.
///
/// Idempotent: resuming a running watcher answers 200 again.
#[utoipa::path(
    post, path = "/watchers/{name}/resume", tag = "watchers",
    params(("name" = String, Path, description = "The watcher's name")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Resumed; the watcher after the command", body = WatcherView),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "No API token is configured", body = ErrorBody),
        (status = 404, description = "No watcher has this name", body = ErrorBody),
        (status = 503, description = "The watcher could not resume, did not answer in time \
         (the command may still complete; 2 s for a watcher that is starting or backing off) \
         or is shutting down; `state` and `reason` say what the watcher is doing",
         body = ErrorBody),
    )
)]
pub async fn resume(
    _auth: Authorized,
    State(state): State<AppState>,
    WatcherName(name): WatcherName,
) -> Result<Json<WatcherView>, ApiError> {
    let handle = lookup(&state, &name)?;
    let timeout = command_wait(&state, handle);
    command(handle, "resume", "-", handle.resume(timeout)).await?;
    Ok(Json(WatcherView::new(handle, DateTime::now())))
}

/// Restart the change stream at a past time, now, or after a resume token.
///
/// In-flight records are flushed first. A paused watcher stays paused at the new position.
#[utoipa::path(
    post, path = "/watchers/{name}/rewind", tag = "watchers",
    params(("name" = String, Path, description = "The watcher's name")),
    request_body = RewindRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Rewound; the watcher after the command", body = WatcherView),
        (status = 400, description = "Body not JSON (whatever its Content-Type), unknown \
         field, bad or future time, not exactly one of `to` and `resume_token`, or a resume \
         token of another collection", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "No API token is configured", body = ErrorBody),
        (status = 404, description = "No watcher has this name", body = ErrorBody),
        (status = 409, description = "The target is gone (older than the oplog window, \
         unknown resume token)", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB", body = ErrorBody),
        (status = 503, description = "The watcher could not rewind, did not answer in time \
         (the command may still complete; 2 s for a watcher that is starting or backing off) \
         or is shutting down; `state` and `reason` say what the watcher is doing",
         body = ErrorBody),
    )
)]
pub async fn rewind(
    _auth: Authorized,
    State(state): State<AppState>,
    WatcherName(name): WatcherName,
    ApiJson(request): ApiJson<RewindRequest>,
) -> Result<Json<WatcherView>, ApiError> {
    let handle = lookup(&state, &name)?;
    let (target, described) = rewind_target(request)?;
    let timeout = command_wait(&state, handle);
    command(handle, "rewind", &described, handle.rewind(target, timeout)).await?;
    Ok(Json(WatcherView::new(handle, DateTime::now())))
}

/// The target of a rewind request and how it is logged.
fn rewind_target(request: RewindRequest) -> Result<(RewindTarget, String), ApiError> {
    match (request.to, request.resume_token) {
        (Some(to), None) if to == "latest" => Ok((RewindTarget::Latest, to)),
        (Some(to), None) => {
            let time = DateTime::parse_rfc3339_str(&to).map_err(|_| {
                ApiError::BadRequest(format!(
                    "`to` must be an RFC 3339 time such as 2024-05-01T12:00:00Z, or \"latest\"; \
                     got {to:?}"
                ))
            })?;
            Ok((RewindTarget::Time(time), to))
        }
        (None, Some(token @ serde_json::Value::Object(_))) => {
            let described = format!("resume_token {token}");
            let bson = Bson::try_from(token).map_err(|e| {
                ApiError::BadRequest(format!("`resume_token` is not valid Extended JSON: {e}"))
            })?;
            if !matches!(bson, Bson::Document(_)) {
                return Err(ApiError::BadRequest(
                    "`resume_token` must be a document, not an Extended JSON scalar".into(),
                ));
            }
            Ok((RewindTarget::Token(bson), described))
        }
        (None, Some(_)) => Err(ApiError::BadRequest(
            "`resume_token` must be a JSON object, such as {\"_data\": \"8266...\"}".into(),
        )),
        _ => Err(ApiError::BadRequest(
            "give exactly one of `to` (an RFC 3339 time or \"latest\") and `resume_token`".into(),
        )),
    }
}

/// Copy the collection's documents into the stream again, as snapshot records.
///
/// Each document (or each one `filter` matches) becomes a record with `operationType:
/// "snapshot"`, `_id: {"snapshot": <the document's _id>}` and the document as
/// `fullDocument`, sent through the same batching, ordering and retries as change events. The
/// change stream keeps its position: changes made during the copy arrive as usual events.
/// Answered once the copy has begun; its progress shows under `snapshot` in
/// `GET /watchers/{name}`.
#[utoipa::path(
    post, path = "/watchers/{name}/snapshot", tag = "watchers",
    params(("name" = String, Path, description = "The watcher's name")),
    request_body(
        content = Option<SnapshotRequest>,
        description = "Optional: no body or `{}` copies every document",
        example = json!({"filter": {"status": "active"}}),
    ),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The copy has begun; the watcher after the command (`snapshot` shows its progress)", body = WatcherView),
        (status = 400, description = "Body not JSON (whatever its Content-Type), unknown field, or a `filter` that is not a JSON object or not valid Extended JSON",
         body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody,
         headers(("WWW-Authenticate" = String, description = "`Bearer`"))),
        (status = 403, description = "No API token is configured", body = ErrorBody),
        (status = 404, description = "No watcher has this name", body = ErrorBody),
        (status = 409, description = "A copy is already running, or the watcher is not running (paused, failed, history lost, invalidated, or owned by another replica); the message says what to do", body = ErrorBody),
        (status = 413, description = "Body over 16 KiB", body = ErrorBody),
        (status = 503, description = "The watcher could not start the copy, did not answer in time (the command may still complete; 2 s for a watcher that is starting or backing off) or is shutting down; `state` and `reason` say what the watcher is doing",
         body = ErrorBody),
    )
)]
pub async fn snapshot(
    _auth: Authorized,
    State(state): State<AppState>,
    WatcherName(name): WatcherName,
    OptionalApiJson(request): OptionalApiJson<SnapshotRequest>,
) -> Result<(StatusCode, Json<WatcherView>), ApiError> {
    let handle = lookup(&state, &name)?;
    let (request, described) = snapshot_request(request)?;
    let timeout = command_wait(&state, handle);
    command(
        handle,
        "snapshot",
        &described,
        handle.snapshot(request, timeout),
    )
    .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(WatcherView::new(handle, DateTime::now())),
    ))
}

/// The backfill a snapshot request asks for and how it is logged.
fn snapshot_request(
    request: SnapshotRequest,
) -> Result<(control::SnapshotRequest, String), ApiError> {
    let filter = match request.filter {
        None => return Ok((control::SnapshotRequest { filter: None }, "all".to_owned())),
        Some(filter @ serde_json::Value::Object(_)) => filter,
        Some(_) => {
            return Err(ApiError::BadRequest(
                "`filter` must be a JSON object (a query filter in Extended JSON), such as                  {\"status\": \"active\"}"
                    .into(),
            ))
        }
    };
    let described = format!("filter {filter}");
    // Through `Bson` rather than straight to a `Document`, so that an object that is one
    // Extended JSON value (`{"$oid": ...}`) is refused instead of becoming a filter on a
    // field named `$oid`.
    match Bson::try_from(filter) {
        Ok(Bson::Document(filter)) => Ok((
            control::SnapshotRequest {
                filter: Some(filter),
            },
            described,
        )),
        Ok(_) => Err(ApiError::BadRequest(
            "`filter` must be a query document, not an Extended JSON scalar".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!(
            "`filter` is not valid Extended JSON: {e}"
        ))),
    }
}

/// How long to wait for the watcher's answer. A watcher that is starting or backing off may be
/// stuck connecting to MongoDB (the driver's server selection waits 30 s) and takes no command
/// until that ends: such a caller gets 503 with the watcher's state and reason after
/// [`UNSETTLED_COMMAND_WAIT`] rather than after the whole command timeout.
fn command_wait(state: &AppState, handle: &WatcherHandle) -> Duration {
    match handle.status().state {
        WatcherStateKind::Starting | WatcherStateKind::BackingOff => {
            state.command_timeout().min(UNSETTLED_COMMAND_WAIT)
        }
        _ => state.command_timeout(),
    }
}

/// Runs an accepted command, logging it and its outcome.
async fn command(
    handle: &WatcherHandle,
    action: &'static str,
    target: &str,
    run: impl Future<Output = Result<(), ControlError>>,
) -> Result<(), ApiError> {
    let watcher = handle.name();
    tracing::info!(watcher, action, target, "control command accepted");
    match run.await {
        Ok(()) => {
            tracing::info!(watcher, action, target, "control command done");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(watcher, action, target, error = %e, "control command failed");
            Err(match e {
                // Say what the watcher is doing, so the caller can tell "MongoDB is down" from
                // "try again".
                ControlError::Unavailable(message) => {
                    let status = handle.status();
                    ApiError::WatcherUnavailable {
                        message,
                        state: status.state.into(),
                        reason: status.reason,
                    }
                }
                other => other.into(),
            })
        }
    }
}

/// JSON 404 for paths no route has.
pub async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NoRoute {
        method,
        path: uri.path().to_owned(),
    }
}

/// JSON 405 for a known path with the wrong method (axum still sets `Allow`).
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method,
        path: uri.path().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(to: Option<&str>, token: Option<serde_json::Value>) -> RewindRequest {
        RewindRequest {
            to: to.map(str::to_owned),
            resume_token: token,
        }
    }

    fn snap(filter: Option<serde_json::Value>) -> SnapshotRequest {
        SnapshotRequest { filter }
    }

    #[test]
    fn snapshot_filters_are_extended_json_documents() {
        let (request, described) = snapshot_request(snap(None)).expect("no filter");
        assert_eq!(request.filter, None);
        assert_eq!(described, "all");

        let (request, _) =
            snapshot_request(snap(Some(serde_json::json!({"kind": "a"})))).expect("relaxed");
        assert_eq!(request.filter, Some(bson::doc! {"kind": "a"}));

        let oid = bson::oid::ObjectId::parse_str("665f1c2e8b3e4a0012345678").expect("oid");
        let (request, _) = snapshot_request(snap(Some(serde_json::json!(
            {"_id": {"$gte": {"$oid": "665f1c2e8b3e4a0012345678"}}}
        ))))
        .expect("operator with an ObjectId");
        assert_eq!(request.filter, Some(bson::doc! {"_id": {"$gte": oid}}));

        let (request, _) = snapshot_request(snap(Some(serde_json::json!(
            {"n": {"$numberLong": "7"}, "at": {"$date": {"$numberLong": "0"}},
             "$or": [{"a": 1}, {"b": {"$exists": false}}]}
        ))))
        .expect("canonical");
        assert_eq!(
            request.filter,
            Some(bson::doc! {
                "n": 7_i64, "at": DateTime::from_millis(0),
                "$or": [{"a": 1}, {"b": {"$exists": false}}],
            })
        );

        for (bad, expect) in [
            (serde_json::json!(5), "JSON object"),
            (serde_json::json!("kind"), "JSON object"),
            (serde_json::json!([{"kind": "a"}]), "JSON object"),
            (
                serde_json::json!({"$oid": "665f1c2e8b3e4a0012345678"}),
                "scalar",
            ),
            (
                serde_json::json!({"_id": {"$oid": "nope"}}),
                "Extended JSON",
            ),
        ] {
            match snapshot_request(snap(Some(bad.clone()))) {
                Err(ApiError::BadRequest(m)) => assert!(m.contains(expect), "{bad}: {m}"),
                other => panic!("{bad}: {:?}", other.map(|(r, _)| r)),
            }
        }
    }

    #[test]
    fn rewind_targets() {
        assert!(matches!(
            rewind_target(req(Some("latest"), None)),
            Ok((RewindTarget::Latest, _))
        ));
        assert!(matches!(
            rewind_target(req(Some("2024-05-01T12:00:00Z"), None)),
            Ok((RewindTarget::Time(_), _))
        ));
        let token = serde_json::json!({"_data": "82"});
        assert!(matches!(
            rewind_target(req(None, Some(token.clone()))),
            Ok((RewindTarget::Token(Bson::Document(_)), _))
        ));
        for bad in [
            req(None, None),
            req(Some("latest"), Some(token)),
            req(Some("yesterday"), None),
            req(None, Some(serde_json::json!("82"))),
            req(None, Some(serde_json::json!({"$date": "nope"}))),
            req(None, Some(serde_json::json!({"$numberLong": "1"}))),
        ] {
            assert!(matches!(rewind_target(bad), Err(ApiError::BadRequest(_))));
        }
    }
}
