//! The etcd backend (`--store etcd://host:port[,host:port...]`), for several Sec-EM
//! replicas sharing one cluster. etcd 3.4 (Debian 12's `etcd-server`) is the reference.
//!
//! Revisions are etcd's: a key's `mod_revision`, the cluster's header revision. A
//! compare-and-swap is one transaction comparing the key's `mod_revision` (or, for
//! [`Expect::Absent`], its `version` with 0), so two replicas racing on the same reveal
//! see exactly one success.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    AbortOnDrop, Cas, Expect, Listing, RawEvent, RawWatch, Store, StoreError, Versioned, check_key,
    check_value,
};

/// An etcd cluster: one client per member, used in turn. A request goes to the member
/// that answered last; when that member is down (or has lost its leader), reads move on
/// to the next member at once, and writes too when they surely did not reach etcd (the
/// connection could not be made, or the member had no leader). A write whose fate is
/// unknown is reported as unavailable and never retried here: the registry's callers
/// retry it, and a compare-and-swap makes the retry harmless.
///
/// Plain puts made at the same time are grouped into one transaction (group commit: many
/// agents acknowledging a catalog at once cost a few raft entries, not one each).
#[derive(Clone)]
pub struct EtcdStore {
    clients: Vec<Client>,
    current: Arc<AtomicUsize>,
    /// Per member: until when (ms since `epoch`) it is skipped after failing.
    down_until: Arc<Vec<std::sync::atomic::AtomicU64>>,
    epoch: std::time::Instant,
    endpoints: Vec<String>,
    puts: Arc<PutGroup>,
}

/// A put waiting for its group, and where to send its outcome.
type PendingPut = (String, Vec<u8>, oneshot::Sender<Result<u64, StoreError>>);

/// Puts waiting to be written; the caller holding `writer` writes them all.
#[derive(Default)]
struct PutGroup {
    pending: std::sync::Mutex<Vec<PendingPut>>,
    writer: tokio::sync::Mutex<()>,
}

/// Most puts in one transaction (etcd's default `--max-txn-ops` is 128).
const PUT_GROUP: usize = 100;

/// Longest wait for one request to one member: a member killed with requests in flight
/// holds them until this passes, so it bounds how long writes pause when the leader dies.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// The same for listings (they can be large: every instance of a tenant).
const LIST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a member that failed is passed over (others are asked first).
const SKIP_FAILED: Duration = Duration::from_secs(3);

/// Whether a failed request surely did not reach etcd's log (so another member may be
/// asked the same): no connection, or a member without a leader (`require_leader`).
fn not_sent(e: &etcd_client::Error) -> bool {
    let text = format!("{e:?}");
    text.contains("ConnectError") || text.contains("no leader")
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn key_of(kv: &etcd_client::KeyValue) -> Result<String, StoreError> {
    kv.key_str()
        .map(str::to_string)
        .map_err(|_| StoreError::Database("a key is not UTF-8".into()))
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn versioned(kv: &etcd_client::KeyValue) -> Versioned {
    Versioned {
        value: kv.value().to_vec(),
        revision: rev(kv.mod_revision()),
    }
}

/// How Sec-EM authenticates to etcd and etcd to Sec-EM.
#[derive(Clone, Default)]
pub struct EtcdOptions {
    /// TLS with client certificates (`etcds://`).
    pub tls: Option<EtcdTls>,
    /// An etcd user and its password, when etcd's authentication is enabled.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("tls", &self.tls.is_some())
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The PEM texts of TLS to etcd: the CA that signed the members' certificates, and this
/// client's certificate and key (etcd runs with `--client-cert-auth`).
#[derive(Clone)]
pub struct EtcdTls {
    /// The CA certificate(s).
    pub ca_pem: String,
    /// The client certificate (empty: none, which etcd refuses; for tests).
    pub cert_pem: String,
    /// The client key.
    pub key_pem: String,
}

impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdTls(<CA, certificate, redacted key>)")
    }
}

/// Whether `url` is `etcds://` (TLS).
pub fn is_tls(url: &str) -> bool {
    url.starts_with("etcds://")
}

/// Parses `etcd://host:port[,host:port...]` (plaintext) or `etcds://...` (TLS) into
/// endpoint URLs.
pub fn parse_url(url: &str) -> Result<Vec<String>, StoreError> {
    let (scheme, rest) = match (url.strip_prefix("etcds://"), url.strip_prefix("etcd://")) {
        (Some(rest), _) => ("https", rest),
        (None, Some(rest)) => ("http", rest),
        (None, None) => {
            return Err(StoreError::Invalid(format!(
                "store URL {url:?} must look like etcds://host:port[,host:port...] (or etcd:// for plaintext)"
            )));
        }
    };
    let endpoints: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|hp| format!("{scheme}://{hp}"))
        .collect();
    if endpoints.is_empty() || rest.split(',').any(|hp| !hp.trim().contains(':')) {
        return Err(StoreError::Invalid(format!(
            "store URL {url:?} must name at least one host:port"
        )));
    }
    Ok(endpoints)
}

impl EtcdStore {
    /// Connects to the cluster at `etcd://host:port[,host:port...]`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, &EtcdOptions::default()).await
    }

    /// Connects to the cluster at `url` with `settings`: `etcds://` needs TLS settings,
    /// `etcd://` refuses them (no silent downgrade either way).
    pub async fn connect_with(url: &str, settings: &EtcdOptions) -> Result<Self, StoreError> {
        let endpoints = parse_url(url)?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_require_leader(true);
        match (is_tls(url), &settings.tls) {
            (true, None) => {
                return Err(StoreError::Invalid(
                    "etcds:// needs the CA, a client certificate and its key".into(),
                ));
            }
            (false, Some(_)) => {
                return Err(StoreError::Invalid(
                    "TLS settings for a plaintext etcd:// URL: use etcds://".into(),
                ));
            }
            (true, Some(t)) => {
                let mut tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&t.ca_pem));
                // Without a client certificate only in tests that must be refused.
                if !t.cert_pem.is_empty() {
                    tls = tls.identity(etcd_client::Identity::from_pem(&t.cert_pem, &t.key_pem));
                }
                options = options.with_tls(tls);
            }
            (false, None) => {}
        }
        if let Some((user, password)) = &settings.user {
            options = options.with_user(user.clone(), password.clone());
        }
        let mut clients = Vec::with_capacity(endpoints.len());
        for e in &endpoints {
            // Lazy: a member that is down now is tried when its turn comes.
            clients.push(
                Client::connect([e.as_str()], Some(options.clone()))
                    .await
                    .map_err(unavailable)?,
            );
        }
        let store = Self {
            down_until: Arc::new(
                (0..clients.len())
                    .map(|_| std::sync::atomic::AtomicU64::new(0))
                    .collect(),
            ),
            epoch: std::time::Instant::now(),
            clients,
            current: Arc::new(AtomicUsize::new(0)),
            endpoints,
            puts: Arc::new(PutGroup::default()),
        };
        // Fail now, with a clear message, if no member answers.
        store.list("/asmn/v1/-probe-").await?;
        Ok(store)
    }

    /// Runs `op` on the current member, moving on to the others as described on
    /// [`EtcdStore`]. `write`: the request changes the store.
    async fn call<T, F, Fut>(&self, write: bool, op: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_within(REQUEST_TIMEOUT, write, op).await
    }

    async fn call_within<T, F, Fut>(
        &self,
        limit: Duration,
        write: bool,
        op: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let now = || u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Members that failed recently go last: a request goes to a live member at once.
        let mut order: Vec<usize> = (0..n).map(|k| (first + k) % n).collect();
        let t = now();
        order.sort_by_key(|&i| self.down_until[i].load(Ordering::Relaxed) > t);
        let mut last = String::new();
        for i in order {
            let outcome = tokio::time::timeout(limit, op(self.clients[i].clone())).await;
            let retry = match outcome {
                Ok(Ok(v)) => {
                    self.current.store(i, Ordering::Relaxed);
                    self.down_until[i].store(0, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) => {
                    let retry = !write || not_sent(&e);
                    last = format!("{}: {e}", self.endpoints[i]);
                    retry
                }
                Err(_) => {
                    last = format!("{}: no answer within {limit:?}", self.endpoints[i]);
                    !write
                }
            };
            // This member failed: pass it over for a while; the next request starts at
            // the next member.
            let skip = u64::try_from(SKIP_FAILED.as_millis()).unwrap_or(u64::MAX);
            self.down_until[i].store(now().saturating_add(skip), Ordering::Relaxed);
            self.current.store((i + 1) % n, Ordering::Relaxed);
            if !retry {
                break;
            }
        }
        Err(StoreError::Unavailable(last))
    }

    /// Compacts the cluster's history up to `revision` (tests and maintenance).
    pub async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let r = i64::try_from(revision)
            .map_err(|_| StoreError::Invalid("revision too large".into()))?;
        self.call(true, |mut c| async move { c.compact(r, None).await })
            .await?;
        Ok(())
    }
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> u64 {
    h.map_or(0, |h| rev(h.revision()))
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let resp = self
            .call(false, |mut c| async move { c.get(key, None).await })
            .await?;
        Ok(resp.kvs().first().map(versioned))
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let (done, mut outcome) = oneshot::channel();
        if let Ok(mut p) = self.puts.pending.lock() {
            p.push((key.to_string(), value, done));
        }
        let writer = self.puts.writer.lock().await;
        // Written by the writer before us?
        if let Ok(r) = outcome.try_recv() {
            return r;
        }
        loop {
            let group: Vec<PendingPut> = match self.puts.pending.lock() {
                Ok(mut p) => {
                    let n = p.len().min(PUT_GROUP);
                    p.drain(..n).collect()
                }
                Err(_) => Vec::new(),
            };
            if group.is_empty() {
                break;
            }
            // A key twice in one transaction is refused by etcd: the later value wins, as
            // if the two puts had been applied one after the other.
            let mut last: std::collections::HashMap<&str, &[u8]> = std::collections::HashMap::new();
            for (k, v, _) in &group {
                last.insert(k.as_str(), v.as_slice());
            }
            let ops: Vec<TxnOp> = last
                .into_iter()
                .map(|(k, v)| TxnOp::put(k, v, None))
                .collect();
            let result = self
                .call(true, |mut c| {
                    let txn = Txn::new().and_then(ops.clone());
                    async move { c.txn(txn).await }
                })
                .await
                .map(|resp| header_revision(resp.header()));
            for (_, _, done) in group {
                let _ = done.send(result.clone());
            }
        }
        drop(writer);
        outcome.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the put group's writer stopped".into(),
            ))
        })
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<Cas, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let cmp = match expect {
            Expect::Absent => Compare::version(key, CompareOp::Equal, 0),
            Expect::Revision(r) => Compare::mod_revision(
                key,
                CompareOp::Equal,
                i64::try_from(r).map_err(|_| StoreError::Invalid("revision too large".into()))?,
            ),
        };
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .call(true, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if resp.succeeded() {
            return Ok(Cas::Swapped {
                revision: header_revision(resp.header()),
            });
        }
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(versioned)),
            _ => None,
        });
        Ok(Cas::Conflict {
            current: current.flatten(),
        })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let resp = self
            .call(true, |mut c| async move { c.delete(key, None).await })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        let resp = self
            .call_within(LIST_TIMEOUT, false, |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let mut entries = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let key = kv
                .key_str()
                .map_err(|_| StoreError::Database("a key is not UTF-8".into()))?
                .to_string();
            entries.push((key, versioned(kv)));
        }
        Ok(Listing {
            entries,
            revision: header_revision(resp.header()),
        })
    }

    async fn list_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        let start = super::page_start(prefix, after);
        let end = super::prefix_end(prefix);
        let limit = i64::try_from(limit.max(1)).unwrap_or(i64::MAX);
        let resp = self
            .call_within(LIST_TIMEOUT, false, |mut c| {
                let (start, end) = (start.clone(), end.clone());
                async move {
                    c.get(
                        start,
                        Some(
                            GetOptions::new()
                                .with_range(end)
                                .with_limit(limit)
                                .with_sort(SortTarget::Key, SortOrder::Ascend),
                        ),
                    )
                    .await
                }
            })
            .await?;
        let mut entries = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            entries.push((key_of(kv)?, versioned(kv)));
        }
        Ok(Listing {
            entries,
            revision: header_revision(resp.header()),
        })
    }

    async fn last(&self, prefix: &str) -> Result<Option<(String, Versioned)>, StoreError> {
        let end = super::prefix_end(prefix);
        let resp = self
            .call_within(REQUEST_TIMEOUT, false, |mut c| {
                let end = end.clone();
                async move {
                    c.get(
                        prefix,
                        Some(
                            GetOptions::new()
                                .with_range(end)
                                .with_limit(1)
                                .with_sort(SortTarget::Key, SortOrder::Descend),
                        ),
                    )
                    .await
                }
            })
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some((key_of(kv)?, versioned(kv)))),
        }
    }

    async fn watch_raw(&self, prefix: &str, from: u64) -> Result<RawWatch, StoreError> {
        let start =
            i64::try_from(from).map_err(|_| StoreError::Invalid("revision too large".into()))?;
        let mut stream = self
            .call(false, |mut c| async move {
                c.watch(
                    prefix,
                    Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                )
                .await
            })
            .await?;
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            loop {
                let resp = match stream.message().await {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        let _ = tx
                            .send(Err(StoreError::Broken("etcd closed the watch".into())))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(StoreError::Broken(e.to_string()))).await;
                        return;
                    }
                };
                if resp.compact_revision() > 0 {
                    let _ = tx
                        .send(Err(StoreError::Compacted(rev(resp.compact_revision()))))
                        .await;
                    return;
                }
                if resp.canceled() {
                    let _ = tx
                        .send(Err(StoreError::Broken(format!(
                            "etcd canceled the watch: {}",
                            resp.cancel_reason()
                        ))))
                        .await;
                    return;
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let Ok(key) = kv.key_str() else { continue };
                    let out = match ev.event_type() {
                        EventType::Put => RawEvent::Put {
                            key: key.to_string(),
                            value: kv.value().to_vec(),
                            revision: rev(kv.mod_revision()),
                        },
                        EventType::Delete => RawEvent::Delete {
                            key: key.to_string(),
                            revision: rev(kv.mod_revision()),
                        },
                    };
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(RawWatch {
            events: rx,
            _task: AbortOnDrop(task),
        })
    }
}
