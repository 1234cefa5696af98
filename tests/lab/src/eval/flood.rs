//! Fig. 9 (the [`crate::scenarios::flood`] scenario on a tenant of client, gateway and
//! server) and the latencies beyond the paper: catalog apply to enforcement, revocation to
//! cut-off, enrollment.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{CEILING_MBPS, Options, Progress, RULE_AT_S, epoch_ns, spawn_gen};
use crate::bench;
use asmn_testkit::tenant::Tenant;

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
    /// Highest 100 ms rate from 100 ms after the command (a window under 50 ms counted
    /// with the next).
    pub max_after_mbps: f64,
    /// Mean rate from 1 s after the command.
    pub after_mbps: f64,
    /// What the threads that carry the flood did every ~100 ms: the data planes of the
    /// gateway, the victim and the attacker, and the SYN generator (what explains a
    /// window off the rule's rate).
    pub threads: Vec<crate::scenarios::ThreadInterval>,
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
pub(super) fn shaped(version_note: &str, probe: bool) -> String {
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

/// The (time in ns, received bytes) samples of the `rx-rate` generator.
pub(super) fn samples_of(log: &str) -> anyhow::Result<Vec<(u128, u64)>> {
    Ok(serde_json::from_value(
        bench::last_json(log).map_err(anyhow::Error::msg)?,
    )?)
}

pub(super) fn tenant_figures(
    o: &Options,
    me: &Path,
    p: &Progress,
) -> anyhow::Result<(Flood, Latency)> {
    let mut lat = Latency::default();
    let (mut t, [g, c, s]) =
        Tenant::behind_gateway(EVAL_SERVER_VNFD, 4 << 20).map_err(anyhow::Error::msg)?;
    // The flood's victim, measured in 100 ms windows, as the flood test runs it.
    t.realtime(s).map_err(anyhow::Error::msg)?;
    // The attacker's agent encrypts the flood real-time under load, below the planes under
    // test (see `scenarios::flood`): batch, and later ordinary, it was kept off the CPU and
    // the flood came in gaps (100 ms windows of 11.2 Mbit/s after one of 4.4, and of 13.4
    // after one of 6.5, in CI runs).
    t.flooder(c).map_err(anyhow::Error::msg)?;
    for (i, name) in [(g, "gw"), (c, "client"), (s, "server")] {
        let t0 = Instant::now();
        t.start(i).map_err(anyhow::Error::msg)?;
        t.wait_enrolled(i, Duration::from_secs(30))
            .map_err(anyhow::Error::msg)?;
        lat.enrollment_ms
            .push((name.into(), t0.elapsed().as_secs_f64() * 1e3));
    }
    let server = t.vnfs[s].overlay.to_string();
    let (up, _) = crate::scenarios::gateway_path(&t, c, &server, 10, 0)?;
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
    let rule = shaped("Fig. 9", false);
    let run = crate::scenarios::flood(
        &t,
        &crate::scenarios::FloodPlan {
            attacker: c,
            victim: s,
            gateway: g,
            port: 8080,
            rule: &rule,
            rule_at: Duration::from_secs(RULE_AT_S),
            length: Duration::from_secs(total),
        },
    )?;
    let flood_fig = flood_figure(&run);

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
    let cut = crate::scenarios::revocation(&mut t, c, g, &server, Duration::from_secs(5))?;
    lat.revocation_ms = cut.removed_after.map(|d| d.as_secs_f64() * 1e3);
    Ok((flood_fig, lat))
}

/// Rates in ~100 ms windows, and what the rule did to them.
pub(super) fn flood_figure(run: &crate::scenarios::FloodRun) -> Flood {
    let secs = |t: u128| t.saturating_sub(run.start_ns) as f64 / 1e9;
    let applied = run.applied_ns;
    Flood {
        rate: run
            .windows
            .iter()
            .map(|w| (secs(w.from_ns), w.mbps))
            .collect(),
        rule_at_s: secs(applied),
        fell_at_s: run
            .windows
            .iter()
            .find(|w| w.from_ns >= applied && w.mbps <= CEILING_MBPS)
            .map(|w| secs(w.from_ns)),
        before_mbps: run.before_mbps(Duration::from_secs(1)),
        max_after_mbps: run.highest_after(Duration::from_millis(100), Duration::from_millis(50)),
        after_mbps: {
            let v: Vec<f64> = run.after(Duration::from_secs(1)).map(|w| w.mbps).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        },
        threads: run.thread_intervals(),
    }
}
