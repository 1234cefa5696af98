//! The data plane: a TUN device, one UDP socket, and one `boringtun::noise::Tunn` per
//! verified peer (DESIGN.md §3.5).
//!
//! - TUN to UDP: the destination overlay address picks the peer (or the gateway the peer
//!   is reached through). A destination in the tenant's overlay that has no peer yet is
//!   queued (bounded) and Sec-EM is asked to verify it; the queue is released when the
//!   tunnel is installed, or dropped (counted) when the pair is refused.
//! - UDP to TUN: a handshake initiation is mapped to its peer by the static key it
//!   carries, every other message by its receiver index. Cryptokey routing: a decrypted
//!   packet is accepted only if its inner source is the peer's overlay address (or, from
//!   the gateway, an address routed through it). What is accepted passes this VNF's
//!   Sec-catalog (or, on a gateway forwarding to a protected VNF, that VNF's catalog).
//! - Timers: every peer's `update_timers` runs every 100 ms.
//!
//! All state sits behind one mutex, never held across an await, taken once per batch of
//! packets. The I/O (batched, with offloads) is in [`crate::io`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asmn_shared::catalog::SecCatalog;
use asmn_shared::crypto::PresharedKey;
use asmn_shared::ids::{InstanceKey, Role, VnfId};
use asmn_shared::policy::{Decision, PolicyEngine, SourceKey};
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use governor::clock::DefaultClock;
use std::net::UdpSocket;
use tokio::sync::mpsc;
use zeroize::Zeroize;

/// Scratch buffer for one datagram or packet.
pub const BUF: usize = 65_536;
/// Packets queued per destination waiting for its tunnel.
pub const QUEUE_PER_DST: usize = 64;
/// Destinations waiting at once.
pub const QUEUE_DSTS: usize = 256;
/// How long a destination may wait for Sec-EM's answer.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// A verified peer, as installed.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// Its identity.
    pub id: InstanceKey,
    /// Its VNF.
    pub vnf: VnfId,
    /// Its overlay address.
    pub overlay: IpAddr,
    /// Its underlay endpoint.
    pub endpoint: SocketAddr,
    /// Its WireGuard static public key.
    pub wg_public: [u8; 32],
    /// Its role.
    pub role: Role,
}

struct Peer {
    spec: PeerSpec,
    /// The tunnel with the current PSK, and its index (receiver indexes >> 8).
    tunn: Tunn,
    index: u32,
    /// During a PSK rotation: the tunnel with the previous PSK, which carries the flow
    /// until the new one has a session, and decrypts stragglers until it retires.
    previous: Option<Retiring>,
    psk: PresharedKey,
    source: SourceKey,
    rx_bytes: u64,
    tx_bytes: u64,
}

/// Counters of the data plane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaneCounters {
    /// Packets from TUN sent into a tunnel.
    pub tx_packets: u64,
    /// Packets from tunnels written to TUN (or forwarded by a gateway).
    pub rx_packets: u64,
    /// Datagrams for no known peer.
    pub unknown_peer: u64,
    /// Decrypted packets whose inner source is not the peer's (cryptokey routing).
    pub spoofed: u64,
    /// Packets dropped by a Sec-catalog.
    pub policy_dropped: u64,
    /// Packets dropped waiting for a tunnel (queue full, refused, or timed out).
    pub queue_dropped: u64,
    /// Packets to addresses outside the tenant.
    pub no_route: u64,
    /// Packets lost in I/O: unreadable from TUN, or not sent (socket buffer full).
    pub io_dropped: u64,
}

struct Retiring {
    tunn: Tunn,
    index: u32,
    since: Instant,
    /// Set when the new tunnel got its session: the old one goes this long after.
    retire_at: Option<Instant>,
}

/// How long a replaced tunnel still decrypts after its successor is up.
pub const RETIRE_AFTER: Duration = Duration::from_secs(10);
/// Longest a rotation may wait for the new tunnel's handshake before the old one goes.
pub const ROTATION_LIMIT: Duration = Duration::from_secs(30);

impl Peer {
    /// Whether the current tunnel has a session (the rotation, if any, is done).
    fn current_ready(&self) -> bool {
        self.tunn.stats().0.is_some()
    }

    /// The tunnel to send with: the previous one while the current has no session yet.
    fn sending(&mut self) -> &mut Tunn {
        if !self.current_ready()
            && let Some(prev) = self.previous.as_mut()
        {
            return &mut prev.tunn;
        }
        &mut self.tunn
    }
}

struct Waiting {
    since: Instant,
    /// Packets, with the source VNF of those a gateway forwards (policed on release).
    packets: VecDeque<(Option<VnfId>, Vec<u8>)>,
}

struct State {
    slots: Vec<Option<Peer>>,
    /// Tunnel index (24 bits) to slot.
    indexes: HashMap<u32, u32>,
    next_index: u32,
    /// Overlay address to slot: the peer's own, or its gateway's.
    routes: HashMap<IpAddr, u32>,
    by_key: HashMap<[u8; 32], u32>,
    waiting: HashMap<IpAddr, Waiting>,
    /// This VNF's catalog.
    policy: Option<PolicyEngine<DefaultClock>>,
    /// On a gateway: the catalogs of the VNFs it protects.
    protected: HashMap<VnfId, PolicyEngine<DefaultClock>>,
    counters: PlaneCounters,
}

/// Which peer a datagram is for, found before the lock is taken.
enum Key {
    Static([u8; 32]),
    Index(u32),
    Unknown,
}

/// Where encrypted datagrams go: into a batch sent with GSO, or out at once.
enum Sink<'a> {
    Batch(&'a mut crate::io::Sends),
    Now(&'a UdpSocket, &'a mut [u8]),
}

impl Sink<'_> {
    /// Encrypts `packet` with `tunn` for `to`. Whether a datagram was produced (without a
    /// session boringtun queues the packet and may send a handshake instead).
    fn encrypt(&mut self, tunn: &mut Tunn, to: SocketAddr, packet: &[u8]) {
        match self {
            Sink::Batch(sends) => {
                if !sends.fits(packet.len()) {
                    return;
                }
                let space = sends.space();
                let base = space.as_ptr() as usize;
                let (offset, len) = match tunn.encapsulate(packet, space) {
                    TunnResult::WriteToNetwork(b) => (b.as_ptr() as usize - base, b.len()),
                    _ => return,
                };
                if offset != 0 {
                    sends.space().copy_within(offset..offset + len, 0);
                }
                sends.commit(to, len);
            }
            Sink::Now(udp, buf) => {
                if let TunnResult::WriteToNetwork(b) = tunn.encapsulate(packet, buf) {
                    let _ = udp.send_to(b, to);
                }
            }
        }
    }
}

/// What became of a datagram.
enum Inbound {
    /// Consumed (a handshake, a drop, or forwarded by a gateway).
    Done,
    /// `out[..len]` goes to TUN.
    ToTun(usize),
    /// `out[..len]` from this source VNF goes onwards to a destination without a tunnel
    /// yet (gateway).
    Requeue(usize, VnfId),
}

/// What the plane asks of the control side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Verify the instance at this overlay address (VerifyPeer).
    Verify(IpAddr),
}

/// The data plane of one agent.
pub struct Plane {
    state: Mutex<State>,
    udp: UdpSocket,
    udp_state: quinn_udp::UdpSocketState,
    tun: tun_rs::SyncDevice,
    io_dropped: AtomicU64,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    overlay: IpAddr,
    overlay_net: (IpAddr, u8),
    role: Role,
    asks: mpsc::Sender<Ask>,
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plane")
            .field("overlay", &self.overlay)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

fn in_net(ip: IpAddr, (net, prefix): (IpAddr, u8)) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Sends what a `Tunn` call produced and drains its queue (`decapsulate` with an empty
/// datagram) as boringtun requires. Runs under the lock; sends are non-blocking.
fn flush(udp: &UdpSocket, tunn: &mut Tunn, to: SocketAddr, first: Option<Vec<u8>>, out: &mut [u8]) {
    if let Some(p) = first {
        let _ = udp.send_to(&p, to);
    }
    for _ in 0..QUEUE_PER_DST {
        match tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(p) => {
                let _ = udp.send_to(p, to);
            }
            _ => break,
        }
    }
}

impl Plane {
    /// A plane on `tun` and `udp` with the static key `secret`, for the instance at
    /// `overlay` in `overlay_net`. Verification requests go to `asks`. The socket is made
    /// non-blocking (and UDP GRO is turned on where the kernel has it).
    pub fn new(
        tun: tun_rs::SyncDevice,
        udp: UdpSocket,
        secret: x25519::StaticSecret,
        overlay: IpAddr,
        overlay_net: (IpAddr, u8),
        role: Role,
        asks: mpsc::Sender<Ask>,
    ) -> std::io::Result<Arc<Plane>> {
        let public = x25519::PublicKey::from(&secret);
        let udp_state = quinn_udp::UdpSocketState::new((&udp).into())?;
        Ok(Arc::new(Plane {
            state: Mutex::new(State {
                slots: Vec::new(),
                indexes: HashMap::new(),
                next_index: 1,
                routes: HashMap::new(),
                by_key: HashMap::new(),
                waiting: HashMap::new(),
                policy: None,
                protected: HashMap::new(),
                counters: PlaneCounters::default(),
            }),
            udp,
            udp_state,
            tun,
            io_dropped: AtomicU64::new(0),
            secret,
            public,
            overlay,
            overlay_net,
            role,
            asks,
        }))
    }

    /// The device, the socket and its GSO/GRO state, for the I/O loop.
    pub(crate) fn io_parts(&self) -> (&tun_rs::SyncDevice, &UdpSocket, &quinn_udp::UdpSocketState) {
        (&self.tun, &self.udp, &self.udp_state)
    }

    /// Counts packets lost in I/O.
    pub(crate) fn count_io_drop(&self, n: u64) {
        if n > 0 {
            self.io_dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// This agent's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a plain
        // assignment): go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what waited for `overlay` through the peer in `slot`; forwarded packets pass
    /// the destination's catalog first (gateway).
    fn release(&self, st: &mut State, overlay: IpAddr, slot: u32, out: &mut [u8]) {
        let Some(w) = st.waiting.remove(&overlay) else {
            return;
        };
        let Some(dst_vnf) = st.slots[slot as usize].as_ref().map(|p| p.spec.vnf.clone()) else {
            return;
        };
        for (source, p) in w.packets {
            if let Some(src) = &source
                && let Some(engine) = st.protected.get_mut(&dst_vnf)
            {
                let key = engine.source_key(src);
                if !engine.handle_packet(key, &p).passes() {
                    st.counters.policy_dropped += 1;
                    continue;
                }
            }
            let forwarded = source.is_some();
            let Some(peer) = st.slots[slot as usize].as_mut() else {
                return;
            };
            let to = peer.spec.endpoint;
            Sink::Now(&self.udp, out).encrypt(peer.sending(), to, &p);
            if forwarded {
                st.counters.rx_packets += 1;
            } else {
                st.counters.tx_packets += 1;
            }
        }
    }

    fn new_index(st: &mut State, slot: u32) -> u32 {
        loop {
            let i = st.next_index & 0x00ff_ffff;
            st.next_index = st.next_index.wrapping_add(1);
            if i != 0 && !st.indexes.contains_key(&i) {
                st.indexes.insert(i, slot);
                return i;
            }
        }
    }

    /// Installs a verified peer with the pair's PSK, or rotates its PSK if it is installed
    /// with another; packets waiting for it are sent.
    pub fn install(&self, spec: PeerSpec, psk: &PresharedKey) {
        let mut out = vec![0u8; BUF];
        let mut st = self.lock();
        // The same peer with the same key: keep its tunnel (and its sessions).
        if let Some(slot) = st.by_key.get(&spec.wg_public).copied()
            && let Some(p) = st.slots[slot as usize].as_ref()
            && p.psk == *psk
            && p.spec.id == spec.id
            && p.spec.overlay == spec.overlay
        {
            self.release(&mut st, spec.overlay, slot, &mut out);
            return;
        }
        let mut psk_bytes = *psk.expose();
        let existing = st.by_key.get(&spec.wg_public).copied();
        let slot = match existing {
            Some(s) => s,
            None => match st.slots.iter().position(Option::is_none) {
                Some(free) => free as u32,
                None => {
                    st.slots.push(None);
                    (st.slots.len() - 1) as u32
                }
            },
        };
        let index = Self::new_index(&mut st, slot);
        let mut tunn = Tunn::new(
            self.secret.clone(),
            x25519::PublicKey::from(spec.wg_public),
            Some(psk_bytes),
            Some(25),
            index,
            None,
        );
        psk_bytes.zeroize();
        let overlay = spec.overlay;
        let rotating = existing
            .and_then(|s| st.slots[s as usize].as_ref())
            .is_some_and(|p| p.spec.id == spec.id && p.spec.overlay == spec.overlay);
        if rotating {
            // A new PSK for the same peer (a key epoch rolled): the old tunnel carries the
            // flow until the new one's handshake completes, then retires.
            let Some(peer) = st.slots[slot as usize].as_mut() else {
                return;
            };
            let old = std::mem::replace(&mut peer.tunn, tunn);
            let old_index = std::mem::replace(&mut peer.index, index);
            let dropped = peer.previous.replace(Retiring {
                tunn: old,
                index: old_index,
                since: Instant::now(),
                retire_at: None,
            });
            peer.psk = psk.clone();
            peer.spec.endpoint = spec.endpoint;
            let to = peer.spec.endpoint;
            if let TunnResult::WriteToNetwork(b) =
                peer.tunn.format_handshake_initiation(&mut out, false)
            {
                let _ = self.udp.send_to(b, to);
            }
            if let Some(d) = dropped {
                st.indexes.remove(&d.index);
            }
            tracing::info!(peer = %overlay, "PSK rotated: new handshake started");
            self.release(&mut st, overlay, slot, &mut out);
            return;
        }
        if let Some(old) = st.slots[slot as usize].take() {
            st.routes.retain(|_, s| *s != slot);
            st.indexes.remove(&old.index);
            if let Some(p) = &old.previous {
                st.indexes.remove(&p.index);
            }
        }
        let source = match st.policy.as_mut() {
            Some(p) => p.source_key(&spec.vnf),
            None => SourceKey::UNKNOWN,
        };
        st.by_key.insert(spec.wg_public, slot);
        st.routes.insert(spec.overlay, slot);
        // Start the handshake now: the first packets then find a session sooner.
        if let TunnResult::WriteToNetwork(b) = tunn.format_handshake_initiation(&mut out, false) {
            let _ = self.udp.send_to(b, spec.endpoint);
        }
        st.slots[slot as usize] = Some(Peer {
            spec,
            tunn,
            index,
            previous: None,
            psk: psk.clone(),
            source,
            rx_bytes: 0,
            tx_bytes: 0,
        });
        // Release what waited for this address.
        self.release(&mut st, overlay, slot, &mut out);
    }

    /// Routes `overlay` through the peer at `via` (a VNF behind a gateway). Packets that
    /// waited for `overlay` are sent.
    pub fn route_via(&self, overlay: IpAddr, via: IpAddr) -> bool {
        let mut out = vec![0u8; BUF];
        let mut st = self.lock();
        let Some(&slot) = st.routes.get(&via) else {
            return false;
        };
        st.routes.insert(overlay, slot);
        self.release(&mut st, overlay, slot, &mut out);
        true
    }

    /// Whether packets to `overlay` have a tunnel (direct or through a gateway).
    pub fn routes_to(&self, overlay: IpAddr) -> bool {
        self.lock().routes.contains_key(&overlay)
    }

    /// Removes the peer with identity `id` (revoked): its routes go, its keys are dropped
    /// (boringtun zeroizes its session keys on drop). Whether it was installed.
    pub fn remove(&self, id: &InstanceKey) -> bool {
        let mut st = self.lock();
        let Some(slot) = st
            .slots
            .iter()
            .position(|p| p.as_ref().is_some_and(|p| p.spec.id == *id))
        else {
            return false;
        };
        if let Some(p) = st.slots[slot].take() {
            st.by_key.remove(&p.spec.wg_public);
            st.indexes.remove(&p.index);
            if let Some(prev) = &p.previous {
                st.indexes.remove(&prev.index);
            }
        }
        st.routes.retain(|_, s| *s as usize != slot);
        true
    }

    /// Drops what waited for `overlay` (the pair was refused).
    pub fn refuse(&self, overlay: IpAddr) {
        let mut st = self.lock();
        if let Some(w) = st.waiting.remove(&overlay) {
            st.counters.queue_dropped += w.packets.len() as u64;
        }
    }

    /// Swaps in this VNF's catalog (atomically: the next packet sees the new one).
    pub fn set_catalog(&self, catalog: SecCatalog) {
        let mut st = self.lock();
        let catalog = Arc::new(catalog);
        match st.policy.as_mut() {
            Some(p) => p.set_catalog(catalog),
            None => {
                let mut engine = PolicyEngine::new(catalog, DefaultClock::default());
                // Peers installed before the first catalog get their source keys now.
                let vnfs: Vec<(usize, VnfId)> = st
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, p)| p.as_ref().map(|p| (i, p.spec.vnf.clone())))
                    .collect();
                for (i, vnf) in vnfs {
                    let k = engine.source_key(&vnf);
                    if let Some(p) = st.slots[i].as_mut() {
                        p.source = k;
                    }
                }
                st.policy = Some(engine);
            }
        }
    }

    /// On a gateway: swaps in the catalog of a VNF it protects.
    pub fn set_protected_catalog(&self, catalog: SecCatalog) {
        let mut st = self.lock();
        let vnf = catalog.vnf.clone();
        let catalog = Arc::new(catalog);
        match st.protected.get_mut(&vnf) {
            Some(p) => p.set_catalog(catalog),
            None => {
                st.protected
                    .insert(vnf, PolicyEngine::new(catalog, DefaultClock::default()));
            }
        }
    }

    /// The catalog version in force for this VNF.
    pub fn catalog_version(&self) -> Option<u64> {
        self.lock().policy.as_ref().map(|p| p.catalog().version)
    }

    /// Counters.
    pub fn counters(&self) -> PlaneCounters {
        let mut c = self.lock().counters;
        c.io_dropped = self.io_dropped.load(Ordering::Relaxed);
        c
    }

    /// Per-rule policy counters of this VNF's catalog.
    pub fn policy_counters(&self) -> Option<asmn_shared::policy::CounterSnapshot> {
        self.lock().policy.as_ref().map(PolicyEngine::counters)
    }

    /// Installed peers: (identity, VNF, overlay, bytes received, bytes sent, time since
    /// the last handshake).
    pub fn peers(&self) -> Vec<(InstanceKey, VnfId, IpAddr, u64, u64, Option<Duration>)> {
        self.lock()
            .slots
            .iter()
            .flatten()
            .map(|p| {
                let (last, ..) = p.tunn.stats();
                (
                    p.spec.id,
                    p.spec.vnf.clone(),
                    p.spec.overlay,
                    p.rx_bytes,
                    p.tx_bytes,
                    last,
                )
            })
            .collect()
    }

    /// Encrypts packets read from TUN into `sends` (one lock for the batch), queueing
    /// those without a tunnel yet.
    pub(crate) fn outbound_batch<'p>(
        &self,
        packets: impl Iterator<Item = &'p [u8]>,
        sends: &mut crate::io::Sends,
    ) {
        let mut asks = Vec::new();
        {
            let mut st = self.lock();
            let mut sink = Sink::Batch(sends);
            for p in packets {
                if let Some(a) = self.outbound_locked(&mut st, p, None, &mut sink) {
                    asks.push(a);
                }
            }
        }
        self.send_asks(asks);
    }

    /// Sends `packet` into its tunnel at once, or queues it and asks for its destination.
    /// `source`: the VNF a gateway forwards it for.
    fn outbound(&self, packet: &[u8], source: Option<VnfId>, out: &mut [u8]) {
        let ask = {
            let mut st = self.lock();
            self.outbound_locked(&mut st, packet, source, &mut Sink::Now(&self.udp, out))
        };
        self.send_asks(ask.into_iter().collect());
    }

    fn send_asks(&self, asks: Vec<Ask>) {
        for a in asks {
            tracing::debug!(?a, "no tunnel yet: asking Sec-EM");
            let _ = self.asks.try_send(a);
        }
    }

    /// Encrypts `packet` into `sink`, or queues it; the question for Sec-EM if its
    /// destination is new.
    fn outbound_locked(
        &self,
        st: &mut State,
        packet: &[u8],
        source: Option<VnfId>,
        sink: &mut Sink<'_>,
    ) -> Option<Ask> {
        let dst = Tunn::dst_address(packet)?;
        let mut ask = None;
        match st.routes.get(&dst).copied() {
            Some(slot) => {
                if let Some(peer) = st.slots[slot as usize].as_mut() {
                    let to = peer.spec.endpoint;
                    peer.tx_bytes += packet.len() as u64;
                    sink.encrypt(peer.sending(), to, packet);
                    st.counters.tx_packets += 1;
                }
            }
            None if in_net(dst, self.overlay_net) && dst != self.overlay => {
                let full = st.waiting.len() >= QUEUE_DSTS;
                let w = match st.waiting.get_mut(&dst) {
                    Some(w) => Some(w),
                    None if !full => {
                        ask = Some(Ask::Verify(dst));
                        st.waiting.insert(
                            dst,
                            Waiting {
                                since: Instant::now(),
                                packets: VecDeque::new(),
                            },
                        );
                        st.waiting.get_mut(&dst)
                    }
                    None => None,
                };
                match w {
                    Some(w) if w.packets.len() < QUEUE_PER_DST => {
                        w.packets.push_back((source, packet.to_vec()));
                    }
                    _ => st.counters.queue_dropped += 1,
                }
            }
            None => st.counters.no_route += 1,
        }
        ask
    }

    /// Which peer a datagram is for. A handshake initiation names its peer only inside
    /// its encrypted static key: that X25519 work is done here, before the lock is taken.
    fn key_of(&self, datagram: &[u8]) -> Key {
        match Tunn::parse_incoming_packet(datagram) {
            Ok(Packet::HandshakeInit(init)) => {
                match boringtun::noise::handshake::parse_handshake_anon(
                    &self.secret,
                    &self.public,
                    &init,
                ) {
                    Ok(half) => Key::Static(half.peer_static_public),
                    Err(_) => Key::Unknown,
                }
            }
            Ok(Packet::HandshakeResponse(p)) => Key::Index(p.receiver_idx >> 8),
            Ok(Packet::PacketCookieReply(p)) => Key::Index(p.receiver_idx >> 8),
            Ok(Packet::PacketData(p)) => Key::Index(p.receiver_idx >> 8),
            Err(_) => Key::Unknown,
        }
    }

    /// Decrypts a batch of datagrams (one lock): packets for this VNF go into `to_tun`
    /// (each after its virtio-net header room, truncated to its length), forwarded ones
    /// into `sends`. How many of `to_tun` are filled.
    pub(crate) fn inbound_batch(
        &self,
        datagrams: &[(SocketAddr, &[u8])],
        to_tun: &mut [Vec<u8>],
        sends: &mut crate::io::Sends,
        scratch: &mut [u8],
    ) -> usize {
        const H: usize = tun_rs::VIRTIO_NET_HDR_LEN;
        let keys: Vec<Key> = datagrams.iter().map(|(_, d)| self.key_of(d)).collect();
        let mut k = 0;
        let mut requeue = Vec::new();
        {
            let mut st = self.lock();
            let mut sink = Sink::Batch(sends);
            for ((from, d), key) in datagrams.iter().zip(keys) {
                let Some(buf) = to_tun.get_mut(k) else {
                    break;
                };
                match self.inbound_one(&mut st, key, d, *from, &mut buf[H..], &mut sink, scratch) {
                    Some(Inbound::ToTun(len)) => {
                        buf.truncate(H + len);
                        k += 1;
                    }
                    Some(Inbound::Requeue(len, source)) => {
                        requeue.push((buf[H..H + len].to_vec(), source));
                    }
                    Some(Inbound::Done) | None => {}
                }
            }
        }
        for (p, source) in requeue {
            self.outbound(&p, Some(source), scratch);
        }
        k
    }

    /// Handles one datagram.
    #[allow(clippy::too_many_arguments)]
    fn inbound_one(
        &self,
        st: &mut State,
        key: Key,
        datagram: &[u8],
        from: SocketAddr,
        out: &mut [u8],
        sink: &mut Sink<'_>,
        scratch: &mut [u8],
    ) -> Option<Inbound> {
        let (slot, index) = match key {
            Key::Static(k) => (st.by_key.get(&k).copied(), None),
            Key::Index(i) => (st.indexes.get(&i).copied(), Some(i)),
            Key::Unknown => (None, None),
        };
        let Some(slot) = slot.filter(|s| st.slots.get(*s as usize).is_some_and(Option::is_some))
        else {
            st.counters.unknown_peer += 1;
            return Some(Inbound::Done);
        };
        let peer = st.slots[slot as usize].as_mut()?;
        let use_previous = match (index, peer.previous.as_ref()) {
            (Some(i), Some(prev)) => i == prev.index,
            // A handshake initiation: the current PSK (the peer rotated too).
            _ => false,
        };
        let tunn = if use_previous {
            &mut peer.previous.as_mut()?.tunn
        } else {
            &mut peer.tunn
        };
        let (len, src) = match tunn.decapsulate(Some(from.ip()), datagram, out) {
            TunnResult::WriteToNetwork(p) => {
                let p = p.to_vec();
                flush(&self.udp, tunn, from, Some(p), scratch);
                peer.spec.endpoint = from;
                return None;
            }
            TunnResult::WriteToTunnelV4(p, src) => (p.len(), IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(p, src) => (p.len(), IpAddr::V6(src)),
            TunnResult::Done | TunnResult::Err(_) => return None,
        };
        peer.spec.endpoint = from;
        peer.rx_bytes += len as u64;
        let peer_role = peer.spec.role;
        let peer_overlay = peer.spec.overlay;
        let source = peer.source;
        // Cryptokey routing: the inner source must be the peer, or come through the
        // gateway (which verified and policed it).
        let from_gateway = peer_role == Role::Gateway && in_net(src, self.overlay_net);
        if src != peer_overlay && !from_gateway {
            st.counters.spoofed += 1;
            return None;
        }
        let dst = Tunn::dst_address(&out[..len])?;
        if dst == self.overlay {
            let decision = match st.policy.as_mut() {
                // Relayed by the gateway, which enforced this VNF's catalog with the real
                // source (this agent knows only the gateway as the sender).
                Some(_) if src != peer_overlay => {
                    Decision::Pass(asmn_shared::policy::Matched::Default)
                }
                Some(p) => p.handle_packet(source, &out[..len]),
                // No catalog loaded: nothing passes.
                None => Decision::DropNotListed,
            };
            if !decision.passes() {
                st.counters.policy_dropped += 1;
                return None;
            }
            st.counters.rx_packets += 1;
            return Some(Inbound::ToTun(len));
        }
        if self.role != Role::Gateway {
            st.counters.no_route += 1;
            return None;
        }
        let peer_vnf = st.slots[slot as usize].as_ref()?.spec.vnf.clone();
        // A gateway forwards to the destination, under the destination's catalog.
        let Some(&to_slot) = st.routes.get(&dst) else {
            // Not verified yet: queue it and ask, like outbound traffic.
            return Some(Inbound::Requeue(len, peer_vnf));
        };
        let dst_vnf = &st.slots[to_slot as usize].as_ref()?.spec.vnf;
        let decision = match st.protected.get_mut(dst_vnf) {
            Some(engine) => {
                let key = engine.source_key(&peer_vnf);
                engine.handle_packet(key, &out[..len])
            }
            // A VNF the gateway protects without a catalog yet: nothing passes. A VNF
            // it does not protect (the client, for replies) is policed by its own agent.
            None => Decision::Pass(asmn_shared::policy::Matched::Default),
        };
        if !decision.passes() {
            st.counters.policy_dropped += 1;
            return None;
        }
        let to = st.slots[to_slot as usize].as_mut()?;
        let endpoint = to.spec.endpoint;
        to.tx_bytes += len as u64;
        sink.encrypt(to.sending(), endpoint, &out[..len]);
        st.counters.rx_packets += 1;
        None
    }

    /// WireGuard timers (handshakes, keepalives, expiry) and stale queues, forever.
    pub async fn run_timers(self: Arc<Self>) {
        let mut out = vec![0u8; BUF];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            let mut refused = Vec::new();
            {
                let mut st = self.lock();
                let now = Instant::now();
                let mut retired = Vec::new();
                for peer in st.slots.iter_mut().flatten() {
                    if let TunnResult::WriteToNetwork(b) = peer.tunn.update_timers(&mut out) {
                        let _ = self.udp.send_to(b, peer.spec.endpoint);
                    }
                    let ready = peer.current_ready();
                    if let Some(prev) = peer.previous.as_mut() {
                        if ready && prev.retire_at.is_none() {
                            prev.retire_at = Some(now + RETIRE_AFTER);
                            tracing::info!(peer = %peer.spec.overlay, "PSK rotation complete");
                        }
                        let deadline = prev.retire_at.unwrap_or(prev.since + ROTATION_LIMIT);
                        if now >= deadline {
                            retired.push(prev.index);
                            peer.previous = None;
                        } else if let TunnResult::WriteToNetwork(b) =
                            prev.tunn.update_timers(&mut out)
                        {
                            let _ = self.udp.send_to(b, peer.spec.endpoint);
                        }
                    }
                }
                for i in retired {
                    st.indexes.remove(&i);
                }
                st.waiting.retain(|ip, w| {
                    let keep = now.duration_since(w.since) < QUEUE_WAIT;
                    if !keep {
                        refused.push((*ip, w.packets.len()));
                    }
                    keep
                });
                for (_, n) in &refused {
                    st.counters.queue_dropped += *n as u64;
                }
            }
            for (ip, _) in refused {
                tracing::debug!(%ip, "no tunnel in time: queued packets dropped");
            }
        }
    }

    /// Whether a peer with identity `id` is installed.
    pub fn has_peer(&self, id: &InstanceKey) -> bool {
        self.lock().slots.iter().flatten().any(|p| p.spec.id == *id)
    }

    /// The role of this agent.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This agent's overlay address.
    pub fn overlay(&self) -> IpAddr {
        self.overlay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_membership() {
        let net = ("10.77.0.0".parse().expect("ip"), 16);
        assert!(in_net("10.77.3.4".parse().expect("ip"), net));
        assert!(!in_net("10.78.0.1".parse().expect("ip"), net));
        assert!(!in_net("::1".parse().expect("ip"), net));
    }
}
