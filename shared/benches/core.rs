//! Benchmarks of the pure core: `cargo bench -p asmn-shared`.
//!
//! - `policy/*`: classifier plus limiter per packet with a 20-rule catalog on the real
//!   (TSC) clock, for a packet matching an early rule, the last rule, and no rule;
//! - `dh/psk_ffdhe3072`: one PSK derivation (validate R, one modular exponentiation, HKDF);
//! - `chain/*`: a reveal (amortized and at a segment boundary, the worst case) and a
//!   verification, on a 1,000,000-element chain.

use std::hint::black_box;
use std::sync::Arc;

use asmn_shared::catalog::{DefaultAction, Police, PortRange, Protocol, Rule, SecCatalog};
use asmn_shared::chain::{ChainProver, ChainSpec, ChainVerifier, anchor, seed};
use asmn_shared::crypto::{ChainElement, Nonce};
use asmn_shared::dh::{DhKeyPair, Group};
use asmn_shared::ids::{InstanceKey, InstanceName, TenantId, VnfId};
use asmn_shared::policy::PolicyEngine;
use asmn_shared::policy::packet::build;
use asmn_shared::units::{Kbit, KbitPerSec};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use governor::clock::QuantaClock;

fn catalog_20() -> Arc<SecCatalog> {
    let rules = (0..20u16)
        .map(|i| Rule {
            name: format!("r{i}"),
            protocol: if i % 2 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            ports: Some(PortRange {
                lo: 1000 + i * 10,
                hi: 1000 + i * 10 + 5,
            }),
            sources: None,
            // 1 Gbit/s: every packet costs whole GCRA cells, so governor's check runs on
            // each one (it admits or refuses; both are the cost being measured).
            police: Police {
                rate: KbitPerSec(1_000_000),
                burst: Kbit(100_000),
            },
        })
        .collect();
    Arc::new(SecCatalog {
        vnf: VnfId::new("server").expect("vnf"),
        version: 1,
        gateway: None,
        default_action: DefaultAction::Drop,
        rules,
    })
}

fn policy(c: &mut Criterion) {
    let mut engine = PolicyEngine::new(catalog_20(), QuantaClock::default());
    let src = engine.source_key(&VnfId::new("client").expect("vnf"));
    let first = build::tcp4(1000, 64);
    let last = build::ipv4(
        std::net::Ipv4Addr::new(10, 0, 0, 1),
        std::net::Ipv4Addr::new(10, 0, 0, 2),
        17,
        &build::udp(5, 1190, 36),
    );
    let none = build::tcp4(22, 64);
    let mut g = c.benchmark_group("policy");
    g.bench_function("first_rule", |b| {
        b.iter(|| engine.handle_packet(src, black_box(&first)))
    });
    g.bench_function("last_of_20_rules", |b| {
        b.iter(|| engine.handle_packet(src, black_box(&last)))
    });
    g.bench_function("no_match", |b| {
        b.iter(|| engine.handle_packet(src, black_box(&none)))
    });
    g.finish();
}

fn id(n: u8) -> InstanceKey {
    InstanceKey::derive(
        &TenantId::new("t").expect("t"),
        &VnfId::new("v").expect("v"),
        &InstanceName::new(format!("i{n}")).expect("i"),
        &Nonce::new([n; 32]),
    )
}

fn dh(c: &mut Criterion) {
    let (a, b) = (id(1), id(2));
    let ka = DhKeyPair::derive(Group::Ffdhe3072, &ChainElement::new([1; 32]), &a, 0);
    let kb = DhKeyPair::derive(Group::Ffdhe3072, &ChainElement::new([2; 32]), &b, 0);
    let peer = kb.public().clone();
    let mut g = c.benchmark_group("dh");
    g.sample_size(30);
    g.bench_function("psk_ffdhe3072", |bch| {
        bch.iter(|| {
            ka.preshared_key((&a, 0), (&b, 0), black_box(&peer))
                .expect("psk")
        })
    });
    g.bench_function("keypair_ffdhe3072", |bch| {
        bch.iter(|| DhKeyPair::derive(Group::Ffdhe3072, &ChainElement::new([3; 32]), &a, 0))
    });
    g.finish();
}

fn chain(c: &mut Criterion) {
    let key = id(9);
    let spec = ChainSpec::new(key, 0, 1_000_000).expect("spec");
    let s = seed(&Nonce::new([9; 32]), &key, b"digest", 0);
    let mut g = c.benchmark_group("chain");
    g.sample_size(20);
    // A prover positioned just above a segment boundary: its next reveal recomputes a
    // whole segment (the worst case).
    g.bench_function("reveal_worst_case_1m", |b| {
        b.iter_batched(
            || {
                let mut p = ChainProver::resume(spec, s.clone(), 999_000);
                p.reveal();
                p
            },
            |mut p| p.reveal(),
            BatchSize::LargeInput,
        )
    });
    let mut p = ChainProver::new(spec, s.clone());
    g.bench_function("reveal_amortized_1m", |b| {
        b.iter(|| {
            if p.remaining() == 0 {
                p = ChainProver::new(spec, s.clone());
            }
            p.reveal()
        })
    });
    let a = anchor(&spec, &s);
    let v = ChainVerifier::new(spec, a, 16);
    let mut q = ChainProver::new(spec, s.clone());
    let r = q.reveal().expect("reveal");
    g.bench_function("verify", |b| {
        b.iter(|| v.verify(black_box(&r)).expect("ok"))
    });
    g.finish();
}

criterion_group!(benches, policy, dh, chain);
criterion_main!(benches);
