//! Test fixtures: real SecantusDB and moto servers on free loopback ports, the Kinesis
//! fault-injection proxy in front of moto, and a mongo-watcher process to start, kill and
//! stop. Everything is torn down on drop. The servers come from the project's venv
//! (`.venv/bin`, or `MW_VENV_BIN`), which `scripts/test-setup` creates.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};
use bson::{doc, Document};

pub const REGION: &str = "us-east-1";
/// How long an end-to-end condition may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(60);

/// `documentKey._id` of every record that has an integer one, in stream order.
pub fn ids_of(records: &[Record]) -> Vec<i64> {
    records.iter().filter_map(Record::id).collect()
}

/// The records' ids, sorted: what a test compares when records of different keys may land in
/// either order (two calls in flight; only the order per key is kept).
pub fn sorted_ids(records: &[Record]) -> Vec<i64> {
    let mut ids = ids_of(records);
    ids.sort_unstable();
    ids
}

/// Whether every id in `ids` is among the records.
pub fn has_all(records: &[Record], ids: &[i64]) -> bool {
    let got: std::collections::HashSet<i64> = ids_of(records).into_iter().collect();
    ids.iter().all(|i| got.contains(i))
}

/// How many records carry `id`.
pub fn count(records: &[Record], id: i64) -> usize {
    ids_of(records).into_iter().filter(|i| *i == id).count()
}

pub fn venv_bin() -> PathBuf {
    match std::env::var_os("MW_VENV_BIN") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin"),
    }
}

/// A loopback port nobody listens on, never the same twice in one test process: the port is
/// free only until a server binds it, and two tests running at once could otherwise be handed
/// the same one (one server then fails to bind, and its test talks to the other's).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.insert(port) {
            return port;
        }
    }
}

/// Waits until `port` accepts connections; `Err` with the child's exit status when the child
/// exited first (such as failing to bind a port something else took meanwhile).
fn wait_for_port(port: u16, what: &str, child: &mut Child) -> Result<(), std::process::ExitStatus> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(status);
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not listen on 127.0.0.1:{port} within 60 s");
}

/// Starts a server on a free port with `spawn`, on another port when it exits during start-up
/// (an outgoing connection may take a free port as its own before the server binds it).
fn spawn_on_free_port(what: &str, mut spawn: impl FnMut(u16) -> Child) -> (u16, Child) {
    let mut last = None;
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port);
        match wait_for_port(port, what, &mut child) {
            Ok(()) => return (port, child),
            Err(status) => last = Some(status),
        }
    }
    panic!("{what} exited during start-up five times, last: {last:?}");
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A SecantusDB server.
pub struct Mongo {
    pub port: u16,
    storage: String,
    extra: Vec<String>,
    proc: Option<Proc>,
}

impl Mongo {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let mut m = Self {
            port: 0,
            storage: ":memory:".to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        let (port, child) = spawn_on_free_port("secantusd-py", |port| m.command(port));
        m.port = port;
        m.proc = Some(Proc {
            child,
            name: "secantusd".into(),
        });
        m
    }

    /// A server on `port` with its data in `storage` (a directory survives restarts).
    pub fn start_on(port: u16, storage: &str, extra: &[&str]) -> Self {
        let mut m = Self {
            port,
            storage: storage.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        m.spawn();
        m
    }

    fn command(&self, port: u16) -> Child {
        Command::new(venv_bin().join("secantusd-py"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--storage-path", &self.storage, "--enable-test-commands"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start secantusd-py (run scripts/test-setup first)")
    }

    fn spawn(&mut self) {
        let mut child = self.command(self.port);
        if let Err(status) = wait_for_port(self.port, "secantusd-py", &mut child) {
            panic!(
                "secantusd-py exited during start-up on port {}: {status}",
                self.port
            );
        }
        self.proc = Some(Proc {
            child,
            name: "secantusd".into(),
        });
    }

    /// SIGKILL the server.
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// SIGTERM the server and wait for a clean shutdown (data flushed to its storage).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &p.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = p.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Start it again on the same port and storage, with `extra` flags instead.
    pub fn restart_with(&mut self, extra: &[&str]) {
        assert!(self.proc.is_none(), "still running");
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(self.uri())
            .await
            .expect("mongodb client")
    }
}

/// A moto server (Kinesis, DynamoDB, SSM).
pub struct Moto {
    pub port: u16,
    _proc: Proc,
}

impl Moto {
    pub fn start() -> Self {
        // Through the shim that makes moto's Kinesis safe for concurrent PutRecords (see
        // tests/support/moto_server.py): without it moto itself loses records.
        let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/moto_server.py");
        let (port, child) = spawn_on_free_port("moto_server", |port| {
            Command::new(venv_bin().join("python"))
                .arg(&shim)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto_server (run scripts/test-setup first)")
        });
        Self {
            port,
            _proc: Proc {
                child,
                name: "moto".into(),
            },
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The fault-injection proxy in front of moto's Kinesis.
/// Starts the project's Python script `script` (a path below the repository) with the venv's
/// Python; the script prints one line `LISTENING <port>` once it is ready. Returns that port
/// and the process (killed on drop).
pub fn start_listening_script(script: &str, args: &[&str], name: &str) -> (u16, Proc) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut child = Command::new(venv_bin().join("python"))
        .arg(path)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("script stdout"))
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{script} announces its port: {e}"));
    let proc = Proc {
        child,
        name: name.to_owned(),
    };
    let port = line
        .trim()
        .strip_prefix("LISTENING ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output of {script}: {line:?}"));
    (port, proc)
}

pub struct Proxy {
    pub port: u16,
    _proc: Proc,
}

impl Proxy {
    pub fn start(moto: &Moto) -> Self {
        let (port, proc) = start_listening_script(
            "tests/support/kinesis_proxy.py",
            &["--upstream", &moto.endpoint(), "--port", "0"],
            "proxy",
        );
        Self { port, _proc: proc }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the rules (see kinesis_proxy.py).
    pub fn rules(&self, rules: serde_json::Value) {
        self.post("/_proxy/rules", &rules.to_string());
    }

    pub fn reset(&self) {
        self.post("/_proxy/reset", "{}");
    }

    pub fn stats(&self) -> serde_json::Value {
        let body = http(self.port, "GET", "/_proxy/stats", "");
        serde_json::from_str(&body).expect("proxy stats are JSON")
    }

    fn post(&self, path: &str, body: &str) {
        http(self.port, "POST", path, body);
    }
}

/// A minimal HTTP/1.1 exchange (the proxy's control API needs nothing more).
pub fn http(port: u16, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read response");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{method} {path}: {head}"
    );
    body.to_owned()
}

/// An HTTP response as the tests see it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` with optional bearer token.
pub fn request(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write request");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read response");
    let out = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {out}"));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Response {
        status,
        headers: head.to_owned(),
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Polls `GET path` until `done` holds for the response.
pub fn wait_http(
    port: u16,
    path: &str,
    timeout: Duration,
    done: impl Fn(&Response) -> bool,
) -> Response {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let r = request(port, "GET", path, None, "");
            if done(&r) {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "GET {path}: condition not met within {timeout:?}; last: {} {}",
                    r.status, r.body
                );
            }
        } else if Instant::now() > deadline {
            panic!("nothing listens on {port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Clients for moto and the names a test uses.
pub struct Aws {
    pub kinesis: aws_sdk_kinesis::Client,
    pub dynamodb: aws_sdk_dynamodb::Client,
    pub ssm: aws_sdk_ssm::Client,
}

impl Aws {
    pub async fn new(moto: &Moto) -> Self {
        Self::at(&moto.endpoint()).await
    }

    /// Clients for another endpoint of moto's, such as the fault-injection proxy in front of it.
    pub async fn at(endpoint: &str) -> Self {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(aws_config::Region::new(REGION))
            .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await;
        Self {
            kinesis: aws_sdk_kinesis::Client::new(&conf),
            dynamodb: aws_sdk_dynamodb::Client::new(&conf),
            ssm: aws_sdk_ssm::Client::new(&conf),
        }
    }

    pub async fn create_stream(&self, name: &str, shards: i32) {
        self.kinesis
            .create_stream()
            .stream_name(name)
            .shard_count(shards)
            .send()
            .await
            .expect("create stream");
        for _ in 0..100 {
            let d = self
                .kinesis
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .expect("describe stream");
            if d.stream_description_summary().map(|s| s.stream_status())
                == Some(&StreamStatus::Active)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("stream {name} never became active");
    }

    /// Raises the stream's record size limit (`UpdateMaxRecordSize`, emulated by the moto shim
    /// `moto_server.py`: moto itself knows only 1 MiB).
    pub async fn raise_record_size(&self, name: &str, kib: i32) {
        let summary = self
            .kinesis
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .expect("describe stream");
        let arn = summary
            .stream_description_summary()
            .map(|s| s.stream_arn().to_owned())
            .expect("stream summary");
        self.kinesis
            .update_max_record_size()
            .stream_arn(arn)
            .max_record_size_in_kib(kib)
            .send()
            .await
            .expect("update max record size");
    }

    /// Creates a checkpoint table from `migrations/checkpoints.json` under another name, so
    /// the tests prove the migration file matches what the code expects.
    pub async fn create_checkpoint_table(&self, name: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/checkpoints.json");
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("read migration"))
                .expect("migration is JSON");
        let mut req = self.dynamodb.create_table().table_name(name);
        for a in spec["AttributeDefinitions"]
            .as_array()
            .expect("AttributeDefinitions")
        {
            req = req.attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(a["AttributeName"].as_str().expect("name"))
                    .attribute_type(ScalarAttributeType::from(
                        a["AttributeType"].as_str().expect("type"),
                    ))
                    .build()
                    .expect("attribute"),
            );
        }
        for k in spec["KeySchema"].as_array().expect("KeySchema") {
            req = req.key_schema(
                KeySchemaElement::builder()
                    .attribute_name(k["AttributeName"].as_str().expect("name"))
                    .key_type(KeyType::from(k["KeyType"].as_str().expect("type")))
                    .build()
                    .expect("key schema"),
            );
        }
        req.billing_mode(BillingMode::from(
            spec["BillingMode"].as_str().expect("BillingMode"),
        ))
        .send()
        .await
        .expect("create table");
    }

    /// The old Python tool's marker table: hash key `collectionName` (S).
    pub async fn create_marker_table(&self, name: &str) {
        self.dynamodb
            .create_table()
            .table_name(name)
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("collectionName")
                    .key_type(KeyType::Hash)
                    .build()
                    .expect("key schema"),
            )
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("collectionName")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("attribute"),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .expect("create marker table");
    }

    /// Every record of every shard, in shard order, as (partition key, JSON).
    pub async fn read_stream(&self, name: &str) -> Vec<Record> {
        self.read_stream_raw(name)
            .await
            .into_iter()
            .map(|r| {
                let json: serde_json::Value = serde_json::from_slice(&r.data)
                    .unwrap_or_else(|e| panic!("record is not JSON: {e}"));
                Record {
                    shard: r.shard,
                    partition_key: r.partition_key,
                    sequence: r.sequence,
                    raw: r.data,
                    json,
                }
            })
            .collect()
    }

    /// Every Kinesis record of every shard, in shard order, as its bytes.
    pub async fn read_stream_raw(&self, name: &str) -> Vec<RawRecord> {
        let shards = self
            .kinesis
            .list_shards()
            .stream_name(name)
            .send()
            .await
            .expect("list shards");
        let mut out = Vec::new();
        for shard in shards.shards() {
            let mut iterator = self
                .kinesis
                .get_shard_iterator()
                .stream_name(name)
                .shard_id(shard.shard_id())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .expect("shard iterator")
                .shard_iterator()
                .map(str::to_owned);
            while let Some(it) = iterator {
                let page = self
                    .kinesis
                    .get_records()
                    .shard_iterator(it)
                    .limit(10_000)
                    .send()
                    .await
                    .expect("get records");
                if page.records().is_empty() {
                    break;
                }
                for r in page.records() {
                    out.push(RawRecord {
                        shard: shard.shard_id().to_owned(),
                        partition_key: r.partition_key().unwrap_or_default().to_owned(),
                        sequence: r.sequence_number().to_owned(),
                        data: r.data().as_ref().to_vec(),
                    });
                }
                iterator = page.next_shard_iterator().map(str::to_owned);
            }
        }
        out
    }

    /// Polls the stream until `done` holds for its records, or panics after `timeout`.
    pub async fn wait_for_records(
        &self,
        stream: &str,
        timeout: Duration,
        done: impl Fn(&[Record]) -> bool,
    ) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.read_stream(stream).await;
            if done(&records) {
                return records;
            }
            if Instant::now() > deadline {
                panic!(
                    "stream {stream}: condition not met within {timeout:?}; {} records: {:?}",
                    records.len(),
                    records.iter().take(20).map(|r| &r.json).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls until every id in `ids` is in the stream; on timeout names the missing ones.
    pub async fn wait_for_ids(&self, stream: &str, ids: &[i64], timeout: Duration) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.read_stream(stream).await;
            let got: std::collections::HashSet<i64> = ids_of(&records).into_iter().collect();
            let missing: Vec<i64> = ids.iter().filter(|i| !got.contains(i)).copied().collect();
            if missing.is_empty() {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream}: {} of {} ids missing after {timeout:?} ({} records read); first missing: {:?}",
                missing.len(),
                ids.len(),
                records.len(),
                &missing[..missing.len().min(20)]
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn checkpoint(
        &self,
        table: &str,
        watcher: &str,
    ) -> Option<HashMap<String, AttributeValue>> {
        self.dynamodb
            .get_item()
            .table_name(table)
            .key("watcher", AttributeValue::S(watcher.into()))
            .consistent_read(true)
            .send()
            .await
            .expect("get checkpoint")
            .item()
            .cloned()
    }

    pub async fn wait_for_checkpoint(
        &self,
        table: &str,
        watcher: &str,
        timeout: Duration,
        done: impl Fn(&HashMap<String, AttributeValue>) -> bool,
    ) -> HashMap<String, AttributeValue> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(item) = self.checkpoint(table, watcher).await {
                if done(&item) {
                    return item;
                }
            }
            assert!(
                Instant::now() < deadline,
                "checkpoint of {watcher} not as expected within {timeout:?}: {:?}",
                self.checkpoint(table, watcher).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn revision(item: &HashMap<String, AttributeValue>) -> u64 {
    item.get("revision")
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub fn token_text(item: &HashMap<String, AttributeValue>) -> Option<String> {
    item.get("resume_token")
        .and_then(|v| v.as_s().ok())
        .cloned()
}

/// A Kinesis record as stored: for an aggregated one, the KPL container.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub shard: String,
    pub partition_key: String,
    pub sequence: String,
    pub data: Vec<u8>,
}

/// The user records in `records` as a KPL consumer sees them: deaggregated by AWS's own
/// library (aws-kinesis-agg, tests/support/kpl_deaggregate.py), in stream order, each as a
/// [`Record`] (its `sequence` is the Kinesis record's, with `:n` for the n-th user record of
/// an aggregate).
pub fn deaggregate_with_kpl(records: &[RawRecord]) -> Vec<Record> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let input: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            serde_json::json!({
                "shard": r.shard, "partitionKey": r.partition_key,
                "sequenceNumber": r.sequence, "data": hex(&r.data),
            })
        })
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/kpl_deaggregate.py");
    let mut child = Command::new(venv_bin().join("python"))
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start kpl_deaggregate.py");
    let body = serde_json::to_vec(&input).expect("json");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let output = child.wait_with_output().expect("kpl_deaggregate.py");
    writer.join().expect("writer").expect("write records");
    assert!(output.status.success(), "kpl_deaggregate.py failed");
    let users: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("deaggregated JSON");
    users
        .into_iter()
        .map(|u| {
            let text = u["data"].as_str().expect("data");
            let raw: Vec<u8> = (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
                .collect();
            let json = serde_json::from_slice(&raw)
                .unwrap_or_else(|e| panic!("user record is not JSON: {e}"));
            Record {
                shard: u["shard"].as_str().unwrap_or_default().to_owned(),
                partition_key: u["partitionKey"].as_str().unwrap_or_default().to_owned(),
                sequence: format!(
                    "{}:{}",
                    u["sequenceNumber"].as_str().unwrap_or_default(),
                    u["subSequenceNumber"]
                ),
                raw,
                json,
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Record {
    pub shard: String,
    pub partition_key: String,
    pub sequence: String,
    pub raw: Vec<u8>,
    pub json: serde_json::Value,
}

impl Record {
    pub fn operation(&self) -> &str {
        self.json["operationType"].as_str().unwrap_or_default()
    }

    /// `documentKey._id` when it is an integer.
    pub fn id(&self) -> Option<i64> {
        self.json["documentKey"]["_id"].as_i64()
    }
}

/// A running mongo-watcher process with its config and log file.
pub struct Watcher {
    child: Option<Child>,
    pub log: PathBuf,
    pub config: Option<PathBuf>,
    env: Vec<(String, String)>,
}

impl Watcher {
    /// Writes `config` to a file in `dir` and starts `mongo-watcher run` with AWS pointed at
    /// `aws_endpoint` (moto or the proxy).
    pub fn start(dir: &Path, config: &str, aws_endpoint: &str) -> Self {
        Self::start_with_env(dir, config, aws_endpoint, &[])
    }

    pub fn start_with_env(
        dir: &Path,
        config: &str,
        aws_endpoint: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let path = dir.join("config.yaml");
        std::fs::write(&path, config).expect("write config");
        Self::launch(dir, Some(path), aws_endpoint, env)
    }

    /// Drop-in mode: no config file, only the old tool's environment in `env`.
    pub fn start_drop_in(dir: &Path, aws_endpoint: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(dir, None, aws_endpoint, env)
    }

    fn launch(
        dir: &Path,
        config: Option<PathBuf>,
        aws_endpoint: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("AWS_ENDPOINT_URL".into(), aws_endpoint.into()));
        let mut w = Self {
            child: None,
            log: dir.join("watcher.log"),
            config,
            env,
        };
        w.spawn();
        w
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mongo-watcher"));
        cmd.arg("run");
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        cmd.env_remove("MONGO_WATCHER_CONFIG")
            .env("AWS_REGION", REGION)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("LOG_FORMAT", "text")
            .env("LOG_LEVEL", "debug")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("start mongo-watcher"));
    }

    /// Starts the process again with the same config (after a kill or stop).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    /// SIGKILL: no flush, no final checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Resident memory of the running process in bytes (`VmRSS` of /proc/<pid>/status).
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }

    /// SIGTERM, then waits; returns the exit code and how long it took.
    pub fn terminate(&mut self) -> (Option<i32>, Duration) {
        let mut c = self.child.take().expect("running");
        let started = Instant::now();
        let status = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = started + Duration::from_secs(40);
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return (status.code(), started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("mongo-watcher did not exit within 40 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Log lines of one watcher (text format) that contain `needle`.
    pub fn count_watcher_lines(&self, watcher: &str, needle: &str) -> usize {
        let tag = format!("watcher={watcher}");
        self.logs()
            .lines()
            .filter(|l| l.contains(&tag) && l.contains(needle))
            .count()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log line {needle:?} not seen within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- mongo-watcher log ({}) ----\n{}",
                self.log.display(),
                self.logs()
            );
        }
    }
}

/// What most end-to-end tests start with: SecantusDB, moto, an AWS client, a directory for
/// the watcher, a checkpoint table, a stream of `shards` shards named after `stream`, and a
/// free port for the control plane. Test files add their own `start` (a proxy, a token).
pub struct Env {
    pub mongo: Mongo,
    pub moto: Moto,
    pub aws: Aws,
    pub dir: tempfile::TempDir,
    pub table: String,
    pub stream: String,
    pub port: u16,
}

impl Env {
    pub async fn start(stream: &str, shards: i32) -> Self {
        Self::with_mongo(Mongo::start(), stream, shards).await
    }

    /// [`Env::start`] on a SecantusDB started with options of the test's own.
    pub async fn with_mongo(mongo: Mongo, stream: &str, shards: i32) -> Self {
        let moto = Moto::start();
        let aws = Aws::new(&moto).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let (table, stream) = (unique("cps"), unique(stream));
        aws.create_checkpoint_table(&table).await;
        aws.create_stream(&stream, shards).await;
        Self {
            mongo,
            moto,
            aws,
            dir,
            table,
            stream,
            port: free_port(),
        }
    }

    /// [`config_yaml`] of `watchers`, with the checkpoint table and the control plane on
    /// `port`.
    pub fn config(&self, watchers: &[String]) -> String {
        config_yaml(&self.mongo, Some(&self.table), watchers)
            .replace("127.0.0.1:0", &format!("127.0.0.1:{}", self.port))
    }

    /// Watcher `w` on `db.c` into the stream, with `extra` settings (YAML lines).
    pub fn watcher_w(&self, extra: &str) -> String {
        watcher_yaml("w", "db", "c", &self.stream, extra)
    }

    /// The collection `db.c`.
    pub async fn coll(&self) -> mongodb::Collection<Document> {
        self.mongo
            .client()
            .await
            .database("db")
            .collection::<Document>("c")
    }

    /// `GET /watchers/{name}`, as JSON.
    pub fn view(&self, name: &str) -> serde_json::Value {
        request(self.port, "GET", &format!("/watchers/{name}"), None, "").json()
    }
}

/// A unique suffix for names within one test run.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One watcher entry for a config.
pub fn watcher_yaml(name: &str, db: &str, coll: &str, stream: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    database: {db}\n    collection: {coll}\n    stream: {stream}\n{extra}"
    )
}

pub fn config_yaml(mongo: &Mongo, table: Option<&str>, watchers: &[String]) -> String {
    let mut s = format!("mongodb:\n  uri: \"{}\"\n", mongo.uri());
    if let Some(t) = table {
        s.push_str(&format!("checkpoints:\n  table: {t}\n"));
    }
    s.push_str("http:\n  listen: 127.0.0.1:0\n");
    s.push_str("defaults:\n  checkpoint_interval: 200ms\n  batch_linger: 20ms\n  retry_max_backoff: 500ms\n");
    s.push_str("watchers:\n");
    for w in watchers {
        s.push_str(w);
    }
    s
}

pub async fn insert_ids(coll: &mongodb::Collection<Document>, ids: impl IntoIterator<Item = i64>) {
    for id in ids {
        coll.insert_one(doc! {"_id": id, "v": 0_i64})
            .await
            .expect("insert");
    }
}

// ---- For benches/pipeline.rs: the process id, for its CPU time and memory. ----

impl Watcher {
    /// Process id of the running mongo-watcher (None after a kill or stop).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

// S3 (claim-check)

/// An S3 client on moto (path-style, as the watcher addresses a custom endpoint).
pub struct S3 {
    pub client: aws_sdk_s3::Client,
}

impl S3 {
    pub async fn new(moto: &Moto) -> Self {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(moto.endpoint())
            .region(aws_config::Region::new(REGION))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await;
        let client = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&conf)
                .force_path_style(true)
                .build(),
        );
        Self { client }
    }

    pub async fn create_bucket(&self, bucket: &str) {
        self.client
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .expect("create bucket");
    }

    /// The object's bytes, or `None` when there is no such object.
    pub async fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let out = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => return None,
            Err(e) => panic!(
                "get s3://{bucket}/{key}: {}",
                aws_sdk_s3::error::DisplayErrorContext(&e)
            ),
        };
        let body = out.body.collect().await.expect("read object body");
        Some(body.into_bytes().to_vec())
    }

    /// Keys of the objects under `prefix`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .expect("list objects");
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect()
    }
}
