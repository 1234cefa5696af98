//! Sec-EM, the security element manager of a tenant, and `asmnctl`, its operator CLI.
//!
//! The [`store`] layer (the `Store` trait, its embedded and etcd backends, and a watch that
//! survives broken streams and compaction), the hash-chained [`audit`] log, the
//! [`registry`] (on-boarding, instantiation, enrollment, re-attestation and renewal, peer
//! verification, quarantine and revocation as decisions over the store), the pushes to
//! connected agents ([`push`]), the controller's [`pki`], its validated [`config`], its
//! [`metrics`], the northbound REST API for orchestrators ([`rest`]) and its event
//! notifications ([`notify`]), [`backup`] files of the embedded store, and the daemon ([`daemon`], [`service`]; the QUIC and TLS set-up is the
//! `asmn-channel` crate's, shared with the agent). Binaries:
//! `sec-em` (init, check-config, serve, backup, restore), `asmnctl` (the operator CLI) and `sec-em-load`
//! (the load benchmark). `local_etcd` (feature `testkit`) starts throw-away etcd clusters for tests and the
//! benchmark. The protocol logic lives in `asmn-shared`.

#![forbid(unsafe_code)]

pub mod audit;
pub mod backup;
pub mod config;
pub mod daemon;
#[cfg(any(test, feature = "testkit"))]
pub mod local_etcd;
pub mod metrics;
pub mod notify;
pub mod pki;
pub mod push;
pub mod registry;
pub mod rest;
pub mod service;
pub mod store;
