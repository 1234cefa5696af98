//! ASMN's image tooling: measuring VNF images, making deterministic test images, comparing
//! images, and benchmarking our measurement against the system's tools.
//!
//! The measurement itself is `asmn_shared::measure` (the same code the agent runs inside a
//! VM); this crate adds what an operator's workstation needs around it, and bakes the
//! agent into bootable Debian VNF images from recipes ([`bake`]).

#![forbid(unsafe_code)]

pub mod bake;
pub mod bench;
pub mod compare;
pub mod size;
pub mod testimage;
