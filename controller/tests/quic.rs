//! Sec-EM over QUIC on loopback: an operator on-boards and instantiates, an agent
//! (simulated with the shared state machines) enrolls; unauthorized and malformed requests
//! are refused and change nothing in the store.

use std::sync::Arc;

mod common;
use common::{
    IMAGE, Lab, Pushes, ask, connect, connect_to, create, enroll_request, enroll_with_prover, lab,
    refused, serve_on,
};

use asmn_controller::pki;
use asmn_controller::store::Store;
use asmn_shared::chain::ChainProver;
use asmn_shared::measure::{Algorithm, measure_bytes};
use asmn_shared::wire::msg::{self, Body, RefusalCode};
use asmn_shared::wire::{BootstrapBundle, FRAME_HEADER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_onboards_and_an_agent_enrolls_over_quic() {
    let lab = lab().await;
    let admin = connect(&lab, true).await;
    let onboard = common::onboard_body(
        IMAGE,
        include_str!("../../images/examples/web-server.vnfd.yaml").into(),
    );
    assert!(matches!(ask(&admin, onboard.clone()).await, Body::Ok(_)));
    let created = ask(
        &admin,
        Body::CreateInstance(msg::CreateInstanceRequest {
            tenant: "t1".into(),
            vnf: "web-server".into(),
            instance: String::new(),
            role: msg::RoleMsg::Vnf as i32,
        }),
    )
    .await;
    let Body::InstanceCreated(bundle_msg) = created else {
        panic!("bundle: {created:?}")
    };
    let bundle = BootstrapBundle::try_from(&bundle_msg).expect("a valid bundle");

    // An agent: no client certificate, the CA pinned from its bundle.
    let agent = connect(&lab, false).await;
    assert_eq!(
        refused(&ask(&agent, onboard).await),
        RefusalCode::NotAuthorized
    );
    let req = enroll_request(&bundle);
    let reply = ask(&agent, Body::Enroll(req.clone())).await;
    let Body::Enrolled(e) = reply else {
        panic!("enrolled: {reply:?}")
    };
    assert_eq!(e.overlay, "10.77.0.1/16");
    // The same reveal again is a replay.
    assert_eq!(
        refused(&ask(&agent, Body::Enroll(req)).await),
        RefusalCode::Replayed
    );
}

async fn record(lab: &Lab, bundle: &BootstrapBundle) -> (String, u64) {
    let v = lab
        .store
        .get(&asmn_controller::registry::instance_key(
            &bundle.instance_key(),
        ))
        .await
        .expect("get")
        .expect("record");
    let r: serde_json::Value = serde_json::from_slice(&v.value).expect("json");
    (
        r["state"]["state"].as_str().unwrap_or("?").to_string(),
        v.revision,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_requests_are_refused_without_changing_state() {
    let lab = lab().await;
    let admin = connect(&lab, true).await;
    ask(
        &admin,
        common::onboard_body(
            IMAGE,
            include_str!("../../images/examples/web-server.vnfd.yaml").into(),
        ),
    )
    .await;
    let agent = connect(&lab, false).await;
    let send_raw = |bytes: Vec<u8>| {
        let agent = agent.clone();
        async move {
            let (mut s, mut r) = agent.open_bi().await.expect("stream");
            s.write_all(&bytes).await.expect("write");
            s.finish().expect("finish");
            let back = r.read_to_end(1 << 20).await.expect("reply");
            asmn_channel::call::decode_one_frame(&back)
                .expect("a framed reply")
                .body
                .expect("body")
        }
    };
    // Each corruption goes to a fresh instance, so its effect is seen alone.
    type Mutation = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let probe = asmn_channel::call::encode_payload(&msg::Envelope {
        request_id: 0,
        body: Some(Body::Enroll(enroll_request(&create(&admin, "probe").await))),
    });
    let mut mutations: Vec<(String, Mutation)> = Vec::new();
    for i in (0..probe.len()).step_by(5) {
        mutations.push((
            format!("flip {i}"),
            Box::new(move |p: &[u8]| {
                let mut p = p.to_vec();
                p[i] ^= 0x08;
                framed_owned(&p)
            }),
        ));
    }
    for cut in [1usize, 40, probe.len() / 2, probe.len() - 1] {
        mutations.push((
            format!("truncated to {cut}"),
            Box::new(move |p: &[u8]| framed_owned(&p[..cut])),
        ));
        mutations.push((
            format!("frame cut at {cut}"),
            Box::new(move |p: &[u8]| framed_owned(p)[..FRAME_HEADER + cut].to_vec()),
        ));
    }
    mutations.push((
        "trailing bytes".into(),
        Box::new(|p: &[u8]| {
            let mut f = framed_owned(p);
            f.extend_from_slice(&[0xff; 9]);
            f
        }),
    ));
    mutations.push((
        "garbage frame".into(),
        Box::new(|_: &[u8]| vec![0xff, 0xff, 0xff, 0xff]),
    ));
    // The Enroll body (field 10) under the tag of another message type (21: Reattested).
    mutations.push((
        "retyped".into(),
        Box::new(|p: &[u8]| {
            let mut p = p.to_vec();
            if let Some(pos) = p.iter().position(|&b| b == (10 << 3 | 2)) {
                p[pos] = 21 << 3 | 2;
            }
            framed_owned(&p)
        }),
    ));

    let (mut refused_clean, mut fakes, mut valid) = (0, 0, 0);
    for (i, (what, mutate)) in mutations.iter().enumerate() {
        let bundle = create(&admin, &format!("web-{i}")).await;
        let payload = asmn_channel::call::encode_payload(&msg::Envelope {
            request_id: 0,
            body: Some(Body::Enroll(enroll_request(&bundle))),
        });
        let before = record(&lab, &bundle).await;
        let answer = send_raw(mutate(&payload)).await;
        let after = record(&lab, &bundle).await;
        match answer {
            Body::Refused(r) => match RefusalCode::try_from(r.code).expect("code") {
                // A well-formed enrollment whose reveal does not verify is a fake VNF.
                RefusalCode::WrongMeasurement => {
                    assert_eq!(after.0, "quarantined", "{what}");
                    fakes += 1;
                }
                code => {
                    assert_eq!(
                        after, before,
                        "{what}: refused ({code:?}) but the record changed"
                    );
                    refused_clean += 1;
                }
            },
            // The corruption left a valid request (a bit in a key or the endpoint): it is
            // processed as such.
            Body::Enrolled(_) => {
                assert_eq!(after.0, "enrolled", "{what}");
                valid += 1;
            }
            other => panic!("{what}: unexpected answer {other:?}"),
        }
    }
    assert!(
        refused_clean > 10 && fakes > 0,
        "refused {refused_clean}, fakes {fakes}, valid {valid}"
    );
    // The server still serves a genuine agent.
    let bundle = create(&admin, "genuine").await;
    assert!(matches!(
        ask(&agent, Body::Enroll(enroll_request(&bundle))).await,
        Body::Enrolled(_)
    ));
}

fn framed_owned(p: &[u8]) -> Vec<u8> {
    let mut f = (p.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(p);
    f
}

/// Reads pushed frames from the agent's push stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalogs_and_revocations_are_pushed_to_enrolled_agents() {
    let lab = lab().await;
    let admin = connect(&lab, true).await;
    ask(
        &admin,
        common::onboard_body(
            IMAGE,
            include_str!("../../images/examples/web-server.vnfd.yaml").into(),
        ),
    )
    .await;
    let a = create(&admin, "web-a").await;
    let b = create(&admin, "web-b").await;
    let agent = connect(&lab, false).await;
    assert!(matches!(
        ask(&agent, Body::Enroll(enroll_request(&a))).await,
        Body::Enrolled(_)
    ));
    let mut pushes = Pushes::open(&agent).await;
    // First, the catalog in force (what a reconnecting agent may have missed).
    let Body::CatalogPush(first) = pushes.next().await else {
        panic!("initial catalog")
    };
    assert_eq!(first.version, 1);

    // A new catalog version for the agent's VNF reaches it.
    let mut c = asmn_shared::catalog::parse_vnfd(
        "x",
        include_bytes!("../../images/examples/web-server.vnfd.yaml"),
    )
    .expect("vnfd")
    .catalog;
    c.rules.truncate(1);
    let t = std::time::Instant::now();
    let applied = ask(
        &admin,
        Body::ApplyCatalog(msg::ApplyCatalogRequest {
            catalog: Some((&c).into()),
        }),
    )
    .await;
    assert!(
        matches!(applied, Body::CatalogApplied(ref x) if x.version == 2),
        "{applied:?}"
    );
    let Body::CatalogPush(got) = pushes.next().await else {
        panic!("catalog push")
    };
    assert_eq!((got.version, got.rules.len()), (2, 1));
    assert!(t.elapsed() < std::time::Duration::from_secs(5));

    // Revoking a peer in the tenant reaches it too.
    let id = b.instance_key();
    let r = ask(
        &admin,
        Body::Revoke(msg::RevokeRequest {
            instance_key: id.as_bytes().to_vec(),
            reason: "test".into(),
        }),
    )
    .await;
    assert!(matches!(r, Body::Ok(_)), "{r:?}");
    let Body::Revoked(n) = pushes.next().await else {
        panic!("revocation push")
    };
    assert_eq!(n.instance_key, id.as_bytes().to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connection_of_an_instance_keeps_its_pushes_when_the_first_closes() {
    let lab = lab().await;
    let admin = connect(&lab, true).await;
    let vnfd = include_str!("../../images/examples/web-server.vnfd.yaml");
    ask(&admin, common::onboard_body(IMAGE, vnfd.into())).await;
    let a = create(&admin, "web-a").await;
    let (first, mut prover) = enroll_with_prover(&a);
    let old = connect(&lab, false).await;
    assert!(matches!(
        ask(&old, Body::Enroll(first.clone())).await,
        Body::Enrolled(_)
    ));
    let mut old_pushes = Pushes::open(&old).await;
    assert!(matches!(old_pushes.next().await, Body::CatalogPush(_)));
    // The agent comes back on a new connection while the old one is still open (a
    // restart faster than the idle timeout), then the old one closes.
    let new = connect(&lab, false).await;
    let again = msg::EnrollRequest {
        reveal: Some((&prover.reveal().expect("next")).into()),
        ..first
    };
    assert!(matches!(
        ask(&new, Body::Enroll(again)).await,
        Body::Enrolled(_)
    ));
    let mut pushes = Pushes::open(&new).await;
    assert!(matches!(pushes.next().await, Body::CatalogPush(c) if c.version == 1));
    old.close(0u32.into(), b"old connection");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Pushes still reach the new connection.
    let mut c = asmn_shared::catalog::parse_vnfd("x", vnfd.as_bytes())
        .expect("vnfd")
        .catalog;
    c.rules.truncate(1);
    let applied = ask(
        &admin,
        Body::ApplyCatalog(msg::ApplyCatalogRequest {
            catalog: Some((&c).into()),
        }),
    )
    .await;
    assert!(matches!(applied, Body::CatalogApplied(ref x) if x.version == 2));
    let pushed = tokio::time::timeout(std::time::Duration::from_secs(5), pushes.next())
        .await
        .expect("the catalog reached the new connection");
    assert!(matches!(pushed, Body::CatalogPush(c) if c.version == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_agent_gets_catalogs_and_revocations_on_reconnect() {
    let lab = lab().await;
    let admin = connect(&lab, true).await;
    let vnfd = include_str!("../../images/examples/web-server.vnfd.yaml");
    ask(&admin, common::onboard_body(IMAGE, vnfd.into())).await;
    let (a, b) = (create(&admin, "web-a").await, create(&admin, "web-b").await);
    let (first, mut prover) = enroll_with_prover(&a);
    let agent = connect(&lab, false).await;
    assert!(matches!(
        ask(&agent, Body::Enroll(first.clone())).await,
        Body::Enrolled(_)
    ));
    let mut pushes = Pushes::open(&agent).await;
    assert!(matches!(pushes.next().await, Body::CatalogPush(c) if c.version == 1));
    agent.close(0u32.into(), b"going away");

    // While it is away: a new catalog version, and a peer revoked.
    let mut c = asmn_shared::catalog::parse_vnfd("x", vnfd.as_bytes())
        .expect("vnfd")
        .catalog;
    c.rules.truncate(2);
    let applied = ask(
        &admin,
        Body::ApplyCatalog(msg::ApplyCatalogRequest {
            catalog: Some((&c).into()),
        }),
    )
    .await;
    assert!(matches!(applied, Body::CatalogApplied(ref x) if x.version == 2));
    let r = ask(
        &admin,
        Body::Revoke(msg::RevokeRequest {
            instance_key: b.instance_key().as_bytes().to_vec(),
            reason: "compromised".into(),
        }),
    )
    .await;
    assert!(matches!(r, Body::Ok(_)), "{r:?}");
    // Let the follower see both before the agent is back.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;

    // Back, authenticated by its next reveal: it is told of both.
    let agent = connect(&lab, false).await;
    let again = msg::EnrollRequest {
        reveal: Some((&prover.reveal().expect("next")).into()),
        ..first
    };
    assert!(matches!(
        ask(&agent, Body::Enroll(again)).await,
        Body::Enrolled(_)
    ));
    let mut pushes = Pushes::open(&agent).await;
    let Body::CatalogPush(c) = pushes.next().await else {
        panic!("catalog on reconnect")
    };
    assert_eq!((c.version, c.rules.len()), (2, 2));
    let Body::Revoked(n) = pushes.next().await else {
        panic!("revocation on reconnect")
    };
    assert_eq!(n.instance_key, b.instance_key().as_bytes().to_vec());
    assert_eq!(n.reason, "compromised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_back_push_catalog_ack_and_reattestation() {
    let lab = lab().await;
    let admin = connect(&lab, true).await;
    let sha = measure_bytes(IMAGE, &[Algorithm::Sha256]).expect("m");
    let golden = sha.get(Algorithm::Sha256).expect("sha").0.clone();
    let golden_copy = golden.clone();
    ask(
        &admin,
        common::onboard_body(
            IMAGE,
            include_str!("../../images/examples/web-server.vnfd.yaml")
                .replace("    gateway: vnf-gw\n", ""),
        ),
    )
    .await;
    let (a, b) = (create(&admin, "web-a").await, create(&admin, "web-b").await);
    let (ca, cb) = (connect(&lab, false).await, connect(&lab, false).await);
    let (req_a, mut prover_a) = enroll_with_prover(&a);
    let Body::Enrolled(ea) = ask(&ca, Body::Enroll(req_a)).await else {
        panic!("a")
    };
    let a_ip = ea.overlay.split('/').next().expect("ip").to_string();
    let Body::Enrolled(eb) = ask(&cb, Body::Enroll(enroll_request(&b))).await else {
        panic!("b")
    };
    let mut pushes_b = Pushes::open(&cb).await;
    assert!(matches!(pushes_b.next().await, Body::CatalogPush(_)));

    // Peer verification needs an enrollment on the connection.
    let stranger = connect(&lab, false).await;
    let probe = Body::VerifyPeer(msg::VerifyPeerRequest {
        overlay: "10.77.0.1".into(),
        source: String::new(),
    });
    assert_eq!(
        refused(&ask(&stranger, probe).await),
        RefusalCode::NotAuthorized
    );

    // a verifies b; b is asked to verify a back, with a's description.
    let b_ip = eb.overlay.split('/').next().expect("ip").to_string();
    let answer = ask(
        &ca,
        Body::VerifyPeer(msg::VerifyPeerRequest {
            overlay: b_ip,
            source: String::new(),
        }),
    )
    .await;
    let Body::Peer(p) = answer else {
        panic!("peer: {answer:?}")
    };
    assert_eq!(p.instance_key, b.instance_key().as_bytes().to_vec());
    let Body::VerifyRequested(v) = pushes_b.next().await else {
        panic!("verify back")
    };
    assert_eq!(
        v.peer.expect("peer").instance_key,
        a.instance_key().as_bytes().to_vec()
    );

    // b acknowledges the catalog it enforces.
    assert!(matches!(
        ask(
            &cb,
            Body::CatalogAck(msg::CatalogAck {
                vnf: "web-server".into(),
                version: 1
            })
        )
        .await,
        Body::Ok(_)
    ));
    let Body::QueryResult(q) = ask(
        &admin,
        Body::Query(msg::QueryRequest {
            what: "instance".into(),
            argument: b.instance_key().to_hex(),
            ..Default::default()
        }),
    )
    .await
    else {
        panic!("query")
    };
    assert!(q.json.contains("\"enforced_catalog\":1"), "{}", q.json);

    // a re-attests with its next element and the golden digest.
    let next = prover_a.reveal().expect("next");
    let reattest = Body::Reattest(msg::ReattestRequest {
        reveal: Some((&next).into()),
        measurement: golden,
        renewal: None,
        dh_public: vec![],
    });
    let Body::Reattested(r) = ask(&ca, reattest).await else {
        panic!("reattested")
    };
    assert_eq!(r.last_index, next.index);

    // a renews its chain (a new key epoch): b, its peer, is pushed a's new D-H value.
    let id = a.instance_key();
    let s1 = asmn_shared::chain::seed(&a.nonce, &id, &golden_copy, 1);
    let spec1 = asmn_shared::chain::ChainSpec::new(id, 1, 64).expect("spec");
    let next1 = ChainProver::new(spec1, s1.clone());
    let dh1 = asmn_shared::dh::DhKeyPair::derive(a.dh_group, &s1, &id, 1);
    let reveal = prover_a.reveal().expect("next");
    let sealed = asmn_shared::chain::seal_renewal(&reveal, &spec1, &next1.anchor());
    let renew = Body::Reattest(msg::ReattestRequest {
        reveal: Some((&reveal).into()),
        measurement: golden_copy.clone(),
        renewal: Some((&sealed).into()),
        dh_public: dh1.public().as_bytes().to_vec(),
    });
    let Body::Reattested(r) = ask(&ca, renew).await else {
        panic!("renewed")
    };
    assert_eq!((r.epoch, r.last_index), (1, 64));
    // The push names a only: its keys go to those Sec-EM admits when they ask again.
    let Body::Rekeyed(notice) = pushes_b.next().await else {
        panic!("a re-keyed")
    };
    assert_eq!(notice.instance_key, id.as_bytes().to_vec());
    let Body::Peer(update) = ask(
        &cb,
        Body::VerifyPeer(msg::VerifyPeerRequest {
            overlay: a_ip.clone(),
            source: String::new(),
        }),
    )
    .await
    else {
        panic!("new keys of a")
    };
    assert_eq!(update.instance_key, id.as_bytes().to_vec());
    assert_eq!(update.epoch, 1);
    assert_eq!(update.dh_public, dh1.public().as_bytes().to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_etcd_push_across_replicas() {
    let Some(cluster) = common::etcd_cluster(1).await else {
        return;
    };
    let pki = pki::generate(&["sec-em".into()], 2025).expect("pki");
    let connect_store = || async {
        Arc::new(
            asmn_controller::store::etcd::EtcdStore::connect(&cluster.url())
                .await
                .expect("etcd"),
        )
    };
    let (addr1, _s1) = serve_on(connect_store().await, &pki);
    let (addr2, _s2) = serve_on(connect_store().await, &pki);
    let admin = connect_to(&pki, addr1, true).await;
    ask(
        &admin,
        common::onboard_body(
            IMAGE,
            include_str!("../../images/examples/web-server.vnfd.yaml")
                .replace("    gateway: vnf-gw\n", ""),
        ),
    )
    .await;
    let (a, b) = (create(&admin, "web-a").await, create(&admin, "web-b").await);
    // a on replica one, b on replica two.
    let (ca, cb) = (
        connect_to(&pki, addr1, false).await,
        connect_to(&pki, addr2, false).await,
    );
    assert!(matches!(
        ask(&ca, Body::Enroll(enroll_request(&a))).await,
        Body::Enrolled(_)
    ));
    let Body::Enrolled(eb) = ask(&cb, Body::Enroll(enroll_request(&b))).await else {
        panic!("b enrolls on replica two")
    };
    let mut pushes_b = Pushes::open(&cb).await;
    assert!(matches!(pushes_b.next().await, Body::CatalogPush(_)));

    // a verifies b through replica one; replica two asks b to verify a back.
    let b_ip = eb.overlay.split('/').next().expect("ip").to_string();
    let answer = ask(
        &ca,
        Body::VerifyPeer(msg::VerifyPeerRequest {
            overlay: b_ip,
            source: String::new(),
        }),
    )
    .await;
    assert!(matches!(answer, Body::Peer(_)), "{answer:?}");
    let Body::VerifyRequested(v) = pushes_b.next().await else {
        panic!("verify back through the other replica")
    };
    assert_eq!(
        v.peer.expect("peer").instance_key,
        a.instance_key().as_bytes().to_vec()
    );

    // A catalog applied through replica one reaches b on replica two.
    let mut c = asmn_shared::catalog::parse_vnfd(
        "x",
        include_bytes!("../../images/examples/web-server.vnfd.yaml"),
    )
    .expect("vnfd")
    .catalog;
    c.gateway = None;
    c.rules.truncate(1);
    let applied = ask(
        &admin,
        Body::ApplyCatalog(msg::ApplyCatalogRequest {
            catalog: Some((&c).into()),
        }),
    )
    .await;
    assert!(matches!(applied, Body::CatalogApplied(_)), "{applied:?}");
    let Body::CatalogPush(got) = pushes_b.next().await else {
        panic!("catalog through the other replica")
    };
    assert_eq!(got.rules.len(), 1);
}

/// An agent that attaches to a tenant with more revocations than a push queue holds
/// (256) still hears of every one: an honest peer must drop its tunnel to each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attaching_agent_hears_of_every_revocation_of_its_tenant() {
    const REVOKED: usize = 300;
    let lab = lab().await;
    let admin = connect(&lab, true).await;
    let vnfd = include_str!("../../images/examples/web-server.vnfd.yaml");
    ask(&admin, common::onboard_body(IMAGE, vnfd.into())).await;
    let mut ids = std::collections::HashSet::new();
    for i in 0..REVOKED {
        let b = create(&admin, &format!("gone-{i}")).await;
        let r = ask(
            &admin,
            Body::Revoke(msg::RevokeRequest {
                instance_key: b.instance_key().as_bytes().to_vec(),
                reason: "test".into(),
            }),
        )
        .await;
        assert!(matches!(r, Body::Ok(_)), "{r:?}");
        ids.insert(b.instance_key().as_bytes().to_vec());
    }
    // The replica's follower has seen them all (its pushes go to nobody yet).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let b = create(&admin, "late").await;
    let c = connect(&lab, false).await;
    assert!(matches!(
        ask(&c, Body::Enroll(enroll_request(&b))).await,
        Body::Enrolled(_)
    ));
    let mut pushes = Pushes::open(&c).await;
    let mut heard = std::collections::HashSet::new();
    while let Some(body) = pushes.within(std::time::Duration::from_secs(3)).await {
        if let Body::Revoked(n) = body {
            heard.insert(n.instance_key);
        }
        if heard.len() == REVOKED {
            break;
        }
    }
    assert_eq!(heard, ids, "{} of {REVOKED} revocations heard", heard.len());
}
