//! The small HTTP server of `/metrics` and `/health` (Sec-EM and the agent): one request
//! per connection, a cap on connections served at once (the rest are closed at accept),
//! a deadline to read the request head and one to write the answer.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// An answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status line, such as `200 OK`.
    pub status: &'static str,
    /// The body (text).
    pub body: String,
}

impl Response {
    /// `200 OK` with `body`.
    pub fn ok(body: String) -> Self {
        Self {
            status: "200 OK",
            body,
        }
    }

    /// `404 Not Found`, naming what is served.
    pub fn not_found() -> Self {
        Self {
            status: "404 Not Found",
            body: "not found: try /metrics or /health\n".into(),
        }
    }
}

/// Connections served at once by default.
pub const MAX_CONNECTIONS: usize = 64;
/// The longest request head read.
const MAX_HEAD: usize = 8192;
/// Deadline to read the request head, and (separately) to write the answer.
const DEADLINE: Duration = Duration::from_secs(5);

/// Serves `GET <path>` on `listener` with `handler` (given the path), at most
/// `max_connections` at once, until the returned future is dropped.
pub async fn serve<H, F>(listener: TcpListener, max_connections: usize, handler: H)
where
    H: Fn(String) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let handler = Arc::new(handler);
    while let Ok((mut sock, peer)) = listener.accept().await {
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: connection cap reached, closing");
            drop(sock);
            continue;
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; MAX_HEAD];
            let mut n = 0;
            let read = async {
                while n < buf.len() {
                    let k = sock.read(&mut buf[n..]).await.ok()?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Some(())
            };
            if !matches!(tokio::time::timeout(DEADLINE, read).await, Ok(Some(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let response = match head
                .strip_prefix("GET ")
                .and_then(|r| r.split_once(' '))
                .map(|(path, _)| path.to_string())
            {
                Some(path) => handler(path).await,
                None => Response {
                    status: "405 Method Not Allowed",
                    body: "only GET is served\n".into(),
                },
            };
            let text = format!(
                "HTTP/1.1 {}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                response.status,
                response.body.len(),
                response.body
            );
            let _ = tokio::time::timeout(DEADLINE, sock.write_all(text.as_bytes())).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
        out
    }

    #[tokio::test]
    async fn serves_paths_and_caps_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, 2, |path: String| async move {
            match path.as_str() {
                "/health" => Response::ok("ok\n".into()),
                _ => Response::not_found(),
            }
        }));
        assert!(get(addr, "/health").await.starts_with("HTTP/1.1 200 OK"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        // Two silent connections hold both permits: a third is closed at once, unserved.
        let _a = tokio::net::TcpStream::connect(addr).await.expect("a");
        let _b = tokio::net::TcpStream::connect(addr).await.expect("b");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let third = get(addr, "/health").await;
        assert!(third.is_empty(), "{third}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop((_a, _b));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get(addr, "/health").await.starts_with("HTTP/1.1 200 OK"));
        server.abort();
    }
}
