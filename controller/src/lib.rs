//! Sec-EM, the security element manager of a tenant, and `asmnctl`, its operator CLI.
//!
//! Built so far: the [`store`] layer (the `Store` trait, its embedded and etcd backends,
//! and a watch that survives broken streams and compaction). The QUIC services, the
//! `sec-em` daemon and `asmnctl` come next (issue 3); there is no binary until there is
//! something to run. The protocol logic the services drive lives in `asmn-shared`.

#![forbid(unsafe_code)]

pub mod store;
