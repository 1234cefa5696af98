//! Tables 1 and 2: the paper's image sizes, each pair hashed by ASMN and by the system's
//! tools.

use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;

use super::{Options, PAPER_SIZES_GB, PAPER_TABLE2, Progress};

/// One row of Table 2: a pair of images, one algorithm.
#[derive(Debug, Clone, Serialize)]
pub struct HashRow {
    /// "VNF1 vs VNF2".
    pub pair: String,
    /// Both images' bytes.
    pub bytes: u64,
    /// The algorithm.
    pub algorithm: String,
    /// ASMN's time for both images, s.
    pub ours_s: f64,
    /// The baselines' times for both images, s (None: not installed).
    pub baselines: Vec<(String, Option<f64>)>,
    /// Whether the two digests differ (they must: the images do).
    pub differ: bool,
    /// The paper's seconds (full-size images; no SHA-256 there).
    pub paper_s: Option<f64>,
}

pub(super) fn hashing(o: &Options, out: &Path, p: &Progress) -> anyhow::Result<Vec<HashRow>> {
    use asmn_shared::measure::{Algorithm, MeasureOptions, measure_path};
    let scale = if o.quick { 1.0 / 200.0 } else { 1.0 };
    let dir = tempfile::tempdir_in(out)?;
    let mut reports = Vec::new();
    let mut digests = Vec::new();
    let algs = [
        Algorithm::Crc32,
        Algorithm::Md5,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];
    for (i, gb) in PAPER_SIZES_GB.iter().enumerate() {
        let path = dir.path().join(format!("vnf{}.img", i + 1));
        let size = (gb * 1e9 * scale) as u64;
        p.say(&format!(
            "making VNF{} ({:.2} GB)",
            i + 1,
            size as f64 / 1e9
        ));
        asmn_images::testimage::make_test_image(&path, size, i as u64 + 1, true, 2, &mut |_| {})
            .with_context(|| format!("making {}", path.display()))?;
        p.say(&format!(
            "measuring VNF{} with ASMN and the baselines",
            i + 1
        ));
        let r = asmn_images::bench::run(&path, 1, &mut |_| {})
            .with_context(|| format!("measuring {}", path.display()))?;
        let m = measure_path(&path, &algs, MeasureOptions::default(), &mut |_| {})?;
        digests.push(m);
        reports.push(r);
        std::fs::remove_file(&path)?;
    }
    let mut rows = Vec::new();
    for k in 0..3 {
        let (a, b) = (&reports[2 * k], &reports[2 * k + 1]);
        for (col, alg) in algs.iter().enumerate() {
            let (Some(ra), Some(rb)) = (
                a.rows.iter().find(|r| r.what == alg.name()),
                b.rows.iter().find(|r| r.what == alg.name()),
            ) else {
                continue;
            };
            let baselines = ra
                .baselines
                .iter()
                .zip(&rb.baselines)
                .map(|(x, y)| {
                    (
                        x.label.clone(),
                        x.seconds.zip(y.seconds).map(|(s, t)| s + t),
                    )
                })
                .collect();
            let differ = digests[2 * k].digests.get(alg) != digests[2 * k + 1].digests.get(alg);
            rows.push(HashRow {
                pair: format!("VNF{} vs VNF{}", 2 * k + 1, 2 * k + 2),
                bytes: a.bytes + b.bytes,
                algorithm: alg.name().to_string(),
                ours_s: ra.ours + rb.ours,
                baselines,
                differ,
                paper_s: PAPER_TABLE2[k].get(col).copied(),
            });
        }
    }
    Ok(rows)
}
