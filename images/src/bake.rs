//! `asmn-image bake`: a bootable Debian VNF image with the agent baked in, from a recipe
//! kept as data (`images/recipes/*.toml`).
//!
//! The image is one ext4 file system (no partition table), built without mounting
//! anything: `debootstrap` fills a staging directory, the agent's Debian package (built by
//! `scripts/package.sh`: the same package operators install) is installed into it with
//! `dpkg`, file times are set to the recipe's epoch, and
//! `mke2fs -d` writes the file system with a fixed UUID, hash seed and clock. The result
//! is `NAME.raw` (the golden image), `NAME.qcow2` (the same, to boot from) and the
//! kernel and initrd beside them, for a direct kernel boot (`root=/dev/vda`).
//!
//! **What the agent measures.** A running root file system changes (logs, machine-id,
//! the agent's own state), so measuring it would break strict re-attestation. The VM is
//! given the golden `NAME.raw` a second time, read-only, as its second disk, and the
//! agent measures that device (`target = "/dev/vdb"`): the bytes `asmnctl image onboard`
//! measured, unchanged while the VM runs. Booting from a copy-on-write overlay of the
//! same image keeps the running system what was attested at boot; the limit is that a
//! change made later to the writable boot disk is not seen by re-attestation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use asmn_shared::measure::{Algorithm, MeasureOptions, Measurement, measure_path};
use serde::Deserialize;

/// A bake recipe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The image's name (file names): letters, digits, `-`, `_`.
    pub name: String,
    /// Debian suite.
    pub suite: String,
    /// Debian mirror.
    pub mirror: String,
    /// Packages beyond debootstrap's minbase.
    #[serde(default)]
    pub packages: Vec<String>,
    /// File system size, such as `1.5GiB`.
    pub size: String,
    /// Host name of the VNF.
    pub hostname: String,
    /// The file system's UUID (fixed, for stable digests).
    pub fs_uuid: String,
    /// File times, seconds since 1970 (SOURCE_DATE_EPOCH).
    pub epoch: u64,
    /// Scheduling priority of the agent's service (`Nice=`; a gateway wants CPU first).
    #[serde(default)]
    pub agent_nice: i32,
    /// Extra files: the VNF's payload.
    #[serde(default)]
    pub file: Vec<RecipeFile>,
    /// Units to enable (from `file` or from the packages).
    #[serde(default)]
    pub enable: Vec<String>,
}

/// A file the recipe adds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Absolute path inside the image.
    pub path: String,
    /// Octal mode, such as "0644".
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Contents.
    pub text: String,
}

fn default_mode() -> String {
    "0644".into()
}

/// Why a bake failed.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// The recipe is unreadable or invalid.
    #[error("recipe {file}: {reason}")]
    InvalidRecipe {
        /// The recipe file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A tool is missing.
    #[error("{tool} is not installed ({package}): `apt-get install {package}`")]
    MissingTool {
        /// The command.
        tool: String,
        /// Its Debian package.
        package: String,
    },
    /// A step failed.
    #[error("{step}: {reason}")]
    Step {
        /// Which.
        step: String,
        /// What happened.
        reason: String,
    },
}

fn step(step: &str, reason: impl std::fmt::Display) -> BakeError {
    BakeError::Step {
        step: step.into(),
        reason: reason.to_string(),
    }
}

/// Reads and checks a recipe.
pub fn load_recipe(path: &Path) -> Result<Recipe, BakeError> {
    let invalid = |reason: String| BakeError::InvalidRecipe {
        file: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    let r: Recipe = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    let word = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    };
    if !word(&r.name) || !word(&r.suite) || !word(&r.hostname) {
        return Err(invalid(
            "name, suite and hostname: 1 to 64 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    if !(r.mirror.starts_with("http://") || r.mirror.starts_with("https://")) {
        return Err(invalid(format!("mirror {:?}: an http(s) URL", r.mirror)));
    }
    if let Some(p) = r.packages.iter().find(|p| !word(p) || p.starts_with('-')) {
        return Err(invalid(format!("package {p:?}: not a package name")));
    }
    let bytes = crate::size::parse_size(&r.size).map_err(|e| invalid(format!("size: {e}")))?;
    if !(64 << 20..=64 << 30).contains(&bytes) {
        return Err(invalid("size: between 64 MiB and 64 GiB".into()));
    }
    let uuid_ok = r.fs_uuid.len() == 36
        && r.fs_uuid.chars().enumerate().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    if !uuid_ok {
        return Err(invalid(format!("fs_uuid {:?}: a UUID", r.fs_uuid)));
    }
    if !(-20..=19).contains(&r.agent_nice) {
        return Err(invalid("agent_nice: -20 to 19".into()));
    }
    for f in &r.file {
        let p = Path::new(&f.path);
        if !p.is_absolute()
            || p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(invalid(format!(
                "file {:?}: an absolute path without '..'",
                f.path
            )));
        }
        u32::from_str_radix(&f.mode, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| invalid(format!("file {:?}: mode {:?} is not octal", f.path, f.mode)))?;
    }
    if let Some(u) = r.enable.iter().find(|u| !word(u) || !u.contains('.')) {
        return Err(invalid(format!(
            "enable {u:?}: a unit name such as web.service"
        )));
    }
    Ok(r)
}

/// What a bake produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Baked {
    /// The golden image (ext4, raw): what is on-boarded and what the agent measures.
    pub raw: PathBuf,
    /// The same image as qcow2, to boot from.
    pub qcow2: PathBuf,
    /// Kernel and initrd for the direct kernel boot.
    pub kernel: PathBuf,
    /// See `kernel`.
    pub initrd: PathBuf,
    /// Size of the raw image.
    pub bytes: u64,
    /// Size of the qcow2 file.
    pub qcow2_bytes: u64,
    /// Golden digests of the raw image: (algorithm, hex).
    pub digests: Vec<(String, String)>,
    /// How long the bake took, s.
    pub seconds: f64,
}

/// The drop-in that sets the agent's scheduling priority (a gateway's recipe sets -10).
fn nice_dropin(nice: i32) -> String {
    format!("[Service]\nNice={nice}\n")
}

const NETWORK: &str = "[Match]
Name=en* eth*

[Network]
DHCP=yes
";

fn run(step_name: &str, cmd: &mut Command) -> Result<(), BakeError> {
    let out = cmd
        .output()
        .map_err(|e| step(step_name, format!("{cmd:?}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(step(
            step_name,
            format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                tail.join("\n")
            ),
        ));
    }
    Ok(())
}

fn need(tool: &str, package: &str) -> Result<(), BakeError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
    if found {
        Ok(())
    } else {
        Err(BakeError::MissingTool {
            tool: tool.into(),
            package: package.into(),
        })
    }
}

fn write(root: &Path, path: &str, mode: u32, text: &[u8]) -> Result<(), BakeError> {
    use std::os::unix::fs::PermissionsExt;
    let p = root.join(path.trim_start_matches('/'));
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| step("adding files", format!("{}: {e}", dir.display())))?;
    }
    std::fs::write(&p, text).map_err(|e| step("adding files", format!("{}: {e}", p.display())))?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| step("adding files", format!("{}: {e}", p.display())))
}

/// Enables `unit` (found under /etc/systemd/system or /lib/systemd/system) for `target`.
fn enable(root: &Path, unit: &str, target: &str) -> Result<(), BakeError> {
    let own = Path::new("/etc/systemd/system").join(unit);
    let packaged = Path::new("/lib/systemd/system").join(unit);
    let src = if root.join(own.strip_prefix("/").unwrap_or(&own)).exists() {
        own
    } else if root
        .join(packaged.strip_prefix("/").unwrap_or(&packaged))
        .exists()
    {
        packaged
    } else {
        return Err(step(
            "enabling units",
            format!("no unit {unit} in the image"),
        ));
    };
    let dir = root.join(format!("etc/systemd/system/{target}.wants"));
    std::fs::create_dir_all(&dir).map_err(|e| step("enabling units", e))?;
    let link = dir.join(unit);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&src, &link).map_err(|e| step("enabling units", e))
}

/// Every path under `root`, relative, as `/a/b` (symbolic links not followed).
fn tree(root: &Path) -> Result<Vec<String>, BakeError> {
    let mut out = vec!["/".to_string()];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| step("file list", format!("{}: {e}", dir.display())))?;
        for e in entries {
            let e = e.map_err(|e| step("file list", e))?;
            let p = e.path();
            let rel = p.strip_prefix(root).map_err(|e| step("file list", e))?;
            let rel = format!(
                "/{}",
                rel.to_str()
                    .ok_or_else(|| step("file list", format!("{}: not UTF-8", p.display())))?
            );
            if rel.contains('"') || rel.contains('\n') {
                return Err(step(
                    "file list",
                    format!("{rel:?}: a name debugfs cannot address"),
                ));
            }
            out.push(rel);
            if e.file_type().map_err(|e| step("file list", e))?.is_dir() {
                stack.push(p);
            }
        }
    }
    Ok(out)
}

/// `mke2fs -d` copies each file's change time, which no tool can set in the staging tree:
/// set it to the epoch in the image with debugfs, so that two bakes give the same bytes.
fn fix_ctimes(root: &Path, raw: &Path, epoch: u64) -> Result<(), BakeError> {
    need("debugfs", "e2fsprogs")?;
    let mut cmds = String::new();
    for p in tree(root)? {
        cmds.push_str(&format!("sif \"{p}\" ctime @{epoch}\n"));
    }
    let file = raw.with_extension("debugfs");
    std::fs::write(&file, cmds).map_err(|e| step("change times", e))?;
    let r = run(
        "change times",
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&file)
            .arg(raw)
            // The superblock's last write time, too.
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string()),
    );
    let _ = std::fs::remove_file(&file);
    r
}

/// The files in `dir` whose names start with `prefix` and end with `suffix`.
fn files_named(dir: &Path, prefix: &str, suffix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect()
}

fn newest(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut found = files_named(dir, prefix, "");
    found.sort();
    found.pop()
}

/// The newest `asmn-agent_*.deb` in `dir` (where `scripts/package.sh` writes it).
pub fn newest_agent_deb(dir: &Path) -> Option<PathBuf> {
    let mut found = files_named(dir, "asmn-agent_", ".deb");
    found.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    found.pop()
}

/// Bakes `recipe` with the agent's Debian package `agent` into `out`; debootstrap's
/// downloads are kept in `cache` between bakes. `log` gets one line per step.
pub fn bake(
    recipe: &Recipe,
    agent: &Path,
    out: &Path,
    cache: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Baked, BakeError> {
    let started = Instant::now();
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("mke2fs", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
        ("find", "findutils"),
        ("touch", "coreutils"),
        ("chroot", "coreutils"),
    ] {
        need(tool, package)?;
    }
    if !agent.is_file() || agent.extension().and_then(|e| e.to_str()) != Some("deb") {
        return Err(step(
            "the agent",
            format!(
                "{} is not the agent's Debian package (build it with scripts/package.sh)",
                agent.display()
            ),
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| step("output", format!("{}: {e}", out.display())))?;
    std::fs::create_dir_all(cache)
        .map_err(|e| step("cache", format!("{}: {e}", cache.display())))?;
    let root = out.join(format!("{}.rootfs", recipe.name));
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| step("staging", e))?;
    }

    log(&format!(
        "debootstrap {} (minbase + {}) from {}",
        recipe.suite,
        recipe.packages.join(", "),
        recipe.mirror
    ));
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase").arg(format!(
        "--cache-dir={}",
        std::path::absolute(cache)
            .unwrap_or(cache.to_path_buf())
            .display()
    ));
    if !recipe.packages.is_empty() {
        cmd.arg(format!("--include={}", recipe.packages.join(",")));
    }
    cmd.arg(&recipe.suite)
        .arg(&root)
        .arg(&recipe.mirror)
        .env("DEBIAN_FRONTEND", "noninteractive")
        // Packages' build tools honour it: initramfs-tools clamps the initrd's file times
        // to it, the one part of the tree that otherwise differs from bake to bake.
        .env("SOURCE_DATE_EPOCH", recipe.epoch.to_string());
    run("debootstrap", &mut cmd)?;

    log("installing the agent's package (its units, user and config-drive hook) and the payload");
    let staged = root.join("tmp/asmn-agent.deb");
    std::fs::copy(agent, &staged).map_err(|e| step("the agent", e))?;
    // Its maintainer scripts run in the image: the user (sysusers), the state directory
    // (tmpfiles) and the units enabled, as on any Debian system.
    run(
        "installing the agent's package",
        Command::new("chroot")
            .arg(&root)
            .args(["dpkg", "-i", "/tmp/asmn-agent.deb"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("SOURCE_DATE_EPOCH", recipe.epoch.to_string()),
    )?;
    std::fs::remove_file(&staged).map_err(|e| step("the agent", e))?;
    if recipe.agent_nice != 0 {
        write(
            &root,
            "/etc/systemd/system/asmn-agent.service.d/50-nice.conf",
            0o644,
            nice_dropin(recipe.agent_nice).as_bytes(),
        )?;
    }
    write(
        &root,
        "/etc/systemd/network/80-dhcp.network",
        0o644,
        NETWORK.as_bytes(),
    )?;
    write(
        &root,
        "/etc/hostname",
        0o644,
        format!("{}\n", recipe.hostname).as_bytes(),
    )?;
    write(
        &root,
        "/etc/fstab",
        0o644,
        b"/dev/vda / ext4 defaults 0 1\n",
    )?;
    // Generated at first boot: an image must not carry one.
    write(&root, "/etc/machine-id", 0o444, b"")?;
    for f in &recipe.file {
        let mode = u32::from_str_radix(&f.mode, 8).unwrap_or(0o644);
        write(&root, &f.path, mode, f.text.as_bytes())?;
    }
    enable(&root, "systemd-networkd.service", "multi-user.target")?;
    enable(
        &root,
        "systemd-networkd-wait-online.service",
        "network-online.target",
    )?;
    for u in &recipe.enable {
        enable(&root, u, "multi-user.target")?;
    }

    let boot = root.join("boot");
    let (Some(vmlinuz), Some(initrd)) = (newest(&boot, "vmlinuz-"), newest(&boot, "initrd.img-"))
    else {
        return Err(step(
            "kernel",
            "no kernel and initrd in /boot: add a linux-image package to the recipe",
        ));
    };
    let kernel = out.join(format!("{}.vmlinuz", recipe.name));
    let initrd_out = out.join(format!("{}.initrd", recipe.name));
    std::fs::copy(&vmlinuz, &kernel).map_err(|e| step("kernel", e))?;
    std::fs::copy(&initrd, &initrd_out).map_err(|e| step("kernel", e))?;

    log("removing caches, logs and per-machine files; setting file times to the recipe's epoch");
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "var/log",
        "tmp",
        "var/tmp",
    ] {
        let d = root.join(dir);
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.filter_map(Result::ok) {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    if p.file_name().is_some_and(|n| n != "partial" && n != "apt") {
                        let _ = std::fs::remove_dir_all(&p);
                    }
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
    for f in ["var/cache/ldconfig/aux-cache", "etc/ssh/ssh_host_rsa_key"] {
        let _ = std::fs::remove_file(root.join(f));
    }
    run(
        "file times",
        Command::new("find").arg(&root).args([
            "-exec",
            "touch",
            "-h",
            "--no-create",
            "-d",
            &format!("@{}", recipe.epoch),
            "{}",
            "+",
        ]),
    )?;

    let bytes = crate::size::parse_size(&recipe.size).map_err(|e| step("size", e))?;
    let raw = out.join(format!("{}.raw", recipe.name));
    log(&format!(
        "mke2fs: {} ext4, UUID {}",
        crate::size::human(bytes),
        recipe.fs_uuid
    ));
    let _ = std::fs::remove_file(&raw);
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| step("mke2fs", format!("{}: {e}", raw.display())))?;
    run(
        "mke2fs",
        Command::new("mke2fs")
            .args([
                "-t",
                "ext4",
                "-F",
                "-q",
                "-L",
                "asmn-root",
                "-U",
                &recipe.fs_uuid,
            ])
            .arg("-E")
            .arg(format!(
                "hash_seed={},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
                recipe.fs_uuid
            ))
            .arg("-d")
            .arg(&root)
            .arg(&raw)
            .env("E2FSPROGS_FAKE_TIME", recipe.epoch.to_string()),
    )?;
    log("setting every inode's change time to the epoch (mke2fs copies it from the staging tree)");
    fix_ctimes(&root, &raw, recipe.epoch)?;
    std::fs::remove_dir_all(&root).map_err(|e| step("staging", e))?;

    let qcow2 = out.join(format!("{}.qcow2", recipe.name));
    log("qemu-img convert to qcow2");
    let _ = std::fs::remove_file(&qcow2);
    run(
        "qemu-img",
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2),
    )?;

    log("golden digests");
    let m: Measurement = measure_path(
        &raw,
        &[
            Algorithm::Crc32,
            Algorithm::Md5,
            Algorithm::Sha1,
            Algorithm::Sha256,
        ],
        MeasureOptions::default(),
        &mut |_| {},
    )
    .map_err(|e| step("measuring the image", e))?;
    let qcow2_bytes = std::fs::metadata(&qcow2).map(|m| m.len()).unwrap_or(0);
    Ok(Baked {
        raw,
        qcow2,
        kernel,
        initrd: initrd_out,
        bytes: m.bytes,
        qcow2_bytes,
        digests: m
            .digests
            .iter()
            .map(|(a, d)| (a.name().to_string(), d.to_string()))
            .collect(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(text: &str) -> Result<Recipe, BakeError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r.toml");
        std::fs::write(&p, text).expect("write");
        load_recipe(&p)
    }

    const GOOD: &str = r#"
name = "vnf"
suite = "bookworm"
mirror = "http://deb.debian.org/debian"
packages = ["linux-image-cloud-amd64"]
size = "1GiB"
hostname = "vnf"
fs_uuid = "6f1b7a3e-2c4d-4e5f-8a9b-0c1d2e3f4a5b"
epoch = 1767225600
"#;

    #[test]
    fn the_shipped_recipes_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("recipes/") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "toml") {
                load_recipe(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn bad_recipes_are_refused_with_the_reason() {
        assert!(recipe(GOOD).is_ok());
        for (bad, why) in [
            (GOOD.replace("name = \"vnf\"", "name = \"../x\""), "name"),
            (GOOD.replace("1GiB", "1KiB"), "size"),
            (GOOD.replace("http://deb", "ftp://deb"), "mirror"),
            (GOOD.replace("6f1b7a3e-", "6f1b7a3e"), "fs_uuid"),
            (GOOD.replace("linux-image-cloud-amd64", "--foo"), "package"),
            (
                format!("{GOOD}\n[[file]]\npath = \"etc/x\"\ntext = \"\"\n"),
                "absolute",
            ),
            (
                format!("{GOOD}\n[[file]]\npath = \"/etc/x\"\nmode = \"9\"\ntext = \"\"\n"),
                "octal",
            ),
            (format!("{GOOD}\nunknown = 1\n"), "unknown"),
        ] {
            let e = recipe(&bad).expect_err(why).to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}
