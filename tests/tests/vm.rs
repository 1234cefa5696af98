//! The baked VNF image, end to end (extended suite, outside `.ci/run`: it downloads about
//! 150 MB of Debian packages from the recipe's mirror for each of two bakes and boots a VM,
//! several minutes on the 2-core machine):
//!
//! `scripts/package.sh && cargo build --release --workspace --bins && \
//!  ASMN_BIN_DIR=$PWD/target/release cargo test -p asmn-tests --test vm -- --ignored --nocapture`
//!
//! 1. `asmn-image bake` of `images/recipes/vnf-web.toml` twice: the digests are the same
//!    (or the test says which parts differ);
//! 2. `asmnctl image onboard` of the baked image, an instance and its bundle, on a
//!    config drive;
//! 3. the image boots under qemu (emulated; `ASMN_VM_KVM=1` tries KVM first) with the golden
//!    image as its read-only second disk; Sec-EM runs in a namespace the VM reaches only
//!    through its user-mode network; the agent inside measures `/dev/vdb` and enrolls
//!    (strict attestation: a different digest would be refused).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use asmn_testkit::netns;
use asmn_testkit::tenant::Tenant;

fn bake(out: &Path, cache: &Path) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let image = netns::binary("asmn-image").expect("asmn-image");
    let agent = asmn_images::bake::newest_agent_deb(&root.join("target/debian"))
        .expect("the agent's package: run scripts/package.sh first");
    let o = std::process::Command::new(image)
        .arg("bake")
        .arg("--recipe")
        .arg(root.join("images/recipes/vnf-web.toml"))
        .arg("--agent-deb")
        .arg(agent)
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .arg("--json")
        .output()
        .expect("asmn-image bake");
    assert!(
        o.status.success(),
        "bake failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("bake JSON")
}

fn tool(name: &str) -> Option<PathBuf> {
    asmn_lab::bench::tool(name)
        .or_else(|| Some(Path::new("/usr/sbin").join(name)).filter(|p| p.is_file()))
}

#[test]
#[ignore = "extended suite: downloads Debian packages and boots a VM (minutes); see the file's doc"]
fn a_baked_image_boots_and_its_agent_enrolls() {
    if !netns::can_run("the VM test") {
        return;
    }
    for t in ["debootstrap", "qemu-system-x86_64", "qemu-img", "mke2fs"] {
        if tool(t).is_none() {
            assert!(std::env::var("CI").is_err(), "{t} is missing");
            asmn_shared::skip::note(&format!(
                "{t} is missing (apt-get install debootstrap qemu-system-x86 qemu-utils)"
            ));
            return;
        }
    }
    let _one_at_a_time = netns::serial();
    let work = tempfile::tempdir().expect("tempdir");
    let cache = std::env::temp_dir().join("asmn-image-cache");

    // 1. Two bakes.
    let t0 = Instant::now();
    let first = bake(&work.path().join("a"), &cache);
    let first_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let second = bake(&work.path().join("b"), &cache);
    eprintln!(
        "bakes: {first_secs:.0} s and {:.0} s (debootstrap's downloads cached in {}); raw {} bytes, qcow2 {} bytes",
        t1.elapsed().as_secs_f64(),
        cache.display(),
        first["bytes"],
        first["qcow2_bytes"]
    );
    eprintln!(
        "digests: {}\n     and {}",
        first["digests"], second["digests"]
    );
    assert_eq!(
        first["digests"], second["digests"],
        "two bakes of the same recipe differ"
    );

    // 2. On-board the image, create an instance, write its config drive.
    let raw = PathBuf::from(first["raw"].as_str().expect("raw"));
    let t = Tenant::new().expect("tenant");
    let vnfd = t
        .file(
            "vnf-web.yaml",
            b"vnfd:\n  id: web\n  sec_catalog:\n    default_action: drop\n    rules:\n      - name: http\n        protocol: tcp\n        port: 8080\n        ingress_policing_rate: 0\n",
        )
        .expect("vnfd");
    t.asmnctl(&[
        "image",
        "onboard",
        raw.to_str().expect("utf-8"),
        "--vnfd",
        vnfd.to_str().expect("utf-8"),
    ])
    .expect("onboard the baked image");
    let bundle = t.dir.path().join("vm.bundle");
    let id = t
        .create_instance("web-vm", "web", "vnf", &bundle)
        .expect("instance create");
    let drive_dir = t.dir.path().join("cidata");
    std::fs::create_dir_all(drive_dir.join("asmn")).expect("mkdir");
    std::fs::copy(&bundle, drive_dir.join("asmn/bundle")).expect("bundle");
    std::fs::write(
        drive_dir.join("asmn/agent.toml"),
        "bundle = \"/etc/asmn/bundle\"\ntarget = \"/dev/vdb\"\nunderlay = \"10.0.2.15:51820\"\nstate_dir = \"/var/lib/asmn-agent\"\n",
    )
    .expect("agent.toml");
    let drive = t.dir.path().join("cidata.img");
    std::fs::File::create(&drive)
        .and_then(|f| f.set_len(16 << 20))
        .expect("drive");
    let mk = std::process::Command::new("mke2fs")
        .args(["-t", "ext4", "-q", "-F", "-L", "cidata", "-d"])
        .arg(&drive_dir)
        .arg(&drive)
        .status()
        .expect("mke2fs");
    assert!(mk.success());

    // 3. Boot it, in Sec-EM's namespace (the VM's user-mode network reaches 10.99.0.1
    //    from there), with the golden image read-only as its second disk.
    // Emulation by default: in a nested guest (such as the CI machine) KVM may stop the VM
    // with an internal error or hang before the kernel prints anything.
    let kvm = std::env::var("ASMN_VM_KVM").is_ok_and(|v| v == "1");
    let qemu = tool("qemu-system-x86_64").expect("qemu");
    let console = t.dir.path().join("console.log");
    let drive_arg =
        |file: &Path, extra: &str| format!("file={},if=virtio,format={extra}", file.display());
    let args = |accel: &str| -> Vec<String> {
        vec![
            "-machine".into(),
            format!("q35,accel={accel}"),
            "-m".into(),
            "768".into(),
            "-smp".into(),
            "1".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-snapshot".into(),
            "-kernel".into(),
            first["kernel"].as_str().expect("kernel").into(),
            "-initrd".into(),
            first["initrd"].as_str().expect("initrd").into(),
            "-append".into(),
            "root=/dev/vda rw console=ttyS0 panic=-1".into(),
            "-drive".into(),
            drive_arg(Path::new(first["qcow2"].as_str().expect("qcow2")), "qcow2"),
            "-drive".into(),
            drive_arg(&raw, "raw,readonly=on"),
            "-drive".into(),
            drive_arg(&drive, "raw,readonly=on"),
            "-netdev".into(),
            "user,id=n0".into(),
            "-device".into(),
            "virtio-net-pci,netdev=n0".into(),
        ]
    };
    // With ASMN_VM_KVM=1, KVM first and emulation if the VM stops.
    let accels: Vec<&str> = if kvm { vec!["kvm", "tcg"] } else { vec!["tcg"] };
    let mut enrolled = false;
    let mut tail = String::new();
    for accel in accels {
        let a = args(accel);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let mut vm = t.hub.spawn(&qemu, &a, &console).expect("qemu");
        let booted = Instant::now();
        let limit = Duration::from_secs(600);
        while booted.elapsed() < limit && vm.running() {
            let show = t
                .asmnctl(&["--json", "instance", "show", &id])
                .unwrap_or_default();
            let keyed = serde_json::from_str::<serde_json::Value>(&show)
                .is_ok_and(|v| v["wg_public_key"].is_string());
            if keyed || vm.log().contains("enrolled overlay=") {
                enrolled = true;
                break;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        let log = vm.log();
        let lines: Vec<&str> = log.lines().rev().take(60).collect();
        tail = lines.into_iter().rev().collect::<Vec<_>>().join("\n");
        eprintln!(
            "VM ({accel}): enrolled {enrolled} after {:.0} s",
            booted.elapsed().as_secs_f64()
        );
        if enrolled || vm.running() {
            break;
        }
        eprintln!("qemu with {accel} stopped early:\n{tail}");
    }
    assert!(enrolled, "the agent in the VM did not enroll:\n{tail}");
}
