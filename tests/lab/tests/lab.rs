//! `asmn-lab demo` (the README's first command) runs to the end and every step succeeds.

use asmn_testkit::netns;

#[test]
fn the_demo_succeeds_at_every_step_and_leaves_nothing_behind() {
    if !netns::can_run("asmn-lab demo") {
        return;
    }
    let _one_at_a_time = netns::serial();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asmn-lab"))
        .args(["demo", "--json"])
        .output()
        .expect("run asmn-lab demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = text.lines().last().expect("a JSON line");
    let v: serde_json::Value = serde_json::from_str(json).expect("json");
    assert_eq!(v["ok"], true, "{text}");
    let steps = v["steps"].as_array().expect("steps");
    for want in [
        "agents enrolled",
        "fake VNF refused",
        "ICMP echo",
        "TCP stream",
        "UDP stream",
        "unlisted port",
        "flood shaped",
        "revoked and cut off",
        "clean-up",
    ] {
        let step = steps
            .iter()
            .find(|s| s["step"].as_str().is_some_and(|n| n.contains(want)))
            .unwrap_or_else(|| panic!("no step {want:?}: {text}"));
        assert_eq!(step["ok"], true, "{step}");
    }
    // Nothing of this run is left.
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("asmnhub"),
        "a lab namespace was left behind"
    );
}

/// `asmn-lab eval --quick` writes the whole report: every section, the raw data, valid
/// PNG and SVG charts, and Fig. 9's data show the flood above 10 Mbit/s before the rule
/// and at most 10.5 Mbit/s in every 100 ms window from 100 ms after it.
#[test]
fn the_quick_evaluation_writes_the_full_report() {
    if !netns::can_run("asmn-lab eval") {
        return;
    }
    let _one_at_a_time = netns::serial();
    let out_dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asmn-lab"))
        .args(["eval", "--quick", "--out"])
        .arg(out_dir.path())
        .output()
        .expect("run asmn-lab eval");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = out_dir.path();
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    for section in [
        "## Tables 1 and 2",
        "## Fig. 5",
        "## Figs. 6 to 8",
        "## Fig. 9",
        "## Beyond the paper",
    ] {
        assert!(report.contains(section), "no {section:?} in\n{report}");
    }
    for chart in [
        "fig5_rtt",
        "fig6_cpu_icmp",
        "fig7_cpu_tcp",
        "fig8_cpu_udp",
        "fig9_flood",
    ] {
        let png = std::fs::read(dir.join(format!("{chart}.png"))).expect("png");
        assert!(
            png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{chart}.png"
        );
        let svg = std::fs::read_to_string(dir.join(format!("{chart}.svg"))).expect("svg");
        assert!(
            svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
            "{chart}.svg"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("json"))
            .expect("report.json");
    // Table 2: three pairs, four algorithms, the digests of different images differ.
    let hashing = json["hashing"].as_array().expect("hashing");
    assert_eq!(hashing.len(), 12, "{hashing:?}");
    assert!(hashing.iter().all(|h| h["differ"] == true));
    // Fig. 5: the baseline, ASMN direct and through the gateway.
    let paths: Vec<&str> = json["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .filter_map(|p| p["path"].as_str())
        .collect();
    for want in ["plain veth", "ASMN direct", "ASMN through the gateway"] {
        assert!(paths.contains(&want), "{paths:?}");
    }
    // Figs. 6-8: three protocols, two sizes, three paths (veth, ASMN, the null tunnel;
    // four with boringtun-cli), each load really carried, and the tunnels' own CPU time
    // counted.
    let cpu = json["cpu"].as_array().expect("cpu");
    let paths = if asmn_lab::bench::tool("boringtun-cli").is_some() {
        4
    } else {
        3
    };
    assert_eq!(cpu.len(), 6 * paths, "{cpu:?}");
    for c in cpu {
        let asked = if c["protocol"] == "icmp" { 100.0 } else { 10.0 };
        let got = c["delivered"].as_f64().expect("delivered");
        assert!(got >= 0.9 * asked, "load fell short: {c}");
        if c["path"] != "plain veth" {
            assert!(
                c["tunnel_ms_per_s"].as_f64().expect("tunnel CPU") > 0.0,
                "{c}"
            );
        }
    }
    // Fig. 9, from the raw data: (seconds since the flood started, Mbit/s).
    let rule_at = json["flood"]["rule_at_s"].as_f64().expect("rule_at_s");
    let csv = std::fs::read_to_string(dir.join("fig9_flood.csv")).expect("fig9 csv");
    let rate: Vec<(f64, f64)> = csv
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (t, r) = l.split_once(',')?;
            Some((t.parse().ok()?, r.parse().ok()?))
        })
        .collect();
    let before: Vec<f64> = rate
        .iter()
        .filter(|(t, _)| *t > 1.0 && *t + 0.1 < rule_at)
        .map(|x| x.1)
        .collect();
    assert!(!before.is_empty(), "{csv}");
    let mean_before = before.iter().sum::<f64>() / before.len() as f64;
    assert!(
        mean_before > 10.0,
        "{mean_before} Mbit/s before the rule\n{csv}"
    );
    // What the flood's threads did around a time: a window off the rule says why.
    let threads = std::fs::read_to_string(dir.join("fig9_threads.csv")).expect("fig9 threads");
    let header = threads.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("seconds_since_flood_start,interval_ms,gateway_ran_ms"),
        "{header}"
    );
    assert!(threads.lines().count() > 20, "{threads}");
    let threads_near = |at: f64| -> String {
        let rows = threads.lines().skip(1).filter(|l| {
            l.split(',')
                .next()
                .and_then(|t| t.parse::<f64>().ok())
                .is_some_and(|t| (at - 0.5..=at + 0.3).contains(&t))
        });
        std::iter::once(header)
            .chain(rows)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let after: Vec<&(f64, f64)> = rate.iter().filter(|(t, _)| *t >= rule_at + 0.1).collect();
    assert!(after.len() >= 30, "{csv}");
    for (t, r) in after {
        assert!(
            *r <= 10.5,
            "{r} Mbit/s at {t} s (rule at {rule_at} s)\n{csv}\nthe threads around it:\n{}",
            threads_near(*t)
        );
    }
}

/// The benchmark's extra paths work: agents that poll without pause (`--busy-poll`)
/// carry echoes both ways, poll while packets flow and sleep when idle, and the null
/// tunnels (the floor), directly and through a null relay, carry echoes.
#[test]
fn busy_polling_agents_deep_tun_queues_and_the_null_tunnels_answer_echoes() {
    use asmn_lab::bench::{self, DirectPair, NULL_B, Run, TUNNEL_A, TUNNEL_B};
    use asmn_lab::generators::NullWait;
    if !netns::can_run("the busy-poll and null-tunnel paths") {
        return;
    }
    let _one_at_a_time = netns::serial();
    if bench::tool("wg").is_none() {
        assert!(std::env::var("CI").is_err(), "wg is required under CI");
        asmn_shared::skip::note("wg (wireguard-tools) is not installed");
        return;
    }
    // Five echoes from `ns` to `to`, all answered.
    let five_answered = |ns: &netns::Netns, to: &str, what: &str| {
        let out = ns
            .run("ping", &["-c", "5", "-i", "0.05", "-W", "2", to])
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("5 received"), "{what}: {text}");
    };
    let dir = tempfile::tempdir().expect("tmp");
    let mut pair = DirectPair::new(dir.path()).expect("namespaces, veth and keys");
    let pids = pair.start_agents(true).expect("both busy agents up");
    five_answered(&pair.a, TUNNEL_B, "busy agents, a to b");
    five_answered(&pair.b, TUNNEL_A, "busy agents, b to a");
    for pid in pids {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "busy agent {pid} exited"
        );
    }
    // They poll while packets flow (a core's worth of CPU time between them), and sleep
    // once a second has passed without one. Loose bounds: a second of echoes costs far
    // more than 0.3 s of CPU, two idle seconds far less than 0.2 s.
    let cpu = || bench::cpu_seconds_of(&pids);
    let c0 = cpu();
    five_answered(&pair.a, TUNNEL_B, "busy agents, a to b again");
    pair.a
        .run("ping", &["-c", "20", "-i", "0.05", "-q", TUNNEL_B])
        .expect("a second of echoes");
    let flowing = cpu() - c0;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let c2 = cpu();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let idle = cpu() - c2;
    assert!(
        flowing >= 0.3,
        "busy agents used only {flowing:.2} s of CPU while echoes flowed"
    );
    assert!(
        idle <= 0.2,
        "busy agents used {idle:.2} s of CPU in 2 idle seconds"
    );
    pair.stop_agents();
    // The TUN queue: the kernel's 500 by default, what `--tun-queue` asks otherwise (the
    // bench's UDP-heavy path), and a value out of range refused before anything starts.
    let qlen = |ns: &netns::Netns| {
        let out = ns.run("ip", &["link", "show", "asmn0"]).expect("ip link");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .skip_while(|w| *w != "qlen")
            .nth(1)
            .and_then(|q| q.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no qlen in {text}"))
    };
    pair.start_agents(false).expect("agents up");
    five_answered(&pair.a, TUNNEL_B, "default queue");
    assert_eq!((qlen(&pair.a), qlen(&pair.b)), (500, 500));
    pair.stop_agents();
    let deep = bench::UDP_HEAVY_QUEUE.to_string();
    pair.start_agents_with(false, &["--tun-queue", &deep])
        .expect("agents with a deep queue up");
    five_answered(&pair.a, TUNNEL_B, "deep queue");
    assert_eq!(
        (qlen(&pair.a), qlen(&pair.b)),
        (bench::UDP_HEAVY_QUEUE, bench::UDP_HEAVY_QUEUE)
    );
    pair.stop_agents();
    let refused = pair
        .start_agents_with(false, &["--tun-queue", "8"])
        .expect_err("a queue of 8 packets");
    assert!(refused.to_string().contains("tun-queue"), "{refused}");
    pair.stop_agents();
    let me = std::path::Path::new(env!("CARGO_BIN_EXE_asmn-lab"));
    let run = Run {
        me,
        seconds: 1,
        work: dir.path(),
        tools: true,
    };
    for wait in [
        NullWait::Blocking,
        NullWait::Epoll,
        NullWait::Busy,
        NullWait::Batched,
    ] {
        let _tunnels = bench::null_tunnels(run, &pair, wait).expect("null tunnels up");
        five_answered(&pair.a, NULL_B, &format!("null tunnel, {wait:?}"));
    }
    // The gateway's floor: the same tunnels through a null relay, in namespaces of their
    // own; it carries the echoes, and they are gone with it.
    let relayed = bench::RelayedNull::start(run).expect("relayed null tunnels up");
    five_answered(
        &relayed.a,
        bench::RELAYED_B,
        "null tunnel through the relay",
    );
    let ends = [relayed.a.name().to_string(), relayed.b.name().to_string()];
    drop(relayed);
    let left = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    for n in ends {
        assert!(!left.contains(&n), "namespace {n} left behind: {left}");
    }
}

/// `asmn-lab rtt-odds` runs a trial end to end: every path's runs measured side by side,
/// each judged path given a verdict over the trial, each tunnel's CPU per echo measured,
/// the cryptography timed hot and woken, and nothing left behind.
#[test]
fn rtt_odds_judges_each_path_over_a_trial_and_leaves_nothing_behind() {
    if !netns::can_run("asmn-lab rtt-odds") {
        return;
    }
    let _one_at_a_time = netns::serial();
    for t in ["boringtun-cli", "wg", "ping"] {
        if asmn_lab::bench::tool(t).is_none() {
            assert!(std::env::var("CI").is_err(), "{t} is required under CI");
            asmn_shared::skip::note(&format!("{t} is not installed"));
            return;
        }
    }
    let namespaces = || {
        String::from_utf8_lossy(
            &std::process::Command::new("ip")
                .args(["netns", "list"])
                .output()
                .expect("ip netns list")
                .stdout,
        )
        .into_owned()
    };
    let before = namespaces();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asmn-lab"))
        .args(["rtt-odds", "--trials", "1", "--json"])
        .output()
        .expect("run asmn-lab rtt-odds");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a JSON line");
    let paths = json["paths"].as_array().expect("paths");
    assert_eq!(paths.len(), 4, "{paths:?}");
    for p in paths {
        let trials = p["trials"].as_array().expect("trials");
        assert_eq!(trials.len(), 1, "{p}");
        let runs = trials[0].as_array().expect("runs");
        assert_eq!(runs.len(), asmn_lab::bench::RTT_RUNS, "{p}");
        // Each run is a median RTT: above zero, under the 2 s ping deadline.
        assert!(
            runs.iter()
                .all(|r| r.as_f64().is_some_and(|us| us > 0.0 && us < 2e6)),
            "{p}"
        );
    }
    // The tunnels' CPU per echo: one figure a trial for each tunnel, none for the veth.
    // An echo crosses each end twice, each crossing a wake-up: more than 1 us of CPU.
    for (i, p) in paths.iter().enumerate() {
        let cpu = p["cpu_us_per_echo"].as_array().expect("cpu_us_per_echo");
        assert_eq!(cpu.len(), usize::from(i > 0), "{p}");
        assert!(
            cpu.iter()
                .all(|us| us.as_f64().is_some_and(|us| us > 1.0 && us < 1e6)),
            "{p}"
        );
    }
    let verdicts = json["verdicts"].as_array().expect("verdicts");
    let judged: Vec<&str> = verdicts.iter().filter_map(|v| v["path"].as_str()).collect();
    assert_eq!(
        judged,
        [
            "ASMN direct",
            "null tunnel (no crypto), one thread in epoll"
        ]
    );
    for v in verdicts {
        assert_eq!(
            (v["trials"].as_u64(), v["runs"].as_u64()),
            (Some(1), Some(5)),
            "{v}"
        );
        assert_eq!(v["cpu_ratios"].as_array().map(Vec::len), Some(1), "{v}");
    }
    let c = &json["crypto"];
    for k in ["hot_encapsulate_ns", "woken_decapsulate_ns"] {
        assert!(c[k].as_u64().is_some_and(|ns| ns > 0), "{c}");
    }
    assert!(text.contains("trials with every run within it"), "{text}");
    assert!(
        text.contains("CPU per echo at 100 echoes a second"),
        "{text}"
    );
    assert_eq!(namespaces(), before, "namespaces left behind");
}
