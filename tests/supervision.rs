//! Supervision end to end: a panic inside a watcher's life, injected into the real binary
//! through the test-only hook of watchers/src/fault.rs (compiled into test builds only), is
//! caught by the supervisor, counted, shown, and followed by a restart from the checkpoint;
//! the watcher keeps its command channel.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const TOKEN: &str = "test-token-7781";
/// The hook's environment variable (watchers::fault::PANIC_FILE_ENV).
const PANIC_FILE_ENV: &str = "MONGO_WATCHER_TEST_PANIC_FILE";

fn state(port: u16) -> serde_json::Value {
    request(port, "GET", "/watchers/w", None, "").json()
}

fn metric(port: u16, series: &str) -> Option<f64> {
    request(port, "GET", "/metrics", None, "")
        .body
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_caught_counted_shown_and_the_watcher_resumes_from_its_checkpoint() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    // PutRecords passes the proxy, so events can be held unacknowledged when the panic hits.
    let proxy = Proxy::start(&moto);
    let aws = Aws::new(&moto).await;
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    aws.create_stream(&stream, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("panic-now");
    let port = free_port();
    let config = config_yaml(
        &mongo,
        Some(&table),
        &[watcher_yaml("w", "db", "c", &stream, "")],
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let w = Watcher::start_with_env(
        dir.path(),
        &config,
        &proxy.endpoint(),
        &[
            ("MONGO_WATCHER_API_TOKEN", TOKEN),
            (PANIC_FILE_ENV, trigger.to_str().unwrap()),
        ],
    );
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);
    w.wait_for_log("fault injection armed", WAIT);
    let series = |name: &str| format!("{name}{{watcher=\"w\"}}");
    assert_eq!(
        metric(port, &series("mongo_watcher_watcher_panics_total")),
        Some(0.0),
        "the counters exist from the start, so the first increase is visible"
    );
    assert_eq!(
        metric(port, &series("mongo_watcher_watcher_restarts_total")),
        Some(0.0)
    );
    let coll = mongo
        .client()
        .await
        .database("db")
        .collection::<bson::Document>("c");

    // 1..=5 delivered; the pause flushes them and writes the checkpoint past them.
    insert_ids(&coll, 1..=5).await;
    aws.wait_for_ids(&stream, &[1, 2, 3, 4, 5], WAIT).await;
    let pause = |expect: &str| {
        let r = request(port, "POST", "/watchers/w/pause", Some(TOKEN), "");
        assert_eq!(r.status, 200, "pause {expect}: {}", r.body);
        assert_eq!(r.json()["state"], "paused", "{}", r.body);
    };
    let resume = |expect: &str| {
        let r = request(port, "POST", "/watchers/w/resume", Some(TOKEN), "");
        assert_eq!(r.status, 200, "resume {expect}: {}", r.body);
    };
    pause("before the panic");

    // 6..=10 are read by the next life but Kinesis takes none of them: when that life panics
    // they are past the checkpoint, and only a restart from the checkpoint can deliver them.
    proxy.rules(json!({"fail_call_rate": 1.0}));
    insert_ids(&coll, 6..=10).await;
    resume("before the panic");
    wait_http(port, "/watchers/w", WAIT, |r| {
        r.json()["counters"]["events"].as_u64() >= Some(10)
    });
    let deadline = std::time::Instant::now() + WAIT;
    while proxy.stats()["calls_failed"].as_u64().unwrap_or(0) < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", proxy.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!has_all(&aws.read_stream(&stream).await, &[6]));

    std::fs::write(&trigger, "w").unwrap();
    let shown = wait_http(port, "/watchers/w", WAIT, |r| {
        r.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("panicked"))
    })
    .json();
    // Kinesis takes records again before the next life starts (the restart waits 0.5 s at
    // least), so no Kinesis failure replaces the panic as the last error.
    proxy.reset();
    assert_eq!(shown["state"], "backing_off", "{shown}");
    let reason = shown["reason"].as_str().unwrap();
    assert!(
        reason.contains("the watcher panicked: injected panic for watcher `w`")
            && reason.contains("restarts from its checkpoint"),
        "{reason}"
    );
    w.wait_for_log("watcher panicked; restarting from its checkpoint", WAIT);
    assert_eq!(
        metric(port, &series("mongo_watcher_watcher_panics_total")),
        Some(1.0)
    );
    assert_eq!(
        metric(port, &series("mongo_watcher_watcher_restarts_total")),
        Some(1.0)
    );
    assert!(
        !trigger.exists(),
        "the hook took the trigger, so it panics once"
    );

    // The next life resumes from the checkpoint: 6..=10 arrive, and nothing arrives twice.
    aws.wait_for_ids(&stream, &[6, 7, 8, 9, 10], WAIT).await;
    let after = wait_http(port, "/watchers/w", WAIT, |r| {
        r.json()["state"] == "running"
    })
    .json();
    assert_eq!(after["restarts"], 1, "{after}");
    let last_error = after["last_error"]["message"].as_str().unwrap_or_default();
    assert!(last_error.contains("panicked"), "{after}");

    // The command channel survived the panic (it used to answer 503 until a process restart).
    pause("after the panic");
    insert_ids(&coll, [11]).await;
    resume("after the panic");
    aws.wait_for_ids(&stream, &[11], WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let records = aws.read_stream(&stream).await;
    for id in 1..=11 {
        assert_eq!(count(&records, id), 1, "id {id}: {:?}", ids_of(&records));
    }
    assert_eq!(state(port)["restarts"], 1);
    assert_eq!(
        metric(port, &series("mongo_watcher_watcher_panics_total")),
        Some(1.0),
        "one panic, not one per life"
    );
}
