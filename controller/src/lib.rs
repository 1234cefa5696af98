//! Sec-EM, the security element manager of a tenant, and `asmnctl`, its operator CLI.
//!
//! Built so far: the [`store`] layer (the `Store` trait, its embedded and etcd backends,
//! and a watch that survives broken streams and compaction), the hash-chained [`audit`]
//! log, the [`registry`] (on-boarding, instantiation, enrollment, re-attestation,
//! quarantine and revocation as decisions over the store), the controller's [`pki`] and
//! its validated [`config`]. The binary `sec-em` makes the PKI and configuration
//! (`init`), checks configurations (`check-config`) and serves enrollment, on-boarding and
//! instantiation over QUIC (`serve`, see [`daemon`] and [`service`]); catalog pushes,
//! peer verification, metrics and `asmnctl` come next (issue 3). The protocol logic lives in `asmn-shared`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod pki;
pub mod push;
pub mod registry;
pub mod service;
pub mod store;
pub mod transport;
