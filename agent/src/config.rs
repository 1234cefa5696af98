//! The agent's configuration file (TOML). Every error names the file and the field.
//!
//! ```toml
//! bundle = "/etc/asmn/bundle"        # the bootstrap bundle from `asmnctl instance create`
//! target = "/dev/vdb"                # what to measure: the image, read-only
//! underlay = "192.0.2.10:51820"      # the UDP address of the tunnels (peers reach us here)
//! # optional:
//! tun = "asmn0"                      # TUN device name
//! state_dir = "/var/lib/asmn-agent"  # where the chain position survives restarts
//! metrics_addr = "127.0.0.1:9465"    # Prometheus metrics and /health
//! reattest_interval_secs = 30        # default: what Sec-EM says
//! polling = "adaptive"               # or "busy": no sleep while packets flow (a whole core)
//! tun_queue = 500                    # packets the TUN device queues for the data plane
//!                                    # (16..=65536; more for a UDP-heavy VNF)
//! realtime_priority = 10             # the data plane under SCHED_FIFO at this priority
//!                                    # under load (1..=99; 0: ordinary scheduling; needs
//!                                    # CAP_SYS_NICE or LimitRTPRIO=). Default: 10 on a
//!                                    # gateway (its limiters count time), 0 on a VNF
//! batch_under_load = true            # without a priority, the data plane of a VNF runs
//!                                    # SCHED_BATCH under load (a burst read whole,
//!                                    # about half the CPU at 10-20 kpps); false: never
//! failover_ms = 450                  # a silent Sec-EM is dead after this; the next listed
//!                                    # replica is tried (keep-alives every third of it)
//! ```
//!
//! The role (`vnf` or `gateway`) and everything about the tenant come from the bundle.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::io::Polling;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The bootstrap bundle.
    pub bundle: PathBuf,
    /// The measured target.
    pub target: PathBuf,
    /// Underlay UDP address of the tunnels.
    pub underlay: SocketAddr,
    /// TUN device name.
    pub tun: String,
    /// Where the agent keeps its chain position.
    pub state_dir: PathBuf,
    /// Metrics and health over HTTP.
    pub metrics_addr: Option<SocketAddr>,
    /// Re-attestation interval (None: Sec-EM's).
    pub reattest_interval_secs: Option<u32>,
    /// How the data plane waits for packets.
    pub polling: Polling,
    /// Packets the TUN device queues for the data plane (`tun_queue`).
    pub tun_queue: u32,
    /// The data plane's real-time (`SCHED_FIFO`) priority as configured
    /// (`realtime_priority`; 0: ordinary scheduling; `None`: the role's default, see
    /// [`crate::io::realtime_for`]).
    pub realtime_priority: Option<u8>,
    /// Whether a VNF's data plane without a priority runs `SCHED_BATCH` under load
    /// (`batch_under_load`, default true; see [`crate::io::UnderLoad::Batch`]).
    pub batch_under_load: bool,
    /// How fast a silent controller is declared dead and another one tried
    /// (`failover_ms`, default 450; keep-alives every third of it).
    pub liveness: asmn_channel::tls::Liveness,
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// What is wrong, naming the field.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    bundle: PathBuf,
    target: PathBuf,
    underlay: String,
    #[serde(default)]
    tun: Option<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    metrics_addr: Option<String>,
    #[serde(default)]
    reattest_interval_secs: Option<u32>,
    #[serde(default)]
    polling: Polling,
    #[serde(default)]
    failover_ms: Option<u64>,
    #[serde(default)]
    tun_queue: Option<u32>,
    #[serde(default)]
    realtime_priority: Option<u8>,
    #[serde(default)]
    batch_under_load: Option<bool>,
}

/// Longest TUN name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

impl Config {
    /// Reads and validates `path`; relative paths in it are relative to its directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&file, &text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Validates `text` (from `file`); relative paths are taken from `base`.
    pub fn parse(file: &str, text: &str, base: &Path) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError {
            file: file.to_string(),
            message,
        };
        if text.len() > 64 * 1024 {
            return Err(err("larger than 64 KiB; this is not an agent config".into()));
        }
        let raw: Raw = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        let underlay: SocketAddr = raw.underlay.parse().map_err(|_| {
            err(format!(
                "field `underlay`: {:?} is not ip:port (the UDP address peers reach this agent at)",
                raw.underlay
            ))
        })?;
        if underlay.port() == 0 || underlay.ip().is_unspecified() {
            return Err(err(
                "field `underlay`: give the agent's own address and a port (peers are told it)"
                    .into(),
            ));
        }
        let tun = raw.tun.unwrap_or_else(|| "asmn0".into());
        if tun.is_empty()
            || tun.len() > MAX_IFNAME
            || !tun
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return Err(err(format!(
                "field `tun`: {tun:?} must be 1 to {MAX_IFNAME} letters, digits, '-', '_' or '.'"
            )));
        }
        let metrics_addr = match raw.metrics_addr {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| err(format!("field `metrics_addr`: {s:?} is not ip:port")))?,
            ),
        };
        if let Some(secs) = raw.reattest_interval_secs
            && !(1..=86_400).contains(&secs)
        {
            return Err(err(format!(
                "field `reattest_interval_secs`: {secs} is outside 1..=86400"
            )));
        }
        let tun_queue = raw.tun_queue.unwrap_or(crate::daemon::TUN_TX_QUEUE);
        if !crate::daemon::TUN_QUEUE_RANGE.contains(&tun_queue) {
            return Err(err(format!(
                "field `tun_queue`: {tun_queue} is outside {}..={} (packets the TUN device \
                 queues for the data plane)",
                crate::daemon::TUN_QUEUE_RANGE.start(),
                crate::daemon::TUN_QUEUE_RANGE.end()
            )));
        }
        if let Some(p) = raw.realtime_priority {
            if p > *crate::io::REALTIME_RANGE.end() {
                return Err(err(format!(
                    "field `realtime_priority`: {p} is outside 0..={} (SCHED_FIFO's \
                     priorities {}..={}, or 0 for ordinary scheduling)",
                    crate::io::REALTIME_RANGE.end(),
                    crate::io::REALTIME_RANGE.start(),
                    crate::io::REALTIME_RANGE.end()
                )));
            }
            if p > 0 && raw.polling == Polling::Busy {
                return Err(err(
                    "fields `realtime_priority` and `polling = \"busy\"`: a real-time thread \
                     that polls without pause holds its CPU from every other task for as \
                     long as packets flow; choose one"
                        .into(),
                ));
            }
        }
        let liveness = match raw.failover_ms {
            None => asmn_channel::tls::Liveness::FAILOVER,
            Some(ms) if (300..=60_000).contains(&ms) => asmn_channel::tls::Liveness {
                keep_alive: std::time::Duration::from_millis(ms / 3),
                dead_after: std::time::Duration::from_millis(ms),
            },
            Some(ms) => {
                return Err(err(format!(
                    "field `failover_ms`: {ms} is outside 300..=60000 (how long a silent Sec-EM \
                     is waited for before another listed one is tried; Sec-EM closes \
                     connections silent for 60 s)"
                )));
            }
        };
        let abs = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        Ok(Config {
            bundle: abs(raw.bundle),
            target: abs(raw.target),
            underlay,
            tun,
            state_dir: abs(raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/asmn-agent"))),
            metrics_addr,
            reattest_interval_secs: raw.reattest_interval_secs,
            polling: raw.polling,
            tun_queue,
            realtime_priority: raw.realtime_priority,
            batch_under_load: raw.batch_under_load.unwrap_or(true),
            liveness,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse("agent.toml", text, Path::new("/etc/asmn"))
    }

    #[test]
    fn a_minimal_config_gets_defaults_and_absolute_paths() {
        let c = parse("bundle = \"b\"\ntarget = \"/dev/vdb\"\nunderlay = \"10.0.0.2:51820\"\n")
            .expect("valid");
        assert_eq!(c.bundle, PathBuf::from("/etc/asmn/b"));
        assert_eq!(c.tun, "asmn0");
        assert_eq!(c.metrics_addr, None);
        assert_eq!(c.polling, Polling::Adaptive);
        let busy = parse(
            "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\npolling = \"busy\"\n",
        )
        .expect("valid");
        assert_eq!(busy.polling, Polling::Busy);
        assert_eq!(c.tun_queue, crate::daemon::TUN_TX_QUEUE);
        let deep =
            parse("bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\ntun_queue = 5000\n")
                .expect("tun_queue");
        assert_eq!(deep.tun_queue, 5000);
        assert_eq!(c.realtime_priority, None);
        assert!(c.batch_under_load);
        let unbatched = parse(
            "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\nbatch_under_load = false\n",
        )
        .expect("batch_under_load");
        assert!(!unbatched.batch_under_load);
        let rt = parse(
            "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\nrealtime_priority = 10\n",
        )
        .expect("realtime_priority");
        assert_eq!(rt.realtime_priority, Some(10));
        let ordinary = parse(
            "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\npolling = \"busy\"\nrealtime_priority = 0\n",
        )
        .expect("realtime_priority = 0 with busy polling");
        assert_eq!(ordinary.realtime_priority, Some(0));
    }

    #[test]
    fn errors_name_the_field() {
        for (text, field) in [
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"nope\"\n",
                "underlay",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"0.0.0.0:1\"\n",
                "underlay",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\ntun = \"a/b\"\n",
                "tun",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\nreattest_interval_secs = 0\n",
                "reattest_interval_secs",
            ),
            ("bundle = \"b\"\nunderlay = \"10.0.0.2:1\"\n", "target"),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\npolling = \"always\"\n",
                "polling",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\ncolour = 1\n",
                "colour",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\ntun_queue = 4\n",
                "tun_queue",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\ntun_queue = -1\n",
                "tun_queue",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\nrealtime_priority = 100\n",
                "realtime_priority",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\nrealtime_priority = 300\n",
                "realtime_priority",
            ),
            (
                "bundle = \"b\"\ntarget = \"t\"\nunderlay = \"10.0.0.2:1\"\npolling = \"busy\"\nrealtime_priority = 5\n",
                "realtime_priority",
            ),
        ] {
            let e = parse(text).expect_err(text).to_string();
            assert!(e.contains(field), "{e} should name {field}");
            assert!(e.starts_with("agent.toml: "), "{e}");
        }
    }
}
