//! The prost messages of the control protocol, exactly as they travel. Nothing here is
//! validated: convert into domain types with `TryFrom` (see the parent module).
//!
//! Field tags are the protocol: never reuse or renumber one.

#![allow(missing_docs)]

use std::fmt;

/// Every message on a control stream is an envelope.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// Chosen by the requester; a response carries the request's id, a push carries 0.
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(
        oneof = "Body",
        tags = "10, 11, 12, 13, 14, 20, 21, 22, 23, 24, 25, 26, 27, 28, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49"
    )]
    pub body: Option<Body>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Body {
    // Agent to Sec-EM.
    #[prost(message, tag = "10")]
    Enroll(EnrollRequest),
    #[prost(message, tag = "11")]
    Reattest(ReattestRequest),
    #[prost(message, tag = "12")]
    VerifyPeer(VerifyPeerRequest),
    #[prost(message, tag = "13")]
    CatalogAck(CatalogAck),
    #[prost(message, tag = "14")]
    PublishKeys(PublishKeys),
    // Sec-EM to agent.
    #[prost(message, tag = "20")]
    Enrolled(EnrollResponse),
    #[prost(message, tag = "21")]
    Reattested(ReattestResponse),
    #[prost(message, tag = "22")]
    Peer(PeerInfo),
    #[prost(message, tag = "23")]
    VerifyRequested(VerifyRequested),
    #[prost(message, tag = "24")]
    CatalogPush(CatalogMsg),
    #[prost(message, tag = "25")]
    Revoked(RevokeNotice),
    #[prost(message, tag = "26")]
    Refused(Refusal),
    #[prost(message, tag = "27")]
    Ok(Ack),
    #[prost(message, tag = "28")]
    Rekeyed(RekeyNotice),
    // Operator (asmnctl) to Sec-EM and back.
    #[prost(message, tag = "40")]
    Onboard(OnboardRequest),
    #[prost(message, tag = "41")]
    CreateInstance(CreateInstanceRequest),
    #[prost(message, tag = "42")]
    InstanceCreated(BootstrapBundleMsg),
    #[prost(message, tag = "43")]
    ApplyCatalog(ApplyCatalogRequest),
    #[prost(message, tag = "44")]
    CatalogApplied(CatalogApplied),
    #[prost(message, tag = "45")]
    Revoke(RevokeRequest),
    #[prost(message, tag = "46")]
    Query(QueryRequest),
    #[prost(message, tag = "47")]
    QueryResult(QueryResult),
    #[prost(message, tag = "48")]
    ShowCatalog(ShowCatalogRequest),
    #[prost(message, tag = "49")]
    RevokeAdmin(RevokeAdminRequest),
}

/// A chain element revealed for (epoch, index).
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct RevealMsg {
    #[prost(uint32, tag = "1")]
    pub epoch: u32,
    #[prost(uint32, tag = "2")]
    pub index: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub element: Vec<u8>,
}

impl fmt::Debug for RevealMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevealMsg")
            .field("epoch", &self.epoch)
            .field("index", &self.index)
            .field("element", &format_args!("<{} bytes>", self.element.len()))
            .finish()
    }
}

/// The next chain's anchor, sealed under the element revealed with it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RenewalMsg {
    #[prost(uint32, tag = "1")]
    pub new_epoch: u32,
    #[prost(uint32, tag = "2")]
    pub new_length: u32,
    #[prost(bytes = "vec", tag = "3")]
    pub ciphertext: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RoleMsg {
    Unspecified = 0,
    Vnf = 1,
    Gateway = 2,
}

/// First message of an agent: who it is, its first reveal, and its public keys.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnrollRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub instance_key: Vec<u8>,
    #[prost(string, tag = "2")]
    pub tenant: String,
    #[prost(string, tag = "3")]
    pub vnf: String,
    #[prost(string, tag = "4")]
    pub instance: String,
    #[prost(message, optional, tag = "5")]
    pub reveal: Option<RevealMsg>,
    #[prost(bytes = "vec", tag = "6")]
    pub wg_public_key: Vec<u8>,
    #[prost(string, tag = "7")]
    pub dh_group: String,
    #[prost(bytes = "vec", tag = "8")]
    pub dh_public: Vec<u8>,
    /// The agent's underlay UDP endpoint, "ip:port".
    #[prost(string, tag = "9")]
    pub endpoint: String,
    #[prost(enumeration = "RoleMsg", tag = "10")]
    pub role: i32,
}

/// Sec-EM's answer to a good first reveal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EnrollResponse {
    /// The instance's overlay address, "ip/prefix".
    #[prost(string, tag = "1")]
    pub overlay: String,
    #[prost(string, tag = "2")]
    pub dh_group: String,
    #[prost(uint32, tag = "3")]
    pub epoch: u32,
    /// The index Sec-EM accepted last (the agent reveals below it).
    #[prost(uint32, tag = "4")]
    pub last_index: u32,
    #[prost(uint32, tag = "5")]
    pub reattest_interval_secs: u32,
    #[prost(message, optional, tag = "6")]
    pub catalog: Option<CatalogMsg>,
}

/// Periodic re-attestation: the next element, the fresh digest, maybe a renewal.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReattestRequest {
    #[prost(message, optional, tag = "1")]
    pub reveal: Option<RevealMsg>,
    /// SHA-256 of the target, measured again.
    #[prost(bytes = "vec", tag = "2")]
    pub measurement: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    pub renewal: Option<RenewalMsg>,
    /// The D-H public value of the new epoch, with a renewal.
    #[prost(bytes = "vec", tag = "4")]
    pub dh_public: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReattestResponse {
    #[prost(uint32, tag = "1")]
    pub epoch: u32,
    #[prost(uint32, tag = "2")]
    pub last_index: u32,
}

/// Updated public keys (a new WireGuard key, or a new epoch's D-H value).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PublishKeys {
    #[prost(bytes = "vec", tag = "1")]
    pub wg_public_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub dh_public: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub epoch: u32,
}

/// Phase 1 pair check: "verify the instance at this overlay address for me".
#[derive(Clone, PartialEq, prost::Message)]
pub struct VerifyPeerRequest {
    /// The peer's overlay address (no prefix).
    #[prost(string, tag = "1")]
    pub overlay: String,
    /// Empty: the requester asks for itself. Otherwise (a gateway only) the overlay
    /// address of the instance on whose behalf it asks: may that instance and the peer
    /// talk through this gateway?
    #[prost(string, tag = "2")]
    pub source: String,
}

/// A verified peer: everything needed to build the tunnel.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PeerInfo {
    #[prost(bytes = "vec", tag = "1")]
    pub instance_key: Vec<u8>,
    #[prost(string, tag = "2")]
    pub vnf: String,
    #[prost(string, tag = "3")]
    pub overlay: String,
    #[prost(string, tag = "4")]
    pub endpoint: String,
    #[prost(bytes = "vec", tag = "5")]
    pub wg_public_key: Vec<u8>,
    #[prost(string, tag = "6")]
    pub dh_group: String,
    #[prost(bytes = "vec", tag = "7")]
    pub dh_public: Vec<u8>,
    #[prost(uint32, tag = "8")]
    pub epoch: u32,
    /// Overlay address of the gateway this peer is reached through, or empty.
    #[prost(string, tag = "9")]
    pub via_gateway: String,
    #[prost(enumeration = "RoleMsg", tag = "10")]
    pub role: i32,
    /// Whether its Sec-catalog names a gateway (which forwards to it only under that
    /// catalog).
    #[prost(bool, tag = "11")]
    pub protected: bool,
}

/// Push: this peer asked to reach you; verify it in turn (the paper's Fig. 2).
#[derive(Clone, PartialEq, prost::Message)]
pub struct VerifyRequested {
    #[prost(message, optional, tag = "1")]
    pub peer: Option<PeerInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PoliceMsg {
    /// kbit/s, 0 = unlimited.
    #[prost(uint64, tag = "1")]
    pub ingress_policing_rate: u64,
    /// kbit, 0 = the OVS default.
    #[prost(uint64, tag = "2")]
    pub ingress_policing_burst: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ProtocolMsg {
    Unspecified = 0,
    Tcp = 1,
    Udp = 2,
    Icmp = 3,
    Any = 4,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RuleMsg {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(enumeration = "ProtocolMsg", tag = "2")]
    pub protocol: i32,
    /// 0 when the rule names no ports.
    #[prost(uint32, tag = "3")]
    pub port_lo: u32,
    #[prost(uint32, tag = "4")]
    pub port_hi: u32,
    /// Empty: any source VNF.
    #[prost(string, repeated, tag = "5")]
    pub sources: Vec<String>,
    #[prost(message, optional, tag = "6")]
    pub police: Option<PoliceMsg>,
}

/// A Sec-catalog.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CatalogMsg {
    #[prost(string, tag = "1")]
    pub vnf: String,
    #[prost(uint64, tag = "2")]
    pub version: u64,
    #[prost(string, tag = "3")]
    pub gateway: String,
    /// Absent: drop. Present: the lowered service level.
    #[prost(message, optional, tag = "4")]
    pub default_police: Option<PoliceMsg>,
    #[prost(message, repeated, tag = "5")]
    pub rules: Vec<RuleMsg>,
}

/// The agent enforces this catalog version now.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CatalogAck {
    #[prost(string, tag = "1")]
    pub vnf: String,
    #[prost(uint64, tag = "2")]
    pub version: u64,
}

/// Push: an instance has new keys (its agent restarted, or its chain epoch rolled).
/// Only its identity: an agent that has it as a peer asks again (VerifyPeer), so its keys
/// and endpoint reach only the instances Sec-EM admits as its peers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RekeyNotice {
    #[prost(bytes = "vec", tag = "1")]
    pub instance_key: Vec<u8>,
}

/// Push: an instance was revoked; drop its tunnel and keys.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RevokeNotice {
    #[prost(bytes = "vec", tag = "1")]
    pub instance_key: Vec<u8>,
    #[prost(string, tag = "2")]
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum RefusalCode {
    Unspecified = 0,
    /// The reveal does not extend the chain: wrong image or nonce.
    WrongMeasurement = 1,
    UnknownInstance = 2,
    Revoked = 3,
    Replayed = 4,
    SkipTooFar = 5,
    WrongEpoch = 6,
    BadRenewal = 7,
    /// The pair is not allowed (tenant, catalogs, state).
    PeerNotAllowed = 8,
    PeerUnknown = 9,
    MalformedMessage = 10,
    NotAuthorized = 11,
    InvalidCatalog = 12,
    Unavailable = 13,
    Quarantined = 14,
    InvalidRequest = 15,
    AlreadyExists = 16,
    /// Too many requests of this kind from this peer: retry later.
    RateLimited = 17,
    /// The answer (or what the request would make Sec-EM push) does not fit in a frame:
    /// ask for a smaller page.
    TooLarge = 18,
}

/// A refused request, with a typed reason and a human message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Refusal {
    #[prost(enumeration = "RefusalCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DigestMsg {
    /// "crc32", "md5", "sha1", "sha256" or "sha512".
    #[prost(string, tag = "1")]
    pub algorithm: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// Register a VNF: its VNFD (with the Sec-catalog) and the golden digests of its image.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OnboardRequest {
    #[prost(string, tag = "1")]
    pub vnfd_yaml: String,
    #[prost(message, repeated, tag = "2")]
    pub digests: Vec<DigestMsg>,
    #[prost(uint64, tag = "3")]
    pub image_bytes: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateInstanceRequest {
    #[prost(string, tag = "1")]
    pub tenant: String,
    #[prost(string, tag = "2")]
    pub vnf: String,
    /// Empty: Sec-EM picks a name.
    #[prost(string, tag = "3")]
    pub instance: String,
    #[prost(enumeration = "RoleMsg", tag = "4")]
    pub role: i32,
}

/// The bootstrap bundle: the instance's secret, handed to the VM by the VIM.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct BootstrapBundleMsg {
    /// Controller addresses, "host:port".
    #[prost(string, repeated, tag = "1")]
    pub controllers: Vec<String>,
    /// The TLS server name the controller's certificate carries.
    #[prost(string, tag = "2")]
    pub server_name: String,
    /// The controller CA to pin (PEM).
    #[prost(string, tag = "3")]
    pub ca_pem: String,
    #[prost(string, tag = "4")]
    pub tenant: String,
    #[prost(string, tag = "5")]
    pub vnf: String,
    #[prost(string, tag = "6")]
    pub instance: String,
    #[prost(bytes = "vec", tag = "7")]
    pub nonce: Vec<u8>,
    #[prost(uint32, tag = "8")]
    pub chain_length: u32,
    #[prost(enumeration = "RoleMsg", tag = "9")]
    pub role: i32,
    #[prost(string, tag = "10")]
    pub dh_group: String,
}

impl fmt::Debug for BootstrapBundleMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapBundleMsg")
            .field("controllers", &self.controllers)
            .field("tenant", &self.tenant)
            .field("vnf", &self.vnf)
            .field("instance", &self.instance)
            .field(
                "nonce",
                &format_args!("<{} secret bytes>", self.nonce.len()),
            )
            .field("chain_length", &self.chain_length)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ApplyCatalogRequest {
    #[prost(message, optional, tag = "1")]
    pub catalog: Option<CatalogMsg>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CatalogApplied {
    #[prost(string, tag = "1")]
    pub vnf: String,
    #[prost(uint64, tag = "2")]
    pub version: u64,
    /// Agents the catalog was pushed to.
    #[prost(uint32, tag = "3")]
    pub pushed_to: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ShowCatalogRequest {
    #[prost(string, tag = "1")]
    pub vnf: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RevokeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub instance_key: Vec<u8>,
    #[prost(string, tag = "2")]
    pub reason: String,
}

/// Puts an admin certificate's serial on Sec-EM's deny-list.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RevokeAdminRequest {
    /// The serial, hex (colons allowed).
    #[prost(string, tag = "1")]
    pub serial: String,
}

/// Operator queries whose answers are JSON documents (instance list and details, audit).
#[derive(Clone, PartialEq, prost::Message)]
pub struct QueryRequest {
    /// "instances", "instance", "audit", "audit-verify", "audit-checkpoint",
    /// "admin-revoked".
    #[prost(string, tag = "1")]
    pub what: String,
    #[prost(string, tag = "2")]
    pub argument: String,
    /// For listings: where the page starts (the `next` of the page before; empty for the
    /// first page).
    #[prost(string, tag = "3")]
    pub after: String,
    /// For listings: most entries in the page (0: as many as fit in a frame).
    #[prost(uint32, tag = "4")]
    pub limit: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct QueryResult {
    #[prost(string, tag = "1")]
    pub json: String,
    /// For listings: the `after` of the next page; empty when this page is the last.
    #[prost(string, tag = "2")]
    pub next: String,
}
