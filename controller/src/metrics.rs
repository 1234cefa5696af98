//! Prometheus metrics of Sec-EM, served as text over HTTP (`metrics_addr`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::store::{AbortOnDrop, Cas, Expect, Listing, RawWatch, Store, StoreError, Versioned};

type Labels = Vec<(String, String)>;

fn latency() -> Histogram {
    // 50 us .. ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// Every metric Sec-EM exports.
pub struct Metrics {
    registry: Registry,
    /// Enrollments accepted.
    pub enrollments: Counter,
    /// Refusals, by reason (the refusal code) and request (`enroll`, `reattest`,
    /// `verify_peer`, `operator`, `other`): re-attestation failures are
    /// `{request="reattest"}`.
    pub refusals: Family<Labels, Counter>,
    /// Time to handle a reveal (enrollment or re-attestation), seconds.
    pub reveal_seconds: Histogram,
    /// Agents with an open push stream here.
    pub connected_agents: Gauge,
    /// From pushing a catalog version to an agent's acknowledgement, seconds.
    pub catalog_ack_seconds: Histogram,
    /// Store operations, by operation, seconds.
    pub store_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// QUIC connections open (handshaking ones included).
    pub connections: Gauge,
    /// What the listener did to bound unauthenticated peers, by event: `refused_total`,
    /// `refused_source` (a cap), `retry` (address validation asked), `handshake_failed`,
    /// `enroll_deadline` (closed before enrolling), `request_deadline`,
    /// `audit_suppressed` (a refusal about a known instance not audited one by one).
    pub guard_events: Family<Labels, Counter>,
    /// Notifications to subscribers, by outcome: `delivered`, `retried` (an attempt
    /// that failed and will be made again), `dropped` (a subscriber's queue was full).
    pub notifications: Family<Labels, Counter>,
    /// From an event's audit record being read to its subscriber answering 2xx, seconds.
    pub notification_seconds: Histogram,
    /// REST requests, by method, route and status class (`2xx`, `4xx`, `5xx`).
    pub rest_requests: Family<Labels, Counter>,
    /// REST request latency, seconds.
    pub rest_seconds: Histogram,
    pushed: Mutex<HashMap<(String, u64), Instant>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("asmn");
        let enrollments = Counter::default();
        let refusals = Family::<Labels, Counter>::default();
        let reveal_seconds = latency();
        let connected_agents = Gauge::default();
        let catalog_ack_seconds = latency();
        let store_seconds = Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency as fn() -> Histogram,
        );
        registry.register("enrollments", "Enrollments accepted", enrollments.clone());
        registry.register(
            "refusals",
            "Requests refused, by reason and request",
            refusals.clone(),
        );
        registry.register(
            "reveal_seconds",
            "Time to verify and store a chain reveal",
            reveal_seconds.clone(),
        );
        registry.register(
            "connected_agents",
            "Agents with a push stream to this Sec-EM",
            connected_agents.clone(),
        );
        registry.register(
            "catalog_ack_seconds",
            "From pushing a catalog version to the agent acknowledging it",
            catalog_ack_seconds.clone(),
        );
        registry.register(
            "store_seconds",
            "Store operation latency, by operation",
            store_seconds.clone(),
        );
        let connections = Gauge::default();
        let guard_events = Family::<Labels, Counter>::default();
        registry.register(
            "connections",
            "QUIC connections open, handshakes included",
            connections.clone(),
        );
        registry.register(
            "guard_events",
            "Connections and requests refused, closed or throttled to bound unauthenticated peers, by event",
            guard_events.clone(),
        );
        let notifications = Family::<Labels, Counter>::default();
        let notification_seconds = latency();
        let rest_requests = Family::<Labels, Counter>::default();
        let rest_seconds = latency();
        registry.register(
            "notifications",
            "Event notifications to subscribers, by outcome (delivered, retried, dropped)",
            notifications.clone(),
        );
        registry.register(
            "notification_seconds",
            "From reading an event to its subscriber acknowledging it",
            notification_seconds.clone(),
        );
        registry.register(
            "rest_requests",
            "REST API requests, by method, route and status class",
            rest_requests.clone(),
        );
        registry.register(
            "rest_seconds",
            "REST API request latency",
            rest_seconds.clone(),
        );
        Arc::new(Self {
            notifications,
            notification_seconds,
            rest_requests,
            rest_seconds,
            connections,
            guard_events,
            registry,
            enrollments,
            refusals,
            reveal_seconds,
            connected_agents,
            catalog_ack_seconds,
            store_seconds,
            pushed: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a refusal.
    pub fn refused(&self, reason: &str, request: &str) {
        self.refusals
            .get_or_create(&vec![
                ("reason".to_string(), reason.to_string()),
                ("request".to_string(), request.to_string()),
            ])
            .inc();
    }

    /// Counts a guard event (see [`Metrics::guard_events`]).
    pub fn guard(&self, event: &str) {
        self.guard_events
            .get_or_create(&vec![("event".to_string(), event.to_string())])
            .inc();
    }

    /// Notes that catalog `version` of `vnf` was pushed now.
    pub fn catalog_pushed(&self, vnf: &str, version: u64) {
        if let Ok(mut p) = self.pushed.lock() {
            // Bounded: old versions are forgotten.
            if p.len() > 4096 {
                p.clear();
            }
            p.entry((vnf.to_string(), version))
                .or_insert_with(Instant::now);
        }
    }

    /// Observes an acknowledgement of `version` of `vnf`.
    pub fn catalog_acked(&self, vnf: &str, version: u64) -> Option<Duration> {
        let since = self
            .pushed
            .lock()
            .ok()
            .and_then(|p| p.get(&(vnf.to_string(), version)).copied());
        let took = since.map(|t| t.elapsed());
        if let Some(d) = took {
            self.catalog_ack_seconds.observe(d.as_secs_f64());
        }
        took
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A store whose operations are timed into [`Metrics::store_seconds`].
#[derive(Debug)]
pub struct MeteredStore<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> MeteredStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    fn observe(&self, op: &str, t: Instant) {
        self.metrics
            .store_seconds
            .get_or_create(&vec![("op".to_string(), op.to_string())])
            .observe(t.elapsed().as_secs_f64());
    }
}

impl<S: Store> Store for MeteredStore<S> {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let t = Instant::now();
        let r = self.inner.get(key).await;
        self.observe("get", t);
        r
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let t = Instant::now();
        let r = self.inner.put(key, value).await;
        self.observe("put", t);
        r
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<Cas, StoreError> {
        let t = Instant::now();
        let r = self.inner.compare_and_swap(key, expect, value).await;
        self.observe("cas", t);
        r
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let t = Instant::now();
        let r = self.inner.delete(key).await;
        self.observe("delete", t);
        r
    }
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let t = Instant::now();
        let r = self.inner.list(prefix).await;
        self.observe("list", t);
        r
    }
    async fn list_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        let t = Instant::now();
        let r = self.inner.list_page(prefix, after, limit).await;
        self.observe("list", t);
        r
    }
    async fn last(&self, prefix: &str) -> Result<Option<(String, Versioned)>, StoreError> {
        let t = Instant::now();
        let r = self.inner.last(prefix).await;
        self.observe("get", t);
        r
    }
    async fn watch_raw(&self, prefix: &str, from: u64) -> Result<RawWatch, StoreError> {
        self.inner.watch_raw(prefix, from).await
    }
}

/// Serves `GET /metrics` (Prometheus text) and `GET /health` on `listener` until dropped
/// (`asmn_channel::http`: at most 64 connections at once, 5 s deadlines).
pub fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    agents: impl Fn() -> usize + Send + Sync + 'static,
) -> AbortOnDrop {
    let agents = Arc::new(agents);
    AbortOnDrop(tokio::spawn(asmn_channel::http::serve(
        listener,
        asmn_channel::http::MAX_CONNECTIONS,
        move |path: String| {
            let (metrics, agents) = (Arc::clone(&metrics), Arc::clone(&agents));
            async move {
                match path.as_str() {
                    "/metrics" => {
                        metrics
                            .connected_agents
                            .set(i64::try_from(agents()).unwrap_or(i64::MAX));
                        asmn_channel::http::Response::ok(metrics.render())
                    }
                    "/health" => asmn_channel::http::Response::ok("ok\n".into()),
                    _ => asmn_channel::http::Response::not_found(),
                }
            }
        },
    )))
}
