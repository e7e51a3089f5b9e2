//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` attributes and the
//! bodies' `ToSchema` derives. `api/openapi.json` is a committed copy; a test keeps it equal.

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "mongo-watcher",
        description = "Control plane of mongo-watcher: probes, metrics, watcher status, and \
                       pause, resume, rewind and snapshot (backfill) of single watchers. \
                       Mutations need `Authorization: Bearer <token>`; without a configured \
                       token they answer 403.",
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "probes", description = "Liveness, readiness and metrics"),
        (name = "watchers", description = "Watcher status and commands"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The API token (MONGO_WATCHER_API_TOKEN or http.api_token_ssm_parameter)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The base document the routes add their paths and schemas to.
pub(crate) fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The OpenAPI document as pretty JSON.
pub fn openapi_json() -> String {
    let (_, doc) = crate::api_routes().split_for_parts();
    // Serializing a document of plain strings and maps cannot fail; fall back to an error
    // object rather than panicking if it ever did.
    doc.to_pretty_json().unwrap_or_else(|e| {
        format!("{{\"error\": \"cannot serialize the OpenAPI document: {e}\"}}")
    })
}

/// The document served at `GET /openapi.json`, built once.
pub(crate) fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(openapi_json)
}
