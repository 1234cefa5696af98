//! `sec-em init` and `check-config` end to end.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn sec_em(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sec-em"))
        .args(args)
        .output()
        .expect("run sec-em")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn init_makes_pki_and_config_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().join("asmn");
    let ds = d.to_str().expect("utf-8");
    let o = sec_em(&[
        "init",
        "--dir",
        ds,
        "--server-name",
        "sec-em.example",
        "--listen",
        "127.0.0.1:7443",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for (name, mode) in [
        ("ca.pem", 0o644),
        ("ca.key", 0o600),
        ("server.key", 0o600),
        ("admin.key", 0o600),
        ("sec-em.toml", 0o600),
    ] {
        let m = std::fs::metadata(d.join(name))
            .expect(name)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{name}");
    }
    let cfg = d.join("sec-em.toml");
    let o = sec_em(&["check-config", "--config", cfg.to_str().expect("utf-8")]);
    assert!(
        o.status.success() && text(&o).contains("valid"),
        "{}",
        text(&o)
    );

    let ca = std::fs::read(d.join("ca.pem")).expect("ca");
    let o = sec_em(&["init", "--dir", ds]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(
        std::fs::read(d.join("ca.pem")).expect("ca"),
        ca,
        "nothing replaced"
    );
    let o = sec_em(&["init", "--dir", ds, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(
        std::fs::read(d.join("ca.pem")).expect("ca"),
        ca,
        "replaced with --force"
    );

    // A broken configuration: the file, the field, the reason; exit 2.
    let bad = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("ffdhe3072", "modp1024");
    std::fs::write(&cfg, bad).expect("write");
    let o = sec_em(&["check-config", "--config", cfg.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("tenant.dh_group") && text(&o).contains("too small"),
        "{}",
        text(&o)
    );
}

/// A free loopback TCP address (for the metrics endpoint).
fn free_tcp() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port")
        .port();
    format!("127.0.0.1:{port}")
}

/// Kills a child (SIGKILL, by PID) if the test fails before it stops it.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_over_quic_and_stops_cleanly_on_sigterm() {
    use asmn_shared::wire::msg::{self, Body};

    let dir = tempfile::tempdir().expect("tmp");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = free_tcp();
    let ds = dir.path().to_str().expect("utf-8");
    let o = sec_em(&[
        "init",
        "--dir",
        ds,
        "--server-name",
        "sec-em",
        "--listen",
        &listen,
        "--metrics-addr",
        &metrics,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let cfg = dir.path().join("sec-em.toml");
    let mut daemon = Daemon(
        Command::new(env!("CARGO_BIN_EXE_sec-em"))
            .args([
                "serve",
                "--config",
                cfg.to_str().expect("utf-8"),
                "--log-format",
                "json",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve"),
    );

    let read = |n: &str| std::fs::read_to_string(dir.path().join(n)).expect(n);
    let (ca, cert, key) = (read("ca.pem"), read("admin.pem"), read("admin.key"));
    let ep = asmn_channel::tls::client(&ca, Some((&cert, &key))).expect("client");
    let addr: std::net::SocketAddr = listen.parse().expect("addr");
    // Poll until the daemon answers (bounded).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let conn = loop {
        if let Ok(c) = ep.connect(addr, "sec-em").expect("connect").await {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sec-em did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let env = msg::Envelope {
        request_id: 1,
        body: Some(Body::CreateInstance(msg::CreateInstanceRequest {
            tenant: "t".into(),
            vnf: "never-onboarded".into(),
            instance: String::new(),
            role: 1,
        })),
    };
    let reply = asmn_channel::call::request(&conn, &env, std::time::Duration::from_secs(30))
        .await
        .expect("reply");
    assert!(
        matches!(&reply.body, Some(Body::Refused(r)) if r.message.contains("not on-boarded")),
        "{reply:?}"
    );

    // Metrics: the refusal is counted by reason; health answers.
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics).expect("metrics");
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out
    };
    let m = get("/metrics");
    assert!(
        m.contains("asmn_refusals_total{reason=\"UnknownInstance\",request=\"operator\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("asmn_store_seconds_bucket") && m.contains("asmn_connected_agents 0"),
        "{m}"
    );
    assert!(get("/health").ends_with("ok\n"));
    assert!(get("/nope").starts_with("HTTP/1.1 404"));

    // SIGTERM (by PID): a clean exit, within the drain deadline.
    let pid = daemon.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let status = loop {
        if let Some(s) = daemon.0.try_wait().expect("wait") {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sec-em did not stop on SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let mut log = String::new();
    use std::io::Read;
    // Logs go to standard error (standard output stays free for data).
    if let Some(mut e) = daemon.0.stderr.take() {
        let _ = e.read_to_string(&mut log);
    }
    assert!(log.contains("shutting down"), "{log}");
}

fn asmnctl(pki: &std::path::Path, listen: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asmnctl"))
        .args([
            "--pki",
            pki.to_str().expect("utf-8"),
            "--controller",
            listen,
        ])
        .args(args)
        .output()
        .expect("run asmnctl")
}

fn start_daemon(dir: &std::path::Path) -> Daemon {
    let cfg = dir.join("sec-em.toml");
    Daemon(
        Command::new(env!("CARGO_BIN_EXE_sec-em"))
            .args(["serve", "--config", cfg.to_str().expect("utf-8")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("serve"),
    )
}

fn wait_up(dir: &std::path::Path, listen: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let o = asmnctl(dir, listen, &["--timeout", "1", "audit", "verify"]);
        if o.status.code() != Some(3) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sec-em did not come up: {}",
            text(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn asmnctl_end_to_end() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = free_tcp();
    let o = sec_em(&[
        "init",
        "--dir",
        d.to_str().expect("utf-8"),
        "--listen",
        &listen,
        "--metrics-addr",
        &metrics,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let mut daemon = start_daemon(d);
    wait_up(d, &listen);

    let image = d.join("web.img");
    std::fs::write(&image, vec![0x42u8; 1 << 20]).expect("image");
    let vnfd = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../images/examples/web-server.vnfd.yaml"
    );
    let o = asmnctl(
        d,
        &listen,
        &[
            "image",
            "onboard",
            image.to_str().expect("p"),
            "--vnfd",
            vnfd,
            "--algo",
            "md5",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("sha256") && text(&o).contains("md5"),
        "{}",
        text(&o)
    );

    // The same VNF from its ETSI SOL001 descriptor, on-boarded by digest (no image):
    // with the image's real checksum it is accepted; an image that is not the one the
    // descriptor names is refused before anything is sent.
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(vec![0x42u8; 1 << 20]))
    };
    let sol = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../images/examples/web-server.sol001.yaml"
    ))
    .expect("sol001 example")
    .replace(
        "5f2b3c8e1d0a4f6b7c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c",
        &sha,
    )
    .replace("asmn.vnf_id: web-server", "asmn.vnf_id: web-sol");
    let sol_path = d.join("web.sol001.yaml");
    std::fs::write(&sol_path, &sol).expect("write");
    let sp = sol_path.to_str().expect("p");
    let o = asmnctl(d, &listen, &["image", "onboard", "--sol001", sp]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&sha), "{}", text(&o));
    let other = d.join("other.img");
    std::fs::write(&other, vec![0x43u8; 4096]).expect("image");
    let o = asmnctl(
        d,
        &listen,
        &[
            "image",
            "onboard",
            other.to_str().expect("p"),
            "--sol001",
            sp,
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not the VNFD's image"), "{}", text(&o));
    let o = asmnctl(d, &listen, &["catalog", "show", "web-sol"]);
    assert!(
        o.status.success() && text(&o).contains("9100-9110") && text(&o).contains("monitor"),
        "{}",
        text(&o)
    );

    let bundle = d.join("web-0.bundle");
    let b = bundle.to_str().expect("p");
    let o = asmnctl(
        d,
        &listen,
        &[
            "--json",
            "instance",
            "create",
            "--tenant",
            "t1",
            "--vnf",
            "web-server",
            "--name",
            "web-0",
            "--out",
            b,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let id = created["id"].as_str().expect("id").to_string();
    assert_eq!(
        std::fs::metadata(&bundle)
            .expect("bundle")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Not overwritten without --force.
    let o = asmnctl(
        d,
        &listen,
        &[
            "instance",
            "create",
            "--tenant",
            "t1",
            "--vnf",
            "web-server",
            "--out",
            b,
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // An unknown VNF is Sec-EM's refusal: exit 1, with the reason.
    let o = asmnctl(
        d,
        &listen,
        &[
            "instance",
            "create",
            "--tenant",
            "t1",
            "--vnf",
            "nope",
            "--out",
            d.join("x").to_str().expect("p"),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not on-boarded"), "{}", text(&o));

    let o = asmnctl(d, &listen, &["--json", "instance", "list"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let o = asmnctl(d, &listen, &["instance", "list"]);
    assert!(
        text(&o).contains("web-0") && text(&o).contains("created"),
        "{}",
        text(&o)
    );
    let o = asmnctl(d, &listen, &["instance", "show", &id]);
    assert!(
        o.status.success() && text(&o).contains("10.77.0.1/16"),
        "{}",
        text(&o)
    );
    let o = asmnctl(d, &listen, &["revoke", &id, "--reason", "test"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = asmnctl(d, &listen, &["instance", "show", &id]);
    assert!(text(&o).contains("revoked"), "{}", text(&o));
    let o = asmnctl(d, &listen, &["audit", "verify"]);
    assert!(
        o.status.success() && text(&o).contains("intact"),
        "{}",
        text(&o)
    );
    let o = asmnctl(d, &listen, &["audit", "show"]);
    assert!(text(&o).contains("instance.revoked"), "{}", text(&o));
    let o = asmnctl(
        d,
        &listen,
        &["audit", "show", "--since", "2", "--limit", "1"],
    );
    let lines: Vec<String> = text(&o).lines().map(str::to_string).collect();
    assert!(
        lines.len() == 1 && lines[0].trim_start().starts_with("2 "),
        "{lines:?}"
    );

    // A second operator's admin certificate works until the first revokes its serial.
    let ops = d.join("ops");
    let o = sec_em(&[
        "issue-admin",
        "--dir",
        d.to_str().expect("utf-8"),
        "--name",
        "ops-2",
        "--out-dir",
        ops.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let serial = text(&o)
        .split("(serial ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("serial printed")
        .to_string();
    let (cert, key) = (
        ops.join("ops-2.pem").display().to_string(),
        ops.join("ops-2.key").display().to_string(),
    );
    let as_ops = |args: &[&str]| {
        let mut all = vec!["--cert", cert.as_str(), "--key", key.as_str()];
        all.extend_from_slice(args);
        asmnctl(d, &listen, &all)
    };
    assert!(as_ops(&["instance", "list"]).status.success());
    let o = asmnctl(d, &listen, &["admin", "revoke", &serial]);
    assert!(o.status.success(), "{}", text(&o));
    let o = as_ops(&["instance", "list"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("revoked"), "{}", text(&o));
    let o = asmnctl(d, &listen, &["admin", "revoked"]);
    assert!(text(&o).contains(&serial), "{}", text(&o));

    // A checkpoint, then the newest records cut while Sec-EM is stopped: the log alone
    // still verifies, the checkpoint finds the cut.
    let checkpoint = d.join("head.json").display().to_string();
    let audit = |verb: &str, flag: &str| asmnctl(d, &listen, &["audit", verb, flag, &checkpoint]);
    let o = audit("checkpoint", "--out");
    assert!(o.status.success(), "{}", text(&o));
    let o = audit("verify", "--checkpoint");
    assert!(o.status.success(), "{}", text(&o));
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        rt.block_on(async {
            use asmn_controller::store::Store;
            let store =
                asmn_controller::store::embedded::EmbeddedStore::open(&d.join("sec-em.redb"))
                    .expect("open");
            let (key, _) = store
                .last(&asmn_controller::audit::prefix())
                .await
                .expect("last")
                .expect("a block");
            store.delete(&key).await.expect("delete");
        });
    }
    let mut daemon = start_daemon(d);
    wait_up(d, &listen);
    let o = audit("verify", "--checkpoint");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cut"), "{}", text(&o));

    // Tamper with the audit log while Sec-EM is stopped; the next verify fails.
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        rt.block_on(async {
            use asmn_controller::store::Store;
            let store =
                asmn_controller::store::embedded::EmbeddedStore::open(&d.join("sec-em.redb"))
                    .expect("open");
            // The first block of records: change the detail of its first record.
            let listing = store
                .list(&asmn_controller::audit::prefix())
                .await
                .expect("list");
            let (key, v) = listing.entries.first().expect("a block").clone();
            let mut rec: serde_json::Value = serde_json::from_slice(&v.value).expect("json");
            rec[0]["detail"] = serde_json::Value::String("nothing happened here".into());
            store
                .put(&key, serde_json::to_vec(&rec).expect("json"))
                .await
                .expect("put");
        });
    }
    let _daemon = start_daemon(d);
    wait_up(d, &listen);
    let o = asmnctl(d, &listen, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("altered"), "{}", text(&o));
    // Unreachable Sec-EM: exit 3.
    let o = asmnctl(
        d,
        &listen.replace(&port.to_string(), "1"),
        &["--timeout", "1", "instance", "list"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
}

#[test]
fn serve_refuses_a_store_a_newer_sec_em_made_unreadable() {
    use asmn_controller::store::Store;
    use asmn_controller::store::schema;
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().to_str().expect("utf8");
    let listen = "127.0.0.1:0";
    assert!(
        sec_em(&[
            "init",
            "--dir",
            d,
            "--listen",
            listen,
            "--metrics-addr",
            "127.0.0.1:0"
        ])
        .status
        .success()
    );
    let marker = schema::Marker {
        version: schema::CURRENT + 2,
        compatible_down_to: schema::CURRENT + 2,
        written_by: "sec-em 9.9.9".into(),
    };
    {
        let rt = tokio::runtime::Runtime::new().expect("rt");
        let store =
            asmn_controller::store::embedded::EmbeddedStore::open(&dir.path().join("sec-em.redb"))
                .expect("open");
        rt.block_on(store.put(schema::KEY, serde_json::to_vec(&marker).expect("json")))
            .expect("put");
    }
    let config = dir.path().join("sec-em.toml");
    let out = sec_em(&["serve", "--config", config.to_str().expect("utf8")]);
    let t = text(&out);
    // EX_CONFIG: the unit does not restart it.
    assert_eq!(out.status.code(), Some(78), "{t}");
    assert!(
        t.contains(&format!("schema version {}", schema::CURRENT + 2))
            && t.contains("sec-em 9.9.9")
            && t.contains("Upgrade this sec-em"),
        "{t}"
    );
}
