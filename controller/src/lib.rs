//! Sec-EM, the security element manager of a tenant, and `asmnctl`, its operator CLI.
//!
//! Built so far: the [`store`] layer (the `Store` trait, its embedded and etcd backends,
//! and a watch that survives broken streams and compaction), the hash-chained [`audit`]
//! log, and the [`registry`]: on-boarding, instantiation, enrollment, re-attestation,
//! quarantine and revocation as decisions over the store. The QUIC services, the
//! `sec-em` daemon and `asmnctl` come next (issue 3); there is no binary until there is
//! something to run. The protocol logic the services drive lives in `asmn-shared`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod registry;
pub mod store;
