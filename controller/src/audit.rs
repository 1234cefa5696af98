//! The audit log: every security decision, append-only and hash-chained.
//!
//! Record `n` is stored at `/asmn/v1/audit/<n, 20 digits>` by a compare-and-swap that
//! requires the key to be absent, so replicas sharing a store never write the same
//! sequence number twice; each record carries the hash of the one before it, so a changed,
//! reordered or deleted record breaks the chain and [`verify`] finds where.

use asmn_shared::crypto::{Digest, Sha256};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

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

/// Appends to the log. Keeps the head it last saw; a conflict means another writer
/// appended, and it moves on past that record.
#[derive(Debug, Default)]
pub struct AuditLog {
    head: Mutex<Option<(u64, String)>>,
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
                let r: AuditRecord =
                    serde_json::from_slice(&v.value).map_err(|e| AuditError::Unreadable {
                        seq: k
                            .rsplit('/')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0),
                        reason: e.to_string(),
                    })?;
                Ok((r.seq, r.hash))
            }
        }
    }

    /// Appends a record; returns it as stored.
    pub async fn append<S: Store>(
        &self,
        store: &S,
        time: u64,
        kind: &str,
        instance: Option<String>,
        detail: String,
    ) -> Result<AuditRecord, AuditError> {
        let mut head = self.head.lock().await;
        let (mut seq, mut prev) = match head.take() {
            Some(h) => h,
            None => Self::find_head(store).await?,
        };
        // Bounded: each conflict means another writer appended one record.
        for _ in 0..10_000 {
            let mut rec = AuditRecord {
                seq: seq + 1,
                time,
                kind: kind.to_string(),
                instance: instance.clone(),
                detail: detail.clone(),
                prev: prev.clone(),
                hash: String::new(),
            };
            rec.hash = rec.compute_hash();
            let bytes = serde_json::to_vec(&rec).map_err(|e| AuditError::Unreadable {
                seq: rec.seq,
                reason: e.to_string(),
            })?;
            match store
                .compare_and_swap(&key(rec.seq), Expect::Absent, bytes)
                .await?
            {
                Cas::Swapped { .. } => {
                    *head = Some((rec.seq, rec.hash.clone()));
                    return Ok(rec);
                }
                Cas::Conflict { current } => {
                    let other: AuditRecord = current
                        .and_then(|v| serde_json::from_slice(&v.value).ok())
                        .ok_or(AuditError::Unreadable {
                            seq: seq + 1,
                            reason: "a concurrent record does not decode".into(),
                        })?;
                    seq = other.seq;
                    prev = other.hash;
                }
            }
        }
        Err(AuditError::Store(StoreError::Unavailable(
            "the audit log is contended beyond 10,000 appends".into(),
        )))
    }
}

/// Reads the whole log and checks its chain; returns the records.
pub async fn verify<S: Store>(store: &S) -> Result<Vec<AuditRecord>, AuditError> {
    let listing = store.list(&prefix()).await?;
    let mut out = Vec::with_capacity(listing.entries.len());
    let mut prev = GENESIS.to_string();
    for (i, (k, v)) in listing.entries.iter().enumerate() {
        let expected_seq = i as u64 + 1;
        let rec: AuditRecord =
            serde_json::from_slice(&v.value).map_err(|e| AuditError::Unreadable {
                seq: expected_seq,
                reason: e.to_string(),
            })?;
        if rec.seq != expected_seq || *k != key(rec.seq) {
            return Err(AuditError::Missing(expected_seq));
        }
        if rec.prev != prev || rec.hash != rec.compute_hash() {
            return Err(AuditError::Altered(rec.seq));
        }
        prev = rec.hash.clone();
        out.push(rec);
    }
    Ok(out)
}
