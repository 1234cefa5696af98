//! Figs. 6 to 8: machine CPU use, second by second, under ICMP, TCP and UDP traffic over
//! plain veth, over ASMN, over boringtun-cli (where installed) and over the null tunnel
//! (no cryptography: the floor of a userspace tunnel that wakes for its packets), with the
//! CPU time of the tunnel processes themselves.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::{Options, Progress, spawn_gen};
use crate::bench::{self, BORINGTUN_B, DirectPair, NULL_B, Run, TUNNEL_B, VETH_B};

/// CPU use under one kind of traffic.
#[derive(Debug, Clone, Serialize)]
pub struct CpuRun {
    /// "plain veth", "ASMN", "boringtun-cli" or [`NULL_TUNNEL`].
    pub path: String,
    /// icmp, tcp or udp.
    pub protocol: String,
    /// Packet (or write) size, bytes.
    pub size: usize,
    /// Machine CPU use each second, percent of all CPUs.
    pub samples: Vec<f64>,
    /// Their mean.
    pub mean: f64,
    /// CPU time of the tunnel's processes (both ends, all threads), milliseconds per
    /// second; none for plain veth.
    pub tunnel_ms_per_s: Option<f64>,
    /// The load delivered, Mbit/s, as the TCP sender or the UDP sink saw it (ICMP: echoes
    /// answered per second).
    pub delivered: f64,
}

/// The floor's path name: the lab's null tunnel, blocking.
pub const NULL_TUNNEL: &str = "null tunnel";

/// Machine-wide CPU time counters from /proc/stat: (busy, total) jiffies.
pub(super) fn cpu_jiffies() -> (u64, u64) {
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
pub(super) fn sample_cpu(secs: u64) -> Vec<f64> {
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

pub(super) fn cpu(
    o: &Options,
    me: &Path,
    work: &Path,
    p: &Progress,
) -> anyhow::Result<Vec<CpuRun>> {
    let secs = if o.quick { 3 } else { 25 };
    let mut pair = DirectPair::new(work)?;
    let agents = pair.start_agents(false)?.to_vec();
    let boringtun = if bench::tool("boringtun-cli").is_some() {
        Some(pair.start_boringtun(1)?)
    } else {
        p.say("boringtun-cli is not installed: its CPU rows are skipped");
        None
    };
    let mut paths = vec![
        ("plain veth", VETH_B, Vec::new()),
        ("ASMN", TUNNEL_B, agents),
    ];
    if let Some(bt) = &boringtun {
        paths.push(("boringtun-cli", BORINGTUN_B, bt.pids()));
    }
    let run = Run {
        me,
        seconds: secs,
        work,
        tools: false,
    };
    let null = bench::null_tunnels(run, &pair, crate::generators::NullWait::Blocking)?;
    paths.push((NULL_TUNNEL, NULL_B, null.iter().map(|p| p.pid()).collect()));
    let sink_secs = (secs * 19 + 60).to_string();
    let _tcp_sink = spawn_gen(
        &pair.b,
        me,
        &["tcp-sink", "--port", "7101", "--seconds", &sink_secs],
        &work.join("cpu-tcp-sink.log"),
    )?;
    let mut runs = Vec::new();
    let s = secs.to_string();
    for protocol in ["icmp", "tcp", "udp"] {
        for size in [64usize, 4096] {
            for (path, to, pids) in &paths {
                p.say(&format!("CPU: {protocol} {size} B over {path}, {secs} s"));
                // The tunnel up (its handshake done, again after two idle minutes) before
                // anything is timed.
                let _ = bench::generate(
                    &pair.a,
                    me,
                    &["ping", to, "--count", "3", "--interval-ms", "100"],
                );
                std::thread::sleep(Duration::from_millis(200));
                let size_s = size.to_string();
                // A steady load, as in a running NFV service: 100 echoes a second, or
                // 10 Mbit/s.
                let args: Vec<String> = match protocol {
                    "icmp" => vec![
                        "ping".into(),
                        to.to_string(),
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
                // A UDP sink per run: it ends a second after its stream does (one for
                // all runs would leave every run after the first without a receiver).
                let udp_sink = if protocol == "udp" {
                    let sink_path = path.replace(' ', "-");
                    let sink = spawn_gen(
                        &pair.b,
                        me,
                        &[
                            "udp-sink",
                            "--port",
                            "7102",
                            "--seconds",
                            &(secs + 10).to_string(),
                        ],
                        &work.join(format!("cpu-udp-sink-{size}-{sink_path}.log")),
                    )?;
                    // Bound before the first datagram comes.
                    std::thread::sleep(Duration::from_millis(300));
                    Some(sink)
                } else {
                    None
                };
                let mut g = spawn_gen(
                    &pair.a,
                    me,
                    &args,
                    &work.join(format!("cpu-{protocol}-{size}.log")),
                )?;
                let cpu0: f64 = bench::cpu_seconds_of(pids);
                let samples = sample_cpu(secs);
                let cpu1: f64 = bench::cpu_seconds_of(pids);
                g.wait_exit(Duration::from_secs(secs + 10));
                let out = bench::last_json(&g.log()).unwrap_or_default();
                let delivered = match (protocol, udp_sink) {
                    ("icmp", _) => {
                        out["rtt_us"].as_array().map_or(0, Vec::len) as f64 / secs as f64
                    }
                    // UDP: what the sink received (the sender's figure counts datagrams
                    // that found no receiver).
                    (_, Some(mut sink)) => {
                        sink.wait_exit(Duration::from_secs(5));
                        let got = bench::last_json(&sink.log()).unwrap_or_default();
                        got["mbit_per_s"].as_f64().unwrap_or(0.0)
                    }
                    _ => out["mbit_per_s"].as_f64().unwrap_or(0.0),
                };
                let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
                runs.push(CpuRun {
                    path: (*path).into(),
                    protocol: protocol.into(),
                    size,
                    samples,
                    mean,
                    tunnel_ms_per_s: (!pids.is_empty())
                        .then(|| 1000.0 * (cpu1 - cpu0) / secs as f64),
                    delivered,
                });
            }
        }
    }
    drop(boringtun);
    drop(null);
    Ok(runs)
}
