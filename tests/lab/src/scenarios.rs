//! The scenarios the demo narrates, the evaluation measures and the integration tests
//! assert, written once: each drives a [`Tenant`] and returns what it measured; the
//! callers decide what to print, plot or assert.
//!
//! - [`flood`]: the paper's Fig. 9: a SYN flood from one VNF to a protected one through
//!   the gateway, a rate rule applied with `asmnctl` while it runs, the rate reaching the
//!   victim's TUN device in ~100 ms windows;
//! - [`revocation`]: an instance revoked with `asmnctl`, and how soon the gateway cut
//!   its tunnel and the instance's agent stopped;
//! - [`gateway_path`]: ICMP echo through the gateway, until the path is up.
//!
//! Traffic comes from the lab's own generators (`asmn-lab gen ...`), so the scenarios
//! need no tool outside the project.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use asmn_testkit::netns::{self, Proc, schedstat};
use asmn_testkit::tenant::{Tenant, dataplane_task, metrics};
use serde::Serialize;

use crate::bench::{last_json, spawn_generator};

/// Nanoseconds since the epoch (the clock the rate sampler stamps with).
pub fn epoch_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The `asmn-lab` binary, to run generators with: this one when the caller is the lab,
/// else the one built beside the caller.
pub fn lab_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    if me.file_name().is_some_and(|n| n == "asmn-lab") {
        return Ok(me);
    }
    Ok(netns::binary("asmn-lab")?)
}

/// A flood and the rule that shapes it.
#[derive(Debug, Clone)]
pub struct FloodPlan<'a> {
    /// The flooding VNF (an index of the tenant).
    pub attacker: usize,
    /// The protected VNF it floods.
    pub victim: usize,
    /// The gateway in between.
    pub gateway: usize,
    /// The victim's port the SYNs go to.
    pub port: u16,
    /// The victim's catalog with the rate rule, applied while the flood runs.
    pub rule: &'a str,
    /// When the rule is applied, after the flood started.
    pub rule_at: Duration,
    /// How long the flood lasts.
    pub length: Duration,
}

/// A window of the victim's receive rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Window {
    /// Its start, ns since the epoch.
    pub from_ns: u128,
    /// Its end.
    pub to_ns: u128,
    /// Mbit/s received in it.
    pub mbps: f64,
}

/// What the gateway saw after the rule, from its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GatewayRates {
    /// Mbit/s it received from the attacker.
    pub received_mbps: f64,
    /// Mbit/s it forwarded to the victim.
    pub forwarded_mbps: f64,
}

/// What a flood measured.
#[derive(Debug, Clone, Serialize)]
pub struct FloodRun {
    /// When the flood started, ns since the epoch.
    pub start_ns: u128,
    /// When `asmnctl catalog apply` returned.
    pub applied_ns: u128,
    /// When the flood was to end.
    pub end_ns: u128,
    /// The victim's receive rate in ~100 ms windows.
    pub windows: Vec<Window>,
    /// The gateway's view from 1 s after the rule to the end (None: no metrics).
    pub gateway: Option<GatewayRates>,
    /// The gateway agent's resident memory each second of the flood, KiB.
    pub gateway_rss_kib: Vec<u64>,
    /// SYNs the attacker sent.
    pub syns: u64,
    /// The data-plane threads of the gateway, the victim and the attacker, and the SYN
    /// generator, every ~100 ms of the flood (longer across the rule's command): what
    /// explains a window off the rule's rate (a thread kept off the CPU waits runnable;
    /// one with nothing to do neither runs nor waits).
    pub planes: Vec<PlaneSample>,
}

/// The CPU so far of the threads that carry a flood, at one instant of it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlaneSample {
    /// ns since the epoch.
    pub at_ns: u128,
    /// ns each of the gateway's, the victim's and the attacker's data-plane threads and
    /// the SYN generator ran, and waited runnable (None: the thread was not found).
    pub cpu_ns: [Option<(u64, u64)>; 4],
}

impl FloodRun {
    /// Mean of the windows from `from` after the start to the rule.
    pub fn before_mbps(&self, from: Duration) -> f64 {
        let from = self.start_ns + from.as_nanos();
        mean(
            self.windows
                .iter()
                .filter(|w| w.from_ns > from && w.to_ns < self.applied_ns)
                .map(|w| w.mbps),
        )
    }

    /// The windows starting `after` the rule or later, within the flood.
    pub fn after(&self, after: Duration) -> impl Iterator<Item = &Window> {
        let from = self.applied_ns + after.as_nanos();
        self.windows
            .iter()
            .filter(move |w| w.from_ns >= from && w.to_ns <= self.end_ns)
    }

    /// The highest rate of the windows starting `after` the rule or later, a window
    /// shorter than `span` counted together with those after it until they cover `span`:
    /// a sampler that woke late leaves a window of a few ms after a long one (a full eval:
    /// 189 ms at 4.7 Mbit/s, then 11 ms at 12.0), and a few packets in a few ms say
    /// little about a rate.
    pub fn highest_after(&self, after: Duration, span: Duration) -> f64 {
        let span = span.as_nanos();
        let (mut best, mut mbit, mut ns) = (0.0f64, 0.0f64, 0u128);
        for w in self.after(after) {
            let len = w.to_ns - w.from_ns;
            mbit += w.mbps * len as f64 / 1e9;
            ns += len;
            if ns >= span {
                best = best.max(mbit / (ns as f64 / 1e9));
                (mbit, ns) = (0.0, 0);
            }
        }
        best
    }

    /// Averages over 10 consecutive windows (about a second each), from 1 s after the
    /// rule, weighted by the windows' lengths.
    pub fn second_averages(&self) -> Vec<f64> {
        let settled: Vec<&Window> = self.after(Duration::from_secs(1)).collect();
        settled
            .chunks(10)
            .filter(|c| c.len() == 10)
            .map(|c| {
                let bits: f64 = c
                    .iter()
                    .map(|w| w.mbps * (w.to_ns - w.from_ns) as f64 / 1e9)
                    .sum();
                let secs: f64 = c.iter().map(|w| (w.to_ns - w.from_ns) as f64 / 1e9).sum();
                bits / secs
            })
            .collect()
    }

    /// The windows as text, one "s-after-start Mbit/s" line each, for failure messages.
    pub fn report(&self) -> String {
        let mut out = match self.gateway {
            Some(g) => format!(
                "the gateway received {:.1} Mbit/s from the attacker and forwarded {:.2} \
                 Mbit/s to the victim (from 1 s after the rule)\n",
                g.received_mbps, g.forwarded_mbps
            ),
            None => String::new(),
        };
        for w in &self.windows {
            let at = w.from_ns.saturating_sub(self.start_ns) as f64 / 1e9;
            out.push_str(&format!("{at:.2}s {:.2}\n", w.mbps));
        }
        if self.planes.len() > 1 {
            out.push_str(
                "threads, ms ran/waited runnable: the data planes of the gateway, the \
                 victim and the attacker, the SYN generator\n",
            );
        }
        for t in self.thread_intervals() {
            out.push_str(&format!("{:.2}s+{:.0}ms", t.from_s, t.length_ms));
            for cpu in t.cpu_ms {
                match cpu {
                    Some((ran, waited)) => out.push_str(&format!(" {ran:.0}/{waited:.0}")),
                    None => out.push_str(" -"),
                }
            }
            out.push('\n');
        }
        out
    }
}

/// What the threads that carry a flood did between two [`PlaneSample`]s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ThreadInterval {
    /// Its start, s after the flood started.
    pub from_s: f64,
    /// Its length, ms.
    pub length_ms: f64,
    /// ms each ran, and waited runnable for a CPU: the gateway's, the victim's and the
    /// attacker's data planes, the SYN generator (None: not found at either end).
    pub cpu_ms: [Option<(f64, f64)>; 4],
}

impl FloodRun {
    /// The threads' CPU between consecutive samples.
    pub fn thread_intervals(&self) -> Vec<ThreadInterval> {
        let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e6;
        self.planes
            .windows(2)
            .map(|p| ThreadInterval {
                from_s: p[0].at_ns.saturating_sub(self.start_ns) as f64 / 1e9,
                length_ms: p[1].at_ns.saturating_sub(p[0].at_ns) as f64 / 1e6,
                cpu_ms: std::array::from_fn(|k| {
                    let ((ran0, waited0), (ran1, waited1)) = (p[0].cpu_ns[k]?, p[1].cpu_ns[k]?);
                    Some((ms(ran0, ran1), ms(waited0, waited1)))
                }),
            })
            .collect()
    }
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (n, sum) = v.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// Resident memory of `pid`, KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Bytes the gateway agent `g` counted for the peer of VNF `vnf` in `direction` (rx or
/// tx); NaN when its metrics cannot be read.
fn gateway_bytes(t: &Tenant, g: usize, vnf: &str, direction: &str) -> f64 {
    let label = format!("vnf=\"{vnf}\",direction=\"{direction}\"}}");
    metrics(t, g)
        .lines()
        .find(|l| l.starts_with("asmn_agent_peer_bytes_total{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

/// The VNF (not instance) name of tenant member `i`: its instance name without `-N`.
fn vnf_of(t: &Tenant, i: usize) -> String {
    let name = &t.vnfs[i].name;
    name.rsplit_once('-')
        .map_or(name.as_str(), |(v, _)| v)
        .to_string()
}

/// Runs the flood of `plan` on `t`: a sampler of the victim's TUN counter, the SYN flood
/// from the attacker (its generator at the lowest priority: on this one machine it shares
/// the cores with the agents it floods, which an attacker elsewhere would not; its agent,
/// which encrypts the flood, should run real-time under load, [`Tenant::flooder`], or the
/// flood comes in gaps that no policer can fill), the rule applied at `rule_at`, the
/// gateway's memory each second and its rates after the rule.
pub fn flood(t: &Tenant, plan: &FloodPlan<'_>) -> anyhow::Result<FloodRun> {
    let me = lab_binary()?;
    let dir = t.dir.path().to_path_buf();
    let secs = plan.length.as_secs().max(1);
    let victim = t.vnfs[plan.victim].overlay.to_string();
    let mut sampler = spawn_generator(
        &t.vnfs[plan.victim].ns,
        &me,
        &["rx-rate", "--seconds", &(secs + 1).to_string()],
        &dir.join("flood-rx.log"),
    )
    .map_err(anyhow::Error::msg)?;
    std::thread::sleep(Duration::from_millis(200));
    let start_ns = epoch_ns();
    let started = Instant::now();
    let mut attacker = t.vnfs[plan.attacker].ns.spawn(
        Path::new("/usr/bin/nice"),
        &[
            "-n",
            "19",
            me.to_str().unwrap_or_default(),
            "gen",
            "syn-flood",
            &victim,
            "--port",
            &plan.port.to_string(),
            "--seconds",
            &secs.to_string(),
        ],
        &dir.join("flood.log"),
    )?;
    let gw_pid = t.vnfs[plan.gateway]
        .agent
        .as_ref()
        .map(Proc::pid)
        .ok_or_else(|| anyhow::anyhow!("the gateway's agent is not running"))?;
    let generator = attacker.pid();
    let tasks = [
        dataplane_task(t, plan.gateway),
        dataplane_task(t, plan.victim),
        dataplane_task(t, plan.attacker),
        Some(PathBuf::from(format!("/proc/{generator}/task/{generator}"))),
    ];
    let mut planes = Vec::new();
    let mut rss = Vec::new();
    // Until `until` after the start: the planes every 100 ms, the gateway's memory once
    // a second.
    let second = |rss: &mut Vec<u64>, planes: &mut Vec<PlaneSample>, until: Duration| {
        while started.elapsed() < until {
            let tick =
                Duration::from_millis(started.elapsed().as_millis() as u64 / 100 * 100 + 100);
            std::thread::sleep(tick.min(until).saturating_sub(started.elapsed()));
            if started.elapsed() < tick {
                continue;
            }
            planes.push(PlaneSample {
                at_ns: epoch_ns(),
                cpu_ns: std::array::from_fn(|k| tasks[k].as_deref().and_then(schedstat)),
            });
            if tick.as_secs() > rss.len() as u64 {
                rss.push(rss_kib(gw_pid));
            }
        }
    };
    second(&mut rss, &mut planes, plan.rule_at);
    let rule = t.file("flood-rule.yaml", plan.rule.as_bytes())?;
    t.asmnctl(&["catalog", "apply", rule.to_str().unwrap_or_default()])?;
    let applied_ns = epoch_ns();
    let applied = started.elapsed();
    let (from, to) = (vnf_of(t, plan.attacker), vnf_of(t, plan.victim));
    second(&mut rss, &mut planes, applied + Duration::from_secs(1));
    let window_start = (
        Instant::now(),
        gateway_bytes(t, plan.gateway, &from, "rx"),
        gateway_bytes(t, plan.gateway, &to, "tx"),
    );
    second(
        &mut rss,
        &mut planes,
        plan.length.saturating_sub(Duration::from_millis(300)),
    );
    let gateway = {
        let secs = window_start.0.elapsed().as_secs_f64();
        let rx = gateway_bytes(t, plan.gateway, &from, "rx");
        let tx = gateway_bytes(t, plan.gateway, &to, "tx");
        let g = GatewayRates {
            received_mbps: (rx - window_start.1) * 8.0 / secs / 1e6,
            forwarded_mbps: (tx - window_start.2) * 8.0 / secs / 1e6,
        };
        (g.received_mbps.is_finite() && g.forwarded_mbps.is_finite()).then_some(g)
    };
    let limit = plan.length + Duration::from_secs(10);
    attacker.wait_exit(limit);
    sampler.wait_exit(limit);
    let samples: Vec<(u128, u64)> = serde_json::from_value(
        last_json(&sampler.log()).map_err(|e| anyhow::anyhow!("the rate sampler: {e}"))?,
    )?;
    let syns = last_json(&attacker.log())
        .ok()
        .and_then(|v| v["datagrams"].as_u64())
        .unwrap_or(0);
    Ok(FloodRun {
        start_ns,
        applied_ns,
        end_ns: start_ns + plan.length.as_nanos(),
        windows: samples
            .windows(2)
            .filter(|w| w[1].0 > w[0].0)
            .map(|w| Window {
                from_ns: w[0].0,
                to_ns: w[1].0,
                mbps: w[1].1.saturating_sub(w[0].1) as f64 * 8.0
                    / ((w[1].0 - w[0].0) as f64 / 1e9)
                    / 1e6,
            })
            .collect(),
        gateway,
        gateway_rss_kib: rss,
        syns,
        planes,
    })
}

/// What a revocation did.
#[derive(Debug, Clone, Serialize)]
pub struct Cutoff {
    /// From `asmnctl revoke` until the watcher's agent logged the peer revoked.
    pub removed_after: Option<Duration>,
    /// The revoked instance's agent's exit code (it stops when it hears of it).
    pub victim_exit: Option<i32>,
    /// Echo replies the revoked instance got from `target` afterwards.
    pub answered_after: u64,
}

/// Revokes tenant member `victim` with `asmnctl revoke` and watches its tunnel go: the
/// time until `watcher`'s agent (its gateway or a peer) logged that it removed its tunnel
/// to the victim (at most `limit`; a watcher that had none never logs it), whether the victim's agent stopped, and how many pings from the victim to
/// `target` were still answered.
pub fn revocation(
    t: &mut Tenant,
    victim: usize,
    watcher: usize,
    target: &str,
    limit: Duration,
) -> anyhow::Result<Cutoff> {
    let me = lab_binary()?;
    let id = t.vnfs[victim].id.clone();
    let revoked_at = Instant::now();
    t.asmnctl(&["revoke", &id, "--reason", "lab: compromised"])?;
    let mut removed_after = None;
    if let Some(w) = t.vnfs[watcher].agent.as_ref() {
        while revoked_at.elapsed() < limit {
            if w.log()
                .lines()
                .any(|l| l.contains("peer revoked: tunnel removed") && l.contains(id.as_str()))
            {
                removed_after = Some(revoked_at.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let answered_after =
        crate::bench::generate(&t.vnfs[victim].ns, &me, &["ping", target, "--count", "2"])
            .map(|r| r["received"].as_u64().unwrap_or(0))
            .unwrap_or(0);
    let victim_exit = t.vnfs[victim]
        .agent
        .as_mut()
        .and_then(|a| a.wait_exit(Duration::from_secs(3)));
    Ok(Cutoff {
        removed_after,
        victim_exit,
        answered_after,
    })
}

/// Pings `target` from tenant member `from` once a try, up to `tries` times, until one
/// is answered; then `count` pings. Whether the path came up, and the RTTs (us) of the
/// `count` pings that were answered.
pub fn gateway_path(
    t: &Tenant,
    from: usize,
    target: &str,
    tries: usize,
    count: usize,
) -> anyhow::Result<(bool, Vec<u64>)> {
    let me = lab_binary()?;
    let ns = &t.vnfs[from].ns;
    let up = (0..tries).any(|_| {
        crate::bench::generate(ns, &me, &["ping", target, "--count", "1"])
            .is_ok_and(|r| r["received"] == 1)
    });
    if !up || count == 0 {
        return Ok((up, Vec::new()));
    }
    let r = crate::bench::generate(ns, &me, &["ping", target, "--count", &count.to_string()])
        .map_err(anyhow::Error::msg)?;
    let rtts = r["rtt_us"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    Ok((up, rtts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(windows: &[(u128, f64)]) -> FloodRun {
        let ms = 1_000_000u128;
        let mut at = 0;
        let windows = windows
            .iter()
            .map(|&(len, mbps)| {
                let w = Window {
                    from_ns: at * ms,
                    to_ns: (at + len) * ms,
                    mbps,
                };
                at += len;
                w
            })
            .collect();
        FloodRun {
            start_ns: 0,
            applied_ns: 0,
            end_ns: at * ms,
            windows,
            gateway: None,
            gateway_rss_kib: Vec::new(),
            syns: 0,
            planes: Vec::new(),
        }
    }

    #[test]
    fn a_short_window_after_a_late_sample_is_counted_with_the_next() {
        // The full eval's windows around a late sample.
        let r = run(&[
            (100, 10.0),
            (189, 4.684),
            (11, 12.023),
            (100, 10.013),
            (100, 9.944),
        ]);
        let h = r.highest_after(Duration::ZERO, Duration::from_millis(50));
        assert!((10.0..10.3).contains(&h), "{h}");
        // Whole windows keep their own rate: a real burst shows.
        let r = run(&[(100, 10.0), (100, 12.5), (100, 10.0)]);
        let h = r.highest_after(Duration::ZERO, Duration::from_millis(50));
        assert!((h - 12.5).abs() < 1e-9, "{h}");
    }

    #[test]
    fn the_threads_cpu_is_the_difference_of_consecutive_samples() {
        let mut r = run(&[(100, 10.0)]);
        r.start_ns = 1_000_000_000;
        let ms = |x: u64| x * 1_000_000;
        let sample = |at_ms: u128, cpu: [Option<(u64, u64)>; 4]| PlaneSample {
            at_ns: r.start_ns + at_ms * 1_000_000,
            cpu_ns: cpu.map(|c| c.map(|(ran, waited)| (ms(ran), ms(waited)))),
        };
        r.planes = vec![
            sample(
                100,
                [Some((10, 0)), Some((20, 1)), Some((30, 2)), Some((5, 5))],
            ),
            sample(200, [Some((60, 1)), Some((25, 1)), Some((30, 102)), None]),
            sample(450, [Some((60, 1)), Some((25, 1)), Some((30, 102)), None]),
        ];
        let t = r.thread_intervals();
        assert_eq!(t.len(), 2);
        assert!((t[0].from_s - 0.1).abs() < 1e-9, "{t:?}");
        assert!((t[0].length_ms - 100.0).abs() < 1e-9, "{t:?}");
        assert!((t[1].length_ms - 250.0).abs() < 1e-9, "{t:?}");
        assert_eq!(
            t[0].cpu_ms,
            [
                Some((50.0, 1.0)),
                Some((5.0, 0.0)),
                Some((0.0, 100.0)),
                None
            ]
        );
        // The report shows the attacker kept off the CPU for the whole interval, and a
        // thread not found as such, not as idle.
        let report = r.report();
        assert!(report.contains("0.10s+100ms 50/1 5/0 0/100 -"), "{report}");
        assert!(report.contains("0.20s+250ms 0/0 0/0 0/0 -"), "{report}");
    }
}
