//! Deterministic pseudo-random test images, written at page-cache speed.
//!
//! Generation runs at several GB/s per core; what bounds a fresh file is the kernel's
//! page-cache allocation (as for `dd if=/dev/zero`). Overwriting an existing image with
//! `force` reuses its cached pages.
//!
//! Block `i` (of [`BLOCK`] bytes) is filled by xoshiro256++ seeded from (seed, i), so
//! blocks are independent: the workers (one per core) each fill and write their own with
//! positioned writes, and the same (size, seed) always gives the same bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use thiserror::Error;

/// Bytes per independently seeded block.
pub const BLOCK: u64 = 4 << 20;

/// Why an image could not be written.
#[derive(Debug, Error)]
pub enum MakeError {
    /// The output exists and `force` was not given.
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(String),
    /// An I/O error.
    #[error("writing {path}: {source}")]
    Io {
        /// The output.
        path: String,
        /// The cause.
        source: io::Error,
    },
}

/// What was written.
#[derive(Debug, Clone, Copy)]
pub struct MadeImage {
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Fills `buf` with block `index` of the image with `seed`.
pub fn fill_block(seed: u64, index: u64, buf: &mut [u8]) {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    key[16..24].copy_from_slice(b"asmn-img");
    let mut rng = Xoshiro256PlusPlus::from_seed(key);
    rng.fill_bytes(buf);
}

/// Writes a `size`-byte image at `path`, using `threads` writers (0 = one per core).
/// `progress` receives the bytes written so far, from the calling thread.
pub fn make_test_image(
    path: &Path,
    size: u64,
    seed: u64,
    force: bool,
    threads: usize,
    progress: &mut dyn FnMut(u64),
) -> Result<MadeImage, MakeError> {
    let io_err = |source| MakeError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.write(true);
    if force {
        // Overwrite in place rather than truncating: rewriting pages that are already in
        // the page cache is several times faster than allocating new ones (markedly so in
        // VMs whose host reclaims freed guest memory). `set_len` below fixes the size.
        opts.create(true);
    } else {
        opts.create_new(true);
    }
    let file = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            MakeError::Exists(path.display().to_string())
        } else {
            io_err(e)
        }
    })?;
    file.set_len(size).map_err(io_err)?;
    let start = Instant::now();
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    };
    let blocks = size.div_ceil(BLOCK);
    let done = AtomicU64::new(0);
    let result = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads as u64)
            .map(|t| {
                let (file, done) = (&file, &done);
                scope.spawn(move || write_blocks(file, size, seed, blocks, t, threads as u64, done))
            })
            .collect();
        // Report progress while the workers run.
        while !workers.iter().all(|w| w.is_finished()) {
            progress(done.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => first_err = first_err.or(Some(e)),
                Err(_) => {
                    first_err = first_err.or(Some(io::Error::other("a writer thread panicked")))
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    });
    result.map_err(io_err)?;
    progress(size);
    Ok(MadeImage {
        bytes: size,
        elapsed: start.elapsed(),
    })
}

fn write_blocks(
    file: &File,
    size: u64,
    seed: u64,
    blocks: u64,
    first: u64,
    step: u64,
    done: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BLOCK as usize];
    let mut i = first;
    while i < blocks {
        let off = i * BLOCK;
        let n = (size - off).min(BLOCK) as usize;
        fill_block(seed, i, &mut buf[..n]);
        file.write_all_at(&buf[..n], off)?;
        done.fetch_add(n as u64, Ordering::Relaxed);
        i += step;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_thread_count_independent() {
        let dir = tempfile::tempdir().expect("tmp");
        let size = 3 * BLOCK + 12_345;
        let a = dir.path().join("a.img");
        let b = dir.path().join("b.img");
        make_test_image(&a, size, 7, false, 1, &mut |_| {}).expect("a");
        make_test_image(&b, size, 7, false, 3, &mut |_| {}).expect("b");
        let (da, db) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        assert_eq!(da.len() as u64, size);
        assert!(da == db, "same seed, same bytes");
        // Not constant: the blocks differ from each other.
        assert_ne!(da[..64], da[BLOCK as usize..BLOCK as usize + 64]);
        let c = dir.path().join("c.img");
        make_test_image(&c, size, 8, false, 2, &mut |_| {}).expect("c");
        assert!(
            std::fs::read(&c).expect("c") != da,
            "another seed, other bytes"
        );
        // Refuses to overwrite without force.
        assert!(matches!(
            make_test_image(&a, 10, 7, false, 1, &mut |_| {}),
            Err(MakeError::Exists(_))
        ));
        make_test_image(&a, 10, 7, true, 1, &mut |_| {}).expect("force");
        assert_eq!(std::fs::metadata(&a).expect("meta").len(), 10);
    }
}
