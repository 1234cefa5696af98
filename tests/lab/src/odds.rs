//! `asmn-lab rtt-odds`: how often the RTT targets of the data plane hold "in 5 of 5 runs",
//! for ASMN and for a null tunnel that does no work, over repeated independent trials.
//!
//! The bench measures one path after another, so a path's five runs and boringtun-cli's
//! are minutes apart, and a single run of the bench says little about a criterion that
//! asks every run to win. Here each trial starts ASMN's agents, the one-thread epoll null
//! tunnel and boringtun-cli (one thread) side by side on one veth pair, and takes their
//! runs in turn, round by round, the order rotated each round, beside the plain veth. A
//! trial is judged as the bench judges it: a path meets the target when each of its runs'
//! overhead over veth's median is at most the target share of boringtun-cli's median
//! overhead. With `busy`, each trial then runs the busy-polling agents and the busy null
//! tunnel, one at a time (each takes the CPUs), against the same trial's boringtun-cli.
//! How often the null tunnel meets a target is the floor of that target on this machine.
//!
//! Each trial also measures what the tunnels' own processes spend per echo at the load of
//! the paper's Fig. 6 (100 echoes a second, 64 bytes), one path after another in rotated
//! order while all three run: the CPU target (ASMN's added CPU at most 0.5x boringtun-cli's)
//! beside its floor, the null tunnel that sleeps in epoll and does no cryptography.

use crate::bench::{
    self, BORINGTUN_B, DirectPair, NULL_B, RTT_RUNS, Run, TUNNEL_B, VETH_B, median,
};
use crate::generators::{CryptoWake, NullWait};
use asmn_testkit::netns::{Netns, Proc};

/// The default-mode RTT target: overhead at most boringtun-cli's.
pub const DEFAULT_TARGET: f64 = 1.0;
/// The busy-polling RTT target: overhead at most 0.6x boringtun-cli's.
pub const BUSY_TARGET: f64 = 0.6;

/// Packets [`rtt_odds`] times each way for its [`CryptoWake`].
const CRYPTO_PACKETS: usize = 400;
/// Echoes of each path's CPU measurement in a trial, [`CPU_INTERVAL_MS`] apart (3 s).
pub const CPU_ECHOES: usize = 300;
/// The gap between those echoes: 100 a second, Fig. 6's load.
pub const CPU_INTERVAL_MS: u64 = 10;

/// One path of the trials.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OddsPath {
    /// The path.
    pub path: String,
    /// Its target, a share of boringtun-cli's overhead (None: a baseline).
    pub target: Option<f64>,
    /// Per trial, the median RTT of each of its [`RTT_RUNS`] runs, microseconds.
    pub trials: Vec<Vec<f64>>,
    /// Per trial, the CPU time of the tunnel's processes (both ends, all threads) per
    /// echo answered at 100 echoes a second, microseconds (none for the plain veth).
    pub cpu_us_per_echo: Vec<f64>,
}

/// The trials: the plain veth first, boringtun-cli (one thread) second, then the paths
/// judged against them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RttOdds {
    /// The paths, baselines first.
    pub paths: Vec<OddsPath>,
    /// What a packet's cryptography costs hot and on a thread just woken, measured after
    /// the trials ([`crate::generators::crypto_wake`]).
    pub crypto: Option<CryptoWake>,
}

/// How one judged path fared over the trials.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Verdict {
    /// The path.
    pub path: String,
    /// Its target, a share of boringtun-cli's overhead.
    pub target: f64,
    /// Trials in which every run met the target.
    pub trials_met: usize,
    /// Trials judged.
    pub trials: usize,
    /// Runs that met the target, over all trials.
    pub runs_met: usize,
    /// Runs judged.
    pub runs: usize,
    /// Per trial, its median overhead over boringtun-cli's.
    pub ratios: Vec<f64>,
    /// Per trial, its processes' CPU per echo over boringtun-cli's.
    pub cpu_ratios: Vec<f64>,
}

impl RttOdds {
    /// The verdict of every judged path (trials where a baseline has no runs are skipped).
    pub fn verdicts(&self) -> Vec<Verdict> {
        let [veth, bt, judged @ ..] = self.paths.as_slice() else {
            return Vec::new();
        };
        judged
            .iter()
            .filter_map(|p| Some((p, p.target?)))
            .map(|(p, target)| {
                let mut v = Verdict {
                    path: p.path.clone(),
                    target,
                    trials_met: 0,
                    trials: 0,
                    runs_met: 0,
                    runs: 0,
                    ratios: Vec::new(),
                    cpu_ratios: p
                        .cpu_us_per_echo
                        .iter()
                        .zip(&bt.cpu_us_per_echo)
                        .filter(|(_, theirs)| **theirs > 0.0)
                        .map(|(mine, theirs)| mine / theirs)
                        .collect(),
                };
                for ((runs, vt), bt) in p.trials.iter().zip(&veth.trials).zip(&bt.trials) {
                    let (Some(base), Some(theirs), Some(mine)) = (
                        median(&mut vt.clone()),
                        median(&mut bt.clone()),
                        median(&mut runs.clone()),
                    ) else {
                        continue;
                    };
                    let theirs = theirs - base;
                    let within = runs.iter().filter(|r| *r - base <= target * theirs).count();
                    v.trials += 1;
                    v.runs += runs.len();
                    v.runs_met += within;
                    v.trials_met += usize::from(within == runs.len());
                    v.ratios.push((mine - base) / theirs.max(1e-9));
                }
                v
            })
            .collect()
    }
}

/// The 64-byte RTT of one run (microseconds), with the run's tools.
fn one_run(run: Run<'_>, ns: &Netns, to: &str) -> anyhow::Result<f64> {
    bench::rtt_run(run, ns, to).map_err(anyhow::Error::msg)
}

/// The CPU time of `pids` per echo answered while `ns` pings `to` [`CPU_ECHOES`] times,
/// [`CPU_INTERVAL_MS`] apart, with the lab's generator; microseconds.
fn cpu_per_echo(run: Run<'_>, ns: &Netns, to: &str, pids: &[u32]) -> anyhow::Result<f64> {
    // The path up (a handshake after two idle minutes) before anything is counted.
    let _ = bench::generate(
        ns,
        run.me,
        &["ping", to, "--count", "3", "--interval-ms", "100"],
    );
    let before = bench::cpu_seconds_of(pids);
    let r = bench::generate(
        ns,
        run.me,
        &[
            "ping",
            to,
            "--count",
            &CPU_ECHOES.to_string(),
            "--interval-ms",
            &CPU_INTERVAL_MS.to_string(),
        ],
    )
    .map_err(anyhow::Error::msg)?;
    let spent = bench::cpu_seconds_of(pids) - before;
    let answered = r["rtt_us"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        answered >= CPU_ECHOES * 3 / 4,
        "only {answered} of {CPU_ECHOES} echoes answered to {to}"
    );
    Ok(1e6 * spent / answered as f64)
}

/// Runs `trials` trials (see the module's documentation).
pub fn rtt_odds(run: Run<'_>, trials: usize, busy: bool) -> anyhow::Result<RttOdds> {
    anyhow::ensure!(
        bench::tool("boringtun-cli").is_some(),
        "boringtun-cli is not installed: it is the reference of both targets"
    );
    let path = |name: &str, target: Option<f64>| OddsPath {
        path: name.to_string(),
        target,
        trials: Vec::new(),
        cpu_us_per_echo: Vec::new(),
    };
    let mut out = RttOdds {
        crypto: None,
        paths: vec![
            path("plain veth", None),
            path("boringtun-cli, 1 thread", None),
            path("ASMN direct", Some(DEFAULT_TARGET)),
            path(
                "null tunnel (no crypto), one thread in epoll",
                Some(DEFAULT_TARGET),
            ),
        ],
    };
    // Where the busy paths' runs go (they follow the side-by-side ones).
    let (busy_asmn, busy_null) = (out.paths.len(), out.paths.len() + 1);
    if busy {
        out.paths
            .push(path("ASMN direct, busy-poll", Some(BUSY_TARGET)));
        out.paths.push(path(
            "null tunnel (no crypto), busy-poll",
            Some(BUSY_TARGET),
        ));
    }
    let mut pair = DirectPair::new(run.work)?;
    for trial in 0..trials {
        eprintln!("trial {} of {trials} ...", trial + 1);
        for p in &mut out.paths {
            p.trials.push(Vec::with_capacity(RTT_RUNS));
        }
        let agents = pair.start_agents(false)?;
        let nulls = bench::null_tunnels(run, &pair, NullWait::Epoll)?;
        let bt = pair.start_boringtun(1)?;
        let side_by_side = [VETH_B, BORINGTUN_B, TUNNEL_B, NULL_B];
        for round in 0..RTT_RUNS {
            for k in 0..side_by_side.len() {
                let i = (k + round) % side_by_side.len();
                let r = one_run(run, &pair.a, side_by_side[i])?;
                out.paths[i].trials[trial].push(r);
            }
        }
        // The tunnels' CPU per echo, in an order rotated from trial to trial.
        let pids = [
            bt.pids(),
            agents.to_vec(),
            nulls.iter().map(Proc::pid).collect(),
        ];
        for k in 0..pids.len() {
            let i = (k + trial) % pids.len();
            let us = cpu_per_echo(run, &pair.a, side_by_side[i + 1], &pids[i])?;
            out.paths[i + 1].cpu_us_per_echo.push(us);
        }
        drop(bt);
        drop(nulls);
        pair.stop_agents();
        if busy {
            pair.start_agents(true)?;
            for _ in 0..RTT_RUNS {
                let r = one_run(run, &pair.a, TUNNEL_B)?;
                out.paths[busy_asmn].trials[trial].push(r);
            }
            pair.stop_agents();
            let nulls: Vec<Proc> = bench::null_tunnels(run, &pair, NullWait::Busy)?;
            for _ in 0..RTT_RUNS {
                let r = one_run(run, &pair.a, NULL_B)?;
                out.paths[busy_null].trials[trial].push(r);
            }
            drop(nulls);
        }
    }
    out.crypto = Some(crate::generators::crypto_wake(
        CRYPTO_PACKETS,
        std::time::Duration::from_millis(5),
        crate::generators::Pause::Sleep,
    )?);
    Ok(out)
}

/// `v`'s median, least and most, as "m (l-h)" with `unit` after the median.
fn spread(v: &[f64], unit: &str) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    match median(&mut v.to_vec()) {
        Some(m) => format!("{m:.2}{unit} ({lo:.2}-{hi:.2})"),
        None => "-".into(),
    }
}

/// The verdicts as a Markdown table, the baselines' medians above it.
pub fn markdown(o: &RttOdds) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let all = |p: &OddsPath| {
        let mut v: Vec<f64> = p.trials.iter().flatten().copied().collect();
        median(&mut v).unwrap_or(f64::NAN)
    };
    for p in o.paths.iter().filter(|p| p.target.is_none()) {
        let _ = writeln!(
            s,
            "{}: median RTT {:.0} us over {} trials",
            p.path,
            all(p),
            p.trials.len()
        );
    }
    let _ = writeln!(
        s,
        "\n| path | target (x boringtun-cli's overhead) | trials with every run within it | runs within it | overhead / boringtun-cli's, per trial: median (least-most) |\n|---|---:|---:|---:|---:|"
    );
    let verdicts = o.verdicts();
    for v in &verdicts {
        let _ = writeln!(
            s,
            "| {} | {:.1} | {} of {} | {} of {} | {} |",
            v.path,
            v.target,
            v.trials_met,
            v.trials,
            v.runs_met,
            v.runs,
            spread(&v.ratios, "x")
        );
    }
    let cpu: Vec<&OddsPath> = o
        .paths
        .iter()
        .filter(|p| !p.cpu_us_per_echo.is_empty())
        .collect();
    if !cpu.is_empty() {
        let _ = writeln!(
            s,
            "\nThe tunnels' processes (both ends, all threads), CPU per echo at {} echoes a second, 64 bytes (Fig. 6's load), each trial's paths one after another:\n\n| path | per echo, per trial: median (least-most) | over boringtun-cli's, per trial: median (least-most) |\n|---|---:|---:|",
            1000 / CPU_INTERVAL_MS
        );
        for p in cpu {
            let ratios = verdicts
                .iter()
                .find(|v| v.path == p.path)
                .map(|v| spread(&v.cpu_ratios, "x"))
                .unwrap_or_else(|| "(the reference)".into());
            let _ = writeln!(
                s,
                "| {} | {} | {ratios} |",
                p.path,
                spread(&p.cpu_us_per_echo, " us")
            );
        }
    }
    if let Some(c) = o.crypto {
        let _ = writeln!(
            s,
            "\nboringtun, one 64-byte echo's packet (median of {}): encapsulation {} ns and decapsulation {} ns back to back; {} ns and {} ns as the first work after {} ms asleep ({:.0}x)",
            c.packets,
            c.hot_encapsulate_ns,
            c.hot_decapsulate_ns,
            c.woken_encapsulate_ns,
            c.woken_decapsulate_ns,
            c.sleep_us / 1000,
            (c.woken_encapsulate_ns + c.woken_decapsulate_ns) as f64
                / (c.hot_encapsulate_ns + c.hot_decapsulate_ns).max(1) as f64
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn odds(asmn: Vec<Vec<f64>>) -> RttOdds {
        let p = |path: &str, target, trials| OddsPath {
            path: path.into(),
            target,
            trials,
            cpu_us_per_echo: Vec::new(),
        };
        RttOdds {
            crypto: None,
            paths: vec![
                p("veth", None, vec![vec![50.0; 5], vec![50.0; 5]]),
                p(
                    "bt",
                    None,
                    vec![vec![240.0, 250.0, 260.0, 300.0, 200.0], vec![250.0; 5]],
                ),
                p("asmn", Some(1.0), asmn),
            ],
        }
    }

    #[test]
    fn a_trial_is_met_only_when_every_run_is_within_the_reference_median() {
        // boringtun-cli's median overhead is 200 us in both trials.
        let v = odds(vec![
            vec![200.0, 240.0, 250.0, 230.0, 249.0],
            vec![200.0, 240.0, 251.0, 230.0, 100.0],
        ])
        .verdicts();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].trials_met, v[0].trials), (1, 2));
        assert_eq!((v[0].runs_met, v[0].runs), (9, 10));
        assert!(
            (v[0].ratios[0] - 190.0 / 200.0).abs() < 1e-9,
            "{:?}",
            v[0].ratios
        );
        assert!(
            (v[0].ratios[1] - 180.0 / 200.0).abs() < 1e-9,
            "{:?}",
            v[0].ratios
        );
    }

    #[test]
    fn a_target_below_one_is_a_share_of_the_reference_overhead() {
        let mut o = odds(vec![vec![170.0; 5], vec![171.0; 5]]);
        o.paths[2].target = Some(0.6);
        let v = o.verdicts();
        // 0.6 x 200 = 120 us over veth's 50: 170 is within, 171 is not.
        assert_eq!((v[0].trials_met, v[0].runs_met), (1, 5));
    }

    #[test]
    fn baselines_are_not_judged_and_empty_trials_are_skipped() {
        let v = odds(vec![vec![], vec![100.0; 5]]).verdicts();
        assert_eq!((v[0].trials, v[0].trials_met), (1, 1));
        assert!(RttOdds::default().verdicts().is_empty());
        assert!(markdown(&odds(vec![vec![100.0; 5]; 2])).contains("| asmn | 1.0 | 2 of 2 |"));
    }

    #[test]
    fn cpu_per_echo_is_compared_with_the_references_trial_by_trial() {
        let mut o = odds(vec![vec![200.0; 5]; 2]);
        o.paths[1].cpu_us_per_echo = vec![200.0, 250.0];
        o.paths[2].cpu_us_per_echo = vec![260.0, 250.0];
        let v = o.verdicts();
        assert_eq!(v[0].cpu_ratios, vec![1.3, 1.0]);
        let md = markdown(&o);
        assert!(
            md.contains("| asmn | 255.00 us (250.00-260.00) | 1.15x (1.00-1.30) |"),
            "{md}"
        );
        assert!(
            md.contains("| bt | 225.00 us (200.00-250.00) | (the reference) |"),
            "{md}"
        );
        // A reference without a figure in a trial: that trial is not compared.
        o.paths[1].cpu_us_per_echo = vec![0.0, 250.0];
        assert_eq!(o.verdicts()[0].cpu_ratios, vec![1.0]);
    }
}
