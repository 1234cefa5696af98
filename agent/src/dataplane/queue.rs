//! Packets waiting for Sec-EM: to a destination without a tunnel yet, from a relayed
//! source not verified yet, or (on a gateway) between a pair not admitted yet. Bounded in
//! packets per key, keys, and time: what does not fit, or waits longer than
//! [`QUEUE_WAIT`], is dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Packets queued per key.
pub const QUEUE_PER_KEY: usize = 64;
/// Keys waiting at once.
pub const QUEUE_KEYS: usize = 256;
/// How long a key may wait for Sec-EM's answer.
pub const QUEUE_WAIT: Duration = Duration::from_secs(5);

/// What a packet waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WaitKey {
    /// A tunnel (or a route through a gateway) to this overlay address.
    To(IpAddr),
    /// A verified route from this overlay address, which the gateway in this slot
    /// relayed to us (released only if Sec-EM says it is reached through that gateway).
    From(IpAddr, u32),
    /// On a gateway: Sec-EM's admission of the pair (source, destination).
    Pair(IpAddr, IpAddr),
}

#[derive(Debug)]
struct Waiting {
    since: Instant,
    packets: VecDeque<Vec<u8>>,
}

/// What became of a queued packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Queued {
    /// Queued behind others: Sec-EM was asked already.
    Behind,
    /// The first for its key: ask Sec-EM.
    First,
    /// Dropped: the key's queue or the table is full.
    Dropped,
}

/// How long a refusal is remembered: packets for a refused key are dropped without
/// asking Sec-EM again until then (a VNF that keeps sending to a refused destination must
/// not turn into a stream of requests).
pub const REFUSED_FOR: Duration = Duration::from_secs(5);
/// Refusals remembered at once (the oldest are forgotten first).
pub const REFUSED_KEYS: usize = 1024;

/// The waiting packets, and the keys Sec-EM refused recently.
#[derive(Debug, Default)]
pub struct WaitQueue {
    map: HashMap<WaitKey, Waiting>,
    refused: HashMap<WaitKey, Instant>,
}

impl WaitQueue {
    /// Queues a copy of `packet` under `key`.
    pub fn push(&mut self, key: WaitKey, now: Instant, packet: &[u8]) -> Queued {
        let full = self.map.len() >= QUEUE_KEYS;
        let (w, first) = match self.map.get_mut(&key) {
            Some(w) => (w, false),
            None if full => return Queued::Dropped,
            None => (
                self.map.entry(key).or_insert(Waiting {
                    since: now,
                    packets: VecDeque::new(),
                }),
                true,
            ),
        };
        if w.packets.len() >= QUEUE_PER_KEY {
            return Queued::Dropped;
        }
        w.packets.push_back(packet.to_vec());
        if first { Queued::First } else { Queued::Behind }
    }

    /// Takes what waited under `key`.
    pub fn take(&mut self, key: &WaitKey) -> Vec<Vec<u8>> {
        self.map
            .remove(key)
            .map(|w| w.packets.into())
            .unwrap_or_default()
    }

    /// Drops every key that `drop` selects; how many packets went.
    pub fn drop_where(&mut self, mut drop: impl FnMut(&WaitKey) -> bool) -> usize {
        let mut n = 0;
        self.map.retain(|k, w| {
            let d = drop(k);
            if d {
                n += w.packets.len();
            }
            !d
        });
        n
    }

    /// Drops what waited longer than [`QUEUE_WAIT`], and forgets old refusals; how many
    /// packets went.
    pub fn expire(&mut self, now: Instant) -> usize {
        self.refused.retain(|_, until| *until > now);
        let mut n = 0;
        self.map.retain(|_, w| {
            let keep = now.saturating_duration_since(w.since) < QUEUE_WAIT;
            if !keep {
                n += w.packets.len();
            }
            keep
        });
        n
    }

    /// Remembers that Sec-EM refused `key` (until [`REFUSED_FOR`] from `now`) and drops
    /// what waited for it; how many packets went.
    pub fn refuse(&mut self, key: WaitKey, now: Instant) -> usize {
        if self.refused.len() >= REFUSED_KEYS {
            self.refused.retain(|_, until| *until > now);
            if self.refused.len() >= REFUSED_KEYS
                && let Some(oldest) = self
                    .refused
                    .iter()
                    .min_by_key(|(_, u)| **u)
                    .map(|(k, _)| *k)
            {
                self.refused.remove(&oldest);
            }
        }
        self.refused.insert(key, now + REFUSED_FOR);
        self.take(&key).len()
    }

    /// Whether Sec-EM refused `key` recently.
    pub fn refused(&self, key: &WaitKey, now: Instant) -> bool {
        self.refused.get(key).is_some_and(|until| *until > now)
    }

    /// Forgets a refusal (Sec-EM admitted the key since).
    pub fn forget_refusal(&mut self, key: &WaitKey) {
        self.refused.remove(key);
    }

    /// Whether `key` waits.
    pub fn contains(&self, key: &WaitKey) -> bool {
        self.map.contains_key(key)
    }

    /// How many waiting keys `f` selects.
    pub fn count_where(&self, f: impl Fn(&WaitKey) -> bool) -> usize {
        self.map.keys().filter(|k| f(k)).count()
    }

    /// Keys waiting.
    #[cfg(test)]
    pub fn keys(&self) -> usize {
        self.map.len()
    }

    /// Packets waiting.
    pub fn packets(&self) -> usize {
        self.map.values().map(|w| w.packets.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4((0x0a4d_0000 + i).into())
    }

    #[test]
    fn bounded_per_key_in_keys_and_in_time() {
        let t0 = Instant::now();
        let mut q = WaitQueue::default();
        assert_eq!(q.push(WaitKey::To(ip(1)), t0, b"a"), Queued::First);
        for _ in 1..QUEUE_PER_KEY {
            assert_eq!(q.push(WaitKey::To(ip(1)), t0, b"a"), Queued::Behind);
        }
        assert_eq!(q.push(WaitKey::To(ip(1)), t0, b"a"), Queued::Dropped);
        for i in 2..=QUEUE_KEYS as u32 {
            assert_eq!(q.push(WaitKey::To(ip(i)), t0, b"b"), Queued::First);
        }
        assert_eq!(q.keys(), QUEUE_KEYS);
        assert_eq!(q.push(WaitKey::From(ip(1), 0), t0, b"c"), Queued::Dropped);
        // A key already waiting still takes packets while the table is full.
        assert_eq!(q.push(WaitKey::To(ip(2)), t0, b"b"), Queued::Behind);
        assert_eq!(q.take(&WaitKey::To(ip(2))).len(), 2);
        let later = t0 + QUEUE_WAIT - Duration::from_millis(1);
        assert_eq!(q.push(WaitKey::To(ip(2)), later, b"d"), Queued::First);
        assert_eq!(q.expire(later), 0);
        let n = q.expire(t0 + QUEUE_WAIT);
        assert_eq!(n, QUEUE_PER_KEY + (QUEUE_KEYS - 2));
        assert_eq!((q.keys(), q.packets()), (1, 1));
        assert_eq!(q.drop_where(|k| *k == WaitKey::To(ip(2))), 1);
        assert_eq!(q.keys(), 0);
    }

    #[test]
    fn a_refusal_drops_the_queue_and_is_remembered_for_a_while() {
        let t0 = Instant::now();
        let mut q = WaitQueue::default();
        let k = WaitKey::Pair(ip(1), ip(2));
        q.push(k, t0, b"a");
        q.push(k, t0, b"b");
        assert_eq!(q.refuse(k, t0), 2);
        assert!(q.refused(&k, t0 + REFUSED_FOR - Duration::from_millis(1)));
        assert!(!q.refused(&k, t0 + REFUSED_FOR));
        for i in 0..(REFUSED_KEYS as u32 + 10) {
            q.refuse(WaitKey::To(ip(i)), t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(q.refused.len() <= REFUSED_KEYS);
        q.expire(t0 + REFUSED_FOR + Duration::from_secs(10));
        assert!(q.refused.is_empty());
    }
}
