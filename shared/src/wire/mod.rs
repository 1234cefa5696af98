//! Control messages: prost types ([`msg`]), length-delimited framing with a size cap
//! checked before allocation, and conversion into validated domain types.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one
//! [`msg::Envelope`]. Frames over [`MAX_FRAME`] are refused as soon as their length is
//! read. Conversions (`TryFrom`) check every field once and name the bad one in
//! [`WireError`]; nothing past this boundary validates again.

pub mod msg;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use thiserror::Error;

use crate::catalog::{DefaultAction, Police, PortRange, Protocol, Rule, SecCatalog};
use crate::chain::{Reveal, SealedRenewal};
use crate::crypto::{ChainElement, HASH_LEN, Nonce};
use crate::dh::{DhPublic, Group};
use crate::ids::{InstanceKey, InstanceName, Role, TenantId, VnfId};
use crate::units::{Kbit, KbitPerSec};

/// Largest frame accepted or sent (payload bytes, without the length prefix).
pub const MAX_FRAME: usize = 64 * 1024;
/// Length of the frame header.
pub const FRAME_HEADER: usize = 4;

/// Why bytes from the network were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// A frame announced more than the cap.
    #[error("frame of {len} bytes exceeds the {cap}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The cap.
        cap: usize,
    },
    /// The bytes are not a valid protobuf envelope.
    #[error("undecodable message: {0}")]
    Decode(String),
    /// The envelope has no body or a body of a type this side does not expect.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// A required field is absent.
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    /// A field has a value outside its domain.
    #[error("field `{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl ToString) -> WireError {
    WireError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

/// Encodes `m` as one frame (length prefix included).
pub fn encode_frame<M: Message>(m: &M) -> Result<Vec<u8>, WireError> {
    let len = m.encoded_len();
    if len > MAX_FRAME {
        return Err(WireError::FrameTooLarge {
            len,
            cap: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(FRAME_HEADER + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut out)
        .map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(out)
}

/// Decodes one envelope from a frame's payload.
pub fn decode_envelope(payload: &[u8]) -> Result<msg::Envelope, WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::FrameTooLarge {
            len: payload.len(),
            cap: MAX_FRAME,
        });
    }
    msg::Envelope::decode(payload).map_err(|e| WireError::Decode(e.to_string()))
}

/// Splits a byte stream into frames. Feed it what the stream gives with
/// [`push`](Self::push), then take frames with [`next_frame`](Self::next_frame) until it
/// returns `None`. Memory is bounded by the cap plus one read.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes. Refuses them when the frame being assembled would exceed
    /// the cap (checked on the length prefix, before the payload is buffered).
    pub fn push(&mut self, data: &[u8]) -> Result<(), WireError> {
        if self.buf.len() >= FRAME_HEADER {
            self.check_header()?;
        }
        if self.buf.len() + data.len() > 2 * (MAX_FRAME + FRAME_HEADER) {
            // More than two whole frames pending: the caller is not draining frames.
            return Err(WireError::FrameTooLarge {
                len: self.buf.len() + data.len(),
                cap: MAX_FRAME,
            });
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= FRAME_HEADER {
            self.check_header()?;
        }
        Ok(())
    }

    fn check_header(&self) -> Result<usize, WireError> {
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::FrameTooLarge {
                len,
                cap: MAX_FRAME,
            });
        }
        Ok(len)
    }

    /// The next complete frame's payload, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, WireError> {
        if self.buf.len() < FRAME_HEADER {
            return Ok(None);
        }
        let len = self.check_header()?;
        if self.buf.len() < FRAME_HEADER + len {
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Bytes buffered and not yet returned.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

// ---- Conversions -------------------------------------------------------------------

fn key(field: &'static str, b: &[u8]) -> Result<InstanceKey, WireError> {
    InstanceKey::from_slice(b)
        .ok_or_else(|| invalid(field, format!("{} bytes, expected {HASH_LEN}", b.len())))
}

fn name<T: FromStr>(field: &'static str, s: &str) -> Result<T, WireError>
where
    T::Err: ToString,
{
    if s.is_empty() {
        return Err(WireError::Missing(field));
    }
    s.parse().map_err(|e: T::Err| invalid(field, e))
}

fn wg_key(field: &'static str, b: &[u8]) -> Result<[u8; 32], WireError> {
    <[u8; 32]>::try_from(b).map_err(|_| invalid(field, format!("{} bytes, expected 32", b.len())))
}

fn role(field: &'static str, r: i32) -> Result<Role, WireError> {
    match msg::RoleMsg::try_from(r) {
        Ok(msg::RoleMsg::Vnf) => Ok(Role::Vnf),
        Ok(msg::RoleMsg::Gateway) => Ok(Role::Gateway),
        Ok(msg::RoleMsg::Unspecified) => Err(WireError::Missing(field)),
        Err(_) => Err(invalid(field, format!("unknown role {r}"))),
    }
}

/// The wire value of a role.
pub fn role_msg(r: Role) -> i32 {
    match r {
        Role::Vnf => msg::RoleMsg::Vnf as i32,
        Role::Gateway => msg::RoleMsg::Gateway as i32,
    }
}

fn group(field: &'static str, s: &str) -> Result<Group, WireError> {
    if s.is_empty() {
        return Err(WireError::Missing(field));
    }
    s.parse()
        .map_err(|e: crate::dh::UnsupportedGroup| invalid(field, e))
}

fn endpoint(field: &'static str, s: &str) -> Result<SocketAddr, WireError> {
    if s.is_empty() {
        return Err(WireError::Missing(field));
    }
    let a: SocketAddr = s.parse().map_err(|_| invalid(field, "expected ip:port"))?;
    if a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast() {
        return Err(invalid(field, "needs a unicast address and a port"));
    }
    Ok(a)
}

/// An overlay address with its prefix length, such as `10.77.0.5/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Overlay {
    /// The address.
    pub ip: IpAddr,
    /// The tenant prefix length.
    pub prefix: u8,
}

impl FromStr for Overlay {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (ip, p) = s.split_once('/').ok_or("expected ip/prefix")?;
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IP address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} is not a prefix length"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if prefix == 0 || prefix > max {
            return Err(format!("prefix length {prefix} is outside 1..={max}"));
        }
        Ok(Overlay { ip, prefix })
    }
}

impl std::fmt::Display for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

impl TryFrom<&msg::RevealMsg> for Reveal {
    type Error = WireError;
    fn try_from(m: &msg::RevealMsg) -> Result<Self, WireError> {
        let element = ChainElement::from_slice(&m.element).ok_or_else(|| {
            invalid(
                "reveal.element",
                format!("{} bytes, expected {HASH_LEN}", m.element.len()),
            )
        })?;
        Ok(Reveal {
            epoch: m.epoch,
            index: m.index,
            element,
        })
    }
}

impl From<&Reveal> for msg::RevealMsg {
    fn from(r: &Reveal) -> Self {
        msg::RevealMsg {
            epoch: r.epoch,
            index: r.index,
            element: r.element.expose().to_vec(),
        }
    }
}

impl TryFrom<&msg::RenewalMsg> for SealedRenewal {
    type Error = WireError;
    fn try_from(m: &msg::RenewalMsg) -> Result<Self, WireError> {
        if m.ciphertext.len() != HASH_LEN + 16 {
            return Err(invalid(
                "renewal.ciphertext",
                format!("{} bytes, expected {}", m.ciphertext.len(), HASH_LEN + 16),
            ));
        }
        crate::chain::ChainSpec::new(InstanceKey::from_bytes([0; 32]), m.new_epoch, m.new_length)
            .map_err(|e| invalid("renewal.new_length", e))?;
        Ok(SealedRenewal {
            new_epoch: m.new_epoch,
            new_length: m.new_length,
            ciphertext: m.ciphertext.clone(),
        })
    }
}

impl From<&SealedRenewal> for msg::RenewalMsg {
    fn from(r: &SealedRenewal) -> Self {
        msg::RenewalMsg {
            new_epoch: r.new_epoch,
            new_length: r.new_length,
            ciphertext: r.ciphertext.clone(),
        }
    }
}

fn police_from(m: Option<&msg::PoliceMsg>) -> Police {
    m.map(|p| Police {
        rate: KbitPerSec(p.ingress_policing_rate),
        burst: Kbit(p.ingress_policing_burst),
    })
    .unwrap_or(Police::UNLIMITED)
}

fn police_msg(p: &Police) -> msg::PoliceMsg {
    msg::PoliceMsg {
        ingress_policing_rate: p.rate.0,
        ingress_policing_burst: p.burst.0,
    }
}

impl TryFrom<&msg::CatalogMsg> for SecCatalog {
    type Error = WireError;
    fn try_from(m: &msg::CatalogMsg) -> Result<Self, WireError> {
        let vnf: VnfId = name("catalog.vnf", &m.vnf)?;
        let gateway = if m.gateway.is_empty() {
            None
        } else {
            Some(name::<VnfId>("catalog.gateway", &m.gateway)?)
        };
        if m.rules.len() > crate::catalog::MAX_RULES {
            return Err(invalid("catalog.rules", "too many rules"));
        }
        let mut rules = Vec::with_capacity(m.rules.len());
        for r in &m.rules {
            let protocol = match msg::ProtocolMsg::try_from(r.protocol) {
                Ok(msg::ProtocolMsg::Tcp) => Protocol::Tcp,
                Ok(msg::ProtocolMsg::Udp) => Protocol::Udp,
                Ok(msg::ProtocolMsg::Icmp) => Protocol::Icmp,
                Ok(msg::ProtocolMsg::Any) => Protocol::Any,
                Ok(msg::ProtocolMsg::Unspecified) => {
                    return Err(WireError::Missing("catalog.rules.protocol"));
                }
                Err(_) => {
                    return Err(invalid(
                        "catalog.rules.protocol",
                        format!("unknown protocol {}", r.protocol),
                    ));
                }
            };
            let ports = if r.port_lo == 0 && r.port_hi == 0 {
                None
            } else {
                let lo = u16::try_from(r.port_lo)
                    .map_err(|_| invalid("catalog.rules.port_lo", "above 65535"))?;
                let hi = u16::try_from(r.port_hi)
                    .map_err(|_| invalid("catalog.rules.port_hi", "above 65535"))?;
                Some(PortRange::new(lo, hi).map_err(|e| invalid("catalog.rules.port_lo", e))?)
            };
            let sources = if r.sources.is_empty() {
                None
            } else {
                Some(
                    r.sources
                        .iter()
                        .map(|s| name::<VnfId>("catalog.rules.sources", s))
                        .collect::<Result<_, _>>()?,
                )
            };
            rules.push(Rule {
                name: r.name.clone(),
                protocol,
                ports,
                sources,
                police: police_from(r.police.as_ref()),
            });
        }
        let c = SecCatalog {
            vnf,
            version: m.version,
            gateway,
            default_action: match &m.default_police {
                None => DefaultAction::Drop,
                Some(p) => DefaultAction::Police(police_from(Some(p))),
            },
            rules,
        };
        c.validate()
            .map_err(|(f, r)| invalid("catalog", format!("{f}: {r}")))?;
        Ok(c)
    }
}

impl From<&SecCatalog> for msg::CatalogMsg {
    fn from(c: &SecCatalog) -> Self {
        msg::CatalogMsg {
            vnf: c.vnf.to_string(),
            version: c.version,
            gateway: c
                .gateway
                .as_ref()
                .map(|g| g.to_string())
                .unwrap_or_default(),
            default_police: match &c.default_action {
                DefaultAction::Drop => None,
                DefaultAction::Police(p) => Some(police_msg(p)),
            },
            rules: c
                .rules
                .iter()
                .map(|r| msg::RuleMsg {
                    name: r.name.clone(),
                    protocol: match r.protocol {
                        Protocol::Tcp => msg::ProtocolMsg::Tcp,
                        Protocol::Udp => msg::ProtocolMsg::Udp,
                        Protocol::Icmp => msg::ProtocolMsg::Icmp,
                        Protocol::Any => msg::ProtocolMsg::Any,
                    } as i32,
                    port_lo: r.ports.map(|p| u32::from(p.lo)).unwrap_or(0),
                    port_hi: r.ports.map(|p| u32::from(p.hi)).unwrap_or(0),
                    sources: r.sources.iter().flatten().map(|s| s.to_string()).collect(),
                    police: Some(police_msg(&r.police)),
                })
                .collect(),
        }
    }
}

/// A validated enrollment request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enroll {
    /// The identity the agent claims.
    pub id: InstanceKey,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its VNF.
    pub vnf: VnfId,
    /// Its instance name.
    pub instance: InstanceName,
    /// The first reveal.
    pub reveal: Reveal,
    /// Its WireGuard static public key.
    pub wg_public_key: [u8; 32],
    /// Its D-H group.
    pub dh_group: Group,
    /// Its D-H public value (validated in the group).
    pub dh_public: DhPublic,
    /// Its underlay endpoint.
    pub endpoint: SocketAddr,
    /// Its role.
    pub role: Role,
}

impl TryFrom<&msg::EnrollRequest> for Enroll {
    type Error = WireError;
    fn try_from(m: &msg::EnrollRequest) -> Result<Self, WireError> {
        let dh_group = group("enroll.dh_group", &m.dh_group)?;
        Ok(Enroll {
            id: key("enroll.instance_key", &m.instance_key)?,
            tenant: name("enroll.tenant", &m.tenant)?,
            vnf: name("enroll.vnf", &m.vnf)?,
            instance: name("enroll.instance", &m.instance)?,
            reveal: m
                .reveal
                .as_ref()
                .ok_or(WireError::Missing("enroll.reveal"))
                .and_then(Reveal::try_from)?,
            wg_public_key: wg_key("enroll.wg_public_key", &m.wg_public_key)?,
            dh_public: DhPublic::validate(dh_group, &m.dh_public)
                .map_err(|e| invalid("enroll.dh_public", e))?,
            dh_group,
            endpoint: endpoint("enroll.endpoint", &m.endpoint)?,
            role: role("enroll.role", m.role)?,
        })
    }
}

impl From<&Enroll> for msg::EnrollRequest {
    fn from(e: &Enroll) -> Self {
        msg::EnrollRequest {
            instance_key: e.id.as_bytes().to_vec(),
            tenant: e.tenant.to_string(),
            vnf: e.vnf.to_string(),
            instance: e.instance.to_string(),
            reveal: Some((&e.reveal).into()),
            wg_public_key: e.wg_public_key.to_vec(),
            dh_group: e.dh_group.name().to_string(),
            dh_public: e.dh_public.as_bytes().to_vec(),
            endpoint: e.endpoint.to_string(),
            role: role_msg(e.role),
        }
    }
}

/// A verified peer, as Sec-EM describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Its identity.
    pub id: InstanceKey,
    /// Its VNF.
    pub vnf: VnfId,
    /// Its overlay address.
    pub overlay: IpAddr,
    /// Its underlay endpoint.
    pub endpoint: SocketAddr,
    /// Its WireGuard static public key.
    pub wg_public_key: [u8; 32],
    /// Its D-H group and public value.
    pub dh_group: Group,
    /// Its D-H public value (validated).
    pub dh_public: DhPublic,
    /// Its key epoch.
    pub epoch: u32,
    /// The gateway it is reached through, if any.
    pub via_gateway: Option<IpAddr>,
    /// Its role.
    pub role: Role,
    /// Whether its Sec-catalog names a gateway.
    pub protected: bool,
}

impl TryFrom<&msg::PeerInfo> for Peer {
    type Error = WireError;
    fn try_from(m: &msg::PeerInfo) -> Result<Self, WireError> {
        let dh_group = group("peer.dh_group", &m.dh_group)?;
        Ok(Peer {
            id: key("peer.instance_key", &m.instance_key)?,
            vnf: name("peer.vnf", &m.vnf)?,
            overlay: name("peer.overlay", &m.overlay)?,
            endpoint: endpoint("peer.endpoint", &m.endpoint)?,
            wg_public_key: wg_key("peer.wg_public_key", &m.wg_public_key)?,
            dh_public: DhPublic::validate(dh_group, &m.dh_public)
                .map_err(|e| invalid("peer.dh_public", e))?,
            dh_group,
            epoch: m.epoch,
            via_gateway: if m.via_gateway.is_empty() {
                None
            } else {
                Some(name("peer.via_gateway", &m.via_gateway)?)
            },
            role: role("peer.role", m.role)?,
            protected: m.protected,
        })
    }
}

impl From<&Peer> for msg::PeerInfo {
    fn from(p: &Peer) -> Self {
        msg::PeerInfo {
            instance_key: p.id.as_bytes().to_vec(),
            vnf: p.vnf.to_string(),
            overlay: p.overlay.to_string(),
            endpoint: p.endpoint.to_string(),
            wg_public_key: p.wg_public_key.to_vec(),
            dh_group: p.dh_group.name().to_string(),
            dh_public: p.dh_public.as_bytes().to_vec(),
            epoch: p.epoch,
            via_gateway: p.via_gateway.map(|g| g.to_string()).unwrap_or_default(),
            role: role_msg(p.role),
            protected: p.protected,
        }
    }
}

/// The validated bootstrap bundle. Holds the instance's nonce: keep it secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootstrapBundle {
    /// Controller addresses, "host:port".
    pub controllers: Vec<String>,
    /// TLS server name of the controller.
    pub server_name: String,
    /// The controller CA to pin (PEM).
    pub ca_pem: String,
    /// Tenant.
    pub tenant: TenantId,
    /// VNF.
    pub vnf: VnfId,
    /// Instance name.
    pub instance: InstanceName,
    /// The instance's secret.
    pub nonce: Nonce,
    /// Chain length N.
    pub chain_length: u32,
    /// Role.
    pub role: Role,
    /// D-H group.
    pub dh_group: Group,
}

impl BootstrapBundle {
    /// The instance identity this bundle defines.
    pub fn instance_key(&self) -> InstanceKey {
        InstanceKey::derive(&self.tenant, &self.vnf, &self.instance, &self.nonce)
    }
}

impl TryFrom<&msg::BootstrapBundleMsg> for BootstrapBundle {
    type Error = WireError;
    fn try_from(m: &msg::BootstrapBundleMsg) -> Result<Self, WireError> {
        if m.controllers.is_empty() {
            return Err(WireError::Missing("bundle.controllers"));
        }
        if m.controllers.len() > 16 || m.controllers.iter().any(|c| c.is_empty() || c.len() > 256) {
            return Err(invalid(
                "bundle.controllers",
                "1 to 16 addresses of at most 256 characters",
            ));
        }
        if m.ca_pem.is_empty() {
            return Err(WireError::Missing("bundle.ca_pem"));
        }
        if m.server_name.is_empty() {
            return Err(WireError::Missing("bundle.server_name"));
        }
        let nonce = Nonce::from_slice(&m.nonce).ok_or_else(|| {
            invalid(
                "bundle.nonce",
                format!("{} bytes, expected 32", m.nonce.len()),
            )
        })?;
        crate::chain::ChainSpec::new(InstanceKey::from_bytes([0; 32]), 0, m.chain_length)
            .map_err(|e| invalid("bundle.chain_length", e))?;
        Ok(BootstrapBundle {
            controllers: m.controllers.clone(),
            server_name: m.server_name.clone(),
            ca_pem: m.ca_pem.clone(),
            tenant: name("bundle.tenant", &m.tenant)?,
            vnf: name("bundle.vnf", &m.vnf)?,
            instance: name("bundle.instance", &m.instance)?,
            nonce,
            chain_length: m.chain_length,
            role: role("bundle.role", m.role)?,
            dh_group: group("bundle.dh_group", &m.dh_group)?,
        })
    }
}

impl From<&BootstrapBundle> for msg::BootstrapBundleMsg {
    fn from(b: &BootstrapBundle) -> Self {
        msg::BootstrapBundleMsg {
            controllers: b.controllers.clone(),
            server_name: b.server_name.clone(),
            ca_pem: b.ca_pem.clone(),
            tenant: b.tenant.to_string(),
            vnf: b.vnf.to_string(),
            instance: b.instance.to_string(),
            nonce: b.nonce.expose().to_vec(),
            chain_length: b.chain_length,
            role: role_msg(b.role),
            dh_group: b.dh_group.name().to_string(),
        }
    }
}

/// A validated enrollment answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enrolled {
    /// The overlay address and prefix.
    pub overlay: Overlay,
    /// The D-H group of the tenant.
    pub dh_group: Group,
    /// The chain epoch.
    pub epoch: u32,
    /// The index Sec-EM accepted last.
    pub last_index: u32,
    /// How often to re-attest.
    pub reattest_interval: std::time::Duration,
    /// The catalog to enforce.
    pub catalog: SecCatalog,
}

impl TryFrom<&msg::EnrollResponse> for Enrolled {
    type Error = WireError;
    fn try_from(m: &msg::EnrollResponse) -> Result<Self, WireError> {
        if m.reattest_interval_secs == 0 {
            return Err(invalid(
                "enrolled.reattest_interval_secs",
                "must be at least 1 second",
            ));
        }
        Ok(Enrolled {
            overlay: name("enrolled.overlay", &m.overlay)?,
            dh_group: group("enrolled.dh_group", &m.dh_group)?,
            epoch: m.epoch,
            last_index: m.last_index,
            reattest_interval: std::time::Duration::from_secs(u64::from(m.reattest_interval_secs)),
            catalog: m
                .catalog
                .as_ref()
                .ok_or(WireError::Missing("enrolled.catalog"))
                .and_then(SecCatalog::try_from)?,
        })
    }
}

impl From<&Enrolled> for msg::EnrollResponse {
    fn from(e: &Enrolled) -> Self {
        msg::EnrollResponse {
            overlay: e.overlay.to_string(),
            dh_group: e.dh_group.name().to_string(),
            epoch: e.epoch,
            last_index: e.last_index,
            reattest_interval_secs: u32::try_from(e.reattest_interval.as_secs())
                .unwrap_or(u32::MAX),
            catalog: Some((&e.catalog).into()),
        }
    }
}

/// A refusal as the domain sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The typed reason.
    pub code: msg::RefusalCode,
    /// What a human should know.
    pub message: String,
}

impl TryFrom<&msg::Refusal> for Refused {
    type Error = WireError;
    fn try_from(m: &msg::Refusal) -> Result<Self, WireError> {
        let code = msg::RefusalCode::try_from(m.code)
            .map_err(|_| invalid("refusal.code", format!("unknown code {}", m.code)))?;
        if code == msg::RefusalCode::Unspecified {
            return Err(WireError::Missing("refusal.code"));
        }
        Ok(Refused {
            code,
            message: m.message.chars().take(1024).collect(),
        })
    }
}

#[cfg(test)]
mod tests;

// ---- Validated requests: every field checked once, here, not by each handler --------

/// A validated peer verification: the peer's overlay address, and for a gateway asking
/// on behalf of one of its VNFs, that VNF's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifyPeer {
    /// The peer asked about.
    pub overlay: IpAddr,
    /// The source a gateway asks for (`None`: the requester asks for itself).
    pub source: Option<IpAddr>,
}

impl TryFrom<&msg::VerifyPeerRequest> for VerifyPeer {
    type Error = WireError;
    fn try_from(m: &msg::VerifyPeerRequest) -> Result<Self, WireError> {
        let ip = |field: &'static str, s: &str| {
            s.parse::<IpAddr>()
                .map_err(|_| invalid(field, "not an IP address"))
        };
        Ok(VerifyPeer {
            overlay: ip("verify_peer.overlay", &m.overlay)?,
            source: if m.source.is_empty() {
                None
            } else {
                Some(ip("verify_peer.source", &m.source)?)
            },
        })
    }
}

/// A validated announcement of an agent's new keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishKeys {
    /// The WireGuard static public key.
    pub wg_public_key: [u8; 32],
    /// The D-H public value (checked against the tenant's group by Sec-EM).
    pub dh_public: Vec<u8>,
    /// The epoch the keys belong to.
    pub epoch: u32,
}

impl TryFrom<&msg::PublishKeys> for PublishKeys {
    type Error = WireError;
    fn try_from(m: &msg::PublishKeys) -> Result<Self, WireError> {
        Ok(PublishKeys {
            wg_public_key: wg_key("publish_keys.wg_public_key", &m.wg_public_key)?,
            dh_public: m.dh_public.clone(),
            epoch: m.epoch,
        })
    }
}

/// A validated instance creation (the operator's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateInstance {
    /// The tenant.
    pub tenant: TenantId,
    /// The on-boarded VNF.
    pub vnf: VnfId,
    /// The name asked for (`None`: Sec-EM picks one).
    pub instance: Option<InstanceName>,
    /// The role (a VNF when unspecified).
    pub role: Role,
}

impl TryFrom<&msg::CreateInstanceRequest> for CreateInstance {
    type Error = WireError;
    fn try_from(m: &msg::CreateInstanceRequest) -> Result<Self, WireError> {
        Ok(CreateInstance {
            tenant: name("create_instance.tenant", &m.tenant)?,
            vnf: name("create_instance.vnf", &m.vnf)?,
            instance: if m.instance.is_empty() {
                None
            } else {
                Some(name("create_instance.instance", &m.instance)?)
            },
            role: match msg::RoleMsg::try_from(m.role) {
                Ok(msg::RoleMsg::Gateway) => Role::Gateway,
                Ok(msg::RoleMsg::Vnf | msg::RoleMsg::Unspecified) => Role::Vnf,
                Err(_) => return Err(invalid("create_instance.role", "unknown role")),
            },
        })
    }
}

/// A validated revocation (the operator's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoke {
    /// The instance.
    pub id: InstanceKey,
    /// Why (at most 256 characters; a default when none is given).
    pub reason: String,
}

impl TryFrom<&msg::RevokeRequest> for Revoke {
    type Error = WireError;
    fn try_from(m: &msg::RevokeRequest) -> Result<Self, WireError> {
        Ok(Revoke {
            id: key("revoke.instance_key", &m.instance_key)?,
            reason: if m.reason.is_empty() {
                "revoked by the operator".to_string()
            } else {
                m.reason.chars().take(256).collect()
            },
        })
    }
}

/// Validated golden digests of an on-boarding: known algorithms, each of its length.
pub fn digests(
    list: &[msg::DigestMsg],
) -> Result<
    std::collections::BTreeMap<crate::measure::Algorithm, crate::measure::DigestValue>,
    WireError,
> {
    let mut out = std::collections::BTreeMap::new();
    for d in list {
        let alg = d
            .algorithm
            .parse::<crate::measure::Algorithm>()
            .map_err(|_| {
                invalid(
                    "onboard.digests",
                    format!("unknown algorithm {:?}", d.algorithm),
                )
            })?;
        if d.value.len() != alg.output_len() {
            return Err(invalid(
                "onboard.digests",
                format!("{alg} digest of {} bytes", d.value.len()),
            ));
        }
        out.insert(alg, crate::measure::DigestValue(d.value.clone()));
    }
    Ok(out)
}
