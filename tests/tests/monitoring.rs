//! The monitoring files shipped in docs/monitoring name only metrics that ASMN exports:
//! a renamed metric would otherwise leave an alert that never fires. (promtool checks
//! the rules' syntax and behaviour in `.ci/run`.)

use std::path::Path;

fn read(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `asmn_...` name in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("asmn_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
            end += 1;
        }
        out.push(text[start..end].to_string());
        i = end;
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn alerts_and_dashboard_name_only_exported_metrics() {
    let controller = read("controller/src/metrics.rs");
    let agent = read("agent/src/metrics.rs");
    let mut checked = 0;
    for file in [
        "docs/monitoring/asmn-alerts.yml",
        "docs/monitoring/asmn-alerts.test.yml",
        "docs/monitoring/asmn-dashboard.json",
    ] {
        let text = read(file);
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            let exported = if base.starts_with("asmn_agent_") {
                agent.contains(&format!("\"{base}")) || agent.contains(&format!("{base} "))
            } else {
                // Sec-EM registers names without the prefix; counters gain `_total`.
                let short = base.trim_start_matches("asmn_").trim_end_matches("_total");
                controller.contains(&format!("\"{short}\""))
            };
            assert!(exported, "{file} names {name}, which ASMN does not export");
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} names checked");
}
