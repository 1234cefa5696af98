//! Every digest of `shared::measure` against the system's tools on generated files: empty,
//! one byte, sizes around the buffer boundaries, and a few hundred megabytes.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use asmn_shared::measure::{Algorithm, MeasureOptions, measure_path};

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Runs `tool FILE` and returns the first word of its output, or `None` if the tool is
/// missing (an error under CI).
fn tool_digest(tool: &str, args: &[&str], file: &Path) -> Option<String> {
    match Command::new(tool).args(args).arg(file).output() {
        Ok(o) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout);
            Some(
                out.split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase(),
            )
        }
        Ok(o) => panic!("{tool} failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            assert!(!under_ci(), "{tool} is required under CI: {e}");
            asmn_shared::skip::note(&format!("{tool}: {e}"));
            None
        }
    }
}

/// zlib's CRC32 of a file, through `crc32` (libarchive-zip-perl) or Python's zlib.
fn zlib_crc32(file: &Path) -> Option<String> {
    if let Ok(o) = Command::new("crc32").arg(file).output()
        && o.status.success()
    {
        return Some(
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .to_ascii_lowercase(),
        );
    }
    let script = "import sys, zlib\nc = 0\nwith open(sys.argv[1], 'rb') as f:\n    for b in iter(lambda: f.read(1 << 20), b''):\n        c = zlib.crc32(b, c)\nprint('%08x' % c)\n";
    tool_digest("python3", &["-c", script], file)
}

fn check(file: &Path, options: MeasureOptions) {
    let m = measure_path(file, &Algorithm::ALL, options, &mut |_| {}).expect("measure");
    let ours = |a| m.get(a).expect("digest").to_hex();
    let size = std::fs::metadata(file).expect("meta").len();
    assert_eq!(m.bytes, size);
    if let Some(c) = zlib_crc32(file) {
        assert_eq!(ours(Algorithm::Crc32), c, "crc32 of {size} bytes");
    }
    for (alg, tool) in [
        (Algorithm::Md5, "md5sum"),
        (Algorithm::Sha1, "sha1sum"),
        (Algorithm::Sha256, "sha256sum"),
        (Algorithm::Sha512, "sha512sum"),
    ] {
        if let Some(d) = tool_digest(tool, &[], file) {
            assert_eq!(ours(alg), d, "{tool} of {size} bytes");
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for hundreds of MB.
fn fill(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn write_file(dir: &Path, size: usize, seed: u64) -> std::path::PathBuf {
    let path = dir.join(format!("f{size}"));
    let mut f = std::fs::File::create(&path).expect("create");
    let mut state = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len());
        fill(&mut buf[..n], &mut state);
        f.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    path
}

#[test]
fn small_and_boundary_sizes_match_the_tools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chunk = 64 * 1024;
    let options = MeasureOptions {
        chunk_size: chunk,
        queue_depth: 2,
        workers: 0,
        mapped_piece: chunk,
    };
    for size in [
        0,
        1,
        63,
        64,
        65,
        chunk - 1,
        chunk,
        chunk + 1,
        3 * chunk,
        3 * chunk + 7,
    ] {
        let path = write_file(dir.path(), size, size as u64 + 11);
        check(&path, options);
        check(&path, MeasureOptions::default());
    }
}

#[test]
fn a_few_hundred_megabytes_match_the_tools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), 300 * 1024 * 1024 + 12_345, 99);
    check(&path, MeasureOptions::default());
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let err = measure_path(
        Path::new("/nonexistent/asmn-image.qcow2"),
        &[Algorithm::Sha256],
        MeasureOptions::default(),
        &mut |_| {},
    )
    .expect_err("missing");
    assert!(
        err.to_string().contains("/nonexistent/asmn-image.qcow2"),
        "{err}"
    );
}
