//! The underlay: two UDP sockets on the agent's one address and port, one for WireGuard's
//! transport data and one for everything else (handshake messages, cookie replies,
//! junk), as kernel WireGuard keeps handshakes in a queue of their own.
//!
//! A flood that outruns the data plane fills a socket's receive buffer, and from then on
//! the kernel drops what comes, whatever it is: with one socket, the tunnels' own packets
//! are lost with the flood (a CI run of the forged-handshake flood test lost 1 ping of
//! 40 while the kernel dropped 1.3% of the flood). Here the kernel sorts each datagram
//! before it queues it: the two sockets share the port (`SO_REUSEPORT`) and a classic BPF
//! program on the group (`SO_ATTACH_REUSEPORT_CBPF`) sends a datagram that starts as a
//! transport-data message to this agent to the data socket, and any other to the
//! handshake socket. A data message to this agent is at least 32 bytes (header and tag),
//! starts with type 4 and three zero bytes, and its receiver index carries the plane's
//! random tag in its last byte ([`crate::dataplane::index_tag`]). A flood of handshakes,
//! of junk, or of data messages from an attacker off the path (who does not see the tag)
//! then fills the handshake socket; 1 in 256 of the last shares the data socket, and so
//! does one from an attacker on the path, who can read the tag (as all share kernel
//! WireGuard's decryption queue). The data plane reads the data socket first and handles
//! what comes on either the same way.
//!
//! What the steering does not cover:
//! - UDP GRO merges datagrams of one flow and size before the program runs, which then
//!   sorts the train by its first datagram: handshake-sized data messages and handshakes
//!   of one source address and port (a spoofing attacker on the path) can travel
//!   together.
//! - Another process with the agent's user id could join the group on its port (a bound
//!   socket with `SO_REUSEPORT`): the program never picks a third socket, but such a
//!   socket bound before the agent's would take its place. The agent refuses a port that
//!   any socket holds when it starts (a probe bound without `SO_REUSEPORT`), which leaves
//!   a window of one system call.

#![allow(unsafe_code)]

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use crate::error::AgentError;

/// The underlay sockets.
#[derive(Debug)]
pub struct Underlay {
    /// Transport data (and what the plane sends: every datagram leaves from here).
    pub data: UdpSocket,
    /// Everything else; none where the kernel refused the steering (then `data` has it
    /// all, as one socket did).
    pub handshakes: Option<UdpSocket>,
}

impl Underlay {
    /// The sockets on `addr` (port 0: one the kernel picks), non-blocking, with their
    /// buffers sized to `buffer` (see [`crate::daemon::size_buffers`]), steering data
    /// messages with the index tag `tag` to `data`.
    pub fn bind(addr: SocketAddr, buffer: usize, tag: u8) -> Result<Underlay, AgentError> {
        let device = |e: io::Error| AgentError::Device(format!("the underlay socket {addr}: {e}"));
        // A port no socket holds (the kernel picks one for port 0 that no socket holds
        // either, where a socket with `SO_REUSEPORT` may be given its own user's).
        let free = UdpSocket::bind(addr)
            .and_then(|probe| probe.local_addr())
            .map_err(device)?;
        let data = socket(free, buffer, true).map_err(device)?;
        if let Err(e) = steer(&data, tag) {
            alone(&e);
            drop(data);
            let alone = socket(free, buffer, false).map_err(device)?;
            return Ok(Underlay {
                data: alone.into(),
                handshakes: None,
            });
        }
        // Until it is bound, the program's 1 names no socket, and the kernel gives all
        // to `data`.
        let handshakes = match socket(free, buffer, true) {
            Ok(h) => Some(h.into()),
            Err(e) => {
                alone(&e);
                None
            }
        };
        tracing::info!(
            address = %free,
            index_tag = tag,
            handshake_socket = handshakes.is_some(),
            "underlay bound: data messages to this index tag on one socket, the rest on \
             the other"
        );
        Ok(Underlay {
            data: data.into(),
            handshakes,
        })
    }
}

/// Says that the underlay is one socket, because of `e`.
fn alone(e: &io::Error) {
    tracing::warn!(
        error = %e,
        "no separate socket for handshakes: a flood that fills the underlay socket drops \
         tunnel packets too"
    );
}

fn socket(addr: SocketAddr, buffer: usize, reuse_port: bool) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    crate::daemon::size_buffers(&s, buffer);
    s.set_nonblocking(true)?;
    s.set_reuse_port(reuse_port)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// The steering program: 0 (the first socket bound: data) for a datagram of at least 32
/// bytes whose first four are a transport-data message's type (4, little-endian) and
/// whose eighth (the receiver index's last) is `tag`; 1 otherwise. The program sees the
/// datagram from its UDP payload on; a load past its end returns 0, but the length is
/// checked first.
fn program(tag: u8) -> [libc::sock_filter; 8] {
    const fn op(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }
    use libc::{BPF_ABS, BPF_B, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_K, BPF_LD, BPF_LEN, BPF_RET, BPF_W};
    // Jump offsets count from the next instruction; `OTHER` is the last.
    [
        // 0: A = the payload's length; under 32 bytes: other.
        op(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),
        op(BPF_JMP | BPF_JGE | BPF_K, 0, 5, 32),
        // 2: A = its first four bytes, in network order: 04 00 00 00 is a data message.
        op(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, 0x0400_0000),
        // 4: A = the receiver index's last byte: the tag is this agent's.
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, 7),
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, tag as u32),
        // 6: data; 7: other.
        op(BPF_RET | BPF_K, 0, 0, 0),
        op(BPF_RET | BPF_K, 0, 0, 1),
    ]
}

/// Attaches [`program`] for `tag` to the reuse-port group of `s`.
fn steer(s: &socket2::Socket, tag: u8) -> io::Result<()> {
    let mut code = program(tag);
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `s` is an open socket for the call; `prog` points at `code`, eight valid
    // instructions that outlive the call, and the kernel copies them (it keeps no
    // pointer); the length passed is that of `prog`.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            std::ptr::addr_of!(prog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// What `s` received within `within` (non-blocking reads, bounded).
    fn received(s: &UdpSocket, within: Duration) -> Vec<Vec<u8>> {
        let (mut out, mut buf, end) = (Vec::new(), [0u8; 2048], Instant::now() + within);
        while Instant::now() < end {
            match s.recv(&mut buf) {
                Ok(n) => out.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("recv: {e}"),
            }
        }
        out
    }

    const TAG: u8 = 0x5c;

    /// A message of `len` bytes (at least 8) of type `kind` to receiver index tag `tag`.
    fn message(kind: u8, tag: u8, len: usize) -> Vec<u8> {
        let mut m = vec![0xa5u8; len];
        m[..4].copy_from_slice(&[kind, 0, 0, 0]);
        m[7] = tag;
        m
    }

    #[test]
    fn data_messages_to_this_agent_and_everything_else_reach_separate_sockets_on_one_port() {
        let u = Underlay::bind("127.0.0.1:0".parse().expect("addr"), 1 << 20, TAG).expect("bind");
        let hs = u
            .handshakes
            .as_ref()
            .expect("the kernel steers by program here");
        assert_eq!(
            u.data.local_addr().expect("addr"),
            hs.local_addr().expect("addr"),
            "one address and port"
        );
        let to = u.data.local_addr().expect("addr");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let data = [message(4, TAG, 32), message(4, TAG, 1452)];
        let other = [
            message(1, TAG, 148),    // handshake initiation
            message(2, TAG, 92),     // handshake response
            message(3, TAG, 64),     // cookie reply
            message(4, TAG, 31),     // a data header without room for its tag
            message(4, TAG ^ 1, 32), // a data message to another tag
            message(4, 0, 1452),     // and another
            vec![4, 0, 0, 1, 9],     // almost a data header
            vec![4, 0, 0],
            Vec::new(),
            b"junk that is no WireGuard message at all, long enough".to_vec(),
        ];
        for d in data.iter().chain(&other) {
            tx.send_to(d, to).expect("send");
        }
        let wait = Duration::from_millis(200);
        let (mut got_data, mut got_other) = (received(&u.data, wait), received(hs, wait));
        let (mut want_data, mut want_other) = (data.to_vec(), other.to_vec());
        for v in [
            &mut got_data,
            &mut got_other,
            &mut want_data,
            &mut want_other,
        ] {
            v.sort();
        }
        assert_eq!(got_data, want_data, "the data socket");
        assert_eq!(got_other, want_other, "the handshake socket");
    }

    #[test]
    fn a_flood_that_fills_the_handshake_socket_drops_no_data_message() {
        // Small buffers, a flood of initiations nobody reads, then data messages: every
        // one of them is there.
        let u = Underlay::bind("127.0.0.1:0".parse().expect("addr"), 64 << 10, TAG).expect("bind");
        let hs = u
            .handshakes
            .as_ref()
            .expect("the kernel steers by program here");
        let to = u.data.local_addr().expect("addr");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut init = vec![0u8; 148];
        init[0] = 1;
        for _ in 0..5_000 {
            let _ = tx.send_to(&init, to);
        }
        let mut data = message(4, TAG, 64);
        for k in 0..50u8 {
            data[4] = k;
            tx.send_to(&data, to).expect("send");
        }
        let got = received(&u.data, Duration::from_millis(200));
        assert_eq!(
            got.len(),
            50,
            "data messages lost behind a flood of handshakes"
        );
        let flood = received(hs, Duration::from_millis(200)).len();
        assert!(
            (1..5_000).contains(&flood),
            "the flood should have overflowed the handshake socket: {flood} of 5000 queued"
        );
    }

    #[test]
    fn a_port_that_another_socket_holds_is_refused_with_or_without_reuse_port() {
        let plain = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let at = plain.local_addr().expect("addr");
        let e = Underlay::bind(at, 1 << 16, TAG).expect_err("a held port");
        assert!(e.to_string().contains(&at.to_string()), "{e}");
        let shared = socket("127.0.0.1:0".parse().expect("addr"), 1 << 16, true).expect("bind");
        let at = shared
            .local_addr()
            .expect("addr")
            .as_socket()
            .expect("an IP address");
        Underlay::bind(at, 1 << 16, TAG).expect_err("a port held with SO_REUSEPORT");
        // Free again, it is taken.
        drop((plain, shared));
        let u = Underlay::bind(at, 1 << 16, TAG).expect("a free port");
        assert_eq!(u.data.local_addr().expect("addr"), at);
    }
}
