use std::sync::Arc;

use asmn_shared::catalog::parse_vnfd;
use asmn_shared::chain::{ChainProver, ChainSpec, seed};
use asmn_shared::crypto::Nonce;
use asmn_shared::dh::DhKeyPair;
use asmn_shared::measure::{Algorithm, measure_bytes};

use super::*;
use crate::audit;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;
use crate::store::tests::EtcdServer;

const IMAGE: &[u8] = b"a VNF image: kernel, rootfs, the asmn-agent binary and its unit";

fn config() -> RegistryConfig {
    RegistryConfig {
        controllers: vec!["127.0.0.1:7443".into()],
        server_name: "sec-em".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----".into(),
        chain_length: 200,
        dh_group: Group::Ffdhe3072,
        reattest_interval_secs: 30,
        overlay_net: Ipv4Addr::new(10, 77, 0, 0),
        overlay_prefix: 16,
        audit_key: audit::AuditKey::new([7; 32]),
        audit_refusals_per_min: 6,
    }
}

const VNFD: &str = include_str!("../../../images/examples/web-server.vnfd.yaml");

async fn onboarded<S: Store>(store: S) -> Registry<S> {
    onboarded_with(store, VNFD).await
}

async fn onboarded_with<S: Store>(store: S, vnfd: &str) -> Registry<S> {
    let r = Registry::new(store, config());
    let vnfd = parse_vnfd("web.yaml", vnfd.as_bytes()).expect("vnfd");
    let m = measure_bytes(IMAGE, &[Algorithm::Sha256, Algorithm::Md5]).expect("measure");
    r.onboard(1, vnfd, m.digests, IMAGE.len() as u64)
        .await
        .expect("onboard");
    r
}

/// An agent simulated with the shared state machines.
struct Agent {
    bundle: BootstrapBundle,
    prover: ChainProver,
    request: Enroll,
}

fn agent(bundle: BootstrapBundle, image: &[u8]) -> Agent {
    let id = bundle.instance_key();
    let digest = measure_bytes(image, &[Algorithm::Sha256]).expect("m");
    let s = seed(
        &bundle.nonce,
        &id,
        &digest.get(Algorithm::Sha256).expect("sha").0,
        0,
    );
    let spec = ChainSpec::new(id, 0, bundle.chain_length).expect("spec");
    let dh = DhKeyPair::derive(bundle.dh_group, &s, &id, 0);
    let mut prover = ChainProver::new(spec, s);
    let reveal = prover.reveal().expect("reveal");
    let request = Enroll {
        id,
        tenant: bundle.tenant.clone(),
        vnf: bundle.vnf.clone(),
        instance: bundle.instance.clone(),
        reveal,
        wg_public_key: [7; 32],
        dh_group: bundle.dh_group,
        dh_public: dh.public().clone(),
        endpoint: "192.0.2.1:51820".parse().expect("addr"),
        role: bundle.role,
    };
    Agent {
        bundle,
        prover,
        request,
    }
}

async fn create<S: Store>(r: &Registry<S>, name: &str, nonce: u8) -> BootstrapBundle {
    r.create_instance(
        2,
        TenantId::new("t1").expect("t"),
        VnfId::new("web-server").expect("v"),
        InstanceName::new(name).expect("i"),
        Role::Vnf,
        Nonce::new([nonce; 32]),
    )
    .await
    .expect("create")
}

fn code(e: RegistryError) -> RefusalCode {
    match e {
        RegistryError::Refused(r) => r.code,
        other => panic!("expected a refusal, got {other}"),
    }
}

async fn state<S: Store>(r: &Registry<S>, id: &InstanceKey) -> InstanceState {
    r.instance(id).await.expect("get").expect("present").0.state
}

async fn kinds<S: Store>(r: &Registry<S>) -> Vec<String> {
    audit::verify(r.store(), r.audit_key(), None)
        .await
        .expect("audit chain holds");
    audit::records(r.store(), r.audit_key(), 1)
        .await
        .expect("audit chain holds")
        .into_iter()
        .map(|a| a.kind)
        .collect()
}

fn embedded() -> (tempfile::TempDir, EmbeddedStore) {
    let dir = tempfile::tempdir().expect("tmp");
    let s = EmbeddedStore::open(&dir.path().join("s.redb")).expect("open");
    (dir, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_genuine_instance_enrolls() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let a = agent(create(&r, "web-0", 1).await, IMAGE);
    let enrolled = r.enroll(10, &a.request).await.expect("genuine");
    assert_eq!(enrolled.overlay.to_string(), "10.77.0.1/16");
    assert_eq!(enrolled.last_index, a.bundle.chain_length - 1);
    assert_eq!(enrolled.catalog.vnf.as_str(), "web-server");
    assert_eq!(state(&r, &a.request.id).await, InstanceState::Enrolled);
    assert!(kinds(&r).await.contains(&"enroll.accepted".to_string()));
    // A second instance gets the next address.
    let b = agent(create(&r, "web-1", 2).await, IMAGE);
    assert_eq!(
        r.enroll(11, &b.request)
            .await
            .expect("b")
            .overlay
            .to_string(),
        "10.77.0.2/16"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cannot_claim_a_role_it_was_not_created_with() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let mut a = agent(create(&r, "web-0", 1).await, IMAGE);
    assert_eq!(a.bundle.role, Role::Vnf);
    a.request.role = Role::Gateway;
    assert_eq!(
        code(r.enroll(10, &a.request).await.expect_err("claimed gateway")),
        RefusalCode::UnknownInstance
    );
    assert!(kinds(&r).await.contains(&"enroll.refused".to_string()));
    // With its own role it enrolls (nothing was spent on the refused claim).
    a.request.role = Role::Vnf;
    r.enroll(11, &a.request).await.expect("as created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fakes_and_replays_are_refused_audited_and_quarantined() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;

    // The image differs by one byte: the first reveal fails, the instance is quarantined.
    let mut fake_image = IMAGE.to_vec();
    fake_image[10] ^= 1;
    let fake = agent(create(&r, "fake-0", 3).await, &fake_image);
    assert_eq!(
        code(r.enroll(10, &fake.request).await.expect_err("fake")),
        RefusalCode::WrongMeasurement
    );
    assert!(matches!(
        state(&r, &fake.request.id).await,
        InstanceState::Quarantined(_)
    ));
    // Its genuine twin (same bundle, right image) is refused too: quarantine sticks.
    let twin = agent(fake.bundle.clone(), IMAGE);
    assert_eq!(
        code(r.enroll(11, &twin.request).await.expect_err("twin")),
        RefusalCode::Quarantined
    );

    // A wrong nonce: a different identity, unknown to Sec-EM.
    let good = create(&r, "web-0", 4).await;
    let mut wrong = good.clone();
    wrong.nonce = Nonce::new([5; 32]);
    let w = agent(wrong, IMAGE);
    assert_eq!(
        code(r.enroll(12, &w.request).await.expect_err("nonce")),
        RefusalCode::UnknownInstance
    );

    // An element of another instance's chain, under this instance's identity.
    let other = agent(create(&r, "web-9", 6).await, IMAGE);
    let mut foreign = agent(good.clone(), IMAGE);
    foreign.request.reveal = other.request.reveal.clone();
    assert_eq!(
        code(r.enroll(13, &foreign.request).await.expect_err("foreign")),
        RefusalCode::WrongMeasurement
    );

    // A replay of an accepted reveal.
    let g2 = create(&r, "web-2", 8).await;
    let genuine = agent(g2, IMAGE);
    r.enroll(14, &genuine.request).await.expect("genuine");
    assert_eq!(
        code(r.enroll(15, &genuine.request).await.expect_err("replay")),
        RefusalCode::Replayed
    );

    let k = kinds(&r).await;
    assert!(
        k.iter().filter(|x| *x == "instance.quarantined").count() >= 2,
        "{k:?}"
    );
    assert!(
        k.contains(&"reveal.refused".to_string()) && k.contains(&"enroll.refused".to_string()),
        "{k:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_instances_cannot_enroll_again() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let a = agent(create(&r, "web-0", 1).await, IMAGE);
    r.enroll(10, &a.request).await.expect("enroll");
    r.revoke(11, &a.request.id, "operator")
        .await
        .expect("revoke");
    let again = agent(a.bundle.clone(), IMAGE);
    assert_eq!(
        code(r.enroll(12, &again.request).await.expect_err("revoked")),
        RefusalCode::Revoked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_reattestation() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let mut a = agent(create(&r, "web-0", 1).await, IMAGE);
    r.enroll(10, &a.request).await.expect("enroll");
    let golden = measure_bytes(IMAGE, &[Algorithm::Sha256]).expect("m");
    let sha = &golden.get(Algorithm::Sha256).expect("sha").0;
    let next = a.prover.reveal().expect("next");
    let plain = |reveal, measurement| Reattestation {
        reveal,
        measurement,
        renewal: None,
    };
    assert_eq!(
        r.reattest(20, &a.request.id, &plain(&next, sha))
            .await
            .expect("ok")
            .last_index,
        next.index
    );
    let next2 = a.prover.reveal().expect("next");
    let changed = vec![0u8; 32];
    assert_eq!(
        code(
            r.reattest(30, &a.request.id, &plain(&next2, &changed))
                .await
                .expect_err("changed")
        ),
        RefusalCode::Revoked
    );
    assert!(matches!(
        state(&r, &a.request.id).await,
        InstanceState::Revoked(_)
    ));
}

/// A renewal for `a`'s chain: the next epoch's prover and D-H value, and the sealed anchor
/// under the element revealed with it.
fn renewal(
    a: &mut Agent,
    measurement: &[u8],
    length: u32,
) -> (Reveal, chain::SealedRenewal, ChainProver, DhKeyPair) {
    let id = a.request.id;
    let epoch = a.prover.spec().epoch + 1;
    let s = seed(&a.bundle.nonce, &id, measurement, epoch);
    let spec = ChainSpec::new(id, epoch, length).expect("spec");
    let dh = DhKeyPair::derive(a.bundle.dh_group, &s, &id, epoch);
    let next = ChainProver::new(spec, s);
    let reveal = a.prover.reveal().expect("reveal");
    let sealed = chain::seal_renewal(&reveal, &spec, &next.anchor());
    (reveal, sealed, next, dh)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuity_mode_follows_a_changing_target_with_new_epochs() {
    let (_d, s) = embedded();
    let r = onboarded_with(
        s,
        &VNFD.replace("vnfd:\n", "vnfd:\n  attestation: continuity\n"),
    )
    .await;
    let mut a = agent(create(&r, "web-0", 1).await, IMAGE);
    r.enroll(10, &a.request).await.expect("enroll");
    let changed = measure_bytes(b"the image after an update", &[Algorithm::Sha256])
        .expect("m")
        .get(Algorithm::Sha256)
        .expect("sha")
        .0
        .clone();

    // A changed target without a renewal is refused, and nothing is consumed.
    let next = a.prover.reveal().expect("next");
    let plain = Reattestation {
        reveal: &next,
        measurement: &changed,
        renewal: None,
    };
    assert_eq!(
        code(
            r.reattest(20, &a.request.id, &plain)
                .await
                .expect_err("no renewal")
        ),
        RefusalCode::BadRenewal
    );
    assert_eq!(state(&r, &a.request.id).await, InstanceState::Enrolled);

    // With the renewal: a new epoch, its anchor opened, its D-H value installed.
    a.prover = ChainProver::resume(*a.prover.spec(), a.prover.seed().clone(), next.index);
    let (reveal, sealed, mut prover, dh) = renewal(&mut a, &changed, 50);
    let req = Reattestation {
        reveal: &reveal,
        measurement: &changed,
        renewal: Some((&sealed, dh.public().as_bytes())),
    };
    let done = r.reattest(21, &a.request.id, &req).await.expect("renewed");
    assert_eq!((done.epoch, done.last_index), (1, 50));
    let (rec, _) = r
        .instance(&a.request.id)
        .await
        .expect("get")
        .expect("there");
    assert_eq!(rec.dh_public.as_deref(), Some(dh.public().as_bytes()));
    assert_eq!(
        rec.measurement.map(hex::encode),
        Some(hex::encode(&changed))
    );
    // The same renewal again is a replay; the new chain's elements are accepted.
    assert_eq!(
        code(
            r.reattest(22, &a.request.id, &req)
                .await
                .expect_err("replay")
        ),
        RefusalCode::WrongEpoch
    );
    let n = prover.reveal().expect("new chain");
    let again = Reattestation {
        reveal: &n,
        measurement: &changed,
        renewal: None,
    };
    assert_eq!(
        r.reattest(23, &a.request.id, &again)
            .await
            .expect("ok")
            .last_index,
        49
    );
    assert!(kinds(&r).await.contains(&"chain.renewed".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_renews_before_the_chain_runs_out_and_refuses_bad_seals() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let mut a = agent(create(&r, "web-0", 1).await, IMAGE);
    r.enroll(10, &a.request).await.expect("enroll");
    let sha = measure_bytes(IMAGE, &[Algorithm::Sha256])
        .expect("m")
        .get(Algorithm::Sha256)
        .expect("sha")
        .0
        .clone();
    let (reveal, mut sealed, _prover, dh) = renewal(&mut a, &sha, 80);
    // A tampered seal is refused as a bad renewal and changes nothing.
    sealed.ciphertext[3] ^= 1;
    let req = Reattestation {
        reveal: &reveal,
        measurement: &sha,
        renewal: Some((&sealed, dh.public().as_bytes())),
    };
    assert_eq!(
        code(
            r.reattest(20, &a.request.id, &req)
                .await
                .expect_err("bad seal")
        ),
        RefusalCode::BadRenewal
    );
    sealed.ciphertext[3] ^= 1;
    // A D-H value outside the group is refused too.
    let req = Reattestation {
        reveal: &reveal,
        measurement: &sha,
        renewal: Some((&sealed, &[0xffu8; 384][..])),
    };
    assert_eq!(
        code(
            r.reattest(20, &a.request.id, &req)
                .await
                .expect_err("bad dh")
        ),
        RefusalCode::InvalidRequest
    );
    let req = Reattestation {
        reveal: &reveal,
        measurement: &sha,
        renewal: Some((&sealed, dh.public().as_bytes())),
    };
    let done = r.reattest(21, &a.request.id, &req).await.expect("renewed");
    assert_eq!((done.epoch, done.last_index), (1, 80));
    // Keys for the old epoch are refused; for the current one they replace the record's.
    assert_eq!(
        code(
            r.publish_keys(22, &a.request.id, [9; 32], dh.public().as_bytes(), 0)
                .await
                .expect_err("old epoch")
        ),
        RefusalCode::WrongEpoch
    );
    r.publish_keys(22, &a.request.id, [9; 32], dh.public().as_bytes(), 1)
        .await
        .expect("published");
    let (rec, _) = r
        .instance(&a.request.id)
        .await
        .expect("get")
        .expect("there");
    assert_eq!(rec.wg_public_key, Some([9u8; 32]));
}

async fn race<S: Store>(a: Arc<Registry<S>>, b: Arc<Registry<S>>, req: Enroll) -> usize {
    // Two tasks on two worker threads, both past their read before either writes.
    let ta = tokio::spawn({
        let (a, req) = (Arc::clone(&a), req.clone());
        async move { a.enroll(10, &req).await }
    });
    let tb = tokio::spawn({
        let (b, req) = (Arc::clone(&b), req.clone());
        async move { b.enroll(10, &req).await }
    });
    let (ra, rb) = (ta.await.expect("task a"), tb.await.expect("task b"));
    let oks = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    for r in [ra, rb].into_iter().filter_map(Result::err) {
        assert_eq!(code(r), RefusalCode::Replayed);
    }
    oks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reveal_twice_at_once_is_accepted_once() {
    let (_d, s) = embedded();
    let r = Arc::new(onboarded(s).await);
    for i in 0..10u8 {
        let a = agent(create(&r, &format!("web-{i}"), 20 + i).await, IMAGE);
        assert_eq!(race(Arc::clone(&r), Arc::clone(&r), a.request).await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_etcd_accept_a_reveal_once() {
    let Some(server) = EtcdServer::start().await else {
        return;
    };
    let a = Arc::new(onboarded(EtcdStore::connect(&server.url).await.expect("a")).await);
    let b = Arc::new(Registry::new(
        EtcdStore::connect(&server.url).await.expect("b"),
        config(),
    ));
    for i in 0..10u8 {
        let ag = agent(create(&a, &format!("web-{i}"), 40 + i).await, IMAGE);
        assert_eq!(
            race(Arc::clone(&a), Arc::clone(&b), ag.request).await,
            1,
            "round {i}"
        );
    }
    // Both replicas appended to one audit chain, and it holds.
    assert!(
        kinds(&a)
            .await
            .iter()
            .filter(|k| *k == "enroll.accepted")
            .count()
            == 10
    );
}

/// Every kind of tampering with the audit log, by someone who can write the store but
/// does not hold the audit key: a changed record, a rewrite from record k with the hashes
/// recomputed, a deleted record, the newest records cut (found against a checkpoint), a
/// forged checkpoint.
async fn audit_tampering_is_detected<S: Store>(r: Registry<S>) {
    for i in 0..4u8 {
        let a = agent(create(&r, &format!("web-{i}"), 60 + i).await, IMAGE);
        r.enroll(10, &a.request).await.expect("enroll");
    }
    let key = r.audit_key().clone();
    let head = audit::verify(r.store(), &key, None).await.expect("holds");
    assert!(head.seq >= 8, "{head:?}");
    let checkpoint = head.clone();
    audit::verify(r.store(), &key, Some(&checkpoint))
        .await
        .expect("the log reaches its own checkpoint");
    let records = audit::records(r.store(), &key, 1).await.expect("records");
    assert_eq!(records.len() as u64, head.seq);
    let block = |seq: u64| format!("{}{seq:020}", audit::prefix());
    let put = |seq: u64, recs: Vec<audit::AuditRecord>| {
        let store = r.store();
        async move {
            store
                .put(&block(seq), serde_json::to_vec(&recs).expect("json"))
                .await
                .expect("put");
        }
    };
    // Appended one at a time: each record is its own block.
    let original = records.clone();

    // 1. A changed record.
    let mut rec = records[1].clone();
    rec.detail.push_str(" (edited)");
    put(2, vec![rec]).await;
    assert_eq!(
        audit::verify(r.store(), &key, None).await,
        Err(audit::AuditError::Altered(2))
    );
    put(2, vec![original[1].clone()]).await;

    // 2. Rewritten from record 3 on, hashes and links recomputed: the chain holds, the
    // MACs do not.
    let mut prev = original[1].hash.clone();
    for rec in &original[2..] {
        let mut forged = rec.clone();
        forged.detail = "nothing happened".into();
        forged.prev = prev.clone();
        // What someone without the key can compute.
        forged.hash = forged.compute_hash();
        prev = forged.hash.clone();
        put(forged.seq, vec![forged]).await;
    }
    assert_eq!(
        audit::verify(r.store(), &key, None).await,
        Err(audit::AuditError::Forged(3))
    );
    for rec in &original[2..] {
        put(rec.seq, vec![rec.clone()]).await;
    }
    audit::verify(r.store(), &key, Some(&checkpoint))
        .await
        .expect("restored");

    // 3. A deleted record in the middle.
    r.store().delete(&block(2)).await.expect("delete");
    assert_eq!(
        audit::verify(r.store(), &key, None).await,
        Err(audit::AuditError::Missing(2))
    );
    put(2, vec![original[1].clone()]).await;

    // 4. The newest two records cut: a valid log on its own, a cut against the
    // checkpoint.
    let last = head.seq;
    for seq in [last, last - 1] {
        r.store().delete(&block(seq)).await.expect("delete");
    }
    let shorter = audit::verify(r.store(), &key, None)
        .await
        .expect("valid alone");
    assert_eq!(shorter.seq, last - 2);
    assert!(matches!(
        audit::verify(r.store(), &key, Some(&checkpoint)).await,
        Err(audit::AuditError::Truncated(_))
    ));

    // 5. A checkpoint not made with the key is refused; so is the right log checked with
    // another key.
    let mut forged = checkpoint.clone();
    forged.seq = last - 2;
    forged.hash = shorter.hash.clone();
    assert_eq!(
        audit::verify(r.store(), &key, Some(&forged)).await,
        Err(audit::AuditError::BadCheckpoint)
    );
    assert_eq!(
        audit::verify(r.store(), &audit::AuditKey::new([8; 32]), None).await,
        Err(audit::AuditError::Forged(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tampering_is_detected_on_the_embedded_store() {
    let (_d, s) = embedded();
    audit_tampering_is_detected(onboarded(s).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_tampering_is_detected_on_etcd() {
    let Some(server) = EtcdServer::start().await else {
        return;
    };
    let s = EtcdStore::connect(&server.url).await.expect("connect");
    audit_tampering_is_detected(onboarded(s).await).await;
}

/// Refusals about unknown instances (anyone can send them, with random IDs) are not
/// audited; refusals about a known instance are, within a per-minute budget, and the
/// ones over it are counted into the next record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_enrollments_do_not_grow_the_audit_log_without_bound() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let before = audit::verify(r.store(), r.audit_key(), None)
        .await
        .expect("holds")
        .seq;
    let mut a = agent(create(&r, "web-x", 99).await, IMAGE);
    let before = before + 1; // instance.created
    for i in 0..200u8 {
        a.request.id = InstanceKey::from_bytes([i; 32]);
        assert_eq!(
            code(r.enroll(10, &a.request).await.expect_err("unknown")),
            RefusalCode::UnknownInstance
        );
    }
    assert_eq!(
        audit::verify(r.store(), r.audit_key(), None)
            .await
            .expect("holds")
            .seq,
        before,
        "refusals of unknown instances are not audited"
    );
    // A known instance, replayed 100 times within a minute: 6 records (the budget), and
    // the 94 others counted into the first record of the next minute.
    let a = agent(create(&r, "web-9", 9).await, IMAGE);
    r.enroll(10, &a.request).await.expect("enroll");
    let base = audit::verify(r.store(), r.audit_key(), None)
        .await
        .expect("holds")
        .seq;
    for _ in 0..100 {
        assert_eq!(
            code(r.enroll(20, &a.request).await.expect_err("replay")),
            RefusalCode::Replayed
        );
    }
    let grown = audit::verify(r.store(), r.audit_key(), None)
        .await
        .expect("holds")
        .seq
        - base;
    assert_eq!(grown, 6);
    assert_eq!(r.audit_suppressed(), 94);
    r.enroll(80, &a.request)
        .await
        .expect_err("replay, next minute");
    let last = audit::records(r.store(), r.audit_key(), base + 7)
        .await
        .expect("records");
    assert_eq!(last.len(), 1);
    assert!(last[0].detail.contains("94 like refusals"), "{:?}", last[0]);
}

async fn enrolled<S: Store>(
    r: &Registry<S>,
    vnf: &str,
    name: &str,
    nonce: u8,
    role: Role,
) -> Agent {
    let b = r
        .create_instance(
            3,
            TenantId::new("t1").expect("t"),
            VnfId::new(vnf).expect("v"),
            InstanceName::new(name).expect("i"),
            role,
            Nonce::new([nonce; 32]),
        )
        .await
        .expect("create");
    let a = agent(b, IMAGE);
    r.enroll(4, &a.request).await.expect("enroll");
    a
}

async fn onboard_as<S: Store>(r: &Registry<S>, vnf: &str, catalog: &str) {
    let text = format!("vnfd:\n  id: {vnf}\n  sec_catalog:\n{catalog}");
    let vnfd = parse_vnfd("x.yaml", text.as_bytes()).expect("vnfd");
    let m = measure_bytes(IMAGE, &[Algorithm::Sha256]).expect("m");
    r.onboard(1, vnfd, m.digests, 1).await.expect("onboard");
}

async fn overlay_of<S: Store>(r: &Registry<S>, a: &Agent) -> IpAddr {
    let (rec, _) = r.instance(&a.request.id).await.expect("get").expect("rec");
    rec.overlay.ip
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_verified_by_catalog_tenant_and_state() {
    let (_d, s) = embedded();
    let r = Registry::new(s, config());
    onboard_as(&r, "server", "    gateway: gw\n    rules:\n      - protocol: tcp\n        port: 80\n        sources: [client]\n").await;
    onboard_as(&r, "client", "    rules:\n      - protocol: icmp\n").await;
    onboard_as(&r, "gw", "    rules:\n      - protocol: any\n").await;
    onboard_as(&r, "intruder", "    rules: []\n").await;
    let server = enrolled(&r, "server", "server-0", 1, Role::Vnf).await;
    let client = enrolled(&r, "client", "client-0", 2, Role::Vnf).await;
    let intruder = enrolled(&r, "intruder", "intruder-0", 3, Role::Vnf).await;
    let server_ip = overlay_of(&r, &server).await;

    // The server sits behind a gateway that is not enrolled yet: refused.
    assert_eq!(
        code(
            r.verify_peer(5, &client.request.id, server_ip)
                .await
                .expect_err("no gw")
        ),
        RefusalCode::PeerNotAllowed
    );
    let gw = enrolled(&r, "gw", "gw-0", 4, Role::Gateway).await;
    let p = r
        .verify_peer(5, &client.request.id, server_ip)
        .await
        .expect("client may reach server");
    assert_eq!(p.id, server.request.id);
    assert_eq!(p.via_gateway, Some(overlay_of(&r, &gw).await));
    assert_eq!(p.wg_public_key, server.request.wg_public_key);
    // The gateway itself reaches the server directly.
    assert_eq!(
        r.verify_peer(5, &gw.request.id, server_ip)
            .await
            .expect("gw")
            .via_gateway,
        None
    );
    // The server's catalog does not admit the intruder.
    assert_eq!(
        code(
            r.verify_peer(5, &intruder.request.id, server_ip)
                .await
                .expect_err("intruder")
        ),
        RefusalCode::PeerNotAllowed
    );
    // The reverse direction: the client's catalog admits any VNF (icmp, no sources).
    let client_ip = overlay_of(&r, &client).await;
    assert_eq!(
        r.verify_peer(5, &server.request.id, client_ip)
            .await
            .expect("reverse")
            .id,
        client.request.id
    );

    // A quarantined (fake) instance is never described to anyone.
    let fb = r
        .create_instance(
            6,
            TenantId::new("t1").expect("t"),
            VnfId::new("client").expect("v"),
            InstanceName::new("fake").expect("i"),
            Role::Vnf,
            Nonce::new([9; 32]),
        )
        .await
        .expect("create");
    let mut bad = IMAGE.to_vec();
    bad[0] ^= 1;
    let fake = agent(fb, &bad);
    assert!(r.enroll(7, &fake.request).await.is_err());
    let fake_ip = overlay_of(&r, &fake).await;
    assert_eq!(
        code(
            r.verify_peer(8, &server.request.id, fake_ip)
                .await
                .expect_err("fake")
        ),
        RefusalCode::PeerUnknown
    );
    // Nor may it ask about others.
    assert_eq!(
        code(
            r.verify_peer(8, &fake.request.id, server_ip)
                .await
                .expect_err("fake asks")
        ),
        RefusalCode::NotAuthorized
    );
    // Revocation cuts a peer off.
    r.revoke(9, &client.request.id, "test")
        .await
        .expect("revoke");
    assert_eq!(
        code(
            r.verify_peer(10, &server.request.id, client_ip)
                .await
                .expect_err("revoked")
        ),
        RefusalCode::PeerUnknown
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_relays_only_pairs_that_both_catalogs_admit() {
    let (_d, s) = embedded();
    let r = Registry::new(s, config());
    onboard_as(&r, "server", "    gateway: gw\n    rules:\n      - protocol: tcp\n        port: 80\n        sources: [client]\n").await;
    onboard_as(&r, "client", "    rules:\n      - protocol: icmp\n").await;
    onboard_as(&r, "gw", "    rules:\n      - protocol: any\n").await;
    onboard_as(&r, "intruder", "    rules:\n      - protocol: any\n").await;
    onboard_as(&r, "other", "    rules:\n      - protocol: any\n").await;
    let server = enrolled(&r, "server", "server-0", 1, Role::Vnf).await;
    let client = enrolled(&r, "client", "client-0", 2, Role::Vnf).await;
    let intruder = enrolled(&r, "intruder", "intruder-0", 3, Role::Vnf).await;
    let gw = enrolled(&r, "gw", "gw-0", 4, Role::Gateway).await;
    let other = enrolled(&r, "other", "other-0", 5, Role::Vnf).await;
    let ip = |a| overlay_of(&r, a);
    let (server_ip, client_ip) = (ip(&server).await, ip(&client).await);
    let (intruder_ip, other_ip) = (ip(&intruder).await, ip(&other).await);

    // Admitted both ways: the answer describes the destination, direct and protected.
    let p = r
        .verify_pair(6, &gw.request.id, client_ip, server_ip)
        .await
        .expect("client -> server through gw");
    assert_eq!(
        (p.id, p.via_gateway, p.protected),
        (server.request.id, None, true)
    );
    let back = r
        .verify_pair(6, &gw.request.id, server_ip, client_ip)
        .await
        .expect("server -> client through gw");
    assert_eq!((back.id, back.protected), (client.request.id, false));
    assert!(kinds(&r).await.iter().any(|k| k == "peer.relay_admitted"));
    // The server's catalog does not admit the intruder, in either direction of asking.
    for (a, b) in [(intruder_ip, server_ip), (server_ip, intruder_ip)] {
        assert_eq!(
            code(
                r.verify_pair(6, &gw.request.id, a, b)
                    .await
                    .expect_err("intruder")
            ),
            RefusalCode::PeerNotAllowed
        );
    }
    // Neither side is behind this gateway: it is not an open relay.
    assert_eq!(
        code(
            r.verify_pair(6, &gw.request.id, client_ip, other_ip)
                .await
                .expect_err("no relay")
        ),
        RefusalCode::PeerNotAllowed
    );
    // Only a gateway may ask on behalf of another instance.
    assert_eq!(
        code(
            r.verify_pair(6, &intruder.request.id, client_ip, server_ip)
                .await
                .expect_err("not gw")
        ),
        RefusalCode::NotAuthorized
    );
    // Nobody at that address.
    let nobody: IpAddr = "10.77.9.9".parse().expect("ip");
    assert_eq!(
        code(
            r.verify_pair(6, &gw.request.id, client_ip, nobody)
                .await
                .expect_err("nobody")
        ),
        RefusalCode::PeerUnknown
    );
}

/// A catalog whose push to its agents would not fit in one frame is refused at apply,
/// before anything is committed: the version in force and the audit log stay as they
/// were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_too_large_to_push_is_refused_before_it_is_committed() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let vnf = VnfId::new("web-server").expect("vnf");
    let (before, _) = r.catalog(&vnf).await.expect("get").expect("catalog");
    let head = audit::verify(r.store(), r.audit_key(), None)
        .await
        .expect("holds");
    let mut big = before.clone();
    let template = big.rules[0].clone();
    big.rules = (0..400)
        .map(|i| {
            let mut rule = template.clone();
            rule.name = format!("rule-{i:04}");
            rule.sources = Some(
                (0..4)
                    .map(|k| {
                        VnfId::new(format!("a-long-source-vnf-name-number-{k:02}-{i:04}"))
                            .expect("id")
                    })
                    .collect(),
            );
            rule
        })
        .collect();
    let e = r.apply_catalog(5, big).await.expect_err("too large");
    assert_eq!(code(e), RefusalCode::TooLarge);
    let (after, _) = r.catalog(&vnf).await.expect("get").expect("catalog");
    assert_eq!(after, before);
    assert_eq!(
        audit::verify(r.store(), r.audit_key(), None)
            .await
            .expect("holds"),
        head
    );
    // A small one goes through, as the next version.
    let mut fits = before.clone();
    fits.rules.truncate(1);
    assert_eq!(
        r.apply_catalog(6, fits).await.expect("fits"),
        before.version + 1
    );
}

/// The appender writes blocks of at most 256 records, and paging relies on it: a block
/// merged beyond that (by someone who can write the store) is refused by verify, though
/// every record in it is authentic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_block_larger_than_the_appender_writes_is_refused() {
    let (_d, s) = embedded();
    let key = audit::AuditKey::new([9; 32]);
    let log = AuditLog::new(key.clone());
    for i in 0..300u64 {
        log.append(&s, i, "test.kind", None, format!("record {i}"))
            .await
            .expect("append");
    }
    assert_eq!(audit::verify(&s, &key, None).await.expect("holds").seq, 300);
    let recs = audit::records(&s, &key, 1).await.expect("records");
    let block = |seq: u64| format!("{}{seq:020}", audit::prefix());
    s.put(&block(1), serde_json::to_vec(&recs).expect("json"))
        .await
        .expect("merge");
    for seq in 2..=300 {
        s.delete(&block(seq)).await.expect("delete");
    }
    assert!(matches!(
        audit::verify(&s, &key, None).await,
        Err(audit::AuditError::Unreadable { seq: 1, .. })
    ));
}

/// A store as Sec-EM wrote it before the schema marker (the current records: an image,
/// an enrolled instance and the audit log), checked by a newer Sec-EM: migrated, the
/// marker written, every record still served; an older Sec-EM refuses a store a newer one
/// made incompatible, and serves one the newer made compatible (a rolling upgrade).
async fn schema_versions_on<S: Store>(store: S) {
    use crate::store::schema::{self, Marker, Ours, Outcome};
    let r = onboarded(store).await;
    let a = agent(create(&r, "web-0", 1).await, IMAGE);
    r.enroll(10, &a.request).await.expect("genuine");
    // The fixture: exactly what this build writes, less the marker (version 1).
    r.store().delete(schema::KEY).await.expect("delete");
    assert_eq!(
        schema::check(r.store(), Ours::THIS)
            .await
            .expect("migrates"),
        Outcome::Migrated(1)
    );
    let marker: Marker = serde_json::from_slice(
        &r.store()
            .get(schema::KEY)
            .await
            .expect("get")
            .expect("marker")
            .value,
    )
    .expect("marker json");
    assert_eq!(marker.version, schema::CURRENT);
    assert_eq!(state(&r, &a.request.id).await, InstanceState::Enrolled);
    assert!(kinds(&r).await.contains(&"enroll.accepted".to_string()));
    assert_eq!(
        schema::check(r.store(), Ours::THIS).await.expect("again"),
        Outcome::Current
    );
    // A newer replica migrated in a way this one can still read (its marker, as it
    // writes it): both serve.
    let mark = |version: u32, compatible_down_to: u32| {
        serde_json::to_vec(&Marker {
            version,
            compatible_down_to,
            written_by: "sec-em (a newer one)".into(),
        })
        .expect("json")
    };
    r.store()
        .put(schema::KEY, mark(schema::CURRENT + 1, schema::CURRENT))
        .await
        .expect("put");
    schema::still_readable(r.store(), Ours::THIS)
        .await
        .expect("an adjacent newer version is compatible");
    assert_eq!(
        schema::check(r.store(), Ours::THIS)
            .await
            .expect("older serves"),
        Outcome::NewerCompatible(schema::CURRENT + 1)
    );
    // A newer one that older replicas cannot read: refused, with what to do.
    r.store()
        .put(schema::KEY, mark(schema::CURRENT + 2, schema::CURRENT + 2))
        .await
        .expect("put");
    let e = schema::check(r.store(), Ours::THIS)
        .await
        .expect_err("an older Sec-EM refuses");
    let text = e.to_string();
    assert!(
        text.contains(&format!("schema version {}", schema::CURRENT + 2))
            && text.contains("Upgrade this sec-em"),
        "{text}"
    );
    assert!(schema::still_readable(r.store(), Ours::THIS).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_versions_are_checked_and_migrated_on_the_embedded_store() {
    let (_d, s) = embedded();
    schema_versions_on(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_versions_are_checked_and_migrated_on_etcd() {
    let Some(server) = EtcdServer::start().await else {
        return;
    };
    schema_versions_on(EtcdStore::connect(&server.url).await.expect("etcd")).await;
}

/// The gateway index: an enrolled gateway is listed, a revoked one is not (and a stale
/// entry is never used); a schema-2 store is migrated with its gateways listed; a
/// gateway a schema-2 replica enrolled (not listed) is still found, and listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_find_their_gateway_through_the_index() {
    use crate::store::keys::{gateway_key, gateways_prefix};
    use crate::store::schema::{self, Ours, Outcome};
    let (_d, s) = embedded();
    let r = Registry::new(s, config());
    onboard_as(&r, "server", "    gateway: gw\n    rules:\n      - protocol: tcp\n        port: 80\n        sources: [client]\n").await;
    onboard_as(&r, "client", "    rules:\n      - protocol: icmp\n").await;
    onboard_as(&r, "gw", "    rules:\n      - protocol: any\n").await;
    let server = enrolled(&r, "server", "server-0", 1, Role::Vnf).await;
    let client = enrolled(&r, "client", "client-0", 2, Role::Vnf).await;
    let server_ip = overlay_of(&r, &server).await;
    let (t1, gw_vnf) = (
        TenantId::new("t1").expect("t"),
        VnfId::new("gw").expect("v"),
    );
    let listed = |r: &Registry<EmbeddedStore>| {
        let (t1, gw_vnf) = (t1.clone(), gw_vnf.clone());
        let store = r.store_arc();
        async move {
            store
                .list(&gateways_prefix(&t1, &gw_vnf))
                .await
                .expect("list")
                .entries
                .len()
        }
    };
    let gw = enrolled(&r, "gw", "gw-0", 4, Role::Gateway).await;
    assert_eq!(listed(&r).await, 1, "an enrolled gateway is listed");
    let id = client.request.id;
    assert_eq!(
        r.verify_peer(5, &id, server_ip)
            .await
            .expect("through the gateway")
            .via_gateway,
        Some(overlay_of(&r, &gw).await)
    );

    // Revoked: no longer listed, and the pair is refused.
    r.revoke(6, &gw.request.id, "test").await.expect("revoke");
    assert_eq!(listed(&r).await, 0);
    assert_eq!(
        code(
            r.verify_peer(5, &id, server_ip)
                .await
                .expect_err("gateway revoked")
        ),
        RefusalCode::PeerNotAllowed
    );
    // A stale entry (a replica that died between the two writes) is not used.
    r.store()
        .put(&gateway_key(&t1, &gw_vnf, &gw.request.id), Vec::new())
        .await
        .expect("put");
    assert_eq!(
        code(
            r.verify_peer(5, &id, server_ip)
                .await
                .expect_err("a stale entry")
        ),
        RefusalCode::PeerNotAllowed
    );

    // A second gateway, enrolled by a schema-2 replica: not listed. Found anyway, and
    // listed from then on.
    let gw2 = enrolled(&r, "gw", "gw-1", 7, Role::Gateway).await;
    r.store()
        .delete(&gateway_key(&t1, &gw_vnf, &gw2.request.id))
        .await
        .expect("delete");
    assert_eq!(
        r.verify_peer(5, &id, server_ip)
            .await
            .expect("found by listing")
            .via_gateway,
        Some(overlay_of(&r, &gw2).await)
    );
    assert!(
        r.store()
            .get(&gateway_key(&t1, &gw_vnf, &gw2.request.id))
            .await
            .expect("get")
            .is_some(),
        "listed once found"
    );

    // A schema-2 store: migrated, with its enrolled gateway listed.
    r.store()
        .delete(&gateway_key(&t1, &gw_vnf, &gw2.request.id))
        .await
        .expect("delete");
    r.store()
        .delete(&gateway_key(&t1, &gw_vnf, &gw.request.id))
        .await
        .expect("delete");
    r.store()
        .put(
            schema::KEY,
            br#"{"version":2,"compatible_down_to":1,"written_by":"sec-em 0.1.0"}"#.to_vec(),
        )
        .await
        .expect("marker");
    assert_eq!(
        schema::check(r.store(), Ours::THIS)
            .await
            .expect("migrates"),
        Outcome::Migrated(2)
    );
    assert_eq!(
        listed(&r).await,
        1,
        "the enrolled gateway is listed; the revoked one not"
    );
    assert!(
        r.store()
            .get(&gateway_key(&t1, &gw_vnf, &gw2.request.id))
            .await
            .expect("get")
            .is_some()
    );
}

/// Strict mode: a changed image is revoked whatever comes with it; a renewal carrying a
/// D-H value outside the group does not turn the revocation into a mere refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_image_is_revoked_even_with_a_bad_renewal() {
    let (_d, s) = embedded();
    let r = onboarded(s).await;
    let mut a = agent(create(&r, "web-0", 1).await, IMAGE);
    r.enroll(10, &a.request).await.expect("enroll");
    let changed = measure_bytes(b"a tampered image", &[Algorithm::Sha256])
        .expect("m")
        .get(Algorithm::Sha256)
        .expect("sha")
        .0
        .clone();
    let (reveal, sealed, _, _) = renewal(&mut a, &changed, 50);
    let req = Reattestation {
        reveal: &reveal,
        measurement: &changed,
        renewal: Some((&sealed, &[0xffu8; 384][..])),
    };
    assert_eq!(
        code(
            r.reattest(20, &a.request.id, &req)
                .await
                .expect_err("revoked")
        ),
        RefusalCode::Revoked
    );
    assert!(matches!(
        state(&r, &a.request.id).await,
        InstanceState::Revoked(_)
    ));
    assert!(kinds(&r).await.contains(&"instance.revoked".to_string()));
}
