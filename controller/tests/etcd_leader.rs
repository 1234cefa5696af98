//! Three local etcd members; Sec-EM's registry under a steady load of reveals; the etcd
//! leader is killed (SIGKILL). The registry keeps serving through the other two members:
//! writes are unavailable for less than 3 s, and every acknowledged reveal is in the
//! store afterwards.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use asmn_controller::registry::{
    Reattestation, Registry, RegistryConfig, RegistryError, instance_key,
};
use asmn_controller::store::Store;
use asmn_controller::store::etcd::EtcdStore;
use asmn_shared::catalog::parse_vnfd;
use asmn_shared::chain::ChainProver;
use asmn_shared::crypto::Nonce;
use asmn_shared::dh::Group;
use asmn_shared::ids::{InstanceKey, InstanceName, Role, TenantId, VnfId};
use asmn_shared::measure::{Algorithm, measure_bytes};
use asmn_shared::wire::msg::RefusalCode;
use asmn_shared::wire::{BootstrapBundle, Enroll};

const IMAGE: &[u8] = b"the golden VNF image";
const AGENTS: usize = 16;
const RUN: Duration = Duration::from_secs(12);
const KILL_AT: Duration = Duration::from_secs(3);

fn config() -> RegistryConfig {
    RegistryConfig {
        controllers: vec!["127.0.0.1:7443".into()],
        server_name: "sec-em".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----".into(),
        chain_length: 100_000,
        dh_group: Group::Ffdhe3072,
        reattest_interval_secs: 30,
        overlay_net: "10.77.0.0".parse().expect("net"),
        overlay_prefix: 16,
        audit_key: asmn_controller::audit::AuditKey::new([7; 32]),
        audit_refusals_per_min: 6,
    }
}

/// One acknowledged reveal.
struct Ack {
    agent: usize,
    index: u32,
    at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_under_load_loses_nothing_and_pauses_writes_under_3_s() {
    let Some(mut cluster) = common::etcd_cluster(3).await else {
        return;
    };
    let store = EtcdStore::connect(&cluster.url()).await.expect("connect");
    let registry = Arc::new(Registry::new(store, config()));
    let vnfd = parse_vnfd(
        "web.yaml",
        include_bytes!("../../images/examples/web-server.vnfd.yaml"),
    )
    .expect("vnfd");
    let digests = measure_bytes(IMAGE, &[Algorithm::Sha256]).expect("measure");
    let golden = digests.get(Algorithm::Sha256).expect("sha").0.clone();
    registry
        .onboard(1, vnfd, digests.digests.clone(), IMAGE.len() as u64)
        .await
        .expect("onboard");

    // Enrolled agents, each with its prover.
    let mut agents: Vec<(InstanceKey, ChainProver)> = Vec::new();
    for i in 0..AGENTS {
        let bundle: BootstrapBundle = registry
            .create_instance(
                2,
                TenantId::new("t1").expect("t"),
                VnfId::new("web-server").expect("v"),
                InstanceName::new(format!("web-{i}")).expect("i"),
                Role::Vnf,
                Nonce::new([i as u8 + 1; 32]),
            )
            .await
            .expect("create");
        let (req, prover) = common::enroll_with_prover_of(&bundle, IMAGE);
        let req = Enroll::try_from(&req).expect("enroll");
        registry.enroll(3, &req).await.expect("enrolled");
        agents.push((req.id, prover));
    }

    // The load: every agent reveals its next element as fast as it is acknowledged. A
    // reveal whose answer is lost is sent again; "replayed" then means it was stored.
    let acks = Arc::new(Mutex::new(Vec::<Ack>::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (agent, (id, mut prover)) in agents.into_iter().enumerate() {
        let (registry, acks, golden) = (Arc::clone(&registry), Arc::clone(&acks), golden.clone());
        tasks.push(tokio::spawn(async move {
            let mut errors = 0u32;
            while start.elapsed() < RUN {
                let reveal = prover.reveal().expect("chain long enough");
                let mut retried = false;
                loop {
                    let req = Reattestation {
                        reveal: &reveal,
                        measurement: &golden,
                        renewal: None,
                    };
                    match registry.reattest(10, &id, &req).await {
                        Ok(r) => {
                            acks.lock().expect("acks").push(Ack {
                                agent,
                                index: r.last_index,
                                at: Instant::now(),
                            });
                            break;
                        }
                        Err(RegistryError::Refused(r))
                            if retried && r.code == RefusalCode::Replayed =>
                        {
                            break;
                        }
                        Err(RegistryError::Refused(r)) => panic!("agent {agent}: refused: {r}"),
                        Err(e) if start.elapsed() < RUN + Duration::from_secs(10) => {
                            eprintln!("agent {agent} at {:?}: {e}", start.elapsed());
                            errors += 1;
                            retried = true;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("agent {agent}: still failing: {e}"),
                    }
                }
            }
            (id, errors)
        }));
    }

    tokio::time::sleep(KILL_AT).await;
    let leader = cluster.leader().await.expect("a leader");
    let killed_at = Instant::now();
    cluster.kill(leader);
    eprintln!("killed the etcd leader (member {leader})");

    let mut ids = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (id, e) = t.await.expect("agent task");
        ids.push(id);
        errors += e;
    }
    let acks = std::mem::take(&mut *acks.lock().expect("acks"));
    let before = acks.iter().filter(|a| a.at < killed_at).count();
    let first_after = acks
        .iter()
        .filter(|a| a.at >= killed_at)
        .map(|a| a.at)
        .min()
        .expect("writes resumed after the kill");
    let pause = first_after - killed_at;
    // The longest gap between two acknowledgements anywhere in the run.
    let mut times: Vec<Instant> = acks.iter().map(|a| a.at).collect();
    times.sort();
    let longest = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} reveals acknowledged ({before} before the kill), {errors} retried; writes \
         paused {pause:?} after the kill; longest gap between acknowledgements {longest:?}",
        acks.len()
    );
    assert!(before > 50, "the load ran before the kill ({before} acks)");
    assert!(
        acks.len() > before + 50,
        "the load went on after the kill ({} acks)",
        acks.len()
    );
    assert!(pause < Duration::from_secs(3), "writes paused {pause:?}");
    assert!(longest < Duration::from_secs(3), "longest gap {longest:?}");

    // Nothing acknowledged is lost: each instance's stored index is at or below (the chain
    // is revealed downwards) the last index acknowledged to it, read through the members
    // that are left.
    let check = EtcdStore::connect(&cluster.url()).await.expect("connect");
    for (agent, id) in ids.iter().enumerate() {
        let last_acked = acks
            .iter()
            .filter(|a| a.agent == agent)
            .map(|a| a.index)
            .min()
            .expect("acks for every agent");
        let stored = check
            .get(&instance_key(id))
            .await
            .expect("read")
            .expect("record");
        let rec: asmn_controller::registry::InstanceRecord =
            serde_json::from_slice(&stored.value).expect("record");
        assert!(
            rec.chain.last_index <= last_acked,
            "agent {agent}: stored index {} above the acknowledged {last_acked}",
            rec.chain.last_index
        );
    }
    asmn_controller::audit::verify(
        &check,
        &asmn_controller::audit::AuditKey::new([7; 32]),
        None,
    )
    .await
    .expect("the audit chain holds");
}
