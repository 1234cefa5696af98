//! Phase 2: pairwise keys by finite-field Diffie-Hellman with hash-chain exponents.
//!
//! The paper lets Sec-EM pick p and q (a 300-bit prime in its evaluation). ASMN accepts
//! only the RFC 7919 groups by name, ffdhe3072 and larger: safe primes `p = 2q + 1` with
//! generator 2, which generates the subgroup of prime order q.
//!
//! ```text
//! x_i  = HKDF(h_0 of i's chain, "asmn/v1/dh-exponent" | ID_i | epoch_i)   (RFC 7919 §5.2 size)
//! R_i  = 2^x_i mod p
//! K_ij = R_j^x_i mod p          after checking 1 < R_j < p-1 and (R_j / p) = 1
//! PSK  = HKDF(K_ij, "asmn/v1/wg-psk" | lower (ID, epoch) | higher (ID, epoch))
//! ```
//!
//! The subgroup check uses the Jacobi symbol: for a safe prime, an element lies in the
//! order-q subgroup exactly when it is a quadratic residue, which costs a GCD-like loop
//! instead of a full-size exponentiation.
//!
//! Exponentiation with a secret exponent must not leak the exponent through its timing.
//! `num-bigint`'s `modpow` is variable-time, so with the default `libcrypto` feature the
//! secret exponentiations run in OpenSSL's constant-time Montgomery ladder
//! (`BN_mod_exp_mont_consttime`, also about five times faster here); `num-bigint` parses
//! and validates public values, and does the exponentiation only in builds without
//! libcrypto (documented as variable-time there).
//!
//! Exponents and shared values live in zeroized buffers; libcrypto's temporaries are
//! cleared before they are freed, `num-bigint`'s are not (it offers no way to).

mod groups;

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use num_bigint::BigUint;
use num_traits::One;
use thiserror::Error;
use zeroize::Zeroize;

use crate::crypto::{ChainElement, HASH_LEN, PresharedKey, SecretVec, hkdf_expand};
use crate::ids::InstanceKey;

/// Label of the exponent derivation.
pub const EXPONENT_LABEL: &str = "asmn/v1/dh-exponent";
/// Label of the WireGuard preshared key derivation.
pub const PSK_LABEL: &str = "asmn/v1/wg-psk";

/// An RFC 7919 group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Group {
    /// ffdhe3072 (the default; about 128-bit security).
    #[default]
    Ffdhe3072,
    /// ffdhe4096.
    Ffdhe4096,
    /// ffdhe6144.
    Ffdhe6144,
    /// ffdhe8192.
    Ffdhe8192,
}

/// A group name that is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnsupportedGroup {
    /// An RFC 7919 group below 3072 bits.
    #[error("D-H group {0} is too small: use ffdhe3072, ffdhe4096, ffdhe6144 or ffdhe8192")]
    TooSmall(String),
    /// Anything else: custom primes are not accepted.
    #[error(
        "unknown D-H group {0:?}: only the RFC 7919 groups ffdhe3072, ffdhe4096, ffdhe6144 and ffdhe8192 are accepted"
    )]
    Unknown(String),
}

struct Params {
    p: BigUint,
    p_minus_1: BigUint,
    g: BigUint,
}

impl Group {
    /// Every accepted group.
    pub const ALL: [Group; 4] = [
        Group::Ffdhe3072,
        Group::Ffdhe4096,
        Group::Ffdhe6144,
        Group::Ffdhe8192,
    ];

    /// The RFC 7919 name.
    pub fn name(self) -> &'static str {
        match self {
            Group::Ffdhe3072 => "ffdhe3072",
            Group::Ffdhe4096 => "ffdhe4096",
            Group::Ffdhe6144 => "ffdhe6144",
            Group::Ffdhe8192 => "ffdhe8192",
        }
    }

    /// Size of p in bits.
    pub fn bits(self) -> usize {
        match self {
            Group::Ffdhe3072 => 3072,
            Group::Ffdhe4096 => 4096,
            Group::Ffdhe6144 => 6144,
            Group::Ffdhe8192 => 8192,
        }
    }

    /// Size of an encoded public value or shared value in bytes.
    pub fn element_len(self) -> usize {
        self.bits() / 8
    }

    /// Exponent size in bytes: RFC 7919 §5.2's minimum (275, 325, 375, 400 bits), rounded
    /// up to whole bytes.
    pub fn exponent_len(self) -> usize {
        match self {
            Group::Ffdhe3072 => 35,
            Group::Ffdhe4096 => 41,
            Group::Ffdhe6144 => 47,
            Group::Ffdhe8192 => 50,
        }
    }

    fn prime_hex(self) -> &'static str {
        match self {
            Group::Ffdhe3072 => groups::FFDHE3072_P,
            Group::Ffdhe4096 => groups::FFDHE4096_P,
            Group::Ffdhe6144 => groups::FFDHE6144_P,
            Group::Ffdhe8192 => groups::FFDHE8192_P,
        }
    }

    fn params(self) -> &'static Params {
        static CELLS: [OnceLock<Params>; 4] = [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ];
        let i = self as usize;
        CELLS[i].get_or_init(|| {
            let p = BigUint::parse_bytes(self.prime_hex().as_bytes(), 16)
                .unwrap_or_else(|| unreachable!("the RFC 7919 constants are valid hex"));
            Params {
                p_minus_1: &p - 1u32,
                p,
                g: BigUint::from(2u32),
            }
        })
    }

    /// The prime p.
    pub fn prime(self) -> &'static BigUint {
        &self.params().p
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Group {
    type Err = UnsupportedGroup;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "ffdhe3072" => Ok(Group::Ffdhe3072),
            "ffdhe4096" => Ok(Group::Ffdhe4096),
            "ffdhe6144" => Ok(Group::Ffdhe6144),
            "ffdhe8192" => Ok(Group::Ffdhe8192),
            "ffdhe2048" | "modp1024" | "modp1536" | "modp2048" => {
                Err(UnsupportedGroup::TooSmall(lower))
            }
            _ => Err(UnsupportedGroup::Unknown(s.chars().take(32).collect())),
        }
    }
}

/// A public value R that was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidPublic {
    /// The encoding has the wrong length for the group.
    #[error("public value is {got} bytes; the group needs exactly {expected}")]
    Length {
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// 0, 1, p-1 or a value >= p.
    #[error("public value is out of range (0, 1, p-1 and values >= p are refused)")]
    OutOfRange,
    /// Not in the prime-order subgroup.
    #[error("public value is outside the prime-order subgroup")]
    NotInSubgroup,
}

/// An encoded public value `R = 2^x mod p`: big-endian, exactly the group's length.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DhPublic(Vec<u8>);

impl DhPublic {
    /// The encoding.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Validates an encoding received from the wire.
    pub fn validate(group: Group, bytes: &[u8]) -> Result<DhPublic, InvalidPublic> {
        parse_public(group, bytes)?;
        Ok(DhPublic(bytes.to_vec()))
    }
}

impl fmt::Debug for DhPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "DhPublic({}..{})",
            hex::encode(&self.0[..n.min(4)]),
            hex::encode(&self.0[n.saturating_sub(4)..])
        )
    }
}

fn parse_public(group: Group, bytes: &[u8]) -> Result<BigUint, InvalidPublic> {
    if bytes.len() != group.element_len() {
        return Err(InvalidPublic::Length {
            expected: group.element_len(),
            got: bytes.len(),
        });
    }
    let prm = group.params();
    let r = BigUint::from_bytes_be(bytes);
    if r <= BigUint::one() || r >= prm.p_minus_1 {
        return Err(InvalidPublic::OutOfRange);
    }
    if jacobi(&r, &prm.p) != 1 {
        return Err(InvalidPublic::NotInSubgroup);
    }
    Ok(r)
}

/// The Jacobi symbol (a / n) for odd n > 0: the binary algorithm on 64-bit limbs, in
/// place (every enrollment and peer description validates a 3072-bit or larger value).
fn jacobi(a: &BigUint, n: &BigUint) -> i8 {
    let mut x = (a % n).to_u64_digits();
    let mut y = n.to_u64_digits();
    if y.first().is_none_or(|w| w & 1 == 0) {
        return 0;
    }
    let mut len = y.len();
    x.resize(len, 0);
    let mut t = 1i8;
    loop {
        while len > 1 && x[len - 1] == 0 && y[len - 1] == 0 {
            len -= 1;
        }
        let (xs, ys) = (&mut x[..len], &y[..len]);
        let Some(first) = xs.iter().position(|&w| w != 0) else {
            let one = ys[0] == 1 && ys[1..].iter().all(|&w| w == 0);
            return if one { t } else { 0 };
        };
        let tz = first as u32 * 64 + xs[first].trailing_zeros();
        if tz > 0 {
            shift_right(xs, tz);
            if tz & 1 == 1 && matches!(ys[0] & 7, 3 | 5) {
                t = -t;
            }
        }
        // Both odd now.
        if less_than(xs, ys) {
            std::mem::swap(&mut x, &mut y);
            if x[0] & 3 == 3 && y[0] & 3 == 3 {
                t = -t;
            }
        }
        subtract(&mut x[..len], &y[..len]);
    }
}

fn shift_right(v: &mut [u64], bits: u32) {
    let words = (bits / 64) as usize;
    let bits = bits % 64;
    let n = v.len();
    for i in 0..n {
        let lo = v.get(i + words).copied().unwrap_or(0);
        let hi = v.get(i + words + 1).copied().unwrap_or(0);
        v[i] = if bits == 0 {
            lo
        } else {
            (lo >> bits) | (hi << (64 - bits))
        };
    }
}

fn less_than(a: &[u64], b: &[u64]) -> bool {
    for (x, y) in a.iter().rev().zip(b.iter().rev()) {
        if x != y {
            return x < y;
        }
    }
    false
}

/// `a -= b` (a >= b).
fn subtract(a: &mut [u64], b: &[u64]) {
    let mut borrow = false;
    for (x, &y) in a.iter_mut().zip(b) {
        let (d1, b1) = x.overflowing_sub(y);
        let (d2, b2) = d1.overflowing_sub(u64::from(borrow));
        *x = d2;
        borrow = b1 || b2;
    }
}

fn encode(group: Group, v: &BigUint) -> Vec<u8> {
    let raw = v.to_bytes_be();
    let mut out = vec![0u8; group.element_len().saturating_sub(raw.len())];
    out.extend_from_slice(&raw);
    out
}

/// One side's D-H key for one epoch: the exponent (secret) and R (public).
pub struct DhKeyPair {
    group: Group,
    exponent: SecretVec,
    public: DhPublic,
}

impl fmt::Debug for DhKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DhKeyPair")
            .field("group", &self.group)
            .field("exponent", &self.exponent)
            .field("public", &self.public)
            .finish()
    }
}

impl DhKeyPair {
    /// Derives the key pair of instance `id` at `epoch` from its chain seed `h_0`.
    pub fn derive(group: Group, seed: &ChainElement, id: &InstanceKey, epoch: u32) -> Self {
        let mut x = vec![0u8; group.exponent_len()];
        hkdf_expand(
            seed.expose(),
            EXPONENT_LABEL,
            &[id.as_bytes(), &epoch.to_be_bytes(), group.name().as_bytes()],
            &mut x,
        );
        // A zero exponent has probability 2^-280; make it impossible anyway.
        if x.iter().all(|&b| b == 0) {
            x[0] = 1;
        }
        let exponent = SecretVec::new(x);
        let public = DhPublic(secret_pow(group, &group.params().g, &exponent));
        Self {
            group,
            exponent,
            public,
        }
    }

    /// The group.
    pub fn group(&self) -> Group {
        self.group
    }

    /// R, to publish through Sec-EM.
    pub fn public(&self) -> &DhPublic {
        &self.public
    }

    /// K_ij = R_peer^x mod p. `peer` was validated when it was decoded.
    pub fn shared_secret(&self, peer: &DhPublic) -> Result<SecretVec, InvalidPublic> {
        if peer.0.len() != self.group.element_len() {
            // A value validated in another group.
            return Err(InvalidPublic::Length {
                expected: self.group.element_len(),
                got: peer.0.len(),
            });
        }
        let r = BigUint::from_bytes_be(&peer.0);
        Ok(SecretVec::new(secret_pow(self.group, &r, &self.exponent)))
    }

    /// The WireGuard preshared key between `me` and `peer`, each an (identity, epoch);
    /// `peer_public` is the peer's validated R. Both sides derive the same key.
    pub fn preshared_key(
        &self,
        me: (&InstanceKey, u32),
        peer: (&InstanceKey, u32),
        peer_public: &DhPublic,
    ) -> Result<PresharedKey, InvalidPublic> {
        let k = self.shared_secret(peer_public)?;
        Ok(psk_from_shared(&k, me, peer))
    }
}

/// `base^exponent mod p`, encoded to the group's length, in constant time with libcrypto.
#[cfg(feature = "libcrypto")]
fn secret_pow(group: Group, base: &BigUint, exponent: &SecretVec) -> Vec<u8> {
    use openssl::bn::{BigNum, BigNumContext};
    let run = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
        let p = BigNum::from_slice(&group.params().p.to_bytes_be())?;
        let b = BigNum::from_slice(&base.to_bytes_be())?;
        let mut x = BigNum::from_slice(exponent.expose())?;
        x.set_const_time();
        let mut out = BigNum::new()?;
        out.set_const_time();
        let mut ctx = BigNumContext::new()?;
        out.mod_exp(&b, &x, &p, &mut ctx)?;
        let len = i32::try_from(group.element_len()).unwrap_or(i32::MAX);
        let v = out.to_vec_padded(len)?;
        x.clear();
        out.clear();
        Ok(v)
    };
    // libcrypto fails here only on allocation failure; fall back rather than panic.
    run().unwrap_or_else(|_| variable_time_pow(group, base, exponent))
}

#[cfg(not(feature = "libcrypto"))]
fn secret_pow(group: Group, base: &BigUint, exponent: &SecretVec) -> Vec<u8> {
    variable_time_pow(group, base, exponent)
}

/// `num-bigint`'s exponentiation: correct, but its timing depends on the exponent.
fn variable_time_pow(group: Group, base: &BigUint, exponent: &SecretVec) -> Vec<u8> {
    let x = BigUint::from_bytes_be(exponent.expose());
    encode(group, &base.modpow(&x, &group.params().p))
}

/// PSK = HKDF(K_ij, label | lower (ID, epoch) | higher (ID, epoch)).
pub fn psk_from_shared(
    shared: &SecretVec,
    a: (&InstanceKey, u32),
    b: (&InstanceKey, u32),
) -> PresharedKey {
    let (lo, hi) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let mut out = [0u8; HASH_LEN];
    hkdf_expand(
        shared.expose(),
        PSK_LABEL,
        &[
            lo.0.as_bytes(),
            &lo.1.to_be_bytes(),
            hi.0.as_bytes(),
            &hi.1.to_be_bytes(),
        ],
        &mut out,
    );
    let psk = PresharedKey::new(out);
    out.zeroize();
    psk
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Nonce;
    use crate::ids::{InstanceName, TenantId, VnfId};

    fn id(n: u8) -> InstanceKey {
        InstanceKey::derive(
            &TenantId::new("t").expect("t"),
            &VnfId::new("v").expect("v"),
            &InstanceName::new(format!("i{n}")).expect("i"),
            &Nonce::new([n; 32]),
        )
    }

    #[test]
    fn groups_by_name_and_refusals() {
        assert_eq!("ffdhe3072".parse::<Group>(), Ok(Group::Ffdhe3072));
        assert_eq!("FFDHE8192".parse::<Group>(), Ok(Group::Ffdhe8192));
        assert!(matches!(
            "ffdhe2048".parse::<Group>(),
            Err(UnsupportedGroup::TooSmall(_))
        ));
        assert!(matches!(
            "p300-paper".parse::<Group>(),
            Err(UnsupportedGroup::Unknown(_))
        ));
    }

    #[test]
    fn primes_have_the_rfc_7919_shape() {
        for g in Group::ALL {
            let p = g.prime();
            assert_eq!(p.bits() as usize, g.bits());
            let bytes = p.to_bytes_be();
            assert!(bytes[..8].iter().all(|&b| b == 0xff), "{g} top 64 bits");
            assert!(
                bytes[bytes.len() - 8..].iter().all(|&b| b == 0xff),
                "{g} low 64 bits"
            );
            // p = 7 mod 8, so 2 is a quadratic residue and generates the order-q subgroup.
            assert_eq!(p % 8u32, BigUint::from(7u32));
        }
        // And 2^q = 1 mod p for the default group (q = (p-1)/2).
        let p = Group::Ffdhe3072.prime();
        let q = (p - 1u32) >> 1;
        assert!(BigUint::from(2u32).modpow(&q, p).is_one());
    }

    /// The first INTEGER of a DER SEQUENCE (PKCS#3 DHParameter: prime, generator).
    fn der_first_integer(der: &[u8]) -> Option<&[u8]> {
        fn header(b: &[u8]) -> Option<(u8, usize, usize)> {
            let tag = *b.first()?;
            let l0 = *b.get(1)?;
            if l0 < 0x80 {
                return Some((tag, usize::from(l0), 2));
            }
            let n = usize::from(l0 & 0x7f);
            let len = b
                .get(2..2 + n)?
                .iter()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x));
            Some((tag, len, 2 + n))
        }
        let (t, _, h) = header(der)?;
        (t == 0x30).then_some(())?;
        let rest = der.get(h..)?;
        let (t, len, h) = header(rest)?;
        (t == 0x02).then_some(())?;
        rest.get(h..h + len)
    }

    #[test]
    fn primes_match_the_local_openssl() {
        use base64::Engine;
        for g in Group::ALL {
            let out = std::process::Command::new("openssl")
                .args(["genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt"])
                .arg(format!("group:{}", g.name()))
                .output();
            let Ok(out) = out else {
                assert!(
                    std::env::var("CI").is_err(),
                    "openssl is required under CI to cross-check the RFC 7919 primes"
                );
                crate::skip::note("openssl is not installed");
                return;
            };
            let pem = String::from_utf8_lossy(&out.stdout);
            let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("openssl PEM");
            let p = der_first_integer(&der).expect("DHParameter prime");
            assert_eq!(&BigUint::from_bytes_be(p), g.prime(), "{g}");
        }
    }

    #[test]
    fn invalid_public_values_are_refused() {
        let g = Group::Ffdhe3072;
        let p = g.prime();
        let enc = |v: &BigUint| encode(g, v);
        for bad in [BigUint::from(0u32), BigUint::one(), p - 1u32, p.clone()] {
            assert_eq!(
                DhPublic::validate(g, &enc(&bad)),
                Err(InvalidPublic::OutOfRange),
                "{bad:x}"
            );
        }
        assert!(DhPublic::validate(g, &[0xff; 384]).is_err());
        // -1 * 4 = p - 4 is a non-residue (since -1 is not a residue for p = 3 mod 4).
        let non_residue = p - 4u32;
        assert_eq!(
            DhPublic::validate(g, &enc(&non_residue)),
            Err(InvalidPublic::NotInSubgroup)
        );
        assert!(matches!(
            DhPublic::validate(g, &[1, 2, 3]),
            Err(InvalidPublic::Length { .. })
        ));
        // 4 = 2^2 is in the subgroup.
        DhPublic::validate(g, &enc(&BigUint::from(4u32))).expect("4 is a residue");
    }

    #[test]
    fn jacobi_agrees_with_euler_on_large_values() {
        // Euler's criterion, a^((p-1)/2) mod p, on the group's own prime.
        let p = &Group::Ffdhe3072.params().p;
        let exp = (p - 1u32) >> 1;
        for seed in 1u8..=24 {
            let k = DhKeyPair::derive(
                Group::Ffdhe3072,
                &ChainElement::new([seed; 32]),
                &id(seed),
                0,
            );
            let r = BigUint::from_bytes_be(k.public().as_bytes());
            for a in [r.clone(), &r + 1u32, &r * 3u32 % p] {
                let euler = a.modpow(&exp, p);
                let expected = if euler.is_one() { 1 } else { -1 };
                assert_eq!(jacobi(&a, p), expected);
            }
        }
    }

    #[test]
    fn jacobi_agrees_with_euler_on_small_primes() {
        for p in [7u32, 11, 23, 47, 59, 83] {
            let pb = BigUint::from(p);
            for a in 1..p {
                let euler = BigUint::from(a).modpow(&BigUint::from((p - 1) / 2), &pb);
                let expected = if euler.is_one() { 1 } else { -1 };
                assert_eq!(jacobi(&BigUint::from(a), &pb), expected, "({a}/{p})");
            }
        }
    }

    #[test]
    fn both_sides_derive_the_same_psk() {
        let (a, b) = (id(1), id(2));
        let sa = ChainElement::new([1; 32]);
        let sb = ChainElement::new([2; 32]);
        let ka = DhKeyPair::derive(Group::Ffdhe3072, &sa, &a, 0);
        let kb = DhKeyPair::derive(Group::Ffdhe3072, &sb, &b, 0);
        let pa = ka.preshared_key((&a, 0), (&b, 0), kb.public()).expect("a");
        let pb = kb.preshared_key((&b, 0), (&a, 0), ka.public()).expect("b");
        assert_eq!(pa, pb);
        // libcrypto's constant-time exponentiation agrees with num-bigint's.
        let x = SecretVec::new(vec![0x5a; Group::Ffdhe3072.exponent_len()]);
        let base = BigUint::from_bytes_be(kb.public().as_bytes());
        assert_eq!(
            secret_pow(Group::Ffdhe3072, &base, &x),
            variable_time_pow(Group::Ffdhe3072, &base, &x)
        );
    }
}
