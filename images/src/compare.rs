//! Measuring two images at once and comparing their digests (the paper's Table 2).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use asmn_shared::measure::{Algorithm, MeasureError, MeasureOptions, Measurement, measure_path};
use serde::Serialize;

/// One side of a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// The image.
    pub path: PathBuf,
    /// Its measurement.
    pub measurement: Measurement,
    /// Time to measure it.
    pub seconds: f64,
}

/// The outcome of [`compare`].
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// The first image.
    pub a: Side,
    /// The second image.
    pub b: Side,
    /// Per algorithm: whether the digests are equal.
    pub equal_by_algorithm: Vec<(Algorithm, bool)>,
    /// Whether every digest (and the size) is equal.
    pub equal: bool,
    /// Wall time of the whole comparison.
    pub seconds: f64,
}

/// Measures `a` and `b` concurrently with `algorithms` and compares them. `progress`
/// receives the bytes read from both so far, on the calling thread.
pub fn compare(
    a: &Path,
    b: &Path,
    algorithms: &[Algorithm],
    options: MeasureOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<CompareReport, MeasureError> {
    let start = Instant::now();
    let (done_a, done_b) = (AtomicU64::new(0), AtomicU64::new(0));
    let (ra, rb) = std::thread::scope(|scope| {
        let ha = scope.spawn(|| measure_timed(a, algorithms, options, &done_a));
        let hb = scope.spawn(|| measure_timed(b, algorithms, options, &done_b));
        while !(ha.is_finished() && hb.is_finished()) {
            progress(done_a.load(Ordering::Relaxed) + done_b.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(50));
        }
        (join(ha), join(hb))
    });
    let (ma, ta) = ra?;
    let (mb, tb) = rb?;
    let equal_by_algorithm: Vec<(Algorithm, bool)> = ma
        .digests
        .iter()
        .map(|(alg, d)| (*alg, mb.get(*alg) == Some(d)))
        .collect();
    let equal = ma.bytes == mb.bytes && equal_by_algorithm.iter().all(|(_, e)| *e);
    Ok(CompareReport {
        a: Side {
            path: a.to_path_buf(),
            measurement: ma,
            seconds: ta.as_secs_f64(),
        },
        b: Side {
            path: b.to_path_buf(),
            measurement: mb,
            seconds: tb.as_secs_f64(),
        },
        equal_by_algorithm,
        equal,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn measure_timed(
    path: &Path,
    algorithms: &[Algorithm],
    options: MeasureOptions,
    done: &AtomicU64,
) -> Result<(Measurement, Duration), MeasureError> {
    let t = Instant::now();
    let m = measure_path(path, algorithms, options, &mut |p| {
        done.store(p.done, Ordering::Relaxed)
    })?;
    Ok((m, t.elapsed()))
}

fn join<T>(
    h: std::thread::ScopedJoinHandle<'_, Result<T, MeasureError>>,
) -> Result<T, MeasureError> {
    h.join()
        .unwrap_or_else(|_| Err(MeasureError::Worker(Algorithm::Sha256)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testimage::make_test_image;

    #[test]
    fn equal_and_different_images() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        make_test_image(&a, 5_000_000, 1, false, 2, &mut |_| {}).expect("a");
        make_test_image(&b, 5_000_000, 1, false, 2, &mut |_| {}).expect("b");
        make_test_image(&c, 5_000_000, 1, false, 2, &mut |_| {}).expect("c");
        // c differs from a by one byte.
        let mut bytes = std::fs::read(&c).expect("read");
        bytes[4_000_000] ^= 1;
        std::fs::write(&c, bytes).expect("write");
        let algs = [
            Algorithm::Crc32,
            Algorithm::Md5,
            Algorithm::Sha1,
            Algorithm::Sha256,
        ];
        let same = compare(&a, &b, &algs, MeasureOptions::default(), &mut |_| {}).expect("ab");
        assert!(same.equal);
        let diff = compare(&a, &c, &algs, MeasureOptions::default(), &mut |_| {}).expect("ac");
        assert!(!diff.equal);
        assert!(diff.equal_by_algorithm.iter().all(|(_, e)| !e));
    }
}
