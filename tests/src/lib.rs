//! The ASMN test harness: network-namespace tenants ([`netns`], [`tenant`]), the
//! integration tests in `tests/`, and (issue 5) `asmn-lab`.

#![forbid(unsafe_code)]

pub mod attacker;
pub mod bench;
pub mod charts;
pub mod eval;
pub mod generators;
pub mod ha;
pub mod netns;
pub mod tenant;
