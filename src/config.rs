//! The configuration file: YAML, `${VAR}` / `${VAR:-default}` expanded from the environment
//! in string values, then validated once into typed settings. Every problem is collected with
//! its field path, so an operator fixes all of them in one pass.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bson::{Bson, DateTime, Document};
use serde::de::DeserializeOwned;
use serde_yaml_ng::{Mapping, Value};
use watchers::checkpoint::Layout;
use watchers::record::{FieldPath, RecordFormat};
use watchers::spec::{
    Aggregation, BatchSettings, FullDocument, FullDocumentBeforeChange, OnHistoryLost,
    OnInvalidate, OnOversized, OnUndeliverable, S3Target, Snapshot, SplitLargeEvents, StartAt,
    WatcherSpec,
};

/// Settings of the whole process.
#[derive(Debug, Clone)]
pub struct Config {
    pub mongodb: MongoConfig,
    pub checkpoints: Option<CheckpointConfig>,
    /// Several replicas of one config: each watcher owned by one of them at a time.
    pub leases: Option<LeaseConfig>,
    pub http: HttpConfig,
    pub limits: Limits,
    pub watchers: Vec<WatcherSpec>,
}

/// Process-wide bounds, shared by every watcher.
/// `leases: {table, ttl}`.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseConfig {
    pub table: String,
    /// How long a lease outlives its last heartbeat (as observed by the other replicas).
    pub ttl: Duration,
}

/// Default of `leases.ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// `_id` ranges a copy reads side by side unless `snapshot_parallelism` says otherwise.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 1;
/// The most `snapshot_parallelism` may ask for (each range holds a MongoDB cursor).
pub const MAX_SNAPSHOT_PARALLELISM: usize = 16;

#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes of events read and not yet acknowledged, summed over all watchers.
    pub max_pending_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_pending_bytes: watchers::spec::DEFAULT_PROCESS_MAX_PENDING_BYTES,
        }
    }
}

#[derive(Clone)]
pub struct MongoConfig {
    pub uri: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub password_ssm_parameter: Option<String>,
}

impl std::fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MongoConfig")
            .field("uri", &redact_uri(&self.uri))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "****"))
            .field("password_ssm_parameter", &self.password_ssm_parameter)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub table: String,
    pub layout: Layout,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// SSM parameter holding the API token (else `MONGO_WATCHER_API_TOKEN`).
    pub api_token_ssm_parameter: Option<String>,
    /// Connection cap and timeouts of the control plane's server.
    pub serve: api::ServeOptions,
}

/// Every problem found, each `path: message`.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration ({} problems):", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
    parse(&text, &|name| std::env::var(name).ok())
}

/// Parses and validates a config text; `env` resolves `${VAR}`.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let mut problems = Vec::new();
    let mut root: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| ConfigErrors(vec![format!("config is not valid YAML: {e}")]))?;
    expand_env(&mut root, "", env, &mut problems);
    let mut top = Section::new("", Some(root), &mut problems);

    let mongodb = top.section("mongodb").map(|mut s| {
        let uri = s.require::<String>("uri");
        if let Some(u) = &uri {
            if !u.starts_with("mongodb://") && !u.starts_with("mongodb+srv://") {
                s.problem("uri", "must start with mongodb:// or mongodb+srv://");
            } else if let Err(problem) = check_uri(u) {
                s.problem("uri", problem);
            }
        }
        let cfg = MongoConfig {
            uri: uri.unwrap_or_default(),
            username: s.take("username"),
            password: s.take("password"),
            password_ssm_parameter: s.take("password_ssm_parameter"),
        };
        if cfg.password.is_some() && cfg.password_ssm_parameter.is_some() {
            s.problem(
                "password",
                "set either `password` or `password_ssm_parameter`, not both",
            );
        }
        s.finish();
        cfg
    });
    if mongodb.is_none() {
        top.problem("mongodb", "missing");
    }
    let checkpoints = top.section("checkpoints").and_then(|mut s| {
        let table = s.require::<String>("table");
        s.finish();
        table.map(|table| CheckpointConfig {
            table,
            layout: Layout::Native,
        })
    });
    let leases = top.section("leases").and_then(|mut s| {
        let table = s.require::<String>("table");
        let ttl = s.duration("ttl");
        if ttl.is_some_and(|t| t < Duration::from_secs(3)) {
            s.problem("ttl", "must be at least 3s (heartbeats go every ttl / 3)");
        }
        s.finish();
        table.map(|table| LeaseConfig {
            table,
            ttl: ttl.unwrap_or(DEFAULT_LEASE_TTL),
        })
    });
    if leases.is_some() && checkpoints.is_none() {
        top.problem(
            "leases",
            "needs `checkpoints.table`: a watcher moves between replicas through its checkpoint",
        );
    }
    let http = match top.section("http") {
        Some(mut s) => {
            let listen = s.take::<String>("listen").and_then(|l| match l.parse() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    s.problem(
                        "listen",
                        format!("`{l}` is not an address like 0.0.0.0:8080"),
                    );
                    None
                }
            });
            let api_token_ssm_parameter = s.take("api_token_ssm_parameter");
            let defaults = api::ServeOptions::default();
            let max_connections: Option<usize> = s.take("max_connections");
            if max_connections == Some(0) {
                s.problem("max_connections", "must be at least 1");
            }
            let header_read_timeout = s.positive_duration("header_read_timeout");
            let idle_timeout = s.positive_duration("idle_timeout");
            s.finish();
            HttpConfig {
                listen: listen.unwrap_or(default_listen()),
                api_token_ssm_parameter,
                serve: api::ServeOptions {
                    max_connections: max_connections.unwrap_or(defaults.max_connections),
                    header_read_timeout: header_read_timeout
                        .unwrap_or(defaults.header_read_timeout),
                    idle_timeout: idle_timeout.unwrap_or(defaults.idle_timeout),
                },
            }
        }
        None => HttpConfig {
            listen: default_listen(),
            api_token_ssm_parameter: None,
            serve: api::ServeOptions::default(),
        },
    };
    let limits = match top.section("limits") {
        Some(mut s) => {
            let max_pending_bytes = s.bytes("max_pending_bytes");
            s.finish();
            Limits {
                max_pending_bytes: max_pending_bytes.unwrap_or(Limits::default().max_pending_bytes),
            }
        }
        None => Limits::default(),
    };
    let defaults = top
        .section("defaults")
        .map(|s| PartialWatcher::parse(s))
        .unwrap_or_default();
    let mut watchers = Vec::new();
    match top.take_raw("watchers") {
        Some(Value::Sequence(items)) => {
            if items.is_empty() {
                top.problem("watchers", "needs at least one watcher");
            }
            let mut names = HashSet::new();
            for (i, item) in items.into_iter().enumerate() {
                let path = format!("watchers[{i}]");
                let section = Section::new(&path, Some(item), top.problems);
                let partial = PartialWatcher::parse(section);
                if let Some(name) = &partial.name {
                    if !names.insert(name.clone()) {
                        top.problems
                            .push(format!("{path}.name: duplicate watcher name `{name}`"));
                    }
                }
                if let Some(spec) = partial.merge(&defaults, &path, top.problems) {
                    watchers.push(spec);
                }
            }
        }
        Some(_) => top.problem("watchers", "must be a list"),
        None => top.problem("watchers", "missing"),
    }
    top.finish();
    if !problems.is_empty() {
        return Err(ConfigErrors(problems));
    }
    Ok(Config {
        mongodb: mongodb.expect("checked above"),
        checkpoints,
        leases,
        http,
        limits,
        watchers,
    })
}

/// Drop-in mode: the old Python tool's environment, one watcher, its marker format and its
/// record format. Used when `run` gets no config file.
pub fn from_legacy_env(env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
    let mut problems = Vec::new();
    let mut required = |name: &str| -> String {
        match env(name).filter(|v| !v.is_empty()) {
            Some(v) => v,
            None => {
                problems.push(format!(
                    "{name}: missing (drop-in mode reads the old tool's environment)"
                ));
                String::new()
            }
        }
    };
    let uri = required("MONGODB_URI");
    let database = required("MONGODB_DATABASE");
    let collection = required("MONGODB_COLLECTION");
    let stream = required("OUT_KINESIS_STREAM");
    let max_put_retries = match env("KINESIS_PUT_RETRIES").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) => Some(n),
            Err(_) => {
                problems.push(format!("KINESIS_PUT_RETRIES: `{v}` is not a whole number"));
                None
            }
        },
    };
    let listen = match env("MONGO_WATCHER_HTTP_LISTEN").filter(|v| !v.is_empty()) {
        None => default_listen(),
        Some(v) => v.parse().unwrap_or_else(|_| {
            problems.push(format!(
                "MONGO_WATCHER_HTTP_LISTEN: `{v}` is not an address like 0.0.0.0:8080"
            ));
            default_listen()
        }),
    };
    if !uri.is_empty() && !uri.starts_with("mongodb://") && !uri.starts_with("mongodb+srv://") {
        problems.push("MONGODB_URI: must start with mongodb:// or mongodb+srv://".into());
    } else if !uri.is_empty() {
        if let Err(problem) = check_uri(&uri) {
            problems.push(format!("MONGODB_URI: {problem}"));
        }
    }
    if !problems.is_empty() {
        return Err(ConfigErrors(problems));
    }
    let checkpoints = env("DYNAMODB_TABLE_NAME")
        .filter(|t| !t.is_empty())
        .map(|table| CheckpointConfig {
            table,
            layout: Layout::LegacyMarker {
                collection_name: format!("{database}.{collection}"),
            },
        });
    let name: String = format!("{database}-{collection}")
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    let batch = BatchSettings {
        max_put_retries,
        ..BatchSettings::default()
    };
    Ok(Config {
        mongodb: MongoConfig {
            uri,
            username: env("MONGODB_USERNAME").filter(|v| !v.is_empty()),
            password: env("MONGODB_PASSWORD").filter(|v| !v.is_empty()),
            password_ssm_parameter: None,
        },
        checkpoints,
        leases: None,
        http: HttpConfig {
            listen,
            api_token_ssm_parameter: None,
            serve: api::ServeOptions::default(),
        },
        limits: Limits::default(),
        watchers: vec![WatcherSpec {
            name,
            database,
            collection,
            stream,
            partition_key: FieldPath::parse("documentKey._id").unwrap_or_else(|| unreachable!()),
            full_document: FullDocument::UpdateLookup,
            full_document_before_change: FullDocumentBeforeChange::Off,
            pipeline: Vec::new(),
            start_at: StartAt::Latest,
            on_history_lost: OnHistoryLost::Fail,
            on_invalidate: OnInvalidate::Stop,
            on_oversized: OnOversized::Fail,
            s3: None,
            aggregation: Aggregation::None,
            split_large_events: SplitLargeEvents::Auto,
            snapshot: Snapshot::Never,
            snapshot_parallelism: DEFAULT_SNAPSHOT_PARALLELISM,
            on_undeliverable: OnUndeliverable::Fail,
            record_format: RecordFormat::Legacy,
            batch,
            checkpoint_interval: Duration::from_secs(1),
        }],
    })
}

/// What a valid config may still get wrong, in words for an operator (`check-config` prints
/// them, `run` logs them): a partition key that not every event of a document carries.
pub fn warnings(cfg: &Config) -> Vec<String> {
    cfg.watchers
        .iter()
        .filter(|w| !w.partition_key.in_document_key())
        .filter(|w| {
            // A key in fullDocument is read from the pre-image where there is no document,
            // and `required` makes every delete carry one.
            !(w.partition_key.pre_image().is_some()
                && w.full_document_before_change == FullDocumentBeforeChange::Required)
        })
        .map(|w| {
            format!(
                "watcher `{}`: partition_key `{}` is not in documentKey: a delete has no \
                 fullDocument (nor has an update looked up after its document was deleted), so \
                 such events are keyed by the namespace and can overtake the document's \
                 earlier events; key by documentKey (the default, documentKey._id){}",
                w.name,
                w.partition_key,
                if w.partition_key.pre_image().is_some() {
                    ", or set full_document_before_change: required (with pre-images enabled \
                     on the collection) so that those events are keyed by the pre-image"
                } else {
                    ""
                }
            )
        })
        .collect()
}

/// `64MiB`, `64 MiB`, `1.5GiB`, `500KB`, `1024`.
fn parse_bytes(text: &str) -> Option<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return None,
    };
    let bytes = number * factor;
    (bytes.is_finite() && bytes >= 0.0 && bytes < usize::MAX as f64).then_some(bytes as usize)
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

/// URI options whose values are secrets. The driver compares option names without regard to
/// case, and so do we. `authMechanismProperties` carries `AWS_SESSION_TOKEN:...` for
/// MONGODB-AWS; `proxyPassword` is the SOCKS5 proxy's; the two key-file passwords unlock the
/// TLS client key.
const SECRET_URI_OPTIONS: [&str; 4] = [
    "tlsCertificateKeyFilePassword",
    "sslClientCertificateKeyPassword",
    "authMechanismProperties",
    "proxyPassword",
];

fn is_secret_option(key: &str) -> bool {
    SECRET_URI_OPTIONS
        .iter()
        .any(|name| name.eq_ignore_ascii_case(key.trim()))
}

/// Hides every secret of a MongoDB URI: the password of `mongodb://user:pass@host` and the
/// values of the secret-bearing options (`...?tlsCertificateKeyFilePassword=****`).
pub fn redact_uri(uri: &str) -> String {
    let (scheme, rest) = match uri.find("://") {
        Some(i) => (&uri[..i + 3], &uri[i + 3..]),
        None => ("", uri),
    };
    let (before_query, query) = match rest.find('?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let authority = &before_query[..authority_end];
    let mut out = String::with_capacity(uri.len());
    out.push_str(scheme);
    match authority.rfind('@') {
        Some(at) if !scheme.is_empty() => {
            let userinfo = &authority[..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            out.push_str(user);
            if userinfo.contains(':') {
                out.push_str(":****");
            }
            out.push_str(&before_query[at..]);
        }
        _ => out.push_str(before_query),
    }
    if let Some(query) = query {
        out.push('?');
        // Options are separated by `&` (`;` is accepted by some drivers, so it is kept too).
        for part in query.split_inclusive(['&', ';']) {
            let (option, separator) = match part.char_indices().last() {
                Some((i, c)) if c == '&' || c == ';' => (&part[..i], &part[i..]),
                _ => (part, ""),
            };
            match option.split_once('=') {
                Some((key, _)) if is_secret_option(&percent_decode(key)) => {
                    out.push_str(key);
                    out.push_str("=****");
                }
                _ => out.push_str(option),
            }
            out.push_str(separator);
        }
    }
    out
}

/// Every secret a URI holds, as written and percent-decoded, longest first, so that error
/// texts from the driver (which may quote a decoded value, or one `key:value` pair of
/// `authMechanismProperties`) can be scrubbed of them.
pub fn uri_secrets(uri: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    let mut add = |raw: &str| {
        for s in [raw.to_owned(), percent_decode(raw)] {
            if !s.is_empty() && !secrets.contains(&s) {
                secrets.push(s);
            }
        }
    };
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if let Some((_, password)) = userinfo.split_once(':') {
            add(password);
        }
    }
    for option in query.split(['&', ';']) {
        let Some((key, value)) = option.split_once('=') else {
            continue;
        };
        if !is_secret_option(&percent_decode(key)) {
            continue;
        }
        add(value);
        for pair in percent_decode(value).split(',') {
            if let Some((_, v)) = pair.split_once(':') {
                add(v);
            }
        }
    }
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

/// Replaces every secret of `uri` in `text` with `****`.
pub fn scrub(text: &str, uri: &str) -> String {
    uri_secrets(uri)
        .iter()
        .fold(text.to_owned(), |t, s| t.replace(s.as_str(), "****"))
}

/// `%XX` escapes decoded; anything malformed is kept as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                let value = hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0);
                out.push(value as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks a URI with the driver's own parser, the one `run` uses, without DNS: a
/// `mongodb+srv://` URI is checked for syntax and options only (its hosts come from DNS at
/// `run`). The message never holds a secret of the URI.
pub fn check_uri(uri: &str) -> Result<(), String> {
    let problem = |detail: String| {
        format!(
            "`{}` is not a usable MongoDB URI: {}",
            redact_uri(uri),
            scrub(&detail, uri)
        )
    };
    let parsed =
        mongodb::options::ConnectionString::parse(uri).map_err(|e| problem(driver_message(&e)))?;
    // `ClientOptions::parse` (what `run` calls) refuses this one after the syntax check.
    #[allow(deprecated)]
    if parsed.socket_timeout.is_some() {
        return Err(problem(
            "the Rust driver does not support socketTimeoutMS".into(),
        ));
    }
    Ok(())
}

/// The driver's message without its wrapper (`Kind: An invalid argument was provided: ...`).
fn driver_message(e: &mongodb::error::Error) -> String {
    match e.kind.as_ref() {
        mongodb::error::ErrorKind::InvalidArgument { message, .. } => message.clone(),
        _ => e.to_string(),
    }
}

fn expand_env(
    value: &mut Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) {
    match value {
        Value::String(s) if s.contains("${") => match expand_str(s, env) {
            Ok(expanded) => *s = expanded,
            Err(msg) => problems.push(format!("{}: {msg}", display_path(path))),
        },
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &format!("{path}[{i}]"), env, problems);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = k.as_str().unwrap_or("?");
                expand_env(v, &join(path, key), env, problems);
            }
        }
        Value::Tagged(t) => expand_env(&mut t.value, path, env, problems),
        _ => {}
    }
}

/// Expands `${VAR}` and `${VAR:-default}`; anything else is left as written.
pub fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!("unclosed `${{` in `{s}`"));
        };
        let expr = &after[..end];
        let (name, default) = match expr.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (expr, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("`${{{expr}}}` is not a variable reference"));
        }
        match (env(name).filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn display_path(path: &str) -> &str {
    if path.is_empty() {
        "(top level)"
    } else {
        path
    }
}

/// A mapping whose keys are taken one by one; what is left is unknown.
struct Section<'p> {
    path: String,
    map: Mapping,
    problems: &'p mut Vec<String>,
}

impl<'p> Section<'p> {
    fn new(path: &str, value: Option<Value>, problems: &'p mut Vec<String>) -> Self {
        let map = match value {
            Some(Value::Mapping(m)) => m,
            None | Some(Value::Null) => Mapping::new(),
            Some(_) => {
                problems.push(format!("{}: must be a mapping", display_path(path)));
                Mapping::new()
            }
        };
        Self {
            path: path.to_owned(),
            map,
            problems,
        }
    }

    fn problem(&mut self, key: &str, msg: impl std::fmt::Display) {
        self.problems
            .push(format!("{}: {msg}", join(&self.path, key)));
    }

    fn take_raw(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn take<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let raw = self.take_raw(key)?;
        match serde_yaml_ng::from_value(raw) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(key, e);
                None
            }
        }
    }

    fn require<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        if !self.map.contains_key(key) {
            self.problem(key, "missing");
            return None;
        }
        self.take(key)
    }

    fn section(&mut self, key: &str) -> Option<Section<'_>> {
        let raw = self.take_raw(key)?;
        Some(Section::new(
            &join(&self.path, key),
            Some(raw),
            self.problems,
        ))
    }

    fn duration(&mut self, key: &str) -> Option<Duration> {
        let text: String = self.take(key)?;
        match humantime::parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(
                    key,
                    format!("`{text}` is not a duration like 250ms or 1s: {e}"),
                );
                None
            }
        }
    }

    /// A duration that must be more than 0.
    fn positive_duration(&mut self, key: &str) -> Option<Duration> {
        let d = self.duration(key);
        if d == Some(Duration::ZERO) {
            self.problem(key, "must be more than 0");
        }
        d
    }

    /// A size in bytes: a whole number, or a number with a unit (`64MiB`, `512 KiB`, `1GiB`;
    /// `KB`, `MB`, `GB` are powers of 1000). Must be more than 0.
    fn bytes(&mut self, key: &str) -> Option<usize> {
        let raw = self.take_raw(key)?;
        let parsed = match &raw {
            Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
            Value::String(text) => parse_bytes(text),
            _ => None,
        };
        match parsed {
            Some(n) if n > 0 => Some(n),
            _ => {
                let shown = match raw {
                    Value::String(t) => t,
                    Value::Number(n) => n.to_string(),
                    other => format!("{other:?}"),
                };
                self.problem(
                    key,
                    format!("`{shown}` is not a size more than 0 like 67108864, 64MiB or 1GiB"),
                );
                None
            }
        }
    }

    fn choice<T: Copy>(&mut self, key: &str, options: &[(&str, T)]) -> Option<T> {
        let text: String = self.take(key)?;
        match options.iter().find(|(name, _)| *name == text) {
            Some((_, v)) => Some(*v),
            None => {
                let names: Vec<_> = options.iter().map(|(n, _)| *n).collect();
                self.problem(key, format!("`{text}` is not one of {}", names.join(", ")));
                None
            }
        }
    }

    fn finish(self) {
        for key in self.map.keys() {
            let name = match key {
                Value::String(s) => s.clone(),
                other => format!("{other:?}"),
            };
            self.problems
                .push(format!("{}: unknown field", join(&self.path, &name)));
        }
    }
}

/// Watcher fields as written in one place (a watcher or `defaults`); merged afterwards.
#[derive(Debug, Default, Clone)]
struct PartialWatcher {
    name: Option<String>,
    database: Option<String>,
    collection: Option<String>,
    stream: Option<String>,
    partition_key: Option<FieldPath>,
    full_document: Option<FullDocument>,
    full_document_before_change: Option<FullDocumentBeforeChange>,
    pipeline: Option<Vec<Document>>,
    start_at: Option<StartAt>,
    on_history_lost: Option<OnHistoryLost>,
    on_invalidate: Option<OnInvalidate>,
    on_oversized: Option<OnOversized>,
    s3: Option<S3Target>,
    aggregation: Option<Aggregation>,
    split_large_events: Option<SplitLargeEvents>,
    snapshot: Option<Snapshot>,
    snapshot_parallelism: Option<usize>,
    on_undeliverable: Option<OnUndeliverable>,
    record_format: Option<RecordFormat>,
    checkpoint_interval: Option<Duration>,
    batch_linger: Option<Duration>,
    max_batch_records: Option<usize>,
    max_batch_bytes: Option<usize>,
    max_in_flight: Option<usize>,
    max_pending: Option<usize>,
    max_pending_bytes: Option<usize>,
    max_put_retries: Option<u32>,
    retry_initial_backoff: Option<Duration>,
    retry_max_backoff: Option<Duration>,
    record_retry_initial_backoff: Option<Duration>,
    record_retry_max_backoff: Option<Duration>,
}

impl PartialWatcher {
    fn parse(mut s: Section<'_>) -> Self {
        let name: Option<String> = s.take("name");
        if let Some(n) = &name {
            let ok = !n.is_empty()
                && n.len() <= 128
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !ok {
                s.problem(
                    "name",
                    format!("`{n}` must match [a-z0-9_-]+ (at most 128 characters)"),
                );
            }
        }
        let partition_key = s.take::<String>("partition_key").and_then(|p| {
            let parsed = FieldPath::parse(&p);
            if parsed.is_none() {
                s.problem(
                    "partition_key",
                    format!("`{p}` is not a dotted path like documentKey._id"),
                );
            }
            parsed
        });
        let pipeline = s.take_raw("pipeline").and_then(|v| match yaml_to_bson(v) {
            Ok(Bson::Array(stages)) => {
                let mut docs = Vec::new();
                for (i, stage) in stages.into_iter().enumerate() {
                    match stage {
                        Bson::Document(d) => docs.push(d),
                        _ => s.problem(&format!("pipeline[{i}]"), "must be a mapping (a stage)"),
                    }
                }
                Some(docs)
            }
            Ok(_) => {
                s.problem("pipeline", "must be a list of stages");
                None
            }
            Err(e) => {
                s.problem("pipeline", e);
                None
            }
        });
        let start_at = s
            .take_raw("start_at")
            .and_then(|v| match parse_start_at(v) {
                Ok(start) => Some(start),
                Err(e) => {
                    s.problem("start_at", e);
                    None
                }
            });
        let max_batch_records: Option<usize> = s.take("max_batch_records");
        if let Some(n) = max_batch_records {
            if n == 0 || n > watchers::batch::MAX_BATCH_RECORDS {
                s.problem(
                    "max_batch_records",
                    format!("must be 1 to {}", watchers::batch::MAX_BATCH_RECORDS),
                );
            }
        }
        let max_batch_bytes: Option<usize> = s.take("max_batch_bytes");
        if let Some(n) = max_batch_bytes {
            if n == 0 || n > watchers::stream_limits::MAX_REQUEST_BYTES {
                s.problem(
                    "max_batch_bytes",
                    format!(
                        "must be 1 to {}",
                        watchers::stream_limits::MAX_REQUEST_BYTES
                    ),
                );
            }
        }
        let s3 = s.section("s3").and_then(|mut sub| {
            let bucket: Option<String> = sub.require("bucket");
            let prefix: Option<String> = sub.take("prefix");
            if bucket.as_deref() == Some("") {
                sub.problem("bucket", "must not be empty");
            }
            sub.finish();
            Some(S3Target {
                bucket: bucket.filter(|b| !b.is_empty())?,
                prefix: prefix.unwrap_or_default(),
            })
        });
        let p = PartialWatcher {
            name,
            database: s.take("database"),
            collection: s.take("collection"),
            stream: s.take("stream"),
            partition_key,
            full_document: s.choice(
                "full_document",
                &[
                    ("off", FullDocument::Off),
                    ("updateLookup", FullDocument::UpdateLookup),
                    ("whenAvailable", FullDocument::WhenAvailable),
                    ("required", FullDocument::Required),
                ],
            ),
            full_document_before_change: s.choice(
                "full_document_before_change",
                &[
                    ("off", FullDocumentBeforeChange::Off),
                    ("whenAvailable", FullDocumentBeforeChange::WhenAvailable),
                    ("required", FullDocumentBeforeChange::Required),
                ],
            ),
            pipeline,
            start_at,
            on_history_lost: s.choice(
                "on_history_lost",
                &[
                    ("fail", OnHistoryLost::Fail),
                    ("restart_from_latest", OnHistoryLost::RestartFromLatest),
                ],
            ),
            on_invalidate: s.choice(
                "on_invalidate",
                &[
                    ("stop", OnInvalidate::Stop),
                    ("continue", OnInvalidate::Continue),
                ],
            ),
            on_oversized: s.choice(
                "on_oversized",
                &[
                    ("fail", OnOversized::Fail),
                    ("skip", OnOversized::Skip),
                    ("s3", OnOversized::S3),
                ],
            ),
            s3,
            aggregation: s.choice(
                "aggregation",
                &[("none", Aggregation::None), ("kpl", Aggregation::Kpl)],
            ),
            split_large_events: s.choice(
                "split_large_events",
                &[
                    ("auto", SplitLargeEvents::Auto),
                    ("on", SplitLargeEvents::On),
                    ("off", SplitLargeEvents::Off),
                ],
            ),
            snapshot: s.choice(
                "snapshot",
                &[("never", Snapshot::Never), ("initial", Snapshot::Initial)],
            ),
            snapshot_parallelism: s.take("snapshot_parallelism"),
            on_undeliverable: s.choice(
                "on_undeliverable",
                &[
                    ("fail", OnUndeliverable::Fail),
                    ("skip", OnUndeliverable::Skip),
                ],
            ),
            record_format: s.choice(
                "record_format",
                &[
                    ("relaxed", RecordFormat::Relaxed),
                    ("canonical", RecordFormat::Canonical),
                    ("legacy", RecordFormat::Legacy),
                ],
            ),
            checkpoint_interval: s.duration("checkpoint_interval"),
            batch_linger: s.duration("batch_linger"),
            max_batch_records,
            max_batch_bytes,
            max_in_flight: s.take("max_in_flight"),
            max_pending: s.take("max_pending"),
            max_pending_bytes: s.bytes("max_pending_bytes"),
            max_put_retries: s.take("max_put_retries"),
            retry_initial_backoff: s.duration("retry_initial_backoff"),
            retry_max_backoff: s.duration("retry_max_backoff"),
            record_retry_initial_backoff: s.duration("record_retry_initial_backoff"),
            record_retry_max_backoff: s.duration("record_retry_max_backoff"),
        };
        if p.max_in_flight == Some(0) {
            s.problem("max_in_flight", "must be at least 1");
        }
        if p.max_pending == Some(0) {
            s.problem("max_pending", "must be at least 1");
        }
        if p.snapshot_parallelism
            .is_some_and(|n| !(1..=MAX_SNAPSHOT_PARALLELISM).contains(&n))
        {
            s.problem(
                "snapshot_parallelism",
                format!("must be between 1 and {MAX_SNAPSHOT_PARALLELISM}"),
            );
        }
        if p.checkpoint_interval == Some(Duration::ZERO) {
            s.problem("checkpoint_interval", "must be more than 0");
        }
        s.finish();
        p
    }

    /// Fills unset fields from `defaults` and checks that the required ones are there.
    fn merge(
        self,
        d: &PartialWatcher,
        path: &str,
        problems: &mut Vec<String>,
    ) -> Option<WatcherSpec> {
        let mut missing = |field: &str, v: &Option<String>| {
            if v.is_none() {
                problems.push(format!("{path}.{field}: missing"));
            }
        };
        let name = self.name;
        let database = self.database.or_else(|| d.database.clone());
        let collection = self.collection.or_else(|| d.collection.clone());
        let stream = self.stream.or_else(|| d.stream.clone());
        missing("name", &name);
        missing("database", &database);
        missing("collection", &collection);
        missing("stream", &stream);
        let on_oversized = self.on_oversized.or(d.on_oversized).unwrap_or_default();
        let s3 = self.s3.or_else(|| d.s3.clone());
        if on_oversized == OnOversized::S3 && s3.is_none() {
            problems.push(format!(
                "{path}.s3: missing; `on_oversized: s3` needs s3: {{bucket, prefix}} (here or in defaults)"
            ));
        }
        let snapshot = self.snapshot.or(d.snapshot).unwrap_or_default();
        let start_at = self.start_at.clone().or_else(|| d.start_at.clone());
        if snapshot == Snapshot::Initial && matches!(start_at, Some(StartAt::Timestamp(_))) {
            problems.push(format!(
                "{path}.snapshot: `initial` copies the collection as it is now, and streams from \
                 the position stored before the copy; a `start_at` timestamp cannot be combined \
                 with it"
            ));
        }
        let defaults = BatchSettings::default();
        let batch = BatchSettings {
            max_records: self
                .max_batch_records
                .or(d.max_batch_records)
                .unwrap_or(defaults.max_records),
            max_bytes: self.max_batch_bytes.or(d.max_batch_bytes),
            linger: self
                .batch_linger
                .or(d.batch_linger)
                .unwrap_or(defaults.linger),
            max_in_flight: self
                .max_in_flight
                .or(d.max_in_flight)
                .unwrap_or(defaults.max_in_flight),
            max_pending: self
                .max_pending
                .or(d.max_pending)
                .unwrap_or(defaults.max_pending),
            max_pending_bytes: self
                .max_pending_bytes
                .or(d.max_pending_bytes)
                .unwrap_or(defaults.max_pending_bytes),
            max_put_retries: self.max_put_retries.or(d.max_put_retries),
            retry_initial_backoff: self
                .retry_initial_backoff
                .or(d.retry_initial_backoff)
                .unwrap_or(defaults.retry_initial_backoff),
            retry_max_backoff: self
                .retry_max_backoff
                .or(d.retry_max_backoff)
                .unwrap_or(defaults.retry_max_backoff),
            record_retry_initial_backoff: self
                .record_retry_initial_backoff
                .or(d.record_retry_initial_backoff)
                .unwrap_or(defaults.record_retry_initial_backoff),
            record_retry_max_backoff: self
                .record_retry_max_backoff
                .or(d.record_retry_max_backoff)
                .unwrap_or(defaults.record_retry_max_backoff),
        };
        Some(WatcherSpec {
            name: name?,
            database: database?,
            collection: collection?,
            stream: stream?,
            partition_key: self
                .partition_key
                .or_else(|| d.partition_key.clone())
                .or_else(|| FieldPath::parse("documentKey._id"))?,
            full_document: self.full_document.or(d.full_document).unwrap_or_default(),
            full_document_before_change: self
                .full_document_before_change
                .or(d.full_document_before_change)
                .unwrap_or_default(),
            pipeline: self
                .pipeline
                .or_else(|| d.pipeline.clone())
                .unwrap_or_default(),
            start_at: self
                .start_at
                .or_else(|| d.start_at.clone())
                .unwrap_or(StartAt::Latest),
            on_history_lost: self
                .on_history_lost
                .or(d.on_history_lost)
                .unwrap_or_default(),
            on_invalidate: self.on_invalidate.or(d.on_invalidate).unwrap_or_default(),
            on_oversized,
            s3,
            aggregation: self.aggregation.or(d.aggregation).unwrap_or_default(),
            split_large_events: self
                .split_large_events
                .or(d.split_large_events)
                .unwrap_or_default(),
            snapshot,
            snapshot_parallelism: self
                .snapshot_parallelism
                .or(d.snapshot_parallelism)
                .unwrap_or(DEFAULT_SNAPSHOT_PARALLELISM),
            on_undeliverable: self
                .on_undeliverable
                .or(d.on_undeliverable)
                .unwrap_or_default(),
            record_format: self.record_format.or(d.record_format).unwrap_or_default(),
            batch,
            checkpoint_interval: self
                .checkpoint_interval
                .or(d.checkpoint_interval)
                .unwrap_or(Duration::from_secs(1)),
        })
    }
}

fn parse_start_at(v: Value) -> Result<StartAt, String> {
    match v {
        Value::String(s) if s == "latest" => Ok(StartAt::Latest),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, v) = m.into_iter().next().ok_or("empty mapping")?;
            match k.as_str() {
                Some("timestamp") => {
                    let text = v.as_str().ok_or("`timestamp` must be an RFC 3339 string")?;
                    let dt = DateTime::parse_rfc3339_str(text).map_err(|e| {
                        format!("`{text}` is not an RFC 3339 time like 2024-05-01T00:00:00Z: {e}")
                    })?;
                    if dt > DateTime::now() {
                        return Err(format!("`{text}` is in the future"));
                    }
                    Ok(StartAt::Timestamp(dt))
                }
                Some("resume_token") => match yaml_to_bson(v)? {
                    doc @ Bson::Document(_) => Ok(StartAt::ResumeToken(doc)),
                    _ => Err("`resume_token` must be a mapping such as {_data: ...}".into()),
                },
                _ => Err("must be `latest`, {timestamp: RFC3339} or {resume_token: {...}}".into()),
            }
        }
        _ => Err("must be `latest`, {timestamp: RFC3339} or {resume_token: {...}}".into()),
    }
}

/// YAML to BSON through Extended JSON, so `{$date: ...}` and friends keep their meaning.
fn yaml_to_bson(v: Value) -> Result<Bson, String> {
    let json: serde_json::Value =
        serde_yaml_ng::from_value(v).map_err(|e| format!("cannot be read as JSON: {e}"))?;
    Bson::try_from(json).map_err(|e| format!("is not valid Extended JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "STREAM" => Some("from-env".into()),
            "URI" => Some("mongodb://u:secret@h:27017/?appName=x".into()),
            _ => None,
        }
    }

    const GOOD: &str = r#"
mongodb: {uri: "${URI}"}
checkpoints: {table: cps}
defaults: {stream: "${STREAM}", batch_linger: 10ms}
watchers:
  - {name: orders, database: shop, collection: orders, stream: orders-events,
     pipeline: [{$match: {operationType: insert}}], start_at: {timestamp: "2024-01-01T00:00:00Z"}}
  - {name: users, database: shop, collection: users, partition_key: fullDocument.email,
     full_document: off, max_put_retries: 3, full_document_before_change: whenAvailable}
"#;

    #[test]
    fn a_good_config_resolves_with_defaults() {
        let c = parse(GOOD, &env).unwrap();
        assert_eq!(c.watchers.len(), 2);
        let users = &c.watchers[1];
        assert_eq!(users.stream, "from-env");
        assert_eq!(users.batch.linger, Duration::from_millis(10));
        assert_eq!(users.batch.max_put_retries, Some(3));
        assert_eq!(users.full_document, FullDocument::Off);
        assert_eq!(
            users.full_document_before_change,
            FullDocumentBeforeChange::WhenAvailable
        );
        assert_eq!(users.partition_key.to_string(), "fullDocument.email");
        assert_eq!(users.start_at, StartAt::Latest);
        let orders = &c.watchers[0];
        assert_eq!(orders.pipeline.len(), 1);
        assert_eq!(orders.full_document, FullDocument::UpdateLookup);
        assert_eq!(
            orders.full_document_before_change,
            FullDocumentBeforeChange::Off
        );
        assert_eq!(orders.checkpoint_interval, Duration::from_secs(1));
        assert!(matches!(orders.start_at, StartAt::Timestamp(_)));
        assert_eq!(c.checkpoints.unwrap().table, "cps");
        assert!(!format!("{:?}", c.mongodb).contains("secret"));
    }

    #[test]
    fn sizes_limits_and_retry_settings() {
        let text = r#"
mongodb: {uri: "mongodb://h"}
limits: {max_pending_bytes: 1GiB}
defaults: {stream: s, max_pending_bytes: 32MiB, record_retry_max_backoff: 400ms, record_retry_initial_backoff: 40ms}
watchers:
  - {name: a, database: d, collection: c}
  - {name: b, database: d, collection: c, max_pending_bytes: 1048576}
  - {name: c, database: d, collection: c, max_pending_bytes: "1.5 KB"}
"#;
        let cfg = parse(text, &env).unwrap();
        assert_eq!(cfg.limits.max_pending_bytes, 1 << 30);
        let bytes: Vec<usize> = cfg
            .watchers
            .iter()
            .map(|w| w.batch.max_pending_bytes)
            .collect();
        assert_eq!(bytes, [32 << 20, 1 << 20, 1500]);
        assert_eq!(
            cfg.watchers[0].batch.record_retry_max_backoff,
            Duration::from_millis(400)
        );
        assert_eq!(
            cfg.watchers[0].batch.record_retry_initial_backoff,
            Duration::from_millis(40)
        );
        let defaults = parse(
            "mongodb: {uri: \"mongodb://h\"}\nwatchers: [{name: a, database: d, collection: c, stream: s}]",
            &env,
        )
        .unwrap();
        assert_eq!(defaults.limits.max_pending_bytes, 256 << 20);
        assert_eq!(defaults.watchers[0].batch.max_pending_bytes, 64 << 20);
        assert_eq!(
            defaults.watchers[0].batch.record_retry_max_backoff,
            Duration::from_millis(40)
        );
        assert_eq!(
            defaults.watchers[0].batch.record_retry_initial_backoff,
            Duration::from_millis(10)
        );
        let bad = r#"
mongodb: {uri: "mongodb://h"}
limits: {max_pending_bytes: lots, max_pending: 3}
watchers:
  - {name: a, database: d, collection: c, stream: s, max_pending_bytes: 0}
  - {name: b, database: d, collection: c, stream: s, max_pending_bytes: 12 parsecs}
"#;
        let errs = parse(bad, &env).unwrap_err().0;
        for e in [
            "limits.max_pending_bytes: `lots` is not a size",
            "limits.max_pending: unknown field",
            "watchers[0].max_pending_bytes: `0` is not a size",
            "watchers[1].max_pending_bytes: `12 parsecs` is not a size",
        ] {
            assert!(
                errs.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
mongodb: {uri: x, pasword: y}
watchers:
  - {name: Orders!, database: shop, collection: orders, nme: x}
  - {name: b, database: shop, collection: c}
  - {name: b, database: shop, collection: c, stream: s, checkpoint_interval: soon,
     full_document: sometimes, start_at: {timestamp: "2999-01-01T00:00:00Z"}, max_batch_records: 501}
extra: 1
"#;
        let errs = parse(text, &env).unwrap_err().0;
        let expect = [
            "mongodb.pasword: unknown field",
            "watchers[0].name: `Orders!` must match [a-z0-9_-]+",
            "watchers[0].nme: unknown field",
            "watchers[0].stream: missing",
            "watchers[1].stream: missing",
            "watchers[2].name: duplicate watcher name `b`",
            "watchers[2].checkpoint_interval: `soon` is not a duration",
            "watchers[2].full_document: `sometimes` is not one of",
            "watchers[2].start_at: `2999-01-01T00:00:00Z` is in the future",
            "watchers[2].max_batch_records: must be 1 to 500",
            "extra: unknown field",
        ];
        for e in expect {
            assert!(
                errs.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
    }

    #[test]
    fn a_partition_key_outside_document_key_is_warned_unless_deletes_carry_it() {
        let text = r#"
mongodb: {uri: "mongodb://h"}
defaults: {stream: s, database: d, collection: c}
watchers:
  - {name: a}
  - {name: b, partition_key: documentKey.region}
  - {name: c, partition_key: fullDocument.email}
  - {name: d, partition_key: fullDocument.email, full_document_before_change: required}
  - {name: e, partition_key: fullDocument.email, full_document_before_change: whenAvailable}
  - {name: f, partition_key: updateDescription.x}
"#;
        let w = warnings(&parse(text, &env).unwrap());
        let named: Vec<&str> = w
            .iter()
            .map(|m| m.split('`').nth(1).unwrap_or_default())
            .collect();
        assert_eq!(named, ["c", "e", "f"]);
        assert!(w[0].contains("full_document_before_change: required"));
        assert!(!w[2].contains("full_document_before_change"));
    }

    #[test]
    fn leases_take_a_table_and_a_ttl_and_need_checkpoints() {
        let text = r#"
mongodb: {uri: "mongodb://h"}
checkpoints: {table: cps}
leases: {table: leases}
watchers:
  - {name: a, database: d, collection: c, stream: s}
"#;
        let leases = parse(text, &env).unwrap().leases.unwrap();
        assert_eq!(
            leases,
            LeaseConfig {
                table: "leases".into(),
                ttl: DEFAULT_LEASE_TTL
            }
        );
        let ttl = text.replace("{table: leases}", "{table: leases, ttl: 30s}");
        assert_eq!(
            parse(&ttl, &env).unwrap().leases.unwrap().ttl,
            Duration::from_secs(30)
        );
        let bad = r#"
mongodb: {uri: "mongodb://h"}
leases: {ttl: 1s, owner: me}
watchers:
  - {name: a, database: d, collection: c, stream: s}
"#;
        let errs = parse(bad, &env).unwrap_err().0;
        for e in [
            "leases.table: missing",
            "leases.ttl: must be at least 3s",
            "leases.owner: unknown field",
        ] {
            assert!(
                errs.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
        let no_checkpoints = text.replace("checkpoints: {table: cps}\n", "");
        assert_eq!(
            parse(&no_checkpoints, &env).unwrap_err().0,
            ["leases: needs `checkpoints.table`: a watcher moves between replicas through its checkpoint"]
        );
    }

    #[test]
    fn aggregation_split_and_s3_values_defaults_and_errors() {
        let text = r#"
mongodb: {uri: "mongodb://h"}
defaults: {stream: s, aggregation: kpl, s3: {bucket: big, prefix: cdc/}}
watchers:
  - {name: a, database: d, collection: c, on_oversized: s3}
  - {name: b, database: d, collection: c, aggregation: none, split_large_events: off, snapshot: initial, snapshot_parallelism: 2}
  - {name: c, database: d, collection: c, split_large_events: on, s3: {bucket: other}}
"#;
        let config = parse(text, &env).unwrap();
        let w = &config.watchers;
        assert_eq!(
            w.iter().map(|w| w.aggregation).collect::<Vec<_>>(),
            [Aggregation::Kpl, Aggregation::None, Aggregation::Kpl]
        );
        assert_eq!(
            w.iter().map(|w| w.split_large_events).collect::<Vec<_>>(),
            [
                SplitLargeEvents::Auto,
                SplitLargeEvents::Off,
                SplitLargeEvents::On
            ]
        );
        assert_eq!(
            w.iter().map(|w| w.snapshot).collect::<Vec<_>>(),
            [Snapshot::Never, Snapshot::Initial, Snapshot::Never]
        );
        assert_eq!(
            w.iter().map(|w| w.snapshot_parallelism).collect::<Vec<_>>(),
            [1, 2, 1]
        );
        assert_eq!(w[0].on_oversized, OnOversized::S3);
        assert_eq!(w[1].on_oversized, OnOversized::Fail);
        assert_eq!(
            w[0].s3,
            Some(S3Target {
                bucket: "big".into(),
                prefix: "cdc/".into()
            })
        );
        assert_eq!(
            w[2].s3,
            Some(S3Target {
                bucket: "other".into(),
                prefix: String::new()
            })
        );
        let bad = r#"
mongodb: {uri: "mongodb://h"}
defaults: {aggregation: always, split_large_events: yes, snapshot: always}
watchers:
  - {name: a, database: d, collection: c, stream: s, on_oversized: s3}
  - {name: b, database: d, collection: c, stream: s, s3: {prefix: p, region: x}}
  - {name: c, database: d, collection: c, stream: s, snapshot: initial, start_at: {timestamp: "2024-01-01T00:00:00Z"}}
  - {name: e, database: d, collection: c, stream: s, snapshot_parallelism: 0}
  - {name: f, database: d, collection: c, stream: s, snapshot_parallelism: 17}
"#;
        let errs = parse(bad, &env).unwrap_err().0;
        for e in [
            "defaults.aggregation: `always` is not one of none, kpl",
            "defaults.split_large_events: `yes` is not one of auto, on, off",
            "defaults.snapshot: `always` is not one of never, initial",
            "watchers[2].snapshot: `initial` copies the collection as it is now",
            "watchers[0].s3: missing; `on_oversized: s3` needs",
            "watchers[1].s3.bucket: missing",
            "watchers[1].s3.region: unknown field",
            "watchers[3].snapshot_parallelism: must be between 1 and 16",
            "watchers[4].snapshot_parallelism: must be between 1 and 16",
        ] {
            assert!(
                errs.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
    }

    #[test]
    fn full_document_before_change_values_defaults_and_errors() {
        let text = r#"
mongodb: {uri: "mongodb://h"}
defaults: {stream: s, full_document_before_change: required}
watchers:
  - {name: a, database: d, collection: c}
  - {name: b, database: d, collection: c, full_document_before_change: whenAvailable}
  - {name: c, database: d, collection: c, full_document_before_change: off}
"#;
        let got: Vec<_> = parse(text, &env)
            .unwrap()
            .watchers
            .iter()
            .map(|w| w.full_document_before_change)
            .collect();
        assert_eq!(
            got,
            [
                FullDocumentBeforeChange::Required,
                FullDocumentBeforeChange::WhenAvailable,
                FullDocumentBeforeChange::Off,
            ]
        );
        let bad = r#"
mongodb: {uri: "mongodb://h"}
defaults: {full_document_before_change: always}
watchers:
  - {name: a, database: d, collection: c, stream: s, full_document_before_change: updateLookup}
"#;
        let errs = parse(bad, &env).unwrap_err().0;
        for e in [
            "defaults.full_document_before_change: `always` is not one of off, whenAvailable, required",
            "watchers[0].full_document_before_change: `updateLookup` is not one of off, whenAvailable, required",
        ] {
            assert!(
                errs.iter().any(|p| p.starts_with(e)),
                "missing {e:?} in {errs:#?}"
            );
        }
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand_str("a-${STREAM}-b", &env).unwrap(), "a-from-env-b");
        assert_eq!(expand_str("${NOPE:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(
            expand_str("$match ${STREAM}", &env).unwrap(),
            "$match from-env"
        );
        assert!(expand_str("${NOPE}", &env)
            .unwrap_err()
            .contains("`NOPE` is not set"));
        assert!(expand_str("${OPEN", &env).is_err());
        let errs = parse("mongodb: {uri: \"${NOPE}\"}\nwatchers: []", &env)
            .unwrap_err()
            .0;
        assert!(
            errs.iter()
                .any(|p| p.starts_with("mongodb.uri: environment variable `NOPE`")),
            "{errs:?}"
        );
    }

    #[test]
    fn uri_passwords_are_redacted() {
        assert_eq!(
            redact_uri("mongodb://u:secret@h1:1,h2:2/db?tls=true"),
            "mongodb://u:****@h1:1,h2:2/db?tls=true"
        );
        assert_eq!(
            redact_uri("mongodb://h:1/?directConnection=true"),
            "mongodb://h:1/?directConnection=true"
        );
        assert_eq!(redact_uri("mongodb+srv://u@h/"), "mongodb+srv://u@h/");
    }

    /// Each secret-bearing option is hidden by `redact_uri` and listed by `uri_secrets`.
    #[test]
    fn secret_uri_options_are_redacted() {
        for (uri, secret, shown) in [
            (
                "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=k3yp4ss&appName=a",
                "k3yp4ss",
                "mongodb://h/?tls=true&tlsCertificateKeyFilePassword=****&appName=a",
            ),
            (
                "mongodb://h/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:s3ss10n",
                "s3ss10n",
                "mongodb://h/?authMechanism=MONGODB-AWS&authMechanismProperties=****",
            ),
            (
                "mongodb://h/?authmechanismproperties=AWS_SESSION_TOKEN%3As3ss10n%2Fx",
                "s3ss10n",
                "mongodb://h/?authmechanismproperties=****",
            ),
            (
                "mongodb://h/?sslClientCertificateKeyPassword=k3y2;tls=true",
                "k3y2",
                "mongodb://h/?sslClientCertificateKeyPassword=****;tls=true",
            ),
            (
                "mongodb://h/?proxyHost=p&proxyPassword=pr0xy",
                "pr0xy",
                "mongodb://h/?proxyHost=p&proxyPassword=****",
            ),
            (
                "mongodb://u:hunter2@h1:1,h2:2/db?tls=true",
                "hunter2",
                "mongodb://u:****@h1:1,h2:2/db?tls=true",
            ),
        ] {
            assert_eq!(redact_uri(uri), shown);
            assert!(
                uri_secrets(uri).iter().any(|s| s.contains(secret)),
                "{uri}: {:?}",
                uri_secrets(uri)
            );
            assert!(!scrub(&format!("error near {uri}"), uri).contains(secret));
        }
        // The decoded session token, as the driver would quote it, is scrubbed too.
        let uri = "mongodb://h/?authMechanismProperties=AWS_SESSION_TOKEN%3As3ss10n%2Fx";
        assert_eq!(scrub("token s3ss10n/x", uri), "token ****");
    }

    /// `check-config` refuses what `run` refuses: the driver's own parser checks the URI.
    #[test]
    fn uris_are_checked_with_the_drivers_parser() {
        for (uri, expect) in [
            ("mongodb://h:notaport/", "port"),
            ("mongodb://h/?bogusOption=1", "bogusOption"),
            ("mongodb://h/?directConnection=maybe", "directConnection"),
            ("mongodb://h/?socketTimeoutMS=5", "socketTimeoutMS"),
            ("mongodb+srv://h.example.com/?bogusOption=1", "bogusOption"),
        ] {
            let text = format!(
                "mongodb: {{uri: \"{uri}\"}}\nwatchers: [{{name: a, database: d, collection: c, stream: s}}]"
            );
            let errs = parse(&text, &env).unwrap_err().0;
            assert!(
                errs.iter()
                    .any(|p| p.starts_with("mongodb.uri: ") && p.contains(expect)),
                "{uri}: {errs:?}"
            );
        }
        let errs = parse(
            "mongodb: {uri: \"mongodb://u:hunter2@h:x/?tlsCertificateKeyFilePassword=k3y\"}\nwatchers: []",
            &env,
        )
        .unwrap_err()
        .0;
        let text = errs.join("\n");
        assert!(!text.contains("hunter2") && !text.contains("k3y"), "{text}");
        // No DNS for srv URIs: a well-formed one passes without a lookup.
        for good in [
            "mongodb+srv://u:p@cluster0.example.com/?retryWrites=true",
            "mongodb://h1:1,h2:2/?replicaSet=rs0",
        ] {
            assert!(check_uri(good).is_ok(), "{good}: {:?}", check_uri(good));
        }
        let legacy = |name: &str| match name {
            "MONGODB_URI" => Some("mongodb://h/?directConnection=maybe".to_owned()),
            "MONGODB_DATABASE" | "MONGODB_COLLECTION" | "OUT_KINESIS_STREAM" => Some("x".into()),
            _ => None,
        };
        let errs = from_legacy_env(&legacy).unwrap_err().0;
        assert!(
            errs.iter().any(|p| p.starts_with("MONGODB_URI: ")),
            "{errs:?}"
        );
    }

    #[test]
    fn http_bounds_are_configurable() {
        let base = "mongodb: {uri: \"mongodb://h\"}\nwatchers: [{name: a, database: d, collection: c, stream: s}]\n";
        let c = parse(base, &env).unwrap();
        assert_eq!(c.http.serve, api::ServeOptions::default());
        let c = parse(
            &format!(
                "{base}http: {{max_connections: 32, header_read_timeout: 2s, idle_timeout: 5s}}"
            ),
            &env,
        )
        .unwrap();
        assert_eq!(c.http.serve.max_connections, 32);
        assert_eq!(c.http.serve.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.http.serve.idle_timeout, Duration::from_secs(5));
        let errs = parse(
            &format!("{base}http: {{max_connections: 0, header_read_timeout: 0s}}"),
            &env,
        )
        .unwrap_err()
        .0;
        assert!(
            errs.iter()
                .any(|p| p == "http.max_connections: must be at least 1"),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|p| p == "http.header_read_timeout: must be more than 0"),
            "{errs:?}"
        );
    }

    #[test]
    fn bad_yaml_and_wrong_shapes() {
        assert!(parse(":\n  - [", &env).is_err());
        let errs = parse("mongodb: 3\nwatchers: {}", &env).unwrap_err().0;
        assert!(
            errs.iter().any(|p| p == "mongodb: must be a mapping"),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|p| p == "watchers: must be a list"),
            "{errs:?}"
        );
    }
}
