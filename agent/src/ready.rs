//! How the data plane waits for packets: one level-triggered epoll set over the TUN
//! device, the underlay sockets (data, and handshakes: see [`crate::underlay`]), a
//! [`Waker`] (an eventfd) for the control side's calls and a ticker (a periodic timerfd)
//! for the timers.
//!
//! The ticker, not a timeout, ends a wait for the timers: a timeout arms and cancels a
//! kernel timer on every sleep, once per sparse packet (about 2% of an echo's CPU in the
//! agent, measured), while the ticker's timer is armed once.
//!
//! Level-triggered, a source that still holds packets is reported again by the next wait,
//! so the loop may stop reading it before a read finds it empty: a sparse packet costs the
//! read that finds it, and no read that finds the queue empty (edge-triggered, as mio's
//! epoll is, the loop must read until one does, or a packet left behind waits for the
//! next one to arrive).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{EventfdFlags, epoll};
use rustix::time::{
    Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, timerfd_create,
    timerfd_settime,
};

const TUN: u64 = 0;
const UDP: u64 = 1;
const WAKER: u64 = 2;
const TICKER: u64 = 3;
const HANDSHAKES: u64 = 4;

/// What a wait found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    /// The TUN device has packets.
    pub tun: bool,
    /// The data socket has datagrams.
    pub udp: bool,
    /// The handshake socket has datagrams.
    pub handshakes: bool,
    /// The ticker expired (once or more) since the last wait that said so.
    pub tick: bool,
}

/// The epoll set.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
    waker: Arc<Waker>,
    ticker: OwnedFd,
}

impl Epoll {
    /// A set over `tun`, `udp` and `handshakes` if given (all non-blocking), with a
    /// ticker every `tick` (from now), and its waker.
    pub fn new<S: AsFd>(
        tun: impl AsFd,
        udp: impl AsFd,
        handshakes: Option<S>,
        tick: Duration,
    ) -> io::Result<(Epoll, Arc<Waker>)> {
        let fd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let waker = Arc::new(Waker {
            fd: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
        });
        let ticker = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        // A zero interval would disarm the timer: the timers would never run.
        let every = Timespec::try_from(tick)
            .ok()
            .filter(|_| !tick.is_zero())
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "tick zero or out of range")
            })?;
        timerfd_settime(
            &ticker,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: every,
                it_value: every,
            },
        )?;
        for (source, token) in [
            (tun.as_fd(), TUN),
            (udp.as_fd(), UDP),
            (waker.fd.as_fd(), WAKER),
            (ticker.as_fd(), TICKER),
        ]
        .into_iter()
        .chain(handshakes.as_ref().map(|h| (h.as_fd(), HANDSHAKES)))
        {
            epoll::add(
                &fd,
                source,
                epoll::EventData::new_u64(token),
                epoll::EventFlags::IN,
            )?;
        }
        let waker2 = Arc::clone(&waker);
        Ok((Epoll { fd, waker, ticker }, waker2))
    }

    /// Waits for packets, a wake-up or a tick, or up to `timeout` if one is given (an
    /// interrupted wait finds nothing).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Ready> {
        let mut events = [epoll::Event {
            flags: epoll::EventFlags::empty(),
            data: epoll::EventData::new_u64(0),
        }; 5];
        let timeout = timeout.map(|t| {
            Timespec::try_from(t).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            })
        });
        let n = match epoll::wait(&self.fd, &mut events, timeout.as_ref()) {
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => 0,
            Err(e) => return Err(e.into()),
        };
        let mut ready = Ready::default();
        for e in events.iter().take(n) {
            match e.data.u64() {
                TUN => ready.tun = true,
                UDP => ready.udp = true,
                HANDSHAKES => ready.handshakes = true,
                // Level-triggered: the counters are read, or every wait would find them.
                TICKER => {
                    ready.tick = true;
                    reset(&self.ticker);
                }
                _ => reset(&self.waker.fd),
            }
        }
        Ok(ready)
    }
}

/// Wakes the loop from its wait (from any thread).
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// Makes the loop's current or next wait return.
    pub fn wake(&self) -> io::Result<()> {
        match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            // A full counter is a wake-up pending already.
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Reads a counter (the waker's eventfd, the ticker's timerfd) back to zero.
fn reset(counter: impl AsFd) {
    let mut count = [0u8; 8];
    // Nothing to read (another wait reset it first) is as good.
    let _ = rustix::io::read(counter, &mut count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn pair() -> (UdpSocket, UdpSocket) {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        a.set_nonblocking(true).expect("non-blocking");
        (a, b)
    }

    #[test]
    fn a_source_left_unread_is_reported_again() {
        // The "TUN device" is a second socket here: what matters is the level.
        let (tun, tun_tx) = pair();
        let (udp, _) = pair();
        let (hs, _) = pair();
        let (ep, _waker) =
            Epoll::new(&tun, &udp, Some(&hs), Duration::from_secs(3600)).expect("epoll");
        let idle = ep.wait(Some(Duration::from_millis(1))).expect("wait");
        assert_eq!(idle, Ready::default());
        for _ in 0..2 {
            tun_tx
                .send_to(b"x", tun.local_addr().expect("addr"))
                .expect("send");
        }
        let first = ep.wait(Some(Duration::from_secs(1))).expect("wait");
        assert!(first.tun && !first.udp, "{first:?}");
        let mut b = [0u8; 8];
        tun.recv(&mut b).expect("first datagram");
        // One datagram is left: level-triggered, the next wait says so at once.
        let again = ep.wait(Some(Duration::from_secs(1))).expect("wait");
        assert!(again.tun, "{again:?}");
        tun.recv(&mut b).expect("second datagram");
        let drained = ep.wait(Some(Duration::from_millis(1))).expect("wait");
        assert!(!drained.tun, "{drained:?}");
        // The handshake socket is a source of its own.
        tun_tx
            .send_to(b"h", hs.local_addr().expect("addr"))
            .expect("send");
        let h = ep.wait(Some(Duration::from_secs(1))).expect("wait");
        assert!(h.handshakes && !h.udp && !h.tun, "{h:?}");
    }

    #[test]
    fn the_ticker_ends_a_wait_without_a_timeout_once_per_tick() {
        let (tun, _) = pair();
        let (udp, _) = pair();
        let tick = Duration::from_millis(40);
        // Bounded waits (a broken ticker fails the test, never hangs it), and only the
        // bounds the kernel guarantees (a slow machine delays a wait's return, never
        // hastens it).
        let bound = Some(Duration::from_secs(5));
        let start = std::time::Instant::now();
        let (ep, _waker) = Epoll::new(&tun, &udp, None::<&UdpSocket>, tick).expect("epoll");
        let first = ep.wait(bound).expect("wait");
        assert_eq!(
            first,
            Ready {
                tick: true,
                ..Ready::default()
            },
            "the first tick ended the wait"
        );
        assert!(start.elapsed() >= tick, "not before the first tick");
        // Reported once: the next wait ends at the second tick, not at once.
        assert!(ep.wait(bound).expect("wait").tick, "the second tick");
        assert!(start.elapsed() >= tick * 2, "not before the second tick");
        // Ticks missed while the loop ran are one report, not a burst of them: two ticks
        // pass, then two waits see one. (A third tick, not before `created + 900 ms`,
        // could end the second wait only on a machine stalled that long.)
        let created = std::time::Instant::now();
        let (slow, _waker) =
            Epoll::new(&tun, &udp, None::<&UdpSocket>, Duration::from_millis(300)).expect("epoll");
        std::thread::sleep(Duration::from_millis(650));
        assert!(slow.wait(Some(Duration::ZERO)).expect("wait").tick);
        let next = slow.wait(Some(Duration::ZERO)).expect("wait");
        assert!(
            !next.tick || created.elapsed() >= Duration::from_millis(900),
            "the missed ticks were reported once"
        );
    }

    #[test]
    fn a_zero_tick_is_refused_rather_than_a_ticker_that_never_ticks() {
        let (tun, _) = pair();
        let (udp, _) = pair();
        let e =
            Epoll::new(&tun, &udp, None::<&UdpSocket>, Duration::ZERO).expect_err("a zero tick");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn a_wake_up_ends_one_wait_and_is_not_seen_again() {
        let (tun, _) = pair();
        let (udp, _) = pair();
        let (ep, waker) =
            Epoll::new(&tun, &udp, None::<&UdpSocket>, Duration::from_secs(3600)).expect("epoll");
        let w = Arc::clone(&waker);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w.wake().expect("wake");
        });
        let start = std::time::Instant::now();
        let r = ep.wait(Some(Duration::from_secs(5))).expect("wait");
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "the wake-up ended the wait"
        );
        assert_eq!(r, Ready::default());
        t.join().expect("waker thread");
        // Twice before a wait: one wake-up, reset by the wait that saw it.
        waker.wake().expect("wake");
        waker.wake().expect("wake");
        ep.wait(Some(Duration::from_secs(1))).expect("wait");
        let start = std::time::Instant::now();
        ep.wait(Some(Duration::from_millis(50))).expect("wait");
        assert!(
            start.elapsed() >= Duration::from_millis(40),
            "a reset waker does not end the next wait"
        );
    }
}
