//! mongo-watcher: MongoDB change streams into AWS Kinesis, checkpointed in DynamoDB.
//!
//! `main` reads the config, builds the clients, starts one supervised task per watcher and
//! waits for SIGTERM/SIGINT; everything else lives in the `watchers` crate.

mod config;
mod healthcheck;
mod leases;
mod logging;
mod migrate;
mod supervisor;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use watchers::checkpoint::CheckpointStore;
use watchers::error::{aws_refusal, AwsResource, MongoLogin};
use watchers::retry::Backoff;

use crate::config::{redact_uri, Config};

/// How long shutdown may take before the process exits anyway (ECS and Kubernetes give 30 s).
/// Each watcher stops sending after `watchers::pipeline::DRAIN_TIMEOUT` (15 s) and then writes
/// its final checkpoint.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(18);
/// Exit status of a shutdown that left records unsent or watchers running at the deadline.
const EXIT_UNCLEAN_SHUTDOWN: u8 = 3;

#[derive(Parser)]
#[command(
    name = "mongo-watcher",
    version,
    about = "MongoDB change streams into AWS Kinesis"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the watchers until SIGTERM or SIGINT. Without a config file and with the old
    /// tool's environment (MONGODB_URI, ...), runs one watcher in drop-in mode.
    Run {
        /// Config file (YAML).
        #[arg(long, env = "MONGO_WATCHER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a config file: print the resolved watchers (exit 0) or every problem (exit 2).
    CheckConfig {
        #[arg(long, env = "MONGO_WATCHER_CONFIG")]
        config: PathBuf,
    },
    /// Probe a running mongo-watcher's GET /healthz: exit 0 on 200, else exit 1 with the reason
    /// on stderr. For container health checks (the image has no shell or curl).
    Healthcheck {
        /// The URL to probe (plain http). Default: from `--config`, else
        /// http://127.0.0.1:8080/healthz.
        #[arg(long, conflicts_with = "config")]
        url: Option<String>,
        /// Config file whose `http.listen` names the address (0.0.0.0 and :: are probed on
        /// loopback).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Give up after this long: connect, request and answer together.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Create or update the DynamoDB tables of migrations/ (the config's checkpoints.table
    /// and leases.table; without a config, both under their default names) and wait until
    /// they are ACTIVE. Idempotent.
    #[command(args_conflicts_with_subcommands = true)]
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateAction>,
        /// Config file (YAML) naming the tables: checkpoints.table and leases.table.
        #[arg(long, env = "MONGO_WATCHER_CONFIG")]
        config: Option<PathBuf>,
        /// Print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for each table to become ACTIVE.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Subcommand)]
enum MigrateAction {
    /// Copy the old tool's marker (the item `collectionName` = COLLECTION of TABLE) into the
    /// checkpoint of WATCHER in the config's checkpoints.table. Refuses to replace an existing
    /// checkpoint without --force.
    ImportMarker {
        /// Config file (YAML) with the watcher and its checkpoints.table.
        #[arg(long, env = "MONGO_WATCHER_CONFIG")]
        config: PathBuf,
        /// The old tool's marker table (its DYNAMODB_TABLE_NAME).
        #[arg(long)]
        table: String,
        /// `database.collection` of the marker.
        #[arg(long)]
        collection: String,
        /// The config's watcher of that collection.
        #[arg(long)]
        watcher: String,
        /// Replace the watcher's existing checkpoint.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Healthcheck {
            url,
            config,
            timeout,
        } => {
            let url = match (url, config) {
                (Some(url), _) => url,
                (None, Some(path)) => match config::load(&path) {
                    Ok(cfg) => healthcheck::healthz_url(cfg.http.listen),
                    Err(errors) => {
                        eprint!("healthcheck: {errors}");
                        return ExitCode::FAILURE;
                    }
                },
                (None, None) => healthcheck::DEFAULT_URL.to_owned(),
            };
            match healthcheck::probe(&url, timeout) {
                Ok(()) => ExitCode::SUCCESS,
                Err(problem) => {
                    eprintln!("healthcheck: {url}: {problem}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate {
            action,
            config,
            dry_run,
            timeout,
        } => run_migrate(action, config, dry_run, timeout),
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(cfg) => {
                print_config(&cfg);
                for warning in config::warnings(&cfg) {
                    eprintln!("warning: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprint!("{errors}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let env = |name: &str| std::env::var(name).ok();
            let loaded = match &config {
                Some(path) => config::load(path),
                None if env("MONGODB_URI").is_some() => config::from_legacy_env(&env),
                None => Err(config::ConfigErrors(vec![
                    "no configuration: pass --config PATH or set MONGO_WATCHER_CONFIG \
                     (or the old tool's MONGODB_URI, MONGODB_DATABASE, MONGODB_COLLECTION and \
                     OUT_KINESIS_STREAM for drop-in mode)"
                        .into(),
                ])),
            };
            let drop_in = config.is_none();
            let cfg = match loaded {
                Ok(cfg) => cfg,
                Err(errors) => {
                    eprint!("{errors}");
                    return ExitCode::from(2);
                }
            };
            logging::init();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            if drop_in {
                info!(
                    watcher = %cfg.watchers[0].name,
                    marker_table = ?cfg.checkpoints.as_ref().map(|c| &c.table),
                    "drop-in mode: the old tool's environment, marker and record format"
                );
            }
            match runtime.block_on(run(cfg)) {
                Ok(supervisor::Shutdown::Clean) => ExitCode::SUCCESS,
                Ok(supervisor::Shutdown::Incomplete { unsent, running }) => {
                    error!(
                        unsent,
                        ?running,
                        exit_code = EXIT_UNCLEAN_SHUTDOWN,
                        "shutdown was not clean: records past the checkpoints were not sent \
                         and are read again at the next start"
                    );
                    ExitCode::from(EXIT_UNCLEAN_SHUTDOWN)
                }
                Err(e) => {
                    error!(error = format!("{e:#}"), "mongo-watcher stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `migrate` and `migrate import-marker`: exit 0 done, 1 failed, 2 invalid configuration.
fn run_migrate(
    action: Option<MigrateAction>,
    config: Option<PathBuf>,
    dry_run: bool,
    timeout: Duration,
) -> ExitCode {
    let load = |path: &std::path::Path| {
        config::load(path).map_err(|errors| {
            eprint!("{errors}");
            ExitCode::from(2)
        })
    };
    let job = match action {
        Some(MigrateAction::ImportMarker {
            config,
            table,
            collection,
            watcher,
            force,
        }) => match load(&config) {
            Ok(cfg) => MigrateJob::Import(
                cfg,
                migrate::ImportMarker {
                    table,
                    collection,
                    watcher,
                    force,
                },
            ),
            Err(code) => return code,
        },
        None => match config.as_deref().map(load).transpose() {
            Ok(cfg) => MigrateJob::Tables(cfg),
            Err(code) => return code,
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("migrate: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let client = aws_sdk_dynamodb::Client::new(&migrate::aws().await);
        match job {
            MigrateJob::Import(cfg, args) => {
                println!("{}", migrate::import_marker(&client, &cfg, &args).await?);
                Ok(())
            }
            MigrateJob::Tables(cfg) => {
                let targets = migrate::targets(cfg.as_ref())?;
                migrate::migrate(&client, &targets, dry_run, timeout).await
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum MigrateJob {
    Tables(Option<Config>),
    Import(Config, migrate::ImportMarker),
}

fn print_config(cfg: &Config) {
    println!("mongodb: {}", redact_uri(&cfg.mongodb.uri));
    match &cfg.checkpoints {
        Some(c) => println!("checkpoints: table {}", c.table),
        None => println!("checkpoints: none (every start is a first start)"),
    }
    if let Some(l) = &cfg.leases {
        println!(
            "leases: table {}, ttl {:?} (each watcher runs on one replica at a time)",
            l.table, l.ttl
        );
    }
    println!(
        "http: {} (max_connections {}, header_read_timeout {:?}, idle_timeout {:?})",
        cfg.http.listen,
        cfg.http.serve.max_connections,
        cfg.http.serve.header_read_timeout,
        cfg.http.serve.idle_timeout
    );
    println!(
        "limits: max_pending_bytes {} (all watchers together)",
        cfg.limits.max_pending_bytes
    );
    println!("watchers ({}):", cfg.watchers.len());
    for w in &cfg.watchers {
        println!(
            "  {}: {}.{} -> kinesis {} (partition_key {}, full_document {:?}, start_at {:?}, \
             batch {} records/{}/linger {:?}, max_in_flight {}, max_pending {} records/{} \
             bytes, checkpoint every {:?}, max_put_retries {})",
            w.name,
            w.database,
            w.collection,
            w.stream,
            w.partition_key,
            w.full_document,
            w.start_at,
            w.batch.max_records,
            w.batch.max_bytes.map_or_else(
                || "stream's call limit".to_owned(),
                |n| format!("{n} bytes")
            ),
            w.batch.linger,
            w.batch.max_in_flight,
            w.batch.max_pending,
            w.batch.max_pending_bytes,
            w.checkpoint_interval,
            w.batch
                .max_put_retries
                .map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
        );
        if let (watchers::spec::OnOversized::S3, Some(s3)) = (w.on_oversized, &w.s3) {
            println!(
                "    oversized events -> s3://{}/{}{}/ (pointer records in the stream)",
                s3.bucket, s3.prefix, w.name
            );
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<supervisor::Shutdown> {
    check_fd_limit(cfg.http.serve.max_connections);
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));

    let aws = migrate::aws().await;
    let password = match (&cfg.mongodb.password, &cfg.mongodb.password_ssm_parameter) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(name)) => {
            let ssm = aws_sdk_ssm::Client::new(&aws);
            match fetch_ssm_secret(&ssm, name, "mongodb.password_ssm_parameter", &shutdown).await? {
                Some(p) => Some(p),
                None => return Ok(supervisor::Shutdown::Clean),
            }
        }
        (None, None) => None,
    };
    let (mongo, mongo_login) = mongo_client(&cfg, password, cfg.watchers.len()).await?;
    let registry = api::registry_with_process_metrics().context("cannot register the metrics")?;
    let metrics =
        watchers::metrics::Metrics::register(&registry).context("cannot register the metrics")?;
    let deps = watchers::Deps {
        memory: watchers::flow::ByteBudget::new(cfg.limits.max_pending_bytes),
        metrics: metrics.clone(),
        mongo,
        mongo_login,
        kinesis: aws_sdk_kinesis::Client::new(&aws),
        stream_limits: watchers::stream_limits::StreamLimitsCache::new(),
        // Under an endpoint override (`AWS_ENDPOINT_URL`: moto, an S3-compatible store) the
        // bucket goes in the path, as a virtual-hosted bucket name would need DNS there; AWS
        // itself keeps its default (virtual-hosted) addressing.
        s3: cfg
            .watchers
            .iter()
            .any(|w| w.on_oversized == watchers::spec::OnOversized::S3)
            .then(|| {
                aws_sdk_s3::Client::from_conf(
                    aws_sdk_s3::config::Builder::from(&aws)
                        .force_path_style(aws.endpoint_url().is_some())
                        .build(),
                )
            }),
        checkpoints: cfg.checkpoints.as_ref().map(|c| {
            CheckpointStore::with_layout(
                aws_sdk_dynamodb::Client::new(&aws),
                c.table.clone(),
                c.layout.clone(),
            )
        }),
    };
    if deps.checkpoints.is_none() {
        warn!("no checkpoint table configured: every start begins at `start_at`");
    }
    let api_token = match (
        std::env::var("MONGO_WATCHER_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
        &cfg.http.api_token_ssm_parameter,
    ) {
        (Some(token), _) => Some(token),
        (None, Some(name)) => {
            let ssm = aws_sdk_ssm::Client::new(&aws);
            match fetch_ssm_secret(&ssm, name, "http.api_token_ssm_parameter", &shutdown).await? {
                Some(token) => Some(token),
                None => return Ok(supervisor::Shutdown::Clean),
            }
        }
        (None, None) => {
            warn!(
                "no API token (MONGO_WATCHER_API_TOKEN or http.api_token_ssm_parameter): \
                 pause, resume, rewind and snapshot are disabled"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("http.listen: cannot listen on {}", cfg.http.listen))?;

    for warning in config::warnings(&cfg) {
        warn!("{warning}");
    }
    info!(watchers = cfg.watchers.len(), "starting");
    let (leases, links) = match &cfg.leases {
        Some(l) => {
            let store = watchers::lease::LeaseStore::new(
                aws_sdk_dynamodb::Client::new(&aws),
                l.table.clone(),
            );
            if let Err(e) = store.verify_table().await {
                anyhow::bail!("leases.table: {e}");
            }
            let names: Vec<String> = cfg.watchers.iter().map(|w| w.name.clone()).collect();
            let (running, links, replica) = leases::start(store, l.ttl, &names, &shutdown);
            info!(%replica, table = %l.table, ttl = ?l.ttl, "leases on: each watcher runs on one replica at a time");
            (Some(running), links)
        }
        None => (None, std::collections::HashMap::new()),
    };
    let supervisor = supervisor::Supervisor::start(cfg.watchers, deps, &shutdown, links);
    let liveness = api::Liveness::new();
    tokio::spawn(supervisor::heartbeat(liveness.clone()));
    let state = api::AppState::new(supervisor.handles().to_vec(), registry, metrics, liveness)
        .context("cannot build the HTTP API state")?
        .with_api_token(api_token)
        .context("API token")?;
    // The API outlives the watchers' drain, so /readyz and /watchers show the shutdown.
    let http_shutdown = CancellationToken::new();
    let http = tokio::spawn(api::serve_with(
        listener,
        state,
        http_shutdown.clone(),
        cfg.http.serve,
    ));

    shutdown.cancelled().await;
    info!("shutting down: draining watchers");
    let outcome = supervisor.wait(SHUTDOWN_DEADLINE).await;
    if outcome == supervisor::Shutdown::Clean {
        info!("all watchers stopped");
    }
    if let Some(leases) = leases {
        // After the final checkpoints: released leases are taken by the other replicas at
        // their next tick, without waiting out the ttl.
        leases.stop.cancel();
        if tokio::time::timeout(Duration::from_secs(5), leases.task)
            .await
            .is_err()
        {
            warn!("leases were not all released within 5 s; they expire after their ttl");
        }
    }
    http_shutdown.cancel();
    match tokio::time::timeout(Duration::from_secs(2), http).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "HTTP server ended with an error"),
        Err(_) => warn!("HTTP server did not stop within 2 s"),
        _ => {}
    }
    Ok(outcome)
}

/// Raises the open-file limit to its hard maximum and warns when the HTTP connection cap would
/// not leave the pipeline room: MongoDB, Kinesis and DynamoDB connects failing with EMFILE
/// stall delivery, which is worse than refusing HTTP clients.
fn check_fd_limit(max_connections: usize) {
    match api::raise_fd_limit() {
        Ok(limit) => {
            info!(soft = limit.soft, hard = limit.hard, "open file limit");
            if !api::cap_fits(max_connections, limit) {
                warn!(
                    max_connections,
                    open_file_limit = limit.soft,
                    reserved = api::RESERVED_FDS,
                    "http.max_connections leaves fewer than {} descriptors for MongoDB and AWS \
                     connections; lower it or raise the open file limit (ulimit -n)",
                    api::RESERVED_FDS
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot read the open file limit"),
    }
}

async fn mongo_client(
    cfg: &Config,
    password: Option<String>,
    watchers: usize,
) -> anyhow::Result<(mongodb::Client, MongoLogin)> {
    // The whole URI first, then its password and secret options one by one, in case the
    // driver quotes a piece of it.
    let mut secrets: Vec<String> = vec![cfg.mongodb.uri.clone()];
    secrets.extend(password.iter().cloned());
    secrets.extend(config::uri_secrets(&cfg.mongodb.uri));
    let redact = |text: String| {
        secrets
            .iter()
            .filter(|s| !s.is_empty())
            .fold(text, |t, s| t.replace(s.as_str(), "****"))
    };
    let mut options = mongodb::options::ClientOptions::parse(&cfg.mongodb.uri)
        .await
        .map_err(|e| anyhow::anyhow!(redact(e.to_string())))
        .with_context(|| {
            format!(
                "mongodb.uri `{}` is not usable",
                redact_uri(&cfg.mongodb.uri)
            )
        })?;
    if cfg.mongodb.username.is_some() || password.is_some() {
        let mut credential = options.credential.take().unwrap_or_default();
        if let Some(user) = &cfg.mongodb.username {
            credential.username = Some(user.clone());
        }
        if password.is_some() {
            credential.password = password;
        }
        options.credential = Some(credential);
    }
    options.app_name = Some("mongo-watcher".into());
    let login = MongoLogin {
        user: options.credential.as_ref().and_then(|c| c.username.clone()),
        hosts: options
            .hosts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    };
    // Each open change stream holds a connection while its getMore waits; a pool smaller than
    // the watcher count makes streams queue for connections. benches/ measures the start-up
    // of 1, 10 and 40 watchers with this sizing.
    options.max_pool_size = Some((watchers as u32).saturating_add(8).max(10));
    let client = mongodb::Client::with_options(options)
        .map_err(|e| anyhow::anyhow!(redact(e.to_string())))
        .context("cannot build the MongoDB client")?;
    Ok((client, login))
}

/// Reads a secret from SSM with decryption. Errors name the parameter and the setting it comes
/// from, never the value.
///
/// The watchers cannot start without their secrets, and nothing else runs yet (not even the
/// HTTP API). So a refusal only a fix from outside can end (the parameter does not exist or has
/// no value, access is denied, its KMS key is unusable) is returned as an error and the process
/// exits 1, naming the parameter and what to do, as ECS fails a task whose own `secrets` cannot
/// be read: the orchestrator restarts it with its backoff, and the first start after the fix
/// runs. Transient failures (throttling, the network, 5xx; the SDK's own retries spent) are
/// retried here with a capped backoff; `None` at shutdown.
async fn fetch_ssm_secret(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    setting: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<String>> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let result = ssm
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await;
        let failure = match result {
            Ok(out) => match out.parameter().and_then(|p| p.value()) {
                Some(v) => return Ok(Some(v.to_owned())),
                None => ssm_failure(name, setting, Some("NoValue"), None),
            },
            Err(e) => {
                use aws_sdk_ssm::error::ProvideErrorMetadata;
                let detail = aws_sdk_ssm::error::DisplayErrorContext(&e).to_string();
                ssm_failure(
                    name,
                    setting,
                    e.code(),
                    Some(e.message().unwrap_or(&detail)),
                )
            }
        };
        let problem = match failure {
            SsmFailure::Refused(problem) => {
                anyhow::bail!("{problem}; mongo-watcher cannot start without it (exit 1)")
            }
            SsmFailure::Transient(problem) => problem,
        };
        let delay = backoff.next_delay();
        error!(error = %problem, retry_in = ?delay, setting, "cannot read a secret from SSM");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// What a failed SSM read means, in words naming the parameter and what to do.
#[derive(Debug, PartialEq, Eq)]
enum SsmFailure {
    /// Only a fix from outside ends it: the process exits.
    Refused(String),
    /// May pass by itself: retried with backoff.
    Transient(String),
}

/// Classifies a failed `GetParameter` of `name` by its AWS error `code` (`NoValue`: answered
/// without a value).
fn ssm_failure(name: &str, setting: &str, code: Option<&str>, message: Option<&str>) -> SsmFailure {
    let parameter = AwsResource::SsmParameter(name.to_owned());
    if let Some(refusal) = aws_refusal(parameter, "GetParameter", code, message) {
        return SsmFailure::Refused(format!("{setting}: {refusal}"));
    }
    let said = message.map(|m| format!(": {m}")).unwrap_or_default();
    match code {
        Some("ParameterNotFound" | "ParameterVersionNotFound") => SsmFailure::Refused(format!(
            "{setting}: SSM parameter `{name}` does not exist in this account and region; create \
             it (SecureString) or correct {setting}"
        )),
        Some("NoValue") => SsmFailure::Refused(format!(
            "{setting}: SSM parameter `{name}` has no value; give it one"
        )),
        Some("InvalidKeyId") => SsmFailure::Refused(format!(
            "{setting}: the KMS key of SSM parameter `{name}` cannot be used{said}; grant \
             `kms:Decrypt` on it to the task role, or re-encrypt the parameter with a usable key"
        )),
        Some(code) => SsmFailure::Transient(format!("SSM parameter `{name}`: {code}{said}")),
        None => SsmFailure::Transient(format!("SSM parameter `{name}`{said}")),
    }
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutdown requested"),
        _ = tokio::signal::ctrl_c() => info!(signal = "SIGINT", "shutdown requested"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTING: &str = "mongodb.password_ssm_parameter";

    fn refused(code: &str) -> String {
        match ssm_failure("/prod/pw", SETTING, Some(code), Some("said so")) {
            SsmFailure::Refused(text) => text,
            other => panic!("{code}: {other:?}"),
        }
    }

    #[test]
    fn ssm_refusals_end_the_start_naming_the_parameter_and_what_to_do() {
        let denied = refused("AccessDeniedException");
        assert!(
            denied.starts_with(
                "mongodb.password_ssm_parameter: access denied: grant `ssm:GetParameter` on SSM \
                 parameter `/prod/pw` to the task role"
            ),
            "{denied}"
        );
        let missing = refused("ParameterNotFound");
        assert!(
            missing.contains("SSM parameter `/prod/pw` does not exist")
                && missing.contains("create it"),
            "{missing}"
        );
        assert!(refused("NoValue").contains("has no value"));
        assert!(refused("InvalidKeyId").contains("kms:Decrypt"));
        for code in [
            Some("ThrottlingException"),
            Some("InternalServerError"),
            None,
        ] {
            assert!(
                matches!(
                    ssm_failure("/prod/pw", SETTING, code, Some("timeout")),
                    SsmFailure::Transient(ref t) if t.contains("/prod/pw")
                ),
                "{code:?} is retried"
            );
        }
    }
}
