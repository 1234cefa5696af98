//! The agent's metrics (Prometheus text format) and health over HTTP: data-plane counters,
//! per-rule policy counters, per-peer bytes and handshakes, the catalog in force.

use std::fmt::Write as _;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpListener;

use crate::dataplane::PlaneStats;
use crate::io::PlaneHandle;

/// The control connection as the metrics show it: which controller the agent is
/// connected to (none while it reconnects) and how often it had to reconnect.
#[derive(Debug, Default)]
pub struct ControlStatus {
    controller: std::sync::Mutex<Option<String>>,
    reconnects: AtomicU64,
}

impl ControlStatus {
    /// Connected to `controller` (`host:port` as the bundle lists it).
    pub fn connected(&self, controller: &str) {
        if let Ok(mut c) = self.controller.lock() {
            *c = Some(controller.to_string());
        }
    }

    /// The connection is lost; the agent reconnects.
    pub fn lost(&self) {
        if let Ok(mut c) = self.controller.lock() {
            *c = None;
        }
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let controller = self.controller.lock().ok().and_then(|c| c.clone());
        let _ = writeln!(
            out,
            "# HELP asmn_agent_control_connected Whether the agent is connected to Sec-EM, by controller.\n# TYPE asmn_agent_control_connected gauge"
        );
        match controller {
            Some(c) => {
                let c = c.replace(['\\', '"', '\n'], "_");
                let _ = writeln!(out, "asmn_agent_control_connected{{controller=\"{c}\"}} 1");
            }
            None => {
                let _ = writeln!(out, "asmn_agent_control_connected{{controller=\"\"}} 0");
            }
        }
        let _ = writeln!(
            out,
            "# HELP asmn_agent_control_lost_total Control connections lost (each followed by a reconnection).\n# TYPE asmn_agent_control_lost_total counter\nasmn_agent_control_lost_total {}",
            self.reconnects.load(Ordering::Relaxed)
        );
    }
}

/// The exposition of the plane's statistics.
pub fn render(stats: &PlaneStats) -> String {
    let mut out = String::new();
    let c = stats.counters;
    for (name, help, v) in [
        (
            "asmn_agent_tx_packets_total",
            "Packets sent into tunnels",
            c.tx_packets,
        ),
        (
            "asmn_agent_rx_packets_total",
            "Packets received from tunnels and delivered or forwarded",
            c.rx_packets,
        ),
        (
            "asmn_agent_unknown_peer_total",
            "Datagrams for no installed peer",
            c.unknown_peer,
        ),
        (
            "asmn_agent_spoofed_total",
            "Decrypted packets whose inner source is not the peer's",
            c.spoofed,
        ),
        (
            "asmn_agent_policy_dropped_total",
            "Packets dropped by a Sec-catalog",
            c.policy_dropped,
        ),
        (
            "asmn_agent_queue_dropped_total",
            "Packets dropped waiting for a tunnel",
            c.queue_dropped,
        ),
        (
            "asmn_agent_no_route_total",
            "Packets to addresses outside the tenant, or with nowhere to go",
            c.no_route,
        ),
        (
            "asmn_agent_forwarded_total",
            "Packets a gateway forwarded between tunnels",
            c.forwarded,
        ),
        (
            "asmn_agent_bad_mac_total",
            "Handshake messages dropped before any Diffie-Hellman (wrong mac1, or under load)",
            c.bad_mac,
        ),
        (
            "asmn_agent_cookie_replies_total",
            "Cookie replies sent instead of processing a handshake under load",
            c.cookie_replies,
        ),
        (
            "asmn_agent_handshakes_shed_total",
            "Handshake messages dropped unread under load (their source's budget used)",
            c.handshakes_shed,
        ),
        (
            "asmn_agent_rejected_total",
            "Datagrams a tunnel rejected (decryption, replay, handshake verification)",
            c.rejected,
        ),
        (
            "asmn_agent_malformed_total",
            "Datagrams that are not WireGuard messages, and packets without an IP header",
            c.malformed,
        ),
        (
            "asmn_agent_not_admitted_total",
            "Packets a gateway dropped because Sec-EM did not admit the pair",
            c.not_admitted,
        ),
        (
            "asmn_agent_oversize_total",
            "Inner packets too large to carry, dropped",
            c.oversize,
        ),
        (
            "asmn_agent_outbox_full_total",
            "Packets dropped because a batch had no room left",
            c.outbox_full,
        ),
        (
            "asmn_agent_io_dropped_total",
            "Packets lost in I/O (unreadable from TUN, or not sent)",
            c.io_dropped,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {v}"
        );
    }
    if let Some(p) = &stats.policy {
        let _ = writeln!(
            out,
            "# HELP asmn_agent_catalog_version Sec-catalog version in force.\n# TYPE asmn_agent_catalog_version gauge\nasmn_agent_catalog_version {}",
            p.catalog_version
        );
        let _ = writeln!(
            out,
            "# HELP asmn_agent_rule_packets_total Packets by rule and outcome.\n# TYPE asmn_agent_rule_packets_total counter"
        );
        for (rule, r) in &p.rules {
            let _ = writeln!(
                out,
                "asmn_agent_rule_packets_total{{rule=\"{rule}\",outcome=\"passed\"}} {}\nasmn_agent_rule_packets_total{{rule=\"{rule}\",outcome=\"limited\"}} {}",
                r.passed_packets, r.limited_packets
            );
        }
        let _ = writeln!(
            out,
            "asmn_agent_rule_packets_total{{rule=\"(default)\",outcome=\"passed\"}} {}\nasmn_agent_rule_packets_total{{rule=\"(default)\",outcome=\"limited\"}} {}\nasmn_agent_rule_packets_total{{rule=\"(not listed)\",outcome=\"dropped\"}} {}",
            p.default.passed_packets, p.default.limited_packets, p.not_listed_packets
        );
        let _ = writeln!(
            out,
            "# HELP asmn_agent_rule_bytes_total Bytes by rule and outcome.\n# TYPE asmn_agent_rule_bytes_total counter"
        );
        for (rule, r) in &p.rules {
            let _ = writeln!(
                out,
                "asmn_agent_rule_bytes_total{{rule=\"{rule}\",outcome=\"passed\"}} {}\nasmn_agent_rule_bytes_total{{rule=\"{rule}\",outcome=\"limited\"}} {}",
                r.passed_bytes, r.limited_bytes
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP asmn_agent_peer_bytes_total Bytes per peer and direction.\n# TYPE asmn_agent_peer_bytes_total counter"
    );
    let peers = &stats.peers;
    for p in peers {
        let (ip, vnf, rx, tx) = (p.overlay, &p.vnf, p.rx_bytes, p.tx_bytes);
        let _ = writeln!(
            out,
            "asmn_agent_peer_bytes_total{{peer=\"{ip}\",vnf=\"{vnf}\",direction=\"rx\"}} {rx}\nasmn_agent_peer_bytes_total{{peer=\"{ip}\",vnf=\"{vnf}\",direction=\"tx\"}} {tx}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP asmn_agent_peer_last_handshake_seconds Seconds since the last handshake with the peer.\n# TYPE asmn_agent_peer_last_handshake_seconds gauge"
    );
    for p in peers {
        let (ip, vnf) = (p.overlay, &p.vnf);
        if let Some(d) = p.last_handshake {
            let _ = writeln!(
                out,
                "asmn_agent_peer_last_handshake_seconds{{peer=\"{ip}\",vnf=\"{vnf}\"}} {}",
                d.as_secs_f64()
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP asmn_agent_peers Installed peers.\n# TYPE asmn_agent_peers gauge\nasmn_agent_peers {}",
        peers.len()
    );
    for (name, help, v) in [
        (
            "asmn_agent_routes",
            "Routes to overlay addresses (direct and through gateways)",
            stats.routes,
        ),
        (
            "asmn_agent_admitted_pairs",
            "Pairs Sec-EM admitted for forwarding (gateway)",
            stats.admitted_pairs,
        ),
        (
            "asmn_agent_waiting_packets",
            "Packets waiting for Sec-EM",
            stats.waiting,
        ),
        (
            "asmn_agent_tunnel_indexes",
            "Receiver indexes in use (one per live tunnel)",
            stats.indexes,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} gauge\n{name} {v}"
        );
    }
    out
}

/// The data-plane thread's scheduling: its real-time priority, whether it runs real-time
/// (or batch) now, how often it went real-time (or batch) and rested, and its busy-poll
/// warm-ups; and its underlay sockets (one, or two with handshakes apart) and the
/// handshake socket's reads.
fn render_scheduling(s: crate::io::SchedulingStats, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_realtime_priority The SCHED_FIFO priority the data plane takes under load (0: none; a gateway's default is 10, and 0 here on a gateway means SCHED_FIFO was refused).\n# TYPE asmn_agent_dataplane_realtime_priority gauge\nasmn_agent_dataplane_realtime_priority {}",
        s.realtime_priority
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_realtime Whether the data plane runs real-time now (1: under load within the last 200 ms: packets over 1,000 a second, a limiter dropping, or the thread busy).\n# TYPE asmn_agent_dataplane_realtime gauge\nasmn_agent_dataplane_realtime {}",
        u8::from(s.realtime)
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_realtime_entries_total Times the data plane went real-time under load.\n# TYPE asmn_agent_dataplane_realtime_entries_total counter\nasmn_agent_dataplane_realtime_entries_total {}",
        s.realtime_entries
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_realtime_seconds_total Time the data plane ran real-time (up to its last 250 ms timer tick).\n# TYPE asmn_agent_dataplane_realtime_seconds_total counter\nasmn_agent_dataplane_realtime_seconds_total {:.3}",
        s.realtime_time.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_batch Whether the data plane runs SCHED_BATCH now (1: a VNF's plane under load within the last 200 ms, where its wake-ups leave the task that woke it running, so that a burst is read whole).\n# TYPE asmn_agent_dataplane_batch gauge\nasmn_agent_dataplane_batch {}",
        u8::from(s.batch)
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_batch_entries_total Times the data plane went SCHED_BATCH under load.\n# TYPE asmn_agent_dataplane_batch_entries_total counter\nasmn_agent_dataplane_batch_entries_total {}",
        s.batch_entries
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_rests_total Rests a busy real-time data plane took to leave its CPU to other tasks (1 ms in every 10 ms while a flood keeps it busy).\n# TYPE asmn_agent_dataplane_rests_total counter\nasmn_agent_dataplane_rests_total {}",
        s.rests
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_warm_ups_total Warm-up echoes a busy-polling data plane passed between two planes of its own while it polled without packets, to keep the per-packet code in the CPU's caches (one every 200 us).\n# TYPE asmn_agent_dataplane_warm_ups_total counter\nasmn_agent_dataplane_warm_ups_total {}",
        s.warm_ups
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_underlay_sockets The agent's UDP sockets on its underlay port: 2 when handshakes and anything that is not its own transport data have a socket of their own (a flood of them cannot crowd data out of the kernel's queue), 1 when the kernel refused the steering program and one socket takes everything.\n# TYPE asmn_agent_underlay_sockets gauge\nasmn_agent_underlay_sockets {}",
        if s.split_underlay { 2 } else { 1 }
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_underlay_handshake_datagrams_total Datagrams read from the handshake socket: handshakes, cookie replies, and whatever does not carry the agent's receiver-index tag (junk and forged transport data included).\n# TYPE asmn_agent_underlay_handshake_datagrams_total counter\nasmn_agent_underlay_handshake_datagrams_total {}",
        s.handshake_datagrams
    );
    let _ = writeln!(
        out,
        "# HELP asmn_agent_dataplane_polls_total Turns the data plane polled for packets rather than slept: while the tunnels' packets come closer than 20 us apart (junk and handshakes do not count), or all the time with polling = \"busy\".\n# TYPE asmn_agent_dataplane_polls_total counter\nasmn_agent_dataplane_polls_total {}",
        s.polls
    );
}

/// Serves `/metrics` and `/health` on `listener` until the task is dropped
/// (`asmn_channel::http`: at most 64 connections at once, 5 s deadlines).
pub async fn serve(listener: TcpListener, plane: PlaneHandle, control: Arc<ControlStatus>) {
    asmn_channel::http::serve(
        listener,
        asmn_channel::http::MAX_CONNECTIONS,
        move |path: String| {
            let (plane, control) = (plane.clone(), Arc::clone(&control));
            async move {
                match path.as_str() {
                    "/metrics" => {
                        let mut text = render(&plane.stats().await);
                        render_scheduling(plane.scheduling(), &mut text);
                        control.render(&mut text);
                        asmn_channel::http::Response::ok(text)
                    }
                    "/health" => asmn_channel::http::Response::ok("ok\n".into()),
                    _ => asmn_channel::http::Response::not_found(),
                }
            }
        },
    )
    .await
}
