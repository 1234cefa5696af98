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

/// A local etcd cluster of `members` on free loopback ports with temporary data, stopped
/// (SIGKILL, by PID) on drop. `None` outside CI when etcd is not installed.
pub async fn etcd_cluster(members: usize) -> Option<asmn_controller::local_etcd::LocalEtcd> {
    asmn_controller::local_etcd::LocalEtcd::for_tests(members).await
}
