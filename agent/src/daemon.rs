//! The agent as a library daemon: [`run`] and [`run_static`] own every task and thread
//! they start, and stop them all when `shutdown` resolves (a signal, in `main`): the
//! control tasks are cancelled, the QUIC connection is closed, the data plane thread is
//! stopped (its tunnels and keys dropped, the TUN device removed), and the chain position
//! is already on disk (it is written, and synced, before each reveal).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use asmn_shared::ids::{InstanceKey, Role, VnfId};
use asmn_shared::wire::msg::{self, Body};
use governor::clock::DefaultClock;
use rand::RngCore;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::control::{self, Chain, Control};
use crate::dataplane::{PeerSpec, Plane, PlaneConfig};
use crate::error::AgentError;
use crate::io::{Driver, Polling};
use crate::underlay::Underlay;

/// Underlay socket buffers. The agent has CAP_NET_ADMIN, so it forces them
/// (`SO_RCVBUFFORCE`, as wireguard-go does) past `net.core.rmem_max`/`wmem_max`, which is
/// 208 KiB on a fresh Debian and cannot be raised inside a namespace; without the
/// capability it asks for them and the kernel caps them.
const SOCKET_BUFFER: usize = 4 << 20;

/// Packets the kernel queues on the TUN device for the data plane to read, by default:
/// the kernel's 500. The TUN driver drops what does not fit (it never holds the sender
/// back), so a UDP-heavy VNF loses datagrams whenever the data-plane thread is off the
/// CPU for longer than the queue lasts. Measured on the 2-core VM, a 1 Gbit/s stream of
/// 1,200-byte datagrams (2 MiB application buffers) lost 5-14% with 500, 2-4% with 2,000
/// and 0-0.7% with 5,000; but in the SYN-flood test, where the attacker's agent reads
/// that queue full of flood packets, the gateway's 1 s averages of the 10 Mbit/s rule then
/// fell to 8.6-10.0 Mbit/s, under the test's 9.0 in 1 run of 3 (9.3-9.9 in 4 of 4 with
/// 500): the attacker's deeper bursts stall the gateway.
/// So the default stays, and `tun_queue` raises it where a VNF's own traffic needs it.
pub const TUN_TX_QUEUE: u32 = 500;
/// The range `tun_queue` accepts.
pub const TUN_QUEUE_RANGE: std::ops::RangeInclusive<u32> = 16..=65_536;
/// Longest wait for the QUIC connection to close cleanly at shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The TUN device with address `ip/prefix` (MTU 1420, virtio-net header and TSO/USO
/// offloads for the batched I/O) and a transmit queue of `queue` packets (see
/// [`TUN_TX_QUEUE`]), and the overlay network it is in.
pub fn open_tun(
    name: &str,
    ip: Ipv4Addr,
    prefix: u8,
    queue: u32,
) -> Result<(tun_rs::SyncDevice, IpAddr), AgentError> {
    let tun = tun_rs::DeviceBuilder::new()
        .name(name)
        .ipv4(ip, prefix, None)
        .mtu(1420)
        .offload(true)
        .tx_queue_len(queue)
        .build_sync()
        .map_err(|e| {
            AgentError::Device(format!(
                "creating TUN device {name} (root or CAP_NET_ADMIN needed): {e}"
            ))
        })?;
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

/// Sizes the socket's buffers to `size`: forced where the capability allows, asked for
/// (capped by the kernel) otherwise. Logs what it got.
pub fn size_buffers(s: &socket2::Socket, size: usize) {
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(s, size).is_err() {
        let _ = s.set_recv_buffer_size(size);
    }
    if sockopt::set_socket_send_buffer_size_force(s, size).is_err() {
        let _ = s.set_send_buffer_size(size);
    }
    let (rx, tx) = (s.recv_buffer_size(), s.send_buffer_size());
    match (rx, tx) {
        // The kernel reports twice what was set (its bookkeeping overhead).
        (Ok(rx), Ok(tx)) if rx >= size && tx >= size => {
            tracing::debug!(rx, tx, "underlay socket buffers");
        }
        (rx, tx) => tracing::warn!(
            ?rx,
            ?tx,
            wanted = size,
            "underlay socket buffers smaller than wanted (no CAP_NET_ADMIN, and \
             net.core.rmem_max/wmem_max below): bursts may be dropped"
        ),
    }
}

/// The non-blocking underlay sockets on `addr` (see [`Underlay`]), for a plane whose
/// receiver indexes start at `index_seed`.
pub fn underlay_socket(addr: SocketAddr, index_seed: u32) -> Result<Underlay, AgentError> {
    Underlay::bind(addr, SOCKET_BUFFER, crate::dataplane::index_tag(index_seed))
}

/// A fresh WireGuard static key (a new one every run: peers learn it through Sec-EM).
fn fresh_key() -> boringtun::x25519::StaticSecret {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let secret = boringtun::x25519::StaticSecret::from(key);
    zeroize::Zeroize::zeroize(&mut key);
    secret
}

/// Runs the agent of `config` until `shutdown` resolves (Ok) or it must stop (the error
/// says why; [`AgentError::exit_code`] maps it to the exit code).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let bundle = control::load_bundle(&config.bundle)?;
    tracing::info!(tenant = %bundle.tenant, vnf = %bundle.vnf, instance = %bundle.instance, "measuring {}", config.target.display());
    let target = config.target.clone();
    let measurement = tokio::task::spawn_blocking(move || control::measure(&target))
        .await
        .map_err(|e| AgentError::Other(e.to_string()))??;
    let mut chain = Chain::new(bundle.clone(), measurement, config.state_dir.clone())?;
    let secret = fresh_key();
    let wg_public = boringtun::x25519::PublicKey::from(&secret).to_bytes();

    let index_seed = rand::rng().next_u32();
    let udp = underlay_socket(config.underlay, index_seed)?;
    let endpoint = control::client(
        &bundle.ca_pem,
        config.liveness,
        control::lists_ipv6(&bundle),
    )?;
    let (conn, at) = control::connect(&endpoint, &bundle, control::preferred(&bundle)).await?;
    let enrolled = control::enroll(&conn, &mut chain, wg_public, config.underlay).await?;
    let overlay = enrolled.overlay;
    tracing::info!(overlay = %overlay.ip, prefix = overlay.prefix, "enrolled");
    let IpAddr::V4(ip4) = overlay.ip else {
        return Err(AgentError::Config(
            "IPv6 overlays are not supported yet".into(),
        ));
    };
    let (tun, net) = open_tun(&config.tun, ip4, overlay.prefix, config.tun_queue)?;
    let mut plane = Plane::new(
        PlaneConfig {
            secret,
            overlay: overlay.ip,
            overlay_net: (net, overlay.prefix),
            role: bundle.role,
            index_seed,
        },
        DefaultClock::default(),
    );
    let version = enrolled.catalog.version;
    let vnf = enrolled.catalog.vnf.to_string();
    plane.set_catalog(enrolled.catalog.clone());
    let (asks_tx, asks_rx) = tokio::sync::mpsc::channel(256);
    let (mut driver, handle) = Driver::start(
        plane,
        tun,
        udp,
        config.polling,
        crate::io::under_load(
            config.realtime_priority,
            bundle.role,
            config.polling,
            config.batch_under_load,
        ),
        asks_tx,
    )
    .map_err(|e| AgentError::Device(format!("starting the data plane: {e}")))?;
    let control = Control::new(
        chain,
        (conn.clone(), at),
        endpoint.clone(),
        handle.clone(),
        config.underlay,
        version,
    );
    let _ = control::ask(&conn, Body::CatalogAck(msg::CatalogAck { vnf, version })).await;

    let mut tasks: JoinSet<Result<(), AgentError>> = JoinSet::new();
    {
        let control = Arc::clone(&control);
        tasks.spawn(async move {
            control.serve_asks(asks_rx).await;
            Ok(())
        });
    }
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| AgentError::Device(format!("metrics address {addr}: {e}")))?;
        let h = handle.clone();
        let status = Arc::clone(&control.status);
        tasks.spawn(async move {
            crate::metrics::serve(listener, h, status).await;
            Ok(())
        });
    }
    // Pushes, with reconnection; only a final refusal (this instance revoked) stops it.
    {
        let control = Arc::clone(&control);
        tasks.spawn(async move {
            loop {
                match control.read_pushes().await {
                    Err(e) if e.is_terminal() => return Err(e),
                    Err(e) => tracing::warn!(error = %e, "push stream ended"),
                    Ok(()) => {}
                }
                control.reconnect().await?;
            }
        });
    }
    let interval = Duration::from_secs(u64::from(
        config
            .reattest_interval_secs
            .unwrap_or(enrolled.reattest_interval.as_secs() as u32)
            .max(1),
    ));
    {
        let control = Arc::clone(&control);
        let target = config.target.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match control.reattest(&target).await {
                    Ok(()) => {}
                    Err(e) if e.is_terminal() => return Err(e),
                    Err(e) => {
                        tracing::warn!(error = %e, "re-attestation failed; retrying next interval")
                    }
                }
            }
        });
    }

    tokio::pin!(shutdown);
    let result = tokio::select! {
        () = &mut shutdown => {
            tracing::info!("stopping");
            Ok(())
        }
        Some(done) = tasks.join_next() => match done {
            Ok(Err(e)) => {
                tracing::error!(error = %e, "stopping");
                Err(e)
            }
            Ok(Ok(())) => Err(AgentError::Other("a control task ended".into())),
            Err(e) => Err(AgentError::Other(format!("a control task failed: {e}"))),
        },
        e = driver.failed() => Err(AgentError::Device(format!("data plane I/O failed: {e}"))),
    };
    // One shutdown path: the tasks first (they hold the connection and the plane's
    // handle), then the connection, then the data plane.
    tasks.shutdown().await;
    control.shutdown();
    endpoint.close(0u32.into(), b"agent stopping");
    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
    drop(handle);
    let stopped = tokio::task::spawn_blocking(move || driver.stop())
        .await
        .map_err(|e| AgentError::Other(e.to_string()))?;
    if let Err(e) = stopped {
        tracing::warn!(error = %e, "the data plane did not stop cleanly");
    }
    result
}

/// `asmn-agent static`: the data plane with one static peer and no Sec-EM.
#[derive(Debug)]
pub struct StaticConfig {
    /// TUN device name.
    pub tun: String,
    /// This end's overlay address and prefix.
    pub address: (Ipv4Addr, u8),
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// This end's WireGuard private key.
    pub private_key: [u8; 32],
    /// The peer's public key.
    pub peer_public_key: [u8; 32],
    /// The peer's endpoint.
    pub peer_endpoint: SocketAddr,
    /// The peer's overlay address.
    pub peer_address: Ipv4Addr,
    /// The pair's preshared key.
    pub psk: asmn_shared::crypto::PresharedKey,
    /// How the data plane waits.
    pub polling: Polling,
    /// The TUN device's transmit queue, packets.
    pub tun_queue: u32,
    /// The data plane's real-time priority, if any.
    pub realtime_priority: Option<u8>,
    /// Whether the data plane may run `SCHED_BATCH` under load.
    pub batch_under_load: bool,
}

/// Runs the data plane of `config` until `shutdown` resolves.
pub async fn run_static(
    config: StaticConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let secret = boringtun::x25519::StaticSecret::from(config.private_key);
    let (ip, prefix) = config.address;
    let (tun, net) = open_tun(&config.tun, ip, prefix, config.tun_queue)?;
    let index_seed = rand::rng().next_u32();
    let udp = underlay_socket(config.listen, index_seed)?;
    let mut plane = Plane::new(
        PlaneConfig {
            secret,
            overlay: IpAddr::V4(ip),
            overlay_net: (net, prefix),
            role: Role::Vnf,
            index_seed,
        },
        DefaultClock::default(),
    );
    let catalog = asmn_shared::catalog::parse_catalog(
        "static",
        b"vnf: static\nsec_catalog:\n  default_action:\n    police:\n      ingress_policing_rate: 400000000\n      ingress_policing_burst: 4000000\n",
    )
    .map_err(|e| AgentError::Config(e.to_string()))?;
    plane.set_catalog(catalog);
    let vnf = VnfId::new("static").map_err(|e| AgentError::Config(e.to_string()))?;
    let spec = PeerSpec {
        id: InstanceKey::from_bytes(config.peer_public_key),
        vnf,
        overlay: IpAddr::V4(config.peer_address),
        endpoint: config.peer_endpoint,
        wg_public: config.peer_public_key,
        role: Role::Vnf,
        protected: false,
    };
    let (asks_tx, mut asks_rx) = tokio::sync::mpsc::channel(16);
    let (mut driver, handle) = Driver::start(
        plane,
        tun,
        udp,
        config.polling,
        crate::io::under_load(
            config.realtime_priority,
            Role::Vnf,
            config.polling,
            config.batch_under_load,
        ),
        asks_tx,
    )
    .map_err(|e| AgentError::Device(format!("starting the data plane: {e}")))?;
    let psk = config.psk;
    handle
        .call(move |p, now, out| p.install(now, spec, &psk, out))
        .await
        .map_err(|e| AgentError::Device(e.to_string()))?;
    tracing::info!("static data plane up");
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            // No Sec-EM to ask: destinations other than the peer stay unrouted.
            Some(_) = asks_rx.recv() => {}
            e = driver.failed() => break Err(AgentError::Device(format!("data plane I/O failed: {e}"))),
        }
    };
    drop(handle);
    let _ = tokio::task::spawn_blocking(move || driver.stop()).await;
    result
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    match term {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The path a static key file argument names, read.
pub fn read_key_file(what: &str, path: &PathBuf) -> Result<[u8; 32], AgentError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AgentError::Config(format!("reading {what} {}: {e}", path.display())))?;
    key32(what, &text)
}

/// A WireGuard key in base64.
pub fn key32(what: &str, b64: &str) -> Result<[u8; 32], AgentError> {
    use base64::Engine;
    let v = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| AgentError::Config(format!("{what}: not base64")))?;
    <[u8; 32]>::try_from(v.as_slice())
        .map_err(|_| AgentError::Config(format!("{what}: not 32 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether this process runs as root (the effective UID in /proc/self/status).
    fn root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let l = s.lines().find(|l| l.starts_with("Uid:"))?;
                l.split_whitespace().nth(2).map(|euid| euid == "0")
            })
            .unwrap_or(false)
    }

    #[test]
    fn the_underlay_socket_forces_its_buffers_past_the_kernel_cap() {
        if !root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root (CAP_NET_ADMIN) under CI=true"
            );
            eprintln!("skipped: needs root to force socket buffers");
            return;
        }
        // Twice the kernel's cap (whatever this machine has it at): asked for plainly, the
        // kernel would give the cap; forced, what was asked.
        let cap = |name: &str| -> usize {
            let path = format!("/proc/sys/net/core/{name}");
            std::fs::read_to_string(&path)
                .expect(&path)
                .trim()
                .parse()
                .expect("a number")
        };
        let want = 2 * cap("rmem_max").max(cap("wmem_max")).max(SOCKET_BUFFER);
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .expect("socket");
        size_buffers(&s, want);
        // The kernel reports twice what was set (its bookkeeping overhead).
        assert!(s.recv_buffer_size().expect("rcvbuf") >= 2 * want);
        assert!(s.send_buffer_size().expect("sndbuf") >= 2 * want);
        // The underlay socket gets at least its own size the same way.
        let u = underlay_socket("127.0.0.1:0".parse().expect("addr"), 7).expect("socket");
        for s in std::iter::once(&u.data).chain(&u.handshakes) {
            let s = socket2::SockRef::from(s);
            assert!(s.recv_buffer_size().expect("rcvbuf") >= SOCKET_BUFFER);
        }
    }
}
