//! `sec-em-load`: the load benchmark of Sec-EM. Starts a `sec-em` of its own (the binary
//! beside this one) on loopback with a fresh PKI, then drives N simulated agents (the
//! `asmn-shared` state machines over real QUIC connections) and reports enrollments per
//! second, reveal latency, catalog apply until every agent acknowledged, revocation until
//! every peer was notified, and the memory of `sec-em` with many idle agents connected.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use asmn_controller::local_etcd::LocalEtcd;
use asmn_controller::{config, pki};
use asmn_shared::chain::{ChainProver, ChainSpec, seed};
use asmn_shared::dh::DhKeyPair;
use asmn_shared::ids::InstanceKey;
use asmn_shared::measure::{Algorithm, measure_bytes};
use asmn_shared::wire::msg::{self, Body};
use asmn_shared::wire::{self, BootstrapBundle, Enroll};
use clap::Parser;
use tokio::sync::{Semaphore, mpsc};

mod attack;
mod rest;

/// Load benchmark of Sec-EM: N simulated agents on loopback.
///
/// Starts `sec-em serve` (found beside this binary, or --sec-em) with a fresh PKI in a
/// temporary directory, on-boards one VNF, creates the instances, then measures:
/// enrollment of all agents at once (enrollments per second, latency p50/p99), one
/// re-attestation round (reveal latency), catalog apply until every agent acknowledged the
/// new version (--trials times), revocation until every other agent of the tenant was
/// notified (--trials times), and optionally many idle agents held connected (--idle) with
/// the resident memory of sec-em. Agents are simulated with the protocol's own state
/// machines over real QUIC connections; only loopback is used.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Agents enrolled and measured.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Store: `embedded` (a redb file), `etcd` (a local one-member etcd started for the
    /// run, plaintext on loopback; needs the etcd binary) or `etcds` (the same over TLS
    /// with client certificates).
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Catalog applies and revocations measured.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// After the measurements, connect this many more agents and hold all idle.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// How long to hold the idle agents, in seconds.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Enrollments in flight at once (default: all the measured agents at once).
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Enrollments in flight at once while connecting the idle agents.
    #[arg(long, default_value_t = 250)]
    idle_concurrency: usize,
    /// The sec-em binary (default: beside this one).
    #[arg(long)]
    sec_em: Option<PathBuf>,
    /// Write sec-em's log here (default: discarded).
    #[arg(long)]
    sec_em_log: Option<PathBuf>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// After the first re-attestation round (the baseline), attack Sec-EM from other
    /// loopback addresses without credentials: hold --attack-connections connections with
    /// their streams open, send --attack-enrollments refused enrollments, and re-attest
    /// every agent in rounds meanwhile. Reports reveal latency beside the baseline,
    /// Sec-EM's peak memory, the store's growth, and refusals.
    #[arg(long)]
    attack: bool,
    /// Connections the attacker holds open.
    #[arg(long, default_value_t = 2000)]
    attack_connections: usize,
    /// Refused enrollments the attacker sends.
    #[arg(long, default_value_t = 100_000)]
    attack_enrollments: u64,
    /// Source addresses the attacker's enrollments come from (Sec-EM serves each source
    /// address a budget of requests before it enrolls).
    #[arg(long, default_value_t = 8)]
    attack_sources: usize,
    /// Source addresses the attacker's held connections come from (Sec-EM caps
    /// connections and the rate of new ones per address).
    #[arg(long, default_value_t = 16)]
    attack_hold_sources: usize,
    /// Re-attestation rounds of the baseline (without the attacker), and the fewest under
    /// attack; rounds start this many milliseconds apart.
    #[arg(long, default_value_t = 10)]
    attack_rounds: usize,
    /// Milliseconds between the starts of re-attestation rounds, with and without attack.
    #[arg(long, default_value_t = 1000)]
    round_ms: u64,
    /// Also serve the REST API and measure it beside QUIC in the same run: listing every
    /// instance (--trials times each), catalog put until every agent acknowledged
    /// (--trials times each); and event notifications to a webhook receiver on loopback
    /// (revocations, catalog acknowledgements).
    #[arg(long)]
    rest: bool,
}

/// Chain length of the benchmark's instances (short: the benchmark reveals a few hundred
/// at most, one per round).
const CHAIN: u32 = 1024;
/// Client QUIC endpoints (UDP sockets) the agents are spread over, at least; each has its
/// own loopback address (127.0.1.x), as agents in VMs do, and holds at most
/// [`PER_ENDPOINT`] agents (Sec-EM caps connections per source address).
const ENDPOINTS: usize = 8;
/// Agents per client endpoint at most: few, as VMs each have their own address.
const PER_ENDPOINT: usize = 10;
const VNFD: &str = r#"vnfd:
  id: load-vnf
  sec_catalog:
    default_action: drop
    rules:
      - name: http
        protocol: tcp
        port: 80
        ingress_policing_rate: 10000
        ingress_policing_burst: 1000
"#;
const IMAGE: &[u8] = b"sec-em-load: the golden image of load-vnf";

/// The `sec-em` process, killed (by PID) on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What an agent's push reader saw, and when.
#[derive(Debug)]
enum Seen {
    /// Received catalog `version` (before acknowledging it).
    Received(u64),
    /// Acknowledged catalog `version` (the acknowledgement was answered).
    Acked(u64),
    /// Was notified that `InstanceKey` is revoked.
    Revoked(InstanceKey),
}

struct Agent {
    bundle: BootstrapBundle,
    enroll: msg::EnrollRequest,
    prover: ChainProver,
    golden: Vec<u8>,
}

struct Connected {
    id: InstanceKey,
    conn: quinn::Connection,
    prover: ChainProver,
    golden: Vec<u8>,
    _reader: tokio::task::JoinHandle<()>,
}

fn free_port(udp: bool) -> anyhow::Result<u16> {
    Ok(if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn ask(c: &quinn::Connection, body: Body) -> anyhow::Result<Body> {
    let env = msg::Envelope {
        request_id: 1,
        body: Some(body),
    };
    let reply = asmn_channel::call::request(c, &env, Duration::from_secs(30)).await?;
    reply.body.context("empty answer")
}

fn sec_em_binary(arg: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match arg {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("no directory")?
            .join("sec-em"),
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build --release -p asmn-controller) or pass --sec-em",
            path.display()
        );
    }
    Ok(path)
}

/// Writes a PKI and configuration into `dir`; returns the config path, the QUIC port, the
/// metrics port and the PKI.
fn prepare(
    dir: &Path,
    etcd: Option<&LocalEtcd>,
    rest: Option<u16>,
) -> anyhow::Result<(PathBuf, u16, u16, pki::Pki)> {
    let pki = pki::generate(&["sec-em".to_string()], 2026)?;
    pki::write(dir, dir, &pki, false)?;
    let audit_key = asmn_controller::audit::AuditKey::generate().map_err(anyhow::Error::msg)?;
    pki::write_file(
        &dir.join("audit.key"),
        audit_key.to_file_text().as_bytes(),
        true,
    )?;
    let port = free_port(true)?;
    let metrics = free_port(false)?;
    let mut text = config::initial(
        format!("127.0.0.1:{port}").parse()?,
        "sec-em",
        "state.redb",
        format!("127.0.0.1:{metrics}").parse()?,
    )
    .replace("chain_length = 100000", &format!("chain_length = {CHAIN}"));
    if let Some(etcd) = etcd {
        text = etcd.configure(&text)?;
    }
    if let Some(port) = rest {
        text = text.replace(
            "# rest_addr = \"0.0.0.0:7444\"",
            &format!("rest_addr = \"127.0.0.1:{port}\""),
        );
    }
    let path = dir.join("sec-em.toml");
    std::fs::write(&path, text)?;
    config::Config::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((path, port, metrics, pki))
}

/// An agent's state before it connects: bundle, enrollment request, prover.
fn agent(bundle: BootstrapBundle) -> Agent {
    let id = bundle.instance_key();
    let golden = measure_bytes(IMAGE, &[Algorithm::Sha256])
        .ok()
        .and_then(|m| m.get(Algorithm::Sha256).map(|d| d.0.clone()))
        .unwrap_or_default();
    let s = seed(&bundle.nonce, &id, &golden, 0);
    let dh = DhKeyPair::derive(bundle.dh_group, &s, &id, 0);
    let spec = ChainSpec::new(id, 0, bundle.chain_length).unwrap_or_else(|_| unreachable!());
    let mut prover = ChainProver::new(spec, s);
    let first = prover.reveal().unwrap_or_else(|| unreachable!());
    let e = Enroll {
        id,
        tenant: bundle.tenant.clone(),
        vnf: bundle.vnf.clone(),
        instance: bundle.instance.clone(),
        reveal: first,
        wg_public_key: [1; 32],
        dh_group: bundle.dh_group,
        dh_public: dh.public().clone(),
        endpoint: "127.0.0.1:51820".parse().unwrap_or_else(|_| unreachable!()),
        role: bundle.role,
    };
    Agent {
        enroll: (&e).into(),
        bundle,
        prover,
        golden,
    }
}

/// Creates `n` instances named `{prefix}-{i}` (32 requests in flight) and prepares their
/// agents (D-H values on every core).
async fn create(admin: &quinn::Connection, prefix: &str, n: usize) -> anyhow::Result<Vec<Agent>> {
    let sem = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (admin, sem, name) = (admin.clone(), Arc::clone(&sem), format!("{prefix}-{i}"));
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let body = ask(
                &admin,
                Body::CreateInstance(msg::CreateInstanceRequest {
                    tenant: "load".into(),
                    vnf: "load-vnf".into(),
                    instance: name,
                    role: msg::RoleMsg::Vnf as i32,
                }),
            )
            .await?;
            let Body::InstanceCreated(b) = body else {
                bail!("instance create refused: {body:?}")
            };
            let bundle = BootstrapBundle::try_from(&b)?;
            Ok(tokio::task::spawn_blocking(move || agent(bundle)).await?)
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok(out)
}

/// Reads an agent's push stream: acknowledges catalogs, records revocations.
fn reader(
    conn: quinn::Connection,
    index: usize,
    seen: mpsc::UnboundedSender<(usize, Seen, Instant)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut stream) = conn.accept_uni().await else {
            return;
        };
        let mut decoder = wire::FrameDecoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Ok(Some(frame)) = decoder.next_frame() {
                let Ok(env) = wire::decode_envelope(&frame) else {
                    return;
                };
                match env.body {
                    Some(Body::CatalogPush(c)) => {
                        let _ = seen.send((index, Seen::Received(c.version), Instant::now()));
                        let ack = Body::CatalogAck(msg::CatalogAck {
                            vnf: c.vnf.clone(),
                            version: c.version,
                        });
                        if matches!(ask(&conn, ack).await, Ok(Body::Ok(_))) {
                            let _ = seen.send((index, Seen::Acked(c.version), Instant::now()));
                        }
                    }
                    Some(Body::Revoked(r)) => {
                        if let Some(k) = InstanceKey::from_slice(&r.instance_key) {
                            let _ = seen.send((index, Seen::Revoked(k), Instant::now()));
                        }
                    }
                    _ => {}
                }
            }
            match stream.read(&mut buf).await {
                Ok(Some(n)) => {
                    if decoder.push(&buf[..n]).is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    })
}

/// Connects and enrolls `agents`, `concurrency` at once; returns them connected and the
/// latency of each (handshake plus enrollment).
async fn enroll_all(
    endpoints: &[quinn::Endpoint],
    addr: std::net::SocketAddr,
    agents: Vec<Agent>,
    first_index: usize,
    concurrency: usize,
    seen: &mpsc::UnboundedSender<(usize, Seen, Instant)>,
) -> anyhow::Result<(Vec<Connected>, Vec<Duration>, Duration)> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(agents.len());
    for (k, a) in agents.into_iter().enumerate() {
        let index = first_index + k;
        let ep = endpoints[index % endpoints.len()].clone();
        let (sem, seen) = (Arc::clone(&sem), seen.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let t = Instant::now();
            let conn = ep.connect(addr, "sec-em")?.await?;
            let reply = ask(&conn, Body::Enroll(a.enroll)).await?;
            let took = t.elapsed();
            let Body::Enrolled(_) = reply else {
                bail!("enrollment refused: {reply:?}")
            };
            let reader = reader(conn.clone(), index, seen);
            Ok((
                Connected {
                    id: a.bundle.instance_key(),
                    conn,
                    prover: a.prover,
                    golden: a.golden,
                    _reader: reader,
                },
                took,
            ))
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    let mut lat = Vec::with_capacity(tasks.len());
    for t in tasks {
        let (c, d) = t.await??;
        out.push(c);
        lat.push(d);
    }
    Ok((out, lat, started.elapsed()))
}

#[derive(serde::Serialize, Debug, Default)]
struct Report {
    store: String,
    agents: usize,
    enroll_seconds: f64,
    enrollments_per_second: f64,
    enroll_latency_ms_p50: f64,
    enroll_latency_ms_p99: f64,
    reveal_latency_ms_p50: f64,
    reveal_latency_ms_p99: f64,
    catalog_trials: usize,
    catalog_agent_received_ms_p50: f64,
    catalog_agent_received_ms_p99: f64,
    catalog_agent_ack_ms_p50: f64,
    catalog_agent_ack_ms_p99: f64,
    catalog_all_acked_ms_p50: f64,
    catalog_all_acked_ms_max: f64,
    revoke_trials: usize,
    revoke_peer_notified_ms_p50: f64,
    revoke_peer_notified_ms_p99: f64,
    revoke_all_notified_ms_p50: f64,
    revoke_all_notified_ms_max: f64,
    idle_agents: usize,
    idle_connected_after: usize,
    idle_enroll_seconds: f64,
    sec_em_rss_mib_before_idle: f64,
    sec_em_rss_mib_with_idle: f64,
    attack: Option<AttackReport>,
    rest: Option<rest::RestReport>,
}

/// What `--attack` measured, beside the baseline of the same run.
#[derive(serde::Serialize, Debug, Default)]
struct AttackReport {
    connections_planned: usize,
    enrollments_planned: u64,
    sources: usize,
    seconds: f64,
    attacker_connections_admitted: u64,
    attacker_connections_refused: u64,
    attacker_holding_max: u64,
    refused_enrollments: u64,
    accepted_enrollments: u64,
    baseline_rounds: usize,
    reattest_rounds: usize,
    agents_refused: usize,
    reveal_ms_p50_without: f64,
    reveal_ms_p99_without: f64,
    reveal_ms_p50_with: f64,
    reveal_ms_p99_with: f64,
    reveal_p99_ratio: f64,
    sec_em_rss_mib_before: f64,
    sec_em_rss_mib_max: f64,
    sec_em_cpu_seconds_without: f64,
    sec_em_cpu_seconds_with: f64,
    own_cpu_seconds_without: f64,
    own_cpu_seconds_with: f64,
    store_bytes_growth_without: Option<u64>,
    store_bytes_growth: Option<u64>,
    audit_records_growth_without: u64,
    audit_records_growth: u64,
    audit_records_not_reattestations: u64,
    guard_events: std::collections::BTreeMap<String, u64>,
}

/// One re-attestation of every connected agent, all at once: the latency of each. A
/// refusal fails the run.
async fn reattest_round(connected: &mut [Connected]) -> anyhow::Result<Vec<Duration>> {
    let mut tasks = Vec::new();
    for c in connected.iter_mut() {
        let reveal = c.prover.reveal().context("chain exhausted")?;
        let (conn, golden) = (c.conn.clone(), c.golden.clone());
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = ask(
                &conn,
                Body::Reattest(msg::ReattestRequest {
                    reveal: Some((&reveal).into()),
                    measurement: golden,
                    renewal: None,
                    dh_public: vec![],
                }),
            )
            .await?;
            let Body::Reattested(_) = r else {
                bail!("re-attestation refused: {r:?}")
            };
            Ok(t.elapsed())
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await??);
    }
    Ok(lat)
}

/// The head of the audit log (its last record's number).
async fn audit_head(admin: &quinn::Connection) -> anyhow::Result<u64> {
    let r = ask(
        admin,
        Body::Query(msg::QueryRequest {
            what: "audit-checkpoint".into(),
            ..Default::default()
        }),
    )
    .await?;
    let Body::QueryResult(q) = r else {
        bail!("audit checkpoint refused: {r:?}")
    };
    let v: serde_json::Value = serde_json::from_str(&q.json)?;
    v["seq"].as_u64().context("no seq in the checkpoint")
}

/// The bytes of every file under `dir` (the embedded store and its journal).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Sec-EM's guard events, from its metrics endpoint.
async fn guard_events(metrics_port: u16) -> std::collections::BTreeMap<String, u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut out = std::collections::BTreeMap::new();
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", metrics_port)),
    )
    .await
    else {
        return out;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
    let mut text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut text)).await;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("asmn_guard_events_total{event=\"")
            && let Some((event, value)) = rest.split_once("\"} ")
            && let Ok(v) = value.trim().parse()
        {
            out.insert(event.to_string(), v);
        }
    }
    out
}

/// Re-attestation rounds `round` apart until `done` says so after at least `min` rounds
/// (bounded by 400 rounds and 300 s); latencies, the rounds, and refused rounds.
async fn paced_rounds(
    connected: &mut [Connected],
    min: usize,
    round: Duration,
    mut tick: impl FnMut() -> bool,
) -> (Vec<Duration>, usize, usize) {
    let (mut lat, mut rounds, mut refused) = (Vec::new(), 0, 0);
    let started = Instant::now();
    while rounds < 400 && started.elapsed() < Duration::from_secs(300) {
        let t = Instant::now();
        match reattest_round(connected).await {
            Ok(mut l) => lat.append(&mut l),
            Err(e) => {
                refused += 1;
                eprintln!("re-attestation round: {e:#}");
            }
        }
        rounds += 1;
        let done = tick();
        if rounds >= min && done {
            break;
        }
        tokio::time::sleep(round.saturating_sub(t.elapsed())).await;
    }
    lat.sort();
    (lat, rounds, refused)
}

/// Audit records after `after` whose kind is not a re-attestation (what the attacker
/// could have added), read in pages.
async fn audit_others(admin: &quinn::Connection, after: u64) -> anyhow::Result<u64> {
    let mut next = (after + 1).to_string();
    let mut others = 0;
    for _ in 0..100_000 {
        let r = ask(
            admin,
            Body::Query(msg::QueryRequest {
                what: "audit".into(),
                after: next.clone(),
                ..Default::default()
            }),
        )
        .await?;
        let Body::QueryResult(q) = r else {
            bail!("audit page refused: {r:?}")
        };
        let page: Vec<serde_json::Value> = serde_json::from_str(&q.json)?;
        others += page
            .iter()
            .filter(|v| !v["kind"].as_str().unwrap_or("").starts_with("reattest."))
            .count() as u64;
        if q.next.is_empty() {
            break;
        }
        next = q.next;
    }
    Ok(others)
}

/// Phase 2b: re-attestation rounds without the attacker (the baseline), then while it
/// works, side by side.
#[allow(clippy::too_many_arguments)]
async fn under_attack(
    args: &Args,
    addr: std::net::SocketAddr,
    ca_pem: &str,
    enroll: msg::EnrollRequest,
    admin: &quinn::Connection,
    connected: &mut [Connected],
    pid: u32,
    dir: &Path,
    metrics_port: u16,
) -> anyhow::Result<AttackReport> {
    let round = Duration::from_millis(args.round_ms.max(1));
    let min = args.attack_rounds.max(1);
    let embedded = args.store == "embedded";
    let mut r = AttackReport {
        connections_planned: args.attack_connections,
        enrollments_planned: args.attack_enrollments,
        sources: args.attack_sources,
        ..AttackReport::default()
    };

    // The baseline: the same rounds, nobody attacking.
    eprintln!("baseline: {min} re-attestation rounds");
    let store0 = embedded.then(|| dir_bytes(dir));
    let audit0 = audit_head(admin).await?;
    let cpu0 = cpu_seconds(pid);
    let own0 = cpu_seconds(std::process::id());
    let (base, base_rounds, base_refused) = paced_rounds(connected, min, round, || true).await;
    r.sec_em_cpu_seconds_without = cpu_seconds(pid) - cpu0;
    r.own_cpu_seconds_without = cpu_seconds(std::process::id()) - own0;
    let store1 = embedded.then(|| dir_bytes(dir));
    let audit1 = audit_head(admin).await?;
    r.baseline_rounds = base_rounds;
    r.reveal_ms_p50_without = ms(percentile(&base, 0.5));
    r.reveal_ms_p99_without = ms(percentile(&base, 0.99));
    r.store_bytes_growth_without = store0.zip(store1).map(|(a, b)| b.saturating_sub(a));
    r.audit_records_growth_without = audit1.saturating_sub(audit0);
    r.sec_em_rss_mib_before = rss_mib(pid);

    eprintln!(
        "attacking: {} held connections, {} refused enrollments",
        args.attack_connections, args.attack_enrollments
    );
    let started = Instant::now();
    let cpu1 = cpu_seconds(pid);
    let own1 = cpu_seconds(std::process::id());
    let attack = attack::start(
        addr,
        ca_pem.to_string(),
        enroll,
        attack::Plan {
            connections: args.attack_connections,
            enrollments: args.attack_enrollments,
            senders: 64.max(args.attack_sources),
            sources: args.attack_sources,
            hold_sources: args.attack_hold_sources,
        },
    )?;
    let tally = Arc::clone(&attack.tally);
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let mut rss_max = r.sec_em_rss_mib_before;
    let mut holding_max = 0;
    // Let the held connections build up (at most 15 s).
    while started.elapsed() < Duration::from_secs(15) {
        holding_max = holding_max.max(load(&tally.holding));
        rss_max = rss_max.max(rss_mib(pid));
        if holding_max as usize >= args.attack_connections {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (with, rounds, refused) = paced_rounds(connected, min, round, || {
        holding_max = holding_max.max(load(&tally.holding));
        rss_max = rss_max.max(rss_mib(pid));
        load(&tally.enrollments_refused) + load(&tally.enrollments_accepted)
            >= args.attack_enrollments
    })
    .await;
    r.seconds = started.elapsed().as_secs_f64();
    r.sec_em_cpu_seconds_with = cpu_seconds(pid) - cpu1;
    r.own_cpu_seconds_with = cpu_seconds(std::process::id()) - own1;
    r.guard_events = guard_events(metrics_port).await;
    drop(attack);
    let store2 = embedded.then(|| dir_bytes(dir));
    let audit2 = audit_head(admin).await?;
    r.attacker_connections_admitted = load(&tally.admitted);
    r.attacker_connections_refused = load(&tally.refused);
    r.attacker_holding_max = holding_max;
    r.refused_enrollments = load(&tally.enrollments_refused);
    r.accepted_enrollments = load(&tally.enrollments_accepted);
    r.reattest_rounds = rounds;
    r.agents_refused = base_refused + refused;
    r.reveal_ms_p50_with = ms(percentile(&with, 0.5));
    r.reveal_ms_p99_with = ms(percentile(&with, 0.99));
    r.reveal_p99_ratio = r.reveal_ms_p99_with / r.reveal_ms_p99_without.max(1e-9);
    r.sec_em_rss_mib_max = rss_max;
    r.store_bytes_growth = store1.zip(store2).map(|(a, b)| b.saturating_sub(a));
    r.audit_records_growth = audit2.saturating_sub(audit1);
    r.audit_records_not_reattestations = audit_others(admin, audit1).await?;
    if r.agents_refused > 0 {
        bail!(
            "{} re-attestation rounds had a refused agent",
            r.agents_refused
        );
    }
    Ok(r)
}

/// CPU seconds (user and system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start at ") ".
            let rest = s.rsplit_once(") ")?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0);
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Waits until `want(events so far)` holds or `limit` passes.
async fn wait_for(
    rx: &mut mpsc::UnboundedReceiver<(usize, Seen, Instant)>,
    limit: Duration,
    mut take: impl FnMut(usize, Seen, Instant) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((i, s, t))) => {
                if take(i, s, t) {
                    return true;
                }
            }
            _ => return false,
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Report> {
    let sec_em = sec_em_binary(args.sec_em.clone())?;
    let dir = tempfile::tempdir()?;
    let etcd = match args.store.as_str() {
        "embedded" => None,
        "etcd" => Some(LocalEtcd::start(1).await?),
        "etcds" => Some(LocalEtcd::start_tls(1).await?),
        other => bail!("--store {other:?}: use embedded, etcd or etcds"),
    };
    let rest_port = if args.rest {
        Some(free_port(false)?)
    } else {
        None
    };
    let (cfg, port, metrics_port, pki) = prepare(dir.path(), etcd.as_ref(), rest_port)?;
    let log = match &args.sec_em_log {
        Some(p) => Stdio::from(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        ),
        None => Stdio::null(),
    };
    let child = Command::new(&sec_em)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", sec_em.display()))?;
    let daemon = Daemon(child);
    let pid = daemon.0.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;

    let admin_ep =
        asmn_channel::tls::client(&pki.ca_cert, Some((&pki.admin_cert, &pki.admin_key)))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let admin = loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            admin_ep.connect(addr, "sec-em")?,
        )
        .await
        {
            Ok(Ok(c)) => break c,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => bail!("sec-em did not come up within 30 s"),
        }
    };
    let digest = measure_bytes(IMAGE, &[Algorithm::Sha256])?;
    let onboard = Body::Onboard(msg::OnboardRequest {
        vnfd_yaml: VNFD.into(),
        digests: vec![msg::DigestMsg {
            algorithm: "sha256".into(),
            value: digest.get(Algorithm::Sha256).context("sha256")?.0.clone(),
        }],
        image_bytes: IMAGE.len() as u64,
    });
    match ask(&admin, onboard).await? {
        Body::Ok(_) => {}
        other => bail!("on-boarding refused: {other:?}"),
    }
    // The REST API and a webhook receiver subscribed to what is timed.
    let northbound = match rest_port {
        None => None,
        Some(p) => {
            let api = rest::Rest::new(&pki, p)?;
            api.wait_up().await?;
            let receiver = rest::Receiver::start().await?;
            api.subscribe(
                &format!("http://127.0.0.1:{}/events", receiver.port),
                &["instance.revoked", "catalog.acknowledged"],
            )
            .await?;
            Some((api, receiver))
        }
    };
    let mut rest_report = rest::RestReport::default();
    eprintln!("creating {} instances", args.agents);
    let agents = create(&admin, "agent", args.agents).await?;
    let mut endpoints = Vec::new();
    let spread = ENDPOINTS.max((args.agents + args.idle).div_ceil(PER_ENDPOINT));
    for i in 0..spread {
        let bind = std::net::SocketAddr::from(([127, 1, (i / 250) as u8, (i % 250 + 1) as u8], 0));
        endpoints.push(asmn_channel::tls::client_on(bind, &pki.ca_cert, None)?);
    }
    // A well-formed enrollment for the attacker to send with random instance keys.
    let attacker_enroll = agents.first().map(|a| a.enroll.clone());
    let (seen_tx, mut seen) = mpsc::unbounded_channel();

    // 1. Every agent enrolls at once.
    eprintln!("enrolling {} agents", args.agents);
    let (mut connected, mut enroll_lat, enroll_time) =
        enroll_all(&endpoints, addr, agents, 0, args.concurrency, &seen_tx).await?;
    enroll_lat.sort();
    let mut report = Report {
        store: args.store.clone(),
        agents: args.agents,
        enroll_seconds: enroll_time.as_secs_f64(),
        enrollments_per_second: args.agents as f64 / enroll_time.as_secs_f64(),
        enroll_latency_ms_p50: ms(percentile(&enroll_lat, 0.5)),
        enroll_latency_ms_p99: ms(percentile(&enroll_lat, 0.99)),
        ..Report::default()
    };
    // The first catalog (version 1) is pushed on enrollment: wait for every ack of it.
    let mut acked_v1 = 0;
    wait_for(&mut seen, Duration::from_secs(30), |_, s, _| {
        if matches!(s, Seen::Acked(1)) {
            acked_v1 += 1;
        }
        acked_v1 >= args.agents
    })
    .await;

    // 2. One re-attestation round, all at once.
    eprintln!("re-attesting");
    let mut reveal_lat = reattest_round(&mut connected).await?;
    reveal_lat.sort();
    report.reveal_latency_ms_p50 = ms(percentile(&reveal_lat, 0.5));
    report.reveal_latency_ms_p99 = ms(percentile(&reveal_lat, 0.99));

    // 2b. The same under attack.
    if args.attack {
        let Some(enroll) = attacker_enroll.clone() else {
            bail!("--attack needs at least one agent");
        };
        report.attack = Some(
            under_attack(
                &args,
                addr,
                &pki.ca_cert,
                enroll,
                &admin,
                &mut connected,
                pid,
                dir.path(),
                metrics_port,
            )
            .await?,
        );
    }

    // 3. Catalog apply until every agent acknowledged (over QUIC; with --rest, then as
    // many over REST).
    let mut per_agent = Vec::new();
    let mut received = Vec::new();
    let mut all = Vec::new();
    let mut all_rest = Vec::new();
    let mut after_all = Vec::new();
    let doors = if northbound.is_some() { 2 } else { 1 };
    for t in 0..args.trials * doors {
        let over_rest = t >= args.trials;
        let version = 2 + t as u64;
        let yaml = VNFD.replace("port: 80", &format!("port: {}", 1000 + t));
        let catalog = asmn_shared::catalog::parse_vnfd("load", yaml.as_bytes())?.catalog;
        let sent = Instant::now();
        let applied = match (&northbound, over_rest) {
            (Some((api, _)), true) => {
                // The catalog file as `asmnctl catalog apply` reads it.
                let file = format!(
                    "vnf: load-vnf\nsec_catalog:\n{}",
                    yaml.split_once("sec_catalog:\n").map_or("", |(_, c)| c)
                );
                api.put_catalog("load-vnf", &file).await?
            }
            _ => {
                let r = ask(
                    &admin,
                    Body::ApplyCatalog(msg::ApplyCatalogRequest {
                        catalog: Some((&catalog).into()),
                    }),
                )
                .await?;
                let Body::CatalogApplied(a) = r else {
                    bail!("catalog apply refused: {r:?}")
                };
                a.version
            }
        };
        if applied != version {
            bail!("catalog version {applied} where {version} was expected");
        }
        let mut got = 0;
        let mut last = sent;
        let ok = wait_for(&mut seen, Duration::from_secs(30), |_, s, at| {
            if matches!(s, Seen::Received(v) if v == version) && !over_rest {
                received.push(at - sent);
            }
            if matches!(s, Seen::Acked(v) if v == version) {
                got += 1;
                if !over_rest {
                    per_agent.push(at - sent);
                }
                if got == args.agents {
                    last = at;
                    if over_rest {
                        all_rest.push(at - sent);
                    } else {
                        all.push(at - sent);
                    }
                }
            }
            got >= args.agents
        })
        .await;
        if !ok {
            bail!(
                "catalog version {version}: only {got} of {} agents acknowledged within 30 s",
                args.agents
            );
        }
        if let Some((_, receiver)) = &northbound {
            let heard = receiver
                .wait("catalog.acknowledged", Duration::from_secs(30), |a| {
                    a.version == Some(version)
                })
                .await
                .with_context(|| format!("no catalog.acknowledged of version {version}"))?;
            after_all.push(heard.saturating_duration_since(last));
        }
    }
    if northbound.is_some() {
        let (mut q, mut r) = (all.clone(), all_rest.clone());
        q.sort();
        r.sort();
        after_all.sort();
        rest_report.catalog_trials = args.trials;
        rest_report.catalog_all_acked_quic_ms_p50 = ms(percentile(&q, 0.5));
        rest_report.catalog_all_acked_quic_ms_p99 = ms(percentile(&q, 0.99));
        rest_report.catalog_all_acked_rest_ms_p50 = ms(percentile(&r, 0.5));
        rest_report.catalog_all_acked_rest_ms_p99 = ms(percentile(&r, 0.99));
        rest_report.catalog_p99_ratio = rest_report.catalog_all_acked_rest_ms_p99
            / rest_report.catalog_all_acked_quic_ms_p99.max(1e-9);
        rest_report.notify_acknowledged_after_all_acked_ms_p50 = ms(percentile(&after_all, 0.5));
        rest_report.notify_acknowledged_after_all_acked_ms_p99 = ms(percentile(&after_all, 0.99));
    }
    per_agent.sort();
    received.sort();
    all.sort();
    report.catalog_trials = args.trials;
    report.catalog_agent_received_ms_p50 = ms(percentile(&received, 0.5));
    report.catalog_agent_received_ms_p99 = ms(percentile(&received, 0.99));
    report.catalog_agent_ack_ms_p50 = ms(percentile(&per_agent, 0.5));
    report.catalog_agent_ack_ms_p99 = ms(percentile(&per_agent, 0.99));
    report.catalog_all_acked_ms_p50 = ms(percentile(&all, 0.5));
    report.catalog_all_acked_ms_max = ms(all.last().copied().unwrap_or_default());
    eprintln!("catalog applies done");

    // 3b. Listing every instance, over QUIC and over REST, alternately.
    if let Some((api, _)) = &northbound {
        let (mut q, mut r) = (Vec::new(), Vec::new());
        for _ in 0..args.trials {
            let t = Instant::now();
            let n = rest::list_all_quic(&admin).await?;
            q.push(t.elapsed());
            let t = Instant::now();
            let m = api.list_all().await?;
            r.push(t.elapsed());
            if n != m || n < args.agents {
                bail!("listed {n} instances over QUIC and {m} over REST");
            }
            rest_report.listed = n;
        }
        q.sort();
        r.sort();
        rest_report.listing_trials = args.trials;
        rest_report.list_quic_ms_p50 = ms(percentile(&q, 0.5));
        rest_report.list_quic_ms_p99 = ms(percentile(&q, 0.99));
        rest_report.list_rest_ms_p50 = ms(percentile(&r, 0.5));
        rest_report.list_rest_ms_p99 = ms(percentile(&r, 0.99));
        rest_report.list_p99_ratio =
            rest_report.list_rest_ms_p99 / rest_report.list_quic_ms_p99.max(1e-9);
    }

    // 4. Revocations: the first `trials` agents, one at a time; every other agent of the
    // tenant still connected must be told.
    let mut revoked_at = Vec::new();
    let trials = args.trials.min(connected.len().saturating_sub(1));
    let mut per_peer = Vec::new();
    let mut all = Vec::new();
    for t in 0..trials {
        let victim = connected[t].id;
        let sent = Instant::now();
        revoked_at.push((victim, sent));
        let r = ask(
            &admin,
            Body::Revoke(msg::RevokeRequest {
                instance_key: victim.as_bytes().to_vec(),
                reason: "sec-em-load".into(),
            }),
        )
        .await?;
        if !matches!(r, Body::Ok(_)) {
            bail!("revoke refused: {r:?}");
        }
        // Notified: every agent except those revoked before this trial (the victim too
        // is told; it is still connected).
        let expect = connected.len() - t;
        let mut got = 0;
        let ok = wait_for(&mut seen, Duration::from_secs(30), |i, s, at| {
            if matches!(s, Seen::Revoked(k) if k == victim) && i >= t {
                got += 1;
                per_peer.push(at - sent);
                if got == expect {
                    all.push(at - sent);
                }
            }
            got >= expect
        })
        .await;
        if !ok {
            bail!("revocation {t}: only {got} of {expect} agents notified within 30 s");
        }
    }
    per_peer.sort();
    all.sort();
    report.revoke_trials = trials;
    report.revoke_peer_notified_ms_p50 = ms(percentile(&per_peer, 0.5));
    report.revoke_peer_notified_ms_p99 = ms(percentile(&per_peer, 0.99));
    report.revoke_all_notified_ms_p50 = ms(percentile(&all, 0.5));
    report.revoke_all_notified_ms_max = ms(all.last().copied().unwrap_or_default());
    eprintln!("revocations done");
    if let Some((_, receiver)) = &northbound {
        let mut lat = Vec::new();
        for (victim, sent) in &revoked_at {
            let hex = victim.to_hex();
            let heard = receiver
                .wait("instance.revoked", Duration::from_secs(30), |a| {
                    a.instance.as_deref() == Some(hex.as_str())
                })
                .await
                .with_context(|| format!("no instance.revoked for {hex}"))?;
            lat.push(heard.saturating_duration_since(*sent));
        }
        lat.sort();
        rest_report.notifications = lat.len() + rest_report.catalog_trials * 2;
        rest_report.notify_revoked_ms_p50 = ms(percentile(&lat, 0.5));
        rest_report.notify_revoked_ms_p99 = ms(percentile(&lat, 0.99));
        report.rest = Some(rest_report);
    }

    // 5. Many idle agents.
    report.sec_em_rss_mib_before_idle = rss_mib(pid);
    if args.idle > 0 {
        eprintln!("creating {} idle agents", args.idle);
        let more = create(&admin, "idle", args.idle).await?;
        eprintln!("enrolling {} idle agents", args.idle);
        let (idle, _, t) = enroll_all(
            &endpoints,
            addr,
            more,
            connected.len(),
            args.idle_concurrency,
            &seen_tx,
        )
        .await?;
        report.idle_agents = idle.len();
        report.idle_enroll_seconds = t.as_secs_f64();
        // Drain the pushes meanwhile (acks of the catalog in force).
        let hold = Duration::from_secs(args.idle_secs);
        wait_for(&mut seen, hold, |_, _, _| false).await;
        report.sec_em_rss_mib_with_idle = rss_mib(pid);
        report.idle_connected_after = idle
            .iter()
            .chain(connected.iter().skip(trials))
            .filter(|c| c.conn.close_reason().is_none())
            .count();
        if report.idle_connected_after != idle.len() + connected.len() - trials {
            bail!(
                "{} of {} agents were disconnected while idle",
                idle.len() + connected.len() - trials - report.idle_connected_after,
                idle.len() + connected.len() - trials
            );
        }
    }
    drop(daemon);
    Ok(report)
}

fn print(r: &Report) {
    println!(
        "sec-em load benchmark: {} agents, {} store",
        r.agents, r.store
    );
    println!(
        "  enrollment       {:>8.2} s for all ({:.0}/s); per agent p50 {:.1} ms, p99 {:.1} ms",
        r.enroll_seconds,
        r.enrollments_per_second,
        r.enroll_latency_ms_p50,
        r.enroll_latency_ms_p99
    );
    println!(
        "  reveal           p50 {:.1} ms, p99 {:.1} ms (all {} agents at once)",
        r.reveal_latency_ms_p50, r.reveal_latency_ms_p99, r.agents
    );
    println!(
        "  catalog push     per agent received p50 {:.1} ms, p99 {:.1} ms",
        r.catalog_agent_received_ms_p50, r.catalog_agent_received_ms_p99
    );
    println!(
        "  catalog apply    per agent p50 {:.1} ms, p99 {:.1} ms; all acknowledged p50 {:.1} ms, max {:.1} ms ({} trials)",
        r.catalog_agent_ack_ms_p50,
        r.catalog_agent_ack_ms_p99,
        r.catalog_all_acked_ms_p50,
        r.catalog_all_acked_ms_max,
        r.catalog_trials
    );
    println!(
        "  revocation       per peer p50 {:.1} ms, p99 {:.1} ms; all notified p50 {:.1} ms, max {:.1} ms ({} trials)",
        r.revoke_peer_notified_ms_p50,
        r.revoke_peer_notified_ms_p99,
        r.revoke_all_notified_ms_p50,
        r.revoke_all_notified_ms_max,
        r.revoke_trials
    );
    println!(
        "  sec-em memory    {:.1} MiB RSS with {} agents",
        r.sec_em_rss_mib_before_idle, r.agents
    );
    if let Some(a) = &r.attack {
        print_attack(a);
    }
    if let Some(n) = &r.rest {
        println!(
            "  northbound       {:<34} {:>12} {:>12} {:>8}",
            "(p50 / p99 ms)", "QUIC", "REST", "p99 ratio"
        );
        println!(
            "                   {:<34} {:>5.1} / {:<5.1} {:>5.1} / {:<5.1} {:>8.2}",
            format!(
                "list all {} instances ({} trials)",
                n.listed, n.listing_trials
            ),
            n.list_quic_ms_p50,
            n.list_quic_ms_p99,
            n.list_rest_ms_p50,
            n.list_rest_ms_p99,
            n.list_p99_ratio
        );
        println!(
            "                   {:<34} {:>5.1} / {:<5.1} {:>5.1} / {:<5.1} {:>8.2}",
            format!("catalog put to all acked ({})", n.catalog_trials),
            n.catalog_all_acked_quic_ms_p50,
            n.catalog_all_acked_quic_ms_p99,
            n.catalog_all_acked_rest_ms_p50,
            n.catalog_all_acked_rest_ms_p99,
            n.catalog_p99_ratio
        );
        println!(
            "  notifications    instance.revoked at the receiver after the revoke request: p50 {:.1} ms, p99 {:.1} ms",
            n.notify_revoked_ms_p50, n.notify_revoked_ms_p99
        );
        println!(
            "                   catalog.acknowledged at the receiver after the last agent's ack: p50 {:.1} ms, p99 {:.1} ms",
            n.notify_acknowledged_after_all_acked_ms_p50,
            n.notify_acknowledged_after_all_acked_ms_p99
        );
    }
    if r.idle_agents > 0 {
        println!(
            "  idle             {} more agents enrolled in {:.2} s; {} connected after holding; sec-em {:.1} MiB RSS",
            r.idle_agents,
            r.idle_enroll_seconds,
            r.idle_connected_after,
            r.sec_em_rss_mib_with_idle
        );
    }
}

fn print_attack(a: &AttackReport) {
    println!(
        "  under attack     {:.0} s: {} connections held at most ({} admitted, {} refused), {} refused enrollments from {} addresses ({} accepted)",
        a.seconds,
        a.attacker_holding_max,
        a.attacker_connections_admitted,
        a.attacker_connections_refused,
        a.refused_enrollments,
        a.sources,
        a.accepted_enrollments
    );
    println!(
        "                   {:<34} {:>12} {:>12} {:>8}",
        "", "attack off", "attack on", "ratio"
    );
    let row = |name: &str, off: f64, on: f64| {
        println!(
            "                   {name:<34} {off:>12.2} {on:>12.2} {:>7.2}x",
            on / off.max(1e-9)
        );
    };
    row(
        "re-attestation rounds",
        a.baseline_rounds as f64,
        a.reattest_rounds as f64,
    );
    row(
        "reveal p50 (ms)",
        a.reveal_ms_p50_without,
        a.reveal_ms_p50_with,
    );
    row(
        "reveal p99 (ms)",
        a.reveal_ms_p99_without,
        a.reveal_ms_p99_with,
    );
    row(
        "sec-em RSS (MiB, max)",
        a.sec_em_rss_mib_before,
        a.sec_em_rss_mib_max,
    );
    row(
        "sec-em CPU per round (s)",
        a.sec_em_cpu_seconds_without / a.baseline_rounds.max(1) as f64,
        a.sec_em_cpu_seconds_with / a.reattest_rounds.max(1) as f64,
    );
    row(
        "bench process CPU per round (s)",
        a.own_cpu_seconds_without / a.baseline_rounds.max(1) as f64,
        a.own_cpu_seconds_with / a.reattest_rounds.max(1) as f64,
    );
    let (base, with) = (
        a.baseline_rounds.max(1) as f64,
        a.reattest_rounds.max(1) as f64,
    );
    row(
        "audit records per round",
        a.audit_records_growth_without as f64 / base,
        a.audit_records_growth as f64 / with,
    );
    if let (Some(off), Some(on)) = (a.store_bytes_growth_without, a.store_bytes_growth) {
        row(
            "store file growth per round (MiB)",
            off as f64 / 1048576.0 / base,
            on as f64 / 1048576.0 / with,
        );
    }
    println!(
        "                   audit records other than re-attestations while attacked: {}; agents refused: {}",
        a.audit_records_not_reattestations, a.agents_refused
    );
    let events: Vec<String> = a
        .guard_events
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "                   sec-em guard events: {}",
        events.join(", ")
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    let json = args.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sec-em-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print(&r);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sec-em-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}
