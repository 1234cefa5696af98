//! `sec-em-load` runs end to end on a small tenant (its figures are a benchmark, read by
//! people: this only checks that every phase completes and the report is whole).

use std::process::Command;

mod common;

fn run(store: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_sec-em-load"))
        .args(["--sec-em", env!("CARGO_BIN_EXE_sec-em")])
        .args([
            "--agents",
            "40",
            "--trials",
            "3",
            "--idle",
            "30",
            "--idle-secs",
            "1",
        ])
        .args(["--store", store, "--json"])
        .output()
        .expect("run sec-em-load");
    assert!(
        out.status.success(),
        "sec-em-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

fn check(r: &serde_json::Value) {
    assert_eq!(r["agents"], 40);
    assert_eq!(r["catalog_trials"], 3);
    assert_eq!(r["revoke_trials"], 3);
    assert_eq!(r["idle_agents"], 30);
    // Every agent but the three revoked ones is still connected after the idle hold.
    assert_eq!(r["idle_connected_after"], 40 + 30 - 3);
    for field in [
        "enrollments_per_second",
        "catalog_all_acked_ms_max",
        "revoke_all_notified_ms_max",
        "sec_em_rss_mib_with_idle",
    ] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
}

#[test]
fn the_load_benchmark_completes_with_the_embedded_store() {
    check(&run("embedded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_benchmark_completes_with_etcd_over_tls() {
    // Started only to learn whether etcd is installed (required under CI); the benchmark
    // starts its own, over TLS.
    let Some(cluster) = common::etcd_cluster(1).await else {
        return;
    };
    drop(cluster);
    let report = tokio::task::spawn_blocking(move || run("etcds"))
        .await
        .expect("run");
    assert_eq!(report["store"], "etcds");
    check(&report);
}
