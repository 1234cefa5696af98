//! `sec-em init` and `check-config` end to end.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn sec_em(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sec-em"))
        .args(args)
        .output()
        .expect("run sec-em")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn init_makes_pki_and_config_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().join("asmn");
    let ds = d.to_str().expect("utf-8");
    let o = sec_em(&[
        "init",
        "--dir",
        ds,
        "--server-name",
        "sec-em.example",
        "--listen",
        "127.0.0.1:7443",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    for (name, mode) in [
        ("ca.pem", 0o644),
        ("ca.key", 0o600),
        ("server.key", 0o600),
        ("admin.key", 0o600),
        ("sec-em.toml", 0o600),
    ] {
        let m = std::fs::metadata(d.join(name))
            .expect(name)
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{name}");
    }
    let cfg = d.join("sec-em.toml");
    let o = sec_em(&["check-config", "--config", cfg.to_str().expect("utf-8")]);
    assert!(
        o.status.success() && text(&o).contains("valid"),
        "{}",
        text(&o)
    );

    let ca = std::fs::read(d.join("ca.pem")).expect("ca");
    let o = sec_em(&["init", "--dir", ds]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert_eq!(
        std::fs::read(d.join("ca.pem")).expect("ca"),
        ca,
        "nothing replaced"
    );
    let o = sec_em(&["init", "--dir", ds, "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_ne!(
        std::fs::read(d.join("ca.pem")).expect("ca"),
        ca,
        "replaced with --force"
    );

    // A broken configuration: the file, the field, the reason; exit 2.
    let bad = std::fs::read_to_string(&cfg)
        .expect("cfg")
        .replace("ffdhe3072", "modp1024");
    std::fs::write(&cfg, bad).expect("write");
    let o = sec_em(&["check-config", "--config", cfg.to_str().expect("utf-8")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("tenant.dh_group") && text(&o).contains("too small"),
        "{}",
        text(&o)
    );
}
