//! An agent reaches Sec-EM replicas by IPv6 address as well as IPv4, and by a name that
//! resolves to both: the bundle decides, the agent's endpoint follows.

use std::time::Duration;

use asmn_agent::control;
use asmn_channel::call::connect_from;
use asmn_channel::tls::{Liveness, ServerLimits};

/// A QUIC server of the controller's PKI on `listen` that completes handshakes.
fn server(pki: &asmn_controller::pki::Pki, listen: &str) -> (u16, tokio::task::JoinHandle<()>) {
    let ep = asmn_channel::tls::server(
        listen.parse().expect("addr"),
        &pki.ca_cert,
        &pki.server_cert,
        &pki.server_key,
        &ServerLimits::default(),
    )
    .expect("server");
    let port = ep.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            tokio::spawn(async move {
                if let Ok(c) = incoming.await {
                    c.closed().await;
                }
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_ipv6_and_ipv4_replicas() {
    let v6_here = std::net::UdpSocket::bind("[::1]:0").is_ok();
    if !v6_here {
        assert!(
            std::env::var("CI").is_err(),
            "IPv6 loopback is needed under CI"
        );
        asmn_shared::skip::note("no IPv6 loopback here");
        return;
    }
    let pki = asmn_controller::pki::generate(&["sec-em".into()], 2025).expect("pki");
    let (p6, _s6) = server(&pki, "[::1]:0");
    let (p4, _s4) = server(&pki, "127.0.0.1:0");
    let wait = Duration::from_secs(5);
    // A bundle listing an IPv6 replica: the agent's endpoint is dual stack.
    let both = vec![format!("[::1]:{p6}"), format!("127.0.0.1:{p4}")];
    let ep = control::client(&pki.ca_cert, Liveness::default(), true).expect("client");
    for first in 0..2 {
        let (_, at) = connect_from(&ep, &both, "sec-em", first, wait)
            .await
            .unwrap_or_else(|e| panic!("from {first}: {e}"));
        assert_eq!(at, first, "the replica it started at answered");
    }
    // An IPv4-only bundle keeps an IPv4 endpoint, and a name with both kinds of address
    // is reached by its IPv4 one.
    let ep4 = control::client(&pki.ca_cert, Liveness::default(), false).expect("client");
    let (c, _) = connect_from(&ep4, &[format!("localhost:{p4}")], "sec-em", 0, wait)
        .await
        .expect("localhost over IPv4");
    assert!(c.remote_address().is_ipv4());
    // An IPv6 replica is out of an IPv4 endpoint's reach: a clear error, not a hang.
    let e = connect_from(&ep4, &[format!("[::1]:{p6}")], "sec-em", 0, wait)
        .await
        .expect_err("IPv4 endpoint");
    assert!(e.to_string().contains("IPv4 only"), "{e}");
}
