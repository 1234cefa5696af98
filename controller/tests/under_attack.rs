//! Sec-EM under attack, over QUIC on loopback: what someone without credentials can make
//! it hold (connections, streams, time), what an enrolled agent may ask, who may use the
//! operator's verbs, and what an agent of one tenant learns of another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use asmn_controller::config::Limits;
use asmn_controller::metrics::Metrics;
use asmn_controller::store::embedded::EmbeddedStore;
use asmn_shared::wire::BootstrapBundle;
use asmn_shared::wire::msg::{self, Body, RefusalCode};
use common::{IMAGE, Pushes, ask, create, enroll_request, refused, serve_with};

/// A Sec-EM within `limits` on loopback, with its metrics.
struct Guarded {
    _dir: tempfile::TempDir,
    pki: asmn_controller::pki::Pki,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    _server: tokio::task::JoinHandle<()>,
}

fn guarded(limits: Limits) -> Guarded {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = asmn_controller::pki::generate(&["sec-em".into()], 2025).expect("pki");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("store"));
    let metrics = Metrics::new();
    let (addr, server) = serve_with(store, &pki, limits, Some(Arc::clone(&metrics)));
    Guarded {
        _dir: dir,
        pki,
        addr,
        metrics,
        _server: server,
    }
}

/// The value of `asmn_guard_events_total{event="<event>"}`.
fn guard_events(m: &Metrics, event: &str) -> u64 {
    let text = m.render();
    let needle = format!("asmn_guard_events_total{{event=\"{event}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A connection from `from` (a loopback address) presenting `identity`, or the error.
async fn dial(
    g: &Guarded,
    from: &str,
    identity: Option<(&str, &str)>,
) -> Result<quinn::Connection, String> {
    let ep = asmn_channel::tls::client_on(
        format!("{from}:0").parse().expect("bind"),
        &g.pki.ca_cert,
        identity,
    )
    .map_err(|e| e.to_string())?;
    let connecting = ep.connect(g.addr, "sec-em").map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

fn admin_identity(g: &Guarded) -> Option<(&str, &str)> {
    Some((g.pki.admin_cert.as_str(), g.pki.admin_key.as_str()))
}

/// Whether `c` can complete one request now (a harmless refused one).
async fn answers(c: &quinn::Connection) -> bool {
    let env = msg::Envelope {
        request_id: 1,
        body: Some(Body::CatalogAck(msg::CatalogAck {
            vnf: "x".into(),
            version: 1,
        })),
    };
    asmn_channel::call::request(c, &env, Duration::from_secs(3))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_per_source_and_in_total_and_must_enroll_in_time() {
    let g = guarded(Limits {
        max_connections: 6,
        max_connections_per_source: 4,
        enroll_deadline: Duration::from_secs(2),
        ..Limits::default()
    });
    // Four silent connections from one address are admitted; the fifth is refused.
    let mut held = Vec::new();
    for i in 0..4 {
        held.push(
            dial(&g, "127.0.0.1", None)
                .await
                .unwrap_or_else(|e| panic!("connection {i}: {e}")),
        );
    }
    assert!(dial(&g, "127.0.0.1", None).await.is_err());
    assert!(guard_events(&g.metrics, "refused_source") >= 1);
    // Another address gets the two places left in total, then the total cap holds.
    held.push(
        dial(&g, "127.0.0.2", None)
            .await
            .expect("fifth, other source"),
    );
    held.push(
        dial(&g, "127.0.0.2", None)
            .await
            .expect("sixth, other source"),
    );
    assert!(dial(&g, "127.0.0.3", None).await.is_err());
    assert!(guard_events(&g.metrics, "refused_total") >= 1);

    // None of them enrolls: each is closed at the deadline, and its place is free again.
    let started = Instant::now();
    for c in &held {
        let reason = tokio::time::timeout(Duration::from_secs(5), c.closed())
            .await
            .expect("closed by Sec-EM within the deadline");
        assert!(
            reason.to_string().contains("enroll"),
            "closed for another reason: {reason}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(guard_events(&g.metrics, "enroll_deadline") >= 6);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let admin = dial(&g, "127.0.0.1", admin_identity(&g))
        .await
        .expect("places are free again");
    // An operator is not held to the enrollment deadline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(answers(&admin).await, "the admin connection stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_holds_few_streams_and_none_beyond_the_request_deadline() {
    let g = guarded(Limits {
        request_deadline: Duration::from_secs(1),
        enroll_deadline: Duration::from_secs(30),
        ..Limits::default()
    });
    let c = dial(&g, "127.0.0.1", None).await.expect("connect");
    // Two streams, each with half a frame and no end: the most a stranger may hold.
    let mut open = Vec::new();
    for _ in 0..2 {
        let (mut send, recv) = c.open_bi().await.expect("stream");
        send.write_all(&[0, 0, 0x40, 0])
            .await
            .expect("a header of 16 KiB");
        send.write_all(&[0u8; 100]).await.expect("part of it");
        open.push((send, recv));
    }
    // A third cannot even open while they are held.
    let third = tokio::time::timeout(Duration::from_millis(500), async {
        let (mut s, _r) = c.open_bi().await.expect("open");
        // Opening is lazy in quinn: writing is what needs the stream credit.
        s.write_all(b"x").await
    })
    .await;
    assert!(third.is_err(), "a third stream while two are held");
    // At the request deadline Sec-EM resets them, and the connection can ask again.
    for (_send, mut recv) in open {
        let r = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1 << 16))
            .await
            .expect("the held stream is ended by Sec-EM");
        assert!(r.is_err(), "reset, not answered: {r:?}");
    }
    assert!(guard_events(&g.metrics, "request_deadline") >= 2);
    assert!(answers(&c).await, "the connection can still ask");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_new_connections_prove_their_address_first() {
    let g = guarded(Limits {
        retry_above: 1,
        ..Limits::default()
    });
    let first = dial(&g, "127.0.0.1", None).await.expect("first");
    assert_eq!(guard_events(&g.metrics, "retry"), 0);
    // Above one connection, a new one is sent a Retry: a real client answers it and gets
    // in; a spoofed source never would.
    let second = dial(&g, "127.0.0.1", None)
        .await
        .expect("second, after a Retry");
    assert!(guard_events(&g.metrics, "retry") >= 1);
    assert!(answers(&first).await && answers(&second).await);
}

/// On-boards the example VNF (without its gateway) through `admin`.
async fn onboard(admin: &quinn::Connection) {
    let vnfd = include_str!("../../images/examples/web-server.vnfd.yaml")
        .replace("    gateway: vnf-gw\n", "");
    assert!(matches!(
        ask(admin, common::onboard_body(IMAGE, vnfd)).await,
        Body::Ok(_)
    ));
}

async fn create_in(
    admin: &quinn::Connection,
    tenant: &str,
    vnf: &str,
    name: &str,
) -> BootstrapBundle {
    let body = ask(
        admin,
        Body::CreateInstance(msg::CreateInstanceRequest {
            tenant: tenant.into(),
            vnf: vnf.into(),
            instance: name.into(),
            role: msg::RoleMsg::Vnf as i32,
        }),
    )
    .await;
    let Body::InstanceCreated(b) = body else {
        panic!("bundle: {body:?}")
    };
    BootstrapBundle::try_from(&b).expect("bundle")
}

/// Enrolls `bundle` on a new connection; returns it and its overlay address.
async fn enroll(g: &Guarded, bundle: &BootstrapBundle) -> (quinn::Connection, String) {
    let c = dial(g, "127.0.0.1", None).await.expect("agent");
    let Body::Enrolled(e) = ask(&c, Body::Enroll(enroll_request(bundle))).await else {
        panic!("enrolled")
    };
    let ip = e.overlay.split('/').next().expect("ip").to_string();
    (c, ip)
}

fn verify(ip: &str) -> Body {
    Body::VerifyPeer(msg::VerifyPeerRequest {
        overlay: ip.into(),
        source: String::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_verifications_are_rate_limited_per_agent() {
    let g = guarded(Limits {
        verify_peer_per_sec: 2,
        ..Limits::default()
    });
    let admin = dial(&g, "127.0.0.1", admin_identity(&g))
        .await
        .expect("admin");
    onboard(&admin).await;
    let (a, b) = (create(&admin, "web-a").await, create(&admin, "web-b").await);
    let (ca, _) = enroll(&g, &a).await;
    let (cb, b_ip) = enroll(&g, &b).await;
    // A burst of twice the rate passes; the rest are refused as rate-limited, not served.
    let mut codes = Vec::new();
    for _ in 0..10 {
        codes.push(match ask(&ca, verify(&b_ip)).await {
            Body::Peer(_) => None,
            other => Some(refused(&other)),
        });
    }
    let served = codes.iter().filter(|c| c.is_none()).count();
    assert!((4..=5).contains(&served), "{codes:?}");
    assert!(
        codes
            .iter()
            .flatten()
            .all(|c| *c == RefusalCode::RateLimited),
        "{codes:?}"
    );
    // Another agent's budget is its own.
    assert!(matches!(ask(&cb, verify("10.77.0.1")).await, Body::Peer(_)));
    // And the limited agent gets its budget back within a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(ask(&ca, verify(&b_ip)).await, Body::Peer(_)));
}

/// Every operator verb, with harmless arguments.
fn operator_verbs() -> Vec<Body> {
    vec![
        common::onboard_body(IMAGE, "vnf: x".into()),
        Body::CreateInstance(msg::CreateInstanceRequest {
            tenant: "t1".into(),
            vnf: "web-server".into(),
            instance: "intruder".into(),
            role: 1,
        }),
        Body::Revoke(msg::RevokeRequest {
            instance_key: vec![0; 32],
            reason: "x".into(),
        }),
        Body::ApplyCatalog(msg::ApplyCatalogRequest { catalog: None }),
        Body::Query(msg::QueryRequest {
            what: "instances".into(),
            ..Default::default()
        }),
        Body::ShowCatalog(msg::ShowCatalogRequest {
            vnf: "web-server".into(),
        }),
        Body::RevokeAdmin(msg::RevokeAdminRequest {
            serial: "01".into(),
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_verbs_are_refused_to_everyone_but_an_admin() {
    let g = guarded(Limits::default());
    let admin = dial(&g, "127.0.0.1", admin_identity(&g))
        .await
        .expect("admin");
    onboard(&admin).await;
    let bundle = create(&admin, "web-a").await;

    // Without a certificate, and on an enrolled agent's session: refused, every verb.
    let stranger = dial(&g, "127.0.0.1", None).await.expect("stranger");
    let (agent, _) = enroll(&g, &bundle).await;
    for who in [&stranger, &agent] {
        for verb in operator_verbs() {
            let answer = ask(who, verb.clone()).await;
            assert_eq!(refused(&answer), RefusalCode::NotAuthorized, "{verb:?}");
        }
    }
    // A certificate from a foreign CA, and Sec-EM's own server certificate presented as
    // a client's: Sec-EM rejects the handshake (TLS 1.3 lets the client believe it
    // finished, so the proof is that no request is ever answered).
    let foreign = asmn_controller::pki::generate(&["sec-em".into()], 2025).expect("pki");
    for identity in [
        (foreign.admin_cert.as_str(), foreign.admin_key.as_str()),
        (g.pki.server_cert.as_str(), g.pki.server_key.as_str()),
    ] {
        if let Ok(c) = dial(&g, "127.0.0.1", Some(identity)).await {
            for verb in operator_verbs() {
                let env = msg::Envelope {
                    request_id: 1,
                    body: Some(verb),
                };
                let r = asmn_channel::call::request(&c, &env, Duration::from_secs(3)).await;
                assert!(
                    matches!(r, Err(asmn_channel::call::CallError::Unreachable(_))),
                    "answered: {r:?}"
                );
            }
        }
    }

    // A second operator's certificate, revoked by the first: refused from then on, on a
    // connection made before the revocation too; the first still works.
    let (cert2, key2, serial2) =
        asmn_controller::pki::issue_admin(&g.pki.ca_cert, &g.pki.ca_key, "ops-2", 2025)
            .expect("issue");
    let second = dial(&g, "127.0.0.1", Some((&cert2, &key2)))
        .await
        .expect("second admin");
    assert!(matches!(
        ask(
            &second,
            Body::Query(msg::QueryRequest {
                what: "instances".into(),
                ..Default::default()
            })
        )
        .await,
        Body::QueryResult(_)
    ));
    assert!(matches!(
        ask(
            &admin,
            Body::RevokeAdmin(msg::RevokeAdminRequest {
                serial: serial2.clone()
            })
        )
        .await,
        Body::Ok(_)
    ));
    for verb in operator_verbs() {
        assert_eq!(
            refused(&ask(&second, verb.clone()).await),
            RefusalCode::NotAuthorized,
            "{verb:?}"
        );
    }
    let again = dial(&g, "127.0.0.1", Some((&cert2, &key2)))
        .await
        .expect("connects (TLS is fine)");
    assert_eq!(
        refused(&ask(&again, operator_verbs().remove(4)).await),
        RefusalCode::NotAuthorized
    );
    let Body::QueryResult(r) = ask(
        &admin,
        Body::Query(msg::QueryRequest {
            what: "admin-revoked".into(),
            ..Default::default()
        }),
    )
    .await
    else {
        panic!("the deny-list")
    };
    assert!(r.json.contains(&serial2), "{}", r.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_asks_for_and_is_pushed_nothing_of_another_tenant() {
    let g = guarded(Limits::default());
    let admin = dial(&g, "127.0.0.1", admin_identity(&g))
        .await
        .expect("admin");
    onboard(&admin).await;
    // Two tenants with the same VNF and instance names: their overlay addresses overlap.
    let a1 = create_in(&admin, "red", "web-server", "web-a").await;
    let a2 = create_in(&admin, "blue", "web-server", "web-a").await;
    let b2 = create_in(&admin, "blue", "web-server", "web-b").await;
    let (red, red_ip) = enroll(&g, &a1).await;
    let mut red_pushes = Pushes::open(&red).await;
    assert!(matches!(red_pushes.next().await, Body::CatalogPush(_)));
    let (blue_a, blue_a_ip) = enroll(&g, &a2).await;
    let (blue_b, blue_b_ip) = enroll(&g, &b2).await;
    let mut blue_b_pushes = Pushes::open(&blue_b).await;
    assert!(matches!(blue_b_pushes.next().await, Body::CatalogPush(_)));
    assert_eq!(red_ip, blue_a_ip, "the tenants' addresses overlap");

    // red asks for blue's addresses: its own tenant has nobody there.
    assert_eq!(
        refused(&ask(&red, verify(&blue_b_ip)).await),
        RefusalCode::PeerUnknown
    );
    // blue's web-a verifies blue's web-b: only blue's web-b is asked to verify back.
    let Body::Peer(p) = ask(&blue_a, verify(&blue_b_ip)).await else {
        panic!("blue verifies blue")
    };
    assert_eq!(p.instance_key, b2.instance_key().as_bytes().to_vec());
    assert!(matches!(
        blue_b_pushes.next().await,
        Body::VerifyRequested(_)
    ));
    // blue's web-b is revoked: the revocation goes to blue's agents, never to red's.
    assert!(matches!(
        ask(
            &admin,
            Body::Revoke(msg::RevokeRequest {
                instance_key: b2.instance_key().as_bytes().to_vec(),
                reason: "test".into(),
            })
        )
        .await,
        Body::Ok(_)
    ));
    let leaked = red_pushes.within(Duration::from_secs(2)).await;
    assert!(leaked.is_none(), "red was pushed {leaked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_come_in_pages_that_fit_a_frame() {
    let g = guarded(Limits::default());
    let admin = dial(&g, "127.0.0.1", admin_identity(&g))
        .await
        .expect("admin");
    onboard(&admin).await;
    // 130 instances, 70 of them enrolled: an enrolled record carries its keys and is
    // twice the size.
    let n = 130;
    let mut held = Vec::new();
    for i in 0..n {
        let b = create(&admin, &format!("web-{i:03}")).await;
        if i < 70 {
            held.push(enroll(&g, &b).await.0);
        }
    }
    let mut ids = Vec::new();
    let mut after = String::new();
    let mut pages = 0;
    for _ in 0..20 {
        let Body::QueryResult(r) = ask(
            &admin,
            Body::Query(msg::QueryRequest {
                what: "instances".into(),
                after: after.clone(),
                ..Default::default()
            }),
        )
        .await
        else {
            panic!("a page")
        };
        pages += 1;
        let page: Vec<serde_json::Value> = serde_json::from_str(&r.json).expect("json");
        assert!(
            !page.is_empty() && page.len() <= 64,
            "{} records",
            page.len()
        );
        assert!(r.json.len() < asmn_shared::wire::MAX_FRAME);
        ids.extend(
            page.iter()
                .map(|v| v["id"].as_str().expect("id").to_string()),
        );
        if r.next.is_empty() {
            break;
        }
        after = r.next;
    }
    assert!(pages >= 3, "{pages} pages");
    let unique: std::collections::BTreeSet<_> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (n, n), "every instance once");

    // The audit log, from record 100 on, filtered by kind, in pages: up to the head, the
    // last creation.
    let Body::QueryResult(head) = ask(
        &admin,
        Body::Query(msg::QueryRequest {
            what: "audit-checkpoint".into(),
            ..Default::default()
        }),
    )
    .await
    else {
        panic!("the head")
    };
    let head: serde_json::Value = serde_json::from_str(&head.json).expect("json");
    let last = head["seq"].as_u64().expect("seq");
    assert!(last > 130, "{head}");
    // Every record from 100 on, in pages, filtered by kind or not.
    let read = |filter: &'static str| {
        let admin = admin.clone();
        async move {
            let mut out = Vec::new();
            let mut after = "100".to_string();
            for _ in 0..100 {
                let Body::QueryResult(r) = ask(
                    &admin,
                    Body::Query(msg::QueryRequest {
                        what: "audit".into(),
                        argument: filter.into(),
                        after: after.clone(),
                        limit: 10,
                    }),
                )
                .await
                else {
                    panic!("a page")
                };
                let page: Vec<serde_json::Value> = serde_json::from_str(&r.json).expect("json");
                assert!(!page.is_empty() || r.next.is_empty());
                out.extend(page.iter().map(|v| {
                    (
                        v["seq"].as_u64().expect("seq"),
                        v["kind"].as_str().expect("kind").to_string(),
                    )
                }));
                if r.next.is_empty() {
                    break;
                }
                after = r.next;
            }
            out
        }
    };
    let all = read("").await;
    assert_eq!(
        all.iter().map(|(s, _)| *s).collect::<Vec<u64>>(),
        (100..=last).collect::<Vec<u64>>(),
        "every record once, in order"
    );
    let created: Vec<_> = all
        .into_iter()
        .filter(|(_, k)| k == "instance.created")
        .collect();
    assert!(created.len() > 20);
    assert_eq!(read("instance.created").await, created);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_trying_identities_is_slowed_and_others_are_not() {
    let g = guarded(Limits {
        stranger_requests_per_source_per_sec: 5,
        enroll_deadline: Duration::from_secs(60),
        ..Limits::default()
    });
    let admin = dial(&g, "127.0.0.1", admin_identity(&g))
        .await
        .expect("admin");
    onboard(&admin).await;
    let bundle = create(&admin, "web-a").await;
    let template = enroll_request(&bundle);
    // 30 enrollments with made-up identities from one address: 10 at once (the burst),
    // then 5 a second.
    let attacker = dial(&g, "127.0.0.2", None).await.expect("attacker");
    let flood = {
        let attacker = attacker.clone();
        let template = template.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            for i in 0..30u8 {
                let mut req = template.clone();
                req.instance_key = vec![i; 32];
                assert_eq!(
                    refused(&ask(&attacker, Body::Enroll(req)).await),
                    RefusalCode::UnknownInstance
                );
            }
            started.elapsed()
        })
    };
    // Meanwhile an agent from its own address enrolls at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let (_agent, _) = enroll(&g, &bundle).await;
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the agent waited {:?}",
        t.elapsed()
    );
    let took = flood.await.expect("flood");
    assert!(took >= Duration::from_secs(3), "30 requests in {took:?}");
    assert!(guard_events(&g.metrics, "stranger_throttled") >= 10);
}

/// Forwards datagrams from a client to Sec-EM as if they came from `spoofed` (a socket
/// bound there), and drops Sec-EM's answers: handshakes from a source address that never
/// finish, as an attacker forging that address would make. Returns the address clients
/// connect to.
async fn spoofing_relay(
    target: SocketAddr,
    spoofed: &str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let inbound = tokio::net::UdpSocket::bind("127.0.0.6:0")
        .await
        .expect("bind");
    let outbound = tokio::net::UdpSocket::bind(format!("{spoofed}:0"))
        .await
        .expect("bind spoofed");
    let addr = inbound.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut buf, mut sink) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        // Bounded by the test: aborted when it ends.
        loop {
            tokio::select! {
                r = inbound.recv_from(&mut buf) => {
                    let Ok((n, _)) = r else { return };
                    let _ = outbound.send_to(&buf[..n], target).await;
                }
                r = outbound.recv_from(&mut sink) => {
                    if r.is_err() { return; }
                    // Sec-EM's answer to the forged source: dropped.
                }
            }
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_handshakes_cannot_take_a_real_sources_places() {
    let g = guarded(Limits {
        max_connections_per_source: 4,
        enroll_deadline: Duration::from_secs(30),
        ..Limits::default()
    });
    let (relay, task) = spoofing_relay(g.addr, "127.0.0.5").await;
    // Eight handshakes "from" 127.0.0.5 that will never finish.
    let ep =
        asmn_channel::tls::client_on("127.0.0.7:0".parse().expect("bind"), &g.pki.ca_cert, None)
            .expect("client");
    let mut pending = Vec::new();
    for _ in 0..8 {
        let connecting = ep.connect(relay, "sec-em").expect("connect");
        pending.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(20), connecting).await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The real 127.0.0.5 still gets in: unproven handshakes take at most half of its
    // places, and beyond that Sec-EM asks for proof the forger cannot give.
    let real = dial(&g, "127.0.0.5", admin_identity(&g))
        .await
        .expect("the real source connects");
    assert!(answers(&real).await);
    assert!(guard_events(&g.metrics, "retry") >= 1);
    assert_eq!(guard_events(&g.metrics, "refused_source"), 0);
    task.abort();
    for p in pending {
        p.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_admin_certificate_earns_a_strangers_treatment() {
    let g = guarded(Limits {
        enroll_deadline: Duration::from_secs(2),
        ..Limits::default()
    });
    let admin = dial(&g, "127.0.0.1", admin_identity(&g))
        .await
        .expect("admin");
    let (cert2, key2, serial2) =
        asmn_controller::pki::issue_admin(&g.pki.ca_cert, &g.pki.ca_key, "ops-2", 2025)
            .expect("issue");
    let before = dial(&g, "127.0.0.1", Some((&cert2, &key2)))
        .await
        .expect("connects");
    assert!(matches!(
        ask(
            &admin,
            Body::RevokeAdmin(msg::RevokeAdminRequest { serial: serial2 })
        )
        .await,
        Body::Ok(_)
    ));
    // Its open connection: refused, then closed.
    assert_eq!(
        refused(&ask(&before, operator_verbs().remove(4)).await),
        RefusalCode::NotAuthorized
    );
    tokio::time::timeout(Duration::from_secs(5), before.closed())
        .await
        .expect("closed after the refusal");
    // A new one is a stranger's: closed at the enrollment deadline like any other.
    let after = dial(&g, "127.0.0.1", Some((&cert2, &key2)))
        .await
        .expect("connects (TLS is fine)");
    let reason = tokio::time::timeout(Duration::from_secs(5), after.closed())
        .await
        .expect("closed at the enrollment deadline");
    assert!(reason.to_string().contains("enroll"), "{reason}");
    assert!(answers(&admin).await, "the other admin is unaffected");
}
