//! `asmn-lab`: the ASMN demo tenant in network namespaces, and the traffic generators it
//! uses (`asmn-lab gen ...`, run inside a namespace).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use asmn_lab::generators;
use asmn_testkit::netns::{self, Netns};
use asmn_testkit::tenant::{CLIENT_VNFD, GATEWAY_VNFD, Tenant, image};
use clap::{Parser, Subcommand};

/// The ASMN lab: a whole tenant in network namespaces on this machine.
///
/// `asmn-lab demo` builds a tenant (Sec-EM with the embedded store; client, server and
/// gateway VNFs; a fake VNF whose image differs by one byte), narrates each step as it
/// happens, ends with a summary table, and removes everything it made. Needs root (network
/// namespaces, TUN devices) and the project's binaries beside it (cargo build --release).
#[derive(Parser, Debug)]
#[command(name = "asmn-lab", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the demo tenant.
    Demo {
        /// Print the results as JSON at the end.
        #[arg(long)]
        json: bool,
    },
    /// The data-plane benchmark: plain veth, ASMN direct, boringtun-cli (where installed)
    /// and ASMN through the gateway, in one run, each figure beside the baseline.
    Bench {
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
        /// Measure with the lab's own generators even where ping and iperf3 are installed.
        #[arg(long)]
        lab_generators: bool,
        /// Measure only these paths besides the plain veth baseline (repeatable).
        #[arg(long, value_enum)]
        only: Vec<BenchPath>,
    },
    /// How often the RTT targets hold "in 5 of 5 runs": repeated trials of ASMN's direct
    /// tunnel, the one-thread epoll null tunnel (the floor) and boringtun-cli (one thread,
    /// the reference) side by side on one veth pair, their runs taken in turn; and each
    /// tunnel's CPU per echo at 100 echoes a second.
    RttOdds {
        /// Independent trials (each starts the tunnels afresh; about 60 s each, 90 s with
        /// --busy).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=200))]
        trials: u16,
        /// Also judge the busy-polling agents and the busy null tunnel (0.6x target),
        /// each alone after the trial's side-by-side runs.
        #[arg(long)]
        busy: bool,
        /// Measure with the lab's own generators even where ping is installed.
        #[arg(long)]
        lab_generators: bool,
        /// Print the results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reproduce the paper's Section 4 (Tables 1-2, Figs. 5-9, and latencies beyond it):
    /// report.md, CSV and PNG + SVG charts in --out.
    Eval {
        /// Scaled-down images and shorter runs (a few minutes; what CI runs).
        #[arg(long)]
        quick: bool,
        /// Where the report goes.
        #[arg(long, default_value = "asmn-eval")]
        out: std::path::PathBuf,
        /// Print the results as JSON at the end.
        #[arg(long)]
        json: bool,
    },
    /// The highly available deployment under faults: three etcd members (TLS) and three
    /// Sec-EM replicas on three nodes, a tenant whose bundles list every replica, a UDP
    /// stream through the gateway; replicas killed, restarted one by one, and a node lost
    /// with the etcd leader. Prints each fault's times and their median and maximum.
    Ha {
        /// Replica kills (SIGKILL of the replica most agents are on, restarted after).
        #[arg(long, default_value_t = 10)]
        kills: usize,
        /// Rolling restarts (SIGTERM and start, one replica at a time, all three).
        #[arg(long, default_value_t = 4)]
        rolls: usize,
        /// Node losses (the etcd leader killed, with the replica most agents are on).
        #[arg(long, default_value_t = 2)]
        node_losses: usize,
        /// Print the results as JSON at the end.
        #[arg(long)]
        json: bool,
    },
    /// A traffic generator (run inside a namespace by the lab).
    Gen {
        #[command(subcommand)]
        kind: Gen,
    },
}

/// The paths `asmn-lab bench` can measure.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BenchPath {
    /// ASMN's data plane, a direct tunnel (`asmn-agent static`).
    Direct,
    /// boringtun-cli configured with wg, one thread and four.
    Boringtun,
    /// ASMN through the gateway, in a tenant with Sec-EM.
    Gateway,
    /// An ASMN direct tunnel whose agents poll without pause (a core each).
    Busy,
    /// Null tunnels without cryptography (blocking, one thread in epoll, busy-polling,
    /// and batched with ASMN's offloads): the floor; and null tunnels through a null
    /// relay, the floor of a gateway.
    Floor,
    /// An ASMN direct tunnel whose TUN devices queue 5,000 packets (`--tun-queue`), as
    /// for a UDP-heavy VNF.
    Queue,
    /// A full-rate flood of forged handshake initiations against a direct tunnel, beside
    /// junk datagrams: the agent's CPU per datagram, and the RTT meanwhile.
    Flood,
}

#[derive(Subcommand, Debug)]
enum Gen {
    /// ICMP echo requests.
    Ping {
        /// Destination.
        to: Ipv4Addr,
        #[arg(long, default_value_t = 5)]
        count: u32,
        #[arg(long, default_value_t = 56)]
        size: usize,
        #[arg(long, default_value_t = 200)]
        interval_ms: u64,
    },
    /// Discard TCP streams on a port.
    TcpSink {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Send a TCP stream.
    Tcp {
        to: SocketAddr,
        #[arg(long, default_value_t = 2)]
        seconds: u64,
        /// Bytes per write.
        #[arg(long, default_value_t = 131_072)]
        size: usize,
        /// Pace to this rate (0: as fast as it goes).
        #[arg(long, default_value_t = 0.0)]
        mbps: f64,
    },
    /// Count sequence-numbered datagrams on a port.
    UdpSink {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Send sequence-numbered datagrams at a rate.
    Udp {
        to: SocketAddr,
        #[arg(long, default_value_t = 50.0)]
        mbps: f64,
        #[arg(long, default_value_t = 1200)]
        size: usize,
        #[arg(long, default_value_t = 2)]
        seconds: u64,
    },
    /// A TCP SYN flood (SYNs carrying `payload` bytes).
    SynFlood {
        to: Ipv4Addr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 1200)]
        payload: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// A flood of WireGuard handshake initiations at full rate: forged with a valid mac1
    /// for the responder's public key (hex), or random datagrams without `--key`, or
    /// forged transport-data messages with `--data`.
    HandshakeFlood {
        to: SocketAddr,
        /// The responder's WireGuard public key, hex.
        #[arg(long, conflicts_with = "data")]
        key: Option<String>,
        /// Datagrams shaped as transport-data messages (type 4, random receiver index,
        /// counter and ciphertext): what the agent steers by their index's tag.
        #[arg(long)]
        data: bool,
        /// With `--data`: the last byte of every receiver index (the target's index tag,
        /// as an attacker on the path reads it from its traffic), instead of random.
        #[arg(long, requires = "data")]
        tag: Option<u8>,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Datagrams per send (UDP GSO; the receiver's GRO reads them as one): a flood
        /// that costs the attacker far less per datagram than its target.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        gso: u16,
    },
    /// A compromised VNF (attack tests): enrolls with its genuine bundle and image, builds
    /// a tunnel with the gateway at overlay `--via`, then sends pings and SYNs through it
    /// to `--to`, which Sec-EM may refuse it.
    RoguePeer {
        #[arg(long)]
        bundle: std::path::PathBuf,
        #[arg(long)]
        image: std::path::PathBuf,
        /// This end's underlay address (ip:port).
        #[arg(long)]
        underlay: SocketAddr,
        #[arg(long)]
        via: std::net::IpAddr,
        #[arg(long)]
        to: Ipv4Addr,
        #[arg(long, default_value_t = 5201)]
        port: u16,
        #[arg(long, default_value_t = 3)]
        seconds: u64,
    },
    /// A Sec-EM stand-in (fault tests): answers every request `Unavailable` for `--seconds`
    /// on `--listen`, with the server certificate of the PKI directory `--pki`.
    UnavailableSecEm {
        #[arg(long)]
        pki: std::path::PathBuf,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// A tunnel without cryptography between two TUN devices (the benchmark's floor for
    /// userspace tunnels): packets go to the peer as they are, in UDP.
    NullTunnel {
        #[arg(long)]
        tun: String,
        /// The device's address, ip/prefix.
        #[arg(long)]
        address: String,
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        peer: SocketAddr,
        /// Poll without pause instead of blocking (one thread).
        #[arg(long, conflicts_with_all = ["epoll", "batched"])]
        busy_poll: bool,
        /// One thread asleep in epoll for both directions, instead of a blocking thread
        /// per direction.
        #[arg(long, conflicts_with = "batched")]
        epoll: bool,
        /// One thread asleep in epoll that moves batches with the agent's offloads (TUN
        /// TSO/USO and GRO, UDP GSO and GRO): the floor of ASMN's batched I/O.
        #[arg(long)]
        batched: bool,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// A relay without cryptography between two null tunnels (the benchmark's floor for a
    /// gateway): datagrams from `--a` go to `--b` as they are, and back.
    NullRelay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        a: SocketAddr,
        #[arg(long)]
        b: SocketAddr,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Time boringtun's encapsulation and decapsulation of a 64-byte echo, back to back
    /// and each right after a pause (asleep, or polling): the per-packet cost of sparse
    /// traffic.
    CryptoWake {
        #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        packets: u32,
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=1000))]
        sleep_ms: u64,
        /// Pass each pause polling a non-blocking socket, as a busy-polling data plane
        /// does, instead of asleep
        #[arg(long)]
        poll: bool,
        /// With --poll: seal and open a throwaway packet on a session of its own this
        /// often while polling (the agent with `polling = "busy"` warms its whole
        /// per-packet path every 200 us)
        #[arg(long, requires = "poll", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        keep_warm_us: Option<u64>,
    },
    /// Sleep `--every-us` again and again, and report the longest time between two
    /// wake-ups: how long the other tasks of this CPU kept a thread waiting.
    WakeGaps {
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
        every_us: u64,
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=3600))]
        seconds: u64,
    },
    /// Sample a device's receive counter.
    RxRate {
        #[arg(long, default_value = "asmn0")]
        dev: String,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn generate(kind: Gen) -> anyhow::Result<String> {
    Ok(match kind {
        Gen::Ping {
            to,
            count,
            size,
            interval_ms,
        } => serde_json::to_string(&generators::ping(
            to,
            count,
            size,
            Duration::from_millis(interval_ms),
        )?)?,
        Gen::TcpSink { port, seconds } => {
            serde_json::to_string(&generators::tcp_sink(port, seconds)?)?
        }
        Gen::Tcp {
            to,
            seconds,
            size,
            mbps,
        } => serde_json::to_string(&generators::tcp_stream(to, seconds, size, mbps)?)?,
        Gen::UdpSink { port, seconds } => {
            serde_json::to_string(&generators::udp_sink(port, seconds)?)?
        }
        Gen::Udp {
            to,
            mbps,
            size,
            seconds,
        } => serde_json::to_string(&generators::udp_stream(to, mbps, size, seconds)?)?,
        Gen::SynFlood {
            to,
            port,
            payload,
            seconds,
        } => serde_json::to_string(&generators::syn_flood(to, port, payload, seconds)?)?,
        Gen::RoguePeer {
            bundle,
            image,
            underlay,
            via,
            to,
            port,
            seconds,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let r = rt
                .block_on(asmn_testkit::attacker::rogue_peer(
                    &bundle, &image, underlay, via, to, port, seconds,
                ))
                .map_err(|e| anyhow::anyhow!(e))?;
            serde_json::to_string(&r)?
        }
        Gen::UnavailableSecEm {
            pki,
            listen,
            seconds,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let n = rt
                .block_on(asmn_testkit::attacker::unavailable_sec_em(
                    &pki, listen, seconds,
                ))
                .map_err(|e| anyhow::anyhow!(e))?;
            serde_json::json!({ "answered": n }).to_string()
        }
        Gen::HandshakeFlood {
            to,
            key,
            data,
            tag,
            seconds,
            gso,
        } => {
            let forged = match key {
                Some(h) => {
                    let mut k = [0u8; 32];
                    hex::decode_to_slice(h.trim(), &mut k)
                        .map_err(|e| anyhow::anyhow!("--key: {e}"))?;
                    generators::Forged::Initiations(k)
                }
                None if data => generators::Forged::Data { tag },
                None => generators::Forged::Junk,
            };
            serde_json::to_string(&generators::handshake_flood(
                to,
                forged,
                seconds,
                usize::from(gso),
            )?)?
        }
        Gen::NullTunnel {
            tun,
            address,
            listen,
            peer,
            busy_poll,
            epoll,
            batched,
            seconds,
        } => {
            let address = address
                .split_once('/')
                .and_then(|(ip, p)| Some((ip.parse().ok()?, p.parse().ok().filter(|p| *p <= 32)?)))
                .ok_or_else(|| anyhow::anyhow!("--address {address:?} is not ipv4/prefix"))?;
            let t = generators::NullTunnel {
                tun,
                address,
                listen,
                peer,
                wait: if busy_poll {
                    generators::NullWait::Busy
                } else if batched {
                    generators::NullWait::Batched
                } else if epoll {
                    generators::NullWait::Epoll
                } else {
                    generators::NullWait::Blocking
                },
            };
            serde_json::to_string(&generators::null_tunnel(&t, seconds)?)?
        }
        Gen::NullRelay {
            listen,
            a,
            b,
            seconds,
        } => serde_json::to_string(&generators::null_relay(listen, a, b, seconds)?)?,
        Gen::CryptoWake {
            packets,
            sleep_ms,
            poll,
            keep_warm_us,
        } => serde_json::to_string(&generators::crypto_wake(
            packets as usize,
            Duration::from_millis(sleep_ms),
            if poll {
                generators::Pause::Poll {
                    warm_every: keep_warm_us.map(Duration::from_micros),
                }
            } else {
                generators::Pause::Sleep
            },
        )?)?,
        Gen::WakeGaps { every_us, seconds } => serde_json::to_string(&generators::wake_gaps(
            Duration::from_micros(every_us),
            seconds,
        ))?,
        Gen::RxRate {
            dev,
            interval_ms,
            seconds,
        } => serde_json::to_string(&generators::rx_samples(
            &dev,
            Duration::from_millis(interval_ms),
            seconds,
        )?)?,
    })
}

/// Narration: one line per step, with the time since the start.
struct Narrator {
    start: Instant,
    rows: Vec<(String, String, bool)>,
}

impl Narrator {
    fn say(&self, text: &str) {
        println!("[{:>5.1}s] {text}", self.start.elapsed().as_secs_f64());
    }

    fn step(&mut self, name: &str, result: String, ok: bool) {
        self.say(&format!(
            "{} {name}: {result}",
            if ok { "ok  " } else { "FAIL" }
        ));
        self.rows.push((name.to_string(), result, ok));
    }
}

const SERVER_VNFD: &str = "vnfd:
  id: server
  name: Demo server, reachable only through the gateway
  sec_catalog:
    gateway: gw
    default_action: drop
    rules:
      - name: ping
        protocol: icmp
        ingress_policing_rate: 10000
        ingress_policing_burst: 1000
      - name: web
        protocol: tcp
        port: 8080
        sources: [client]
        ingress_policing_rate: 0
      - name: stream
        protocol: udp
        port: 9000
        sources: [client]
        ingress_policing_rate: 0
";

/// The 10 Mbit/s rule the demo applies during the flood.
const SHAPED: &str = "vnf: server
sec_catalog:
  gateway: gw
  default_action: drop
  rules:
    - name: ping
      protocol: icmp
      ingress_policing_rate: 10000
      ingress_policing_burst: 1000
    - name: web
      protocol: tcp
      port: 8080
      sources: [client]
      ingress_policing_rate: 10000
      ingress_policing_burst: 40
    - name: stream
      protocol: udp
      port: 9000
      sources: [client]
      ingress_policing_rate: 0
";

/// Runs `asmn-lab gen ARGS` inside `ns` and parses its JSON line.
fn run_gen(ns: &Netns, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let me = std::env::current_exe()?;
    asmn_lab::bench::generate(ns, &me, args).map_err(anyhow::Error::msg)
}

/// Starts `asmn-lab gen ARGS` in the background inside `ns`.
fn spawn_gen(ns: &Netns, args: &[&str], log: &Path) -> anyhow::Result<netns::Proc> {
    let me = std::env::current_exe()?;
    asmn_lab::bench::spawn_generator(ns, &me, args, log).map_err(anyhow::Error::msg)
}

fn last_json(log: &str) -> anyhow::Result<serde_json::Value> {
    asmn_lab::bench::last_json(log).map_err(anyhow::Error::msg)
}

fn demo(json: bool) -> anyhow::Result<bool> {
    let mut n = Narrator {
        start: Instant::now(),
        rows: Vec::new(),
    };
    n.say("building the tenant: a hub namespace with a bridge and Sec-EM (embedded store)");
    let mut t = Tenant::new().map_err(anyhow::Error::msg)?;
    n.step(
        "Sec-EM",
        format!("up on {}:7443", asmn_testkit::tenant::SEC_EM),
        true,
    );

    let client_img = t
        .file("client.img", &image(1, 4 << 20))
        .map_err(anyhow::Error::msg)?;
    let server_bytes = image(2, 4 << 20);
    let server_img = t
        .file("server.img", &server_bytes)
        .map_err(anyhow::Error::msg)?;
    let gw_img = t
        .file("gw.img", &image(3, 4 << 20))
        .map_err(anyhow::Error::msg)?;
    let mut fake = server_bytes.clone();
    fake[1 << 20] ^= 1;
    let fake_img = t.file("fake.img", &fake).map_err(anyhow::Error::msg)?;
    for (img, vnfd) in [
        (&client_img, CLIENT_VNFD),
        (&server_img, SERVER_VNFD),
        (&gw_img, GATEWAY_VNFD),
    ] {
        t.onboard(img, vnfd).map_err(anyhow::Error::msg)?;
    }
    n.step(
        "images on-boarded",
        "client, server (behind gateway gw, whitelist: icmp, tcp/8080, udp/9000), gw".into(),
        true,
    );
    let g = t
        .add("gw-0", "gw", "gateway", &gw_img)
        .map_err(anyhow::Error::msg)?;
    let c = t
        .add("client-0", "client", "vnf", &client_img)
        .map_err(anyhow::Error::msg)?;
    let s = t
        .add("server-0", "server", "vnf", &server_img)
        .map_err(anyhow::Error::msg)?;
    let f = t
        .add("fake-0", "server", "vnf", &fake_img)
        .map_err(anyhow::Error::msg)?;
    n.step(
        "instances created",
        format!(
            "gw-0 {}, client-0 {}, server-0 {}, fake-0 {} (its image differs by one byte)",
            t.vnfs[g].overlay, t.vnfs[c].overlay, t.vnfs[s].overlay, t.vnfs[f].overlay
        ),
        true,
    );
    // The flood's victim, measured in 100 ms windows, and its source, as the flood test
    // runs them.
    t.realtime(s).map_err(anyhow::Error::msg)?;
    t.flooder(c).map_err(anyhow::Error::msg)?;
    for i in [g, c, s, f] {
        t.start(i).map_err(anyhow::Error::msg)?;
    }
    let mut enrolled = true;
    for i in [g, c, s] {
        enrolled &= t.wait_enrolled(i, Duration::from_secs(30)).is_ok();
    }
    n.step(
        "agents enrolled",
        "gw-0, client-0 and server-0 measured their images and revealed their first chain elements"
            .into(),
        enrolled,
    );
    let fake_agent = t.vnfs[f].agent.as_mut().context("fake agent")?;
    let code = fake_agent.wait_exit(Duration::from_secs(30));
    let log = fake_agent.log();
    let reason = log
        .lines()
        .find(|l| l.contains("refused"))
        .unwrap_or("")
        .trim()
        .to_string();
    n.step(
        "fake VNF refused",
        format!(
            "exit code {code:?}: {}",
            reason.chars().take(120).collect::<String>()
        ),
        code == Some(1) && reason.contains("WrongMeasurement"),
    );

    let server_ip = t.vnfs[s].overlay.to_string();
    let (up, rtts) = asmn_lab::scenarios::gateway_path(&t, c, &server_ip, 10, 10)?;
    let avg = rtts.iter().sum::<u64>() as f64 / rtts.len().max(1) as f64 / 1000.0;
    n.step(
        "ICMP echo client -> server, through the gateway",
        format!("{}/10 replies, RTT average {avg:.2} ms", rtts.len()),
        up && rtts.len() >= 9,
    );

    let dir = t.dir.path().to_path_buf();
    let sink = spawn_gen(
        &t.vnfs[s].ns,
        &["tcp-sink", "--port", "8080", "--seconds", "4"],
        &dir.join("tcp-sink.log"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let tcp = run_gen(
        &t.vnfs[c].ns,
        &["tcp", &format!("{server_ip}:8080"), "--seconds", "2"],
    )?;
    drop(sink);
    let tcp_mbps = tcp["mbit_per_s"].as_f64().unwrap_or(0.0);
    n.step(
        "TCP stream, 2 s",
        format!("{tcp_mbps:.0} Mbit/s"),
        tcp_mbps > 1.0,
    );

    let mut usink = spawn_gen(
        &t.vnfs[s].ns,
        &["udp-sink", "--port", "9000", "--seconds", "5"],
        &dir.join("udp-sink.log"),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let sent = run_gen(
        &t.vnfs[c].ns,
        &[
            "udp",
            &format!("{server_ip}:9000"),
            "--mbps",
            "50",
            "--seconds",
            "2",
        ],
    )?;
    usink.wait_exit(Duration::from_secs(6));
    let got = last_json(&usink.log())?;
    let (tx, rx) = (
        sent["datagrams"].as_u64().unwrap_or(0),
        got["datagrams"].as_u64().unwrap_or(0),
    );
    let loss = 100.0 * tx.saturating_sub(rx) as f64 / tx.max(1) as f64;
    n.step(
        "UDP stream at 50 Mbit/s, 2 s",
        format!("{rx}/{tx} datagrams delivered ({loss:.2}% lost)"),
        tx > 0 && loss < 5.0,
    );

    let unlisted = run_gen(
        &t.vnfs[c].ns,
        &["tcp", &format!("{server_ip}:22"), "--seconds", "1"],
    );
    n.step(
        "unlisted port (tcp/22) blocked by the gateway",
        if unlisted.is_err() {
            "no connection".into()
        } else {
            "connected!".into()
        },
        unlisted.is_err(),
    );

    // The paper's Fig. 9, compressed: a SYN flood, then the 10 Mbit/s rule.
    n.say("SYN flood client -> server:8080 through the gateway; the rule comes after 4 s");
    let run = asmn_lab::scenarios::flood(
        &t,
        &asmn_lab::scenarios::FloodPlan {
            attacker: c,
            victim: s,
            gateway: g,
            port: 8080,
            rule: SHAPED,
            rule_at: Duration::from_secs(4),
            length: Duration::from_secs(8),
        },
    )?;
    n.say("asmnctl catalog apply: web rule at 10 Mbit/s");
    let before = run.before_mbps(Duration::from_secs(1));
    let settled: Vec<f64> = run.after(Duration::from_secs(1)).map(|w| w.mbps).collect();
    let after = settled.iter().sum::<f64>() / settled.len().max(1) as f64;
    n.step(
        "flood shaped by a live catalog change",
        format!("{before:.1} Mbit/s before the rule, {after:.1} Mbit/s after"),
        before > 10.5 && after <= 10.5 && after > 5.0,
    );

    // Revocation: the client is cut off.
    let asmn_lab::scenarios::Cutoff {
        removed_after: cut,
        victim_exit: client_stopped,
        answered_after: after_ping,
    } = asmn_lab::scenarios::revocation(&mut t, c, g, &server_ip, Duration::from_secs(5))?;
    let cut_ms = cut.map(|d| d.as_secs_f64() * 1e3);
    n.step(
        "client-0 revoked and cut off",
        format!(
            "gateway removed its tunnel {} after the command; the client's agent stopped \
             (exit {client_stopped:?}); pings answered afterwards: {after_ping}",
            cut_ms.map_or("never".to_string(), |m| format!("{m:.0} ms")),
        ),
        cut.is_some_and(|d| d < Duration::from_secs(1)) && after_ping == 0,
    );

    drop(t);
    let leftover = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("asmn"))
        .unwrap_or(false);
    n.step(
        "clean-up",
        "namespaces, processes and TUN devices removed".into(),
        !leftover,
    );

    let all = n.rows.iter().all(|r| r.2);
    println!();
    println!("{:<48} {:<6} result", "step", "");
    println!("{}", "-".repeat(100));
    for (name, result, ok) in &n.rows {
        println!("{name:<48} {:<6} {result}", if *ok { "ok" } else { "FAIL" });
    }
    println!(
        "\n{} in {:.1} s",
        if all {
            "every step succeeded"
        } else {
            "SOME STEPS FAILED"
        },
        n.start.elapsed().as_secs_f64()
    );
    if json {
        let rows: Vec<serde_json::Value> = n
            .rows
            .iter()
            .map(|(name, result, ok)| serde_json::json!({"step": name, "result": result, "ok": ok}))
            .collect();
        println!("{}", serde_json::json!({"ok": all, "steps": rows}));
    }
    Ok(all)
}

fn bench(seconds: u64, json: bool, lab_generators: bool, only: &[BenchPath]) -> anyhow::Result<()> {
    let want = |p: BenchPath| only.is_empty() || only.contains(&p);
    use asmn_lab::bench::{Run, have_tools};
    let me = std::env::current_exe()?;
    let work = tempfile::tempdir()?;
    let tools = !lab_generators && have_tools();
    eprintln!(
        "measuring with {}",
        if tools {
            "iputils ping and iperf3"
        } else {
            "the lab's own generators"
        }
    );
    let run = Run {
        me: &me,
        seconds,
        work: work.path(),
        tools,
    };
    let results = asmn_lab::bench::paths(
        run,
        asmn_lab::bench::Paths {
            direct: want(BenchPath::Direct),
            boringtun: want(BenchPath::Boringtun),
            gateway: want(BenchPath::Gateway),
            busy: want(BenchPath::Busy),
            floor: want(BenchPath::Floor),
            queue: want(BenchPath::Queue),
        },
    )?;

    print!("{}", asmn_lab::bench::markdown(&results));
    let flood = if want(BenchPath::Flood) {
        eprintln!("forged-handshake flood ...");
        let f = asmn_lab::bench::flood(run)?;
        print!("{}", asmn_lab::bench::flood_markdown(&f));
        Some(f)
    } else {
        None
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "paths": results, "flood": flood })
        );
    }
    Ok(())
}

fn rtt_odds(trials: u16, busy: bool, lab_generators: bool, json: bool) -> anyhow::Result<()> {
    let me = std::env::current_exe()?;
    let work = tempfile::tempdir()?;
    let run = asmn_lab::bench::Run {
        me: &me,
        seconds: 0,
        work: work.path(),
        tools: !lab_generators && asmn_lab::bench::have_tools(),
    };
    let o = asmn_lab::odds::rtt_odds(run, usize::from(trials), busy)?;
    print!("{}", asmn_lab::odds::markdown(&o));
    if json {
        println!(
            "{}",
            serde_json::json!({ "paths": o.paths, "verdicts": o.verdicts(), "crypto": o.crypto })
        );
    }
    Ok(())
}

/// On Ctrl-C the guards of what is running do not run: remove what this process made,
/// then exit.
fn interrupt_cleans_up() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\ninterrupted: removing the lab's namespaces and processes");
                netns::cleanup_mine();
                std::process::exit(130);
            }
        });
    });
}

/// The failover table: per kind of fault, median and maximum of each time.
fn print_ha(r: &asmn_lab::ha::Report) {
    use asmn_lab::ha::median_max;
    println!(
        "\n{:<34} {:>6} {:>20} {:>20} {:>20} {:>20}",
        "fault", "trials", "reconnected ms", "catalog ms", "revocation ms", "writes resume ms"
    );
    for (kind, name) in [
        ("kill", "replica killed (SIGKILL)"),
        ("restart", "rolling restart (SIGTERM, start)"),
        ("leader", "etcd leader + busiest replica killed"),
    ] {
        let t: Vec<&asmn_lab::ha::Trial> = r.trials.iter().filter(|t| t.kind == kind).collect();
        if t.is_empty() {
            continue;
        }
        let cell = |v: Vec<f64>| {
            let (med, max) = median_max(&v);
            if med.is_nan() {
                "-".to_string()
            } else {
                format!("{med:.0} / {max:.0}")
            }
        };
        println!(
            "{:<34} {:>6} {:>20} {:>20} {:>20} {:>20}",
            name,
            t.len(),
            cell(t.iter().map(|t| t.reconnect_ms).collect()),
            cell(t.iter().map(|t| t.catalog_ms).collect()),
            cell(t.iter().map(|t| t.revocation_ms).collect()),
            cell(t.iter().filter_map(|t| t.writes_resume_ms).collect()),
        );
    }
    println!(
        "(median / maximum; catalog and revocation from issuing the command to every data plane)"
    );
    let lost: usize = r.trials.iter().map(|t| t.reveals_lost).sum();
    println!(
        "UDP stream through the gateway: {} of {} datagrams lost during the faults, longest gap {:.0} ms; baseline {} of {}, longest gap {:.0} ms. Acknowledged reveals lost: {lost}",
        r.during.1, r.during.0, r.during.2, r.baseline.1, r.baseline.0, r.baseline.2
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Gen { kind } => match generate(kind) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("asmn-lab gen: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench {
            seconds,
            json,
            lab_generators,
            only,
        } => {
            if !netns::can_run("asmn-lab bench") {
                return ExitCode::from(2);
            }
            match bench(seconds, json, lab_generators, &only) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("asmn-lab bench: {e:#}");
                    netns::cleanup_mine();
                    ExitCode::FAILURE
                }
            }
        }
        Command::RttOdds {
            trials,
            busy,
            lab_generators,
            json,
        } => {
            if !netns::can_run("asmn-lab rtt-odds") {
                return ExitCode::from(2);
            }
            interrupt_cleans_up();
            match rtt_odds(trials, busy, lab_generators, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("asmn-lab rtt-odds: {e:#}");
                    netns::cleanup_mine();
                    ExitCode::FAILURE
                }
            }
        }
        Command::Eval { quick, out, json } => {
            if !netns::can_run("asmn-lab eval") {
                eprintln!(
                    "asmn-lab eval: run it as root (it makes network namespaces and TUN devices)"
                );
                return ExitCode::from(2);
            }
            interrupt_cleans_up();
            let me = match std::env::current_exe() {
                Ok(me) => me,
                Err(e) => {
                    eprintln!("asmn-lab eval: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match asmn_lab::eval::run(
                &asmn_lab::eval::Options {
                    quick,
                    out: out.clone(),
                },
                &me,
            ) {
                Ok(report) => {
                    println!(
                        "report: {} (charts and CSV beside it), {:.0} s",
                        out.join("report.md").display(),
                        report.seconds
                    );
                    if json {
                        match serde_json::to_string(&report) {
                            Ok(j) => println!("{j}"),
                            Err(e) => eprintln!("asmn-lab eval: {e}"),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("asmn-lab eval: {e:#}");
                    netns::cleanup_mine();
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ha {
            kills,
            rolls,
            node_losses,
            json,
        } => {
            if !netns::can_run("asmn-lab ha") {
                eprintln!("asmn-lab ha: run it as root (it makes network namespaces)");
                return ExitCode::from(2);
            }
            interrupt_cleans_up();
            let start = Instant::now();
            let plan = asmn_lab::ha::Plan {
                kills,
                rolls,
                node_losses,
            };
            let mut say = |text: &str| println!("[{:6.1} s] {text}", start.elapsed().as_secs_f64());
            match asmn_lab::ha::run(plan, &mut say) {
                Ok(report) => {
                    print_ha(&report);
                    if json {
                        match serde_json::to_string(&report) {
                            Ok(j) => println!("{j}"),
                            Err(e) => eprintln!("asmn-lab ha: {e}"),
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("asmn-lab ha: {e}");
                    netns::cleanup_mine();
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo { json } => {
            if !netns::can_run("asmn-lab demo") {
                eprintln!(
                    "asmn-lab demo: run it as root (it makes network namespaces and TUN devices)"
                );
                return ExitCode::from(2);
            }
            interrupt_cleans_up();
            match demo(json) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("asmn-lab demo: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
