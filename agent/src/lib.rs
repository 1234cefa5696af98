//! The ASMN agent: the sidecar daemon baked into each VNF image.
//!
//! It will measure its image, enroll with Sec-EM by revealing its hash chain, verify its
//! peers through Sec-EM, derive pairwise keys by hash-chain Diffie-Hellman and run
//! WireGuard tunnels (boringtun) on a TUN device, enforcing its Sec-catalog. The
//! protocol logic it drives lives in `asmn-shared`; this crate will own the sockets, the
//! TUN device and the timers. Nothing is implemented here yet (issue 4): there is no
//! binary until there is something to run.

#![forbid(unsafe_code)]
