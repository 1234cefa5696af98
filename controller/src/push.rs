//! Pushes to connected agents: catalog versions and revocations.
//!
//! Changes are taken from store watches ([`crate::store::watch_prefix`]), not from the
//! request that made them, so an agent connected to any Sec-EM replica hears of a change
//! made through any other. Each enrolled connection gets one unidirectional stream on
//! which Sec-EM writes frames; a slow or gone agent loses its queue (bounded), not the
//! others'. A reconnecting agent is sent the current catalog when it enrolls again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use asmn_shared::catalog::SecCatalog;
use asmn_shared::ids::{InstanceKey, TenantId, VnfId};
use asmn_shared::wire::{self, msg};
use tokio::sync::mpsc;

use crate::registry::{InstanceRecord, InstanceState, catalog_prefix};
use crate::store::{AbortOnDrop, Event, RawEvent, Store, watch_prefix};

/// Frames queued per agent before pushes to it are dropped (it re-syncs on reconnect).
pub const QUEUE: usize = 256;

struct Agent {
    tenant: TenantId,
    vnf: VnfId,
    tx: mpsc::Sender<msg::Envelope>,
}

/// The connected agents.
#[derive(Default)]
pub struct PushHub {
    agents: Mutex<HashMap<InstanceKey, Agent>>,
}

impl std::fmt::Debug for PushHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.agents.lock().map_or(0, |a| a.len());
        write!(f, "PushHub({n} agents)")
    }
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

    /// Connected agents.
    pub fn len(&self) -> usize {
        self.agents.lock().map_or(0, |a| a.len())
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers an enrolled agent's connection: opens its push stream, sends `first`
    /// (the catalog in force: what a reconnecting agent may have missed), and returns the
    /// task that writes the stream (owned by the connection's task).
    pub fn attach(
        self: &Arc<Self>,
        conn: quinn::Connection,
        id: InstanceKey,
        tenant: TenantId,
        vnf: VnfId,
        first: msg::Body,
    ) -> AbortOnDrop {
        let (tx, mut rx) = mpsc::channel::<msg::Envelope>(QUEUE);
        let _ = tx.try_send(push(first));
        if let Ok(mut a) = self.agents.lock() {
            a.insert(id, Agent { tenant, vnf, tx });
        }
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
            if let Ok(mut a) = hub.agents.lock() {
                a.remove(&id);
            }
        }))
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

    /// Pushes a catalog to the agents of its VNF; how many were sent it.
    pub fn push_catalog(&self, c: &SecCatalog) -> usize {
        let env = push(msg::Body::CatalogPush(c.into()));
        self.send_where(&env, |_, a| a.vnf == c.vnf)
    }

    /// Pushes a revocation to every agent of the tenant (its peers and itself).
    pub fn push_revocation(&self, tenant: &TenantId, id: &InstanceKey, reason: &str) -> usize {
        let env = push(msg::Body::Revoked(msg::RevokeNotice {
            instance_key: id.as_bytes().to_vec(),
            reason: reason.to_string(),
        }));
        self.send_where(&env, |_, a| &a.tenant == tenant)
    }

    /// Sends `body` to one agent, if connected here.
    pub fn push_to(&self, id: &InstanceKey, body: msg::Body) -> bool {
        let env = push(body);
        self.send_where(&env, |k, _| k == id) == 1
    }
}

/// Follows catalogs and instance states in the store and pushes their changes. Runs
/// until dropped.
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
        loop {
            tokio::select! {
                Some(ev) = catalogs.events.recv() => match ev {
                    // A fresh listing: agents already have these, or get them when they enroll.
                    Event::Reset(_) => {}
                    Event::Change(RawEvent::Put { value, .. }) => {
                        if let Ok(c) = serde_json::from_slice::<SecCatalog>(&value) {
                            if let Some(m) = &metrics {
                                m.catalog_pushed(c.vnf.as_str(), c.version);
                            }
                            let n = hub.push_catalog(&c);
                            tracing::info!(vnf = %c.vnf, version = c.version, agents = n, "catalog pushed");
                        }
                    }
                    Event::Change(RawEvent::Delete { .. }) => {}
                },
                Some(ev) = instances.events.recv() => match ev {
                    Event::Reset(_) => {}
                    Event::Change(RawEvent::Put { value, .. }) => {
                        if let Ok(rec) = serde_json::from_slice::<InstanceRecord>(&value)
                            && let InstanceState::Revoked(reason) = &rec.state
                            && let Some(id) = hex::decode(&rec.id).ok().and_then(|b| InstanceKey::from_slice(&b))
                        {
                            let n = hub.push_revocation(&rec.tenant, &id, reason);
                            tracing::info!(instance = %rec.id, agents = n, "revocation pushed");
                        }
                    }
                    Event::Change(RawEvent::Delete { .. }) => {}
                },
                else => return,
            }
        }
    }))
}
