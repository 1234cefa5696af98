//! The driver of the data plane: one thread that owns the TUN device, the underlay socket
//! and the [`Plane`], and moves packets between them in batches (the techniques of
//! wireguard-go's Linux data path). It is the plane's only caller: the control side
//! reaches the plane through a [`PlaneHandle`], whose calls run on this thread between
//! batches.
//!
//! - The TUN device is opened with a virtio-net header and TSO/USO offloads: one read can
//!   be a 64 KiB TCP or UDP super-packet, which tun-rs splits into MTU-sized packets.
//! - Packets encrypted for the same peer with the same size leave in one `sendmsg` with
//!   UDP GSO (quinn-udp), up to 64 KiB at a time.
//! - The socket is read with `recvmmsg` and UDP GRO (quinn-udp); what is decrypted is
//!   written to the TUN device coalesced back into super-packets (tun-rs's GRO table).
//!   Handshake messages and junk come on a socket of their own ([`crate::underlay`]),
//!   read after the data socket in each round: a flood that fills it drops none of the
//!   tunnels' packets. While a source stays undrained, the loop asks epoll (without
//!   waiting) what else is ready, in every round a handshake flood leaves undrained and
//!   every [`RECHECK_EVERY`] rounds otherwise, so that no source that never drains (a
//!   flood, a bulk sender) keeps the loop from the others.
//! - Waking: the loop reads only what epoll (level-triggered, see [`crate::ready`])
//!   reported ready. It reads a source until a read finds it empty while packets are
//!   dense; sparse ones come one at a time, so a packet that wakes the thread costs the
//!   read that finds it and the send, and no read that finds the queue empty.
//! - Polling, as NAPI does: a thread asleep in `epoll_wait` pays a wake-up for each
//!   batch of packets. Only while the tunnels' packets (from the TUN device, and
//!   datagrams that decrypted and were delivered, forwarded or dropped by the catalog,
//!   whose limiters judge their timing) come closer than [`POLL_GAP`] on average does the
//!   loop keep polling, for [`POLL_FOR`] after the last one, before it sleeps; sparse
//!   traffic (an echo every 10 ms, keep-alives, 20,000 small packets a second) never
//!   polls, nor does a flood of junk or forged handshakes, which polling would serve
//!   nobody (it made each junk datagram of a flood cost 7.1-9.3 us of CPU, against
//!   5.7-6.6 us read as epoll reports it). Measured on a 2-core VM: polling after each
//!   send into a tunnel cost 2.4 times the CPU of waking at 100 echoes a second, and
//!   polling at 20,000 packets a second 3.4 times, for no lower round-trip time. With [`Polling::Busy`] (an
//!   operator's choice for a VNF that owns a core, as DPDK data planes do) it does not
//!   sleep while packets flow: no wake-up on any packet, at the price of a whole core;
//!   after [`BUSY_IDLE`] without a packet it sleeps until the next one. While it polls
//!   without packets it passes an echo and its reply between two planes of its own every
//!   [`WARM_EVERY`] ([`Warmer`]), so the next real packet finds the per-packet code in
//!   the caches: on the 2-core VM, an echo's time in the agent from the socket read to
//!   the TUN write went from 21 to 8 us, and from the TUN read to the send from 9.5 to
//!   6 us (under `perf` tracing of the system calls).
//! - Priority: with a real-time priority (`realtime_priority`; a gateway's default), the
//!   thread runs `SCHED_FIFO` under load, ahead of every ordinary task, as the kernel's
//!   receive path and `act_police` run in softirq ahead of them. Its limiters count time:
//!   a thread that is runnable but kept off the CPU for longer than a rule's burst lets
//!   less than the rule's rate through (the tokens of the time away are lost), and one
//!   that delivers late delivers in bunches. Under load means packets closer than
//!   [`REALTIME_GAP`] on average, a limiter dropping packets (its timing matters then
//!   whatever the rate), or the thread busy: awake for [`REALTIME_BUSY`] without sleeping
//!   [`REALTIME_REST`] in all (running, or kept waiting: the time a woken real-time
//!   thread waits for a CPU, from `/proc/thread-self/schedstat`, is not sleep). It goes
//!   back to ordinary scheduling after [`REALTIME_LINGER`] without load: for sparse
//!   traffic the ordinary scheduler wakes the thread on the CPU of its waker (the
//!   packet's), where the real-time one keeps it on its own CPU and pays a cross-CPU
//!   wake-up per packet (measured through the gateway: about 60 us of a 550 us RTT).
//!   A real-time thread that is busy rests in the first [`REALTIME_REST`] of every
//!   [`REALTIME_GRID`] of the machine's monotonic clock, so a flood cannot starve the
//!   other tasks of its CPU (the agent's control plane among them), however many
//!   real-time agents share it: they all rest at the same moments. It does not poll (a
//!   wake-up pre-empts ordinary tasks at once), and waits for a full socket buffer by
//!   sleeping, not yielding (`sched_yield` lets no ordinary task run).
//! - Batch: without a priority, a VNF's thread runs `SCHED_BATCH` under load (the same
//!   test and way back, but a limiter dropping is no load here: a trickle of oversized
//!   packets would hold it batch), where a wake-up does not pre-empt the task that woke it.
//!   Ordinary, each packet of a sender's burst woke the thread at once on the sender's
//!   CPU and it ran for that one packet: at 19.5 kpps of 64-byte UDP in bursts of about
//!   4, 6,200 wake-ups a second with a packet each; as a batch task it ran when the
//!   sender yielded, with the burst queued (3,200 wake-ups, about 6 packets each) and
//!   about half the CPU (the two agents 171 ms a second against 348 in `asmn-lab eval
//!   --quick`, boringtun-cli 235 and 294 in the same runs). The price: a
//!   packet that comes while its CPU runs another task waits for that task to sleep or
//!   for the tick (up to 4 ms at HZ=250); sparse traffic, which stays ordinary, never
//!   pays it. Not a gateway's (its limiters count time: real-time, or ordinary) nor a
//!   busy-polling thread's (it does not sleep while packets flow).

use std::io;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::DefaultClock;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice};

use crate::dataplane::{Ask, Outbox, PACKET, Plane, PlaneStats, Sends, TUN_HEADER, Warmer};
use crate::ready::{Epoll, Waker};
use crate::underlay::Underlay;

/// Largest datagram (a GRO batch) read from the socket.
const DATAGRAM: usize = 65_536;
/// Packets closer together than this on average (over 50,000 a second) are polled for
/// rather than waited for: a wake-up costs the CPU more than the gap.
pub const POLL_GAP: Duration = Duration::from_micros(20);
/// How long the loop polls after the last packet of dense traffic before it sleeps (as
/// Linux's `busy_poll`): under a flood this keeps a gateway on its CPU, where sleeping
/// and waking would bunch the packets its limiters judge.
pub const POLL_FOR: Duration = Duration::from_micros(200);
/// How often [`Polling::Busy`] passes an echo between its warm-up planes while it polls
/// without packets (see [`Warmer`]; for the cryptography alone, every 100-200 us measured
/// best here, every 1 ms kept less of it warm).
pub const WARM_EVERY: Duration = Duration::from_micros(200);
/// How long [`Polling::Busy`] keeps polling after the last packet.
pub const BUSY_IDLE: Duration = Duration::from_secs(1);
/// The plane's timers run this often (boringtun's own device ticks at 250 ms too):
/// WireGuard's timers are seconds apart, and each tick wakes an idle data plane (about
/// 100 us of CPU on a 2-core VM, where 100 ms ticks cost an idle agent 1 ms a second).
pub const TICK: Duration = Duration::from_millis(250);
/// While the loop polls, it reads the handshake socket once in this many turns (it polls
/// for packets; a handshake can wait a few microseconds).
const HANDSHAKE_POLL_EVERY: u32 = 8;
/// While a source stays undrained, the loop asks epoll (without waiting) what else is
/// ready once in this many rounds: a source that never drains (a flood, a bulk sender)
/// keeps the loop from the others no longer than that.
const RECHECK_EVERY: u32 = 8;
/// Messages (each up to 64 datagrams with GRO) the loop reads from the handshake socket in
/// a round: a flood that outruns the agent keeps that socket full, and a full batch of it
/// (up to 2,048 datagrams, milliseconds of checking) would hold the tunnel's packets back
/// for as long; one message is at most about 100 us of work between two looks at the
/// data socket.
const HANDSHAKE_BATCH: usize = 1;
/// Tries of a send that finds the socket's buffer full, before its batch is dropped.
const SEND_TRIES: usize = 200;
/// Calls from the control side handled per round (the rest wait for the next round).
const JOBS_PER_ROUND: usize = 64;

/// A packet rate as the loop sees it (of every datagram, or of the tunnels' packets
/// alone: see [`Io`]'s `rate` and `tunnel_rate`): when the last packet came, and the
/// average gap between packets.
#[derive(Debug, Clone, Copy)]
struct Rate {
    last: Instant,
    /// Exponentially weighted, each round by its number of packets.
    gap: Duration,
}

impl Rate {
    fn new(now: Instant) -> Rate {
        Rate {
            last: now,
            gap: Duration::from_secs(1),
        }
    }

    /// `packets` were handled in the round that started at `now`.
    fn count(&mut self, now: Instant, packets: usize) {
        if packets == 0 {
            return;
        }
        // A round weighs as much as its packets: one packet 1/8, a batch of 64 nine tenths.
        let n = u32::try_from(packets).unwrap_or(u32::MAX).min(1 << 16);
        let elapsed = now.saturating_duration_since(self.last);
        self.gap = (self.gap.saturating_mul(7).saturating_add(elapsed)) / (n + 7);
        self.last = now;
    }

    /// Whether packets come closer together than [`REALTIME_GAP`] on average.
    fn dense(&self) -> bool {
        self.gap < REALTIME_GAP
    }

    /// Until when to poll rather than sleep: for [`POLL_FOR`] after the last packet while
    /// the gaps between packets average under [`POLL_GAP`], not at all otherwise.
    fn poll_until(&self) -> Instant {
        if self.gap < POLL_GAP {
            self.last + POLL_FOR
        } else {
            self.last
        }
    }
}

/// A read of the TUN device that finds nothing is tried again only after this many writes.
const ANSWER_RETRY: u8 = 8;

/// Whether to read the TUN device right after writing to it, before sleeping. The kernel
/// answers some packets as they are written (an echo reply, a TCP ACK in quick-ack mode),
/// and reading the answer at once saves the wait that would report it; for sparse
/// request-response traffic, one system call of the three a packet and its answer cost.
/// A read that finds nothing costs one, so once one has, the loop tries again only every
/// [`ANSWER_RETRY`]th write (a VNF that only receives pays an eighth of a read per write).
#[derive(Debug, Default)]
struct Answers {
    /// The last read after a write found nothing.
    missed: bool,
    /// Writes since then.
    skipped: u8,
}

impl Answers {
    /// Whether to read after this write.
    fn expect(&mut self) -> bool {
        if !self.missed {
            return true;
        }
        self.skipped += 1;
        if self.skipped < ANSWER_RETRY {
            return false;
        }
        self.skipped = 0;
        true
    }

    /// The read after a write found packets, or not.
    fn found(&mut self, any: bool) {
        (self.missed, self.skipped) = (!any, 0);
    }
}

/// A wait that returns sooner than this did not sleep: what it reports was there before it.
const AT_ONCE: Duration = Duration::from_micros(10);

/// Whether a round reads the TUN device once and leaves what is left to epoll
/// (level-triggered, it reports a packet left behind): while packets are sparse they come
/// one at a time, and the read that finds one is the last, not a read that finds none.
/// Not when the wait found packets `queued` at once: a burst is read whole, in one round,
/// as the rate counts it (one round a packet would make it look dense).
fn one_read(rate: &Rate, queued: bool) -> bool {
    !queued && !rate.dense()
}

/// The plane as the agent runs it: its limiters on the system's clock.
pub type SystemPlane = Plane<DefaultClock>;

/// How the I/O thread waits for packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Polling {
    /// Sleep in `epoll_wait` when idle; poll only while the tunnels' packets come more
    /// than one per [`POLL_GAP`] on average (for [`POLL_FOR`] after the last).
    #[default]
    Adaptive,
    /// Poll the TUN device and the socket without pause while the tunnels' packets flow
    /// (a whole core); sleep after [`BUSY_IDLE`] without one (junk does not count).
    Busy,
}

type Job = Box<dyn FnOnce(&mut SystemPlane, Instant, &mut Outbox) + Send>;

/// The period of a real-time data plane's rests: while busy, it rests in the first
/// [`REALTIME_REST`] of every period of the machine's monotonic clock. The other tasks of
/// its CPU (the agent's control plane: revocations, catalog changes, Sec-EM's keep-alives;
/// the VNF itself) get that tenth of it, in slots this far apart, where the kernel would
/// leave them 5% (its fair server) in bursts up to a second apart.
pub const REALTIME_GRID: Duration = Duration::from_millis(10);
/// The rest. Packets wait in the socket meanwhile, and a limiter whose burst lasts
/// longer than this loses no tokens to it.
pub const REALTIME_REST: Duration = Duration::from_millis(1);
/// A data plane that has been awake this long without sleeping [`REALTIME_REST`] in all
/// is busy: it is under load, and rests while real-time.
pub const REALTIME_BUSY: Duration = Duration::from_millis(2);
/// Packets closer together than this on average (over 1,000 a second) are a load too:
/// traffic with a rate to police. Sparser traffic (echoes, keep-alives, 100 requests a
/// second) leaves the thread ordinary, where each packet's wake-up is cheaper.
pub const REALTIME_GAP: Duration = Duration::from_millis(1);
/// A real-time data plane goes back to ordinary scheduling after this long without load
/// (a short lull in a flood keeps it real-time).
pub const REALTIME_LINGER: Duration = Duration::from_millis(200);
/// How long a real-time data plane waits between tries of a send that found the socket's
/// buffer full (an ordinary one yields).
const REALTIME_SEND_WAIT: Duration = Duration::from_micros(20);
/// Packets of a batch between two checks whether the thread is busy (to go real-time)
/// or, real-time, due to rest (a check reads the clock). A debug build's agent spends
/// milliseconds on a few packets; with a check every 8, two real-time agents on one CPU
/// kept a thread beside them waiting up to 69 ms, every 4 up to 49.
const REST_CHECK: usize = 4;
/// The priority of a gateway's data plane when its configuration names none.
pub const GATEWAY_REALTIME: u8 = 10;

/// The real-time priority the data plane runs at: the configured one (0: none), or the
/// role's default, [`GATEWAY_REALTIME`] for a gateway that does not busy-poll.
pub fn realtime_for(
    configured: Option<u8>,
    role: asmn_shared::ids::Role,
    polling: Polling,
) -> Option<u8> {
    match configured {
        Some(0) => None,
        Some(p) => Some(p),
        None => (role == asmn_shared::ids::Role::Gateway && polling == Polling::Adaptive)
            .then_some(GATEWAY_REALTIME),
    }
}

/// How the data-plane thread runs under load (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderLoad {
    /// As it runs without load: `SCHED_OTHER` (a gateway without a real-time priority,
    /// whose limiters count time, and a busy-polling plane).
    Ordinary,
    /// `SCHED_BATCH`: its wake-ups do not pre-empt the task that woke it, so the packets
    /// of a burst are read together (a VNF's default).
    Batch,
    /// `SCHED_FIFO` at this priority.
    Realtime(u8),
}

/// How the data plane of `role` runs under load: real-time at the priority
/// [`realtime_for`] gives, if any; otherwise batch if `batch` allows, unless it
/// busy-polls (it does not sleep while packets flow) or is a gateway (its limiters count
/// time, and a batch thread woken on a busy CPU waits for the running task's slice to
/// end).
pub fn under_load(
    configured: Option<u8>,
    role: asmn_shared::ids::Role,
    polling: Polling,
    batch: bool,
) -> UnderLoad {
    match realtime_for(configured, role, polling) {
        Some(p) => UnderLoad::Realtime(p),
        None if batch
            && polling == Polling::Adaptive
            && role != asmn_shared::ids::Role::Gateway =>
        {
            UnderLoad::Batch
        }
        None => UnderLoad::Ordinary,
    }
}

/// Where the machine's monotonic clock is within the current [`REALTIME_GRID`]: the same
/// in every process, so every real-time data plane rests at the same moments.
fn grid_phase() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let ns = u128::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000
        + u128::try_from(t.tv_nsec).unwrap_or(0);
    let phase = ns % REALTIME_GRID.as_nanos();
    Duration::from_nanos(u64::try_from(phase).unwrap_or(0))
}

/// How the data plane is scheduled: ordinary, or real-time (or batch) under load; and
/// when a real-time one rests (see [`REALTIME_GRID`]).
#[derive(Debug)]
struct Schedule {
    /// The priority it may run at (`None`: never real-time).
    priority: Option<u8>,
    /// Whether it may run `SCHED_BATCH` under load (without a priority).
    batch: bool,
    /// A switch was refused: it stays as it is, and tries no more.
    frozen: bool,
    /// Whether it runs real-time now.
    realtime: bool,
    /// Whether it runs `SCHED_BATCH` now.
    batched: bool,
    /// Since when the thread has been awake (running, or runnable and waiting for a CPU)
    /// without sleeping [`REALTIME_REST`] in all.
    awake_since: Instant,
    /// What it slept since then, in naps too short to count alone.
    napped: Duration,
    /// When its last rest (or a sleep as long) ended.
    rested: Instant,
    /// When it was last under load, if ever.
    loaded_at: Option<Instant>,
    /// Real-time, up to when its time real-time is counted.
    counted_to: Instant,
}

/// A change of scheduling that [`Schedule::switch`] calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    Realtime(u8),
    Batch,
    Ordinary,
}

impl Schedule {
    fn new(priority: Option<u8>, now: Instant) -> Schedule {
        Schedule {
            priority,
            batch: false,
            frozen: false,
            realtime: false,
            batched: false,
            awake_since: now,
            napped: Duration::ZERO,
            rested: now,
            loaded_at: None,
            counted_to: now,
        }
    }

    /// The thread's loop starts at `now` (what it did since [`Schedule::new`] was set-up).
    fn started(&mut self, now: Instant) {
        (self.awake_since, self.rested, self.napped) = (now, now, Duration::ZERO);
    }

    /// The thread slept `d` (waiting for packets, not for a CPU) until `now`.
    fn slept(&mut self, d: Duration, now: Instant) {
        self.napped += d;
        if self.napped >= REALTIME_REST {
            (self.awake_since, self.rested, self.napped) = (now, now, Duration::ZERO);
        }
    }

    fn busy(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.awake_since) >= REALTIME_BUSY
    }

    /// The thread is under load at `now`: dense packets, or a limiter dropping.
    fn load(&mut self, now: Instant) {
        self.loaded_at = Some(now);
    }

    /// Whether it may change its scheduling at all.
    fn switches(&self) -> bool {
        !self.frozen && (self.priority.is_some() || self.batch)
    }

    /// The change of scheduling due at `now`, if any (the caller makes it and reports it
    /// with [`Schedule::switched`]): real-time (or batch) under load (see
    /// [`Schedule::load`], or busy), ordinary after [`REALTIME_LINGER`] without.
    fn switch(&mut self, now: Instant) -> Option<Switch> {
        if !self.switches() {
            return None;
        }
        if self.busy(now) {
            self.load(now);
        }
        let loaded = self
            .loaded_at
            .is_some_and(|t| now.saturating_duration_since(t) < REALTIME_LINGER);
        let ordinary = !self.realtime && !self.batched;
        match (loaded, self.priority) {
            (true, Some(p)) if !self.realtime => Some(Switch::Realtime(p)),
            (true, None) if ordinary => Some(Switch::Batch),
            (false, _) if !ordinary => Some(Switch::Ordinary),
            _ => None,
        }
    }

    /// The thread made `switch` at `now`, or could not.
    fn switched(&mut self, switch: Switch, made: bool, now: Instant) {
        match (switch, made) {
            (Switch::Realtime(_), true) => {
                (self.realtime, self.batched, self.counted_to) = (true, false, now);
            }
            (Switch::Batch, true) => self.batched = true,
            (Switch::Ordinary, true) => (self.realtime, self.batched) = (false, false),
            // Refused: it stays as it is (real-time, it keeps resting) and tries no more.
            (_, false) => self.frozen = true,
        }
    }

    /// The time it ran real-time since the last call (call it before switching).
    fn realtime_time(&mut self, now: Instant) -> Duration {
        if !self.realtime {
            return Duration::ZERO;
        }
        let d = now.saturating_duration_since(self.counted_to);
        self.counted_to = now;
        d
    }

    /// How long to rest at `now`, `phase()` into the grid's period (read only when the
    /// thread is real-time and busy); `None`: not now.
    fn due(&self, now: Instant, phase: impl FnOnce() -> Duration) -> Option<Duration> {
        if !self.realtime || !self.busy(now) {
            return None;
        }
        let phase = phase();
        if phase < REALTIME_REST {
            return Some(REALTIME_REST - phase);
        }
        // One step of the loop ran across a whole slot: rest now, off the grid.
        (now.saturating_duration_since(self.rested) >= 2 * REALTIME_GRID).then_some(REALTIME_REST)
    }
}

/// What a round of the loop tells the schedule: `packets` handled in the round that
/// started at `round`, and whether a limiter dropped any since the last round.
fn end_round(
    rate: &mut Rate,
    schedule: &mut Schedule,
    round: Instant,
    packets: usize,
    limited: bool,
) {
    rate.count(round, packets);
    // A limiter dropping is a load for a real-time plane, whose limiters' timing matters
    // then; not for a batch one (a trickle of oversized packets from any peer would keep
    // it batch, and every sparse packet paying a batch thread's wait).
    if (packets > 0 && rate.dense()) || (limited && schedule.priority.is_some()) {
        schedule.load(round);
    }
}

/// The time the calling thread spent runnable but waiting for a CPU: the second field of
/// `/proc/thread-self/schedstat`, in nanoseconds. A nap in `epoll_wait` ends when the
/// thread is woken, not when it runs; what it waited for a CPU after is load, not sleep.
#[derive(Debug)]
struct RunDelay {
    file: Option<std::fs::File>,
    last: u64,
}

impl RunDelay {
    /// Opens the calling thread's counters (none where /proc does not have them: then
    /// every wait counts as sleep).
    fn open() -> RunDelay {
        let file = std::fs::File::open("/proc/thread-self/schedstat")
            .inspect_err(|e| {
                tracing::debug!(error = %e, "no /proc/thread-self/schedstat: waits for a CPU go uncounted");
            })
            .ok();
        let mut d = RunDelay { file, last: 0 };
        d.grown();
        d
    }

    /// How much longer the thread has waited for a CPU since the last call.
    fn grown(&mut self) -> Duration {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.file else {
            return Duration::ZERO;
        };
        let mut buf = [0u8; 96];
        let n = f.read_at(&mut buf, 0).unwrap_or(0);
        let now = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok());
        let Some(now) = now else {
            return Duration::ZERO;
        };
        let d = now.saturating_sub(self.last);
        self.last = now;
        Duration::from_nanos(d)
    }
}

/// The real-time priorities `realtime_priority` accepts (`SCHED_FIFO`'s range).
pub const REALTIME_RANGE: std::ops::RangeInclusive<u8> = 1..=99;

/// What the data plane found when it tried `SCHED_FIFO` at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trial {
    /// Granted, and back to ordinary scheduling: it switches under load.
    Allowed,
    /// Refused: ordinary scheduling only.
    Refused,
    /// Granted, but ordinary scheduling refused after: it stays real-time (and rests).
    Stuck,
}

/// Tries `SCHED_FIFO` at `priority` on the calling thread, and goes back to ordinary
/// scheduling (logged either way).
fn try_realtime(priority: u8) -> Trial {
    if let Err(e) = crate::sched::run_fifo(priority) {
        tracing::warn!(
            priority,
            error = %e,
            "the data plane runs at ordinary priority: SCHED_FIFO was refused (it needs \
             CAP_SYS_NICE, or an RLIMIT_RTPRIO of at least the priority: systemd's \
             LimitRTPRIO= without RestrictRealtime=); under load its limiters can pass \
             less than their rates"
        );
        return Trial::Refused;
    }
    if let Err(e) = crate::sched::run_ordinary() {
        tracing::error!(
            priority,
            error = %e,
            "the data plane got SCHED_FIFO but cannot go back to ordinary scheduling: it \
             stays real-time, resting while busy"
        );
        return Trial::Stuck;
    }
    tracing::info!(
        priority,
        "the data plane takes real-time priority (SCHED_FIFO) under load"
    );
    Trial::Allowed
}

/// The data plane thread is gone (stopped, or failed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the data plane has stopped")]
pub struct PlaneGone;

/// The control side's way to the plane: each call runs on the driver's thread between
/// batches, and what it puts in the outbox is sent at once.
#[derive(Clone)]
pub struct PlaneHandle {
    jobs: Sender<Job>,
    waker: Arc<Waker>,
    stats: Arc<Mutex<PlaneStats>>,
    scheduling: Arc<Scheduling>,
    public: [u8; 32],
}

/// How the data-plane thread is scheduled, and how its underlay is split, for the metrics
/// (see [`SchedulingStats`]).
#[derive(Debug, Default)]
struct Scheduling {
    realtime_priority: std::sync::atomic::AtomicU8,
    realtime: AtomicBool,
    realtime_entries: std::sync::atomic::AtomicU64,
    realtime_nanos: std::sync::atomic::AtomicU64,
    batch: AtomicBool,
    batch_entries: std::sync::atomic::AtomicU64,
    rests: std::sync::atomic::AtomicU64,
    warm_ups: std::sync::atomic::AtomicU64,
    split_underlay: AtomicBool,
    handshake_datagrams: std::sync::atomic::AtomicU64,
    polls: std::sync::atomic::AtomicU64,
}

/// How the data-plane thread is scheduled, and how its underlay is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulingStats {
    /// The `SCHED_FIFO` priority it takes under load (0: none: not configured, or
    /// refused).
    pub realtime_priority: u8,
    /// Whether it runs real-time now.
    pub realtime: bool,
    /// How often it went real-time.
    pub realtime_entries: u64,
    /// How long it ran real-time, in all (up to its last timer tick or switch).
    pub realtime_time: Duration,
    /// Whether it runs `SCHED_BATCH` now (see [`UnderLoad::Batch`]).
    pub batch: bool,
    /// How often it went `SCHED_BATCH` under load.
    pub batch_entries: u64,
    /// The rests it took (see [`REALTIME_GRID`]).
    pub rests: u64,
    /// The warm-up echoes it passed between planes of its own while busy polling without
    /// packets (see [`WARM_EVERY`]).
    pub warm_ups: u64,
    /// Whether handshakes and junk have a socket of their own (the kernel sorts tagged
    /// transport data to the other one; see [`crate::underlay`]), or everything shares one
    /// socket (the fallback where the kernel refused the steering program).
    pub split_underlay: bool,
    /// Datagrams read from the handshake socket: handshakes, cookie replies, and whatever
    /// does not look like the agent's own transport data.
    pub handshake_datagrams: u64,
    /// Turns it polled the TUN device and the socket rather than sleep: while the
    /// tunnels' packets are dense (see [`POLL_GAP`]), or with [`Polling::Busy`].
    pub polls: u64,
}

impl std::fmt::Debug for PlaneHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaneHandle").finish_non_exhaustive()
    }
}

impl PlaneHandle {
    /// Runs `f` on the plane (on the driver's thread) and returns what it returned.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SystemPlane, Instant, &mut Outbox) -> R + Send + 'static,
    ) -> Result<R, PlaneGone> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |plane, now, out| {
            let _ = tx.send(f(plane, now, out));
        });
        self.jobs.send(job).map_err(|_| PlaneGone)?;
        self.waker.wake().map_err(|_| PlaneGone)?;
        rx.await.map_err(|_| PlaneGone)
    }

    /// What the metrics show, taken now on the driver's thread (or, if the plane has
    /// stopped, as of its last timer tick).
    pub async fn stats(&self) -> PlaneStats {
        match self.call(|p, _, _| p.stats()).await {
            Ok(s) => s,
            Err(PlaneGone) => self.stats.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }

    /// This agent's WireGuard public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// How the data-plane thread is scheduled.
    pub fn scheduling(&self) -> SchedulingStats {
        let s = &self.scheduling;
        SchedulingStats {
            realtime_priority: s.realtime_priority.load(Ordering::Relaxed),
            realtime: s.realtime.load(Ordering::Relaxed),
            realtime_entries: s.realtime_entries.load(Ordering::Relaxed),
            realtime_time: Duration::from_nanos(s.realtime_nanos.load(Ordering::Relaxed)),
            batch: s.batch.load(Ordering::Relaxed),
            batch_entries: s.batch_entries.load(Ordering::Relaxed),
            rests: s.rests.load(Ordering::Relaxed),
            warm_ups: s.warm_ups.load(Ordering::Relaxed),
            split_underlay: s.split_underlay.load(Ordering::Relaxed),
            handshake_datagrams: s.handshake_datagrams.load(Ordering::Relaxed),
            polls: s.polls.load(Ordering::Relaxed),
        }
    }
}

/// The running driver thread.
#[derive(Debug)]
pub struct Driver {
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    failed: Option<tokio::sync::oneshot::Receiver<String>>,
}

impl Driver {
    /// Starts the thread that runs `plane` on `tun` and the `udp` sockets, scheduled as
    /// `under_load` says under load (see the module's notes). Verification requests go to
    /// `asks` (dropped, and asked again later, when it is full).
    pub fn start(
        plane: SystemPlane,
        tun: SyncDevice,
        udp: Underlay,
        polling: Polling,
        under_load: UnderLoad,
        asks: tokio::sync::mpsc::Sender<Ask>,
    ) -> io::Result<(Driver, PlaneHandle)> {
        let Underlay {
            data: udp,
            handshakes,
        } = udp;
        let udp_state = UdpSocketState::new((&udp).into())?;
        let handshakes = handshakes.and_then(|h| match UdpSocketState::new((&h).into()) {
            Ok(state) => Some((h, state)),
            Err(e) => {
                // Dropped: the group is the data socket alone, which then gets it all.
                tracing::warn!(error = %e, "no separate socket for handshakes");
                None
            }
        });
        tun.set_nonblocking(true)?;
        let (poll, waker) = Epoll::new(&tun, &udp, handshakes.as_ref().map(|h| &h.0), TICK)?;
        let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
        let stats = Arc::new(Mutex::new(plane.stats()));
        let scheduling = Arc::new(Scheduling::default());
        scheduling
            .split_underlay
            .store(handshakes.is_some(), Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = PlaneHandle {
            jobs: jobs_tx,
            waker: Arc::clone(&waker),
            stats: Arc::clone(&stats),
            scheduling: Arc::clone(&scheduling),
            public: plane.public_key(),
        };
        let max_segments = udp_state.max_gso_segments();
        let mut io = Io {
            plane,
            tun,
            udp,
            udp_state,
            handshakes,
            poll,
            jobs: jobs_rx,
            asks,
            stats,
            stop: Arc::clone(&stop),
            polling,
            rate: Rate::new(Instant::now()),
            tunnel_rate: Rate::new(Instant::now()),
            run_delay: None,
            limited: 0,
            wrote_tun: false,
            answers: Answers::default(),
            warmer: match polling {
                Polling::Busy => {
                    let now = Instant::now();
                    match Warmer::new(now, &mut rand::rng(), DefaultClock::default()) {
                        Ok(w) => Some((w, now)),
                        Err(e) => {
                            tracing::warn!(error = %e, "busy polling runs without warm-ups");
                            None
                        }
                    }
                }
                Polling::Adaptive => None,
            },
            schedule: Schedule::new(None, Instant::now()),
            scheduling,
            b: Buffers {
                tun_raw: vec![0; TUN_HEADER + DATAGRAM],
                tun_in: vec![vec![0; PACKET]; IDEAL_BATCH_SIZE],
                tun_sizes: vec![0; IDEAL_BATCH_SIZE],
                gro: GROTable::default(),
                udp_in: vec![vec![0; DATAGRAM]; quinn_udp::BATCH_SIZE],
                metas: vec![RecvMeta::default(); quinn_udp::BATCH_SIZE],
                out: Outbox::new(IDEAL_BATCH_SIZE, max_segments),
            },
        };
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("asmn-dataplane".into())
            .spawn(move || {
                match under_load {
                    UnderLoad::Realtime(p) => io.take_priority(p, try_realtime(p)),
                    UnderLoad::Batch => io.schedule.batch = true,
                    UnderLoad::Ordinary => {}
                }
                let r = io.run();
                if let Err(e) = &r {
                    let _ = failed_tx.send(e.to_string());
                }
                // The plane drops here, on its own thread: every tunnel and key with it.
                drop(io);
                r
            })?;
        Ok((
            Driver {
                thread: Some(thread),
                stop,
                waker,
                failed: Some(failed_rx),
            },
            handle,
        ))
    }

    /// Resolves with the error if the thread fails (never if it is stopped).
    pub async fn failed(&mut self) -> String {
        match self.failed.take() {
            Some(rx) => match rx.await {
                Ok(e) => e,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Stops the thread and waits for it: the plane, its tunnels and keys, the socket and
    /// the TUN device are gone when this returns.
    pub fn stop(mut self) -> io::Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("the data plane thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// Whether busy polling without packets is due a warm-up at `now`: [`WARM_EVERY`] since
/// the last one and since the last packet of a tunnel (which warmed the same code; junk
/// runs none of it).
fn warm_due(now: Instant, last_warm: Instant, last_packet: Instant) -> bool {
    now.saturating_duration_since(last_warm.max(last_packet)) >= WARM_EVERY
}

/// The time to handle a round's socket batch at: the round's own time (no clock read),
/// unless the round handled `before` packets first, which may have taken long (a batch of
/// TUN packets, sends that retried a full buffer, a real-time rest): then `now`.
fn batch_time(round: Instant, before: usize, now: impl FnOnce() -> Instant) -> Instant {
    if before > 0 { now().max(round) } else { round }
}

/// The buffers of the loop, allocated once.
struct Buffers {
    /// A raw TUN read: virtio-net header and a packet or super-packet.
    tun_raw: Vec<u8>,
    /// The packets of TUN reads, split.
    tun_in: Vec<Vec<u8>>,
    tun_sizes: Vec<usize>,
    gro: GROTable,
    /// Socket reads (each may hold several GRO-coalesced datagrams).
    udp_in: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
    out: Outbox,
}

struct Io {
    plane: SystemPlane,
    tun: SyncDevice,
    udp: UdpSocket,
    udp_state: UdpSocketState,
    /// The socket for everything but transport data, where the kernel steers it.
    handshakes: Option<(UdpSocket, UdpSocketState)>,
    poll: Epoll,
    jobs: Receiver<Job>,
    asks: tokio::sync::mpsc::Sender<Ask>,
    stats: Arc<Mutex<PlaneStats>>,
    stop: Arc<AtomicBool>,
    polling: Polling,
    /// The packet rate, every datagram counted (for the real-time priority, and for
    /// reading the TUN device once or until drained).
    rate: Rate,
    /// The rate of the tunnels' packets alone (what the TUN device gave, and datagrams
    /// that decrypted in a tunnel): what polling is for. Junk and forged handshakes do
    /// not count, or a flood of them would keep the loop polling for nobody.
    tunnel_rate: Rate,
    /// Its waits for a CPU (with a real-time priority only; read per wake-up while
    /// real-time).
    run_delay: Option<RunDelay>,
    /// What [`SystemPlane::limited`] said at the end of the last round.
    limited: u64,
    /// Whether the last flush wrote to the TUN device.
    wrote_tun: bool,
    /// Whether the kernel answers what is written to the TUN device at once.
    answers: Answers,
    /// With [`Polling::Busy`]: what keeps the per-packet code warm while it polls, and
    /// when it last ran.
    warmer: Option<(Warmer<DefaultClock>, Instant)>,
    /// Whether the thread runs under `SCHED_FIFO`, and when it rests.
    schedule: Schedule,
    /// The same, for the metrics.
    scheduling: Arc<Scheduling>,
    b: Buffers,
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

/// Sends every group of `sends`; the number of datagrams that could not be sent.
fn send_all(
    sends: &mut Sends,
    max_segments: usize,
    mut send: impl FnMut(&Transmit<'_>) -> io::Result<()>,
    wait: impl Fn(),
) -> u64 {
    let mut lost = 0;
    // Once a group has found the buffer full SEND_TRIES times, the rest of the batch is
    // dropped at once: a buffer that stays full drains no faster for being retried.
    let mut stuck = false;
    let (groups, arena) = sends.groups();
    for g in groups {
        let t = Transmit {
            destination: g.to,
            ecn: None,
            contents: &arena[g.start..g.start + g.len],
            segment_size: (g.len > g.segment).then_some(g.segment),
            src_ip: None,
        };
        let tries = if stuck { 1 } else { SEND_TRIES };
        let (mut sent, mut full) = (false, false);
        for attempt in 1..=tries {
            match send(&t) {
                Ok(()) => {
                    sent = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    full = true;
                    if attempt < tries {
                        wait();
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, to = %g.to, "underlay send failed");
                    full = false;
                    break;
                }
            }
        }
        if !sent {
            lost += g.len.div_ceil(g.segment) as u64;
            stuck |= full;
        }
    }
    sends.clear(max_segments);
    lost
}

impl Io {
    fn run(&mut self) -> io::Result<()> {
        tracing::info!(
            tun_offload = self.tun.tcp_gso(),
            udp_gso_segments = self.udp_state.max_gso_segments(),
            udp_gro_segments = self.udp_state.gro_segments(),
            polling = ?self.polling,
            realtime_priority = self.schedule.priority,
            batch_under_load = self.schedule.batch,
            "data plane I/O running"
        );
        // What to read in the next round: what epoll (level-triggered) reported, and what
        // the last round did not finish.
        let (mut tun_ready, mut udp_ready) = (true, true);
        let mut hs_ready = self.handshakes.is_some();
        // Turns of polling, for [`HANDSHAKE_POLL_EVERY`].
        let mut polls = 0u32;
        // Rounds in a row that left a source undrained, for [`RECHECK_EVERY`].
        let mut undrained = 0u32;
        // Whether the next TUN read looks for an answer to what was written (see
        // [`Answers`]).
        let mut probing = false;
        // Whether the last wait found TUN packets at once (see [`one_read`]).
        let mut queued = false;
        let started = Instant::now();
        let mut next_tick = started + TICK;
        // Awake from here: the thread's start-up is not a load.
        self.schedule.started(started);
        // Whether the last wait saw the ticker expire (the timers' turn while the loop
        // sleeps; while it runs, `next_tick` says when).
        let mut ticked = false;
        // When the last wait ended: the next round's time (each clock read after a system
        // call costs a few hundred nanoseconds here, cold).
        let mut woke_at = None;
        while !self.stop.load(Ordering::Acquire) {
            self.reschedule(woke_at)?;
            let round = match woke_at.take() {
                Some(t) if !self.schedule.realtime => t,
                _ => Instant::now(),
            };
            // The ticker's report is spent here either way (or timers could run twice in
            // a row, on the report and on the time).
            let tick = std::mem::take(&mut ticked);
            if tick || round >= next_tick {
                self.plane.handle_timers(round, &mut self.b.out);
                self.flush()?;
                self.publish();
                self.count_realtime(round);
                next_tick = round + TICK;
            }
            let jobs_left = self.run_jobs(round)?;
            let mut packets = 0;
            let (authenticated, mut tun_packets) = (self.plane.authenticated(), 0);
            if tun_ready {
                let (n, drained) = self.tun_round(round, one_read(&self.rate, queued))?;
                packets += n;
                tun_packets = n;
                tun_ready = !drained;
                if std::mem::take(&mut probing) {
                    self.answers.found(n > 0);
                }
            }
            if udp_ready {
                self.wrote_tun = false;
                let at = batch_time(round, packets, Instant::now);
                let (n, drained) = self.udp_round(at, false)?;
                packets += n;
                udp_ready = !drained;
                // What was written to the TUN device may have been answered as it was:
                // read the answer now rather than sleep to be told of it.
                if std::mem::take(&mut self.wrote_tun)
                    && !tun_ready
                    && !self.rate.dense()
                    && self.answers.expect()
                {
                    (tun_ready, probing) = (true, true);
                }
            }
            if hs_ready {
                let (n, drained) = self.udp_round(Instant::now(), true)?;
                packets += n;
                hs_ready = !drained;
                self.scheduling
                    .handshake_datagrams
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            self.hand_out_asks();
            let tunnel_packets = tun_packets
                + usize::try_from(self.plane.authenticated() - authenticated).unwrap_or(0);
            self.tunnel_rate.count(round, tunnel_packets);
            let limited = self.plane.limited();
            end_round(
                &mut self.rate,
                &mut self.schedule,
                round,
                packets,
                limited != self.limited,
            );
            self.limited = limited;
            if tun_ready || udp_ready || hs_ready || jobs_left {
                // Left for the next round. What was drained is read again only when epoll
                // says so: ask it, without waiting, in every round a handshake flood
                // leaves undrained and every few rounds of other work (or a source that
                // never drains would keep the loop from the others).
                undrained = undrained.wrapping_add(1);
                if hs_ready || undrained.is_multiple_of(RECHECK_EVERY) {
                    let r = self.poll.wait(Some(Duration::ZERO))?;
                    tun_ready |= r.tun;
                    udp_ready |= r.udp;
                    hs_ready |= r.handshakes;
                    ticked |= r.tick;
                }
                continue;
            }
            undrained = 0;
            let poll_until = match self.polling {
                Polling::Busy => self.tunnel_rate.last + BUSY_IDLE,
                Polling::Adaptive => self.tunnel_rate.poll_until(),
            };
            // A real-time thread does not poll: its wake-up pre-empts ordinary tasks. Nor
            // is there anything to poll for if the polling ended before the round began
            // (sparse packets, whose last came in this round: no clock read then).
            if !self.schedule.realtime && poll_until > round {
                let polled = Instant::now();
                if polled < poll_until {
                    // Polling, not woken by epoll: both sources are read on the next round
                    // (two reads measured faster here than asking epoll without waiting).
                    (tun_ready, udp_ready) = (true, true);
                    polls = polls.wrapping_add(1);
                    self.scheduling.polls.fetch_add(1, Ordering::Relaxed);
                    hs_ready =
                        self.handshakes.is_some() && polls.is_multiple_of(HANDSHAKE_POLL_EVERY);
                    match self.polling {
                        Polling::Busy => self.keep_warm(polled),
                        Polling::Adaptive => std::thread::yield_now(),
                    }
                    continue;
                }
            }
            // Both are drained: sleep until one is ready, a call comes (the waker), or
            // the ticker expires.
            let asleep = Instant::now();
            let ready = self.poll.wait(None)?;
            (tun_ready, udp_ready, hs_ready, ticked) =
                (ready.tun, ready.udp, ready.handshakes, ready.tick);
            let woke = Instant::now();
            woke_at = Some(woke);
            queued = ready.tun && woke.saturating_duration_since(asleep) < AT_ONCE;
            // What a real-time thread waited for a CPU after it was woken (behind another
            // real-time thread) is not sleep. (Ordinary, a read per wake-up would cost
            // sparse traffic, and a wait that matters shows as a limiter dropping.)
            let waited = match self.run_delay.as_mut() {
                Some(r) if self.schedule.realtime => r.grown(),
                _ => Duration::ZERO,
            };
            self.schedule.slept(
                woke.saturating_duration_since(asleep)
                    .saturating_sub(waited),
                woke,
            );
        }
        Ok(())
    }

    /// One turn of busy polling without packets at `now`: a warm-up if [`WARM_EVERY`]
    /// passed since the last packet or warm-up.
    fn keep_warm(&mut self, now: Instant) {
        std::hint::spin_loop();
        let Some((w, last)) = self.warmer.as_mut() else {
            return;
        };
        if !warm_due(now, *last, self.tunnel_rate.last) {
            return;
        }
        *last = now;
        if w.warm(now) {
            self.scheduling.warm_ups.fetch_add(1, Ordering::Relaxed);
        } else {
            // Planes that stopped passing their echo (never seen): no more warm-ups, and
            // no new planes made on this thread (a handshake and allocations each time).
            self.warmer = None;
            tracing::warn!("the warm-up planes stopped passing their echo: no more warm-ups");
        }
    }

    /// Runs what the control side asked for, sending what it produced.
    /// Whether calls may be left (the round ran as many as it may: the loop must not
    /// sleep on them, their wake-up is spent).
    fn run_jobs(&mut self, now: Instant) -> io::Result<bool> {
        let mut ran = 0;
        while ran < JOBS_PER_ROUND {
            match self.jobs.try_recv() {
                Ok(job) => {
                    job(&mut self.plane, now, &mut self.b.out);
                    self.flush()?;
                    ran += 1;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        if ran > 0 {
            self.publish();
        }
        Ok(ran == JOBS_PER_ROUND)
    }

    fn hand_out_asks(&mut self) {
        while let Some(a) = self.plane.poll_ask() {
            tracing::debug!(?a, "asking Sec-EM");
            if self.asks.try_send(a).is_err() {
                // Full or closed: the packets wait (bounded) and are asked for again
                // once they expire.
                tracing::debug!(?a, "verification requests full: not asked now");
            }
        }
    }

    /// Sets the thread up to run at real-time `priority` under load, as its `trial` at
    /// start allows (on the thread itself: the run delay it reads is its own).
    fn take_priority(&mut self, priority: u8, trial: Trial) {
        let now = Instant::now();
        match trial {
            Trial::Refused => return,
            Trial::Allowed => self.schedule.priority = Some(priority),
            Trial::Stuck => {
                self.schedule
                    .switched(Switch::Realtime(priority), true, now);
                self.schedule.switched(Switch::Ordinary, false, now);
                self.scheduling.realtime.store(true, Ordering::Relaxed);
            }
        }
        self.scheduling
            .realtime_priority
            .store(priority, Ordering::Relaxed);
        self.run_delay = Some(RunDelay::open());
    }

    /// Makes the change of scheduling that the load calls for (see the module's notes),
    /// then rests if a busy real-time thread is due to (see [`REALTIME_GRID`]), after
    /// sending and writing what is ready.
    /// `woke` is when the thread last woke, if nothing ran since (a clock read saved: an
    /// ordinary thread's switches need no finer time).
    fn reschedule(&mut self, woke: Option<Instant>) -> io::Result<()> {
        if !self.schedule.switches() && !self.schedule.realtime {
            return Ok(());
        }
        let now = match woke {
            Some(t) if !self.schedule.realtime => t,
            _ => Instant::now(),
        };
        if let Some(switch) = self.schedule.switch(now) {
            self.count_realtime(now);
            let made = match switch {
                Switch::Realtime(p) => crate::sched::run_fifo(p),
                Switch::Batch => crate::sched::run_batch(),
                Switch::Ordinary => crate::sched::run_ordinary(),
            };
            match &made {
                Ok(()) => tracing::debug!(?switch, "the data plane's scheduling changed"),
                Err(e) => tracing::warn!(
                    ?switch,
                    error = %e,
                    "the data plane could not change its scheduling: it stays as it is, \
                     and tries no more"
                ),
            }
            self.schedule.switched(switch, made.is_ok(), now);
            let s = &self.scheduling;
            s.realtime.store(self.schedule.realtime, Ordering::Relaxed);
            s.batch.store(self.schedule.batched, Ordering::Relaxed);
            match (switch, made.is_ok()) {
                (Switch::Batch, true) => {
                    s.batch_entries.fetch_add(1, Ordering::Relaxed);
                }
                (Switch::Realtime(_), true) => {
                    s.realtime_entries.fetch_add(1, Ordering::Relaxed);
                    // Waits from before are not this real-time stretch's.
                    if let Some(r) = self.run_delay.as_mut() {
                        r.grown();
                    }
                }
                // Refused: no real-time priority (one it could not leave stays shown).
                (Switch::Realtime(_), false) => s.realtime_priority.store(0, Ordering::Relaxed),
                (Switch::Ordinary | Switch::Batch, _) => {}
            }
        }
        if let Some(d) = self.schedule.due(now, grid_phase) {
            self.flush()?;
            std::thread::sleep(d);
            self.schedule.rested = Instant::now();
            self.scheduling.rests.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Adds the time the thread ran real-time since the last count to the metrics.
    fn count_realtime(&mut self, now: Instant) {
        let d = self.schedule.realtime_time(now);
        if !d.is_zero() {
            let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            self.scheduling
                .realtime_nanos
                .fetch_add(ns, Ordering::Relaxed);
        }
    }

    fn publish(&self) {
        let s = self.plane.stats();
        if let Ok(mut st) = self.stats.lock() {
            *st = s;
        }
    }

    /// Sends and writes what the outbox holds.
    fn flush(&mut self) -> io::Result<()> {
        let out = &mut self.b.out;
        if !out.net.is_empty() {
            let (udp, state, realtime) = (&self.udp, &self.udp_state, self.schedule.realtime);
            let lost = send_all(
                &mut out.net,
                state.max_gso_segments(),
                |t| state.try_send(udp.into(), t),
                || {
                    if realtime {
                        std::thread::sleep(REALTIME_SEND_WAIT);
                    } else {
                        std::thread::yield_now();
                    }
                },
            );
            if lost > 0 {
                self.plane.count_io_dropped(lost);
            }
        }
        if !out.tun.is_empty() {
            if let Err(e) = self
                .tun
                .send_multiple(&mut self.b.gro, out.tun.filled(), TUN_HEADER)
            {
                if fatal(&e) {
                    return Err(e);
                }
                tracing::debug!(error = %e, "write to TUN failed");
            }
            out.tun.clear();
            self.wrote_tun = true;
        }
        Ok(())
    }

    /// Reads what the TUN device has (a batch at most, or with `one`, one read) and sends
    /// it into the tunnels. How many packets there were, and whether to read it again
    /// only once epoll reports it: a read found it empty, or `one` found packets. The
    /// packets are handled at the `round`'s time (no clock read per batch).
    fn tun_round(&mut self, round: Instant, one: bool) -> io::Result<(usize, bool)> {
        let b = &mut self.b;
        let (mut n, mut done) = (0, false);
        // Several reads per batch (a bounded number), while a whole super-packet fits.
        for _ in 0..IDEAL_BATCH_SIZE {
            if one && n > 0 {
                done = true;
                break;
            }
            if IDEAL_BATCH_SIZE - n < 64 {
                break;
            }
            match self.tun.recv_multiple(
                &mut b.tun_raw,
                &mut b.tun_in[n..],
                &mut b.tun_sizes[n..],
                0,
            ) {
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    done = true;
                    break;
                }
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "unreadable packet from TUN dropped");
                    self.plane.count_io_dropped(1);
                }
            }
        }
        if n == 0 {
            return Ok((0, done));
        }
        let mut now = round;
        for i in 0..n {
            let len = self.b.tun_sizes[i].min(self.b.tun_in[i].len());
            self.plane
                .handle_tun(now, &self.b.tun_in[i][..len], &mut self.b.out);
            // A batch is up to IDEAL_BATCH_SIZE packets, each encrypted: a busy thread
            // goes real-time, and rests, within it too.
            if (i + 1) % REST_CHECK == 0 {
                self.reschedule(None)?;
                now = Instant::now();
            }
        }
        self.flush()?;
        Ok((n, done))
    }

    /// Reads what the data socket (or with `handshakes`, the handshake socket) has (a
    /// batch at most), decrypts it and writes it to the TUN device (or forwards it, on a
    /// gateway). How many datagrams there were, and whether the socket is drained (a read
    /// returned less than a batch). Handled at the `round`'s time, as [`Io::tun_round`]'s
    /// packets.
    fn udp_round(&mut self, round: Instant, handshakes: bool) -> io::Result<(usize, bool)> {
        let b = &mut self.b;
        let (socket, state) = match (&self.handshakes, handshakes) {
            (Some((s, state)), true) => (s, state),
            _ => (&self.udp, &self.udp_state),
        };
        let batch = if handshakes {
            HANDSHAKE_BATCH
        } else {
            b.udp_in.len()
        };
        let n = {
            // On the stack: no allocation per round. `udp_in` holds BATCH_SIZE buffers.
            let mut bufs = b.udp_in.iter_mut();
            let mut iovs: [io::IoSliceMut<'_>; quinn_udp::BATCH_SIZE] =
                std::array::from_fn(|_| io::IoSliceMut::new(bufs.next().map_or(&mut [], |v| v)));
            let iovs = &mut iovs[..batch.min(quinn_udp::BATCH_SIZE)];
            match state.recv(socket.into(), iovs, &mut b.metas) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((0, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok((0, false)),
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => {
                    // Read again when epoll reports it (level-triggered: at once if need be).
                    tracing::debug!(error = %e, "underlay receive failed");
                    return Ok((0, true));
                }
            }
        };
        let drained = n < batch;
        let mut now = round;
        let (mut datagrams, mut in_batch) = (0, 0);
        for i in 0..n {
            let (addr, len, stride) = {
                let m = &self.b.metas[i];
                (m.addr, m.len.min(self.b.udp_in[i].len()), m.stride.max(1))
            };
            let mut at = 0;
            while at < len {
                let end = (at + stride).min(len);
                let d = &self.b.udp_in[i][at..end];
                self.plane.handle_datagram(now, addr, d, &mut self.b.out);
                at = end;
                datagrams += 1;
                in_batch += 1;
                // The TUN batch has room for IDEAL_BATCH_SIZE packets: write it out
                // before it could overflow.
                if in_batch == IDEAL_BATCH_SIZE {
                    self.flush()?;
                    in_batch = 0;
                }
                // A batch of GRO reads is up to 2,048 datagrams, and one datagram can
                // cost a handshake: a busy thread goes real-time, and rests, within it too.
                if datagrams % REST_CHECK == 0 {
                    self.reschedule(None)?;
                    now = Instant::now();
                }
            }
        }
        self.flush()?;
        Ok((datagrams, drained))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn busy_polling_warms_up_only_after_a_pause_in_packets_and_in_warm_ups() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let every = u64::try_from(WARM_EVERY.as_micros()).expect("small");
        // Polling since t0, nothing since: the first warm-up once WARM_EVERY passed.
        assert!(!warm_due(at(every - 1), t0, t0));
        assert!(warm_due(at(every), t0, t0));
        // Packets flowing (the last one just now) warm the code themselves: none.
        assert!(!warm_due(at(10 * every), t0, at(10 * every - 1)));
        // One warm-up per WARM_EVERY, counted from the last.
        assert!(!warm_due(at(every + every / 2), at(every), t0));
        assert!(warm_due(at(2 * every), at(every), t0));
        // Simulated polling at one turn a microsecond for 10 ms without packets: one
        // warm-up per WARM_EVERY, not per turn.
        let mut last = t0;
        let mut ups = 0;
        for us in 1..=10_000 {
            if warm_due(at(us), last, t0) {
                last = at(us);
                ups += 1;
            }
        }
        assert_eq!(ups, 10_000 / every);
    }

    #[test]
    fn a_socket_batch_after_tun_packets_is_handled_at_a_fresh_time_and_alone_at_the_rounds() {
        let round = Instant::now();
        let later = round + Duration::from_millis(7);
        // Alone in its round: the round's time, and no clock read.
        let alone = batch_time(round, 0, || panic!("no clock read for a batch alone"));
        assert_eq!(alone, round);
        // After TUN packets: the time after them, never before the round's.
        assert_eq!(batch_time(round, 128, || later), later);
        assert_eq!(batch_time(later, 1, || round), later);
    }

    #[test]
    fn the_tun_device_is_read_after_a_write_while_the_kernel_answers() {
        let mut a = Answers::default();
        // An echo responder: every read after a write finds the reply.
        for _ in 0..20 {
            assert!(a.expect());
            a.found(true);
        }
        // A VNF that only receives: after a miss, one read in ANSWER_RETRY writes.
        a.found(false);
        let reads = (0..80).filter(|_| {
            let read = a.expect();
            if read {
                a.found(false);
            }
            read
        });
        assert_eq!(reads.count(), 80 / usize::from(ANSWER_RETRY));
        // Answers again: read after every write from the next hit on.
        while !a.expect() {}
        a.found(true);
        assert!(a.expect() && a.expect());
    }

    #[test]
    fn sparse_packets_are_waited_for_and_dense_ones_polled_for() {
        let t0 = Instant::now();
        let mut r = Rate::new(t0);
        // An echo every 10 ms: never polled for.
        for k in 1..=50u32 {
            let now = t0 + Duration::from_millis(10) * k;
            r.count(now, 1);
            assert_eq!(r.poll_until(), now, "polled for sparse traffic at {k}");
        }
        // A batch of 64 packets every 320 us (5 us apart): polled for after the last,
        // once the average has come down.
        let t1 = t0 + Duration::from_secs(1);
        let mut last = t1;
        for k in 1..=40u32 {
            last = t1 + Duration::from_micros(320) * k;
            r.count(last, 64);
        }
        let until = r.poll_until();
        assert!(until > last, "not polled for 200,000 packets a second");
        assert_eq!(until, last + POLL_FOR);
        // Rounds without packets change nothing.
        r.count(last + Duration::from_micros(10), 0);
        assert_eq!(r.poll_until(), until);
        // One packet after a second of silence: waited for again.
        let late = last + Duration::from_secs(1);
        r.count(late, 1);
        assert_eq!(r.poll_until(), late);
    }

    #[test]
    fn a_buffer_that_stays_full_costs_one_groups_tries_not_every_groups() {
        let to: SocketAddr = "192.0.2.1:51820".parse().expect("addr");
        let mut s = Sends::new(1 << 16, 64);
        // Ten groups (one per destination port), 25 datagrams in all.
        for i in 0..10u16 {
            let to = SocketAddr::new(to.ip(), 51820 + i);
            for _ in 0..if i == 0 { 16 } else { 1 } {
                assert!(s.push(to, &[0u8; 100]));
            }
        }
        let (tries, waits) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let lost = send_all(
            &mut s,
            64,
            |_| {
                tries.set(tries.get() + 1);
                Err(io::ErrorKind::WouldBlock.into())
            },
            || waits.set(waits.get() + 1),
        );
        assert_eq!(lost, 25, "every datagram counted lost");
        assert!(s.is_empty());
        // The first group its tries (a wait between each), the nine others one each.
        assert_eq!(tries.get(), SEND_TRIES + 9);
        assert_eq!(waits.get(), SEND_TRIES - 1);
        // A send that fails otherwise (one unreachable peer) does not drop the others.
        for i in 0..3u16 {
            assert!(s.push(SocketAddr::new(to.ip(), 51820 + i), &[0u8; 100]));
        }
        let sent = std::cell::Cell::new(0);
        let lost = send_all(
            &mut s,
            64,
            |t| {
                if t.destination.port() == 51820 {
                    return Err(io::ErrorKind::HostUnreachable.into());
                }
                sent.set(sent.get() + 1);
                Ok(())
            },
            || {},
        );
        assert_eq!((lost, sent.get()), (1, 2));
    }

    #[test]
    fn a_busy_real_time_plane_rests_on_the_shared_grid_and_an_idle_one_never() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Not real-time: never.
        let off = Schedule::new(Some(10), t0);
        assert_eq!(off.due(t0 + ms(50), || Duration::ZERO), None);
        let mut r = Schedule::new(Some(10), t0);
        r.switched(Switch::Realtime(10), true, t0);
        // Awake for less than REALTIME_BUSY: not even inside a slot.
        assert_eq!(r.due(t0 + ms(1), || Duration::ZERO), None);
        // Busy: in a slot, for what is left of it; outside one, not.
        let busy = t0 + REALTIME_BUSY + ms(1);
        assert_eq!(
            r.due(busy, || Duration::from_micros(300)),
            Some(REALTIME_REST - Duration::from_micros(300))
        );
        assert_eq!(r.due(busy, || ms(5)), None);
        // Naps add up: under REALTIME_REST in all they change nothing, at it the thread
        // counts as rested and awake from then.
        r.slept(Duration::from_micros(400), busy);
        assert_eq!(r.due(busy, || Duration::ZERO), Some(REALTIME_REST));
        r.slept(Duration::from_micros(600), busy);
        assert_eq!(r.due(busy + ms(1), || Duration::ZERO), None);
        // Busy across two whole periods without a slot (one long step): rest at once.
        let late = busy + 2 * REALTIME_GRID;
        assert_eq!(r.due(late, || ms(5)), Some(REALTIME_REST));
        assert_eq!(r.due(late - ms(1), || ms(5)), None);
        // The grid is the monotonic clock's: always within a period.
        assert!(grid_phase() < REALTIME_GRID);
    }

    #[test]
    fn a_plane_goes_real_time_when_busy_and_back_after_a_lull() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Without a priority: never.
        let mut never = Schedule::new(None, t0);
        never.load(t0);
        assert_eq!(never.switch(t0 + ms(50)), None);
        let mut s = Schedule::new(Some(7), t0);
        // Sparse traffic: awake 100 us at a time, asleep between.
        let now = sparse(&mut s, t0);
        // Awake (running, or runnable and kept waiting) for REALTIME_BUSY: real-time.
        assert_eq!(s.switch(now + ms(1)), None);
        let busy = now + REALTIME_BUSY;
        assert_eq!(s.switch(busy), Some(Switch::Realtime(7)));
        s.switched(Switch::Realtime(7), true, busy);
        assert!(s.realtime);
        // Still busy: nothing to change. A lull shorter than REALTIME_LINGER keeps it
        // real-time; a longer one sends it back.
        assert_eq!(s.switch(busy + ms(3)), None);
        let lull = busy + ms(3) + REALTIME_LINGER;
        s.slept(REALTIME_LINGER - ms(1), lull - ms(1));
        assert_eq!(s.switch(lull - ms(1)), None);
        assert_eq!(s.switch(lull), Some(Switch::Ordinary));
        // Its time real-time, counted before it switches.
        assert_eq!(s.realtime_time(lull), lull - busy);
        assert_eq!(s.realtime_time(lull), Duration::ZERO);
        s.switched(Switch::Ordinary, true, lull);
        assert!(!s.realtime);
        assert_eq!(s.realtime_time(lull + ms(50)), Duration::ZERO);
        assert_eq!(s.due(lull + ms(50), || Duration::ZERO), None);
        // A refused switch is not tried again; a thread that could not leave real-time
        // keeps resting.
        let mut refused = Schedule::new(Some(7), t0);
        refused.switched(Switch::Realtime(7), false, t0);
        refused.load(t0 + ms(50));
        assert_eq!(refused.switch(t0 + ms(50)), None);
        let mut stuck = Schedule::new(Some(7), t0);
        stuck.switched(Switch::Realtime(7), true, t0);
        stuck.switched(Switch::Ordinary, false, t0);
        assert_eq!(stuck.switch(t0 + ms(500)), None);
        assert!(stuck.due(t0 + ms(500), || Duration::ZERO).is_some());
        // Load however little it costs: real-time at once, and until it has stopped for
        // REALTIME_LINGER.
        let mut loaded = Schedule::new(Some(7), t0);
        loaded.load(t0);
        assert_eq!(loaded.switch(t0), Some(Switch::Realtime(7)));
        loaded.switched(Switch::Realtime(7), true, t0);
        loaded.slept(ms(150), t0 + ms(150));
        assert_eq!(loaded.switch(t0 + ms(150)), None);
        loaded.slept(ms(50), t0 + ms(200));
        assert_eq!(loaded.switch(t0 + ms(200)), Some(Switch::Ordinary));
    }

    /// 800 packets a second (sparse: under one per [`REALTIME_GAP`]) in bursts of 8 every
    /// 10 ms, each burst queued on the TUN device when the thread wakes: whether the thread
    /// goes real-time, when the loop reads as [`one_read`] says (the wait after the first
    /// read finds the rest at once), or, with `split`, one packet a round throughout.
    fn queued_bursts_go_real_time(split: bool) -> bool {
        let t0 = Instant::now();
        let (mut rate, mut schedule) = (Rate::new(t0), Schedule::new(Some(7), t0));
        let mut asleep = t0;
        for burst in 1..=300u32 {
            // Asleep until the burst.
            let mut now = t0 + Duration::from_millis(10) * burst;
            schedule.slept(now.saturating_duration_since(asleep), now);
            let (mut left, mut queued) = (8, false);
            while left > 0 {
                if let Some(Switch::Realtime(_)) = schedule.switch(now) {
                    return true;
                }
                let n = if one_read(&rate, queued && !split) {
                    1
                } else {
                    left
                };
                end_round(&mut rate, &mut schedule, now, n, false);
                left -= n;
                now += Duration::from_micros(5);
                queued = true;
            }
            asleep = now;
        }
        false
    }

    #[test]
    fn a_queued_burst_of_sparse_traffic_is_read_whole_and_leaves_it_sparse() {
        assert!(
            !queued_bursts_go_real_time(false),
            "800 packets a second in queued bursts went real-time"
        );
        // What the rule prevents: read one a round, the bursts look dense.
        assert!(queued_bursts_go_real_time(true));
    }

    /// The loop's order: the schedule is consulted at the top of a round, and told what
    /// the round carried at its end. `rounds` of `packets` each, `every` apart, each
    /// costing `work`; how many rounds until the thread goes real-time (`None`: never).
    fn rounds_until_realtime(
        rounds: usize,
        packets: usize,
        every: Duration,
        work: Duration,
        limited: bool,
    ) -> Option<usize> {
        let t0 = Instant::now();
        let (mut rate, mut schedule) = (Rate::new(t0), Schedule::new(Some(7), t0));
        let mut now = t0;
        for i in 0..rounds {
            if let Some(Switch::Realtime(_)) = schedule.switch(now) {
                return Some(i);
            }
            let round = now;
            now += work;
            end_round(&mut rate, &mut schedule, round, packets, limited);
            // Asleep until the next round.
            let next = round + every;
            schedule.slept(next.saturating_duration_since(now), next);
            now = next;
        }
        None
    }

    #[test]
    fn dense_traffic_makes_a_plane_real_time_in_bursts_or_late_rounds_and_sparse_does_not() {
        let us = Duration::from_micros;
        // 100 echoes a second, and 900: never.
        assert_eq!(
            rounds_until_realtime(500, 1, us(10_000), us(20), false),
            None
        );
        assert_eq!(
            rounds_until_realtime(500, 1, us(1_100), us(20), false),
            None
        );
        // 2,000 packets a second, one a round.
        assert!(rounds_until_realtime(500, 1, us(500), us(5), false).is_some());
        // GSO bursts of 64 every 2 ms (32,000 a second), cheap ones: within a few.
        let bursts = rounds_until_realtime(500, 64, us(2_000), us(300), false);
        assert!(bursts.is_some_and(|n| n <= 3), "{bursts:?}");
        // 5,000 packets a second whose rounds come 1.2 ms apart (late wake-ups): within
        // 20 ms (the average starts from a gap of a second).
        let late = rounds_until_realtime(500, 6, us(1_200), us(30), false);
        assert!(late.is_some_and(|n| n <= 16), "{late:?}");
        // A limiter dropping: at once, however sparse.
        assert_eq!(
            rounds_until_realtime(10, 1, us(1_200), us(20), true),
            Some(1)
        );
    }

    #[test]
    fn a_gateway_runs_real_time_unless_told_otherwise_and_a_vnf_only_when_told() {
        use asmn_shared::ids::Role;
        let a = Polling::Adaptive;
        assert_eq!(realtime_for(None, Role::Gateway, a), Some(GATEWAY_REALTIME));
        assert_eq!(realtime_for(Some(0), Role::Gateway, a), None);
        assert_eq!(realtime_for(Some(5), Role::Gateway, a), Some(5));
        assert_eq!(realtime_for(None, Role::Gateway, Polling::Busy), None);
        assert_eq!(realtime_for(None, Role::Vnf, a), None);
        assert_eq!(realtime_for(Some(7), Role::Vnf, a), Some(7));
        // Under load, without a priority: a VNF's plane runs batch; a gateway's, whose
        // limiters count time, and a busy-polling one stay ordinary.
        assert_eq!(under_load(None, Role::Vnf, a, true), UnderLoad::Batch);
        assert_eq!(under_load(Some(0), Role::Vnf, a, true), UnderLoad::Batch);
        assert_eq!(
            under_load(Some(7), Role::Vnf, a, true),
            UnderLoad::Realtime(7)
        );
        assert_eq!(
            under_load(None, Role::Vnf, Polling::Busy, true),
            UnderLoad::Ordinary
        );
        assert_eq!(
            under_load(None, Role::Gateway, a, true),
            UnderLoad::Realtime(GATEWAY_REALTIME)
        );
        assert_eq!(
            under_load(Some(0), Role::Gateway, a, true),
            UnderLoad::Ordinary
        );
        // Told not to: ordinary without a priority, real-time with one.
        assert_eq!(under_load(None, Role::Vnf, a, false), UnderLoad::Ordinary);
        assert_eq!(
            under_load(Some(7), Role::Vnf, a, false),
            UnderLoad::Realtime(7)
        );
    }

    /// 100 rounds of sparse traffic from `t0`, awake 100 us at a time and asleep 5 ms
    /// between, none calling for a switch; when they end.
    fn sparse(s: &mut Schedule, t0: Instant) -> Instant {
        let mut now = t0;
        for _ in 0..100 {
            now += Duration::from_micros(100);
            assert_eq!(s.switch(now), None);
            now += Duration::from_millis(5);
            s.slept(Duration::from_millis(5), now);
        }
        now
    }

    #[test]
    fn a_trickle_of_limited_drops_does_not_hold_a_vnf_batch() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let (mut rate, mut s) = (Rate::new(t0), Schedule::new(None, t0));
        s.batch = true;
        let (mut now, mut batched) = (t0, 0);
        for _ in 0..50 {
            if let Some(sw) = s.switch(now) {
                s.switched(sw, true, now);
            }
            batched += usize::from(s.batched);
            end_round(&mut rate, &mut s, now, 1, true);
            now += ms(190);
            s.slept(ms(190), now);
        }
        assert_eq!(batched, 0, "5 dropped packets a second held it batch");
        // With a priority, drops are a load: it goes real-time.
        let mut rt = Schedule::new(Some(10), t0);
        end_round(&mut Rate::new(t0), &mut rt, t0, 1, true);
        assert_eq!(rt.switch(t0), Some(Switch::Realtime(10)));
    }

    #[test]
    fn a_plane_without_a_priority_goes_batch_under_load_and_back_after_a_lull() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Schedule::new(None, t0);
        s.batch = true;
        // Sparse traffic: ordinary.
        let now = sparse(&mut s, t0);
        // Dense packets: batch, and no rests (it is not real-time).
        s.load(now);
        assert_eq!(s.switch(now), Some(Switch::Batch));
        s.switched(Switch::Batch, true, now);
        assert!(s.batched && !s.realtime);
        let at = now + ms(1);
        s.slept(ms(1), at);
        assert_eq!(s.switch(at), None);
        assert_eq!(s.due(at, || Duration::ZERO), None);
        assert_eq!(s.realtime_time(at), Duration::ZERO);
        // A lull of REALTIME_LINGER sends it back.
        let lull = now + REALTIME_LINGER;
        s.slept(REALTIME_LINGER - ms(2), lull - ms(1));
        assert_eq!(s.switch(lull - ms(1)), None);
        s.slept(ms(1), lull);
        assert_eq!(s.switch(lull), Some(Switch::Ordinary));
        s.switched(Switch::Ordinary, true, lull);
        assert!(!s.batched);
        assert_eq!(s.switch(lull + ms(1)), None);
        // The thread's start-up (from its schedule's making to its loop) is not a load.
        let mut fresh = Schedule::new(None, t0);
        fresh.batch = true;
        assert_eq!(fresh.switch(t0 + ms(5)), Some(Switch::Batch));
        let mut fresh = Schedule::new(None, t0);
        fresh.batch = true;
        fresh.started(t0 + ms(5));
        assert_eq!(fresh.switch(t0 + ms(6)), None);
        // Without leave to: never.
        let mut never = Schedule::new(None, t0);
        never.load(t0);
        assert_eq!(never.switch(t0), None);
        // Refused: not tried again, either way.
        let mut refused = Schedule::new(None, t0);
        refused.batch = true;
        refused.load(t0);
        refused.switched(Switch::Batch, false, t0);
        assert_eq!(refused.switch(t0 + ms(1)), None);
        let mut stuck = Schedule::new(None, t0);
        stuck.batch = true;
        stuck.switched(Switch::Batch, true, t0);
        stuck.switched(Switch::Ordinary, false, t0 + ms(300));
        assert_eq!(stuck.switch(t0 + ms(600)), None);
        assert!(stuck.batched);
    }

    #[test]
    fn a_send_delivers_every_group_on_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        rx.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let state = UdpSocketState::new((&tx).into()).expect("state");
        let to: SocketAddr = rx.local_addr().expect("addr");
        let mut s = Sends::new(1 << 16, state.max_gso_segments());
        for i in 0..10u8 {
            let len = if i == 9 { 50 } else { 300 };
            assert!(s.push(to, &vec![i; len]));
        }
        let max = state.max_gso_segments();
        let sent = send_all(&mut s, max, |t| state.try_send((&tx).into(), t), || {});
        assert_eq!(sent, 0);
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
