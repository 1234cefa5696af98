//! The pure core of ASMN (Auto-configurable Security Mechanism for NFV).
//!
//! Everything the agent, the Sec-EM controller and the lab agree on lives here:
//!
//! - [`measure`]: one streaming pass over an image computing any set of CRC32, MD5,
//!   SHA-1, SHA-256 and SHA-512, the work spread over the available cores;
//! - [`ids`]: tenant, VNF and instance names, and the injective instance identity;
//! - [`chain`]: the seeded hash chain revealed in reverse order (Phase 1 of the
//!   paper), its low-memory prover, its verifier, and the sealed chain renewal (eq. 3);
//! - [`dh`]: RFC 7919 finite-field Diffie-Hellman with hash-chain exponents and the
//!   WireGuard preshared key of a pair (Phase 2);
//! - [`catalog`]: the VNFD file and its Sec-catalog, parsed and validated;
//! - [`policy`]: the packet classifier and GCRA limiters that enforce a catalog;
//! - [`wire`]: the prost control messages, their framing and their conversion into
//!   domain types;
//! - [`crypto`]: the secret types (zeroized, redacted, compared in constant time) and the
//!   one place through which the cryptographic primitives are imported.
//!
//! What it does not do: no sockets, no threads other than the measurement workers, no
//! clock reads, no randomness of its own. Time and random bytes are arguments; the
//! daemons move bytes between these state machines and the outside world.
//!
//! The measurement module reads files (it is the one piece of I/O here: streaming an
//! image is its whole purpose) and uses scoped threads to spread the hashes over cores.

pub mod catalog;
pub mod chain;
pub mod crypto;
pub mod dh;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod measure;
pub mod policy;
#[doc(hidden)]
pub mod skip;
pub mod sol001;
pub mod units;
pub mod wire;
