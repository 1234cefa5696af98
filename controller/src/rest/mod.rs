//! Sec-EM's northbound REST API for orchestrators (NFVO, VNFM): HTTPS with the admin
//! client certificates `asmnctl` uses, JSON under `/v1`, every error an RFC 9457 problem
//! document with a stable `code`, listings paged. Each operation calls the same registry
//! code as the QUIC front door (`service`): one set of rules, two doors.
//!
//! `GET /v1/health` and `GET /v1/openapi.json` answer without a client certificate (load
//! balancers and tooling); everything else needs an admin certificate not on the
//! deny-list, checked on every request as `asmnctl`'s are.

mod api;
mod problem;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

pub use api::{ApiDoc, document};
pub use problem::Problem;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{AbortOnDrop, Store};

/// What the handlers share.
pub struct Rest<S: Store> {
    /// The registry (the same as the QUIC service's).
    pub registry: Arc<Registry<S>>,
    /// Where to count.
    pub metrics: Option<Arc<Metrics>>,
    /// Agents connected to this replica.
    pub agents: Arc<dyn Fn() -> usize + Send + Sync>,
    /// The last health check of the store, and when.
    health: std::sync::Mutex<Option<(Instant, bool)>>,
}

impl<S: Store> Rest<S> {
    /// The REST API over `registry`, counting in `metrics`; `agents` says how many agents
    /// are connected to this replica.
    pub fn new(
        registry: Arc<Registry<S>>,
        metrics: Option<Arc<Metrics>>,
        agents: Arc<dyn Fn() -> usize + Send + Sync>,
    ) -> Self {
        Self {
            registry,
            metrics,
            agents,
            health: std::sync::Mutex::new(None),
        }
    }
}

impl<S: Store> std::fmt::Debug for Rest<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rest")
    }
}

/// The client certificate's serial (hex) of a connection, if it presented one.
#[derive(Clone, Debug)]
struct Peer(Option<String>);

/// Longest a client has to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection without a client certificate is served, in all (one request:
/// health or the document).
const ANONYMOUS_LIFETIME: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections from one source address at once; more are closed at once.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 32;
/// Most of a request body read and thrown away after an answer that did not need it, on
/// a connection with an admin certificate.
const DRAIN_BYTES: usize = 16 << 20;
/// The same without a client certificate (a health check or the document: nothing with a
/// body is theirs to send).
const DRAIN_BYTES_ANONYMOUS: usize = 64 << 10;
/// What each frame of such a body counts at least: a chunked body of 1-byte chunks costs
/// two task wake-ups a byte, and would otherwise be read for the whole deadline.
const DRAIN_FRAME_COST: usize = 4 << 10;
/// Longest such a body is read after the answer.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// A request body that is read to its end (at most `budget` more, [`DRAIN_BYTES`] or
/// [`DRAIN_BYTES_ANONYMOUS`], each frame counting at least [`DRAIN_FRAME_COST`], for at
/// most [`DRAIN_TIME`]) when the handler answers without it: a refusal before the body is read
/// (an image part before the descriptor, an unknown method, a wrong content type, a
/// descriptor over 1 MiB). Without this, hyper closed the connection with the body's rest
/// unread in the socket, the kernel answered the client's next bytes with a reset, and a
/// client that sends its whole request before it reads (Python's `requests`,
/// schemathesis) saw a broken connection instead of the answer: 34 of 200 refused
/// 300 KB uploads in a test loop, and a CI run of schemathesis.
struct Drained {
    body: Option<hyper::body::Incoming>,
    ended: bool,
    budget: usize,
}

impl hyper::body::Body for Drained {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let polled = std::pin::Pin::new(body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            this.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| hyper::body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        use hyper::body::Body;
        let Some(mut body) = self.body.take() else {
            return;
        };
        if self.ended || body.is_end_stream() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut left = self.budget;
        rt.spawn(async move {
            use http_body_util::BodyExt;
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(Ok(frame)) = body.frame().await {
                    let n = frame
                        .data_ref()
                        .map_or(DRAIN_FRAME_COST, |d| d.len().max(DRAIN_FRAME_COST));
                    if n > left {
                        // Given up: hyper closes the connection.
                        tracing::debug!("REST: an unread request body is over the drain limit");
                        return;
                    }
                    left -= n;
                }
            })
            .await;
        });
    }
}

/// The method as a metric label: a fixed set (anyone may send any token as a method).
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// The TLS configuration of the REST listener: Sec-EM's certificate; client
/// certificates of the CA verified when presented (required by every route but health
/// and the OpenAPI document).
pub fn tls_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, asmn_channel::tls::TlsError> {
    use asmn_channel::tls;
    let err = |e: String| tls::TlsError::Material(e);
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        tls::roots(ca_pem)?,
        tls::provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| err(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls::certs(cert_pem)?, tls::private_key(key_pem)?)
        .map_err(|e| err(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The router: every route of the API, with authentication, metrics and problem
/// documents for what axum itself refuses.
pub fn router<S: Store>(rest: Arc<Rest<S>>) -> Router {
    api::routes::<S>()
        .fallback(|| async { Problem::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this resource does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&rest),
            guard::<S>,
        ))
        .with_state(rest)
}

/// Routes that answer without a client certificate.
fn open(path: &str) -> bool {
    matches!(path, "/v1/health" | "/v1/openapi.json")
}

/// Authentication (an admin certificate not on the deny-list) and metrics.
async fn guard<S: Store>(State(rest): State<Arc<Rest<S>>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method()).to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let serial = req.extensions().get::<Peer>().and_then(|p| p.0.clone());
    let response = if open(req.uri().path()) {
        next.run(req).await
    } else {
        match serial {
            None => Problem::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "client-certificate-required",
                "present an admin client certificate of this tenant's CA (sec-em init, asmnctl admin issue)",
            )
            .into_response(),
            Some(serial) => match rest.registry.admin_revoked(&serial).await {
                Ok(false) => next.run(req).await,
                Ok(true) => Problem::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "admin-certificate-revoked",
                    format!("admin certificate {serial} is revoked"),
                )
                .into_response(),
                Err(e) => Problem::from(e).into_response(),
            },
        }
    };
    if let Some(m) = &rest.metrics {
        let class = format!("{}xx", response.status().as_u16() / 100);
        m.rest_requests
            .get_or_create(&vec![
                ("method".into(), method),
                ("route".into(), route),
                ("status".into(), class),
            ])
            .inc();
        m.rest_seconds.observe(started.elapsed().as_secs_f64());
    }
    response
}

/// Serves the REST API on `listener` until the returned task is dropped: TLS, then
/// HTTP/1.1, at most [`MAX_CONNECTIONS`] connections at once.
pub fn serve<S: Store>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    rest: Arc<Rest<S>>,
) -> AbortOnDrop {
    let app = router(rest);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let per_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    AbortOnDrop(tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (tcp, from) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "REST: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(place) = SourcePlace::take(&per_source, from.ip()) else {
                // Dropped at once: one address cannot hold the listener's places.
                continue;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let _slot = (slot, place);
                serve_connection(tcp, from, acceptor, app).await;
            });
        }
    }))
}

/// A connection's place in its source address's count; given back on drop.
struct SourcePlace {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl SourcePlace {
    fn take(
        counts: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        ip: std::net::IpAddr,
    ) -> Option<SourcePlace> {
        let mut c = counts.lock().ok()?;
        let n = c.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(SourcePlace {
            counts: Arc::clone(counts),
            ip,
        })
    }
}

impl Drop for SourcePlace {
    fn drop(&mut self) {
        if let Ok(mut c) = self.counts.lock()
            && let Some(n) = c.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    from: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%from, error = %e, "REST: TLS handshake failed");
            return;
        }
        Err(_) => return,
    };
    let serial = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::pki::serial_of(c));
    let anonymous = serial.is_none();
    let peer = Peer(serial);
    let budget = if anonymous {
        DRAIN_BYTES_ANONYMOUS
    } else {
        DRAIN_BYTES
    };
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            let app = app.clone();
            async move {
                use tower::ServiceExt;
                app.oneshot(req.map(|body| {
                    axum::body::Body::new(Drained {
                        body: Some(body),
                        ended: false,
                        budget,
                    })
                }))
                .await
            }
        });
    let io = hyper_util::rt::TokioIo::new(tls);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10)
        // Without a certificate: one request, answered within a deadline (a peer that
        // does not read its answer does not keep its place).
        .keep_alive(!anonymous)
        .serve_connection(io, service);
    let served = if anonymous {
        tokio::time::timeout(ANONYMOUS_LIFETIME, conn)
            .await
            .unwrap_or(Ok(()))
    } else {
        conn.await
    };
    if let Err(e) = served {
        tracing::debug!(%from, error = %e, "REST: connection ended");
    }
}
