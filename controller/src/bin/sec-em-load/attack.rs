//! The attacker of `sec-em-load --attack`: someone on loopback without credentials who
//! holds many connections with streams open and sends refused enrollments as fast as
//! Sec-EM answers them. It runs on its own runtime thread, from its own source addresses
//! (`hold_sources` of 127.0.2.x for held connections, `sources` of 127.0.3.x and up
//! for enrollments), until told to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use asmn_shared::wire::msg::{self, Body};

/// What the attacker did.
#[derive(Debug, Default)]
pub struct Tally {
    /// Connections that completed a handshake (first ones and reconnections).
    pub admitted: AtomicU64,
    /// Connection attempts that failed (refused by a cap, or timed out).
    pub refused: AtomicU64,
    /// Connections holding two streams open right now.
    pub holding: AtomicU64,
    /// Enrollments sent and answered with a refusal.
    pub enrollments_refused: AtomicU64,
    /// Enrollments answered otherwise (must stay 0: random IDs never enroll).
    pub enrollments_accepted: AtomicU64,
}

/// The attack's size.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Connections held open, each with as many streams as Sec-EM allows, each stream
    /// with most of a frame sent and no end.
    pub connections: usize,
    /// Refused enrollments to send in all.
    pub enrollments: u64,
    /// Connections the enrollments are sent over.
    pub senders: usize,
    /// Source addresses the enrollments come from (127.0.3.x and up).
    pub sources: usize,
    /// Source addresses the held connections come from (127.0.2.x).
    pub hold_sources: usize,
}

/// A running attack; dropping it stops it.
pub struct Attack {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// What it did so far.
    pub tally: Arc<Tally>,
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long one connection attempt may take.
const DIAL: Duration = Duration::from_secs(5);
/// Bounds on the attacker's loops: nothing runs longer than this.
const MAX_RUN: Duration = Duration::from_secs(600);

/// Starts the attack on `target` (trusting `ca_pem`, as any agent does); `enroll` is a
/// well-formed enrollment whose instance key is replaced by random ones.
pub fn start(
    target: SocketAddr,
    ca_pem: String,
    enroll: msg::EnrollRequest,
    plan: Plan,
) -> anyhow::Result<Attack> {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (s, t) = (Arc::clone(&stop), Arc::clone(&tally));
    let thread = std::thread::Builder::new()
        .name("attacker".into())
        .spawn(move || {
            runtime.block_on(run(target, ca_pem, enroll, plan, s, t));
        })?;
    Ok(Attack {
        stop,
        thread: Some(thread),
        tally,
    })
}

async fn run(
    target: SocketAddr,
    ca_pem: String,
    enroll: msg::EnrollRequest,
    plan: Plan,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    let endpoint = |net: u8, i: usize| {
        asmn_channel::tls::client_on(
            SocketAddr::from((
                [
                    127,
                    net + (i / 62_500) as u8,
                    (i / 250 % 250) as u8,
                    (i % 250 + 1) as u8,
                ],
                0,
            )),
            &ca_pem,
            None,
        )
    };
    let mut holders = Vec::new();
    for i in 0..plan.hold_sources.clamp(1, 62_500) {
        match endpoint(2, i) {
            Ok(e) => holders.push(e),
            Err(e) => eprintln!("attacker: endpoint: {e}"),
        }
    }
    let mut senders = Vec::new();
    for i in 0..plan.sources.clamp(1, 10_000) {
        match endpoint(3, i) {
            Ok(e) => senders.push(e),
            Err(e) => eprintln!("attacker: endpoint: {e}"),
        }
    }
    if holders.is_empty() || senders.is_empty() {
        return;
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..plan.connections {
        let (ep, stop, tally) = (
            holders[k % holders.len()].clone(),
            Arc::clone(&stop),
            Arc::clone(&tally),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_RUN {
                hold(&ep, target, &stop, &tally).await;
            }
        });
    }
    let budget = Arc::new(AtomicU64::new(plan.enrollments));
    for k in 0..plan.senders {
        let (ep, stop, tally, budget, enroll) = (
            senders[k % senders.len()].clone(),
            Arc::clone(&stop),
            Arc::clone(&tally),
            Arc::clone(&budget),
            enroll.clone(),
        );
        tasks.spawn(async move {
            while !stop.load(Ordering::Relaxed)
                && started.elapsed() < MAX_RUN
                && budget.load(Ordering::Relaxed) > 0
            {
                spam(&ep, target, &enroll, &stop, &tally, &budget).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn dial(
    ep: &quinn::Endpoint,
    target: SocketAddr,
    tally: &Tally,
) -> Option<quinn::Connection> {
    let connecting = ep.connect(target, "sec-em").ok()?;
    match tokio::time::timeout(DIAL, connecting).await {
        Ok(Ok(c)) => {
            tally.admitted.fetch_add(1, Ordering::Relaxed);
            Some(c)
        }
        _ => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            // Refused: try again later, as a persistent attacker would.
            tokio::time::sleep(Duration::from_millis(500)).await;
            None
        }
    }
}

/// One connection that opens every stream it may and sends most of a frame on each,
/// never the end; it lasts until Sec-EM closes it.
async fn hold(ep: &quinn::Endpoint, target: SocketAddr, stop: &AtomicBool, tally: &Tally) {
    let Some(c) = dial(ep, target, tally).await else {
        return;
    };
    let mut streams = Vec::new();
    let chunk = vec![0x5au8; 60 * 1024];
    for _ in 0..2 {
        let Ok(Ok((mut send, recv))) =
            tokio::time::timeout(Duration::from_secs(2), c.open_bi()).await
        else {
            break;
        };
        // A header announcing a full frame, then most of it.
        let header = (asmn_shared::wire::MAX_FRAME as u32).to_be_bytes();
        if send.write_all(&header).await.is_err() {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), send.write_all(&chunk)).await;
        streams.push((send, recv));
    }
    tally.holding.fetch_add(1, Ordering::Relaxed);
    let closed = c.closed();
    tokio::pin!(closed);
    // Bounded: Sec-EM closes it at its deadline; the stop flag is checked every 100 ms.
    while !stop.load(Ordering::Relaxed) {
        if tokio::time::timeout(Duration::from_millis(100), &mut closed)
            .await
            .is_ok()
        {
            break;
        }
    }
    tally.holding.fetch_sub(1, Ordering::Relaxed);
    drop(streams);
    c.close(0u32.into(), b"");
}

/// One connection that sends refused enrollments (random instance keys, otherwise
/// well-formed) back to back until Sec-EM closes it or the budget is spent.
async fn spam(
    ep: &quinn::Endpoint,
    target: SocketAddr,
    enroll: &msg::EnrollRequest,
    stop: &AtomicBool,
    tally: &Tally,
    budget: &AtomicU64,
) {
    let Some(c) = dial(ep, target, tally).await else {
        return;
    };
    let mut req = enroll.clone();
    while !stop.load(Ordering::Relaxed) {
        if budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        req.instance_key = rand::random::<[u8; 32]>().to_vec();
        let env = msg::Envelope {
            request_id: 1,
            body: Some(Body::Enroll(req.clone())),
        };
        match asmn_channel::call::request(&c, &env, Duration::from_secs(10)).await {
            Ok(msg::Envelope {
                body: Some(Body::Refused(_)),
                ..
            }) => {
                tally.enrollments_refused.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                tally.enrollments_accepted.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // Closed at the enrollment deadline (or reset): give the request back
                // and reconnect.
                budget.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    c.close(0u32.into(), b"");
}
