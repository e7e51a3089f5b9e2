//! The command line: `check-config` output and exit codes, without any services, and
//! `healthcheck` against a running watcher (SecantusDB only) and stand-in HTTP servers.

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

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

/// `mongo-watcher healthcheck ARGS`: exit code and stderr.
fn healthcheck(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mongo-watcher"))
        .arg("healthcheck")
        .args(args)
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A one-connection HTTP server on a free loopback port: reads the request head, then writes
/// `answer` (or nothing, holding the connection open for `hold`).
fn stand_in_server(answer: Option<&'static str>, hold: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let mut head = Vec::new();
        let mut byte = [0_u8; 1];
        while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
            head.push(byte[0]);
        }
        match answer {
            Some(answer) => {
                let _ = conn.write_all(answer.as_bytes());
            }
            None => std::thread::sleep(hold),
        }
    });
    port
}

#[test]
fn healthcheck_exits_0_against_a_running_watcher() {
    let mongo = support::Mongo::start();
    let port = support::free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = support::config_yaml(
        &mongo,
        None,
        &[support::watcher_yaml("w", "db", "c", "s", "")],
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    // /healthz touches neither MongoDB nor AWS: no moto needed.
    let watcher = support::Watcher::start(dir.path(), &config, "http://127.0.0.1:1");
    support::wait_http(port, "/healthz", support::WAIT, |r| r.status == 200);

    let url = format!("http://127.0.0.1:{port}/healthz");
    let (code, err) = healthcheck(&["--url", &url]);
    assert_eq!(code, 0, "--url: {err}\n{}", watcher.logs());
    assert!(err.is_empty(), "{err}");
    let config_path = watcher.config.as_ref().expect("config path");
    let (code, err) = healthcheck(&["--config", config_path.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "--config: {err}");
}

#[test]
fn healthcheck_exits_1_when_nothing_listens() {
    let port = support::free_port();
    let url = format!("http://127.0.0.1:{port}/healthz");
    let (code, err) = healthcheck(&["--url", &url]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!("healthcheck: {url}: cannot connect"))
            && err.to_lowercase().contains("refused"),
        "{err}"
    );
}

#[test]
fn healthcheck_exits_1_on_a_status_other_than_200() {
    let port = stand_in_server(
        Some("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        Duration::ZERO,
    );
    let (code, err) = healthcheck(&["--url", &format!("http://127.0.0.1:{port}/healthz")]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("status 503 Service Unavailable"), "{err}");
}

#[test]
fn healthcheck_exits_1_when_the_answer_does_not_come_in_time() {
    let port = stand_in_server(None, Duration::from_secs(10));
    let started = Instant::now();
    let (code, err) = healthcheck(&[
        "--url",
        &format!("http://127.0.0.1:{port}/healthz"),
        "--timeout",
        "300ms",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no answer within 300ms"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

// --- migrate ------------------------------------------------------------------------------------

/// `mongo-watcher ARGS` against moto (AWS_ENDPOINT_URL): exit code, stdout, stderr.
fn against_moto(moto: &support::Moto, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mongo-watcher"))
        .args(args)
        .env_remove("MONGO_WATCHER_CONFIG")
        .env("AWS_REGION", support::REGION)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ENDPOINT_URL", moto.endpoint())
        .output()
        .expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file naming the checkpoint table and, when given, the lease table.
fn tables_config(dir: &std::path::Path, checkpoints: &str, leases: Option<&str>) -> String {
    let mut text = format!(
        "mongodb: {{uri: \"mongodb://127.0.0.1:1\"}}\ncheckpoints: {{table: {checkpoints}}}\n"
    );
    if let Some(leases) = leases {
        text.push_str(&format!("leases: {{table: {leases}, ttl: 15s}}\n"));
    }
    text.push_str("watchers:\n  - {name: orders, database: shop, collection: orders, stream: s}\n");
    let path = dir.join(format!("{checkpoints}.yaml"));
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf-8").to_owned()
}

/// (key schema as "NAME TYPE" per key, status, schema-version tag) of a table; `None` when
/// it does not exist.
async fn table_shape(
    aws: &support::Aws,
    table: &str,
) -> Option<(Vec<String>, String, Option<String>)> {
    let out = match aws.dynamodb.describe_table().table_name(table).send().await {
        Ok(out) => out,
        Err(e)
            if e.as_service_error()
                .is_some_and(|e| e.is_resource_not_found_exception()) =>
        {
            return None
        }
        Err(e) => panic!("describe {table}: {e:?}"),
    };
    let t = out.table().expect("table");
    let keys = t
        .key_schema()
        .iter()
        .map(|k| format!("{} {}", k.attribute_name(), k.key_type().as_str()))
        .collect();
    let tags = aws
        .dynamodb
        .list_tags_of_resource()
        .resource_arn(t.table_arn().expect("arn"))
        .send()
        .await
        .expect("list tags");
    let version = tags
        .tags()
        .iter()
        .find(|t| t.key() == "mongo-watcher:schema-version")
        .map(|t| t.value().to_owned());
    Some((
        keys,
        t.table_status().expect("status").as_str().to_owned(),
        version,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_both_tables_and_a_second_run_finds_them_up_to_date() {
    let moto = support::Moto::start();
    let aws = support::Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cps, leases) = (support::unique("cps"), support::unique("leases"));
    let config = tables_config(dir.path(), &cps, Some(&leases));

    let (code, out, err) = against_moto(&moto, &["migrate", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    for (setting, table) in [("checkpoints.table", &cps), ("leases.table", &leases)] {
        assert!(
            out.contains(&format!("{setting} `{table}`: created (hash key `watcher` (S), PAY_PER_REQUEST, schema version 1), ACTIVE")),
            "{out}"
        );
        let shape = table_shape(&aws, table).await.expect("table created");
        assert_eq!(
            shape,
            (
                vec!["watcher HASH".to_owned()],
                "ACTIVE".to_owned(),
                Some("1".to_owned())
            ),
            "{table}"
        );
    }

    let (code, out, err) = against_moto(&moto, &["migrate", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        format!(
            "checkpoints.table `{cps}`: up to date (schema version 1)\n\
             leases.table `{leases}`: up to date (schema version 1)\n"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_dry_run_creates_nothing() {
    let moto = support::Moto::start();
    let aws = support::Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cps, leases) = (support::unique("cps"), support::unique("leases"));
    let config = tables_config(dir.path(), &cps, Some(&leases));

    let (code, out, err) = against_moto(&moto, &["migrate", "--config", &config, "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    for table in [&cps, &leases] {
        assert!(
            out.contains(&format!("`{table}`: missing; would create it")),
            "{out}"
        );
        assert_eq!(table_shape(&aws, table).await, None, "{table} was created");
    }
    // An existing table without the version tag: dry-run says it would update, and does not.
    aws.create_checkpoint_table(&cps).await;
    let (code, out, err) = against_moto(&moto, &["migrate", "--config", &config, "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "`{cps}`: key schema matches; would update it from no version tag to 1"
        )),
        "{out}"
    );
    assert_eq!(table_shape(&aws, &cps).await.expect("exists").2, None);
    assert_eq!(table_shape(&aws, &leases).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_updates_an_untagged_table_and_refuses_a_wrong_key_schema_naming_it() {
    let moto = support::Moto::start();
    let aws = support::Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cps, leases) = (support::unique("cps"), support::unique("leases"));
    // The checkpoint table as created by hand from migrations/checkpoints.json before it was
    // versioned; the lease table keyed like the old tool's marker table.
    aws.create_checkpoint_table(&cps).await;
    aws.create_marker_table(&leases).await;
    let config = tables_config(dir.path(), &cps, Some(&leases));

    let (code, out, err) = against_moto(&moto, &["migrate", "--config", &config]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "checkpoints.table `{cps}`: updated from no version tag to schema version 1, ACTIVE"
        )),
        "{out}"
    );
    assert_eq!(
        table_shape(&aws, &cps).await.expect("exists").2.as_deref(),
        Some("1")
    );
    assert!(
        err.contains(&format!(
            "leases.table `{leases}`: the table exists with hash key `collectionName` (S), but \
             mongo-watcher needs exactly hash key `watcher` (S) (migrations/leases.json)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "migrate: migration failed for leases.table `{leases}`"
        )),
        "{err}"
    );
    assert_eq!(
        table_shape(&aws, &leases).await.expect("kept").0,
        vec!["collectionName HASH".to_owned()],
        "the wrong table is left alone"
    );
}

/// Writes the old tool's marker of `shop.orders`: `_id` = `{_data: data}`.
async fn write_marker(aws: &support::Aws, table: &str, data: &str) {
    use aws_sdk_dynamodb::types::AttributeValue;
    aws.dynamodb
        .update_item()
        .table_name(table)
        .key("collectionName", AttributeValue::S("shop.orders".into()))
        .update_expression("SET #id = :id")
        .expression_attribute_names("#id", "_id")
        .expression_attribute_values(
            ":id",
            AttributeValue::M(std::collections::HashMap::from([(
                "_data".to_owned(),
                AttributeValue::S(data.to_owned()),
            )])),
        )
        .send()
        .await
        .expect("write the old marker");
}

/// The old tool's marker becomes the watcher's checkpoint, and the watcher then resumes right
/// after it; an existing checkpoint is kept unless --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_marker_copies_the_old_marker_and_refuses_to_overwrite() {
    use bson::{doc, Bson, Document};
    use futures_util::StreamExt;

    let mongo = support::Mongo::start();
    let moto = support::Moto::start();
    let aws = support::Aws::new(&moto).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (markers, cps, stream) = (
        support::unique("markers"),
        support::unique("cps"),
        support::unique("out"),
    );
    aws.create_marker_table(&markers).await;
    aws.create_checkpoint_table(&cps).await;
    aws.create_stream(&stream, 1).await;

    // The old tool delivered event 0 and wrote its marker; 1..=3 happened after it stopped.
    let coll = mongo
        .client()
        .await
        .database("shop")
        .collection::<Document>("orders");
    let mut watch = coll.watch().await.expect("watch");
    coll.insert_one(doc! {"_id": 0_i64}).await.expect("insert");
    let event = watch.next().await.expect("event").expect("event");
    let token = watchers::reader::from_resume_token(&event.id).expect("token");
    let data = token
        .as_document()
        .and_then(|d| d.get_str("_data").ok())
        .expect("_data")
        .to_owned();
    write_marker(&aws, &markers, &data).await;
    support::insert_ids(&coll, 1..=3).await;

    let config = support::config_yaml(
        &mongo,
        Some(&cps),
        &[support::watcher_yaml(
            "orders", "shop", "orders", &stream, "",
        )],
    );
    let config_path = dir.path().join("c.yaml");
    std::fs::write(&config_path, &config).expect("write config");
    let config_arg = config_path.to_str().expect("utf-8");
    let import = |extra: &[&str]| {
        let mut args = vec![
            "migrate",
            "import-marker",
            "--config",
            config_arg,
            "--table",
            &markers,
            "--collection",
            "shop.orders",
            "--watcher",
            "orders",
        ];
        args.extend_from_slice(extra);
        against_moto(&moto, &args)
    };

    let (code, out, err) = import(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "imported the marker of `shop.orders` from `{markers}` as watcher `orders`'s \
             checkpoint in `{cps}` (revision 1)"
        )),
        "{out}"
    );
    let item = aws
        .checkpoint(&cps, "orders")
        .await
        .expect("checkpoint written");
    let stored = support::token_text(&item).expect("resume_token");
    assert_eq!(
        watchers::checkpoint::parse_token(&stored).expect("extended JSON"),
        Bson::Document(doc! {"_data": &data})
    );
    assert_eq!(
        item["namespace"].as_s().ok().map(String::as_str),
        Some("shop.orders")
    );
    assert_eq!(support::revision(&item), 1);

    // A second import keeps the checkpoint; a wrong collection is refused before anything.
    let (code, out, err) = import(&[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains(&format!(
            "watcher `orders` already has a checkpoint in `{cps}` (revision 1"
        )) && err.contains("Pass --force"),
        "{err}"
    );
    assert_eq!(
        support::revision(&aws.checkpoint(&cps, "orders").await.expect("kept")),
        1
    );
    let mut args = vec![
        "migrate",
        "import-marker",
        "--config",
        config_arg,
        "--table",
        &markers,
        "--collection",
        "shop.users",
        "--watcher",
        "orders",
    ];
    let (code, _, err) = against_moto(&moto, &args);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("watcher `orders` watches `shop.orders`, not `shop.users`"),
        "{err}"
    );
    args[7] = "shop.orders";
    args[5] = "no-such-table";
    let (code, _, err) = against_moto(&moto, &args);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("marker table `no-such-table` does not exist"),
        "{err}"
    );

    // --force replaces it (compare-and-set on the revision read).
    let (code, out, err) = import(&["--force"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("(revision 2, replacing the one stored)"),
        "{out}"
    );

    // The watcher resumes right after the old tool's last delivered event.
    let mut watcher = support::Watcher::start(dir.path(), &config, &moto.endpoint());
    let records = aws
        .wait_for_records(&stream, support::WAIT, |r| r.len() >= 3)
        .await;
    let ids: Vec<i64> = records.iter().filter_map(support::Record::id).collect();
    assert_eq!(ids, vec![1, 2, 3], "{}", watcher.logs());
    let (code, _) = watcher.terminate();
    assert_eq!(code, Some(0), "{}", watcher.logs());
}
