//! QUIC (quinn + rustls, TLS 1.3, ring) between Sec-EM, its agents and `asmnctl`.
//!
//! One request per bidirectional stream: the client writes one frame (a
//! `wire::msg::Envelope`, at most `wire::MAX_FRAME` bytes), finishes its side, and reads
//! one frame back. Operators present the admin client certificate made by `sec-em init`;
//! agents present none and prove themselves by their chain reveals. 0-RTT is off: a
//! replayable first flight would replay reveals.

use std::net::SocketAddr;
use std::sync::Arc;

use asmn_shared::wire::{self, FRAME_HEADER, MAX_FRAME, msg};
use prost::Message;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol of ASMN's control channel.
pub const ALPN: &[u8] = b"asmn/1";

/// Why a connection or request failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate or key does not load.
    #[error("TLS material: {0}")]
    Tls(String),
    /// The socket or connection failed.
    #[error("connection: {0}")]
    Connection(String),
    /// The peer sent something that is not a frame.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
}

fn tls(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

fn conn(e: impl std::fmt::Display) -> TransportError {
    TransportError::Connection(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let v: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(tls)?;
    if v.is_empty() {
        return Err(tls("no certificate in PEM"));
    }
    Ok(v)
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c).map_err(tls)?;
    }
    Ok(Arc::new(roots))
}

/// A server endpoint on `listen` with its certificate and key; client certificates, when
/// presented, must chain to `ca_pem`.
pub fn server(
    listen: SocketAddr,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::Endpoint, TransportError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_pem)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(tls)?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(cert_pem)?,
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(tls)?,
        )
        .map_err(tls)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(crypto).map_err(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(64u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.max_idle_timeout(Some(
        std::time::Duration::from_secs(60)
            .try_into()
            .map_err(conn)?,
    ));
    config.transport_config(Arc::new(transport));
    let runtime = quinn::default_runtime().ok_or_else(|| conn("no async runtime"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        udp_socket(listen)?,
        runtime,
    )
    .map_err(conn)
}

/// Socket buffers of Sec-EM's and agents' QUIC sockets: a burst of handshakes (every agent
/// of a tenant reconnecting at once) must not overflow the kernel's default 208 KiB and
/// wait for retransmission timers. The kernel caps it at `net.core.rmem_max`.
pub const SOCKET_BUFFER: usize = 4 << 20;

fn udp_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(conn)?;
    // Best effort: a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into()).map_err(conn)?;
    Ok(socket.into())
}

/// A client endpoint that trusts only `ca_pem` (pinned), presenting `identity` (the admin
/// certificate and key) when given.
pub fn client(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<quinn::Endpoint, TransportError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots(ca_pem)?);
    let mut crypto = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certs(cert)?,
                PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(tls)?,
            )
            .map_err(tls)?,
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    crypto.enable_early_data = false;
    let quic = QuicClientConfig::try_from(crypto).map_err(tls)?;
    let runtime = quinn::default_runtime().ok_or_else(|| conn("no async runtime"))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket("0.0.0.0:0".parse().map_err(conn)?)?,
        runtime,
    )
    .map_err(conn)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    // An idle agent keeps its connection (and its push stream) open: Sec-EM closes
    // connections idle for 60 s.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(15)));
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Whether the peer of `c` presented a client certificate that chains to our CA (the
/// verifier refused any that does not).
pub fn is_admin(c: &quinn::Connection) -> bool {
    c.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .is_some_and(|chain| !chain.is_empty())
}

/// Sends one request on a new stream and reads the answer.
pub async fn request(
    c: &quinn::Connection,
    env: &msg::Envelope,
) -> Result<msg::Envelope, TransportError> {
    let (mut send, mut recv) = c.open_bi().await.map_err(conn)?;
    send.write_all(&wire::encode_frame(env)?)
        .await
        .map_err(conn)?;
    send.finish().map_err(conn)?;
    let bytes = recv
        .read_to_end(FRAME_HEADER + MAX_FRAME)
        .await
        .map_err(conn)?;
    Ok(decode_one_frame(&bytes)?)
}

/// Decodes exactly one frame (and nothing after it).
pub fn decode_one_frame(bytes: &[u8]) -> Result<msg::Envelope, wire::WireError> {
    let mut d = wire::FrameDecoder::new();
    d.push(bytes)?;
    let frame = d
        .next_frame()?
        .ok_or(wire::WireError::Unexpected("an incomplete frame"))?;
    if d.pending() != 0 {
        return Err(wire::WireError::Unexpected("bytes after the frame"));
    }
    wire::decode_envelope(&frame)
}

/// Encodes an envelope without the frame (for tests that corrupt it).
pub fn encode_payload(env: &msg::Envelope) -> Vec<u8> {
    env.encode_to_vec()
}
