//! `sec-em backup` while 1,000 agents enroll, `kill -9`, `sec-em restore`, start: every
//! instance acknowledged before the backup is in the restored store, enrolled at the
//! position it had, and its agent re-attests (its next reveal is accepted); the audit log
//! verifies. A damaged backup is refused before anything is touched.

use std::process::Command;
use std::sync::{Arc, Mutex};

use asmn_shared::wire::msg::{self, Body};
use common::{ask_opt as ask, start};

mod common;

const IMAGE: &[u8] = b"backup-test image";
const AGENTS: usize = 1000;

fn sec_em(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sec-em"))
        .args(args)
        .output()
        .expect("run sec-em")
}

fn query(what: &str, argument: String) -> Body {
    Body::Query(msg::QueryRequest {
        what: what.into(),
        argument,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_1000_enrollments_restores_every_acknowledged_instance() {
    let dir = tempfile::tempdir().expect("tmp");
    let (cfg, admin, agents) = common::init_for_load(dir.path(), |t| t);
    let cfg_s = cfg.to_str().expect("utf-8").to_string();
    let mut daemon = start(&cfg);
    let ac = admin.connect().await;
    // 1,000 instances, each with the prover of its agent.
    let mut agents_state: Vec<_> = common::onboard_and_create(&ac, IMAGE, AGENTS / 50, 50)
        .await
        .into_iter()
        .flatten()
        .collect();

    // Enroll all of them over 10 connections; once 300 are acknowledged, back up while
    // the rest go on.
    let acked: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(agents.connect().await);
    }
    // Ten agents' worth of VMs booting in turn on each connection, 10 ms apart: the
    // enrollments last seconds, the backup runs in the middle of them.
    let mut tasks = Vec::new();
    for (w, c) in conns.iter().enumerate() {
        let batch: Vec<(usize, msg::EnrollRequest)> = agents_state
            .iter()
            .enumerate()
            .filter(|(i, _)| i % conns.len() == w)
            .map(|(i, (req, _))| (i, req.clone()))
            .collect();
        let (c, acked) = (c.clone(), Arc::clone(&acked));
        tasks.push(tokio::spawn(async move {
            for (i, req) in batch {
                if let Some(Body::Enrolled(_)) = ask(&c, Body::Enroll(req)).await {
                    acked.lock().expect("lock").push(i);
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }));
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while acked.lock().expect("lock").len() < 300 {
        assert!(std::time::Instant::now() < deadline, "enrollments stalled");
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let before: Vec<usize> = acked.lock().expect("lock").clone();
    let out = dir.path().join("under-load.asmnbak");
    let out_s = out.to_str().expect("utf-8").to_string();
    let cfg2 = cfg_s.clone();
    let backup = tokio::task::spawn_blocking(move || {
        sec_em(&["backup", "--config", &cfg2, "--out", &out_s])
    })
    .await
    .expect("backup task");
    let enrolling_during = acked.lock().expect("lock").len();
    assert!(
        backup.status.success(),
        "{}{}",
        String::from_utf8_lossy(&backup.stdout),
        String::from_utf8_lossy(&backup.stderr)
    );
    for t in tasks {
        t.await.expect("enrollment task");
    }
    let total = acked.lock().expect("lock").len();
    assert_eq!(total, AGENTS, "every enrollment acknowledged");
    assert!(
        enrolling_during < AGENTS,
        "the backup ran while enrollments went on ({enrolling_during} acknowledged by its end)"
    );
    let _ = daemon.0.kill(); // SIGKILL, by PID
    let _ = daemon.0.wait();
    for c in &conns {
        c.close(0u32.into(), b"server killed");
    }

    // A damaged copy is refused, and the store is left alone.
    let damaged = dir.path().join("damaged.asmnbak");
    let mut bytes = std::fs::read(&out).expect("backup");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&damaged, &bytes).expect("write");
    let r = sec_em(&[
        "restore",
        "--config",
        &cfg_s,
        "--from",
        damaged.to_str().expect("utf-8"),
        "--force",
    ]);
    assert!(!r.status.success());
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("not a usable backup"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let r = sec_em(&[
        "restore",
        "--config",
        &cfg_s,
        "--from",
        out.to_str().expect("utf-8"),
        "--force",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    daemon = start(&cfg);

    // Every instance acknowledged before the backup: enrolled, at its position, and its
    // agent's next reveal accepted.
    let ac = admin.connect().await;
    let c = agents.connect().await;
    for &i in &before {
        let (req, prover) = &mut agents_state[i];
        let id = hex::encode(&req.instance_key);
        let q = ask(&ac, query("instance", id.clone())).await;
        let Some(Body::QueryResult(r)) = q else {
            panic!("query {id}: {q:?}")
        };
        let rec: serde_json::Value = serde_json::from_str(&r.json).expect("json");
        assert_eq!(
            rec["state"]["state"], "enrolled",
            "{id} lost in the restore"
        );
        assert_eq!(rec["chain"]["last_index"], 63, "{id}");
        let mut again = req.clone();
        again.reveal = Some((&prover.reveal().expect("a next element")).into());
        let a = ask(&c, Body::Enroll(again)).await;
        assert!(
            matches!(a, Some(Body::Enrolled(_))),
            "{id} cannot re-attest after the restore: {a:?}"
        );
    }
    let v = ask(&ac, query("audit-verify", String::new())).await;
    let Some(Body::QueryResult(r)) = v else {
        panic!("audit: {v:?}")
    };
    assert!(r.json.contains("\"ok\":true"), "{}", r.json);
    drop(daemon);
}
