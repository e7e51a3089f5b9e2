//! mongo-watcher: MongoDB change streams into AWS Kinesis, checkpointed in DynamoDB.
//!
//! `main` reads the config, builds the clients, starts one supervised task per watcher and
//! waits for SIGTERM/SIGINT; everything else lives in the `watchers` crate.

mod config;
mod logging;
mod supervisor;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use watchers::checkpoint::CheckpointStore;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match config::load(&config) {
            Ok(cfg) => {
                print_config(&cfg);
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

fn print_config(cfg: &Config) {
    println!("mongodb: {}", redact_uri(&cfg.mongodb.uri));
    match &cfg.checkpoints {
        Some(c) => println!("checkpoints: table {}", c.table),
        None => println!("checkpoints: none (every start is a first start)"),
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
             batch {} records/{} bytes/linger {:?}, max_in_flight {}, max_pending {} records/{} \
             bytes, checkpoint every {:?}, max_put_retries {})",
            w.name,
            w.database,
            w.collection,
            w.stream,
            w.partition_key,
            w.full_document,
            w.start_at,
            w.batch.max_records,
            w.batch.max_bytes,
            w.batch.linger,
            w.batch.max_in_flight,
            w.batch.max_pending,
            w.batch.max_pending_bytes,
            w.checkpoint_interval,
            w.batch
                .max_put_retries
                .map_or_else(|| "unlimited".to_owned(), |n| n.to_string()),
        );
    }
}

async fn run(cfg: Config) -> anyhow::Result<supervisor::Shutdown> {
    check_fd_limit(cfg.http.serve.max_connections);
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));

    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await;
    let password = match (&cfg.mongodb.password, &cfg.mongodb.password_ssm_parameter) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(name)) => {
            let ssm = aws_sdk_ssm::Client::new(&aws);
            match fetch_ssm_secret(&ssm, name, "mongodb.password_ssm_parameter", &shutdown).await {
                Some(p) => Some(p),
                None => return Ok(supervisor::Shutdown::Clean),
            }
        }
        (None, None) => None,
    };
    let mongo = mongo_client(&cfg, password, cfg.watchers.len()).await?;
    let registry = api::registry_with_process_metrics().context("cannot register the metrics")?;
    let metrics =
        watchers::metrics::Metrics::register(&registry).context("cannot register the metrics")?;
    let deps = watchers::Deps {
        memory: watchers::flow::ByteBudget::new(cfg.limits.max_pending_bytes),
        metrics: metrics.clone(),
        mongo,
        kinesis: aws_sdk_kinesis::Client::new(&aws),
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
            match fetch_ssm_secret(&ssm, name, "http.api_token_ssm_parameter", &shutdown).await {
                Some(token) => Some(token),
                None => return Ok(supervisor::Shutdown::Clean),
            }
        }
        (None, None) => {
            warn!(
                "no API token (MONGO_WATCHER_API_TOKEN or http.api_token_ssm_parameter): \
                 pause, resume and rewind are disabled"
            );
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("http.listen: cannot listen on {}", cfg.http.listen))?;

    info!(watchers = cfg.watchers.len(), "starting");
    let supervisor = supervisor::Supervisor::start(cfg.watchers, deps, &shutdown);
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
) -> anyhow::Result<mongodb::Client> {
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
    // Each open change stream holds a connection while its getMore waits; a pool smaller than
    // the watcher count makes streams queue for connections. benches/ measures the start-up
    // of 1, 10 and 40 watchers with this sizing.
    options.max_pool_size = Some((watchers as u32).saturating_add(8).max(10));
    mongodb::Client::with_options(options)
        .map_err(|e| anyhow::anyhow!(redact(e.to_string())))
        .context("cannot build the MongoDB client")
}

/// Reads a secret from SSM with decryption, retrying until it works or shutdown. Errors name
/// the parameter and the setting it comes from, never the value.
async fn fetch_ssm_secret(
    ssm: &aws_sdk_ssm::Client,
    name: &str,
    setting: &str,
    shutdown: &CancellationToken,
) -> Option<String> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let result = ssm
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await;
        let problem = match result {
            Ok(out) => match out.parameter().and_then(|p| p.value()) {
                Some(v) => return Some(v.to_owned()),
                None => format!("SSM parameter `{name}` has no value"),
            },
            Err(e) => {
                use aws_sdk_ssm::error::ProvideErrorMetadata;
                match e.code() {
                    Some("ParameterNotFound") => {
                        format!("SSM parameter `{name}` ({setting}) does not exist")
                    }
                    Some(code) => format!("SSM parameter `{name}`: {code}"),
                    None => format!(
                        "SSM parameter `{name}`: {}",
                        aws_sdk_ssm::error::DisplayErrorContext(&e)
                    ),
                }
            }
        };
        let delay = backoff.next_delay();
        error!(error = %problem, retry_in = ?delay, setting, "cannot read a secret from SSM");
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
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
