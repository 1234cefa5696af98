//! Figs. 6 to 8: machine CPU use, second by second, under ICMP, TCP and UDP traffic over
//! plain veth and over ASMN.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::{Options, Progress, spawn_gen};
use crate::bench::{self, DirectPair, TUNNEL_B, VETH_B};

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
