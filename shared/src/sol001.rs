//! ETSI NFV-SOL 001 VNFDs (TOSCA YAML): what ASMN needs from them, so that an
//! orchestrator's descriptor on-boards a VNF without an ASMN VNFD beside it.
//!
//! - **The image digest** from the one VDU with `sw_image_data`: its `checksum`
//!   (`algorithm`, `hash`) and `size`.
//! - **The whitelist** from the `tosca.policies.nfv.SecurityGroupRule` policies: one rule
//!   per policy (`protocol` tcp, udp or icmp; `port_range_min`..`port_range_max`), ingress
//!   only (ASMN polices what a VNF receives).
//! - **What SOL001 has no words for**, as `asmn.*` metadata (TOSCA's free-form
//!   `metadata`), documented with `images/examples/web-server.sol001.yaml`: on the VNF
//!   node `asmn.vnf_id` (default: `product_name` made a name), `asmn.gateway`,
//!   `asmn.default_action` (`drop`, or `police RATE BURST`), `asmn.attestation`; on a rule's
//!   policy `asmn.ingress_policing_rate` and `asmn.ingress_policing_burst` (kbit/s and
//!   kbit, as OVS; default 0, unlimited) and `asmn.sources` (VNF IDs, comma-separated).
//!
//! Everything else of the descriptor (flavours, scaling, virtual links) is left to the
//! orchestrator. What ASMN would have to guess is refused, naming the node or policy: an
//! egress or IPv6 rule, another protocol, a VDU image without a checksum, several images.
//! The same parse budgets as the ASMN VNFD apply.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::catalog::{
    CatalogError, DefaultAction, Police, PortRange, Protocol, Rule, SecCatalog, Vnfd,
    parse_yaml_value,
};
use crate::ids::VnfId;
use crate::units::{Kbit, KbitPerSec};

/// The policy type of a whitelist rule.
pub const SECURITY_GROUP_RULE: &str = "tosca.policies.nfv.SecurityGroupRule";

/// What a SOL001 VNFD gives ASMN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sol001 {
    /// The VNFD, as an ASMN VNFD would give it.
    pub vnfd: Vnfd,
    /// The VDU whose image Sec-EM attests.
    pub vdu: String,
    /// The checksum's algorithm, as SOL001 names it (`sha-256`, `sha-512`, ...).
    pub algorithm: String,
    /// The checksum.
    pub digest: Vec<u8>,
    /// The image's size in bytes, if `sw_image_data.size` says.
    pub size: Option<u64>,
}

fn field_err(file: &str, field: String, reason: impl Into<String>) -> CatalogError {
    CatalogError::Field {
        file: file.to_string(),
        field,
        reason: reason.into(),
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A TOSCA `scalar-unit.size` ("1 GB", "512 MiB", "1024 B") in bytes.
fn size_bytes(s: &str) -> Option<u64> {
    let (n, unit) = s.trim().split_once(' ').unwrap_or((s.trim(), "B"));
    let n: f64 = n.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "KiB" => 1024.0,
        "MB" => 1e6,
        "MiB" => 1024.0 * 1024.0,
        "GB" => 1e9,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TB" => 1e12,
        "TiB" => 1024f64.powi(4),
        _ => return None,
    };
    let b = n * mult;
    (0.0..1e18).contains(&b).then_some(b as u64)
}

fn meta<'a>(node: &'a Value, key: &str) -> Option<&'a Value> {
    node.get("metadata").and_then(|m| m.get(key))
}

fn meta_u64(node: &Value, key: &str) -> Result<u64, String> {
    match meta(node, key) {
        None => Ok(0),
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| format!("{key}: not a whole number")),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| format!("{key}: {s:?} is not a whole number")),
        Some(other) => Err(format!("{key}: {other} is not a whole number")),
    }
}

fn meta_text(node: &Value, key: &str) -> Result<Option<String>, String> {
    match meta(node, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(other) => Err(format!("{key}: {other} is not text")),
    }
}

/// A VNF ID from a product name: lower case, other characters as '-'.
fn id_from(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.trim_matches('-').to_string()
}

/// Whether `bytes` is a TOSCA document (a SOL001 VNFD) rather than an ASMN VNFD: a
/// `tosca_definitions_version` key at the top level.
pub fn looks_like_sol001(bytes: &[u8]) -> bool {
    bytes
        .split(|b| *b == b'\n')
        .any(|l| l.starts_with(b"tosca_definitions_version:"))
}

/// Parses a SOL001 VNFD (TOSCA YAML).
pub fn parse_sol001(file: &str, bytes: &[u8]) -> Result<Sol001, CatalogError> {
    let doc = parse_yaml_value(file, bytes)?;
    let err = |field: String, reason: String| field_err(file, field, reason);
    let version = text(&doc, "tosca_definitions_version").ok_or_else(|| {
        err(
            "tosca_definitions_version".into(),
            "missing: this is not a TOSCA (SOL001) descriptor".into(),
        )
    })?;
    if !version.starts_with("tosca_simple_yaml_1_") {
        return Err(err(
            "tosca_definitions_version".into(),
            format!("{version:?}: ASMN reads tosca_simple_yaml_1_x (SOL001 v2.5 to v4.x)"),
        ));
    }
    let topology = doc
        .get("topology_template")
        .ok_or_else(|| err("topology_template".into(), "missing".into()))?;
    let nodes = topology
        .get("node_templates")
        .and_then(Value::as_object)
        .ok_or_else(|| err("topology_template.node_templates".into(), "missing".into()))?;

    // The VNF node and the measured VDU.
    let mut vnf_node = None;
    let mut vdus = Vec::new();
    for (name, node) in nodes {
        let ty = text(node, "type").ok_or_else(|| {
            err(
                format!("node_templates.{name}.type"),
                "missing: every node template needs a type".into(),
            )
        })?;
        // The VNF node: SOL001's type, or a provider's type derived from it (which
        // carries the VNF's descriptor_id).
        let is_vnf = ty == "tosca.nodes.nfv.VNF"
            || (ty.ends_with(".VNF")
                && node
                    .get("properties")
                    .and_then(|p| p.get("descriptor_id"))
                    .is_some());
        if is_vnf && vnf_node.replace((name, node)).is_some() {
            return Err(err(
                format!("node_templates.{name}"),
                "a second VNF node: one VNFD describes one VNF".into(),
            ));
        }
        if let Some(image) = node.get("properties").and_then(|p| p.get("sw_image_data")) {
            vdus.push((name, image));
        }
    }
    let (vnf_name, vnf) = vnf_node.ok_or_else(|| {
        err(
            "node_templates".into(),
            "no node of type tosca.nodes.nfv.VNF".into(),
        )
    })?;
    let (vdu, image) = match vdus.as_slice() {
        [one] => *one,
        [] => {
            return Err(err(
                "node_templates".into(),
                "no VDU with sw_image_data: ASMN attests a VNF by its image's digest".into(),
            ));
        }
        many => {
            let names: Vec<&str> = many.iter().map(|(n, _)| n.as_str()).collect();
            return Err(err(
                "node_templates".into(),
                format!(
                    "several VDUs with images ({}): ASMN attests one image per VNF; describe each as its own VNF",
                    names.join(", ")
                ),
            ));
        }
    };
    let at = |k: &str| format!("node_templates.{vdu}.properties.sw_image_data.{k}");
    let checksum = image.get("checksum").ok_or_else(|| {
        err(
            at("checksum"),
            "missing: the image's digest is what ASMN attests".into(),
        )
    })?;
    let algorithm = text(checksum, "algorithm")
        .ok_or_else(|| err(at("checksum.algorithm"), "missing".into()))?
        .to_ascii_lowercase();
    let hash = text(checksum, "hash").ok_or_else(|| err(at("checksum.hash"), "missing".into()))?;
    let want = match algorithm.as_str() {
        "sha-256" | "sha256" => 32,
        "sha-512" | "sha512" => 64,
        "sha-224" | "sha-384" | "md5" | "sha-1" | "sha1" => 0,
        other => {
            return Err(err(
                at("checksum.algorithm"),
                format!("{other:?} is not a digest ASMN knows"),
            ));
        }
    };
    let digest =
        hex::decode(hash.trim()).map_err(|_| err(at("checksum.hash"), "not hexadecimal".into()))?;
    if want != 0 && digest.len() != want {
        return Err(err(
            at("checksum.hash"),
            format!("{} bytes; {algorithm} has {want}", digest.len()),
        ));
    }
    let size = match image.get("size") {
        None => None,
        Some(Value::String(s)) => {
            Some(size_bytes(s).ok_or_else(|| err(at("size"), format!("{s:?} is not a size")))?)
        }
        Some(Value::Number(n)) => n.as_u64(),
        Some(other) => return Err(err(at("size"), format!("{other} is not a size"))),
    };

    // The VNF's identity and catalog-wide settings.
    let vnf_at = |k: &str| format!("node_templates.{vnf_name}.{k}");
    let props = vnf.get("properties").cloned().unwrap_or(Value::Null);
    let product = text(&props, "product_name").unwrap_or(vnf_name);
    let id_text = meta_text(vnf, "asmn.vnf_id")
        .map_err(|e| err(vnf_at("metadata"), e))?
        .unwrap_or_else(|| id_from(product));
    let vnf_id = VnfId::new(id_text.clone())
        .map_err(|e| err(vnf_at("metadata.asmn.vnf_id"), format!("{id_text:?}: {e}")))?;
    let gateway = meta_text(vnf, "asmn.gateway")
        .map_err(|e| err(vnf_at("metadata"), e))?
        .map(|g| {
            VnfId::new(g.clone())
                .map_err(|e| err(vnf_at("metadata.asmn.gateway"), format!("{g:?}: {e}")))
        })
        .transpose()?;
    let default_action = match meta_text(vnf, "asmn.default_action")
        .map_err(|e| err(vnf_at("metadata"), e))?
        .as_deref()
    {
        None | Some("drop") => DefaultAction::Drop,
        Some(p) => {
            let parts: Vec<&str> = p.split_whitespace().collect();
            match parts.as_slice() {
                ["police", rate, burst] => DefaultAction::Police(Police {
                    rate: KbitPerSec(rate.parse().map_err(|_| {
                        err(
                            vnf_at("metadata.asmn.default_action"),
                            format!("{rate:?} is not a rate"),
                        )
                    })?),
                    burst: Kbit(burst.parse().map_err(|_| {
                        err(
                            vnf_at("metadata.asmn.default_action"),
                            format!("{burst:?} is not a burst"),
                        )
                    })?),
                }),
                _ => {
                    return Err(err(
                        vnf_at("metadata.asmn.default_action"),
                        format!("{p:?}: `drop`, or `police RATE BURST` (kbit/s, kbit)"),
                    ));
                }
            }
        }
    };
    let attestation = match meta_text(vnf, "asmn.attestation")
        .map_err(|e| err(vnf_at("metadata"), e))?
        .as_deref()
    {
        None | Some("strict") => crate::catalog::AttestationMode::Strict,
        Some("continuity") => crate::catalog::AttestationMode::Continuity,
        Some(other) => {
            return Err(err(
                vnf_at("metadata.asmn.attestation"),
                format!("{other:?}: strict or continuity"),
            ));
        }
    };

    // The whitelist.
    let mut rules = Vec::new();
    if let Some(policies) = topology.get("policies") {
        let list = policies.as_array().ok_or_else(|| {
            err(
                "topology_template.policies".into(),
                "must be a list of named policies".into(),
            )
        })?;
        for entry in list {
            let Some(map) = entry.as_object() else {
                return Err(err(
                    "topology_template.policies".into(),
                    "an entry is not a named policy".into(),
                ));
            };
            for (pname, policy) in map {
                let pat = |k: &str| format!("policies.{pname}.{k}");
                let ty = text(policy, "type").ok_or_else(|| err(pat("type"), "missing".into()))?;
                if ty != SECURITY_GROUP_RULE {
                    // Scaling, instantiation levels...: the orchestrator's business.
                    continue;
                }
                let p = policy.get("properties").cloned().unwrap_or(Value::Null);
                let direction = text(&p, "direction").unwrap_or("ingress");
                if direction != "ingress" {
                    return Err(err(
                        pat("properties.direction"),
                        format!(
                            "{direction:?}: ASMN polices what a VNF receives; only ingress rules are supported"
                        ),
                    ));
                }
                let ether = text(&p, "ether_type").unwrap_or("ipv4");
                if ether != "ipv4" {
                    return Err(err(
                        pat("properties.ether_type"),
                        format!("{ether:?}: the tenant overlay is IPv4"),
                    ));
                }
                let proto = text(&p, "protocol").unwrap_or("tcp");
                let protocol = match proto {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    "icmp" => Protocol::Icmp,
                    other => {
                        return Err(err(
                            pat("properties.protocol"),
                            format!("{other:?}: tcp, udp or icmp"),
                        ));
                    }
                };
                let port = |k: &str| -> Result<Option<u16>, CatalogError> {
                    match p.get(k) {
                        None => Ok(None),
                        Some(v) => v
                            .as_u64()
                            .and_then(|n| u16::try_from(n).ok())
                            .map(Some)
                            .ok_or_else(|| {
                                err(
                                    pat(&format!("properties.{k}")),
                                    format!("{v} is not a port"),
                                )
                            }),
                    }
                };
                let (lo, hi) = (port("port_range_min")?, port("port_range_max")?);
                let ports = if protocol == Protocol::Icmp {
                    None
                } else {
                    match (lo.unwrap_or(0), hi.unwrap_or(65535)) {
                        (0, 65535) => None,
                        (lo, hi) => Some(
                            PortRange::new(lo.max(1), hi)
                                .map_err(|e| err(pat("properties.port_range_min"), e))?,
                        ),
                    }
                };
                let police = Police {
                    rate: KbitPerSec(
                        meta_u64(policy, "asmn.ingress_policing_rate")
                            .map_err(|e| err(pat("metadata"), e))?,
                    ),
                    burst: Kbit(
                        meta_u64(policy, "asmn.ingress_policing_burst")
                            .map_err(|e| err(pat("metadata"), e))?,
                    ),
                };
                let sources =
                    match meta_text(policy, "asmn.sources").map_err(|e| err(pat("metadata"), e))? {
                        None => None,
                        Some(list) => {
                            let mut set = BTreeSet::new();
                            for s in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                                set.insert(VnfId::new(s.to_string()).map_err(|e| {
                                    err(pat("metadata.asmn.sources"), format!("{s:?}: {e}"))
                                })?);
                            }
                            Some(set)
                        }
                    };
                rules.push(Rule {
                    name: pname.clone(),
                    protocol,
                    ports,
                    sources,
                    police,
                });
            }
        }
    }
    let catalog = SecCatalog {
        vnf: vnf_id.clone(),
        version: 1,
        gateway,
        default_action,
        rules,
    };
    catalog
        .validate()
        .map_err(|(f, r)| err(format!("(the catalog made of the policies) {f}"), r))?;
    Ok(Sol001 {
        vnfd: Vnfd {
            vnf: vnf_id,
            name: product.to_string(),
            version: text(&props, "descriptor_version")
                .unwrap_or("0")
                .to_string(),
            catalog,
            attestation,
        },
        vdu: vdu.clone(),
        algorithm,
        digest,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::parse_vnfd;

    const EXAMPLE: &str = include_str!("../../images/examples/web-server.sol001.yaml");
    const ASMN: &str = include_str!("../../images/examples/web-server.vnfd.yaml");

    #[test]
    fn the_example_gives_the_same_catalog_as_the_asmn_vnfd() {
        let s = parse_sol001("web.yaml", EXAMPLE.as_bytes()).expect("parses");
        let ours = parse_vnfd("web.vnfd.yaml", ASMN.as_bytes()).expect("asmn vnfd");
        assert_eq!(s.vnfd.catalog, ours.catalog);
        assert_eq!(s.vnfd.vnf, ours.vnf);
        assert_eq!(s.vdu, "WEB");
        assert_eq!(s.algorithm, "sha-256");
        assert_eq!(s.digest.len(), 32);
        assert_eq!(s.size, Some(1 << 30));
    }

    fn refused(text: &str) -> String {
        parse_sol001("bad.yaml", text.as_bytes())
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn what_asmn_would_have_to_guess_is_refused_naming_the_node() {
        let cases = [
            (EXAMPLE.replace("direction: ingress", "direction: egress"), "policies.http.properties.direction"),
            (EXAMPLE.replace("ether_type: ipv4", "ether_type: ipv6"), "policies.http.properties.ether_type"),
            (EXAMPLE.replace("protocol: udp", "protocol: sctp"), "policies.metrics.properties.protocol"),
            (EXAMPLE.replace("algorithm: sha-256", "algorithm: crc-7"), "node_templates.WEB.properties.sw_image_data.checksum.algorithm"),
            (EXAMPLE.replace("5f2b3c8e", "5f2b"), "node_templates.WEB.properties.sw_image_data.checksum.hash"),
            (EXAMPLE.replace("tosca_simple_yaml_1_3", "tosca_simple_profile_for_nfv_1_0_0"), "tosca_definitions_version"),
            (EXAMPLE.replace("      type: tosca.nodes.nfv.VduCp\n", ""), "node_templates.WEB_CP.type"),
            (EXAMPLE.replace("asmn.gateway: vnf-gw", "asmn.gateway: \"bad name!\""), "asmn.gateway"),
            (EXAMPLE.replace("asmn.ingress_policing_rate: 64", "asmn.ingress_policing_rate: fast"), "policies.ping.metadata"),
            (EXAMPLE.replace("port_range_min: 9100", "port_range_min: 70000"), "policies.metrics.properties.port_range_min"),
            (EXAMPLE.replace("    WEB_CP:", "    WEB2:\n      type: tosca.nodes.nfv.Vdu.Compute\n      properties:\n        sw_image_data: {}\n    WEB_CP:"), "several VDUs"),
        ];
        for (text, field) in cases {
            let e = refused(&text);
            assert!(e.contains(field), "expected {field:?} in: {e}");
        }
        // Not YAML, and too deep: the VNFD budgets.
        assert!(refused("{{{").contains("bad.yaml"));
        let deep = "a: ".repeat(200) + "1";
        assert!(refused(&deep).contains("bad.yaml"));
    }
}
