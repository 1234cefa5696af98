//! Event notifications to orchestrators: subscriptions (a callback URL and the event
//! types wanted) and their delivery as signed HTTP POSTs.
//!
//! Events come from the audit log, the store's ordered and authenticated record of every
//! security decision, so they are ordered, survive restarts and are the same on every
//! replica. One replica at a time delivers them (a lease in the store); it reads the log,
//! turns the records subscribers want into events, and hands each subscriber's events to
//! its own bounded queue: a slow or dead subscriber never blocks the control plane nor
//! another subscriber, and when its queue is full, events are dropped and counted (the
//! next one delivered says how many: `dropped_before`). A subscriber gets its events in
//! log order (so in order per instance), each retried with backoff until it answers 2xx.
//! Its position (the last event it acknowledged) is kept in the store, so a restart or a
//! new lease holder resumes where it stopped: delivery is at least once, and receivers
//! drop duplicates by the event's `id` (its audit record number).
//!
//! The body is JSON; the `ASMN-Signature` header is `t=<unix seconds>,v1=<hex>`, the
//! HMAC-SHA256 of `<t>.<body>` under the subscription's secret ([`verify_signature`]).
//! A receiver refuses a timestamp older than a few minutes (a replay) and an `id` it has
//! already processed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asmn_shared::ids::{InstanceKey, VnfId};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::audit::AuditRecord;
use crate::metrics::Metrics;
use crate::registry::{InstanceRecord, InstanceState, Registry, RegistryError};
use crate::store::{AbortOnDrop, Cas, Event, Expect, RawEvent, Store, keys};

/// The event types a subscription may ask for.
pub const EVENT_TYPES: [&str; 9] = [
    "instance.created",
    "instance.enrolled",
    "instance.refused",
    "instance.quarantined",
    "instance.revoked",
    "reattestation.failed",
    "catalog.applied",
    "catalog.acknowledged",
    "agent.lost",
];

/// The event type of an audit record's kind, if subscribers may hear of it.
pub fn event_type(audit_kind: &str) -> Option<&'static str> {
    Some(match audit_kind {
        "instance.created" => "instance.created",
        "enroll.accepted" => "instance.enrolled",
        // A fake VNF (a wrong measurement at enrollment), a revoked or quarantined
        // instance trying again, a replayed reveal.
        "enroll.refused" | "reveal.refused" => "instance.refused",
        "instance.quarantined" => "instance.quarantined",
        "instance.revoked" => "instance.revoked",
        "reattest.refused" | "renewal.refused" => "reattestation.failed",
        "catalog.applied" => "catalog.applied",
        "catalog.acknowledged" => "catalog.acknowledged",
        "agent.lost" => "agent.lost",
        _ => return None,
    })
}

/// Subscriptions at most.
pub const MAX_SUBSCRIPTIONS: usize = 64;
/// Longest callback URL.
pub const MAX_CALLBACK: usize = 2048;

/// One subscription as stored. The secret is in the store (protect it as the store is
/// protected: etcd's TLS and authentication, the embedded file's mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Its ID (32 hex digits).
    pub id: String,
    /// Where events are POSTed (`http://` or `https://`).
    pub callback: String,
    /// The event types wanted (empty: all).
    pub types: Vec<String>,
    /// The HMAC key of its signatures (64 hex digits).
    pub secret: String,
    /// When it was made (seconds since the epoch).
    pub created: u64,
    /// The first audit record it may hear of (the log's next record when it was made).
    pub from: u64,
}

impl Subscription {
    fn wants(&self, event: &str) -> bool {
        self.types.is_empty() || self.types.iter().any(|t| t == event)
    }
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// The request is not one Sec-EM takes.
    #[error("{0}")]
    Invalid(String),
    /// There are [`MAX_SUBSCRIPTIONS`] already.
    #[error("{MAX_SUBSCRIPTIONS} subscriptions exist already; delete one first")]
    Full,
    /// The store or the audit log failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<crate::store::StoreError> for SubscriptionError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Registry(e.into())
    }
}

impl From<crate::audit::AuditError> for SubscriptionError {
    fn from(e: crate::audit::AuditError) -> Self {
        Self::Registry(e.into())
    }
}

/// Checks a callback URL: `http` or `https`, a host, no credentials, bounded.
pub fn check_callback(url: &str) -> Result<reqwest::Url, SubscriptionError> {
    let bad = |m: &str| SubscriptionError::Invalid(format!("callback: {m}"));
    if url.len() > MAX_CALLBACK {
        return Err(bad(&format!("longer than {MAX_CALLBACK} bytes")));
    }
    let u = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(bad("the scheme is http or https"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad(
            "credentials in the URL; the signature authenticates Sec-EM",
        ));
    }
    if u.fragment().is_some() {
        return Err(bad("a fragment is not sent; remove it"));
    }
    Ok(u)
}

/// Makes a subscription (its secret from the operating system's CSPRNG); it hears of
/// events from the next audit record on.
pub async fn create<S: Store>(
    registry: &Registry<S>,
    now: u64,
    callback: &str,
    types: &[String],
) -> Result<Subscription, SubscriptionError> {
    check_callback(callback)?;
    let mut wanted: Vec<String> = Vec::new();
    for t in types {
        if !EVENT_TYPES.contains(&t.as_str()) {
            return Err(SubscriptionError::Invalid(format!(
                "unknown event type {:?}: one of {}",
                t.chars().take(64).collect::<String>(),
                EVENT_TYPES.join(", ")
            )));
        }
        if !wanted.contains(t) {
            wanted.push(t.clone());
        }
    }
    let store = registry.store();
    if store
        .list(&keys::subscriptions_prefix())
        .await?
        .entries
        .len()
        >= MAX_SUBSCRIPTIONS
    {
        return Err(SubscriptionError::Full);
    }
    use rand::TryRngCore;
    let mut bytes = [0u8; 48];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).map_err(|_| {
        SubscriptionError::Invalid("the system's random source failed; retry".into())
    })?;
    let sub = Subscription {
        id: hex::encode(&bytes[..16]),
        callback: callback.to_string(),
        types: wanted,
        secret: hex::encode(&bytes[16..]),
        created: now,
        from: crate::audit::head(store).await? + 1,
    };
    zeroize::Zeroize::zeroize(&mut bytes);
    let value = serde_json::to_vec(&sub).map_err(|e| RegistryError::Corrupt(e.to_string()))?;
    if let Cas::Conflict { .. } = store
        .compare_and_swap(&keys::subscription_key(&sub.id), Expect::Absent, value)
        .await?
    {
        return Err(SubscriptionError::Invalid("ID collision; retry".into()));
    }
    Ok(sub)
}

/// Every subscription, by ID.
pub async fn list<S: Store>(store: &S) -> Result<Vec<Subscription>, SubscriptionError> {
    let listing = store.list(&keys::subscriptions_prefix()).await?;
    listing
        .entries
        .iter()
        .map(|(_, v)| {
            serde_json::from_slice(&v.value)
                .map_err(|e| RegistryError::Corrupt(format!("subscription: {e}")).into())
        })
        .collect()
}

/// Subscription `id`, if it exists.
pub async fn get<S: Store>(store: &S, id: &str) -> Result<Option<Subscription>, SubscriptionError> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    match store.get(&keys::subscription_key(id)).await? {
        None => Ok(None),
        Some(v) => {
            Ok(Some(serde_json::from_slice(&v.value).map_err(|e| {
                RegistryError::Corrupt(format!("subscription: {e}"))
            })?))
        }
    }
}

/// Deletes subscription `id`; whether it existed.
pub async fn delete<S: Store>(store: &S, id: &str) -> Result<bool, SubscriptionError> {
    if get(store, id).await?.is_none() {
        return Ok(false);
    }
    let existed = store.delete(&keys::subscription_key(id)).await?;
    store.delete(&keys::subscription_cursor_key(id)).await?;
    Ok(existed)
}

type HmacSha256 = Hmac<sha2::Sha256>;

/// The `ASMN-Signature` header of `body` at time `t` under `secret` (hex).
pub fn signature(secret_hex: &str, t: u64, body: &[u8]) -> String {
    let key = hex::decode(secret_hex).unwrap_or_default();
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&key).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks an `ASMN-Signature` header: the MAC under `secret` (hex) and a timestamp
/// within `tolerance` seconds of `now`. What a receiver does with every notification.
pub fn verify_signature(
    secret_hex: &str,
    header: &str,
    body: &[u8],
    now: u64,
    tolerance: u64,
) -> Result<(), String> {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<u64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return Err("the header is t=<seconds>,v1=<hex>".into());
    };
    if now.abs_diff(t) > tolerance {
        return Err(format!(
            "timestamp {t} is {}s from now: a replay?",
            now.abs_diff(t)
        ));
    }
    let key = hex::decode(secret_hex).map_err(|_| "the secret is hex")?;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(&key).map_err(|_| "bad key")?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1)
        .map_err(|_| "the signature does not verify".to_string())
}

/// How notifications are sent (`[notifications]` of `sec-em.toml`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotifyOptions {
    /// Events waiting per subscriber at most; more are dropped and counted.
    pub queue: usize,
    /// CAs (PEM) that `https` callbacks' certificates must chain to; the system's bundle
    /// when unset.
    pub ca: Option<String>,
    /// Longest wait between two attempts of one event.
    pub max_backoff: Duration,
}

impl Default for NotifyOptions {
    fn default() -> Self {
        Self {
            queue: 4096,
            ca: None,
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The system's CA bundle, for `https` callbacks when no CA is configured.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

fn http_client(options: &NotifyOptions) -> Result<reqwest::Client, String> {
    let pem = match &options.ca {
        Some(p) => p.clone(),
        None => std::fs::read_to_string(SYSTEM_CAS).unwrap_or_default(),
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()).filter_map(Result::ok)
    {
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(asmn_channel::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("asmn-sec-em/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| e.to_string())
}

/// How long a lease holder holds the delivery of notifications without renewing it.
const LEASE: Duration = Duration::from_secs(5);
/// How often the holder renews it, and others try to take it.
const LEASE_RENEW: Duration = Duration::from_secs(1);
/// How often the log is looked at for new records.
const POLL: Duration = Duration::from_millis(20);
/// How often the subscriptions are listed again.
const RESCAN: Duration = Duration::from_millis(500);
/// Bytes of audit records read at once.
const READ_BUDGET: usize = 1 << 20;

#[derive(Serialize, Deserialize)]
struct Lease {
    holder: String,
    until_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Takes or renews the lease for `holder`; whether it holds it now.
async fn hold_lease<S: Store>(store: &S, holder: &str) -> bool {
    let current = match store.get(&keys::notify_lease_key()).await {
        Ok(c) => c,
        Err(_) => return false,
    };
    let expect = match &current {
        None => Expect::Absent,
        Some(v) => match serde_json::from_slice::<Lease>(&v.value) {
            Ok(l) if l.holder != holder && l.until_ms > now_ms() => return false,
            _ => Expect::Revision(v.revision),
        },
    };
    let lease = Lease {
        holder: holder.to_string(),
        until_ms: now_ms() + u64::try_from(LEASE.as_millis()).unwrap_or(5_000),
    };
    let Ok(value) = serde_json::to_vec(&lease) else {
        return false;
    };
    matches!(
        store
            .compare_and_swap(&keys::notify_lease_key(), expect, value)
            .await,
        Ok(Cas::Swapped { .. })
    )
}

/// Starts the notifier of this replica: it delivers whenever it holds the lease.
pub fn spawn<S: Store>(
    registry: Arc<Registry<S>>,
    options: NotifyOptions,
    metrics: Option<Arc<Metrics>>,
) -> Result<AbortOnDrop, String> {
    let client = http_client(&options)?;
    let holder = {
        let mut b = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
        hex::encode(b)
    };
    Ok(AbortOnDrop(tokio::spawn(async move {
        loop {
            let taken = tokio::time::Instant::now();
            let held = tokio::time::timeout(LEASE_RENEW, hold_lease(registry.store(), &holder))
                .await
                .unwrap_or(false);
            if !held {
                tokio::time::sleep(LEASE_RENEW).await;
                continue;
            }
            tracing::info!(%holder, "notifications: this replica delivers them");
            // The lease runs from before the write that took or renewed it; delivery
            // stops a renewal period before it ends unless renewed, however slow the
            // store is (another replica may take it from then on).
            let renew = async {
                let mut until = taken + LEASE - LEASE_RENEW;
                loop {
                    let asked = tokio::time::Instant::now();
                    let renewed =
                        tokio::time::timeout_at(until, hold_lease(registry.store(), &holder)).await;
                    match renewed {
                        Ok(true) => until = asked + LEASE - LEASE_RENEW,
                        Ok(false) => {}
                        Err(_) => return,
                    }
                    if tokio::time::Instant::now() >= until {
                        return;
                    }
                    tokio::time::sleep_until((asked + LEASE_RENEW).min(until)).await;
                }
            };
            tokio::select! {
                () = renew => tracing::warn!("notifications: lease lost; another replica delivers"),
                () = deliver(Arc::clone(&registry), &client, &options, metrics.clone()) => {}
            }
        }
    })))
}

/// One event on its way to one subscriber.
struct Outgoing {
    seq: u64,
    body: Vec<u8>,
    read_at: Instant,
}

/// A subscriber's queue and where the dispatcher is in the log for it.
struct Subscriber {
    sub: Subscription,
    tx: mpsc::Sender<Outgoing>,
    /// The last record handed to (or skipped for) it.
    dispatched: u64,
    /// Events dropped since the last one queued.
    dropped: u64,
    _task: AbortOnDrop,
}

/// What an event says of its instance.
#[derive(Clone, Serialize)]
struct InstanceNames {
    id: String,
    tenant: String,
    vnf: String,
    name: String,
    state: String,
}

/// Delivers, as the lease holder, until cancelled.
async fn deliver<S: Store>(
    registry: Arc<Registry<S>>,
    client: &reqwest::Client,
    options: &NotifyOptions,
    metrics: Option<Arc<Metrics>>,
) {
    let (acks, _tracker) = AckTracker::spawn(Arc::clone(&registry));
    let mut subscribers: HashMap<String, Subscriber> = HashMap::new();
    let mut scanned: Option<Instant> = None;
    let mut failing = false;
    loop {
        if scanned.is_none_or(|t| t.elapsed() >= RESCAN) {
            scanned = Some(Instant::now());
            match list(registry.store()).await {
                Ok(subs) => {
                    let ids: HashSet<&str> = subs.iter().map(|s| s.id.as_str()).collect();
                    subscribers.retain(|id, _| ids.contains(id.as_str()));
                    for sub in subs {
                        if subscribers.contains_key(&sub.id) {
                            continue;
                        }
                        let acked = match registry
                            .store()
                            .get(&keys::subscription_cursor_key(&sub.id))
                            .await
                        {
                            Ok(Some(v)) => String::from_utf8_lossy(&v.value).parse().unwrap_or(0),
                            Ok(None) => 0,
                            Err(_) => continue,
                        };
                        let start = acked.max(sub.from.saturating_sub(1));
                        let (tx, rx) = mpsc::channel(options.queue.max(1));
                        let task = AbortOnDrop(tokio::spawn(send_loop(
                            registry.store_arc(),
                            client.clone(),
                            sub.clone(),
                            rx,
                            options.max_backoff,
                            metrics.clone(),
                        )));
                        subscribers.insert(
                            sub.id.clone(),
                            Subscriber {
                                sub,
                                tx,
                                dispatched: start,
                                dropped: 0,
                                _task: task,
                            },
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "notifications: cannot list subscriptions"),
            }
        }
        let Some(from) = subscribers.values().map(|s| s.dispatched).min() else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        let head = match crate::audit::head(registry.store()).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "notifications: cannot read the audit log");
                tokio::time::sleep(POLL * 10).await;
                continue;
            }
        };
        if head <= from {
            tokio::time::sleep(POLL).await;
            continue;
        }
        let records = match crate::audit::page(
            registry.store(),
            registry.audit_key(),
            from + 1,
            READ_BUDGET,
            |_| true,
        )
        .await
        {
            Ok((r, _)) => {
                failing = false;
                r
            }
            Err(e) => {
                // An altered or forged record is never delivered; the log stays stuck
                // here until an operator looks (audit verify), loudly.
                if !failing {
                    tracing::error!(error = %e, "notifications: the audit log does not verify; not delivering");
                }
                failing = true;
                tokio::time::sleep(POLL * 50).await;
                continue;
            }
        };
        for rec in &records {
            // The tracker hears of catalog versions from the log, so that a version's
            // `catalog.acknowledged` always comes after its `catalog.applied`.
            if let Some((vnf, version)) = catalog_of(&rec.detail)
                && let Ok(vnf) = vnf.parse::<VnfId>()
            {
                let _ = match rec.kind.as_str() {
                    "catalog.applied" => acks.send(Track::Applied(vnf, version)),
                    "catalog.acknowledged" => acks.send(Track::Announced(vnf, version)),
                    _ => Ok(()),
                };
            }
            let Some(kind) = event_type(&rec.kind) else {
                for s in subscribers.values_mut() {
                    s.dispatched = s.dispatched.max(rec.seq);
                }
                continue;
            };
            if !subscribers
                .values()
                .any(|s| s.dispatched < rec.seq && s.sub.wants(kind))
            {
                for s in subscribers.values_mut() {
                    s.dispatched = s.dispatched.max(rec.seq);
                }
                continue;
            }
            let event = event_json(&registry, rec, kind).await;
            let read_at = Instant::now();
            for s in subscribers.values_mut() {
                if s.dispatched >= rec.seq {
                    continue;
                }
                s.dispatched = rec.seq;
                if !s.sub.wants(kind) {
                    continue;
                }
                let mut e = event.clone();
                e.insert("subscription".into(), s.sub.id.clone().into());
                if s.dropped > 0 {
                    e.insert("dropped_before".into(), s.dropped.into());
                }
                let body = serde_json::to_vec(&e).unwrap_or_default();
                match s.tx.try_send(Outgoing {
                    seq: rec.seq,
                    body,
                    read_at,
                }) {
                    Ok(()) => s.dropped = 0,
                    Err(_) => {
                        s.dropped += 1;
                        if let Some(m) = &metrics {
                            m.notifications
                                .get_or_create(&vec![("outcome".into(), "dropped".into())])
                                .inc();
                        }
                    }
                }
            }
        }
    }
}

/// The JSON of the event of audit record `rec`.
async fn event_json<S: Store>(
    registry: &Registry<S>,
    rec: &AuditRecord,
    kind: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let mut e = serde_json::Map::new();
    e.insert("id".into(), rec.seq.into());
    e.insert("type".into(), kind.into());
    e.insert("time".into(), rec.time.into());
    e.insert("audit_kind".into(), rec.kind.clone().into());
    e.insert("detail".into(), rec.detail.clone().into());
    if let Some(id) = &rec.instance {
        // Read for each event: the state is the instance's when the event is read.
        let names = match hex::decode(id)
            .ok()
            .and_then(|b| InstanceKey::from_slice(&b))
        {
            Some(key) => match registry.instance(&key).await {
                Ok(Some((r, _))) => serde_json::to_value(names_of(&r)).ok(),
                _ => None,
            },
            None => None,
        };
        e.insert(
            "instance".into(),
            names.unwrap_or_else(|| serde_json::json!({"id": id})),
        );
    }
    if let Some((vnf, version)) = catalog_of(&rec.detail)
        && rec.kind.starts_with("catalog.")
    {
        e.insert(
            "catalog".into(),
            serde_json::json!({"vnf": vnf, "version": version}),
        );
    }
    e
}

fn names_of(r: &InstanceRecord) -> InstanceNames {
    InstanceNames {
        id: r.id.to_hex(),
        tenant: r.tenant.to_string(),
        vnf: r.vnf.to_string(),
        name: r.instance.to_string(),
        state: match r.state {
            InstanceState::Created => "created",
            InstanceState::Enrolled => "enrolled",
            InstanceState::Quarantined(_) => "quarantined",
            InstanceState::Revoked(_) => "revoked",
        }
        .into(),
    }
}

/// `<vnf> catalog version <n>...` (the detail of catalog records).
fn catalog_of(detail: &str) -> Option<(String, u64)> {
    let (vnf, rest) = detail.split_once(" catalog version ")?;
    let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((vnf.to_string(), n.parse().ok()?))
}

/// Sends one subscriber's events in order, each until it is acknowledged (2xx), and
/// keeps its position in the store.
async fn send_loop<S: Store>(
    store: Arc<S>,
    client: reqwest::Client,
    sub: Subscription,
    mut rx: mpsc::Receiver<Outgoing>,
    max_backoff: Duration,
    metrics: Option<Arc<Metrics>>,
) {
    let count = |outcome: &str| {
        if let Some(m) = &metrics {
            m.notifications
                .get_or_create(&vec![("outcome".into(), outcome.into())])
                .inc();
        }
    };
    let mut saved = Instant::now();
    while let Some(ev) = rx.recv().await {
        let mut backoff = Duration::from_millis(100);
        // Bounded by the subscription: deleting it aborts this task.
        for attempt in 0u64.. {
            let t = crate::service::now();
            let outcome = client
                .post(&sub.callback)
                .header("content-type", "application/json")
                .header("asmn-signature", signature(&sub.secret, t, &ev.body))
                .header("asmn-delivery", ev.seq.to_string())
                .body(ev.body.clone())
                .send()
                .await;
            match outcome {
                Ok(r) if r.status().is_success() => break,
                other => {
                    count("retried");
                    if attempt == 0 || attempt.is_power_of_two() {
                        // Not the URL: its query may hold the orchestrator's token.
                        let why = match other {
                            Ok(r) => format!("answered {}", r.status()),
                            Err(e) => e.without_url().to_string(),
                        };
                        tracing::warn!(subscription = %sub.id, event = ev.seq, attempt, %why, "notification not delivered; retrying");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(max_backoff);
                }
            }
        }
        count("delivered");
        if let Some(m) = &metrics {
            m.notification_seconds
                .observe(ev.read_at.elapsed().as_secs_f64());
        }
        // The position, at most twice a second and whenever the queue is empty (a
        // failed save is made good by the next one; until then a restart redelivers).
        if rx.is_empty() || saved.elapsed() >= Duration::from_millis(500) {
            if let Err(e) = store
                .put(
                    &keys::subscription_cursor_key(&sub.id),
                    ev.seq.to_string().into_bytes(),
                )
                .await
            {
                tracing::warn!(subscription = %sub.id, error = %e, "cannot save the subscription's position");
            }
            saved = Instant::now();
        }
    }
}

/// Watches instances and acknowledgements, hears of catalog versions from the log, and
/// records `catalog.acknowledged` when every agent of a VNF that was enrolled when the
/// version's `catalog.applied` was read (and still is) has acknowledged it (at once when
/// none is waiting: "in force everywhere" holds as soon as it is applied).
struct AckTracker;

/// What the dispatcher tells the tracker, from the log.
enum Track {
    /// `catalog.applied`: wait for this version's acknowledgements.
    Applied(VnfId, u64),
    /// `catalog.acknowledged` is in the log already (a redelivery after a restart):
    /// do not record it again.
    Announced(VnfId, u64),
}

#[derive(Default)]
struct AckState {
    /// Instance ID (hex) -> its VNF, if enrolled.
    enrolled: HashMap<String, VnfId>,
    /// Instance ID (hex) -> the version it acknowledged.
    acked: HashMap<String, u64>,
    /// VNF -> the version in force.
    versions: BTreeMap<VnfId, u64>,
    /// VNF -> (version, agents still to acknowledge, agents in all, since when).
    pending: BTreeMap<VnfId, (u64, HashSet<String>, usize, Instant)>,
}

impl AckState {
    fn announced(&mut self, vnf: &VnfId, version: u64) {
        if self.pending.get(vnf).is_some_and(|(v, ..)| *v <= version) {
            self.pending.remove(vnf);
        }
    }

    fn catalog(&mut self, vnf: VnfId, version: u64, track: bool) {
        if self.versions.get(&vnf).is_some_and(|v| *v >= version) {
            return;
        }
        self.versions.insert(vnf.clone(), version);
        let agents: HashSet<String> = self
            .enrolled
            .iter()
            .filter(|(_, v)| **v == vnf)
            .map(|(id, _)| id.clone())
            .collect();
        let total = agents.len();
        let waiting: HashSet<String> = agents
            .into_iter()
            .filter(|id| self.acked.get(id).is_none_or(|a| *a < version))
            .collect();
        if track {
            self.pending
                .insert(vnf, (version, waiting, total, Instant::now()));
        }
    }

    /// The VNFs whose pending version is now acknowledged by all, taken out.
    fn done(&mut self) -> Vec<(VnfId, u64, usize, u64)> {
        let finished: Vec<VnfId> = self
            .pending
            .iter()
            .filter(|(_, (_, waiting, _, _))| waiting.is_empty())
            .map(|(v, _)| v.clone())
            .collect();
        finished
            .into_iter()
            .filter_map(|vnf| {
                let (version, _, total, since) = self.pending.remove(&vnf)?;
                let ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
                Some((vnf, version, total, ms))
            })
            .collect()
    }

    fn ack(&mut self, id: &str, version: u64) {
        self.acked.insert(id.to_string(), version);
        if let Some(vnf) = self.enrolled.get(id)
            && let Some((v, waiting, _, _)) = self.pending.get_mut(vnf)
            && version >= *v
        {
            waiting.remove(id);
        }
    }

    fn instance(&mut self, id: &str, rec: Option<InstanceRecord>) {
        match rec {
            Some(r) if r.state == InstanceState::Enrolled => {
                self.enrolled.insert(id.to_string(), r.vnf);
            }
            _ => {
                self.enrolled.remove(id);
                for (_, waiting, _, _) in self.pending.values_mut() {
                    waiting.remove(id);
                }
            }
        }
    }
}

fn last_segment(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

impl AckTracker {
    fn spawn<S: Store>(registry: Arc<Registry<S>>) -> (mpsc::UnboundedSender<Track>, AbortOnDrop) {
        let (tx, mut commands) = mpsc::unbounded_channel::<Track>();
        let task = AbortOnDrop(tokio::spawn(async move {
            let store = registry.store_arc();
            let mut instances =
                crate::store::watch_prefix(Arc::clone(&store), &keys::instances_prefix());
            let mut acks = crate::store::watch_prefix(Arc::clone(&store), &keys::acks_prefix());
            let mut st = AckState::default();
            // Versions are taken once both first listings are in.
            let mut ready = (false, false);
            loop {
                tokio::select! {
                    Some(ev) = instances.events.recv() => match ev {
                        Event::Reset(l) => {
                            st.enrolled.clear();
                            for (k, v) in &l.entries {
                                st.instance(last_segment(k), crate::registry::decode(&v.value).ok());
                            }
                            ready.0 = true;
                        }
                        Event::Change(RawEvent::Put { key, value, .. }) => {
                            st.instance(last_segment(&key), crate::registry::decode(&value).ok());
                        }
                        Event::Change(RawEvent::Delete { key, .. }) => st.instance(last_segment(&key), None),
                    },
                    Some(ev) = acks.events.recv() => match ev {
                        Event::Reset(l) => {
                            for (k, v) in &l.entries {
                                if let Some(n) = ack_version(&v.value) {
                                    st.ack(last_segment(k), n);
                                }
                            }
                            ready.1 = true;
                        }
                        Event::Change(RawEvent::Put { key, value, .. }) => {
                            if let Some(n) = ack_version(&value) {
                                st.ack(last_segment(&key), n);
                            }
                        }
                        Event::Change(RawEvent::Delete { .. }) => {}
                    },
                    Some(cmd) = commands.recv(), if ready.0 && ready.1 => match cmd {
                        Track::Applied(vnf, version) => st.catalog(vnf, version, true),
                        Track::Announced(vnf, version) => st.announced(&vnf, version),
                    },
                    else => return,
                }
                for (vnf, version, agents, ms) in st.done() {
                    if let Err(e) = registry
                        .catalog_acknowledged(crate::service::now(), &vnf, version, agents, ms)
                        .await
                    {
                        tracing::warn!(error = %e, %vnf, version, "cannot record a catalog acknowledged by all");
                    }
                }
            }
        }));
        (tx, task)
    }
}

fn ack_version(value: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()?
        .get("version")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_body_or_old_timestamp_does_not() {
        let secret = "11".repeat(32);
        let body = br#"{"id":1}"#;
        let h = signature(&secret, 1_000, body);
        assert_eq!(verify_signature(&secret, &h, body, 1_010, 300), Ok(()));
        assert!(verify_signature(&secret, &h, br#"{"id":2}"#, 1_010, 300).is_err());
        assert!(verify_signature(&secret, &h, body, 2_000, 300).is_err());
        assert!(verify_signature(&"22".repeat(32), &h, body, 1_010, 300).is_err());
        // The timestamp is under the MAC: moving it forward breaks the signature.
        let moved = h.replace("t=1000", "t=1900");
        assert!(verify_signature(&secret, &moved, body, 1_910, 300).is_err());
    }

    #[test]
    fn callbacks_are_http_urls_without_credentials() {
        assert!(check_callback("http://127.0.0.1:9000/events").is_ok());
        assert!(check_callback("https://nfvo.example/asmn").is_ok());
        for bad in [
            "ftp://x/",
            "http://user:pw@x/",
            "not a url",
            "http://",
            "http://x/#frag",
        ] {
            assert!(check_callback(bad).is_err(), "{bad}");
        }
        assert!(check_callback(&format!("http://x/{}", "a".repeat(MAX_CALLBACK))).is_err());
    }

    #[test]
    fn a_catalog_is_acknowledged_when_every_enrolled_agent_of_its_vnf_has_acked_it() {
        let web: VnfId = "web".parse().expect("vnf");
        let db: VnfId = "db".parse().expect("vnf");
        let mut st = AckState::default();
        st.enrolled.insert("a".into(), web.clone());
        st.enrolled.insert("b".into(), web.clone());
        st.enrolled.insert("c".into(), db.clone());
        st.catalog(web.clone(), 2, true);
        assert!(st.done().is_empty());
        st.ack("a", 2);
        st.ack("c", 2);
        assert!(st.done().is_empty(), "b has not acknowledged");
        st.ack("b", 1);
        assert!(st.done().is_empty(), "an older version does not count");
        st.ack("b", 2);
        let done = st.done();
        assert_eq!(done.len(), 1);
        assert_eq!(
            (done[0].0.clone(), done[0].1, done[0].2),
            (web.clone(), 2, 2)
        );
        // A revoked agent no longer holds a version back.
        st.catalog(web.clone(), 3, true);
        st.ack("a", 3);
        st.instance("b", None);
        assert_eq!(st.done().len(), 1);
        // What is in force at the start is not announced.
        st.catalog(db, 5, false);
        assert!(st.done().is_empty());
    }

    #[test]
    fn catalog_details_name_the_vnf_and_version() {
        assert_eq!(
            catalog_of("web catalog version 12: 3 rules"),
            Some(("web".into(), 12))
        );
        assert_eq!(catalog_of("VNF web on-boarded"), None);
    }
}
