//! `api::serve` on a real socket: answers, then stops when the token is cancelled.

use std::time::Duration;

use api::{AppState, Liveness};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use watchers::metrics::Metrics;

async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("write request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read response");
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn serves_until_cancelled() {
    let registry = api::registry_with_process_metrics().expect("registry");
    let metrics = Metrics::register(&registry).expect("metrics");
    let state = AppState::new(Vec::new(), registry, metrics, Liveness::new())
        .expect("state")
        .with_api_token(Some("t".into()))
        .expect("token");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api::serve(listener, state, shutdown.clone()));

    let health = raw_request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with(r#"{"status":"ok"}"#), "{health}");

    // A body announced as too large is refused as JSON before it is read.
    let big = raw_request(
        addr,
        "POST /watchers/x/rewind HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Authorization: Bearer t\r\nContent-Type: application/json\r\n\
         Content-Length: 20000\r\n\r\n{",
    )
    .await;
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    assert!(big.contains(r#""error""#), "{big}");

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve stops after cancellation")
        .expect("task");
    stopped.expect("serve returns Ok");
}

fn state() -> AppState {
    let registry = api::registry_with_process_metrics().expect("registry");
    let metrics = Metrics::register(&registry).expect("metrics");
    AppState::new(Vec::new(), registry, metrics, Liveness::new()).expect("state")
}

async fn start(options: api::ServeOptions) -> (std::net::SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(api::serve_with(
        listener,
        state(),
        shutdown.clone(),
        options,
    ));
    (addr, shutdown)
}

/// Reads until the server closes the connection; how long that took.
async fn closed_within(mut stream: TcpStream, limit: Duration) -> Duration {
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the server kept an idle connection open for {limit:?}"),
        }
    }
}

/// A client that sends nothing is closed after the header-read timeout, and connections over
/// the cap wait (unaccepted) until a slot frees, then are served.
#[tokio::test]
async fn idle_clients_are_closed_and_connections_over_the_cap_wait() {
    let (addr, shutdown) = start(api::ServeOptions {
        max_connections: 2,
        header_read_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_secs(60),
    })
    .await;
    let idle: Vec<TcpStream> = connect_many(addr, 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let health = raw_request(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    let waited = started.elapsed();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        waited >= Duration::from_millis(500),
        "a third connection was served at once ({waited:?}) although the cap is 2"
    );
    for stream in idle {
        let took = closed_within(stream, Duration::from_secs(10)).await;
        assert!(took < Duration::from_secs(3), "closed after {took:?}");
    }
    shutdown.cancel();
}

/// A connection that moves no byte is closed after the idle timeout even when the header
/// timeout is longer.
#[tokio::test]
async fn a_connection_that_moves_nothing_is_closed_after_the_idle_timeout() {
    let (addr, shutdown) = start(api::ServeOptions {
        max_connections: 8,
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_millis(500),
    })
    .await;
    let stream = TcpStream::connect(addr).await.expect("connect");
    let took = closed_within(stream, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    shutdown.cancel();
}

async fn connect_many(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(TcpStream::connect(addr).await.expect("connect"));
    }
    out
}
