//! The seeded hash chain of an instance (the paper's eq. 1-3, made sound).
//!
//! ```text
//! seed = HMAC-SHA256(key = nonce, "asmn/v1/seed" | ID | measurement digest | epoch)
//! h_0  = seed
//! h_k  = SHA-256("asmn/v1/chain" | ID | epoch | k | h_{k-1})     k = 1..N
//! ```
//!
//! Sec-EM stores the anchor `h_N` (it knows the nonce and the golden digest). The agent
//! reveals `h_{N-1}`, `h_{N-2}`, ... down to `h_1`, one per attestation, like S/KEY one-time
//! passwords: a revealed element lets nobody compute the next one to be revealed, whereas
//! the paper's forward direction `Hash^n = Hash(Hash^{n-1})` would let anyone who saw one
//! value compute the next. `h_0` (the seed) is never revealed; D-H exponents derive from it.
//!
//! The step hash carries the instance ID, the epoch and the index, so an element of one
//! chain never verifies in another, at another position or in another epoch.
//!
//! [`ChainProver`] keeps `O(sqrt N)` state: checkpoints every `ceil(sqrt N)` elements and
//! the elements of the current segment; for `N = 1_000_000` that is 64,000 bytes, and the
//! worst reveal recomputes one segment (1,000 hashes).
//!
//! Renewal (eq. 3): before a chain runs out, or when a changing target starts a new epoch,
//! the agent reveals the next element together with the new chain's anchor sealed with
//! ChaCha20-Poly1305 under a key derived from that element, with (ID, new epoch, new
//! length) as associated data. The anchor is not secret; the seal binds it to the reveal,
//! which only the holder of the chain can produce.

use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::crypto::{
    Aead, AeadKey, ChaCha20Poly1305, ChainElement, HASH_LEN, KeyInit, Nonce, Payload, hkdf_expand,
    tagged_hash, tagged_hmac,
};
use crate::ids::InstanceKey;

/// Label of the seed HMAC.
pub const SEED_LABEL: &str = "asmn/v1/seed";
/// Label of a chain step.
pub const STEP_LABEL: &str = "asmn/v1/chain";
/// Label of the renewal key.
pub const RENEW_LABEL: &str = "asmn/v1/renew";

/// Longest chain accepted (2^24 elements: years of one re-attestation a minute).
pub const MAX_CHAIN_LEN: u32 = 1 << 24;
/// Default number of elements a verifier lets an agent skip (lost acknowledgements).
pub const DEFAULT_WINDOW: u32 = 16;

/// What identifies one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainSpec {
    /// The instance.
    pub id: InstanceKey,
    /// The epoch (0 at enrollment, +1 at each renewal).
    pub epoch: u32,
    /// N: the anchor is `h_N`; `h_{N-1}` .. `h_1` can be revealed.
    pub length: u32,
}

/// A chain length outside `2..=MAX_CHAIN_LEN`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("chain length {0} is outside 2..={MAX_CHAIN_LEN}")]
pub struct InvalidChainLength(pub u32);

impl ChainSpec {
    /// Checks the length.
    pub fn new(id: InstanceKey, epoch: u32, length: u32) -> Result<Self, InvalidChainLength> {
        if !(2..=MAX_CHAIN_LEN).contains(&length) {
            return Err(InvalidChainLength(length));
        }
        Ok(Self { id, epoch, length })
    }
}

/// The seed `h_0` of a chain.
pub fn seed(nonce: &Nonce, id: &InstanceKey, measurement: &[u8], epoch: u32) -> ChainElement {
    ChainElement::new(tagged_hmac(
        nonce.expose(),
        SEED_LABEL,
        &[id.as_bytes(), measurement, &epoch.to_be_bytes()],
    ))
}

/// One step: `h_k` from `h_{k-1}`.
pub fn step(spec: &ChainSpec, k: u32, prev: &[u8; HASH_LEN]) -> [u8; HASH_LEN] {
    tagged_hash(
        STEP_LABEL,
        &[
            spec.id.as_bytes(),
            &spec.epoch.to_be_bytes(),
            &k.to_be_bytes(),
            prev,
        ],
    )
}

/// Computes `h_to` from `h_from` (`from <= to`).
fn walk(spec: &ChainSpec, from: u32, value: &[u8; HASH_LEN], to: u32) -> [u8; HASH_LEN] {
    let mut v = *value;
    for k in from + 1..=to {
        v = step(spec, k, &v);
    }
    v
}

/// The anchor `h_N` of the chain grown from `seed`. Sec-EM computes it at instantiation.
pub fn anchor(spec: &ChainSpec, seed: &ChainElement) -> [u8; HASH_LEN] {
    walk(spec, 0, seed.expose(), spec.length)
}

/// One revealed element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reveal {
    /// The chain's epoch.
    pub epoch: u32,
    /// k: the element is `h_k`.
    pub index: u32,
    /// `h_k`.
    pub element: ChainElement,
}

/// The agent's side: reveals the chain downwards with `O(sqrt N)` memory.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct ChainProver {
    #[zeroize(skip)]
    spec: ChainSpec,
    seed: ChainElement,
    #[zeroize(skip)]
    anchor: [u8; HASH_LEN],
    /// Distance between checkpoints.
    interval: u32,
    /// `h_{j * interval}` for the segments not yet entered.
    checkpoints: Vec<[u8; HASH_LEN]>,
    /// `h_start ..= h_next` of the current segment, ascending; revealed from the end.
    segment: Vec<[u8; HASH_LEN]>,
    /// The index revealed next; 0 when exhausted (h_0 is never revealed).
    next: u32,
}

impl std::fmt::Debug for ChainProver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainProver")
            .field("spec", &self.spec)
            .field("next", &self.next)
            .field("state_bytes", &self.state_bytes())
            .finish_non_exhaustive()
    }
}

impl ChainProver {
    /// A prover for a fresh chain: the first reveal is `h_{N-1}`.
    pub fn new(spec: ChainSpec, seed: ChainElement) -> Self {
        Self::resume(spec, seed, spec.length - 1)
    }

    /// A prover that reveals `h_next` first (after a restart, `next` is one below the
    /// index Sec-EM last accepted). `next` is clamped to `N-1`.
    pub fn resume(spec: ChainSpec, seed: ChainElement, next: u32) -> Self {
        let next = next.min(spec.length - 1);
        let interval = isqrt_ceil(spec.length);
        let count = next / interval + 1;
        let mut checkpoints = Vec::with_capacity(count as usize);
        let mut v = *seed.expose();
        checkpoints.push(v);
        for k in 1..=spec.length {
            v = step(&spec, k, &v);
            if k.is_multiple_of(interval) && k <= next {
                checkpoints.push(v);
            }
        }
        let anchor = v;
        v.zeroize();
        Self {
            spec,
            seed,
            anchor,
            interval,
            checkpoints,
            segment: Vec::with_capacity(interval as usize),
            next,
        }
    }

    /// The chain this prover reveals.
    pub fn spec(&self) -> &ChainSpec {
        &self.spec
    }

    /// The anchor `h_N` (public).
    pub fn anchor(&self) -> [u8; HASH_LEN] {
        self.anchor
    }

    /// The seed `h_0`, from which D-H exponents are derived; never revealed.
    pub fn seed(&self) -> &ChainElement {
        &self.seed
    }

    /// Elements left to reveal.
    pub fn remaining(&self) -> u32 {
        self.next
    }

    /// Bytes of state held (the structure and its buffers' capacity).
    pub fn state_bytes(&self) -> usize {
        size_of::<Self>() + (self.checkpoints.capacity() + self.segment.capacity()) * HASH_LEN
    }

    /// Reveals the next element down the chain; `None` when only `h_0` is left.
    pub fn reveal(&mut self) -> Option<Reveal> {
        if self.next == 0 {
            return None;
        }
        if self.segment.is_empty() {
            // Enter the segment holding `next`: start from its checkpoint.
            let j = (self.next / self.interval) as usize;
            let start = j as u32 * self.interval;
            let mut v = self.checkpoints.get(j).copied()?;
            for slot in self.checkpoints.iter_mut().skip(j) {
                slot.zeroize();
            }
            self.checkpoints.truncate(j);
            self.segment.push(v);
            for k in start + 1..=self.next {
                v = step(&self.spec, k, &v);
                self.segment.push(v);
            }
            v.zeroize();
        }
        let last = self.segment.len() - 1;
        let element = ChainElement::new(self.segment[last]);
        self.segment[last].zeroize();
        self.segment.truncate(last);
        let index = self.next;
        self.next -= 1;
        Some(Reveal {
            epoch: self.spec.epoch,
            index,
            element,
        })
    }
}

fn isqrt_ceil(n: u32) -> u32 {
    let r = (n as f64).sqrt() as u32;
    let mut r = r.max(1);
    while (r as u64) * (r as u64) < n as u64 {
        r += 1;
    }
    while r > 1 && ((r - 1) as u64) * ((r - 1) as u64) >= n as u64 {
        r -= 1;
    }
    r
}

/// Why a reveal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RevealError {
    /// The reveal names another epoch than the verifier's.
    #[error("reveal is for epoch {got}, the chain is at epoch {expected}")]
    WrongEpoch {
        /// The verifier's epoch.
        expected: u32,
        /// The reveal's epoch.
        got: u32,
    },
    /// The index was already used (or is above it): a replay.
    #[error("element {index} was already revealed (last accepted: {last})")]
    Replayed {
        /// The reveal's index.
        index: u32,
        /// The last accepted index.
        last: u32,
    },
    /// The reveal skips more elements than the window allows.
    #[error("element {index} skips {skip} elements; at most {window} may be skipped")]
    SkipTooFar {
        /// The reveal's index.
        index: u32,
        /// Elements skipped.
        skip: u32,
        /// The window.
        window: u32,
    },
    /// `h_0` is never revealed.
    #[error("the seed (element 0) is never revealed")]
    SeedRevealed,
    /// The element does not hash to the last accepted one: a wrong image or nonce, or
    /// another instance's chain.
    #[error(
        "element {index} does not extend the chain (wrong image, wrong nonce, or a foreign chain)"
    )]
    Mismatch {
        /// The reveal's index.
        index: u32,
    },
}

/// Why a renewal was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RenewalError {
    /// The reveal carrying the renewal was refused.
    #[error("renewal reveal refused: {0}")]
    Reveal(#[from] RevealError),
    /// The renewal is not for the next epoch.
    #[error("renewal is for epoch {got}, expected {expected}")]
    WrongEpoch {
        /// The epoch expected (current + 1).
        expected: u32,
        /// The renewal's epoch.
        got: u32,
    },
    /// The new chain length is out of range.
    #[error(transparent)]
    Length(#[from] InvalidChainLength),
    /// The seal did not open: tampered, or sealed for another instance or epoch.
    #[error("the sealed anchor does not open (tampered, or for another instance or epoch)")]
    BadSeal,
}

/// A reveal that passed [`ChainVerifier::verify`], ready to be stored and applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedReveal {
    /// Index of the accepted element.
    pub index: u32,
    /// The element.
    pub element: [u8; HASH_LEN],
}

/// Sec-EM's view of one chain: the last accepted element. Serializable into the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainVerifier {
    /// The chain.
    pub spec: ChainSpec,
    /// Index of the last accepted element (N for the anchor).
    pub last_index: u32,
    /// The last accepted element (public once revealed).
    pub last_element: [u8; HASH_LEN],
    /// How many elements a reveal may skip.
    pub window: u32,
}

impl ChainVerifier {
    /// A verifier that knows only the anchor.
    pub fn new(spec: ChainSpec, anchor: [u8; HASH_LEN], window: u32) -> Self {
        Self {
            spec,
            last_index: spec.length,
            last_element: anchor,
            window,
        }
    }

    /// Elements left below the last accepted one.
    pub fn remaining(&self) -> u32 {
        self.last_index.saturating_sub(1)
    }

    /// Checks a reveal without changing state; cheap checks first, then at most
    /// `window + 1` hashes.
    pub fn verify(&self, r: &Reveal) -> Result<VerifiedReveal, RevealError> {
        if r.epoch != self.spec.epoch {
            return Err(RevealError::WrongEpoch {
                expected: self.spec.epoch,
                got: r.epoch,
            });
        }
        if r.index >= self.last_index {
            return Err(RevealError::Replayed {
                index: r.index,
                last: self.last_index,
            });
        }
        if r.index == 0 {
            return Err(RevealError::SeedRevealed);
        }
        let skip = self.last_index - r.index - 1;
        if skip > self.window {
            return Err(RevealError::SkipTooFar {
                index: r.index,
                skip,
                window: self.window,
            });
        }
        let mut v = *r.element.expose();
        v = walk(&self.spec, r.index, &v, self.last_index);
        let same: bool = subtle::ConstantTimeEq::ct_eq(&v[..], &self.last_element[..]).into();
        if !same {
            return Err(RevealError::Mismatch { index: r.index });
        }
        Ok(VerifiedReveal {
            index: r.index,
            element: *r.element.expose(),
        })
    }

    /// Records a verified reveal.
    pub fn apply(&mut self, v: &VerifiedReveal) {
        self.last_index = v.index;
        self.last_element = v.element;
    }

    /// [`verify`](Self::verify) then [`apply`](Self::apply).
    pub fn accept(&mut self, r: &Reveal) -> Result<(), RevealError> {
        let v = self.verify(r)?;
        self.apply(&v);
        Ok(())
    }

    /// Checks a renewal and returns the verifier of the new chain, without changing this
    /// one (the caller stores the result by compare-and-swap, then uses it).
    pub fn verify_renewal(
        &self,
        reveal: &Reveal,
        renewal: &SealedRenewal,
    ) -> Result<ChainVerifier, RenewalError> {
        self.verify(reveal)?;
        let expected = self.spec.epoch.wrapping_add(1);
        if renewal.new_epoch != expected {
            return Err(RenewalError::WrongEpoch {
                expected,
                got: renewal.new_epoch,
            });
        }
        let spec = ChainSpec::new(self.spec.id, renewal.new_epoch, renewal.new_length)?;
        let anchor = open_anchor(&reveal.element, &spec, &renewal.ciphertext)?;
        Ok(ChainVerifier::new(spec, anchor, self.window))
    }
}

/// The next chain's anchor, sealed under a key derived from the element revealed with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedRenewal {
    /// Epoch of the new chain (current + 1).
    pub new_epoch: u32,
    /// Length of the new chain.
    pub new_length: u32,
    /// ChaCha20-Poly1305 of the 32-byte anchor (48 bytes with the tag).
    pub ciphertext: Vec<u8>,
}

fn renewal_key(element: &ChainElement, spec: &ChainSpec) -> AeadKey {
    let mut k = [0u8; HASH_LEN];
    hkdf_expand(
        element.expose(),
        RENEW_LABEL,
        &[spec.id.as_bytes(), &spec.epoch.to_be_bytes()],
        &mut k,
    );
    let key = AeadKey::new(k);
    k.zeroize();
    key
}

fn renewal_aad(spec: &ChainSpec) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HASH_LEN + 8);
    aad.extend_from_slice(spec.id.as_bytes());
    aad.extend_from_slice(&spec.epoch.to_be_bytes());
    aad.extend_from_slice(&spec.length.to_be_bytes());
    aad
}

// Each key is derived from a one-time chain element and the new epoch, so it seals exactly
// one message: a fixed nonce is safe.
const RENEWAL_NONCE: [u8; 12] = [0; 12];

/// Seals the anchor of `new` under the element being revealed (`reveal` must be the
/// element the prover reveals with this renewal).
pub fn seal_renewal(
    reveal: &Reveal,
    new: &ChainSpec,
    new_anchor: &[u8; HASH_LEN],
) -> SealedRenewal {
    let key = renewal_key(&reveal.element, new);
    let cipher = ChaCha20Poly1305::new(key.expose().into());
    let aad = renewal_aad(new);
    let ciphertext = cipher
        .encrypt(
            (&RENEWAL_NONCE).into(),
            Payload {
                msg: new_anchor,
                aad: &aad,
            },
        )
        .unwrap_or_default();
    SealedRenewal {
        new_epoch: new.epoch,
        new_length: new.length,
        ciphertext,
    }
}

fn open_anchor(
    element: &ChainElement,
    new: &ChainSpec,
    ciphertext: &[u8],
) -> Result<[u8; HASH_LEN], RenewalError> {
    if ciphertext.len() != HASH_LEN + 16 {
        return Err(RenewalError::BadSeal);
    }
    let key = renewal_key(element, new);
    let cipher = ChaCha20Poly1305::new(key.expose().into());
    let aad = renewal_aad(new);
    let plain = cipher
        .decrypt(
            (&RENEWAL_NONCE).into(),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| RenewalError::BadSeal)?;
    <[u8; HASH_LEN]>::try_from(plain.as_slice()).map_err(|_| RenewalError::BadSeal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{InstanceName, TenantId, VnfId};

    fn id(n: u8) -> InstanceKey {
        InstanceKey::derive(
            &TenantId::new("t").expect("t"),
            &VnfId::new("v").expect("v"),
            &InstanceName::new(format!("i{n}")).expect("i"),
            &Nonce::new([n; 32]),
        )
    }

    fn setup(n: u8, len: u32) -> (ChainProver, ChainVerifier) {
        let key = id(n);
        let spec = ChainSpec::new(key, 0, len).expect("spec");
        let s = seed(&Nonce::new([n; 32]), &key, b"digest", 0);
        let a = anchor(&spec, &s);
        (
            ChainProver::new(spec, s),
            ChainVerifier::new(spec, a, DEFAULT_WINDOW),
        )
    }

    #[test]
    fn every_element_verifies_in_order_then_exhausts() {
        for len in [2u32, 3, 4, 5, 10, 99, 100, 101] {
            let (mut p, mut v) = setup(1, len);
            assert_eq!(p.anchor(), v.last_element);
            let mut count = 0;
            while let Some(r) = p.reveal() {
                assert_eq!(r.index, len - 1 - count);
                v.accept(&r).expect("genuine reveal");
                count += 1;
            }
            assert_eq!(count, len - 1, "length {len}");
            assert_eq!(v.remaining(), 0);
        }
    }

    #[test]
    fn replay_is_refused() {
        let (mut p, mut v) = setup(1, 50);
        let r = p.reveal().expect("r");
        v.accept(&r).expect("first");
        assert!(matches!(v.accept(&r), Err(RevealError::Replayed { .. })));
    }

    #[test]
    fn skips_within_the_window_pass_and_beyond_are_refused() {
        let (mut p, mut v) = setup(1, 100);
        for _ in 0..DEFAULT_WINDOW {
            p.reveal();
        }
        let r = p.reveal().expect("r");
        v.accept(&r).expect("skip of exactly the window");
        for _ in 0..=DEFAULT_WINDOW {
            p.reveal();
        }
        let r = p.reveal().expect("r");
        assert!(matches!(v.verify(&r), Err(RevealError::SkipTooFar { .. })));
    }

    #[test]
    fn foreign_chain_element_is_refused() {
        let (mut p1, _) = setup(1, 50);
        let (_, v2) = setup(2, 50);
        let r = p1.reveal().expect("r");
        assert!(matches!(v2.verify(&r), Err(RevealError::Mismatch { .. })));
    }

    #[test]
    fn paper_direction_next_element_is_refused() {
        let (mut p, mut v) = setup(1, 50);
        let r = p.reveal().expect("r");
        v.accept(&r).expect("first");
        // An eavesdropper hashes the last accepted element forwards (the paper's direction)
        // and offers it at the next index down, or at the index above.
        let last = v.last_element;
        for (index, prev) in [(r.index - 1, last), (r.index + 1, last)] {
            let forged = Reveal {
                epoch: 0,
                index,
                element: ChainElement::new(step(&v.spec, index, &prev)),
            };
            assert!(v.verify(&forged).is_err());
        }
    }

    #[test]
    fn wrong_image_seed_fails_the_first_reveal() {
        let key = id(1);
        let spec = ChainSpec::new(key, 0, 20).expect("spec");
        let golden = seed(&Nonce::new([1; 32]), &key, b"golden", 0);
        let v = ChainVerifier::new(spec, anchor(&spec, &golden), 4);
        let fake = seed(
            &Nonce::new([1; 32]),
            &key,
            b"golden-with-one-byte-changed",
            0,
        );
        let mut p = ChainProver::new(spec, fake);
        assert!(matches!(
            v.verify(&p.reveal().expect("r")),
            Err(RevealError::Mismatch { .. })
        ));
    }

    #[test]
    fn resume_continues_where_the_verifier_is() {
        let (mut p, mut v) = setup(3, 500);
        for _ in 0..123 {
            v.accept(&p.reveal().expect("r")).expect("ok");
        }
        let spec = v.spec;
        let s = seed(&Nonce::new([3; 32]), &spec.id, b"digest", 0);
        let mut q = ChainProver::resume(spec, s, v.last_index - 1);
        while let Some(r) = q.reveal() {
            v.accept(&r).expect("resumed reveal");
        }
        assert_eq!(v.remaining(), 0);
    }

    #[test]
    fn million_element_chain_in_64_kib() {
        let (mut p, mut v) = setup(9, 1_000_000);
        let mut max = std::time::Duration::ZERO;
        let mut n = 0u32;
        let mut peak = p.state_bytes();
        loop {
            let t = std::time::Instant::now();
            let Some(r) = p.reveal() else { break };
            max = max.max(t.elapsed());
            peak = peak.max(p.state_bytes());
            // Verify a sample (verification is Sec-EM's cost, not the prover's).
            if n.is_multiple_of(997) {
                v.last_index = r.index + 1;
                v.last_element = step(&v.spec, r.index + 1, r.element.expose());
                v.accept(&r).expect("sampled reveal");
            }
            n += 1;
        }
        assert_eq!(n, 999_999);
        assert!(peak <= 64 * 1024, "prover state {peak} bytes");
        // The budget is 2 ms per reveal in release (see the benchmark); this only catches
        // a 10x regression in a debug build on a busy machine.
        assert!(
            max < std::time::Duration::from_millis(50),
            "worst reveal {max:?}"
        );
    }

    fn renewal_setup() -> (ChainProver, ChainVerifier, Reveal, ChainSpec, [u8; 32]) {
        let (mut p, v) = setup(4, 30);
        let r = p.reveal().expect("r");
        let new = ChainSpec::new(v.spec.id, 1, 40).expect("spec");
        let s1 = seed(&Nonce::new([4; 32]), &new.id, b"new-digest", 1);
        let a1 = anchor(&new, &s1);
        (p, v, r, new, a1)
    }

    #[test]
    fn renewal_installs_the_new_chain() {
        let (_, mut v, r, new, a1) = renewal_setup();
        let sealed = seal_renewal(&r, &new, &a1);
        let next = v.verify_renewal(&r, &sealed).expect("renewal");
        assert_eq!(next.spec, new);
        assert_eq!(next.last_element, a1);
        // The old chain's reveal cannot renew again once the verifier moved on.
        v = next;
        assert!(v.verify_renewal(&r, &sealed).is_err(), "replayed renewal");
    }

    #[test]
    fn tampered_and_foreign_renewals_are_refused() {
        let (_, v, r, new, a1) = renewal_setup();
        let mut sealed = seal_renewal(&r, &new, &a1);
        sealed.ciphertext[5] ^= 1;
        assert_eq!(v.verify_renewal(&r, &sealed), Err(RenewalError::BadSeal));

        let mut longer = seal_renewal(&r, &new, &a1);
        longer.new_length += 1;
        assert_eq!(v.verify_renewal(&r, &longer), Err(RenewalError::BadSeal));

        // Sealed for another instance: the same element, another ID in the AAD and key.
        let other = ChainSpec::new(id(5), 1, 40).expect("spec");
        let foreign = seal_renewal(&r, &other, &a1);
        assert_eq!(v.verify_renewal(&r, &foreign), Err(RenewalError::BadSeal));

        let skipped = seal_renewal(&r, &ChainSpec::new(new.id, 2, 40).expect("s"), &a1);
        assert!(matches!(
            v.verify_renewal(&r, &skipped),
            Err(RenewalError::WrongEpoch { .. })
        ));
    }

    #[test]
    fn isqrt() {
        for n in 1..2000u32 {
            let r = isqrt_ceil(n) as u64;
            assert!(r * r >= n as u64 && (r - 1) * (r - 1) < n as u64, "{n}");
        }
    }
}
