//! What the plane produces, batched for the driver: encrypted datagrams grouped for UDP
//! GSO ([`Sends`]) and decrypted packets for the TUN device ([`TunBatch`]), each written
//! in place (no copy between the cipher and the system call).

use std::net::SocketAddr;

/// Largest inner packet the plane carries (the TUN MTU is 1420; a peer's bigger inner
/// packets are dropped and counted).
pub const PACKET: usize = 4096;
/// WireGuard's overhead on a data packet: header, tag and padding to 16 bytes.
pub const OVERHEAD: usize = 32 + 16;
/// Largest handshake message (an initiation).
pub const HANDSHAKE: usize = 148;
/// The most bytes one GSO send carries (a UDP datagram's limit, with headers).
pub const GSO_BYTES: usize = 65_000;
/// Room for the virtio-net header in front of each packet written to the TUN device.
pub const TUN_HEADER: usize = tun_rs::VIRTIO_NET_HDR_LEN;

/// Encrypted datagrams waiting to be sent, grouped for UDP GSO: consecutive datagrams to
/// the same endpoint with the same size (the last of a group may be shorter).
pub struct Sends {
    arena: Vec<u8>,
    used: usize,
    groups: Vec<Group>,
    max_segments: usize,
}

impl std::fmt::Debug for Sends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sends")
            .field("bytes", &self.used)
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

/// One GSO send: `len` bytes at `start` of the arena, in segments of `segment` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Group {
    /// Where it goes.
    pub to: SocketAddr,
    /// Offset in the arena.
    pub start: usize,
    /// Size of each datagram (the last may be shorter).
    pub segment: usize,
    /// Bytes in all.
    pub len: usize,
    closed: bool,
}

impl Sends {
    /// An empty set of `capacity` bytes, grouping at most `max_segments` datagrams per send.
    pub fn new(capacity: usize, max_segments: usize) -> Sends {
        Sends {
            arena: vec![0; capacity],
            used: 0,
            groups: Vec::new(),
            max_segments: max_segments.max(1),
        }
    }

    /// Whether a datagram of `len` bytes (encrypted) still fits.
    pub fn fits(&self, len: usize) -> bool {
        self.arena.len() - self.used >= len
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Where the next datagram is written.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.arena[self.used..]
    }

    /// The next `len` bytes of [`Sends::space`] are a datagram to `to`.
    pub fn commit(&mut self, to: SocketAddr, len: usize) {
        let start = self.used;
        self.used += len;
        if let Some(g) = self.groups.last_mut()
            && g.to == to
            && !g.closed
            && len <= g.segment
            && g.len / g.segment < self.max_segments
            && g.len + len <= GSO_BYTES
            && g.start + g.len == start
        {
            g.len += len;
            g.closed = len < g.segment;
            return;
        }
        self.groups.push(Group {
            to,
            start,
            segment: len,
            len,
            closed: false,
        });
    }

    /// Copies `datagram` in as one datagram to `to`; false (nothing written) when full.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) -> bool {
        if !self.fits(datagram.len()) {
            return false;
        }
        self.space()[..datagram.len()].copy_from_slice(datagram);
        self.commit(to, datagram.len());
        true
    }

    /// The groups and the bytes they point into, for the driver's sends.
    pub fn groups(&self) -> (&[Group], &[u8]) {
        (&self.groups, &self.arena)
    }

    /// Every datagram, one by one (for tests and for paths without GSO).
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.groups.iter().flat_map(|g| {
            self.arena[g.start..g.start + g.len]
                .chunks(g.segment)
                .map(move |d| (g.to, d))
        })
    }

    /// Forgets everything (after a send), grouping at most `max_segments` from now on.
    pub fn clear(&mut self, max_segments: usize) {
        self.groups.clear();
        self.used = 0;
        self.max_segments = max_segments.max(1);
    }
}

/// Decrypted packets for the TUN device, each written after room for the virtio-net
/// header.
#[derive(Debug)]
pub struct TunBatch {
    bufs: Vec<Vec<u8>>,
    len: usize,
}

impl TunBatch {
    /// Room for `packets` packets.
    pub fn new(packets: usize) -> TunBatch {
        TunBatch {
            bufs: vec![vec![0; TUN_HEADER + PACKET]; packets.max(1)],
            len: 0,
        }
    }

    /// Where the next packet is written (None when the batch is full).
    pub fn space(&mut self) -> Option<&mut [u8]> {
        self.bufs.get_mut(self.len).map(|b| &mut b[TUN_HEADER..])
    }

    /// The next packet is the first `len` bytes of [`TunBatch::space`].
    pub fn commit(&mut self, len: usize) {
        if let Some(b) = self.bufs.get_mut(self.len) {
            b.truncate(TUN_HEADER + len);
            self.len += 1;
        }
    }

    /// Whether there is room for another packet.
    pub fn has_room(&self) -> bool {
        self.len < self.bufs.len()
    }

    /// How many packets wait.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The filled buffers, each with its header room (what tun-rs's batched write takes).
    pub fn filled(&mut self) -> &mut [Vec<u8>] {
        &mut self.bufs[..self.len]
    }

    /// The packets, without header room.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.len].iter().map(|b| &b[TUN_HEADER..])
    }

    /// Empties the batch; only the buffers that were used regrow.
    pub fn clear(&mut self) {
        for b in &mut self.bufs[..self.len] {
            b.resize(TUN_HEADER + PACKET, 0);
        }
        self.len = 0;
    }
}

/// Everything one call into the plane produced.
#[derive(Debug)]
pub struct Outbox {
    /// Datagrams for the underlay socket.
    pub net: Sends,
    /// Packets for the TUN device.
    pub tun: TunBatch,
}

impl Outbox {
    /// An outbox sized for batches of `packets` packets, grouping at most `max_segments`
    /// datagrams per GSO send.
    pub fn new(packets: usize, max_segments: usize) -> Outbox {
        // Each packet of a batch may become a datagram, and as many again may come from
        // handshakes and queued packets released in the same call.
        let arena = 2 * packets.max(1) * (PACKET + OVERHEAD) + 8 * HANDSHAKE;
        Outbox {
            net: Sends::new(arena, max_segments),
            tun: TunBatch::new(packets),
        }
    }

    /// Whether nothing waits to be sent or written.
    pub fn is_empty(&self) -> bool {
        self.net.is_empty() && self.tun.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(s: &Sends) -> Vec<(SocketAddr, usize, usize)> {
        s.groups.iter().map(|g| (g.to, g.segment, g.len)).collect()
    }

    #[test]
    fn datagrams_group_for_gso_by_peer_and_size() {
        let a: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
        let b: SocketAddr = "192.0.2.2:51820".parse().expect("addr");
        let mut s = Sends::new(1 << 20, 4);
        for _ in 0..3 {
            s.commit(a, 1452);
        }
        // A shorter one ends the group (GSO allows only the last segment to be short).
        s.commit(a, 600);
        s.commit(a, 1452);
        // Another peer: another send.
        s.commit(b, 1452);
        s.commit(b, 1452);
        assert_eq!(
            groups(&s),
            vec![
                (a, 1452, 3 * 1452 + 600),
                (a, 1452, 1452),
                (b, 1452, 2 * 1452)
            ]
        );
        assert_eq!(s.datagrams().count(), 7);
        // At most max_segments per send.
        let mut s = Sends::new(1 << 20, 2);
        for _ in 0..5 {
            s.commit(a, 100);
        }
        assert_eq!(
            groups(&s),
            vec![(a, 100, 200), (a, 100, 200), (a, 100, 100)]
        );
        // A bigger datagram after smaller ones starts a new send.
        let mut s = Sends::new(1 << 20, 64);
        s.commit(a, 100);
        s.commit(a, 200);
        assert_eq!(groups(&s), vec![(a, 100, 100), (a, 200, 200)]);
        // At most GSO_BYTES per send.
        let mut s = Sends::new(1 << 20, 64);
        for _ in 0..60 {
            s.commit(a, 1452);
        }
        assert!(s.groups.iter().all(|g| g.len <= GSO_BYTES));
        assert_eq!(s.groups.iter().map(|g| g.len).sum::<usize>(), 60 * 1452);
    }

    #[test]
    fn a_full_arena_refuses_and_a_full_batch_has_no_space() {
        let a: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
        let mut s = Sends::new(300, 64);
        assert!(s.push(a, &[1; 200]));
        assert!(!s.push(a, &[2; 200]));
        assert_eq!(s.datagrams().count(), 1);
        let mut t = TunBatch::new(2);
        for i in 0..2u8 {
            let space = t.space().expect("room");
            space[0] = i;
            t.commit(1);
        }
        assert!(t.space().is_none() && !t.has_room());
        assert_eq!(t.packets().map(|p| p[0]).collect::<Vec<_>>(), vec![0, 1]);
        t.clear();
        assert!(t.is_empty() && t.space().is_some_and(|s| s.len() == PACKET));
    }
}
