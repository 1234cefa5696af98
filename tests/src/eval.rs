//! `asmn-lab eval`: the paper's Section 4 reproduced on this machine, every figure beside
//! its baseline from the same run, written as `report.md`, CSV files and PNG + SVG charts.
//!
//! - Tables 1 and 2: six generated images of the paper's sizes (`--quick`: 1/200), each
//!   pair measured with CRC32, MD5, SHA-1 and SHA-256 by ASMN and by `openssl dgst`,
//!   coreutils and zlib's `crc32`, beside the paper's seconds;
//! - Fig. 5: ICMP RTT (64 and 4096 bytes) over plain veth, an ASMN direct tunnel,
//!   `boringtun-cli` and ASMN through the gateway ([`crate::bench::paths`]), measured
//!   with iputils ping and iperf3 and cross-checked with the lab's own generators;
//! - Figs. 6 to 8: machine CPU use, second by second, under ICMP, TCP and UDP traffic of
//!   64- and 4096-byte packets, over plain veth and over ASMN;
//! - Fig. 9: a SYN flood through the gateway, the 10 Mbit/s rule applied with `asmnctl`
//!   at t = 11 s, the rate reaching the server in 100 ms windows;
//! - beyond the paper: catalog apply to enforcement at the gateway (trials, seen on the
//!   data plane), revocation to cut-off, enrollment time per VNF.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::bench::{self, DirectPair, PathResult, Paths, Run, TUNNEL_B, VETH_B};
use crate::charts::{self, BarChart, LineChart, Marker, Series};
use crate::netns::{Netns, Proc};
use crate::tenant::{CLIENT_VNFD, GATEWAY_VNFD, Tenant, image};

/// Table 1 of the paper: the six VNF images, GB.
#[allow(clippy::approx_constant)] // 3.14 GB is VNF4's size in the paper, not pi.
pub const PAPER_SIZES_GB: [f64; 6] = [2.55, 3.72, 1.42, 3.14, 3.91, 2.55];
/// Table 2 of the paper: seconds to extract and compare the hash values of each pair,
/// with CRC32, MD5 and SHA-1.
pub const PAPER_TABLE2: [[f64; 3]; 3] =
    [[16.2, 17.1, 17.5], [18.5, 19.4, 20.1], [16.2, 17.3, 18.3]];
/// When the rule is applied in Fig. 9 (s after the flood starts), as in the paper.
pub const RULE_AT_S: u64 = 11;
/// The Fig. 9 limit, Mbit/s, and the tolerance the report checks against.
pub const LIMIT_MBPS: f64 = 10.0;
/// Highest rate a 100 ms window may show from 100 ms after the rule.
pub const CEILING_MBPS: f64 = 10.5;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Scaled-down images and shorter runs (minutes instead of tens of minutes).
    pub quick: bool,
    /// Where the report goes.
    pub out: PathBuf,
}

/// The machine the report comes from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// When (UTC).
    pub date: String,
}

/// One row of Table 2: a pair of images, one algorithm.
#[derive(Debug, Clone, Serialize)]
pub struct HashRow {
    /// "VNF1 vs VNF2".
    pub pair: String,
    /// Both images' bytes.
    pub bytes: u64,
    /// The algorithm.
    pub algorithm: String,
    /// ASMN's time for both images, s.
    pub ours_s: f64,
    /// The baselines' times for both images, s (None: not installed).
    pub baselines: Vec<(String, Option<f64>)>,
    /// Whether the two digests differ (they must: the images do).
    pub differ: bool,
    /// The paper's seconds (full-size images; no SHA-256 there).
    pub paper_s: Option<f64>,
}

/// CPU use under one kind of traffic.
#[derive(Debug, Clone, Serialize)]
pub struct CpuRun {
    /// "plain veth" or "ASMN".
    pub path: String,
    /// icmp, tcp or udp.
    pub protocol: String,
    /// Packet (or write) size, bytes.
    pub size: usize,
    /// Machine CPU use each second, percent of all CPUs.
    pub samples: Vec<f64>,
    /// Their mean.
    pub mean: f64,
}

/// Fig. 9.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Flood {
    /// (seconds since the flood started, Mbit/s) per ~100 ms window.
    pub rate: Vec<(f64, f64)>,
    /// When the command returned, s after the flood started.
    pub rule_at_s: f64,
    /// When the rate first fell to the ceiling, s after the flood started.
    pub fell_at_s: Option<f64>,
    /// Mean rate before the rule (after the first second).
    pub before_mbps: f64,
    /// Highest 100 ms rate from 100 ms after the command.
    pub max_after_mbps: f64,
    /// Mean rate from 1 s after the command.
    pub after_mbps: f64,
}

/// Latencies beyond the paper.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    /// Per trial: ms from the start of `asmnctl catalog apply` until the gateway passed
    /// (opening trials) or stopped (closing trials) the probe flow.
    pub catalog_open_ms: Vec<f64>,
    /// Closing trials.
    pub catalog_close_ms: Vec<f64>,
    /// How long `asmnctl catalog apply` itself took, ms, per trial.
    pub asmnctl_ms: Vec<f64>,
    /// ms from `asmnctl revoke` until the gateway removed the tunnel.
    pub revocation_ms: Option<f64>,
    /// (VNF, ms from agent start to enrolled).
    pub enrollment_ms: Vec<(String, f64)>,
}

/// Everything the report says.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// Scaled down.
    pub quick: bool,
    /// Tables 1 and 2.
    pub hashing: Vec<HashRow>,
    /// Fig. 5 and the throughput table (ping + iperf3 where installed).
    pub paths: Vec<PathResult>,
    /// The same with the lab's own generators (the cross-check), where the tools exist.
    pub paths_lab: Vec<PathResult>,
    /// Figs. 6 to 8.
    pub cpu: Vec<CpuRun>,
    /// Fig. 9.
    pub flood: Flood,
    /// Beyond the paper.
    pub latency: Latency,
    /// How long the evaluation took, s.
    pub seconds: f64,
}

/// Progress: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: indicatif::ProgressBar,
    start: Instant,
}

impl Progress {
    fn new(steps: u64) -> Progress {
        let bar = indicatif::ProgressBar::new(steps);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
        ) {
            bar.set_style(style);
        }
        Progress {
            bar,
            start: Instant::now(),
        }
    }

    fn say(&self, text: &str) {
        if self.bar.is_hidden() {
            eprintln!("[{:>6.1}s] {text}", self.start.elapsed().as_secs_f64());
        } else {
            self.bar.set_message(text.to_string());
        }
    }

    fn done(&self, text: &str) {
        self.bar.inc(1);
        if self.bar.is_hidden() {
            eprintln!(
                "[{:>6.1}s] done: {text}",
                self.start.elapsed().as_secs_f64()
            );
        } else {
            self.bar.println(format!("done: {text}"));
        }
    }
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let text = |p: &str, a: &[&str]| {
        std::process::Command::new(p)
            .args(a)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        memory_gib: kib / 1024.0 / 1024.0,
        kernel: text("uname", &["-r"]),
        date: text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    }
}

/// Runs the evaluation and writes the report under `o.out`.
pub fn run(o: &Options, me: &Path) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&o.out).with_context(|| format!("{}", o.out.display()))?;
    let work = tempfile::tempdir()?;
    let p = Progress::new(5);
    let started = Instant::now();
    let machine = machine();

    p.say("Tables 1 and 2: making the six images");
    let hashing = hashing(o, &o.out, &p)?;
    p.done("Tables 1 and 2 (image measurement)");

    p.say("Fig. 5: RTT and throughput over veth, ASMN, boringtun-cli, the gateway");
    let tools = bench::have_tools();
    let run = Run {
        me,
        seconds: if o.quick { 2 } else { 10 },
        work: work.path(),
        tools,
    };
    let all = Paths {
        direct: true,
        boringtun: true,
        gateway: true,
        // The busy-polling agent and the null tunnels (the floor) in the full run only.
        busy: !o.quick,
        floor: !o.quick,
    };
    let paths = bench::paths(run, all)?;
    let paths_lab = if tools {
        p.say("Fig. 5 cross-check with the lab's own generators");
        bench::paths(
            Run {
                tools: false,
                ..run
            },
            Paths {
                boringtun: false,
                busy: false,
                floor: false,
                ..all
            },
        )?
    } else {
        Vec::new()
    };
    p.done("Fig. 5 (RTT) and throughput");

    p.say("Figs. 6-8: CPU use under ICMP, TCP and UDP traffic");
    let cpu = cpu(o, me, work.path(), &p)?;
    p.done("Figs. 6-8 (CPU use)");

    p.say("Fig. 9 and latencies: a tenant with Sec-EM, a gateway, a client and a server");
    let (flood, latency) = tenant_figures(o, me, &p)?;
    p.done("Fig. 9 (SYN flood) and latencies");

    let report = Report {
        machine,
        quick: o.quick,
        hashing,
        paths,
        paths_lab,
        cpu,
        flood,
        latency,
        seconds: started.elapsed().as_secs_f64(),
    };
    p.say("writing the report");
    write(o, &report)?;
    p.done(&format!("report in {}", o.out.display()));
    p.bar.finish_and_clear();
    Ok(report)
}

fn hashing(o: &Options, out: &Path, p: &Progress) -> anyhow::Result<Vec<HashRow>> {
    use asmn_shared::measure::{Algorithm, MeasureOptions, measure_path};
    let scale = if o.quick { 1.0 / 200.0 } else { 1.0 };
    let dir = tempfile::tempdir_in(out)?;
    let mut reports = Vec::new();
    let mut digests = Vec::new();
    let algs = [
        Algorithm::Crc32,
        Algorithm::Md5,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];
    for (i, gb) in PAPER_SIZES_GB.iter().enumerate() {
        let path = dir.path().join(format!("vnf{}.img", i + 1));
        let size = (gb * 1e9 * scale) as u64;
        p.say(&format!(
            "making VNF{} ({:.2} GB)",
            i + 1,
            size as f64 / 1e9
        ));
        asmn_images::testimage::make_test_image(&path, size, i as u64 + 1, true, 2, &mut |_| {})
            .with_context(|| format!("making {}", path.display()))?;
        p.say(&format!(
            "measuring VNF{} with ASMN and the baselines",
            i + 1
        ));
        let r = asmn_images::bench::run(&path, 1, &mut |_| {})
            .with_context(|| format!("measuring {}", path.display()))?;
        let m = measure_path(&path, &algs, MeasureOptions::default(), &mut |_| {})?;
        digests.push(m);
        reports.push(r);
        std::fs::remove_file(&path)?;
    }
    let mut rows = Vec::new();
    for k in 0..3 {
        let (a, b) = (&reports[2 * k], &reports[2 * k + 1]);
        for (col, alg) in algs.iter().enumerate() {
            let (Some(ra), Some(rb)) = (
                a.rows.iter().find(|r| r.what == alg.name()),
                b.rows.iter().find(|r| r.what == alg.name()),
            ) else {
                continue;
            };
            let baselines = ra
                .baselines
                .iter()
                .zip(&rb.baselines)
                .map(|(x, y)| {
                    (
                        x.label.clone(),
                        x.seconds.zip(y.seconds).map(|(s, t)| s + t),
                    )
                })
                .collect();
            let differ = digests[2 * k].digests.get(alg) != digests[2 * k + 1].digests.get(alg);
            rows.push(HashRow {
                pair: format!("VNF{} vs VNF{}", 2 * k + 1, 2 * k + 2),
                bytes: a.bytes + b.bytes,
                algorithm: alg.name().to_string(),
                ours_s: ra.ours + rb.ours,
                baselines,
                differ,
                paper_s: PAPER_TABLE2[k].get(col).copied(),
            });
        }
    }
    Ok(rows)
}

/// Machine-wide CPU time counters from /proc/stat: (busy, total) jiffies.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle.min(total), total)
}

/// Samples machine CPU use once a second for `secs` seconds.
fn sample_cpu(secs: u64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut prev = cpu_jiffies();
    for _ in 0..secs {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_jiffies();
        let (busy, total) = (now.0 - prev.0, now.1 - prev.1);
        out.push(if total > 0 {
            100.0 * busy as f64 / total as f64
        } else {
            0.0
        });
        prev = now;
    }
    out
}

fn spawn_gen(ns: &Netns, me: &Path, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    bench::spawn_generator(ns, me, args, log).map_err(anyhow::Error::msg)
}

fn cpu(o: &Options, me: &Path, work: &Path, p: &Progress) -> anyhow::Result<Vec<CpuRun>> {
    let secs = if o.quick { 3 } else { 25 };
    let mut pair = DirectPair::new(work)?;
    pair.start_agents(false)?;
    let sink_secs = (secs * 13 + 30).to_string();
    let _tcp_sink = spawn_gen(
        &pair.b,
        me,
        &["tcp-sink", "--port", "7101", "--seconds", &sink_secs],
        &work.join("cpu-tcp-sink.log"),
    )?;
    let _udp_sink = spawn_gen(
        &pair.b,
        me,
        &["udp-sink", "--port", "7102", "--seconds", &sink_secs],
        &work.join("cpu-udp-sink.log"),
    )?;
    // Both ends up (the tunnel's handshake done) before anything is timed.
    for to in [VETH_B, TUNNEL_B] {
        let _ = bench::generate(
            &pair.a,
            me,
            &["ping", to, "--count", "3", "--interval-ms", "100"],
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut runs = Vec::new();
    let s = secs.to_string();
    for protocol in ["icmp", "tcp", "udp"] {
        for size in [64usize, 4096] {
            for (path, to) in [("plain veth", VETH_B), ("ASMN", TUNNEL_B)] {
                p.say(&format!("CPU: {protocol} {size} B over {path}, {secs} s"));
                let size_s = size.to_string();
                // A steady load, as in a running NFV service: 100 echoes a second, or
                // 10 Mbit/s.
                let args: Vec<String> = match protocol {
                    "icmp" => vec![
                        "ping".into(),
                        to.into(),
                        "--count".into(),
                        (secs * 100).to_string(),
                        "--size".into(),
                        size.saturating_sub(8).to_string(),
                        "--interval-ms".into(),
                        "10".into(),
                    ],
                    "tcp" => vec![
                        "tcp".into(),
                        format!("{to}:7101"),
                        "--seconds".into(),
                        s.clone(),
                        "--size".into(),
                        size_s.clone(),
                        "--mbps".into(),
                        "10".into(),
                    ],
                    _ => vec![
                        "udp".into(),
                        format!("{to}:7102"),
                        "--seconds".into(),
                        s.clone(),
                        "--size".into(),
                        size_s.clone(),
                        "--mbps".into(),
                        "10".into(),
                    ],
                };
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut g = spawn_gen(
                    &pair.a,
                    me,
                    &args,
                    &work.join(format!("cpu-{protocol}-{size}.log")),
                )?;
                let samples = sample_cpu(secs);
                g.wait_exit(Duration::from_secs(secs + 10));
                let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
                runs.push(CpuRun {
                    path: path.into(),
                    protocol: protocol.into(),
                    size,
                    samples,
                    mean,
                });
            }
        }
    }
    Ok(runs)
}

/// The tenant's server: reachable through the gateway; `web` takes the flood, `probe`
/// is opened and closed by the latency trials.
const EVAL_SERVER_VNFD: &str = "vnfd:
  id: server
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
";

/// The server's catalog with the Fig. 9 rule (10 Mbit/s on `web`), and optionally the
/// probe rule.
fn shaped(version_note: &str, probe: bool) -> String {
    let mut c = format!(
        "# {version_note}
vnf: server
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
      ingress_policing_burst: 30
"
    );
    if probe {
        c.push_str(
            "    - name: probe
      protocol: udp
      port: 9000
      sources: [client]
      ingress_policing_rate: 0
",
        );
    }
    c
}

fn epoch_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// The (time in ns, received bytes) samples of the `rx-rate` generator.
fn samples_of(log: &str) -> anyhow::Result<Vec<(u128, u64)>> {
    Ok(serde_json::from_value(
        bench::last_json(log).map_err(anyhow::Error::msg)?,
    )?)
}

fn tenant_figures(o: &Options, me: &Path, p: &Progress) -> anyhow::Result<(Flood, Latency)> {
    let mut lat = Latency::default();
    let mut t = Tenant::new().map_err(anyhow::Error::msg)?;
    let imgs: Vec<PathBuf> = (1..=3)
        .map(|i| t.file(&format!("{i}.img"), &image(i, 4 << 20)))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    for (img, vnfd) in [
        (&imgs[0], CLIENT_VNFD),
        (&imgs[1], EVAL_SERVER_VNFD),
        (&imgs[2], GATEWAY_VNFD),
    ] {
        t.onboard(img, vnfd).map_err(anyhow::Error::msg)?;
    }
    let g = t
        .add("gw-0", "gw", "gateway", &imgs[2])
        .map_err(anyhow::Error::msg)?;
    let c = t
        .add("client-0", "client", "vnf", &imgs[0])
        .map_err(anyhow::Error::msg)?;
    let s = t
        .add("server-0", "server", "vnf", &imgs[1])
        .map_err(anyhow::Error::msg)?;
    for (i, name) in [(g, "gw"), (c, "client"), (s, "server")] {
        let t0 = Instant::now();
        t.start(i).map_err(anyhow::Error::msg)?;
        t.wait_enrolled(i, Duration::from_secs(30))
            .map_err(anyhow::Error::msg)?;
        lat.enrollment_ms
            .push((name.into(), t0.elapsed().as_secs_f64() * 1e3));
    }
    let server = t.vnfs[s].overlay.to_string();
    let up = (0..10).any(|_| {
        bench::generate(&t.vnfs[c].ns, me, &["ping", &server, "--count", "1"])
            .is_ok_and(|r| r["received"] == 1)
    });
    anyhow::ensure!(
        up,
        "no path from the client to the server through the gateway"
    );
    let dir = t.dir.path().to_path_buf();

    // Fig. 9.
    let total = if o.quick { RULE_AT_S + 6 } else { 60 };
    p.say(&format!(
        "Fig. 9: SYN flood for {total} s, the 10 Mbit/s rule at {RULE_AT_S} s"
    ));
    let mut sampler = spawn_gen(
        &t.vnfs[s].ns,
        me,
        &["rx-rate", "--seconds", &(total + 1).to_string()],
        &dir.join("rx.log"),
    )?;
    let flood_start = epoch_ns();
    // The attacker at the lowest priority: on this one machine it shares the cores with
    // the agents it floods, which an attacker elsewhere would not.
    let mut flood = t.vnfs[c]
        .ns
        .spawn(
            Path::new("/usr/bin/nice"),
            &[
                "-n",
                "19",
                me.to_str().unwrap_or_default(),
                "gen",
                "syn-flood",
                &server,
                "--port",
                "8080",
                "--seconds",
                &total.to_string(),
            ],
            &dir.join("flood.log"),
        )
        .map_err(anyhow::Error::msg)?;
    std::thread::sleep(Duration::from_secs(RULE_AT_S));
    let rule = t
        .file("shaped.yaml", shaped("Fig. 9", false).as_bytes())
        .map_err(anyhow::Error::msg)?;
    t.asmnctl(&["catalog", "apply", rule.to_str().unwrap_or_default()])
        .map_err(anyhow::Error::msg)?;
    let applied = epoch_ns();
    flood.wait_exit(Duration::from_secs(total + 10));
    sampler.wait_exit(Duration::from_secs(total + 10));
    let samples = samples_of(&sampler.log())?;
    let flood_end = flood_start + u128::from(total) * 1_000_000_000;
    let flood_fig = flood_figure(&samples, (flood_start, flood_end), applied);

    // Catalog apply to enforcement, seen on the data plane: a 64-byte UDP probe at
    // 2,000 datagrams a second, its rule added and removed in turn; the server's TUN
    // counter sampled every 5 ms.
    let trials = if o.quick { 4 } else { 20 };
    p.say(&format!("catalog apply to enforcement: {trials} trials"));
    let span = trials * 2 + 4;
    let mut probe_rx = spawn_gen(
        &t.vnfs[s].ns,
        me,
        &[
            "rx-rate",
            "--interval-ms",
            "5",
            "--seconds",
            &span.to_string(),
        ],
        &dir.join("probe-rx.log"),
    )?;
    let mut probe = spawn_gen(
        &t.vnfs[c].ns,
        me,
        &[
            "udp",
            &format!("{server}:9000"),
            "--mbps",
            "1",
            "--size",
            "64",
            "--seconds",
            &(span - 1).to_string(),
        ],
        &dir.join("probe.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let mut marks = Vec::new();
    for k in 0..trials * 2 {
        let open = k % 2 == 0;
        let file = t
            .file(
                &format!("trial-{k}.yaml"),
                shaped(&format!("trial {k}"), open).as_bytes(),
            )
            .map_err(anyhow::Error::msg)?;
        let t0 = epoch_ns();
        t.asmnctl(&["catalog", "apply", file.to_str().unwrap_or_default()])
            .map_err(anyhow::Error::msg)?;
        lat.asmnctl_ms.push((epoch_ns() - t0) as f64 / 1e6);
        marks.push((t0, open));
        std::thread::sleep(Duration::from_millis(900));
    }
    probe.wait_exit(Duration::from_secs(span + 5));
    probe_rx.wait_exit(Duration::from_secs(span + 5));
    let rx = samples_of(&probe_rx.log())?;
    for (i, (t0, open)) in marks.iter().enumerate() {
        let until = marks.get(i + 1).map_or(u128::MAX, |m| m.0);
        let window: Vec<&[(u128, u64)]> = rx
            .windows(2)
            .filter(|w| w[0].0 >= *t0 && w[1].0 < until)
            .collect();
        let moved = |w: &&[(u128, u64)]| w[1].1 > w[0].1;
        let at = if *open {
            window.iter().find(|w| moved(w)).map(|w| w[1].0)
        } else {
            window.iter().rev().find(|w| moved(w)).map(|w| w[1].0)
        };
        let ms = at.map_or(f64::NAN, |a| a.saturating_sub(*t0) as f64 / 1e6);
        if *open {
            lat.catalog_open_ms.push(ms);
        } else {
            lat.catalog_close_ms.push(ms);
        }
    }

    // Revocation to cut-off.
    p.say("revocation to cut-off");
    let id = t.vnfs[c].id.clone();
    let revoked = Instant::now();
    t.asmnctl(&["revoke", &id, "--reason", "eval"])
        .map_err(anyhow::Error::msg)?;
    let gw_agent = t.vnfs[g].agent.as_ref().context("gateway agent")?;
    while revoked.elapsed() < Duration::from_secs(5) {
        if gw_agent.log().contains("peer revoked") {
            lat.revocation_ms = Some(revoked.elapsed().as_secs_f64() * 1e3);
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((flood_fig, lat))
}

/// Rates in ~100 ms windows, and what the rule did to them.
fn flood_figure(samples: &[(u128, u64)], (start, end): (u128, u128), applied: u128) -> Flood {
    let secs = |t: u128| t.saturating_sub(start) as f64 / 1e9;
    let windows: Vec<(u128, u128, f64)> = samples
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| {
            let dt = (w[1].0 - w[0].0) as f64 / 1e9;
            (
                w[0].0,
                w[1].0,
                w[1].1.saturating_sub(w[0].1) as f64 * 8.0 / dt / 1e6,
            )
        })
        .collect();
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Flood {
        rate: windows.iter().map(|(a, _, r)| (secs(*a), *r)).collect(),
        rule_at_s: secs(applied),
        fell_at_s: windows
            .iter()
            .find(|(a, _, r)| *a >= applied && *r <= CEILING_MBPS)
            .map(|(a, _, _)| secs(*a)),
        before_mbps: mean(
            windows
                .iter()
                .filter(|(a, b, _)| *a > start + 1_000_000_000 && *b < applied)
                .map(|x| x.2)
                .collect(),
        ),
        max_after_mbps: windows
            .iter()
            .filter(|(a, _, _)| *a >= applied + 100_000_000 && *a < end)
            .map(|x| x.2)
            .fold(0.0, f64::max),
        after_mbps: mean(
            windows
                .iter()
                .filter(|(a, b, _)| *a >= applied + 1_000_000_000 && *b <= end)
                .map(|x| x.2)
                .collect(),
        ),
    }
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
    (q(0.5), q(0.9), s[s.len() - 1])
}

fn csv(path: &Path, header: &str, rows: impl IntoIterator<Item = String>) -> anyhow::Result<()> {
    let mut text = format!("{header}\n");
    for r in rows {
        text.push_str(&r);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("{}", path.display()))
}

fn opt(v: Option<f64>) -> String {
    v.map_or(String::new(), |x| format!("{x:.3}"))
}

/// Writes report.md, the CSV files and the charts.
pub fn write(o: &Options, r: &Report) -> anyhow::Result<()> {
    let out = &o.out;
    let chart = |e: String| anyhow::anyhow!("chart: {e}");
    csv(
        &out.join("table2_hashing.csv"),
        "pair,bytes,algorithm,asmn_s,baseline,baseline_s,paper_s",
        r.hashing.iter().flat_map(|h| {
            h.baselines.iter().map(move |(b, s)| {
                format!(
                    "{},{},{},{:.3},{b},{},{}",
                    h.pair,
                    h.bytes,
                    h.algorithm,
                    h.ours_s,
                    opt(*s),
                    opt(h.paper_s)
                )
            })
        }),
    )?;
    let path_rows = |tool: &'static str, v: &[PathResult]| -> Vec<String> {
        v.iter()
            .map(|p| {
                format!(
                    "{tool},{},{:.1},{:.1},{:.1},{:.1},{:.3},{}",
                    p.path,
                    p.rtt64_us,
                    p.rtt4096_us,
                    p.tcp_mbps,
                    p.udp_mbps,
                    p.udp_loss_pct,
                    opt(p.cpu_s_per_gb)
                )
            })
            .collect()
    };
    let mut rows = path_rows("tools", &r.paths);
    rows.extend(path_rows("lab", &r.paths_lab));
    csv(
        &out.join("fig5_paths.csv"),
        "measured_with,path,rtt64_us,rtt4096_us,tcp_mbps,udp_mbps,udp_loss_pct,cpu_s_per_gb",
        rows,
    )?;
    csv(
        &out.join("fig6_8_cpu.csv"),
        "protocol,size,path,second,cpu_percent",
        r.cpu.iter().flat_map(|c| {
            c.samples
                .iter()
                .enumerate()
                .map(move |(i, v)| format!("{},{},{},{},{v:.2}", c.protocol, c.size, c.path, i + 1))
        }),
    )?;
    csv(
        &out.join("fig9_flood.csv"),
        "seconds_since_flood_start,mbit_per_s",
        r.flood.rate.iter().map(|(t, v)| format!("{t:.3},{v:.3}")),
    )?;
    let mut lat_rows = Vec::new();
    for (kind, v) in [
        ("catalog_open_ms", &r.latency.catalog_open_ms),
        ("catalog_close_ms", &r.latency.catalog_close_ms),
        ("asmnctl_ms", &r.latency.asmnctl_ms),
    ] {
        lat_rows.extend(
            v.iter()
                .enumerate()
                .map(|(i, x)| format!("{kind},{i},{x:.2}")),
        );
    }
    if let Some(x) = r.latency.revocation_ms {
        lat_rows.push(format!("revocation_ms,0,{x:.2}"));
    }
    for (vnf, x) in &r.latency.enrollment_ms {
        lat_rows.push(format!("enrollment_ms,{vnf},{x:.2}"));
    }
    csv(&out.join("latency.csv"), "measure,trial,value", lat_rows)?;

    // Charts.
    charts::bar_chart(
        &out.join("fig5_rtt"),
        &BarChart {
            title: "Fig. 5: ICMP RTT (median of 50 echoes)".into(),
            y_label: "RTT (us)".into(),
            categories: r.paths.iter().map(|p| short(&p.path)).collect(),
            series: vec![
                (
                    "64 bytes".into(),
                    r.paths.iter().map(|p| p.rtt64_us).collect(),
                ),
                (
                    "4096 bytes".into(),
                    r.paths.iter().map(|p| p.rtt4096_us).collect(),
                ),
            ],
        },
    )
    .map_err(chart)?;
    for (fig, protocol) in [(6, "icmp"), (7, "tcp"), (8, "udp")] {
        let series = r
            .cpu
            .iter()
            .filter(|c| c.protocol == protocol)
            .map(|c| Series {
                name: format!("{}, {} B", c.path, c.size),
                points: c
                    .samples
                    .iter()
                    .enumerate()
                    .map(|(i, v)| ((i + 1) as f64, *v))
                    .collect(),
            })
            .collect();
        charts::line_chart(
            &out.join(format!("fig{fig}_cpu_{protocol}")),
            &LineChart {
                title: format!(
                    "Fig. {fig}: machine CPU use under {} traffic",
                    protocol.to_uppercase()
                ),
                x_label: "seconds".into(),
                y_label: "CPU use (% of all CPUs)".into(),
                series,
                markers: Vec::new(),
            },
        )
        .map_err(chart)?;
    }
    let mut markers = vec![Marker {
        x: r.flood.rule_at_s,
        name: format!(
            "asmnctl catalog apply returned ({:.2} s)",
            r.flood.rule_at_s
        ),
    }];
    if let Some(f) = r.flood.fell_at_s {
        markers.push(Marker {
            x: f,
            name: format!("rate at or below {CEILING_MBPS} Mbit/s ({f:.2} s)"),
        });
    }
    charts::line_chart(
        &out.join("fig9_flood"),
        &LineChart {
            title: "Fig. 9: SYN flood through the gateway, 10 Mbit/s rule at t = 11 s".into(),
            x_label: "seconds since the flood started".into(),
            y_label: "rate at the server's TUN (Mbit/s, 100 ms windows)".into(),
            series: vec![Series {
                name: "flood reaching the server".into(),
                points: r.flood.rate.clone(),
            }],
            markers,
        },
    )
    .map_err(chart)?;
    std::fs::write(out.join("report.md"), markdown(r))?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(r)?)?;
    Ok(())
}

fn short(path: &str) -> String {
    path.replace("boringtun-cli, ", "bt ")
        .replace(" thread(s)", "T")
        .replace("ASMN through the gateway", "ASMN gateway")
}

/// The report's text.
pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let w = &mut m;
    let mc = &r.machine;
    let _ = writeln!(w, "# ASMN evaluation report\n");
    let _ = writeln!(
        w,
        "Produced by `asmn-lab eval{}` on {} ({} CPUs, {:.1} GiB, Linux {}), {}, in {:.0} s. \
         Every comparison below is a ratio between figures measured in this same run.\n",
        if r.quick { " --quick" } else { "" },
        mc.cpu,
        mc.cpus,
        mc.memory_gib,
        mc.kernel,
        mc.date,
        r.seconds
    );
    if r.quick {
        let _ = writeln!(
            w,
            "`--quick`: images at 1/200 of the paper's sizes, 2 s throughput runs, 3 s CPU \
             runs, a 17 s flood, 4 catalog trials. The paper's seconds are for full-size \
             images: compare them with a full run.\n"
        );
    }

    let _ = writeln!(w, "## Tables 1 and 2: measuring the VNF images\n");
    let _ = writeln!(
        w,
        "Six generated images of the paper's Table 1 sizes{}; each pair measured with each \
         algorithm by ASMN (`asmn-shared::measure`) and by the usual tools, on the same files \
         (page cache warm, best of one run each). Baseline: the tools. Ratio: tool time / \
         ASMN time (above 1: ASMN faster).\n",
        if r.quick { " (scaled by 1/200)" } else { "" }
    );
    let _ = writeln!(
        w,
        "| pair | GB | algorithm | ASMN (s) | baselines (s, ratio) | paper (s) | digests differ |"
    );
    let _ = writeln!(w, "|---|---:|---|---:|---|---:|---|");
    for h in &r.hashing {
        let base: Vec<String> = h
            .baselines
            .iter()
            .map(|(b, s)| match s {
                Some(s) => format!("{b}: {s:.3} ({:.2}x)", s / h.ours_s.max(1e-9)),
                None => format!("{b}: not installed"),
            })
            .collect();
        let _ = writeln!(
            w,
            "| {} | {:.2} | {} | {:.3} | {} | {} | {} |",
            h.pair,
            h.bytes as f64 / 1e9,
            h.algorithm,
            h.ours_s,
            base.join("; "),
            h.paper_s.map_or("-".into(), |p| if r.quick {
                format!("{p:.1} (full size)")
            } else {
                format!("{p:.1} ({:.1}x ours)", p / h.ours_s.max(1e-9))
            }),
            if h.differ { "yes" } else { "NO" }
        );
    }

    let _ = writeln!(w, "\n## Fig. 5: ICMP RTT, and throughput\n");
    let _ = writeln!(
        w,
        "Two namespaces joined by a veth pair (the baseline), the same pair with an ASMN \
         direct tunnel and with `boringtun-cli` (where installed), and a tenant where the \
         client reaches the server through the ASMN gateway.\n"
    );
    let _ = writeln!(w, "![Fig. 5](fig5_rtt.png)\n");
    let _ = writeln!(w, "{}", bench::markdown(&r.paths));
    if !r.paths_lab.is_empty() {
        let _ = writeln!(
            w,
            "Cross-check: the same paths measured with the lab's own generators (ICMP echo \
             from a raw socket, a TCP stream, a 500 Mbit/s UDP stream):\n"
        );
        let _ = writeln!(w, "{}", bench::markdown(&r.paths_lab));
    }

    let _ = writeln!(w, "## Figs. 6 to 8: CPU use\n");
    let _ = writeln!(
        w,
        "Machine-wide CPU use (all CPUs, /proc/stat), each second, while the client sends a \
         steady load to the server: 100 ICMP echoes a second, or 10 Mbit/s of TCP or UDP, \
         in 64- and 4096-byte packets (writes, for TCP). Baseline: the same load over plain \
         veth.\n"
    );
    let _ = writeln!(
        w,
        "| protocol | size (B) | plain veth (% CPU) | ASMN (% CPU) | difference (points) |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|");
    for protocol in ["icmp", "tcp", "udp"] {
        for size in [64usize, 4096] {
            let find = |path: &str| {
                r.cpu
                    .iter()
                    .find(|c| c.protocol == protocol && c.size == size && c.path == path)
                    .map(|c| c.mean)
            };
            if let (Some(v), Some(a)) = (find("plain veth"), find("ASMN")) {
                let _ = writeln!(
                    w,
                    "| {protocol} | {size} | {v:.2} | {a:.2} | {:+.2} |",
                    a - v
                );
            }
        }
    }
    let _ = writeln!(
        w,
        "\n![Fig. 6](fig6_cpu_icmp.png)\n![Fig. 7](fig7_cpu_tcp.png)\n![Fig. 8](fig8_cpu_udp.png)\n"
    );

    let f = &r.flood;
    let _ = writeln!(w, "## Fig. 9: SYN flood through the gateway\n");
    let _ = writeln!(
        w,
        "The client floods the server (TCP SYNs with 1,200 bytes of payload, from the lab's \
         raw-socket generator, at the lowest CPU priority: here it shares two cores with the \
         agents) through the gateway; at t = {RULE_AT_S} s `asmnctl catalog \
         apply` sets the server's `web` rule to {LIMIT_MBPS} Mbit/s. The rate is what the \
         server's TUN device received, in 100 ms windows.\n"
    );
    let _ = writeln!(w, "![Fig. 9](fig9_flood.png)\n");
    let _ = writeln!(
        w,
        "| before the rule (mean) | command returned at | rate at or below {CEILING_MBPS} from | highest 100 ms window from 100 ms after | mean from 1 s after |"
    );
    let _ = writeln!(w, "|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        w,
        "| {:.1} Mbit/s | {:.2} s | {} | {:.2} Mbit/s | {:.2} Mbit/s |\n",
        f.before_mbps,
        f.rule_at_s,
        f.fell_at_s.map_or("never".into(), |x| format!(
            "{x:.2} s ({:+.0} ms)",
            (x - f.rule_at_s) * 1e3
        )),
        f.max_after_mbps,
        f.after_mbps
    );

    let l = &r.latency;
    let _ = writeln!(w, "## Beyond the paper: control-plane latencies\n");
    let (o50, o90, omax) = stats(&l.catalog_open_ms);
    let (c50, c90, cmax) = stats(&l.catalog_close_ms);
    let (a50, _, _) = stats(&l.asmnctl_ms);
    let _ = writeln!(
        w,
        "Catalog apply to enforcement at the gateway, seen on the data plane: a 64-byte UDP \
         probe (2,000 datagrams a second) whose rule is added and removed in turn, timed from \
         the start of `asmnctl catalog apply` to the first (or last) probe datagram reaching \
         the server's TUN device (sampled every 5 ms). `asmnctl` itself took {a50:.0} ms \
         (median; it opens a QUIC connection).\n"
    );
    let _ = writeln!(w, "| measure | trials | median | p90 | max |");
    let _ = writeln!(w, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        w,
        "| rule added: probe passes | {} | {o50:.0} ms | {o90:.0} ms | {omax:.0} ms |",
        l.catalog_open_ms.len()
    );
    let _ = writeln!(
        w,
        "| rule removed: probe stops | {} | {c50:.0} ms | {c90:.0} ms | {cmax:.0} ms |",
        l.catalog_close_ms.len()
    );
    let _ = writeln!(
        w,
        "| revocation to the gateway's tunnel removed | 1 | {} | | |",
        l.revocation_ms
            .map_or("never".into(), |x| format!("{x:.0} ms"))
    );
    for (vnf, x) in &l.enrollment_ms {
        let _ = writeln!(
            w,
            "| enrollment of {vnf} (agent start to enrolled: measure, QUIC, reveal) | 1 | {x:.0} ms | | |"
        );
    }
    let _ = writeln!(w, "\n## Files\n");
    let _ = writeln!(
        w,
        "`table2_hashing.csv`, `fig5_paths.csv`, `fig6_8_cpu.csv`, `fig9_flood.csv`, \
         `latency.csv` (raw data); `fig5_rtt`, `fig6_cpu_icmp`, `fig7_cpu_tcp`, \
         `fig8_cpu_udp`, `fig9_flood` (`.png` and `.svg`); `report.json` (everything above)."
    );
    m
}
