//! How a test that cannot run here says so (outside CI only: under `CI` a missing tool
//! fails the test). `cargo test` reports such a test as passed; the note goes to stderr
//! and, when `ASMN_SKIP_LOG` names a file (`scripts/test.sh` sets it), to that file, so
//! that the suite's summary counts the skips and says why.

use std::io::Write;

/// Notes that the calling test skipped, and why.
pub fn note(why: &str) {
    eprintln!("skipped: {why}");
    if let Some(path) = std::env::var_os("ASMN_SKIP_LOG")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{why}");
    }
}
