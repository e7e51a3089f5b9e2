//! mongo-watcher's HTTP control plane: probes, metrics, watcher status and commands.
//!
//! ```no_run
//! # use std::time::Duration;
//! # async fn wire(
//! #     handles: Vec<watchers::control::WatcherHandle>,
//! #     token: Option<String>,
//! #     shutdown: tokio_util::sync::CancellationToken,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! let registry = api::registry_with_process_metrics()?;
//! let metrics = watchers::metrics::Metrics::register(&registry)?;
//! let liveness = api::Liveness::new(); // the supervisor calls liveness.beat() every few s
//! let state = api::AppState::new(handles, registry, metrics, liveness.clone())?
//!     .with_api_token(token)?
//!     .with_command_timeout(Duration::from_secs(30));
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
//! api::serve(listener, state, shutdown).await?;
//! # Ok(())
//! # }
//! ```

mod auth;
pub mod error;
mod handlers;
pub mod model;
mod openapi;
mod serve;
mod state;

use std::time::Duration;

use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use prometheus::Registry;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{
    DefaultMakeSpan, DefaultOnFailure, DefaultOnRequest, DefaultOnResponse, TraceLayer,
};
use tracing::Level;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use auth::Authorized;
pub use error::{ApiError, ErrorBody};
pub use openapi::openapi_json;
pub use serve::{
    cap_fits, raise_fd_limit, serve, serve_with, FdLimit, ServeOptions,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, RESERVED_FDS,
};
pub use state::{
    AppState, Liveness, StateError, DEFAULT_COMMAND_TIMEOUT, LIVENESS_WINDOW,
    UNSETTLED_COMMAND_WAIT,
};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// A whole request may take this long (or the command timeout plus 5 s, if that is longer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Every documented route; [`router`] serves them and [`openapi_json`] describes them.
pub(crate) fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .routes(routes!(handlers::healthz))
        .routes(routes!(handlers::readyz))
        .routes(routes!(handlers::metrics))
        .routes(routes!(handlers::openapi_document))
        .routes(routes!(handlers::list_watchers))
        .routes(routes!(handlers::get_watcher))
        .routes(routes!(handlers::pause))
        .routes(routes!(handlers::resume))
        .routes(routes!(handlers::rewind))
        .routes(routes!(handlers::snapshot))
}

/// The HTTP API, ready to serve.
pub fn router(state: AppState) -> Router {
    let request_timeout = REQUEST_TIMEOUT.max(state.command_timeout() + Duration::from_secs(5));
    let (routes, _) = api_routes().split_for_parts();
    // Each `.layer` wraps the ones before it: the last is the outermost.
    routes
        .fallback(handlers::no_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .layer(axum::middleware::map_response(
            move |response: Response| async move { json_error_body(response, request_timeout) },
        ))
        .layer(
            TraceLayer::new_for_http()
                // Never headers: the Authorization header carries the token.
                .make_span_with(
                    DefaultMakeSpan::new()
                        .level(Level::INFO)
                        .include_headers(false),
                )
                .on_request(DefaultOnRequest::new().level(Level::DEBUG))
                .on_response(
                    DefaultOnResponse::new()
                        .level(Level::DEBUG)
                        .include_headers(false),
                )
                // 503 from /readyz is routine while a watcher is down: not worth a warning
                // on every probe. Failed commands log on their own.
                .on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
        // Outermost, so that anything below sees Authorization marked sensitive.
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        .with_state(state)
}

/// Gives a JSON body to error responses that have none (the request timeout's 503).
fn json_error_body(response: Response, request_timeout: Duration) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.headers().contains_key(CONTENT_TYPE)
    {
        return response;
    }
    let error = if status == StatusCode::SERVICE_UNAVAILABLE {
        format!(
            "the request did not complete within {} s; a command it carried may still \
             complete (check GET /watchers)",
            request_timeout.as_secs()
        )
    } else {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_lowercase()
    };
    let body = serde_json::to_vec(&ErrorBody {
        error,
        watchers: None,
        state: None,
        reason: None,
    })
    .unwrap_or_default();
    let (mut parts, _) = response.into_parts();
    parts.headers.remove(CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body))
}

/// A registry with the process collector (CPU, memory, open fds; Linux only) registered, for
/// main to register the watchers' [`Metrics`](watchers::metrics::Metrics) into too.
pub fn registry_with_process_metrics() -> prometheus::Result<Registry> {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(registry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_error_responses_get_a_json_body() {
        let timed_out = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Body::empty())
            .expect("response");
        let r = json_error_body(timed_out, REQUEST_TIMEOUT);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[CONTENT_TYPE], "application/json");

        let ok = Response::new(Body::empty());
        assert!(!json_error_body(ok, REQUEST_TIMEOUT)
            .headers()
            .contains_key(CONTENT_TYPE));
    }
}
