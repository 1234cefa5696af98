//! The data plane's I/O: one thread that moves packets between the TUN device and the
//! underlay socket in batches (the techniques of wireguard-go's Linux data path).
//!
//! - The TUN device is opened with a virtio-net header and TSO/USO offloads: one read can
//!   be a 64 KiB TCP or UDP super-packet, which tun-rs splits into MTU-sized packets.
//! - Packets encrypted for the same peer with the same size leave in one `sendmsg` with
//!   UDP GSO (quinn-udp), up to 64 KiB at a time.
//! - The socket is read with `recvmmsg` and UDP GRO (quinn-udp); what is decrypted is
//!   written to the TUN device coalesced back into super-packets (tun-rs's GRO table).
//! - Latency: a thread asleep in `epoll_wait` pays a wake-up for each packet, tens of
//!   microseconds on a virtual machine. After traffic the loop keeps polling for
//!   [`SPIN`] (yielding the CPU between polls) before it sleeps, so a reply that comes
//!   within that window is picked up without a wake-up, within a budget of 5% of a core.
//!   Idle, it sleeps. With [`Polling::Busy`] (an operator's choice for a VNF that owns a
//!   core, as DPDK data planes do) it does not sleep while packets flow: no wake-up on
//!   any packet, at the price of a whole core; after [`BUSY_IDLE`] without a packet it
//!   sleeps until the next one.
//!
//! The state the packets need sits in the [`Plane`], behind its lock, taken once per
//! batch.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::dataplane::Plane;

/// Largest packet read from or written to the TUN device (its MTU is 1420; bigger inner
/// packets from a peer are dropped).
pub const PACKET: usize = 4096;
/// WireGuard's overhead on a data packet: header, tag and padding to 16 bytes.
const OVERHEAD: usize = 32 + 16;
/// The most bytes one GSO send carries (a UDP datagram's limit, with headers).
const GSO_BYTES: usize = 65_000;
/// Room for the encrypted packets of one batch.
const ARENA: usize = 2 * IDEAL_BATCH_SIZE * (PACKET + OVERHEAD);
/// Largest datagram (a GRO batch) read from the socket.
const DATAGRAM: usize = 65_536;
/// How long the loop keeps polling after traffic before it sleeps.
pub const SPIN: Duration = Duration::from_micros(300);
/// The most time spent polling without traffic in each [`SPIN_EPOCH`] (5% of a core).
const SPIN_BUDGET: Duration = Duration::from_millis(5);
/// See [`SPIN_BUDGET`].
const SPIN_EPOCH: Duration = Duration::from_millis(100);
/// How long [`Polling::Busy`] keeps polling after the last packet.
pub const BUSY_IDLE: Duration = Duration::from_secs(1);
/// Longest sleep between checks of the sockets (they also wake it).
const SLEEP: Duration = Duration::from_millis(100);
/// Tries of a send that finds the socket's buffer full, before its batch is dropped.
const SEND_TRIES: usize = 200;

/// How the I/O thread waits for packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polling {
    /// Sleep in `epoll_wait` when idle; poll for [`SPIN`] after sending into a tunnel
    /// (at most 5% of a core).
    #[default]
    Adaptive,
    /// Poll the TUN device and the socket without pause while packets flow (a whole
    /// core); sleep after [`BUSY_IDLE`] without one.
    Busy,
}

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

#[derive(Clone, Copy, Debug)]
struct Group {
    to: SocketAddr,
    start: usize,
    segment: usize,
    len: usize,
    closed: bool,
}

impl Sends {
    /// An empty set, grouping at most `max_segments` datagrams per send.
    pub fn new(max_segments: usize) -> Sends {
        Sends {
            arena: vec![0; ARENA],
            used: 0,
            groups: Vec::new(),
            max_segments: max_segments.max(1),
        }
    }

    /// Whether a datagram of a packet of `len` bytes still fits.
    pub fn fits(&self, len: usize) -> bool {
        self.arena.len() - self.used >= len + OVERHEAD + 148
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

    /// Sends everything; the number of datagrams that could not be sent.
    pub fn flush(&mut self, udp: &UdpSocket, state: &UdpSocketState) -> u64 {
        let mut lost = 0;
        for g in self.groups.drain(..) {
            let t = Transmit {
                destination: g.to,
                ecn: None,
                contents: &self.arena[g.start..g.start + g.len],
                segment_size: (g.len > g.segment).then_some(g.segment),
                src_ip: None,
            };
            let mut sent = false;
            for _ in 0..SEND_TRIES {
                match state.try_send(udp.into(), &t) {
                    Ok(()) => {
                        sent = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => {
                        tracing::debug!(error = %e, to = %g.to, "underlay send failed");
                        break;
                    }
                }
            }
            if !sent {
                lost += g.len.div_ceil(g.segment) as u64;
            }
        }
        self.used = 0;
        self.max_segments = state.max_gso_segments().max(1);
        lost
    }
}

/// The buffers of the loop, allocated once.
struct Buffers {
    /// A raw TUN read: virtio-net header and a packet or super-packet.
    tun_raw: Vec<u8>,
    /// The packets of TUN reads, split.
    tun_in: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    /// Decrypted packets for the TUN device, each with room for the virtio-net header.
    tun_out: Vec<Vec<u8>>,
    gro: GROTable,
    /// Socket reads (each may hold several GRO-coalesced datagrams).
    udp_in: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
    sends: Sends,
    /// Scratch for handshakes and other replies sent at once.
    scratch: Vec<u8>,
}

/// Fatal for the loop: the device or socket is gone, not one bad packet (tun-rs reports
/// those without an OS error code) or a device that is down (EIO).
fn fatal(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(code) => !matches!(
            code,
            libc::EAGAIN | libc::EINTR | libc::EINVAL | libc::EMSGSIZE | libc::EIO
        ),
        None => false,
    }
}

impl Plane {
    /// Runs the data plane's I/O on this thread until the TUN device or the socket fails.
    pub fn run_io(self: Arc<Self>, polling: Polling) -> io::Error {
        match self.io_loop(polling) {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    fn io_loop(&self, polling: Polling) -> io::Result<std::convert::Infallible> {
        let (tun, udp, state) = self.io_parts();
        tun.set_nonblocking(true)?;
        let mut poll = mio::Poll::new()?;
        let (tun_fd, udp_fd) = (tun.as_raw_fd(), udp.as_raw_fd());
        poll.registry().register(
            &mut mio::unix::SourceFd(&tun_fd),
            mio::Token(0),
            mio::Interest::READABLE,
        )?;
        poll.registry().register(
            &mut mio::unix::SourceFd(&udp_fd),
            mio::Token(1),
            mio::Interest::READABLE,
        )?;
        let mut events = mio::Events::with_capacity(4);
        let mut b = Buffers {
            tun_raw: vec![0; VIRTIO_NET_HDR_LEN + DATAGRAM],
            tun_in: vec![vec![0; PACKET]; IDEAL_BATCH_SIZE],
            tun_sizes: vec![0; IDEAL_BATCH_SIZE],
            tun_out: vec![vec![0; VIRTIO_NET_HDR_LEN + PACKET]; IDEAL_BATCH_SIZE],
            gro: GROTable::default(),
            udp_in: vec![vec![0; DATAGRAM]; quinn_udp::BATCH_SIZE],
            metas: vec![RecvMeta::default(); quinn_udp::BATCH_SIZE],
            sends: Sends::new(state.max_gso_segments()),
            scratch: vec![0; DATAGRAM],
        };
        tracing::info!(
            tun_offload = tun.tcp_gso(),
            udp_gso_segments = state.max_gso_segments(),
            udp_gro_segments = state.gro_segments(),
            ?polling,
            "data plane I/O running"
        );
        // Until when to keep polling: set when packets went out into a tunnel (a reply
        // may follow), not when they were handed to the TUN device (the application
        // takes over, and a polling thread would only compete with it for the CPU).
        // Polling is also capped: at most SPIN_BUDGET of every SPIN_EPOCH, so a steady
        // trickle of packets (each restarting the window) cannot keep a core busy.
        let mut spin_until = Instant::now();
        let (mut epoch, mut spun) = (Instant::now(), Duration::ZERO);
        let mut last_packet = Instant::now();
        loop {
            let round = Instant::now();
            let sent = self.tun_round(tun, udp, state, &mut b)?;
            let (delivered, forwarded) = self.udp_round(tun, udp, state, &mut b)?;
            // A gateway's forwarding is a send into a tunnel too (the reply comes back
            // through it).
            if sent || forwarded {
                spin_until = Instant::now() + SPIN;
            }
            if sent || delivered {
                last_packet = round;
                continue;
            }
            if polling == Polling::Busy && round.duration_since(last_packet) < BUSY_IDLE {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now.duration_since(epoch) >= SPIN_EPOCH {
                (epoch, spun) = (now, Duration::ZERO);
            }
            if now < spin_until && spun < SPIN_BUDGET {
                std::thread::yield_now();
                spun += round.elapsed();
                continue;
            }
            // Both are drained (edge-triggered registration): sleep until one is ready.
            if let Err(e) = poll.poll(&mut events, Some(SLEEP))
                && e.kind() != io::ErrorKind::Interrupted
            {
                return Err(e);
            }
        }
    }

    /// Reads what the TUN device has (a batch at most) and sends it into the tunnels.
    /// Whether there was anything.
    fn tun_round(
        &self,
        tun: &SyncDevice,
        udp: &UdpSocket,
        state: &UdpSocketState,
        b: &mut Buffers,
    ) -> io::Result<bool> {
        let mut n = 0;
        // Several reads per batch (a bounded number), while a whole super-packet fits.
        for _ in 0..IDEAL_BATCH_SIZE {
            if IDEAL_BATCH_SIZE - n < 64 {
                break;
            }
            match tun.recv_multiple(&mut b.tun_raw, &mut b.tun_in[n..], &mut b.tun_sizes[n..], 0) {
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "unreadable packet from TUN dropped");
                    self.count_io_drop(1);
                }
            }
        }
        if n == 0 {
            return Ok(false);
        }
        let packets = b.tun_in[..n]
            .iter()
            .zip(&b.tun_sizes[..n])
            .map(|(buf, len)| &buf[..*len]);
        self.outbound_batch(packets, &mut b.sends);
        let lost = b.sends.flush(udp, state);
        self.count_io_drop(lost);
        Ok(true)
    }

    /// Reads what the socket has (a batch at most), decrypts it and writes it to the TUN
    /// device (or forwards it, on a gateway). Whether there was anything, and whether
    /// anything went out into a tunnel (forwarded packets, handshake replies).
    fn udp_round(
        &self,
        tun: &SyncDevice,
        udp: &UdpSocket,
        state: &UdpSocketState,
        b: &mut Buffers,
    ) -> io::Result<(bool, bool)> {
        let n = {
            let mut iovs: Vec<io::IoSliceMut<'_>> = b
                .udp_in
                .iter_mut()
                .map(|v| io::IoSliceMut::new(v))
                .collect();
            match state.recv(udp.into(), &mut iovs, &mut b.metas) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((false, false)),
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "underlay receive failed");
                    return Ok((true, false));
                }
            }
        };
        let mut datagrams: Vec<(SocketAddr, &[u8])> = Vec::with_capacity(n * 8);
        for (buf, meta) in b.udp_in.iter().zip(&b.metas).take(n) {
            let stride = meta.stride.max(1);
            for d in buf[..meta.len.min(buf.len())].chunks(stride) {
                datagrams.push((meta.addr, d));
            }
        }
        let mut forwarded = false;
        for chunk in datagrams.chunks(IDEAL_BATCH_SIZE) {
            // Only the buffers this chunk can fill (one per datagram at most) regrow.
            for o in b.tun_out.iter_mut().take(chunk.len()) {
                o.resize(VIRTIO_NET_HDR_LEN + PACKET, 0);
            }
            let k = self.inbound_batch(chunk, &mut b.tun_out, &mut b.sends, &mut b.scratch);
            forwarded |= !b.sends.is_empty();
            let lost = b.sends.flush(udp, state);
            self.count_io_drop(lost);
            if k > 0
                && let Err(e) =
                    tun.send_multiple(&mut b.gro, &mut b.tun_out[..k], VIRTIO_NET_HDR_LEN)
            {
                if fatal(&e) {
                    return Err(e);
                }
                tracing::debug!(error = %e, "write to TUN failed");
            }
        }
        Ok((true, forwarded))
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
        let mut s = Sends::new(4);
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
        // At most max_segments per send.
        let mut s = Sends::new(2);
        for _ in 0..5 {
            s.commit(a, 100);
        }
        assert_eq!(
            groups(&s),
            vec![(a, 100, 200), (a, 100, 200), (a, 100, 100)]
        );
        // A bigger datagram after smaller ones starts a new send.
        let mut s = Sends::new(64);
        s.commit(a, 100);
        s.commit(a, 200);
        assert_eq!(groups(&s), vec![(a, 100, 100), (a, 200, 200)]);
        // At most GSO_BYTES per send.
        let mut s = Sends::new(64);
        for _ in 0..60 {
            s.commit(a, 1452);
        }
        assert!(s.groups.iter().all(|g| g.len <= GSO_BYTES));
        assert_eq!(s.groups.iter().map(|g| g.len).sum::<usize>(), 60 * 1452);
    }

    #[test]
    fn a_flush_sends_every_group_on_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let state = UdpSocketState::new((&tx).into()).expect("state");
        let to = rx.local_addr().expect("addr");
        let mut s = Sends::new(state.max_gso_segments());
        for i in 0..10u8 {
            let len = if i == 9 { 50 } else { 300 };
            s.space()[..len].fill(i);
            s.commit(to, len);
        }
        assert_eq!(s.flush(&tx, &state), 0);
        assert!(s.is_empty());
        // Without GRO on the receiver, each segment arrives as its own datagram.
        let mut buf = [0u8; 2048];
        for i in 0..10u8 {
            let n = rx.recv(&mut buf).expect("datagram");
            assert_eq!(n, if i == 9 { 50 } else { 300 });
            assert!(buf[..n].iter().all(|b| *b == i));
        }
    }
}
