//! Error classes as states (issue 8): each failure an operator must act on shows where they
//! look (`GET /watchers/{name}` state and reason, `/readyz`, `mongo_watcher_watcher_state`),
//! naming the resource and what to do; the ones a fix from outside can end are retried and
//! recover by themselves, delivering every event once. Against SecantusDB, moto, and the
//! fault-injecting proxy (`access_denied` answers as IAM refuses a call).

mod support;

use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use bson::{doc, Document};
use serde_json::json;
use support::*;

const TOKEN: &str = "error-states-token-7319";

/// A watcher's status as the API shows it.
fn status(port: u16, name: &str) -> serde_json::Value {
    request(port, "GET", &format!("/watchers/{name}"), None, "").json()
}

fn reason(w: &serde_json::Value) -> &str {
    w["reason"].as_str().unwrap_or_default()
}

/// Waits until `name` shows `state`; returns its status.
fn wait_state(port: u16, name: &str, state: &str) -> serde_json::Value {
    wait_http(port, &format!("/watchers/{name}"), WAIT, |r| {
        r.status == 200 && r.json()["state"] == state
    })
    .json()
}

/// `/readyz` answers 503 naming `name` with `state` and a reason containing `needle`.
fn assert_not_ready(port: u16, name: &str, state: &str, needle: &str) {
    let r = request(port, "GET", "/readyz", None, "");
    assert_eq!(r.status, 503, "{}", r.body);
    let body = r.json();
    let listed = body["watchers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|w| w["name"] == name)
        .unwrap_or_else(|| panic!("{name} not named by /readyz: {body}"));
    assert_eq!(listed["state"], state, "{body}");
    assert!(reason(listed).contains(needle), "{body}");
}

/// `mongo_watcher_watcher_state{state=..,watcher=..}` is 1.
fn assert_state_metric(port: u16, name: &str, state: &str) {
    let metrics = request(port, "GET", "/metrics", None, "").body;
    let line = format!("mongo_watcher_watcher_state{{state=\"{state}\",watcher=\"{name}\"}} 1");
    assert!(metrics.contains(&line), "{line} missing");
}

/// Every id of `ids` is in `stream` exactly once (after the others settle).
async fn assert_each_once(aws: &Aws, stream: &str, ids: &[i64]) {
    let records = aws.wait_for_ids(stream, ids, WAIT).await;
    for id in ids {
        assert_eq!(
            count(&records, *id),
            1,
            "id {id} delivered {} times",
            count(&records, *id)
        );
    }
}

fn config_on(mongo: &Mongo, table: &str, port: u16, watchers: &[String]) -> String {
    config_yaml(mongo, Some(table), watchers).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
}

fn start(dir: &std::path::Path, config: &str, endpoint: &str) -> Watcher {
    Watcher::start_with_env(dir, config, endpoint, &[("MONGO_WATCHER_API_TOKEN", TOKEN)])
}

fn wait_exit(w: &mut Watcher, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = w.exited() {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "mongo-watcher did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn namespace_attr(item: &std::collections::HashMap<String, AttributeValue>) -> Option<&str> {
    item.get("namespace")
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

/// A watcher `w` that ran on `db.a` (checkpoint stored, ids 1..=3 delivered), stopped cleanly.
struct MovedWatcher {
    mongo: Mongo,
    _moto: Moto,
    aws: Aws,
    table: String,
    stream: String,
    port: u16,
    dirs: Vec<tempfile::TempDir>,
}

impl MovedWatcher {
    async fn ran_on_db_a() -> Self {
        let mongo = Mongo::start();
        let moto = Moto::start();
        let aws = Aws::new(&moto).await;
        let table = unique("cps");
        aws.create_checkpoint_table(&table).await;
        let stream = unique("s");
        aws.create_stream(&stream, 1).await;
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_on(
            &mongo,
            &table,
            port,
            &[watcher_yaml("w", "db", "a", &stream, "")],
        );
        let mut w = start(dir.path(), &cfg, &moto.endpoint());
        wait_http(port, "/readyz", WAIT, |r| r.status == 200);
        let a = mongo
            .client()
            .await
            .database("db")
            .collection::<Document>("a");
        insert_ids(&a, 1..=3).await;
        aws.wait_for_ids(&stream, &[1, 2, 3], WAIT).await;
        let item = aws
            .wait_for_checkpoint(&table, "w", WAIT, |i| namespace_attr(i) == Some("db.a"))
            .await;
        assert!(token_text(&item).is_some(), "{item:?}");
        assert_eq!(w.terminate().0, Some(0));
        Self {
            mongo,
            _moto: moto,
            aws,
            table,
            stream,
            port,
            dirs: vec![dir],
        }
    }

    /// The same watcher name, now watching `db.b`, in a new process (with its own log).
    fn restart_on_db_b(&mut self) -> Watcher {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config_on(
            &self.mongo,
            &self.table,
            self.port,
            &[watcher_yaml("w", "db", "b", &self.stream, "")],
        );
        let w = start(
            dir.path(),
            &cfg,
            &format!("http://127.0.0.1:{}", self._moto.port),
        );
        self.dirs.push(dir);
        w
    }

    fn rewind(&self, body: serde_json::Value) {
        let r = request(
            self.port,
            "POST",
            "/watchers/w/rewind",
            Some(TOKEN),
            &body.to_string(),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }

    /// After a rewind: running, ready, the checkpoint now written for `db.b`.
    async fn assert_moved_on(&self) {
        wait_state(self.port, "w", "running");
        wait_http(self.port, "/readyz", WAIT, |r| r.status == 200);
        self.aws
            .wait_for_checkpoint(&self.table, "w", WAIT, |i| {
                namespace_attr(i) == Some("db.b")
            })
            .await;
    }
}

/// The collection of a watcher changed in the config under the same name: the stored
/// checkpoint says which namespace it was written for, and the watcher parks in `failed`
/// naming both and the ways out, instead of looping in `backing_off` on the server's refusal.
/// A rewind to a time moves it on, replaying the new collection from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_another_namespace_parks_the_watcher_until_a_rewind() {
    let mut m = MovedWatcher::ran_on_db_a().await;
    let b = m
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("b");
    let w = m.restart_on_db_b();
    let shown = wait_state(m.port, "w", "failed");
    let text = reason(&shown);
    for needle in [
        "the checkpoint of watcher `w` was written for `db.a`",
        "the watcher now watches `db.b`",
        "`POST /watchers/w/rewind`",
        &format!("checkpoint table `{}`", m.table),
    ] {
        assert!(text.contains(needle), "{needle:?} missing: {shown}");
    }
    assert_not_ready(m.port, "w", "failed", "was written for `db.a`");
    assert_state_metric(m.port, "w", "failed");
    // The parked state's reason is also the last error, with its time.
    let error = &shown["last_error"];
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|t| t.contains("was written for `db.a`"))
            && error["at"].is_string(),
        "last_error of a parked watcher: {shown}"
    );
    // Not retried: no restart, no stream opened on a token that cannot work.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = status(m.port, "w");
    assert_eq!(still["state"], "failed", "{still}");
    assert_eq!(still["restarts"], 0, "{still}");
    assert_eq!(w.count_watcher_lines("w", "opening change stream"), 0);

    // Written while parked; a rewind to a time before them replays them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = bson::DateTime::from_millis(bson::DateTime::now().timestamp_millis() - 1000)
        .try_to_rfc3339_string()
        .unwrap();
    insert_ids(&b, 10..=12).await;
    m.rewind(json!({ "to": before }));
    m.assert_moved_on().await;
    insert_ids(&b, [13]).await;
    assert_each_once(&m.aws, &m.stream, &[1, 2, 3, 10, 11, 12, 13]).await;
}

/// A checkpoint written before the namespace was stored (no `namespace` attribute) still
/// reads; when its token belongs to another collection, the server's refusal is recognised
/// and told the same way (`failed`, no restart loop), and a rewind to latest moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_checkpoint_of_another_namespace_is_recognised_by_the_servers_refusal() {
    let mut m = MovedWatcher::ran_on_db_a().await;
    m.aws
        .dynamodb
        .update_item()
        .table_name(&m.table)
        .key("watcher", AttributeValue::S("w".into()))
        .update_expression("REMOVE #ns")
        .expression_attribute_names("#ns", "namespace")
        .send()
        .await
        .expect("remove the namespace, as an item written before it was stored");
    let b = m
        .mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("b");
    let w = m.restart_on_db_b();
    let shown = wait_state(m.port, "w", "failed");
    let text = reason(&shown);
    for needle in [
        "the checkpoint of watcher `w` holds a resume token of another collection",
        "the server refused it: error 13 (Unauthorized)",
        "the watcher now watches `db.b`",
        "`POST /watchers/w/rewind`",
    ] {
        assert!(text.contains(needle), "{needle:?} missing: {shown}");
    }
    assert_not_ready(m.port, "w", "failed", "another collection");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let still = status(m.port, "w");
    assert_eq!(still["state"], "failed", "{still}");
    assert_eq!(still["restarts"], 0, "{still}");
    assert_eq!(
        w.count_watcher_lines("w", "opening change stream"),
        1,
        "the refused token must not be tried again and again"
    );

    m.rewind(json!({"to": "latest"}));
    m.assert_moved_on().await;
    insert_ids(&b, [20, 21]).await;
    assert_each_once(&m.aws, &m.stream, &[1, 2, 3, 20, 21]).await;
}

/// Kinesis refuses PutRecords (IAM): the watcher shows `backing_off` at once with a reason
/// naming the stream and the action to grant, keeps trying at its capped backoff, and
/// delivers everything once the permission is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_access_denied_is_shown_and_recovers_once_granted() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let proxy = Proxy::start(&moto);
    let aws = Aws::new(&moto).await;
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    aws.create_stream(&stream, 1).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_on(
        &mongo,
        &table,
        port,
        &[watcher_yaml("w", "db", "c", &stream, "")],
    );
    let _w = start(dir.path(), &cfg, &proxy.endpoint());
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);
    let c = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    insert_ids(&c, 1..=3).await;
    aws.wait_for_ids(&stream, &[1, 2, 3], WAIT).await;

    proxy.rules(json!({"access_denied": ["PutRecords"]}));
    insert_ids(&c, 4..=6).await;
    let shown = wait_state(port, "w", "backing_off");
    let grant = format!(
        "access denied: grant `kinesis:PutRecords` on Kinesis stream `{stream}` to the task role"
    );
    assert!(reason(&shown).contains(&grant), "{shown}");
    assert!(reason(&shown).contains("AccessDeniedException"), "{shown}");
    assert_not_ready(port, "w", "backing_off", &grant);
    assert_state_metric(port, "w", "backing_off");
    let refused = proxy.stats()["access_denied"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        proxy.stats()["access_denied"].as_u64().unwrap_or(0) > refused,
        "the calls are retried while refused"
    );
    assert!(!has_all(&aws.read_stream(&stream).await, &[4]));

    proxy.rules(json!({}));
    wait_state(port, "w", "running");
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);
    assert_each_once(&aws, &stream, &[1, 2, 3, 4, 5, 6]).await;
    let w = status(port, "w");
    assert!(
        w["last_error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&grant)),
        "{w}"
    );
}

/// DynamoDB refuses the checkpoint table: at start (DescribeTable) the watcher shows
/// `backing_off` naming the table and the action, restarts with backoff and runs once it is
/// granted; mid-run (PutItem) delivery goes on while the watcher shows the refused checkpoint
/// writes, and the checkpoint moves again once granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_access_denied_is_shown_at_start_and_mid_run_and_recovers() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let proxy = Proxy::start(&moto);
    let aws = Aws::new(&moto).await;
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    aws.create_stream(&stream, 1).await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_on(
        &mongo,
        &table,
        port,
        &[watcher_yaml("w", "db", "c", &stream, "")],
    );

    proxy.rules(json!({"access_denied": ["DescribeTable"]}));
    let _w = start(dir.path(), &cfg, &proxy.endpoint());
    let shown = wait_state(port, "w", "backing_off");
    let grant = format!(
        "access denied: grant `dynamodb:DescribeTable` on DynamoDB table `{table}` to the task role"
    );
    assert!(reason(&shown).contains(&grant), "{shown}");
    assert_not_ready(port, "w", "backing_off", &grant);
    assert_state_metric(port, "w", "backing_off");
    proxy.rules(json!({}));
    wait_state(port, "w", "running");
    let c = mongo
        .client()
        .await
        .database("db")
        .collection::<Document>("c");
    insert_ids(&c, 1..=3).await;
    aws.wait_for_ids(&stream, &[1, 2, 3], WAIT).await;
    let item = aws
        .wait_for_checkpoint(&table, "w", WAIT, |i| namespace_attr(i) == Some("db.c"))
        .await;

    proxy.rules(json!({"access_denied": ["PutItem"]}));
    insert_ids(&c, 4..=6).await;
    let shown = wait_state(port, "w", "backing_off");
    let grant = format!(
        "access denied: grant `dynamodb:PutItem` on DynamoDB table `{table}` to the task role"
    );
    assert!(
        reason(&shown).contains("checkpoints cannot be written") && reason(&shown).contains(&grant),
        "{shown}"
    );
    assert_not_ready(port, "w", "backing_off", &grant);
    // Delivery does not wait for the checkpoint.
    aws.wait_for_ids(&stream, &[4, 5, 6], WAIT).await;
    let frozen = aws.checkpoint(&table, "w").await.expect("checkpoint");
    assert!(revision(&frozen) >= revision(&item));

    proxy.rules(json!({}));
    wait_state(port, "w", "running");
    insert_ids(&c, [7]).await;
    aws.wait_for_checkpoint(&table, "w", WAIT, |i| revision(i) > revision(&frozen))
        .await;
    assert_each_once(&aws, &stream, &[1, 2, 3, 4, 5, 6, 7]).await;
}

/// SSM at start: a missing parameter and a refused GetParameter end the start with exit 1 and
/// a message naming the parameter, the setting and what to do (nothing runs without its
/// secrets, as ECS fails a task whose `secrets` cannot be read); the first start after the fix
/// runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssm_refusals_exit_1_naming_the_parameter_and_the_next_start_runs() {
    let mongo = Mongo::start();
    let moto = Moto::start();
    let proxy = Proxy::start(&moto);
    let aws = Aws::new(&moto).await;
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    aws.create_stream(&stream, 1).await;
    let port = free_port();
    let parameter = format!("/{}/api-token", unique("t"));
    let cfg = config_on(
        &mongo,
        &table,
        port,
        &[watcher_yaml("w", "db", "c", &stream, "")],
    )
    .replace(
        "http:\n",
        &format!("http:\n  api_token_ssm_parameter: {parameter}\n"),
    );
    let dir = tempfile::tempdir().unwrap();
    let run = |dir: &std::path::Path| Watcher::start_with_env(dir, &cfg, &proxy.endpoint(), &[]);

    let mut missing = run(dir.path());
    assert_eq!(wait_exit(&mut missing, Duration::from_secs(30)), Some(1));
    let logs = missing.logs();
    assert!(
        logs.contains(&format!(
            "http.api_token_ssm_parameter: SSM parameter `{parameter}` does not exist"
        )) && logs.contains("cannot start without it"),
        "{logs}"
    );
    drop(missing);

    aws.ssm
        .put_parameter()
        .name(&parameter)
        .value("api-token-from-ssm-4410")
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .send()
        .await
        .expect("put parameter");
    proxy.rules(json!({"access_denied": ["GetParameter"]}));
    let dir2 = tempfile::tempdir().unwrap();
    let mut denied = run(dir2.path());
    assert_eq!(wait_exit(&mut denied, Duration::from_secs(30)), Some(1));
    let logs = denied.logs();
    assert!(
        logs.contains(&format!(
            "access denied: grant `ssm:GetParameter` on SSM parameter `{parameter}` to the task role"
        )) && logs.contains("kms:Decrypt"),
        "{logs}"
    );
    assert!(proxy.stats()["access_denied"].as_u64().unwrap_or(0) >= 1);

    proxy.rules(json!({}));
    denied.kill9(); // reaps the exited process
    denied.restart();
    wait_http(port, "/readyz", WAIT, |r| r.status == 200);
    let r = request(
        port,
        "POST",
        "/watchers/w/pause",
        Some("api-token-from-ssm-4410"),
        "",
    );
    assert_eq!(
        r.status, 200,
        "the token read from SSM is the API's: {}",
        r.body
    );
    assert!(
        !denied.logs().contains("api-token-from-ssm-4410"),
        "the secret reached a log line"
    );
}

/// MongoDB refuses the login (the configured user does not exist yet): the watcher shows
/// `backing_off` naming the user, the host and what to check, retries with backoff, and runs
/// by itself once the user is created with that password, delivering every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_authentication_failure_is_shown_and_recovers_once_the_user_exists() {
    let moto = Moto::start();
    let aws = Aws::new(&moto).await;
    let data = tempfile::tempdir().unwrap();
    let mongo_port = free_port();
    let storage = data.path().to_str().unwrap().to_owned();
    let mut mongo = Mongo::start_on(mongo_port, &storage, &[]);
    mongo
        .client()
        .await
        .database("admin")
        .run_command(doc! {"createUser": "admin", "pwd": "admin-pw-1", "roles": ["root"]})
        .await
        .expect("createUser admin");
    mongo.stop();
    mongo.restart_with(&["--auth"]);
    let admin = mongodb::Client::with_uri_str(format!(
        "mongodb://admin:admin-pw-1@127.0.0.1:{mongo_port}/?directConnection=true"
    ))
    .await
    .unwrap();
    let table = unique("cps");
    aws.create_checkpoint_table(&table).await;
    let stream = unique("s");
    aws.create_stream(&stream, 1).await;
    let port = free_port();
    let secret = "late-user-pw-5512";
    let cfg = config_on(
        &mongo,
        &table,
        port,
        &[watcher_yaml("w", "db", "c", &stream, "")],
    )
    .replace(
        "mongodb:\n",
        &format!("mongodb:\n  username: late\n  password: \"{secret}\"\n"),
    );
    let dir = tempfile::tempdir().unwrap();
    let w = start(dir.path(), &cfg, &moto.endpoint());
    let shown = wait_state(port, "w", "backing_off");
    let named = format!("authentication of user `late` at 127.0.0.1:{mongo_port} failed");
    assert!(reason(&shown).contains(&named), "{shown}");
    assert!(reason(&shown).contains("mongodb.username"), "{shown}");
    assert!(!reason(&shown).contains(secret), "{shown}");
    assert_not_ready(port, "w", "backing_off", &named);
    assert_state_metric(port, "w", "backing_off");

    admin
        .database("admin")
        .run_command(doc! {"createUser": "late", "pwd": secret, "roles": ["root"]})
        .await
        .expect("createUser late");
    wait_state(port, "w", "running");
    let c = admin.database("db").collection::<Document>("c");
    insert_ids(&c, 1..=3).await;
    assert_each_once(&aws, &stream, &[1, 2, 3]).await;
    assert!(
        !w.logs().contains(secret),
        "the password reached a log line"
    );
}
