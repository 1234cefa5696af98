//! The agent's metrics (Prometheus text format) and health over HTTP: data-plane counters,
//! per-rule policy counters, per-peer bytes and handshakes, the catalog in force.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::dataplane::Plane;

/// The exposition of `plane`'s counters.
pub fn render(plane: &Plane) -> String {
    let mut out = String::new();
    let c = plane.counters();
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
            "Packets to addresses outside the tenant",
            c.no_route,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {v}"
        );
    }
    if let Some(p) = plane.policy_counters() {
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
    let peers = plane.peers();
    for (_, vnf, ip, rx, tx, _) in &peers {
        let _ = writeln!(
            out,
            "asmn_agent_peer_bytes_total{{peer=\"{ip}\",vnf=\"{vnf}\",direction=\"rx\"}} {rx}\nasmn_agent_peer_bytes_total{{peer=\"{ip}\",vnf=\"{vnf}\",direction=\"tx\"}} {tx}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP asmn_agent_peer_last_handshake_seconds Seconds since the last handshake with the peer.\n# TYPE asmn_agent_peer_last_handshake_seconds gauge"
    );
    for (_, vnf, ip, _, _, last) in &peers {
        if let Some(d) = last {
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
    out
}

/// Serves `/metrics` and `/health` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, plane: Arc<Plane>) {
    while let Ok((mut sock, _)) = listener.accept().await {
        let plane = Arc::clone(&plane);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            let read = async {
                while n < buf.len() {
                    let k = sock.read(&mut buf[n..]).await.ok()?;
                    if k == 0 {
                        break;
                    }
                    n += k;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Some(())
            };
            if tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", render(&plane))
            } else if head.starts_with("GET /health ") {
                ("200 OK", "ok\n".to_string())
            } else {
                (
                    "404 Not Found",
                    "not found: try /metrics or /health\n".to_string(),
                )
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
