//! Traffic generators built into the lab (so the demo needs no tool outside the project):
//! ICMP echo, TCP and UDP streams with their sinks, a TCP SYN flood, and a sampler of a
//! device's receive counter. Each runs in the namespace it is started in (`asmn-lab gen
//! ...` under `ip netns exec`), is bounded in time, and prints one JSON line of results.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub use asmn_testkit::packets::checksum;

/// ICMP echo results.
#[derive(Debug, serde::Serialize)]
pub struct PingResult {
    /// Requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Round-trip times of the replies, in microseconds.
    pub rtt_us: Vec<u64>,
}

/// Sends `count` ICMP echo requests of `size` payload bytes to `to`, one every
/// `interval`, each waiting up to 1 s for its reply (raw socket: needs root).
pub fn ping(
    to: Ipv4Addr,
    count: u32,
    size: usize,
    interval: Duration,
) -> std::io::Result<PingResult> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let addr = SockAddr::from(SocketAddrV4::new(to, 0));
    let id = (std::process::id() & 0xffff) as u16;
    let mut res = PingResult {
        sent: 0,
        received: 0,
        rtt_us: Vec::new(),
    };
    let mut buf = vec![0u8; 65_536];
    for seq in 0..count.min(10_000) {
        let mut pkt = vec![0u8; 8 + size];
        pkt[0] = 8;
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&(seq as u16).to_be_bytes());
        for (i, b) in pkt[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let c = checksum(&pkt, 0);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let sent_at = Instant::now();
        sock.send_to(&pkt, &addr)?;
        res.sent += 1;
        let deadline = sent_at + Duration::from_secs(1);
        while Instant::now() < deadline {
            let n = match (&sock).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            // Raw ICMP sockets deliver the IP header too.
            let ihl = usize::from(buf.first().copied().unwrap_or(0) & 0x0f) * 4;
            let icmp = buf.get(ihl..n).unwrap_or(&[]);
            if icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == (seq as u16).to_be_bytes()
            {
                res.received += 1;
                res.rtt_us.push(sent_at.elapsed().as_micros() as u64);
                break;
            }
        }
        let next = sent_at + interval;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(res)
}

/// Stream results.
#[derive(Debug, Default, serde::Serialize)]
pub struct StreamResult {
    /// Payload bytes carried.
    pub bytes: u64,
    /// Seconds measured.
    pub seconds: f64,
    /// Goodput in Mbit/s.
    pub mbit_per_s: f64,
    /// Datagrams sent or received (UDP).
    pub datagrams: u64,
    /// Datagrams missing by sequence number (UDP sink).
    pub lost: u64,
    /// The longest time between two datagrams received, ms (UDP sink): a tunnel that
    /// drops shows as a gap, even when few datagrams are lost.
    pub longest_gap_ms: f64,
}

/// Accepts TCP connections on `port` and discards what they send, for `seconds`.
pub fn tcp_sink(port: u16, seconds: u64) -> std::io::Result<StreamResult> {
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    listener.set_nonblocking(true)?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut res = StreamResult::default();
    let mut buf = vec![0u8; 256 * 1024];
    while Instant::now() < end {
        match listener.accept() {
            Ok((mut s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                let start = Instant::now();
                while Instant::now() < end {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => res.bytes += n as u64,
                        Err(_) => break,
                    }
                }
                res.seconds += start.elapsed().as_secs_f64();
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    Ok(res)
}

/// Sends a TCP stream to `to` for `seconds`, in writes of `write` bytes, paced to `mbps`
/// (0: as fast as it goes); the goodput as the sender saw it.
pub fn tcp_stream(
    to: SocketAddr,
    seconds: u64,
    write: usize,
    mbps: f64,
) -> std::io::Result<StreamResult> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    let chunk = vec![0x5au8; write.clamp(1, 1 << 20)];
    let gap =
        (mbps > 0.0).then(|| Duration::from_secs_f64(chunk.len() as f64 * 8.0 / (mbps * 1e6)));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut bytes = 0u64;
    let mut next = start;
    while Instant::now() < end {
        s.write_all(&chunk)?;
        bytes += chunk.len() as u64;
        if let Some(gap) = gap {
            next += gap;
            if let Some(w) = next.checked_duration_since(Instant::now())
                && w > Duration::from_micros(200)
            {
                std::thread::sleep(w);
            }
        }
    }
    s.flush()?;
    let secs = start.elapsed().as_secs_f64();
    Ok(StreamResult {
        bytes,
        seconds: secs,
        mbit_per_s: bytes as f64 * 8.0 / secs / 1e6,
        ..StreamResult::default()
    })
}

/// Receives sequence-numbered datagrams on `port` until `seconds` pass or the stream
/// stops for a second; counts the missing ones.
pub fn udp_sink(port: u16, seconds: u64) -> std::io::Result<StreamResult> {
    let sock = UdpSocket::bind(("0.0.0.0", port))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut buf = vec![0u8; 65_536];
    let (mut first, mut last_seen) = (None::<Instant>, Instant::now());
    let (mut max_seq, mut got, mut bytes) = (0u64, 0u64, 0u64);
    let mut longest_gap = Duration::ZERO;
    while Instant::now() < end {
        match sock.recv(&mut buf) {
            Ok(n) if n >= 8 => {
                let seq = u64::from_be_bytes(buf[..8].try_into().unwrap_or([0; 8]));
                max_seq = max_seq.max(seq + 1);
                got += 1;
                bytes += n as u64;
                let now = Instant::now();
                if first.is_some() {
                    longest_gap = longest_gap.max(now - last_seen);
                }
                first.get_or_insert(now);
                last_seen = now;
            }
            _ => {
                if first.is_some() && last_seen.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
        }
    }
    let secs = first
        .map_or(0.0, |f| (last_seen - f).as_secs_f64())
        .max(1e-3);
    Ok(StreamResult {
        bytes,
        seconds: secs,
        mbit_per_s: bytes as f64 * 8.0 / secs / 1e6,
        datagrams: got,
        lost: max_seq.saturating_sub(got),
        longest_gap_ms: longest_gap.as_secs_f64() * 1e3,
    })
}

/// Sends sequence-numbered datagrams of `size` bytes to `to` at `mbps` for `seconds`.
pub fn udp_stream(
    to: SocketAddr,
    mbps: f64,
    size: usize,
    seconds: u64,
) -> std::io::Result<StreamResult> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let size = size.clamp(8, 65_000);
    let mut pkt = vec![0u8; size];
    let gap = Duration::from_secs_f64(size as f64 * 8.0 / (mbps.max(0.001) * 1e6));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut seq = 0u64;
    let mut next = start;
    while Instant::now() < end {
        pkt[..8].copy_from_slice(&seq.to_be_bytes());
        let _ = sock.send_to(&pkt, to);
        seq += 1;
        next += gap;
        if let Some(w) = next.checked_duration_since(Instant::now())
            && w > Duration::from_micros(200)
        {
            std::thread::sleep(w);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(StreamResult {
        bytes: seq * size as u64,
        seconds: secs,
        mbit_per_s: (seq * size as u64) as f64 * 8.0 / secs / 1e6,
        datagrams: seq,
        lost: 0,
        longest_gap_ms: 0.0,
    })
}

/// Sends TCP SYNs with `payload` bytes each to `to:port` as fast as it can for `seconds`
/// (raw socket: needs root). Returns what it sent.
pub fn syn_flood(
    to: Ipv4Addr,
    port: u16,
    payload: usize,
    seconds: u64,
) -> std::io::Result<StreamResult> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
    // The kernel adds the IP header; the TCP checksum needs the source address, which the
    // route to `to` decides: learn it from a connected UDP socket.
    let probe = UdpSocket::bind("0.0.0.0:0")?;
    probe.connect((to, port))?;
    let src = match probe.local_addr()? {
        SocketAddr::V4(a) => *a.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let addr = SockAddr::from(SocketAddrV4::new(to, 0));
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut seg = asmn_shared::policy::packet::build::tcp(0, port, 0x02, payload);
    let mut src_port = 1024u16;
    while Instant::now() < end {
        for _ in 0..64 {
            src_port = src_port.wrapping_add(1).max(1024);
            seg[0..2].copy_from_slice(&src_port.to_be_bytes());
            seg[4..8].copy_from_slice(&(sent as u32).to_be_bytes());
            seg[16..18].copy_from_slice(&[0, 0]);
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&src.octets());
            pseudo.extend_from_slice(&to.octets());
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
            let partial = u32::from(!checksum(&pseudo, 0));
            let c = checksum(&seg, partial);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
            if sock.send_to(&seg, &addr).is_ok() {
                sent += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = sent * (20 + seg.len() as u64);
    Ok(StreamResult {
        bytes,
        seconds: secs,
        mbit_per_s: bytes as f64 * 8.0 / secs / 1e6,
        datagrams: sent,
        lost: 0,
        longest_gap_ms: 0.0,
    })
}

/// What [`handshake_flood`] sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forged {
    /// Random datagrams that are no WireGuard message at all (the baseline cost of a
    /// datagram).
    Junk,
    /// Handshake initiations from random static keys with a valid mac1 for the
    /// responder's key (what an attacker who learnt the key can make).
    Initiations([u8; 32]),
    /// Transport-data messages with random receiver indexes, counters and ciphertext;
    /// the indexes' last byte is `tag` if given (an attacker on the path reads the
    /// target's from its traffic).
    Data { tag: Option<u8> },
}

/// Sends `forged` WireGuard messages of 148 bytes to `to` as fast as it can for
/// `seconds`. Returns what it sent.
pub fn handshake_flood(
    to: SocketAddr,
    forged: Forged,
    seconds: u64,
    gso: usize,
) -> std::io::Result<StreamResult> {
    use rand::RngCore;
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let mut rng = rand::rng();
    // A few hundred distinct messages, made before the clock starts.
    let messages: Vec<Vec<u8>> = (0..256u32)
        .map(|i| match forged {
            Forged::Initiations(k) => {
                let mut secret = [0u8; 32];
                rng.fill_bytes(&mut secret);
                let mut t = boringtun::noise::Tunn::new(
                    boringtun::x25519::StaticSecret::from(secret),
                    boringtun::x25519::PublicKey::from(k),
                    None,
                    None,
                    i,
                    None,
                );
                let mut buf = vec![0u8; 256];
                match t.format_handshake_initiation(&mut buf, true) {
                    boringtun::noise::TunnResult::WriteToNetwork(p) => p.to_vec(),
                    _ => vec![0xff; 148],
                }
            }
            Forged::Junk => {
                let mut d = vec![0u8; 148];
                rng.fill_bytes(&mut d);
                d[0] = 0xff;
                d
            }
            Forged::Data { tag } => {
                let mut d = vec![0u8; 148];
                rng.fill_bytes(&mut d);
                d[..4].copy_from_slice(&[4, 0, 0, 0]);
                if let Some(t) = tag {
                    d[7] = t;
                }
                d
            }
        })
        .collect();
    // With GSO, the messages back to back, `gso` of them per send.
    let state = quinn_udp::UdpSocketState::new((&sock).into())?;
    let gso = gso.clamp(1, state.max_gso_segments().max(1));
    let joined: Vec<u8> = messages.iter().flatten().copied().collect();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        if gso == 1 {
            for m in &messages {
                if sock.send_to(m, to).is_ok() {
                    sent += 1;
                }
            }
            continue;
        }
        for chunk in joined.chunks(148 * gso) {
            let t = quinn_udp::Transmit {
                destination: to,
                ecn: None,
                contents: chunk,
                segment_size: Some(148),
                src_ip: None,
            };
            if state.try_send((&sock).into(), &t).is_ok() {
                sent += (chunk.len() / 148) as u64;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = sent * 148;
    Ok(StreamResult {
        bytes,
        seconds: secs,
        mbit_per_s: bytes as f64 * 8.0 / secs / 1e6,
        datagrams: sent,
        lost: 0,
        longest_gap_ms: 0.0,
    })
}

/// Samples `/sys/class/net/DEV/statistics/rx_bytes` every `interval` for `seconds`:
/// (nanoseconds since the Unix epoch, bytes) per sample. Each read is bracketed by two
/// clock readings and stamped with their midpoint; a read that took longer than
/// [`RX_READ_SLACK`] (the sampler was pre-empted between the clock and the counter, so
/// bytes would be counted in the wrong window) is taken again, at most
/// [`RX_READ_TRIES`] times, keeping the tightest.
pub fn rx_samples(
    dev: &str,
    interval: Duration,
    seconds: u64,
) -> std::io::Result<Vec<(u128, u64)>> {
    use crate::scenarios::epoch_ns;
    let path = format!("/sys/class/net/{dev}/statistics/rx_bytes");
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut out = Vec::new();
    let mut k = 0u32;
    while Instant::now() < end {
        let mut best: Option<(u128, u128, u64)> = None;
        for _ in 0..RX_READ_TRIES {
            let before = epoch_ns();
            let v: u64 = std::fs::read_to_string(&path)?.trim().parse().unwrap_or(0);
            let after = epoch_ns();
            let took = after.saturating_sub(before);
            if best.is_none_or(|(t, _, _)| took < t) {
                best = Some((took, before + took / 2, v));
            }
            if took <= RX_READ_SLACK.as_nanos() {
                break;
            }
        }
        if let Some((_, at, v)) = best {
            out.push((at, v));
        }
        k += 1;
        if let Some(w) = (start + interval * k).checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    }
    Ok(out)
}

/// How long one counter read in [`rx_samples`] may take before it is taken again.
pub const RX_READ_SLACK: Duration = Duration::from_micros(300);
/// How many times [`rx_samples`] reads the counter for one sample, at most.
pub const RX_READ_TRIES: u32 = 4;

/// What a [`null_tunnel`] moved.
#[derive(Debug, serde::Serialize)]
pub struct NullTunnelResult {
    /// Packets read from the TUN device and sent to the peer.
    pub to_peer: u64,
    /// Datagrams from the peer written to the TUN device.
    pub from_peer: u64,
}

/// Where a [`null_tunnel`] runs.
#[derive(Debug, Clone)]
pub struct NullTunnel {
    /// TUN device name.
    pub tun: String,
    /// The device's address and prefix.
    pub address: (Ipv4Addr, u8),
    /// The UDP address to listen on.
    pub listen: SocketAddr,
    /// The other end's UDP address.
    pub peer: SocketAddr,
    /// How it waits for packets.
    pub wait: NullWait,
}

/// How a [`null_tunnel`] waits for packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NullWait {
    /// A thread per direction, each blocking in its read.
    Blocking,
    /// One thread for both directions, asleep in `epoll_wait` until either is readable
    /// (as ASMN's agent and boringtun-cli's one-thread setting wait).
    Epoll,
    /// One thread polling both without pause.
    Busy,
    /// One thread that moves whole batches with the I/O of ASMN's agent: TUN reads with
    /// TSO/USO offloads (a super-packet split in user space), writes coalesced again
    /// (tun-rs's GRO table), datagrams sent with UDP GSO and received with GRO; asleep
    /// in epoll, polling instead while packets are dense, as the agent does. No
    /// cryptography and no per-peer state: the floor of ASMN's own batched data plane,
    /// where [`NullWait::Epoll`] is the floor of one packet per system call.
    Batched,
}

/// The UDP socket of a null tunnel or relay, bound to `listen`, with the agent's buffer
/// size (the namespace's default loses packets under load).
fn null_socket(listen: SocketAddr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    sock.bind(&listen.into())?;
    Ok(sock.into())
}

/// A tunnel without cryptography: every packet read from a TUN device goes to the peer
/// in one UDP datagram as it is, and every datagram from the peer is written to the TUN
/// device. It does what any userspace tunnel must do and nothing else (one system call
/// per packet each way, no batching, no offloads), so its latency is the floor that the
/// benchmark sets userspace WireGuard implementations beside. Runs for `seconds`.
pub fn null_tunnel(t: &NullTunnel, seconds: u64) -> std::io::Result<NullTunnelResult> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let batched = t.wait == NullWait::Batched;
    let dev = tun_rs::DeviceBuilder::new()
        .name(&t.tun)
        .ipv4(t.address.0, t.address.1, None)
        .mtu(1420)
        .offload(batched)
        .build_sync()?;
    let udp = null_socket(t.listen)?;
    eprintln!("null tunnel up on {}", t.tun);

    let (out, inn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let end = Instant::now() + Duration::from_secs(seconds);
    let peer = t.peer;
    // Non-blocking: moves what both have, each way.
    let drain = |buf: &mut [u8]| {
        while let Ok(n) = dev.recv(buf) {
            let _ = udp.send_to(&buf[..n], peer);
            out.fetch_add(1, Ordering::Relaxed);
        }
        while let Ok((n, from)) = udp.recv_from(buf) {
            if from == peer {
                let _ = dev.send(&buf[..n]);
                inn.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    if t.wait != NullWait::Blocking {
        dev.set_nonblocking(true)?;
        udp.set_nonblocking(true)?;
    }
    let mut buf = vec![0u8; 65_536];
    match t.wait {
        NullWait::Batched => return BatchedNull::new(dev, udp, peer)?.run(end),
        NullWait::Epoll => {
            use std::os::fd::AsRawFd as _;
            epoll_until(dev.as_raw_fd(), udp.as_raw_fd(), end, || {
                drain(&mut buf);
                Ok(())
            })?;
        }
        NullWait::Busy => {
            let mut rounds = 0u32;
            loop {
                drain(&mut buf);
                rounds = rounds.wrapping_add(1);
                if rounds.is_multiple_of(1024) && Instant::now() >= end {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        NullWait::Blocking => {
            // Blocking reads: the threads end with the process, after `seconds`.
            let dev = Arc::new(dev);
            let udp = Arc::new(udp);
            {
                let (dev, udp, out) = (Arc::clone(&dev), Arc::clone(&udp), Arc::clone(&out));
                std::thread::spawn(move || {
                    while let Ok(n) = dev.recv(&mut buf) {
                        let _ = udp.send_to(&buf[..n], peer);
                        out.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            {
                let inn = Arc::clone(&inn);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65_536];
                    while let Ok((n, from)) = udp.recv_from(&mut buf) {
                        if from == peer {
                            let _ = dev.send(&buf[..n]);
                            inn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            std::thread::sleep(end.saturating_duration_since(Instant::now()));
        }
    }
    Ok(NullTunnelResult {
        to_peer: out.load(Ordering::Relaxed),
        from_peer: inn.load(Ordering::Relaxed),
    })
}

/// Sleeps in epoll (edge-triggered) until `tun` or `udp` is readable, or 100 ms passed
/// (to see the end), and calls `drain`, which must empty both; until `end`.
fn epoll_until(
    tun: std::os::fd::RawFd,
    udp: std::os::fd::RawFd,
    end: Instant,
    mut drain: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<()> {
    use mio::unix::SourceFd;
    let mut poll = mio::Poll::new()?;
    for (i, fd) in [tun, udp].iter().enumerate() {
        poll.registry()
            .register(&mut SourceFd(fd), mio::Token(i), mio::Interest::READABLE)?;
    }
    let mut events = mio::Events::with_capacity(4);
    while Instant::now() < end {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        drain()?;
    }
    Ok(())
}

/// The state of a [`NullWait::Batched`] null tunnel: its device and socket, and buffers
/// allocated once.
struct BatchedNull {
    dev: tun_rs::SyncDevice,
    udp: UdpSocket,
    state: quinn_udp::UdpSocketState,
    peer: SocketAddr,
    /// The raw read of the TUN device (virtio-net header and up to 64 KiB).
    raw: Vec<u8>,
    /// The packets of a read batch, split from super-packets, and their sizes.
    tun_in: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Datagrams of one GSO send, back to back.
    arena: Vec<u8>,
    /// Socket reads (each may hold several GRO-coalesced datagrams) and their metadata.
    udp_in: Vec<Vec<u8>>,
    metas: Vec<quinn_udp::RecvMeta>,
    /// Packets for the TUN device, each after room for the virtio-net header.
    tun_out: Vec<Vec<u8>>,
    filled: usize,
    gro: tun_rs::GROTable,
    moved: NullTunnelResult,
}

/// The largest TUN read or UDP datagram (GRO-coalesced), in bytes.
const BATCHED_MAX: usize = 65_535;
/// How many batches one wake-up moves each way at most before it looks at the other
/// direction (and the clock) again.
const BATCHES_PER_TURN: usize = 16;
/// Packets closer together than this on average are polled for rather than slept for
/// (the agent's `io::POLL_GAP`).
const NULL_POLL_GAP: Duration = Duration::from_micros(20);
/// How long a dense flow is polled for after its last packet (the agent's
/// `io::POLL_FOR`).
const NULL_POLL_FOR: Duration = Duration::from_micros(200);
/// How many times a GSO send finds the socket's buffer full before its datagrams are
/// dropped.
const BATCHED_SEND_TRIES: u32 = 4;

impl BatchedNull {
    fn new(dev: tun_rs::SyncDevice, udp: UdpSocket, peer: SocketAddr) -> std::io::Result<Self> {
        use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
        dev.set_nonblocking(true)?;
        udp.set_nonblocking(true)?;
        let state = quinn_udp::UdpSocketState::new((&udp).into())?;
        let batch = quinn_udp::BATCH_SIZE;
        Ok(BatchedNull {
            dev,
            state,
            udp,
            peer,
            raw: vec![0; VIRTIO_NET_HDR_LEN + BATCHED_MAX],
            tun_in: vec![vec![0; BATCHED_MAX]; IDEAL_BATCH_SIZE],
            sizes: vec![0; IDEAL_BATCH_SIZE],
            arena: Vec::with_capacity(BATCHED_MAX),
            udp_in: vec![vec![0; BATCHED_MAX]; batch],
            metas: vec![quinn_udp::RecvMeta::default(); batch],
            tun_out: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + BATCHED_MAX))
                .collect(),
            filled: 0,
            gro: tun_rs::GROTable::default(),
            moved: NullTunnelResult {
                to_peer: 0,
                from_peer: 0,
            },
        })
    }

    /// Moves packets both ways until `end`: asleep in epoll (edge-triggered) until
    /// either side is readable, then up to [`BATCHES_PER_TURN`] batches each way per
    /// turn until both are drained.
    fn run(mut self, end: Instant) -> std::io::Result<NullTunnelResult> {
        use std::os::fd::AsRawFd as _;
        let (tun, udp) = (self.dev.as_raw_fd(), self.udp.as_raw_fd());
        // The packet rate as the agent's loop sees it: when the last packet came, and
        // the average gap between packets (weighted by each turn's packets).
        let (mut last, mut gap) = (Instant::now(), Duration::from_secs(1));
        // Drain both before sleeping again, and poll on while packets are dense, as the
        // agent does (bounded by the clock).
        epoll_until(tun, udp, end, || {
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                let (to_peer, tun_empty) = self.tun_to_peer()?;
                let (from_peer, udp_empty) = self.peer_to_tun()?;
                let n = to_peer + from_peer;
                if n > 0 {
                    let weight = u32::try_from(n.min(1 << 16)).unwrap_or(1 << 16);
                    gap = (gap * 7 + now.saturating_duration_since(last)) / (weight + 7);
                    last = now;
                    if !(tun_empty && udp_empty) {
                        continue;
                    }
                }
                if gap < NULL_POLL_GAP && now < last + NULL_POLL_FOR {
                    std::hint::spin_loop();
                    continue;
                }
                break;
            }
            Ok(())
        })?;
        Ok(self.moved)
    }

    /// Up to [`BATCHES_PER_TURN`] batches from the TUN device to the peer: packets moved,
    /// and whether the device was found empty. A batch gathers reads (one packet each,
    /// or a super-packet's segments) while a whole super-packet's segments still fit, and
    /// is sent at once, as the agent's are.
    fn tun_to_peer(&mut self) -> std::io::Result<(u64, bool)> {
        let batch = self.tun_in.len();
        let mut moved = 0;
        for _ in 0..BATCHES_PER_TURN {
            let (mut n, mut empty) = (0, false);
            for _ in 0..batch {
                if batch - n < 64 {
                    break;
                }
                match self.dev.recv_multiple(
                    &mut self.raw,
                    &mut self.tun_in[n..],
                    &mut self.sizes[n..],
                    0,
                ) {
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        empty = true;
                        break;
                    }
                    Err(e) if e.raw_os_error().is_some_and(|c| c != libc::EINVAL) => {
                        return Err(e);
                    }
                    // A packet tun-rs cannot split: dropped, as the agent drops it.
                    Err(_) => {}
                }
            }
            self.send_batch(n);
            moved += n as u64;
            if empty {
                return Ok((moved, true));
            }
        }
        Ok((moved, false))
    }

    /// Sends the `n` packets read, as GSO runs of equal-sized datagrams (the last of a run
    /// may be shorter), each run one `sendmsg`.
    fn send_batch(&mut self, n: usize) {
        let max = self.state.max_gso_segments().max(1);
        let mut i = 0;
        while i < n {
            let size = self.sizes[i].min(BATCHED_MAX);
            self.arena.clear();
            let mut count = 0;
            while i < n && count < max {
                let len = self.sizes[i].min(BATCHED_MAX);
                if len > size || self.arena.len() + len > BATCHED_MAX {
                    break;
                }
                self.arena.extend_from_slice(&self.tun_in[i][..len]);
                count += 1;
                i += 1;
                if len < size {
                    break;
                }
            }
            let t = quinn_udp::Transmit {
                destination: self.peer,
                ecn: None,
                contents: &self.arena,
                segment_size: (count > 1).then_some(size),
                src_ip: None,
            };
            for attempt in 1..=BATCHED_SEND_TRIES {
                match self.state.try_send((&self.udp).into(), &t) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if attempt < BATCHED_SEND_TRIES {
                            std::thread::yield_now();
                        }
                    }
                    _ => break,
                }
            }
            self.moved.to_peer += count as u64;
        }
    }

    /// Up to [`BATCHES_PER_TURN`] socket reads to the TUN device: datagrams moved, and
    /// whether the socket was found empty.
    fn peer_to_tun(&mut self) -> std::io::Result<(u64, bool)> {
        use tun_rs::VIRTIO_NET_HDR_LEN;
        let mut moved = 0;
        let mut empty = false;
        for _ in 0..BATCHES_PER_TURN {
            let n = {
                let mut iovs: Vec<std::io::IoSliceMut<'_>> = self
                    .udp_in
                    .iter_mut()
                    .map(|b| std::io::IoSliceMut::new(b))
                    .collect();
                match self
                    .state
                    .recv((&self.udp).into(), &mut iovs, &mut self.metas)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        empty = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            for i in 0..n {
                let m = self.metas[i];
                if m.addr != self.peer {
                    continue;
                }
                let (len, stride) = (m.len.min(BATCHED_MAX), m.stride.max(1));
                let mut at = 0;
                while at < len {
                    let seg = at..(at + stride).min(len);
                    let out = &mut self.tun_out[self.filled];
                    out.clear();
                    out.resize(VIRTIO_NET_HDR_LEN, 0);
                    out.extend_from_slice(&self.udp_in[i][seg.clone()]);
                    self.filled += 1;
                    moved += 1;
                    at = seg.end;
                    if self.filled == self.tun_out.len() {
                        self.write_tun()?;
                    }
                }
            }
            self.write_tun()?;
            if n < self.udp_in.len() {
                empty = true;
                break;
            }
        }
        self.moved.from_peer += moved;
        Ok((moved, empty))
    }

    /// Writes the packets gathered for the TUN device, coalesced where tun-rs can.
    fn write_tun(&mut self) -> std::io::Result<()> {
        if self.filled == 0 {
            return Ok(());
        }
        let out = &mut self.tun_out[..self.filled];
        if let Err(e) = self
            .dev
            .send_multiple(&mut self.gro, out, tun_rs::VIRTIO_NET_HDR_LEN)
            && e.raw_os_error()
                .is_some_and(|c| !matches!(c, libc::EAGAIN | libc::EINVAL | libc::EIO))
        {
            return Err(e);
        }
        self.filled = 0;
        Ok(())
    }
}

/// What a [`null_relay`] moved.
#[derive(Debug, Default, serde::Serialize)]
pub struct NullRelayResult {
    /// Datagrams from `a` sent on to `b`.
    pub a_to_b: u64,
    /// Datagrams from `b` sent on to `a`.
    pub b_to_a: u64,
    /// Datagrams from anyone else, dropped.
    pub dropped: u64,
}

/// A relay without cryptography between two [`null_tunnel`]s: every datagram from `a`
/// goes on to `b` as it is, every datagram from `b` to `a`, from one socket on one
/// thread that blocks in `recv_from`. It does what any relaying gateway must do (a wake-up
/// and a receive and a send per packet) and nothing else, so the extra latency and the
/// lost throughput of a path through it, beside the same null tunnels without it, are the
/// floor of a gateway on this machine. Runs for `seconds`.
pub fn null_relay(
    listen: SocketAddr,
    a: SocketAddr,
    b: SocketAddr,
    seconds: u64,
) -> std::io::Result<NullRelayResult> {
    let udp = null_socket(listen)?;
    eprintln!("null relay up on {listen}");
    relay(&udp, a, b, Duration::from_secs(seconds))
}

/// [`null_relay`] on a bound socket, for `time`.
fn relay(
    udp: &UdpSocket,
    a: SocketAddr,
    b: SocketAddr,
    time: Duration,
) -> std::io::Result<NullRelayResult> {
    // Woken at least every 100 ms to see whether the time is up.
    udp.set_read_timeout(Some(Duration::from_millis(100)))?;
    let end = Instant::now() + time;
    let mut r = NullRelayResult::default();
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < end {
        match udp.recv_from(&mut buf) {
            Ok((n, from)) if from == a => {
                let _ = udp.send_to(&buf[..n], b);
                r.a_to_b += 1;
            }
            Ok((n, from)) if from == b => {
                let _ = udp.send_to(&buf[..n], a);
                r.b_to_a += 1;
            }
            Ok(_) => r.dropped += 1,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(r)
}

/// What one WireGuard data packet costs boringtun, hot and after a pause.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CryptoWake {
    /// Packets timed each way.
    pub packets: usize,
    /// How long the pause before each of the later packets was, microseconds.
    pub sleep_us: u64,
    /// How the thread passed it: `"sleep"`, or `"poll"` (a non-blocking read again and
    /// again, as a busy-polling data plane does).
    pub pause: &'static str,
    /// While polling: how often it sealed and opened a throwaway packet on a session of
    /// its own, microseconds, or none (the agent's busy polling, `polling = "busy"`,
    /// passes an echo through two planes of its own every 200 us: the cryptography and
    /// the rest of the per-packet path).
    pub warm_every_us: Option<u64>,
    /// Median encapsulation of a 64-byte echo (84-byte IPv4 packet), back to back, ns.
    pub hot_encapsulate_ns: u64,
    /// Median decapsulation of it, back to back, ns.
    pub hot_decapsulate_ns: u64,
    /// Median encapsulation as the first work after the pause, ns.
    pub woken_encapsulate_ns: u64,
    /// Median decapsulation right after it, ns.
    pub woken_decapsulate_ns: u64,
}

/// How [`crypto_wake`]'s thread passes the pause before a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Asleep.
    Sleep,
    /// Polling a non-blocking socket that stays empty, with a warm-up every so often if
    /// given.
    Poll {
        /// How often a throwaway packet passes a session of its own.
        warm_every: Option<Duration>,
    },
}

/// Two boringtun tunnels with a session between them (one handshake).
fn session_pair() -> anyhow::Result<(boringtun::noise::Tunn, boringtun::noise::Tunn)> {
    use boringtun::noise::{Tunn, TunnResult};
    use boringtun::x25519::{PublicKey, StaticSecret};
    let mut rng = rand::rng();
    let mut key = || {
        let mut k = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rng, &mut k);
        StaticSecret::from(k)
    };
    let (sa, sb) = (key(), key());
    let (pa, pb) = (PublicKey::from(&sa), PublicKey::from(&sb));
    let mut a = Tunn::new(sa, pb, None, None, 1, None);
    let mut b = Tunn::new(sb, pa, None, None, 2, None);
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    let init = match a.format_handshake_initiation(&mut x, false) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => anyhow::bail!("no handshake initiation"),
    };
    let response = match b.decapsulate(None, &init, &mut y) {
        TunnResult::WriteToNetwork(p) => p.to_vec(),
        _ => anyhow::bail!("no handshake response"),
    };
    if let TunnResult::WriteToNetwork(k) = a.decapsulate(None, &response, &mut x) {
        let keepalive = k.to_vec();
        let _ = b.decapsulate(None, &keepalive, &mut y);
    }
    Ok((a, b))
}

/// Seals `packet` on `a` and opens it on `b` (buffers `x`, `y`): the time of each, ns.
fn seal_and_open(
    (a, b): (&mut boringtun::noise::Tunn, &mut boringtun::noise::Tunn),
    packet: &[u8],
    (x, y): (&mut [u8], &mut [u8]),
) -> anyhow::Result<(u64, u64)> {
    use boringtun::noise::TunnResult;
    let t0 = Instant::now();
    let len = match a.encapsulate(packet, x) {
        TunnResult::WriteToNetwork(p) => p.len(),
        _ => anyhow::bail!("no data packet from the session"),
    };
    let t1 = Instant::now();
    if !matches!(
        b.decapsulate(None, &x[..len], y),
        TunnResult::WriteToTunnelV4(..)
    ) {
        anyhow::bail!("the data packet did not decrypt");
    }
    let t2 = Instant::now();
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Ok((ns(t1 - t0), ns(t2 - t1)))
}

/// Times boringtun's encapsulation and decapsulation of one echo-sized packet between two
/// tunnels with a session, `packets` times back to back and `packets` times each after a
/// pause of `sleep`, passed as `pause` says: what a data plane pays per packet when
/// packets are sparse (the caches its last packet left are cold when the next comes,
/// whether the thread slept or polled), beside the figure a hot loop gives.
pub fn crypto_wake(packets: usize, sleep: Duration, pause: Pause) -> anyhow::Result<CryptoWake> {
    let (mut a, mut b) = session_pair()?;
    let (mut x, mut y) = (vec![0u8; 2048], vec![0u8; 2048]);
    // An ICMP echo of 64 bytes: 20 + 8 + 56.
    let mut packet = [0u8; 84];
    packet[0] = 0x45;
    packet[3] = 84;
    packet[9] = 1;
    packet[12..16].copy_from_slice(&[10, 0, 0, 1]);
    packet[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let packets = packets.max(1);
    let (mut he, mut hd, mut we, mut wd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..packets {
        let (e, d) = seal_and_open((&mut a, &mut b), &packet, (&mut x, &mut y))?;
        he.push(e);
        hd.push(d);
    }
    // What a polling thread reads (nothing comes), and the warm-ups' own session.
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_nonblocking(true)?;
    let mut warm = match pause {
        Pause::Poll {
            warm_every: Some(_),
        } => Some(session_pair()?),
        _ => None,
    };
    let (mut wx, mut wy, mut buf) = (vec![0u8; 2048], vec![0u8; 2048], [0u8; 64]);
    for _ in 0..packets {
        match pause {
            Pause::Sleep => std::thread::sleep(sleep),
            Pause::Poll { warm_every } => {
                let start = Instant::now();
                let mut last = start;
                while start.elapsed() < sleep {
                    let _ = socket.recv(&mut buf);
                    if let (Some(every), Some((c, d))) = (warm_every, warm.as_mut())
                        && last.elapsed() >= every
                    {
                        last = Instant::now();
                        seal_and_open((c, d), &packet, (&mut wx, &mut wy))?;
                    }
                }
            }
        }
        let (e, d) = seal_and_open((&mut a, &mut b), &packet, (&mut x, &mut y))?;
        we.push(e);
        wd.push(d);
    }
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    Ok(CryptoWake {
        packets,
        sleep_us: us(sleep),
        pause: match pause {
            Pause::Sleep => "sleep",
            Pause::Poll { .. } => "poll",
        },
        warm_every_us: match pause {
            Pause::Poll {
                warm_every: Some(w),
            } => Some(us(w)),
            _ => None,
        },
        hot_encapsulate_ns: median(&mut he),
        hot_decapsulate_ns: median(&mut hd),
        woken_encapsulate_ns: median(&mut we),
        woken_decapsulate_ns: median(&mut wd),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_null_relay_carries_both_ways_and_drops_strangers() {
        let bind = || UdpSocket::bind("127.0.0.1:0").expect("a loopback socket");
        let (relay_sock, a, b, stranger) = (bind(), bind(), bind(), bind());
        let at = relay_sock.local_addr().expect("relay address");
        let (a_addr, b_addr) = (
            a.local_addr().expect("a's address"),
            b.local_addr().expect("b's address"),
        );
        let t = std::thread::spawn(move || {
            relay(&relay_sock, a_addr, b_addr, Duration::from_millis(1500))
        });
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(1)))
                .expect("timeout");
        }
        let mut buf = [0u8; 64];
        stranger.send_to(b"not yours", at).expect("send");
        a.send_to(b"to b", at).expect("send");
        let (n, from) = b.recv_from(&mut buf).expect("b receives a's datagram");
        assert_eq!((&buf[..n], from), (&b"to b"[..], at));
        b.send_to(b"to a", at).expect("send");
        let (n, from) = a.recv_from(&mut buf).expect("a receives b's datagram");
        assert_eq!((&buf[..n], from), (&b"to a"[..], at));
        let r = t.join().expect("the relay thread").expect("the relay ran");
        assert_eq!((r.a_to_b, r.b_to_a, r.dropped), (1, 1, 1));
        // Nothing of the stranger's reached either end.
        for s in [&a, &b] {
            s.set_nonblocking(true).expect("nonblocking");
            assert!(
                s.recv_from(&mut buf).is_err(),
                "a stranger's datagram was relayed"
            );
        }
    }

    #[test]
    fn rx_samples_are_in_order_and_count_what_was_received() {
        let (rx, tx) = (
            UdpSocket::bind("127.0.0.1:0").expect("a loopback socket"),
            UdpSocket::bind("127.0.0.1:0").expect("a loopback socket"),
        );
        let to = rx.local_addr().expect("address");
        let sampler = std::thread::spawn(|| rx_samples("lo", Duration::from_millis(50), 1));
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..100 {
            tx.send_to(&[7u8; 1000], to).expect("send");
        }
        let s = sampler
            .join()
            .expect("the sampler")
            .expect("lo is readable");
        // One sample every 50 ms for a second, give or take the scheduler.
        assert!((15..=21).contains(&s.len()), "{} samples", s.len());
        assert!(s.windows(2).all(|w| w[0].0 < w[1].0), "times out of order");
        assert!(s.windows(2).all(|w| w[0].1 <= w[1].1), "counter went back");
        let got = s[s.len() - 1].1 - s[0].1;
        assert!(got >= 100 * 1000, "counted {got} bytes of the 100,000 sent");
    }

    #[test]
    fn crypto_wake_times_real_packets_both_ways() {
        let poll = Pause::Poll {
            warm_every: Some(Duration::from_micros(100)),
        };
        for pause in [Pause::Sleep, Pause::Poll { warm_every: None }, poll] {
            let c = crypto_wake(20, Duration::from_millis(1), pause)
                .expect("a session between two tunnels");
            assert_eq!((c.packets, c.sleep_us), (20, 1000));
            assert_eq!(c.pause == "sleep", pause == Pause::Sleep);
            assert_eq!(c.warm_every_us, (pause == poll).then_some(100));
            for ns in [
                c.hot_encapsulate_ns,
                c.hot_decapsulate_ns,
                c.woken_encapsulate_ns,
                c.woken_decapsulate_ns,
            ] {
                // Something was timed, and no packet took a second.
                assert!(ns > 0 && ns < 1_000_000_000, "{c:?}");
            }
        }
    }
}

/// What [`wake_gaps`] saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WakeGaps {
    /// Wake-ups.
    pub wakes: u64,
    /// The longest time from one wake-up to the next, us.
    pub longest_gap_us: u64,
    /// Seconds it ran.
    pub seconds: f64,
}

/// A thread that sleeps `every` again and again for `seconds`, and the longest it went
/// without running: how long the other tasks of its CPU kept it waiting.
pub fn wake_gaps(every: Duration, seconds: u64) -> WakeGaps {
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let (mut last, mut wakes, mut longest) = (start, 0u64, Duration::ZERO);
    // Bounded by the clock, and by count should the sleep return at once.
    let most = seconds.saturating_mul(1_000_000) / (every.as_micros().max(1) as u64) + 1;
    while wakes < most.saturating_mul(2) {
        std::thread::sleep(every);
        let now = Instant::now();
        longest = longest.max(now - last);
        last = now;
        wakes += 1;
        if now >= until {
            break;
        }
    }
    WakeGaps {
        wakes,
        longest_gap_us: u64::try_from(longest.as_micros()).unwrap_or(u64::MAX),
        seconds: start.elapsed().as_secs_f64(),
    }
}
