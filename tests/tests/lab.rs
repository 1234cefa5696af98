//! `asmn-lab demo` (the README's first command) runs to the end and every step succeeds.

use asmn_tests::netns;

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
