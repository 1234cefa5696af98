//! ASMN's control channel, one crate for both ends.
//!
//! - [`tls`]: the rustls configurations (TLS 1.3 only, ring, the controller CA pinned,
//!   0-RTT off), the QUIC endpoints of Sec-EM and of its clients, with the transport
//!   limits that bound what an unauthenticated peer can make Sec-EM hold, and the
//!   [`ALPN`].
//! - [`call`]: the one client: [`call::connect`] over the list of controllers and
//!   [`call::call`], one request on its own stream, with a typed [`call::CallError`]
//!   (refused / unreachable / timeout / protocol).
//! - [`http`]: the small `/metrics` and `/health` HTTP server of Sec-EM and the agent,
//!   with a connection cap and deadlines.
//!
//! The wire format itself (frames, messages and their validation) is `asmn_shared::wire`.

#![forbid(unsafe_code)]

pub mod call;
pub mod http;
pub mod tls;

/// The ALPN protocol of ASMN's control channel.
pub const ALPN: &[u8] = b"asmn/1";
