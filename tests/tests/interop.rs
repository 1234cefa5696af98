//! The agent's tunnels are standard WireGuard: its data plane (`asmn-agent static`, the
//! same code with one static peer) completes a handshake and exchanges traffic with an
//! unmodified implementation, `boringtun-cli` configured by `wg` from wireguard-tools,
//! given the same keys and PSK.

use std::path::Path;
use std::time::Duration;

use asmn_testkit::netns::{self, Netns};

fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    let found = found.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let p = Path::new(&home).join(".cargo/bin").join(name);
        p.is_file().then_some(p)
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "{name} is required under CI (scripts/deps.sh installs it)"
        );
        asmn_shared::skip::note(&format!("{name} is not installed"));
    }
    found
}

/// Removes boringtun-cli's control socket (in /var/run/wireguard, outside the namespace)
/// when the test ends, however it ends.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn wg(args: &[&str], input: Option<&str>) -> String {
    asmn_lab::bench::wg(args, input).expect("wg")
}

#[test]
fn the_agent_interoperates_with_boringtun_cli_and_wg() {
    if !netns::can_run("the interoperability test") {
        return;
    }
    let (Some(bt), Some(_wg)) = (tool("boringtun-cli"), tool("wg")) else {
        return;
    };
    let _one_at_a_time = netns::serial();
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b) = (
        Netns::new("asmnvnf").expect("ns"),
        Netns::new("asmnvnf").expect("ns"),
    );
    netns::veth(&a, &b, "10.98.0.1/24", "10.98.0.2/24").expect("veth");

    // Keys made by wg.
    let (priv_a, priv_b, psk) = (
        wg(&["genkey"], None),
        wg(&["genkey"], None),
        wg(&["genpsk"], None),
    );
    let (pub_a, pub_b) = (
        wg(&["pubkey"], Some(&priv_a)),
        wg(&["pubkey"], Some(&priv_b)),
    );
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, format!("{text}\n")).expect("key file");
        p
    };
    let (priv_a_f, priv_b_f, psk_f) = (
        write("a.key", &priv_a),
        write("b.key", &priv_b),
        write("psk", &psk),
    );

    // B: boringtun-cli, configured with wg. Its control socket lives in /var/run/wireguard
    // (not per namespace): a unique interface name.
    let ifname = netns::unique("wgi");
    let _bt = b
        .spawn(
            &bt,
            &[
                "--foreground",
                "--disable-drop-privileges",
                "--threads",
                "1",
                &ifname,
            ],
            &dir.path().join("boringtun.log"),
        )
        .expect("boringtun-cli");
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    let _sock_guard = RemoveOnDrop(sock.clone().into());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !Path::new(&sock).exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    b.run(
        "wg",
        &[
            "set",
            &ifname,
            "private-key",
            priv_b_f.to_str().expect("utf-8"),
            "listen-port",
            "51820",
            "peer",
            &pub_a,
            "preshared-key",
            psk_f.to_str().expect("utf-8"),
            "endpoint",
            "10.98.0.1:51820",
            "allowed-ips",
            "10.88.0.1/32",
        ],
    )
    .expect("wg set");
    b.run("ip", &["addr", "add", "10.88.0.2/24", "dev", &ifname])
        .expect("addr");
    b.run("ip", &["link", "set", &ifname, "up"]).expect("up");

    // A: the agent's data plane.
    let agent = netns::binary("asmn-agent").expect("asmn-agent");
    let mut ours = a
        .spawn(
            &agent,
            &[
                "static",
                "--tun",
                "asmn0",
                "--address",
                "10.88.0.1/24",
                "--listen",
                "10.98.0.1:51820",
                "--private-key-file",
                priv_a_f.to_str().expect("utf-8"),
                "--peer-public-key",
                &pub_b,
                "--peer-endpoint",
                "10.98.0.2:51820",
                "--peer-address",
                "10.88.0.2",
                "--psk-file",
                psk_f.to_str().expect("utf-8"),
            ],
            &dir.path().join("agent.log"),
        )
        .expect("asmn-agent static");
    assert!(
        ours.wait_log("static data plane up", Duration::from_secs(10)),
        "{}",
        ours.log()
    );

    // Both directions.
    let up = (0..10).any(|_| a.run("ping", &["-c", "1", "-W", "1", "10.88.0.2"]).is_ok());
    assert!(up, "no reply from boringtun-cli\nagent: {}", ours.log());
    let back = b.run("ping", &["-c", "3", "-i", "0.2", "-W", "1", "10.88.0.1"]);
    assert!(back.is_ok(), "boringtun-cli -> agent: {back:?}");
    // boringtun-cli counted the traffic both ways (its `latest-handshakes` stays 0: it
    // does not report the handshake time over its UAPI).
    let shown = b
        .run("wg", &["show", &ifname, "transfer"])
        .expect("wg show");
    let text = String::from_utf8_lossy(&shown.stdout).into_owned();
    let counts: Vec<u64> = text
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        counts.len() == 2 && counts.iter().all(|&c| c > 0),
        "wg show transfer: {text}"
    );
}
