//! `--rest`: the northbound REST API beside QUIC in the same run (listing every
//! instance, catalog put until every agent acknowledged), and the delivery latency of
//! event notifications to a webhook receiver on loopback.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use asmn_shared::wire::msg::{self, Body};

/// What `--rest` measured.
#[derive(serde::Serialize, Debug, Default)]
pub struct RestReport {
    /// Instances listed (every one, in pages of [`PAGE`]).
    pub listed: usize,
    /// Full listings timed on each front door.
    pub listing_trials: usize,
    pub list_quic_ms_p50: f64,
    pub list_quic_ms_p99: f64,
    pub list_rest_ms_p50: f64,
    pub list_rest_ms_p99: f64,
    /// REST p99 / QUIC p99.
    pub list_p99_ratio: f64,
    /// Catalog puts over each front door, each until every agent acknowledged.
    pub catalog_trials: usize,
    pub catalog_all_acked_quic_ms_p50: f64,
    pub catalog_all_acked_quic_ms_p99: f64,
    pub catalog_all_acked_rest_ms_p50: f64,
    pub catalog_all_acked_rest_ms_p99: f64,
    /// REST p99 / QUIC p99.
    pub catalog_p99_ratio: f64,
    /// Notifications timed: from the revocation request to the receiver's
    /// `instance.revoked`, and from the catalog put to its `catalog.acknowledged`.
    pub notifications: usize,
    pub notify_revoked_ms_p50: f64,
    pub notify_revoked_ms_p99: f64,
    pub notify_acknowledged_after_all_acked_ms_p50: f64,
    pub notify_acknowledged_after_all_acked_ms_p99: f64,
}

/// Instances per page on both front doors (QUIC's most per page is 64).
pub const PAGE: usize = 64;

/// A client of the REST API with the admin certificate.
pub struct Rest {
    client: reqwest::Client,
    base: String,
}

impl Rest {
    pub fn new(pki: &asmn_controller::pki::Pki, port: u16) -> anyhow::Result<Rest> {
        use asmn_channel::tls;
        let config = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(tls::roots(&pki.ca_cert)?)
            .with_client_auth_cert(
                tls::certs(&pki.admin_cert)?,
                tls::private_key(&pki.admin_key)?,
            )?;
        Ok(Rest {
            // The server certificate names `sec-em`; it is on loopback.
            client: reqwest::Client::builder()
                .use_preconfigured_tls(config)
                .resolve("sec-em", std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .timeout(Duration::from_secs(30))
                .build()?,
            base: format!("https://sec-em:{port}"),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b)?);
        }
        let r = req.send().await?;
        let status = r.status();
        let v: serde_json::Value = serde_json::from_slice(&r.bytes().await?).unwrap_or_default();
        if !status.is_success() {
            bail!("{path}: {status}: {v}");
        }
        Ok(v)
    }

    /// Waits (up to 30 s) until the REST API answers.
    pub async fn wait_up(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .call(reqwest::Method::GET, "/v1/health", None)
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the REST API did not come up within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Subscribes `callback` to `types`.
    pub async fn subscribe(&self, callback: &str, types: &[&str]) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            "/v1/subscriptions",
            Some(serde_json::json!({"callback": callback, "types": types})),
        )
        .await?;
        Ok(())
    }

    /// Every instance, in pages of [`PAGE`]; how many.
    pub async fn list_all(&self) -> anyhow::Result<usize> {
        let mut n = 0;
        let mut after = String::new();
        for _ in 0..100_000 {
            let v = self
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/instances?limit={PAGE}{after}"),
                    None,
                )
                .await?;
            n += v["items"].as_array().map_or(0, Vec::len);
            match v["next"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => return Ok(n),
            }
        }
        bail!("the listing did not end")
    }

    /// Puts catalog `yaml` (an asmnctl catalog file) for `vnf`; its version.
    pub async fn put_catalog(&self, vnf: &str, yaml: &str) -> anyhow::Result<u64> {
        let v = self
            .call(
                reqwest::Method::PUT,
                &format!("/v1/catalogs/{vnf}"),
                Some(serde_json::json!({"catalog": yaml})),
            )
            .await?;
        v["version"].as_u64().context("no version")
    }
}

/// Every instance over QUIC, in pages of [`PAGE`]; how many.
pub async fn list_all_quic(admin: &quinn::Connection) -> anyhow::Result<usize> {
    let mut n = 0;
    let mut after = String::new();
    for _ in 0..100_000 {
        let r = super::ask(
            admin,
            Body::Query(msg::QueryRequest {
                what: "instances".into(),
                after: after.clone(),
                limit: PAGE as u32,
                ..Default::default()
            }),
        )
        .await?;
        let Body::QueryResult(q) = r else {
            bail!("listing refused: {r:?}")
        };
        let page: Vec<serde_json::Value> = serde_json::from_str(&q.json)?;
        n += page.len();
        if q.next.is_empty() {
            return Ok(n);
        }
        after = q.next;
    }
    bail!("the listing did not end")
}

/// One event the receiver got: its type, instance ID or catalog version, and when.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub kind: String,
    pub instance: Option<String>,
    pub version: Option<u64>,
    pub at: Instant,
}

/// A webhook receiver on loopback answering 204 and recording arrivals.
pub struct Receiver {
    pub port: u16,
    pub got: Arc<Mutex<Vec<Arrival>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self._task.abort();
    }
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Receiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let got: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let sink = Arc::clone(&got);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let sink = Arc::clone(&sink);
                conns.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let sink = Arc::clone(&sink);
                            async move {
                                use http_body_util::BodyExt;
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let at = Instant::now();
                                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                                    && let Ok(mut g) = sink.lock()
                                {
                                    g.push(Arrival {
                                        kind: v["type"].as_str().unwrap_or("").into(),
                                        instance: v["instance"]["id"].as_str().map(Into::into),
                                        version: v["catalog"]["version"].as_u64(),
                                        at,
                                    });
                                }
                                hyper::Response::builder()
                                    .status(204)
                                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(Receiver {
            port,
            got,
            _task: task,
        })
    }

    /// The arrival of the first event of `kind` matching `f`, waiting up to `limit`.
    pub async fn wait(
        &self,
        kind: &str,
        limit: Duration,
        f: impl Fn(&Arrival) -> bool,
    ) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(g) = self.got.lock()
                && let Some(a) = g.iter().find(|a| a.kind == kind && f(a))
            {
                return Some(a.at);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    }
}
