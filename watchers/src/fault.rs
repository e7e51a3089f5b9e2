//! Faults the end-to-end tests inject into a running process (tests/supervision.rs): today one,
//! a panic inside a watcher's life, to prove the supervisor survives it.
//!
//! Why a cargo feature and an environment variable, rather than a hidden environment variable
//! alone: a variable that is always compiled in is one copied environment (a test's, a
//! colleague's shell) away from crashing a production watcher, and nothing in a deployment
//! would show it is there. Without the `fault-injection` feature this module compiles to a
//! future that never resolves, so no setting of any kind can arm it. The feature is enabled
//! only by the root package's dev-dependency on this crate, which cargo applies to builds that
//! compile tests, benches or examples: `cargo test` runs a binary with the hook, the production
//! build (`cargo build --release -p mongo-watcher`, the Dockerfile) has none. Even in a test
//! build the hook does nothing unless [`PANIC_FILE_ENV`] is set, and it says so in the log.

use std::convert::Infallible;

/// Names a file; the watcher named by the file's content panics once the file appears (the
/// watcher removes it first, so it panics once). Read only with the `fault-injection` feature.
pub const PANIC_FILE_ENV: &str = "MONGO_WATCHER_TEST_PANIC_FILE";

/// Never resolves; with the `fault-injection` feature and [`PANIC_FILE_ENV`] set, panics when a
/// test asks for it. The supervisor polls it beside each life of `watcher`, so the panic
/// happens inside the life, as a bug in the pipeline would.
pub async fn injected_panic(watcher: &str) -> Infallible {
    #[cfg(feature = "fault-injection")]
    if let Some(path) = armed::panic_file() {
        return armed::panic_when_asked(watcher, path).await;
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = watcher;
    std::future::pending().await
}

#[cfg(feature = "fault-injection")]
mod armed {
    use std::convert::Infallible;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::time::Duration;

    use super::PANIC_FILE_ENV;

    /// How often the trigger file is looked for.
    const POLL: Duration = Duration::from_millis(50);

    /// The trigger file, read from the environment once per process.
    pub(super) fn panic_file() -> Option<&'static Path> {
        static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
        FILE.get_or_init(|| {
            let path = std::env::var_os(PANIC_FILE_ENV).map(PathBuf::from)?;
            tracing::warn!(
                file = %path.display(),
                "fault injection armed ({PANIC_FILE_ENV}): a watcher panics when this file \
                 names it; test builds only"
            );
            Some(path)
        })
        .as_deref()
    }

    /// Panics once the file names `watcher`; never returns.
    pub(super) async fn panic_when_asked(watcher: &str, path: &Path) -> Infallible {
        loop {
            tokio::time::sleep(POLL).await;
            let Ok(named) = std::fs::read_to_string(path) else {
                continue;
            };
            // Removing first makes the panic happen once: the next life finds no file.
            if named.trim() == watcher && std::fs::remove_file(path).is_ok() {
                panic!("injected panic for watcher `{watcher}` ({PANIC_FILE_ENV})");
            }
        }
    }
}
