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
//!
//! One module per part: [`hashing`] (Tables 1 and 2), [`cpu`] (Figs. 6 to 8),
//! [`flood`] (Fig. 9 on the [`crate::scenarios::flood`] scenario, and the latencies
//! beyond the paper), [`report`] (Markdown, CSV and charts); Fig. 5 is
//! [`crate::bench::paths`].

mod cpu;
mod flood;
mod hashing;
mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use anyhow::Context as _;

use crate::bench::{self, PathResult, Paths, Run};
use asmn_testkit::netns::{Netns, Proc};

pub use cpu::CpuRun;
pub use flood::{Flood, Latency};
pub use hashing::HashRow;
pub use report::{markdown, write};

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
pub(super) struct Progress {
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

pub(super) fn machine() -> Machine {
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
    let hashing = hashing::hashing(o, &o.out, &p)?;
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
        // The busy-polling agent, the UDP-heavy TUN queue and the null tunnels (the floor,
        // directly and through a null relay) in the full run only.
        busy: !o.quick,
        floor: !o.quick,
        queue: !o.quick,
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
                queue: false,
                ..all
            },
        )?
    } else {
        Vec::new()
    };
    p.done("Fig. 5 (RTT) and throughput");

    p.say("Figs. 6-8: CPU use under ICMP, TCP and UDP traffic");
    let cpu = cpu::cpu(o, me, work.path(), &p)?;
    p.done("Figs. 6-8 (CPU use)");

    p.say("Fig. 9 and latencies: a tenant with Sec-EM, a gateway, a client and a server");
    let (flood, latency) = flood::tenant_figures(o, me, &p)?;
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

pub(super) fn spawn_gen(ns: &Netns, me: &Path, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
    bench::spawn_generator(ns, me, args, log).map_err(anyhow::Error::msg)
}

pub(super) fn epoch_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
