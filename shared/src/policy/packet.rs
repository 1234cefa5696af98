//! A bounded, panic-free parser of IPv4 and IPv6 packets down to the TCP, UDP, ICMP or
//! ICMPv6 header, as far as the policy engine needs: addresses, protocol, destination
//! port, fragment position.
//!
//! Lying length fields (an IPv4 total length or IPv6 payload length beyond the buffer, an
//! IHL or TCP data offset out of range) and truncated headers are errors, not panics.
//! Non-first fragments carry no transport header: they are reported as such and can match
//! only rules without ports.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// IP protocol numbers.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Most IPv6 extension headers walked before the packet is refused.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// What the transport header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP with its ports and flags.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// The flags byte (SYN = 0x02).
        flags: u8,
    },
    /// UDP with its ports.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP or ICMPv6 with its type and code.
    Icmp {
        /// Type.
        kind: u8,
        /// Code.
        code: u8,
    },
    /// A non-first fragment: no transport header.
    Fragment,
    /// Another protocol (or "no next header").
    Other,
}

/// The fields of a packet that policy uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketMeta {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The transport protocol number (after IPv6 extension headers).
    pub protocol: u8,
    /// The transport header.
    pub transport: Transport,
    /// Length of the IP packet in bytes (from its header, checked against the buffer).
    pub len: usize,
    /// Its place in a fragmented datagram, if it is a fragment.
    pub fragment: Option<Fragment>,
}

/// A fragment of an IP datagram: its identification (with the addresses, and for IPv4
/// the protocol, what names the datagram), whether it is the first (offset 0, more to
/// come: the one that carries the transport header) and whether it is the last (no more).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fragment {
    /// The IPv4 identification or the IPv6 fragment header's.
    pub id: u32,
    /// Offset 0: the transport header is in it.
    pub first: bool,
    /// No more fragments follow it (its offset is not 0).
    pub last: bool,
}

impl PacketMeta {
    /// The destination port for TCP and UDP.
    pub fn dst_port(&self) -> Option<u16> {
        match self.transport {
            Transport::Tcp { dst_port, .. } | Transport::Udp { dst_port, .. } => Some(dst_port),
            _ => None,
        }
    }
}

/// Why a packet could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum PacketError {
    /// The buffer is empty.
    #[error("empty packet")]
    Empty,
    /// The version nibble is neither 4 nor 6.
    #[error("IP version {0} is not 4 or 6")]
    Version(u8),
    /// A header is cut short.
    #[error("{header} header truncated: {have} of {need} bytes")]
    Truncated {
        /// Which header.
        header: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A length field contradicts the buffer or the header.
    #[error("{0} length field is inconsistent")]
    BadLength(&'static str),
    /// Too many IPv6 extension headers.
    #[error("more than {MAX_EXTENSION_HEADERS} IPv6 extension headers")]
    TooManyExtensions,
}

fn need(buf: &[u8], n: usize, header: &'static str) -> Result<(), PacketError> {
    if buf.len() < n {
        return Err(PacketError::Truncated {
            header,
            need: n,
            have: buf.len(),
        });
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parses one IP packet.
pub fn parse(buf: &[u8]) -> Result<PacketMeta, PacketError> {
    let first = *buf.first().ok_or(PacketError::Empty)?;
    match first >> 4 {
        4 => parse_v4(buf),
        6 => parse_v6(buf),
        v => Err(PacketError::Version(v)),
    }
}

fn parse_v4(buf: &[u8]) -> Result<PacketMeta, PacketError> {
    need(buf, 20, "IPv4")?;
    let ihl = usize::from(buf[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(PacketError::BadLength("IPv4 header"));
    }
    need(buf, ihl, "IPv4 options")?;
    let total = usize::from(be16(buf, 2));
    if total < ihl || total > buf.len() {
        return Err(PacketError::BadLength("IPv4 total"));
    }
    let frag = be16(buf, 6);
    let offset = frag & 0x1fff;
    let more = frag & 0x2000 != 0;
    let fragment = (offset != 0 || more).then(|| Fragment {
        id: u32::from(be16(buf, 4)),
        first: offset == 0,
        last: !more,
    });
    let protocol = buf[9];
    let src = IpAddr::V4(Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]));
    let transport = if offset != 0 {
        Transport::Fragment
    } else {
        parse_transport(protocol, &buf[ihl..total], more)?
    };
    Ok(PacketMeta {
        src,
        dst,
        protocol,
        transport,
        len: total,
        fragment,
    })
}

fn parse_v6(buf: &[u8]) -> Result<PacketMeta, PacketError> {
    need(buf, 40, "IPv6")?;
    let payload = usize::from(be16(buf, 4));
    // Jumbograms (payload length 0 with a hop-by-hop option) never cross our tunnels.
    if payload == 0 && buf[6] == 0 || 40 + payload > buf.len() {
        return Err(PacketError::BadLength("IPv6 payload"));
    }
    let total = 40 + payload;
    let mut a = [0u8; 16];
    a.copy_from_slice(&buf[8..24]);
    let src = IpAddr::V6(Ipv6Addr::from(a));
    a.copy_from_slice(&buf[24..40]);
    let dst = IpAddr::V6(Ipv6Addr::from(a));

    let mut next = buf[6];
    let mut at = 40;
    let mut fragment = None;
    let mut walked = 0;
    loop {
        match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6.
            0 | 43 | 60 | 135 | 139 | 140 => {
                walked += 1;
                if walked > MAX_EXTENSION_HEADERS {
                    return Err(PacketError::TooManyExtensions);
                }
                need(&buf[..total], at + 8, "IPv6 extension")?;
                let len = (usize::from(buf[at + 1]) + 1) * 8;
                need(&buf[..total], at + len, "IPv6 extension")?;
                next = buf[at];
                at += len;
            }
            // Fragment header: fixed 8 bytes.
            44 => {
                walked += 1;
                if walked > MAX_EXTENSION_HEADERS {
                    return Err(PacketError::TooManyExtensions);
                }
                need(&buf[..total], at + 8, "IPv6 fragment")?;
                let offset = be16(buf, at + 2) >> 3;
                let more = be16(buf, at + 2) & 1 != 0;
                let id = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
                next = buf[at];
                at += 8;
                // (Offset 0 without more is an atomic fragment: a whole datagram.)
                if offset != 0 || more {
                    fragment = Some(Fragment {
                        id,
                        first: offset == 0,
                        last: !more,
                    });
                }
                if offset != 0 {
                    break;
                }
            }
            // Authentication header: length in 4-byte units, minus 2.
            51 => {
                walked += 1;
                if walked > MAX_EXTENSION_HEADERS {
                    return Err(PacketError::TooManyExtensions);
                }
                need(&buf[..total], at + 8, "IPv6 AH")?;
                let len = (usize::from(buf[at + 1]) + 2) * 4;
                need(&buf[..total], at + len, "IPv6 AH")?;
                next = buf[at];
                at += len;
            }
            _ => break,
        }
    }
    let transport = match fragment {
        Some(Fragment { first: false, .. }) => Transport::Fragment,
        _ => parse_transport(next, &buf[at..total], fragment.is_some())?,
    };
    Ok(PacketMeta {
        src,
        dst,
        protocol: next,
        transport,
        len: total,
        fragment,
    })
}

/// The transport header at the start of `l4`: the whole transport datagram, or (`first`
/// fragment) only its start, which must still hold the whole header (a first fragment too
/// short for it is dropped, as RFC 1858 advises against tiny-fragment attacks).
fn parse_transport(protocol: u8, l4: &[u8], first: bool) -> Result<Transport, PacketError> {
    Ok(match protocol {
        proto::TCP => {
            need(l4, 20, "TCP")?;
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return Err(PacketError::BadLength("TCP data offset"));
            }
            Transport::Tcp {
                src_port: be16(l4, 0),
                dst_port: be16(l4, 2),
                flags: l4[13],
            }
        }
        proto::UDP => {
            need(l4, 8, "UDP")?;
            let len = usize::from(be16(l4, 4));
            // 0 is allowed for IPv6 jumbograms only; we refuse it with them. A first
            // fragment holds only the start of the datagram that the length counts.
            if len < 8 || (len > l4.len() && !first) {
                return Err(PacketError::BadLength("UDP"));
            }
            Transport::Udp {
                src_port: be16(l4, 0),
                dst_port: be16(l4, 2),
            }
        }
        proto::ICMP | proto::ICMPV6 => {
            need(l4, 4, "ICMP")?;
            Transport::Icmp {
                kind: l4[0],
                code: l4[1],
            }
        }
        _ => Transport::Other,
    })
}

/// Builders of well-formed test packets, shared by tests, benchmarks and fuzz seeds.
pub mod build {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::proto;

    /// An IPv4 packet with `l4` as payload (no checksum: policy does not check it).
    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = Vec::with_capacity(total);
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    /// The IPv4 fragments of a datagram with `l4` as payload and identification `id`,
    /// each with at most `room` bytes of it (rounded down to a multiple of 8, at least 8),
    /// as a sender with a smaller MTU cuts it.
    pub fn ipv4_fragments(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        id: u16,
        l4: &[u8],
        room: usize,
    ) -> Vec<Vec<u8>> {
        let room = (room / 8).max(1) * 8;
        let n = l4.len().div_ceil(room).max(1);
        (0..n)
            .map(|i| {
                let part = &l4[i * room..((i + 1) * room).min(l4.len())];
                let mut p = ipv4(src, dst, protocol, part);
                p[4..6].copy_from_slice(&id.to_be_bytes());
                let more = if i + 1 < n { 0x2000 } else { 0 };
                let field = more | ((i * room / 8) as u16 & 0x1fff);
                p[6..8].copy_from_slice(&field.to_be_bytes());
                p
            })
            .collect()
    }

    /// An IPv6 packet with `l4` as payload.
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = Vec::with_capacity(40 + l4.len());
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    /// A TCP header (20 bytes) with `flags`, followed by `payload` bytes of zeros.
    pub fn tcp(src_port: u16, dst_port: u16, flags: u8, payload: usize) -> Vec<u8> {
        let mut t = vec![0u8; 20 + payload];
        t[0..2].copy_from_slice(&src_port.to_be_bytes());
        t[2..4].copy_from_slice(&dst_port.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    /// A UDP header followed by `payload` zero bytes.
    pub fn udp(src_port: u16, dst_port: u16, payload: usize) -> Vec<u8> {
        let mut u = vec![0u8; 8 + payload];
        u[0..2].copy_from_slice(&src_port.to_be_bytes());
        u[2..4].copy_from_slice(&dst_port.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload) as u16).to_be_bytes());
        u
    }

    /// An ICMP echo request header followed by `payload` zero bytes.
    pub fn icmp_echo(payload: usize) -> Vec<u8> {
        let mut i = vec![0u8; 8 + payload];
        i[0] = 8;
        i
    }

    /// An IPv4/TCP packet of exactly `len` bytes (at least 40).
    pub fn tcp4(dst_port: u16, len: usize) -> Vec<u8> {
        ipv4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            proto::TCP,
            &tcp(40000, dst_port, 0x02, len.saturating_sub(40)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;

    const A4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

    #[test]
    fn ipv4_transports() {
        let p = parse(&ipv4(A4, B4, proto::TCP, &tcp(1234, 80, 0x02, 10))).expect("tcp");
        assert_eq!(
            p.transport,
            Transport::Tcp {
                src_port: 1234,
                dst_port: 80,
                flags: 2
            }
        );
        assert_eq!((p.src, p.dst, p.len), (A4.into(), B4.into(), 50));
        let p = parse(&ipv4(A4, B4, proto::UDP, &udp(5, 53, 3))).expect("udp");
        assert_eq!(p.dst_port(), Some(53));
        let p = parse(&ipv4(A4, B4, proto::ICMP, &icmp_echo(56))).expect("icmp");
        assert_eq!(p.transport, Transport::Icmp { kind: 8, code: 0 });
        let p = parse(&ipv4(A4, B4, 47, &[0; 4])).expect("gre");
        assert_eq!(p.transport, Transport::Other);
    }

    #[test]
    fn ipv4_options_and_fragments() {
        // IHL 6: one 4-byte option word before TCP.
        let mut p = ipv4(
            A4,
            B4,
            proto::TCP,
            &[[1u8, 1, 1, 0].as_slice(), &tcp(1, 22, 0, 0)].concat(),
        );
        p[0] = 0x46;
        assert_eq!(parse(&p).expect("options").dst_port(), Some(22));
        // A non-first fragment has no transport header.
        let mut f = ipv4(A4, B4, proto::UDP, &[0xde, 0xad]);
        f[6] = 0x00;
        f[7] = 0x10;
        assert_eq!(parse(&f).expect("fragment").transport, Transport::Fragment);
        // A UDP datagram larger than the MTU: its first fragment holds the ports, and
        // the length of the whole datagram (more than the fragment carries).
        let frags = ipv4_fragments(A4, B4, proto::UDP, 77, &udp(5, 5060, 4088), 1400);
        assert_eq!(frags.len(), 3);
        let first = parse(&frags[0]).expect("first fragment");
        assert_eq!(first.dst_port(), Some(5060));
        let at = |first, last| {
            Some(Fragment {
                id: 77,
                first,
                last,
            })
        };
        assert_eq!(first.fragment, at(true, false));
        for (i, f) in frags.iter().enumerate().skip(1) {
            let p = parse(f).expect("later fragment");
            assert_eq!(p.transport, Transport::Fragment);
            assert_eq!(p.fragment, at(false, i == 2));
        }
        // A whole datagram is no fragment; a first fragment too short for the UDP header
        // (a tiny-fragment trick) is malformed, and one whose length field is below the
        // header's too.
        let whole = parse(&ipv4(A4, B4, proto::UDP, &udp(5, 53, 3))).expect("udp");
        assert_eq!(whole.fragment, None);
        let mut tiny = ipv4(A4, B4, proto::UDP, &udp(5, 53, 3)[..4]);
        tiny[6] = 0x20;
        assert!(matches!(
            parse(&tiny),
            Err(PacketError::Truncated { header: "UDP", .. })
        ));
        let mut short = frags[0].clone();
        short[20 + 4..20 + 6].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(parse(&short), Err(PacketError::BadLength("UDP")));
        // Not a fragment, the UDP length may not exceed the packet.
        let mut lying = frags[0].clone();
        lying[6] = 0;
        assert_eq!(parse(&lying), Err(PacketError::BadLength("UDP")));
    }

    #[test]
    fn ipv4_lies_are_errors() {
        let good = ipv4(A4, B4, proto::TCP, &tcp(1, 2, 0, 0));
        let mut p = good.clone();
        p[2..4].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(parse(&p), Err(PacketError::BadLength("IPv4 total")));
        let mut p = good.clone();
        p[0] = 0x44;
        assert_eq!(parse(&p), Err(PacketError::BadLength("IPv4 header")));
        let mut p = good.clone();
        p[0] = 0x4f;
        assert!(parse(&p).is_err());
        let mut p = good.clone();
        p[20 + 12] = 0xf0; // data offset 60 > segment
        assert_eq!(parse(&p), Err(PacketError::BadLength("TCP data offset")));
        assert!(parse(&good[..30]).is_err());
        assert_eq!(parse(&[]), Err(PacketError::Empty));
        assert_eq!(parse(&[0x50]), Err(PacketError::Version(5)));
    }

    #[test]
    fn ipv6_extension_headers() {
        let plain = parse(&ipv6(A6, B6, proto::UDP, &udp(1, 4789, 0))).expect("udp6");
        assert_eq!(plain.dst_port(), Some(4789));
        // Hop-by-hop (8 bytes) then destination options (16 bytes) then TCP.
        let mut l = vec![60, 0, 0, 0, 0, 0, 0, 0];
        l.extend_from_slice(&[proto::TCP, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        l.extend_from_slice(&tcp(9, 443, 0x10, 0));
        let p = parse(&ipv6(A6, B6, 0, &l)).expect("ext");
        assert_eq!((p.protocol, p.dst_port()), (proto::TCP, Some(443)));
        // First fragment (offset 0) keeps its transport header; a later one does not.
        let mut f = vec![proto::UDP, 0, 0, 1, 0, 0, 0, 1];
        f.extend_from_slice(&udp(1, 53, 0));
        let p = parse(&ipv6(A6, B6, 44, &f)).expect("frag0");
        assert_eq!(p.dst_port(), Some(53));
        let at = |first, last| Some(Fragment { id: 1, first, last });
        assert_eq!(p.fragment, at(true, false));
        // The first of a datagram larger than the fragment: its UDP length counts the
        // whole datagram.
        let mut big = vec![proto::UDP, 0, 0, 1, 0, 0, 0, 2];
        big.extend_from_slice(&udp(1, 4789, 3000)[..1400]);
        let p = parse(&ipv6(A6, B6, 44, &big)).expect("first of a large datagram");
        assert_eq!(p.dst_port(), Some(4789));
        // An atomic fragment (offset 0, no more) is a whole datagram.
        let mut atomic = vec![proto::UDP, 0, 0, 0, 0, 0, 0, 3];
        atomic.extend_from_slice(&udp(1, 53, 0));
        assert_eq!(
            parse(&ipv6(A6, B6, 44, &atomic)).expect("atomic").fragment,
            None
        );
        let later = [proto::UDP, 0, 0x05, 0x00, 0, 0, 0, 1, 9, 9];
        let p = parse(&ipv6(A6, B6, 44, &later)).expect("frag");
        assert_eq!((p.transport, p.protocol), (Transport::Fragment, proto::UDP));
        assert_eq!(p.fragment, at(false, true));
        let p = parse(&ipv6(A6, B6, proto::ICMPV6, &[128, 0, 0, 0])).expect("icmp6");
        assert_eq!(p.transport, Transport::Icmp { kind: 128, code: 0 });
    }

    #[test]
    fn ipv6_lies_are_errors() {
        // An extension header claiming more bytes than the packet has.
        let l = [proto::TCP, 200, 0, 0, 0, 0, 0, 0];
        assert!(parse(&ipv6(A6, B6, 0, &l)).is_err());
        // A chain of hop-by-hop headers longer than the limit.
        let chain: Vec<u8> = (0..10).flat_map(|_| [0u8, 0, 0, 0, 0, 0, 0, 0]).collect();
        assert_eq!(
            parse(&ipv6(A6, B6, 0, &chain)),
            Err(PacketError::TooManyExtensions)
        );
        let mut p = ipv6(A6, B6, proto::UDP, &udp(1, 2, 0));
        p[5] = 200;
        assert_eq!(parse(&p), Err(PacketError::BadLength("IPv6 payload")));
        assert!(parse(&p[..39]).is_err());
    }
}
