//! The policy engine: classifies packets against a Sec-catalog and polices what matches.
//!
//! [`PolicyEngine::handle_packet`] parses the inner IP packet ([`packet`]), finds the first
//! rule whose protocol, destination port and source VNF match, and passes the packet
//! through that rule's GCRA limiter for its source VNF (governor, generic over the clock,
//! so tests drive it with a fake clock). No match gets the catalog's default action.
//! Every decision is counted per rule.
//!
//! Limiters count *cells* of bytes: one byte per cell up to 80 Mbit/s, larger cells above
//! (so that governor's nanosecond replenish interval never drops below 100 ns, which keeps
//! its rounding error under 0.5% at any rate; one cell per byte breaks down above about
//! 8 Gbit/s). The cell size divides the burst, so the burst admitted after idle is the
//! configured one to the byte, and each limiter carries the bytes of a packet that do not
//! fill a whole cell over to the next packet, so no rounding accumulates.
//!
//! Fragments: a non-first fragment carries no transport header, so it cannot match a rule
//! by port. A first fragment that passes records the rule (or default) that passed it, by
//! datagram (source VNF, addresses, identification, and for IPv4 the protocol: what the
//! receiving kernel reassembles by), and the later fragments of that datagram answer to
//! the same rule and its limiter until the last passes. A later fragment without a
//! record (its first dropped, forgotten, or not yet come) is dropped: there is nothing
//! the catalog allowed for it to join, and judged alone it could take a port-less rule's
//! or the default's rate to a port whose rule is tighter. The record holds at most
//! [`FRAGMENTED_DATAGRAMS`] unfinished datagrams (the oldest forgotten first), at most
//! [`FRAGMENTED_PER_SOURCE`] of one source VNF, and starts afresh with each catalog. A
//! sender whose fragments arrive out of order, first fragment not first, loses the
//! datagram; within a tunnel they come in the order the sender's kernel cut them.
//!
//! Keys are bounded: each rule keeps at most `max_keys` per-source limiters (for the first
//! `max_keys` source VNFs the engine interns); later and unknown sources share one overflow
//! limiter, so a flood of new sources cannot grow memory or escape policing.

pub mod packet;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::catalog::{DefaultAction, Police, Protocol, SecCatalog};
use crate::ids::VnfId;
use packet::{PacketError, PacketMeta, proto};

/// How many unfinished fragmented datagrams the engine remembers the rule of (see the
/// module's notes): at 1 Gbit/s of 4 KiB datagrams, the last 30 ms of them.
pub const FRAGMENTED_DATAGRAMS: usize = 1024;
/// How many of them may be one source VNF's: its first fragments beyond are dropped (as
/// limited), so that one source cannot make the engine forget the datagrams of others.
pub const FRAGMENTED_PER_SOURCE: usize = FRAGMENTED_DATAGRAMS / 4;

/// A fragmented datagram, as the engine tells them apart: as the receiver's kernel
/// reassembles them (IPv4 by addresses, protocol and identification; IPv6 by addresses
/// and identification, the protocol being the first fragment's), and by source VNF.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Datagram {
    source: SourceKey,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    /// IPv4's protocol; 0 for IPv6 (a later fragment's next header is the sender's word
    /// only: the kernel keeps the first's).
    protocol: u8,
    id: u32,
}

impl Datagram {
    fn of(source: SourceKey, meta: &PacketMeta, id: u32) -> Datagram {
        Datagram {
            source,
            src: meta.src,
            dst: meta.dst,
            protocol: if meta.src.is_ipv4() { meta.protocol } else { 0 },
            id,
        }
    }
}

/// The rules that passed the first fragments of datagrams not yet finished (their last
/// fragment passed): at most [`FRAGMENTED_DATAGRAMS`] (the oldest forgotten first), and
/// at most [`FRAGMENTED_PER_SOURCE`] of one source VNF.
#[derive(Debug, Default)]
struct Fragments {
    /// By datagram: the rule, and the number of its insertion (its place in `order`).
    rules: HashMap<Datagram, (Matched, u64)>,
    /// Datagrams by age with their insertion's number; stale once finished.
    order: std::collections::VecDeque<(Datagram, u64)>,
    /// Unfinished datagrams per source.
    per_source: HashMap<SourceKey, usize>,
    inserted: u64,
}

impl Fragments {
    fn get(&self, d: &Datagram) -> Option<Matched> {
        self.rules.get(d).map(|e| e.0)
    }

    /// Whether `source` has as many unfinished datagrams as it may.
    fn full_for(&self, source: SourceKey) -> bool {
        self.per_source.get(&source).copied().unwrap_or(0) >= FRAGMENTED_PER_SOURCE
    }

    /// Records that `which` passed the first fragment of `d` (the caller checked
    /// [`Fragments::full_for`]).
    fn insert(&mut self, d: Datagram, which: Matched) {
        if let Some(e) = self.rules.get_mut(&d) {
            // The identification came round again: it keeps its place.
            e.0 = which;
            return;
        }
        self.inserted += 1;
        self.rules.insert(d, (which, self.inserted));
        self.order.push_back((d, self.inserted));
        *self.per_source.entry(d.source).or_default() += 1;
        while self.rules.len() > FRAGMENTED_DATAGRAMS {
            let Some((old, n)) = self.order.pop_front() else {
                break;
            };
            if self.rules.get(&old).is_some_and(|e| e.1 == n) {
                self.remove(&old);
            }
        }
        // Finished datagrams leave stale places behind: swept when they outnumber the rest.
        if self.order.len() > 2 * FRAGMENTED_DATAGRAMS {
            let rules = &self.rules;
            self.order
                .retain(|(d, n)| rules.get(d).is_some_and(|e| e.1 == *n));
        }
    }

    /// `d` is finished (or forgotten).
    fn remove(&mut self, d: &Datagram) {
        if self.rules.remove(d).is_some()
            && let Some(n) = self.per_source.get_mut(&d.source)
        {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&d.source);
            }
        }
    }
}

/// Default bound on per-source limiters per rule.
pub const DEFAULT_MAX_KEYS: usize = 4096;
/// Bound on distinct source VNFs the engine interns.
pub const MAX_SOURCES: usize = 65_536;

/// A source VNF as the engine knows it: interned once per tunnel peer, cheap to pass per
/// packet. [`SourceKey::UNKNOWN`] stands for traffic whose source VNF is not known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(u32);

impl SourceKey {
    /// A source the engine has no name for: it matches only rules without `sources`.
    pub const UNKNOWN: SourceKey = SourceKey(u32::MAX);
}

/// Which part of the catalog decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Matched {
    /// Rule `i` of the catalog.
    Rule(u16),
    /// The default action.
    Default,
}

/// What to do with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forward it.
    Pass(Matched),
    /// Drop it: no rule matched and the default action is `drop`.
    DropNotListed,
    /// Drop it: over the rate of the rule (or of the lowered default service).
    DropLimited(Matched),
    /// Drop it: not a parseable IP packet.
    DropMalformed(PacketError),
}

impl Decision {
    /// Whether the packet passes.
    pub fn passes(&self) -> bool {
        matches!(self, Decision::Pass(_))
    }
}

/// Counters of one rule (or of the default action).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Packets passed.
    pub passed_packets: u64,
    /// Bytes passed.
    pub passed_bytes: u64,
    /// Packets dropped by the limiter.
    pub limited_packets: u64,
    /// Bytes dropped by the limiter.
    pub limited_bytes: u64,
}

/// How much bunching a limiter of [`Policing::Upstream`] absorbs: its burst is at least
/// this long at the rule's rate.
pub const UPSTREAM_SLACK: Duration = Duration::from_millis(100);

/// Where a packet's rate is checked first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policing {
    /// Here: the rule's limiter decides.
    Here,
    /// Upstream (the VNF's gateway policed the packet under its catalog before it relayed
    /// it): here it meets the same rate again, with a burst of at least
    /// [`UPSTREAM_SLACK`]. A second limiter with the rule's own burst would drop
    /// conforming packets whenever the path between the two bunched them up (GSO
    /// batches, a descheduled thread); none at all would trust the gateway to hold this
    /// VNF's current catalog, and each gateway instance to police alone what several of
    /// them relay. The wide limiter bounds all of that at the rate, a little late.
    Upstream,
}

/// A snapshot of every counter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Catalog version in force.
    pub catalog_version: u64,
    /// Per rule name, cumulative across catalog versions that kept the name.
    pub rules: BTreeMap<String, RuleCounters>,
    /// The default action's counters (a lowered service level passes and limits).
    pub default: RuleCounters,
    /// Packets dropped because no rule matched (default `drop`).
    pub not_listed_packets: u64,
    /// Bytes dropped because no rule matched.
    pub not_listed_bytes: u64,
    /// Packets dropped as malformed.
    pub malformed_packets: u64,
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Limiter parameters derived from OVS's rate and burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimiterSpec {
    /// Bytes per GCRA cell.
    pub cell_bytes: u64,
    /// Time to replenish one cell.
    pub period: Duration,
    /// Cells admitted at once after idle.
    pub burst_cells: u32,
}

impl LimiterSpec {
    /// `None` for an unlimited rate.
    pub fn from_police(p: &Police) -> Option<Self> {
        let rate = p.rate.bytes_per_sec();
        if rate == 0 {
            return None;
        }
        let burst_bytes = p.effective_burst().bytes();
        let min_cell = rate.div_ceil(10_000_000).max(1);
        // The smallest cell of at least `min_cell` bytes that divides the burst. Bursts are
        // multiples of 125 bytes, so one is found quickly; a cell at most 8x the minimum
        // keeps the burst's granularity fine.
        let cell_bytes = (min_cell..=min_cell * 8)
            .find(|d| burst_bytes.is_multiple_of(*d))
            .unwrap_or(min_cell);
        let period_ns = ((u128::from(cell_bytes) * 1_000_000_000 + u128::from(rate) / 2)
            / u128::from(rate))
        .max(1);
        let burst_cells = (burst_bytes / cell_bytes).clamp(1, u64::from(u32::MAX));
        Some(Self {
            cell_bytes,
            period: Duration::from_nanos(u64::try_from(period_ns).unwrap_or(u64::MAX)),
            burst_cells: u32::try_from(burst_cells).unwrap_or(u32::MAX),
        })
    }

    /// The same rate with a burst of at least `window` at that rate.
    pub fn widened(&self, window: Duration) -> Self {
        let period = self.period.as_nanos().max(1);
        let cells = window.as_nanos().div_ceil(period);
        Self {
            burst_cells: self
                .burst_cells
                .max(u32::try_from(cells).unwrap_or(u32::MAX)),
            ..*self
        }
    }

    fn quota(&self) -> Quota {
        let burst = NonZeroU32::new(self.burst_cells).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(self.period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst)
    }
}

/// One source's limiter and the bytes it owes short of a whole cell.
struct SourceLimiter<C: Clock> {
    gcra: Limiter<C>,
    carry: u64,
}

impl<C: Clock> SourceLimiter<C> {
    fn admit(&mut self, cell_bytes: u64, len: usize) -> bool {
        let total = len as u64 + self.carry;
        let (cells, rest) = (total / cell_bytes, total % cell_bytes);
        let ok = match u32::try_from(cells) {
            Ok(0) => true,
            Ok(n) => matches!(
                self.gcra
                    .check_n(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)),
                Ok(Ok(()))
            ),
            Err(_) => false,
        };
        if ok {
            self.carry = rest;
        }
        ok
    }
}

/// Per-source limiters of one rule, bounded.
struct KeyedLimiter<C: Clock> {
    spec: LimiterSpec,
    quota: Quota,
    clock: C,
    /// Indexed by the interned source key: keys are dense from 0, so the first
    /// `max_keys` sources the engine knows have a limiter each, found without hashing.
    per_source: Vec<Option<SourceLimiter<C>>>,
    overflow: SourceLimiter<C>,
    max_keys: usize,
}

impl<C: Clock + Clone> KeyedLimiter<C> {
    fn new(spec: LimiterSpec, clock: &C, max_keys: usize) -> Self {
        let quota = spec.quota();
        Self {
            spec,
            quota,
            clock: clock.clone(),
            per_source: Vec::new(),
            overflow: SourceLimiter {
                gcra: RateLimiter::direct_with_clock(quota, clock.clone()),
                carry: 0,
            },
            max_keys,
        }
    }

    fn admit(&mut self, source: SourceKey, len: usize) -> bool {
        let cell = self.spec.cell_bytes;
        let i = source.0 as usize;
        if i >= self.max_keys {
            // Beyond the bound, and unknown sources: one shared limiter.
            return self.overflow.admit(cell, len);
        }
        if i >= self.per_source.len() {
            self.per_source.resize_with(i + 1, || None);
        }
        let (quota, clock) = (self.quota, &self.clock);
        self.per_source[i]
            .get_or_insert_with(|| SourceLimiter {
                gcra: RateLimiter::direct_with_clock(quota, clock.clone()),
                carry: 0,
            })
            .admit(cell, len)
    }
}

/// The limiters of a rule (or of the default action): for what is policed here, and,
/// made on first use, for what a gateway policed upstream ([`Policing::Upstream`]).
struct RuleLimiters<C: Clock> {
    here: KeyedLimiter<C>,
    upstream: Option<KeyedLimiter<C>>,
}

impl<C: Clock + Clone> RuleLimiters<C> {
    fn new(spec: LimiterSpec, clock: &C, max_keys: usize) -> Self {
        Self {
            here: KeyedLimiter::new(spec, clock, max_keys),
            upstream: None,
        }
    }

    fn admit(&mut self, source: SourceKey, len: usize, policing: Policing) -> bool {
        match policing {
            Policing::Here => self.here.admit(source, len),
            Policing::Upstream => {
                let here = &self.here;
                self.upstream
                    .get_or_insert_with(|| {
                        KeyedLimiter::new(
                            here.spec.widened(UPSTREAM_SLACK),
                            &here.clock,
                            here.max_keys,
                        )
                    })
                    .admit(source, len)
            }
        }
    }
}

/// The match part of a rule, kept small and contiguous (12 bytes) and evaluated without
/// branches: the scan over a catalog's rules touches only these, not the limiters and
/// counters.
#[derive(Clone, Copy)]
struct Matcher {
    /// The two protocol numbers that match (ICMP and ICMPv6 for `icmp`; twice the same
    /// number for TCP and UDP).
    proto_a: u8,
    proto_b: u8,
    any_proto: bool,
    /// Whether the rule names ports; then `lo..=hi` must hold the destination port.
    needs_port: bool,
    lo: u16,
    hi: u16,
    /// Index into `PolicyEngine::rule_sources`; `NO_SOURCES` = any source.
    sources: u16,
}

const NO_SOURCES: u16 = u16::MAX;

impl Matcher {
    #[inline]
    fn matches(&self, protocol: u8, port: Option<u16>) -> bool {
        let proto_ok = self.any_proto | (protocol == self.proto_a) | (protocol == self.proto_b);
        // Non-first fragments carry no port (`port` is `None`): they never match a port
        // rule.
        let (has_port, p) = (port.is_some(), port.unwrap_or(0));
        let port_ok = !self.needs_port | (has_port & (self.lo <= p) & (p <= self.hi));
        proto_ok & port_ok
    }
}

/// Enforces one Sec-catalog. Owned by one packet-processing task; swap catalogs with
/// [`set_catalog`](Self::set_catalog) (the next packet sees the new one).
pub struct PolicyEngine<C: Clock + Clone> {
    clock: C,
    max_keys: usize,
    catalog: Arc<SecCatalog>,
    matchers: Vec<Matcher>,
    /// For TCP (0) and UDP (1): per destination port, the first rule that matches the
    /// protocol and port (sources aside), or `NO_RULE`. A port-addressed packet then costs
    /// one lookup instead of a scan of the catalog.
    port_index: [Vec<u16>; 2],
    /// Sorted interned sources of the rules that name them.
    rule_sources: Vec<Vec<u32>>,
    limiters: Vec<Option<RuleLimiters<C>>>,
    counters: Vec<RuleCounters>,
    default_limiter: Option<RuleLimiters<C>>,
    default_counters: RuleCounters,
    not_listed: (u64, u64),
    malformed: u64,
    /// What passed the first fragments of the last datagrams (see the module's notes).
    fragments: Fragments,
    /// Counters of rules from earlier catalogs, by name.
    retired: BTreeMap<String, RuleCounters>,
    sources: HashMap<VnfId, u32>,
}

impl<C: Clock + Clone> std::fmt::Debug for PolicyEngine<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("vnf", &self.catalog.vnf)
            .field("version", &self.catalog.version)
            .field("rules", &self.matchers.len())
            .finish_non_exhaustive()
    }
}

impl<C: Clock + Clone> PolicyEngine<C> {
    /// An engine enforcing `catalog` with limiters on `clock`.
    pub fn new(catalog: Arc<SecCatalog>, clock: C) -> Self {
        Self::with_max_keys(catalog, clock, DEFAULT_MAX_KEYS)
    }

    /// As [`new`](Self::new), with a bound on per-source limiters per rule.
    pub fn with_max_keys(catalog: Arc<SecCatalog>, clock: C, max_keys: usize) -> Self {
        let mut e = Self {
            clock,
            max_keys: max_keys.max(1),
            catalog: Arc::new(SecCatalog::deny_all(catalog.vnf.clone())),
            matchers: Vec::new(),
            port_index: [Vec::new(), Vec::new()],
            rule_sources: Vec::new(),
            limiters: Vec::new(),
            counters: Vec::new(),
            default_limiter: None,
            default_counters: RuleCounters::default(),
            not_listed: (0, 0),
            malformed: 0,
            fragments: Fragments::default(),
            retired: BTreeMap::new(),
            sources: HashMap::new(),
        };
        e.set_catalog(catalog);
        e
    }

    /// The catalog in force.
    pub fn catalog(&self) -> &Arc<SecCatalog> {
        &self.catalog
    }

    /// Interns a source VNF (once per tunnel peer). Beyond [`MAX_SOURCES`] names it
    /// returns [`SourceKey::UNKNOWN`].
    pub fn source_key(&mut self, vnf: &VnfId) -> SourceKey {
        self.intern(vnf)
    }

    fn intern(&mut self, vnf: &VnfId) -> SourceKey {
        if let Some(&k) = self.sources.get(vnf) {
            return SourceKey(k);
        }
        if self.sources.len() >= MAX_SOURCES {
            return SourceKey::UNKNOWN;
        }
        let k = self.sources.len() as u32;
        self.sources.insert(vnf.clone(), k);
        SourceKey(k)
    }

    /// Replaces the catalog. Limiters start afresh; counters of rules whose name stays
    /// carry on.
    pub fn set_catalog(&mut self, catalog: Arc<SecCatalog>) {
        for (old, c) in self.catalog.rules.iter().zip(self.counters.drain(..)) {
            add(self.retired.entry(old.name.clone()).or_default(), &c);
        }
        self.matchers.clear();
        self.rule_sources.clear();
        self.limiters.clear();
        // Rule numbers name the old catalog's rules.
        self.fragments = Fragments::default();
        for r in &catalog.rules {
            let sources = match &r.sources {
                None => NO_SOURCES,
                Some(set) => {
                    let mut v: Vec<u32> = set.iter().map(|s| self.intern(s).0).collect();
                    v.sort_unstable();
                    v.dedup();
                    self.rule_sources.push(v);
                    // At most MAX_RULES (1024) rules, so the index fits below NO_SOURCES.
                    (self.rule_sources.len() - 1) as u16
                }
            };
            let (proto_a, proto_b, any_proto) = match r.protocol {
                Protocol::Tcp => (proto::TCP, proto::TCP, false),
                Protocol::Udp => (proto::UDP, proto::UDP, false),
                Protocol::Icmp => (proto::ICMP, proto::ICMPV6, false),
                Protocol::Any => (0, 0, true),
            };
            let (lo, hi) = r.ports.map_or((0, u16::MAX), |p| (p.lo, p.hi));
            self.matchers.push(Matcher {
                proto_a,
                proto_b,
                any_proto,
                needs_port: r.ports.is_some(),
                lo,
                hi,
                sources,
            });
            self.limiters.push(
                LimiterSpec::from_police(&r.police)
                    .map(|s| RuleLimiters::new(s, &self.clock, self.max_keys)),
            );
            self.counters
                .push(self.retired.remove(&r.name).unwrap_or_default());
        }
        self.port_index = [
            first_rule_per_port(&self.matchers, proto::TCP),
            first_rule_per_port(&self.matchers, proto::UDP),
        ];
        self.default_limiter = match catalog.default_action {
            DefaultAction::Drop => None,
            DefaultAction::Police(p) => LimiterSpec::from_police(&p)
                .map(|s| RuleLimiters::new(s, &self.clock, self.max_keys)),
        };
        self.catalog = catalog;
    }

    /// Decides the fate of one inner IP packet received from `source`.
    pub fn handle_packet(&mut self, source: SourceKey, packet: &[u8]) -> Decision {
        self.handle_packet_as(source, packet, Policing::Here)
    }

    /// Decides the fate of one inner IP packet received from `source`, with its rate
    /// checked here or (`Policing::Upstream`) not.
    pub fn handle_packet_as(
        &mut self,
        source: SourceKey,
        packet: &[u8],
        policing: Policing,
    ) -> Decision {
        let meta = match packet::parse(packet) {
            Ok(m) => m,
            Err(e) => {
                self.malformed += 1;
                return Decision::DropMalformed(e);
            }
        };
        self.decide_as(source, &meta, policing)
    }

    /// Decides for an already parsed packet.
    pub fn decide(&mut self, source: SourceKey, meta: &PacketMeta) -> Decision {
        self.decide_as(source, meta, Policing::Here)
    }

    fn decide_as(&mut self, source: SourceKey, meta: &PacketMeta, policing: Policing) -> Decision {
        let Some(f) = meta.fragment else {
            let which = self.classify(source, meta);
            return self.admit(which, source, meta.len, policing);
        };
        let d = Datagram::of(source, meta, f.id);
        if !f.first {
            // A later fragment goes where its first went; without a first that passed
            // (or sent before it), there is nothing the catalog allowed to join.
            let Some(which) = self.fragments.get(&d) else {
                self.not_listed.0 += 1;
                self.not_listed.1 += meta.len as u64;
                return Decision::DropNotListed;
            };
            let decision = self.admit(which, source, meta.len, policing);
            if f.last && decision.passes() {
                self.fragments.remove(&d);
            }
            return decision;
        }
        let which = self.classify(source, meta);
        if self.fragments.full_for(source) && self.fragments.get(&d).is_none() {
            return self.refuse(which, meta.len);
        }
        let decision = self.admit(which, source, meta.len, policing);
        if let Decision::Pass(which) = decision {
            self.fragments.insert(d, which);
        }
        decision
    }

    /// Drops `len` bytes under `which` as limited, without asking its limiter (the
    /// default without one: not listed).
    fn refuse(&mut self, which: Matched, len: usize) -> Decision {
        self.settle(which, len, |_| false)
    }

    /// The rule that `meta` from `source` matches, if any: else the default.
    fn classify(&self, source: SourceKey, meta: &PacketMeta) -> Matched {
        let port = meta.dst_port();
        // Where the scan starts: the port index's first candidate for TCP and UDP.
        let start = match (meta.protocol, port) {
            (proto::TCP, Some(p)) => self.port_index[0].get(usize::from(p)).copied(),
            (proto::UDP, Some(p)) => self.port_index[1].get(usize::from(p)).copied(),
            _ => Some(0),
        }
        .unwrap_or(0);
        let hit = if start == NO_RULE {
            None
        } else {
            let start = usize::from(start);
            self.matchers[start..]
                .iter()
                .position(|m| {
                    m.matches(meta.protocol, port)
                        && (m.sources == NO_SOURCES
                            || self.rule_sources[usize::from(m.sources)]
                                .binary_search(&source.0)
                                .is_ok())
                })
                .map(|i| i + start)
        };
        hit.map_or(Matched::Default, |i| Matched::Rule(i as u16))
    }

    /// Polices `len` bytes from `source` under `which` (the default: its action), counted.
    fn admit(
        &mut self,
        which: Matched,
        source: SourceKey,
        len: usize,
        policing: Policing,
    ) -> Decision {
        self.settle(which, len, |l| {
            l.is_none_or(|l| l.admit(source, len, policing))
        })
    }

    /// Counts `len` bytes under `which` as passed or limited, as `passes` says given the
    /// limiter (none: unlimited); the default without a limiter drops them as not listed.
    fn settle(
        &mut self,
        which: Matched,
        len: usize,
        passes: impl FnOnce(Option<&mut RuleLimiters<C>>) -> bool,
    ) -> Decision {
        let (limiter, c) = match which {
            Matched::Rule(r) => {
                let i = usize::from(r);
                (self.limiters[i].as_mut(), &mut self.counters[i])
            }
            Matched::Default => match self.default_limiter.as_mut() {
                None => {
                    self.not_listed.0 += 1;
                    self.not_listed.1 += len as u64;
                    return Decision::DropNotListed;
                }
                Some(l) => (Some(l), &mut self.default_counters),
            },
        };
        if passes(limiter) {
            c.passed_packets += 1;
            c.passed_bytes += len as u64;
            Decision::Pass(which)
        } else {
            c.limited_packets += 1;
            c.limited_bytes += len as u64;
            Decision::DropLimited(which)
        }
    }

    /// Every counter, cumulative.
    pub fn counters(&self) -> CounterSnapshot {
        let mut rules = self.retired.clone();
        for (r, c) in self.catalog.rules.iter().zip(&self.counters) {
            add(rules.entry(r.name.clone()).or_default(), c);
        }
        CounterSnapshot {
            catalog_version: self.catalog.version,
            rules,
            default: self.default_counters,
            not_listed_packets: self.not_listed.0,
            not_listed_bytes: self.not_listed.1,
            malformed_packets: self.malformed,
        }
    }
}

/// No rule: the value of a port-index entry no rule covers.
const NO_RULE: u16 = u16::MAX;

/// For every destination port, the index of the first rule matching (`protocol`, port),
/// by a sweep over the ports with the covering rules in a min-heap (`O(65536 log R)`).
fn first_rule_per_port(matchers: &[Matcher], protocol: u8) -> Vec<u16> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    // (first port, last port, rule index) of every rule that can match this protocol.
    let mut spans: Vec<(u16, u16, u16)> = matchers
        .iter()
        .enumerate()
        .filter(|(_, m)| {
            m.matches(protocol, None) || (m.needs_port && m.matches(protocol, Some(m.lo)))
        })
        .map(|(i, m)| {
            let (lo, hi) = if m.needs_port {
                (m.lo, m.hi)
            } else {
                (0, u16::MAX)
            };
            (lo, hi, i as u16)
        })
        .collect();
    spans.sort_unstable();
    let mut table = vec![NO_RULE; 1 << 16];
    let mut active: BinaryHeap<Reverse<(u16, u16)>> = BinaryHeap::new();
    let mut next = 0;
    for (port, slot) in table.iter_mut().enumerate() {
        while next < spans.len() && usize::from(spans[next].0) == port {
            active.push(Reverse((spans[next].2, spans[next].1)));
            next += 1;
        }
        while active
            .peek()
            .is_some_and(|Reverse((_, hi))| usize::from(*hi) < port)
        {
            active.pop();
        }
        // The heap's top is the lowest-numbered rule still covering the port; a rule that
        // ended earlier but is not on top is removed when it surfaces.
        if let Some(Reverse((idx, _))) = active.peek() {
            *slot = *idx;
        }
    }
    table
}

fn add(into: &mut RuleCounters, c: &RuleCounters) {
    into.passed_packets += c.passed_packets;
    into.passed_bytes += c.passed_bytes;
    into.limited_packets += c.limited_packets;
    into.limited_bytes += c.limited_bytes;
}

#[cfg(test)]
mod tests;
