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

/// Secrets a URI can carry: the password and the secret-bearing options.
const SECRETS: [&str; 3] = ["hunter2", "k3yfilepass", "s3ssiontoken"];

fn secret_uri(extra: &str) -> String {
    format!(
        "mongodb://app:hunter2@db.example:27017/?tls=true&tlsCertificateKeyFilePassword=k3yfilepass\
         &authMechanismProperties=AWS_SESSION_TOKEN:s3ssiontoken{extra}"
    )
}

fn assert_no_secret(text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} printed in:\n{text}");
    }
}

#[test]
fn check_config_never_prints_secret_uri_options() {
    for extra in ["", "&bogusOption=1"] {
        let (code, out, err) = check_config(&format!(
            "mongodb: {{uri: \"{}\"}}\nwatchers:\n  - {{name: a, database: d, collection: c, stream: s}}\n",
            secret_uri(extra)
        ));
        assert!(code == 0 || code == 2, "{code}: {out}{err}");
        assert!(
            out.contains("mongodb://app:****@db.example")
                || err.contains("mongodb://app:****@db.example"),
            "{out}{err}"
        );
        assert_no_secret(&out);
        assert_no_secret(&err);
    }
}

#[test]
fn check_config_refuses_uris_that_run_refuses() {
    for (uri, expect) in [
        ("mongodb://u:hunter2@h:notaport/", "port"),
        ("mongodb://h:27017/?bogusOption=1", "bogusOption"),
        (
            "mongodb://h:27017/?directConnection=maybe",
            "directConnection",
        ),
    ] {
        let (code, out, err) = check_config(&format!(
            "mongodb: {{uri: \"{uri}\"}}\nwatchers:\n  - {{name: a, database: d, collection: c, stream: s}}\n"
        ));
        assert_eq!(code, 2, "{uri}: {out}{err}");
        assert!(
            err.lines()
                .any(|l| l.trim_start().starts_with("mongodb.uri: ") && l.contains(expect)),
            "{uri}: {err}"
        );
        assert_no_secret(&err);
    }
}

/// `run` with a URI the driver refuses, and with one that parses but cannot be resolved (an
/// SRV name without DNS), fails without printing any secret of it.
#[test]
fn a_failing_run_never_prints_uri_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = "mongodb+srv://app:hunter2@nowhere.invalid/\
               ?authMechanismProperties=AWS_SESSION_TOKEN:s3ssiontoken";
    // Refused by the config check (exit 2), and refused by the driver at start-up (exit 1:
    // this build cannot resolve the SRV name).
    for (uri, exit_code) in [(secret_uri("&bogusOption=1"), 2), (srv.to_owned(), 1)] {
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            format!(
                "mongodb: {{uri: \"{uri}\"}}\nhttp: {{listen: \"127.0.0.1:0\"}}\nwatchers:\n  - {{name: a, database: d, collection: c, stream: s}}\n"
            ),
        )
        .expect("write");
        let out = Command::new(env!("CARGO_BIN_EXE_mongo-watcher"))
            .args(["run", "--config"])
            .arg(&path)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
            .env("LOG_FORMAT", "text")
            .env_remove("RUST_LOG")
            .output()
            .expect("run");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(exit_code), "{text}");
        assert!(
            text.contains("mongodb+srv://app:****@") || text.contains("mongodb://app:****@"),
            "{text}"
        );
        assert_no_secret(&text);
    }
}
