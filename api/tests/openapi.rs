//! `api/openapi.json` must be what the code generates.

use std::path::PathBuf;

#[test]
fn committed_openapi_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let generated = api::openapi_json() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write api/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "api/openapi.json is out of date with the code; regenerate it with \
         `UPDATE_OPENAPI=1 cargo test -p api --test openapi` and commit the result"
    );
}

#[test]
fn document_is_openapi_3_1_and_covers_every_route() {
    let doc: serde_json::Value =
        serde_json::from_str(&api::openapi_json()).expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/watchers", "get"),
        ("/watchers/{name}", "get"),
        ("/watchers/{name}/pause", "post"),
        ("/watchers/{name}/resume", "post"),
        ("/watchers/{name}/rewind", "post"),
        ("/watchers/{name}/snapshot", "post"),
    ] {
        assert!(
            paths.get(path).and_then(|p| p.get(method)).is_some(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        paths.len(),
        10,
        "undocumented or unexpected paths: {paths:?}"
    );
    for mutation in ["pause", "resume", "rewind", "snapshot"] {
        let op = &doc["paths"][format!("/watchers/{{name}}/{mutation}")]["post"];
        assert_eq!(
            op["security"][0]["bearer"],
            serde_json::json!([]),
            "{mutation}"
        );
    }
    let snapshot = &doc["paths"]["/watchers/{name}/snapshot"]["post"];
    for code in ["202", "400", "401", "404", "409", "503"] {
        assert!(
            snapshot["responses"][code].is_object(),
            "snapshot: no {code} response"
        );
    }
    assert_ne!(
        snapshot["requestBody"]["required"], true,
        "the snapshot body is optional"
    );
    assert!(
        doc["components"]["schemas"]["SnapshotRequest"]["properties"]["filter"].is_object(),
        "the SnapshotRequest schema"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}
