//! The HTTP server: accepts connections on the control plane's listener, bounded in number and
//! in how long a connection may sit idle, and the process's file-descriptor budget it lives in.
//!
//! `axum::serve` has neither a header-read timeout nor a connection cap: a probe that opened
//! ~20,000 half-open connections used up the process's file descriptors, and then the Kinesis
//! and DynamoDB connects failed with EMFILE. Here every connection holds a permit of a
//! semaphore taken *before* `accept`, so at most [`ServeOptions::max_connections`] sockets are
//! ever open for HTTP; connections over the cap wait in the kernel's listen backlog (they hold
//! no descriptor of ours) and are accepted, in order, as slots free up. A client that sends no
//! complete request head within `header_read_timeout`, or moves no byte for `idle_timeout`
//! while no request of its is being handled, is closed, so a slot is never held for long.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::state::AppState;

/// Concurrent HTTP connections by default. The control plane's clients are a few probes, a
/// Prometheus scraper and an operator; 256 leaves them ample room while staying far below the
/// file-descriptor limit (raised to the hard limit at start, typically 65,536 or more in
/// containers; 1,024 at worst), so the pipeline's MongoDB, Kinesis and DynamoDB sockets always
/// find descriptors.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// How long a client may take to send a complete request head. hyper re-arms this timer while
/// a kept-alive connection waits for its next request, so it also closes idle keep-alives.
/// 10 s is long for a probe or a scraper on a network, short for a slowloris.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may move no byte while none of its requests is being handled (a
/// client that stopped reading its response). A request being handled is bounded by the
/// request timeout instead, so a long rewind is never cut.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Descriptors kept free for the pipeline when the HTTP cap is checked against the process's
/// limit: a MongoDB pool and monitors, Kinesis and DynamoDB connection pools, log files.
pub const RESERVED_FDS: u64 = 512;

/// How the server bounds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeOptions {
    /// Connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// See [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Serves the API on `listener` with the default [`ServeOptions`] until `shutdown` is
/// cancelled, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(listener, state, shutdown, ServeOptions::default()).await
}

/// Serves the API on `listener`, bounded by `options`, until `shutdown` is cancelled; then
/// accepts nothing more, asks every connection to close after its current request and waits
/// for them.
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    options: ServeOptions,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            max_connections = options.max_connections,
            header_read_timeout = ?options.header_read_timeout,
            idle_timeout = ?options.idle_timeout,
            "HTTP API listening"
        );
    }
    let router = crate::router(state);
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let connections = TaskTracker::new();
    loop {
        // The permit first: over the cap, connections stay in the kernel's backlog instead of
        // taking a descriptor each.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break, // never closed; nothing left to serve with if it were
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning; the permit goes back.
                    tracing::warn!(error = %e, "accept error");
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            serve_connection(stream, router, shutdown, options).await;
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    shutdown: CancellationToken,
    options: ServeOptions,
) {
    let _ = stream.set_nodelay(true);
    let activity = Activity::new();
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let router = router.clone();
            let busy = activity.begin_request();
            async move {
                let response = router.oneshot(request).await;
                drop(busy);
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true);
    let mut connection = pin!(builder.serve_connection(io, service));
    let mut closing = false;
    loop {
        let idle_left = options.idle_timeout.saturating_sub(activity.idle_for());
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    // Header timeouts and clients that hang up land here: routine.
                    tracing::debug!(error = %e, "HTTP connection ended");
                }
                return;
            }
            _ = shutdown.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(idle_left) => {
                if activity.idle_for() >= options.idle_timeout {
                    tracing::debug!(idle_timeout = ?options.idle_timeout, "closing an idle HTTP connection");
                    return;
                }
            }
        }
    }
}

/// When a connection last moved a byte, and whether a request of it is being handled.
#[derive(Clone)]
struct Activity(Arc<ActivityInner>);

struct ActivityInner {
    start: Instant,
    last_millis: AtomicU64,
    requests: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self(Arc::new(ActivityInner {
            start: Instant::now(),
            last_millis: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
        }))
    }

    fn touch(&self) {
        let millis = self.0.start.elapsed().as_millis() as u64;
        self.0.last_millis.store(millis, Ordering::Relaxed);
    }

    /// Zero while a request is being handled.
    fn idle_for(&self) -> Duration {
        if self.0.requests.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let now = self.0.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.0.last_millis.load(Ordering::Relaxed)))
    }

    fn begin_request(&self) -> RequestGuard {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }
}

struct RequestGuard(Activity);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0 .0.requests.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A socket that records when it last moved a byte.
struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let result = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The process's open-file limit after [`raise_fd_limit`]: `soft` is what applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as servers like nginx and Go's runtime do:
/// the soft limit is often 1,024 while the hard one allows far more, and every HTTP
/// connection, MongoDB connection and AWS connection takes a descriptor. Returns the limit in
/// force afterwards.
#[cfg(unix)]
pub fn raise_fd_limit() -> std::io::Result<FdLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own and pass by a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass by a valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
        // On failure (e.g. a sandbox refusing it) the old soft limit stays; the caller checks
        // the HTTP cap against what is returned.
    }
    // rlim_t is u64 on Linux but not on every unix.
    #[allow(clippy::unnecessary_cast)]
    Ok(FdLimit {
        soft: limit.rlim_cur as u64,
        hard: limit.rlim_max as u64,
    })
}

/// Whether `max_connections` leaves [`RESERVED_FDS`] descriptors for the pipeline under
/// `limit`.
pub fn cap_fits(max_connections: usize, limit: FdLimit) -> bool {
    (max_connections as u64).saturating_add(RESERVED_FDS) <= limit.soft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_cap_fits_a_small_limit() {
        let small = FdLimit {
            soft: 1024,
            hard: 1024,
        };
        assert!(cap_fits(DEFAULT_MAX_CONNECTIONS, small));
        assert!(!cap_fits(900, small));
    }

    #[cfg(unix)]
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_fd_limit; lowering the soft limit of this test process first
        // makes the raise observable even where soft already equals hard.
        unsafe {
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
            let lowered = libc::rlimit {
                rlim_cur: limit.rlim_cur.min(256),
                rlim_max: limit.rlim_max,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lowered), 0);
        }
        let raised = raise_fd_limit().expect("getrlimit");
        #[allow(clippy::unnecessary_cast)]
        let hard = limit.rlim_max as u64;
        assert_eq!(raised.hard, hard);
        assert_eq!(raised.soft, raised.hard);
    }
}
