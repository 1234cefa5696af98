//! The audit log: every security decision, append-only and hash-chained.
//!
//! Records are written in blocks: a block of consecutive records `n..m` is stored at
//! `/asmn/v1/audit/<n, 20 digits>` (a JSON array) by a compare-and-swap that requires the
//! key to be absent, so replicas sharing a store never write the same sequence number
//! twice. Decisions made while a block is being written wait and go together into the
//! next one (group commit: one store write for many decisions under load). Each record
//! carries the hash of the one before it, so a changed, reordered or deleted record breaks
//! the chain and [`verify`] finds where.

use asmn_shared::crypto::{Digest, Sha256};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, oneshot};

use crate::store::{Cas, Expect, PREFIX, Store, StoreError};

/// Where audit records live.
pub fn prefix() -> String {
    format!("{PREFIX}audit/")
}

fn key(seq: u64) -> String {
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
}

impl AuditRecord {
    fn compute_hash(&self) -> String {
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
#[derive(Default)]
pub struct AuditLog {
    head: Mutex<Option<(u64, String)>>,
    pending: std::sync::Mutex<Vec<Pending>>,
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
}

impl AuditLog {
    /// An appender that will find the head in the store on first use.
    pub fn new() -> Self {
        Self::default()
    }

    async fn find_head<S: Store>(store: &S) -> Result<(u64, String), AuditError> {
        let listing = store.list(&prefix()).await?;
        match listing.entries.last() {
            None => Ok((0, GENESIS.to_string())),
            Some((k, v)) => {
                let block = decode(k, &v.value)?;
                let last = block.last().ok_or(AuditError::Unreadable {
                    seq: first_seq(k),
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
            let result = Self::write_block(store, &mut head, &batch).await;
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
            for (i, p) in batch.iter().enumerate() {
                let mut rec = AuditRecord {
                    seq: seq + 1 + i as u64,
                    time: p.time,
                    kind: p.kind.clone(),
                    instance: p.instance.clone(),
                    detail: p.detail.clone(),
                    prev: link,
                    hash: String::new(),
                };
                rec.hash = rec.compute_hash();
                link = rec.hash.clone();
                records.push(rec);
            }
            let bytes = serde_json::to_vec(&records).map_err(|e| AuditError::Unreadable {
                seq: seq + 1,
                reason: e.to_string(),
            })?;
            match store
                .compare_and_swap(&key(seq + 1), Expect::Absent, bytes)
                .await?
            {
                Cas::Swapped { .. } => {
                    *head = Some((seq + records.len() as u64, link));
                    return Ok(records);
                }
                Cas::Conflict { current } => {
                    let k = key(seq + 1);
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

/// Reads the whole log and checks its chain; returns the records.
pub async fn verify<S: Store>(store: &S) -> Result<Vec<AuditRecord>, AuditError> {
    let listing = store.list(&prefix()).await?;
    let mut out: Vec<AuditRecord> = Vec::with_capacity(listing.entries.len());
    let mut prev = GENESIS.to_string();
    for (k, v) in &listing.entries {
        let expected_seq = out.len() as u64 + 1;
        if first_seq(k) != expected_seq || *k != key(expected_seq) {
            return Err(AuditError::Missing(expected_seq));
        }
        let block = decode(k, &v.value)?;
        if block.is_empty() {
            return Err(AuditError::Unreadable {
                seq: expected_seq,
                reason: "an empty block".into(),
            });
        }
        for rec in block {
            let expected_seq = out.len() as u64 + 1;
            if rec.seq != expected_seq {
                return Err(AuditError::Missing(expected_seq));
            }
            if rec.prev != prev || rec.hash != rec.compute_hash() {
                return Err(AuditError::Altered(rec.seq));
            }
            prev = rec.hash.clone();
            out.push(rec);
        }
    }
    Ok(out)
}
