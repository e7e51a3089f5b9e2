//! `mongo-watcher healthcheck`: one `GET /healthz` for container health checks (the
//! distroless image has no shell or curl). Blocking std I/O: one request needs no runtime and
//! no HTTP client.

use std::time::Duration;

/// The probe's URL when neither `--url` nor `--config` is given: the default `http.listen`.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080/healthz";

/// `/healthz` at `listen`, on loopback when `listen` is the unspecified address.
pub fn healthz_url(mut listen: std::net::SocketAddr) -> String {
    if listen.ip().is_unspecified() {
        listen.set_ip(match listen {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{listen}/healthz")
}

/// One `GET` of a plain-http `url` with `Connection: close`, `Ok` when the status is 200. The
/// whole exchange shares one deadline: each step waits only for what is left of `timeout`.
/// Blocking std I/O: one request needs no runtime and no HTTP client.
pub fn probe(url: &str, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;

    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    // A port after the host, the host possibly a bracketed IPv6 address.
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.contains(']'));
    let target = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to no address"))?;
    let deadline = std::time::Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(std::time::Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("no answer within {timeout:?}"))
    };
    let timed_out = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, left()?).map_err(|e| {
        if timed_out(&e) {
            format!("cannot connect to {addr} within {timeout:?}")
        } else {
            format!("cannot connect to {addr}: {e}")
        }
    })?;
    let io_error = |e: std::io::Error| {
        if timed_out(&e) {
            format!("no answer within {timeout:?}")
        } else {
            format!("connection failed: {e}")
        }
    };
    stream.set_write_timeout(Some(left()?)).map_err(io_error)?;
    stream
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {authority}\r\n\
                 User-Agent: mongo-watcher-healthcheck\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .map_err(io_error)?;
    // Only the status line matters; 1 KiB holds it.
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < 1024 {
        stream.set_read_timeout(Some(left()?)).map_err(io_error)?;
        match stream.read(&mut chunk).map_err(io_error)? {
            0 => break,
            n => answer.extend_from_slice(&chunk[..n]),
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    match status_line.split_whitespace().collect::<Vec<_>>()[..] {
        [version, "200", ..] if version.starts_with("HTTP/") => Ok(()),
        [version, code, ..] if version.starts_with("HTTP/") => Err(format!(
            "status {code}{}",
            status_line
                .splitn(3, ' ')
                .nth(2)
                .map(|reason| format!(" {reason}"))
                .unwrap_or_default()
        )),
        _ if answer.is_empty() => Err("the connection closed without an answer".into()),
        _ => Err(format!("not an HTTP answer: {status_line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthcheck_probes_an_unspecified_listen_address_on_loopback() {
        for (listen, url) in [
            ("0.0.0.0:8080", "http://127.0.0.1:8080/healthz"),
            ("[::]:9000", "http://[::1]:9000/healthz"),
            ("10.0.0.5:8081", "http://10.0.0.5:8081/healthz"),
        ] {
            assert_eq!(healthz_url(listen.parse().expect("address")), url);
        }
    }
}
