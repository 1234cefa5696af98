//! Where Sec-EM keeps its state: a small trait with two backends that pass one test suite.
//!
//! - [`embedded::EmbeddedStore`] (the default): one crash-safe redb file. Writes are
//!   group-committed by one writer thread: every operation is durable (fsync) before its
//!   call returns, and concurrent writers share the commit.
//! - [`etcd::EtcdStore`]: an etcd v3 cluster (`--store etcd://host:port,...`), for several
//!   Sec-EM replicas; 3.4 is the reference server.
//!
//! Every one-time step (a chain reveal, an epoch) is a [`Store::compare_and_swap`] on the
//! key's revision, so it is accepted at most once, cluster-wide. Keys live under
//! [`PREFIX`] (`/asmn/v1/`), so a later schema can sit beside this one.
//!
//! [`watch_prefix`] turns a backend's raw watch into one that misses nothing: when the
//! stream breaks, or the revision it needs was compacted, it lists the prefix again and
//! hands the consumer the complete state ([`Event::Reset`]) before resuming.

pub mod embedded;
pub mod etcd;
pub mod keys;
pub mod schema;
#[cfg(test)]
pub(crate) mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The prefix of every key ASMN writes.
pub const PREFIX: &str = "/asmn/v1/";

/// Longest key accepted, in bytes.
pub const MAX_KEY: usize = 512;
/// Largest value accepted, in bytes (etcd's default request limit is 1.5 MiB).
pub const MAX_VALUE: usize = 1 << 20;

/// A value with the revision at which it was last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes stored.
    pub value: Vec<u8>,
    /// The store revision of the last write of this key (etcd's `mod_revision`).
    pub revision: u64,
}

/// What a compare-and-swap expects to find.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist, last written at this revision.
    Revision(u64),
}

/// The outcome of a compare-and-swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cas {
    /// Written, at this revision.
    Swapped {
        /// The new revision of the key.
        revision: u64,
    },
    /// Not written: the key was not as expected. This is what it was.
    Conflict {
        /// The key's current value, if any.
        current: Option<Versioned>,
    },
}

/// Every entry under a prefix, as of one store revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Keys and values, sorted by key.
    pub entries: Vec<(String, Versioned)>,
    /// The store revision the listing reflects.
    pub revision: u64,
}

/// One change seen by a raw watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawEvent {
    /// A key was written.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The revision of the write.
        revision: u64,
    },
    /// A key was deleted.
    Delete {
        /// The key.
        key: String,
        /// The revision of the deletion.
        revision: u64,
    },
}

impl RawEvent {
    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        match self {
            RawEvent::Put { revision, .. } | RawEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// What [`watch_prefix`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The complete state under the prefix: the first event, and again after any break.
    /// Replace what you hold with it.
    Reset(Listing),
    /// One change after the last `Reset` or change.
    Change(RawEvent),
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// The key or value is outside the limits.
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The backend cannot be reached or refused the operation; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A watch needs a revision the store no longer keeps.
    #[error("watch revision {0} was compacted")]
    Compacted(u64),
    /// A watch stream ended or failed.
    #[error("watch stream broken: {0}")]
    Broken(String),
    /// The embedded database file is damaged or unusable.
    #[error("store database error: {0}")]
    Database(String),
}

/// A raw watch: changes from a revision on, until the stream fails. Dropping it stops
/// the task that feeds it.
#[derive(Debug)]
pub struct RawWatch {
    /// The changes, in revision order; an `Err` ends the stream.
    pub events: mpsc::Receiver<Result<RawEvent, StoreError>>,
    /// The task feeding `events`, stopped on drop.
    pub(crate) _task: AbortOnDrop,
}

/// Aborts a task when dropped: every background task has an owner.
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The storage Sec-EM needs.
pub trait Store: Send + Sync + 'static {
    /// The value of `key`.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>, StoreError>> + Send;

    /// Writes `key` unconditionally; returns the new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Writes `key` only if it is as `expect` says.
    fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<Cas, StoreError>> + Send;

    /// Deletes `key`; whether it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Every entry under `prefix`.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    /// At most `limit` entries under `prefix` whose keys sort after `after` (from the
    /// first when `after` is empty), sorted by key: one page of a listing.
    fn list_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    /// The entry with the greatest key under `prefix`, if any.
    fn last(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Option<(String, Versioned)>, StoreError>> + Send;

    /// Changes under `prefix` with revision `from` and later. Fails with
    /// [`StoreError::Compacted`] when the store no longer keeps `from`.
    fn watch_raw(
        &self,
        prefix: &str,
        from: u64,
    ) -> impl Future<Output = Result<RawWatch, StoreError>> + Send;
}

pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(StoreError::Invalid(format!(
            "key of {} bytes; keys have 1 to {MAX_KEY} bytes",
            key.len()
        )));
    }
    Ok(())
}

/// The first key after every key that starts with `prefix` (the end of its range).
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: no end (the whole key space after it).
    vec![0]
}

/// Where a page starts: just after `after` when it lies under `prefix`, else at `prefix`.
pub(crate) fn page_start(prefix: &str, after: &str) -> Vec<u8> {
    if after.is_empty() || after < prefix {
        prefix.as_bytes().to_vec()
    } else {
        let mut k = after.as_bytes().to_vec();
        k.push(0);
        k
    }
}

pub(crate) fn check_value(value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE {
        return Err(StoreError::Invalid(format!(
            "value of {} bytes; at most {MAX_VALUE} are stored",
            value.len()
        )));
    }
    Ok(())
}

/// A watch that misses nothing (see [`watch_prefix`]). Dropping it stops its task.
#[derive(Debug)]
pub struct Watch {
    /// `Reset` first, then changes; `Reset` again after every break.
    pub events: mpsc::Receiver<Event>,
    _task: AbortOnDrop,
}

/// Backoff between re-list attempts while the store is unavailable.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Watches `prefix`: a [`Event::Reset`] with the complete state, then every change. When
/// the stream breaks or its revision is compacted, it lists again (retrying with backoff
/// while the store is unavailable) and sends a new `Reset`, so the consumer's view is
/// always the store's. It ends only when the receiver is dropped.
pub fn watch_prefix<S: Store>(store: Arc<S>, prefix: &str) -> Watch {
    let (tx, rx) = mpsc::channel(1024);
    let prefix = prefix.to_string();
    let task = tokio::spawn(async move {
        let mut delay = RETRY_MIN;
        loop {
            let listing = match store.list(&prefix).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%prefix, error = %e, "watch: listing failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                    continue;
                }
            };
            let from = listing.revision + 1;
            if tx.send(Event::Reset(listing)).await.is_err() {
                return;
            }
            let mut raw = match store.watch_raw(&prefix, from).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(%prefix, error = %e, "watch: cannot watch, re-listing");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                    continue;
                }
            };
            delay = RETRY_MIN;
            loop {
                match raw.events.recv().await {
                    Some(Ok(ev)) => {
                        if tx.send(Event::Change(ev)).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::info!(%prefix, error = %e, "watch: stream ended, re-listing");
                        break;
                    }
                    None => break,
                }
            }
        }
    });
    Watch {
        events: rx,
        _task: AbortOnDrop(task),
    }
}

/// A shared store is a store.
impl<S: Store> Store for Arc<S> {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        (**self).get(key).await
    }
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        (**self).put(key, value).await
    }
    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<Cas, StoreError> {
        (**self).compare_and_swap(key, expect, value).await
    }
    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        (**self).delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        (**self).list(prefix).await
    }
    async fn list_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        (**self).list_page(prefix, after, limit).await
    }
    async fn last(&self, prefix: &str) -> Result<Option<(String, Versioned)>, StoreError> {
        (**self).last(prefix).await
    }
    async fn watch_raw(&self, prefix: &str, from: u64) -> Result<RawWatch, StoreError> {
        (**self).watch_raw(prefix, from).await
    }
}
