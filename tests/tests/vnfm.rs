//! The orchestrator's path, end to end: the example VNFM hook
//! (`controller/examples/vnfm/asmn-vnfm-hook.py`) on-boards a VNF from its ETSI SOL001
//! VNFD over Sec-EM's REST API, instantiates two instances and writes their config
//! drives; the agents boot (in their namespaces) with exactly the files the hook wrote,
//! enroll, and their tunnel carries a ping; the example receiver
//! (`asmn-events.py`) hears, signed, that they enrolled; the hook terminates one, its
//! peer is cut off, and the receiver hears of the revocation.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use asmn_testkit::netns::{self, Proc};
use asmn_testkit::tenant::{self, SEC_EM, Tenant, Vnf};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../controller/examples/vnfm/{name}"))
}

/// Runs the hook in the hub's namespace (where Sec-EM's REST API listens); its JSON.
fn hook(t: &Tenant, args: &[&str]) -> serde_json::Value {
    let pki = t.dir.path().join("pki");
    let hook = example("asmn-vnfm-hook.py");
    let mut cmd = t.hub.cmd("python3", &[hook.to_str().expect("utf-8")]);
    cmd.args(["--sec-em", &format!("https://{SEC_EM}:7444")])
        .args([
            "--server-name",
            "sec-em",
            "--pki",
            pki.to_str().expect("utf-8"),
        ])
        .args(args);
    let out = netns::run(&mut cmd).unwrap_or_else(|e| panic!("hook {args:?}: {e}"));
    serde_json::from_slice(&out.stdout).expect("the hook prints JSON")
}

/// The events the receiver recorded so far.
fn events(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_event(file: &Path, kind: &str, name: &str, receiver: &Proc) -> Duration {
    let started = Instant::now();
    loop {
        if events(file)
            .iter()
            .any(|e| e["type"] == kind && e["instance"]["name"] == name)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no {kind} event for {name}: {:?}; receiver: {}",
            events(file),
            receiver.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_vnfm_hook_instantiates_a_tenant_from_a_sol001_vnfd_and_hears_it_enroll() {
    if !netns::can_run("the VNFM hook test") {
        return;
    }
    let mut t = Tenant::new_with(|cfg| {
        cfg.replace(
            "# rest_addr = \"0.0.0.0:7444\"",
            &format!("rest_addr = \"{SEC_EM}:7444\""),
        ) + "\n[notifications]\nmax_backoff_secs = 1\n"
    })
    .expect("tenant");

    // The orchestrator subscribes, and runs its receiver beside Sec-EM.
    let callback = format!("http://{SEC_EM}:9100/asmn-events");
    let sub = hook(&t, &["subscribe", "--callback", &callback]);
    let secret = sub["secret"].as_str().expect("secret").to_string();
    let received = t.dir.path().join("events.jsonl");
    let receiver = t
        .hub
        .spawn(
            Path::new("/usr/bin/env"),
            &[
                "python3",
                example("asmn-events.py").to_str().expect("utf-8"),
                "--listen",
                &format!("{SEC_EM}:9100"),
                "--secret",
                &secret,
                "--out",
                received.to_str().expect("utf-8"),
            ],
            &t.dir.path().join("receiver.log"),
        )
        .expect("receiver");

    // The VNF package: the image and its SOL001 VNFD, whose checksum is the image's.
    let image = tenant::image(3, 1 << 20);
    let img = t.file("web.img", &image).expect("image");
    let sha =
        asmn_shared::measure::measure_bytes(&image, &[asmn_shared::measure::Algorithm::Sha256])
            .expect("measure")
            .get(asmn_shared::measure::Algorithm::Sha256)
            .expect("sha256")
            .to_hex();
    let vnfd = include_str!("../../images/examples/web-server.sol001.yaml")
        .replace(
            "5f2b3c8e1d0a4f6b7c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c",
            &sha,
        )
        // Reachable directly, not through a gateway: this tenant has none.
        .replace("        asmn.gateway: vnf-gw\n", "");
    let vnfd = t.file("web.sol001.yaml", vnfd.as_bytes()).expect("vnfd");
    let package = hook(
        &t,
        &[
            "onboard",
            "--sol001",
            vnfd.to_str().expect("utf-8"),
            "--image",
            img.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(package["digests"]["sha256"], sha);

    // Instantiate: the hook writes each VM's config drive; the VM boots with it.
    for name in ["web-1", "web-2"] {
        let (ns, underlay) = t.vm_namespace().expect("namespace");
        let drive = t.dir.path().join(format!("{name}.drive"));
        let state = t.dir.path().join(format!("{name}.state"));
        let made = hook(
            &t,
            &[
                "instantiate",
                "--tenant",
                "lab",
                "--vnf",
                "web-server",
                "--name",
                name,
                "--target",
                img.to_str().expect("utf-8"),
                "--underlay",
                &format!("{underlay}:51820"),
                "--state-dir",
                state.to_str().expect("utf-8"),
                "--out",
                drive.to_str().expect("utf-8"),
            ],
        );
        let bundle = drive.join("asmn/bundle");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&bundle).expect("bundle").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "the bundle is the instance's secret");
        let user_data = std::fs::read_to_string(drive.join("user-data")).expect("user-data");
        assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
        t.vnfs.push(Vnf {
            name: name.to_string(),
            ns,
            underlay,
            id: made["id"].as_str().expect("id").to_string(),
            overlay: made["overlay"]
                .as_str()
                .and_then(|o| o.split('/').next())
                .and_then(|ip| ip.parse().ok())
                .expect("overlay"),
            config: drive.join("asmn/agent.toml"),
            agent: None,
            gateway: false,
        });
        let i = t.vnfs.len() - 1;
        t.start(i).expect("agent");
    }
    for i in 0..2 {
        t.wait_enrolled(i, Duration::from_secs(30))
            .expect("enrolled");
    }
    let heard = wait_event(&received, "instance.enrolled", "web-2", &receiver);
    wait_event(&received, "instance.enrolled", "web-1", &receiver);
    eprintln!(
        "the receiver had web-2's enrollment {} ms after its agent logged it",
        heard.as_millis()
    );
    let to = t.vnfs[1].overlay.to_string();
    assert!(
        tenant::ping_until_up(&t, 0, &to),
        "web-1 reaches web-2 by its tunnel"
    );

    // Terminate web-2: the receiver hears it, and web-1 no longer reaches it.
    let id = t.vnfs[1].id.clone();
    hook(&t, &["terminate", "--id", &id]);
    wait_event(&received, "instance.revoked", "web-2", &receiver);
    let cut = tenant::within(Duration::from_secs(10), || !tenant::ping_once(&t, 0, &to));
    assert!(cut.is_some(), "web-2 still reachable after its revocation");
    // Every event verified (the receiver refuses a bad signature) and recorded once.
    let evs = events(&received);
    let mut ids: Vec<u64> = evs.iter().filter_map(|e| e["id"].as_u64()).collect();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "an event recorded twice");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order: {ids:?}");
    drop(receiver);
}
