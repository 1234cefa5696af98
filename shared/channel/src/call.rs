//! The one client of the control channel: one request per bidirectional stream.
//!
//! The client writes one frame (a `wire::msg::Envelope`, at most `wire::MAX_FRAME` bytes),
//! finishes its side, and reads one frame back. Sec-EM's refusals come back as
//! [`CallError::Refused`] with their code, so callers match on a type, not a string.

use std::time::Duration;

use asmn_shared::wire::msg::{self, Body, RefusalCode};
use asmn_shared::wire::{self, FRAME_HEADER, MAX_FRAME};
use prost::Message;

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Sec-EM answered with a refusal.
    #[error("Sec-EM refused ({code:?}): {message}")]
    Refused {
        /// The refusal's code.
        code: RefusalCode,
        /// Sec-EM's explanation.
        message: String,
    },
    /// No connection, or the connection broke.
    #[error("cannot reach Sec-EM: {0}")]
    Unreachable(String),
    /// No answer in time.
    #[error("Sec-EM did not answer in time: {0}")]
    Timeout(String),
    /// The answer is not a frame of the protocol (or a frame could not be made).
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl CallError {
    /// The refusal code, when Sec-EM refused.
    pub fn refusal(&self) -> Option<RefusalCode> {
        match self {
            CallError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn unreachable(e: impl std::fmt::Display) -> CallError {
    CallError::Unreachable(e.to_string())
}

fn protocol(e: impl std::fmt::Display) -> CallError {
    CallError::Protocol(e.to_string())
}

/// How long [`connect`] waits for one controller's handshake before it also tries the
/// next (happy eyeballs): a dead replica costs this much, not a whole timeout.
pub const STAGGER: Duration = Duration::from_millis(250);

/// Connects to the first of `controllers` (`host:port`) that answers within `timeout`,
/// verifying `server_name`; returns the connection and the index of the one used.
/// The same as [`connect_from`] starting at the first.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    controllers: &[String],
    server_name: &str,
    timeout: Duration,
) -> Result<(quinn::Connection, usize), CallError> {
    connect_from(endpoint, controllers, server_name, 0, timeout).await
}

/// The address of `c` to use from an endpoint that can reach IPv6 (`v6`, dual stack) or
/// only IPv4: a name's first address of a family the endpoint reaches.
async fn resolve(c: &str, timeout: Duration, v6: bool) -> Result<std::net::SocketAddr, String> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host(c)).await {
        Ok(Ok(addrs)) => {
            let all: Vec<std::net::SocketAddr> = addrs.collect();
            all.iter()
                .find(|a| v6 || a.is_ipv4())
                .copied()
                .ok_or_else(|| {
                    if all.is_empty() {
                        format!("{c}: no address")
                    } else {
                        format!(
                            "{c}: only IPv6 addresses, and this client is IPv4 only (bind it to [::])"
                        )
                    }
                })
        }
        Ok(Err(e)) => Err(format!("{c}: {e}")),
        Err(_) => Err(format!("{c}: name lookup timed out")),
    }
}

/// Connects to one of `controllers`, trying them in order from index `first` (wrapping
/// around): each gets [`STAGGER`] to the handshake before the next is tried as well, and
/// the first handshake to complete wins (the others are closed). Every attempt ends within
/// `timeout`. Returns the connection and the index of the controller it reached.
pub async fn connect_from(
    endpoint: &quinn::Endpoint,
    controllers: &[String],
    server_name: &str,
    first: usize,
    timeout: Duration,
) -> Result<(quinn::Connection, usize), CallError> {
    let n = controllers.len();
    if n == 0 {
        return Err(CallError::Unreachable("no controller listed".into()));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let v6 = endpoint.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut attempts = tokio::task::JoinSet::new();
    let mut errors = Vec::new();
    let mut timed_out = false;
    for k in 0..n {
        let i = (first + k) % n;
        let (c, endpoint, name) = (
            controllers[i].clone(),
            endpoint.clone(),
            server_name.to_string(),
        );
        attempts.spawn(async move {
            let attempt = async {
                let addr = resolve(&c, timeout, v6).await?;
                let connecting = endpoint
                    .connect(addr, &name)
                    .map_err(|e| format!("{c}: {e}"))?;
                connecting.await.map_err(|e| format!("{c}: {e}"))
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(r) => (i, r.map_err(|e| (e, false))),
                Err(_) => (
                    i,
                    Err((format!("{c}: no handshake within {timeout:?}"), true)),
                ),
            }
        });
        // Give this one its head start, unless it fails first.
        let head_start = tokio::time::sleep(STAGGER);
        tokio::pin!(head_start);
        let last = k + 1 == n;
        loop {
            tokio::select! {
                () = &mut head_start, if !last => break,
                done = attempts.join_next() => match done {
                    Some(Ok((i, Ok(conn)))) => return Ok((conn, i)),
                    Some(Ok((_, Err((e, t))))) => {
                        timed_out |= t;
                        errors.push(e);
                        // Failed fast: try the next one now.
                        if !last || attempts.is_empty() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        errors.push(e.to_string());
                        if !last || attempts.is_empty() {
                            break;
                        }
                    }
                    None => break,
                },
            }
        }
    }
    while let Some(done) = attempts.join_next().await {
        match done {
            Ok((i, Ok(conn))) => return Ok((conn, i)),
            Ok((_, Err((e, t)))) => {
                timed_out |= t;
                errors.push(e);
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let last = errors.join("; ");
    Err(if timed_out && n == 1 {
        CallError::Timeout(last)
    } else {
        CallError::Unreachable(last)
    })
}

/// Sends `env` on a new stream of `c` and reads the answer envelope (refusals included),
/// within `timeout`.
pub async fn request(
    c: &quinn::Connection,
    env: &msg::Envelope,
    timeout: Duration,
) -> Result<msg::Envelope, CallError> {
    let frame = wire::encode_frame(env).map_err(protocol)?;
    let exchange = async {
        let (mut send, mut recv) = c.open_bi().await.map_err(unreachable)?;
        send.write_all(&frame).await.map_err(unreachable)?;
        send.finish().map_err(unreachable)?;
        let bytes = recv
            .read_to_end(FRAME_HEADER + MAX_FRAME)
            .await
            .map_err(|e| match e {
                quinn::ReadToEndError::TooLong => protocol("the answer is larger than a frame"),
                quinn::ReadToEndError::Read(e) => unreachable(e),
            })?;
        decode_one_frame(&bytes).map_err(protocol)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CallError::Timeout(format!("no answer within {timeout:?}")))?
}

/// Sends `body` and returns the answer's body; a refusal is [`CallError::Refused`].
pub async fn call(c: &quinn::Connection, body: Body, timeout: Duration) -> Result<Body, CallError> {
    let env = msg::Envelope {
        request_id: 1,
        body: Some(body),
    };
    match request(c, &env, timeout).await?.body {
        None => Err(protocol("Sec-EM sent an empty answer")),
        Some(Body::Refused(r)) => Err(CallError::Refused {
            code: RefusalCode::try_from(r.code).unwrap_or(RefusalCode::Unspecified),
            message: r.message,
        }),
        Some(b) => Ok(b),
    }
}

/// Decodes exactly one frame (and nothing after it).
pub fn decode_one_frame(bytes: &[u8]) -> Result<msg::Envelope, wire::WireError> {
    let mut d = wire::FrameDecoder::new();
    d.push(bytes)?;
    let frame = d
        .next_frame()?
        .ok_or(wire::WireError::Unexpected("an incomplete frame"))?;
    if d.pending() != 0 {
        return Err(wire::WireError::Unexpected("bytes after the frame"));
    }
    wire::decode_envelope(&frame)
}

/// Encodes an envelope without the frame (for tests that corrupt it).
pub fn encode_payload(env: &msg::Envelope) -> Vec<u8> {
    env.encode_to_vec()
}
