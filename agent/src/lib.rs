//! The ASMN agent: the sidecar daemon baked into each VNF image.
//!
//! It measures its image, enrolls with Sec-EM by revealing its hash chain ([`control`]),
//! verifies its peers through Sec-EM, derives pairwise keys by hash-chain Diffie-Hellman
//! and runs WireGuard tunnels (boringtun) on a TUN device, enforcing its Sec-catalog
//! ([`dataplane`], a sans-I/O state machine driven by [`io`]). [`daemon::run`] is the
//! whole agent; `main` only parses arguments, sets up logging and calls it. The protocol
//! logic it drives lives in `asmn-shared`; this crate owns the sockets, the TUN device
//! and the timers.

// Unsafe only in `sched` and `underlay` (one system call each, commented).
#![deny(unsafe_code)]

pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod error;
pub mod io;
pub mod metrics;
mod ready;
mod sched;
pub mod underlay;
