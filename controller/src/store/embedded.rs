//! The embedded store: one redb file, crash-safe, with group commit.
//!
//! Writes go to one writer thread, which takes every operation waiting, applies them in
//! order in one write transaction, commits it (fsync), and only then answers each caller.
//! So an acknowledged write survives `kill -9`, and a thousand concurrent enrollments cost
//! a few dozen fsyncs, not a thousand. Reads use redb's snapshot read transactions.
//!
//! Revisions are a counter stored with the data, +1 per write, like etcd's. Watches are
//! served from the last [`RING`] changes kept in memory; a watch that asks for an older
//! revision (or falls behind) gets [`StoreError::Compacted`] and the resilient watch
//! lists again.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{
    AbortOnDrop, Cas, Expect, Listing, RawEvent, RawWatch, Store, StoreError, Versioned, check_key,
    check_value,
};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";

/// Changes kept in memory for watches to catch up from.
pub const RING: usize = 4096;
/// Most operations in one commit.
const BATCH: usize = 512;

enum Op {
    Put(String, Vec<u8>),
    Cas(String, Expect, Vec<u8>),
    Delete(String),
}

enum Done {
    Put(u64),
    Cas(Cas),
    Delete(bool),
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Done, StoreError>>,
}

/// The changes kept for watches, and the live feed.
struct Hub {
    ring: VecDeque<RawEvent>,
    feed: broadcast::Sender<RawEvent>,
}

/// The embedded store. Cheap to share behind an `Arc`; the writer thread stops when the
/// store is dropped.
pub struct EmbeddedStore {
    path: PathBuf,
    db: Arc<Database>,
    requests: Mutex<Option<std_mpsc::Sender<Request>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    hub: Arc<Mutex<Hub>>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish()
    }
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Database(e.to_string())
}

fn encode(revision: u64, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&revision.to_be_bytes());
    v.extend_from_slice(value);
    v
}

fn decode(raw: &[u8]) -> Result<Versioned, StoreError> {
    if raw.len() < 8 {
        return Err(StoreError::Database("a stored record is truncated".into()));
    }
    let (rev, value) = raw.split_at(8);
    let mut r = [0u8; 8];
    r.copy_from_slice(rev);
    Ok(Versioned {
        value: value.to_vec(),
        revision: u64::from_be_bytes(r),
    })
}

/// Every entry of an embedded store at one revision (values without their per-key
/// revisions): what a backup holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The store's revision when it was taken.
    pub revision: u64,
    /// Keys and values, in key order.
    pub entries: Vec<(String, Vec<u8>)>,
}

/// Takes snapshots of an open store while it serves (shares its database).
#[derive(Clone)]
pub struct Snapshotter {
    db: Arc<Database>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshotter")
    }
}

impl Snapshotter {
    /// Every entry, from one read transaction: consistent while writes go on.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let kv = txn.open_table(KV).map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let revision = meta.get(REVISION).map_err(db_err)?.map_or(0, |g| g.value());
        let mut entries = Vec::new();
        for item in kv.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            entries.push((k.value().to_string(), decode(v.value())?.value));
        }
        Ok(Snapshot { revision, entries })
    }
}

impl EmbeddedStore {
    /// A handle that takes snapshots of this store while it serves.
    pub fn snapshotter(&self) -> Snapshotter {
        Snapshotter {
            db: Arc::clone(&self.db),
        }
    }

    /// Writes `snap` into a new store file at `path` (which must not exist): every entry
    /// at the snapshot's revision, so that watches and compare-and-swap start after it.
    pub fn create_from(path: &Path, snap: &Snapshot) -> Result<(), StoreError> {
        if path.exists() {
            return Err(StoreError::Invalid(format!(
                "{} exists; restore writes a new store file",
                path.display()
            )));
        }
        for (k, v) in &snap.entries {
            check_key(k)?;
            check_value(v)?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut kv = txn.open_table(KV).map_err(db_err)?;
            let mut meta = txn.open_table(META).map_err(db_err)?;
            for (k, v) in &snap.entries {
                kv.insert(k.as_str(), encode(snap.revision, v).as_slice())
                    .map_err(db_err)?;
            }
            meta.insert(REVISION, snap.revision).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)
    }

    /// Opens (or creates) the store file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Database(format!("{}: {e}", path.display())))?;
        // Create the tables, so that read transactions always find them.
        let txn = db.begin_write().map_err(db_err)?;
        {
            txn.open_table(KV).map_err(db_err)?;
            txn.open_table(META).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        let db = Arc::new(db);
        let (feed, _) = broadcast::channel(RING);
        let hub = Arc::new(Mutex::new(Hub {
            ring: VecDeque::with_capacity(RING),
            feed,
        }));
        let (tx, rx) = std_mpsc::channel::<Request>();
        let writer = {
            let (db, hub) = (Arc::clone(&db), Arc::clone(&hub));
            std::thread::Builder::new()
                .name("asmn-store-writer".into())
                .spawn(move || writer_loop(&db, &hub, &rx))
                .map_err(|e| StoreError::Database(format!("cannot start the writer: {e}")))?
        };
        Ok(Self {
            path: path.to_path_buf(),
            db,
            requests: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            hub,
        })
    }

    async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        let (reply, rx) = oneshot::channel();
        {
            let guard = self
                .requests
                .lock()
                .map_err(|_| db_err("writer lock poisoned"))?;
            let tx = guard
                .as_ref()
                .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
            tx.send(Request { op, reply })
                .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?;
        }
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }

    fn current_revision(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        Ok(meta.get(REVISION).map_err(db_err)?.map_or(0, |g| g.value()))
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        if let Ok(mut g) = self.requests.lock() {
            g.take();
        }
        if let Ok(mut g) = self.writer.lock()
            && let Some(h) = g.take()
        {
            let _ = h.join();
        }
    }
}

fn writer_loop(db: &Database, hub: &Mutex<Hub>, rx: &std_mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match apply(db, &batch) {
            Ok((results, events)) => {
                // Publish before answering: a caller that writes then watches from its
                // revision finds its own change in the ring.
                if let Ok(mut h) = hub.lock() {
                    for ev in events {
                        if h.ring.len() == RING {
                            h.ring.pop_front();
                        }
                        h.ring.push_back(ev.clone());
                        let _ = h.feed.send(ev);
                    }
                }
                for (req, res) in batch.into_iter().zip(results) {
                    let _ = req.reply.send(res);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; {} writes refused", batch.len());
                for req in batch {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

type Applied = (Vec<Result<Done, StoreError>>, Vec<RawEvent>);

fn apply(db: &Database, batch: &[Request]) -> Result<Applied, StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    let mut results = Vec::with_capacity(batch.len());
    let mut events = Vec::new();
    {
        let mut kv = txn.open_table(KV).map_err(db_err)?;
        let mut meta = txn.open_table(META).map_err(db_err)?;
        let mut rev = meta.get(REVISION).map_err(db_err)?.map_or(0, |g| g.value());
        for req in batch {
            let res = match &req.op {
                Op::Put(k, v) => Ok(Done::Put(write(&mut kv, &mut events, &mut rev, k, v)?)),
                Op::Cas(k, expect, v) => {
                    let current = match kv.get(k.as_str()).map_err(db_err)? {
                        Some(g) => Some(decode(g.value())?),
                        None => None,
                    };
                    let ok = match (expect, &current) {
                        (Expect::Absent, None) => true,
                        (Expect::Revision(r), Some(c)) => c.revision == *r,
                        _ => false,
                    };
                    if ok {
                        let revision = write(&mut kv, &mut events, &mut rev, k, v)?;
                        Ok(Done::Cas(Cas::Swapped { revision }))
                    } else {
                        Ok(Done::Cas(Cas::Conflict { current }))
                    }
                }
                Op::Delete(k) => {
                    let existed = kv.remove(k.as_str()).map_err(db_err)?.is_some();
                    if existed {
                        rev += 1;
                        events.push(RawEvent::Delete {
                            key: k.clone(),
                            revision: rev,
                        });
                    }
                    Ok(Done::Delete(existed))
                }
            };
            results.push(res);
        }
        meta.insert(REVISION, rev).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)?;
    Ok((results, events))
}

/// Writes `k` at the next revision and records the change for watches.
fn write(
    kv: &mut redb::Table<&str, &[u8]>,
    events: &mut Vec<RawEvent>,
    rev: &mut u64,
    k: &str,
    v: &[u8],
) -> Result<u64, StoreError> {
    *rev += 1;
    kv.insert(k, encode(*rev, v).as_slice()).map_err(db_err)?;
    events.push(RawEvent::Put {
        key: k.to_string(),
        value: v.to_vec(),
        revision: *rev,
    });
    Ok(*rev)
}

fn unexpected() -> StoreError {
    StoreError::Database("the writer answered another operation".into())
}

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        let txn = self.db.begin_read().map_err(db_err)?;
        let kv = txn.open_table(KV).map_err(db_err)?;
        match kv.get(key).map_err(db_err)? {
            Some(g) => decode(g.value()).map(Some),
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        match self.submit(Op::Put(key.to_string(), value)).await? {
            Done::Put(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expect: Expect,
        value: Vec<u8>,
    ) -> Result<Cas, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        match self.submit(Op::Cas(key.to_string(), expect, value)).await? {
            Done::Cas(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        match self.submit(Op::Delete(key.to_string())).await? {
            Done::Delete(d) => Ok(d),
            _ => Err(unexpected()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        self.list_page(prefix, "", usize::MAX).await
    }

    async fn list_page(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let kv = txn.open_table(KV).map_err(db_err)?;
        let meta = txn.open_table(META).map_err(db_err)?;
        let revision = meta.get(REVISION).map_err(db_err)?.map_or(0, |g| g.value());
        let start = String::from_utf8(super::page_start(prefix, after))
            .map_err(|_| StoreError::Invalid("page start is not UTF-8".into()))?;
        let mut entries = Vec::new();
        for item in kv.range(start.as_str()..).map_err(db_err)? {
            if entries.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(db_err)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            entries.push((key.to_string(), decode(v.value())?));
        }
        Ok(Listing { entries, revision })
    }

    async fn last(&self, prefix: &str) -> Result<Option<(String, Versioned)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let kv = txn.open_table(KV).map_err(db_err)?;
        let end = String::from_utf8(super::prefix_end(prefix))
            .map_err(|_| StoreError::Invalid("prefix end is not UTF-8".into()))?;
        let mut range = kv.range(prefix..end.as_str()).map_err(db_err)?;
        match range.next_back() {
            None => Ok(None),
            Some(item) => {
                let (k, v) = item.map_err(db_err)?;
                Ok(Some((k.value().to_string(), decode(v.value())?)))
            }
        }
    }

    async fn watch_raw(&self, prefix: &str, from: u64) -> Result<RawWatch, StoreError> {
        let (replay, mut live) = {
            let hub = self.hub.lock().map_err(|_| db_err("watch lock poisoned"))?;
            let current = self.current_revision()?;
            if from <= current {
                // The ring must reach back to `from`.
                let covered = hub.ring.front().is_some_and(|e| e.revision() <= from);
                if !covered {
                    return Err(StoreError::Compacted(from));
                }
            }
            let replay: Vec<RawEvent> = hub
                .ring
                .iter()
                .filter(|e| e.revision() >= from)
                .cloned()
                .collect();
            (replay, hub.feed.subscribe())
        };
        let prefix = prefix.to_string();
        let (tx, rx) = mpsc::channel(1024);
        let task = tokio::spawn(async move {
            let matches = |e: &RawEvent| match e {
                RawEvent::Put { key, .. } | RawEvent::Delete { key, .. } => {
                    key.starts_with(&prefix)
                }
            };
            let mut last = from.saturating_sub(1);
            for ev in replay.into_iter().filter(|e| matches(e)) {
                last = ev.revision();
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    // Never deliver a revision twice (defensive: the feed was subscribed
                    // after the ring was copied, under the same lock).
                    Ok(ev) if ev.revision() <= last => {}
                    Ok(ev) => {
                        last = ev.revision();
                        if matches(&ev) && tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Err(StoreError::Compacted(last + 1))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(StoreError::Broken("the store closed".into())))
                            .await;
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
