use proptest::prelude::*;

use super::*;
use crate::chain::{ChainProver, ChainSpec, seed};
use crate::dh::DhKeyPair;

fn sample_catalog() -> SecCatalog {
    crate::catalog::parse_vnfd(
        "example",
        include_bytes!("../../../images/examples/web-server.vnfd.yaml"),
    )
    .expect("example")
    .catalog
}

fn sample_enroll() -> Enroll {
    let tenant = TenantId::new("t1").expect("t");
    let vnf = VnfId::new("web").expect("v");
    let instance = InstanceName::new("web-0").expect("i");
    let nonce = Nonce::new([7; 32]);
    let id = InstanceKey::derive(&tenant, &vnf, &instance, &nonce);
    let spec = ChainSpec::new(id, 0, 100).expect("spec");
    let s = seed(&nonce, &id, b"digest", 0);
    let dh = DhKeyPair::derive(Group::Ffdhe3072, &s, &id, 0);
    let reveal = ChainProver::new(spec, s).reveal().expect("reveal");
    Enroll {
        id,
        tenant,
        vnf,
        instance,
        reveal,
        wg_public_key: [9; 32],
        dh_group: Group::Ffdhe3072,
        dh_public: dh.public().clone(),
        endpoint: "192.0.2.10:51820".parse().expect("addr"),
        role: Role::Vnf,
    }
}

fn envelope(body: msg::Body) -> msg::Envelope {
    msg::Envelope {
        request_id: 42,
        body: Some(body),
    }
}

#[test]
fn frames_round_trip_through_the_decoder_in_any_split() {
    let e = envelope(msg::Body::Enroll((&sample_enroll()).into()));
    let mut stream = encode_frame(&e).expect("encode");
    stream.extend(encode_frame(&envelope(msg::Body::Ok(msg::Ack {}))).expect("ack"));
    for split in [1, 3, 4, 5, 17, stream.len()] {
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for part in stream.chunks(split) {
            d.push(part).expect("push");
            while let Some(f) = d.next_frame().expect("frame") {
                got.push(decode_envelope(&f).expect("decode"));
            }
        }
        assert_eq!(got.len(), 2, "split {split}");
        assert_eq!(got[0], e);
        assert_eq!(d.pending(), 0);
    }
}

#[test]
fn oversized_frames_are_refused_before_allocation() {
    let mut d = FrameDecoder::new();
    let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
    assert!(matches!(
        d.push(&huge),
        Err(WireError::FrameTooLarge { .. })
    ));
    // Four gigabytes announced, two bytes at a time: refused at the fourth byte.
    let mut d = FrameDecoder::new();
    d.push(&[0xff, 0xff]).expect("half a header");
    assert!(d.push(&[0xff, 0xff]).is_err());
    let big = msg::QueryResult {
        json: "x".repeat(MAX_FRAME + 1),
        next: String::new(),
    };
    assert!(matches!(
        encode_frame(&big),
        Err(WireError::FrameTooLarge { .. })
    ));
}

#[test]
fn domain_round_trips() {
    let e = sample_enroll();
    let m: msg::EnrollRequest = (&e).into();
    assert_eq!(Enroll::try_from(&m).expect("enroll"), e);

    let c = sample_catalog();
    let cm: msg::CatalogMsg = (&c).into();
    assert_eq!(SecCatalog::try_from(&cm).expect("catalog"), c);

    let p = Peer {
        id: e.id,
        vnf: e.vnf.clone(),
        overlay: "10.77.0.5".parse().expect("ip"),
        endpoint: e.endpoint,
        wg_public_key: [3; 32],
        dh_group: e.dh_group,
        dh_public: e.dh_public.clone(),
        epoch: 2,
        via_gateway: Some("10.77.0.1".parse().expect("gw")),
        role: Role::Gateway,
        protected: true,
    };
    assert_eq!(Peer::try_from(&msg::PeerInfo::from(&p)).expect("peer"), p);

    let b = BootstrapBundle {
        controllers: vec!["127.0.0.1:7443".into()],
        server_name: "sec-em".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----".into(),
        tenant: e.tenant.clone(),
        vnf: e.vnf.clone(),
        instance: e.instance.clone(),
        nonce: Nonce::new([5; 32]),
        chain_length: 10_000,
        role: Role::Vnf,
        dh_group: Group::Ffdhe4096,
    };
    assert_eq!(
        BootstrapBundle::try_from(&msg::BootstrapBundleMsg::from(&b)).expect("bundle"),
        b
    );

    let en = Enrolled {
        overlay: "10.77.0.5/24".parse().expect("overlay"),
        dh_group: Group::Ffdhe3072,
        epoch: 0,
        last_index: 99,
        reattest_interval: std::time::Duration::from_secs(30),
        catalog: c,
    };
    assert_eq!(
        Enrolled::try_from(&msg::EnrollResponse::from(&en)).expect("enrolled"),
        en
    );
}

#[test]
fn conversion_errors_name_the_field() {
    let good: msg::EnrollRequest = (&sample_enroll()).into();
    type Mutation = Box<dyn Fn(&mut msg::EnrollRequest)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "enroll.instance_key",
            Box::new(|m| m.instance_key.pop().map(drop).unwrap_or(())),
        ),
        ("enroll.tenant", Box::new(|m| m.tenant.clear())),
        ("enroll.vnf", Box::new(|m| m.vnf = "bad name".into())),
        ("enroll.reveal", Box::new(|m| m.reveal = None)),
        (
            "reveal.element",
            Box::new(|m| {
                if let Some(r) = m.reveal.as_mut() {
                    r.element.truncate(5);
                }
            }),
        ),
        (
            "enroll.wg_public_key",
            Box::new(|m| m.wg_public_key.push(0)),
        ),
        (
            "enroll.dh_group",
            Box::new(|m| m.dh_group = "ffdhe2048".into()),
        ),
        ("enroll.dh_public", Box::new(|m| m.dh_public = vec![0; 384])),
        (
            "enroll.endpoint",
            Box::new(|m| m.endpoint = "0.0.0.0:1".into()),
        ),
        ("enroll.role", Box::new(|m| m.role = 99)),
    ];
    for (field, mutate) in cases {
        let mut m = good.clone();
        mutate(&mut m);
        let err = Enroll::try_from(&m).expect_err(field).to_string();
        assert!(err.contains(field), "{err} should name {field}");
    }
    let bad_catalog = msg::CatalogMsg {
        vnf: "web".into(),
        rules: vec![msg::RuleMsg {
            name: "r".into(),
            protocol: msg::ProtocolMsg::Icmp as i32,
            port_lo: 5,
            port_hi: 5,
            ..Default::default()
        }],
        ..Default::default()
    };
    let err = SecCatalog::try_from(&bad_catalog)
        .expect_err("icmp port")
        .to_string();
    assert!(err.contains("catalog") && err.contains("port"), "{err}");
}

#[test]
fn flipped_truncated_and_retyped_messages_never_panic() {
    let frame =
        encode_frame(&envelope(msg::Body::Enroll((&sample_enroll()).into()))).expect("encode");
    let payload = &frame[FRAME_HEADER..];
    for i in 0..payload.len() {
        for bit in 0..8 {
            let mut p = payload.to_vec();
            p[i] ^= 1 << bit;
            if let Ok(env) = decode_envelope(&p)
                && let Some(msg::Body::Enroll(m)) = env.body
            {
                let _ = Enroll::try_from(&m);
            }
        }
        let _ = decode_envelope(&payload[..i]);
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        crate::fuzzing::wire(&data);
    }

    #[test]
    fn catalogs_round_trip(rate in 0u64..1_000_000, burst in 0u64..100_000, lo in 1u16..1000, span in 0u16..1000, default_rate in 1u64..1000) {
        let mut c = sample_catalog();
        c.rules[0].police = Police { rate: KbitPerSec(rate), burst: Kbit(burst) };
        c.rules[0].ports = Some(PortRange { lo, hi: lo + span });
        c.default_action = DefaultAction::Police(Police { rate: KbitPerSec(default_rate), burst: Kbit(0) });
        let m: msg::CatalogMsg = (&c).into();
        let back = SecCatalog::try_from(&m).expect("round trip");
        prop_assert_eq!(back, c);
    }
}

#[test]
fn operator_and_agent_requests_are_validated_once_in_the_wire_layer() {
    let ok = msg::VerifyPeerRequest {
        overlay: "10.77.0.2".into(),
        source: String::new(),
    };
    assert_eq!(
        VerifyPeer::try_from(&ok).expect("valid"),
        VerifyPeer {
            overlay: "10.77.0.2".parse().expect("ip"),
            source: None
        }
    );
    for (overlay, source) in [("10.77.0.2/16", ""), ("x", ""), ("10.77.0.2", "nope")] {
        let m = msg::VerifyPeerRequest {
            overlay: overlay.into(),
            source: source.into(),
        };
        assert!(VerifyPeer::try_from(&m).is_err(), "{overlay} {source}");
    }
    let keys = msg::PublishKeys {
        wg_public_key: vec![1; 31],
        dh_public: vec![2; 384],
        epoch: 1,
    };
    assert!(PublishKeys::try_from(&keys).is_err());
    let create = msg::CreateInstanceRequest {
        tenant: "t1".into(),
        vnf: "web".into(),
        instance: String::new(),
        role: 0,
    };
    let c = CreateInstance::try_from(&create).expect("valid");
    assert_eq!((c.instance, c.role), (None, Role::Vnf));
    for bad in [
        msg::CreateInstanceRequest {
            tenant: String::new(),
            ..create.clone()
        },
        msg::CreateInstanceRequest {
            vnf: "Not A Name".into(),
            ..create.clone()
        },
        msg::CreateInstanceRequest {
            role: 99,
            ..create.clone()
        },
    ] {
        assert!(CreateInstance::try_from(&bad).is_err(), "{bad:?}");
    }
    let revoke = msg::RevokeRequest {
        instance_key: vec![7; 32],
        reason: "x".repeat(1000),
    };
    assert_eq!(Revoke::try_from(&revoke).expect("valid").reason.len(), 256);
    assert!(
        Revoke::try_from(&msg::RevokeRequest {
            instance_key: vec![7; 31],
            reason: String::new()
        })
        .is_err()
    );
    assert!(
        digests(&[msg::DigestMsg {
            algorithm: "sha256".into(),
            value: vec![0; 31],
        }])
        .is_err()
    );
    assert!(
        digests(&[msg::DigestMsg {
            algorithm: "whirlpool".into(),
            value: vec![0; 64],
        }])
        .is_err()
    );
    assert_eq!(
        digests(&[msg::DigestMsg {
            algorithm: "sha256".into(),
            value: vec![0; 32],
        }])
        .expect("valid")
        .len(),
        1
    );
}
