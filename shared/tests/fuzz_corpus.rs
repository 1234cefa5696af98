//! Replays the committed fuzz corpus (`shared/fuzz/corpus/`) through the fuzz targets'
//! entry points on the stable toolchain: every input that ever made the fuzzers find new
//! coverage stays a regression test.

use std::path::Path;

/// A fuzz target's entry point.
type Target = fn(&[u8]);

#[test]
fn committed_corpus_replays_without_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let targets: [(&str, Target); 3] = [
        ("catalog", asmn_shared::fuzzing::catalog),
        ("packet", asmn_shared::fuzzing::packet),
        ("wire", asmn_shared::fuzzing::wire),
    ];
    for (name, run) in targets {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
        let mut n = 0;
        for entry in entries {
            let path = entry.expect("entry").path();
            let data = std::fs::read(&path).expect("read corpus file");
            run(&data);
            n += 1;
        }
        assert!(n > 0, "corpus {name} is empty");
    }
}
