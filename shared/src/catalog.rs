//! The VNFD file and its Sec-catalog.
//!
//! A Sec-catalog is the paper's per-VNF whitelist with policing: each rule names a
//! protocol, optionally a destination port or range and the source VNFs it admits, and
//! an ingress policing rate and burst exactly as Open vSwitch defines them
//! (`ingress_policing_rate` in kbit/s, 0 = unlimited; `ingress_policing_burst` in kbit,
//! 0 = OVS's default of 8000 kbit). Traffic no rule matches gets the default action:
//! `drop`, or a low policing rate (the paper's lowered service level).
//!
//! ```yaml
//! vnfd:
//!   id: web
//!   name: Web server
//!   version: "1.0"
//!   sec_catalog:
//!     version: 1
//!     default_action: drop          # or: { police: { ingress_policing_rate: 64 } }
//!     rules:
//!       - name: http
//!         protocol: tcp
//!         port: 80                  # or "8000-8080"
//!         sources: [client]         # omitted: any VNF of the tenant
//!         ingress_policing_rate: 10000
//!         ingress_policing_burst: 1000
//! ```
//!
//! Parsing is bounded: files over 1 MiB, nesting deeper than 64 and alias expansion
//! beyond a small budget are refused before they cost anything. Every error names the
//! file, the field and the reason.

use std::collections::BTreeSet;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{InvalidName, VnfId};
use crate::units::{Kbit, KbitPerSec};

/// Largest VNFD or catalog file accepted.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Most rules in one catalog.
pub const MAX_RULES: usize = 1024;
/// Most source VNFs named by one rule.
pub const MAX_SOURCES: usize = 256;
/// Highest policing rate accepted: 400 Gbit/s.
pub const MAX_RATE: KbitPerSec = KbitPerSec(400_000_000);
/// Largest burst accepted: 4 Gbit.
pub const MAX_BURST: Kbit = Kbit(4_000_000);

/// A protocol a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP for IPv4 and ICMPv6 for IPv6.
    Icmp,
    /// Any IP protocol.
    Any,
}

impl Protocol {
    /// Whether a rule on this protocol may name ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }

    /// The name used in files.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::Any => "any",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            "any" => Ok(Protocol::Any),
            other => Err(format!(
                "unknown protocol {other:?}: expected tcp, udp, icmp or any"
            )),
        }
    }
}

/// An inclusive destination port range (a single port has `lo == hi`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl PortRange {
    /// A checked range: `1 <= lo <= hi`.
    pub fn new(lo: u16, hi: u16) -> Result<Self, String> {
        if lo == 0 {
            return Err("port 0 is not a destination port".into());
        }
        if lo > hi {
            return Err(format!("port range {lo}-{hi} is empty (first > last)"));
        }
        Ok(Self { lo, hi })
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<u16>()
                .map_err(|_| format!("{t:?} is not a port number (1-65535)"))
        };
        match s.split_once('-') {
            Some((a, b)) => PortRange::new(num(a)?, num(b)?),
            None => {
                let p = num(s)?;
                PortRange::new(p, p)
            }
        }
    }
}

/// Ingress policing: rate and burst in OVS's units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Police {
    /// `ingress_policing_rate` (kbit/s; 0 = unlimited).
    pub rate: KbitPerSec,
    /// `ingress_policing_burst` (kbit; 0 = the OVS default, 8000 kbit).
    pub burst: Kbit,
}

impl Police {
    /// No limit.
    pub const UNLIMITED: Police = Police {
        rate: KbitPerSec(0),
        burst: Kbit(0),
    };

    /// The burst in force (OVS's default substituted for 0).
    pub fn effective_burst(&self) -> Kbit {
        self.burst.or_ovs_default()
    }
}

/// What happens to traffic that no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Drop it (a whitelist).
    Drop,
    /// Pass it at a low rate: the paper's lowered service level. The rate is never 0.
    Police(Police),
}

/// One whitelist rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Unique within the catalog; names its counters.
    pub name: String,
    /// The protocol.
    pub protocol: Protocol,
    /// The destination ports (TCP and UDP only); `None` = any port.
    pub ports: Option<PortRange>,
    /// The source VNFs admitted; `None` = any VNF of the tenant.
    pub sources: Option<BTreeSet<VnfId>>,
    /// Policing of what the rule admits, per source VNF.
    pub police: Police,
}

/// The validated Sec-catalog of one VNF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecCatalog {
    /// The VNF it protects.
    pub vnf: VnfId,
    /// Version, increasing with each change (the controller assigns it on apply).
    pub version: u64,
    /// The gateway VNF in front of this VNF, if it is reachable only through one.
    pub gateway: Option<VnfId>,
    /// The action for traffic no rule matches.
    pub default_action: DefaultAction,
    /// The rules, matched in order; the first match decides.
    pub rules: Vec<Rule>,
}

impl SecCatalog {
    /// The catalog that admits nothing: what an agent enforces before it has one.
    pub fn deny_all(vnf: VnfId) -> Self {
        Self {
            vnf,
            version: 0,
            gateway: None,
            default_action: DefaultAction::Drop,
            rules: Vec::new(),
        }
    }

    /// Checks the invariants that the file parser guarantees, for catalogs built in code
    /// or decoded from the wire.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.rules.len() > MAX_RULES {
            return Err((
                "rules".into(),
                format!(
                    "{} rules; at most {MAX_RULES} are allowed",
                    self.rules.len()
                ),
            ));
        }
        if let DefaultAction::Police(p) = self.default_action {
            check_police(&p).map_err(|r| ("default_action.police".to_string(), r))?;
            if p.rate.is_unlimited() {
                return Err((
                    "default_action.police.ingress_policing_rate".into(),
                    "the lowered service level needs a rate above 0 (0 would admit everything); use `drop` or a rule".into(),
                ));
            }
        }
        let mut names = BTreeSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            let f = |x: &str| format!("rules[{i}].{x}");
            if r.name.is_empty() || r.name.len() > 64 {
                return Err((f("name"), "must be 1 to 64 characters".into()));
            }
            if !names.insert(r.name.as_str()) {
                return Err((f("name"), format!("duplicate rule name {:?}", r.name)));
            }
            if r.ports.is_some() && !r.protocol.has_ports() {
                return Err((
                    f("port"),
                    format!("protocol {} has no ports", r.protocol.name()),
                ));
            }
            if let Some(p) = r.ports {
                PortRange::new(p.lo, p.hi).map_err(|e| (f("port"), e))?;
            }
            if let Some(s) = &r.sources {
                if s.is_empty() {
                    return Err((
                        f("sources"),
                        "an empty list admits nobody; omit the field to admit any VNF".into(),
                    ));
                }
                if s.len() > MAX_SOURCES {
                    return Err((
                        f("sources"),
                        format!("at most {MAX_SOURCES} source VNFs per rule"),
                    ));
                }
            }
            check_police(&r.police).map_err(|e| (f("ingress_policing"), e))?;
        }
        Ok(())
    }
}

fn check_police(p: &Police) -> Result<(), String> {
    if p.rate > MAX_RATE {
        return Err(format!(
            "ingress_policing_rate {} kbit/s is above the maximum of {} kbit/s",
            p.rate.0, MAX_RATE.0
        ));
    }
    if p.burst > MAX_BURST {
        return Err(format!(
            "ingress_policing_burst {} kbit is above the maximum of {} kbit",
            p.burst.0, MAX_BURST.0
        ));
    }
    Ok(())
}

/// A validated VNFD.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vnfd {
    /// The VNF's identifier.
    pub vnf: VnfId,
    /// Human-readable name.
    pub name: String,
    /// The descriptor's version string.
    pub version: String,
    /// The VNF's Sec-catalog.
    pub catalog: SecCatalog,
    /// How re-attestation treats a changed measurement.
    #[serde(default)]
    pub attestation: AttestationMode,
}

/// How Sec-EM treats a re-measured target that differs from the last one (DESIGN.md §3.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttestationMode {
    /// The target must keep its golden digest; a change revokes the instance.
    #[default]
    Strict,
    /// The target may change (the paper's eq. 3): a change starts a new chain epoch whose
    /// anchor the agent sends sealed under the element it reveals.
    Continuity,
}

impl fmt::Display for AttestationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Strict => "strict",
            Self::Continuity => "continuity",
        })
    }
}

/// Why a file was refused. Every variant names the file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CatalogError {
    /// Larger than [`MAX_FILE_BYTES`].
    #[error(
        "{file}: {size} bytes is too large; a VNFD or catalog file may have at most {MAX_FILE_BYTES} bytes"
    )]
    TooLarge {
        /// The file.
        file: String,
        /// Its size.
        size: usize,
    },
    /// Not UTF-8.
    #[error("{file}: not UTF-8 text (byte {offset})")]
    NotText {
        /// The file.
        file: String,
        /// Offset of the first bad byte.
        offset: usize,
    },
    /// Not YAML of the expected shape, or over the parse budget (depth, aliases, nodes).
    #[error("{file}: {reason}")]
    Syntax {
        /// The file.
        file: String,
        /// The parser's message, with the line and column.
        reason: String,
    },
    /// A field has a value the catalog cannot hold.
    #[error("{file}: field `{field}`: {reason}")]
    Field {
        /// The file.
        file: String,
        /// The field's path, such as `vnfd.sec_catalog.rules[2].port`.
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

// ---- The file format (serde) -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VnfdFile {
    vnfd: VnfdRaw,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VnfdRaw {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    description: Option<String>,
    /// `strict` (default) or `continuity`.
    #[serde(default)]
    attestation: Option<AttestationMode>,
    sec_catalog: CatalogRaw,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    vnf: String,
    sec_catalog: CatalogRaw,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogRaw {
    #[serde(default)]
    version: Option<u64>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    default_action: Option<DefaultRaw>,
    /// `rules:` with nothing under it means no rules.
    #[serde(default)]
    rules: Option<Vec<RuleRaw>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
enum DefaultRaw {
    Drop,
    Police(PoliceRaw),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoliceRaw {
    ingress_policing_rate: u64,
    #[serde(default)]
    ingress_policing_burst: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleRaw {
    #[serde(default)]
    name: Option<String>,
    protocol: String,
    #[serde(default, deserialize_with = "port_field")]
    port: Option<String>,
    #[serde(default)]
    sources: Option<Vec<String>>,
    #[serde(default)]
    ingress_policing_rate: u64,
    #[serde(default)]
    ingress_policing_burst: u64,
}

/// Accepts `port: 80` and `port: "8000-8080"`.
fn port_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct PortVisitor;
    impl Visitor<'_> for PortVisitor {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port number or a range such as \"8000-8080\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
    }
    d.deserialize_any(PortVisitor)
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            max_nodes: 100_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_documents: 1,
            max_total_scalar_bytes: MAX_FILE_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
            max_replay_stack_depth: 16,
            max_alias_expansions_per_anchor: 1_000,
        },
    }
}

fn parse_yaml<T: de::DeserializeOwned>(file: &str, bytes: &[u8]) -> Result<T, CatalogError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(CatalogError::TooLarge {
            file: file.to_string(),
            size: bytes.len(),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| CatalogError::NotText {
        file: file.to_string(),
        offset: e.valid_up_to(),
    })?;
    serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| {
        // The parser's message can quote the input; keep it to a readable length.
        let mut reason = e.to_string();
        if reason.len() > 600 {
            let cut = (0..=600)
                .rev()
                .find(|&i| reason.is_char_boundary(i))
                .unwrap_or(0);
            reason.truncate(cut);
            reason.push_str("...");
        }
        CatalogError::Syntax {
            file: file.to_string(),
            reason,
        }
    })
}

/// Parses a YAML file under the same budgets into a generic value (for the SOL001
/// reader, whose TOSCA documents have many shapes).
pub(crate) fn parse_yaml_value(
    file: &str,
    bytes: &[u8],
) -> Result<serde_json::Value, CatalogError> {
    parse_yaml(file, bytes)
}

/// Parses a VNFD file (`vnfd:` at the top, with its `sec_catalog`).
pub fn parse_vnfd(file: &str, bytes: &[u8]) -> Result<Vnfd, CatalogError> {
    let raw: VnfdFile = parse_yaml(file, bytes)?;
    let err = |field: &str, reason: String| CatalogError::Field {
        file: file.to_string(),
        field: format!("vnfd.{field}"),
        reason,
    };
    let vnf = VnfId::new(raw.vnfd.id).map_err(|e| err("id", e.to_string()))?;
    let _ = raw.vnfd.description;
    let catalog = build_catalog(vnf.clone(), raw.vnfd.sec_catalog)
        .map_err(|(f, r)| err(&format!("sec_catalog.{f}"), r))?;
    Ok(Vnfd {
        name: raw.vnfd.name.unwrap_or_else(|| vnf.to_string()),
        version: raw.vnfd.version.unwrap_or_else(|| "0".into()),
        vnf,
        catalog,
        attestation: raw.vnfd.attestation.unwrap_or_default(),
    })
}

/// Parses a catalog file for `asmnctl catalog apply`: either a whole VNFD, or
/// `vnf: NAME` with a `sec_catalog:` section.
pub fn parse_catalog(file: &str, bytes: &[u8]) -> Result<SecCatalog, CatalogError> {
    if looks_like_vnfd(bytes) {
        return parse_vnfd(file, bytes).map(|v| v.catalog);
    }
    let raw: CatalogFile = parse_yaml(file, bytes)?;
    let err = |field: String, reason: String| CatalogError::Field {
        file: file.to_string(),
        field,
        reason,
    };
    let vnf = VnfId::new(raw.vnf).map_err(|e| err("vnf".into(), e.to_string()))?;
    build_catalog(vnf, raw.sec_catalog).map_err(|(f, r)| err(format!("sec_catalog.{f}"), r))
}

fn looks_like_vnfd(bytes: &[u8]) -> bool {
    bytes
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .any(|l| l.starts_with(b"vnfd:"))
}

fn build_catalog(vnf: VnfId, raw: CatalogRaw) -> Result<SecCatalog, (String, String)> {
    let raw_rules = raw.rules.unwrap_or_default();
    if raw_rules.len() > MAX_RULES {
        return Err((
            "rules".into(),
            format!("{} rules; at most {MAX_RULES} are allowed", raw_rules.len()),
        ));
    }
    let gateway = raw
        .gateway
        .map(VnfId::new)
        .transpose()
        .map_err(|e: InvalidName| ("gateway".to_string(), e.to_string()))?;
    if gateway.as_ref() == Some(&vnf) {
        return Err(("gateway".into(), "a VNF cannot be its own gateway".into()));
    }
    let default_action = match raw.default_action {
        None | Some(DefaultRaw::Drop) => DefaultAction::Drop,
        Some(DefaultRaw::Police(p)) => DefaultAction::Police(Police {
            rate: KbitPerSec(p.ingress_policing_rate),
            burst: Kbit(p.ingress_policing_burst),
        }),
    };
    let mut rules = Vec::with_capacity(raw_rules.len());
    for (i, r) in raw_rules.into_iter().enumerate() {
        let f = |x: &str| format!("rules[{i}].{x}");
        let protocol: Protocol = r.protocol.parse().map_err(|e| (f("protocol"), e))?;
        let ports = r
            .port
            .map(|p| p.parse::<PortRange>())
            .transpose()
            .map_err(|e| (f("port"), e))?;
        let sources = match r.sources {
            None => None,
            Some(list) => {
                let mut set = BTreeSet::new();
                for (j, s) in list.into_iter().enumerate() {
                    let v =
                        VnfId::new(s).map_err(|e| (f(&format!("sources[{j}]")), e.to_string()))?;
                    set.insert(v);
                }
                Some(set)
            }
        };
        rules.push(Rule {
            name: r.name.unwrap_or_else(|| format!("rule-{i}")),
            protocol,
            ports,
            sources,
            police: Police {
                rate: KbitPerSec(r.ingress_policing_rate),
                burst: Kbit(r.ingress_policing_burst),
            },
        });
    }
    let catalog = SecCatalog {
        vnf,
        version: raw.version.unwrap_or(1),
        gateway,
        default_action,
        rules,
    };
    catalog.validate()?;
    Ok(catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../images/examples/web-server.vnfd.yaml");

    #[test]
    fn the_committed_example_parses() {
        let v = parse_vnfd("web-server.vnfd.yaml", EXAMPLE.as_bytes()).expect("example");
        assert_eq!(v.vnf.as_str(), "web-server");
        assert!(!v.catalog.rules.is_empty());
        assert!(
            v.catalog
                .rules
                .iter()
                .any(|r| r.ports == Some(PortRange { lo: 80, hi: 80 }))
        );
    }

    fn vnfd(catalog: &str) -> String {
        format!("vnfd:\n  id: web\n  sec_catalog:\n{catalog}")
    }

    #[test]
    fn ovs_units_and_defaults() {
        let text = vnfd(
            "    rules:\n      - protocol: tcp\n        port: \"8000-8080\"\n        ingress_policing_rate: 10000\n      - protocol: icmp\n",
        );
        let v = parse_vnfd("f.yaml", text.as_bytes()).expect("parse");
        let r = &v.catalog.rules[0];
        assert_eq!(r.ports, Some(PortRange { lo: 8000, hi: 8080 }));
        assert_eq!(r.police.rate.bytes_per_sec(), 1_250_000);
        assert_eq!(r.police.effective_burst(), Kbit(8000));
        assert!(v.catalog.rules[1].police.rate.is_unlimited());
        assert_eq!(v.catalog.default_action, DefaultAction::Drop);
        assert_eq!(v.catalog.rules[1].name, "rule-1");
    }

    #[test]
    fn lowered_service_default() {
        let text = vnfd(
            "    default_action:\n      police:\n        ingress_policing_rate: 64\n        ingress_policing_burst: 16\n",
        );
        let v = parse_vnfd("f.yaml", text.as_bytes()).expect("parse");
        assert_eq!(
            v.catalog.default_action,
            DefaultAction::Police(Police {
                rate: KbitPerSec(64),
                burst: Kbit(16)
            })
        );
        let zero = vnfd("    default_action:\n      police:\n        ingress_policing_rate: 0\n");
        let e = parse_vnfd("f.yaml", zero.as_bytes()).expect_err("rate 0 default");
        assert!(
            e.to_string()
                .contains("default_action.police.ingress_policing_rate"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_field_and_reason() {
        let cases = [
            (
                "    rules:\n      - protocol: sctp\n",
                "rules[0].protocol",
                "sctp",
            ),
            (
                "    rules:\n      - protocol: icmp\n        port: 7\n",
                "rules[0].port",
                "no ports",
            ),
            (
                "    rules:\n      - protocol: tcp\n        port: 0\n",
                "rules[0].port",
                "port 0",
            ),
            (
                "    rules:\n      - protocol: tcp\n        port: 70000\n",
                "rules[0].port",
                "70000",
            ),
            (
                "    rules:\n      - protocol: tcp\n        port: \"90-80\"\n",
                "rules[0].port",
                "empty",
            ),
            (
                "    rules:\n      - protocol: tcp\n        sources: []\n",
                "rules[0].sources",
                "admits nobody",
            ),
            (
                "    rules:\n      - protocol: tcp\n        sources: [\"bad name\"]\n",
                "rules[0].sources[0]",
                "letters",
            ),
            (
                "    rules:\n      - name: a\n        protocol: tcp\n      - name: a\n        protocol: udp\n",
                "rules[1].name",
                "duplicate",
            ),
            ("    gateway: web\n", "gateway", "own gateway"),
        ];
        for (catalog, field, reason) in cases {
            let e = parse_vnfd("bad.yaml", vnfd(catalog).as_bytes()).expect_err(catalog);
            let msg = e.to_string();
            assert!(msg.starts_with("bad.yaml: "), "{msg}");
            assert!(msg.contains(field), "{msg} should name {field}");
            assert!(msg.contains(reason), "{msg} should say {reason}");
        }
        let typo = vnfd("    rulez: []\n");
        let msg = parse_vnfd("typo.yaml", typo.as_bytes())
            .expect_err("typo")
            .to_string();
        assert!(msg.contains("typo.yaml") && msg.contains("rulez"), "{msg}");
    }

    #[test]
    fn standalone_catalog_files() {
        let text =
            "vnf: web\nsec_catalog:\n  version: 7\n  rules:\n    - protocol: udp\n      port: 53\n";
        let c = parse_catalog("c.yaml", text.as_bytes()).expect("catalog");
        assert_eq!((c.vnf.as_str(), c.version), ("web", 7));
        let c2 = parse_catalog("v.yaml", EXAMPLE.as_bytes()).expect("vnfd as catalog");
        assert_eq!(c2.vnf.as_str(), "web-server");
    }

    #[test]
    fn hostile_files_are_refused_quickly() {
        let t = std::time::Instant::now();
        let big = vec![b'#'; MAX_FILE_BYTES + 1];
        assert!(matches!(
            parse_vnfd("big.yaml", &big),
            Err(CatalogError::TooLarge { .. })
        ));
        let deep = format!("vnfd: {}{}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(
            parse_vnfd("deep.yaml", deep.as_bytes()),
            Err(CatalogError::Syntax { .. })
        ));
        let mut block_deep = String::from("vnfd:\n");
        for i in 0..100 {
            block_deep.push_str(&format!("{}k{i}:\n", "  ".repeat(i + 1)));
        }
        assert!(parse_vnfd("deep2.yaml", block_deep.as_bytes()).is_err());
        // Billion laughs: nine levels of ten aliases each.
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        bomb.push_str("vnfd:\n  id: web\n  sec_catalog:\n    rules: *a9\n");
        assert!(parse_vnfd("bomb.yaml", bomb.as_bytes()).is_err());
        assert!(parse_vnfd("bin.yaml", &[0xff, 0xfe, 0x00]).is_err());
        assert!(
            t.elapsed() < std::time::Duration::from_millis(1000),
            "hostile files took {:?}",
            t.elapsed()
        );
    }
}
