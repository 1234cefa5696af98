//! Attacker and fault tools for the namespace tests, built from the libraries the agent
//! and Sec-EM use (the agent's control client, boringtun, Sec-EM's transport) rather
//! than mocks.
//!
//! [`rogue_peer`] is a compromised VNF: it holds a legitimately enrolled identity (its
//! bundle, its genuine image), builds a real WireGuard tunnel with its gateway, and then
//! does what no honest agent does: it sends, through that tunnel, packets for a VNF that
//! Sec-EM refuses it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use asmn_agent::control::{self, Chain};
use asmn_shared::policy::packet::{build, proto};
use asmn_shared::wire::msg::{self, Body};
use boringtun::noise::{Tunn, TunnResult};
use rand::RngCore;
use serde::Serialize;

use crate::error::{KitError, KitResult};

/// What the rogue peer did.
#[derive(Debug, Serialize)]
pub struct RogueResult {
    /// Its overlay address (from its enrollment).
    pub overlay: IpAddr,
    /// Whether its tunnel with the gateway came up (the gateway installed it as a peer).
    pub handshake: bool,
    /// Forged packets sent into that tunnel.
    pub sent: u64,
    /// Data packets that came back through the tunnel (answers from the target).
    pub received: u64,
}

/// `packet` with its IPv4 header checksum filled in.
fn with_header_checksum(mut packet: Vec<u8>) -> Vec<u8> {
    let c = crate::packets::checksum(&packet[..20], 0).to_be_bytes();
    packet[10..12].copy_from_slice(&c);
    packet
}

fn err(e: impl std::fmt::Display) -> KitError {
    KitError::Unexpected(e.to_string())
}

/// Enrolls with `bundle` and `image`, builds a tunnel with the gateway at overlay `via`
/// from `underlay`, and for `seconds` sends ICMP echo requests and TCP SYNs to the port
/// `port` of `to` through it.
pub async fn rogue_peer(
    bundle: &Path,
    image: &Path,
    underlay: SocketAddr,
    via: IpAddr,
    to: Ipv4Addr,
    port: u16,
    seconds: u64,
) -> KitResult<RogueResult> {
    let bundle = control::load_bundle(bundle).map_err(err)?;
    let measurement = control::measure(image).map_err(err)?;
    let state = tempfile::tempdir().map_err(err)?;
    let mut chain =
        Chain::new(bundle.clone(), measurement, state.path().to_path_buf()).map_err(err)?;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    let secret = boringtun::x25519::StaticSecret::from(key);
    let public = boringtun::x25519::PublicKey::from(&secret).to_bytes();
    let udp = UdpSocket::bind(underlay).map_err(err)?;
    udp.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(err)?;
    let endpoint = control::client(
        &bundle.ca_pem,
        asmn_channel::tls::Liveness::default(),
        false,
    )
    .map_err(err)?;
    let (conn, _) = control::connect(&endpoint, &bundle, 0).await.map_err(err)?;
    let enrolled = control::enroll(&conn, &mut chain, public, underlay)
        .await
        .map_err(err)?;
    let IpAddr::V4(me) = enrolled.overlay.ip else {
        return Err(KitError::Unexpected("an IPv6 overlay".into()));
    };
    // Verify the gateway, as an honest agent does: Sec-EM asks the gateway to verify us
    // back, and it installs our tunnel.
    let answer = control::ask(
        &conn,
        Body::VerifyPeer(msg::VerifyPeerRequest {
            overlay: via.to_string(),
            source: String::new(),
        }),
    )
    .await
    .map_err(err)?;
    let Body::Peer(p) = answer else {
        return Err(KitError::Unexpected(format!(
            "the gateway was refused: {answer:?}"
        )));
    };
    let gw = asmn_shared::wire::Peer::try_from(&p).map_err(err)?;
    let psk = chain.preshared_key(&gw).map_err(err)?;
    let mut tunn = Tunn::new(
        secret,
        boringtun::x25519::PublicKey::from(gw.wg_public_key),
        Some(*psk.expose()),
        None,
        1,
        None,
    );
    let mut buf = vec![0u8; 2048];
    let mut rx = vec![0u8; 2048];
    // The handshake, retried while the gateway installs us (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut handshake = false;
    while !handshake && Instant::now() < deadline {
        if let TunnResult::WriteToNetwork(p) = tunn.format_handshake_initiation(&mut buf, true) {
            let _ = udp.send_to(p, gw.endpoint);
        }
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let Ok((n, from)) = udp.recv_from(&mut rx) else {
                continue;
            };
            if let TunnResult::WriteToNetwork(p) =
                tunn.decapsulate(Some(from.ip()), &rx[..n], &mut buf)
            {
                let _ = udp.send_to(p, gw.endpoint);
            }
            if tunn.stats().0.is_some() {
                handshake = true;
                break;
            }
        }
    }
    let mut result = RogueResult {
        overlay: enrolled.overlay.ip,
        handshake,
        sent: 0,
        received: 0,
    };
    if !handshake {
        return Ok(result);
    }
    // The forged route: packets for `to`, from our own (genuine) address, through the
    // gateway. Two packets a round, a few hundred rounds a second, for `seconds`.
    udp.set_read_timeout(Some(Duration::from_millis(2)))
        .map_err(err)?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut seq = 0u16;
    while Instant::now() < end {
        seq = seq.wrapping_add(1);
        let s = seq.to_be_bytes();
        let mut icmp = [8, 0, 0, 0, 0x42, 0x42, s[0], s[1]];
        let c = crate::packets::checksum(&icmp, 0).to_be_bytes();
        icmp[2..4].copy_from_slice(&c);
        // Checksums right, so that a kernel that gets them answers (the echo requests
        // to an admitted destination must come back for the test to mean anything).
        let packets = [
            with_header_checksum(build::ipv4(me, to, proto::ICMP, &icmp)),
            with_header_checksum(build::ipv4(
                me,
                to,
                proto::TCP,
                &build::tcp(40000 + seq % 1000, port, 0x02, 0),
            )),
        ];
        for p in &packets {
            if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(p, &mut buf) {
                let _ = udp.send_to(d, gw.endpoint);
                result.sent += 1;
            }
        }
        // Whatever comes back (nothing should).
        if let Ok((n, from)) = udp.recv_from(&mut rx) {
            match tunn.decapsulate(Some(from.ip()), &rx[..n], &mut buf) {
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                    result.received += 1
                }
                TunnResult::WriteToNetwork(p) => {
                    let _ = udp.send_to(p, gw.endpoint);
                }
                _ => {}
            }
        }
    }
    conn.close(0u32.into(), b"done");
    Ok(result)
}

/// A Sec-EM stand-in for fault tests: on `listen`, with the tenant's server certificate
/// from `pki` (so agents connect to it as to Sec-EM), it answers every request with
/// `Unavailable` (what Sec-EM says when its store is down) for `seconds`. How many
/// requests it answered.
pub async fn unavailable_sec_em(pki: &Path, listen: SocketAddr, seconds: u64) -> KitResult<u64> {
    use asmn_shared::wire;
    let read = |name: &str| {
        std::fs::read_to_string(pki.join(name)).map_err(KitError::file(pki.join(name)))
    };
    let endpoint = asmn_channel::tls::server(
        listen,
        &read("ca.pem")?,
        &read("server.pem")?,
        &read("server.key")?,
        &asmn_channel::tls::ServerLimits::default(),
    )
    .map_err(err)?;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let serve = {
        let endpoint = endpoint.clone();
        let answered = std::sync::Arc::clone(&answered);
        async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Some(incoming) = endpoint.accept().await {
                let answered = std::sync::Arc::clone(&answered);
                conns.spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let Ok(bytes) =
                            recv.read_to_end(wire::FRAME_HEADER + wire::MAX_FRAME).await
                        else {
                            continue;
                        };
                        let id = asmn_channel::call::decode_one_frame(&bytes)
                            .map_or(0, |e| e.request_id);
                        let reply = msg::Envelope {
                            request_id: id,
                            body: Some(Body::Refused(msg::Refusal {
                                code: msg::RefusalCode::Unavailable as i32,
                                message: "the store is unavailable (fault test)".into(),
                            })),
                        };
                        if let Ok(frame) = wire::encode_frame(&reply) {
                            let _ = send.write_all(&frame).await;
                            let _ = send.finish();
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(seconds), serve).await;
    endpoint.close(0u32.into(), b"fault over");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    Ok(answered.load(std::sync::atomic::Ordering::Relaxed))
}
