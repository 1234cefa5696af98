//! `asmn-lab bench`: the data-plane benchmark. Two namespaces joined by a veth pair carry
//! the same traffic over four paths in one run: the plain veth (the baseline), ASMN's data
//! plane (`asmn-agent static`, a direct tunnel), `boringtun-cli` configured with `wg` (one
//! thread, and its default of four), and ASMN through the gateway (a tenant with Sec-EM).
//! Every figure is printed beside the baseline measured in the same run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use asmn_testkit::netns::{self, Netns, Proc};
use asmn_testkit::tenant::Tenant;
use asmn_testkit::{KitError, KitResult};

use crate::generators::NullWait;

/// One path's measurements.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PathResult {
    /// The path.
    pub path: String,
    /// What measured it: `ping + iperf3`, or the lab's generators.
    pub tool: String,
    /// ICMP RTT with 64-byte payloads, microseconds: the median of the runs' medians.
    pub rtt64_us: f64,
    /// The median RTT of each of [`RTT_RUNS`] runs of [`ECHOES`] echoes, 64 bytes.
    pub rtt64_runs_us: Vec<f64>,
    /// Median ICMP RTT with 4096-byte payloads, microseconds.
    pub rtt4096_us: f64,
    /// TCP goodput, Mbit/s.
    pub tcp_mbps: f64,
    /// UDP goodput at the offered rate, Mbit/s, and the loss.
    pub udp_mbps: f64,
    /// UDP datagrams lost, percent.
    pub udp_loss_pct: f64,
    /// Of the UDP datagrams sent, the share the receiving side's sockets dropped for lack
    /// of buffer room (`RcvbufErrors` in its namespace), percent.
    pub udp_rcvbuf_drop_pct: Option<f64>,
    /// The same UDP load with 2 MiB socket buffers at both applications (`iperf3 -w 2M`),
    /// as a UDP-heavy VNF sizes them: goodput, Mbit/s, and loss, percent.
    pub udp_2m: Option<(f64, f64)>,
    /// UDP in 64-byte datagrams offered without a rate limit (`iperf3 -b 0`): thousands
    /// of datagrams a second received.
    pub udp64_kpps: Option<f64>,
    /// CPU seconds of the tunnel processes per GB of TCP payload (None: the kernel's).
    pub cpu_s_per_gb: Option<f64>,
}

/// CPU seconds the processes `pids` (all their threads) have run, together (see
/// [`cpu_seconds`]): a tunnel's two ends.
pub fn cpu_seconds_of(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// CPU seconds a process (all its threads) has run: the scheduler's nanosecond counts
/// (`/proc/PID/task/*/schedstat`), or the 10 ms ticks of `/proc/PID/stat` where those are
/// missing.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ns: Option<u64> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| netns::schedstat(&t.path()))
                .map(|(ran, _)| ran)
                .sum()
        });
    if let Some(ns) = ns.filter(|n| *n > 0) {
        return ns as f64 / 1e9;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) closing with ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs the lab's generator `args` inside `ns`; its JSON.
pub fn generate(ns: &Netns, me: &Path, args: &[&str]) -> KitResult<serde_json::Value> {
    let mut full = vec!["gen"];
    full.extend_from_slice(args);
    let out = netns::run(&mut ns.cmd(me.to_str().unwrap_or_default(), &full))?;
    serde_json::from_slice(&out.stdout)
        .map_err(|e| KitError::Unexpected(format!("asmn-lab gen {}: {e}", args.join(" "))))
}

/// Starts the lab's generator `args` in the background inside `ns`, its output in `log`.
pub fn spawn_generator(ns: &Netns, me: &Path, args: &[&str], log: &Path) -> KitResult<Proc> {
    let mut full = vec!["gen"];
    full.extend_from_slice(args);
    ns.spawn(me, &full, log)
}

/// The last JSON line (an object or an array) of a generator's output.
pub fn last_json(log: &str) -> KitResult<serde_json::Value> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.starts_with('{') || l.starts_with('['))
        .ok_or_else(|| KitError::Unexpected("no result line from the generator".into()))?;
    serde_json::from_str(line)
        .map_err(|e| KitError::Unexpected(format!("the generator's result: {e}")))
}

/// Echoes per RTT measurement (after 3 warm-up echoes), 50 ms apart.
const ECHOES: usize = 30;
/// Runs of [`ECHOES`] echoes for the 64-byte RTT (its spread is printed).
pub const RTT_RUNS: usize = 5;

/// The median of `v` (sorted in place); None when empty.
pub fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| {
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    })
}

fn median_rtt(ns: &Netns, me: &Path, to: &str, size: usize) -> Result<f64, String> {
    let _ = generate(
        ns,
        me,
        &["ping", to, "--count", "3", "--size", &size.to_string()],
    );
    let r = generate(
        ns,
        me,
        &[
            "ping",
            to,
            "--count",
            &ECHOES.to_string(),
            "--size",
            &size.to_string(),
            "--interval-ms",
            "50",
        ],
    )?;
    let v: Vec<f64> = r["rtt_us"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
        .unwrap_or_default();
    median_of_echoes(v, to)
}

/// One run of the 64-byte RTT from `ns` to `to`: the median of [`ECHOES`] echoes, with
/// iputils ping where `run.tools`, with the lab's generator otherwise; microseconds.
pub fn rtt_run(run: Run<'_>, ns: &Netns, to: &str) -> Result<f64, String> {
    if run.tools {
        ping_rtt(ns, to, 56)
    } else {
        median_rtt(ns, run.me, to, 56)
    }
}

/// The median of the RTTs of [`ECHOES`] echoes to `to`, if at least three in four came back.
fn median_of_echoes(mut v: Vec<f64>, to: &str) -> Result<f64, String> {
    if v.len() < ECHOES * 3 / 4 {
        return Err(format!(
            "only {} of {ECHOES} echoes answered to {to}",
            v.len()
        ));
    }
    median(&mut v).ok_or_else(|| format!("no echo answered to {to}"))
}

/// What every measurement of a run shares.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// The lab binary (its generators).
    pub me: &'a Path,
    /// Seconds per throughput measurement.
    pub seconds: u64,
    /// Where logs go.
    pub work: &'a Path,
    /// Measure with iputils `ping` and `iperf3` (true), or with the lab's own generators.
    pub tools: bool,
}

/// Whether `ping` (iputils) and `iperf3` are installed.
pub fn have_tools() -> bool {
    tool("ping").is_some() && tool("iperf3").is_some()
}

/// Median RTT in microseconds from iputils ping's per-reply lines (`... time=0.215 ms`):
/// the median, because on a virtual machine a few echoes now and then wait milliseconds
/// for a CPU, and the mean follows them.
fn ping_rtt(ns: &Netns, to: &str, size: usize) -> Result<f64, String> {
    // Warm-up (handshakes, ARP), then the echoes 50 ms apart (root may go below 200 ms).
    let size = size.to_string();
    let _ = ns.run("ping", &["-c", "3", "-i", "0.2", "-s", &size, "-q", to]);
    let out = ns.run(
        "ping",
        &[
            "-c",
            &ECHOES.to_string(),
            "-i",
            "0.05",
            "-s",
            &size,
            "-W",
            "2",
            to,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches("ms").trim().parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect();
    median_of_echoes(v, to).map_err(|e| format!("ping: {e}"))
}

/// Runs an iperf3 client in `a` against a one-off server in `b`; its JSON report.
fn iperf3(
    run: Run<'_>,
    (a, b): (&Netns, &Netns),
    to: &str,
    port: u16,
    extra: &[&str],
    log: &str,
) -> Result<serde_json::Value, String> {
    let port = port.to_string();
    let iperf = tool("iperf3").ok_or("iperf3 is not installed")?;
    let _server = b.spawn(&iperf, &["-s", "-1", "-p", &port], &run.work.join(log))?;
    std::thread::sleep(Duration::from_millis(400));
    let secs = run.seconds.to_string();
    let mut args = vec!["-c", to, "-p", &port, "-t", &secs, "-J"];
    args.extend_from_slice(extra);
    let out = a.run("iperf3", &args)?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 output: {e}"))?;
    if let Some(e) = v["error"].as_str() {
        return Err(format!("iperf3 to {to}: {e}"));
    }
    Ok(v)
}

/// Measures one path from `a` to `b`'s address `to`; `procs` are the PIDs whose CPU time
/// counts as the tunnel's.
pub fn measure(
    run: Run<'_>,
    name: &str,
    (a, b): (&Netns, &Netns),
    to: &str,
    procs: &[u32],
) -> Result<PathResult, String> {
    let r = if run.tools {
        measure_tools(run, name, (a, b), to, procs)
    } else {
        measure_lab(run, name, (a, b), to, procs)
    }
    .map_err(|e| format!("{name}: {e}"))?;
    eprintln!(
        "  {name}: RTT {:.0} / {:.0} us, TCP {:.0} Mbit/s, UDP {:.0} Mbit/s ({:.1}% lost)",
        r.rtt64_us, r.rtt4096_us, r.tcp_mbps, r.udp_mbps, r.udp_loss_pct
    );
    Ok(r)
}

fn measure_tools(
    run: Run<'_>,
    name: &str,
    (a, b): (&Netns, &Netns),
    to: &str,
    procs: &[u32],
) -> Result<PathResult, String> {
    let mut runs = Vec::with_capacity(RTT_RUNS);
    for _ in 0..RTT_RUNS {
        runs.push(ping_rtt(a, to, 56)?);
    }
    let rtt4096 = ping_rtt(a, to, 4088)?;
    let slug: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    let cpu0: f64 = cpu_seconds_of(procs);
    let tcp = iperf3(run, (a, b), to, 7001, &[], &format!("{slug}-iperf-tcp.log"))?;
    let cpu1: f64 = cpu_seconds_of(procs);
    let received = &tcp["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().unwrap_or(0.0);
    // UDP to port 7002 with iperf3's `args`, logged under `tag`.
    let udp_run = |args: &[&str], tag: &str| {
        iperf3(
            run,
            (a, b),
            to,
            7002,
            args,
            &format!("{slug}-iperf-{tag}.log"),
        )
    };
    let drops0 = udp_rcvbuf_errors(b);
    let udp = udp_run(&["-u", "-b", "1G", "-l", "1200"], "udp")?;
    let drops = udp_rcvbuf_errors(b)
        .zip(drops0)
        .map(|(x, y)| x.saturating_sub(y));
    // iperf3 3.12 reports what the server received (and lost) in `sum_received`.
    let urx = &udp["end"]["sum_received"];
    // Datagrams sent: the client's own count.
    let sent = udp["end"]["sum"]["packets"].as_f64().unwrap_or(0.0);
    let udp2 = udp_run(&["-u", "-b", "1G", "-l", "1200", "-w", "2M"], "udp-2m")?;
    let urx2 = &udp2["end"]["sum_received"];
    let udp64 = udp_run(&["-u", "-b", "0", "-l", "64"], "udp-64")?;
    let urx64 = &udp64["end"]["sum_received"];
    let kpps = urx64["bytes"].as_f64().unwrap_or(0.0)
        / 64.0
        / urx64["seconds"].as_f64().unwrap_or(0.0).max(1e-9)
        / 1e3;
    Ok(PathResult {
        path: name.to_string(),
        tool: "ping + iperf3".into(),
        rtt64_us: median(&mut runs.clone()).unwrap_or(0.0),
        rtt64_runs_us: runs,
        rtt4096_us: rtt4096,
        tcp_mbps: received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        udp_mbps: urx["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        udp_loss_pct: urx["lost_percent"].as_f64().unwrap_or(100.0),
        udp_rcvbuf_drop_pct: drops
            .filter(|_| sent > 0.0)
            .map(|d| 100.0 * d as f64 / sent),
        udp_2m: Some((
            urx2["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
            urx2["lost_percent"].as_f64().unwrap_or(100.0),
        )),
        udp64_kpps: Some(kpps),
        cpu_s_per_gb: (!procs.is_empty() && bytes > 0.0).then(|| (cpu1 - cpu0) / (bytes / 1e9)),
    })
}

/// UDP datagrams the sockets of `ns` dropped for lack of buffer room so far
/// (`RcvbufErrors` of `/proc/net/snmp`, which is per namespace).
pub fn udp_rcvbuf_errors(ns: &Netns) -> Option<u64> {
    let out = ns.run("cat", &["/proc/net/snmp"]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// [`measure`] with the lab's own generators.
fn measure_lab(
    run: Run<'_>,
    name: &str,
    (a, b): (&Netns, &Netns),
    to: &str,
    procs: &[u32],
) -> Result<PathResult, String> {
    let Run {
        me, seconds, work, ..
    } = run;
    let mut runs = Vec::with_capacity(RTT_RUNS);
    for _ in 0..RTT_RUNS {
        runs.push(median_rtt(a, me, to, 56)?);
    }
    let rtt4096 = median_rtt(a, me, to, 4088)?;
    let secs = seconds.to_string();
    let sink_secs = (seconds + 3).to_string();
    let _sink = spawn_generator(
        b,
        me,
        &["tcp-sink", "--port", "7001", "--seconds", &sink_secs],
        &work.join(format!("{name}-tcp-sink.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu0: f64 = cpu_seconds_of(procs);
    let tcp = generate(a, me, &["tcp", &format!("{to}:7001"), "--seconds", &secs])?;
    let cpu1: f64 = cpu_seconds_of(procs);
    let bytes = tcp["bytes"].as_f64().unwrap_or(0.0);
    let mut usink = spawn_generator(
        b,
        me,
        &["udp-sink", "--port", "7002", "--seconds", &sink_secs],
        &work.join(format!("{name}-udp-sink.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let sent = generate(
        a,
        me,
        &[
            "udp",
            &format!("{to}:7002"),
            "--mbps",
            "500",
            "--size",
            "1200",
            "--seconds",
            &secs,
        ],
    )?;
    usink.wait_exit(Duration::from_secs(seconds + 5));
    let got = last_json(&usink.log()).unwrap_or_default();
    let tx = sent["datagrams"].as_f64().unwrap_or(0.0);
    let rx = got["datagrams"].as_f64().unwrap_or(0.0);
    Ok(PathResult {
        path: name.to_string(),
        tool: "lab generators".into(),
        rtt64_us: median(&mut runs.clone()).unwrap_or(0.0),
        rtt64_runs_us: runs,
        rtt4096_us: rtt4096,
        tcp_mbps: tcp["mbit_per_s"].as_f64().unwrap_or(0.0),
        udp_mbps: got["mbit_per_s"].as_f64().unwrap_or(0.0),
        udp_loss_pct: if tx > 0.0 {
            100.0 * (tx - rx).max(0.0) / tx
        } else {
            100.0
        },
        udp_rcvbuf_drop_pct: None,
        udp_2m: None,
        udp64_kpps: None,
        cpu_s_per_gb: (!procs.is_empty() && bytes > 0.0).then(|| (cpu1 - cpu0) / (bytes / 1e9)),
    })
}

/// A tool on the PATH or in ~/.cargo/bin.
pub fn tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
        .or_else(|| {
            let p = Path::new(&std::env::var_os("HOME")?)
                .join(".cargo/bin")
                .join(name);
            p.is_file().then_some(p)
        })
}

/// Runs `wg ARGS` (wireguard-tools) with `input` on its standard input; its output.
pub fn wg(args: &[&str], input: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let mut child = std::process::Command::new("wg")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("wg (wireguard-tools): {e}"))?;
    if let Some(i) = input
        && let Some(mut stdin) = child.stdin.take()
    {
        stdin.write_all(i.as_bytes()).map_err(|e| e.to_string())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Which paths [`paths`] measures besides the plain veth baseline.
#[derive(Debug, Clone, Copy)]
pub struct Paths {
    /// ASMN's data plane, a direct tunnel (`asmn-agent static`).
    pub direct: bool,
    /// boringtun-cli with one thread and with four (where installed).
    pub boringtun: bool,
    /// ASMN through the gateway, in a tenant with Sec-EM.
    pub gateway: bool,
    /// An ASMN direct tunnel whose agents poll without pause (`--busy-poll`, a core each).
    pub busy: bool,
    /// Null tunnels (no cryptography; blocking, one thread in epoll, busy-polling, and
    /// batched with ASMN's offloads): the floor of a userspace tunnel on this machine, and
    /// of ASMN's own I/O; and null tunnels through a null relay, the floor of a gateway.
    pub floor: bool,
    /// An ASMN direct tunnel whose TUN devices queue [`UDP_HEAVY_QUEUE`] packets
    /// (`--tun-queue`), as an operator sets it for a UDP-heavy VNF.
    pub queue: bool,
}

/// The TUN queue of the bench's UDP-heavy path, packets.
pub const UDP_HEAVY_QUEUE: u32 = 5000;

/// The benchmark server's descriptor: it accepts the benchmark's traffic (and iperf3's control connections).
pub const BENCH_SERVER_VNFD: &str = "vnfd:
  id: server
  sec_catalog:
    gateway: gw
    default_action: drop
    rules:
      - name: ping
        protocol: icmp
        ingress_policing_rate: 0
      - name: tcp
        protocol: tcp
        port: 7001
        ingress_policing_rate: 0
      - name: udp
        protocol: udp
        port: 7002
        ingress_policing_rate: 0
      - name: iperf3-control
        protocol: tcp
        port: 7002
        ingress_policing_rate: 0
";

fn write_key(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n"))?;
    Ok(p)
}

fn wg_cmd(args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    wg(args, input).map_err(anyhow::Error::msg)
}

/// Removes a file when dropped (boringtun-cli's control sockets live outside namespaces).
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The veth address of the second namespace of a [`DirectPair`].
pub const VETH_B: &str = "10.96.0.2";
/// The overlay address of the first agent of a [`DirectPair`].
pub const TUNNEL_A: &str = "10.86.0.1";
/// The overlay address of the second agent of a [`DirectPair`].
pub const TUNNEL_B: &str = "10.86.0.2";

/// Two namespaces joined by a veth pair, with WireGuard keys for a tunnel between them
/// and, once started, `asmn-agent static` at both ends.
#[derive(Debug)]
pub struct DirectPair {
    /// The first namespace (10.96.0.1; overlay 10.86.0.1).
    pub a: Netns,
    /// The second namespace ([`VETH_B`]; overlay [`TUNNEL_B`]).
    pub b: Netns,
    /// Private key files of a and b, and the PSK file.
    pub keys: (PathBuf, PathBuf, PathBuf),
    /// Public keys of a and b (base64).
    pub public: (String, String),
    agents: Vec<Proc>,
    work: PathBuf,
}

impl DirectPair {
    /// The namespaces, the veth pair and the keys (made by `wg`), files under `work`.
    pub fn new(work: &Path) -> anyhow::Result<DirectPair> {
        let a = Netns::new("asmnvnf").map_err(anyhow::Error::msg)?;
        let b = Netns::new("asmnvnf").map_err(anyhow::Error::msg)?;
        netns::veth(&a, &b, "10.96.0.1/24", &format!("{VETH_B}/24")).map_err(anyhow::Error::msg)?;
        let (ka, kb, psk) = (
            wg_cmd(&["genkey"], None)?,
            wg_cmd(&["genkey"], None)?,
            wg_cmd(&["genpsk"], None)?,
        );
        let public = (
            wg_cmd(&["pubkey"], Some(&ka))?,
            wg_cmd(&["pubkey"], Some(&kb))?,
        );
        let keys = (
            write_key(work, "a.key", &ka)?,
            write_key(work, "b.key", &kb)?,
            write_key(work, "psk", &psk)?,
        );
        Ok(DirectPair {
            a,
            b,
            keys,
            public,
            agents: Vec::new(),
            work: work.to_path_buf(),
        })
    }

    /// The second end's public key in hex (what `gen handshake-flood --key` takes).
    pub fn b_key_hex(&self) -> anyhow::Result<String> {
        use base64::Engine as _;
        Ok(base64::engine::general_purpose::STANDARD
            .decode(self.public.1.trim())
            .map(hex::encode)?)
    }

    /// Starts the agents (polling without pause with `busy_poll`); their PIDs once both
    /// data planes are up.
    pub fn start_agents(&mut self, busy_poll: bool) -> anyhow::Result<[u32; 2]> {
        self.start_agents_with(busy_poll, &[])
    }

    /// [`DirectPair::start_agents`] with more arguments to `asmn-agent static`.
    pub fn start_agents_with(
        &mut self,
        busy_poll: bool,
        extra: &[&str],
    ) -> anyhow::Result<[u32; 2]> {
        let agent = netns::binary("asmn-agent").map_err(anyhow::Error::msg)?;
        let psk = self.keys.2.to_str().unwrap_or_default().to_string();
        let ends = [
            (
                &self.a,
                "10.86.0.1/24",
                "10.96.0.1",
                &self.keys.0,
                &self.public.1,
                VETH_B,
                TUNNEL_B,
            ),
            (
                &self.b,
                "10.86.0.2/24",
                VETH_B,
                &self.keys.1,
                &self.public.0,
                "10.96.0.1",
                TUNNEL_A,
            ),
        ];
        for (i, (ns, me, listen, key, peer, ep, peer_ip)) in ends.into_iter().enumerate() {
            let listen = format!("{listen}:51820");
            let ep = format!("{ep}:51820");
            let mut args = vec![
                "static",
                "--tun",
                "asmn0",
                "--address",
                me,
                "--listen",
                &listen,
                "--private-key-file",
                key.to_str().unwrap_or_default(),
                "--peer-public-key",
                peer,
                "--peer-endpoint",
                &ep,
                "--peer-address",
                peer_ip,
                "--psk-file",
                &psk,
            ];
            if busy_poll {
                args.push("--busy-poll");
            }
            args.extend_from_slice(extra);
            let mut p = ns
                .spawn(&agent, &args, &self.work.join(format!("agent-{i}.log")))
                .map_err(anyhow::Error::msg)?;
            if !p.wait_log("static data plane up", Duration::from_secs(10)) {
                anyhow::bail!("asmn-agent static did not start: {}", p.log());
            }
            self.agents.push(p);
        }
        Ok([self.agents[0].pid(), self.agents[1].pid()])
    }

    /// Stops the agents (their TUN devices go with them).
    pub fn stop_agents(&mut self) {
        self.agents.clear();
    }

    /// Starts boringtun-cli with `threads` threads at both ends, configured with `wg`
    /// with the pair's keys (overlay 10.85.0.1 and [`BORINGTUN_B`]); stopped, its
    /// addresses and control sockets removed, when the result is dropped.
    pub fn start_boringtun(&self, threads: usize) -> anyhow::Result<Boringtun<'_>> {
        let bt = tool("boringtun-cli").context("boringtun-cli is not installed")?;
        let (ia, ib) = (netns::unique("wgb"), netns::unique("wgb"));
        let mut out = Boringtun {
            pair: self,
            procs: Vec::new(),
            _sockets: [&ia, &ib]
                .map(|i| RemoveOnDrop(format!("/var/run/wireguard/{i}.sock").into())),
        };
        let threads = threads.to_string();
        for (ns, ifn, log) in [(&self.a, &ia, "bt-a.log"), (&self.b, &ib, "bt-b.log")] {
            out.procs.push(
                ns.spawn(
                    &bt,
                    &[
                        "--foreground",
                        "--disable-drop-privileges",
                        "--threads",
                        &threads,
                        ifn,
                    ],
                    &self.work.join(log),
                )
                .map_err(anyhow::Error::msg)?,
            );
        }
        for s in [&ia, &ib] {
            let sock = format!("/var/run/wireguard/{s}.sock");
            let t = Instant::now();
            while !Path::new(&sock).exists() && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let (fa, fb, fp) = &self.keys;
        let (pa, pb) = &self.public;
        let ends = [
            (
                &self.a,
                &ia,
                fa,
                pb,
                "10.96.0.2:51821",
                format!("{BORINGTUN_B}/32"),
                "10.85.0.1/24",
            ),
            (
                &self.b,
                &ib,
                fb,
                pa,
                "10.96.0.1:51821",
                "10.85.0.1/32".to_string(),
                "10.85.0.2/24",
            ),
        ];
        for (ns, ifn, key, peer, ep, allowed, ip) in ends {
            ns.run(
                "wg",
                &[
                    "set",
                    ifn,
                    "private-key",
                    key.to_str().unwrap_or_default(),
                    "listen-port",
                    "51821",
                    "peer",
                    peer,
                    "preshared-key",
                    fp.to_str().unwrap_or_default(),
                    "endpoint",
                    ep,
                    "allowed-ips",
                    &allowed,
                ],
            )
            .map_err(anyhow::Error::msg)?;
            ns.run("ip", &["addr", "add", ip, "dev", ifn])
                .map_err(anyhow::Error::msg)?;
            ns.run("ip", &["link", "set", ifn, "up"])
                .map_err(anyhow::Error::msg)?;
        }
        Ok(out)
    }
}

/// The overlay address of the second end of [`DirectPair::start_boringtun`].
pub const BORINGTUN_B: &str = "10.85.0.2";

/// boringtun-cli running at both ends of a [`DirectPair`].
#[derive(Debug)]
pub struct Boringtun<'a> {
    pair: &'a DirectPair,
    procs: Vec<Proc>,
    _sockets: [RemoveOnDrop; 2],
}

impl Boringtun<'_> {
    /// The PIDs of the two boringtun-cli processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
}

impl Drop for Boringtun<'_> {
    fn drop(&mut self) {
        self.procs.clear();
        for ns in [&self.pair.a, &self.pair.b] {
            let _ = ns.run("ip", &["addr", "flush", "to", "10.85.0.0/24"]);
        }
    }
}

/// What a flood of forged handshake initiations costs the agent it is aimed at, beside
/// junk datagrams at the same full rate (DESIGN.md §3.5: forged packets are cheap), and
/// the RTT through its tunnel meanwhile.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FloodResult {
    /// Seconds each flood lasted.
    pub seconds: u64,
    /// Junk datagrams sent (148 bytes, no WireGuard message).
    pub junk_datagrams: u64,
    /// The receiving agent's CPU per junk datagram it read (not dropped by the kernel
    /// with its socket full), microseconds.
    pub junk_us: f64,
    /// Forged initiations sent (random static keys, a valid mac1 for the receiver).
    pub forged_datagrams: u64,
    /// The receiving agent's CPU per forged initiation it read, microseconds.
    pub forged_us: f64,
    /// RTT through the tunnel without a flood, 64 B, median, microseconds.
    pub rtt64_quiet_us: f64,
    /// The same during the forged flood.
    pub rtt64_flood_us: f64,
}

/// Measures [`FloodResult`] on ASMN's direct tunnel: the floods come from the first
/// namespace to the second agent's socket, at the generator's full rate.
pub fn flood(run: Run<'_>) -> anyhow::Result<FloodResult> {
    const SECONDS: u64 = 4;
    let mut pair = DirectPair::new(run.work)?;
    let pids = pair.start_agents(false)?;
    let key = pair.b_key_hex()?;
    let quiet = median_rtt(&pair.a, run.me, TUNNEL_B, 64).map_err(anyhow::Error::msg)?;
    let to = format!("{VETH_B}:51820");
    let secs = SECONDS.to_string();
    let one = |key: Option<&str>, log: &str| -> anyhow::Result<(u64, f64, f64)> {
        let mut args = vec!["handshake-flood", to.as_str(), "--seconds", secs.as_str()];
        if let Some(k) = key {
            args.extend(["--key", k]);
        }
        let cpu0 = cpu_seconds(pids[1]);
        let drops0 = udp_rcvbuf_errors(&pair.b);
        let mut generator = spawn_generator(&pair.a, run.me, &args, &run.work.join(log))
            .map_err(anyhow::Error::msg)?;
        let rtt = median_rtt(&pair.a, run.me, TUNNEL_B, 64).map_err(anyhow::Error::msg)?;
        generator.wait_exit(Duration::from_secs(SECONDS + 10));
        let cpu = cpu_seconds(pids[1]) - cpu0;
        // Datagrams the kernel dropped with the agent's socket full never reached it.
        let dropped = udp_rcvbuf_errors(&pair.b)
            .zip(drops0)
            .map_or(0, |(d1, d0)| d1.saturating_sub(d0));
        let v = last_json(&generator.log()).map_err(anyhow::Error::msg)?;
        let sent = v["datagrams"].as_u64().unwrap_or(0);
        let read = sent.saturating_sub(dropped);
        Ok((sent, cpu / read.max(1) as f64 * 1e6, rtt))
    };
    let (junk_datagrams, junk_us, _) = one(None, "flood-junk.log")?;
    let (forged_datagrams, forged_us, flood_rtt) = one(Some(&key), "flood-forged.log")?;
    pair.stop_agents();
    Ok(FloodResult {
        seconds: SECONDS,
        junk_datagrams,
        junk_us,
        forged_datagrams,
        forged_us,
        rtt64_quiet_us: quiet,
        rtt64_flood_us: flood_rtt,
    })
}

/// The flood figures as Markdown.
pub fn flood_markdown(f: &FloodResult) -> String {
    format!(
        "\nForged-handshake flood at full rate on ASMN's direct tunnel, {} s each, against junk \
         datagrams at the same rate:\n\n\
         | flood | datagrams sent | agent CPU per datagram read (us) | RTT 64 B through the tunnel (us, median) |\n\
         |---|---:|---:|---:|\n\
         | none | 0 | - | {:.0} |\n\
         | junk (no WireGuard message) | {} | {:.2} | - |\n\
         | forged initiations (valid mac1) | {} | {:.2} | {:.0} |\n\n\
         - a forged initiation costs {:.2}x a junk datagram; the RTT under the flood is {:.2}x the quiet one\n",
        f.seconds,
        f.rtt64_quiet_us,
        f.junk_datagrams,
        f.junk_us,
        f.forged_datagrams,
        f.forged_us,
        f.rtt64_flood_us,
        f.forged_us / f.junk_us.max(1e-9),
        f.rtt64_flood_us / f.rtt64_quiet_us.max(1e-9),
    )
}

/// The overlay address of the second end of the null tunnels.
pub const NULL_B: &str = "10.84.0.2";

/// Starts one end of a null tunnel in `ns` (see [`crate::generators::null_tunnel`]):
/// overlay address `me` (CIDR), its datagrams to `peer`.
fn null_tunnel_end(
    run: Run<'_>,
    ns: &Netns,
    (me, listen, peer): (&str, &str, &str),
    wait: NullWait,
) -> anyhow::Result<Proc> {
    let tun = netns::unique("nul");
    let mut args = vec![
        "null-tunnel",
        "--tun",
        &tun,
        "--address",
        me,
        "--listen",
        listen,
        "--peer",
        peer,
        "--seconds",
        "900",
    ];
    match wait {
        NullWait::Blocking => {}
        NullWait::Epoll => args.push("--epoll"),
        NullWait::Busy => args.push("--busy-poll"),
        NullWait::Batched => args.push("--batched"),
    }
    let log = run.work.join(format!("{tun}.log"));
    let mut p = spawn_generator(ns, run.me, &args, &log).map_err(anyhow::Error::msg)?;
    if !p.wait_log("null tunnel up", Duration::from_secs(10)) {
        anyhow::bail!("the null tunnel did not start: {}", p.log());
    }
    Ok(p)
}

/// Starts a null tunnel at both ends of `pair` (see [`crate::generators::null_tunnel`]):
/// the generators (stopped when dropped).
pub fn null_tunnels(run: Run<'_>, pair: &DirectPair, wait: NullWait) -> anyhow::Result<Vec<Proc>> {
    Ok(vec![
        null_tunnel_end(
            run,
            &pair.a,
            ("10.84.0.1/24", "10.96.0.1:51830", "10.96.0.2:51830"),
            wait,
        )?,
        null_tunnel_end(
            run,
            &pair.b,
            ("10.84.0.2/24", "10.96.0.2:51830", "10.96.0.1:51830"),
            wait,
        )?,
    ])
}

/// The bench's name of the null tunnels' path (blocking, without a relay).
pub const NULL_BLOCKING: &str = "null tunnel (no crypto), blocking";
/// The bench's name of the batched null tunnels' path (ASMN's I/O without cryptography).
pub const NULL_BATCHED: &str = "null tunnel (no crypto), batched with offloads";
/// The bench's name of the relayed null tunnels' path.
pub const NULL_RELAYED: &str = "null tunnel through a null relay";
/// The overlay address of the second end of the relayed null tunnels.
pub const RELAYED_B: &str = "10.83.0.2";
/// The relay's address on the bridge of [`RelayedNull`].
const RELAY_AT: &str = "10.93.0.3:51850";

/// Null tunnels (blocking) whose datagrams go through a null relay
/// ([`crate::generators::null_relay`]), in three namespaces on a bridge as a tenant's
/// VNFs and its gateway are: the floor of a gateway, beside the null tunnels without a
/// relay. Everything is removed when dropped.
#[derive(Debug)]
pub struct RelayedNull {
    /// The relay and the tunnels' ends (stopped first).
    procs: Vec<Proc>,
    /// The first end (overlay 10.83.0.1).
    pub a: Netns,
    /// The second end (overlay [`RELAYED_B`]).
    pub b: Netns,
    _relay: Netns,
    /// The bridge's namespace, removed last.
    _hub: Netns,
}

impl RelayedNull {
    /// The namespaces and the bridge, the relay and both ends.
    pub fn start(run: Run<'_>) -> anyhow::Result<RelayedNull> {
        let ns = |tag| Netns::new(tag).map_err(anyhow::Error::msg);
        let hub = ns("asmnhub")?;
        netns::bridge(&hub, "br0", "10.93.0.254/24").map_err(anyhow::Error::msg)?;
        let (a, b, relay) = (ns("asmnvnf")?, ns("asmnvnf")?, ns("asmnvnf")?);
        for (n, addr) in [
            (&a, "10.93.0.1/24"),
            (&b, "10.93.0.2/24"),
            (&relay, "10.93.0.3/24"),
        ] {
            netns::attach(&hub, "br0", n, addr).map_err(anyhow::Error::msg)?;
        }
        let log = run.work.join(format!("{}.log", netns::unique("relay")));
        let args = [
            "null-relay",
            "--listen",
            RELAY_AT,
            "--a",
            "10.93.0.1:51830",
            "--b",
            "10.93.0.2:51830",
            "--seconds",
            "900",
        ];
        let mut p = spawn_generator(&relay, run.me, &args, &log).map_err(anyhow::Error::msg)?;
        if !p.wait_log("null relay up", Duration::from_secs(10)) {
            anyhow::bail!("the null relay did not start: {}", p.log());
        }
        let mut procs = vec![p];
        procs.push(null_tunnel_end(
            run,
            &a,
            ("10.83.0.1/24", "10.93.0.1:51830", RELAY_AT),
            NullWait::Blocking,
        )?);
        procs.push(null_tunnel_end(
            run,
            &b,
            ("10.83.0.2/24", "10.93.0.2:51830", RELAY_AT),
            NullWait::Blocking,
        )?);
        Ok(RelayedNull {
            procs,
            a,
            b,
            _relay: relay,
            _hub: hub,
        })
    }

    /// The relay's and the ends' processes.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(Proc::pid).collect()
    }
}

/// Measures the plain veth path and the paths `want` asks for, in one run.
pub fn paths(run: Run<'_>, want: Paths) -> anyhow::Result<Vec<PathResult>> {
    let work = run.work;
    let mut results: Vec<PathResult> = Vec::new();
    let mut pair = DirectPair::new(work)?;
    eprintln!("plain veth ...");
    results.push(
        measure(run, "plain veth", (&pair.a, &pair.b), VETH_B, &[]).map_err(anyhow::Error::msg)?,
    );
    let queue = UDP_HEAVY_QUEUE.to_string();
    let deep: &[&str] = &["--tun-queue", &queue];
    let udp_heavy = format!("ASMN direct, TUN queue {UDP_HEAVY_QUEUE}");
    for (wanted, busy, extra, name) in [
        (want.direct, false, &[][..], "ASMN direct"),
        (want.queue, false, deep, udp_heavy.as_str()),
        (want.busy, true, &[][..], "ASMN direct, busy-poll"),
    ] {
        if wanted {
            eprintln!("{name} ...");
            let pids = pair.start_agents_with(busy, extra)?;
            results.push(
                measure(run, name, (&pair.a, &pair.b), TUNNEL_B, &pids)
                    .map_err(anyhow::Error::msg)?,
            );
            pair.stop_agents();
        }
    }
    if want.floor {
        for (wait, name) in [
            (NullWait::Blocking, NULL_BLOCKING),
            (
                NullWait::Epoll,
                "null tunnel (no crypto), one thread in epoll",
            ),
            (NullWait::Busy, "null tunnel (no crypto), busy-poll"),
            (NullWait::Batched, NULL_BATCHED),
        ] {
            eprintln!("{name} ...");
            let tunnels = null_tunnels(run, &pair, wait)?;
            let pids: Vec<u32> = tunnels.iter().map(Proc::pid).collect();
            results.push(
                measure(run, name, (&pair.a, &pair.b), NULL_B, &pids)
                    .map_err(anyhow::Error::msg)?,
            );
        }
        eprintln!("{NULL_RELAYED} ...");
        let relayed = RelayedNull::start(run)?;
        results.push(
            measure(
                run,
                NULL_RELAYED,
                (&relayed.a, &relayed.b),
                RELAYED_B,
                &relayed.pids(),
            )
            .map_err(anyhow::Error::msg)?,
        );
    }
    if !want.boringtun {
    } else if tool("boringtun-cli").is_some() {
        for threads in [1, 4] {
            let name = format!("boringtun-cli, {threads} thread(s)");
            eprintln!("{name} ...");
            let bt = pair.start_boringtun(threads)?;
            results.push(
                measure(run, &name, (&pair.a, &pair.b), BORINGTUN_B, &bt.pids())
                    .map_err(anyhow::Error::msg)?,
            );
        }
    } else {
        eprintln!("boringtun-cli is not installed: its rows are skipped");
    }
    drop(pair);

    if want.gateway {
        eprintln!("ASMN through the gateway ...");
        let (mut t, [g, c, s]) =
            Tenant::behind_gateway(BENCH_SERVER_VNFD, 1 << 20).map_err(anyhow::Error::msg)?;
        for i in [g, c, s] {
            t.start(i).map_err(anyhow::Error::msg)?;
            t.wait_enrolled(i, Duration::from_secs(30))
                .map_err(anyhow::Error::msg)?;
        }
        let pids: Vec<u32> = [g, c, s]
            .iter()
            .filter_map(|i| t.vnfs[*i].agent.as_ref().map(Proc::pid))
            .collect();
        let to = t.vnfs[s].overlay.to_string();
        let r = measure(
            run,
            "ASMN through the gateway",
            (&t.vnfs[c].ns, &t.vnfs[s].ns),
            &to,
            &pids,
        );
        if r.is_err() {
            for v in &t.vnfs {
                if let Some(p) = &v.agent {
                    let log = p.log();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    eprintln!("--- {} agent, last lines of its log:", v.name);
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        results.push(r.map_err(anyhow::Error::msg)?);
    }
    Ok(results)
}

/// The most TCP a path through the gateway can carry, as a fraction of the direct
/// tunnel's, when the tunnel's processes saturate the machine's cores (as they do here:
/// both ends of a direct tunnel keep two cores busy with one iperf3 stream), so that
/// throughput goes as the inverse of the CPU time per byte. Through the gateway each byte
/// costs what it costs on the direct tunnel (both ends' I/O, one encryption and one
/// decryption) plus the gateway's decryption and encryption. One cryptographic operation
/// per byte costs half of what the direct tunnel spends above the batched null tunnel
/// (the same I/O without cryptography), both measured in the same run. The gateway's own
/// I/O is counted as free, so the real ceiling is lower. `None` without both rows' CPU
/// figures.
pub fn gateway_tcp_ceiling(direct: &PathResult, batched: Option<&PathResult>) -> Option<f64> {
    let d = direct.cpu_s_per_gb?;
    let crypto_op = ((d - batched?.cpu_s_per_gb?) / 2.0).max(0.0);
    (d > 0.0).then(|| d / (d + 2.0 * crypto_op))
}

/// The results as a Markdown table, then each path's ratios against the veth baseline
/// (the first row) and against boringtun-cli in its fastest thread setting.
pub fn markdown(results: &[PathResult]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some(plain) = results.first() else {
        return out;
    };
    let bts = || results.iter().filter(|r| r.path.starts_with("boringtun"));
    // Each figure beside boringtun-cli's best setting for it: the most TCP throughput,
    // the least RTT overhead.
    let bt_tcp = bts().max_by(|a, b| a.tcp_mbps.total_cmp(&b.tcp_mbps));
    let bt_rtt = bts().min_by(|a, b| a.rtt64_us.total_cmp(&b.rtt64_us));
    let bt_pps = bts()
        .filter_map(|r| Some((r, r.udp64_kpps?)))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    let direct = results.iter().find(|r| r.path == "ASMN direct");
    let null = results.iter().find(|r| r.path == NULL_BLOCKING);
    let batched = results.iter().find(|r| r.path == NULL_BATCHED);
    let _ = writeln!(out, "Measured with {}.\n", plain.tool);
    let _ = writeln!(
        out,
        "| path | RTT 64 B (us, median of {RTT_RUNS} runs) | its runs (us, least-most) | RTT 4 KiB (us, median) | TCP (Mbit/s) | UDP (Mbit/s) | UDP loss (%) | of it at the receiving sockets (%) | UDP, 2 MiB buffers (Mbit/s) | its loss (%) | UDP 64 B, unlimited (kpps received) | CPU s/GB |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in results {
        let lo = r
            .rtt64_runs_us
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        let hi = r.rtt64_runs_us.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {lo:.0}-{hi:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} | {} | {} | {} |",
            r.path,
            r.rtt64_us,
            r.rtt4096_us,
            r.tcp_mbps,
            r.udp_mbps,
            r.udp_loss_pct,
            r.udp_rcvbuf_drop_pct
                .map_or("-".to_string(), |d| format!("{d:.2}")),
            r.udp_2m.map_or("-".to_string(), |u| format!("{:.0}", u.0)),
            r.udp_2m.map_or("-".to_string(), |u| format!("{:.2}", u.1)),
            r.udp64_kpps.map_or("-".to_string(), |k| format!("{k:.0}")),
            r.cpu_s_per_gb
                .map_or("kernel".to_string(), |c| format!("{c:.1}"))
        );
    }
    let _ = writeln!(out);
    for r in results.iter().skip(1) {
        let _ = write!(
            out,
            "- {}: RTT overhead over veth {:+.0} us (64 B); TCP {:.2}x veth; UDP {:.2}x veth",
            r.path,
            r.rtt64_us - plain.rtt64_us,
            r.tcp_mbps / plain.tcp_mbps.max(1e-9),
            r.udp_mbps / plain.udp_mbps.max(1e-9)
        );
        if let (Some(u), Some(p)) = (r.udp_2m, plain.udp_2m) {
            let _ = write!(
                out,
                " ({:.2}x with 2 MiB buffers, {:.2}% lost)",
                u.0 / p.0.max(1e-9),
                u.1
            );
        }
        if let (Some(t), Some(l)) = (bt_tcp, bt_rtt)
            && !r.path.starts_with("boringtun")
        {
            let theirs = l.rtt64_us - plain.rtt64_us;
            let within = r
                .rtt64_runs_us
                .iter()
                .filter(|x| **x - plain.rtt64_us <= theirs)
                .count();
            let _ = write!(
                out,
                "; TCP {:.2}x {}; RTT overhead {:.2}x that of {} (at most its median overhead in {within} of {} runs)",
                r.tcp_mbps / t.tcp_mbps.max(1e-9),
                t.path,
                (r.rtt64_us - plain.rtt64_us) / theirs.max(1e-9),
                l.path,
                r.rtt64_runs_us.len()
            );
        }
        if let (Some((t, theirs)), Some(k)) = (bt_pps, r.udp64_kpps)
            && !r.path.starts_with("boringtun")
        {
            let _ = write!(
                out,
                "; UDP 64 B {:.2}x the packets a second of {}",
                k / theirs.max(1e-9),
                t.path
            );
        }
        if let Some(d) = direct
            && r.path.contains("gateway")
        {
            let _ = write!(
                out,
                "; TCP {:.2}x ASMN direct; RTT overhead {:.2}x that of ASMN direct",
                r.tcp_mbps / d.tcp_mbps.max(1e-9),
                (r.rtt64_us - plain.rtt64_us) / (d.rtt64_us - plain.rtt64_us).max(1e-9)
            );
            if let Some(c) = gateway_tcp_ceiling(d, batched) {
                let _ = write!(
                    out,
                    " (its TCP ceiling on this machine: {c:.2}x, with the gateway's own I/O free; see `gateway_tcp_ceiling`)"
                );
            }
        }
        if let Some(n) = batched
            && r.path.starts_with("ASMN direct")
        {
            let _ = write!(
                out,
                "; TCP {:.2}x and UDP 64 B {:.2}x the packets a second of {NULL_BATCHED} (ASMN's I/O without cryptography)",
                r.tcp_mbps / n.tcp_mbps.max(1e-9),
                r.udp64_kpps.unwrap_or(0.0) / n.udp64_kpps.unwrap_or(0.0).max(1e-9),
            );
        }
        if let Some(n) = null
            && r.path == NULL_RELAYED
        {
            let _ = write!(
                out,
                "; TCP {:.2}x {NULL_BLOCKING}; RTT overhead {:.2}x that of {NULL_BLOCKING} (the floor of a gateway's ratios to the direct tunnel)",
                r.tcp_mbps / n.tcp_mbps.max(1e-9),
                (r.rtt64_us - plain.rtt64_us) / (n.rtt64_us - plain.rtt64_us).max(1e-9)
            );
        }
        let _ = writeln!(out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{PathResult, gateway_tcp_ceiling, median};

    #[test]
    fn the_median_is_the_middle_or_the_mean_of_the_two_middles() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        // An outlier moves the mean, not the median.
        assert_eq!(median(&mut [100.0, 110.0, 7000.0]), Some(110.0));
    }

    fn with_cpu(path: &str, cpu_s_per_gb: Option<f64>) -> PathResult {
        PathResult {
            path: path.into(),
            tool: "test".into(),
            rtt64_us: 0.0,
            rtt64_runs_us: Vec::new(),
            rtt4096_us: 0.0,
            tcp_mbps: 0.0,
            udp_mbps: 0.0,
            udp_loss_pct: 0.0,
            udp_rcvbuf_drop_pct: None,
            udp_2m: None,
            udp64_kpps: None,
            cpu_s_per_gb,
        }
    }

    #[test]
    fn the_gateways_tcp_ceiling_adds_two_cryptographic_operations_to_the_direct_cost() {
        // Direct 3.0 s/GB of which 1.0 is I/O: 1.0 s/GB per operation; through the gateway
        // 3.0 + 2.0 = 5.0 s/GB, so at most 3/5 of the direct tunnel's throughput.
        let direct = with_cpu("ASMN direct", Some(3.0));
        let null = with_cpu("null", Some(1.0));
        let c = gateway_tcp_ceiling(&direct, Some(&null)).expect("both measured");
        assert!((c - 0.6).abs() < 1e-9, "{c}");
        // Free cryptography: no ceiling below the direct tunnel.
        let free = with_cpu("null", Some(3.0));
        assert_eq!(gateway_tcp_ceiling(&direct, Some(&free)), Some(1.0));
        // A figure missing: no claim.
        assert_eq!(gateway_tcp_ceiling(&direct, None), None);
        assert_eq!(
            gateway_tcp_ceiling(&with_cpu("ASMN direct", None), Some(&null)),
            None
        );
    }
}
