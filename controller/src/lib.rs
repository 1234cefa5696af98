//! Sec-EM, the security element manager of a tenant, and `asmnctl`, its operator CLI.
//!
//! It will serve agents and operators over QUIC, keep its state in an embedded store or
//! in etcd, verify chain reveals, answer peer verifications, push catalogs and
//! revocations, and keep a hash-chained audit log. The protocol logic it drives lives in
//! `asmn-shared`. Nothing is implemented here yet (issue 3): there is no binary until
//! there is something to run.

#![forbid(unsafe_code)]
