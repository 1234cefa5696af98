//! Keeping the per-packet cryptography warm while a busy-polling data plane waits.
//!
//! A packet that comes after a pause finds boringtun's and ring's code and tables out of
//! the CPU's caches and TLB, even on a thread that never slept: the polling loop's system
//! calls and the other tasks of the machine evict them. On the 2-core VM of `asmn-lab`,
//! sealing or opening a 64-byte echo costs 0.24-0.32 us back to back, and 7-9 us after
//! 50 ms of polling; sealing and opening a throwaway packet every 200 us while polling
//! keeps it at 1.3-1.4 us (`asmn-lab gen crypto-wake --sleep-ms 50 --poll
//! --keep-warm-us 200`). In the agent, opening an echo's packet took 6.9-10.3 us without
//! the warm-ups and 1.2-1.7 us with them. A warm-up costs about 1 us: a busy-polling
//! thread owns its core anyway, and spends half a percent of it on them.
//!
//! The warm-up runs on a pair of tunnels of its own, with throwaway keys, that never
//! reach the network, so the real sessions' counters, timers and keys are not touched.

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::RngCore;

/// An IPv4 ICMP echo of 64 bytes (20 + 8 + 56), what the warm-up seals and opens.
const ECHO: usize = 84;

/// Two tunnels with a session between them, and a packet to pass through it.
pub struct Warmer {
    seal: Tunn,
    open: Tunn,
    packet: [u8; ECHO],
    sealed: Vec<u8>,
    opened: Vec<u8>,
}

impl std::fmt::Debug for Warmer {
    // boringtun's `Debug` can print key material: name the type only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warmer").finish_non_exhaustive()
    }
}

impl Warmer {
    /// A pair of tunnels with fresh random keys and an established session (one
    /// handshake, four X25519), or `None` if boringtun did not complete it.
    pub fn new() -> Option<Warmer> {
        let mut rng = rand::rng();
        let mut key = || {
            let mut k = [0u8; 32];
            rng.fill_bytes(&mut k);
            StaticSecret::from(k)
        };
        let (a, b) = (key(), key());
        let (pa, pb) = (PublicKey::from(&a), PublicKey::from(&b));
        let mut seal = Tunn::new(a, pb, None, None, 1, None);
        let mut open = Tunn::new(b, pa, None, None, 2, None);
        let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
        let init = match seal.format_handshake_initiation(&mut x, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => return None,
        };
        let response = match open.decapsulate(None, &init, &mut y) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => return None,
        };
        // The initiator answers the response with a keepalive, which starts the
        // responder's session.
        let keepalive = match seal.decapsulate(None, &response, &mut x) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => return None,
        };
        if !matches!(open.decapsulate(None, &keepalive, &mut y), TunnResult::Done) {
            return None;
        }
        let mut packet = [0u8; ECHO];
        packet[0] = 0x45;
        packet[3] = ECHO as u8;
        packet[8] = 64;
        packet[9] = 1;
        packet[12..16].copy_from_slice(&[192, 0, 2, 1]);
        packet[16..20].copy_from_slice(&[192, 0, 2, 2]);
        Some(Warmer {
            seal,
            open,
            packet,
            sealed: vec![0; 256],
            opened: vec![0; 256],
        })
    }

    /// Seals the packet on one tunnel and opens it on the other: whether it came through.
    /// (The session is never timed out: nothing calls its timers, and its counter would
    /// take centuries to run out at one packet per warm-up.)
    pub fn warm(&mut self) -> bool {
        let len = match self.seal.encapsulate(&self.packet, &mut self.sealed) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return false,
        };
        matches!(
            self.open
                .decapsulate(None, &self.sealed[..len], &mut self.opened),
            TunnResult::WriteToTunnelV4(p, _) if p == self.packet
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warm_up_passes_its_packet_through_its_own_session_every_time() {
        let mut w = Warmer::new().expect("a session between the two tunnels");
        for _ in 0..1000 {
            assert!(w.warm());
        }
        // Each warm-up is a new data packet: a replay of the last one is refused, so the
        // session's counter moves as a real one does.
        let len = match w.seal.encapsulate(&w.packet, &mut w.sealed) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => panic!("no data packet"),
        };
        let again = w.sealed[..len].to_vec();
        assert!(matches!(
            w.open.decapsulate(None, &again, &mut w.opened),
            TunnResult::WriteToTunnelV4(..)
        ));
        assert!(matches!(
            w.open.decapsulate(None, &again, &mut w.opened),
            TunnResult::Err(_)
        ));
        // Two warmers share no key: one's packet does not open on the other.
        let mut other = Warmer::new().expect("second");
        assert!(!matches!(
            other.open.decapsulate(None, &again, &mut other.opened),
            TunnResult::WriteToTunnelV4(..)
        ));
    }
}
