//! The command line: `check-config` output and exit codes, without any services.

use std::process::Command;

fn check_config(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_mongo-watcher"))
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env("MW_TEST_STREAM", "from-env")
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_resolved_watchers_without_secrets() {
    let (code, out, err) = check_config(
        r#"
mongodb: {uri: "mongodb://app:hunter2@db.example:27017/?tls=true"}
checkpoints: {table: cps}
watchers:
  - {name: orders, database: shop, collection: orders, stream: "${MW_TEST_STREAM}"}
"#,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("orders: shop.orders -> kinesis from-env"),
        "{out}"
    );
    assert!(out.contains("mongodb://app:****@db.example:27017"), "{out}");
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));
}

#[test]
fn check_config_lists_every_problem_and_exits_2() {
    let (code, out, err) = check_config(
        r#"
mongodb: {uri: "mongodb://127.0.0.1:1"}
watchers:
  - {name: a, database: d, collection: c, stream: s, batch_linger: fast}
  - {nme: b, database: d, collection: c}
  - {name: a, database: d, collection: c, stream: s}
"#,
    );
    assert_eq!(code, 2, "{out}{err}");
    for expected in [
        "watchers[0].batch_linger: `fast` is not a duration",
        "watchers[1].nme: unknown field",
        "watchers[1].stream: missing",
        "watchers[1].name: missing",
        "watchers[2].name: duplicate watcher name `a`",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
}

#[test]
fn unreadable_or_malformed_files_are_clear_errors() {
    let (code, _, err) = check_config("mongodb: [\n");
    assert_eq!(code, 2);
    assert!(err.contains("not valid YAML"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_mongo-watcher"))
        .args(["check-config", "--config", "/nonexistent/mw.yaml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mw.yaml: cannot read"));
}
