//! The data plane as a sans-I/O state machine (DESIGN.md §3.5), in the way `quinn-proto`
//! and boringtun's `noise` are written: [`Plane`] takes packets from the TUN device,
//! datagrams from the socket, timer ticks and control-plane changes, each with `now`, and
//! writes what must be sent or delivered into an [`Outbox`]. It never touches a socket, a
//! device or the system clock; the driver ([`crate::io`]) owns those and is its only
//! caller. Its policy limiters run on the clock `C` (governor's), so tests drive the whole
//! plane under a fake clock.
//!
//! - TUN to UDP ([`Plane::handle_tun`]): the destination picks the peer, or the gateway
//!   it is reached through. A tenant address without a route waits (bounded, [`queue`])
//!   and Sec-EM is asked ([`Ask::Verify`]).
//! - UDP to TUN ([`Plane::handle_datagram`]): handshakes pass mac1 and, under load, the
//!   cookie check of a shared [`RateLimiter`] before any Diffie-Hellman; the peer's
//!   endpoint moves only on an authenticated packet. Cryptokey routing: a decrypted packet
//!   is accepted only if its inner source is the peer's overlay address, or, from this
//!   VNF's gateway, an address Sec-EM verified as routed through that gateway. What is
//!   accepted passes this VNF's Sec-catalog, keyed by the inner source's VNF (relayed
//!   packets too).
//! - On a gateway, a packet for another VNF is forwarded only between a pair Sec-EM
//!   admitted ([`Ask::Admit`], answered by [`Plane::admit`]), and to a VNF it protects
//!   only under that VNF's catalog (nothing while it has none).
//! - A peer is a slot per instance ([`peers`]): a new WireGuard key for a known instance
//!   replaces its tunnel; [`Plane::remove`] drops every key, index, route, admission and
//!   queued packet of the instance.
//!
//! What the plane does not do: verify peers (the control side asks Sec-EM and calls
//! [`Plane::install`]), or decide when to poll (the driver).

mod outbox;
mod peers;
mod queue;
mod routing;
#[cfg(test)]
mod tests;
mod warm;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asmn_shared::catalog::SecCatalog;
use asmn_shared::crypto::PresharedKey;
use asmn_shared::ids::{InstanceKey, Role, VnfId};
use asmn_shared::policy::{CounterSnapshot, Decision, Policing, PolicyEngine, SourceKey};
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use governor::clock::Clock;
use zeroize::Zeroize;

pub use outbox::{
    GSO_BYTES, Group, HANDSHAKE, OVERHEAD, Outbox, PACKET, Sends, TUN_HEADER, TunBatch,
};
pub use peers::{PeerSpec, RETIRE_AFTER, ROTATION_LIMIT, index_tag};
pub use queue::{QUEUE_KEYS, QUEUE_PER_KEY, QUEUE_WAIT, REFUSED_FOR, WaitKey};
pub use routing::in_net;
pub use warm::Warmer;

use peers::{Peer, PeerTable, Retiring, Slot, Tunnel};
use queue::{Queued, WaitQueue};
use routing::{Route, Routes};

/// Handshake messages per second (with a valid mac1) that the plane processes before it
/// is under load and answers with cookies instead (boringtun's device uses the same).
pub const HANDSHAKES_PER_SECOND: u64 = 100;
/// Under load, handshake messages per second and source address that are looked at (and
/// answered with a cookie); the rest from that address are dropped unread. A peer needs
/// one cookie (valid two minutes); a flood from one address costs no more than junk.
pub const LOADED_PER_SOURCE: u32 = 4;
/// Under load, source addresses tracked per second; beyond, handshakes from new addresses
/// share one budget of [`LOADED_PER_SOURCE`] (a flood from spoofed addresses cannot grow
/// memory: about 3 MiB at most).
pub const LOADED_SOURCES: usize = 65_536;
/// On a gateway: pairs one source may have waiting for Sec-EM's admission at once (one
/// peer spraying destinations cannot fill the queue for everyone).
pub const PAIRS_PER_SOURCE: usize = 16;
/// Revoked instances remembered, so that an answer from Sec-EM already on its way cannot
/// bring one back (the oldest are forgotten first; revocation is final at Sec-EM too).
pub const REVOKED_KEPT: usize = 65_536;
/// Persistent keepalive of every tunnel, in seconds.
pub const KEEPALIVE: u16 = 25;

/// WireGuard's message type of data (the first byte of a datagram).
const DATA: u8 = 4;
/// A data message's header before the ciphertext (type, receiver, counter).
const DATA_HEADER: usize = 16;

/// Counters of the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaneCounters {
    /// Packets from TUN sent into a tunnel.
    pub tx_packets: u64,
    /// Packets from tunnels delivered to TUN.
    pub rx_packets: u64,
    /// Packets a gateway forwarded from one tunnel into another.
    pub forwarded: u64,
    /// Datagrams for no installed peer (unknown index or static key).
    pub unknown_peer: u64,
    /// Handshake messages dropped before any Diffie-Hellman: a wrong mac1, or under load
    /// without a source address to send a cookie to.
    pub bad_mac: u64,
    /// Cookie replies sent instead of processing a handshake (under load).
    pub cookie_replies: u64,
    /// Handshake messages dropped unread under load: their source address had used its
    /// budget for the second.
    pub handshakes_shed: u64,
    /// Datagrams a tunnel rejected (failed decryption, replay, a handshake that did not
    /// verify).
    pub rejected: u64,
    /// Datagrams that are not WireGuard messages, and packets without an IP header.
    pub malformed: u64,
    /// Decrypted packets whose inner source is not the peer's (cryptokey routing).
    pub spoofed: u64,
    /// Packets dropped by a Sec-catalog (also: no catalog in force, fail closed).
    pub policy_dropped: u64,
    /// Packets a gateway dropped because Sec-EM did not admit the pair.
    pub not_admitted: u64,
    /// Packets dropped waiting for Sec-EM (queue full, refused, or timed out).
    pub queue_dropped: u64,
    /// Packets to addresses outside the tenant, or with nowhere to go.
    pub no_route: u64,
    /// Inner packets larger than [`PACKET`], dropped.
    pub oversize: u64,
    /// Packets dropped because a batch had no room left.
    pub outbox_full: u64,
    /// Packets lost in I/O: unreadable from TUN, or not sent (socket buffer full).
    /// Counted by the driver.
    pub io_dropped: u64,
}

/// What the plane asks of the control side (it is answered by a later call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Verify the instance at this overlay address (VerifyPeer): answered by
    /// [`Plane::install`] or [`Plane::route_via`], or [`Plane::refuse`].
    Verify(IpAddr),
    /// On a gateway: may these two instances talk through this gateway? Answered by
    /// [`Plane::admit`] or [`Plane::refuse_pair`].
    Admit {
        /// The sender's overlay address.
        src: IpAddr,
        /// The destination's.
        dst: IpAddr,
    },
}

/// What [`Plane::install`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// A new peer.
    New,
    /// Installed already with this key and PSK: its sessions are kept.
    Unchanged,
    /// Same key, new PSK: the old tunnel carries the flow until the new one is up.
    Rotated,
    /// A new WireGuard key for a known instance (its agent restarted): the old tunnel and
    /// its keys are gone.
    Replaced,
    /// Refused: another installed instance holds this WireGuard key.
    KeyConflict,
    /// Refused: the instance was revoked (an answer that was on its way when the
    /// revocation came).
    Revoked,
}

/// One installed peer, for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    /// Its identity.
    pub id: InstanceKey,
    /// Its VNF.
    pub vnf: VnfId,
    /// Its overlay address.
    pub overlay: IpAddr,
    /// Its endpoint now.
    pub endpoint: SocketAddr,
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Time since the last handshake.
    pub last_handshake: Option<Duration>,
}

/// Everything the metrics show, taken at once.
#[derive(Debug, Clone, Default)]
pub struct PlaneStats {
    /// Counters.
    pub counters: PlaneCounters,
    /// Per-rule counters of this VNF's catalog.
    pub policy: Option<CounterSnapshot>,
    /// Installed peers.
    pub peers: Vec<PeerStats>,
    /// Routes (direct and through gateways).
    pub routes: usize,
    /// Pairs admitted for forwarding (gateway).
    pub admitted_pairs: usize,
    /// Packets waiting for Sec-EM.
    pub waiting: usize,
    /// Receiver indexes in use.
    pub indexes: usize,
}

/// What a plane is, fixed at its start.
pub struct PlaneConfig {
    /// This agent's WireGuard static key.
    pub secret: x25519::StaticSecret,
    /// This instance's overlay address.
    pub overlay: IpAddr,
    /// The tenant's overlay network.
    pub overlay_net: (IpAddr, u8),
    /// This instance's role.
    pub role: Role,
    /// Where receiver indexes start (random); its [`index_tag`] marks the data messages
    /// sent to this plane.
    pub index_seed: u32,
}

impl std::fmt::Debug for PlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaneConfig")
            .field("overlay", &self.overlay)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// Where a decrypted packet came from.
enum Source {
    /// The peer in this slot, itself.
    Direct(Slot),
    /// Relayed from an instance of `vnf` by the gateway in slot `gateway`.
    Relayed { vnf: VnfId, gateway: Slot },
}

/// The data plane of one agent.
pub struct Plane<C: Clock + Clone> {
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    overlay: IpAddr,
    overlay_net: (IpAddr, u8),
    role: Role,
    clock: C,
    peers: PeerTable,
    routes: Routes,
    waiting: WaitQueue,
    /// This VNF's catalog (None: nothing passes).
    policy: Option<PolicyEngine<C>>,
    /// On a gateway: the catalogs of the VNFs it protects.
    protected: HashMap<VnfId, PolicyEngine<C>>,
    /// mac1 and cookies for every handshake, before any Diffie-Hellman.
    limiter: Arc<RateLimiter>,
    /// The key of mac1 (BLAKE2s of the label and our public key), checked first.
    mac1_key: [u8; 32],
    /// Instances revoked, newest last.
    revoked: (
        std::collections::HashSet<InstanceKey>,
        VecDeque<InstanceKey>,
    ),
    /// Handshake messages seen in the current second, and under load, per source.
    load: HandshakeLoad,
    counters: PlaneCounters,
    /// Packets a rate limiter dropped (the driver's sign of a load whose timing matters).
    limited: u64,
    asks: VecDeque<Ask>,
    /// Scratch for handshakes and queued packets.
    scratch: Vec<u8>,
}

impl<C: Clock + Clone> std::fmt::Debug for Plane<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("overlay", &self.overlay)
            .field("role", &self.role)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

/// Handshake messages seen per second, to shed a flood before any cryptography.
#[derive(Debug, Default)]
struct HandshakeLoad {
    second: Option<Instant>,
    seen: u64,
    per_source: HashMap<IpAddr, u32>,
    overflow: u32,
}

impl HandshakeLoad {
    /// Whether a handshake message from `ip` is looked at.
    fn admit(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self
            .second
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1))
        {
            self.second = Some(now);
            self.seen = 0;
            self.per_source.clear();
            self.overflow = 0;
        }
        self.seen += 1;
        if self.seen <= HANDSHAKES_PER_SECOND {
            return true;
        }
        let room = self.per_source.len() < LOADED_SOURCES;
        let n = if room || self.per_source.contains_key(&ip) {
            self.per_source.entry(ip).or_insert(0)
        } else {
            &mut self.overflow
        };
        *n += 1;
        *n <= LOADED_PER_SOURCE
    }
}

/// Encrypts `packet` with `tunn` for `to` into `net`. Without a session boringtun keeps
/// the packet and may give a handshake initiation instead; whether it did keep it.
fn encrypt(
    tunn: &mut Tunn,
    to: SocketAddr,
    packet: &[u8],
    net: &mut Sends,
    counters: &mut PlaneCounters,
) -> bool {
    // boringtun panics on a destination smaller than this.
    if !net.fits((packet.len() + OVERHEAD).max(HANDSHAKE)) {
        counters.outbox_full += 1;
        return false;
    }
    let space = net.space();
    let base = space.as_ptr() as usize;
    let (offset, len, kept) = match tunn.encapsulate(packet, space) {
        TunnResult::WriteToNetwork(b) => (
            b.as_ptr() as usize - base,
            b.len(),
            b.first() != Some(&DATA),
        ),
        _ => return true,
    };
    if offset != 0 {
        net.space().copy_within(offset..offset + len, 0);
    }
    net.commit(to, len);
    kept
}

/// Sends what boringtun queued in `tunn` while it had no session (it hands them out on
/// `decapsulate` with an empty datagram).
fn drain(
    tunn: &mut Tunn,
    to: SocketAddr,
    net: &mut Sends,
    scratch: &mut [u8],
    c: &mut PlaneCounters,
) {
    for _ in 0..QUEUE_PER_KEY {
        match tunn.decapsulate(None, &[], scratch) {
            TunnResult::WriteToNetwork(p) => {
                if !net.push(to, p) {
                    c.outbox_full += 1;
                }
            }
            _ => break,
        }
    }
}

impl<C: Clock + Clone> Plane<C> {
    /// A plane with no peers and no catalog (nothing passes until one is set).
    pub fn new(config: PlaneConfig, clock: C) -> Plane<C> {
        let public = x25519::PublicKey::from(&config.secret);
        Plane {
            limiter: Arc::new(RateLimiter::new(&public, HANDSHAKES_PER_SECOND)),
            mac1_key: {
                use blake2::Digest;
                blake2::Blake2s256::new()
                    .chain_update(b"mac1----")
                    .chain_update(public.as_bytes())
                    .finalize()
                    .into()
            },
            revoked: Default::default(),
            load: HandshakeLoad::default(),
            secret: config.secret,
            public,
            overlay: config.overlay,
            overlay_net: config.overlay_net,
            role: config.role,
            clock,
            peers: PeerTable::new(config.index_seed),
            routes: Routes::default(),
            waiting: WaitQueue::default(),
            policy: None,
            protected: HashMap::new(),
            counters: PlaneCounters::default(),
            limited: 0,
            asks: VecDeque::new(),
            scratch: vec![0; 65_536],
        }
    }

    /// Whether a handshake message carries a valid mac1 for our key (constant time).
    fn valid_mac1(&self, datagram: &[u8]) -> bool {
        use blake2::digest::Mac;
        let Some(split) = datagram.len().checked_sub(32) else {
            return false;
        };
        let (msg, macs) = datagram.split_at(split);
        let Ok(mut mac) =
            blake2::Blake2sMac::<blake2::digest::consts::U16>::new_from_slice(&self.mac1_key)
        else {
            return false;
        };
        mac.update(msg);
        mac.verify_slice(&macs[..16]).is_ok()
    }

    /// This agent's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// This agent's overlay address.
    pub fn overlay(&self) -> IpAddr {
        self.overlay
    }

    /// This agent's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The next question for the control side.
    pub fn poll_ask(&mut self) -> Option<Ask> {
        self.asks.pop_front()
    }

    fn ask(&mut self, a: Ask) {
        // Bounded by the wait queue: an ask is made only for a key's first packet.
        self.asks.push_back(a);
    }

    /// Queues `packet` under `key` and asks `ask` if it is the first (and the key was not
    /// refused recently).
    fn wait(&mut self, now: Instant, key: WaitKey, packet: &[u8], ask: Ask) {
        if self.waiting.refused(&key, now) {
            match key {
                WaitKey::Pair(..) => self.counters.not_admitted += 1,
                _ => self.counters.queue_dropped += 1,
            }
            return;
        }
        match self.waiting.push(key, now, packet) {
            Queued::First => self.ask(ask),
            Queued::Behind => {}
            Queued::Dropped => self.counters.queue_dropped += 1,
        }
    }

    // ----- TUN to UDP -----

    /// One packet read from the TUN device.
    pub fn handle_tun(&mut self, now: Instant, packet: &[u8], out: &mut Outbox) {
        let Some(dst) = Tunn::dst_address(packet) else {
            self.counters.malformed += 1;
            return;
        };
        match self.routes.get(&dst).map(Route::slot) {
            Some(slot) => {
                if let Some(peer) = self.peers.get_mut(slot) {
                    let to = peer.spec.endpoint;
                    peer.tx_bytes += packet.len() as u64;
                    peer.queued |=
                        encrypt(peer.sending(), to, packet, &mut out.net, &mut self.counters);
                    self.counters.tx_packets += 1;
                }
            }
            None if in_net(dst, self.overlay_net) && dst != self.overlay => {
                self.wait(now, WaitKey::To(dst), packet, Ask::Verify(dst));
            }
            None => self.counters.no_route += 1,
        }
    }

    // ----- UDP to TUN -----

    /// One datagram from the underlay socket, from `from`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        datagram: &[u8],
        out: &mut Outbox,
    ) {
        let Ok(packet) = Tunn::parse_incoming_packet(datagram) else {
            self.counters.malformed += 1;
            return;
        };
        let (slot, index) = match packet {
            Packet::HandshakeInit(_) | Packet::HandshakeResponse(_) => {
                // mac1 first (one keyed BLAKE2s): a sender that does not know our public
                // key costs nothing more, and does not count towards the load.
                if !self.valid_mac1(datagram) {
                    self.counters.bad_mac += 1;
                    return;
                }
                // Under load, a source that used its budget for the second is not read
                // further: a flood from one address costs about what junk costs.
                if !self.load.admit(now, from.ip()) {
                    self.counters.handshakes_shed += 1;
                    return;
                }
                // The cheap checks first: mac1, and under load the cookie (mac2). Only a
                // handshake that passes them costs a Diffie-Hellman.
                let mut cookie = [0u8; 64];
                let verified =
                    match self
                        .limiter
                        .verify_packet(Some(from.ip()), datagram, &mut cookie)
                    {
                        Ok(p) => p,
                        Err(TunnResult::WriteToNetwork(reply)) => {
                            // Under load: the sender must prove it owns its address first. The
                            // reply (64 bytes) is smaller than what came (148 or 92).
                            if out.net.push(from, reply) {
                                self.counters.cookie_replies += 1;
                            } else {
                                self.counters.outbox_full += 1;
                            }
                            return;
                        }
                        Err(_) => {
                            self.counters.bad_mac += 1;
                            return;
                        }
                    };
                match verified {
                    Packet::HandshakeInit(init) => {
                        // The initiator's static key, decrypted (one X25519).
                        match boringtun::noise::handshake::parse_handshake_anon(
                            &self.secret,
                            &self.public,
                            &init,
                        ) {
                            Ok(half) => (self.peers.slot_of_key(&half.peer_static_public), None),
                            Err(_) => {
                                self.counters.rejected += 1;
                                return;
                            }
                        }
                    }
                    Packet::HandshakeResponse(r) => (
                        self.peers.slot_of_index(r.receiver_idx >> 8),
                        Some(r.receiver_idx >> 8),
                    ),
                    _ => (None, None),
                }
            }
            Packet::PacketCookieReply(p) => (
                self.peers.slot_of_index(p.receiver_idx >> 8),
                Some(p.receiver_idx >> 8),
            ),
            Packet::PacketData(p) => (
                self.peers.slot_of_index(p.receiver_idx >> 8),
                Some(p.receiver_idx >> 8),
            ),
        };
        let Some(slot) = slot else {
            self.counters.unknown_peer += 1;
            return;
        };
        let kind = datagram[0];
        // boringtun panics on a data packet larger than the buffer it decrypts into: an
        // inner packet over PACKET bytes is dropped here, before any work.
        if kind == DATA && datagram.len() > PACKET + DATA_HEADER {
            self.counters.oversize += 1;
            return;
        }
        let Outbox { net, tun } = out;
        let Some(space) = tun.space() else {
            self.counters.outbox_full += 1;
            return;
        };
        let Some(peer) = self.peers.get_mut(slot) else {
            self.counters.unknown_peer += 1;
            return;
        };
        // A handshake initiation goes to the current tunnel (the peer rotated too);
        // everything else to the tunnel that owns its index.
        let tunn = match index {
            Some(i) if i != peer.current.index => match peer.previous.as_mut() {
                Some(prev) if prev.tunnel.index == i => &mut prev.tunnel.tunn,
                _ => {
                    self.counters.unknown_peer += 1;
                    return;
                }
            },
            _ => &mut peer.current.tunn,
        };
        let (len, src) = match tunn.decapsulate(Some(from.ip()), datagram, &mut space[..PACKET]) {
            TunnResult::WriteToNetwork(p) => {
                // A handshake response (to an initiation) or a keepalive (after a
                // response): the peer proved its key, so its endpoint moves here. A
                // cookie reply proves nothing.
                let kind_out = p.first().copied();
                if !net.push(from, p) {
                    self.counters.outbox_full += 1;
                }
                // Only a handshake response proves the peer now (we answer it with a
                // keepalive): an initiation can be a replay that a new tunnel (after a
                // PSK rotation) has no timestamp to refuse. A peer that roamed and
                // initiates moves with its first data packet.
                if kind_out == Some(DATA) {
                    peer.spec.endpoint = from;
                }
                // As the initiator our session is up now: what waited goes. (As the
                // responder we may send only after the initiator's first data packet; a
                // drain now would start a crossing handshake instead.)
                if kind_out == Some(DATA) && peer.queued {
                    drain(tunn, from, net, &mut self.scratch, &mut self.counters);
                    peer.queued = false;
                }
                return;
            }
            TunnResult::WriteToTunnelV4(p, src) => (p.len(), IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(p, src) => (p.len(), IpAddr::V6(src)),
            TunnResult::Done => {
                // A keepalive decrypted: authenticated (and, for a responder, the first
                // moment it may send what waited).
                if kind == DATA {
                    peer.spec.endpoint = from;
                    if peer.queued {
                        drain(tunn, from, net, &mut self.scratch, &mut self.counters);
                        peer.queued = false;
                    }
                }
                return;
            }
            TunnResult::Err(e) => {
                if matches!(
                    e,
                    boringtun::noise::errors::WireGuardError::DestinationBufferTooSmall
                ) {
                    self.counters.oversize += 1;
                } else {
                    self.counters.rejected += 1;
                }
                return;
            }
        };
        peer.spec.endpoint = from;
        peer.rx_bytes += len as u64;
        if peer.queued {
            drain(tunn, from, net, &mut self.scratch, &mut self.counters);
            peer.queued = false;
        }
        let (peer_overlay, peer_role) = (peer.spec.overlay, peer.spec.role);
        let Some(dst) = Tunn::dst_address(&space[..len]) else {
            self.counters.malformed += 1;
            return;
        };
        // Cryptokey routing.
        let source = if src == peer_overlay {
            Source::Direct(slot)
        } else if peer_role == Role::Gateway
            && self.role != Role::Gateway
            && in_net(src, self.overlay_net)
        {
            // Relayed by our gateway: only for us, and only from an address Sec-EM
            // verified for us as reached through this very gateway.
            if dst != self.overlay {
                self.counters.no_route += 1;
                return;
            }
            match self.routes.get(&src) {
                Some(Route::Via { gateway, vnf, .. }) if *gateway == slot => Source::Relayed {
                    vnf: vnf.clone(),
                    gateway: slot,
                },
                Some(_) => {
                    self.counters.spoofed += 1;
                    return;
                }
                None => {
                    let packet = space[..len].to_vec();
                    self.wait(now, WaitKey::From(src, slot), &packet, Ask::Verify(src));
                    return;
                }
            }
        } else {
            self.counters.spoofed += 1;
            return;
        };
        if dst == self.overlay {
            if self.deliver(&source, &space[..len]) {
                tun.commit(len);
            }
            return;
        }
        match source {
            Source::Direct(from_slot) if self.role == Role::Gateway => {
                self.forward(now, from_slot, src, dst, &space[..len], net);
            }
            _ => self.counters.no_route += 1,
        }
    }

    /// Whether a packet for this VNF from `source` passes its catalog (counted). What the
    /// gateway that our catalog names relayed, it policed under that catalog: here it
    /// meets the same rate with a wide burst ([`Policing::Upstream`]), which lets through
    /// what the path bunched up but holds the rate if that gateway has not got our
    /// catalog yet or several of its instances relay one source. Anything else, relayed by
    /// another gateway too, is policed here with the rule's own burst.
    fn deliver(&mut self, source: &Source, packet: &[u8]) -> bool {
        let decision = match self.policy.as_mut() {
            // No catalog in force: nothing passes.
            None => Decision::DropNotListed,
            Some(engine) => match source {
                Source::Direct(slot) => {
                    let key = self
                        .peers
                        .get(*slot)
                        .map_or(SourceKey::UNKNOWN, |p| p.source);
                    engine.handle_packet(key, packet)
                }
                Source::Relayed { vnf, gateway } => {
                    let ours = engine.catalog().gateway.as_ref();
                    let policing = if ours.is_some()
                        && self.peers.get(*gateway).map(|p| &p.spec.vnf) == ours
                    {
                        Policing::Upstream
                    } else {
                        Policing::Here
                    };
                    let key = engine.source_key(vnf);
                    engine.handle_packet_as(key, packet, policing)
                }
            },
        };
        if decision.passes() {
            self.counters.rx_packets += 1;
            true
        } else {
            self.counters.policy_dropped += 1;
            self.limited += u64::from(matches!(decision, Decision::DropLimited(_)));
            false
        }
    }

    /// On a gateway: forwards `packet` from the peer in `from_slot` (at `src`) to `dst`,
    /// if Sec-EM admitted the pair; otherwise it waits and Sec-EM is asked.
    fn forward(
        &mut self,
        now: Instant,
        from_slot: Slot,
        src: IpAddr,
        dst: IpAddr,
        packet: &[u8],
        net: &mut Sends,
    ) {
        if !self.routes.admitted(src, dst) {
            // Only tenant addresses are asked about, and a source has only so many pairs
            // waiting (a peer spraying destinations cannot fill the queue for others).
            let key = WaitKey::Pair(src, dst);
            if !in_net(dst, self.overlay_net) {
                self.counters.no_route += 1;
                return;
            }
            if !self.waiting.contains(&key)
                && self
                    .waiting
                    .count_where(|k| matches!(k, WaitKey::Pair(s, _) if *s == src))
                    >= PAIRS_PER_SOURCE
            {
                self.counters.not_admitted += 1;
                return;
            }
            self.wait(now, key, packet, Ask::Admit { src, dst });
            return;
        }
        self.forward_admitted(from_slot, dst, packet, net);
    }

    /// Forwards `packet` of an admitted pair, under the destination's catalog if this
    /// gateway protects it.
    fn forward_admitted(&mut self, from_slot: Slot, dst: IpAddr, packet: &[u8], net: &mut Sends) {
        let Some(src_vnf) = self.peers.get(from_slot).map(|p| &p.spec.vnf) else {
            self.counters.no_route += 1;
            return;
        };
        // A gateway forwards only to its direct peers.
        let Some(&Route::Direct(to)) = self.routes.get(&dst) else {
            self.counters.no_route += 1;
            return;
        };
        let Some(to_peer) = self.peers.get(to) else {
            self.counters.no_route += 1;
            return;
        };
        // Protected: Sec-EM said so when it described the peer, or its catalog (which
        // names this gateway) has reached us since.
        let engine = self.protected.get_mut(&to_peer.spec.vnf);
        if to_peer.spec.protected || engine.is_some() {
            let decision = match engine {
                // A VNF this gateway protects, without its catalog yet: nothing passes.
                None => Decision::DropNotListed,
                Some(engine) => {
                    let key = engine.source_key(src_vnf);
                    engine.handle_packet(key, packet)
                }
            };
            if !decision.passes() {
                self.counters.policy_dropped += 1;
                self.limited += u64::from(matches!(decision, Decision::DropLimited(_)));
                return;
            }
        }
        let Some(to_peer) = self.peers.get_mut(to) else {
            return;
        };
        let endpoint = to_peer.spec.endpoint;
        to_peer.tx_bytes += packet.len() as u64;
        to_peer.queued |= encrypt(to_peer.sending(), endpoint, packet, net, &mut self.counters);
        self.counters.forwarded += 1;
    }

    // ----- timers -----

    /// WireGuard timers (handshakes, keepalives, expiry), PSK retirement, the handshake
    /// limiter's second, and stale queues. Call every 250 ms or so.
    pub fn handle_timers(&mut self, now: Instant, out: &mut Outbox) {
        self.limiter.reset_count();
        let mut retired = Vec::new();
        for peer in self.peers.iter_mut() {
            let to = peer.spec.endpoint;
            if let TunnResult::WriteToNetwork(b) =
                peer.current.tunn.update_timers(&mut self.scratch)
                && !out.net.push(to, b)
            {
                self.counters.outbox_full += 1;
            }
            let ready = peer.current_ready();
            if let Some(prev) = peer.previous.as_mut() {
                if ready && prev.retire_at.is_none() {
                    prev.retire_at = Some(now + RETIRE_AFTER);
                    tracing::info!(peer = %peer.spec.overlay, "PSK rotation complete");
                }
                let deadline = prev.retire_at.unwrap_or(prev.since + ROTATION_LIMIT);
                if now >= deadline {
                    retired.push(prev.tunnel.index);
                    peer.previous = None;
                } else if let TunnResult::WriteToNetwork(b) =
                    prev.tunnel.tunn.update_timers(&mut self.scratch)
                    && !out.net.push(to, b)
                {
                    self.counters.outbox_full += 1;
                }
            }
        }
        for i in retired {
            self.peers.free_index(i);
        }
        let expired = self.waiting.expire(now);
        if expired > 0 {
            tracing::debug!(
                packets = expired,
                "no answer from Sec-EM in time: queued packets dropped"
            );
            self.counters.queue_dropped += expired as u64;
        }
    }

    // ----- control-plane changes -----

    /// Installs a verified peer with the pair's PSK (or rotates its PSK, or replaces its
    /// tunnel when it comes with a new WireGuard key); what waited for it is sent.
    pub fn install(
        &mut self,
        now: Instant,
        spec: PeerSpec,
        psk: &PresharedKey,
        out: &mut Outbox,
    ) -> Installed {
        if self.revoked.0.contains(&spec.id) {
            tracing::warn!(peer = %spec.overlay, "refused: the instance was revoked");
            return Installed::Revoked;
        }
        if let Some(s) = self.peers.slot_of_key(&spec.wg_public)
            && self.peers.get(s).is_some_and(|p| p.spec.id != spec.id)
        {
            tracing::warn!(peer = %spec.overlay, "refused: another instance holds this WireGuard key");
            return Installed::KeyConflict;
        }
        let overlay = spec.overlay;
        let existing = self.peers.slot_of(&spec.id);
        let mut spec = spec;
        // Protection is sticky for an installed instance: a key push that does not say
        // (Sec-EM's re-key announcements) never lifts the gateway's catalog enforcement.
        if let Some(old) = existing.and_then(|s| self.peers.get(s)) {
            spec.protected |= old.spec.protected;
        }
        let outcome = match existing {
            Some(slot) => {
                let Some(peer) = self.peers.get_mut(slot) else {
                    return Installed::KeyConflict;
                };
                let same_key =
                    peer.spec.wg_public == spec.wg_public && peer.spec.overlay == overlay;
                if same_key && peer.psk == *psk {
                    // Keep the tunnel, its sessions and its (authenticated) endpoint.
                    peer.spec.protected = spec.protected;
                    Installed::Unchanged
                } else if same_key {
                    // A key epoch rolled: a new PSK for the same peer. The old tunnel
                    // carries the flow until the new one's handshake completes.
                    let index = self.peers.new_index(slot);
                    let tunn = self.tunn(&spec, psk, index);
                    let Some(peer) = self.peers.get_mut(slot) else {
                        return Installed::KeyConflict;
                    };
                    let old = std::mem::replace(&mut peer.current, Tunnel { tunn, index });
                    let dropped = peer.previous.replace(Retiring {
                        tunnel: old,
                        since: now,
                        retire_at: None,
                    });
                    peer.psk = psk.clone();
                    peer.spec.protected = spec.protected;
                    let to = peer.spec.endpoint;
                    Self::initiate(&mut peer.current.tunn, to, &mut out.net, &mut self.counters);
                    if let Some(d) = dropped {
                        self.peers.free_index(d.tunnel.index);
                    }
                    tracing::info!(peer = %overlay, "PSK rotated: new handshake started");
                    Installed::Rotated
                } else {
                    // A new key for a known instance: its agent restarted. The old tunnel
                    // and its keys go now; the new one handshakes at once.
                    let index = self.peers.new_index(slot);
                    let peer = self.peer(spec, psk, index);
                    let old = self.peers.put(slot, peer);
                    if let Some(o) = old
                        && o.spec.overlay != overlay
                    {
                        self.routes.remove_slot(slot);
                    }
                    self.routes.insert(overlay, Route::Direct(slot));
                    if let Some(p) = self.peers.get_mut(slot) {
                        let to = p.spec.endpoint;
                        Self::initiate(&mut p.current.tunn, to, &mut out.net, &mut self.counters);
                    }
                    tracing::info!(peer = %overlay, "peer came back with a new key: tunnel replaced");
                    Installed::Replaced
                }
            }
            None => {
                let slot = self.peers.free_slot();
                let index = self.peers.new_index(slot);
                let peer = self.peer(spec, psk, index);
                self.peers.put(slot, peer);
                self.routes.insert(overlay, Route::Direct(slot));
                if let Some(p) = self.peers.get_mut(slot) {
                    let to = p.spec.endpoint;
                    // Start the handshake now: the first packets then find a session sooner.
                    Self::initiate(&mut p.current.tunn, to, &mut out.net, &mut self.counters);
                }
                Installed::New
            }
        };
        self.waiting.forget_refusal(&WaitKey::To(overlay));
        self.release_to(overlay, out);
        outcome
    }

    fn tunn(&self, spec: &PeerSpec, psk: &PresharedKey, index: u32) -> Tunn {
        let mut psk_bytes = *psk.expose();
        let tunn = Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(spec.wg_public),
            Some(psk_bytes),
            Some(KEEPALIVE),
            index,
            None,
        );
        psk_bytes.zeroize();
        tunn
    }

    fn peer(&mut self, spec: PeerSpec, psk: &PresharedKey, index: u32) -> Peer {
        let tunn = self.tunn(&spec, psk, index);
        let source = match self.policy.as_mut() {
            Some(p) => p.source_key(&spec.vnf),
            None => SourceKey::UNKNOWN,
        };
        Peer {
            spec,
            current: Tunnel { tunn, index },
            previous: None,
            psk: psk.clone(),
            source,
            queued: false,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    fn initiate(tunn: &mut Tunn, to: SocketAddr, net: &mut Sends, counters: &mut PlaneCounters) {
        if !net.fits(HANDSHAKE) {
            counters.outbox_full += 1;
            return;
        }
        let space = net.space();
        let len = match tunn.format_handshake_initiation(space, false) {
            TunnResult::WriteToNetwork(b) => b.len(),
            _ => return,
        };
        net.commit(to, len);
    }

    /// Sends what waited for a route to `overlay`.
    fn release_to(&mut self, overlay: IpAddr, out: &mut Outbox) {
        for p in self.waiting.take(&WaitKey::To(overlay)) {
            self.handle_tun_routed(&p, out);
        }
    }

    fn handle_tun_routed(&mut self, packet: &[u8], out: &mut Outbox) {
        let Some(dst) = Tunn::dst_address(packet) else {
            return;
        };
        let Some(slot) = self.routes.get(&dst).map(Route::slot) else {
            self.counters.queue_dropped += 1;
            return;
        };
        if let Some(peer) = self.peers.get_mut(slot) {
            let to = peer.spec.endpoint;
            peer.tx_bytes += packet.len() as u64;
            peer.queued |= encrypt(peer.sending(), to, packet, &mut out.net, &mut self.counters);
            self.counters.tx_packets += 1;
        }
    }

    /// Routes `overlay` (instance `id` of `vnf`, as Sec-EM verified it) through the
    /// gateway peer at `gateway`. Packets that waited to go there are sent; packets the
    /// gateway relayed from there are delivered (under this VNF's catalog). False when
    /// `gateway` is not an installed gateway peer.
    pub fn route_via(
        &mut self,
        overlay: IpAddr,
        id: InstanceKey,
        vnf: VnfId,
        gateway: IpAddr,
        out: &mut Outbox,
    ) -> bool {
        if self.revoked.0.contains(&id) {
            return false;
        }
        let Some(Route::Direct(gw)) = self.routes.get(&gateway).cloned() else {
            return false;
        };
        if !self
            .peers
            .get(gw)
            .is_some_and(|p| p.spec.role == Role::Gateway)
        {
            return false;
        }
        self.routes.insert(
            overlay,
            Route::Via {
                gateway: gw,
                vnf: vnf.clone(),
                id,
            },
        );
        self.waiting.forget_refusal(&WaitKey::To(overlay));
        self.waiting.forget_refusal(&WaitKey::From(overlay, gw));
        self.release_to(overlay, out);
        let source = Source::Relayed { vnf, gateway: gw };
        let released = self.waiting.take(&WaitKey::From(overlay, gw));
        // What another gateway relayed "from" this address was a forgery.
        let forged = self
            .waiting
            .drop_where(|k| matches!(k, WaitKey::From(ip, _) if *ip == overlay));
        self.counters.spoofed += forged as u64;
        for p in released {
            if self.deliver(&source, &p) {
                match out.tun.space() {
                    Some(space) if p.len() <= space.len() => {
                        space[..p.len()].copy_from_slice(&p);
                        out.tun.commit(p.len());
                    }
                    _ => self.counters.outbox_full += 1,
                }
            }
        }
        true
    }

    /// Whether packets to `overlay` have a route (direct or through a gateway).
    pub fn routes_to(&self, overlay: IpAddr) -> bool {
        self.routes.get(&overlay).is_some()
    }

    /// On a gateway: Sec-EM admitted the pair of `src` and `dst` (both directions);
    /// what waited between them is forwarded.
    pub fn admit(&mut self, src: IpAddr, dst: IpAddr, out: &mut Outbox) {
        self.routes.admit(src, dst);
        for (a, b) in [(src, dst), (dst, src)] {
            self.waiting.forget_refusal(&WaitKey::Pair(a, b));
            let packets = self.waiting.take(&WaitKey::Pair(a, b));
            let Some(Route::Direct(from)) = self.routes.get(&a).cloned() else {
                self.counters.no_route += packets.len() as u64;
                continue;
            };
            for p in packets {
                self.forward_admitted(from, b, &p, &mut out.net);
            }
        }
    }

    /// Whether the pair of `a` and `b` is admitted for forwarding.
    pub fn is_admitted(&self, a: IpAddr, b: IpAddr) -> bool {
        self.routes.admitted(a, b)
    }

    /// Sec-EM refused the instance at `overlay` (or has none there): what waited for it
    /// is dropped, and further packets for it are dropped for [`REFUSED_FOR`] without
    /// asking again.
    pub fn refuse(&mut self, now: Instant, overlay: IpAddr) {
        let n = self.waiting.refuse(WaitKey::To(overlay), now)
            + self
                .waiting
                .drop_where(|k| matches!(k, WaitKey::From(ip, _) if *ip == overlay));
        self.counters.queue_dropped += n as u64;
    }

    /// On a gateway: Sec-EM refused the pair of `src` and `dst`.
    pub fn refuse_pair(&mut self, now: Instant, src: IpAddr, dst: IpAddr) {
        let n = self.waiting.refuse(WaitKey::Pair(src, dst), now)
            + self.waiting.refuse(WaitKey::Pair(dst, src), now);
        self.counters.not_admitted += n as u64;
    }

    /// Removes instance `id` (revoked): its tunnels and keys, its routes (and, if it was
    /// a gateway, the routes through it), the pairs admitted with it, and what waited for
    /// it. Whether anything of it was installed.
    pub fn remove(&mut self, id: &InstanceKey) -> bool {
        // Remembered: an answer from Sec-EM already on its way must not bring it back.
        if self.revoked.0.insert(*id) {
            self.revoked.1.push_back(*id);
            if self.revoked.1.len() > REVOKED_KEPT
                && let Some(old) = self.revoked.1.pop_front()
            {
                self.revoked.0.remove(&old);
            }
        }
        let mut gone = Vec::new();
        if let Some(slot) = self.peers.slot_of(id)
            && let Some(peer) = self.peers.remove(slot)
        {
            gone.push(peer.spec.overlay);
            gone.extend(self.routes.remove_slot(slot));
            // `peer` drops here: its tunnels (boringtun's session keys) and our PSK copy,
            // which zeroizes itself.
        }
        gone.extend(self.routes.remove_instance(id));
        let dropped = self.waiting.drop_where(|k| match k {
            WaitKey::To(ip) | WaitKey::From(ip, _) => gone.contains(ip),
            WaitKey::Pair(a, b) => gone.contains(a) || gone.contains(b),
        });
        self.counters.queue_dropped += dropped as u64;
        !gone.is_empty()
    }

    /// Whether instance `id` is installed as a direct peer.
    pub fn has_peer(&self, id: &InstanceKey) -> bool {
        self.peers.slot_of(id).is_some()
    }

    /// Whether this plane holds anything of instance `id`: a tunnel, or a route to it
    /// through a gateway.
    pub fn knows(&self, id: &InstanceKey) -> bool {
        self.has_peer(id) || self.routes.has_instance(id)
    }

    /// Swaps in this VNF's catalog (atomically: the next packet sees the new one).
    pub fn set_catalog(&mut self, catalog: SecCatalog) {
        let catalog = Arc::new(catalog);
        match self.policy.as_mut() {
            Some(p) => p.set_catalog(catalog),
            None => {
                let mut engine = PolicyEngine::new(catalog, self.clock.clone());
                // Peers installed before the first catalog get their source keys now.
                for peer in self.peers.iter_mut() {
                    peer.source = engine.source_key(&peer.spec.vnf);
                }
                self.policy = Some(engine);
            }
        }
    }

    /// On a gateway: swaps in the catalog of a VNF it protects.
    pub fn set_protected_catalog(&mut self, catalog: SecCatalog) {
        let vnf = catalog.vnf.clone();
        let catalog = Arc::new(catalog);
        match self.protected.get_mut(&vnf) {
            Some(p) => p.set_catalog(catalog),
            None => {
                self.protected
                    .insert(vnf, PolicyEngine::new(catalog, self.clock.clone()));
            }
        }
    }

    /// The catalog version in force for this VNF.
    pub fn catalog_version(&self) -> Option<u64> {
        self.policy.as_ref().map(|p| p.catalog().version)
    }

    /// Counts `n` packets the driver lost in I/O.
    pub fn count_io_dropped(&mut self, n: u64) {
        self.counters.io_dropped += n;
    }

    /// Packets a rate limiter dropped so far: while it drops, the time it counts matters.
    pub fn limited(&self) -> u64 {
        self.limited
    }

    /// Datagrams that decrypted in a tunnel of ours so far: delivered, forwarded, or
    /// dropped by the catalog (what the I/O loop polls for, unlike junk and handshakes).
    pub fn authenticated(&self) -> u64 {
        let c = &self.counters;
        c.rx_packets + c.forwarded + c.policy_dropped
    }

    /// Counters.
    pub fn counters(&self) -> PlaneCounters {
        self.counters
    }

    /// Everything the metrics show.
    pub fn stats(&self) -> PlaneStats {
        PlaneStats {
            counters: self.counters,
            policy: self.policy.as_ref().map(PolicyEngine::counters),
            peers: self
                .peers
                .iter()
                .map(|(_, p)| PeerStats {
                    id: p.spec.id,
                    vnf: p.spec.vnf.clone(),
                    overlay: p.spec.overlay,
                    endpoint: p.spec.endpoint,
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    last_handshake: p.current.tunn.stats().0,
                })
                .collect(),
            routes: self.routes.len(),
            admitted_pairs: self.routes.admitted_pairs(),
            waiting: self.waiting.packets(),
            indexes: self.peers.indexes_in_use(),
        }
    }
}
