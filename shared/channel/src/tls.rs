//! TLS 1.3 (rustls, ring) and the QUIC endpoints of Sec-EM and its clients.
//!
//! Operators present an admin client certificate made by `sec-em init`; agents present
//! none and prove themselves by their chain reveals. Client certificates, when presented,
//! must chain to the controller CA. 0-RTT is off: a replayable first flight would replay
//! reveals.
//!
//! Sec-EM's endpoint is sized for peers it does not know yet: a connection starts with
//! [`ServerLimits::initial_streams`] streams and a receive window of that many
//! [`STRANGER_REQUEST`]s (what an enrollment needs), and only [`open_up`] (after an admin
//! certificate or an enrollment) gives it more. A stream's receive window is one frame,
//! the most a request may be.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use asmn_shared::wire::{FRAME_HEADER, MAX_FRAME};
use quinn::VarInt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ALPN;

/// Why TLS material or an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key does not load.
    #[error("TLS material: {0}")]
    Material(String),
    /// The socket could not be opened.
    #[error("socket: {0}")]
    Socket(String),
}

fn material(e: impl std::fmt::Display) -> TlsError {
    TlsError::Material(e.to_string())
}

fn socket(e: impl std::fmt::Display) -> TlsError {
    TlsError::Socket(e.to_string())
}

/// The crypto provider every ASMN TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate of a PEM text (at least one).
pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(material)?;
    if v.is_empty() {
        return Err(material("no certificate in PEM"));
    }
    Ok(v)
}

/// The private key of a PEM text.
pub fn private_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(material)
}

/// A root store holding the certificates of `ca_pem`.
pub fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(material)?;
    }
    Ok(Arc::new(roots))
}

/// The largest request or answer on one stream: one frame.
pub const STREAM_WINDOW: u32 = (FRAME_HEADER + MAX_FRAME) as u32;

/// The largest request of a peer that has not proved itself: an enrollment (a reveal, a
/// D-H value of at most 1 KiB, names) is under 2 KiB.
pub const STRANGER_REQUEST: usize = 4096;

/// What a connection may hold before it has proved anything, and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Streams a connection may have open at once before [`open_up`].
    pub initial_streams: u32,
    /// Streams after [`open_up`] (an admin, an enrolled agent).
    pub open_streams: u32,
    /// A connection silent this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            initial_streams: 2,
            open_streams: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Gives connection `c` the streams and receive window of a peer that proved itself.
pub fn open_up(c: &quinn::Connection, limits: &ServerLimits) {
    c.set_max_concurrent_bi_streams(limits.open_streams.into());
    // Most requests are far below a frame: a window of 16 frames keeps 64 streams busy.
    c.set_receive_window(VarInt::from_u32(STREAM_WINDOW.saturating_mul(16)));
}

/// Sec-EM's endpoint on `listen` with its certificate and key; client certificates, when
/// presented, must chain to `ca_pem`.
pub fn server(
    listen: SocketAddr,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    limits: &ServerLimits,
) -> Result<quinn::Endpoint, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(material)?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(material)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem)?, private_key(key_pem)?)
        .map_err(material)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(crypto).map_err(material)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(limits.initial_streams.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.stream_receive_window(STREAM_WINDOW.into());
    transport.receive_window(VarInt::from_u32(
        (STRANGER_REQUEST as u32).saturating_mul(limits.initial_streams.max(1)),
    ));
    // What Sec-EM buffers towards one peer that does not read: four frames.
    transport.send_window(u64::from(STREAM_WINDOW) * 4);
    transport.max_idle_timeout(Some(limits.idle_timeout.try_into().map_err(socket)?));
    config.transport_config(Arc::new(transport));
    // Handshakes not yet accepted: bounded in count and in buffered bytes.
    config.max_incoming(4096);
    config.incoming_buffer_size(16 << 10);
    config.incoming_buffer_size_total(16 << 20);
    let runtime = quinn::default_runtime().ok_or_else(|| socket("no async runtime"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(listen)?,
        runtime,
    )
    .map_err(socket)
}

/// Socket buffers of Sec-EM's and agents' QUIC sockets: a burst of handshakes (every agent
/// of a tenant reconnecting at once) must not overflow the kernel's default 208 KiB and
/// wait for retransmission timers. The kernel caps it at `net.core.rmem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TlsError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(socket)?;
    // Best effort: a smaller buffer still works.
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // Dual stack: IPv4 peers too (as v4-mapped addresses).
        s.set_only_v6(false).map_err(socket)?;
    }
    s.bind(&addr.into()).map_err(socket)?;
    Ok(s.into())
}

/// How a client notices that its controller is gone.
///
/// A controller that crashes (or a host that loses power) says nothing: the client
/// learns of it only when the connection has been silent for `dead_after`. Keep-alives
/// every `keep_alive` make the controller answer, so a live connection is never silent
/// that long. Both ends use the smaller of their idle timeouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Liveness {
    /// Interval of keep-alive probes.
    pub keep_alive: Duration,
    /// Silence after which the connection is declared dead.
    pub dead_after: Duration,
}

impl Default for Liveness {
    /// Keep-alives every 15 s and a connection dead after 60 s of silence (an operator's
    /// tool; agents fail over faster, see [`Liveness::FAILOVER`]).
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(15),
            dead_after: Duration::from_secs(60),
        }
    }
}

impl Liveness {
    /// An agent's: a dead controller is noticed within 450 ms, so the agent is on another
    /// replica, and hears of changes made meanwhile, within a second. It costs each agent
    /// about 7 small packets a second each way (7,000 for 1,000 agents: a few percent of
    /// one core for Sec-EM).
    pub const FAILOVER: Liveness = Liveness {
        keep_alive: Duration::from_millis(150),
        dead_after: Duration::from_millis(450),
    };
}

/// A client endpoint bound to `bind` that trusts only `ca_pem` (pinned), presenting
/// `identity` (a client certificate and key, PEM) when given. Idle connections are kept
/// open by keep-alives (Sec-EM closes connections silent for 60 s).
pub fn client_on(
    bind: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<quinn::Endpoint, TlsError> {
    client_with(bind, ca_pem, identity, Liveness::default())
}

/// [`client_on`] with the given [`Liveness`].
pub fn client_with(
    bind: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    liveness: Liveness,
) -> Result<quinn::Endpoint, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(material)?
        .with_root_certificates(roots(ca_pem)?);
    let mut crypto = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(certs(cert)?, private_key(key)?)
            .map_err(material)?,
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.enable_early_data = false;
    let quic = QuicClientConfig::try_from(crypto).map_err(material)?;
    let runtime = quinn::default_runtime().ok_or_else(|| socket("no async runtime"))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket(bind)?,
        runtime,
    )
    .map_err(socket)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(liveness.keep_alive));
    transport.max_idle_timeout(Some(liveness.dead_after.try_into().map_err(socket)?));
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// [`client_on`] an ephemeral port of every IPv4 address.
pub fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> Result<quinn::Endpoint, TlsError> {
    client_on(SocketAddr::from(([0, 0, 0, 0], 0)), ca_pem, identity)
}

/// The client certificate the peer of `c` presented (it chains to the CA: the verifier
/// refused any other), if any.
pub fn peer_certificate(c: &quinn::Connection) -> Option<CertificateDer<'static>> {
    c.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.into_iter().next())
}
