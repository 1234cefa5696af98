//! Names and the instance identity.
//!
//! The paper computes `ID = Tenant_ID xor VNF_ID xor Instance_ID xor Nonce`. XOR is not
//! injective (swapping two inputs, or two equal inputs cancelling, gives the same ID), so
//! ASMN hashes the same four inputs with SHA-256 over a length-prefixed encoding under a
//! domain label: distinct tuples give distinct IDs, including ("ab", "c") vs ("a", "bc").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::crypto::{HASH_LEN, Nonce, tagged_hash};

/// Longest tenant, VNF or instance name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidName {
    /// The name is empty.
    #[error("{kind} name is empty")]
    Empty {
        /// Which kind of name.
        kind: &'static str,
    },
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("{kind} name is {len} bytes long; at most {MAX_NAME_LEN} are allowed")]
    TooLong {
        /// Which kind of name.
        kind: &'static str,
        /// Its length.
        len: usize,
    },
    /// The name holds a character outside `[A-Za-z0-9._-]` or starts with `.` or `-`.
    #[error(
        "{kind} name {name:?} may use only letters, digits, '.', '_' and '-', and must start with a letter or digit"
    )]
    BadCharacter {
        /// Which kind of name.
        kind: &'static str,
        /// The refused name.
        name: String,
    },
}

fn check_name(kind: &'static str, s: &str) -> Result<(), InvalidName> {
    if s.is_empty() {
        return Err(InvalidName::Empty { kind });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(InvalidName::TooLong { kind, len: s.len() });
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !s.chars().all(ok_char) {
        return Err(InvalidName::BadCharacter {
            kind,
            name: s.chars().take(MAX_NAME_LEN).collect(),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
                let s = s.into();
                check_name($kind, &s)?;
                Ok(Self(s))
            }

            /// The name as a string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

name_type!(
    /// A tenant of the NFV infrastructure.
    TenantId,
    "tenant"
);
name_type!(
    /// A VNF (the on-boarded function, shared by all its instances).
    VnfId,
    "VNF"
);
name_type!(
    /// One instance (VM) of a VNF.
    InstanceName,
    "instance"
);

/// The role of an instance's agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// An ordinary VNF: tunnels to its peers, enforces its own catalog on ingress.
    #[default]
    Vnf,
    /// The VNF-G/W: forwards between tunnels and enforces protected VNFs' catalogs.
    Gateway,
}

impl Role {
    /// The name used in files and on command lines.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vnf => "vnf",
            Role::Gateway => "gateway",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vnf" => Ok(Role::Vnf),
            "gateway" => Ok(Role::Gateway),
            other => Err(format!("unknown role {other:?}: expected vnf or gateway")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The identity of one instance: SHA-256 over the labelled, length-prefixed tuple
/// (tenant, VNF, instance, nonce). Public: it is a hash of the secret nonce, and it names
/// the instance in every chain step, key derivation and message.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceKey([u8; HASH_LEN]);

/// Domain label of the instance identity.
pub const ID_LABEL: &str = "asmn/v1/instance-id";

impl InstanceKey {
    /// Derives the identity of an instance.
    pub fn derive(
        tenant: &TenantId,
        vnf: &VnfId,
        instance: &InstanceName,
        nonce: &Nonce,
    ) -> InstanceKey {
        InstanceKey(tagged_hash(
            ID_LABEL,
            &[
                tenant.as_str().as_bytes(),
                vnf.as_str().as_bytes(),
                instance.as_str().as_bytes(),
                nonce.expose(),
            ],
        ))
    }

    /// Wraps 32 bytes received from the wire or the store.
    pub fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }

    /// Copies a 32-byte slice; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; HASH_LEN]>::try_from(bytes).ok().map(Self)
    }

    /// The identity bytes.
    pub fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }

    /// Lower-case hex, for logs and store keys.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A short prefix for human-facing tables.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl fmt::Debug for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InstanceKey({})", self.short())
    }
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for InstanceKey {
    type Err = String;

    /// 64 hex digits, as [`InstanceKey::to_hex`] writes them.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut b = [0u8; HASH_LEN];
        hex::decode_to_slice(s, &mut b)
            .map_err(|e| format!("an instance ID is {} hex digits: {e}", 2 * HASH_LEN))?;
        Ok(InstanceKey(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(t: &str, v: &str, i: &str, n: u8) -> InstanceKey {
        InstanceKey::derive(
            &TenantId::new(t).expect("tenant"),
            &VnfId::new(v).expect("vnf"),
            &InstanceName::new(i).expect("instance"),
            &Nonce::new([n; 32]),
        )
    }

    /// Pads a name to 32 bytes and xors four of them, as the paper's formula does.
    fn paper_xor(parts: [&[u8]; 4]) -> [u8; 32] {
        let mut out = [0u8; 32];
        for p in parts {
            for (o, b) in out.iter_mut().zip(p.iter()) {
                *o ^= b;
            }
        }
        out
    }

    #[test]
    fn tuples_that_collide_under_xor_get_distinct_ids() {
        // Swapping tenant and VNF names: identical under XOR.
        let n = [7u8; 32];
        assert_eq!(
            paper_xor([b"alpha", b"beta", b"i1", &n]),
            paper_xor([b"beta", b"alpha", b"i1", &n])
        );
        assert_ne!(key("alpha", "beta", "i1", 7), key("beta", "alpha", "i1", 7));
        // Equal tenant and VNF names cancel under XOR, so any pair of equal names collides.
        assert_eq!(
            paper_xor([b"same", b"same", b"i1", &n]),
            paper_xor([b"other", b"other", b"i1", &n])
        );
        assert_ne!(key("same", "same", "i1", 7), key("other", "other", "i1", 7));
    }

    #[test]
    fn field_boundary_shifts_give_distinct_ids() {
        assert_ne!(key("ab", "c", "i", 1), key("a", "bc", "i", 1));
        assert_ne!(key("t", "ab", "c", 1), key("t", "a", "bc", 1));
    }

    #[test]
    fn nonce_changes_the_id() {
        assert_ne!(key("t", "v", "i", 1), key("t", "v", "i", 2));
        assert_eq!(key("t", "v", "i", 1), key("t", "v", "i", 1));
    }

    #[test]
    fn names_are_validated() {
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a".repeat(65)).is_err());
        assert!(TenantId::new("-x").is_err());
        assert!(TenantId::new("a b").is_err());
        assert!(TenantId::new("tenant-1.prod_a").is_ok());
    }
}
