//! `sec-em.toml`: parsed and validated once, into types that cannot hold invalid values.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use asmn_shared::dh::Group;
use serde::Deserialize;

/// Where state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded redb file.
    Embedded(PathBuf),
    /// An etcd cluster: `etcds://host:port,...` (TLS, client certificate), or plaintext
    /// `etcd://` when the configuration allows it explicitly.
    Etcd(String, EtcdFiles),
}

/// Where the credentials for etcd are (`[etcd]` of `sec-em.toml`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdFiles {
    /// The CA that signed the etcd members' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// Sec-EM's client certificate for etcd (PEM).
    pub cert: Option<PathBuf>,
    /// Its key (PEM, mode 0600).
    pub key: Option<PathBuf>,
    /// An etcd user, when etcd's authentication is enabled.
    pub user: Option<String>,
    /// A file holding that user's password.
    pub password_file: Option<PathBuf>,
}

impl EtcdFiles {
    /// Reads the files into connection options.
    pub fn load(&self) -> Result<crate::store::etcd::EtcdOptions, String> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))
        };
        let tls = match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Some(crate::store::etcd::EtcdTls {
                ca_pem: read(ca)?,
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            }),
            _ => None,
        };
        let user = match (&self.user, &self.password_file) {
            (Some(u), Some(p)) => Some((u.clone(), read(p)?.trim_end().to_string())),
            (Some(u), None) => Some((u.clone(), String::new())),
            _ => None,
        };
        Ok(crate::store::etcd::EtcdOptions { tls, user })
    }
}

/// The validated configuration of `sec-em serve`.
#[derive(Clone, Debug)]
pub struct Config {
    /// The QUIC endpoint.
    pub listen: SocketAddr,
    /// The name in the server certificate, which agents and `asmnctl` verify.
    pub server_name: String,
    /// The store.
    pub store: StoreUrl,
    /// Prometheus metrics over HTTP, if set.
    pub metrics_addr: Option<SocketAddr>,
    /// The northbound REST API (HTTPS, admin client certificates), if set.
    pub rest_addr: Option<SocketAddr>,
    /// How event notifications are sent (`[notifications]`).
    pub notifications: Notifications,
    /// The controllers (`host:port`) bundles list, in order: every replica of the
    /// deployment, so that an agent whose replica goes down moves to another. Empty: this
    /// replica's own address.
    pub controllers: Vec<String>,
    /// CA certificate (PEM file).
    pub ca: PathBuf,
    /// Server certificate (PEM file).
    pub cert: PathBuf,
    /// Server key (PEM file, mode 0600).
    pub key: PathBuf,
    /// The audit key (64 hex digits, mode 0600): authenticates audit records; never in
    /// the store. Replicas sharing a store share it.
    pub audit_key: PathBuf,
    /// The tenant overlay network.
    pub overlay_net: Ipv4Addr,
    /// Its prefix length.
    pub overlay_prefix: u8,
    /// Chain length of new instances.
    pub chain_length: u32,
    /// D-H group.
    pub dh_group: Group,
    /// Re-attestation interval, seconds.
    pub reattest_interval_secs: u32,
    /// What peers may make Sec-EM hold (`[limits]`).
    pub limits: Limits,
}

/// The bounds on what peers, authenticated or not, may make Sec-EM hold (`[limits]` of
/// `sec-em.toml`; every field has a default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// QUIC connections open at once (handshakes included); more are refused.
    pub max_connections: usize,
    /// Connections open at once from one source address.
    pub max_connections_per_source: usize,
    /// New connections per second from one source address (twice that in a burst),
    /// counted once the address is proved; more are refused.
    pub connections_per_source_per_sec: u32,
    /// Above this many open connections, a new one must first prove its address (QUIC
    /// Retry), so a spoofed flood cannot make Sec-EM hold handshake state.
    pub retry_above: usize,
    /// Seconds a connection without the admin certificate has to enroll; then it is
    /// closed.
    pub enroll_deadline: std::time::Duration,
    /// Seconds to receive, decide and answer one request.
    pub request_deadline: std::time::Duration,
    /// Peer verifications an enrolled agent may ask per second (twice that in a burst).
    pub verify_peer_per_sec: u32,
    /// Requests per second (twice that in a burst) served to connections that have not
    /// proved themselves, per source address; the rest wait their turn (a VM enrolls
    /// once; only someone trying many identities asks more).
    pub stranger_requests_per_source_per_sec: u32,
    /// Refusals of one kind about one known instance audited per minute; the rest are
    /// counted and folded into the next record.
    pub audit_refusals_per_min: u32,
    /// The QUIC transport: streams before and after a peer proves itself, idle timeout.
    pub transport: asmn_channel::tls::ServerLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            max_connections_per_source: 256,
            connections_per_source_per_sec: 5,
            retry_above: 1_024,
            enroll_deadline: std::time::Duration::from_secs(20),
            request_deadline: std::time::Duration::from_secs(10),
            verify_peer_per_sec: 100,
            stranger_requests_per_source_per_sec: 50,
            audit_refusals_per_min: 6,
            transport: asmn_channel::tls::ServerLimits::default(),
        }
    }
}

/// `[notifications]` of `sec-em.toml`: how subscribers' events are sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notifications {
    /// Events waiting per subscriber at most; more are dropped and counted.
    pub queue: usize,
    /// CAs (a PEM file) that `https` callbacks must chain to; the system's bundle when
    /// unset.
    pub ca: Option<PathBuf>,
    /// Longest wait between two attempts to deliver one event.
    pub max_backoff: std::time::Duration,
}

impl Default for Notifications {
    fn default() -> Self {
        Self {
            queue: 4096,
            ca: None,
            max_backoff: std::time::Duration::from_secs(5),
        }
    }
}

/// A configuration error: the file, the field and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {field}: {reason}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// The field (or `syntax`).
    pub field: String,
    /// What is wrong and what to do.
    pub reason: String,
}

/// Controllers a bundle may list.
pub const MAX_CONTROLLERS: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    server_name: String,
    store: String,
    #[serde(default)]
    metrics_addr: Option<String>,
    #[serde(default)]
    rest_addr: Option<String>,
    #[serde(default)]
    notifications: RawNotifications,
    #[serde(default)]
    controllers: Vec<String>,
    audit_key: PathBuf,
    tls: RawTls,
    tenant: RawTenant,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    etcd: RawEtcd,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    queue: Option<usize>,
    ca: Option<PathBuf>,
    max_backoff_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    connections_per_source_per_sec: Option<u32>,
    retry_above: Option<usize>,
    enroll_deadline_secs: Option<u64>,
    request_deadline_secs: Option<u64>,
    verify_peer_per_sec: Option<u32>,
    stranger_requests_per_source_per_sec: Option<u32>,
    audit_refusals_per_min: Option<u32>,
    unauthenticated_streams: Option<u32>,
    idle_timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    overlay: String,
    #[serde(default = "default_chain")]
    chain_length: u32,
    #[serde(default = "default_group")]
    dh_group: String,
    #[serde(default = "default_interval")]
    reattest_interval_secs: u32,
}

fn default_chain() -> u32 {
    100_000
}
fn default_group() -> String {
    "ffdhe3072".into()
}
fn default_interval() -> u32 {
    30
}

/// Largest configuration file read.
const MAX_CONFIG: u64 = 1 << 20;

impl Config {
    /// Reads and validates `path`. Relative certificate paths are relative to the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |field: &str, reason: String| ConfigError {
            file: file.clone(),
            field: field.to_string(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| err("file", e.to_string()))?;
        if meta.len() > MAX_CONFIG {
            return Err(err("file", format!("{} bytes is too large", meta.len())));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err("file", e.to_string()))?;
        Self::parse(&file, &text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Validates configuration text; `base` resolves relative paths.
    pub fn parse(file: &str, text: &str, base: &Path) -> Result<Config, ConfigError> {
        let err = |field: &str, reason: String| ConfigError {
            file: file.to_string(),
            field: field.to_string(),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| err("syntax", e.to_string()))?;
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|_| err("listen", format!("{:?} is not ip:port", raw.listen)))?;
        if raw.server_name.is_empty() || raw.server_name.len() > 253 {
            return Err(err(
                "server_name",
                "must be a DNS name or IP address".into(),
            ));
        }
        let store = if let Some(rest) = raw.store.strip_prefix("embedded:") {
            if rest.is_empty() {
                return Err(err("store", "embedded: needs a file path".into()));
            }
            StoreUrl::Embedded(base.join(rest))
        } else if raw.store.starts_with("etcd://") || raw.store.starts_with("etcds://") {
            crate::store::etcd::parse_url(&raw.store).map_err(|e| err("store", e.to_string()))?;
            let e = &raw.etcd;
            let files = EtcdFiles {
                ca: e.ca.as_ref().map(|p| base.join(p)),
                cert: e.cert.as_ref().map(|p| base.join(p)),
                key: e.key.as_ref().map(|p| base.join(p)),
                user: e.user.clone(),
                password_file: e.password_file.as_ref().map(|p| base.join(p)),
            };
            let tls_files = [&files.ca, &files.cert, &files.key];
            if crate::store::etcd::is_tls(&raw.store) {
                if tls_files.iter().any(|f| f.is_none()) {
                    return Err(err(
                        "etcd",
                        "etcds:// needs ca, cert and key in [etcd] (the CA of the etcd members, \
                         Sec-EM's client certificate and key)"
                            .into(),
                    ));
                }
            } else {
                if !e.allow_plaintext {
                    return Err(err(
                        "store",
                        "etcd:// is plaintext and unauthenticated, and the store holds the keys \
                         of trust: use etcds:// with [etcd] ca, cert and key (or set \
                         allow_plaintext = true in [etcd], for loopback tests only)"
                            .into(),
                    ));
                }
                if tls_files.iter().any(|f| f.is_some()) {
                    return Err(err(
                        "etcd",
                        "ca, cert and key are for etcds://, not a plaintext etcd:// URL".into(),
                    ));
                }
            }
            if e.password_file.is_some() && e.user.is_none() {
                return Err(err("etcd.password_file", "needs etcd.user".into()));
            }
            StoreUrl::Etcd(raw.store.clone(), files)
        } else {
            return Err(err(
                "store",
                format!(
                    "{:?}: use embedded:PATH or etcds://host:port[,host:port...]",
                    raw.store
                ),
            ));
        };
        if raw.etcd.allow_plaintext && !matches!(store, StoreUrl::Etcd(..)) {
            return Err(err(
                "etcd.allow_plaintext",
                "only for an etcd:// store".into(),
            ));
        }
        if raw.controllers.len() > MAX_CONTROLLERS {
            return Err(err(
                "controllers",
                format!(
                    "{} listed; at most {MAX_CONTROLLERS}",
                    raw.controllers.len()
                ),
            ));
        }
        let mut controllers = Vec::with_capacity(raw.controllers.len());
        for c in raw.controllers {
            let valid = c.len() <= 255
                && c.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty()
                        && port.parse::<u16>().is_ok_and(|p| p != 0)
                        && host
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
                });
            if !valid {
                return Err(err(
                    "controllers",
                    format!("{c:?} is not host:port (a name or address agents reach a replica at)"),
                ));
            }
            if controllers.contains(&c) {
                return Err(err("controllers", format!("{c:?} is listed twice")));
            }
            controllers.push(c);
        }
        if controllers.len() > 1 && matches!(store, StoreUrl::Embedded(_)) {
            return Err(err(
                "controllers",
                "several replicas need a store they share (store = \"etcds://...\"); with \
                 the embedded store each would have its own, and an agent that moved to \
                 another would be refused as unknown"
                    .into(),
            ));
        }
        let metrics_addr = raw
            .metrics_addr
            .map(|m| {
                m.parse()
                    .map_err(|_| err("metrics_addr", format!("{m:?} is not ip:port")))
            })
            .transpose()?;
        let rest_addr = raw
            .rest_addr
            .map(|m| {
                m.parse::<SocketAddr>()
                    .map_err(|_| err("rest_addr", format!("{m:?} is not ip:port")))
            })
            .transpose()?;
        if rest_addr.is_some() && rest_addr == metrics_addr {
            return Err(err(
                "rest_addr",
                "is metrics_addr too; give each its own port".into(),
            ));
        }
        let mut notifications = Notifications::default();
        if let Some(q) = raw.notifications.queue {
            if !(1..=100_000).contains(&q) {
                return Err(err(
                    "notifications.queue",
                    "1 to 100000 events per subscriber".into(),
                ));
            }
            notifications.queue = q;
        }
        if let Some(b) = raw.notifications.max_backoff_secs {
            if !(1..=300).contains(&b) {
                return Err(err(
                    "notifications.max_backoff_secs",
                    "1 to 300 seconds".into(),
                ));
            }
            notifications.max_backoff = std::time::Duration::from_secs(b);
        }
        notifications.ca = raw.notifications.ca.map(|c| base.join(c));
        let (net, prefix) = raw.tenant.overlay.split_once('/').ok_or_else(|| {
            err(
                "tenant.overlay",
                "expected an IPv4 network such as 10.77.0.0/16".into(),
            )
        })?;
        let overlay_net: Ipv4Addr = net
            .parse()
            .map_err(|_| err("tenant.overlay", format!("{net:?} is not an IPv4 address")))?;
        let overlay_prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| err("tenant.overlay", "the prefix length must be 8 to 30".into()))?;
        let mask = u32::MAX << (32 - u32::from(overlay_prefix));
        if u32::from(overlay_net) & !mask != 0 {
            return Err(err(
                "tenant.overlay",
                format!("{net} has host bits set for /{overlay_prefix}"),
            ));
        }
        asmn_shared::chain::ChainSpec::new(
            asmn_shared::ids::InstanceKey::from_bytes([0; 32]),
            0,
            raw.tenant.chain_length,
        )
        .map_err(|e| err("tenant.chain_length", e.to_string()))?;
        let dh_group: Group =
            raw.tenant
                .dh_group
                .parse()
                .map_err(|e: asmn_shared::dh::UnsupportedGroup| {
                    err("tenant.dh_group", e.to_string())
                })?;
        if !(1..=86_400).contains(&raw.tenant.reattest_interval_secs) {
            return Err(err(
                "tenant.reattest_interval_secs",
                "must be 1 to 86400 seconds".into(),
            ));
        }
        let limits = limits(&raw.limits).map_err(|(f, r)| err(&format!("limits.{f}"), r))?;
        Ok(Config {
            limits,
            listen,
            server_name: raw.server_name,
            store,
            metrics_addr,
            rest_addr,
            notifications,
            controllers,
            ca: base.join(raw.tls.ca),
            cert: base.join(raw.tls.cert),
            key: base.join(raw.tls.key),
            audit_key: base.join(raw.audit_key),
            overlay_net,
            overlay_prefix,
            chain_length: raw.tenant.chain_length,
            dh_group,
            reattest_interval_secs: raw.tenant.reattest_interval_secs,
        })
    }
}

fn limits(raw: &RawLimits) -> Result<Limits, (&'static str, String)> {
    fn within<T: PartialOrd + Copy + std::fmt::Display>(
        field: &'static str,
        v: Option<T>,
        default: T,
        lo: T,
        hi: T,
    ) -> Result<T, (&'static str, String)> {
        let v = v.unwrap_or(default);
        if v < lo || v > hi {
            return Err((field, format!("{v} is outside {lo} to {hi}")));
        }
        Ok(v)
    }
    let d = Limits::default();
    let secs = std::time::Duration::from_secs;
    let max_connections = within(
        "max_connections",
        raw.max_connections,
        d.max_connections,
        1,
        1 << 20,
    )?;
    let out = Limits {
        max_connections,
        max_connections_per_source: within(
            "max_connections_per_source",
            raw.max_connections_per_source,
            d.max_connections_per_source.min(max_connections),
            1,
            max_connections,
        )?,
        connections_per_source_per_sec: within(
            "connections_per_source_per_sec",
            raw.connections_per_source_per_sec,
            d.connections_per_source_per_sec,
            1,
            1_000_000,
        )?,
        retry_above: within(
            "retry_above",
            raw.retry_above,
            d.retry_above.min(max_connections),
            0,
            max_connections,
        )?,
        enroll_deadline: secs(within(
            "enroll_deadline_secs",
            raw.enroll_deadline_secs,
            d.enroll_deadline.as_secs(),
            1,
            300,
        )?),
        request_deadline: secs(within(
            "request_deadline_secs",
            raw.request_deadline_secs,
            d.request_deadline.as_secs(),
            1,
            300,
        )?),
        verify_peer_per_sec: within(
            "verify_peer_per_sec",
            raw.verify_peer_per_sec,
            d.verify_peer_per_sec,
            1,
            100_000,
        )?,
        stranger_requests_per_source_per_sec: within(
            "stranger_requests_per_source_per_sec",
            raw.stranger_requests_per_source_per_sec,
            d.stranger_requests_per_source_per_sec,
            1,
            1_000_000,
        )?,
        audit_refusals_per_min: within(
            "audit_refusals_per_min",
            raw.audit_refusals_per_min,
            d.audit_refusals_per_min,
            1,
            60_000,
        )?,
        transport: asmn_channel::tls::ServerLimits {
            initial_streams: within(
                "unauthenticated_streams",
                raw.unauthenticated_streams,
                d.transport.initial_streams,
                1,
                16,
            )?,
            open_streams: d.transport.open_streams,
            idle_timeout: secs(within(
                "idle_timeout_secs",
                raw.idle_timeout_secs,
                d.transport.idle_timeout.as_secs(),
                5,
                3_600,
            )?),
        },
    };
    Ok(out)
}

/// The configuration `sec-em init` writes.
pub fn initial(
    listen: SocketAddr,
    server_name: &str,
    state_file: &str,
    metrics_addr: SocketAddr,
) -> String {
    format!(
        r#"# Sec-EM configuration, written by `sec-em init`. Paths are relative to this file.
listen = "{listen}"
server_name = "{server_name}"
# embedded:PATH (one crash-safe file) or etcds://host:port[,host:port...] (replicas on
# an etcd cluster over TLS; then [etcd] ca, cert and key, and optionally user and
# password_file).
store = "embedded:{state_file}"
# Prometheus metrics over HTTP; remove to disable.
metrics_addr = "{metrics_addr}"
# The REST API for orchestrators (HTTPS; the same admin client certificates as asmnctl;
# docs/openapi.json). Unset: no REST listener.
# rest_addr = "0.0.0.0:7444"
# Replicas: list every one (host:port, the same list in each replica's file) and bundles
# carry it, so agents move to another replica when theirs goes down. Unset: this one.
# controllers = ["sec-em-1.example:7443", "sec-em-2.example:7443", "sec-em-3.example:7443"]
# Authenticates the audit log's records (an HMAC key the store never holds). Keep a
# copy: without it the log cannot be verified. Replicas sharing a store share it.
audit_key = "audit.key"

[tls]
ca = "ca.pem"
cert = "server.pem"
key = "server.key"

[tenant]
# Overlay addresses of the tenant's VNFs are handed out from this network.
overlay = "10.77.0.0/16"
# Reveals per chain before renewal; D-H group (ffdhe3072, ffdhe4096, ffdhe6144, ffdhe8192).
chain_length = 100000
dh_group = "ffdhe3072"
reattest_interval_secs = 30

# What peers may make Sec-EM hold. Anyone who reaches the port can open connections
# (agents enroll without a certificate), so every one is bounded. The defaults:
[limits]
max_connections = 16384
max_connections_per_source = 256
# New connections a second from one address (counted once it is proved; a VM connects
# once, and again after an outage).
connections_per_source_per_sec = 5
# Above this many connections, new ones must prove their address first (QUIC Retry).
retry_above = 1024
# A connection without the admin certificate must enroll within this; it may hold
# unauthenticated_streams requests at once until it does.
enroll_deadline_secs = 20
unauthenticated_streams = 2
request_deadline_secs = 10
idle_timeout_secs = 60
verify_peer_per_sec = 100
# Requests served per second to connections not enrolled yet, per source address (the
# rest wait their turn): a VM enrolls once; only someone trying identities asks more.
stranger_requests_per_source_per_sec = 50
# Refusals about one known instance written to the audit log per minute and kind (the
# rest are counted, and the count goes into the next record).
audit_refusals_per_min = 6
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initial_config_is_valid() {
        let text = initial(
            "0.0.0.0:7443".parse().expect("addr"),
            "sec-em",
            "sec-em.redb",
            "127.0.0.1:9464".parse().expect("m"),
        );
        let c = Config::parse("sec-em.toml", &text, Path::new("/etc/asmn")).expect("valid");
        assert_eq!(
            c.store,
            StoreUrl::Embedded(PathBuf::from("/etc/asmn/sec-em.redb"))
        );
        assert_eq!((c.overlay_prefix, c.chain_length), (16, 100_000));
        assert_eq!(c.key, PathBuf::from("/etc/asmn/server.key"));
        assert_eq!(
            c.limits,
            Limits::default(),
            "the file spells out the defaults"
        );
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let good = initial(
            "0.0.0.0:7443".parse().expect("addr"),
            "sec-em",
            "s.redb",
            "127.0.0.1:9464".parse().expect("m"),
        );
        let cases = [
            (
                "listen = \"0.0.0.0:7443\"",
                "listen = \"nowhere\"",
                "listen",
            ),
            (
                "store = \"embedded:s.redb\"",
                "store = \"mysql://x\"",
                "store",
            ),
            (
                "store = \"embedded:s.redb\"",
                "store = \"etcd://\"",
                "store",
            ),
            (
                "store = \"embedded:s.redb\"",
                "store = \"etcd://127.0.0.1:2379\"",
                "store",
            ),
            (
                "store = \"embedded:s.redb\"",
                "store = \"etcds://127.0.0.1:2379\"",
                "etcd",
            ),
            (
                "overlay = \"10.77.0.0/16\"",
                "overlay = \"10.77.0.1/16\"",
                "tenant.overlay",
            ),
            (
                "overlay = \"10.77.0.0/16\"",
                "overlay = \"10.77.0.0/31\"",
                "tenant.overlay",
            ),
            (
                "dh_group = \"ffdhe3072\"",
                "dh_group = \"ffdhe2048\"",
                "tenant.dh_group",
            ),
            (
                "chain_length = 100000",
                "chain_length = 1",
                "tenant.chain_length",
            ),
            (
                "reattest_interval_secs = 30",
                "reattest_interval_secs = 0",
                "tenant.reattest_interval_secs",
            ),
            ("[tls]", "[tlz]", "syntax"),
            (
                "# controllers = [",
                "controllers = [\"a:7443\", \"a:7443\"]\n# [",
                "controllers",
            ),
            (
                "# controllers = [",
                "controllers = [\"no-port\"]\n# [",
                "controllers",
            ),
            (
                "# controllers = [",
                "controllers = [\"a:7443\", \"b:7443\"]\n# [",
                "controllers",
            ),
            (
                "max_connections_per_source = 256",
                "max_connections_per_source = 0",
                "limits.max_connections_per_source",
            ),
            (
                "unauthenticated_streams = 2",
                "unauthenticated_streams = 100",
                "limits.unauthenticated_streams",
            ),
            (
                "request_deadline_secs = 10",
                "request_deadline_secs = 0",
                "limits.request_deadline_secs",
            ),
        ];
        for (from, to, field) in cases {
            let text = good.replace(from, to);
            assert_ne!(text, good, "{from}");
            let e = Config::parse("sec-em.toml", &text, Path::new("."))
                .expect_err(to)
                .to_string();
            assert!(e.starts_with(&format!("sec-em.toml: {field}")), "{e}");
        }
    }
}
