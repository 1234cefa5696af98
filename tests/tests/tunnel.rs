//! Agents in network namespaces: a genuine client and server enroll and reach each other
//! over a WireGuard tunnel; a fake server (its image differs by one byte) is refused.

use std::time::Duration;

use asmn_tests::netns;
use asmn_tests::tenant::Tenant;

const CLIENT_VNFD: &str = "vnfd:
  id: client
  sec_catalog:
    default_action:
      police:
        ingress_policing_rate: 1000000
        ingress_policing_burst: 100000
";

const SERVER_VNFD: &str = "vnfd:
  id: server
  sec_catalog:
    default_action: drop
    rules:
      - name: ping
        protocol: icmp
        ingress_policing_rate: 10000
        ingress_policing_burst: 1000
      - name: iperf
        protocol: tcp
        port: 5201
        sources: [client]
        ingress_policing_rate: 0
";

fn image(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn genuine_agents_ping_over_a_tunnel_and_a_fake_is_refused() {
    if !netns::can_run("the tunnel test") {
        return;
    }
    let mut t = Tenant::new().expect("tenant");
    let client_img = t.file("client.img", &image(1, 1 << 20)).expect("img");
    let server_bytes = image(2, 1 << 20);
    let server_img = t.file("server.img", &server_bytes).expect("img");
    let mut fake_bytes = server_bytes.clone();
    fake_bytes[4096] ^= 1;
    let fake_img = t.file("fake.img", &fake_bytes).expect("img");
    t.onboard(&client_img, CLIENT_VNFD).expect("onboard client");
    t.onboard(&server_img, SERVER_VNFD).expect("onboard server");
    let c = t
        .add("client-0", "client", "vnf", &client_img)
        .expect("client");
    let s = t
        .add("server-0", "server", "vnf", &server_img)
        .expect("server");
    let f = t.add("fake-0", "server", "vnf", &fake_img).expect("fake");
    for i in [c, s, f] {
        t.start(i).expect("start");
    }
    t.wait_enrolled(c, Duration::from_secs(20)).expect("client");
    t.wait_enrolled(s, Duration::from_secs(20)).expect("server");
    // The fake is refused and exits 1, saying why.
    let fake = t.vnfs[f].agent.as_mut().expect("fake agent");
    assert_eq!(
        fake.wait_exit(Duration::from_secs(20)),
        Some(1),
        "{}",
        fake.log()
    );
    assert!(fake.log().contains("WrongMeasurement"), "{}", fake.log());

    // Ping the server's overlay address from the client: the first packet triggers the
    // pair check and the handshake.
    let server_ip = t.vnfs[s].overlay.to_string();
    let ok = (0..10).any(|_| {
        t.vnfs[c]
            .ns
            .run("ping", &["-c", "1", "-W", "1", &server_ip])
            .is_ok()
    });
    let diag = |ns: &netns::Netns| {
        let a = ns
            .run("ip", &["addr"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let r = ns
            .run("ip", &["route"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let p = ns
            .cmd("ping", &["-c", "1", "-W", "1", &server_ip])
            .output()
            .map(|o| {
                format!(
                    "{} {}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            });
        format!("{a:?}\n{r:?}\n{p:?}")
    };
    assert!(
        ok,
        "no ping reply over the tunnel\n{}\nclient: {}\nserver: {}",
        diag(&t.vnfs[c].ns),
        t.vnfs[c]
            .agent
            .as_ref()
            .map(|p| p.log())
            .unwrap_or_default(),
        t.vnfs[s]
            .agent
            .as_ref()
            .map(|p| p.log())
            .unwrap_or_default()
    );
    let out = t.vnfs[c]
        .ns
        .run("ping", &["-c", "5", "-i", "0.2", "-W", "1", &server_ip])
        .expect("five pings");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(" 5 received"), "{text}");
    // The fake never enrolled: it is nobody's peer.
    let fake_ip = t.vnfs[f].overlay.to_string();
    assert!(
        t.vnfs[c]
            .ns
            .run("ping", &["-c", "1", "-W", "1", &fake_ip])
            .is_err()
    );
}
