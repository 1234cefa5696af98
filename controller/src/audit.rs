//! The audit log: every security decision, append-only and hash-chained.
//!
//! Records are written in blocks: a block of consecutive records `n..m` is stored at
//! `/asmn/v1/audit/<n, 20 digits>` (a JSON array) by a compare-and-swap that requires the
//! key to be absent, so replicas sharing a store never write the same sequence number
//! twice. Decisions made while a block is being written wait and go together into the
//! next one (group commit: one store write for many decisions under load). Each record
//! carries the hash of the one before it, so a changed, reordered or deleted record breaks
//! the chain and [`verify`] finds where.
//!
//! The chain alone is no proof against whoever can write the store: they could rewrite
//! from record k on with recomputed hashes, or cut the newest records. So each record also
//! carries an HMAC-SHA256 of its hash under the [`AuditKey`], a key in Sec-EM's
//! configuration directory that the store never holds: a rewritten record does not verify.
//! A cut at the end leaves a valid log; it is found against a [`Checkpoint`] the operator
//! exported earlier (`asmnctl audit checkpoint --out FILE`, then `asmnctl audit verify
//! --checkpoint FILE`).

use asmn_shared::crypto::{Digest, Sha256};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Semaphore, oneshot};

use crate::store::{Cas, Expect, PREFIX, Store, StoreError};

/// Where audit records live.
pub fn prefix() -> String {
    format!("{PREFIX}audit/")
}

fn block_key(seq: u64) -> String {
    format!("{}{seq:020}", prefix())
}

/// One security decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    pub seq: u64,
    /// Seconds since the Unix epoch, as given by the caller.
    pub time: u64,
    /// What was decided, such as `enroll.accepted` or `enroll.refused`.
    pub kind: String,
    /// The instance concerned (hex ID), if any.
    pub instance: Option<String>,
    /// Details for a human.
    pub detail: String,
    /// Hash of the previous record (hex; 64 zeros for the first).
    pub prev: String,
    /// SHA-256 over this record's other fields (hex).
    pub hash: String,
    /// HMAC-SHA256 of `hash` under the audit key (hex).
    pub mac: String,
}

/// The key that authenticates audit records: 32 random bytes in a file beside
/// `sec-em.toml` (hex), never in the store. Every replica sharing a store has the same.
#[derive(Clone, zeroize::ZeroizeOnDrop)]
pub struct AuditKey([u8; 32]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(<redacted>)")
    }
}

impl AuditKey {
    /// A key from its bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self, String> {
        use rand::TryRngCore;
        let mut b = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut b)
            .map_err(|e| format!("the system's random source failed: {e}"))?;
        Ok(Self(b))
    }

    /// The key as the file holds it (64 hex digits and a newline).
    pub fn to_file_text(&self) -> String {
        format!("{}\n", hex::encode(self.0))
    }

    /// Parses the file's text.
    pub fn from_file_text(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|_| "not hex".to_string())?;
        let b: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "must be 32 bytes (64 hex digits)".to_string())?;
        Ok(Self(b))
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> String {
        let Ok(mut m) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u64).to_be_bytes());
            m.update(p);
        }
        hex::encode(m.finalize().into_bytes())
    }

    fn record_mac(&self, hash: &str) -> String {
        self.mac(b"asmn/v1/audit-record", &[hash.as_bytes()])
    }

    fn checkpoint_mac(&self, seq: u64, hash: &str) -> String {
        self.mac(
            b"asmn/v1/audit-checkpoint",
            &[&seq.to_be_bytes(), hash.as_bytes()],
        )
    }

    /// The MAC of a backup file's SHA-256 (hex): whoever can write the file but lacks
    /// this key cannot make a changed backup pass `sec-em restore`.
    pub fn backup_mac(&self, sha256_hex: &str) -> String {
        self.mac(b"asmn/v1/backup", &[sha256_hex.as_bytes()])
    }

    /// Whether `mac` is [`AuditKey::backup_mac`] of `sha256_hex` (constant time).
    pub fn verifies_backup(&self, sha256_hex: &str, mac: &str) -> bool {
        self.verifies(&self.backup_mac(sha256_hex), mac)
    }

    fn verifies(&self, expected: &str, got: &str) -> bool {
        use subtle::ConstantTimeEq;
        expected.len() == got.len() && bool::from(expected.as_bytes().ct_eq(got.as_bytes()))
    }
}

/// The head of the log at one moment, authenticated: what an operator keeps outside
/// Sec-EM to detect a later cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last record's position (0 for an empty log).
    pub seq: u64,
    /// Its hash.
    pub hash: String,
    /// HMAC of (seq, hash) under the audit key.
    pub mac: String,
}

impl AuditRecord {
    /// SHA-256 over the record's fields but its hash and MAC (what anyone can compute;
    /// the MAC is what needs the key).
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        for field in [
            "asmn/v1/audit".as_bytes(),
            &self.seq.to_be_bytes(),
            &self.time.to_be_bytes(),
            self.kind.as_bytes(),
            self.instance.as_deref().unwrap_or("").as_bytes(),
            self.detail.as_bytes(),
            self.prev.as_bytes(),
        ] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field);
        }
        hex::encode(h.finalize())
    }
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Records per block (a block stays far below the store's value limit: fields are
/// bounded by the callers, a record is well under 2 KiB).
const BLOCK: usize = 256;

/// Decisions waiting to be written at most (more wait for a place: back-pressure, not
/// memory).
const PENDING_MAX: usize = 4 * BLOCK;

/// A decision waiting to be written, and where to send its outcome.
struct Pending {
    time: u64,
    kind: String,
    instance: Option<String>,
    detail: String,
    done: oneshot::Sender<Result<AuditRecord, AuditError>>,
}

/// Appends to the log. Keeps the head it last saw; a conflict means another writer
/// appended, and it moves on past that block.
pub struct AuditLog {
    key: AuditKey,
    head: Mutex<Option<(u64, String)>>,
    pending: std::sync::Mutex<Vec<Pending>>,
    places: Semaphore,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

/// Why the log failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record does not decode.
    #[error("audit record {seq} is unreadable: {reason}")]
    Unreadable {
        /// Position.
        seq: u64,
        /// Why.
        reason: String,
    },
    /// A record is missing (deleted).
    #[error("audit record {0} is missing: the log was cut")]
    Missing(u64),
    /// A record's hash or link is wrong (changed).
    #[error("audit record {0} was altered: its hash chain does not hold")]
    Altered(u64),
    /// A record's MAC does not verify under the audit key (rewritten by someone without
    /// the key, or the key is not the one that wrote it).
    #[error(
        "audit record {0} is not authenticated by the audit key: rewritten, or a different key"
    )]
    Forged(u64),
    /// The log ends before a checkpoint's record, or differs from it there.
    #[error("the log was cut or rewritten: {0}")]
    Truncated(String),
    /// The checkpoint itself does not verify under the audit key.
    #[error("the checkpoint is not authenticated by this audit key")]
    BadCheckpoint,
}

impl AuditLog {
    /// An appender with `key` that will find the head in the store on first use.
    pub fn new(key: AuditKey) -> Self {
        Self {
            key,
            head: Mutex::new(None),
            pending: std::sync::Mutex::new(Vec::new()),
            places: Semaphore::new(PENDING_MAX),
        }
    }

    /// The key records are authenticated with.
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    async fn find_head<S: Store>(store: &S) -> Result<(u64, String), AuditError> {
        match store.last(&prefix()).await? {
            None => Ok((0, GENESIS.to_string())),
            Some((k, v)) => {
                let block = decode(&k, &v.value)?;
                let last = block.last().ok_or(AuditError::Unreadable {
                    seq: first_seq(&k),
                    reason: "an empty block".into(),
                })?;
                Ok((last.seq, last.hash.clone()))
            }
        }
    }

    /// Appends a record; returns it as stored (once the block holding it is stored).
    pub async fn append<S: Store>(
        &self,
        store: &S,
        time: u64,
        kind: &str,
        instance: Option<String>,
        detail: String,
    ) -> Result<AuditRecord, AuditError> {
        let (done, mut outcome) = oneshot::channel();
        // A place in the queue first: under a storm of decisions, callers wait here.
        let _place = self.places.acquire().await.map_err(|_| {
            AuditError::Store(StoreError::Unavailable("the audit log is closed".into()))
        })?;
        if let Ok(mut p) = self.pending.lock() {
            p.push(Pending {
                time,
                kind: kind.to_string(),
                instance,
                detail,
                done,
            });
        }
        let mut head = self.head.lock().await;
        // Written by the writer before us?
        if let Ok(r) = outcome.try_recv() {
            return r;
        }
        // We write: everything pending (ours among it), a block at a time.
        loop {
            let batch: Vec<Pending> = match self.pending.lock() {
                Ok(mut p) => {
                    let n = p.len().min(BLOCK);
                    p.drain(..n).collect()
                }
                Err(_) => Vec::new(),
            };
            if batch.is_empty() {
                break;
            }
            let result = Self::write_block(store, &self.key, &mut head, &batch).await;
            for (i, p) in batch.into_iter().enumerate() {
                let r = match &result {
                    Ok(records) => Ok(records[i].clone()),
                    Err(e) => Err(e.clone()),
                };
                let _ = p.done.send(r);
            }
        }
        drop(head);
        outcome.await.unwrap_or_else(|_| {
            Err(AuditError::Store(StoreError::Unavailable(
                "the audit writer stopped".into(),
            )))
        })
    }

    async fn write_block<S: Store>(
        store: &S,
        key: &AuditKey,
        head: &mut Option<(u64, String)>,
        batch: &[Pending],
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let (mut seq, mut prev) = match head.take() {
            Some(h) => h,
            None => Self::find_head(store).await?,
        };
        // Bounded: each conflict means another writer appended one block.
        for _ in 0..10_000 {
            let mut records = Vec::with_capacity(batch.len());
            let mut link = prev.clone();
            if seq.checked_add(batch.len() as u64 + 1).is_none() {
                return Err(AuditError::Unreadable {
                    seq,
                    reason: "the log's head is at the end of the sequence space".into(),
                });
            }
            for (i, p) in batch.iter().enumerate() {
                let mut rec = AuditRecord {
                    seq: seq + 1 + i as u64,
                    time: p.time,
                    kind: p.kind.clone(),
                    instance: p.instance.clone(),
                    detail: p.detail.clone(),
                    prev: link,
                    hash: String::new(),
                    mac: String::new(),
                };
                rec.hash = rec.compute_hash();
                rec.mac = key.record_mac(&rec.hash);
                link = rec.hash.clone();
                records.push(rec);
            }
            let bytes = serde_json::to_vec(&records).map_err(|e| AuditError::Unreadable {
                seq: seq + 1,
                reason: e.to_string(),
            })?;
            match store
                .compare_and_swap(&block_key(seq + 1), Expect::Absent, bytes)
                .await?
            {
                Cas::Swapped { .. } => {
                    *head = Some((seq + records.len() as u64, link));
                    return Ok(records);
                }
                Cas::Conflict { current } => {
                    let k = block_key(seq + 1);
                    let other = decode(&k, &current.map(|v| v.value).unwrap_or_default())?;
                    let last = other.last().ok_or(AuditError::Unreadable {
                        seq: seq + 1,
                        reason: "an empty block".into(),
                    })?;
                    seq = last.seq;
                    prev = last.hash.clone();
                }
            }
        }
        Err(AuditError::Store(StoreError::Unavailable(
            "the audit log is contended beyond 10,000 appends".into(),
        )))
    }
}

fn first_seq(key: &str) -> u64 {
    key.rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn decode(key: &str, value: &[u8]) -> Result<Vec<AuditRecord>, AuditError> {
    serde_json::from_slice(value).map_err(|e| AuditError::Unreadable {
        seq: first_seq(key),
        reason: e.to_string(),
    })
}

/// Blocks read per page while verifying (each at most 256 records).
const VERIFY_PAGE: usize = 16;

/// Checks the whole log, a page at a time (memory stays bounded however long it is): the
/// chain links, every hash, every MAC under `key`, and, with `checkpoint`, that the log
/// still reaches the checkpoint's record unchanged. Returns the head.
pub async fn verify<S: Store>(
    store: &S,
    key: &AuditKey,
    checkpoint: Option<&Checkpoint>,
) -> Result<Checkpoint, AuditError> {
    if let Some(c) = checkpoint
        && !key.verifies(&key.checkpoint_mac(c.seq, &c.hash), &c.mac)
    {
        return Err(AuditError::BadCheckpoint);
    }
    let mut seen = 0u64;
    let mut prev = GENESIS.to_string();
    let mut after = String::new();
    loop {
        let page = store.list_page(&prefix(), &after, VERIFY_PAGE).await?;
        for (k, v) in &page.entries {
            let expected_seq = seen + 1;
            if first_seq(k) != expected_seq || *k != block_key(expected_seq) {
                return Err(AuditError::Missing(expected_seq));
            }
            let block = decode(k, &v.value)?;
            if block.is_empty() || block.len() > BLOCK {
                // The appender never writes either; a merged block would also hide its
                // records from paging, which relies on the bound.
                return Err(AuditError::Unreadable {
                    seq: expected_seq,
                    reason: format!("a block of {} records (1 to {BLOCK})", block.len()),
                });
            }
            for rec in block {
                let expected_seq = seen + 1;
                if rec.seq != expected_seq {
                    return Err(AuditError::Missing(expected_seq));
                }
                if rec.prev != prev || rec.hash != rec.compute_hash() {
                    return Err(AuditError::Altered(rec.seq));
                }
                if !key.verifies(&key.record_mac(&rec.hash), &rec.mac) {
                    return Err(AuditError::Forged(rec.seq));
                }
                if let Some(c) = checkpoint
                    && c.seq == rec.seq
                    && c.hash != rec.hash
                {
                    return Err(AuditError::Truncated(format!(
                        "record {} differs from the checkpoint's",
                        c.seq
                    )));
                }
                prev = rec.hash;
                seen = rec.seq;
            }
        }
        match page.entries.last() {
            Some((k, _)) if page.entries.len() == VERIFY_PAGE => after = k.clone(),
            _ => break,
        }
    }
    if let Some(c) = checkpoint
        && c.seq > seen
    {
        return Err(AuditError::Truncated(format!(
            "the log ends at record {seen}, but the checkpoint names record {}",
            c.seq
        )));
    }
    Ok(Checkpoint {
        seq: seen,
        mac: key.checkpoint_mac(seen, &prev),
        hash: prev,
    })
}

/// One page of the log for `audit show`: records from `since` on (at least 1), as many as
/// fit in `budget` bytes of JSON (at least one), each checked against its MAC and the
/// links within the page. Returns them and the `since` of the next page, if any.
pub async fn page<S: Store>(
    store: &S,
    key: &AuditKey,
    since: u64,
    budget: usize,
    filter: impl Fn(&AuditRecord) -> bool,
) -> Result<(Vec<AuditRecord>, Option<u64>), AuditError> {
    let since = since.max(1);
    let mut after = block_before(since);
    let mut out = Vec::new();
    let mut used = 2usize;
    let mut prev: Option<String> = None;
    loop {
        let page = store.list_page(&prefix(), &after, VERIFY_PAGE).await?;
        for (k, v) in &page.entries {
            for rec in decode(k, &v.value)? {
                if rec.seq < since {
                    prev = Some(rec.hash.clone());
                    continue;
                }
                if rec.hash != rec.compute_hash() || prev.as_ref().is_some_and(|p| *p != rec.prev) {
                    return Err(AuditError::Altered(rec.seq));
                }
                if !key.verifies(&key.record_mac(&rec.hash), &rec.mac) {
                    return Err(AuditError::Forged(rec.seq));
                }
                prev = Some(rec.hash.clone());
                if !filter(&rec) {
                    continue;
                }
                let size = serde_json::to_vec(&rec).map_or(usize::MAX, |v| v.len() + 1);
                if !out.is_empty() && used + size > budget {
                    return Ok((out, Some(rec.seq)));
                }
                used += size;
                out.push(rec);
            }
        }
        match page.entries.last() {
            Some((k, _)) if page.entries.len() == VERIFY_PAGE => after = k.clone(),
            _ => return Ok((out, None)),
        }
    }
}

/// Every record from `since` on, checked as [`page`] does (for tests and small logs: it
/// holds them all in memory).
pub async fn records<S: Store>(
    store: &S,
    key: &AuditKey,
    since: u64,
) -> Result<Vec<AuditRecord>, AuditError> {
    let mut out = Vec::new();
    let mut from = since;
    // Bounded: each page holds at least one record.
    for _ in 0..u32::MAX {
        let (mut recs, next) = page(store, key, from, usize::MAX, |_| true).await?;
        out.append(&mut recs);
        match next {
            Some(n) => from = n,
            None => break,
        }
    }
    Ok(out)
}

/// A key before the block that holds record `since` and after every earlier block but
/// one: blocks hold at most [`BLOCK`] records, so that block starts after
/// `since - BLOCK`. Empty: from the start.
fn block_before(since: u64) -> String {
    match since.saturating_sub(BLOCK as u64) {
        0 => String::new(),
        from => block_key(from),
    }
}

/// The number of the last record in the log (0 when it is empty), from its last block
/// alone (not verified: [`page`] verifies what it returns).
pub async fn head<S: Store>(store: &S) -> Result<u64, AuditError> {
    match store.last(&prefix()).await? {
        None => Ok(0),
        Some((k, v)) => Ok(decode(&k, &v.value)?.last().map_or(0, |r| r.seq)),
    }
}
