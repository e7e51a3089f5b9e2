//! Logs: JSON lines by default (`LOG_FORMAT=text` for people); level from `RUST_LOG`, else
//! `LOG_LEVEL` (the old tool's variable, any case), else `info`. Lines inside a watcher carry
//! its name through the `watcher` span.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Quiet the chatty dependencies unless `RUST_LOG` says otherwise.
const DEPENDENCIES: &str = "aws_config=warn,aws_smithy_runtime=warn,aws_smithy_runtime_api=warn,\
aws_sdk_kinesis=warn,aws_sdk_dynamodb=warn,aws_sdk_ssm=warn,aws_sdk_s3=warn,hyper=warn,hyper_util=warn,h2=warn,\
rustls=warn,mongodb=warn,hickory_proto=warn,hickory_resolver=warn";

pub fn init() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::new(spec),
        _ => {
            let level = std::env::var("LOG_LEVEL")
                .ok()
                .map(|l| match l.to_ascii_lowercase().as_str() {
                    "warning" => "warn".to_owned(),
                    "critical" | "fatal" => "error".to_owned(),
                    other => other.to_owned(),
                })
                .filter(|l| ["trace", "debug", "info", "warn", "error"].contains(&l.as_str()))
                .unwrap_or_else(|| "info".to_owned());
            EnvFilter::new(format!("{level},{DEPENDENCIES}"))
        }
    };
    let text = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("text"));
    // Colours only for a terminal: log files and collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if text {
        builder.init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    }
}
