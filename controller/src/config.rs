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
    /// An etcd cluster (`etcd://host:port,...`).
    Etcd(String),
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
    /// CA certificate (PEM file).
    pub ca: PathBuf,
    /// Server certificate (PEM file).
    pub cert: PathBuf,
    /// Server key (PEM file, mode 0600).
    pub key: PathBuf,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    listen: String,
    server_name: String,
    store: String,
    #[serde(default)]
    metrics_addr: Option<String>,
    tls: RawTls,
    tenant: RawTenant,
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
        } else if raw.store.starts_with("etcd://") {
            crate::store::etcd::parse_url(&raw.store).map_err(|e| err("store", e.to_string()))?;
            StoreUrl::Etcd(raw.store.clone())
        } else {
            return Err(err(
                "store",
                format!(
                    "{:?}: use embedded:PATH or etcd://host:port[,host:port...]",
                    raw.store
                ),
            ));
        };
        let metrics_addr = raw
            .metrics_addr
            .map(|m| {
                m.parse()
                    .map_err(|_| err("metrics_addr", format!("{m:?} is not ip:port")))
            })
            .transpose()?;
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
        Ok(Config {
            listen,
            server_name: raw.server_name,
            store,
            metrics_addr,
            ca: base.join(raw.tls.ca),
            cert: base.join(raw.tls.cert),
            key: base.join(raw.tls.key),
            overlay_net,
            overlay_prefix,
            chain_length: raw.tenant.chain_length,
            dh_group,
            reattest_interval_secs: raw.tenant.reattest_interval_secs,
        })
    }
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
# embedded:PATH (one crash-safe file) or etcd://host:port[,host:port...] (replicas).
store = "embedded:{state_file}"
# Prometheus metrics over HTTP; remove to disable.
metrics_addr = "{metrics_addr}"

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
