//! The report: `report.md`, CSV files, PNG and SVG charts, `report.json`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

use super::cpu::{self, CpuRun};
use super::{CEILING_MBPS, LIMIT_MBPS, Options, RULE_AT_S, Report};
use crate::bench::{self, PathResult};
use crate::charts::{self, BarChart, LineChart, Marker, Series};

pub(super) fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let q = |f: f64| s[((s.len() - 1) as f64 * f).round() as usize];
    (q(0.5), q(0.9), s[s.len() - 1])
}

pub(super) fn csv(
    path: &Path,
    header: &str,
    rows: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let mut text = format!("{header}\n");
    for r in rows {
        text.push_str(&r);
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("{}", path.display()))
}

pub(super) fn opt(v: Option<f64>) -> String {
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
        "protocol,size,path,second,cpu_percent,tunnel_ms_per_s",
        r.cpu.iter().flat_map(|c| {
            c.samples.iter().enumerate().map(move |(i, v)| {
                format!(
                    "{},{},{},{},{v:.2},{}",
                    c.protocol,
                    c.size,
                    c.path,
                    i + 1,
                    opt(c.tunnel_ms_per_s)
                )
            })
        }),
    )?;
    csv(
        &out.join("fig9_flood.csv"),
        "seconds_since_flood_start,mbit_per_s",
        r.flood.rate.iter().map(|(t, v)| format!("{t:.3},{v:.3}")),
    )?;
    csv(
        &out.join("fig9_threads.csv"),
        "seconds_since_flood_start,interval_ms,gateway_ran_ms,gateway_waited_ms,\
         victim_ran_ms,victim_waited_ms,attacker_ran_ms,attacker_waited_ms,\
         generator_ran_ms,generator_waited_ms",
        r.flood.threads.iter().map(|t| {
            let mut row = format!("{:.3},{:.1}", t.from_s, t.length_ms);
            for cpu in t.cpu_ms {
                match cpu {
                    Some((ran, waited)) => row.push_str(&format!(",{ran:.1},{waited:.1}")),
                    None => row.push_str(",,"),
                }
            }
            row
        }),
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

pub(super) fn short(path: &str) -> String {
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
         veth. The tunnel's own CPU time (both ends, all threads, from the scheduler's \
         nanosecond counts) is beside it, less noisy than the machine-wide share. The ratios \
         are ASMN's added CPU over boringtun-cli's (one thread), by both measures, and the same \
         for the null tunnel (the lab's, without cryptography, one packet per system call, \
         sleeping between packets): the floor of a userspace tunnel that wakes for its \
         packets on this machine.\n"
    );
    let _ = writeln!(
        w,
        "| protocol | size (B) | plain veth (% CPU) | ASMN (% CPU, points over veth) | boringtun-cli (% CPU, points over veth) | null tunnel (% CPU, points over veth) | added CPU / boringtun-cli's: ASMN, null tunnel | tunnel processes (ms/s): ASMN, boringtun-cli, null tunnel | their ratio to boringtun-cli: ASMN, null tunnel |"
    );
    let _ = writeln!(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let ratio = |x: f64, y: Option<f64>| match y {
        Some(y) if y > 0.0 => format!("{:.2}x", x / y),
        _ => "-".into(),
    };
    for protocol in ["icmp", "tcp", "udp"] {
        for size in [64usize, 4096] {
            let find = |path: &str| {
                r.cpu
                    .iter()
                    .find(|c| c.protocol == protocol && c.size == size && c.path == path)
            };
            let Some((v, a)) = find("plain veth").zip(find("ASMN")) else {
                continue;
            };
            let (bt, null) = (find("boringtun-cli"), find(cpu::NULL_TUNNEL));
            let added = |c: Option<&CpuRun>| c.map(|c| c.mean - v.mean);
            let cell = |c: Option<&CpuRun>| {
                c.map_or("-".to_string(), |c| {
                    format!("{:.2} ({:+.2})", c.mean, c.mean - v.mean)
                })
            };
            let ms = |c: Option<&CpuRun>| c.and_then(|c| c.tunnel_ms_per_s);
            let ms_cell = |c: Option<&CpuRun>| ms(c).map_or("-".to_string(), |m| format!("{m:.0}"));
            let null_added = added(null).map_or("-".to_string(), |n| ratio(n, added(bt)));
            let null_ms = ms(null).map_or("-".to_string(), |n| ratio(n, ms(bt)));
            let _ = writeln!(
                w,
                "| {protocol} | {size} | {:.2} | {} | {} | {} | {}, {null_added} | {}, {}, {} | {}, {null_ms} |",
                v.mean,
                cell(Some(a)),
                cell(bt),
                cell(null),
                ratio(a.mean - v.mean, added(bt)),
                ms_cell(Some(a)),
                ms_cell(bt),
                ms_cell(null),
                ms(Some(a)).map_or("-".to_string(), |m| ratio(m, ms(bt))),
            );
        }
    }
    let short: Vec<String> = r
        .cpu
        .iter()
        .filter(|c| {
            let want = if c.protocol == "icmp" { 100.0 } else { 10.0 };
            c.delivered < 0.9 * want
        })
        .map(|c| {
            format!(
                "{} {} B over {}: {:.1}",
                c.protocol, c.size, c.path, c.delivered
            )
        })
        .collect();
    if !short.is_empty() {
        let _ = writeln!(
            w,
            "\nLoads that fell short of what was asked (echoes a second or Mbit/s): {}.",
            short.join("; ")
        );
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
         `fig9_threads.csv` (the flood's threads, ms ran and waited for a CPU, ~100 ms a row), \
         `latency.csv` (raw data); `fig5_rtt`, `fig6_cpu_icmp`, `fig7_cpu_tcp`, \
         `fig8_cpu_udp`, `fig9_flood` (`.png` and `.svg`); `report.json` (everything above)."
    );
    m
}
