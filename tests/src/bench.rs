//! `asmn-lab bench`: the data-plane benchmark. Two namespaces joined by a veth pair carry
//! the same traffic over four paths in one run: the plain veth (the baseline), ASMN's data
//! plane (`asmn-agent static`, a direct tunnel), `boringtun-cli` configured with `wg` (one
//! thread, and its default of four), and ASMN through the gateway (a tenant with Sec-EM).
//! Every figure is printed beside the baseline measured in the same run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::{self, Netns, Proc};

/// One path's measurements.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PathResult {
    /// The path.
    pub path: String,
    /// What measured it: `ping + iperf3`, or the lab's generators.
    pub tool: String,
    /// Mean ICMP RTT with 64-byte payloads, microseconds.
    pub rtt64_us: f64,
    /// Mean ICMP RTT with 4096-byte payloads, microseconds.
    pub rtt4096_us: f64,
    /// TCP goodput, Mbit/s.
    pub tcp_mbps: f64,
    /// UDP goodput at the offered rate, Mbit/s, and the loss.
    pub udp_mbps: f64,
    /// UDP datagrams lost, percent.
    pub udp_loss_pct: f64,
    /// CPU seconds of the tunnel processes per GB of TCP payload (None: the kernel's).
    pub cpu_s_per_gb: Option<f64>,
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
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
pub fn generate(ns: &Netns, me: &Path, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut full = vec!["gen"];
    full.extend_from_slice(args);
    let out = netns::run(&mut ns.cmd(me.to_str().unwrap_or_default(), &full))?;
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

fn mean_rtt(ns: &Netns, me: &Path, to: &str, size: usize) -> Result<f64, String> {
    // Warm-up (handshakes, ARP), then 20 echoes.
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
            "20",
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
    if v.len() < 15 {
        return Err(format!("only {} of 20 echoes answered to {to}", v.len()));
    }
    Ok(v.iter().sum::<f64>() / v.len() as f64)
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

/// Mean RTT in microseconds from iputils ping: `rtt min/avg/max/mdev = a/b/c/d ms`.
fn ping_rtt(ns: &Netns, to: &str, size: usize) -> Result<f64, String> {
    // Warm-up (handshakes, ARP), then 20 echoes 50 ms apart (root may go below 200 ms).
    let size = size.to_string();
    let _ = ns.run("ping", &["-c", "3", "-i", "0.2", "-s", &size, "-q", to]);
    let out = ns.run(
        "ping",
        &["-c", "20", "-i", "0.05", "-s", &size, "-q", "-W", "2", to],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .ok_or_else(|| format!("ping {to}: no summary in {text:?}"))?;
    let avg = line
        .split('=')
        .nth(1)
        .and_then(|v| v.trim().split('/').nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("ping {to}: cannot read {line:?}"))?;
    Ok(avg * 1000.0)
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
    let rtt64 = ping_rtt(a, to, 56)?;
    let rtt4096 = ping_rtt(a, to, 4088)?;
    let slug: String = name.chars().filter(char::is_ascii_alphanumeric).collect();
    let cpu0: f64 = procs.iter().map(|p| cpu_seconds(*p)).sum();
    let tcp = iperf3(run, (a, b), to, 7001, &[], &format!("{slug}-iperf-tcp.log"))?;
    let cpu1: f64 = procs.iter().map(|p| cpu_seconds(*p)).sum();
    let received = &tcp["end"]["sum_received"];
    let bytes = received["bytes"].as_f64().unwrap_or(0.0);
    let udp = iperf3(
        run,
        (a, b),
        to,
        7002,
        &["-u", "-b", "1G", "-l", "1200"],
        &format!("{slug}-iperf-udp.log"),
    )?;
    // iperf3 3.12 reports what the server received (and lost) in `sum_received`.
    let urx = &udp["end"]["sum_received"];
    Ok(PathResult {
        path: name.to_string(),
        tool: "ping + iperf3".into(),
        rtt64_us: rtt64,
        rtt4096_us: rtt4096,
        tcp_mbps: received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        udp_mbps: urx["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        udp_loss_pct: urx["lost_percent"].as_f64().unwrap_or(100.0),
        cpu_s_per_gb: (!procs.is_empty() && bytes > 0.0).then(|| (cpu1 - cpu0) / (bytes / 1e9)),
    })
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
    let rtt64 = mean_rtt(a, me, to, 56)?;
    let rtt4096 = mean_rtt(a, me, to, 4088)?;
    let secs = seconds.to_string();
    let sink_secs = (seconds + 3).to_string();
    let _sink = b.spawn(
        me,
        &["gen", "tcp-sink", "--port", "7001", "--seconds", &sink_secs],
        &work.join(format!("{name}-tcp-sink.log")),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu0: f64 = procs.iter().map(|p| cpu_seconds(*p)).sum();
    let tcp = generate(a, me, &["tcp", &format!("{to}:7001"), "--seconds", &secs])?;
    let cpu1: f64 = procs.iter().map(|p| cpu_seconds(*p)).sum();
    let bytes = tcp["bytes"].as_f64().unwrap_or(0.0);
    let mut usink: Proc = b.spawn(
        me,
        &["gen", "udp-sink", "--port", "7002", "--seconds", &sink_secs],
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
    let log = usink.log();
    let got: serde_json::Value = log
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let tx = sent["datagrams"].as_f64().unwrap_or(0.0);
    let rx = got["datagrams"].as_f64().unwrap_or(0.0);
    Ok(PathResult {
        path: name.to_string(),
        tool: "lab generators".into(),
        rtt64_us: rtt64,
        rtt4096_us: rtt4096,
        tcp_mbps: tcp["mbit_per_s"].as_f64().unwrap_or(0.0),
        udp_mbps: got["mbit_per_s"].as_f64().unwrap_or(0.0),
        udp_loss_pct: if tx > 0.0 {
            100.0 * (tx - rx).max(0.0) / tx
        } else {
            100.0
        },
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
