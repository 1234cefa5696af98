//! `asmn-image bench`: our measurement beside `openssl dgst` and the coreutils (and zlib)
//! tool for each algorithm, on the same file, in the same run, as ratios.
//!
//! Every command runs `repeat` times after one warm-up read that puts the file in the page
//! cache; the best (shortest) time of each is kept, for ours and the baselines alike.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use asmn_shared::measure::{Algorithm, MeasureError, MeasureOptions, measure_path};
use serde::Serialize;

/// One timed command.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// What ran.
    pub label: String,
    /// Best wall time in seconds, `None` if the tool is not installed or failed.
    pub seconds: Option<f64>,
}

/// One row: an algorithm (or a combination), ours and the baselines.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What is measured.
    pub what: String,
    /// Our time.
    pub ours: f64,
    /// The baselines.
    pub baselines: Vec<Timing>,
}

impl Row {
    /// Baseline time divided by ours (above 1: we are faster), per baseline.
    pub fn ratios(&self) -> Vec<(String, Option<f64>)> {
        self.baselines
            .iter()
            .map(|b| (b.label.clone(), b.seconds.map(|s| s / self.ours)))
            .collect()
    }
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// File size.
    pub bytes: u64,
    /// Repetitions per command.
    pub repeat: usize,
    /// One row per algorithm, then the combined pass.
    pub rows: Vec<Row>,
}

fn best_of(repeat: usize, mut f: impl FnMut() -> Option<Duration>) -> Option<f64> {
    let mut best: Option<Duration> = None;
    for _ in 0..repeat.max(1) {
        let t = f()?;
        best = Some(best.map_or(t, |b| b.min(t)));
    }
    best.map(|d| d.as_secs_f64())
}

fn time_command(program: &str, args: &[&str], file: &Path) -> Option<Duration> {
    let t = Instant::now();
    let status = Command::new(program)
        .args(args)
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    status.success().then(|| t.elapsed())
}

fn ours(file: &Path, algs: &[Algorithm], repeat: usize) -> Result<f64, MeasureError> {
    let mut best = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        measure_path(file, algs, MeasureOptions::default(), &mut |_| {})?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Runs the benchmark on `file`.
pub fn run(
    file: &Path,
    repeat: usize,
    log: &mut dyn FnMut(&str),
) -> Result<BenchReport, MeasureError> {
    log("warming the page cache");
    let warm = measure_path(
        file,
        &[Algorithm::Crc32],
        MeasureOptions::default(),
        &mut |_| {},
    )?;
    let mut rows = Vec::new();
    for alg in Algorithm::ALL {
        log(&format!("{alg}: ours"));
        let ours_s = ours(file, &[alg], repeat)?;
        let mut baselines = Vec::new();
        let mut base = |label: &str, program: &str, args: &[&str]| {
            log(&format!("{alg}: {label}"));
            baselines.push(Timing {
                label: label.to_string(),
                seconds: best_of(repeat, || time_command(program, args, file)),
            });
        };
        match alg {
            Algorithm::Crc32 => {
                base("crc32 (zlib)", "crc32", &[]);
                base("cksum (POSIX CRC)", "cksum", &[]);
            }
            other => {
                let flag = format!("-{}", other.name());
                base(
                    &format!("openssl dgst {flag}"),
                    "openssl",
                    &["dgst", flag.as_str()],
                );
                let tool = format!("{}sum", other.name());
                base(&tool, &tool, &[]);
            }
        }
        rows.push(Row {
            what: alg.name().to_string(),
            ours: ours_s,
            baselines,
        });
    }
    // One pass with four hashes against MD5 alone (ours), the slowest of the four.
    let combo = [
        Algorithm::Crc32,
        Algorithm::Md5,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];
    log("crc32+md5+sha1+sha256 in one pass");
    let combined = ours(file, &combo, repeat)?;
    let md5_alone = ours(file, &[Algorithm::Md5], repeat)?;
    rows.push(Row {
        what: "crc32+md5+sha1+sha256 (one pass)".into(),
        ours: combined,
        baselines: vec![Timing {
            label: "ours, md5 alone".into(),
            seconds: Some(md5_alone),
        }],
    });
    Ok(BenchReport {
        bytes: warm.bytes,
        repeat,
        rows,
    })
}

/// A plain-text table of the report.
pub fn render(report: &BenchReport) -> String {
    let gb = report.bytes as f64 / 1e9;
    let mut out = format!(
        "file: {:.3} GB, best of {} runs each, page cache warm\n\n{:<34} {:>9} {:>8}   {:<28} {:>9} {:>8} {:>9}\n",
        gb, report.repeat, "measurement", "ours s", "GB/s", "baseline", "s", "GB/s", "ratio"
    );
    for row in &report.rows {
        for (i, b) in row.baselines.iter().enumerate() {
            let (what, ours_s, ours_rate) = if i == 0 {
                (
                    row.what.clone(),
                    format!("{:.3}", row.ours),
                    format!("{:.2}", gb / row.ours),
                )
            } else {
                (String::new(), String::new(), String::new())
            };
            let (bs, brate, ratio) = match b.seconds {
                Some(s) => (
                    format!("{s:.3}"),
                    format!("{:.2}", gb / s),
                    format!("{:.2}x", s / row.ours),
                ),
                None => ("-".into(), "-".into(), "not run".into()),
            };
            out.push_str(&format!(
                "{what:<34} {ours_s:>9} {ours_rate:>8}   {:<28} {bs:>9} {brate:>8} {ratio:>9}\n",
                b.label
            ));
        }
    }
    out.push_str("\nratio = baseline time / our time (above 1.00x: ASMN is faster). For the one-pass row,\nthe ratio is MD5 alone / all four together (1.00x: the other hashes cost no wall time).\n");
    out
}
