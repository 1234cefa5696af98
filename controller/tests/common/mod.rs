//! Helpers shared by the controller's integration tests: an agent simulated with the
//! shared state machines, and the operator's on-boarding request.

#![allow(dead_code)]

use std::sync::Arc;

use asmn_controller::registry::{Registry, RegistryConfig};
use asmn_controller::store::Store;
use asmn_controller::store::embedded::EmbeddedStore;
use asmn_controller::{pki, service};
use asmn_shared::chain::{ChainProver, ChainSpec, seed};
use asmn_shared::dh::DhKeyPair;
use asmn_shared::dh::Group;
use asmn_shared::measure::{Algorithm, measure_bytes};
use asmn_shared::wire::msg::{self, Body, RefusalCode};
use asmn_shared::wire::{BootstrapBundle, Enroll};

/// The enrollment an agent with `bundle`, measuring `image`, sends first, and its prover
/// for the reveals after it.
pub fn enroll_with_prover_of(
    bundle: &BootstrapBundle,
    image: &[u8],
) -> (msg::EnrollRequest, ChainProver) {
    let id = bundle.instance_key();
    let m = measure_bytes(image, &[Algorithm::Sha256]).expect("measure");
    let s = seed(
        &bundle.nonce,
        &id,
        &m.get(Algorithm::Sha256).expect("sha256").0,
        0,
    );
    let dh = DhKeyPair::derive(bundle.dh_group, &s, &id, 0);
    let mut p = ChainProver::new(ChainSpec::new(id, 0, bundle.chain_length).expect("spec"), s);
    let e = Enroll {
        id,
        tenant: bundle.tenant.clone(),
        vnf: bundle.vnf.clone(),
        instance: bundle.instance.clone(),
        reveal: p.reveal().expect("reveal"),
        wg_public_key: [1; 32],
        dh_group: bundle.dh_group,
        dh_public: dh.public().clone(),
        endpoint: "192.0.2.5:51820".parse().expect("endpoint"),
        role: bundle.role,
    };
    ((&e).into(), p)
}

/// On-boarding of `image` with the VNFD text `vnfd_yaml`.
pub fn onboard_body(image: &[u8], vnfd_yaml: String) -> Body {
    let m = measure_bytes(image, &[Algorithm::Sha256]).expect("measure");
    Body::Onboard(msg::OnboardRequest {
        vnfd_yaml,
        digests: vec![msg::DigestMsg {
            algorithm: "sha256".into(),
            value: m.get(Algorithm::Sha256).expect("sha256").0.clone(),
        }],
        image_bytes: image.len() as u64,
    })
}

/// A local etcd cluster of `members` on free loopback ports with temporary data, stopped
/// (SIGKILL, by PID) on drop. `None` outside CI when etcd is not installed.
pub async fn etcd_cluster(members: usize) -> Option<asmn_controller::local_etcd::LocalEtcd> {
    asmn_controller::local_etcd::LocalEtcd::for_tests(members).await
}

// ---- A Sec-EM on loopback, and its clients ----------------------------------------

pub const IMAGE: &[u8] = b"the golden VNF image";

pub struct Lab {
    pub _dir: tempfile::TempDir,
    pub pki: pki::Pki,
    pub addr: std::net::SocketAddr,
    pub store: Arc<EmbeddedStore>,
    pub _server: tokio::task::JoinHandle<()>,
}

pub async fn lab() -> Lab {
    let dir = tempfile::tempdir().expect("tmp");
    let pki = pki::generate(&["sec-em".into()], 2025).expect("pki");
    let store = Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).expect("store"));
    let (addr, server) = serve_on(Arc::clone(&store), &pki);
    Lab {
        _dir: dir,
        pki,
        addr,
        store,
        _server: server,
    }
}

/// A Sec-EM (registry, push follower, QUIC service) over `store` on a loopback port.
pub fn serve_on<S: Store>(
    store: Arc<S>,
    pki: &pki::Pki,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    serve_with(store, pki, asmn_controller::config::Limits::default(), None)
}

/// [`serve_on`] within `limits`, counting in `metrics`.
pub fn serve_with<S: Store>(
    store: Arc<S>,
    pki: &pki::Pki,
    limits: asmn_controller::config::Limits,
    metrics: Option<Arc<asmn_controller::metrics::Metrics>>,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let registry = Arc::new(Registry::with_shared_store(
        store,
        RegistryConfig {
            controllers: vec!["127.0.0.1:7443".into()],
            server_name: "sec-em".into(),
            ca_pem: pki.ca_cert.clone(),
            chain_length: 100,
            dh_group: Group::Ffdhe3072,
            reattest_interval_secs: 30,
            overlay_net: "10.77.0.0".parse().expect("net"),
            overlay_prefix: 16,
            audit_key: asmn_controller::audit::AuditKey::new([7; 32]),
            audit_refusals_per_min: limits.audit_refusals_per_min,
        },
    ));
    let endpoint = asmn_channel::tls::server(
        "127.0.0.1:0".parse().expect("addr"),
        &pki.ca_cert,
        &pki.server_cert,
        &pki.server_key,
        &limits.transport,
    )
    .expect("server");
    let addr = endpoint.local_addr().expect("addr");
    let hub = asmn_controller::push::PushHub::new();
    let follower = asmn_controller::push::follow(registry.store_arc(), Arc::clone(&hub), None);
    let server = tokio::spawn(async move {
        let _follower = follower;
        service::serve(endpoint, registry, hub, metrics, limits).await
    });
    (addr, server)
}

pub async fn connect(lab: &Lab, admin: bool) -> quinn::Connection {
    connect_to(&lab.pki, lab.addr, admin).await
}

pub async fn connect_to(
    pki: &pki::Pki,
    addr: std::net::SocketAddr,
    admin: bool,
) -> quinn::Connection {
    let identity = admin.then_some((pki.admin_cert.as_str(), pki.admin_key.as_str()));
    let ep = asmn_channel::tls::client(&pki.ca_cert, identity).expect("client");
    ep.connect(addr, "sec-em")
        .expect("connect")
        .await
        .expect("handshake")
}

pub async fn ask(c: &quinn::Connection, body: Body) -> Body {
    let env = msg::Envelope {
        request_id: 7,
        body: Some(body),
    };
    let reply = asmn_channel::call::request(c, &env, std::time::Duration::from_secs(30))
        .await
        .expect("request");
    assert_eq!(reply.request_id, 7);
    reply.body.expect("body")
}

pub fn refused(b: &Body) -> RefusalCode {
    match b {
        Body::Refused(r) => RefusalCode::try_from(r.code).expect("code"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

pub fn enroll_request(bundle: &BootstrapBundle) -> msg::EnrollRequest {
    enroll_with_prover(bundle).0
}

pub fn enroll_with_prover(bundle: &BootstrapBundle) -> (msg::EnrollRequest, ChainProver) {
    enroll_with_prover_of(bundle, IMAGE)
}

pub async fn create(admin: &quinn::Connection, name: &str) -> BootstrapBundle {
    let body = ask(
        admin,
        Body::CreateInstance(msg::CreateInstanceRequest {
            tenant: "t1".into(),
            vnf: "web-server".into(),
            instance: name.into(),
            role: 1,
        }),
    )
    .await;
    let Body::InstanceCreated(b) = body else {
        panic!("bundle: {body:?}")
    };
    BootstrapBundle::try_from(&b).expect("bundle")
}

/// The push stream of an enrolled agent's connection.
pub struct Pushes {
    stream: quinn::RecvStream,
    decoder: asmn_shared::wire::FrameDecoder,
}

impl Pushes {
    pub async fn open(conn: &quinn::Connection) -> Pushes {
        let stream = tokio::time::timeout(std::time::Duration::from_secs(5), conn.accept_uni())
            .await
            .expect("a push stream within 5 s")
            .expect("push stream");
        Pushes {
            stream,
            decoder: asmn_shared::wire::FrameDecoder::new(),
        }
    }

    pub async fn next(&mut self) -> Body {
        self.within(std::time::Duration::from_secs(5))
            .await
            .expect("a push within 5 s")
    }

    /// The next push, if one comes within `wait`.
    pub async fn within(&mut self, wait: std::time::Duration) -> Option<Body> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(f) = self.decoder.next_frame().expect("frame") {
                return Some(
                    asmn_shared::wire::decode_envelope(&f)
                        .expect("envelope")
                        .body
                        .expect("body"),
                );
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout(left, self.stream.read(&mut buf))
                .await
                .ok()?
                .expect("read")
                .expect("stream open");
            self.decoder.push(&buf[..n]).expect("push");
        }
    }
}

/// A process this test started (`sec-em serve`), killed by PID and reaped on drop.
pub struct Daemon(pub std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free UDP port on loopback (for Sec-EM's QUIC endpoint).
pub fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port")
        .port()
}

/// A free TCP port on loopback (for Sec-EM's metrics).
pub fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("port")
        .port()
}

/// `sec-em serve --config CFG`, its output discarded.
pub fn start(cfg: &std::path::Path) -> Daemon {
    Daemon(
        std::process::Command::new(env!("CARGO_BIN_EXE_sec-em"))
            .args(["serve", "--config", cfg.to_str().expect("utf-8")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("serve"),
    )
}

/// A client endpoint of a `sec-em` process and its address.
pub struct Client {
    pub endpoint: quinn::Endpoint,
    pub addr: std::net::SocketAddr,
}

impl Client {
    /// Connects, retrying for up to 20 s while the daemon starts.
    pub async fn connect(&self) -> quinn::Connection {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(Ok(c)) = tokio::time::timeout(
                std::time::Duration::from_millis(500),
                self.endpoint.connect(self.addr, "sec-em").expect("connect"),
            )
            .await
            {
                return c;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sec-em did not come up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// One request; the answer's body, or None when the connection or the daemon failed.
pub async fn ask_opt(c: &quinn::Connection, body: Body) -> Option<Body> {
    let env = msg::Envelope {
        request_id: 1,
        body: Some(body),
    };
    asmn_channel::call::request(c, &env, std::time::Duration::from_secs(30))
        .await
        .ok()
        .and_then(|e| e.body)
}

/// `sec-em init` in `d` for a load of 1,000 agents from loopback: short chains (their
/// anchors are computed at creation), and the per-source limits meant for strangers
/// lifted (one address stands for 1,000 VMs). `adjust` edits the configuration text
/// last. The configuration file, an admin client and an agents' client.
pub fn init_for_load(
    d: &std::path::Path,
    adjust: impl FnOnce(String) -> String,
) -> (std::path::PathBuf, Client, Client) {
    let listen = format!("127.0.0.1:{}", free_udp());
    let metrics = format!("127.0.0.1:{}", free_tcp());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sec-em"))
        .args([
            "init",
            "--dir",
            d.to_str().expect("p"),
            "--listen",
            &listen,
            "--metrics-addr",
            &metrics,
        ])
        .output()
        .expect("init");
    assert!(o.status.success());
    let cfg = d.join("sec-em.toml");
    let text = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("chain_length = 100000", "chain_length = 64")
        .replace(
            "stranger_requests_per_source_per_sec = 50",
            "stranger_requests_per_source_per_sec = 100000",
        )
        .replace("enroll_deadline_secs = 20", "enroll_deadline_secs = 300");
    assert!(
        text.contains("enroll_deadline_secs = 300"),
        "limits replaced"
    );
    std::fs::write(&cfg, adjust(text)).expect("cfg");
    let read = |n: &str| std::fs::read_to_string(d.join(n)).expect(n);
    let admin = Client {
        endpoint: asmn_channel::tls::client(
            &read("ca.pem"),
            Some((&read("admin.pem"), &read("admin.key"))),
        )
        .expect("client"),
        addr: listen.parse().expect("addr"),
    };
    let agents = Client {
        endpoint: asmn_channel::tls::client(&read("ca.pem"), None).expect("client"),
        addr: admin.addr,
    };
    (cfg, admin, agents)
}

/// On-boards `image` with the example VNFD, then creates `rounds` rounds of `per_round`
/// instances (concurrently within a round), instance names `web-ROUND-I`: each agent's
/// first enrollment and the prover for its next reveals, by round.
pub async fn onboard_and_create(
    ac: &quinn::Connection,
    image: &'static [u8],
    rounds: usize,
    per_round: usize,
) -> Vec<Vec<(msg::EnrollRequest, ChainProver)>> {
    let onboard = ask_opt(
        ac,
        onboard_body(
            image,
            include_str!("../../../images/examples/web-server.vnfd.yaml").into(),
        ),
    )
    .await;
    assert!(matches!(onboard, Some(Body::Ok(_))), "{onboard:?}");
    let mut out = Vec::new();
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for i in 0..per_round {
            let c = ac.clone();
            tasks.push(tokio::spawn(async move {
                let body = ask_opt(
                    &c,
                    Body::CreateInstance(msg::CreateInstanceRequest {
                        tenant: "t1".into(),
                        vnf: "web-server".into(),
                        instance: format!("web-{round}-{i}"),
                        role: 1,
                    }),
                )
                .await;
                let Some(Body::InstanceCreated(b)) = body else {
                    panic!("create: {body:?}")
                };
                enroll_with_prover_of(&BootstrapBundle::try_from(&b).expect("bundle"), image)
            }));
        }
        let mut batch = Vec::new();
        for t in tasks {
            batch.push(t.await.expect("task"));
        }
        out.push(batch);
    }
    out
}
