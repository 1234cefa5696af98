//! `asmn-image`: measure, make, compare, benchmark and bake VNF images.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use asmn_images::{bake, bench, compare, size, testimage};
use asmn_shared::measure::{self, Algorithm, MeasureOptions};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

/// Measure, make, compare, benchmark and bake VNF images.
///
/// Digests are computed in one streaming pass, every requested algorithm at once, spread
/// over the available cores. CRC32, MD5 and SHA-1 are for comparison with VIM checksums
/// and the paper's Table 2; ASMN attests with SHA-256.
#[derive(Parser, Debug)]
#[command(name = "asmn-image", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the digests of an image file or block device.
    Measure {
        /// The image file or block device.
        file: PathBuf,
        /// Comma-separated algorithms: crc32, md5, sha1, sha256, sha512.
        #[arg(long, default_value = "sha256")]
        algo: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a deterministic pseudo-random test image (both cores, page-cache speed).
    MakeTest {
        /// The file to write.
        out: PathBuf,
        /// Size, such as 2.55G (decimal units) or 4GiB (binary units).
        #[arg(long)]
        size: String,
        /// Seed: the same size and seed always give the same bytes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Measure two images at once and say whether they are equal, per algorithm.
    ///
    /// Exits 0 when equal, 1 when different, 2 on error.
    Compare {
        /// The first image.
        a: PathBuf,
        /// The second image.
        b: PathBuf,
        /// Comma-separated algorithms: crc32, md5, sha1, sha256, sha512.
        #[arg(long, default_value = "sha256")]
        algo: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Bake a bootable Debian VNF image with the ASMN agent from a recipe (as root).
    ///
    /// Writes NAME.raw (the golden ext4 image: on-board it, and attach it read-only as the
    /// VM's second disk, which the agent measures), NAME.qcow2 (the same, to boot from),
    /// NAME.vmlinuz and NAME.initrd (direct kernel boot: root=/dev/vda), and prints the
    /// golden digests. The VM gets its bootstrap bundle from a config drive (label cidata
    /// or config-2) holding asmn/bundle, asmn/agent.toml and optionally asmn/hosts.
    /// Needs debootstrap, e2fsprogs and qemu-utils; downloads from the recipe's mirror.
    Bake {
        /// The recipe (TOML), such as images/recipes/vnf-web.toml.
        #[arg(long)]
        recipe: PathBuf,
        /// The agent's Debian package to install (default: the newest
        /// target/debian/asmn-agent_*.deb, which scripts/package.sh builds).
        #[arg(long)]
        agent_deb: Option<PathBuf>,
        /// Where the image goes.
        #[arg(long, default_value = "baked")]
        out: PathBuf,
        /// Where debootstrap keeps its downloads between bakes.
        #[arg(long, default_value = "/var/cache/asmn-image")]
        cache: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Time our measurement beside openssl dgst, coreutils and zlib's crc32 on one file.
    Bench {
        /// The file (put it in the page cache: it is read once before timing).
        file: PathBuf,
        /// Runs per command; the best time is kept.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn bar(total: u64, what: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    Some(pb)
}

fn algorithms(list: &str) -> anyhow::Result<Vec<Algorithm>> {
    let a = measure::parse_algorithms(list)?;
    anyhow::ensure!(!a.is_empty(), "--algo needs at least one algorithm");
    Ok(a)
}

fn file_size(path: &PathBuf) -> u64 {
    use std::io::Seek;
    std::fs::File::open(path)
        .and_then(|mut f| f.seek(std::io::SeekFrom::End(0)))
        .unwrap_or(0)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Measure { file, algo, json } => {
            let algs = algorithms(&algo)?;
            let pb = bar(file_size(&file), "measuring");
            let t = std::time::Instant::now();
            let m = measure::measure_path(&file, &algs, MeasureOptions::default(), &mut |p| {
                if let Some(pb) = &pb {
                    pb.set_position(p.done);
                }
            })?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            let secs = t.elapsed().as_secs_f64();
            if json {
                let v = serde_json::json!({
                    "file": file, "bytes": m.bytes, "seconds": secs, "digests": m.digests,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (a, d) in &m.digests {
                    println!("{a:<7} {d}  {}", file.display());
                }
                eprintln!(
                    "{} in {secs:.2} s ({:.2} GB/s)",
                    size::human(m.bytes),
                    m.bytes as f64 / 1e9 / secs.max(1e-9)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MakeTest {
            out,
            size: s,
            seed,
            force,
        } => {
            let bytes = size::parse_size(&s)?;
            let pb = bar(bytes, "writing");
            let made = testimage::make_test_image(&out, bytes, seed, force, 0, &mut |d| {
                if let Some(pb) = &pb {
                    pb.set_position(d);
                }
            })?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            let secs = made.elapsed.as_secs_f64();
            println!(
                "wrote {} ({} bytes, seed {seed}) to {} in {secs:.2} s ({:.2} GB/s)",
                size::human(bytes),
                bytes,
                out.display(),
                bytes as f64 / 1e9 / secs.max(1e-9)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { a, b, algo, json } => {
            let algs = algorithms(&algo)?;
            let pb = bar(file_size(&a) + file_size(&b), "measuring both");
            let r = compare::compare(&a, &b, &algs, MeasureOptions::default(), &mut |d| {
                if let Some(pb) = &pb {
                    pb.set_position(d);
                }
            })?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "A: {} ({}, {:.2} s)\nB: {} ({}, {:.2} s)",
                    a.display(),
                    size::human(r.a.measurement.bytes),
                    r.a.seconds,
                    b.display(),
                    size::human(r.b.measurement.bytes),
                    r.b.seconds
                );
                println!("{:<9} {:<9}  digests", "algorithm", "result");
                for (alg, eq) in &r.equal_by_algorithm {
                    let da =
                        r.a.measurement
                            .get(*alg)
                            .map(|d| d.to_hex())
                            .unwrap_or_default();
                    let db =
                        r.b.measurement
                            .get(*alg)
                            .map(|d| d.to_hex())
                            .unwrap_or_default();
                    let verdict = if *eq { "equal" } else { "DIFFERENT" };
                    println!("{alg:<9} {verdict:<9}  A {da}\n{:<19}  B {db}", "");
                }
                println!(
                    "{} in {:.2} s",
                    if r.equal {
                        "images are equal"
                    } else {
                        "images differ"
                    },
                    r.seconds
                );
            }
            Ok(if r.equal {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Bake {
            recipe,
            agent_deb,
            out,
            cache,
            json,
        } => {
            let r = bake::load_recipe(&recipe)?;
            let agent = agent_deb
                .or_else(|| bake::newest_agent_deb(std::path::Path::new("target/debian")))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no agent package: build it with scripts/package.sh (target/debian/asmn-agent_*.deb) or pass --agent-deb"
                    )
                })?;
            let baked = bake::bake(&r, &agent, &out, &cache, &mut |s| {
                if !json {
                    eprintln!("bake: {s}");
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&baked)?);
            } else {
                println!(
                    "baked {} in {:.0} s: {} ({}), {} ({})",
                    r.name,
                    baked.seconds,
                    baked.raw.display(),
                    size::human(baked.bytes),
                    baked.qcow2.display(),
                    size::human(baked.qcow2_bytes)
                );
                println!("golden digests of {}:", baked.raw.display());
                for (a, d) in &baked.digests {
                    println!("  {a:<7} {d}");
                }
                println!(
                    "on-board it with: asmnctl image onboard {} --vnfd VNFD.yaml",
                    baked.raw.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { file, repeat, json } => {
            let quiet = json;
            let report = bench::run(&file, repeat, &mut |s| {
                if !quiet {
                    eprintln!("bench: {s}");
                }
            })
            .with_context(|| format!("benchmarking {}", file.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("asmn-image: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
