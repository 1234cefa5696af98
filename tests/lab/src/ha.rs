//! The highly available deployment, under faults: three nodes, each a namespace on the
//! tenant's underlay bridge running an etcd member (TLS, client certificates required)
//! and a `sec-em` replica on that cluster; a tenant (client, gateway, server and spare
//! clients to revoke) whose bundles list all three replicas, with a sequence-numbered UDP
//! stream flowing client -> gateway -> server throughout.
//!
//! [`run`] plays the faults an operator meets and measures each from the agents' and
//! the gateway's own logs (their timestamps, so polling does not blur them):
//! - a replica killed (SIGKILL) — the one most agents are on: kill to every one of its
//!   agents reconnected elsewhere; a catalog change and a revocation made right after the
//!   kill, from command to every data plane;
//! - a rolling restart (SIGTERM, start again), one replica at a time: the same;
//! - a node lost: the etcd leader killed with the replica beside it: kill to the first
//!   write acknowledged, then the same, and every reveal Sec-EM acknowledged still in the
//!   store (each agent's saved chain position matches the store's).
//!
//! `asmn-lab ha` narrates it; `tests/tests/ha.rs` asserts the bounds.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use asmn_controller::local_etcd::{self, ClusterPki};

use asmn_testkit::netns::{self, Netns, Proc};
use asmn_testkit::tenant::{self, PORT, Tenant};

/// The hub's address on the underlay (asmnctl runs there).
pub const HUB: &str = "10.99.0.254";

/// Node `i`'s address on the underlay.
pub fn node_ip(i: usize) -> String {
    format!("10.99.0.{}", i + 1)
}

/// The server's descriptor: reachable only through the gateway, a UDP stream on 9000.
pub const SERVER_VNFD: &str = "vnfd:
  id: server
  name: Server behind the gateway
  sec_catalog:
    gateway: gw
    default_action: drop
    rules:
      - name: ping
        protocol: icmp
        ingress_policing_rate: 10000
        ingress_policing_burst: 1000
      - name: stream
        protocol: udp
        port: 9000
        ingress_policing_rate: 0
";

/// A new version of the server's catalog that changes nothing the stream needs (the
/// echo rule's burst is `burst`).
fn server_catalog(burst: u32) -> String {
    format!(
        "vnf: server
sec_catalog:
  gateway: gw
  default_action: drop
  rules:
    - name: ping
      protocol: icmp
      ingress_policing_rate: 10000
      ingress_policing_burst: {burst}
    - name: stream
      protocol: udp
      port: 9000
      ingress_policing_rate: 0
"
    )
}

/// One node: an etcd member and a Sec-EM replica in their own namespace.
#[derive(Debug)]
pub struct Node {
    /// Its namespace.
    pub ns: Netns,
    /// Its underlay address.
    pub ip: String,
    /// The etcd member.
    pub etcd: Option<Proc>,
    /// The Sec-EM replica.
    pub sec_em: Option<Proc>,
    /// The replica's configuration.
    pub config: PathBuf,
    starts: usize,
}

/// The deployment: the tenant (its hub, agents and working directory) and the nodes.
#[derive(Debug)]
pub struct Ha {
    /// The tenant; `asmnctl` is given every replica.
    pub t: Tenant,
    /// The nodes.
    pub nodes: Vec<Node>,
    etcd_pki: ClusterPki,
    token: String,
}

fn text_err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Seconds since the epoch, now.
pub fn epoch_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Days from 1970-01-01 to the civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The time of a log line (its RFC 3339 UTC timestamp, as the daemons write it), in
/// seconds since the epoch.
pub fn line_time(line: &str) -> Option<f64> {
    // The first place that reads YYYY-MM-DDTHH:MM:SS (a coloured log has escapes first).
    let b = line.as_bytes();
    let shape = |i: usize| {
        b.len() >= i + 19
            && (0..19).all(|k| match k {
                4 | 7 => b[i + k] == b'-',
                10 => b[i + k] == b'T',
                13 | 16 => b[i + k] == b':',
                _ => b[i + k].is_ascii_digit(),
            })
    };
    let at = (0..b.len()).find(|&i| shape(i))?;
    let s = &line[at..at + 19];
    let n = |r: std::ops::Range<usize>| s.get(r).and_then(|v| v.parse::<i64>().ok());
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    let secs = days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?;
    let rest = &line[at + 19..];
    let frac = if let Some(f) = rest.strip_prefix('.') {
        let digits: String = f.chars().take_while(char::is_ascii_digit).collect();
        format!("0.{digits}").parse::<f64>().unwrap_or(0.0)
    } else {
        0.0
    };
    Some(secs as f64 + frac)
}

/// The time of the first line of `log` at or after `since` that contains every one of
/// `needles`.
pub fn first_after(log: &str, since: f64, needles: &[&str]) -> Option<f64> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(line_time)
        .find(|t| *t >= since)
}

/// A replica's configuration, from the one `sec-em init` wrote: its own addresses, the
/// cluster in TLS, and every replica listed for the bundles.
fn replica_config(base: &str, i: usize, n: usize, pki: &ClusterPki) -> String {
    let ip = node_ip(i);
    let controllers: Vec<String> = (0..n)
        .map(|j| format!("\"{}:{PORT}\"", node_ip(j)))
        .collect();
    let endpoints: Vec<String> = (0..n).map(|j| format!("{}:2379", node_ip(j))).collect();
    let mut out = String::new();
    for line in base.lines() {
        if line.starts_with("listen =") {
            out.push_str(&format!("listen = \"{ip}:{PORT}\"\n"));
        } else if line.starts_with("metrics_addr =") {
            out.push_str(&format!("metrics_addr = \"{ip}:9464\"\n"));
        } else if line.starts_with("store =") {
            out.push_str(&format!("store = \"etcds://{}\"\n", endpoints.join(",")));
        } else if line.starts_with("server_name =") {
            out.push_str(line);
            out.push('\n');
            out.push_str(&format!("controllers = [{}]\n", controllers.join(", ")));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "\n[etcd]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    ));
    out
}

impl Ha {
    /// The hub, `n` nodes with etcd and Sec-EM running, no VNF yet.
    pub fn new(n: usize) -> Result<Ha, String> {
        let controllers: Vec<String> = (0..n).map(|i| format!("{}:{PORT}", node_ip(i))).collect();
        let t = Tenant::bare(HUB, controllers)?;
        let dir = t.dir.path().to_path_buf();
        let pki_dir = dir.join("pki");
        netns::run(
            std::process::Command::new(netns::binary("sec-em")?)
                .args(["init", "--dir"])
                .arg(&pki_dir)
                .args(["--listen", &format!("{}:{PORT}", node_ip(0))])
                .args(["--server-name", "sec-em"]),
        )?;
        let etcd_dir = dir.join("etcd-pki");
        std::fs::create_dir_all(&etcd_dir).map_err(text_err)?;
        let hosts: Vec<String> = (0..n).map(node_ip).collect();
        let etcd_pki = local_etcd::write_cluster_pki(&etcd_dir, &hosts).map_err(text_err)?;
        let base = std::fs::read_to_string(pki_dir.join("sec-em.toml")).map_err(text_err)?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let ns = Netns::new("asmnnode")?;
            netns::attach(&t.hub, "br0", &ns, &format!("{}/24", node_ip(i)))?;
            let config = pki_dir.join(format!("sec-em-{i}.toml"));
            std::fs::write(&config, replica_config(&base, i, n, &etcd_pki)).map_err(text_err)?;
            nodes.push(Node {
                ns,
                ip: node_ip(i),
                etcd: None,
                sec_em: None,
                config,
                starts: 0,
            });
        }
        let mut ha = Ha {
            t,
            nodes,
            etcd_pki,
            token: netns::unique("asmnetcd"),
        };
        for i in 0..n {
            ha.start_etcd(i)?;
        }
        if tenant::within(Duration::from_secs(30), || ha.etcd_leader().is_some()).is_none() {
            return Err(format!(
                "the etcd cluster elected no leader: {}",
                ha.log_tail(&ha.t.dir.path().join("etcd-0-0.log"))
            ));
        }
        for i in 0..n {
            ha.start_sec_em(i)?;
        }
        Ok(ha)
    }

    fn log_tail(&self, path: &std::path::Path) -> String {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Starts (or restarts, on its data) node `i`'s etcd member.
    pub fn start_etcd(&mut self, i: usize) -> Result<(), String> {
        let bin =
            local_etcd::binary().ok_or("etcd is not installed (apt-get install etcd-server)")?;
        let n = self.nodes.len();
        let initial: Vec<String> = (0..n)
            .map(|j| format!("node{j}=https://{}:2380", node_ip(j)))
            .collect();
        let dir = self.t.dir.path().to_path_buf();
        let p = &self.etcd_pki;
        let (ca, cert, key) = (
            p.ca.display().to_string(),
            p.member_cert.display().to_string(),
            p.member_key.display().to_string(),
        );
        let node = &mut self.nodes[i];
        let ip = node.ip.clone();
        let data = dir.join(format!("etcd-data-{i}")).display().to_string();
        let (client, peer) = (format!("https://{ip}:2379"), format!("https://{ip}:2380"));
        let name = format!("node{i}");
        let initial = initial.join(",");
        let args: Vec<&str> = vec![
            "--name",
            &name,
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial,
            "--initial-cluster-token",
            &self.token,
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--trusted-ca-file",
            &ca,
            "--client-cert-auth",
            "--peer-cert-file",
            &cert,
            "--peer-key-file",
            &key,
            "--peer-trusted-ca-file",
            &ca,
            "--peer-client-cert-auth",
            // A LAN of namespaces on two loaded cores: heartbeats every 50 ms, elections
            // after 500 ms (etcd's defaults are 100 ms and 1 s).
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
        ];
        let log = dir.join(format!("etcd-{i}-{}.log", node.starts));
        node.etcd = Some(node.ns.spawn(&bin, &args, &log)?);
        Ok(())
    }

    /// Kills node `i`'s etcd member (SIGKILL).
    pub fn kill_etcd(&mut self, i: usize) {
        self.nodes[i].etcd.take();
    }

    /// The member that leads the cluster, asked of each member in its namespace (its
    /// metrics, over TLS with the client certificate).
    pub fn etcd_leader(&self) -> Option<usize> {
        let p = &self.etcd_pki;
        (0..self.nodes.len()).find(|&i| {
            let node = &self.nodes[i];
            node.etcd.is_some()
                && node
                    .ns
                    .run(
                        "curl",
                        &[
                            "-s",
                            "--max-time",
                            "1",
                            "--cacert",
                            p.ca.to_str().unwrap_or_default(),
                            "--cert",
                            p.client_cert.to_str().unwrap_or_default(),
                            "--key",
                            p.client_key.to_str().unwrap_or_default(),
                            &format!("https://{}:2379/metrics", node.ip),
                        ],
                    )
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout)
                            .lines()
                            .any(|l| l.trim() == "etcd_server_is_leader 1")
                    })
        })
    }

    /// Starts node `i`'s replica and waits until it answers.
    pub fn start_sec_em(&mut self, i: usize) -> Result<(), String> {
        let bin = netns::binary("sec-em")?;
        let dir = self.t.dir.path().to_path_buf();
        let node = &mut self.nodes[i];
        let log = dir.join(format!("sec-em-{i}-{}.log", node.starts));
        node.starts += 1;
        let config = node.config.display().to_string();
        node.sec_em = Some(node.ns.spawn(&bin, &["serve", "--config", &config], &log)?);
        let me = vec![format!("{}:{PORT}", node.ip)];
        if tenant::within(Duration::from_secs(20), || {
            self.t.asmnctl_at(&me, &["instance", "list"]).is_ok()
        })
        .is_none()
        {
            return Err(format!(
                "sec-em replica {i} did not come up: {}",
                self.log_tail(&log)
            ));
        }
        Ok(())
    }

    /// Kills node `i`'s replica (SIGKILL: no goodbye to its agents).
    pub fn kill_sec_em(&mut self, i: usize) {
        self.nodes[i].sec_em.take();
    }

    /// Stops node `i`'s replica as a service manager does (SIGTERM, then waits).
    pub fn stop_sec_em(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].sec_em.take() {
            p.terminate();
            p.wait_exit(Duration::from_secs(10));
        }
    }

    /// The controller (`host:port`) VNF `v`'s agent is connected to, from its metrics.
    pub fn connected_to(&self, v: usize) -> Option<String> {
        tenant::metrics(&self.t, v).lines().find_map(|l| {
            let rest = l.strip_prefix("asmn_agent_control_connected{controller=\"")?;
            let (c, value) = rest.split_once("\"}")?;
            (value.trim() == "1").then(|| c.to_string())
        })
    }
}

/// One fault and what it cost.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Trial {
    /// `kill`, `restart` or `leader`.
    pub kind: String,
    /// The replica (node) it hit.
    pub replica: usize,
    /// Agents that were connected to it.
    pub moved: usize,
    /// Fault to the last of those agents reconnected to another replica, ms (with the
    /// node lost: to reconnected at all).
    pub reconnect_ms: f64,
    /// Fault to the first write acknowledged (the node-loss trial), ms.
    pub writes_resume_ms: Option<f64>,
    /// Catalog change acknowledged to in force at the server and the gateway, ms.
    pub catalog_ms: f64,
    /// Revocation acknowledged to the gateway's tunnel removed and the revoked agent
    /// stopped, ms.
    pub revocation_ms: f64,
    /// Agents whose saved chain position differs from the store's after the fault.
    pub reveals_lost: usize,
}

/// What [`run`] measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    /// Each fault.
    pub trials: Vec<Trial>,
    /// The stream before the faults: datagrams sent, lost, longest gap (ms).
    pub baseline: (u64, u64, f64),
    /// The stream during the faults: datagrams sent, lost, longest gap (ms).
    pub during: (u64, u64, f64),
}

/// How many of each fault [`run`] plays.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Replica kills.
    pub kills: usize,
    /// Rolling restarts (each restarts every replica once).
    pub rolls: usize,
    /// Node losses (etcd leader and its replica).
    pub node_losses: usize,
}

/// The VNFs of the tenant: indexes into `t.vnfs`.
struct Roles {
    client: usize,
    gateway: usize,
    server: usize,
    spares: Vec<usize>,
}

/// Stream rate and size: 1,000 datagrams of 250 bytes a second.
const STREAM: (&str, &str) = ("2", "250");

fn stream(ha: &Ha, r: &Roles, seconds: u64, tag: &str) -> Result<(Proc, Proc), String> {
    let me = netns::binary("asmn-lab")?;
    let dir = ha.t.dir.path();
    let server = ha.t.vnfs[r.server].overlay.to_string();
    let sink = crate::bench::spawn_generator(
        &ha.t.vnfs[r.server].ns,
        &me,
        &[
            "udp-sink",
            "--port",
            "9000",
            "--seconds",
            &(seconds + 3).to_string(),
        ],
        &dir.join(format!("sink-{tag}.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let sender = crate::bench::spawn_generator(
        &ha.t.vnfs[r.client].ns,
        &me,
        &[
            "udp",
            &format!("{server}:9000"),
            "--mbps",
            STREAM.0,
            "--size",
            STREAM.1,
            "--seconds",
            &seconds.to_string(),
        ],
        &dir.join(format!("send-{tag}.log")),
    )?;
    Ok((sink, sender))
}

/// Stops the sender (when it still runs) and reads the sink: datagrams sent (by sequence
/// number), lost, and the longest gap.
fn stream_result(mut sink: Proc, sender: Proc) -> Result<(u64, u64, f64), String> {
    drop(sender);
    sink.wait_exit(Duration::from_secs(10));
    let got = crate::bench::last_json(&sink.log())?;
    let received = got["datagrams"].as_u64().unwrap_or(0);
    let lost = got["lost"].as_u64().unwrap_or(0);
    Ok((
        received + lost,
        lost,
        got["longest_gap_ms"].as_f64().unwrap_or(f64::NAN),
    ))
}

/// Builds the tenant of the deployment: client, gateway, server and `spares` clients,
/// all enrolled, tunnels up.
fn tenant(ha: &mut Ha, spares: usize, say: &mut dyn FnMut(&str)) -> Result<Roles, String> {
    let t = &mut ha.t;
    let client_img = t.file("client.img", &tenant::image(1, 1 << 20))?;
    let server_img = t.file("server.img", &tenant::image(2, 1 << 20))?;
    let gw_img = t.file("gw.img", &tenant::image(3, 1 << 20))?;
    t.onboard(&client_img, tenant::CLIENT_VNFD)?;
    t.onboard(&server_img, SERVER_VNFD)?;
    t.onboard(&gw_img, tenant::GATEWAY_VNFD)?;
    let gateway = t.add("gw-0", "gw", "gateway", &gw_img)?;
    let client = t.add("client-0", "client", "vnf", &client_img)?;
    let server = t.add("server-0", "server", "vnf", &server_img)?;
    let mut spare = Vec::new();
    for k in 0..spares {
        spare.push(t.add(&format!("spare-{k}"), "client", "vnf", &client_img)?);
    }
    let all: Vec<usize> = [gateway, client, server]
        .into_iter()
        .chain(spare.iter().copied())
        .collect();
    for &i in &all {
        t.start(i)?;
    }
    for &i in &all {
        t.wait_enrolled(i, Duration::from_secs(60))?;
    }
    say(&format!(
        "{} agents enrolled; their bundles list {}",
        all.len(),
        t.controllers.join(", ")
    ));
    let server_ip = t.vnfs[server].overlay.to_string();
    for &i in [client].iter().chain(spare.iter()) {
        if !tenant::ping_until_up(t, i, &server_ip) {
            return Err(format!("{} cannot reach the server", t.vnfs[i].name));
        }
    }
    Ok(Roles {
        client,
        gateway,
        server,
        spares: spare,
    })
}

/// Waits up to `limit` for `f` to give a value, polling every 20 ms.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn agent_log(ha: &Ha, v: usize) -> String {
    ha.t.vnfs[v]
        .agent
        .as_ref()
        .map(Proc::log)
        .unwrap_or_default()
}

/// Applies the next catalog version (retrying for up to `limit` while Sec-EM cannot
/// write); when the command was first issued, when it was acknowledged, and the version.
fn apply_catalog(ha: &Ha, burst: u32, limit: Duration) -> Result<(f64, f64, u64), String> {
    let file = ha.t.file(
        &format!("catalog-{burst}.yaml"),
        server_catalog(burst).as_bytes(),
    )?;
    let (start, issued) = (Instant::now(), epoch_now());
    loop {
        match ha.t.asmnctl(&[
            "--json",
            "--timeout",
            "2",
            "catalog",
            "apply",
            file.to_str().unwrap_or_default(),
        ]) {
            Ok(out) => {
                let v: serde_json::Value =
                    serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))?;
                return Ok((issued, epoch_now(), v["version"].as_u64().unwrap_or(0)));
            }
            Err(e) if start.elapsed() < limit => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("catalog apply failed for {limit:?}: {e}")),
        }
    }
}

/// The catalog change and the revocation of `spare` made right after a fault, and their
/// times to the data planes.
fn change_and_revoke(
    ha: &mut Ha,
    r: &Roles,
    (spare, others): (usize, &[usize]),
    burst: u32,
    trial: &mut Trial,
) -> Result<(), String> {
    // Times run from issuing each command: what an operator waits for.
    let (t_cat, _, version) = apply_catalog(ha, burst, Duration::from_secs(10))?;
    let id = ha.t.vnfs[spare].id.clone();
    let t_rev = epoch_now();
    ha.t.asmnctl(&["revoke", &id, "--reason", "ha trial"])?;
    let v = format!("version={version}");
    let in_force = wait_for(Duration::from_secs(5), || {
        let s = first_after(
            &agent_log(ha, r.server),
            t_cat - 1.0,
            &["catalog in force", &v],
        )?;
        let g = first_after(
            &agent_log(ha, r.gateway),
            t_cat - 1.0,
            &["catalog in force", &v],
        )?;
        Some(s.max(g))
    })
    .ok_or_else(|| format!("catalog version {version} not in force within 5 s"))?;
    trial.catalog_ms = (in_force - t_cat).max(0.0) * 1e3;
    let peer = format!("peer={id}");
    // Every data plane of the tenant: the gateway removes its tunnel, every other live
    // agent (those that moved among them) hears of it, the revoked agent stops.
    let cut = wait_for(Duration::from_secs(5), || {
        let heard = others.iter().try_fold(0.0f64, |latest, &i| {
            first_after(&agent_log(ha, i), t_rev - 1.0, &["peer revoked", &peer])
                .map(|t| latest.max(t))
        })?;
        let log = agent_log(ha, spare);
        let own = first_after(&log, t_rev - 1.0, &["revoked"])?;
        Some(heard.max(own))
    })
    .ok_or_else(|| {
        let deaf: Vec<&str> = others
            .iter()
            .filter(|&&i| {
                first_after(&agent_log(ha, i), t_rev - 1.0, &["peer revoked", &peer]).is_none()
            })
            .map(|&i| ha.t.vnfs[i].name.as_str())
            .collect();
        format!(
            "{} not cut off within 5 s (not heard by: {})",
            ha.t.vnfs[spare].name,
            deaf.join(", ")
        )
    })?;
    trial.revocation_ms = (cut - t_rev).max(0.0) * 1e3;
    if let Some(a) = ha.t.vnfs[spare].agent.as_mut()
        && a.wait_exit(Duration::from_secs(5)).is_none()
    {
        return Err(format!(
            "{} still runs after its revocation",
            ha.t.vnfs[spare].name
        ));
    }
    Ok(())
}

/// Agents not revoked.
fn live(r: &Roles, revoked: &[usize]) -> Vec<usize> {
    [r.gateway, r.client, r.server]
        .into_iter()
        .chain(r.spares.iter().copied())
        .filter(|i| !revoked.contains(i))
        .collect()
}

/// Waits until every agent in `movers` logged a reconnection after `t0`; the latest.
fn reconnected(ha: &Ha, movers: &[usize], t0: f64, limit: Duration) -> Result<f64, String> {
    if movers.is_empty() {
        return Ok(f64::NAN);
    }
    wait_for(limit, || {
        movers.iter().try_fold(t0, |latest, &i| {
            first_after(&agent_log(ha, i), t0, &["reconnected to Sec-EM"]).map(|t| latest.max(t))
        })
    })
    .ok_or_else(|| {
        let late: Vec<&str> = movers
            .iter()
            .filter(|&&i| first_after(&agent_log(ha, i), t0, &["reconnected to Sec-EM"]).is_none())
            .map(|&i| ha.t.vnfs[i].name.as_str())
            .collect();
        format!("not reconnected within {limit:?}: {}", late.join(", "))
    })
}

/// Agents whose saved chain position (past the reveal they sent last) does not follow
/// the one the store holds: a reveal Sec-EM acknowledged and then lost.
fn reveals_lost(ha: &Ha, agents: &[usize]) -> Result<usize, String> {
    let mut lost = 0;
    for &i in agents {
        let v = &ha.t.vnfs[i];
        let state = ha.t.dir.path().join(format!("{}.state", v.name));
        let saved = std::fs::read_to_string(state.join(format!("{}.chain", v.id)))
            .map_err(|e| format!("{}: {e}", v.name))?;
        let next: u64 = saved
            .split_whitespace()
            .nth(2)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{}: chain position {saved:?}", v.name))?;
        let show = ha.t.asmnctl(&["--json", "instance", "show", &v.id])?;
        let rec: serde_json::Value = serde_json::from_str(&show).map_err(text_err)?;
        // The file holds the index after the one sent last (so that a restart never
        // sends an element twice): the store must hold the one before it.
        if rec["chain"]["last_index"].as_u64() != Some(next + 1) {
            lost += 1;
        }
    }
    Ok(lost)
}

/// [`reveals_lost`] once the agents are quiet: every reveal sent has been answered by
/// then (the reconnections are done); a mismatch that lasts a second is a reveal lost.
fn settled_reveals_lost(ha: &Ha, agents: &[usize]) -> Result<usize, String> {
    let lost = reveals_lost(ha, agents)?;
    if lost == 0 {
        return Ok(0);
    }
    std::thread::sleep(Duration::from_secs(1));
    reveals_lost(ha, agents)
}

/// The replica most agents are connected to, and those agents.
fn busiest(ha: &Ha, agents: &[usize]) -> (usize, Vec<usize>) {
    let on: Vec<Option<usize>> = agents
        .iter()
        .map(|&i| {
            let c = ha.connected_to(i)?;
            (0..ha.nodes.len()).find(|&n| c == format!("{}:{PORT}", node_ip(n)))
        })
        .collect();
    let best = (0..ha.nodes.len())
        .max_by_key(|n| on.iter().filter(|o| **o == Some(*n)).count())
        .unwrap_or(0);
    let movers = agents
        .iter()
        .zip(&on)
        .filter(|(_, o)| **o == Some(best))
        .map(|(i, _)| *i)
        .collect();
    (best, movers)
}

fn on_replica(ha: &Ha, agents: &[usize], n: usize) -> Vec<usize> {
    let want = format!("{}:{PORT}", node_ip(n));
    agents
        .iter()
        .copied()
        .filter(|&i| ha.connected_to(i).as_deref() == Some(want.as_str()))
        .collect()
}

/// Builds the deployment and plays `plan`, narrating with `say`.
pub fn run(plan: Plan, say: &mut dyn FnMut(&str)) -> Result<Report, String> {
    say("three nodes: an etcd member (TLS, client certificates) and a Sec-EM replica each");
    let mut ha = Ha::new(3)?;
    let spares = plan.kills + plan.rolls * 3 + plan.node_losses;
    let r = tenant(&mut ha, spares, say)?;
    let mut report = Report::default();

    say("baseline: the UDP stream client -> gateway -> server for 4 s, no fault");
    let (sink, mut sender) = stream(&ha, &r, 4, "baseline")?;
    sender.wait_exit(Duration::from_secs(10));
    report.baseline = stream_result(sink, sender)?;

    // Longer than every fault takes; stopped when they are done.
    let seconds = 60 + 10 * spares as u64;
    let (sink, sender) = stream(&ha, &r, seconds, "faults")?;
    std::thread::sleep(Duration::from_millis(500));
    let mut revoked: Vec<usize> = Vec::new();
    let mut burst = 1000;
    let next_spare = |revoked: &mut Vec<usize>| {
        let s = r
            .spares
            .iter()
            .copied()
            .find(|s| !revoked.contains(s))
            .ok_or("no spare left to revoke")?;
        revoked.push(s);
        Ok::<usize, String>(s)
    };

    for k in 0..plan.kills {
        let s = next_spare(&mut revoked)?;
        let agents = live(&r, &revoked);
        let (victim, movers) = busiest(&ha, &agents);
        let mut trial = Trial {
            kind: "kill".into(),
            replica: victim,
            moved: movers.len(),
            ..Trial::default()
        };
        let t0 = epoch_now();
        ha.kill_sec_em(victim);
        burst += 1;
        change_and_revoke(&mut ha, &r, (s, &agents), burst, &mut trial)?;
        trial.reconnect_ms = (reconnected(&ha, &movers, t0, Duration::from_secs(10))? - t0) * 1e3;
        trial.reveals_lost = settled_reveals_lost(&ha, &agents)?;
        say(&format!(
            "kill {k}: replica {victim} killed; its {} agents reconnected in {:.0} ms; catalog in force {:.0} ms, revocation {:.0} ms after the command",
            trial.moved, trial.reconnect_ms, trial.catalog_ms, trial.revocation_ms
        ));
        ha.start_sec_em(victim)?;
        report.trials.push(trial);
    }

    for roll in 0..plan.rolls {
        for n in 0..ha.nodes.len() {
            let s = next_spare(&mut revoked)?;
            let agents = live(&r, &revoked);
            let movers = on_replica(&ha, &agents, n);
            let mut trial = Trial {
                kind: "restart".into(),
                replica: n,
                moved: movers.len(),
                ..Trial::default()
            };
            let t0 = epoch_now();
            ha.stop_sec_em(n);
            burst += 1;
            change_and_revoke(&mut ha, &r, (s, &agents), burst, &mut trial)?;
            trial.reconnect_ms =
                (reconnected(&ha, &movers, t0, Duration::from_secs(10))? - t0) * 1e3;
            trial.reveals_lost = settled_reveals_lost(&ha, &agents)?;
            ha.start_sec_em(n)?;
            say(&format!(
                "rolling restart {roll}, replica {n}: {} agents moved in {:.0} ms; catalog {:.0} ms, revocation {:.0} ms",
                trial.moved, trial.reconnect_ms, trial.catalog_ms, trial.revocation_ms
            ));
            report.trials.push(trial);
        }
    }

    for k in 0..plan.node_losses {
        let leader = ha.etcd_leader().ok_or("no etcd leader")?;
        let s = next_spare(&mut revoked)?;
        let agents = live(&r, &revoked);
        // The etcd leader, and the replica most agents are on: they re-enroll (a reveal
        // each) while the cluster elects a new leader.
        let (victim, movers) = busiest(&ha, &agents);
        let mut trial = Trial {
            kind: "leader".into(),
            replica: victim,
            moved: movers.len(),
            ..Trial::default()
        };
        let t0 = epoch_now();
        ha.kill_etcd(leader);
        ha.kill_sec_em(victim);
        burst += 1;
        let (_, acked, _) = apply_catalog(&ha, burst, Duration::from_secs(10))?;
        trial.writes_resume_ms = Some((acked - t0) * 1e3);
        burst += 1;
        change_and_revoke(&mut ha, &r, (s, &agents), burst, &mut trial)?;
        trial.reconnect_ms = (reconnected(&ha, &movers, t0, Duration::from_secs(10))? - t0) * 1e3;
        let lost = settled_reveals_lost(&ha, &agents)?;
        trial.reveals_lost = lost;
        say(&format!(
            "node loss {k}: etcd leader {leader} and replica {victim} killed; writes resumed {:.0} ms after, {} agents reconnected in {:.0} ms; catalog {:.0} ms, revocation {:.0} ms; reveals lost: {lost}",
            trial.writes_resume_ms.unwrap_or(f64::NAN),
            trial.moved,
            trial.reconnect_ms,
            trial.catalog_ms,
            trial.revocation_ms
        ));
        ha.start_etcd(leader)?;
        ha.start_sec_em(victim)?;
        report.trials.push(trial);
    }
    report.during = stream_result(sink, sender)?;
    say(&format!(
        "the stream: {} of {} datagrams lost during the faults (longest gap {:.0} ms); {} of {} before them (longest gap {:.0} ms)",
        report.during.1,
        report.during.0,
        report.during.2,
        report.baseline.1,
        report.baseline.0,
        report.baseline.2
    ));
    Ok(report)
}

/// Median and maximum of `v` (NaN when empty).
pub fn median_max(v: &[f64]) -> (f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => (f64::NAN, f64::NAN),
        n => (
            if n % 2 == 1 {
                s[n / 2]
            } else {
                (s[n / 2 - 1] + s[n / 2]) / 2.0
            },
            s[n - 1],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_are_read_from_either_format() {
        let text = "2026-11-29T20:41:03.250000Z  INFO asmn_agent: reconnected to Sec-EM";
        let t = line_time(text).expect("a time");
        // 2026-11-29 is day 20,786 since the epoch.
        assert!((t - (20_786.0 * 86_400.0 + 20.0 * 3600.0 + 41.0 * 60.0 + 3.25)).abs() < 1e-6);
        let ansi = "\u{1b}[2m2026-11-29T20:41:03.250000Z\u{1b}[0m INFO x";
        assert_eq!(line_time(ansi), Some(t));
        assert_eq!(line_time("no time here"), None);
        assert_eq!(first_after(text, t + 1.0, &["reconnected"]), None);
        assert_eq!(first_after(text, t, &["reconnected"]), Some(t));
        assert_eq!(median_max(&[3.0, 1.0, 2.0]), (2.0, 3.0));
    }
}
