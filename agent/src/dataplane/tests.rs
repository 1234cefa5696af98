//! Two and three planes wired to each other in memory under a fake clock (as
//! wireguard-go's `TestTwoDevicePing`): real boringtun handshakes and encryption, no
//! sockets, no devices, no root. The control side is played by the test: it answers the
//! planes' asks as Sec-EM would (or refuses them).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use asmn_shared::catalog::{SecCatalog, parse_catalog};
use asmn_shared::crypto::PresharedKey;
use asmn_shared::ids::{InstanceKey, Role, VnfId};
use asmn_shared::policy::packet::{build, proto};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use governor::clock::FakeRelativeClock;

use super::*;

const NET: (IpAddr, u8) = (IpAddr::V4(Ipv4Addr::new(10, 77, 0, 0)), 16);

fn ip(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, host))
}

fn v4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, host)
}

fn endpoint(host: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, host)), 51820)
}

fn catalog(vnf: &str, body: &str) -> SecCatalog {
    parse_catalog(
        "test",
        format!("vnf: {vnf}\nsec_catalog:\n{body}").as_bytes(),
    )
    .expect("catalog")
}

/// A catalog that admits everything of the tenant (policed far above the tests' rates).
fn open(vnf: &str) -> SecCatalog {
    catalog(
        vnf,
        "  default_action:\n    police:\n      ingress_policing_rate: 100000000\n      ingress_policing_burst: 4000000\n",
    )
}

fn icmp(src: u8, dst: u8, seq: u8) -> Vec<u8> {
    build::ipv4(v4(src), v4(dst), proto::ICMP, &[8, 0, 0, 0, 0, 1, 0, seq])
}

fn tcp(src: u8, dst: u8, port: u16) -> Vec<u8> {
    build::ipv4(
        v4(src),
        v4(dst),
        proto::TCP,
        &build::tcp(40000, port, 0x02, 10),
    )
}

struct Node {
    host: u8,
    vnf: VnfId,
    id: InstanceKey,
    role: Role,
    plane: Plane<FakeRelativeClock>,
    addr: SocketAddr,
    out: Outbox,
    /// Packets delivered to this node's TUN device.
    received: Vec<Vec<u8>>,
    asks: Vec<Ask>,
}

impl Node {
    fn spec(&self, protected: bool) -> PeerSpec {
        PeerSpec {
            id: self.id,
            vnf: self.vnf.clone(),
            overlay: ip(self.host),
            endpoint: self.addr,
            wg_public: self.plane.public_key(),
            role: self.role,
            protected,
        }
    }
}

/// Planes on one in-memory underlay.
struct Lab {
    nodes: Vec<Node>,
    clock: FakeRelativeClock,
    now: Instant,
    /// Datagrams in flight: (from, to, bytes).
    wire: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// Every datagram sent, for replay attacks.
    sent: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}

/// The pair's PSK (the same from either side).
fn psk(a: &Node, b: &Node) -> PresharedKey {
    let (lo, hi) = (a.host.min(b.host), a.host.max(b.host));
    let mut k = [0u8; 32];
    for (i, x) in k.iter_mut().enumerate() {
        *x = lo.wrapping_mul(31) ^ hi.wrapping_mul(17) ^ i as u8;
    }
    PresharedKey::new(k)
}

impl Lab {
    fn new() -> Lab {
        Lab {
            nodes: Vec::new(),
            clock: FakeRelativeClock::default(),
            now: Instant::now(),
            wire: Vec::new(),
            sent: Vec::new(),
        }
    }

    fn add(&mut self, name: &'static str, host: u8, role: Role, seed: u8) -> usize {
        let secret = StaticSecret::from([seed; 32]);
        let mut plane = Plane::new(
            PlaneConfig {
                secret,
                overlay: ip(host),
                overlay_net: NET,
                role,
                index_seed: u32::from(seed) << 12,
            },
            self.clock.clone(),
        );
        plane.set_catalog(open(name));
        self.nodes.push(Node {
            host,
            vnf: VnfId::new(name).expect("vnf"),
            id: InstanceKey::from_bytes([host; 32]),
            role,
            plane,
            addr: endpoint(host),
            out: Outbox::new(64, 64),
            received: Vec::new(),
            asks: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// Moves what each outbox holds onto the wire or into `received`.
    fn collect(&mut self) {
        for n in &mut self.nodes {
            for (to, d) in n.out.net.datagrams() {
                self.wire.push((n.addr, to, d.to_vec()));
                self.sent.push((n.addr, to, d.to_vec()));
            }
            n.out.net.clear(64);
            n.received.extend(n.out.tun.packets().map(<[u8]>::to_vec));
            n.out.tun.clear();
            while let Some(a) = n.plane.poll_ask() {
                n.asks.push(a);
            }
        }
    }

    /// Delivers datagrams until the wire is quiet (bounded).
    fn run(&mut self) {
        for _ in 0..64 {
            self.collect();
            if self.wire.is_empty() {
                return;
            }
            for (from, to, d) in std::mem::take(&mut self.wire) {
                self.inject(from, to, &d);
            }
        }
        panic!("the wire never went quiet");
    }

    /// Hands one datagram to the node at `to` (an attacker's, or a replay).
    fn inject(&mut self, from: SocketAddr, to: SocketAddr, d: &[u8]) {
        let now = self.now;
        if let Some(n) = self.nodes.iter_mut().find(|n| n.addr == to) {
            n.plane.handle_datagram(now, from, d, &mut n.out);
        }
    }

    fn send(&mut self, from: usize, packet: &[u8]) {
        let now = self.now;
        let n = &mut self.nodes[from];
        n.plane.handle_tun(now, packet, &mut n.out);
        self.run();
    }

    /// Installs `b` at `a` (as the control side does after Sec-EM verified it).
    fn install(&mut self, a: usize, b: usize, protected: bool) -> Installed {
        let spec = self.nodes[b].spec(protected);
        let key = psk(&self.nodes[a], &self.nodes[b]);
        let now = self.now;
        let n = &mut self.nodes[a];
        let r = n.plane.install(now, spec, &key, &mut n.out);
        self.run();
        r
    }

    /// `c` and `s` (VNFs named "client" and "server") route each other through the
    /// gateway `g`, as after Sec-EM verified them both ways.
    fn route_through(&mut self, c: usize, s: usize, g: usize) {
        let gw = ip(self.nodes[g].host);
        for (from, to, vnf) in [(c, s, "server"), (s, c, "client")] {
            let (id, host) = (self.nodes[to].id, self.nodes[to].host);
            let n = &mut self.nodes[from];
            assert!(
                n.plane
                    .route_via(ip(host), id, VnfId::new(vnf).expect("vnf"), gw, &mut n.out)
            );
        }
    }

    /// Installs the pair both ways.
    fn pair(&mut self, a: usize, b: usize) {
        assert_eq!(self.install(a, b, false), Installed::New);
        assert_eq!(self.install(b, a, false), Installed::New);
    }

    fn advance(&mut self, d: Duration) {
        self.clock.advance(d);
        self.now += d;
        let now = self.now;
        for n in &mut self.nodes {
            n.plane.handle_timers(now, &mut n.out);
        }
        self.run();
    }

    fn counters(&self, i: usize) -> PlaneCounters {
        self.nodes[i].plane.counters()
    }

    fn take_received(&mut self, i: usize) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.nodes[i].received)
    }

    fn take_asks(&mut self, i: usize) -> Vec<Ask> {
        std::mem::take(&mut self.nodes[i].asks)
    }
}

#[test]
fn two_planes_ping_after_verification_and_queued_packets_are_released() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    // No route yet: the packet waits and Sec-EM is asked, once.
    lab.send(a, &icmp(2, 3, 1));
    lab.send(a, &icmp(2, 3, 2));
    assert_eq!(lab.take_asks(a), vec![Ask::Verify(ip(3))]);
    lab.pair(a, b);
    let got = lab.take_received(b);
    assert_eq!(got, vec![icmp(2, 3, 1), icmp(2, 3, 2)]);
    lab.send(b, &icmp(3, 2, 9));
    assert_eq!(lab.take_received(a), vec![icmp(3, 2, 9)]);
    let c = lab.counters(b);
    assert_eq!((c.rx_packets, c.tx_packets), (2, 1));
    // Addresses outside the tenant have no route.
    lab.send(
        a,
        &build::ipv4(v4(2), Ipv4Addr::new(8, 8, 8, 8), proto::ICMP, &[8, 0, 0, 0]),
    );
    assert_eq!(lab.counters(a).no_route, 1);
}

#[test]
fn cryptokey_routing_drops_a_foreign_inner_source_and_unauthenticated_datagrams() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    lab.pair(a, b);
    let before = lab.counters(b);
    // A peer (not a gateway) that claims another inner source.
    lab.send(a, &icmp(9, 3, 1));
    assert!(lab.take_received(b).is_empty());
    assert_eq!(lab.counters(b).spoofed, 1);
    // Random bytes, a data packet with an unknown index, a handshake with a wrong mac1.
    let attacker = endpoint(66);
    let to = lab.nodes[b].addr;
    lab.inject(attacker, to, b"not wireguard at all");
    let mut data = vec![0u8; 64];
    data[0] = 4;
    data[4..8].copy_from_slice(&0x00ab_cd00u32.to_le_bytes());
    lab.inject(attacker, to, &data);
    let mut init = vec![0u8; 148];
    init[0] = 1;
    lab.inject(attacker, to, &init);
    let c = lab.counters(b);
    assert_eq!(
        (c.malformed, c.unknown_peer - before.unknown_peer, c.bad_mac),
        (1, 1, 1)
    );
    assert!(lab.take_received(b).is_empty());
}

#[test]
fn a_vnf_enforces_its_catalog_and_without_one_nothing_passes() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    let x = lab.add("other", 4, Role::Vnf, 3);
    lab.nodes[b].plane.set_catalog(catalog(
        "server",
        "  default_action: drop\n  rules:\n    - name: web\n      protocol: tcp\n      port: 80\n      sources: [client]\n      ingress_policing_rate: 0\n",
    ));
    lab.pair(a, b);
    lab.pair(x, b);
    lab.send(a, &tcp(2, 3, 80));
    lab.send(a, &tcp(2, 3, 22));
    lab.send(x, &tcp(4, 3, 80));
    assert_eq!(lab.take_received(b), vec![tcp(2, 3, 80)]);
    assert_eq!(lab.counters(b).policy_dropped, 2);
    // Not listed is not limited.
    assert_eq!(lab.nodes[b].plane.limited(), 0);
    // A plane without any catalog: fail closed.
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    lab.nodes[b].plane.policy = None;
    lab.pair(a, b);
    lab.send(a, &icmp(2, 3, 1));
    assert!(lab.take_received(b).is_empty());
    assert_eq!(lab.counters(b).policy_dropped, 1);
}

/// A client, a gateway, a server behind it (catalog: tcp 5201 from the client only),
/// and a rogue VNF that is the gateway's legitimate peer; routes as Sec-EM would set
/// them. The gateway's catalog for the server is in force.
fn behind_gateway() -> (Lab, usize, usize, usize, usize) {
    behind_gateway_policed("ingress_policing_rate: 0")
}

/// [`behind_gateway`] with the server's rule policed by `police`.
fn behind_gateway_policed(police: &str) -> (Lab, usize, usize, usize, usize) {
    let mut lab = Lab::new();
    let c = lab.add("client", 2, Role::Vnf, 1);
    let g = lab.add("gw", 3, Role::Gateway, 2);
    let s = lab.add("server", 4, Role::Vnf, 3);
    let r = lab.add("rogue", 5, Role::Vnf, 4);
    let server_catalog = catalog(
        "server",
        &format!(
            "  gateway: gw\n  default_action: drop\n  rules:\n    - name: iperf\n      protocol: tcp\n      port: 5201\n      sources: [client]\n      {police}\n"
        ),
    );
    lab.nodes[s].plane.set_catalog(server_catalog.clone());
    lab.nodes[g].plane.set_protected_catalog(server_catalog);
    for v in [c, r] {
        assert_eq!(lab.install(v, g, false), Installed::New);
        assert_eq!(lab.install(g, v, false), Installed::New);
    }
    assert_eq!(lab.install(s, g, false), Installed::New);
    assert_eq!(lab.install(g, s, true), Installed::New);
    // The client and the server verified each other: each routes the other via the
    // gateway.
    lab.route_through(c, s, g);
    lab.run();
    (lab, c, g, s, r)
}

#[test]
fn the_gateway_forwards_only_pairs_sec_em_admitted_under_the_protected_catalog() {
    let (mut lab, c, g, s, _) = behind_gateway();
    lab.send(c, &tcp(2, 4, 5201));
    // Not admitted yet: it waits at the gateway, which asks Sec-EM.
    assert!(lab.take_received(s).is_empty());
    assert_eq!(
        lab.take_asks(g),
        vec![Ask::Admit {
            src: ip(2),
            dst: ip(4)
        }]
    );
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(2), ip(4), &mut n.out);
    lab.run();
    assert_eq!(lab.take_received(s), vec![tcp(2, 4, 5201)]);
    // Under the server's catalog at the gateway: an unlisted port never leaves it.
    lab.send(c, &tcp(2, 4, 22));
    assert!(lab.take_received(s).is_empty());
    assert_eq!(lab.counters(g).policy_dropped, 1);
    // The reply comes back through the gateway (the pair is admitted both ways) and
    // the client's own catalog admits the server.
    lab.send(s, &tcp(4, 2, 40000));
    assert_eq!(lab.take_received(c), vec![tcp(4, 2, 40000)]);
    assert_eq!(lab.counters(g).forwarded, 2);
}

#[test]
fn a_rogue_peer_of_the_gateway_reaches_nothing_sec_em_refused() {
    let (mut lab, _, g, s, r) = behind_gateway();
    // The rogue VNF forges a route to the server through the gateway (its own plane
    // would never route there: this is what a compromised agent sends).
    let sid = lab.nodes[s].id;
    let n = &mut lab.nodes[r];
    assert!(n.plane.route_via(
        ip(4),
        sid,
        VnfId::new("server").expect("vnf"),
        ip(3),
        &mut n.out
    ));
    for port in [5201, 22, 80] {
        lab.send(r, &tcp(5, 4, port));
    }
    assert_eq!(
        lab.take_asks(g),
        vec![Ask::Admit {
            src: ip(5),
            dst: ip(4)
        }]
    );
    // Sec-EM refuses the pair: what waited is dropped and counted, and later packets are
    // dropped without asking again.
    let now = lab.now;
    lab.nodes[g].plane.refuse_pair(now, ip(5), ip(4));
    lab.send(r, &tcp(5, 4, 5201));
    assert!(lab.take_received(s).is_empty());
    assert!(lab.take_asks(g).is_empty());
    assert_eq!(lab.counters(g).not_admitted, 4);
    assert_eq!(lab.counters(g).forwarded, 0);
}

#[test]
fn a_recipient_polices_relayed_packets_as_their_inner_source_vnf() {
    let (mut lab, _, g, s, r) = behind_gateway();
    // Suppose the gateway admitted the rogue (a wrong answer, or a compromised
    // gateway): the server still applies its own catalog, keyed by the inner source.
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(5), ip(4), &mut n.out);
    n.plane.protected.clear();
    n.plane.set_protected_catalog(open("server"));
    let sid = lab.nodes[s].id;
    let n = &mut lab.nodes[r];
    assert!(n.plane.route_via(
        ip(4),
        sid,
        VnfId::new("server").expect("vnf"),
        ip(3),
        &mut n.out
    ));
    lab.send(r, &tcp(5, 4, 5201));
    // The server has not verified the rogue: it holds the packet and asks Sec-EM.
    assert!(lab.take_received(s).is_empty());
    assert_eq!(lab.take_asks(s), vec![Ask::Verify(ip(5))]);
    // Verified (as reached through the gateway): the rogue's VNF is not in the rule.
    let rid = lab.nodes[r].id;
    let n = &mut lab.nodes[s];
    assert!(n.plane.route_via(
        ip(5),
        rid,
        VnfId::new("rogue").expect("vnf"),
        ip(3),
        &mut n.out
    ));
    lab.run();
    assert!(lab.take_received(s).is_empty());
    assert_eq!(lab.counters(s).policy_dropped, 1);
}

#[test]
fn a_gateway_passes_nothing_to_a_protected_vnf_without_its_catalog() {
    let (mut lab, c, g, s, _) = behind_gateway();
    lab.nodes[g].plane.protected.clear();
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(2), ip(4), &mut n.out);
    lab.send(c, &tcp(2, 4, 5201));
    assert!(lab.take_received(s).is_empty());
    assert_eq!(lab.counters(g).policy_dropped, 1);
}

#[test]
fn a_gateway_peer_cannot_relay_a_source_not_routed_through_it() {
    let (mut lab, c, g, _, _) = behind_gateway();
    // A second gateway-role peer of the client claims to relay the server's address,
    // which the client routes through the first gateway.
    let g2 = lab.add("gw2", 6, Role::Gateway, 9);
    assert_eq!(lab.install(c, g2, false), Installed::New);
    assert_eq!(lab.install(g2, c, false), Installed::New);
    let _ = g;
    let n = &mut lab.nodes[g2];
    // The gateway forwards what it gets from itself as a relay of 10.77.0.4.
    n.plane.routes.admit(ip(4), ip(2));
    lab.nodes[g2].plane.set_catalog(open("gw2"));
    let forged = tcp(4, 2, 40000);
    // Encrypt the forged packet straight into the client's tunnel at g2.
    let now = lab.now;
    let n = &mut lab.nodes[g2];
    let slot = n
        .plane
        .peers
        .slot_of(&InstanceKey::from_bytes([2; 32]))
        .expect("client slot");
    let peer = n.plane.peers.get_mut(slot).expect("peer");
    let to = peer.spec.endpoint;
    encrypt(
        peer.sending(),
        to,
        &forged,
        &mut n.out.net,
        &mut n.plane.counters,
    );
    let _ = now;
    lab.run();
    assert!(lab.take_received(c).is_empty());
    assert_eq!(lab.counters(c).spoofed, 1);
}

#[test]
fn a_restarted_peer_is_reachable_at_once_both_ways_and_its_old_tunnel_is_gone() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    lab.pair(a, b);
    lab.send(a, &icmp(2, 3, 1));
    assert_eq!(lab.take_received(b).len(), 1);
    let indexes = lab.nodes[a].plane.stats().indexes;
    // The server's agent restarts: same instance, new WireGuard key, nothing installed.
    let old_addr = lab.nodes[b].addr;
    lab.nodes.remove(b);
    let b = lab.add("server", 3, Role::Vnf, 77);
    assert_eq!(lab.nodes[b].addr, old_addr);
    // Sec-EM pushes its new key to the client: the tunnel is replaced, not added.
    assert_eq!(lab.install(a, b, false), Installed::Replaced);
    assert_eq!(lab.nodes[a].plane.stats().indexes, indexes);
    assert_eq!(lab.nodes[a].plane.stats().peers.len(), 1);
    // The restarted server verifies the client when it first sends.
    lab.send(b, &icmp(3, 2, 2));
    assert_eq!(lab.take_asks(b), vec![Ask::Verify(ip(2))]);
    assert_eq!(lab.install(b, a, false), Installed::New);
    assert_eq!(lab.take_received(a), vec![icmp(3, 2, 2)]);
    lab.send(a, &icmp(2, 3, 3));
    assert_eq!(lab.take_received(b), vec![icmp(2, 3, 3)]);
}

#[test]
fn a_removed_peer_leaves_no_state_and_nothing_passes_either_way() {
    let (mut lab, c, g, s, _) = behind_gateway();
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(2), ip(4), &mut n.out);
    lab.send(c, &tcp(2, 4, 5201));
    assert_eq!(lab.take_received(s).len(), 1);
    // The client is revoked: every agent removes it.
    let cid = lab.nodes[c].id;
    for i in [g, s] {
        assert!(lab.nodes[i].plane.remove(&cid));
        assert!(!lab.nodes[i].plane.knows(&cid));
    }
    let st = lab.nodes[g].plane.stats();
    assert_eq!(st.admitted_pairs, 0);
    assert!(st.peers.iter().all(|p| p.id != cid));
    assert!(!lab.nodes[s].plane.routes_to(ip(2)));
    // The revoked client keeps running and keeps sending: nothing arrives.
    let before = lab.counters(g);
    lab.send(c, &tcp(2, 4, 5201));
    assert!(lab.take_received(s).is_empty());
    assert!(lab.counters(g).unknown_peer > before.unknown_peer);
    // Nor the other way.
    lab.send(s, &tcp(4, 2, 40000));
    assert!(lab.take_received(c).is_empty());
    assert_eq!(lab.take_asks(s), vec![Ask::Verify(ip(2))]);
}

/// A handshake initiation from a boringtun tunnel with key `seed` towards `to`.
fn forged_init(seed: u8, to: PublicKey) -> Vec<u8> {
    let mut t = Tunn::new(
        StaticSecret::from([seed; 32]),
        to,
        None,
        None,
        u32::from(seed),
        None,
    );
    let mut buf = vec![0u8; 256];
    match t.format_handshake_initiation(&mut buf, true) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => panic!("no initiation"),
    }
}

#[test]
fn forged_initiations_cost_no_diffie_hellman_without_mac1_and_cookies_under_load() {
    let mut lab = Lab::new();
    let b = lab.add("server", 3, Role::Vnf, 2);
    let to = lab.nodes[b].addr;
    let public = PublicKey::from(lab.nodes[b].plane.public_key());
    // Wrong mac1 (the attacker does not know the key): dropped before any X25519, and
    // not counted towards the load (junk cannot make the plane shed real handshakes).
    for i in 0..500u32 {
        let mut init = forged_init(200, PublicKey::from([9; 32]));
        init[8] ^= i as u8;
        lab.inject(endpoint(66), to, &init);
    }
    let c = lab.counters(b);
    assert_eq!(c.bad_mac, 500, "{c:?}");
    assert_eq!(c.rejected + c.unknown_peer + c.handshakes_shed, 0);
    // A valid mac1 (the attacker knows the public key), from many addresses: past the
    // handshake budget of the second, each must prove its address with a cookie first.
    lab.advance(Duration::from_secs(1));
    let init = forged_init(201, public);
    let n = 3 * HANDSHAKES_PER_SECOND;
    let source = |i: u64| {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(198, 51, (i / 250) as u8, (i % 250) as u8)),
            4000,
        )
    };
    for i in 0..n {
        lab.inject(source(i), to, &init);
    }
    let c = lab.counters(b);
    assert!(c.cookie_replies >= n - HANDSHAKES_PER_SECOND, "{c:?}");
    assert!(c.unknown_peer <= HANDSHAKES_PER_SECOND, "{c:?}");
    // From one address, past its budget: shed unread (no cookie either).
    let (cookies, shed) = (c.cookie_replies, c.handshakes_shed);
    for _ in 0..50 {
        lab.inject(endpoint(66), to, &init);
    }
    let c = lab.counters(b);
    assert!(
        c.cookie_replies - cookies <= u64::from(LOADED_PER_SOURCE),
        "{c:?}"
    );
    assert!(
        c.handshakes_shed - shed >= 50 - u64::from(LOADED_PER_SOURCE),
        "{c:?}"
    );
}

#[test]
fn the_endpoint_moves_only_on_authenticated_packets() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    // The server first, so that every initiation of the client reaches a server that
    // knows it (a delayed initiation the server never saw would be a fresh handshake,
    // which moves the endpoint as WireGuard's roaming does).
    assert_eq!(lab.install(b, a, false), Installed::New);
    assert_eq!(lab.install(a, b, false), Installed::New);
    lab.send(a, &icmp(2, 3, 1));
    let endpoint_of_a = |lab: &Lab| lab.nodes[b].plane.stats().peers[0].endpoint;
    assert_eq!(endpoint_of_a(&lab), lab.nodes[a].addr);
    let to = lab.nodes[b].addr;
    let thief = endpoint(66);
    // A replay of the client's own handshake initiation from elsewhere.
    let inits: Vec<Vec<u8>> = lab
        .sent
        .iter()
        .filter(|(from, _, d)| *from == lab.nodes[a].addr && d[0] == 1)
        .map(|(_, _, d)| d.clone())
        .collect();
    assert!(!inits.is_empty());
    // Many times: past the peer's own handshake budget (10 a second) its tunnel
    // answers with cookie replies, which must not move the endpoint either.
    for _ in 0..20 {
        for d in &inits {
            lab.inject(thief, to, d);
        }
    }
    // A replayed data packet from elsewhere.
    let datas: Vec<Vec<u8>> = lab
        .sent
        .iter()
        .filter(|(from, _, d)| *from == lab.nodes[a].addr && d[0] == 4)
        .map(|(_, _, d)| d.clone())
        .collect();
    for d in &datas {
        lab.inject(thief, to, d);
    }
    assert_eq!(endpoint_of_a(&lab), lab.nodes[a].addr);
    // Under load, the replayed initiation gets a cookie reply: still no move.
    let public = PublicKey::from(lab.nodes[b].plane.public_key());
    let junk = forged_init(201, public);
    for _ in 0..2 * HANDSHAKES_PER_SECOND {
        lab.inject(endpoint(67), to, &junk);
    }
    for d in &inits {
        lab.inject(thief, to, d);
    }
    assert_eq!(endpoint_of_a(&lab), lab.nodes[a].addr);
    lab.wire.clear();
    // The client really moves: its next authenticated packet moves the endpoint.
    lab.nodes[a].addr = endpoint(99);
    lab.send(a, &icmp(2, 3, 2));
    assert_eq!(lab.take_received(b).len(), 2);
    assert_eq!(endpoint_of_a(&lab), endpoint(99));
}

#[test]
fn a_psk_rotation_keeps_the_flow_and_retires_the_old_tunnel() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    lab.pair(a, b);
    lab.send(a, &icmp(2, 3, 1));
    let before = lab.nodes[a].plane.stats().indexes;
    // New PSK on both sides (a key epoch rolled).
    let new = PresharedKey::new([42; 32]);
    let now = lab.now;
    for (x, y) in [(a, b), (b, a)] {
        let spec = lab.nodes[y].spec(false);
        let n = &mut lab.nodes[x];
        assert_eq!(
            n.plane.install(now, spec, &new, &mut n.out),
            Installed::Rotated
        );
    }
    lab.run();
    for seq in 2..6 {
        lab.send(a, &icmp(2, 3, seq));
        lab.send(b, &icmp(3, 2, seq));
    }
    assert_eq!(lab.take_received(b).len(), 5);
    assert_eq!(lab.take_received(a).len(), 4);
    assert_eq!(lab.nodes[a].plane.stats().indexes, before + 1);
    lab.advance(Duration::from_millis(100));
    lab.advance(RETIRE_AFTER + Duration::from_millis(100));
    assert_eq!(lab.nodes[a].plane.stats().indexes, before);
    lab.send(a, &icmp(2, 3, 7));
    assert_eq!(lab.take_received(b).len(), 1);
}

#[test]
fn the_wait_queue_is_bounded_expires_and_refusals_are_not_asked_again() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    for seq in 0..(QUEUE_PER_KEY + 10) {
        lab.send(a, &icmp(2, 3, seq as u8));
    }
    assert_eq!(lab.counters(a).queue_dropped, 10);
    assert_eq!(lab.nodes[a].plane.stats().waiting, QUEUE_PER_KEY);
    // 256 destinations at most.
    for host in 0..=255u8 {
        let p = build::ipv4(
            v4(2),
            Ipv4Addr::new(10, 77, 1, host),
            proto::ICMP,
            &[8, 0, 0, 0],
        );
        lab.send(a, &p);
    }
    assert_eq!(lab.take_asks(a).len(), QUEUE_KEYS);
    // Nobody answers: after QUEUE_WAIT everything is dropped, counted.
    let waiting = lab.nodes[a].plane.stats().waiting as u64;
    let dropped = lab.counters(a).queue_dropped;
    lab.advance(QUEUE_WAIT);
    assert_eq!(lab.nodes[a].plane.stats().waiting, 0);
    assert_eq!(lab.counters(a).queue_dropped, dropped + waiting);
    // A refused destination: dropped without asking again, until REFUSED_FOR passed.
    lab.send(a, &icmp(2, 3, 1));
    assert_eq!(lab.take_asks(a), vec![Ask::Verify(ip(3))]);
    let now = lab.now;
    lab.nodes[a].plane.refuse(now, ip(3));
    lab.send(a, &icmp(2, 3, 2));
    assert!(lab.take_asks(a).is_empty());
    lab.advance(REFUSED_FOR);
    lab.send(a, &icmp(2, 3, 3));
    assert_eq!(lab.take_asks(a), vec![Ask::Verify(ip(3))]);
}

#[test]
fn a_full_batch_and_an_oversized_inner_packet_are_counted() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    lab.pair(a, b);
    lab.send(a, &icmp(2, 3, 1));
    assert_eq!(lab.take_received(b).len(), 1);
    // An outbox with room for one packet's worth: the rest of a burst is counted.
    lab.nodes[a].out = Outbox::new(1, 64);
    let now = lab.now;
    let n = &mut lab.nodes[a];
    let big = build::ipv4(v4(2), v4(3), proto::UDP, &build::udp(1, 2, 1300));
    for _ in 0..20 {
        n.plane.handle_tun(now, &big, &mut n.out);
    }
    assert!(n.plane.counters().outbox_full > 0);
    lab.run();
    lab.nodes[a].out = Outbox::new(64, 64);
    lab.take_received(b);
    // An inner packet larger than the plane carries: dropped at the receiver, counted.
    let huge = build::ipv4(v4(2), v4(3), proto::UDP, &build::udp(1, 2, PACKET));
    lab.send(a, &huge);
    assert!(lab.take_received(b).is_empty());
    assert_eq!(lab.counters(b).oversize, 1);
}

#[test]
fn a_key_held_by_another_instance_is_refused() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    lab.pair(a, b);
    // An enrolled instance that publishes the server's key as its own.
    let mut spec = lab.nodes[b].spec(false);
    spec.id = InstanceKey::from_bytes([99; 32]);
    spec.overlay = ip(99);
    let key = PresharedKey::new([1; 32]);
    let now = lab.now;
    let n = &mut lab.nodes[a];
    assert_eq!(
        n.plane.install(now, spec, &key, &mut n.out),
        Installed::KeyConflict
    );
    assert!(!n.plane.routes_to(ip(99)));
    lab.run();
    lab.send(a, &icmp(2, 3, 1));
    assert_eq!(lab.take_received(b).len(), 1);
}

/// Sends `packet` from `from` into its tunnel to instance `to`, as a compromised agent
/// does (whatever its routes say).
fn forge(lab: &mut Lab, from: usize, to: InstanceKey, packet: &[u8]) {
    let n = &mut lab.nodes[from];
    let slot = n.plane.peers.slot_of(&to).expect("slot");
    let peer = n.plane.peers.get_mut(slot).expect("peer");
    let ep = peer.spec.endpoint;
    encrypt(
        peer.sending(),
        ep,
        packet,
        &mut n.out.net,
        &mut n.plane.counters,
    );
    lab.run();
}

#[test]
fn a_queued_relayed_packet_needs_the_verified_gateway_and_our_address() {
    let (mut lab, c, _, s, _) = behind_gateway();
    let (cid, sid) = (lab.nodes[c].id, lab.nodes[s].id);
    // The server has not met the client yet.
    assert!(lab.nodes[s].plane.remove(&cid) || !lab.nodes[s].plane.knows(&cid));
    lab.nodes[s].plane.revoked = Default::default();
    // A second gateway-role peer of the server relays "the client", to the server and
    // to another address.
    let g2 = lab.add("gw2", 6, Role::Gateway, 9);
    assert_eq!(lab.install(s, g2, false), Installed::New);
    assert_eq!(lab.install(g2, s, false), Installed::New);
    forge(&mut lab, g2, sid, &tcp(2, 4, 5201));
    forge(&mut lab, g2, sid, &tcp(2, 9, 5201));
    assert!(lab.take_asks(s).contains(&Ask::Verify(ip(2))));
    // Sec-EM: the client is reached through the first gateway.
    let n = &mut lab.nodes[s];
    assert!(n.plane.route_via(
        ip(2),
        cid,
        VnfId::new("client").expect("vnf"),
        ip(3),
        &mut n.out
    ));
    lab.run();
    assert!(lab.take_received(s).is_empty(), "gw2 spoofed the client");
    let c = lab.counters(s);
    assert_eq!((c.spoofed, c.no_route), (1, 1), "{c:?}");
}

#[test]
fn a_late_answer_does_not_bring_back_a_revoked_peer() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    lab.send(a, &icmp(2, 3, 1));
    assert_eq!(lab.take_asks(a), vec![Ask::Verify(ip(3))]);
    let bid = lab.nodes[b].id;
    // The revocation push overtakes Sec-EM's answer, which lands afterwards.
    lab.nodes[a].plane.remove(&bid);
    assert_eq!(lab.install(a, b, false), Installed::Revoked);
    let _ = lab.install(b, a, false);
    assert!(
        lab.take_received(b).is_empty(),
        "a queued packet reached the revoked peer"
    );
    lab.send(b, &icmp(3, 2, 9));
    assert!(
        lab.take_received(a).is_empty(),
        "the revoked peer has a tunnel again"
    );
    let (sid, vnf) = (bid, VnfId::new("server").expect("vnf"));
    let n = &mut lab.nodes[a];
    assert!(!n.plane.route_via(ip(3), sid, vnf, ip(9), &mut n.out));
}

#[test]
fn junk_spoofed_from_a_peers_address_does_not_shed_its_handshake() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    assert_eq!(lab.install(b, a, false), Installed::New);
    let (from, to) = (lab.nodes[a].addr, lab.nodes[b].addr);
    let mut junk = vec![0u8; 148];
    junk[0] = 1;
    for _ in 0..HANDSHAKES_PER_SECOND + u64::from(LOADED_PER_SOURCE) {
        lab.inject(from, to, &junk);
    }
    assert_eq!(lab.install(a, b, false), Installed::New);
    lab.send(a, &icmp(2, 3, 1));
    assert_eq!(lab.take_received(b).len(), 1, "{:?}", lab.counters(b));
}

#[test]
fn one_peer_cannot_fill_the_gateways_admission_queue() {
    let (mut lab, c, g, _, r) = behind_gateway();
    let gid = lab.nodes[g].id;
    for i in 0..300u32 {
        let dst = Ipv4Addr::new(10, 77, 1 + (i / 250) as u8, (i % 250) as u8);
        forge(
            &mut lab,
            r,
            gid,
            &build::ipv4(v4(5), dst, proto::UDP, &build::udp(1, 2, 10)),
        );
    }
    // Outside the tenant: not even asked about.
    forge(
        &mut lab,
        r,
        gid,
        &build::ipv4(
            v4(5),
            Ipv4Addr::new(8, 8, 8, 8),
            proto::UDP,
            &build::udp(1, 2, 10),
        ),
    );
    assert_eq!(lab.take_asks(g).len(), PAIRS_PER_SOURCE);
    assert!(lab.counters(g).not_admitted >= 300 - PAIRS_PER_SOURCE as u64);
    lab.send(c, &tcp(2, 4, 5201));
    assert_eq!(
        lab.take_asks(g),
        vec![Ask::Admit {
            src: ip(2),
            dst: ip(4)
        }]
    );
}

#[test]
fn a_replayed_initiation_does_not_move_the_endpoint_after_a_rotation() {
    let mut lab = Lab::new();
    let a = lab.add("client", 2, Role::Vnf, 1);
    let b = lab.add("server", 3, Role::Vnf, 2);
    assert_eq!(lab.install(b, a, false), Installed::New);
    assert_eq!(lab.install(a, b, false), Installed::New);
    let (addr_a, to) = (lab.nodes[a].addr, lab.nodes[b].addr);
    let inits: Vec<Vec<u8>> = lab
        .sent
        .iter()
        .filter(|(f, _, d)| *f == addr_a && d[0] == 1)
        .map(|(_, _, d)| d.clone())
        .collect();
    let (spec, now) = (lab.nodes[a].spec(false), lab.now);
    let n = &mut lab.nodes[b];
    assert_eq!(
        n.plane
            .install(now, spec, &PresharedKey::new([42; 32]), &mut n.out),
        Installed::Rotated
    );
    n.out.net.clear(64);
    for d in &inits {
        lab.inject(endpoint(66), to, d);
    }
    assert_eq!(lab.nodes[b].plane.stats().peers[0].endpoint, addr_a);
}

#[test]
fn a_gateway_polices_a_vnf_whose_catalog_names_it_after_it_was_installed() {
    let (mut lab, c, g, s, _) = behind_gateway();
    // The gateway installed the server as not protected; its catalog came later.
    let sid = lab.nodes[s].id;
    let slot = lab.nodes[g].plane.peers.slot_of(&sid).expect("slot");
    lab.nodes[g]
        .plane
        .peers
        .get_mut(slot)
        .expect("peer")
        .spec
        .protected = false;
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(2), ip(4), &mut n.out);
    lab.send(c, &tcp(2, 4, 22));
    assert!(lab.take_received(s).is_empty());
    assert_eq!(lab.counters(g).policy_dropped, 1);
}

/// Sends `n` packets from `from`, `every` apart, through the gateway `g`; what the
/// gateway forwards is held and then handed on at once (a path that bunched them up:
/// batching, a descheduled thread).
fn bunched_through_gateway(
    lab: &mut Lab,
    from: usize,
    g: usize,
    packet: &[u8],
    n: usize,
    every: Duration,
) {
    let gw = lab.nodes[g].addr;
    let mut held = Vec::new();
    for _ in 0..n {
        let now = lab.now;
        let node = &mut lab.nodes[from];
        node.plane.handle_tun(now, packet, &mut node.out);
        for _ in 0..4 {
            lab.collect();
            let (to_gw, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut lab.wire)
                .into_iter()
                .partition(|(_, to, _)| *to == gw);
            held.extend(rest.into_iter().filter(|(f, _, _)| *f == gw));
            for (f, t, d) in to_gw {
                lab.inject(f, t, &d);
            }
        }
        lab.clock.advance(every);
        lab.now += every;
    }
    for (f, t, d) in held {
        lab.inject(f, t, &d);
    }
    lab.run();
}

/// 800 kbit/s with a burst of 8 kbit: 1,000 bytes at once, then 100,000 bytes a
/// second (what the gateway relays meets a burst of 10,000 bytes at the VNF).
const POLICE_800K: &str = "ingress_policing_rate: 800\n      ingress_policing_burst: 8";
/// 8 kbit/s with a burst of 8 kbit: 1,000 bytes at once, then 1,000 bytes a second.
const POLICE_8K: &str = "ingress_policing_rate: 8\n      ingress_policing_burst: 8";

fn server_catalog_policed(police: &str) -> SecCatalog {
    catalog(
        "server",
        &format!(
            "  gateway: gw\n  default_action: drop\n  rules:\n    - name: iperf\n      protocol: tcp\n      port: 5201\n      sources: [client]\n      {police}\n"
        ),
    )
}

#[test]
fn what_the_named_gateway_policed_meets_a_wider_burst_and_anything_else_the_rule() {
    let (mut lab, c, g, s, _) = behind_gateway_policed(POLICE_800K);
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(2), ip(4), &mut n.out);
    let packet = tcp(2, 4, 5201);
    // 30 packets at the policed rate (each one's length at 100,000 bytes a second):
    // every one conforms at the gateway, and the server gets them in one burst, more
    // than the rule's 1,000 bytes.
    let every = Duration::from_micros(10 * packet.len() as u64);
    bunched_through_gateway(&mut lab, c, g, &packet, 30, every);
    assert!(30 * packet.len() > 1_000);
    assert_eq!(lab.counters(g).forwarded, 30);
    assert_eq!(lab.counters(g).policy_dropped, 0);
    assert_eq!(lab.take_received(s).len(), 30, "{:?}", lab.counters(s));
    assert_eq!(lab.counters(s).policy_dropped, 0);
    // The gateway still polices: the same packets at once, far over the rate.
    lab.advance(Duration::from_secs(1));
    for _ in 0..30 {
        lab.send(c, &packet);
    }
    let passed = lab.take_received(s).len();
    assert!(
        passed < 30 && passed * packet.len() <= 1_000,
        "{passed} passed"
    );
    // The client's catalog names no gateway: what the gateway relays to it (the
    // server's replies, which the gateway does not police: it protects the server) is
    // policed by the client with its rule's own burst.
    lab.nodes[c].plane.set_catalog(catalog(
        "client",
        &format!("  default_action: drop\n  rules:\n    - name: back\n      protocol: tcp\n      sources: [server]\n      {POLICE_800K}\n"),
    ));
    lab.advance(Duration::from_secs(2));
    let reply = tcp(4, 2, 40000);
    bunched_through_gateway(&mut lab, s, g, &reply, 30, every);
    let passed = lab.take_received(c).len();
    assert!(
        passed < 30 && passed * reply.len() <= 1_000,
        "{passed} replies passed"
    );
    assert_eq!(lab.counters(c).policy_dropped, 30 - passed as u64);
    // Each of them a limiter's drop: the driver's sign that the limiter's timing matters.
    assert_eq!(lab.nodes[c].plane.limited(), 30 - passed as u64);
}

/// The server has a new catalog (8 kbit/s) that the gateway has not got yet (it still
/// enforces no rate): the server's own limiter holds the rate.
#[test]
fn a_rate_the_gateway_has_not_got_yet_is_enforced_by_the_vnf() {
    let (mut lab, c, g, s, _) = behind_gateway();
    lab.nodes[s]
        .plane
        .set_catalog(server_catalog_policed(POLICE_8K));
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(2), ip(4), &mut n.out);
    let packet = tcp(2, 4, 5201);
    for _ in 0..30 {
        lab.send(c, &packet);
    }
    assert_eq!(lab.counters(g).forwarded, 30);
    let passed = lab.take_received(s).len();
    assert!(passed * packet.len() <= 1_000, "{passed} packets passed");
}

/// A gateway that installed the server unprotected and has none of its catalogs relays
/// unpoliced; the server's catalog names it: the server still holds its rate.
#[test]
fn a_gateway_without_the_catalog_naming_it_does_not_open_the_rate() {
    let mut lab = Lab::new();
    let c = lab.add("client", 2, Role::Vnf, 1);
    let g = lab.add("gw", 3, Role::Gateway, 2);
    let s = lab.add("server", 4, Role::Vnf, 3);
    lab.nodes[s]
        .plane
        .set_catalog(server_catalog_policed(POLICE_8K));
    assert_eq!(lab.install(c, g, false), Installed::New);
    assert_eq!(lab.install(g, c, false), Installed::New);
    assert_eq!(lab.install(s, g, false), Installed::New);
    assert_eq!(lab.install(g, s, false), Installed::New);
    lab.route_through(c, s, g);
    let n = &mut lab.nodes[g];
    n.plane.admit(ip(2), ip(4), &mut n.out);
    lab.run();
    let packet = tcp(2, 4, 5201);
    for _ in 0..30 {
        lab.send(c, &packet);
    }
    assert_eq!(lab.counters(g).policy_dropped, 0);
    let passed = lab.take_received(s).len();
    assert!(passed * packet.len() <= 1_000, "{passed} packets passed");
}

/// Two instances of the gateway VNF (a limiter each) relay two instances of the client:
/// together they get no more than the rate of the client's VNF at the server.
#[test]
fn two_gateway_instances_do_not_double_a_source_vnfs_rate() {
    let mut lab = Lab::new();
    let c1 = lab.add("client", 2, Role::Vnf, 1);
    let g1 = lab.add("gw", 3, Role::Gateway, 2);
    let s = lab.add("server", 4, Role::Vnf, 3);
    let c2 = lab.add("client", 6, Role::Vnf, 5);
    let g2 = lab.add("gw", 7, Role::Gateway, 6);
    let cat = server_catalog_policed(POLICE_8K);
    lab.nodes[s].plane.set_catalog(cat.clone());
    for (c, g) in [(c1, g1), (c2, g2)] {
        lab.nodes[g].plane.set_protected_catalog(cat.clone());
        assert_eq!(lab.install(c, g, false), Installed::New);
        assert_eq!(lab.install(g, c, false), Installed::New);
        assert_eq!(lab.install(s, g, false), Installed::New);
        assert_eq!(lab.install(g, s, true), Installed::New);
        lab.route_through(c, s, g);
        let ch = lab.nodes[c].host;
        let n = &mut lab.nodes[g];
        n.plane.admit(ip(ch), ip(4), &mut n.out);
        lab.run();
    }
    let mut bytes = 0;
    for c in [c1, c2] {
        let packet = tcp(lab.nodes[c].host, 4, 5201);
        for _ in 0..30 {
            lab.send(c, &packet);
        }
        bytes += lab.take_received(s).len() * packet.len();
    }
    assert!(
        bytes <= 1_000,
        "{bytes} bytes from VNF client reached the server"
    );
}
