//! The one module through which ASMN imports cryptography, and its secret types.
//!
//! Every secret (nonces, chain elements, D-H exponents and shared values, preshared
//! keys, AEAD keys) is a type from here: zeroized on drop, `Debug` prints no byte of
//! it, no `Display`, and equality is constant-time (`subtle`). Every derivation carries
//! a versioned domain label (`asmn/v1/...`) and length-prefixes its inputs, so that no
//! two different input tuples hash the same way.

use std::fmt;

use hmac::Mac;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use chacha20poly1305::{ChaCha20Poly1305, KeyInit, aead::Aead, aead::Payload};
pub use sha2::{Digest, Sha256, Sha512};

/// HMAC-SHA256.
pub type HmacSha256 = hmac::Hmac<Sha256>;

/// Length of every identity, chain element and key in bytes (SHA-256 output).
pub const HASH_LEN: usize = 32;

/// SHA-256 over a domain label and fields, each field length-prefixed (u32, big-endian)
/// so that ("ab", "c") and ("a", "bc") hash differently.
pub fn tagged_hash(label: &str, fields: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut h = Sha256::new();
    absorb(&mut h, label.as_bytes());
    for f in fields {
        absorb(&mut h, f);
    }
    h.finalize().into()
}

fn absorb(h: &mut Sha256, field: &[u8]) {
    // Fields are bounded by the callers (names are capped at 64 bytes, the rest are
    // fixed-size), so the length always fits in a u32.
    let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
    h.update(len.to_be_bytes());
    h.update(field);
}

/// HMAC-SHA256 keyed with `key` over a label and length-prefixed fields.
pub fn tagged_hmac(key: &[u8], label: &str, fields: &[&[u8]]) -> [u8; HASH_LEN] {
    // HMAC accepts keys of any length.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    let mut put = |f: &[u8]| {
        let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
        mac.update(&len.to_be_bytes());
        mac.update(f);
    };
    put(label.as_bytes());
    for f in fields {
        put(f);
    }
    mac.finalize().into_bytes().into()
}

/// HKDF-SHA256 (RFC 5869) expanding `ikm` into `out`, with the info string made of a label
/// and length-prefixed fields.
pub fn hkdf_expand(ikm: &[u8], label: &str, fields: &[&[u8]], out: &mut [u8]) {
    let mut info = Vec::with_capacity(64);
    for f in std::iter::once(label.as_bytes()).chain(fields.iter().copied()) {
        let len = u32::try_from(f.len()).unwrap_or(u32::MAX);
        info.extend_from_slice(&len.to_be_bytes());
        info.extend_from_slice(f);
    }
    let hk = hkdf::Hkdf::<Sha256>::new(None, ikm);
    // Our outputs are at most a few hundred bytes, far below 255 * 32.
    hk.expand(&info, out).unwrap_or_else(|_| unreachable!());
}

/// A fixed-size secret: zeroized on drop, redacted in `Debug`, compared in constant time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes<const N: usize>([u8; N]);

impl<const N: usize> SecretBytes<N> {
    /// Wraps `bytes`; the caller's copy should be zeroized by the caller.
    pub fn new(bytes: [u8; N]) -> Self {
        Self(bytes)
    }

    /// Copies a slice of exactly `N` bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; N]>::try_from(bytes).ok().map(Self)
    }

    /// The secret bytes, for the one place that must use them.
    pub fn expose(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> PartialEq for SecretBytes<N> {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl<const N: usize> Eq for SecretBytes<N> {}

impl<const N: usize> fmt::Debug for SecretBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{N} secret bytes>")
    }
}

/// A variable-length secret (a D-H shared value, an exponent).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretVec(Zeroizing<Vec<u8>>);

impl SecretVec {
    /// Takes ownership of `bytes`; they are zeroized when this value drops.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Constant-time comparison (for equal lengths; lengths are public).
    pub fn ct_eq(&self, other: &Self) -> bool {
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl fmt::Debug for SecretVec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} secret bytes>", self.0.len())
    }
}

macro_rules! secret_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
        pub struct $name(SecretBytes<HASH_LEN>);

        impl $name {
            /// Wraps raw bytes.
            pub fn new(bytes: [u8; HASH_LEN]) -> Self {
                Self(SecretBytes::new(bytes))
            }

            /// Copies a 32-byte slice; `None` for any other length.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                SecretBytes::from_slice(bytes).map(Self)
            }

            /// The secret bytes, for the one place that must use them.
            pub fn expose(&self) -> &[u8; HASH_LEN] {
                self.0.expose()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

secret_newtype!(
    /// The 256-bit per-instance nonce of the bootstrap bundle: the instance's secret.
    Nonce
);
secret_newtype!(
    /// One element of a hash chain (secret until revealed).
    ChainElement
);
secret_newtype!(
    /// A WireGuard preshared key derived from the pair's D-H value.
    PresharedKey
);
secret_newtype!(
    /// A symmetric key for ChaCha20-Poly1305.
    AeadKey
);

impl ChainElement {
    /// Whether this element equals `other`, in constant time.
    pub fn ct_eq(&self, other: &ChainElement) -> bool {
        self == other
    }
}
