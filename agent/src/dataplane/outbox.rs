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
/// Capacity of each TUN write buffer: tun-rs coalesces the packets of a TCP or UDP flow
/// into one super-packet (up to 64 KiB) in place, and only where the buffer's capacity
/// holds it (it keeps room for two headers); with room for one packet only, a flow left
/// in writes of two segments and the receiving host paid for each.
pub const SUPER_PACKET: usize = 2 * TUN_HEADER + u16::MAX as usize;

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

/// One TUN write buffer: virtio-net header room, then a packet (or, once tun-rs has
/// coalesced a flow into it, a super-packet). Its bytes are allocated once, at
/// [`SUPER_PACKET`], and never cleared between batches: only `len` moves.
pub struct TunBuf {
    data: Box<[u8]>,
    len: usize,
}

impl TunBuf {
    fn new() -> TunBuf {
        // Zeroed by the allocator (calloc): pages are only touched once used.
        TunBuf {
            data: vec![0; SUPER_PACKET].into_boxed_slice(),
            len: 0,
        }
    }

    /// Grows the allocation to `len` bytes at least (tun-rs checks the capacity before it
    /// coalesces, so this does not happen in practice).
    fn reserve(&mut self, len: usize) {
        if len > self.data.len() {
            let mut v = std::mem::take(&mut self.data).into_vec();
            v.resize(len, 0);
            self.data = v.into_boxed_slice();
        }
    }
}

impl std::fmt::Debug for TunBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunBuf").field("len", &self.len).finish()
    }
}

impl AsRef<[u8]> for TunBuf {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl AsMut<[u8]> for TunBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl tun_rs::ExpandBuffer for TunBuf {
    fn buf_capacity(&self) -> usize {
        self.data.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.reserve(new_len);
        if new_len > self.len {
            self.data[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = self.len + src.len();
        self.reserve(end);
        self.data[self.len..end].copy_from_slice(src);
        self.len = end;
    }
}

/// Decrypted packets for the TUN device, each written after room for the virtio-net
/// header.
#[derive(Debug)]
pub struct TunBatch {
    bufs: Vec<TunBuf>,
    len: usize,
}

impl TunBatch {
    /// Room for `packets` packets.
    pub fn new(packets: usize) -> TunBatch {
        TunBatch {
            bufs: (0..packets.max(1)).map(|_| TunBuf::new()).collect(),
            len: 0,
        }
    }

    /// Where the next packet is written ([`PACKET`] bytes; None when the batch is full).
    pub fn space(&mut self) -> Option<&mut [u8]> {
        self.bufs
            .get_mut(self.len)
            .map(|b| &mut b.data[TUN_HEADER..TUN_HEADER + PACKET])
    }

    /// The next packet is the first `len` bytes of [`TunBatch::space`].
    pub fn commit(&mut self, len: usize) {
        if let Some(b) = self.bufs.get_mut(self.len) {
            b.len = TUN_HEADER + len.min(PACKET);
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
    pub fn filled(&mut self) -> &mut [TunBuf] {
        &mut self.bufs[..self.len]
    }

    /// The packets, without header room.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs[..self.len]
            .iter()
            .map(|b| &b.data[TUN_HEADER..b.len.max(TUN_HEADER)])
    }

    /// Empties the batch (nothing is cleared: each packet overwrites its bytes).
    pub fn clear(&mut self) {
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

    #[test]
    fn tun_buffers_have_room_for_a_coalesced_flow() {
        use tun_rs::ExpandBuffer;
        let mut t = TunBatch::new(2);
        let space = t.space().expect("room");
        space[..3].copy_from_slice(&[7, 8, 9]);
        t.commit(3);
        let b = &mut t.filled()[0];
        // tun-rs coalesces into a buffer only if it holds 64 KiB and two headers.
        assert!(b.buf_capacity() >= 2 * TUN_HEADER + usize::from(u16::MAX));
        assert_eq!(b.as_ref().len(), TUN_HEADER + 3);
        // Appending (as tun-rs coalesces) keeps what was there.
        b.buf_resize(TUN_HEADER + 5, 0);
        b.buf_extend_from_slice(&[1, 2]);
        assert_eq!(&b.as_ref()[TUN_HEADER..], &[7, 8, 9, 0, 0, 1, 2]);
        // Past the allocation it grows rather than losing bytes.
        let big = b.buf_capacity() + 10;
        b.buf_resize(big, 4);
        assert_eq!(b.as_ref().len(), big);
        assert_eq!(&b.as_ref()[TUN_HEADER..TUN_HEADER + 3], &[7, 8, 9]);
        assert_eq!(b.as_ref()[big - 1], 4);
        // A cleared batch offers a whole packet again, in the buffer that grew too.
        t.clear();
        assert_eq!(t.space().map(|s| s.len()), Some(PACKET));
        t.commit(PACKET + 1);
        assert_eq!(
            t.packets().map(<[u8]>::len).collect::<Vec<_>>(),
            vec![PACKET]
        );
    }
}
