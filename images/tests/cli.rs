//! `asmn-image` end to end: outputs, exit codes and error messages.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_asmn-image"))
        .args(args)
        .output()
        .expect("run asmn-image")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn make_measure_compare() {
    let dir = tempfile::tempdir().expect("tmp");
    let (a, b, c) = (
        dir.path().join("a.img"),
        dir.path().join("b.img"),
        dir.path().join("c.img"),
    );
    for (p, seed) in [(&a, "1"), (&b, "1"), (&c, "2")] {
        let o = run(&["make-test", s(p), "--size", "3M", "--seed", seed]);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(std::fs::metadata(&a).expect("a").len(), 3_000_000);

    // JSON digests agree with the library's.
    let o = run(&["measure", s(&a), "--algo", "sha256,md5", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let lib = asmn_shared::measure::measure_bytes(
        &std::fs::read(&a).expect("read"),
        &[asmn_shared::measure::Algorithm::Sha256],
    )
    .expect("measure");
    let want = lib
        .get(asmn_shared::measure::Algorithm::Sha256)
        .expect("sha256")
        .to_hex();
    assert_eq!(v["digests"]["sha256"], serde_json::Value::String(want));
    assert_eq!(v["bytes"], 3_000_000);

    // Equal images exit 0, different ones 1.
    let o = run(&["compare", s(&a), s(&b), "--algo", "crc32,sha1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("images are equal"));
    let o = run(&["compare", s(&a), s(&c), "--algo", "crc32,sha1", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["equal"], false);
}

#[test]
fn bad_input_gets_a_clear_error_and_exit_2() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("x.img");
    assert!(
        run(&["make-test", s(&img), "--size", "1K"])
            .status
            .success()
    );

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["measure", s(&img), "--algo", "sha3"],
            "unknown algorithm",
        ),
        (
            vec!["measure", "/nonexistent/vnf.qcow2"],
            "/nonexistent/vnf.qcow2",
        ),
        (vec!["make-test", s(&img), "--size", "1K"], "--force"),
        (
            vec!["make-test", "/tmp/never.img", "--size", "12X"],
            "invalid size",
        ),
        (
            vec!["compare", s(&img), "/nonexistent/b.img"],
            "/nonexistent/b.img",
        ),
        (
            vec!["measure", s(&img), "--algo", ","],
            "at least one algorithm",
        ),
    ];
    for (args, says) in cases {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(says),
            "{args:?} should say {says:?}: {}",
            text(&o)
        );
    }
    // Unknown subcommands and flags: clap's usage error, not a panic.
    let o = run(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("Usage"), "{}", text(&o));
}

#[test]
fn help_explains_the_commands() {
    let o = run(&["--help"]);
    assert!(o.status.success());
    let t = text(&o);
    for cmd in ["measure", "make-test", "compare", "bench"] {
        assert!(t.contains(cmd), "--help lists {cmd}: {t}");
    }
}
