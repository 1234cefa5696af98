//! The ASMN test harness: network-namespace tenants, integration tests, and `asmn-lab`
//! (the demo and the reproduction of the paper's Section 4).
//!
//! Nothing is implemented here yet (issues 4 and 5); the images crate's own tests cover
//! measurement end to end until then.

#![forbid(unsafe_code)]
