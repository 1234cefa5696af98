//! Pushes to connected agents: catalog versions and revocations.
//!
//! Changes are taken from store watches ([`crate::store::watch_prefix`]), not from the
//! request that made them, so an agent connected to any Sec-EM replica hears of a change
//! made through any other. Each enrolled connection gets one unidirectional stream on
//! which Sec-EM writes frames; a slow or gone agent loses its queue (bounded), not the
//! others'. A reconnecting agent is sent, when it enrolls again, the catalog in force and
//! every revocation of its tenant: what it may have missed while away.
//!
//! The follower keeps a summary of what it last saw and pushes differences, so a watch
//! that breaks and re-lists (a `Reset`) pushes what changed during the break, once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use asmn_shared::catalog::SecCatalog;
use asmn_shared::ids::{InstanceKey, Role, TenantId, VnfId};
use asmn_shared::wire::{self, msg};
use tokio::sync::mpsc;

use crate::registry::{InstanceRecord, InstanceState, catalog_prefix};
use crate::store::{AbortOnDrop, Event, RawEvent, Store, watch_prefix};

/// Frames queued per agent before pushes to it are dropped (it re-syncs on reconnect).
pub const QUEUE: usize = 256;

/// The most frames queued for one agent at its attach (the catalogs and revocations in
/// force besides [`QUEUE`]).
pub const MAX_QUEUE: usize = 65_536;

struct Agent {
    tenant: TenantId,
    vnf: VnfId,
    role: Role,
    tx: mpsc::Sender<msg::Envelope>,
    /// Which attach this is: a connection's writer removes its own entry only, never
    /// the newer connection's of the same instance.
    generation: u64,
    /// The connection's `stable_id`: a closing connection detaches only itself.
    conn: usize,
}

/// The connected agents.
#[derive(Default)]
pub struct PushHub {
    agents: Mutex<HashMap<InstanceKey, Agent>>,
    generations: std::sync::atomic::AtomicU64,
    /// Revoked instances per tenant (with the reason), for agents that reconnect.
    revoked: Mutex<HashMap<TenantId, BTreeMap<InstanceKey, String>>>,
    /// Whether the follower has listed the instances once (so `revoked` is complete).
    primed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PushHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.agents.lock().map_or(0, |a| a.len());
        write!(f, "PushHub({n} agents)")
    }
}

fn revocation(id: &InstanceKey, reason: &str) -> msg::Envelope {
    push(msg::Body::Revoked(msg::RevokeNotice {
        instance_key: id.as_bytes().to_vec(),
        reason: reason.to_string(),
    }))
}

fn push(body: msg::Body) -> msg::Envelope {
    msg::Envelope {
        request_id: 0,
        body: Some(body),
    }
}

impl PushHub {
    /// An empty hub.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Whether the revocations in force are known (the follower's first listing is
    /// done): before that an attaching agent could miss one, so Sec-EM asks it to come
    /// back (`Unavailable`).
    pub fn primed(&self) -> bool {
        self.primed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Connected agents.
    pub fn len(&self) -> usize {
        self.agents.lock().map_or(0, |a| a.len())
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers an enrolled agent's connection: opens its push stream, sends `first`
    /// (the catalogs in force: what a reconnecting agent may have missed), and returns the
    /// task that writes the stream (owned by the connection's task).
    pub fn attach(
        self: &Arc<Self>,
        conn: quinn::Connection,
        id: InstanceKey,
        (tenant, vnf, role): (TenantId, VnfId, Role),
        first: Vec<msg::Body>,
    ) -> AbortOnDrop {
        // Room for what is queued now besides the queue of later pushes: every
        // revocation of the tenant must reach the agent, however many there are.
        let revoked_now = self
            .revoked
            .lock()
            .ok()
            .and_then(|r| r.get(&tenant).map(BTreeMap::len))
            .unwrap_or(0);
        let room = (QUEUE + first.len() + revoked_now).min(MAX_QUEUE);
        let (tx, mut rx) = mpsc::channel::<msg::Envelope>(room);
        for body in first {
            let _ = tx.try_send(push(body));
        }
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Attached before the revocations are copied: one recorded after the copy is
        // pushed to this agent by `push_revocation` (which records, then sends to the
        // agents attached); one recorded before is in the copy. (Twice is harmless.)
        if let Ok(mut a) = self.agents.lock() {
            a.insert(
                id,
                Agent {
                    tenant: tenant.clone(),
                    vnf,
                    role,
                    tx: tx.clone(),
                    generation,
                    conn: conn.stable_id(),
                },
            );
        }
        let revoked: Vec<_> = self
            .revoked
            .lock()
            .ok()
            .and_then(|r| r.get(&tenant).cloned())
            .unwrap_or_default()
            .into_iter()
            .collect();
        for (rid, reason) in revoked {
            // Beyond MAX_QUEUE the agent learns of the rest from a refused VerifyPeer.
            let _ = tx.try_send(revocation(&rid, &reason));
        }
        drop(tx);
        let hub = Arc::clone(self);
        AbortOnDrop(tokio::spawn(async move {
            let done = async {
                let mut stream = conn.open_uni().await.ok()?;
                while let Some(env) = rx.recv().await {
                    let frame = wire::encode_frame(&env).ok()?;
                    stream.write_all(&frame).await.ok()?;
                }
                Some(())
            };
            let _ = done.await;
            if let Ok(mut a) = hub.agents.lock()
                && a.get(&id).is_some_and(|x| x.generation == generation)
            {
                a.remove(&id);
            }
        }))
    }

    /// Detaches instance `id` if connection `conn` (its `stable_id`) is the one it is
    /// attached by; whether it was (false: it has reconnected since, or never attached).
    pub fn detach(&self, id: &InstanceKey, conn: usize) -> bool {
        let Ok(mut a) = self.agents.lock() else {
            return false;
        };
        if a.get(id).is_some_and(|x| x.conn == conn) {
            a.remove(id);
            return true;
        }
        false
    }

    fn send_where(
        &self,
        env: &msg::Envelope,
        pred: impl Fn(&InstanceKey, &Agent) -> bool,
    ) -> usize {
        let Ok(agents) = self.agents.lock() else {
            return 0;
        };
        let mut n = 0;
        for (id, a) in agents.iter() {
            // A full queue means the agent is not reading: it re-syncs when it reconnects.
            if pred(id, a) && a.tx.try_send(env.clone()).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Pushes a catalog to the agents of its VNF and to the gateways that enforce it;
    /// how many were sent it.
    pub fn push_catalog(&self, c: &SecCatalog) -> usize {
        let env = push(msg::Body::CatalogPush(c.into()));
        self.send_where(&env, |_, a| {
            a.vnf == c.vnf || (a.role == Role::Gateway && c.gateway.as_ref() == Some(&a.vnf))
        })
    }

    /// Pushes a revocation to every agent of the tenant (its peers and itself), and
    /// remembers it for agents of the tenant that connect later.
    pub fn push_revocation(&self, tenant: &TenantId, id: &InstanceKey, reason: &str) -> usize {
        if let Ok(mut r) = self.revoked.lock() {
            r.entry(tenant.clone())
                .or_default()
                .insert(*id, reason.to_string());
        }
        self.send_where(&revocation(id, reason), |_, a| &a.tenant == tenant)
    }

    /// Tells the other agents of its tenant that `id` has new keys (a renewal's epoch, or
    /// a restarted agent): only its identity. Those that have it as a peer ask for it
    /// again (VerifyPeer), which Sec-EM answers only for admitted pairs; the keys never
    /// reach a VNF that Sec-EM refuses.
    pub fn push_rekeyed(&self, tenant: &TenantId, id: &InstanceKey) -> usize {
        let env = push(msg::Body::Rekeyed(msg::RekeyNotice {
            instance_key: id.as_bytes().to_vec(),
        }));
        self.send_where(&env, |k, a| &a.tenant == tenant && k != id)
    }

    /// Sends `body` to one agent, if connected here.
    pub fn push_to(&self, id: &InstanceKey, body: msg::Body) -> bool {
        let env = push(body);
        self.send_where(&env, |k, _| k == id) == 1
    }
}

/// The published keys of an enrolled instance: epoch, WireGuard key, D-H value, endpoint.
type Keys = (
    u32,
    Option<[u8; 32]>,
    Option<Vec<u8>>,
    Option<std::net::SocketAddr>,
);

/// What the follower last saw of one instance.
#[derive(Clone, PartialEq, Eq)]
struct Seen {
    revoked: bool,
    /// (epoch, WireGuard key, D-H value, endpoint) of an enrolled instance.
    keys: Option<Keys>,
}

impl Seen {
    fn of(rec: &InstanceRecord) -> Self {
        Seen {
            revoked: matches!(rec.state, InstanceState::Revoked(_)),
            keys: (rec.state == InstanceState::Enrolled).then(|| {
                (
                    rec.chain.epoch,
                    rec.wg_public_key,
                    rec.dh_public.clone(),
                    rec.endpoint,
                )
            }),
        }
    }
}

/// The follower's memory: catalog versions and instance summaries.
struct Follower {
    hub: Arc<PushHub>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    catalogs: HashMap<String, u64>,
    instances: HashMap<String, Seen>,
}

impl Follower {
    /// A catalog written at `key`; `quiet` only records it (the first listing).
    fn catalog(&mut self, key: &str, value: &[u8], quiet: bool) {
        let Ok(c) = serde_json::from_slice::<SecCatalog>(value) else {
            tracing::warn!(%key, "unreadable catalog in the store");
            return;
        };
        if self.catalogs.insert(key.to_string(), c.version) == Some(c.version) || quiet {
            return;
        }
        if let Some(m) = &self.metrics {
            m.catalog_pushed(c.vnf.as_str(), c.version);
        }
        let n = self.hub.push_catalog(&c);
        tracing::info!(vnf = %c.vnf, version = c.version, agents = n, "catalog pushed");
    }

    /// A request (at `key`, naming the peer) that a peer verify the requester back.
    fn verify_back(&self, key: &str, value: &[u8]) {
        let peer = key
            .strip_prefix(&crate::registry::verify_back_prefix())
            .and_then(|rest| rest.split('/').next())
            .and_then(|h| h.parse::<InstanceKey>().ok());
        let info = <msg::PeerInfo as prost::Message>::decode(value);
        if let (Some(peer), Ok(info)) = (peer, info) {
            let sent = self.hub.push_to(
                &peer,
                msg::Body::VerifyRequested(msg::VerifyRequested { peer: Some(info) }),
            );
            tracing::debug!(%key, sent, "verify-back pushed");
        }
    }

    /// An instance record written at `key`; `quiet` only records it.
    fn instance(&mut self, key: &str, value: &[u8], quiet: bool) {
        let rec = match crate::registry::decode::<InstanceRecord>(value) {
            Ok(rec) => rec,
            Err(e) => {
                tracing::warn!(%key, error = %e, "unreadable instance record in the store");
                return;
            }
        };
        let id = rec.id;
        {};
        let seen = Seen::of(&rec);
        let before = self.instances.insert(key.to_string(), seen.clone());
        if let InstanceState::Revoked(reason) = &rec.state {
            if quiet || before.as_ref().is_some_and(|b| b.revoked) {
                // Remembered for reconnecting agents, not pushed again.
                if let Ok(mut r) = self.hub.revoked.lock() {
                    r.entry(rec.tenant.clone())
                        .or_default()
                        .insert(id, reason.clone());
                }
            } else {
                let n = self.hub.push_revocation(&rec.tenant, &id, reason);
                tracing::info!(instance = %rec.id, agents = n, "revocation pushed");
            }
            return;
        }
        // New keys of an instance that was already enrolled: its peers re-key. (A first
        // enrollment is announced by VerifyPeer, not here.)
        let rekeyed = matches!(
            (&before, &seen.keys),
            (Some(Seen { keys: Some(old), .. }), Some(new)) if old != new
        );
        if rekeyed && !quiet {
            let n = self.hub.push_rekeyed(&rec.tenant, &id);
            tracing::info!(instance = %rec.id, epoch = rec.chain.epoch, agents = n, "new keys announced");
        }
    }
}

/// Follows catalogs and instance states in the store and pushes their changes: catalog
/// versions to the agents of their VNF, revocations and re-key notices to the agents of
/// the tenant. Runs until dropped.
pub fn follow<S: Store>(
    store: Arc<S>,
    hub: Arc<PushHub>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut catalogs = watch_prefix(Arc::clone(&store), &catalog_prefix());
        let mut instances = watch_prefix(
            Arc::clone(&store),
            &format!("{}instances/", crate::store::PREFIX),
        );
        let mut verify_back =
            watch_prefix(Arc::clone(&store), &crate::registry::verify_back_prefix());
        let mut f = Follower {
            hub,
            metrics,
            catalogs: HashMap::new(),
            instances: HashMap::new(),
        };
        // The first listing of each prefix is the state agents get when they enroll.
        let (mut catalogs_listed, mut instances_listed) = (false, false);
        loop {
            tokio::select! {
                Some(ev) = catalogs.events.recv() => match ev {
                    Event::Reset(listing) => {
                        let quiet = !std::mem::replace(&mut catalogs_listed, true);
                        let keys: std::collections::HashSet<&str> =
                            listing.entries.iter().map(|(k, _)| k.as_str()).collect();
                        f.catalogs.retain(|k, _| keys.contains(k.as_str()));
                        for (key, v) in &listing.entries {
                            f.catalog(key, &v.value, quiet);
                        }
                    }
                    Event::Change(RawEvent::Put { key, value, .. }) => f.catalog(&key, &value, false),
                    Event::Change(RawEvent::Delete { key, .. }) => {
                        f.catalogs.remove(&key);
                    }
                },
                Some(ev) = instances.events.recv() => match ev {
                    Event::Reset(listing) => {
                        let quiet = !std::mem::replace(&mut instances_listed, true);
                        let keys: std::collections::HashSet<&str> =
                            listing.entries.iter().map(|(k, _)| k.as_str()).collect();
                        f.instances.retain(|k, _| keys.contains(k.as_str()));
                        for (key, v) in &listing.entries {
                            f.instance(key, &v.value, quiet);
                        }
                        f.hub.primed.store(true, std::sync::atomic::Ordering::Release);
                    }
                    Event::Change(RawEvent::Put { key, value, .. }) => f.instance(&key, &value, false),
                    Event::Change(RawEvent::Delete { key, .. }) => {
                        f.instances.remove(&key);
                    }
                },
                Some(ev) = verify_back.events.recv() => {
                    // Only new requests: a re-listing holds answered ones.
                    if let Event::Change(RawEvent::Put { key, value, .. }) = ev {
                        f.verify_back(&key, &value);
                    }
                }
                else => return,
            }
        }
    }))
}
