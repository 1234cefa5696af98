//! One suite, both backends: the embedded store always; etcd when the `etcd` binary is
//! installed (required under CI), each test on its own etcd on free loopback ports with a
//! temporary data directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::embedded::{self, EmbeddedStore};
use super::etcd::EtcdStore;
use super::*;
use crate::local_etcd::LocalEtcd;

// ---- An etcd of our own --------------------------------------------------------------

/// A single-member etcd on loopback (see [`crate::local_etcd`]), stopped by PID and its
/// data removed on drop.
pub(crate) struct EtcdServer {
    cluster: LocalEtcd,
    pub(crate) url: String,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers; `None` (outside CI) if etcd is missing.
    pub(crate) async fn start() -> Option<EtcdServer> {
        let cluster = LocalEtcd::for_tests(1).await?;
        Some(EtcdServer {
            url: cluster.url(),
            cluster,
        })
    }

    /// Kills etcd (SIGKILL, by PID).
    pub(crate) fn kill(&mut self) {
        self.cluster.kill(0);
    }

    /// Starts it again on the same ports and data.
    pub(crate) async fn restart(&mut self) {
        self.cluster.restart(0).expect("restart etcd");
        self.cluster
            .wait_ready(Duration::from_secs(20))
            .await
            .expect("etcd back");
    }
}

// ---- The suite -----------------------------------------------------------------------

const P: &str = "/asmn/v1/test/";

fn k(s: &str) -> String {
    format!("{P}{s}")
}

async fn basics<S: Store>(s: &S) {
    assert_eq!(s.get(&k("a")).await.expect("get"), None);
    let r1 = s.put(&k("a"), b"one".to_vec()).await.expect("put");
    let got = s.get(&k("a")).await.expect("get").expect("present");
    assert_eq!(
        got,
        Versioned {
            value: b"one".to_vec(),
            revision: r1
        }
    );
    let r2 = s.put(&k("a"), b"two".to_vec()).await.expect("put");
    assert!(r2 > r1, "revisions increase");
    assert!(s.delete(&k("a")).await.expect("delete"));
    assert!(!s.delete(&k("a")).await.expect("delete again"));
    assert_eq!(s.get(&k("a")).await.expect("get"), None);
    // Bad requests are refused, not sent.
    assert!(matches!(s.get("").await, Err(StoreError::Invalid(_))));
    assert!(matches!(
        s.put(&"x".repeat(MAX_KEY + 1), vec![]).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.put(&k("big"), vec![0; MAX_VALUE + 1]).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn compare_and_swap<S: Store>(s: &S) {
    let key = k("cas");
    let created = s
        .compare_and_swap(&key, Expect::Absent, b"v1".to_vec())
        .await
        .expect("create");
    let Cas::Swapped { revision: r1 } = created else {
        panic!("create must swap: {created:?}");
    };
    // Absent expected but present: conflict, with the current value.
    let again = s
        .compare_and_swap(&key, Expect::Absent, b"v2".to_vec())
        .await
        .expect("cas");
    assert_eq!(
        again,
        Cas::Conflict {
            current: Some(Versioned {
                value: b"v1".to_vec(),
                revision: r1
            })
        }
    );
    // A stale revision: conflict.
    let stale = s
        .compare_and_swap(&key, Expect::Revision(r1 + 1000), b"v2".to_vec())
        .await
        .expect("cas");
    assert!(matches!(stale, Cas::Conflict { .. }));
    // The right revision: swapped, and the value changed.
    let ok = s
        .compare_and_swap(&key, Expect::Revision(r1), b"v2".to_vec())
        .await
        .expect("cas");
    assert!(matches!(ok, Cas::Swapped { revision } if revision > r1));
    assert_eq!(s.get(&key).await.expect("get").expect("v").value, b"v2");
    // Expecting a revision of a missing key: conflict with nothing.
    let missing = s
        .compare_and_swap(&k("nope"), Expect::Revision(1), b"x".to_vec())
        .await
        .expect("cas");
    assert_eq!(missing, Cas::Conflict { current: None });
}

/// Many writers race on one revision: exactly one wins.
async fn racing_swaps<S: Store>(s: Arc<S>) {
    let key = k("race");
    let Cas::Swapped { revision } = s
        .compare_and_swap(&key, Expect::Absent, b"start".to_vec())
        .await
        .expect("create")
    else {
        panic!("create");
    };
    let mut tasks = Vec::new();
    for i in 0..32u32 {
        let (s, key) = (Arc::clone(&s), key.clone());
        tasks.push(tokio::spawn(async move {
            s.compare_and_swap(&key, Expect::Revision(revision), i.to_be_bytes().to_vec())
                .await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        if matches!(t.await.expect("task").expect("cas"), Cas::Swapped { .. }) {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
}

async fn listing<S: Store>(s: &S) {
    for name in ["l/b", "l/a", "l/c", "m/x"] {
        s.put(&k(name), name.as_bytes().to_vec())
            .await
            .expect("put");
    }
    let l = s.list(&k("l/")).await.expect("list");
    let keys: Vec<&str> = l.entries.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, vec![k("l/a"), k("l/b"), k("l/c")]);
    assert!(l.revision >= l.entries.iter().map(|(_, v)| v.revision).max().unwrap_or(0));
}

async fn next_event(w: &mut Watch) -> Event {
    tokio::time::timeout(Duration::from_secs(10), w.events.recv())
        .await
        .expect("an event within 10 s")
        .expect("watch open")
}

async fn watching<S: Store>(s: Arc<S>) {
    s.put(&k("w/pre"), b"0".to_vec()).await.expect("put");
    let mut w = watch_prefix(Arc::clone(&s), &k("w/"));
    let Event::Reset(first) = next_event(&mut w).await else {
        panic!("a watch starts with the full state");
    };
    assert_eq!(first.entries.len(), 1);
    let r = s.put(&k("w/a"), b"1".to_vec()).await.expect("put");
    s.put(&k("other"), b"x".to_vec())
        .await
        .expect("put outside");
    s.delete(&k("w/pre")).await.expect("delete");
    match next_event(&mut w).await {
        Event::Change(RawEvent::Put {
            key,
            value,
            revision,
        }) => {
            assert_eq!((key, value, revision), (k("w/a"), b"1".to_vec(), r));
        }
        other => panic!("expected the put, got {other:?}"),
    }
    match next_event(&mut w).await {
        Event::Change(RawEvent::Delete { key, .. }) => assert_eq!(key, k("w/pre")),
        other => panic!("expected the delete (and nothing outside the prefix), got {other:?}"),
    }
}

async fn paging<S: Store>(s: &S) {
    let pp = format!("{P}page/");
    assert_eq!(s.last(&pp).await.expect("last"), None);
    for i in 0..25u32 {
        s.put(&format!("{pp}{i:03}"), i.to_be_bytes().to_vec())
            .await
            .expect("put");
    }
    // Keys just outside the prefix, on both sides, are never listed.
    s.put(&format!("{P}pagd"), b"before".to_vec())
        .await
        .expect("put");
    s.put(&format!("{P}page0"), b"after".to_vec())
        .await
        .expect("put");
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..10 {
        let page = s.list_page(&pp, &after, 10).await.expect("page");
        assert!(page.entries.len() <= 10);
        seen.extend(page.entries.iter().map(|(k, _)| k.clone()));
        match page.entries.last() {
            Some((k, _)) if page.entries.len() == 10 => after = k.clone(),
            _ => break,
        }
    }
    let expected: Vec<String> = (0..25u32).map(|i| format!("{pp}{i:03}")).collect();
    assert_eq!(seen, expected);
    let (k, v) = s.last(&pp).await.expect("last").expect("present");
    assert_eq!(
        (k, v.value),
        (format!("{pp}024"), 24u32.to_be_bytes().to_vec())
    );
    // A page that starts after the last key is empty.
    assert!(
        s.list_page(&pp, &format!("{pp}024"), 10)
            .await
            .expect("page")
            .entries
            .is_empty()
    );
}

async fn suite<S: Store>(s: Arc<S>) {
    basics(&*s).await;
    paging(&*s).await;
    compare_and_swap(&*s).await;
    racing_swaps(Arc::clone(&s)).await;
    listing(&*s).await;
    watching(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_passes_the_suite() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Arc::new(EmbeddedStore::open(&dir.path().join("state.redb")).expect("open"));
    suite(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_suite() {
    let Some(server) = EtcdServer::start().await else {
        return;
    };
    let s = Arc::new(EtcdStore::connect(&server.url).await.expect("connect"));
    suite(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_writes_survive_reopening() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("state.redb");
    let r = {
        let s = EmbeddedStore::open(&path).expect("open");
        s.put(&k("durable"), b"yes".to_vec()).await.expect("put")
    };
    let s = EmbeddedStore::open(&path).expect("reopen");
    let v = s.get(&k("durable")).await.expect("get").expect("kept");
    assert_eq!(
        v,
        Versioned {
            value: b"yes".to_vec(),
            revision: r
        }
    );
    // Revisions continue from where they were.
    assert!(s.put(&k("next"), vec![]).await.expect("put") > r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_falls_behind_relists_and_misses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("open"));
    let mut w = watch_prefix(Arc::clone(&s), &k("lag/"));
    assert!(matches!(next_event(&mut w).await, Event::Reset(_)));
    // Write far more than the ring and the channels hold without reading the watch.
    let n = embedded::RING * 4;
    let mut tasks = Vec::new();
    for i in 0..n {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            s.put(&k(&format!("lag/{i:05}")), vec![1])
                .await
                .expect("put")
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    // Whatever mix of changes and resets arrives, the view built from it is complete.
    let mut view = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut resets = 0;
    while view.len() < n {
        assert!(Instant::now() < deadline, "view has {} of {n}", view.len());
        match next_event(&mut w).await {
            Event::Reset(l) => {
                resets += 1;
                view = l.entries.into_iter().map(|(k, _)| k).collect();
            }
            Event::Change(RawEvent::Put { key, .. }) => {
                view.insert(key);
            }
            Event::Change(RawEvent::Delete { key, .. }) => {
                view.remove(&key);
            }
        }
    }
    assert!(resets >= 1, "the watch fell behind and re-listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_compaction_is_reported_and_the_watch_relists() {
    let Some(server) = EtcdServer::start().await else {
        return;
    };
    let s = Arc::new(EtcdStore::connect(&server.url).await.expect("connect"));
    let first = s.put(&k("c/0"), vec![0]).await.expect("put");
    for i in 1..20 {
        s.put(&k(&format!("c/{i}")), vec![0]).await.expect("put");
    }
    let last = s.put(&k("c/last"), vec![0]).await.expect("put");
    s.compact(last).await.expect("compact");
    // A raw watch from before the compaction is refused with Compacted.
    let mut raw = s.watch_raw(&k("c/"), first).await.expect("watch");
    let got = tokio::time::timeout(Duration::from_secs(10), raw.events.recv())
        .await
        .expect("an answer");
    assert!(
        matches!(got, Some(Err(StoreError::Compacted(_)))),
        "{got:?}"
    );
    // The resilient watch lists instead and then follows.
    let mut w = watch_prefix(Arc::clone(&s), &k("c/"));
    let Event::Reset(l) = next_event(&mut w).await else {
        panic!("reset first")
    };
    assert_eq!(l.entries.len(), 21);
    s.put(&k("c/after"), vec![1]).await.expect("put");
    assert!(matches!(
        next_event(&mut w).await,
        Event::Change(RawEvent::Put { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_breaks_the_stream_and_the_watch_recovers() {
    let Some(mut server) = EtcdServer::start().await else {
        return;
    };
    let s = Arc::new(EtcdStore::connect(&server.url).await.expect("connect"));
    s.put(&k("r/a"), vec![1]).await.expect("put");
    let mut w = watch_prefix(Arc::clone(&s), &k("r/"));
    assert!(matches!(next_event(&mut w).await, Event::Reset(_)));
    server.kill();
    assert!(
        matches!(
            s.put(&k("r/b"), vec![1]).await,
            Err(StoreError::Unavailable(_))
        ),
        "writes fail while etcd is down"
    );
    server.restart().await;
    // Written after the restart: the watch must deliver it, through a fresh listing or as
    // a change, whichever comes first.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if s.put(&k("r/c"), vec![2]).await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "etcd did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        assert!(Instant::now() < deadline, "the watch never saw r/c");
        match next_event(&mut w).await {
            Event::Reset(l) if l.entries.iter().any(|(key, _)| *key == k("r/c")) => break,
            Event::Change(RawEvent::Put { key, .. }) if key == k("r/c") => break,
            _ => {}
        }
    }
}
