//! Property tests: round trips and no panic on arbitrary input, for the chain, D-H, the
//! catalog parser and the policy engine (the wire module has its own, next to it).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use asmn_shared::catalog::{
    DefaultAction, Police, PortRange, Protocol, Rule, SecCatalog, parse_catalog, parse_vnfd,
};
use asmn_shared::chain::{
    ChainProver, ChainSpec, ChainVerifier, DEFAULT_WINDOW, Reveal, RevealError, anchor, seed,
};
use asmn_shared::crypto::{ChainElement, Nonce};
use asmn_shared::dh::{DhKeyPair, Group};
use asmn_shared::ids::{InstanceKey, InstanceName, TenantId, VnfId};
use asmn_shared::policy::packet::{self, Transport, build};
use asmn_shared::policy::{PolicyEngine, SourceKey};
use asmn_shared::units::{Kbit, KbitPerSec};
use governor::clock::FakeRelativeClock;
use proptest::prelude::*;

fn id(n: &[u8; 32], name: &str) -> InstanceKey {
    InstanceKey::derive(
        &TenantId::new("tenant").expect("t"),
        &VnfId::new("vnf").expect("v"),
        &InstanceName::new(name).expect("i"),
        &Nonce::new(*n),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn chain_reveals_with_skips_inside_the_window_all_verify(
        nonce in any::<[u8; 32]>(),
        len in 2u32..400,
        skips in proptest::collection::vec(0u32..=DEFAULT_WINDOW, 0..64),
    ) {
        let key = id(&nonce, "i");
        let spec = ChainSpec::new(key, 0, len).expect("spec");
        let s = seed(&Nonce::new(nonce), &key, b"m", 0);
        let mut v = ChainVerifier::new(spec, anchor(&spec, &s), DEFAULT_WINDOW);
        let mut p = ChainProver::new(spec, s);
        let mut skips = skips.into_iter();
        loop {
            for _ in 0..skips.next().unwrap_or(0) {
                p.reveal();
            }
            let Some(r) = p.reveal() else { break };
            v.accept(&r).expect("genuine reveal");
            let replayed = matches!(v.verify(&r), Err(RevealError::Replayed { .. }));
            prop_assert!(replayed, "a replay must be refused");
        }
    }

    #[test]
    fn chain_refuses_arbitrary_elements(
        nonce in any::<[u8; 32]>(),
        element in any::<[u8; 32]>(),
        index in any::<u32>(),
        epoch in 0u32..3,
    ) {
        let key = id(&nonce, "i");
        let spec = ChainSpec::new(key, 0, 1000).expect("spec");
        let s = seed(&Nonce::new(nonce), &key, b"m", 0);
        let v = ChainVerifier::new(spec, anchor(&spec, &s), DEFAULT_WINDOW);
        let r = Reveal { epoch, index, element: ChainElement::new(element) };
        prop_assert!(v.verify(&r).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn both_sides_derive_the_same_psk_and_outsiders_do_not(
        sa in any::<[u8; 32]>(),
        sb in any::<[u8; 32]>(),
        sc in any::<[u8; 32]>(),
        ea in 0u32..5,
        eb in 0u32..5,
    ) {
        prop_assume!(sa != sc && sb != sc && sa != sb);
        let g = Group::Ffdhe3072;
        let (a, b, c) = (id(&sa, "a"), id(&sb, "b"), id(&sc, "c"));
        let ka = DhKeyPair::derive(g, &ChainElement::new(sa), &a, ea);
        let kb = DhKeyPair::derive(g, &ChainElement::new(sb), &b, eb);
        let ab = ka.preshared_key((&a, ea), (&b, eb), kb.public()).expect("ab");
        let ba = kb.preshared_key((&b, eb), (&a, ea), ka.public()).expect("ba");
        prop_assert_eq!(&ab, &ba);

        // A third party with another chain, posing as a, gets another key with b.
        let kc = DhKeyPair::derive(g, &ChainElement::new(sc), &a, ea);
        let cb = kc.preshared_key((&a, ea), (&b, eb), kb.public()).expect("cb");
        prop_assert_ne!(&cb, &ab);
        let _ = c;

        // Either side at another epoch derives another key.
        let ka2 = DhKeyPair::derive(g, &ChainElement::new(sa), &a, ea + 1);
        let ab2 = ka2.preshared_key((&a, ea + 1), (&b, eb), kb.public()).expect("ab2");
        prop_assert_ne!(&ab2, &ab);
        let kb2 = DhKeyPair::derive(g, &ChainElement::new(sb), &b, eb + 1);
        let ab3 = ka.preshared_key((&a, ea), (&b, eb + 1), kb2.public()).expect("ab3");
        prop_assert_ne!(&ab3, &ab);
    }
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        Just(Protocol::Tcp),
        Just(Protocol::Udp),
        Just(Protocol::Icmp),
        Just(Protocol::Any)
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        protocol(),
        1u16..60000,
        0u16..100,
        proptest::option::of(proptest::collection::btree_set("[a-z][a-z0-9-]{0,8}", 1..4)),
        0u64..10_000_000,
        0u64..100_000,
    )
        .prop_map(|(protocol, lo, span, sources, rate, burst)| Rule {
            name: String::new(),
            protocol,
            ports: protocol.has_ports().then_some(PortRange {
                lo,
                hi: lo.saturating_add(span),
            }),
            sources: sources.map(|s| {
                s.into_iter()
                    .map(|n| VnfId::new(n).expect("vnf"))
                    .collect::<BTreeSet<_>>()
            }),
            police: Police {
                rate: KbitPerSec(rate),
                burst: Kbit(burst),
            },
        })
}

fn catalog_yaml(c: &SecCatalog) -> String {
    let mut y = format!("vnf: {}\nsec_catalog:\n  version: {}\n", c.vnf, c.version);
    match c.default_action {
        DefaultAction::Drop => y.push_str("  default_action: drop\n"),
        DefaultAction::Police(p) => y.push_str(&format!(
            "  default_action:\n    police:\n      ingress_policing_rate: {}\n      ingress_policing_burst: {}\n",
            p.rate.0, p.burst.0
        )),
    }
    y.push_str("  rules:\n");
    for r in &c.rules {
        y.push_str(&format!(
            "    - name: {}\n      protocol: {}\n",
            r.name,
            r.protocol.name()
        ));
        if let Some(p) = r.ports {
            y.push_str(&format!("      port: \"{p}\"\n"));
        }
        if let Some(s) = &r.sources {
            let list: Vec<String> = s.iter().map(|v| v.to_string()).collect();
            y.push_str(&format!("      sources: [{}]\n", list.join(", ")));
        }
        y.push_str(&format!(
            "      ingress_policing_rate: {}\n      ingress_policing_burst: {}\n",
            r.police.rate.0, r.police.burst.0
        ));
    }
    y
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn catalogs_round_trip_through_yaml(
        rules in proptest::collection::vec(rule(), 0..12),
        version in 1u64..1000,
        default_rate in proptest::option::of(1u64..1000),
    ) {
        let mut rules = rules;
        for (i, r) in rules.iter_mut().enumerate() {
            r.name = format!("r{i}");
        }
        let c = SecCatalog {
            vnf: VnfId::new("web").expect("vnf"),
            version,
            gateway: None,
            default_action: default_rate.map_or(DefaultAction::Drop, |r| {
                DefaultAction::Police(Police { rate: KbitPerSec(r), burst: Kbit(0) })
            }),
            rules,
        };
        let text = catalog_yaml(&c);
        let back = parse_catalog("gen.yaml", text.as_bytes()).expect("round trip");
        prop_assert_eq!(back, c);
    }

    #[test]
    fn arbitrary_text_never_panics_the_parsers(text in ".{0,400}") {
        let _ = parse_vnfd("any.yaml", text.as_bytes());
        let _ = parse_catalog("any.yaml", text.as_bytes());
        let wrapped = format!("vnfd:\n  id: x\n  sec_catalog:\n    rules:\n      - {text}\n");
        let _ = parse_vnfd("any.yaml", wrapped.as_bytes());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_policy_engine(
        data in proptest::collection::vec(any::<u8>(), 0..200),
        rules in proptest::collection::vec(rule(), 0..6),
    ) {
        let mut rules = rules;
        for (i, r) in rules.iter_mut().enumerate() {
            r.name = format!("r{i}");
        }
        let c = Arc::new(SecCatalog {
            vnf: VnfId::new("web").expect("vnf"),
            version: 1,
            gateway: None,
            default_action: DefaultAction::Drop,
            rules,
        });
        let mut e = PolicyEngine::new(c, FakeRelativeClock::default());
        let _ = e.handle_packet(SourceKey::UNKNOWN, &data);
        let mut v4 = data.clone();
        if let Some(b) = v4.first_mut() { *b = 0x45; }
        let _ = e.handle_packet(SourceKey::UNKNOWN, &v4);
        let mut v6 = data;
        if let Some(b) = v6.first_mut() { *b = 0x60; }
        let _ = e.handle_packet(SourceKey::UNKNOWN, &v6);
    }

    #[test]
    fn built_packets_parse_back(
        sport in any::<u16>(), dport in any::<u16>(), payload in 0usize..1400, a in any::<[u8; 4]>(), b in any::<[u8; 4]>(), udp in any::<bool>(),
    ) {
        let (src, dst) = (Ipv4Addr::from(a), Ipv4Addr::from(b));
        let l4 = if udp { build::udp(sport, dport, payload) } else { build::tcp(sport, dport, 0x18, payload) };
        let p = build::ipv4(src, dst, if udp { 17 } else { 6 }, &l4);
        let m = packet::parse(&p).expect("parse");
        prop_assert_eq!(m.src, std::net::IpAddr::V4(src));
        prop_assert_eq!(m.dst_port(), Some(dport));
        prop_assert_eq!(m.len, p.len());
        if udp {
            prop_assert_eq!(m.transport, Transport::Udp { src_port: sport, dst_port: dport });
        }
    }
}
