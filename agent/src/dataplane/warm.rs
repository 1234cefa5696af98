//! Keeping the per-packet code warm while a busy-polling data plane waits.
//!
//! A packet that comes after a pause finds the plane's, boringtun's and ring's code and
//! tables out of the CPU's caches and TLB, even on a thread that never slept: the polling
//! loop's system calls and the other tasks of the machine evict them. On the 2-core VM of
//! `asmn-lab`, sealing or opening a 64-byte echo costs 0.24-0.32 us back to back, and 7-9
//! us after 50 ms of polling; sealing and opening a throwaway packet every 200 us while
//! polling keeps it at 1.3-1.4 us (`asmn-lab gen crypto-wake --sleep-ms 50 --poll
//! --keep-warm-us 200`).
//!
//! [`Warmer`] passes an echo and its reply between two planes of its own, through the
//! same calls a real packet takes ([`Plane::handle_tun`], [`Plane::handle_datagram`]:
//! routing, sealing, opening, cryptokey routing, the catalog), so the next real packet
//! finds that code in the caches. The two planes have throwaway keys, test-network
//! addresses (192.0.2.0/24) and their own outboxes, and never reach the network or the
//! TUN device: the real plane's peers, counters, limiters and keys are not touched. In
//! the agent, the time from the socket read of an echo to its TUN write went from 21 to
//! 8 us with the warm-ups (a `perf` trace of the system calls). The planes and their
//! outboxes reserve about 420 KiB, most of it pages never touched (buffers sized for
//! super-packets).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use asmn_shared::catalog::{DefaultAction, MAX_BURST, MAX_RATE, Police, SecCatalog};
use asmn_shared::crypto::PresharedKey;
use asmn_shared::ids::{InstanceKey, Role, VnfId};
use asmn_shared::policy::packet::{build, proto};
use boringtun::x25519::StaticSecret;
use governor::clock::Clock;
use rand::RngCore;
use zeroize::Zeroize;

use super::{Installed, Outbox, PeerSpec, Plane, PlaneConfig};

/// The warm-up planes' network (RFC 5737's TEST-NET-1, for documentation: no tenant
/// should use it, and the planes are isolated if one does).
const NET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);
/// Datagrams passed between the two planes in one exchange, at most (a handshake and
/// the packets it released take a few).
const EXCHANGE: usize = 8;
/// The planes' VNF names.
const NAMES: [&str; 2] = ["warm-up-a", "warm-up-b"];

/// Why no warm-up planes could be made (never seen: each would be a bug here).
#[derive(Debug, thiserror::Error)]
pub enum WarmUpError {
    /// A plane refused the other as its peer.
    #[error("a warm-up plane refused the other as its peer ({0:?})")]
    Refused(Installed),
    /// A name is not a VNF name.
    #[error("a warm-up plane's VNF name was refused: {0}")]
    Name(String),
    /// The echo or its reply did not arrive.
    #[error("the warm-up echo did not pass between the planes")]
    Echo,
}

/// Two planes that know each other, and an echo to pass between them.
pub struct Warmer<C: Clock + Clone> {
    planes: [Plane<C>; 2],
    outs: [Outbox; 2],
    /// Each plane's packet for the other: an echo request and its reply.
    packets: [Vec<u8>; 2],
}

impl<C: Clock + Clone> std::fmt::Debug for Warmer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer").finish_non_exhaustive()
    }
}

fn host(i: usize) -> Ipv4Addr {
    let [a, b, c, _] = NET.octets();
    Ipv4Addr::new(a, b, c, 1 + u8::from(i == 1))
}

fn endpoint(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(host(i)), 51820)
}

/// What `make` makes of 32 bytes from `rng` (the bytes wiped after).
fn fresh<T>(rng: &mut impl RngCore, make: impl FnOnce([u8; 32]) -> T) -> T {
    let mut k = [0u8; 32];
    rng.fill_bytes(&mut k);
    let made = make(k);
    k.zeroize();
    made
}

impl<C: Clock + Clone> Warmer<C> {
    /// Two planes on `clock` with keys from `rng`, each the other's peer under a catalog
    /// that passes anything at the highest rate a catalog may set, and a session between
    /// them (one handshake, made here); an error if an echo did not pass both ways.
    pub fn new(now: Instant, rng: &mut impl RngCore, clock: C) -> Result<Warmer<C>, WarmUpError> {
        let secrets = [(); 2].map(|()| fresh(rng, StaticSecret::from));
        let ids = [(); 2].map(|()| fresh(rng, InstanceKey::from_bytes));
        let psk = fresh(rng, PresharedKey::new);
        let vnfs = NAMES
            .iter()
            .map(|n| VnfId::new(*n).map_err(|e| WarmUpError::Name(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let plane = |i: usize, secret: StaticSecret| {
            let mut p = Plane::new(
                PlaneConfig {
                    secret,
                    overlay: IpAddr::V4(host(i)),
                    overlay_net: (IpAddr::V4(NET), 24),
                    role: Role::Vnf,
                    index_seed: 1 << 12,
                },
                clock.clone(),
            );
            p.set_catalog(SecCatalog {
                vnf: vnfs[i].clone(),
                version: 1,
                gateway: None,
                default_action: DefaultAction::Police(Police {
                    rate: MAX_RATE,
                    burst: MAX_BURST,
                }),
                rules: Vec::new(),
            });
            p
        };
        let [a, b] = secrets;
        let mut planes = [plane(0, a), plane(1, b)];
        let mut outs = [Outbox::new(2, 1), Outbox::new(2, 1)];
        for i in 0..2 {
            let spec = PeerSpec {
                id: ids[1 - i],
                vnf: vnfs[1 - i].clone(),
                overlay: IpAddr::V4(host(1 - i)),
                endpoint: endpoint(1 - i),
                wg_public: planes[1 - i].public_key(),
                role: Role::Vnf,
                protected: false,
            };
            match planes[i].install(now, spec, &psk, &mut outs[i]) {
                Installed::New => {}
                other => return Err(WarmUpError::Refused(other)),
            }
        }
        let echo = |from: usize, kind: u8| {
            build::ipv4(
                host(from),
                host(1 - from),
                proto::ICMP,
                &[kind, 0, 0, 0, 0, 1, 0, 1],
            )
        };
        let mut w = Warmer {
            planes,
            outs,
            packets: [echo(0, 8), echo(1, 0)],
        };
        // The first exchange carries the handshake too.
        w.exchange(now);
        if w.warm(now) {
            Ok(w)
        } else {
            Err(WarmUpError::Echo)
        }
    }

    /// Passes what each outbox holds to the other plane until both are quiet (bounded):
    /// how many packets each plane delivered.
    fn exchange(&mut self, now: Instant) -> [usize; 2] {
        let mut delivered = [0, 0];
        let mut buf = Vec::new();
        for _ in 0..EXCHANGE {
            let mut quiet = true;
            for (i, got) in delivered.iter_mut().enumerate() {
                *got += self.outs[i].tun.packets().count();
                self.outs[i].tun.clear();
                buf.clear();
                buf.extend(
                    self.outs[i]
                        .net
                        .datagrams()
                        .filter(|(to, _)| *to == endpoint(1 - i))
                        .map(|(_, d)| d.to_vec()),
                );
                self.outs[i].net.clear(1);
                for d in &buf {
                    quiet = false;
                    let (p, o) = (&mut self.planes[1 - i], &mut self.outs[1 - i]);
                    p.handle_datagram(now, endpoint(i), d, o);
                }
            }
            if quiet {
                break;
            }
        }
        delivered
    }

    /// An echo from the first plane to the second and its reply back: whether each
    /// arrived once.
    pub fn warm(&mut self, now: Instant) -> bool {
        let mut ok = true;
        for i in 0..2 {
            let (p, o) = (&mut self.planes[i], &mut self.outs[i]);
            p.handle_tun(now, &self.packets[i], o);
            let delivered = self.exchange(now);
            ok &= delivered[1 - i] == 1 && delivered[i] == 0;
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    #[test]
    fn a_warm_up_passes_its_echo_both_ways_through_the_planes_every_time() {
        let (start, clock) = (Instant::now(), FakeRelativeClock::default());
        let mut w = Warmer::new(start, &mut rand::rng(), clock.clone()).expect("planes");
        // A warm-up every 200 us for a simulated second, then one after an hour without
        // any: the catalog's limiter never drops the echo (boringtun's sessions expire
        // only in its timers, which these planes never run).
        let mut now = start;
        for k in 0..5000 {
            now += Duration::from_micros(200);
            clock.advance(Duration::from_micros(200));
            assert!(w.warm(now), "warm-up {k}");
        }
        now += Duration::from_secs(3600);
        clock.advance(Duration::from_secs(3600));
        assert!(w.warm(now), "an hour on");
        let [a, b] = [0, 1].map(|i| w.planes[i].stats().counters);
        // Each plane sent one packet a warm-up (and one in `new`) and delivered the
        // other's; nothing was dropped, nothing asked of Sec-EM.
        assert_eq!((a.tx_packets, a.rx_packets), (5002, 5002));
        assert_eq!((b.tx_packets, b.rx_packets), (5002, 5002));
        for c in [a, b] {
            assert_eq!(
                (c.rejected, c.policy_dropped, c.queue_dropped, c.no_route),
                (0, 0, 0, 0),
                "{c:?}"
            );
        }
        assert!(w.planes.iter_mut().all(|p| p.poll_ask().is_none()));
        // A datagram of another pair's warm-up does not open here.
        let mut other = Warmer::new(now, &mut rand::rng(), clock).expect("second");
        other.planes[0].handle_tun(now, &other.packets[0], &mut other.outs[0]);
        let d: Vec<u8> = other.outs[0]
            .net
            .datagrams()
            .next()
            .map(|(_, d)| d.to_vec())
            .expect("a datagram");
        w.planes[1].handle_datagram(now, endpoint(0), &d, &mut w.outs[1]);
        assert_eq!(w.outs[1].tun.packets().count(), 0);
        assert_eq!(
            w.planes[1].stats().counters.rx_packets,
            5002,
            "a stranger's packet was delivered"
        );
    }

    #[test]
    fn the_keys_come_from_the_given_randomness() {
        use rand::SeedableRng;
        let now = Instant::now();
        let keys = |seed: u64| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let w = Warmer::new(now, &mut rng, FakeRelativeClock::default()).expect("planes");
            [0, 1].map(|i| w.planes[i].public_key())
        };
        assert_eq!(keys(1), keys(1));
        assert_ne!(keys(1), keys(2));
        assert_ne!(keys(1)[0], keys(1)[1]);
    }
}
