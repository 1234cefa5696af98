//! `kill -9` of `sec-em` in the middle of concurrent enrollments: after a restart, every
//! acknowledged reveal is in the store and no chain element is ever accepted twice.
//! Embedded store: 20 kill points over 1,000 enrollments.

use common::{ask_opt as ask, start};

mod common;

use asmn_shared::wire::msg::{self, Body, RefusalCode};

const IMAGE: &[u8] = b"crash-test image";
const ROUNDS: usize = 20;
const PER_ROUND: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_concurrent_enrollments_loses_no_acknowledged_reveal() {
    crash_run(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_etcd_loses_no_acknowledged_reveal() {
    let Some(etcd) = asmn_controller::local_etcd::LocalEtcd::for_tests_tls(1).await else {
        return;
    };
    crash_run(Some(&etcd)).await;
    drop(etcd);
}

/// The crash run, on the embedded store or on `etcd` (over TLS).
async fn crash_run(etcd: Option<&asmn_controller::local_etcd::LocalEtcd>) {
    let dir = tempfile::tempdir().expect("tmp");
    let (cfg, admin, agents) = common::init_for_load(dir.path(), |text| match etcd {
        Some(etcd) => {
            let text = etcd.configure(&text).expect("etcd settings");
            assert!(text.contains(&etcd.url()), "store line replaced");
            text
        }
        None => text,
    });

    let mut daemon = start(&cfg);
    let ac = admin.connect().await;
    // 1,000 instances, created 50 at a time.
    let requests: Vec<Vec<msg::EnrollRequest>> =
        common::onboard_and_create(&ac, IMAGE, ROUNDS, PER_ROUND)
            .await
            .into_iter()
            .map(|batch| batch.into_iter().map(|(req, _)| req).collect())
            .collect();

    let mut acknowledged = Vec::new();
    for (round, batch) in requests.iter().enumerate() {
        // Enroll the round's 50 agents at once over 5 connections; kill -9 sec-em after a
        // varying number of acknowledgements.
        let conns: Vec<quinn::Connection> = {
            let mut v = Vec::new();
            for _ in 0..5 {
                v.push(agents.connect().await);
            }
            v
        };
        let kill_after = 1 + (round * 7) % (PER_ROUND - 5);
        let (tx, mut rx) = tokio::sync::mpsc::channel(PER_ROUND);
        for (i, req) in batch.iter().enumerate() {
            let (c, req, tx) = (conns[i % conns.len()].clone(), req.clone(), tx.clone());
            tokio::spawn(async move {
                let r = ask(&c, Body::Enroll(req.clone())).await;
                let _ = tx.send((req, r)).await;
            });
        }
        drop(tx);
        let mut acks = 0;
        let mut killed = false;
        while let Some((req, r)) = rx.recv().await {
            if let Some(Body::Enrolled(_)) = r {
                acknowledged.push(req);
                acks += 1;
            }
            if acks >= kill_after && !killed {
                let _ = daemon.0.kill(); // SIGKILL, by PID
                let _ = daemon.0.wait();
                killed = true;
                // Requests still in flight fail now rather than at the idle timeout.
                for c in &conns {
                    c.close(0u32.into(), b"server killed");
                }
            }
        }
        if !killed {
            let _ = daemon.0.kill();
            let _ = daemon.0.wait();
        }
        daemon = start(&cfg);
    }

    // After the last restart: every acknowledged enrollment is stored, and replaying any
    // of them is refused: no element was accepted twice.
    let c = agents.connect().await;
    let ac = admin.connect().await;
    assert!(
        acknowledged.len() >= ROUNDS,
        "at least one acknowledgement per round"
    );
    for req in &acknowledged {
        let id = hex::encode(&req.instance_key);
        let q = ask(
            &ac,
            Body::Query(msg::QueryRequest {
                what: "instance".into(),
                argument: id.clone(),
                ..Default::default()
            }),
        )
        .await;
        let Some(Body::QueryResult(r)) = q else {
            panic!("query {id}: {q:?}")
        };
        let rec: serde_json::Value = serde_json::from_str(&r.json).expect("json");
        assert_eq!(
            rec["state"]["state"], "enrolled",
            "{id} was acknowledged but is not stored"
        );
        assert_eq!(rec["chain"]["last_index"], 63, "{id}");
        let again = ask(&c, Body::Enroll(req.clone())).await;
        let Some(Body::Refused(refusal)) = again else {
            panic!("a replay of {id} was accepted: {again:?}")
        };
        assert_eq!(
            RefusalCode::try_from(refusal.code),
            Ok(RefusalCode::Replayed)
        );
    }
    // And the audit log survived 20 kills intact.
    let v = ask(
        &ac,
        Body::Query(msg::QueryRequest {
            what: "audit-verify".into(),
            argument: String::new(),
            ..Default::default()
        }),
    )
    .await;
    let Some(Body::QueryResult(r)) = v else {
        panic!("audit: {v:?}")
    };
    assert!(r.json.contains("\"ok\":true"), "{}", r.json);
}
