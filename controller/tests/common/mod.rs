//! Helpers shared by the controller's integration tests: an agent simulated with the
//! shared state machines, and the operator's on-boarding request.

#![allow(dead_code)]

use asmn_shared::chain::{ChainProver, ChainSpec, seed};
use asmn_shared::dh::DhKeyPair;
use asmn_shared::measure::{Algorithm, measure_bytes};
use asmn_shared::wire::msg::{self, Body};
use asmn_shared::wire::{BootstrapBundle, Enroll};

/// The enrollment an agent with `bundle`, measuring `image`, sends first, and its prover
/// for the reveals after it.
pub fn enroll_with_prover(
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

/// A single-member etcd on free loopback ports with a temporary data directory, stopped
/// (SIGKILL, by PID) on drop. `None` outside CI when etcd is not installed.
pub struct Etcd {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    /// `etcd://127.0.0.1:PORT`.
    pub url: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Etcd {
    /// Starts etcd and waits (up to 20 s) until it answers.
    pub async fn start() -> Option<Etcd> {
        use asmn_controller::store::Store;
        if std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var("CI").is_err(),
                "etcd is required under CI (apt-get install etcd-server)"
            );
            eprintln!("skipped: etcd is not installed");
            return None;
        }
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("port")
                .port()
        };
        let (client, peer) = (port(), port());
        let dir = tempfile::tempdir().expect("etcd dir");
        let child = std::process::Command::new("etcd")
            .args(["--name", "asmn-crash", "--data-dir"])
            .arg(dir.path())
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{client}"))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{peer}"))
            .arg("--initial-cluster")
            .arg(format!("asmn-crash=http://127.0.0.1:{peer}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start etcd");
        let etcd = Etcd {
            child,
            _dir: dir,
            url: format!("etcd://127.0.0.1:{client}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Ok(s) = asmn_controller::store::etcd::EtcdStore::connect(&etcd.url).await
                && s.get("/asmn/v1/probe").await.is_ok()
            {
                return Some(etcd);
            }
            assert!(std::time::Instant::now() < deadline, "etcd did not start");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}
