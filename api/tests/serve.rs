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
