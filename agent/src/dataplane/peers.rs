//! The peer table: one slot per peer instance, found by instance identity, by WireGuard
//! static key (handshake initiations) and by receiver index (everything else).
//!
//! A slot holds one WireGuard key at a time: a new key for a known instance (the peer's
//! agent restarted) replaces the old tunnel, whose indexes are freed at once. During a
//! PSK rotation a slot holds the tunnel with the previous PSK too, until it retires.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use asmn_shared::crypto::PresharedKey;
use asmn_shared::ids::{InstanceKey, Role, VnfId};
use asmn_shared::policy::SourceKey;
use boringtun::noise::Tunn;

/// How long a replaced tunnel still decrypts after its successor is up.
pub const RETIRE_AFTER: Duration = Duration::from_secs(10);
/// Longest a rotation may wait for the new tunnel's handshake before the old one goes.
pub const ROTATION_LIMIT: Duration = Duration::from_secs(30);

/// A verified peer, as Sec-EM described it.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Whether its Sec-catalog names a gateway: a gateway forwards to it only under that
    /// catalog (and nothing while it has none).
    pub protected: bool,
}

/// Index of a slot in the table.
pub type Slot = u32;

/// One WireGuard tunnel and its receiver index (24 bits; boringtun shifts it left by 8).
pub struct Tunnel {
    /// The tunnel.
    pub tunn: Tunn,
    /// Its index.
    pub index: u32,
}

/// The tunnel of a previous PSK, retiring.
pub struct Retiring {
    /// The tunnel.
    pub tunnel: Tunnel,
    /// When the rotation started.
    pub since: Instant,
    /// Set when the new tunnel got its session: the old one goes then.
    pub retire_at: Option<Instant>,
}

/// An installed peer.
pub struct Peer {
    /// What Sec-EM said of it; `endpoint` moves with authenticated packets.
    pub spec: PeerSpec,
    /// The tunnel with the current PSK.
    pub current: Tunnel,
    /// During a PSK rotation: the tunnel with the previous PSK, which carries the flow
    /// until the new one has a session, and decrypts stragglers until it retires.
    pub previous: Option<Retiring>,
    /// Our copy of the PSK (zeroized on drop; boringtun keeps its own in a plain array,
    /// gone with the `Tunn`).
    pub psk: PresharedKey,
    /// Its VNF in this agent's own policy engine.
    pub source: SourceKey,
    /// Whether boringtun holds packets for it that wait for a session (sent on the next
    /// authenticated packet from it).
    pub queued: bool,
    /// Inner bytes received from it.
    pub rx_bytes: u64,
    /// Inner bytes sent to it.
    pub tx_bytes: u64,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("spec", &self.spec)
            .field("index", &self.current.index)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// Whether the current tunnel has a session (a rotation, if any, is done).
    pub fn current_ready(&self) -> bool {
        self.current.tunn.stats().0.is_some()
    }

    /// The tunnel to send with: the previous one while the current has no session yet.
    pub fn sending(&mut self) -> &mut Tunn {
        // `stats()` reads the clock and locks every session's counters: ask it only
        // during a rotation, not for every packet.
        if self.previous.is_some()
            && !self.current_ready()
            && let Some(prev) = self.previous.as_mut()
        {
            return &mut prev.tunnel.tunn;
        }
        &mut self.current.tunn
    }

    fn indexes(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.current.index).chain(self.previous.as_ref().map(|p| p.tunnel.index))
    }
}

/// The installed peers.
#[derive(Debug)]
pub struct PeerTable {
    slots: Vec<Option<Peer>>,
    by_id: HashMap<InstanceKey, Slot>,
    by_key: HashMap<[u8; 32], Slot>,
    indexes: HashMap<u32, Slot>,
    next_index: u32,
}

/// The tag of the receiver indexes made from `index_seed`: their top 8 bits (of 24), the
/// last byte of the receiver field (bytes 4-7, little-endian, boringtun's session number
/// first) of every transport-data message sent to this agent. The underlay steers data
/// messages with another tag to the handshake socket ([`crate::underlay`]): an off-path
/// flood shaped as data messages shares the data socket with the tunnels in 1 of 256
/// datagrams.
pub fn index_tag(index_seed: u32) -> u8 {
    (index_seed >> 16) as u8
}

impl PeerTable {
    /// An empty table whose receiver indexes start at `index_seed` (random, so that
    /// indexes do not tell how many tunnels an agent made) and carry its
    /// [`index_tag`].
    pub fn new(index_seed: u32) -> PeerTable {
        PeerTable {
            slots: Vec::new(),
            by_id: HashMap::new(),
            by_key: HashMap::new(),
            indexes: HashMap::new(),
            next_index: index_seed,
        }
    }

    /// A fresh receiver index for `slot`: one with the table's tag while one of those
    /// 65,536 is free, else any (its data then comes on the handshake socket, and is
    /// handled the same).
    pub fn new_index(&mut self, slot: Slot) -> u32 {
        let tag = u32::from(index_tag(self.next_index)) << 16;
        for _ in 0..=0xffff {
            let i = tag | (self.next_index & 0xffff);
            self.next_index = tag | (self.next_index.wrapping_add(1) & 0xffff);
            if i != 0 && !self.indexes.contains_key(&i) {
                self.indexes.insert(i, slot);
                return i;
            }
        }
        // At most one index per live tunnel is taken, far fewer than 2^24: this ends.
        let mut any = self.next_index.wrapping_add(0x1_0000);
        loop {
            let i = any & 0x00ff_ffff;
            any = any.wrapping_add(1);
            if i != 0 && !self.indexes.contains_key(&i) {
                self.indexes.insert(i, slot);
                return i;
            }
        }
    }

    /// Frees receiver index `index`.
    pub fn free_index(&mut self, index: u32) {
        self.indexes.remove(&index);
    }

    /// The slot of instance `id`.
    pub fn slot_of(&self, id: &InstanceKey) -> Option<Slot> {
        self.by_id.get(id).copied()
    }

    /// The slot of the peer with static key `key`.
    pub fn slot_of_key(&self, key: &[u8; 32]) -> Option<Slot> {
        self.by_key.get(key).copied()
    }

    /// The slot that owns receiver index `index`.
    pub fn slot_of_index(&self, index: u32) -> Option<Slot> {
        self.indexes.get(&index).copied()
    }

    /// The peer in `slot`.
    pub fn get(&self, slot: Slot) -> Option<&Peer> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// The peer in `slot`, to change.
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut Peer> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// A free slot for a new instance.
    pub fn free_slot(&mut self) -> Slot {
        match self.slots.iter().position(Option::is_none) {
            Some(free) => free as Slot,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as Slot
            }
        }
    }

    /// Puts `peer` into `slot` (free, or holding the same instance, which it replaces:
    /// the old tunnels and their indexes go, except `keep_index`). What was there.
    pub fn put(&mut self, slot: Slot, peer: Peer) -> Option<Peer> {
        let old = self.slots.get_mut(slot as usize)?.take();
        if let Some(o) = &old {
            self.by_key.remove(&o.spec.wg_public);
            let live: Vec<u32> = peer.indexes().collect();
            for i in o.indexes().filter(|i| !live.contains(i)) {
                self.indexes.remove(&i);
            }
        }
        self.by_id.insert(peer.spec.id, slot);
        self.by_key.insert(peer.spec.wg_public, slot);
        self.slots[slot as usize] = Some(peer);
        old
    }

    /// Removes the peer in `slot` with all it holds (its tunnels, keys and indexes).
    pub fn remove(&mut self, slot: Slot) -> Option<Peer> {
        let p = self.slots.get_mut(slot as usize)?.take()?;
        self.by_id.remove(&p.spec.id);
        self.by_key.remove(&p.spec.wg_public);
        for i in p.indexes() {
            self.indexes.remove(&i);
        }
        Some(p)
    }

    /// Every installed peer with its slot.
    pub fn iter(&self) -> impl Iterator<Item = (Slot, &Peer)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().map(|p| (i as Slot, p)))
    }

    /// Every installed peer, to change.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Peer> {
        self.slots.iter_mut().flatten()
    }

    /// How many peers are installed.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// How many receiver indexes are in use (each live tunnel holds one).
    pub fn indexes_in_use(&self) -> usize {
        self.indexes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_indexes_carry_the_seeds_tag_while_it_has_free_ones_and_are_unique() {
        let seed = 0xdead_fffe;
        let tag = index_tag(seed);
        assert_eq!(tag, 0xad);
        let mut t = PeerTable::new(seed);
        let mut seen = std::collections::HashSet::new();
        // Every tagged index once (the counter wraps in the low 16 bits: 0xfffe, 0xffff,
        // then 0x0000 and up), none 0.
        for _ in 0..0x1_0000 {
            let i = t.new_index(0);
            assert_eq!((i >> 16) as u8, tag, "{i:#x}");
            assert!(i != 0 && i <= 0x00ff_ffff && seen.insert(i), "{i:#x}");
        }
        // All taken: an index with another tag, still unique.
        let other = t.new_index(1);
        assert!(other != 0 && other <= 0x00ff_ffff && (other >> 16) as u8 != tag);
        assert!(seen.insert(other));
        // One freed: the next tagged index is that one.
        let freed = tag as u32 * 0x1_0000 + 0x1234;
        t.free_index(freed);
        assert_eq!(t.new_index(2), freed);
        assert_eq!(t.slot_of_index(freed), Some(2));
    }

    #[test]
    fn a_zero_tag_never_gives_index_zero() {
        let mut t = PeerTable::new(0xff00_ffff);
        assert_eq!(index_tag(0xff00_ffff), 0);
        let first = t.new_index(0);
        assert_eq!(first, 0xffff);
        assert_eq!(t.new_index(0), 1, "0 skipped");
    }
}
