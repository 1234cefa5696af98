//! `asmn-agent`: the ASMN sidecar of one VNF instance.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use asmn_agent::config::Config;
use asmn_agent::daemon::{self, StaticConfig};
use asmn_agent::error::{AgentError, EXIT_CONFIG, EXIT_RUNTIME};
use asmn_agent::io::{self, Polling};
use clap::{Parser, Subcommand};

/// The ASMN agent of one VNF instance.
///
/// It measures its target (the VNF image, read-only), enrolls with Sec-EM by revealing
/// the next element of its hash chain, re-attests every interval, and carries the
/// instance's traffic over WireGuard tunnels to the peers Sec-EM verified, enforcing the
/// VNF's Sec-catalog. Needs root (or CAP_NET_ADMIN) for its TUN device.
///
/// Exit codes: 0 stopped by a signal; 1 refused by Sec-EM for good (wrong image, unknown
/// instance, revoked, quarantined: the message says which); 2 bad configuration, bundle
/// or chain state; 3 a device, socket or network error. Sec-EM being unreachable or
/// unavailable stops nothing: the tunnels keep running and the agent retries.
#[derive(Parser, Debug)]
#[command(name = "asmn-agent", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    Run {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Log format: text or json.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Run only the data plane with one static peer given on the command line (no Sec-EM):
    /// for interoperability tests with other WireGuard implementations and for data-plane
    /// benchmarks. Keys are WireGuard's base64, read from files.
    Static(StaticArgs),
    /// Check a configuration file and the bundle it names, then exit.
    CheckConfig {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
}

/// The arguments of `asmn-agent static`.
#[derive(clap::Args, Debug)]
struct StaticArgs {
    /// TUN device name.
    #[arg(long, default_value = "asmn0")]
    tun: String,
    /// This end's overlay address, ip/prefix.
    #[arg(long)]
    address: String,
    /// UDP address to listen on (ip:port).
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// File with this end's private key (base64).
    #[arg(long)]
    private_key_file: PathBuf,
    /// The peer's public key (base64).
    #[arg(long)]
    peer_public_key: String,
    /// The peer's UDP endpoint (ip:port).
    #[arg(long)]
    peer_endpoint: std::net::SocketAddr,
    /// The peer's overlay address.
    #[arg(long)]
    peer_address: std::net::Ipv4Addr,
    /// File with the pair's preshared key (base64).
    #[arg(long)]
    psk_file: PathBuf,
    /// Poll without pause while packets flow instead of sleeping: the lowest latency, at the
    /// price of a whole core (the config file's `polling = "busy"`).
    #[arg(long)]
    busy_poll: bool,
    /// Packets the TUN device queues for the data plane (the config file's `tun_queue`):
    /// the kernel drops what does not fit while the data plane is off the CPU; more for
    /// a UDP-heavy VNF.
    #[arg(long, default_value_t = daemon::TUN_TX_QUEUE,
          value_parser = clap::value_parser!(u32).range(
              i64::from(*daemon::TUN_QUEUE_RANGE.start())..=i64::from(*daemon::TUN_QUEUE_RANGE.end())))]
    tun_queue: u32,
    /// Run the data plane under SCHED_FIFO at this priority while it is under load (over
    /// 1,000 packets a second, or busy), 1..=99 (the config file's `realtime_priority`;
    /// needs CAP_SYS_NICE). Not with --busy-poll.
    #[arg(long, conflicts_with = "busy_poll",
          value_parser = clap::value_parser!(u8).range(
              i64::from(*io::REALTIME_RANGE.start())..=i64::from(*io::REALTIME_RANGE.end())))]
    realtime_priority: Option<u8>,
    /// Keep the data plane under ordinary scheduling under load (by default it runs
    /// SCHED_BATCH there, where a packet's wake-up does not pre-empt its sender and a
    /// burst is read whole: about half the CPU at 10-20 kpps, at the price of up to a
    /// scheduler tick of delay for a packet that comes while its CPU is busy).
    #[arg(long, conflicts_with = "realtime_priority")]
    no_batch_under_load: bool,
}

fn logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if format == "json" {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Runs `f` on a new runtime; the exit code of its result.
fn block_on(what: &str, f: impl Future<Output = Result<(), AgentError>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("asmn-agent: starting the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn static_config(a: &StaticArgs) -> Result<StaticConfig, AgentError> {
    let address = a
        .address
        .split_once('/')
        .and_then(|(i, p)| Some((i.parse::<std::net::Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .filter(|(_, p)| *p <= 32)
        .ok_or_else(|| AgentError::Config("--address must be ipv4/prefix".into()))?;
    Ok(StaticConfig {
        tun: a.tun.clone(),
        address,
        listen: a.listen,
        private_key: daemon::read_key_file("the private key", &a.private_key_file)?,
        peer_public_key: daemon::key32("the peer public key", &a.peer_public_key)?,
        peer_endpoint: a.peer_endpoint,
        peer_address: a.peer_address,
        psk: asmn_shared::crypto::PresharedKey::new(daemon::read_key_file(
            "the preshared key",
            &a.psk_file,
        )?),
        polling: if a.busy_poll {
            Polling::Busy
        } else {
            Polling::Adaptive
        },
        tun_queue: a.tun_queue,
        realtime_priority: a.realtime_priority,
        batch_under_load: !a.no_batch_under_load,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| asmn_agent::control::load_bundle(&c.bundle).map_err(|e| e.to_string()))
        {
            Ok(b) => {
                println!(
                    "{}: valid; instance {} of VNF {} in tenant {} ({})",
                    config.display(),
                    b.instance,
                    b.vnf,
                    b.tenant,
                    b.role
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("asmn-agent: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Static(args) => {
            logging("text");
            let config = match static_config(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("asmn-agent static: {e}");
                    return ExitCode::from(e.exit_code());
                }
            };
            block_on(
                "asmn-agent static",
                daemon::run_static(config, daemon::signal()),
            )
        }
        Command::Run { config, log_format } => {
            logging(&log_format);
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("asmn-agent: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            block_on("asmn-agent", daemon::run(cfg, daemon::signal()))
        }
    }
}
