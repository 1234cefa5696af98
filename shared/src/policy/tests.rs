use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use governor::clock::FakeRelativeClock;

use super::packet::build;
use super::*;
use crate::catalog::{PortRange, Rule};
use crate::units::{Kbit, KbitPerSec};

fn vnf(s: &str) -> VnfId {
    VnfId::new(s).expect("vnf")
}

fn rule(name: &str, protocol: Protocol, port: Option<u16>, rate: u64, burst: u64) -> Rule {
    Rule {
        name: name.into(),
        protocol,
        ports: port.map(|p| PortRange { lo: p, hi: p }),
        sources: None,
        police: Police {
            rate: KbitPerSec(rate),
            burst: Kbit(burst),
        },
    }
}

fn catalog(rules: Vec<Rule>, default_action: DefaultAction) -> Arc<SecCatalog> {
    Arc::new(SecCatalog {
        vnf: vnf("server"),
        version: 1,
        gateway: None,
        default_action,
        rules,
    })
}

fn engine(c: Arc<SecCatalog>) -> (PolicyEngine<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    (PolicyEngine::new(c, clock.clone()), clock)
}

#[test]
fn after_idle_the_admitted_burst_equals_burst_exactly() {
    for (rate, burst) in [(1000u64, 100u64), (10_000, 1000), (64, 16), (500_000, 8000)] {
        let (mut e, clock) = engine(catalog(
            vec![rule("http", Protocol::Tcp, Some(80), rate, burst)],
            DefaultAction::Drop,
        ));
        let src = e.source_key(&vnf("client"));
        clock.advance(Duration::from_secs(3600));
        // 125-byte packets: burst bytes (burst * 125) is a whole number of them.
        let pkt = build::tcp4(80, 125);
        let mut admitted = 0u64;
        for _ in 0..1_000_000 {
            if !e.handle_packet(src, &pkt).passes() {
                break;
            }
            admitted += 125;
        }
        assert_eq!(admitted, burst * 125, "rate {rate} burst {burst}");
    }
}

#[test]
fn offered_twice_the_rate_the_admitted_rate_is_within_2_percent() {
    for rate_kbit in [64u64, 1_000, 10_000, 100_000, 1_000_000, 10_000_000] {
        let (mut e, clock) = engine(catalog(
            vec![rule("r", Protocol::Udp, Some(53), rate_kbit, 100)],
            DefaultAction::Drop,
        ));
        let src = e.source_key(&vnf("client"));
        let rate_bytes = rate_kbit * 125;
        let len = 1000usize;
        // Offer 2x the rate for 10 s, evenly spaced.
        let offered_pps = 2 * rate_bytes / len as u64;
        let gap = Duration::from_nanos(1_000_000_000 / offered_pps.max(1));
        let n = (offered_pps * 10).max(20);
        let pkt = build::ipv4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            proto::UDP,
            &build::udp(1, 53, len - 28),
        );
        let mut admitted = 0u64;
        for _ in 0..n {
            if e.handle_packet(src, &pkt).passes() {
                admitted += len as u64;
            }
            clock.advance(gap);
        }
        let elapsed = gap.as_secs_f64() * n as f64;
        let burst_bytes = 100.0 * 125.0;
        let measured = (admitted as f64 - burst_bytes) / elapsed;
        let err = (measured - rate_bytes as f64).abs() / rate_bytes as f64;
        assert!(
            err <= 0.02,
            "rate {rate_kbit} kbit/s: admitted {measured:.0} B/s vs {rate_bytes} B/s ({:.2}%)",
            err * 100.0
        );
    }
}

#[test]
fn unmatched_traffic_gets_the_default_action() {
    let rules = vec![rule("http", Protocol::Tcp, Some(80), 0, 0)];
    let (mut e, _) = engine(catalog(rules.clone(), DefaultAction::Drop));
    let src = SourceKey::UNKNOWN;
    assert_eq!(
        e.handle_packet(src, &build::tcp4(80, 60)),
        Decision::Pass(Matched::Rule(0))
    );
    assert_eq!(
        e.handle_packet(src, &build::tcp4(22, 60)),
        Decision::DropNotListed
    );

    let lowered = DefaultAction::Police(Police {
        rate: KbitPerSec(8),
        burst: Kbit(8),
    });
    let (mut e, _) = engine(catalog(rules, lowered));
    // 8 kbit burst = 1000 bytes: ten 100-byte packets pass, the eleventh is limited.
    for _ in 0..10 {
        assert_eq!(
            e.handle_packet(src, &build::tcp4(22, 100)),
            Decision::Pass(Matched::Default)
        );
    }
    assert_eq!(
        e.handle_packet(src, &build::tcp4(22, 100)),
        Decision::DropLimited(Matched::Default)
    );
    let c = e.counters();
    assert_eq!(
        (c.default.passed_packets, c.default.limited_packets),
        (10, 1)
    );
}

#[test]
fn a_catalog_swap_takes_effect_on_the_next_packet() {
    let (mut e, _) = engine(catalog(vec![], DefaultAction::Drop));
    let src = e.source_key(&vnf("client"));
    let pkt = build::tcp4(443, 80);
    assert_eq!(e.handle_packet(src, &pkt), Decision::DropNotListed);
    e.set_catalog(catalog(
        vec![rule("https", Protocol::Tcp, Some(443), 0, 0)],
        DefaultAction::Drop,
    ));
    assert!(e.handle_packet(src, &pkt).passes());
    e.set_catalog(catalog(vec![], DefaultAction::Drop));
    assert_eq!(e.handle_packet(src, &pkt), Decision::DropNotListed);
    // The rule's counter survives the swap.
    assert_eq!(e.counters().rules["https"].passed_packets, 1);
}

#[test]
fn sources_restrict_a_rule_and_limits_are_per_source() {
    let mut r = rule("http", Protocol::Tcp, Some(80), 8, 8);
    r.sources = Some(BTreeSet::from([vnf("client"), vnf("monitor")]));
    let (mut e, _) = engine(catalog(vec![r], DefaultAction::Drop));
    let (client, monitor, other) = (
        e.source_key(&vnf("client")),
        e.source_key(&vnf("monitor")),
        e.source_key(&vnf("intruder")),
    );
    let pkt = build::tcp4(80, 1000);
    assert!(e.handle_packet(client, &pkt).passes());
    assert!(
        !e.handle_packet(client, &pkt).passes(),
        "client's burst is spent"
    );
    assert!(
        e.handle_packet(monitor, &pkt).passes(),
        "monitor has its own limiter"
    );
    assert_eq!(e.handle_packet(other, &pkt), Decision::DropNotListed);
    assert_eq!(
        e.handle_packet(SourceKey::UNKNOWN, &pkt),
        Decision::DropNotListed
    );
}

#[test]
fn per_source_keys_are_bounded() {
    let clock = FakeRelativeClock::default();
    let mut e = PolicyEngine::with_max_keys(
        catalog(
            vec![rule("any", Protocol::Any, None, 8, 8)],
            DefaultAction::Drop,
        ),
        clock,
        4,
    );
    let pkt = build::tcp4(1, 1000);
    let keys: Vec<SourceKey> = (0..10)
        .map(|i| e.source_key(&vnf(&format!("s{i}"))))
        .collect();
    let passed = keys
        .iter()
        .filter(|k| e.handle_packet(**k, &pkt).passes())
        .count();
    // Four keyed limiters plus one shared overflow limiter: five packets pass, not ten.
    assert_eq!(passed, 5);
}

#[test]
fn protocols_ports_icmp_and_fragments() {
    let mut range = rule("range", Protocol::Udp, None, 0, 0);
    range.ports = Some(PortRange { lo: 1000, hi: 2000 });
    let rules = vec![
        rule("ping", Protocol::Icmp, None, 0, 0),
        range,
        rule("udp-any", Protocol::Udp, None, 0, 0),
    ];
    let (mut e, _) = engine(catalog(rules, DefaultAction::Drop));
    let src = SourceKey::UNKNOWN;
    let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    let echo = build::ipv4(a, b, proto::ICMP, &build::icmp_echo(56));
    assert_eq!(
        e.handle_packet(src, &echo),
        Decision::Pass(Matched::Rule(0))
    );
    let (a6, b6) = (Ipv6Addr::LOCALHOST, Ipv6Addr::UNSPECIFIED);
    let echo6 = build::ipv6(a6, b6, proto::ICMPV6, &[128, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        e.handle_packet(src, &echo6),
        Decision::Pass(Matched::Rule(0))
    );
    let in_range = build::ipv4(a, b, proto::UDP, &build::udp(9, 1500, 4));
    assert_eq!(
        e.handle_packet(src, &in_range),
        Decision::Pass(Matched::Rule(1))
    );
    let out = build::ipv4(a, b, proto::UDP, &build::udp(9, 2001, 4));
    assert_eq!(e.handle_packet(src, &out), Decision::Pass(Matched::Rule(2)));
    // A non-first fragment alone (no first fragment of its datagram passed) is dropped,
    // even where a port-less rule would take any UDP packet.
    let mut frag = build::ipv4(a, b, proto::UDP, &[1, 2, 3, 4]);
    frag[7] = 0x20;
    assert_eq!(e.handle_packet(src, &frag), Decision::DropNotListed);
    let tcp = build::tcp4(1500, 40);
    assert_eq!(e.handle_packet(src, &tcp), Decision::DropNotListed);
    assert!(matches!(
        e.handle_packet(src, &[0x45, 0, 0]),
        Decision::DropMalformed(_)
    ));
    assert_eq!(e.counters().malformed_packets, 1);
}

#[test]
fn packets_larger_than_the_burst_are_limited_not_panicking() {
    let (mut e, _) = engine(catalog(
        vec![rule("tiny", Protocol::Tcp, None, 8, 1)],
        DefaultAction::Drop,
    ));
    // Burst 1 kbit = 125 bytes; a 1500-byte packet can never conform.
    assert_eq!(
        e.handle_packet(SourceKey::UNKNOWN, &build::tcp4(80, 1500)),
        Decision::DropLimited(Matched::Rule(0))
    );
}

#[test]
fn limiter_cells_grow_with_the_rate() {
    let spec = |kbit| {
        LimiterSpec::from_police(&Police {
            rate: KbitPerSec(kbit),
            burst: Kbit(0),
        })
        .expect("limited")
    };
    assert_eq!(spec(10_000).cell_bytes, 1);
    assert_eq!(spec(10_000).period, Duration::from_nanos(800));
    assert_eq!(spec(10_000).burst_cells, 1_000_000);
    assert!(spec(100_000_000).period >= Duration::from_nanos(100));
    assert!(LimiterSpec::from_police(&Police::UNLIMITED).is_none());
}

#[test]
fn the_port_index_agrees_with_a_linear_scan() {
    // Overlapping ranges, port-less rules, `any` and source-restricted rules, in an order
    // where later rules are shadowed on part of their range.
    let mut r = vec![
        rule("a", Protocol::Tcp, None, 0, 0),
        rule("b", Protocol::Udp, None, 0, 0),
        rule("c", Protocol::Udp, None, 0, 0),
        rule("d", Protocol::Tcp, Some(443), 0, 0),
        rule("e", Protocol::Any, None, 0, 0),
    ];
    r[0].ports = Some(PortRange { lo: 100, hi: 200 });
    r[0].sources = Some(BTreeSet::from([vnf("client")]));
    r[1].ports = Some(PortRange { lo: 150, hi: 160 });
    r[2].ports = Some(PortRange { lo: 1, hi: 65535 });
    r[2].sources = Some(BTreeSet::from([vnf("monitor")]));
    let c = catalog(r.clone(), DefaultAction::Drop);
    let (mut e, _) = engine(c.clone());
    let keys = [
        e.source_key(&vnf("client")),
        e.source_key(&vnf("monitor")),
        SourceKey::UNKNOWN,
    ];
    let names: Vec<VnfId> = vec![vnf("client"), vnf("monitor"), vnf("nobody")];
    for port in [1u16, 99, 100, 150, 155, 160, 161, 200, 201, 443, 444, 65535] {
        for (k, who) in keys.iter().zip(&names) {
            for (udp, pkt) in [
                (false, build::tcp4(port, 60)),
                (
                    true,
                    build::ipv4(
                        Ipv4Addr::new(10, 0, 0, 1),
                        Ipv4Addr::new(10, 0, 0, 2),
                        proto::UDP,
                        &build::udp(7, port, 4),
                    ),
                ),
            ] {
                // The first rule in catalog order that matches, computed naively.
                let expected = r.iter().position(|rl| {
                    let proto_ok = match rl.protocol {
                        Protocol::Tcp => !udp,
                        Protocol::Udp => udp,
                        Protocol::Any => true,
                        Protocol::Icmp => false,
                    };
                    proto_ok
                        && rl.ports.is_none_or(|p| p.contains(port))
                        && rl.sources.as_ref().is_none_or(|s| s.contains(who))
                });
                let got = match e.handle_packet(*k, &pkt) {
                    Decision::Pass(Matched::Rule(i)) => Some(usize::from(i)),
                    Decision::DropNotListed => None,
                    other => panic!("unexpected {other:?}"),
                };
                assert_eq!(got, expected, "port {port} udp {udp} source {who}");
            }
        }
    }
}

#[test]
fn policed_upstream_meets_the_rate_with_a_wider_burst_and_the_whitelist() {
    // 800 kbit/s = 100,000 bytes a second, burst 8 kbit = 1,000 bytes; upstream, the
    // burst is 100 ms at the rate: 10,000 bytes.
    let rules = vec![rule("http", Protocol::Tcp, Some(80), 800, 8)];
    let lowered = DefaultAction::Police(Police {
        rate: KbitPerSec(800),
        burst: Kbit(8),
    });
    let (mut e, _) = engine(catalog(rules, lowered));
    let src = SourceKey::UNKNOWN;
    for (packet, which) in [
        (build::tcp4(80, 100), Matched::Rule(0)),
        (build::tcp4(22, 100), Matched::Default),
    ] {
        let passed = (0..200)
            .take_while(|_| {
                e.handle_packet_as(src, &packet, Policing::Upstream) == Decision::Pass(which)
            })
            .count();
        assert_eq!(passed, 100, "{which:?}: 10,000 bytes, then the rate");
        // Policed here, a separate limiter with the rule's own burst: 1,000 bytes.
        let passed = (0..200)
            .take_while(|_| e.handle_packet(src, &packet).passes())
            .count();
        assert_eq!(passed, 10, "{which:?}");
    }
    let c = e.counters();
    assert_eq!(c.rules["http"].passed_packets, 110);
    assert_eq!(c.rules["http"].limited_packets, 2);
    assert_eq!(c.default.passed_packets, 110);
    // Below 100 ms of the rate, the rule's own burst stands: 8 kbit/s, 1,000 bytes.
    let (mut e, _) = engine(catalog(
        vec![rule("http", Protocol::Tcp, Some(80), 8, 8)],
        DefaultAction::Drop,
    ));
    let passed = (0..200)
        .take_while(|_| {
            e.handle_packet_as(src, &build::tcp4(80, 100), Policing::Upstream)
                .passes()
        })
        .count();
    assert_eq!(passed, 10);
    // The whitelist decides as here: unlisted traffic and malformed packets dropped.
    assert_eq!(
        e.handle_packet_as(src, &build::tcp4(22, 100), Policing::Upstream),
        Decision::DropNotListed
    );
    assert!(matches!(
        e.handle_packet_as(src, &[0x45, 0, 0], Policing::Upstream),
        Decision::DropMalformed(_)
    ));
}

/// A 4 KiB UDP datagram to a port-only catalog, cut at a 1,420-byte MTU: every fragment
/// answers to the rule its first fragment matched, and to its limiter.
#[test]
fn the_fragments_of_a_datagram_follow_its_first_fragment() {
    let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    let sip = |rate, burst| {
        catalog(
            vec![rule("sip", Protocol::Udp, Some(5060), rate, burst)],
            DefaultAction::Drop,
        )
    };
    let (mut e, _clock) = engine(sip(0, 0));
    let src = e.source_key(&vnf("client"));
    let datagram =
        |id| build::ipv4_fragments(a, b, proto::UDP, id, &build::udp(5, 5060, 4088), 1400);
    for f in datagram(1) {
        assert_eq!(e.handle_packet(src, &f), Decision::Pass(Matched::Rule(0)));
    }
    // Later fragments without a first that passed match no port rule: not listed.
    for f in &datagram(2)[1..] {
        assert_eq!(e.handle_packet(src, f), Decision::DropNotListed);
    }
    // Nor do they ride on another source's datagram of the same identification.
    let other = e.source_key(&vnf("intruder"));
    let d3 = datagram(3);
    assert!(e.handle_packet(src, &d3[0]).passes());
    assert_eq!(e.handle_packet(other, &d3[1]), Decision::DropNotListed);
    assert!(e.handle_packet(src, &d3[1]).passes());
    // A first fragment to a port the catalog does not list opens nothing.
    let to_other_port =
        build::ipv4_fragments(a, b, proto::UDP, 4, &build::udp(5, 5061, 4088), 1400);
    for f in &to_other_port {
        assert_eq!(e.handle_packet(src, f), Decision::DropNotListed);
    }
    // A new catalog forgets what the old one passed.
    let d5 = datagram(5);
    assert!(e.handle_packet(src, &d5[0]).passes());
    e.set_catalog(sip(0, 0));
    assert_eq!(e.handle_packet(src, &d5[1]), Decision::DropNotListed);
    // A source has at most FRAGMENTED_PER_SOURCE unfinished datagrams: its next first
    // fragment is refused (as limited) until one finishes.
    let per = FRAGMENTED_PER_SOURCE as u16;
    let unfinished: Vec<Vec<Vec<u8>>> = (0..per).map(|i| datagram(1000 + i)).collect();
    for d in &unfinished {
        assert!(e.handle_packet(src, &d[0]).passes());
    }
    let one_more = datagram(2000);
    assert_eq!(
        e.handle_packet(src, &one_more[0]),
        Decision::DropLimited(Matched::Rule(0))
    );
    // Meanwhile another source's datagrams cross.
    for f in datagram(3000) {
        assert!(e.handle_packet(other, &f).passes());
    }
    for f in &unfinished[0][1..] {
        assert!(e.handle_packet(src, f).passes());
    }
    for f in &one_more {
        assert!(
            e.handle_packet(src, f).passes(),
            "a finished datagram frees its place"
        );
    }
    // In all, FRAGMENTED_DATAGRAMS are remembered: past that the oldest is forgotten
    // (here, the first source's second datagram).
    let sources: Vec<SourceKey> = (0..4)
        .map(|i| e.source_key(&vnf(&format!("s{i}"))))
        .collect();
    // (The first source has FRAGMENTED_PER_SOURCE - 1 unfinished now.)
    let filler = (FRAGMENTED_DATAGRAMS - (FRAGMENTED_PER_SOURCE - 1) + 1) as u16;
    for i in 0..filler {
        let s = sources[usize::from(i) % sources.len()];
        assert!(e.handle_packet(s, &datagram(4000 + i)[0]).passes());
    }
    assert_eq!(
        e.handle_packet(src, &unfinished[1][1]),
        Decision::DropNotListed,
        "the oldest datagram is forgotten"
    );
    assert!(e.handle_packet(src, &unfinished[2][1]).passes());
    // Later fragments count against the rule's limiter: a burst of 16 kbit (2,000
    // bytes) holds the first 1,420-byte fragment, not the second too.
    let (mut e, clock) = engine(sip(8, 16));
    let src = e.source_key(&vnf("client"));
    clock.advance(Duration::from_secs(60));
    let d = datagram(9);
    assert_eq!(
        e.handle_packet(src, &d[0]),
        Decision::Pass(Matched::Rule(0))
    );
    assert_eq!(
        e.handle_packet(src, &d[1]),
        Decision::DropLimited(Matched::Rule(0))
    );
    assert_eq!(e.counters().rules["sip"].limited_packets, 1);
}

/// Fragments sent before their first (the kernel reassembles them in any order) do not
/// take the default's rate to a port whose rule is tighter: alone, they are dropped.
#[test]
fn fragments_sent_before_their_first_are_dropped() {
    let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    let lowered = DefaultAction::Police(Police {
        rate: KbitPerSec(100_000),
        burst: Kbit(100_000),
    });
    let (mut e, clock) = engine(catalog(
        vec![rule("sip", Protocol::Udp, Some(5060), 8, 16)],
        lowered,
    ));
    let src = e.source_key(&vnf("client"));
    clock.advance(Duration::from_secs(60));
    let frags = build::ipv4_fragments(a, b, proto::UDP, 9, &build::udp(5, 5060, 4088), 1400);
    for f in frags[1..].iter().rev() {
        assert_eq!(e.handle_packet(src, f), Decision::DropNotListed);
    }
    assert!(e.handle_packet(src, &frags[0]).passes());
    // Whole packets still take the lowered default.
    let other = build::ipv4(a, b, proto::UDP, &build::udp(5, 7000, 100));
    assert_eq!(
        e.handle_packet(src, &other),
        Decision::Pass(Matched::Default)
    );
}

/// IPv6 reassembles by addresses and identification, with the first fragment's protocol:
/// a later fragment that names another protocol still answers to the first's rule.
#[test]
fn ipv6_later_fragments_cannot_relabel_their_protocol() {
    let (a, b) = (
        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1),
        Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2),
    );
    let (mut e, clock) = engine(catalog(
        vec![
            rule("sip", Protocol::Udp, Some(5060), 8, 16),
            rule("ping", Protocol::Icmp, None, 0, 0),
        ],
        DefaultAction::Drop,
    ));
    let src = e.source_key(&vnf("client"));
    clock.advance(Duration::from_secs(60));
    let udp = build::udp(1, 5060, 16_000);
    let frag = |next: u8, off: usize, more: bool, d: &[u8]| {
        let mut l = vec![next, 0];
        l.extend_from_slice(&(off as u16 | u16::from(more)).to_be_bytes());
        l.extend_from_slice(&7u32.to_be_bytes());
        l.extend_from_slice(d);
        build::ipv6(a, b, 44, &l)
    };
    assert!(
        e.handle_packet(src, &frag(proto::UDP, 0, true, &udp[..1400]))
            .passes()
    );
    let mut passed = 1400;
    for off in (1400..udp.len()).step_by(1400) {
        let end = (off + 1400).min(udp.len());
        let f = frag(proto::ICMPV6, off, end < udp.len(), &udp[off..end]);
        if e.handle_packet(src, &f).passes() {
            passed += end - off;
        }
    }
    assert!(
        passed <= 2_000,
        "{passed} bytes passed a 2,000-byte-burst rule"
    );
    assert!(e.counters().rules["sip"].limited_packets > 0);
    assert_eq!(e.counters().rules["ping"].passed_packets, 0);
}
