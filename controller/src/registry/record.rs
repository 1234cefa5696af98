//! The registry's records as stored: typed fields (identities, addresses, keys and
//! digests as their types; hex and "ip/prefix" only in their serde form), each record in
//! a versioned envelope.
//!
//! The envelope is the record's JSON object with a format field `"v"` beside its fields.
//! A reader refuses a record of a newer format than it knows (a clear error, not a
//! misread); a record written before the field existed is format 1. Replicas of two
//! adjacent versions share one store during a rolling upgrade: an older replica ignores
//! the field, so a new format may only add fields with defaults; anything else is a store
//! schema migration (`crate::store::schema`).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use asmn_shared::catalog::Vnfd;
use asmn_shared::chain::{ChainSpec, ChainVerifier};
use asmn_shared::ids::{InstanceKey, InstanceName, Role, TenantId, VnfId};
use asmn_shared::measure::{Algorithm, DigestValue};
use asmn_shared::wire::Overlay;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_with::hex::Hex;
use serde_with::{DisplayFromStr, serde_as};

use super::RegistryError;

/// A record kind the registry stores, with its current format.
pub trait Record: Serialize + DeserializeOwned {
    /// What the record is, for errors.
    const KIND: &'static str;
    /// The format this version writes and the newest it reads.
    const FORMAT: u32;
}

/// The envelope: the record's fields and its format.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    #[serde(rename = "v", default = "first_format")]
    format: u32,
    #[serde(flatten)]
    record: T,
}

fn first_format() -> u32 {
    1
}

/// The stored form of `record`.
pub fn encode<R: Record>(record: &R) -> Result<Vec<u8>, RegistryError> {
    #[derive(Serialize)]
    struct Out<'a, T> {
        v: u32,
        #[serde(flatten)]
        record: &'a T,
    }
    serde_json::to_vec(&Out {
        v: R::FORMAT,
        record,
    })
    .map_err(|e| RegistryError::Corrupt(format!("{}: {e}", R::KIND)))
}

/// A record from its stored form.
pub fn decode<R: Record>(bytes: &[u8]) -> Result<R, RegistryError> {
    let e: Envelope<R> = serde_json::from_slice(bytes)
        .map_err(|e| RegistryError::Corrupt(format!("{}: {e}", R::KIND)))?;
    if e.format > R::FORMAT {
        return Err(RegistryError::Corrupt(format!(
            "{} record of format {} (this Sec-EM reads up to {}): written by a newer Sec-EM",
            R::KIND,
            e.format,
            R::FORMAT
        )));
    }
    Ok(e.record)
}

/// An on-boarded VNF.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VnfRecord {
    /// The VNFD.
    pub vnfd: Vnfd,
    /// Golden digests of the image (SHA-256 always).
    pub golden: BTreeMap<Algorithm, DigestValue>,
    /// Image size in bytes.
    pub image_bytes: u64,
}

impl Record for VnfRecord {
    const KIND: &'static str = "VNF";
    const FORMAT: u32 = 1;
}

/// Where an instance stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "reason")]
pub enum InstanceState {
    /// Created; its bundle is out; not yet enrolled.
    Created,
    /// Enrolled and attesting.
    Enrolled,
    /// Refused (a fake VNF): never enrolled, never given to a peer.
    Quarantined(String),
    /// Revoked: cannot enroll again with this identity.
    Revoked(String),
}

/// The chain as Sec-EM tracks it.
#[serde_as]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainRecord {
    /// Epoch.
    pub epoch: u32,
    /// N.
    pub length: u32,
    /// Last accepted index (N = only the anchor so far).
    pub last_index: u32,
    /// Last accepted element (the anchor at first).
    #[serde_as(as = "Hex")]
    pub last_element: [u8; 32],
    /// Skip window.
    pub window: u32,
}

/// One instance, as stored.
#[serde_as]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// Identity.
    #[serde_as(as = "DisplayFromStr")]
    pub id: InstanceKey,
    /// Tenant.
    pub tenant: TenantId,
    /// VNF.
    pub vnf: VnfId,
    /// Instance name.
    pub instance: InstanceName,
    /// Role.
    pub role: Role,
    /// Overlay address and the tenant's prefix length.
    #[serde_as(as = "DisplayFromStr")]
    pub overlay: Overlay,
    /// State.
    pub state: InstanceState,
    /// The chain.
    pub chain: ChainRecord,
    /// WireGuard public key, once enrolled.
    #[serde_as(as = "Option<Hex>")]
    pub wg_public_key: Option<[u8; 32]>,
    /// D-H public value (validated for the tenant's group when it was accepted), once
    /// enrolled.
    #[serde_as(as = "Option<Hex>")]
    pub dh_public: Option<Vec<u8>>,
    /// Underlay endpoint, once enrolled.
    pub endpoint: Option<SocketAddr>,
    /// When the last reveal was accepted (seconds since the epoch).
    pub last_attestation: Option<u64>,
    /// Catalog version the agent acknowledged (filled in for operators from the
    /// acknowledgement key; not kept in the stored record).
    #[serde(default)]
    pub enforced_catalog: Option<u64>,
    /// How long the agent took to acknowledge that version after Sec-EM pushed it, in
    /// milliseconds (when the replica that pushed it received the acknowledgement).
    #[serde(default)]
    pub catalog_latency_ms: Option<u64>,
    /// SHA-256 of the target at the last accepted re-attestation (continuity mode tracks
    /// the target's changes with it).
    #[serde(default)]
    #[serde_as(as = "Option<Hex>")]
    pub measurement: Option<[u8; 32]>,
}

impl Record for InstanceRecord {
    const KIND: &'static str = "instance";
    const FORMAT: u32 = 1;
}

impl InstanceRecord {
    /// The verifier of the instance's chain where it stands.
    pub(crate) fn verifier(&self) -> Result<ChainVerifier, RegistryError> {
        let spec = ChainSpec::new(self.id, self.chain.epoch, self.chain.length)
            .map_err(|e| RegistryError::Corrupt(e.to_string()))?;
        Ok(ChainVerifier {
            spec,
            last_index: self.chain.last_index,
            last_element: self.chain.last_element,
            window: self.chain.window,
        })
    }
}

/// An agent's last catalog acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CatalogAckRecord {
    pub(crate) version: u64,
    pub(crate) latency_ms: Option<u64>,
}

impl Record for CatalogAckRecord {
    const KIND: &'static str = "catalog acknowledgement";
    const FORMAT: u32 = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> InstanceRecord {
        InstanceRecord {
            id: InstanceKey::from_bytes([0xab; 32]),
            tenant: TenantId::new("t").expect("tenant"),
            vnf: VnfId::new("server").expect("vnf"),
            instance: InstanceName::new("server-0").expect("name"),
            role: Role::Vnf,
            overlay: "10.77.0.5/16".parse().expect("overlay"),
            state: InstanceState::Enrolled,
            chain: ChainRecord {
                epoch: 1,
                length: 100,
                last_index: 99,
                last_element: [7; 32],
                window: 16,
            },
            wg_public_key: Some([9; 32]),
            dh_public: Some(vec![1, 2, 255]),
            endpoint: Some("192.0.2.7:51820".parse().expect("endpoint")),
            last_attestation: Some(42),
            enforced_catalog: None,
            catalog_latency_ms: None,
            measurement: Some([0x5a; 32]),
        }
    }

    /// The stored form is the one records had before they were typed (hex, "ip/prefix",
    /// "ip:port"), with the format beside: stores written before read unchanged.
    #[test]
    fn typed_records_keep_their_stored_form_and_carry_a_format() {
        let rec = record();
        let bytes = encode(&rec).expect("encode");
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(v["v"], 1);
        assert_eq!(v["id"], hex::encode([0xab; 32]));
        assert_eq!(v["overlay"], "10.77.0.5/16");
        assert_eq!(v["chain"]["last_element"], hex::encode([7; 32]));
        assert_eq!(v["wg_public_key"], hex::encode([9; 32]));
        assert_eq!(v["dh_public"], "0102ff");
        assert_eq!(v["endpoint"], "192.0.2.7:51820");
        assert_eq!(v["measurement"], hex::encode([0x5a; 32]));
        assert_eq!(decode::<InstanceRecord>(&bytes).expect("decode"), rec);
        // Written before the envelope: format 1.
        let mut old = v.clone();
        old.as_object_mut().expect("object").remove("v");
        let old = serde_json::to_vec(&old).expect("json");
        assert_eq!(decode::<InstanceRecord>(&old).expect("old record"), rec);
    }

    #[test]
    fn a_newer_format_or_a_malformed_field_is_refused_by_name() {
        let mut v: serde_json::Value =
            serde_json::from_slice(&encode(&record()).expect("encode")).expect("json");
        v["v"] = 2.into();
        let err =
            decode::<InstanceRecord>(&serde_json::to_vec(&v).expect("json")).expect_err("newer");
        assert!(err.to_string().contains("newer Sec-EM"), "{err}");
        for (field, bad) in [
            ("id", "abc"),
            ("overlay", "10.77.0.5"),
            ("endpoint", "nowhere"),
            ("wg_public_key", "00"),
        ] {
            let mut w = v.clone();
            w["v"] = 1.into();
            w[field] = bad.into();
            let err =
                decode::<InstanceRecord>(&serde_json::to_vec(&w).expect("json")).expect_err(field);
            assert!(matches!(err, RegistryError::Corrupt(_)), "{field}: {err}");
        }
    }
}
