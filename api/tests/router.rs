//! The router end to end, through `tower::ServiceExt::oneshot`, against real `WatcherHandle`s
//! whose command receivers are driven by small fake watcher tasks.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::{AppState, Liveness, StateError};
use axum::body::Body;
use axum::http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use bson::{Bson, DateTime};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;
use watchers::control::{Command, ControlError, RewindTarget, SnapshotRequest, WatcherHandle};
use watchers::metrics::Metrics;
use watchers::record::{FieldPath, RecordFormat};
use watchers::spec::{BatchSettings, StartAt, WatcherSpec};
use watchers::status::{Counters, Flow, State, Status, StoredPosition};

const TOKEN: &str = "s3cret-token-value";

fn spec(name: &str) -> Arc<WatcherSpec> {
    Arc::new(WatcherSpec {
        name: name.to_owned(),
        database: "shop".to_owned(),
        collection: format!("{name}_coll"),
        stream: format!("{name}-stream"),
        partition_key: FieldPath::parse("documentKey._id").expect("valid path"),
        full_document: Default::default(),
        full_document_before_change: Default::default(),
        pipeline: Vec::new(),
        start_at: StartAt::Latest,
        on_history_lost: Default::default(),
        on_invalidate: Default::default(),
        on_oversized: Default::default(),
        s3: None,
        aggregation: Default::default(),
        split_large_events: Default::default(),
        snapshot: Default::default(),
        snapshot_parallelism: 4,
        on_undeliverable: watchers::spec::OnUndeliverable::Fail,
        record_format: RecordFormat::default(),
        batch: BatchSettings::default(),
        checkpoint_interval: Duration::from_secs(5),
    })
}

fn running() -> Status {
    Status {
        state: State::Running,
        ..Status::default()
    }
}

/// Times before this are "older than the oplog window" for the fake watchers.
const OPLOG_START_MILLIS: i64 = 1_600_000_000_000;

/// A watcher task that answers commands the way the real one would. A snapshot runs until
/// the end of the test: a second one is refused.
fn answer_commands(
    mut rx: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
    seen: Arc<AtomicUsize>,
    snapshots: Arc<Mutex<Vec<SnapshotRequest>>>,
) {
    tokio::spawn(async move {
        while let Some(command) = rx.recv().await {
            seen.fetch_add(1, Ordering::SeqCst);
            match command {
                Command::Pause(reply) => {
                    status.send_modify(|s| {
                        s.state = State::Paused;
                        s.paused = true;
                        s.reason = Some("paused by an operator".into());
                    });
                    let _ = reply.send(Ok(()));
                }
                Command::Resume(reply) => {
                    status.send_modify(|s| {
                        s.state = State::Running;
                        s.paused = false;
                        s.reason = None;
                    });
                    let _ = reply.send(Ok(()));
                }
                Command::Rewind(target, reply) => {
                    let result = match &target {
                        RewindTarget::Token(Bson::Document(d))
                            if d.get_str("_data").ok() == Some("unknown") =>
                        {
                            Err(ControlError::Conflict(
                                "resume token not found in the oplog".into(),
                            ))
                        }
                        RewindTarget::Time(t) if t.timestamp_millis() < OPLOG_START_MILLIS => Err(
                            ControlError::Conflict("target is older than the oplog window".into()),
                        ),
                        _ => Ok(()),
                    };
                    if result.is_ok() {
                        status.send_modify(|s| s.last_event_time = None);
                    }
                    let _ = reply.send(result);
                }
                Command::Snapshot(request, reply) => {
                    let mut seen = snapshots.lock().expect("lock");
                    if !seen.is_empty() {
                        let _ = reply.send(Err(ControlError::Conflict(
                            "a snapshot is already copying".into(),
                        )));
                        continue;
                    }
                    let filter = request.filter.clone();
                    seen.push(request);
                    status.send_modify(|s| {
                        s.snapshot = Some(watchers::status::SnapshotStatus {
                            done: false,
                            copied: 0,
                            copied_before: 0,
                            estimated_total: Some(100),
                            started_at: DateTime::now(),
                            finished_at: None,
                            ranges: 1,
                            filter,
                        })
                    });
                    let _ = reply.send(Ok(()));
                }
            }
        }
    });
}

struct Harness {
    router: Router,
    liveness: Liveness,
    /// Status senders of `orders` and `users`.
    orders: watch::Sender<Status>,
    users: watch::Sender<Status>,
    /// Commands that reached any answering watcher.
    seen: Arc<AtomicUsize>,
    /// Snapshot requests `orders` accepted.
    snapshots: Arc<Mutex<Vec<SnapshotRequest>>>,
    /// Keeps the `silent` watcher's receiver open, never read.
    _silent: mpsc::Receiver<Command>,
}

/// Watchers, in config order: `orders` and `users` (answer commands), `silent` (never
/// answers), `gone` (its task has exited).
fn harness(token: Option<&str>) -> Harness {
    let seen = Arc::new(AtomicUsize::new(0));
    let snapshots = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    let mut senders = Vec::new();
    for name in ["orders", "users"] {
        let (tx, rx) = watch::channel(running());
        let (handle, commands) = WatcherHandle::new(spec(name), rx);
        let accepted = match name {
            "orders" => snapshots.clone(),
            _ => Arc::default(),
        };
        answer_commands(commands, tx.clone(), seen.clone(), accepted);
        handles.push(handle);
        senders.push(tx);
    }
    let (silent_tx, silent_rx) = watch::channel(running());
    let (silent, silent_commands) = WatcherHandle::new(spec("silent"), silent_rx);
    handles.push(silent);
    let (gone_tx, gone_rx) = watch::channel(running());
    let (gone, gone_commands) = WatcherHandle::new(spec("gone"), gone_rx);
    drop(gone_commands);
    handles.push(gone);
    // The watch senders of `silent` and `gone` must outlive the test for their status to stay.
    std::mem::forget(silent_tx);
    std::mem::forget(gone_tx);

    let registry = api::registry_with_process_metrics().expect("registry");
    let metrics = Metrics::register(&registry).expect("metrics");
    let liveness = Liveness::new();
    let state = AppState::new(handles, registry, metrics, liveness.clone())
        .expect("unique names")
        .with_api_token(token.map(str::to_owned))
        .expect("token")
        .with_command_timeout(Duration::from_millis(200));
    let mut senders = senders.into_iter();
    Harness {
        router: api::router(state),
        liveness,
        orders: senders.next().expect("orders"),
        users: senders.next().expect("users"),
        seen,
        snapshots,
        _silent: silent_commands,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field in {}", self.text))
            .to_owned()
    }
}

async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    Reply {
        status,
        headers,
        text: String::from_utf8(bytes.to_vec()).expect("UTF-8 body"),
    }
}

async fn get(router: &Router, uri: &str) -> Reply {
    send(
        router,
        Request::get(uri).body(Body::empty()).expect("request"),
    )
    .await
}

/// A POST with `Authorization: Bearer <token>` when given, and a JSON body when given.
async fn post(router: &Router, uri: &str, token: Option<&str>, body: Option<&str>) -> Reply {
    let mut request = Request::post(uri);
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = match body {
        Some(b) => {
            request = request.header(CONTENT_TYPE, "application/json");
            Body::from(b.to_owned())
        }
        None => Body::empty(),
    };
    send(router, request.body(body).expect("request")).await
}

fn assert_json_content_type(r: &Reply) {
    assert_eq!(
        r.headers.get(CONTENT_TYPE).map(|v| v.as_bytes()),
        Some(&b"application/json"[..]),
        "{}",
        r.text
    );
}

/// Each body POSTed to `uri` is 400 with a JSON error containing its expected words, and none
/// reaches a watcher.
async fn assert_bad_requests(h: &Harness, uri: &str, cases: &[(&str, &str)]) {
    for (body, expect) in cases {
        let r = post(&h.router, uri, Some(TOKEN), Some(body)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert_json_content_type(&r);
        assert!(r.error().contains(expect), "{body}: {}", r.text);
    }
    assert_eq!(
        h.seen.load(Ordering::SeqCst),
        0,
        "no bad request reaches a watcher"
    );
}

// ---- probes ----

#[tokio::test]
async fn healthz_is_ok_while_the_supervisor_beats() {
    let h = harness(Some(TOKEN));
    h.liveness.beat();
    let r = get(&h.router, "/healthz").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!({"status": "ok"}));
}

#[tokio::test]
async fn healthz_is_503_when_the_heartbeat_is_stale() {
    let h = harness(Some(TOKEN));
    h.liveness
        .beat_at(DateTime::now().timestamp_millis() - 20_000);
    let r = get(&h.router, "/healthz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = r.json();
    assert_eq!(body["status"], "unhealthy");
    assert!(body["reason"]
        .as_str()
        .is_some_and(|s| s.contains("heartbeat")));
    assert!(body["last_heartbeat"].is_string());
}

#[tokio::test]
async fn readyz_is_200_when_every_watcher_runs_or_is_paused() {
    let h = harness(Some(TOKEN));
    h.users.send_modify(|s| {
        s.state = State::Paused;
        s.paused = true;
    });
    let r = get(&h.router, "/readyz").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json(), json!({"status": "ready", "watchers": []}));
}

#[tokio::test]
async fn readyz_is_503_naming_each_watcher_that_is_not_ready() {
    let h = harness(Some(TOKEN));
    h.users.send_modify(|s| {
        s.state = State::HistoryLost;
        s.reason = Some("checkpoint older than the oplog".into());
    });
    h.orders.send_modify(|s| s.state = State::BackingOff);
    let r = get(&h.router, "/readyz").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        r.json(),
        json!({"status": "not_ready", "watchers": [
            {"name": "orders", "state": "backing_off", "reason": null},
            {"name": "users", "state": "history_lost", "reason": "checkpoint older than the oplog"},
        ]})
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_fresh_watcher_gauges() {
    let h = harness(Some(TOKEN));
    h.users.send_modify(|s| s.state = State::Failed);
    let r = get(&h.router, "/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[CONTENT_TYPE], "text/plain; version=0.0.4");
    for line in [
        "mongo_watcher_watcher_state{state=\"failed\",watcher=\"users\"} 1",
        "mongo_watcher_watcher_state{state=\"running\",watcher=\"orders\"} 1",
        "mongo_watcher_lag_seconds{watcher=\"silent\"} 0",
    ] {
        assert!(r.text.contains(line), "{line} missing in\n{}", r.text);
    }
    #[cfg(target_os = "linux")]
    assert!(
        r.text.contains("process_resident_memory_bytes"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn openapi_json_is_served_and_is_the_generated_document() {
    let h = harness(None);
    let r = get(&h.router, "/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_json_content_type(&r);
    assert_eq!(r.text, api::openapi_json());
}

// ---- reading watchers ----

#[tokio::test]
async fn watchers_are_listed_in_config_order_with_every_field() {
    let h = harness(Some(TOKEN));
    h.orders.send_modify(|s| {
        s.last_event_time = Some(DateTime::from_millis(1_700_000_000_000));
        s.last_checkpoint_at = Some(DateTime::from_millis(1_700_000_001_000));
        s.restarts = 2;
        s.counters = Counters {
            events: 10,
            records_put: 9,
            put_retries: 3,
            records_skipped: 1,
            checkpoint_writes: 4,
        };
        s.last_read_event_time = Some(DateTime::from_millis(1_700_000_002_000));
        s.checkpoint = Some(StoredPosition {
            token: Some(r#"{"_data":"8263AB"}"#.into()),
            cluster_time: Some(DateTime::from_millis(1_700_000_000_000)),
        });
        s.oplog_oldest = Some(DateTime::from_millis(1_699_999_000_000));
        s.last_error = Some((
            DateTime::from_millis(1_700_000_003_000),
            "kinesis stream `orders-stream`: nothing acknowledged".into(),
        ));
        s.flow = Flow {
            send_limit: 2,
            calls_in_flight: 1,
            pending_records: 40,
            pending_bytes: 40_960,
            records_delayed: 3,
            paced_shards: vec![2],
            rejected: [("ProvisionedThroughputExceededException".to_owned(), 7)].into(),
        };
    });
    let r = get(&h.router, "/watchers").await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    let names: Vec<&str> = body["watchers"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["orders", "users", "silent", "gone"]);
    let orders = &body["watchers"][0];
    assert!(orders["lag_seconds"].as_f64().is_some_and(|lag| lag > 1e6));
    assert!(orders["read_lag_seconds"]
        .as_f64()
        .is_some_and(|lag| lag > 1e6));
    assert!(orders["committed_lag_seconds"]
        .as_f64()
        .is_some_and(|lag| lag > 1e6));
    let mut orders = orders.clone();
    orders["lag_seconds"] = json!(0);
    orders["read_lag_seconds"] = json!(0);
    orders["committed_lag_seconds"] = json!(0);
    assert_eq!(
        orders,
        json!({
            "name": "orders",
            "database": "shop",
            "collection": "orders_coll",
            "stream": "orders-stream",
            "state": "running",
            "reason": null,
            "paused": false,
            "last_event_time": "2023-11-14T22:13:20Z",
            "last_checkpoint_at": "2023-11-14T22:13:21Z",
            "lag_seconds": 0,
            "read_lag_seconds": 0,
            "committed_lag_seconds": 0,
            "oplog_headroom_seconds": 1000.0,
            "checkpoint": {
                "resume_token": {"_data": "8263AB"},
                "cluster_time": "2023-11-14T22:13:20Z"
            },
            "last_error": {
                "message": "kinesis stream `orders-stream`: nothing acknowledged",
                "at": "2023-11-14T22:13:23Z"
            },
            "owner": null,
            "restarts": 2,
            "counters": {
                "events": 10, "records_put": 9, "put_retries": 3,
                "records_skipped": 1, "checkpoint_writes": 4
            },
            "flow": {
                "send_limit": 2, "calls_in_flight": 1, "pending_records": 40,
                "pending_bytes": 40960, "records_delayed": 3,
                "paced_shards": ["shardId-000000000002"],
                "rejected": {"ProvisionedThroughputExceededException": 7}
            },
            "snapshot": null
        })
    );
    assert_eq!(body["watchers"][1]["last_event_time"], Value::Null);
}

#[tokio::test]
async fn one_watcher_by_name() {
    let h = harness(Some(TOKEN));
    let r = get(&h.router, "/watchers/users").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["name"], "users");
    assert_eq!(r.json()["state"], "running");
}

#[tokio::test]
async fn unknown_watcher_is_404_listing_the_known_ones() {
    let h = harness(Some(TOKEN));
    for r in [
        get(&h.router, "/watchers/nope").await,
        post(&h.router, "/watchers/nope/pause", Some(TOKEN), None).await,
    ] {
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_json_content_type(&r);
        assert_eq!(
            r.json(),
            json!({"error": "unknown watcher `nope`",
                   "watchers": ["orders", "users", "silent", "gone"]})
        );
    }
}

#[tokio::test]
async fn unknown_route_is_json_404() {
    let h = harness(Some(TOKEN));
    let r = get(&h.router, "/nothing/here").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_json_content_type(&r);
    assert_eq!(r.error(), "no route for GET /nothing/here");
}

#[tokio::test]
async fn wrong_method_is_json_405_with_allow() {
    let h = harness(Some(TOKEN));
    let r = get(&h.router, "/watchers/orders/pause").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_json_content_type(&r);
    assert!(r.error().contains("GET"), "{}", r.text);
    assert_eq!(r.headers[ALLOW], "POST");

    let r = send(
        &h.router,
        Request::delete("/watchers")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_json_content_type(&r);
    assert_eq!(h.seen.load(Ordering::SeqCst), 0);
}

// ---- commands ----

#[tokio::test]
async fn pause_and_resume_answer_the_watcher_after_the_command_and_are_idempotent() {
    let h = harness(Some(TOKEN));
    for _ in 0..2 {
        let r = post(&h.router, "/watchers/orders/pause", Some(TOKEN), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json()["state"], "paused");
        assert_eq!(r.json()["paused"], true);
    }
    for _ in 0..2 {
        let r = post(&h.router, "/watchers/orders/resume", Some(TOKEN), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(r.json()["state"], "running");
        assert_eq!(r.json()["paused"], false);
    }
    assert_eq!(h.seen.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn rewind_to_a_time_to_latest_or_to_a_token() {
    let h = harness(Some(TOKEN));
    for body in [
        r#"{"to": "latest"}"#,
        r#"{"to": "2024-05-01T12:00:00Z"}"#,
        r#"{"to": "2024-05-01T14:00:00.250+02:00"}"#,
        r#"{"resume_token": {"_data": "8266A1B2C3000000012B0229296E04"}}"#,
    ] {
        let r = post(
            &h.router,
            "/watchers/orders/rewind",
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{body}: {}", r.text);
        assert_eq!(r.json()["name"], "orders");
    }
    assert_eq!(h.seen.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn rewind_to_a_target_the_watcher_cannot_reach_is_409() {
    let h = harness(Some(TOKEN));
    for body in [
        r#"{"resume_token": {"_data": "unknown"}}"#,
        r#"{"to": "2001-01-01T00:00:00Z"}"#,
    ] {
        let r = post(
            &h.router,
            "/watchers/orders/rewind",
            Some(TOKEN),
            Some(body),
        )
        .await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{body}: {}", r.text);
        assert_json_content_type(&r);
        assert!(r.error().contains("oplog"), "{}", r.text);
    }
}

#[tokio::test]
async fn malformed_rewind_requests_are_400() {
    let h = harness(Some(TOKEN));
    let future = DateTime::from_millis(DateTime::now().timestamp_millis() + 3_600_000)
        .try_to_rfc3339_string()
        .expect("rfc3339");
    let future_body = format!(r#"{{"to": "{future}"}}"#);
    let cases = [
        (r#"{"to": "latest""#, "JSON"),
        (r#"{"to": "latest", "force": true}"#, "unknown field"),
        (r#"{"to": "yesterday"}"#, "RFC 3339"),
        (future_body.as_str(), "future"),
        (
            r#"{"to": "latest", "resume_token": {"_data": "82"}}"#,
            "exactly one",
        ),
        (r#"{}"#, "exactly one"),
        (r#"{"resume_token": "82"}"#, "object"),
        (r#"{"to": 5}"#, "invalid type"),
        (r#"[]"#, "expected struct"),
        (r#"null"#, "invalid type"),
    ];
    assert_bad_requests(&h, "/watchers/orders/rewind", &cases).await;
}

/// `curl -d '{"to": "latest"}'` sends `application/x-www-form-urlencoded`; other clients send
/// no Content-Type or `text/plain`. The body is read as JSON whatever the header says.
#[tokio::test]
async fn rewind_reads_a_json_body_whatever_its_content_type() {
    let h = harness(Some(TOKEN));
    for content_type in [
        None,
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
    ] {
        let mut request = Request::post("/watchers/orders/rewind")
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"));
        if let Some(ct) = content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        let body = Body::from(r#"{"to": "latest"}"#);
        let r = send(&h.router, request.body(body).expect("request")).await;
        assert_eq!(r.status, StatusCode::OK, "{content_type:?}: {}", r.text);
        assert_eq!(r.json()["name"], "orders");
    }
    assert_eq!(h.seen.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_rewind_body_that_is_not_json_is_400_whatever_its_content_type() {
    let h = harness(Some(TOKEN));
    for (content_type, body) in [
        (Some("application/x-www-form-urlencoded"), "to=latest"),
        (None, "latest"),
        (Some("application/json"), "to=latest"),
        (None, ""),
    ] {
        let mut request = Request::post("/watchers/orders/rewind")
            .header(AUTHORIZATION, format!("Bearer {TOKEN}"));
        if let Some(ct) = content_type {
            request = request.header(CONTENT_TYPE, ct);
        }
        let r = send(&h.router, request.body(Body::from(body)).expect("request")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}: {}", r.text);
        assert_json_content_type(&r);
        assert!(r.error().contains("JSON"), "{body:?}: {}", r.text);
    }
    assert_eq!(h.seen.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn body_over_16_kib_is_413() {
    let h = harness(Some(TOKEN));
    let body = format!(
        r#"{{"resume_token": {{"_data": "{}"}}}}"#,
        "a".repeat(17 * 1024)
    );
    let r = post(
        &h.router,
        "/watchers/orders/rewind",
        Some(TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert_json_content_type(&r);
    assert!(r.error().contains("16384"), "{}", r.text);
    assert_eq!(h.seen.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn snapshot_is_202_with_the_watcher_and_a_second_one_is_409() {
    let h = harness(Some(TOKEN));
    let body =
        r#"{"filter": {"kind": "a", "_id": {"$gte": {"$oid": "665f1c2e8b3e4a0012345678"}}}}"#;
    let r = post(
        &h.router,
        "/watchers/orders/snapshot",
        Some(TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_json_content_type(&r);
    assert_eq!(r.json()["name"], "orders");
    assert_eq!(r.json()["snapshot"]["state"], "copying", "{}", r.text);
    assert_eq!(
        r.json()["snapshot"]["filter"],
        json!({"kind": "a", "_id": {"$gte": {"$oid": "665f1c2e8b3e4a0012345678"}}}),
        "{}",
        r.text
    );
    let oid = bson::oid::ObjectId::parse_str("665f1c2e8b3e4a0012345678").expect("oid");
    assert_eq!(
        *h.snapshots.lock().expect("lock"),
        vec![SnapshotRequest {
            filter: Some(bson::doc! {"kind": "a", "_id": {"$gte": oid}}),
        }]
    );

    let r = post(&h.router, "/watchers/orders/snapshot", Some(TOKEN), None).await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text);
    assert_json_content_type(&r);
    assert!(r.error().contains("already copying"), "{}", r.text);
    assert_eq!(h.seen.load(Ordering::SeqCst), 2);
}

/// No body, whitespace, `null`, `{}` and `{"filter": null}` all copy every document.
#[tokio::test]
async fn snapshot_without_a_filter_copies_everything() {
    for body in [
        None,
        Some("null"),
        Some(""),
        Some(" \n"),
        Some("{}"),
        Some(r#"{"filter": null}"#),
    ] {
        let h = harness(Some(TOKEN));
        let r = post(&h.router, "/watchers/orders/snapshot", Some(TOKEN), body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{body:?}: {}", r.text);
        assert_eq!(
            *h.snapshots.lock().expect("lock"),
            vec![SnapshotRequest { filter: None }],
            "{body:?}"
        );
    }
}

#[tokio::test]
async fn malformed_snapshot_requests_are_400_and_unknown_watchers_404() {
    let h = harness(Some(TOKEN));
    let cases = [
        (r#"{"filter": 5}"#, "`filter` must be a JSON object"),
        (r#"{"filter": "kind"}"#, "`filter` must be a JSON object"),
        (
            r#"{"filter": [{"kind": "a"}]}"#,
            "`filter` must be a JSON object",
        ),
        (
            r#"{"filter": {"$oid": "665f1c2e8b3e4a0012345678"}}"#,
            "`filter`",
        ),
        (
            r#"{"filter": {"_id": {"$oid": "nope"}}}"#,
            "`filter` is not valid Extended JSON",
        ),
        (r#"{"query": {"kind": "a"}}"#, "unknown field `query`"),
        (r#"{"filter": {}, "limit": 5}"#, "unknown field `limit`"),
        (r#"{"filter": {"kind": "a""#, "JSON"),
        ("kind=a", "JSON"),
        ("[]", "expected struct"),
    ];
    assert_bad_requests(&h, "/watchers/orders/snapshot", &cases).await;

    let r = post(&h.router, "/watchers/nope/snapshot", Some(TOKEN), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    assert_eq!(
        r.json()["watchers"],
        json!(["orders", "users", "silent", "gone"])
    );
    let r = post(&h.router, "/watchers/gone/snapshot", Some(TOKEN), None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
}

#[tokio::test]
async fn a_watcher_that_does_not_answer_in_time_is_503() {
    let h = harness(Some(TOKEN));
    let r = post(&h.router, "/watchers/silent/pause", Some(TOKEN), None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_json_content_type(&r);
    assert!(r.error().contains("may still complete"), "{}", r.text);
}

/// A watcher that is starting or backing off may be stuck in MongoDB's 30 s server selection:
/// the API answers after 2 s with its state and reason instead of the whole command timeout.
#[tokio::test]
async fn a_watcher_that_is_backing_off_answers_503_with_its_state_within_2_s() {
    let (status_tx, status_rx) = watch::channel(Status {
        state: State::BackingOff,
        reason: Some("mongodb: server selection timeout".into()),
        ..Status::default()
    });
    let (handle, _commands) = WatcherHandle::new(spec("stuck"), status_rx);
    let registry = api::registry_with_process_metrics().expect("registry");
    let metrics = Metrics::register(&registry).expect("metrics");
    let state = AppState::new(vec![handle], registry, metrics, Liveness::new())
        .expect("state")
        .with_api_token(Some(TOKEN.to_owned()))
        .expect("token")
        .with_command_timeout(Duration::from_secs(30));
    let router = api::router(state);
    for (action, body) in [("resume", None), ("rewind", Some(r#"{"to": "latest"}"#))] {
        let started = std::time::Instant::now();
        let r = post(
            &router,
            &format!("/watchers/stuck/{action}"),
            Some(TOKEN),
            body,
        )
        .await;
        let took = started.elapsed();
        assert_eq!(
            r.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{action}: {}",
            r.text
        );
        assert!(
            took < api::UNSETTLED_COMMAND_WAIT + Duration::from_secs(1),
            "{action} took {took:?}"
        );
        assert_eq!(r.json()["state"], "backing_off", "{}", r.text);
        assert_eq!(r.json()["reason"], "mongodb: server selection timeout");
    }
    drop(status_tx);
}

#[tokio::test]
async fn a_watcher_that_is_gone_is_503() {
    let h = harness(Some(TOKEN));
    let r = post(&h.router, "/watchers/gone/resume", Some(TOKEN), None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.error().contains("shutting down"), "{}", r.text);
}

// ---- security ----

#[tokio::test]
async fn mutations_without_the_right_token_are_401_and_reach_no_watcher() {
    let h = harness(Some(TOKEN));
    let mut requests = Vec::new();
    for action in ["pause", "resume", "rewind", "snapshot"] {
        let uri = format!("/watchers/orders/{action}");
        let body = Some(r#"{"to": "latest"}"#);
        requests.push(post(&h.router, &uri, None, body).await);
        requests.push(post(&h.router, &uri, Some("wrong"), body).await);
        requests.push(post(&h.router, &uri, Some(&format!("{TOKEN}x")), body).await);
        let basic = Request::post(&uri)
            .header(AUTHORIZATION, format!("Basic {TOKEN}"))
            .body(Body::empty())
            .expect("request");
        requests.push(send(&h.router, basic).await);
    }
    // Before the watcher lookup and the body: no 404, no 400 for an unauthenticated caller.
    requests.push(post(&h.router, "/watchers/nope/pause", None, None).await);
    requests.push(post(&h.router, "/watchers/nope/snapshot", None, None).await);
    requests.push(
        post(
            &h.router,
            "/watchers/orders/snapshot",
            Some("wrong"),
            Some(r#"{"filter": 5}"#),
        )
        .await,
    );
    requests.push(
        post(
            &h.router,
            "/watchers/orders/rewind",
            Some("wrong"),
            Some("{"),
        )
        .await,
    );
    for r in &requests {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        assert_eq!(r.headers[WWW_AUTHENTICATE], "Bearer");
        assert_json_content_type(r);
        assert!(!r.text.contains("orders"), "{}", r.text);
    }
    assert_eq!(h.seen.load(Ordering::SeqCst), 0, "a command got through");
    assert_eq!(h.orders.borrow().state, State::Running);
}

#[tokio::test]
async fn mutations_are_403_when_no_token_is_configured() {
    let h = harness(None);
    for action in ["pause", "resume", "rewind", "snapshot"] {
        let uri = format!("/watchers/orders/{action}");
        let r = post(&h.router, &uri, Some(TOKEN), Some(r#"{"to": "latest"}"#)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert_json_content_type(&r);
        let error = r.error();
        assert!(error.contains("MONGO_WATCHER_API_TOKEN"), "{error}");
        assert!(error.contains("http.api_token_ssm_parameter"), "{error}");
    }
    assert_eq!(h.seen.load(Ordering::SeqCst), 0);
    // Reads stay open.
    assert_eq!(get(&h.router, "/watchers").await.status, StatusCode::OK);
}

#[tokio::test]
async fn reads_need_no_token() {
    let h = harness(Some(TOKEN));
    for uri in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/watchers",
        "/watchers/orders",
        "/openapi.json",
    ] {
        assert_eq!(get(&h.router, uri).await.status, StatusCode::OK, "{uri}");
    }
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn mutations_are_logged_and_the_token_never_is() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let h = harness(Some(TOKEN));
    let body = Some(r#"{"to": "latest"}"#);
    let r = post(&h.router, "/watchers/orders/rewind", Some(TOKEN), body).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = post(
        &h.router,
        "/watchers/orders/pause",
        Some("not-the-token"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("UTF-8");
    assert!(
        logs.contains("control command accepted")
            && logs.contains("watcher=\"orders\"")
            && logs.contains("action=\"rewind\"")
            && logs.contains("target=\"latest\""),
        "{logs}"
    );
    assert!(
        logs.contains("/watchers/orders/rewind"),
        "request spans are logged: {logs}"
    );
    assert!(!logs.contains(TOKEN), "the token was logged: {logs}");
    assert!(
        !logs.contains("not-the-token"),
        "a presented token was logged: {logs}"
    );
    assert!(!logs.to_lowercase().contains("authorization"), "{logs}");
}

// ---- state ----

#[test]
fn state_rejects_duplicate_names_and_empty_tokens() {
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).expect("metrics");
    let handle = |name| WatcherHandle::new(spec(name), watch::channel(running()).1).0;
    let err = AppState::new(
        vec![handle("a"), handle("b"), handle("a")],
        registry.clone(),
        metrics.clone(),
        Liveness::new(),
    )
    .map(|_| ())
    .expect_err("duplicate");
    assert_eq!(err, StateError::DuplicateWatcher("a".into()));
    let state =
        AppState::new(vec![handle("a")], registry, metrics, Liveness::new()).expect("state");
    assert!(!state.mutations_enabled());
    assert_eq!(state.command_timeout(), api::DEFAULT_COMMAND_TIMEOUT);
    let err = state
        .with_api_token(Some(" ".into()))
        .map(|_| ())
        .expect_err("empty");
    assert_eq!(err, StateError::EmptyToken);
}

#[test]
fn liveness_goes_stale_after_15_s() {
    let l = Liveness::new();
    assert!(l.is_alive());
    l.beat_at(DateTime::now().timestamp_millis() - 16_000);
    assert!(!l.is_alive());
    l.beat();
    assert!(l.is_alive());
}

/// `snapshot: initial` progress: copied, estimated total, rate and ETA, and `done`.
#[tokio::test]
async fn a_snapshot_shows_its_progress_rate_and_eta() {
    let started = DateTime::from_millis(DateTime::now().timestamp_millis() - 10_000);
    let (status_tx, status_rx) = watch::channel(Status {
        state: State::Running,
        snapshot: Some(watchers::status::SnapshotStatus {
            done: false,
            copied: 3_000,
            copied_before: 1_000,
            estimated_total: Some(10_000),
            started_at: started,
            finished_at: None,
            ranges: 4,
            filter: None,
        }),
        ..Status::default()
    });
    let (handle, _commands) = WatcherHandle::new(spec("snap"), status_rx);
    let registry = api::registry_with_process_metrics().expect("registry");
    let metrics = Metrics::register(&registry).expect("metrics");
    let state = AppState::new(vec![handle], registry, metrics, Liveness::new()).expect("state");
    let router = api::router(state);
    let r = get(&router, "/watchers/snap").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let snap = &r.json()["snapshot"];
    assert_eq!(snap["state"], "copying", "{}", r.text);
    assert_eq!(snap["documents_copied"], 3_000);
    assert_eq!(snap["estimated_total"], 10_000);
    assert_eq!(snap["ranges"], 4);
    assert_eq!(snap["filter"], Value::Null);
    // 2000 copied by this process in about 10 s: about 200/s, 7000 left: about 35 s.
    let rate = snap["documents_per_second"].as_f64().unwrap();
    assert!((150.0..=210.0).contains(&rate), "{rate}");
    let eta = snap["eta_seconds"].as_f64().unwrap();
    assert!((30.0..=50.0).contains(&eta), "{eta}");
    let metrics = get(&router, "/metrics").await;
    assert!(
        metrics
            .text
            .contains("mongo_watcher_snapshot_progress_ratio{watcher=\"snap\"} 0.3"),
        "{}",
        metrics.text
    );
    status_tx.send_modify(|s| {
        if let Some(snap) = s.snapshot.as_mut() {
            snap.done = true;
            snap.finished_at = Some(DateTime::now());
        }
    });
    let r = get(&router, "/watchers/snap").await;
    assert_eq!(r.json()["snapshot"]["state"], "done");
    assert_eq!(r.json()["snapshot"]["eta_seconds"], 0.0);
    let r = get(&router, "/watchers").await;
    assert!(r.text.contains("\"snapshot\""), "{}", r.text);
}
