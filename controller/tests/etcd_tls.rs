//! The store, authenticated: Sec-EM on a real three-member etcd (Debian's etcd-server)
//! that speaks TLS to its clients and between its members and requires client
//! certificates, made by this test. etcd refuses clients without a certificate, with one
//! from another CA, and in plaintext; Sec-EM, configured with `etcds://` as an operator
//! would, serves agents on it and keeps serving when a member dies.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use asmn_controller::local_etcd::LocalEtcd;
use asmn_controller::store::Store;
use asmn_controller::store::etcd::EtcdStore;
use asmn_shared::wire::BootstrapBundle;
use asmn_shared::wire::msg::Body;
use common::{Daemon, IMAGE, ask, create, enroll_request, free_udp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sec_em_serves_on_a_three_member_etcd_over_tls_that_refuses_clients_without_certificates() {
    let Some(mut etcd) = LocalEtcd::for_tests_tls(3).await else {
        return;
    };
    let url = etcd.url();
    assert!(url.starts_with("etcds://"), "{url}");

    // Sec-EM's client, with the cluster's CA and its certificate: reads and writes.
    let store = EtcdStore::connect_with(&url, &etcd.options())
        .await
        .expect("a client with a certificate");
    store
        .put("/asmn/v1/tls-probe", b"1".to_vec())
        .await
        .expect("put");
    // Without a certificate, with one from another CA, in plaintext: etcd refuses.
    for (what, options) in [
        ("no certificate", etcd.bad_options(true).expect("tls")),
        (
            "a foreign CA's certificate",
            etcd.bad_options(false).expect("tls"),
        ),
    ] {
        let r = EtcdStore::connect_with(&url, &options).await;
        let e = r.expect_err(what).to_string();
        // Refused in the TLS handshake or right after it (etcd closes the connection):
        // a transport error, never an answer.
        assert!(e.contains("transport"), "{what}: {e}");
    }
    let plain = url.replace("etcds://", "etcd://");
    assert!(EtcdStore::connect(&plain).await.is_err(), "plaintext");
    // And the client refuses to downgrade on its own.
    assert!(
        EtcdStore::connect_with(&plain, &etcd.options())
            .await
            .is_err()
    );
    assert!(
        EtcdStore::connect_with(&url, &Default::default())
            .await
            .is_err()
    );

    // sec-em, configured as an operator would: init, then [etcd] with the files.
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_udp());
    let o = Command::new(env!("CARGO_BIN_EXE_sec-em"))
        .args(["init", "--dir", d.to_str().expect("p"), "--listen", &listen])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .output()
        .expect("init");
    assert!(o.status.success(), "{o:?}");
    let cfg = d.join("sec-em.toml");
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("chain_length = 100000", "chain_length = 64");
    std::fs::write(&cfg, etcd.configure(&text).expect("configure")).expect("cfg");
    let check = Command::new(env!("CARGO_BIN_EXE_sec-em"))
        .args(["check-config", "--config", cfg.to_str().expect("p")])
        .output()
        .expect("check");
    assert!(check.status.success(), "{check:?}");
    let _daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_sec-em"))
            .args(["serve", "--config", cfg.to_str().expect("p")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("serve"),
    );
    let read = |n: &str| std::fs::read_to_string(d.join(n)).expect(n);
    let admin_ep = asmn_channel::tls::client(
        &read("ca.pem"),
        Some((&read("admin.pem"), &read("admin.key"))),
    )
    .expect("client");
    let started = Instant::now();
    let admin = loop {
        if let Ok(Ok((c, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            asmn_channel::call::connect(
                &admin_ep,
                std::slice::from_ref(&listen),
                "sec-em",
                Duration::from_secs(1),
            ),
        )
        .await
        {
            break c;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "sec-em did not come up on etcds"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(matches!(
        ask(
            &admin,
            common::onboard_body(
                IMAGE,
                include_str!("../../images/examples/web-server.vnfd.yaml")
                    .replace("    gateway: vnf-gw\n", "")
            )
        )
        .await,
        Body::Ok(_)
    ));
    let agent_ep = asmn_channel::tls::client(&read("ca.pem"), None).expect("client");
    let enroll = |bundle: BootstrapBundle| {
        let (agent_ep, listen) = (agent_ep.clone(), listen.clone());
        async move {
            let (c, _) =
                asmn_channel::call::connect(&agent_ep, &[listen], "sec-em", Duration::from_secs(5))
                    .await
                    .expect("agent");
            ask(&c, Body::Enroll(enroll_request(&bundle))).await
        }
    };
    let a = create(&admin, "web-a").await;
    assert!(matches!(enroll(a).await, Body::Enrolled(_)));
    // What Sec-EM wrote is in etcd, read back over TLS.
    let listing = store.list("/asmn/v1/instances/").await.expect("list");
    assert_eq!(listing.entries.len(), 1);

    // One member dies (the leader, the worst one): Sec-EM keeps serving.
    let leader = etcd.leader().await.expect("a leader");
    etcd.kill(leader);
    let started = Instant::now();
    while store
        .put("/asmn/v1/tls-probe", b"2".to_vec())
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no new leader over TLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = create(&admin, "web-b").await;
    let Body::Enrolled(e) = enroll(b).await else {
        panic!("enrolls with two members of three")
    };
    assert!(e.overlay.starts_with("10.77.0.2"), "{e:?}");
}
