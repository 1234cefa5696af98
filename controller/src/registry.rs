//! Sec-EM's decisions over the store: on-boarding, instantiation, enrollment and
//! re-attestation (the paper's Phase 1), revocation and quarantine, each audited.
//!
//! Protocol logic only: no sockets, no clock (the caller passes `now` in seconds), no
//! randomness (the caller passes the nonce). Every accepted reveal is written by
//! compare-and-swap on the instance record's revision before it is acknowledged, so a
//! reveal is accepted at most once even by several Sec-EM replicas on one etcd.
//!
//! Where things live: the decisions about an instance are pure functions in `decide`
//! (record, request, policy and time in; the new record and its audit event, or a
//! refusal, out); [`Registry::update_instance`](Registry) is the one loop that reads a
//! record, asks a decision, stores the result by compare-and-swap and appends the audit
//! event; the records, typed, and their versioned envelope are in `record`; the key
//! schema is `crate::store::keys`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use asmn_shared::catalog::{SecCatalog, Vnfd};
use asmn_shared::chain::{self, ChainSpec, DEFAULT_WINDOW, Reveal};
use asmn_shared::crypto::Nonce;
use asmn_shared::dh::Group;
use asmn_shared::ids::{InstanceKey, InstanceName, Role, TenantId, VnfId};
use asmn_shared::measure::{Algorithm, DigestValue};
use asmn_shared::wire::msg::RefusalCode;
use asmn_shared::wire::{BootstrapBundle, Enroll, Enrolled, Overlay};
use serde::{Deserialize, Serialize};

use crate::audit::AuditLog;
use crate::store::keys::{
    ack_key, acks_prefix, admin_revoked_key, admin_revoked_prefix, catalog_acknowledged_key,
    catalog_history_key, catalog_history_prefix, catalog_key, gateway_key, gateways_prefix,
    instances_prefix, name_key, overlay_counter_key, overlay_index_key, verify_back_key, vnf_key,
    vnfs_prefix,
};
pub use crate::store::keys::{catalog_prefix, instance_key, verify_back_prefix};
use crate::store::{Cas, Expect, Store, StoreError};
use record::CatalogAckRecord;
pub use record::{ChainRecord, InstanceRecord, InstanceState, Record, VnfRecord};
pub(crate) use record::{decode, encode};

/// Settings of a registry.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Controller addresses written into bundles.
    pub controllers: Vec<String>,
    /// TLS server name of the controller.
    pub server_name: String,
    /// The controller CA (PEM) agents pin.
    pub ca_pem: String,
    /// Chain length of new instances.
    pub chain_length: u32,
    /// D-H group of the tenant.
    pub dh_group: Group,
    /// Re-attestation interval handed to agents, in seconds.
    pub reattest_interval_secs: u32,
    /// The overlay network of tenants: addresses are handed out from it in order.
    pub overlay_net: Ipv4Addr,
    /// Its prefix length.
    pub overlay_prefix: u8,
    /// The key audit records are authenticated with (never in the store).
    pub audit_key: crate::audit::AuditKey,
    /// Refusals of one kind about one known instance audited per minute.
    pub audit_refusals_per_min: u32,
}

/// An enrolled agent's budget of peer verifications (one per connection).
pub type VerifyPeerLimiter = governor::DefaultDirectRateLimiter;

/// A budget of `per_sec` peer verifications a second, with bursts of twice that.
pub fn verify_peer_limiter(per_sec: u32) -> VerifyPeerLimiter {
    let rate = std::num::NonZeroU32::new(per_sec.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    let burst =
        rate.saturating_mul(std::num::NonZeroU32::new(2).unwrap_or(std::num::NonZeroU32::MIN));
    // One clock for all: making a clock calibrates it, far too slow for every connection.
    static CLOCK: std::sync::OnceLock<governor::clock::DefaultClock> = std::sync::OnceLock::new();
    governor::RateLimiter::direct_with_clock(
        governor::Quota::per_second(rate).allow_burst(burst),
        CLOCK.get_or_init(Default::default).clone(),
    )
}

/// Which refusals about known instances are audited: at most `per_min` per (instance,
/// kind) and minute; the rest are counted and the count goes into the next record, so an
/// attacker who knows an instance's ID cannot grow the log without bound.
#[derive(Debug)]
struct RefusalAudit {
    per_min: u32,
    seen: std::sync::Mutex<std::collections::HashMap<(InstanceKey, &'static str), RefusalWindow>>,
    suppressed: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct RefusalWindow {
    minute: u64,
    written: u32,
    skipped: u64,
}

/// Instances whose refusals are tracked at once; beyond it, windows of past minutes go.
const REFUSAL_TRACKED: usize = 65_536;

impl RefusalAudit {
    /// `Some(skipped before)` when this refusal is to be written, `None` when counted only.
    fn admit(&self, now: u64, id: InstanceKey, kind: &'static str) -> Option<u64> {
        let minute = now / 60;
        let Ok(mut seen) = self.seen.lock() else {
            return Some(0);
        };
        if seen.len() >= REFUSAL_TRACKED && !seen.contains_key(&(id, kind)) {
            seen.retain(|_, w| w.minute == minute);
            if seen.len() >= REFUSAL_TRACKED {
                // Every tracked instance was refused this minute: audit this one, as
                // before tracking.
                return Some(0);
            }
        }
        let w = seen.entry((id, kind)).or_insert(RefusalWindow {
            minute,
            written: 0,
            skipped: 0,
        });
        if w.minute != minute {
            w.minute = minute;
            w.written = 0;
        }
        if w.written < self.per_min {
            w.written += 1;
            Some(std::mem::take(&mut w.skipped))
        } else {
            w.skipped += 1;
            self.suppressed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            None
        }
    }
}

/// A refusal to send to an agent or operator, with its typed reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct Refusal {
    /// The typed reason.
    pub code: RefusalCode,
    /// What a human should read.
    pub message: String,
}

fn refuse(code: RefusalCode, message: impl Into<String>) -> RegistryError {
    RegistryError::Refused(Refusal {
        code,
        message: message.into(),
    })
}

/// Why a registry operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request was refused; tell the requester.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The store failed; retry.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored data does not decode.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

/// How an enrolled instance is described to a peer (its keys in `group`).
pub fn describe_record(
    group: Group,
    id: InstanceKey,
    rec: &InstanceRecord,
    overlay: IpAddr,
    via_gateway: Option<IpAddr>,
    protected: bool,
) -> Result<asmn_shared::wire::Peer, RegistryError> {
    let missing =
        |what: &str| RegistryError::Corrupt(format!("an enrolled instance without {what}"));
    let dh = rec
        .dh_public
        .as_deref()
        .ok_or_else(|| missing("a D-H value"))?;
    Ok(asmn_shared::wire::Peer {
        id,
        vnf: rec.vnf.clone(),
        overlay,
        endpoint: rec.endpoint.ok_or_else(|| missing("an endpoint"))?,
        wg_public_key: rec
            .wg_public_key
            .ok_or_else(|| missing("a WireGuard key"))?,
        dh_group: group,
        dh_public: asmn_shared::dh::DhPublic::validate(group, dh)
            .map_err(|e| RegistryError::Corrupt(e.to_string()))?,
        epoch: rec.chain.epoch,
        via_gateway,
        role: rec.role,
        protected,
    })
}

/// Whether `catalog` (of some VNF) admits traffic from `vnf`: a rule for any source or
/// naming it, a lowered default service, or `vnf` being its gateway.
fn catalog_admits(catalog: &SecCatalog, vnf: &VnfId) -> bool {
    catalog.gateway.as_ref() == Some(vnf)
        || matches!(
            catalog.default_action,
            asmn_shared::catalog::DefaultAction::Police(_)
        )
        || catalog
            .rules
            .iter()
            .any(|r| r.sources.as_ref().is_none_or(|s| s.contains(vnf)))
}

/// A certificate serial as lower-case hex without leading zeros or separators, if it is
/// one (1 to 20 bytes).
pub fn normalize_serial(serial: &str) -> Option<String> {
    let digits: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.is_empty() || digits.len() > 40 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0');
    Some(if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    })
}

/// Refuses a catalog whose push (or enrollment answer) would not fit in one frame.
fn pushable(catalog: &SecCatalog) -> Result<(), RegistryError> {
    let mut c = catalog.clone();
    c.version = u64::MAX;
    let push = asmn_shared::wire::msg::Envelope {
        request_id: u64::MAX,
        body: Some(asmn_shared::wire::msg::Body::CatalogPush((&c).into())),
    };
    let encoded = prost::Message::encoded_len(&push);
    let most = asmn_shared::wire::MAX_FRAME - PUSH_MARGIN;
    if encoded > most {
        return Err(refuse(
            RefusalCode::TooLarge,
            format!(
                "the catalog of {} would not fit in one push to its agents ({encoded} bytes \
                 encoded, at most {most}); merge rules or split the VNF",
                c.vnf
            ),
        ));
    }
    Ok(())
}

/// Room left in a frame beside a catalog: the enrollment answer carries the catalog with
/// the overlay address, epoch and interval.
pub const PUSH_MARGIN: usize = 512;

/// A record kept changing under us for every retry.
fn contended(what: &str) -> RegistryError {
    RegistryError::Store(StoreError::Unavailable(format!("{what} contended; retry")))
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Corrupt(e.to_string()))
}

fn parse<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(b).map_err(|e| RegistryError::Corrupt(e.to_string()))
}

/// Sec-EM's decisions over a store.
#[derive(Debug)]
pub struct Registry<S: Store> {
    store: Arc<S>,
    config: RegistryConfig,
    audit: AuditLog,
    refusals: RefusalAudit,
    /// Serializes this replica's overlay allocations (the counter is a hot key: without
    /// it, concurrent creations mostly lose their compare-and-swap to each other).
    allocating: tokio::sync::Mutex<()>,
    /// Takes a backup of the store while serving (embedded stores only).
    backup: Option<Backup>,
}

/// Writes a consistent backup of the store and describes it (JSON); blocking.
pub type BackupHook = Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

#[derive(Clone)]
struct Backup(BackupHook);

impl std::fmt::Debug for Backup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Backup")
    }
}

/// Most compare-and-swap retries on one record before giving up (each retry means another
/// writer changed it in between).
const CAS_RETRIES: usize = 64;

impl<S: Store> Registry<S> {
    /// A registry over `store`.
    pub fn new(store: S, config: RegistryConfig) -> Self {
        Self::with_shared_store(Arc::new(store), config)
    }

    /// A registry over a store others share too (the push follower watches it).
    pub fn with_shared_store(store: Arc<S>, config: RegistryConfig) -> Self {
        Self {
            store,
            audit: AuditLog::new(config.audit_key.clone()),
            refusals: RefusalAudit {
                per_min: config.audit_refusals_per_min.max(1),
                seen: std::sync::Mutex::new(std::collections::HashMap::new()),
                suppressed: std::sync::atomic::AtomicU64::new(0),
            },
            config,
            allocating: tokio::sync::Mutex::new(()),
            backup: None,
        }
    }

    /// This registry, able to take backups with `hook` (`sec-em backup` asks for them).
    pub fn with_backup(mut self, hook: BackupHook) -> Self {
        self.backup = Some(Backup(hook));
        self
    }

    /// Takes a backup, when this store can (see [`Registry::with_backup`]).
    pub async fn backup(&self) -> Option<Result<serde_json::Value, String>> {
        let Backup(hook) = self.backup.clone()?;
        Some(
            tokio::task::spawn_blocking(move || hook())
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
        )
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The shared store.
    pub fn store_arc(&self) -> Arc<S> {
        Arc::clone(&self.store)
    }

    async fn audit(
        &self,
        now: u64,
        kind: &str,
        id: Option<&InstanceKey>,
        detail: String,
    ) -> Result<(), RegistryError> {
        self.audit
            .append(&self.store, now, kind, id.map(|i| i.to_hex()), detail)
            .await?;
        Ok(())
    }

    /// Audits a refusal about known instance `id`, within the per-minute budget (see
    /// [`RefusalAudit`]); a refusal over budget is counted only.
    async fn audit_refusal(
        &self,
        now: u64,
        kind: &'static str,
        id: &InstanceKey,
        detail: String,
    ) -> Result<(), RegistryError> {
        match self.refusals.admit(now, *id, kind) {
            None => Ok(()),
            Some(0) => self.audit(now, kind, Some(id), detail).await,
            Some(n) => {
                self.audit(
                    now,
                    kind,
                    Some(id),
                    format!("{detail} (and {n} like refusals not recorded one by one)"),
                )
                .await
            }
        }
    }

    /// Refusals about known instances counted but not audited one by one, so far.
    pub fn audit_suppressed(&self) -> u64 {
        self.refusals
            .suppressed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The audit key (to verify the log and sign checkpoints).
    pub fn audit_key(&self) -> &crate::audit::AuditKey {
        self.audit.key()
    }

    /// Registers a VNF with its golden digests (SHA-256 required).
    pub async fn onboard(
        &self,
        now: u64,
        vnfd: Vnfd,
        golden: BTreeMap<Algorithm, DigestValue>,
        image_bytes: u64,
    ) -> Result<(), RegistryError> {
        if !golden.contains_key(&Algorithm::Sha256) {
            return Err(refuse(
                RefusalCode::InvalidRequest,
                "on-boarding needs the image's SHA-256 (attestation uses it)",
            ));
        }
        let vnf = vnfd.vnf.clone();
        let catalog = vnfd.catalog.clone();
        // Checked before anything is written.
        catalog
            .validate()
            .map_err(|(f, r)| refuse(RefusalCode::InvalidCatalog, format!("{f}: {r}")))?;
        pushable(&catalog)?;
        let rec = VnfRecord {
            vnfd,
            golden,
            image_bytes,
        };
        self.store.put(&vnf_key(&vnf), encode(&rec)?).await?;
        // The VNFD's catalog becomes the one in force, unless a later one was applied.
        if self.catalog(&vnf).await?.is_none() {
            self.apply_catalog(now, catalog).await?;
        }
        self.audit(now, "vnf.onboarded", None, format!("VNF {vnf} on-boarded"))
            .await
    }

    /// On-boards from a descriptor's text, as both front doors (QUIC and REST) take it:
    /// an ETSI SOL001 VNFD (TOSCA) or an ASMN VNFD, with the image's digests. A SOL001
    /// VNFD's `sw_image_data.checksum` must be the image's digest of that algorithm when
    /// the digests include one: a VNFD of another image is not on-boarded with this one.
    /// `what` names the descriptor in errors. Returns the VNF.
    pub async fn onboard_descriptor(
        &self,
        now: u64,
        what: &str,
        text: &[u8],
        golden: BTreeMap<Algorithm, DigestValue>,
        image_bytes: u64,
    ) -> Result<VnfId, RegistryError> {
        let invalid = |e: asmn_shared::catalog::CatalogError| {
            refuse(RefusalCode::InvalidCatalog, e.to_string())
        };
        let (vnfd, checksum) = if asmn_shared::sol001::looks_like_sol001(text) {
            let s = asmn_shared::sol001::parse_sol001(&format!("{what} (SOL001)"), text)
                .map_err(invalid)?;
            (s.vnfd, Some((s.algorithm, s.digest)))
        } else {
            (
                asmn_shared::catalog::parse_vnfd(what, text).map_err(invalid)?,
                None,
            )
        };
        if let Some((algorithm, digest)) = checksum
            && let Ok(alg) = algorithm.parse::<Algorithm>()
            && let Some(d) = golden.get(&alg)
            && d.0 != digest
        {
            return Err(refuse(
                RefusalCode::InvalidRequest,
                format!(
                    "the image's {algorithm} is {}, the VNFD's sw_image_data.checksum says {}",
                    d.to_hex(),
                    hex::encode(&digest)
                ),
            ));
        }
        let vnf = vnfd.vnf.clone();
        self.onboard(now, vnfd, golden, image_bytes).await?;
        Ok(vnf)
    }

    /// The records under `prefix` after key `start` (empty: from the first), at most
    /// `limit` (1 to 1,000), parsed; and whether another page follows (one more is read:
    /// a next page is announced only when it is not empty).
    async fn page<T>(
        &self,
        (prefix, start): (&str, &str),
        limit: usize,
        decode: fn(&[u8]) -> Result<T, RegistryError>,
    ) -> Result<(Vec<T>, bool), RegistryError> {
        let limit = limit.clamp(1, 1_000);
        let listing = self.store.list_page(prefix, start, limit + 1).await?;
        let more = listing.entries.len() > limit;
        let out = listing
            .entries
            .iter()
            .take(limit)
            .map(|(_, v)| decode(&v.value))
            .collect::<Result<_, _>>()?;
        Ok((out, more))
    }

    /// One page of the on-boarded VNFs (sorted by ID) after `after` (empty: the first),
    /// at most `limit`; and the `after` of the next page, if there is one.
    pub async fn vnfs_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<VnfRecord>, Option<String>), RegistryError> {
        let prefix = vnfs_prefix();
        let start = if after.is_empty() {
            String::new()
        } else {
            format!("{prefix}{after}")
        };
        let (out, more) = self
            .page((&prefix, &start), limit, decode::<VnfRecord>)
            .await?;
        let next = more
            .then(|| out.last().map(|r| r.vnfd.vnf.to_string()))
            .flatten();
        Ok((out, next))
    }

    /// The catalogs `vnf` has had in force, oldest first, from version `after + 1`, at
    /// most `limit`; and the `after` of the next page, if there is one.
    pub async fn catalog_history(
        &self,
        vnf: &VnfId,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<SecCatalog>, Option<u64>), RegistryError> {
        let start = if after == 0 {
            String::new()
        } else {
            catalog_history_key(vnf, after)
        };
        let (out, more) = self
            .page(
                (&catalog_history_prefix(vnf), &start),
                limit,
                parse::<SecCatalog>,
            )
            .await?;
        let next = more.then(|| out.last().map(|c| c.version)).flatten();
        Ok((out, next))
    }

    /// The Sec-catalog in force for `vnf`, with its store revision.
    pub async fn catalog(&self, vnf: &VnfId) -> Result<Option<(SecCatalog, u64)>, RegistryError> {
        match self.store.get(&catalog_key(vnf)).await? {
            Some(v) => Ok(Some((parse(&v.value)?, v.revision))),
            None => Ok(None),
        }
    }

    /// Puts `catalog` in force for its VNF as the next version (the version in the file
    /// is replaced: versions only increase). Agents learn it by watching
    /// [`catalog_prefix`]. Returns the version.
    pub async fn apply_catalog(
        &self,
        now: u64,
        mut catalog: SecCatalog,
    ) -> Result<u64, RegistryError> {
        catalog
            .validate()
            .map_err(|(f, r)| refuse(RefusalCode::InvalidCatalog, format!("{f}: {r}")))?;
        // Agents receive the catalog as one push: one that cannot be framed would never
        // reach them. Refuse it now, before anything is committed.
        pushable(&catalog)?;
        let key = catalog_key(&catalog.vnf);
        for _ in 0..CAS_RETRIES {
            let (expect, version) = match self.catalog(&catalog.vnf).await? {
                None => (Expect::Absent, 1),
                Some((c, rev)) => (Expect::Revision(rev), c.version + 1),
            };
            catalog.version = version;
            if let Cas::Swapped { .. } = self
                .store
                .compare_and_swap(&key, expect, json(&catalog)?)
                .await?
            {
                // The history, after the version is won: a writer that lost the race
                // never writes its catalog under the winner's version.
                self.store
                    .put(&catalog_history_key(&catalog.vnf, version), json(&catalog)?)
                    .await?;
                self.audit(
                    now,
                    "catalog.applied",
                    None,
                    format!(
                        "{} catalog version {version}: {} rules",
                        catalog.vnf,
                        catalog.rules.len()
                    ),
                )
                .await?;
                return Ok(version);
            }
        }
        Err(RegistryError::Store(StoreError::Unavailable(
            "catalog contended".into(),
        )))
    }

    /// The catalogs in force of the VNFs that name `gateway` as their gateway.
    pub async fn catalogs_guarded_by(
        &self,
        gateway: &VnfId,
    ) -> Result<Vec<SecCatalog>, RegistryError> {
        let listing = self.store.list(&catalog_prefix()).await?;
        let mut out = Vec::new();
        for (_, v) in &listing.entries {
            let c: SecCatalog = parse(&v.value)?;
            if c.gateway.as_ref() == Some(gateway) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// The on-boarded VNF `vnf`.
    pub async fn vnf(&self, vnf: &VnfId) -> Result<Option<VnfRecord>, RegistryError> {
        match self.store.get(&vnf_key(vnf)).await? {
            Some(v) => Ok(Some(decode(&v.value)?)),
            None => Ok(None),
        }
    }

    async fn next_overlay(&self, tenant: &TenantId) -> Result<Overlay, RegistryError> {
        let key = overlay_counter_key(tenant);
        let capacity = 1u64 << (32 - u32::from(self.config.overlay_prefix.min(30)));
        let _one_at_a_time = self.allocating.lock().await;
        for attempt in 0..CAS_RETRIES {
            if attempt > 0 {
                // Another replica allocated meanwhile: back off a little, at random.
                let ms = rand::random::<u64>() % (1 + attempt as u64).min(20);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let current = self.store.get(&key).await?;
            let (next, expect) = match &current {
                None => (1u64, Expect::Absent),
                Some(v) => (parse::<u64>(&v.value)?, Expect::Revision(v.revision)),
            };
            if next + 1 >= capacity {
                return Err(refuse(
                    RefusalCode::Unavailable,
                    format!("tenant {tenant}'s overlay network is full"),
                ));
            }
            if let Cas::Swapped { .. } = self
                .store
                .compare_and_swap(&key, expect, json(&(next + 1))?)
                .await?
            {
                let base = u32::from(self.config.overlay_net);
                let ip = Ipv4Addr::from(base.wrapping_add(next as u32));
                return Ok(Overlay {
                    ip: IpAddr::V4(ip),
                    prefix: self.config.overlay_prefix,
                });
            }
        }
        Err(RegistryError::Store(StoreError::Unavailable(
            "overlay allocation contended".into(),
        )))
    }

    /// Creates an instance of an on-boarded VNF and returns its bootstrap bundle. `nonce`
    /// must come from a cryptographic random source.
    pub async fn create_instance(
        &self,
        now: u64,
        tenant: TenantId,
        vnf: VnfId,
        instance: InstanceName,
        role: Role,
        nonce: Nonce,
    ) -> Result<BootstrapBundle, RegistryError> {
        let rec = self.vnf(&vnf).await?.ok_or_else(|| {
            refuse(
                RefusalCode::UnknownInstance,
                format!("VNF {vnf} is not on-boarded"),
            )
        })?;
        let golden = rec
            .golden
            .get(&Algorithm::Sha256)
            .ok_or_else(|| RegistryError::Corrupt(format!("VNF {vnf} has no SHA-256")))?;
        let id = InstanceKey::derive(&tenant, &vnf, &instance, &nonce);
        let spec = ChainSpec::new(id, 0, self.config.chain_length)
            .map_err(|e| refuse(RefusalCode::InvalidRequest, e.to_string()))?;
        // Names are unique within a VNF of a tenant: an orchestrator that retries a
        // create whose answer it lost gets `AlreadyExists`, not a second instance.
        let name_key = name_key(&tenant, &vnf, &instance);
        self.reserve_name(&name_key, &id, || {
            format!("instance {instance} of {vnf} in {tenant} exists")
        })
        .await?;
        let created = self
            .create_reserved(
                now,
                &id,
                (tenant, vnf, instance, role),
                &nonce,
                &spec,
                golden,
            )
            .await;
        if created.is_err() {
            // Not created: the name is free again (best effort; a name whose instance
            // does not exist is taken over by the next create anyway).
            let _ = self.store.delete(&name_key).await;
        }
        created
    }

    /// Reserves `name_key` for `id`; a reservation whose instance does not exist (a
    /// create that failed half-way) is taken over.
    async fn reserve_name(
        &self,
        name_key: &str,
        id: &InstanceKey,
        exists: impl Fn() -> String,
    ) -> Result<(), RegistryError> {
        for _ in 0..CAS_RETRIES {
            let expect = match self.store.get(name_key).await? {
                None => Expect::Absent,
                Some(v) => {
                    let holder = String::from_utf8_lossy(&v.value).to_string();
                    let live = match holder.parse::<InstanceKey>().ok() {
                        Some(k) => self.instance(&k).await?.is_some(),
                        None => false,
                    };
                    if live {
                        return Err(refuse(RefusalCode::AlreadyExists, exists()));
                    }
                    Expect::Revision(v.revision)
                }
            };
            if let Cas::Swapped { .. } = self
                .store
                .compare_and_swap(name_key, expect, id.to_hex().into_bytes())
                .await?
            {
                return Ok(());
            }
        }
        Err(contended("instance name"))
    }

    /// The rest of [`Registry::create_instance`], once the name is reserved.
    async fn create_reserved(
        &self,
        now: u64,
        id: &InstanceKey,
        (tenant, vnf, instance, role): (TenantId, VnfId, InstanceName, Role),
        nonce: &Nonce,
        spec: &ChainSpec,
        golden: &DigestValue,
    ) -> Result<BootstrapBundle, RegistryError> {
        let id = *id;
        let seed = chain::seed(nonce, &id, &golden.0, 0);
        let anchor = chain::anchor(spec, &seed);
        let overlay = self.next_overlay(&tenant).await?;
        let record = InstanceRecord {
            id,
            tenant: tenant.clone(),
            vnf: vnf.clone(),
            instance: instance.clone(),
            role,
            overlay,
            state: InstanceState::Created,
            chain: ChainRecord {
                epoch: 0,
                length: spec.length,
                last_index: spec.length,
                last_element: anchor,
                window: DEFAULT_WINDOW,
            },
            wg_public_key: None,
            dh_public: None,
            endpoint: None,
            last_attestation: None,
            enforced_catalog: None,
            catalog_latency_ms: None,
            measurement: None,
        };
        match self
            .store
            .compare_and_swap(&instance_key(&id), Expect::Absent, encode(&record)?)
            .await?
        {
            Cas::Swapped { .. } => {
                // The address was allocated to this instance alone, so the index entry is
                // new; peers are looked up by it.
                self.store
                    .put(
                        &overlay_index_key(&tenant, &overlay.ip),
                        id.to_hex().into_bytes(),
                    )
                    .await?;
            }
            Cas::Conflict { .. } => {
                return Err(refuse(
                    RefusalCode::AlreadyExists,
                    format!("instance {instance} of {vnf} in {tenant} exists"),
                ));
            }
        }
        self.audit(
            now,
            "instance.created",
            Some(&id),
            format!("{tenant}/{vnf}/{instance} as {role}, overlay {overlay}"),
        )
        .await?;
        Ok(BootstrapBundle {
            controllers: self.config.controllers.clone(),
            server_name: self.config.server_name.clone(),
            ca_pem: self.config.ca_pem.clone(),
            tenant,
            vnf,
            instance,
            nonce: nonce.clone(),
            chain_length: spec.length,
            role,
            dh_group: self.config.dh_group,
        })
    }

    /// The record of instance `id`, with its store revision.
    pub async fn instance(
        &self,
        id: &InstanceKey,
    ) -> Result<Option<(InstanceRecord, u64)>, RegistryError> {
        match self.store.get(&instance_key(id)).await? {
            Some(v) => Ok(Some((decode(&v.value)?, v.revision))),
            None => Ok(None),
        }
    }

    /// Writes `rec` if the record is still at `rev`; whether it was.
    async fn store_if_unchanged(
        &self,
        id: &InstanceKey,
        rev: u64,
        rec: &InstanceRecord,
    ) -> Result<bool, RegistryError> {
        let cas = self
            .store
            .compare_and_swap(&instance_key(id), Expect::Revision(rev), encode(rec)?)
            .await?;
        Ok(matches!(cas, Cas::Swapped { .. }))
    }

    /// Keeps the gateway index in step with gateway instance `id`'s record: listed while
    /// enrolled, removed otherwise (after the record is stored: a gateway is never listed
    /// before it is enrolled, and a stale entry is checked against the record on use).
    async fn index_gateway(
        &self,
        id: &InstanceKey,
        rec: &InstanceRecord,
    ) -> Result<(), RegistryError> {
        if rec.role != Role::Gateway {
            return Ok(());
        }
        let key = gateway_key(&rec.tenant, &rec.vnf, id);
        if rec.state == InstanceState::Enrolled {
            self.store.put(&key, Vec::new()).await?;
        } else {
            self.store.delete(&key).await?;
        }
        Ok(())
    }

    /// An enrolled gateway instance of `vnf` in `tenant`, from the index (each entry
    /// checked against its record); when the index has none, by listing the instances
    /// (a gateway a schema-2 replica enrolled during a rolling upgrade: see
    /// `store::schema::COMPATIBLE_DOWN_TO`), which lists it.
    async fn enrolled_gateway(
        &self,
        tenant: &TenantId,
        vnf: &VnfId,
    ) -> Result<Option<InstanceRecord>, RegistryError> {
        if let Some(r) = self.indexed_gateway(tenant, vnf).await? {
            return Ok(Some(r));
        }
        let found = self.instance_records().await?.into_iter().find(|r| {
            r.tenant == *tenant
                && r.vnf == *vnf
                && r.role == Role::Gateway
                && r.state == InstanceState::Enrolled
        });
        if let Some(r) = &found {
            self.index_gateway(&r.id, r).await?;
        }
        Ok(found)
    }

    async fn indexed_gateway(
        &self,
        tenant: &TenantId,
        vnf: &VnfId,
    ) -> Result<Option<InstanceRecord>, RegistryError> {
        let listing = self
            .store
            .list_page(&gateways_prefix(tenant, vnf), "", 64)
            .await?;
        for (k, _) in &listing.entries {
            let Some(id) = k
                .rsplit('/')
                .next()
                .and_then(|h| h.parse::<InstanceKey>().ok())
            else {
                continue;
            };
            if let Some((r, _)) = self.instance(&id).await?
                && r.role == Role::Gateway
                && r.state == InstanceState::Enrolled
            {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Phase 1's pair check (the paper's Fig. 2): `requester` asks for the instance at
    /// `overlay`. Both must be enrolled, in one tenant, and the peer's catalog must admit
    /// the requester's VNF (a rule for any source or naming it, a lowered default service,
    /// or the requester being its gateway). A VNF behind a gateway is answered with the
    /// gateway to go through. Refused peers are never described.
    pub async fn verify_peer(
        &self,
        now: u64,
        requester: &InstanceKey,
        overlay: IpAddr,
    ) -> Result<asmn_shared::wire::Peer, RegistryError> {
        let not_allowed = |why: String| refuse(RefusalCode::PeerNotAllowed, why);
        let Some((me, _)) = self.instance(requester).await? else {
            return Err(refuse(RefusalCode::NotAuthorized, "enroll first"));
        };
        if me.state != InstanceState::Enrolled {
            return Err(refuse(
                RefusalCode::NotAuthorized,
                "the requester is not enrolled",
            ));
        }
        let peer_id = match self.instance_at(&me.tenant, &overlay).await? {
            Some(id) => id,
            None => {
                return Err(self
                    .refuse_peer(
                        now,
                        requester,
                        RefusalCode::PeerUnknown,
                        format!("no instance at {overlay} in this tenant"),
                    )
                    .await);
            }
        };
        let Some((peer, _)) = self.instance(&peer_id).await? else {
            return Err(refuse(RefusalCode::PeerUnknown, "no such peer"));
        };
        if peer.state != InstanceState::Enrolled || peer.tenant != me.tenant {
            return Err(self
                .refuse_peer(
                    now,
                    requester,
                    RefusalCode::PeerUnknown,
                    format!("no enrolled instance at {overlay}"),
                )
                .await);
        }
        let catalog = self
            .catalog(&peer.vnf)
            .await?
            .map(|(c, _)| c)
            .unwrap_or_else(|| SecCatalog::deny_all(peer.vnf.clone()));
        let is_gateway = catalog.gateway.as_ref() == Some(&me.vnf);
        if !catalog_admits(&catalog, &me.vnf) {
            let why = format!("{}'s Sec-catalog does not admit {}", peer.vnf, me.vnf);
            return Err(self
                .refuse_peer(now, requester, RefusalCode::PeerNotAllowed, why)
                .await);
        }
        // Gateway mode is symmetric: a VNF whose catalog names a gateway is reached
        // through it, and reaches others through it too (so replies take the same path).
        let peer_gateway = catalog
            .gateway
            .clone()
            .filter(|_| !is_gateway && me.role != Role::Gateway);
        let my_gateway = match self.catalog(&me.vnf).await? {
            Some((c, _)) => c.gateway.filter(|g| {
                me.role != Role::Gateway && *g != peer.vnf && peer.role != Role::Gateway
            }),
            None => None,
        };
        let via_gateway = match peer_gateway.or(my_gateway) {
            Some(g) => {
                let gw = self
                    .enrolled_gateway(&me.tenant, &g)
                    .await?
                    .ok_or_else(|| {
                        not_allowed(format!(
                            "{} and {} talk only through gateway {g}, which is not enrolled",
                            me.vnf, peer.vnf
                        ))
                    })?;
                let o = gw.overlay;
                Some(o.ip)
            }
            None => None,
        };
        let out = self.describe_record(
            peer_id,
            &peer,
            overlay,
            via_gateway,
            catalog.gateway.is_some(),
        )?;
        self.audit(
            now,
            "peer.verified",
            Some(requester),
            format!("{} may reach {} ({overlay})", me.vnf, peer.vnf),
        )
        .await?;
        // The paper's Fig. 2: the peer is asked to verify the requester in turn.
        self.ask_to_verify_back(&peer_id, requester, &me).await?;
        Ok(out)
    }

    /// Asks `peer` to verify `requester` (described as `me`) in turn: through the store,
    /// so that the replica the peer is connected to pushes it.
    async fn ask_to_verify_back(
        &self,
        peer: &InstanceKey,
        requester: &InstanceKey,
        me: &InstanceRecord,
    ) -> Result<(), RegistryError> {
        let o = me.overlay;
        let protected = self
            .catalog(&me.vnf)
            .await?
            .is_some_and(|(c, _)| c.gateway.is_some());
        let back = self.describe_record(*requester, me, o.ip, None, protected)?;
        let info: asmn_shared::wire::msg::PeerInfo = (&back).into();
        self.store
            .put(
                &verify_back_key(peer, requester),
                prost::Message::encode_to_vec(&info),
            )
            .await?;
        Ok(())
    }

    /// The instance that holds `overlay` in `tenant` (the overlay index), if any.
    async fn instance_at(
        &self,
        tenant: &TenantId,
        overlay: &IpAddr,
    ) -> Result<Option<InstanceKey>, RegistryError> {
        match self.store.get(&overlay_index_key(tenant, overlay)).await? {
            Some(v) => String::from_utf8(v.value)
                .ok()
                .and_then(|h| h.parse::<InstanceKey>().ok())
                .map(Some)
                .ok_or_else(|| RegistryError::Corrupt("overlay index entry".into())),
            None => Ok(None),
        }
    }

    /// The enrolled instance at `overlay` in `tenant`, or a refusal naming it.
    async fn enrolled_at(
        &self,
        now: u64,
        requester: &InstanceKey,
        tenant: &TenantId,
        overlay: IpAddr,
    ) -> Result<(InstanceKey, InstanceRecord), RegistryError> {
        let unknown = format!("no enrolled instance at {overlay}");
        let id = match self.instance_at(tenant, &overlay).await? {
            Some(id) => id,
            None => {
                return Err(self
                    .refuse_peer(now, requester, RefusalCode::PeerUnknown, unknown)
                    .await);
            }
        };
        match self.instance(&id).await? {
            Some((rec, _)) if rec.state == InstanceState::Enrolled && rec.tenant == *tenant => {
                Ok((id, rec))
            }
            _ => Err(self
                .refuse_peer(now, requester, RefusalCode::PeerUnknown, unknown)
                .await),
        }
    }

    /// A gateway's pair check: may the instances at `source` and `overlay` talk through
    /// the gateway `requester`? Only a gateway instance may ask; both instances must be
    /// enrolled in its tenant, one of them must be behind this gateway's VNF, and each
    /// one's catalog must admit the other (a pair is connected only when both directions
    /// pass, as between direct peers). The answer describes the instance at `overlay`
    /// (direct, for the gateway), so that the gateway can build its tunnel to it.
    pub async fn verify_pair(
        &self,
        now: u64,
        requester: &InstanceKey,
        source: IpAddr,
        overlay: IpAddr,
    ) -> Result<asmn_shared::wire::Peer, RegistryError> {
        let Some((me, _)) = self.instance(requester).await? else {
            return Err(refuse(RefusalCode::NotAuthorized, "enroll first"));
        };
        if me.state != InstanceState::Enrolled || me.role != Role::Gateway {
            return Err(refuse(
                RefusalCode::NotAuthorized,
                "only an enrolled gateway asks on behalf of another instance",
            ));
        }
        let (_, src) = self.enrolled_at(now, requester, &me.tenant, source).await?;
        let (dst_id, dst) = self
            .enrolled_at(now, requester, &me.tenant, overlay)
            .await?;
        let catalog_of = |vnf: &VnfId| {
            let vnf = vnf.clone();
            async move {
                Ok::<_, RegistryError>(
                    self.catalog(&vnf)
                        .await?
                        .map(|(c, _)| c)
                        .unwrap_or_else(|| SecCatalog::deny_all(vnf.clone())),
                )
            }
        };
        let (src_catalog, dst_catalog) = (catalog_of(&src.vnf).await?, catalog_of(&dst.vnf).await?);
        let behind_me = |c: &SecCatalog| c.gateway.as_ref() == Some(&me.vnf);
        let why = if !behind_me(&src_catalog) && !behind_me(&dst_catalog) {
            Some(format!(
                "neither {} nor {} is behind gateway {}",
                src.vnf, dst.vnf, me.vnf
            ))
        } else if !catalog_admits(&dst_catalog, &src.vnf) {
            Some(format!(
                "{}'s Sec-catalog does not admit {}",
                dst.vnf, src.vnf
            ))
        } else if !catalog_admits(&src_catalog, &dst.vnf) {
            Some(format!(
                "{}'s Sec-catalog does not admit {}",
                src.vnf, dst.vnf
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let why = format!("{} -> {} through {}: {why}", source, overlay, me.vnf);
            return Err(self
                .refuse_peer(now, requester, RefusalCode::PeerNotAllowed, why)
                .await);
        }
        let out =
            self.describe_record(dst_id, &dst, overlay, None, dst_catalog.gateway.is_some())?;
        self.audit(
            now,
            "peer.relay_admitted",
            Some(requester),
            format!(
                "{} ({source}) and {} ({overlay}) may talk through {}",
                src.vnf, dst.vnf, me.vnf
            ),
        )
        .await?;
        // As after VerifyPeer (Fig. 2): the destination is asked to verify the gateway in
        // turn, so that it installs the gateway's tunnel.
        self.ask_to_verify_back(&dst_id, requester, &me).await?;
        Ok(out)
    }

    /// Audits a refused peer verification and returns the refusal (or the audit's error).
    async fn refuse_peer(
        &self,
        now: u64,
        requester: &InstanceKey,
        code: RefusalCode,
        why: String,
    ) -> RegistryError {
        match self
            .audit_refusal(now, "peer.refused", requester, why.clone())
            .await
        {
            Ok(()) => refuse(code, why),
            Err(e) => e,
        }
    }

    /// How an enrolled instance is described to a peer.
    fn describe_record(
        &self,
        id: InstanceKey,
        rec: &InstanceRecord,
        overlay: IpAddr,
        via_gateway: Option<IpAddr>,
        protected: bool,
    ) -> Result<asmn_shared::wire::Peer, RegistryError> {
        describe_record(
            self.config.dh_group,
            id,
            rec,
            overlay,
            via_gateway,
            protected,
        )
    }

    /// The description of enrolled instance `id` that its peers receive (for the push
    /// asking a verified peer to verify back).
    pub async fn describe(
        &self,
        id: &InstanceKey,
    ) -> Result<asmn_shared::wire::Peer, RegistryError> {
        let Some((rec, _)) = self.instance(id).await? else {
            return Err(refuse(RefusalCode::PeerUnknown, "no such instance"));
        };
        if rec.state != InstanceState::Enrolled {
            return Err(refuse(RefusalCode::PeerUnknown, "not enrolled"));
        }
        let o = rec.overlay;
        let protected = self
            .catalog(&rec.vnf)
            .await?
            .is_some_and(|(c, _)| c.gateway.is_some());
        self.describe_record(*id, &rec, o.ip, None, protected)
    }

    /// Records that agent `id` (enrolled on the connection that reports it) enforces
    /// catalog `version`, and how long it took. This is the agent's report, not a decision
    /// of Sec-EM: it is one plain write to the instance's acknowledgement key (not to its
    /// record, whose compare-and-swaps it would contend with), and not audited.
    pub async fn ack_catalog(
        &self,
        id: &InstanceKey,
        vnf: &VnfId,
        version: u64,
        latency: Option<std::time::Duration>,
    ) -> Result<(), RegistryError> {
        // Only a version that was put in force: an agent claiming a later one would have
        // operators (and `catalog.acknowledged`) believe it enforces what it never got.
        let in_force = self.catalog(vnf).await?.map_or(0, |(c, _)| c.version);
        if version > in_force {
            return Err(refuse(
                RefusalCode::InvalidRequest,
                format!(
                    "catalog version {version} of {vnf} was never in force (it is at {in_force})"
                ),
            ));
        }
        let ack = CatalogAckRecord {
            version,
            latency_ms: latency.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        self.store.put(&ack_key(id), encode(&ack)?).await?;
        Ok(())
    }

    /// Instance `id` as operators see it: its record with the catalog version it
    /// acknowledged.
    pub async fn instance_view(
        &self,
        id: &InstanceKey,
    ) -> Result<Option<InstanceRecord>, RegistryError> {
        let Some((mut rec, _)) = self.instance(id).await? else {
            return Ok(None);
        };
        if let Some(v) = self.store.get(&ack_key(id)).await? {
            let ack: CatalogAckRecord = decode(&v.value)?;
            rec.enforced_catalog = Some(ack.version);
            rec.catalog_latency_ms = ack.latency_ms;
        }
        Ok(Some(rec))
    }

    /// Every instance record as stored (without acknowledgements).
    async fn instance_records(&self) -> Result<Vec<InstanceRecord>, RegistryError> {
        let listing = self.store.list(&instances_prefix()).await?;
        listing
            .entries
            .iter()
            .map(|(_, v)| decode(&v.value))
            .collect()
    }

    /// Every instance record, with the catalog version each acknowledged.
    pub async fn instances(&self) -> Result<Vec<InstanceRecord>, RegistryError> {
        let mut records = self.instance_records().await?;
        let acks = self.store.list(&acks_prefix()).await?;
        let acks: std::collections::HashMap<&str, &[u8]> = acks
            .entries
            .iter()
            .filter_map(|(k, v)| Some((k.rsplit('/').next()?, v.value.as_slice())))
            .collect();
        for rec in &mut records {
            if let Some(a) = acks.get(rec.id.to_hex().as_str()) {
                let ack: CatalogAckRecord = decode(a)?;
                rec.enforced_catalog = Some(ack.version);
                rec.catalog_latency_ms = ack.latency_ms;
            }
        }
        Ok(records)
    }

    /// One page of instance records (sorted by ID) after `after` (hex ID; empty for the
    /// first page), at most `limit`, with their acknowledged catalog versions; and the
    /// `after` of the next page, if there is one.
    pub async fn instances_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<InstanceRecord>, Option<String>), RegistryError> {
        let prefix = instances_prefix();
        let after = if after.is_empty() {
            String::new()
        } else {
            format!("{prefix}{after}")
        };
        let (mut out, more) = self
            .page((&prefix, &after), limit, decode::<InstanceRecord>)
            .await?;
        for rec in &mut out {
            if let Some(a) = self.store.get(&ack_key(&rec.id)).await? {
                let ack: CatalogAckRecord = decode(&a.value)?;
                rec.enforced_catalog = Some(ack.version);
                rec.catalog_latency_ms = ack.latency_ms;
            }
        }
        let next = more.then(|| out.last().map(|r| r.id.to_hex())).flatten();
        Ok((out, next))
    }

    /// Puts an admin certificate's serial (hex) on the deny-list: every later admin
    /// request presenting it is refused, on every replica sharing the store.
    pub async fn revoke_admin(&self, now: u64, serial: &str) -> Result<(), RegistryError> {
        let serial = normalize_serial(serial).ok_or_else(|| {
            refuse(
                RefusalCode::InvalidRequest,
                "a serial is 1 to 40 hex digits",
            )
        })?;
        self.store
            .put(&admin_revoked_key(&serial), json(&now)?)
            .await?;
        self.audit(
            now,
            "admin.revoked",
            None,
            format!("admin certificate serial {serial} revoked"),
        )
        .await
    }

    /// Whether the admin certificate with `serial` is on the deny-list. A store failure is
    /// an error (the caller refuses: fail closed).
    pub async fn admin_revoked(&self, serial: &str) -> Result<bool, RegistryError> {
        let Some(serial) = normalize_serial(serial) else {
            return Ok(true);
        };
        Ok(self.store.get(&admin_revoked_key(&serial)).await?.is_some())
    }

    /// The revoked admin serials.
    pub async fn revoked_admins(&self) -> Result<Vec<String>, RegistryError> {
        let prefix = admin_revoked_prefix();
        let listing = self.store.list(&prefix).await?;
        Ok(listing
            .entries
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    /// Quarantines `id` (a refused instance) unless it is revoked already.
    async fn quarantine(
        &self,
        now: u64,
        id: &InstanceKey,
        reason: &str,
    ) -> Result<(), RegistryError> {
        self.update_instance(now, id, |rec| Ok(decide::quarantine(rec, reason)))
            .await
    }

    /// Phase 1: the first reveal. Accepts it (stored before this returns) or refuses
    /// with a typed reason; refusals are audited, and a reveal that does not extend the
    /// chain (a wrong image or nonce) quarantines the instance.
    pub async fn enroll(&self, now: u64, req: &Enroll) -> Result<Enrolled, RegistryError> {
        // A concurrent acceptance of the same reveal shows as a replay on the next read.
        let rec = self
            .update_instance(now, &req.id, |rec| {
                decide::enroll(rec, req, self.config.dh_group, now)
            })
            .await?;
        // Fail closed: a VNF without a catalog gets the one that admits nothing.
        let catalog = self
            .catalog(&rec.vnf)
            .await?
            .map(|(c, _)| c)
            .unwrap_or_else(|| SecCatalog::deny_all(rec.vnf.clone()));
        Ok(Enrolled {
            overlay: rec.overlay,
            dh_group: self.config.dh_group,
            epoch: rec.chain.epoch,
            last_index: rec.chain.last_index,
            reattest_interval: std::time::Duration::from_secs(u64::from(
                self.config.reattest_interval_secs,
            )),
            catalog,
        })
    }

    /// Audits a refusal about `id` (within the budget) and quarantines it if asked.
    async fn carry_out_refusal(
        &self,
        now: u64,
        id: &InstanceKey,
        audit: Option<decide::Audit>,
        then: Option<decide::Then>,
    ) -> Result<(), RegistryError> {
        if let Some(a) = audit {
            self.audit_refusal(now, a.kind, id, a.detail).await?;
        }
        // Boxed: quarantining and revoking are updates that never refuse, but the types
        // recurse.
        match then {
            Some(decide::Then::Quarantine(why)) => Box::pin(self.quarantine(now, id, &why)).await,
            Some(decide::Then::Revoke(why)) => Box::pin(self.revoke(now, id, &why)).await,
            None => Ok(()),
        }
    }

    /// Records that enrolled instance `id` lost its control connection to this replica
    /// (and did not reconnect to it since): an `agent.lost` audit record. Nothing is
    /// recorded for an instance no longer enrolled (revoked or quarantined).
    pub async fn agent_lost(
        &self,
        now: u64,
        id: &InstanceKey,
        detail: String,
    ) -> Result<(), RegistryError> {
        match self.instance(id).await? {
            Some((
                InstanceRecord {
                    state: InstanceState::Enrolled,
                    ..
                },
                _,
            )) => self.audit(now, "agent.lost", Some(id), detail).await,
            _ => Ok(()),
        }
    }

    /// Records that every enrolled agent of `vnf` acknowledged its catalog `version`
    /// (`agents` of them, the last `ms` milliseconds after the version was seen): a
    /// `catalog.acknowledged` audit record, whose detail starts as `catalog.applied`'s
    /// does (`<vnf> catalog version <n>`).
    pub async fn catalog_acknowledged(
        &self,
        now: u64,
        vnf: &VnfId,
        version: u64,
        agents: usize,
        ms: u64,
    ) -> Result<(), RegistryError> {
        // Once per version, whichever replica or restart decides it again: the highest
        // version announced is kept per VNF.
        let key = catalog_acknowledged_key(vnf);
        for _ in 0..CAS_RETRIES {
            let current = self.store.get(&key).await?;
            let expect = match &current {
                None => Expect::Absent,
                Some(v) => {
                    let done: u64 = String::from_utf8_lossy(&v.value).parse().unwrap_or(0);
                    if done >= version {
                        return Ok(());
                    }
                    Expect::Revision(v.revision)
                }
            };
            if let Cas::Swapped { .. } = self
                .store
                .compare_and_swap(&key, expect, version.to_string().into_bytes())
                .await?
            {
                return self.audit(
                    now,
                    "catalog.acknowledged",
                    None,
                    format!("{vnf} catalog version {version}: acknowledged by {agents} agents in {ms} ms"),
                )
                .await;
            }
        }
        Err(contended("catalog acknowledgement"))
    }

    /// Revokes an instance: it cannot enroll again with this identity.
    pub async fn revoke(
        &self,
        now: u64,
        id: &InstanceKey,
        reason: &str,
    ) -> Result<(), RegistryError> {
        self.update_instance(now, id, |rec| {
            decide::revoke(rec, reason).map_err(RegistryError::Refused)
        })
        .await
    }

    /// A reveal after enrollment (re-attestation). The element must extend the chain.
    /// In strict mode the fresh measurement must equal the golden SHA-256, and a changed
    /// target revokes the instance; in continuity mode a changed target must come with a
    /// renewal (a new epoch). A renewal (either mode, also before a chain runs out) opens
    /// the sealed anchor of the next chain and installs its D-H public value.
    pub async fn reattest(
        &self,
        now: u64,
        id: &InstanceKey,
        req: &Reattestation<'_>,
    ) -> Result<Reattested, RegistryError> {
        if req.measurement.len() != 32 {
            return Err(refuse(
                RefusalCode::InvalidRequest,
                "reattest.measurement must be a 32-byte SHA-256 digest",
            ));
        }
        // The state first, as the decision checks it: a request about an instance that is
        // not enrolled is refused before anything else is read or checked.
        let rec = decide::enrolled(self.instance(id).await?.map(|(r, _)| r))
            .map_err(RegistryError::Refused)?;
        let vnf = self
            .vnf(&rec.vnf)
            .await?
            .ok_or_else(|| RegistryError::Corrupt(format!("VNF {} is gone", rec.vnf)))?;
        let sha256: [u8; 32] = vnf
            .golden
            .get(&Algorithm::Sha256)
            .and_then(|d| d.0.as_slice().try_into().ok())
            .ok_or_else(|| RegistryError::Corrupt("VNF without SHA-256".into()))?;
        let golden = decide::Golden {
            sha256: &sha256,
            mode: vnf.vnfd.attestation,
        };
        // A renewal's D-H value is checked (a 3,072-bit subgroup test) only when the
        // decision reaches the renewal: after the state and the measurement.
        let valid_dh = |dh: &[u8]| -> Result<Vec<u8>, RegistryError> {
            Ok(self.valid_dh(dh)?.as_bytes().to_vec())
        };
        self.update_instance(now, id, |rec| {
            decide::reattest(rec, req, &golden, &valid_dh, now)
        })
        .await
    }

    /// Reads instance `id`'s record, asks `decide` what to make of it, and carries the
    /// decision out: its record stored by compare-and-swap on the revision read (on a
    /// conflict, read and decide again), then its audit event appended, then the gateway
    /// index kept in step (when a gateway's enrollment changes; a failure there is logged:
    /// the index tolerates missing and stale entries); its answer returned. The one loop
    /// every change of an instance record goes through.
    async fn update_instance<T>(
        &self,
        now: u64,
        id: &InstanceKey,
        mut decide: impl FnMut(Option<InstanceRecord>) -> Result<decide::Decision<T>, RegistryError>,
    ) -> Result<T, RegistryError> {
        for _ in 0..CAS_RETRIES {
            let current = self.instance(id).await?;
            let revision = current.as_ref().map(|(_, rev)| *rev);
            let was_enrolled = current
                .as_ref()
                .is_some_and(|(r, _)| r.state == InstanceState::Enrolled);
            let (audit, answer) = match decide(current.map(|(r, _)| r))? {
                decide::Decision::Keep { audit, answer } => (audit, answer),
                decide::Decision::Refuse {
                    refusal,
                    audit,
                    then,
                } => {
                    self.carry_out_refusal(now, id, audit, then).await?;
                    return Err(RegistryError::Refused(refusal));
                }
                decide::Decision::Store {
                    record,
                    audit,
                    answer,
                } => {
                    let Some(rev) = revision else {
                        return Err(RegistryError::Corrupt(
                            "a decision stored a record that was not there".into(),
                        ));
                    };
                    if !self.store_if_unchanged(id, rev, &record).await? {
                        continue;
                    }
                    if let Some(a) = audit {
                        self.audit(now, a.kind, Some(id), a.detail).await?;
                    }
                    let enrolled = record.state == InstanceState::Enrolled;
                    if record.role == Role::Gateway
                        && enrolled != was_enrolled
                        && let Err(e) = self.index_gateway(id, &record).await
                    {
                        tracing::warn!(error = %e, "gateway index not updated (peers find the gateway by listing)");
                    }
                    return Ok(answer);
                }
            };
            if let Some(a) = audit {
                self.audit(now, a.kind, Some(id), a.detail).await?;
            }
            return Ok(answer);
        }
        Err(contended("instance record"))
    }

    /// A D-H public value of the tenant's group, validated (range and subgroup).
    fn valid_dh(&self, bytes: &[u8]) -> Result<asmn_shared::dh::DhPublic, RegistryError> {
        asmn_shared::dh::DhPublic::validate(self.config.dh_group, bytes).map_err(|e| {
            refuse(
                RefusalCode::InvalidRequest,
                format!("D-H public value for {}: {e}", self.config.dh_group),
            )
        })
    }

    /// Replaces an enrolled agent's published keys (a new WireGuard key, or the D-H value
    /// of its current epoch). Peers hear of it through the push follower.
    pub async fn publish_keys(
        &self,
        now: u64,
        id: &InstanceKey,
        wg_public_key: [u8; 32],
        dh: &[u8],
        epoch: u32,
    ) -> Result<(), RegistryError> {
        let dh = self.valid_dh(dh)?;
        let dh = dh.as_bytes();
        self.update_instance(now, id, |rec| {
            decide::publish_keys(rec, &wg_public_key, dh, epoch).map_err(RegistryError::Refused)
        })
        .await
    }
}

/// One re-attestation request, validated.
#[derive(Debug)]
pub struct Reattestation<'a> {
    /// The next element.
    pub reveal: &'a Reveal,
    /// SHA-256 of the target, measured again.
    pub measurement: &'a [u8],
    /// A new epoch: its sealed anchor and its D-H public value.
    pub renewal: Option<(&'a chain::SealedRenewal, &'a [u8])>,
}

/// Where the chain stands after an accepted re-attestation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reattested {
    /// The epoch (the new one after a renewal).
    pub epoch: u32,
    /// The last accepted index (the new chain's length after a renewal).
    pub last_index: u32,
}

mod decide;
mod record;
#[cfg(test)]
mod tests;
