//! The agent's side of the control protocol: the QUIC connection to Sec-EM (its CA pinned
//! from the bundle), enrollment, re-attestation and renewal, peer verification, and the
//! pushes Sec-EM sends (catalogs, revocations, verify-back requests, new peer keys).
//!
//! Existing tunnels keep running while Sec-EM is unreachable; the agent reconnects with
//! backoff to any listed controller and authenticates again with its next reveal.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use asmn_shared::catalog::SecCatalog;
use asmn_shared::chain::{self, ChainProver, ChainSpec, Reveal};
use asmn_shared::crypto::ChainElement;
use asmn_shared::dh::DhKeyPair;
use asmn_shared::ids::{InstanceKey, Role};
use asmn_shared::measure::{Algorithm, MeasureOptions, measure_path};
use asmn_shared::wire::msg::{self, Body, RefusalCode};
use asmn_shared::wire::{self, BootstrapBundle, Enroll, Enrolled, Peer};
use tokio::sync::{Mutex, mpsc};

use crate::dataplane::{Ask, Installed, PeerSpec};
use crate::io::PlaneHandle;
use crate::metrics::ControlStatus;

/// Longest wait for one answer from Sec-EM.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Elements left in a chain when the agent renews it.
pub const RENEW_BELOW: u32 = 16;

pub use crate::error::AgentError;

fn other(e: impl std::fmt::Display) -> AgentError {
    AgentError::Other(e.to_string())
}

fn bad_config(e: impl std::fmt::Display) -> AgentError {
    AgentError::Config(e.to_string())
}

/// Reads and validates a bootstrap bundle file (protobuf, as `asmnctl` writes it).
pub fn load_bundle(path: &Path) -> Result<BootstrapBundle, AgentError> {
    let bytes = std::fs::read(path)
        .map_err(|e| bad_config(format!("reading the bundle {}: {e}", path.display())))?;
    if bytes.len() > wire::MAX_FRAME {
        return Err(bad_config(format!(
            "{}: too large for a bundle",
            path.display()
        )));
    }
    let m = <msg::BootstrapBundleMsg as prost::Message>::decode(bytes.as_slice())
        .map_err(|e| bad_config(format!("{}: not a bootstrap bundle: {e}", path.display())))?;
    BootstrapBundle::try_from(&m).map_err(|e| bad_config(format!("{}: {e}", path.display())))
}

/// Measures `target` (SHA-256) with the same streaming code as `asmn-image`.
pub fn measure(target: &Path) -> Result<Vec<u8>, AgentError> {
    let m = measure_path(
        target,
        &[Algorithm::Sha256],
        MeasureOptions::default(),
        &mut |_| {},
    )
    .map_err(|e| other(format!("measuring {}: {e}", target.display())))?;
    m.get(Algorithm::Sha256)
        .map(|d| d.0.clone())
        .ok_or_else(|| other("no SHA-256 in the measurement"))
}

/// The chain position, kept across restarts: the agent writes the index it is about to
/// reveal before it sends it, so a restart never reveals an element twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Epoch of the chain.
    pub epoch: u32,
    /// Its length.
    pub length: u32,
    /// The next index to reveal.
    pub next: u32,
}

fn state_file(dir: &Path, id: &InstanceKey) -> PathBuf {
    dir.join(format!("{}.chain", id.to_hex()))
}

/// The saved position of `id`'s chain in `dir`; None when there is none (a first start).
/// A file that cannot be read or makes no sense is an error, never a fresh start: the
/// agent cannot know which elements it already revealed.
fn load_position(dir: &Path, id: &InstanceKey) -> Result<Option<Position>, AgentError> {
    let path = state_file(dir, id);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(other(format!(
                "reading the chain position {}: {e}",
                path.display()
            )));
        }
    };
    let damaged = || {
        bad_config(format!(
            "the chain position {} is damaged ({:?}; want \"epoch length next\"): the \
             agent cannot tell which reveals it already sent. Revoke this instance and \
             create a new one (`asmnctl revoke`, `asmnctl instance create`)",
            path.display(),
            text.chars().take(64).collect::<String>()
        ))
    };
    let v: Vec<u32> = text
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| damaged())?;
    let [epoch, length, next] = v[..] else {
        return Err(damaged());
    };
    if next >= length || ChainSpec::new(*id, epoch, length).is_err() {
        return Err(damaged());
    }
    Ok(Some(Position {
        epoch,
        length,
        next,
    }))
}

fn save_position(dir: &Path, id: &InstanceKey, p: Position) -> Result<(), AgentError> {
    std::fs::create_dir_all(dir).map_err(|e| other(format!("creating {}: {e}", dir.display())))?;
    let path = state_file(dir, id);
    let tmp = path.with_extension("tmp");
    // Synced before the reveal leaves: after a power loss the agent must not reveal an
    // element twice (Sec-EM would refuse it as a replay).
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{} {} {}\n", p.epoch, p.length, p.next).as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| other(format!("writing {}: {e}", path.display())))
}

/// The chain the agent reveals, its D-H key pair, and where it stands.
pub struct Chain {
    bundle: BootstrapBundle,
    id: InstanceKey,
    measurement: Vec<u8>,
    prover: ChainProver,
    dh: DhKeyPair,
    state_dir: PathBuf,
    /// The reveal sent last whose answer never came (a lost connection): it is sent
    /// again rather than a new one, so a Sec-EM outage spends at most one element.
    pending: Option<Reveal>,
    /// The measurement of a renewal whose answer never came: Sec-EM may have committed
    /// the next epoch, seeded from it.
    renewing: Option<Vec<u8>>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain")
            .field("id", &self.id.to_hex())
            .field("epoch", &self.prover.spec().epoch)
            .field("remaining", &self.prover.remaining())
            .finish_non_exhaustive()
    }
}

impl Chain {
    /// The chain of `bundle` for the image measured as `measurement`, resumed where the
    /// state in `state_dir` says (from its start when there is no state yet).
    pub fn new(
        bundle: BootstrapBundle,
        measurement: Vec<u8>,
        state_dir: PathBuf,
    ) -> Result<Self, AgentError> {
        let id = bundle.instance_key();
        let pos = match load_position(&state_dir, &id)? {
            Some(p) => p,
            None => Position {
                epoch: 0,
                length: bundle.chain_length,
                next: bundle.chain_length.saturating_sub(1),
            },
        };
        let spec = ChainSpec::new(id, pos.epoch, pos.length).map_err(|e| {
            other(format!(
                "the bundle's chain (epoch {}, length {}): {e}",
                pos.epoch, pos.length
            ))
        })?;
        let seed = chain::seed(&bundle.nonce, &id, &measurement, pos.epoch);
        let dh = DhKeyPair::derive(bundle.dh_group, &seed, &id, pos.epoch);
        let prover = ChainProver::resume(spec, seed, pos.next);
        Ok(Chain {
            bundle,
            id,
            measurement,
            prover,
            dh,
            state_dir,
            pending: None,
            renewing: None,
        })
    }

    /// The instance identity.
    pub fn id(&self) -> InstanceKey {
        self.id
    }

    /// The WireGuard preshared key of the pair with `peer`: Diffie-Hellman of this
    /// chain's exponent with the peer's published value (DESIGN.md §3.4).
    pub fn preshared_key(
        &self,
        peer: &Peer,
    ) -> Result<asmn_shared::crypto::PresharedKey, AgentError> {
        self.dh
            .preshared_key(
                (&self.id, self.prover.spec().epoch),
                (&peer.id, peer.epoch),
                &peer.dh_public,
            )
            .map_err(other)
    }

    /// The next reveal, its position saved first; or, if the last one got no answer,
    /// that one again.
    fn reveal(&mut self) -> Result<Reveal, AgentError> {
        if let Some(r) = &self.pending {
            return Ok(r.clone());
        }
        let next = self.prover.remaining();
        if next == 0 {
            return Err(other("the chain is exhausted and was not renewed"));
        }
        let spec = *self.prover.spec();
        save_position(
            &self.state_dir,
            &self.id,
            Position {
                epoch: spec.epoch,
                length: spec.length,
                next: next - 1,
            },
        )?;
        let r = self
            .prover
            .reveal()
            .ok_or_else(|| other("the chain is exhausted"))?;
        self.pending = Some(r.clone());
        Ok(r)
    }

    /// Sec-EM answered the pending reveal (accepted or refused it): the next request
    /// reveals a new element.
    fn settle(&mut self) {
        self.pending = None;
    }

    /// Settles the pending reveal if `answer` decided it: accepted, or refused for a reason
    /// that consumes or condemns the element. A lost answer, and Sec-EM saying it is
    /// `Unavailable` (its store is down: nothing was recorded), leave it pending, to be
    /// sent again.
    fn settle_on(&mut self, answer: &Result<Body, AgentError>) {
        let undecided = match answer {
            Err(AgentError::Other(_)) => true,
            Ok(Body::Refused(r)) => r.code == RefusalCode::Unavailable as i32,
            _ => false,
        };
        if !undecided {
            self.settle();
        }
    }

    /// A reveal carrying the renewal to the next epoch of `length`, measured as
    /// `measurement`; returns it with the new chain (installed once Sec-EM accepts).
    fn renewal(
        &mut self,
        measurement: &[u8],
        length: u32,
    ) -> Result<(Reveal, chain::SealedRenewal, ChainProver, DhKeyPair), AgentError> {
        let epoch = self.prover.spec().epoch + 1;
        let seed: ChainElement = chain::seed(&self.bundle.nonce, &self.id, measurement, epoch);
        let spec = ChainSpec::new(self.id, epoch, length).map_err(other)?;
        let dh = DhKeyPair::derive(self.bundle.dh_group, &seed, &self.id, epoch);
        let next = ChainProver::new(spec, seed);
        let reveal = self.reveal()?;
        let sealed = chain::seal_renewal(&reveal, &spec, &next.anchor());
        Ok((reveal, sealed, next, dh))
    }

    /// Moves to the next epoch as a renewal Sec-EM accepted would have: for a renewal
    /// whose answer was lost (Sec-EM committed it, then its replica died), which Sec-EM
    /// shows by refusing this epoch's reveals (`WrongEpoch`). The chain, its D-H value
    /// and the saved position are derived again from the measurement the renewal used;
    /// Sec-EM holds the new chain's anchor, so a wrong guess is simply refused again.
    fn adopt_next_epoch(&mut self) -> Result<u32, AgentError> {
        let measurement = self
            .renewing
            .take()
            .unwrap_or_else(|| self.measurement.clone());
        let spec = *self.prover.spec();
        let epoch = spec.epoch + 1;
        let seed: ChainElement = chain::seed(&self.bundle.nonce, &self.id, &measurement, epoch);
        let next_spec = ChainSpec::new(self.id, epoch, spec.length).map_err(other)?;
        self.dh = DhKeyPair::derive(self.bundle.dh_group, &seed, &self.id, epoch);
        self.prover = ChainProver::new(next_spec, seed);
        self.measurement = measurement;
        self.pending = None;
        save_position(
            &self.state_dir,
            &self.id,
            Position {
                epoch,
                length: spec.length,
                next: spec.length - 1,
            },
        )?;
        Ok(epoch)
    }
}

/// A QUIC client endpoint that trusts only the controller CA of the bundle, declaring a
/// silent controller dead as `liveness` says. With `dual_stack` (a bundle that lists an
/// IPv6 controller) it is bound to `[::]` and reaches IPv4 controllers as well; where the
/// host has no IPv6, to `0.0.0.0`.
pub fn client(
    ca_pem: &str,
    liveness: asmn_channel::tls::Liveness,
    dual_stack: bool,
) -> Result<quinn::Endpoint, AgentError> {
    let v4 = SocketAddr::from(([0, 0, 0, 0], 0));
    let bind = |addr| asmn_channel::tls::client_with(addr, ca_pem, None, liveness);
    let endpoint = if dual_stack {
        bind(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))).or_else(|e| {
            tracing::warn!(error = %e, "no IPv6 here: IPv6 controllers are out of reach");
            bind(v4)
        })
    } else {
        bind(v4)
    };
    endpoint.map_err(|e| other(format!("bundle CA: {e}")))
}

/// Whether the bundle lists a controller by an IPv6 address.
pub fn lists_ipv6(bundle: &BootstrapBundle) -> bool {
    bundle.controllers.iter().any(|c| c.starts_with('['))
}

/// One request, one answer (a refusal is an answer: the caller decides what it means).
pub async fn ask(conn: &quinn::Connection, body: Body) -> Result<Body, AgentError> {
    let env = msg::Envelope {
        request_id: 1,
        body: Some(body),
    };
    asmn_channel::call::request(conn, &env, REQUEST_TIMEOUT)
        .await
        .map_err(other)?
        .body
        .ok_or_else(|| other("Sec-EM sent an empty answer"))
}

fn refused(r: &msg::Refusal) -> AgentError {
    AgentError::Refused {
        code: RefusalCode::try_from(r.code).unwrap_or(RefusalCode::Unspecified),
        message: r.message.clone(),
    }
}

/// Where an instance starts in its bundle's list of controllers: spread by its key, so
/// the agents of a tenant share the replicas instead of all crowding the first.
pub fn preferred(bundle: &BootstrapBundle) -> usize {
    let n = bundle.controllers.len().max(1);
    let key = bundle.instance_key();
    let b = key.as_bytes();
    (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize) % n
}

/// Connects to a controller of the bundle, from index `first` on (the next ones are tried
/// as well when it does not answer at once); the connection and the index it reached.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    bundle: &BootstrapBundle,
    first: usize,
) -> Result<(quinn::Connection, usize), AgentError> {
    asmn_channel::call::connect_from(
        endpoint,
        &bundle.controllers,
        &bundle.server_name,
        first,
        REQUEST_TIMEOUT,
    )
    .await
    .map_err(other)
}

/// The agent's control side once the plane exists.
pub struct Control {
    chain: Mutex<Chain>,
    conn: Mutex<quinn::Connection>,
    endpoint: quinn::Endpoint,
    plane: PlaneHandle,
    wg_public: [u8; 32],
    underlay: SocketAddr,
    role: Role,
    /// The catalog version this VNF enforces (for acknowledgements).
    pub enforced: std::sync::atomic::AtomicU64,
    /// Sec-EM's descriptions of the installed peers (their keys and epochs), to re-key
    /// them when this agent's epoch rolls.
    known: std::sync::Mutex<std::collections::HashMap<InstanceKey, Peer>>,
    /// Verifications that pushes start (verify-back, re-keys): owned here, aborted by
    /// [`Control::shutdown`].
    background: std::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Peers whose revocation this agent has heard of.
    revoked: std::sync::Mutex<std::collections::HashSet<InstanceKey>>,
    /// The newest catalog version seen per VNF (own, and guarded by a gateway).
    versions: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The index in the bundle of the controller of the current connection.
    controller: std::sync::atomic::AtomicUsize,
    /// What the metrics show of the control connection.
    pub status: Arc<ControlStatus>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// The enrollment request for the chain's next reveal.
fn enroll_request(
    chain: &mut Chain,
    wg_public: [u8; 32],
    underlay: SocketAddr,
) -> Result<msg::EnrollRequest, AgentError> {
    let reveal = chain.reveal()?;
    let e = Enroll {
        id: chain.id,
        tenant: chain.bundle.tenant.clone(),
        vnf: chain.bundle.vnf.clone(),
        instance: chain.bundle.instance.clone(),
        reveal,
        wg_public_key: wg_public,
        dh_group: chain.bundle.dh_group,
        dh_public: chain.dh.public().clone(),
        endpoint: underlay,
        role: chain.bundle.role,
    };
    Ok((&e).into())
}

/// Enrolls (or re-authenticates after a reconnect) on `conn`.
pub async fn enroll(
    conn: &quinn::Connection,
    chain: &mut Chain,
    wg_public: [u8; 32],
    underlay: SocketAddr,
) -> Result<Enrolled, AgentError> {
    let mut adopted = false;
    loop {
        let req = enroll_request(chain, wg_public, underlay)?;
        let answer = ask(conn, Body::Enroll(req)).await;
        chain.settle_on(&answer);
        match answer? {
            Body::Enrolled(e) => return Enrolled::try_from(&e).map_err(other),
            Body::Refused(r) if r.code == RefusalCode::WrongEpoch as i32 && !adopted => {
                // A renewal Sec-EM committed but whose answer was lost: once.
                let epoch = chain.adopt_next_epoch()?;
                adopted = true;
                tracing::warn!(
                    epoch,
                    "Sec-EM is on the next epoch of this chain (the answer to a renewal was \
                     lost): continuing on it"
                );
            }
            Body::Refused(r) => return Err(refused(&r)),
            other_body => {
                return Err(other(format!(
                    "unexpected answer to Enroll: {other_body:?}"
                )));
            }
        }
    }
}

impl Control {
    /// The control side over an enrolled connection.
    pub fn new(
        chain: Chain,
        (conn, controller): (quinn::Connection, usize),
        endpoint: quinn::Endpoint,
        plane: PlaneHandle,
        underlay: SocketAddr,
        enforced: u64,
    ) -> Arc<Control> {
        let role = chain.bundle.role;
        let status = Arc::new(ControlStatus::default());
        if let Some(c) = chain.bundle.controllers.get(controller) {
            status.connected(c);
        }
        Arc::new(Control {
            controller: std::sync::atomic::AtomicUsize::new(controller),
            revoked: std::sync::Mutex::new(std::collections::HashSet::new()),
            versions: std::sync::Mutex::new(std::collections::HashMap::from([(
                chain.bundle.vnf.to_string(),
                enforced,
            )])),
            status,
            chain: Mutex::new(chain),
            conn: Mutex::new(conn),
            endpoint,
            wg_public: plane.public_key(),
            plane,
            underlay,
            role,
            enforced: std::sync::atomic::AtomicU64::new(enforced),
            known: std::sync::Mutex::new(std::collections::HashMap::new()),
            background: std::sync::Mutex::new(tokio::task::JoinSet::new()),
        })
    }

    /// Runs `work` in the background, owned by this control side.
    fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        if let Ok(mut set) = self.background.lock() {
            // Reap what finished: the set holds only what is in flight.
            while set.try_join_next().is_some() {}
            set.spawn(work);
        }
    }

    /// Aborts the background work (the daemon's shutdown path).
    pub fn shutdown(&self) {
        if let Ok(mut set) = self.background.lock() {
            set.abort_all();
        }
    }

    async fn conn(&self) -> quinn::Connection {
        self.conn.lock().await.clone()
    }

    /// Runs `f` on the data plane.
    async fn on_plane<R: Send + 'static>(
        &self,
        f: impl FnOnce(
            &mut crate::io::SystemPlane,
            std::time::Instant,
            &mut crate::dataplane::Outbox,
        ) -> R
        + Send
        + 'static,
    ) -> Result<R, AgentError> {
        self.plane.call(f).await.map_err(other)
    }

    /// Whether instance `id` is installed (directly or through a gateway).
    async fn has_peer(&self, id: InstanceKey) -> bool {
        self.on_plane(move |p, _, _| p.has_peer(&id))
            .await
            .unwrap_or(false)
    }

    /// Routes `peer` through the gateway at `gw`; false when that gateway is not
    /// installed.
    async fn route_via(&self, peer: &Peer, gw: IpAddr) -> Result<bool, AgentError> {
        let (overlay, id, vnf) = (peer.overlay, peer.id, peer.vnf.clone());
        self.on_plane(move |p, _, out| p.route_via(overlay, id, vnf, gw, out))
            .await
    }

    /// Installs the verified `peer` (computing the pair's PSK), or routes it through its
    /// gateway (verifying the gateway first if needed).
    pub async fn install(&self, peer: &Peer) -> Result<(), AgentError> {
        if let Some(gw) = peer.via_gateway {
            if !self.route_via(peer, gw).await? {
                let g = self.verify(gw).await?;
                self.install_direct(&g).await?;
                if !self.route_via(peer, gw).await? {
                    return Err(other(format!("{gw} is not a gateway")));
                }
            }
            return Ok(());
        }
        self.install_direct(peer).await
    }

    async fn install_direct(&self, peer: &Peer) -> Result<(), AgentError> {
        let psk = self.chain.lock().await.preshared_key(peer)?;
        let spec = PeerSpec {
            id: peer.id,
            vnf: peer.vnf.clone(),
            overlay: peer.overlay,
            endpoint: peer.endpoint,
            wg_public: peer.wg_public_key,
            role: peer.role,
            protected: peer.protected,
        };
        let outcome = self
            .on_plane(move |p, now, out| p.install(now, spec, &psk, out))
            .await?;
        match outcome {
            Installed::KeyConflict => {
                return Err(other(format!(
                    "{}: another peer holds its WireGuard key",
                    peer.overlay
                )));
            }
            Installed::Revoked => {
                return Err(other(format!("{}: the instance was revoked", peer.overlay)));
            }
            _ => {}
        }
        if let Ok(mut k) = self.known.lock() {
            k.insert(peer.id, peer.clone());
        }
        tracing::info!(peer = %peer.id.to_hex(), vnf = %peer.vnf, overlay = %peer.overlay, epoch = peer.epoch, ?outcome, "tunnel installed");
        Ok(())
    }

    /// Re-keys every installed peer (after this agent's epoch rolled).
    async fn rekey_all(&self) {
        let peers: Vec<Peer> = self
            .known
            .lock()
            .map(|k| k.values().cloned().collect())
            .unwrap_or_default();
        for p in peers {
            if self.has_peer(p.id).await
                && let Err(e) = self.install_direct(&p).await
            {
                tracing::warn!(peer = %p.overlay, error = %e, "cannot re-key");
            }
        }
    }

    /// VerifyPeer: Sec-EM's description of the instance at `overlay`.
    pub async fn verify(&self, overlay: IpAddr) -> Result<Peer, AgentError> {
        self.verify_for(overlay, None).await
    }

    /// VerifyPeer, on a gateway on behalf of the instance at `source`: whether it and
    /// the instance at `overlay` may talk through this gateway.
    async fn verify_for(
        &self,
        overlay: IpAddr,
        source: Option<IpAddr>,
    ) -> Result<Peer, AgentError> {
        let conn = self.conn().await;
        match ask(
            &conn,
            Body::VerifyPeer(msg::VerifyPeerRequest {
                overlay: overlay.to_string(),
                source: source.map(|s| s.to_string()).unwrap_or_default(),
            }),
        )
        .await?
        {
            Body::Peer(p) => Peer::try_from(&p).map_err(other),
            Body::Refused(r) => Err(refused(&r)),
            b => Err(other(format!("unexpected answer to VerifyPeer: {b:?}"))),
        }
    }

    /// Serves the plane's requests (verify a destination; on a gateway, admit a pair)
    /// until the channel closes. Each runs as a task of `tasks`.
    pub async fn serve_asks(self: Arc<Self>, mut asks: mpsc::Receiver<Ask>) {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(a) = asks.recv().await {
            // Reap what finished (the set stays as small as the requests in flight).
            while tasks.try_join_next().is_some() {}
            let me = Arc::clone(&self);
            tasks.spawn(async move { me.answer(a).await });
        }
    }

    async fn answer(&self, a: Ask) {
        match a {
            Ask::Verify(ip) => {
                let mut verified = self.verify(ip).await;
                // Sec-EM's budget of verifications for this agent is spent for now: ask
                // again once it has refilled rather than refuse the peer for 5 s.
                if matches!(
                    verified,
                    Err(AgentError::Refused {
                        code: RefusalCode::RateLimited,
                        ..
                    })
                ) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    verified = self.verify(ip).await;
                }
                let r = match verified {
                    Ok(peer) => self.install(&peer).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    tracing::warn!(%ip, error = %e, "peer refused");
                    let _ = self.on_plane(move |p, now, _| p.refuse(now, ip)).await;
                }
            }
            Ask::Admit { src, dst } => {
                let r = match self.verify_for(dst, Some(src)).await {
                    Ok(peer) if peer.overlay == dst && peer.via_gateway.is_none() => {
                        self.install_direct(&peer).await
                    }
                    Ok(_) => Err(other("Sec-EM answered for another instance")),
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => {
                        tracing::info!(%src, %dst, "pair admitted through this gateway");
                        let _ = self.on_plane(move |p, _, out| p.admit(src, dst, out)).await;
                    }
                    Err(e) => {
                        tracing::warn!(%src, %dst, error = %e, "pair refused: not forwarded");
                        let _ = self
                            .on_plane(move |p, now, _| p.refuse_pair(now, src, dst))
                            .await;
                    }
                }
            }
        }
    }

    /// Handles one push from Sec-EM. `Err` means this agent must stop.
    pub async fn on_push(self: &Arc<Self>, body: Body) -> Result<(), AgentError> {
        match body {
            Body::CatalogPush(m) => {
                let c = match SecCatalog::try_from(&m) {
                    Ok(c) => c,
                    Err(e) => {
                        // The previous catalog stays in force.
                        tracing::error!(error = %e, "pushed catalog refused; keeping the one in force");
                        return Ok(());
                    }
                };
                let own = self.chain.lock().await.bundle.vnf.clone();
                let (vnf, version) = (c.vnf.to_string(), c.version);
                // Versions only go up: a push that crossed a newer one (two replicas, or
                // a reconnection's re-read) changes nothing. The same version is
                // acknowledged again, but not set again (its limiters keep their state).
                let fresh = match self.versions.lock() {
                    Ok(mut seen) => {
                        let last = seen.entry(vnf.clone()).or_insert(0);
                        if version < *last {
                            tracing::debug!(%vnf, version, newer = *last, "older catalog ignored");
                            return Ok(());
                        }
                        let fresh = version > *last;
                        *last = version;
                        fresh
                    }
                    Err(_) => true,
                };
                if !fresh && (c.vnf == own || self.role == Role::Gateway) {
                    let conn = self.conn().await;
                    let _ = ask(&conn, Body::CatalogAck(msg::CatalogAck { vnf, version })).await;
                    return Ok(());
                }
                if c.vnf == own {
                    self.on_plane(move |p, _, _| p.set_catalog(c)).await?;
                    self.enforced
                        .store(version, std::sync::atomic::Ordering::Relaxed);
                } else if self.role == Role::Gateway {
                    self.on_plane(move |p, _, _| p.set_protected_catalog(c))
                        .await?;
                } else {
                    return Ok(());
                }
                tracing::info!(%vnf, version, "catalog in force");
                let conn = self.conn().await;
                let ack = Body::CatalogAck(msg::CatalogAck { vnf, version });
                if let Err(e) = ask(&conn, ack).await {
                    tracing::warn!(error = %e, "catalog acknowledgement not delivered");
                }
            }
            Body::Revoked(n) => {
                let Some(id) = InstanceKey::from_slice(&n.instance_key) else {
                    return Ok(());
                };
                if id == self.chain.lock().await.id {
                    return Err(AgentError::Refused {
                        code: RefusalCode::Revoked,
                        message: format!("this instance was revoked: {}", n.reason),
                    });
                }
                if let Ok(mut k) = self.known.lock() {
                    k.remove(&id);
                }
                let removed = self.on_plane(move |p, _, _| p.remove(&id)).await?;
                // Every revocation is logged once (each reconnection delivers the
                // tenant's revocations again).
                let first = self.revoked.lock().map_or(true, |mut r| r.insert(id));
                if removed {
                    tracing::info!(peer = %id.to_hex(), reason = %n.reason, "peer revoked: tunnel removed");
                } else if first {
                    tracing::info!(peer = %id.to_hex(), reason = %n.reason, "peer revoked: no tunnel to it");
                }
            }
            Body::VerifyRequested(v) => {
                // The paper's Fig. 2: verify the requester ourselves before accepting it.
                let Some(p) = v.peer.as_ref().and_then(|p| Peer::try_from(p).ok()) else {
                    return Ok(());
                };
                let overlay = p.overlay;
                if self.has_peer(p.id).await
                    || self.on_plane(move |pl, _, _| pl.routes_to(overlay)).await?
                {
                    // Verified already (we asked first): nothing to do, and asking again
                    // would make Sec-EM ask the peer again, and so on.
                    return Ok(());
                }
                let me = Arc::clone(self);
                self.spawn(async move {
                    match me.verify(p.overlay).await {
                        Ok(peer) if peer.id == p.id => {
                            if let Err(e) = me.install(&peer).await {
                                tracing::warn!(error = %e, "cannot install the requester");
                            }
                        }
                        Ok(_) => tracing::warn!("verify-back: another instance at that address"),
                        Err(e) => tracing::warn!(error = %e, "verify-back refused"),
                    }
                });
            }
            Body::Rekeyed(n) => {
                // A peer has new keys: ask Sec-EM for them (it answers admitted pairs only).
                let Some(id) = InstanceKey::from_slice(&n.instance_key) else {
                    return Ok(());
                };
                let overlay = self
                    .known
                    .lock()
                    .ok()
                    .and_then(|k| k.get(&id).map(|p| p.overlay));
                if let Some(overlay) = overlay
                    && self.has_peer(id).await
                {
                    let me = Arc::clone(self);
                    self.spawn(async move {
                        match me.verify(overlay).await {
                            Ok(peer) if peer.id == id => {
                                if let Err(e) = me.install(&peer).await {
                                    tracing::warn!(error = %e, "cannot re-key the peer");
                                }
                            }
                            Ok(_) => {
                                tracing::warn!(%overlay, "re-key: another instance at that address")
                            }
                            Err(e) => tracing::warn!(%overlay, error = %e, "re-key refused"),
                        }
                    });
                }
            }
            Body::Peer(p) => {
                // New keys of a peer (its renewal): re-key if it is ours.
                if let Ok(peer) = Peer::try_from(&p)
                    && self.has_peer(peer.id).await
                {
                    self.install_direct(&peer).await?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads the push stream of the current connection until it ends.
    pub async fn read_pushes(self: &Arc<Self>) -> Result<(), AgentError> {
        let conn = self.conn().await;
        let mut stream = conn.accept_uni().await.map_err(other)?;
        let mut decoder = wire::FrameDecoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            while let Some(frame) = decoder.next_frame().map_err(other)? {
                let env = wire::decode_envelope(&frame).map_err(other)?;
                if let Some(body) = env.body {
                    self.on_push(body).await?;
                }
            }
            match stream.read(&mut buf).await.map_err(other)? {
                Some(n) => decoder.push(&buf[..n]).map_err(other)?,
                None => return Err(other("Sec-EM closed the push stream")),
            }
        }
    }

    /// Sec-EM refused a re-attestation for its epoch: it is on the next one (a renewal
    /// whose answer was lost). Takes it up and has the peers re-key.
    async fn take_up_next_epoch(
        &self,
        mut chain: tokio::sync::MutexGuard<'_, Chain>,
    ) -> Result<(), AgentError> {
        let epoch = chain.adopt_next_epoch()?;
        drop(chain);
        tracing::warn!(
            epoch,
            "Sec-EM is on the next epoch of this chain (the answer to a renewal was lost): \
             continuing on it and re-keying the tunnels"
        );
        self.rekey_all().await;
        Ok(())
    }

    /// Re-attests every `interval`: re-measures `target`, reveals the next element, and
    /// renews the chain when few elements are left.
    pub async fn reattest(&self, target: &Path) -> Result<(), AgentError> {
        let measurement = {
            let target = target.to_path_buf();
            tokio::task::spawn_blocking(move || measure(&target))
                .await
                .map_err(other)??
        };
        let mut chain = self.chain.lock().await;
        let renew = chain.prover.remaining() <= RENEW_BELOW || measurement != chain.measurement;
        let conn = self.conn().await;
        // No element is spent without a live connection (the push task reconnects).
        if let Some(reason) = conn.close_reason() {
            return Err(other(format!(
                "not connected to Sec-EM ({reason}): not revealing"
            )));
        }
        if renew {
            let length = chain.prover.spec().length;
            let (reveal, sealed, next, dh) = chain.renewal(&measurement, length)?;
            let body = Body::Reattest(msg::ReattestRequest {
                reveal: Some((&reveal).into()),
                measurement: measurement.clone(),
                renewal: Some((&sealed).into()),
                dh_public: dh.public().as_bytes().to_vec(),
            });
            let answer = ask(&conn, body).await;
            chain.settle_on(&answer);
            if chain.pending.is_some() {
                // Undecided: Sec-EM may have committed the renewal.
                chain.renewing = Some(measurement.clone());
            }
            match answer? {
                Body::Reattested(r) => {
                    chain.renewing = None;
                    chain.prover = next;
                    chain.dh = dh;
                    chain.measurement = measurement;
                    let spec = *chain.prover.spec();
                    save_position(
                        &chain.state_dir,
                        &chain.id,
                        Position {
                            epoch: spec.epoch,
                            length: spec.length,
                            next: spec.length - 1,
                        },
                    )?;
                    drop(chain);
                    tracing::info!(epoch = r.epoch, "chain renewed: re-keying the tunnels");
                    // The peers are pushed the new D-H value and re-key on their side.
                    self.rekey_all().await;
                    Ok(())
                }
                Body::Refused(r) if r.code == RefusalCode::WrongEpoch as i32 => {
                    self.take_up_next_epoch(chain).await
                }
                Body::Refused(r) => Err(refused(&r)),
                b => Err(other(format!("unexpected answer to Reattest: {b:?}"))),
            }
        } else {
            let reveal = chain.reveal()?;
            let body = Body::Reattest(msg::ReattestRequest {
                reveal: Some((&reveal).into()),
                measurement,
                renewal: None,
                dh_public: Vec::new(),
            });
            let answer = ask(&conn, body).await;
            chain.settle_on(&answer);
            match answer? {
                Body::Reattested(r) => {
                    tracing::debug!(index = r.last_index, "re-attested");
                    Ok(())
                }
                Body::Refused(r) if r.code == RefusalCode::WrongEpoch as i32 => {
                    self.take_up_next_epoch(chain).await
                }
                Body::Refused(r) => Err(refused(&r)),
                b => Err(other(format!("unexpected answer to Reattest: {b:?}"))),
            }
        }
    }

    /// Connects again (backoff up to 30 s) and re-authenticates with the next reveal.
    /// It tries the controller after the one it lost first (that one is likely down),
    /// and the rest of the bundle's list as well when that one does not answer at once.
    pub async fn reconnect(&self) -> Result<(), AgentError> {
        use std::sync::atomic::Ordering;
        self.status.lost();
        let lost = self.controller.load(Ordering::Relaxed);
        let mut delay = Duration::from_millis(200);
        loop {
            let bundle = self.chain.lock().await.bundle.clone();
            let first = (lost + 1) % bundle.controllers.len().max(1);
            match connect(&self.endpoint, &bundle, first).await {
                Ok((conn, at)) => {
                    let mut chain = self.chain.lock().await;
                    let epoch = chain.prover.spec().epoch;
                    match enroll(&conn, &mut chain, self.wg_public, self.underlay).await {
                        Ok(_) => {
                            let rekey = chain.prover.spec().epoch != epoch;
                            drop(chain);
                            *self.conn.lock().await = conn;
                            // The new connection's catalogs are the store's as it is now
                            // (a restored store may be behind what this agent saw): take
                            // whatever version it pushes first.
                            if let Ok(mut seen) = self.versions.lock() {
                                seen.clear();
                            }
                            self.controller.store(at, Ordering::Relaxed);
                            let name = bundle.controllers.get(at).map_or("", String::as_str);
                            self.status.connected(name);
                            tracing::info!(controller = name, "reconnected to Sec-EM");
                            if rekey {
                                // Our D-H value is the next epoch's: peers re-key.
                                self.rekey_all().await;
                            }
                            return Ok(());
                        }
                        Err(e) if e.is_terminal() => return Err(e),
                        Err(e) => tracing::warn!(error = %e, "re-enrollment failed"),
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Sec-EM unreachable; tunnels keep running"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> BootstrapBundle {
        BootstrapBundle {
            controllers: vec!["127.0.0.1:7443".into()],
            server_name: "sec-em".into(),
            ca_pem: String::new(),
            tenant: asmn_shared::ids::TenantId::new("t1").expect("tenant"),
            vnf: asmn_shared::ids::VnfId::new("web").expect("vnf"),
            instance: asmn_shared::ids::InstanceName::new("web-0").expect("instance"),
            nonce: asmn_shared::crypto::Nonce::new([5; 32]),
            chain_length: 100,
            role: Role::Vnf,
            dh_group: asmn_shared::dh::Group::Ffdhe3072,
        }
    }

    #[test]
    fn a_reveal_without_a_decisive_answer_is_sent_again_not_replaced() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut chain = Chain::new(bundle(), vec![1; 32], dir.path().to_path_buf()).expect("chain");
        let first = chain.reveal().expect("reveal");
        // The connection was lost, or Sec-EM's store was unavailable: the same element.
        chain.settle_on(&Err(other("timed out")));
        assert_eq!(chain.reveal().expect("again"), first);
        let unavailable = Ok(Body::Refused(msg::Refusal {
            code: RefusalCode::Unavailable as i32,
            message: "store".into(),
        }));
        chain.settle_on(&unavailable);
        assert_eq!(chain.reveal().expect("again"), first);
        // The position on disk moved once, past that element (a restart reveals the
        // next one: it never sends an element twice).
        let id = chain.id();
        let saved = load_position(dir.path(), &id)
            .expect("read")
            .expect("saved");
        assert_eq!(saved.next + 1, first.index);
        // Accepted (or refused for good): the next reveal is the next element down.
        chain.settle_on(&Ok(Body::Ok(msg::Ack {})));
        let second = chain.reveal().expect("next");
        assert_eq!(second.index + 1, first.index);
        let replayed = Ok(Body::Refused(msg::Refusal {
            code: RefusalCode::Replayed as i32,
            message: String::new(),
        }));
        chain.settle_on(&replayed);
        assert_eq!(chain.reveal().expect("next").index + 1, second.index);
    }

    #[test]
    fn a_renewal_whose_answer_was_lost_is_taken_up_from_its_measurement() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut chain = Chain::new(bundle(), vec![1; 32], dir.path().to_path_buf()).expect("chain");
        let changed = vec![2; 32];
        let length = chain.prover.spec().length;
        let (_, _, next, dh) = chain.renewal(&changed, length).expect("renewal");
        // The answer never came (the replica died after committing it).
        chain.settle_on(&Err(other("connection lost")));
        chain.renewing = Some(changed.clone());
        assert_eq!(chain.adopt_next_epoch().expect("adopt"), 1);
        // The chain Sec-EM holds the anchor of, and the D-H value peers were told of.
        assert_eq!(chain.prover.anchor(), next.anchor());
        assert_eq!(chain.dh.public().as_bytes(), dh.public().as_bytes());
        assert_eq!(chain.reveal().expect("reveal").epoch, 1);
        // A restart resumes on the new epoch, never on the old one.
        let again = Chain::new(bundle(), changed, dir.path().to_path_buf()).expect("resume");
        assert_eq!(again.prover.spec().epoch, 1);
        assert_eq!(again.prover.anchor(), next.anchor());
    }

    #[test]
    fn a_missing_position_is_a_first_start_and_a_damaged_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let id = InstanceKey::from_bytes([7; 32]);
        assert_eq!(load_position(dir.path(), &id).expect("no file"), None);
        let p = Position {
            epoch: 3,
            length: 1000,
            next: 41,
        };
        save_position(dir.path(), &id, p).expect("saved");
        assert_eq!(load_position(dir.path(), &id).expect("read"), Some(p));
        for bad in [
            "",
            "3 1000",
            "3 1000 41 9",
            "x 1000 41",
            "3 1000 1000",
            "3 1 0",
        ] {
            std::fs::write(state_file(dir.path(), &id), bad).expect("write");
            let e = load_position(dir.path(), &id).expect_err(bad).to_string();
            assert!(
                e.contains("damaged") && e.contains(".chain"),
                "{bad:?}: {e}"
            );
        }
    }
}
