//! The control plane end to end: a real mongo-watcher process on SecantusDB and moto, driven
//! over HTTP the way an operator with curl or a Prometheus server would.

mod support;

use std::time::Duration;

use bson::{doc, Document};
use serde_json::json;
use support::*;

const TOKEN: &str = "test-token-5521";

/// The fixtures' [`Env`] on `mongo`: a 2-shard stream and a checkpoint table.
async fn setup(mongo: Mongo) -> Env {
    Env::with_mongo(mongo, "s", 2).await
}

impl Env {
    fn run(&self, watchers: &[String], token: Option<&str>) -> Watcher {
        let mut env = vec![];
        if let Some(t) = token {
            env.push(("MONGO_WATCHER_API_TOKEN", t));
        }
        let w = Watcher::start_with_env(
            self.dir.path(),
            &self.config(watchers),
            &self.moto.endpoint(),
            &env,
        );
        wait_http(self.port, "/readyz", WAIT, |r| r.status == 200);
        w
    }

    fn post(&self, path: &str, token: Option<&str>, body: &str) -> Response {
        request(self.port, "POST", path, token, body)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_writes_survives_restart_and_resume_delivers_them() {
    let s = setup(Mongo::start()).await;
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    let mut w = s.run(&watchers, Some(TOKEN));
    let coll = s.coll().await;
    insert_ids(&coll, [1]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1]))
        .await;

    let r = s.post("/watchers/w/pause", Some(TOKEN), "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "paused");
    assert_eq!(r.json()["paused"], true);
    assert_eq!(
        s.post("/watchers/w/pause", Some(TOKEN), "").status,
        200,
        "pause is idempotent"
    );
    let item = s.aws.checkpoint(&s.table, "w").await.unwrap();
    assert_eq!(
        item.get("paused").and_then(|v| v.as_bool().ok()),
        Some(&true)
    );
    w.wait_for_log("action=\"pause\"", WAIT);

    insert_ids(&coll, [2, 3]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !has_all(&s.aws.read_stream(&s.stream).await, &[2]),
        "delivered while paused"
    );
    // A replaced process comes back paused, and paused counts as ready.
    w.kill9();
    w.restart();
    wait_http(s.port, "/watchers/w", WAIT, |r| {
        r.status == 200 && r.json()["state"] == "paused"
    });
    assert_eq!(request(s.port, "GET", "/readyz", None, "").status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!has_all(&s.aws.read_stream(&s.stream).await, &[2]));

    let r = s.post("/watchers/w/resume", Some(TOKEN), "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        s.post("/watchers/w/resume", Some(TOKEN), "").status,
        200,
        "resume is idempotent"
    );
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1, 2, 3]))
        .await;
    wait_http(s.port, "/watchers/w", WAIT, |r| {
        r.json()["state"] == "running"
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewind_replays_from_a_time_skips_to_latest_and_refuses_bad_targets() {
    let s = setup(Mongo::start()).await;
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    let _w = s.run(&watchers, Some(TOKEN));
    let coll = s.coll().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1000)
        .try_to_rfc3339_string()
        .unwrap();
    insert_ids(&coll, [1, 2, 3]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1, 2, 3]))
        .await;

    // Replay from a time: everything after it arrives again (at least once).
    let r = s.post(
        "/watchers/w/rewind",
        Some(TOKEN),
        &json!({"to": before}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| (1..=3).all(|i| count(r, i) >= 2))
        .await;

    // Bad targets change nothing.
    let future = json!({"to": "2999-01-01T00:00:00Z"}).to_string();
    assert_eq!(
        s.post("/watchers/w/rewind", Some(TOKEN), &future).status,
        400
    );
    let ancient = json!({"to": "2001-01-01T00:00:00Z"}).to_string();
    let r = s.post("/watchers/w/rewind", Some(TOKEN), &ancient);
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .unwrap_or_default()
        .contains("oplog"));
    let bogus = json!({"resume_token": {"_data": "zz"}}).to_string();
    assert_eq!(
        s.post("/watchers/w/rewind", Some(TOKEN), &bogus).status,
        409
    );
    insert_ids(&coll, [4]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[4]))
        .await;

    // Skip to latest while paused: what was written meanwhile is skipped, and the watcher
    // stays paused at its new position.
    assert_eq!(s.post("/watchers/w/pause", Some(TOKEN), "").status, 200);
    insert_ids(&coll, [5, 6]).await;
    let latest = json!({"to": "latest"}).to_string();
    let r = s.post("/watchers/w/rewind", Some(TOKEN), &latest);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.view("w")["state"], "paused");
    assert_eq!(s.post("/watchers/w/resume", Some(TOKEN), "").status, 200);
    insert_ids(&coll, [7]).await;
    let recs = s
        .aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[7]))
        .await;
    assert_eq!(
        count(&recs, 5) + count(&recs, 6),
        0,
        "rewind to latest replayed skipped writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_history_lost_until_a_rewind_recovers_it() {
    let s = setup(Mongo::start_with(&["--oplog-max-entries", "10"])).await;
    let client = s.mongo.client().await;
    let coll = s.coll().await;
    let mut stream = coll.watch().await.unwrap();
    coll.insert_one(doc! {"_id": 0_i64}).await.unwrap();
    let event = futures_util::StreamExt::next(&mut stream)
        .await
        .unwrap()
        .unwrap();
    let token = watchers::reader::from_resume_token(&event.id).unwrap();
    let data = token
        .as_document()
        .unwrap()
        .get_str("_data")
        .unwrap()
        .to_owned();
    insert_ids(&coll, 100..140).await;
    client
        .database("admin")
        .run_command(doc! {"secantusAdmin.pruneOplog": 1})
        .await
        .unwrap();
    let extra = format!("    start_at: {{resume_token: {{_data: \"{data}\"}}}}\n");
    let watchers = [
        watcher_yaml("lost", "db", "c", &s.stream, &extra),
        watcher_yaml("fine", "db", "other", &s.stream, ""),
    ];
    let _w = Watcher::start_with_env(
        s.dir.path(),
        &s.config(&watchers),
        &s.moto.endpoint(),
        &[("MONGO_WATCHER_API_TOKEN", TOKEN)],
    );
    let r = wait_http(s.port, "/readyz", WAIT, |r| {
        r.status == 503 && r.body.contains("history_lost") && !r.body.contains("\"fine\"")
    });
    assert!(
        r.body.contains("ChangeStreamHistoryLost") && !r.body.contains("RawDocumentBuf"),
        "the reason is one readable line: {}",
        r.body
    );
    let body = r.json();
    let names: Vec<&str> = body["watchers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["lost"], "only the broken watcher is named: {body}");
    let r = s.post(
        "/watchers/lost/rewind",
        Some(TOKEN),
        &json!({"to": "latest"}).to_string(),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_http(s.port, "/readyz", WAIT, |r| r.status == 200);
    insert_ids(&coll, [7]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[7]))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_auth_changes_nothing() {
    let s = setup(Mongo::start()).await;
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    // Without a token configured, mutations are refused with a hint.
    let mut w = s.run(&watchers, None);
    let r = s.post("/watchers/w/pause", None, "");
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("MONGO_WATCHER_API_TOKEN"));
    assert_eq!(s.view("w")["state"], "running");
    w.terminate();

    let mut w = s.run(&watchers, Some(TOKEN));
    for token in [None, Some("wrong"), Some("test-token-552")] {
        let r = s.post("/watchers/w/pause", token, "");
        assert_eq!(r.status, 401, "{token:?}: {}", r.body);
        assert!(
            r.headers.contains("www-authenticate: Bearer")
                || r.headers.contains("WWW-Authenticate: Bearer"),
            "{}",
            r.headers
        );
        let r = s.post(
            "/watchers/w/rewind",
            token,
            &json!({"to": "latest"}).to_string(),
        );
        assert_eq!(r.status, 401);
    }
    assert_eq!(s.view("w")["state"], "running");
    let coll = s.coll().await;
    insert_ids(&coll, [1]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1]))
        .await;
    assert!(
        !w.logs().contains("wrong"),
        "a presented token reached the logs"
    );
    assert!(
        !w.logs().contains(TOKEN),
        "the configured token reached the logs"
    );
    w.terminate();
}

fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_and_a_real_prometheus_scrapes_them() {
    let s = setup(Mongo::start()).await;
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    let _w = s.run(&watchers, Some(TOKEN));
    let before = request(s.port, "GET", "/metrics", None, "").body;
    let coll = s.coll().await;
    insert_ids(&coll, 1..=5).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1, 2, 3, 4, 5]))
        .await;
    let after = wait_http(s.port, "/metrics", WAIT, |r| {
        metric(&r.body, "mongo_watcher_records_put_total", "watcher=\"w\"") >= 5.0
    })
    .body;
    let label = "operation=\"insert\",watcher=\"w\"";
    assert_eq!(
        metric(&after, "mongo_watcher_events_total", label)
            - metric(&before, "mongo_watcher_events_total", label),
        5.0
    );
    assert_eq!(
        metric(
            &after,
            "mongo_watcher_watcher_state",
            "state=\"running\",watcher=\"w\""
        ),
        1.0
    );
    for family in [
        "mongo_watcher_put_duration_seconds_bucket",
        "mongo_watcher_batch_records_bucket",
        "mongo_watcher_lag_seconds",
        "mongo_watcher_checkpoint_age_seconds",
        "mongo_watcher_checkpoint_writes_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(after.contains(family), "{family} missing");
    }

    // promtool accepts the exposition and the alert rules.
    let promtool = which("promtool");
    let dir = tempfile::tempdir().unwrap();
    let exposition = dir.path().join("metrics.txt");
    std::fs::write(&exposition, &after).unwrap();
    let out = std::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&exposition).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("charts/mongo-watcher/files/alerts.yaml");
    let out = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus server scrapes mongo-watcher and answers a query about it.
    let prom_port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n  - job_name: mongo-watcher\n    static_configs: [{{targets: ['127.0.0.1:{}']}}]\n",
            s.port
        ),
    )
    .unwrap();
    let mut prom = std::process::Command::new(which("prometheus"))
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start prometheus");
    let query = "/api/v1/query?query=mongo_watcher_records_put_total%7Bwatcher%3D%22w%22%7D";
    let r = wait_http(prom_port, query, WAIT, |r| {
        r.status == 200
            && r.json()["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v >= 5.0)
    });
    let _ = prom.kill();
    let _ = prom.wait();
    assert_eq!(r.json()["status"], "success");
}

fn which(tool: &str) -> std::path::PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = std::path::Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} not installed (scripts/test-setup installs the Debian package prometheus)");
}

/// The API token can come from SSM (`http.api_token_ssm_parameter`), decrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_token_from_ssm() {
    let s = setup(Mongo::start()).await;
    s.aws
        .ssm
        .put_parameter()
        .name("/test/api/token")
        .value("ssm-api-token-9090")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .expect("put parameter");
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    let cfg = s.config(&watchers).replace(
        "http:\n",
        "http:\n  api_token_ssm_parameter: /test/api/token\n",
    );
    let w = Watcher::start(s.dir.path(), &cfg, &s.moto.endpoint());
    wait_http(s.port, "/readyz", WAIT, |r| r.status == 200);
    assert_eq!(s.post("/watchers/w/pause", Some("nope"), "").status, 401);
    let r = s.post("/watchers/w/pause", Some("ssm-api-token-9090"), "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!w.logs().contains("ssm-api-token-9090"));
}

// ---- Issue 8: a bounded HTTP server, rewind details, MongoDB unreachable ----

/// A GET on a fresh connection, or None when nothing answered within `timeout`.
fn get_within(port: u16, path: &str, timeout: Duration) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Open descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// 600 idle connections (a probe that never sends a request) against a cap of 64 and a 1 s
/// header timeout, in a process whose open-file limit is lowered to 400 the way a small
/// container's is: the HTTP server holds at most 64 descriptors, closes the idle clients,
/// still answers /healthz, and the pipeline's own MongoDB, Kinesis and DynamoDB sockets keep
/// delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http_connections_are_bounded_and_closed_while_delivery_goes_on() {
    const CAP: usize = 64;
    const IDLE_CLIENTS: usize = 600;
    let s = setup(Mongo::start()).await;
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    let cfg = s.config(&watchers).replace(
        "http:\n",
        &format!("http:\n  max_connections: {CAP}\n  header_read_timeout: 1s\n"),
    );
    let w = Watcher::start_with_env(
        s.dir.path(),
        &cfg,
        &s.moto.endpoint(),
        &[("MONGO_WATCHER_API_TOKEN", TOKEN)],
    );
    wait_http(s.port, "/readyz", WAIT, |r| r.status == 200);
    let pid = w.pid().expect("running");
    let coll = s.coll().await;
    insert_ids(&coll, [1]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1]))
        .await;
    let limited = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=400:400"])
        .status()
        .expect("prlimit (util-linux)");
    assert!(limited.success());
    let baseline = open_fds(pid);

    let mut idle = Vec::with_capacity(IDLE_CLIENTS);
    for _ in 0..IDLE_CLIENTS {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], s.port));
        if let Ok(c) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            idle.push(c);
        }
    }
    assert!(
        idle.len() > CAP * 4,
        "only {} connections opened",
        idle.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = open_fds(pid);
    assert!(
        held <= baseline + CAP + 8,
        "{held} descriptors open with {} idle clients (baseline {baseline}, cap {CAP})",
        idle.len()
    );

    // Delivery goes on while the idle clients are held.
    insert_ids(&coll, [2, 3]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1, 2, 3]))
        .await;

    // /healthz answers: it waits its turn behind the idle clients, each closed after 1 s.
    let started = std::time::Instant::now();
    assert_eq!(
        get_within(s.port, "/healthz", Duration::from_secs(40)),
        Some(200),
        "no answer from /healthz after {:?}",
        started.elapsed()
    );

    // Every idle client was closed by the server (EOF or reset), none kept.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut kept = 0;
    for mut c in idle {
        use std::io::Read;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        c.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .expect("read timeout");
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e)
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut => {}
            _ => kept += 1,
        }
    }
    assert_eq!(
        kept, 0,
        "idle connections still open after the header timeout"
    );
    insert_ids(&coll, [4]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[4]))
        .await;
    assert!(
        !w.logs().contains("Too many open files"),
        "descriptors ran out"
    );
}

/// A resume token of another collection is refused with 400 naming the namespace, and the
/// watcher keeps its position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewind_to_another_collections_token_is_400_naming_the_namespace() {
    let s = setup(Mongo::start()).await;
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    let _w = s.run(&watchers, Some(TOKEN));
    let other = s
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("other");
    let mut stream = other.watch().await.expect("watch other");
    other
        .insert_one(doc! {"_id": 99_i64})
        .await
        .expect("insert");
    let event = futures_util::StreamExt::next(&mut stream)
        .await
        .expect("an event")
        .expect("event");
    let token = watchers::reader::from_resume_token(&event.id).expect("token");
    let body = json!({"resume_token": token.into_relaxed_extjson()}).to_string();
    let r = s.post("/watchers/w/rewind", Some(TOKEN), &body);
    assert_eq!(r.status, 400, "{}", r.body);
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("another namespace"), "{error}");
    assert!(error.contains("db.c"), "{error}");
    wait_http(s.port, "/watchers/w", WAIT, |r| {
        r.json()["state"] == "running"
    });
    let coll = s.coll().await;
    insert_ids(&coll, [1]).await;
    s.aws
        .wait_for_records(&s.stream, WAIT, |r| has_all(r, &[1]))
        .await;
}

/// With MongoDB gone, resume and rewind answer within seconds (not after the driver's 30 s
/// server selection) with the watcher's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_and_rewind_answer_at_once_while_mongodb_is_down() {
    let mut s = setup(Mongo::start()).await;
    let watchers = [watcher_yaml("w", "db", "c", &s.stream, "")];
    let _w = s.run(&watchers, Some(TOKEN));
    s.mongo.kill();
    let latest = json!({"to": "latest"}).to_string();
    let timed = |action: &str, body: &str| {
        let started = std::time::Instant::now();
        let r = s.post(&format!("/watchers/w/{action}"), Some(TOKEN), body);
        (r, started.elapsed())
    };

    // Right after the kill the pipeline still runs; the rewind's probe finds MongoDB gone.
    let (r, took) = timed("rewind", &latest);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(took < Duration::from_secs(5), "rewind took {took:?}");
    assert!(r.json()["state"].is_string(), "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap_or_default()
            .contains("MongoDB"),
        "{}",
        r.body
    );

    // Later the watcher is starting (stuck connecting) or backing off.
    wait_http(s.port, "/watchers/w", WAIT, |r| {
        r.json()["state"] == "starting" || r.json()["state"] == "backing_off"
    });
    for (action, body) in [("resume", ""), ("rewind", latest.as_str())] {
        let (r, took) = timed(action, body);
        assert!(
            took < Duration::from_secs(5),
            "{action} took {took:?}: {}",
            r.body
        );
        assert!(
            r.status == 503 || (action == "resume" && r.status == 200),
            "{action}: {} {}",
            r.status,
            r.body
        );
        if r.status == 503 {
            let state = r.json()["state"].as_str().unwrap_or_default().to_owned();
            assert!(
                ["starting", "backing_off"].contains(&state.as_str()),
                "{}",
                r.body
            );
        }
    }
}
