//! Network namespaces, links and processes for tests and the lab, each removed when its
//! guard is dropped (also when a test fails): a namespace is deleted (its veth ends and
//! TUN devices go with it), a process is killed by its PID.
//!
//! Names are unique per run (`asmn<pid><counter>`), so two runs never collide.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::error::{KitError, KitResult};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for this run's names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the namespace tests of one binary to one at a time: they measure rates and
/// latencies, which a second tenant on the same two cores would distort.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Removes every namespace this process made (and kills what runs in them): for a lab
/// interrupted by Ctrl-C, whose guards will not run.
pub fn cleanup_mine() {
    let tag = format!("{}x", std::process::id() % 100_000);
    let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let mine = ["asmnhub", "asmnvnf", "asmnnode"]
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|r| r.starts_with(&tag)));
        if mine {
            drop(Netns {
                name: name.to_string(),
            });
        }
    }
}

/// Whether this process may create namespaces (root). Under `CI` a missing capability
/// fails the calling test; elsewhere the test may skip, saying why.
pub fn can_run(what: &str) -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip {
        return true;
    }
    let why = if root {
        "`ip` (iproute2) is missing"
    } else {
        "not root"
    };
    assert!(
        std::env::var("CI").is_err(),
        "{what} needs root and network namespaces under CI: {why}"
    );
    asmn_shared::skip::note(&format!("{what}: {why}"));
    false
}

/// Runs a command to completion; an error names it and shows its stderr.
pub fn run(cmd: &mut Command) -> KitResult<Output> {
    let out = cmd.output().map_err(|source| KitError::Spawn {
        command: format!("{cmd:?}"),
        source,
    })?;
    if !out.status.success() {
        return Err(KitError::Failed {
            command: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace named `<tag>` (unique) with its loopback up.
    pub fn new(tag: &str) -> KitResult<Netns> {
        let name = unique(tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        run(&mut ns.cmd("ip", &["link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program args...` inside the namespace.
    pub fn cmd(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]).args(args);
        c
    }

    /// Runs `program args...` inside the namespace to completion.
    pub fn run(&self, program: &str, args: &[&str]) -> KitResult<Output> {
        run(&mut self.cmd(program, args))
    }

    /// Starts `program args...` inside the namespace, its output to `log`.
    pub fn spawn(&self, program: &Path, args: &[&str], log: &Path) -> KitResult<Proc> {
        let file = std::fs::File::create(log).map_err(KitError::file(log))?;
        let err = file.try_clone().map_err(KitError::file(log))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(program)
            .args(args)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|source| KitError::Spawn {
                command: program.display().to_string(),
                source,
            })?;
        Ok(Proc {
            child,
            log: log.to_path_buf(),
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside die with SIGKILL first (by PID, from `ip netns pids`).
        if let Ok(o) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A process started by a test, killed (by PID) on drop.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `limit` for it to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `limit` until its log contains `text`.
    pub fn wait_log(&mut self, text: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return true;
            }
            if !self.running() {
                return self.log().contains(text);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends SIGTERM (by PID).
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects `ns` to the bridge `bridge` in namespace `hub` with a veth pair, gives the
/// namespace's end `addr` (CIDR) and brings both up. The namespace's end is `eth0`.
pub fn attach(hub: &Netns, bridge: &str, ns: &Netns, addr: &str) -> KitResult<()> {
    let outer = unique("v");
    run(&mut hub.cmd(
        "ip",
        &[
            "link",
            "add",
            &outer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ],
    ))?;
    hub.run("ip", &["link", "set", &outer, "master", bridge])?;
    hub.run("ip", &["link", "set", &outer, "up"])?;
    ns.run("ip", &["addr", "add", addr, "dev", "eth0"])?;
    ns.run("ip", &["link", "set", "eth0", "up"])?;
    Ok(())
}

/// Joins `a` and `b` with a veth pair (`eth0` in each) with the addresses `addr_a` and
/// `addr_b` (CIDR), both up.
pub fn veth(a: &Netns, b: &Netns, addr_a: &str, addr_b: &str) -> KitResult<()> {
    run(&mut a.cmd(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ],
    ))?;
    for (ns, addr) in [(a, addr_a), (b, addr_b)] {
        ns.run("ip", &["addr", "add", addr, "dev", "eth0"])?;
        ns.run("ip", &["link", "set", "eth0", "up"])?;
    }
    Ok(())
}

/// A bridge named `bridge` in `hub` with `addr` (CIDR) on it, up.
pub fn bridge(hub: &Netns, bridge: &str, addr: &str) -> KitResult<()> {
    hub.run("ip", &["link", "add", bridge, "type", "bridge"])?;
    hub.run("ip", &["addr", "add", addr, "dev", bridge])?;
    hub.run("ip", &["link", "set", bridge, "up"])?;
    Ok(())
}

/// The project's binaries (`sec-em`, `asmnctl`, `asmn-agent`, ...): from `ASMN_BIN_DIR`
/// when set (scripts/test.sh points it at the release build, so that the namespace tests
/// measure the data plane as it ships), else next to the running test or lab
/// (target/<profile>/NAME, built by `cargo build --workspace --bins`).
pub fn binary(name: &str) -> KitResult<PathBuf> {
    let dir = match std::env::var_os("ASMN_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().map_err(KitError::file("/proc/self/exe"))?;
            let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(KitError::NotBuilt(p))
    }
}

/// The scheduling policies of `/proc/<pid>/task/<tid>/stat` ([`dataplane_policy`]).
pub const SCHED_OTHER: u32 = 0;
/// `SCHED_FIFO`.
pub const SCHED_FIFO: u32 = 1;
/// `SCHED_BATCH`.
pub const SCHED_BATCH: u32 = 3;

/// The scheduling policy of agent `pid`'s data-plane thread once it is `want`, or when
/// `within` has passed.
pub fn wait_for_policy(pid: u32, want: u32, within: Duration) -> Option<u32> {
    let deadline = Instant::now() + within;
    while dataplane_policy(pid) != Some(want) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    dataplane_policy(pid)
}

/// The `/proc` directory of agent `pid`'s data-plane thread (its task named
/// `asmn-dataplane`). None when the agent or its thread is not found.
pub fn dataplane_thread(pid: u32) -> Option<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .map(|task| task.path())
        .find(|dir| {
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "asmn-dataplane")
        })
}

/// The scheduling policy of agent `pid`'s data-plane thread (the 41st field of its stat).
pub fn dataplane_policy(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(dataplane_thread(pid)?.join("stat")).ok()?;
    // Fields after the command name (which may hold spaces) closing with ')': the state
    // is the third field.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(41 - 3)?.parse().ok()
}

/// Nanoseconds the thread of `/proc` task directory `task` has run, and has waited
/// runnable for a CPU, so far (its `schedstat`). None when it is gone.
pub fn schedstat(task: &Path) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(task.join("schedstat")).ok()?;
    let mut f = s.split_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}
