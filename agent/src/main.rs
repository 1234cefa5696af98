//! `asmn-agent`: the ASMN sidecar of one VNF instance.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use asmn_agent::config::Config;
use asmn_agent::control::{self, AgentError, Chain, Control};
use asmn_agent::dataplane::Plane;
use asmn_agent::io::Polling;
use asmn_shared::wire::msg::{self, Body};
use clap::{Parser, Subcommand};
use rand::RngCore;

/// The ASMN agent of one VNF instance.
///
/// It measures its target (the VNF image, read-only), enrolls with Sec-EM by revealing
/// the next element of its hash chain, re-attests every interval, and carries the
/// instance's traffic over WireGuard tunnels to the peers Sec-EM verified, enforcing the
/// VNF's Sec-catalog. Needs root (or CAP_NET_ADMIN) for its TUN device.
///
/// Exit codes: 0 stopped by a signal; 1 refused by Sec-EM (wrong image, unknown instance,
/// revoked: the message says which); 2 bad configuration or bundle; 3 a device, socket or
/// network error.
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
    Static {
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
    },
    /// Check a configuration file and the bundle it names, then exit.
    CheckConfig {
        /// The configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
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

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|e| eprintln!("asmn-agent: starting the runtime: {e}"))
        .ok()
}

/// Exit codes.
const REFUSED: u8 = 1;
const BAD_CONFIG: u8 = 2;
const RUNTIME: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config)
            .map_err(|e| e.to_string())
            .and_then(|c| control::load_bundle(&c.bundle).map_err(|e| e.to_string()))
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
                ExitCode::from(BAD_CONFIG)
            }
        },
        Command::Static {
            tun,
            address,
            listen,
            private_key_file,
            peer_public_key,
            peer_endpoint,
            peer_address,
            psk_file,
            busy_poll,
        } => {
            logging("text");
            let Some(runtime) = runtime() else {
                return ExitCode::from(RUNTIME);
            };
            let args = StaticArgs {
                tun,
                address,
                listen,
                private_key_file,
                peer_public_key,
                peer_endpoint,
                peer_address,
                psk_file,
                busy_poll,
            };
            match runtime.block_on(run_static(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("asmn-agent static: {e:#}");
                    ExitCode::from(BAD_CONFIG)
                }
            }
        }
        Command::Run { config, log_format } => {
            logging(&log_format);
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("asmn-agent: {e}");
                    return ExitCode::from(BAD_CONFIG);
                }
            };
            let Some(runtime) = runtime() else {
                return ExitCode::from(RUNTIME);
            };
            match runtime.block_on(run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(Failure::Refused(e)) => {
                    eprintln!("asmn-agent: {e}");
                    ExitCode::from(REFUSED)
                }
                Err(Failure::Config(e)) => {
                    eprintln!("asmn-agent: {e:#}");
                    ExitCode::from(BAD_CONFIG)
                }
                Err(Failure::Runtime(e)) => {
                    eprintln!("asmn-agent: {e:#}");
                    ExitCode::from(RUNTIME)
                }
            }
        }
    }
}

struct StaticArgs {
    tun: String,
    address: String,
    listen: std::net::SocketAddr,
    private_key_file: PathBuf,
    peer_public_key: String,
    peer_endpoint: std::net::SocketAddr,
    peer_address: std::net::Ipv4Addr,
    psk_file: PathBuf,
    busy_poll: bool,
}

fn key32(what: &str, b64: &str) -> anyhow::Result<[u8; 32]> {
    use base64::Engine;
    let v = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .with_context(|| format!("{what}: not base64"))?;
    <[u8; 32]>::try_from(v.as_slice()).map_err(|_| anyhow::anyhow!("{what}: not 32 bytes"))
}

async fn run_static(a: StaticArgs) -> anyhow::Result<()> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let secret =
        boringtun::x25519::StaticSecret::from(key32("private key", &read(&a.private_key_file)?)?);
    let peer_key = key32("peer public key", &a.peer_public_key)?;
    let psk = asmn_shared::crypto::PresharedKey::new(key32("preshared key", &read(&a.psk_file)?)?);
    let (ip, prefix) = a
        .address
        .split_once('/')
        .and_then(|(i, p)| Some((i.parse::<std::net::Ipv4Addr>().ok()?, p.parse::<u8>().ok()?)))
        .context("--address must be ipv4/prefix")?;
    let (tun, net) = open_tun(&a.tun, ip, prefix)?;
    let udp = underlay_socket(a.listen)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let plane = Plane::new(
        tun,
        udp,
        secret,
        IpAddr::V4(ip),
        (net, prefix),
        asmn_shared::ids::Role::Vnf,
        tx,
    )
    .context("setting up the underlay socket")?;
    let catalog = asmn_shared::catalog::parse_catalog(
        "static",
        b"vnf: static\nsec_catalog:\n  default_action:\n    police:\n      ingress_policing_rate: 400000000\n      ingress_policing_burst: 4000000\n",
    )?;
    plane.set_catalog(catalog);
    let vnf = asmn_shared::ids::VnfId::new("static").map_err(|e| anyhow::anyhow!("{e}"))?;
    plane.install(
        asmn_agent::dataplane::PeerSpec {
            id: asmn_shared::ids::InstanceKey::from_bytes(peer_key),
            vnf,
            overlay: IpAddr::V4(a.peer_address),
            endpoint: a.peer_endpoint,
            wg_public: peer_key,
            role: asmn_shared::ids::Role::Vnf,
        },
        &psk,
    );
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    tokio::spawn(Arc::clone(&plane).run_timers());
    let polling = if a.busy_poll {
        Polling::Busy
    } else {
        Polling::Adaptive
    };
    let io_failed = spawn_io(&plane, polling)?;
    tracing::info!("static data plane up");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        e = io_failed => Err(anyhow::anyhow!("data plane I/O failed: {}", describe_io(e))),
    }
}

enum Failure {
    Refused(AgentError),
    Config(anyhow::Error),
    Runtime(anyhow::Error),
}

fn classify(e: AgentError) -> Failure {
    match e {
        e @ AgentError::Refused { .. } => Failure::Refused(e),
        other => Failure::Runtime(anyhow::anyhow!(other)),
    }
}

/// Underlay socket buffers (the kernel caps them at `net.core.rmem_max`/`wmem_max`; inside
/// a namespace those cannot be raised, so the socket asks for what it needs).
const SOCKET_BUFFER: usize = 4 << 20;

/// The TUN device with address `ip/prefix` (MTU 1420, virtio-net header and TSO/USO
/// offloads for the batched I/O), and the overlay network it is in.
fn open_tun(
    name: &str,
    ip: std::net::Ipv4Addr,
    prefix: u8,
) -> anyhow::Result<(tun_rs::SyncDevice, IpAddr)> {
    let tun = tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(ip, prefix, None)
        .mtu(1420)
        .offload(true)
        .build_sync()
        .with_context(|| format!("creating TUN device {name} (root or CAP_NET_ADMIN needed)"))?;
    // The overlay is IPv4: without this the kernel sends router solicitations and MLD
    // reports into the device, which the data plane reads only to drop (and which would
    // keep a busy-polling agent from going idle).
    let sysctl = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&sysctl, "1")
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::debug!(error = %e, "could not disable IPv6 on {name}");
    }
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ok((tun, IpAddr::V4((u32::from(ip) & mask).into())))
}

/// Starts the data plane's I/O thread; the receiver gets its error if it stops.
fn spawn_io(
    plane: &Arc<Plane>,
    polling: Polling,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<std::io::Error>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let plane = Arc::clone(plane);
    std::thread::Builder::new()
        .name("asmn-dataplane".into())
        .spawn(move || {
            let _ = tx.send(plane.run_io(polling));
        })
        .context("starting the data plane thread")?;
    Ok(rx)
}

fn describe_io(r: Result<std::io::Error, tokio::sync::oneshot::error::RecvError>) -> String {
    match r {
        Ok(e) => e.to_string(),
        Err(_) => "the data plane thread ended".into(),
    }
}

fn underlay_socket(addr: std::net::SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("binding the underlay socket {addr}"))?;
    Ok(s.into())
}

async fn run(cfg: Config) -> Result<(), Failure> {
    let bundle =
        control::load_bundle(&cfg.bundle).map_err(|e| Failure::Config(anyhow::anyhow!(e)))?;
    tracing::info!(tenant = %bundle.tenant, vnf = %bundle.vnf, instance = %bundle.instance, "measuring {}", cfg.target.display());
    let target = cfg.target.clone();
    let measurement = tokio::task::spawn_blocking(move || control::measure(&target))
        .await
        .map_err(|e| Failure::Runtime(e.into()))?
        .map_err(classify)?;
    let mut chain = Chain::new(bundle.clone(), measurement, cfg.state_dir.clone())
        .map_err(|e| Failure::Config(anyhow::anyhow!(e)))?;

    // The static WireGuard key of this run.
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let secret = boringtun::x25519::StaticSecret::from(key);
    zeroize::Zeroize::zeroize(&mut key);
    let wg_public = boringtun::x25519::PublicKey::from(&secret).to_bytes();

    let udp = underlay_socket(cfg.underlay).map_err(Failure::Runtime)?;
    let endpoint = control::client(&bundle.ca_pem).map_err(classify)?;
    let conn = control::connect(&endpoint, &bundle)
        .await
        .map_err(classify)?;
    let enrolled = control::enroll(&conn, &mut chain, wg_public, cfg.underlay)
        .await
        .map_err(classify)?;
    let overlay = enrolled.overlay;
    tracing::info!(overlay = %overlay.ip, prefix = overlay.prefix, "enrolled");

    let IpAddr::V4(ip4) = overlay.ip else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "IPv6 overlays are not supported yet"
        )));
    };
    let (tun, net) = open_tun(&cfg.tun, ip4, overlay.prefix).map_err(Failure::Runtime)?;
    let (asks_tx, asks_rx) = tokio::sync::mpsc::channel(256);
    let plane = Plane::new(
        tun,
        udp,
        secret,
        overlay.ip,
        (net, overlay.prefix),
        bundle.role,
        asks_tx,
    )
    .context("setting up the underlay socket")
    .map_err(Failure::Runtime)?;
    let version = enrolled.catalog.version;
    let vnf = enrolled.catalog.vnf.to_string();
    plane.set_catalog(enrolled.catalog.clone());
    let control = Control::new(
        chain,
        conn.clone(),
        endpoint,
        Arc::clone(&plane),
        cfg.underlay,
        version,
    );
    let _ = control::ask(&conn, Body::CatalogAck(msg::CatalogAck { vnf, version })).await;

    tokio::spawn(Arc::clone(&plane).run_timers());
    let io_failed = spawn_io(&plane, cfg.polling).map_err(Failure::Runtime)?;
    tokio::spawn(Arc::clone(&control).serve_asks(asks_rx));
    if let Some(addr) = cfg.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics address {addr}"))
            .map_err(Failure::Runtime)?;
        tokio::spawn(asmn_agent::metrics::serve(listener, Arc::clone(&plane)));
    }

    // Pushes, with reconnection; a refusal (this instance revoked) stops the agent.
    let (stop_tx, mut stop_rx) = tokio::sync::mpsc::channel::<AgentError>(1);
    {
        let control = Arc::clone(&control);
        let stop = stop_tx.clone();
        tokio::spawn(async move {
            loop {
                match control.read_pushes().await {
                    Err(e @ AgentError::Refused { .. }) => {
                        let _ = stop.send(e).await;
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "push stream ended"),
                    Ok(()) => {}
                }
                if let Err(e) = control.reconnect().await {
                    let _ = stop.send(e).await;
                    return;
                }
            }
        });
    }
    let interval = Duration::from_secs(u64::from(
        cfg.reattest_interval_secs
            .unwrap_or(enrolled.reattest_interval.as_secs() as u32)
            .max(1),
    ));
    {
        let control = Arc::clone(&control);
        let target = cfg.target.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                match control.reattest(&target).await {
                    Ok(()) => {}
                    Err(e @ AgentError::Refused { .. }) => {
                        let _ = stop_tx.send(e).await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "re-attestation failed; retrying next interval")
                    }
                }
            }
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::Runtime(e.into()))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted: stopping");
            Ok(())
        }
        _ = term.recv() => {
            tracing::info!("terminated: stopping");
            Ok(())
        }
        Some(e) = stop_rx.recv() => {
            tracing::error!(error = %e, "stopping");
            Err(Failure::Refused(e))
        }
        e = io_failed => Err(Failure::Runtime(anyhow::anyhow!("data plane I/O failed: {}", describe_io(e)))),
    }
}
