//! Sec-EM's request handling: one envelope in, one envelope out, over the registry.
//!
//! Operator requests need the admin client certificate; agents' need nothing but their
//! reveals. Every malformed or unexpected message is answered with a typed refusal and
//! changes nothing.

use std::sync::Arc;

use asmn_shared::crypto::Nonce;
use asmn_shared::ids::{InstanceName, VnfId};
use asmn_shared::wire::msg::{self, Body, RefusalCode};
use asmn_shared::wire::{self, Enroll};
use rand::{RngCore, TryRngCore};

use crate::config::Limits;
use crate::registry::{Registry, RegistryError};
use crate::store::Store;

/// Seconds since the Unix epoch (the daemon's clock; the registry takes it as input).
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn refusal(code: RefusalCode, message: impl Into<String>) -> Body {
    Body::Refused(msg::Refusal {
        code: code as i32,
        message: message.into(),
    })
}

fn from_error(e: RegistryError) -> Body {
    match e {
        RegistryError::Refused(r) => refusal(r.code, r.message),
        other => {
            tracing::error!(error = %other, "request failed");
            refusal(
                RefusalCode::Unavailable,
                "Sec-EM could not complete the request; retry",
            )
        }
    }
}

/// What Sec-EM knows about one connection.
#[derive(Debug, Default)]
pub struct Session {
    /// The peer presented the admin client certificate.
    pub admin: bool,
    /// The instance that enrolled on this connection (set by a successful Enroll).
    pub agent: std::sync::Mutex<Option<asmn_shared::ids::InstanceKey>>,
    /// Its VNF.
    pub agent_vnf: std::sync::Mutex<Option<VnfId>>,
    /// The connection and push hub, to attach an enrolled agent's push stream.
    pub push: Option<(quinn::Connection, Arc<crate::push::PushHub>)>,
    /// The push stream's writer, owned by the connection.
    pub pusher: std::sync::Mutex<Option<crate::store::AbortOnDrop>>,
    /// Where to count.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The admin certificate's serial (hex), checked against the deny-list on every
    /// admin request.
    pub admin_serial: Option<String>,
    /// The agent's budget of peer verifications.
    pub verify_budget: Option<crate::registry::VerifyPeerLimiter>,
    /// Where refusals of unauthenticated requests are logged at a bounded rate.
    pub logs: Option<Arc<LogLimiter>>,
    /// The limits in force (the connection is opened up when its agent enrolls).
    pub limits: Option<Arc<Limits>>,
}

impl Session {
    fn agent(&self) -> Option<asmn_shared::ids::InstanceKey> {
        self.agent.lock().ok().and_then(|g| *g)
    }
}

/// Handles one request.
pub async fn handle<S: Store>(
    registry: &Registry<S>,
    session: &Session,
    env: msg::Envelope,
) -> msg::Envelope {
    let request_id = env.request_id;
    let for_operator = env.body.as_ref().is_some_and(is_operator_request);
    // The deny-list is read on every operator request (fail closed on a store error).
    let admin = if session.admin && for_operator {
        match &session.admin_serial {
            None => false,
            Some(serial) => match registry.admin_revoked(serial).await {
                Ok(false) => true,
                Ok(true) => {
                    // Revoked while connected: this answer is the last (the connection
                    // is closed once it had time to arrive).
                    if let Some((conn, _)) = &session.push {
                        let conn = conn.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                            conn.close(0u32.into(), b"admin certificate revoked");
                        });
                    }
                    return msg::Envelope {
                        request_id,
                        body: Some(refusal(
                            RefusalCode::NotAuthorized,
                            format!("admin certificate {serial} is revoked"),
                        )),
                    };
                }
                Err(e) => {
                    return msg::Envelope {
                        request_id,
                        body: Some(from_error(e)),
                    };
                }
            },
        }
    } else {
        false
    };
    let started = std::time::Instant::now();
    let is_reveal = matches!(env.body, Some(Body::Enroll(_)) | Some(Body::Reattest(_)));
    let request = match &env.body {
        Some(Body::Enroll(_)) => "enroll",
        Some(Body::Reattest(_)) => "reattest",
        Some(Body::VerifyPeer(_)) => "verify_peer",
        Some(
            Body::Onboard(_)
            | Body::CreateInstance(_)
            | Body::Revoke(_)
            | Body::ApplyCatalog(_)
            | Body::Query(_)
            | Body::RevokeAdmin(_),
        ) => "operator",
        _ => "other",
    };
    let ack_latency = match (&session.metrics, &env.body) {
        (Some(m), Some(Body::CatalogAck(a))) if session.agent().is_some() => {
            m.catalog_acked(&a.vnf, a.version)
        }
        _ => None,
    };
    let body = match env.body {
        None => refusal(RefusalCode::MalformedMessage, "empty envelope"),
        Some(b) if is_operator_request(&b) && admin => operator_request(registry, b).await,
        Some(b) if is_operator_request(&b) => not_admin(session),
        Some(b) => agent_request(registry, session, b, ack_latency).await,
    };
    if let Some(m) = &session.metrics {
        if is_reveal {
            m.reveal_seconds.observe(started.elapsed().as_secs_f64());
        }
        match &body {
            Body::Enrolled(_) => {
                m.enrollments.inc();
            }
            Body::Refused(r) => {
                let reason = RefusalCode::try_from(r.code)
                    .map_or("unknown".to_string(), |c| format!("{c:?}"));
                m.refused(&reason, request);
            }
            _ => {}
        }
    }
    msg::Envelope {
        request_id,
        body: Some(body),
    }
}

/// Whether `b` is an operator's request (it needs the admin certificate).
fn is_operator_request(b: &Body) -> bool {
    matches!(
        b,
        Body::Onboard(_)
            | Body::CreateInstance(_)
            | Body::Revoke(_)
            | Body::ApplyCatalog(_)
            | Body::Query(_)
            | Body::ShowCatalog(_)
            | Body::RevokeAdmin(_)
    )
}

/// The refusal of an operator's request from a connection without a valid admin
/// certificate.
fn not_admin(session: &Session) -> Body {
    match &session.admin_serial {
        // A certificate of our CA that earned nothing when the connection opened.
        Some(serial) => refusal(
            RefusalCode::NotAuthorized,
            format!(
                "admin certificate {serial} is revoked (or the deny-list could not be \
                         read when this connection opened; connect again)"
            ),
        ),
        None => refusal(
            RefusalCode::NotAuthorized,
            "operator requests need the admin client certificate (asmnctl --cert/--key)",
        ),
    }
}

/// An agent's request (or a stranger's enrollment).
async fn agent_request<S: Store>(
    registry: &Registry<S>,
    session: &Session,
    body: Body,
    ack_latency: Option<std::time::Duration>,
) -> Body {
    match body {
        // An identity Sec-EM does not know is refused before anything costly: the D-H
        // value's subgroup check is a 3,072-bit Jacobi symbol, and anyone can send
        // enrollments with made-up identities.
        Body::Enroll(m) if unknown_identity(registry, &m.instance_key).await => {
            log_refused_enrollment(session, "an unknown instance");
            refusal(
                RefusalCode::UnknownInstance,
                "no such instance: it was never created, or its bundle is wrong",
            )
        }
        Body::Enroll(_) if session.push.as_ref().is_some_and(|(_, hub)| !hub.primed()) => {
            // Before the revocations in force are known, an agent attached now could miss
            // one: it comes back (its reveal is not spent).
            refusal(
                RefusalCode::Unavailable,
                "this Sec-EM replica is starting: try again shortly",
            )
        }
        Body::Enroll(m) => match Enroll::try_from(&m) {
            Err(e) => refusal(RefusalCode::MalformedMessage, e.to_string()),
            Ok(req) => match registry.enroll(now(), &req).await {
                Ok(enrolled) => {
                    if let Ok(mut g) = session.agent.lock() {
                        *g = Some(req.id);
                    }
                    if let Ok(mut g) = session.agent_vnf.lock() {
                        *g = Some(req.vnf.clone());
                    }
                    if let (Some((conn, _)), Some(limits)) = (&session.push, &session.limits) {
                        asmn_channel::tls::open_up(conn, &limits.transport);
                    }
                    if let Some((conn, hub)) = &session.push {
                        let task = hub.attach(
                            conn.clone(),
                            req.id,
                            (req.tenant.clone(), req.vnf.clone(), req.role),
                            vec![Body::CatalogPush((&enrolled.catalog).into())],
                        );
                        if let Ok(mut p) = session.pusher.lock() {
                            *p = Some(task);
                        }
                        // Read again once attached: a catalog committed after the
                        // enrollment read and before the attach would otherwise reach
                        // this agent only on its next connection (the follower pushes to
                        // the agents attached when it sees the change). The agent ignores
                        // versions it already enforces.
                        let mut again = Vec::new();
                        match registry.catalog(&req.vnf).await {
                            Ok(Some((c, _))) if c.version != enrolled.catalog.version => {
                                again.push(c)
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "cannot read the catalog again"),
                        }
                        // A gateway enforces the catalogs of the VNFs behind it.
                        if req.role == asmn_shared::ids::Role::Gateway {
                            match registry.catalogs_guarded_by(&req.vnf).await {
                                Ok(list) => again.extend(list),
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot list guarded catalogs")
                                }
                            }
                        }
                        for c in &again {
                            hub.push_to(&req.id, Body::CatalogPush(c.into()));
                        }
                    }
                    Body::Enrolled((&enrolled).into())
                }
                Err(e) => {
                    log_refused_enrollment(session, &format!("{}: {e}", req.id));
                    from_error(e)
                }
            },
        },
        Body::VerifyPeer(m) => match (session.agent(), wire::VerifyPeer::try_from(&m)) {
            (None, _) => refusal(
                RefusalCode::NotAuthorized,
                "enroll on this connection first",
            ),
            (_, Err(e)) => refusal(RefusalCode::MalformedMessage, e.to_string()),
            (Some(_), Ok(_))
                if session
                    .verify_budget
                    .as_ref()
                    .is_some_and(|b| b.check().is_err()) =>
            {
                refusal(
                    RefusalCode::RateLimited,
                    "too many peer verifications from this agent; retry in a second",
                )
            }
            (Some(me), Ok(v)) => {
                let answer = match v.source {
                    // The peer is asked to verify back by the push follower (see `push`).
                    None => registry.verify_peer(now(), &me, v.overlay).await,
                    Some(source) => registry.verify_pair(now(), &me, source, v.overlay).await,
                };
                match answer {
                    Ok(peer) => Body::Peer((&peer).into()),
                    Err(e) => from_error(e),
                }
            }
        },
        Body::CatalogAck(m) => match session.agent() {
            None => refusal(
                RefusalCode::NotAuthorized,
                "enroll on this connection first",
            ),
            // A gateway also acknowledges the catalogs it enforces for others: those are
            // counted in the metrics, not recorded as its own.
            Some(_)
                if session
                    .agent_vnf
                    .lock()
                    .ok()
                    .and_then(|v| v.clone())
                    .is_some_and(|v| v.as_str() != m.vnf) =>
            {
                Body::Ok(msg::Ack {})
            }
            Some(me) => match m.vnf.parse::<VnfId>() {
                Err(e) => refusal(RefusalCode::MalformedMessage, e.to_string()),
                Ok(vnf) => match registry
                    .ack_catalog(&me, &vnf, m.version, ack_latency)
                    .await
                {
                    Ok(()) => Body::Ok(msg::Ack {}),
                    Err(e) => from_error(e),
                },
            },
        },
        Body::Reattest(m) => match session.agent() {
            None => refusal(
                RefusalCode::NotAuthorized,
                "enroll on this connection first",
            ),
            Some(me) => reattest(registry, &me, &m).await,
        },
        Body::PublishKeys(m) => match (session.agent(), wire::PublishKeys::try_from(&m)) {
            (None, _) => refusal(
                RefusalCode::NotAuthorized,
                "enroll on this connection first",
            ),
            (_, Err(e)) => refusal(RefusalCode::MalformedMessage, e.to_string()),
            (Some(me), Ok(k)) => match registry
                .publish_keys(now(), &me, k.wg_public_key, &k.dh_public, k.epoch)
                .await
            {
                Ok(()) => Body::Ok(msg::Ack {}),
                Err(e) => from_error(e),
            },
        },
        _ => refusal(
            RefusalCode::InvalidRequest,
            "this message is not a request Sec-EM serves (yet)",
        ),
    }
}

/// An operator's request (the admin certificate was checked).
async fn operator_request<S: Store>(registry: &Registry<S>, body: Body) -> Body {
    match body {
        Body::Onboard(m) => onboard(registry, m).await,
        Body::CreateInstance(m) => create_instance(registry, m).await,
        Body::Revoke(m) => revoke(registry, m).await,
        Body::Query(m) => query(registry, m).await,
        Body::RevokeAdmin(m) => match registry.revoke_admin(now(), &m.serial).await {
            Ok(()) => Body::Ok(msg::Ack {}),
            Err(e) => from_error(e),
        },
        Body::ApplyCatalog(m) => match m
            .catalog
            .as_ref()
            .map(asmn_shared::catalog::SecCatalog::try_from)
        {
            None => refusal(
                RefusalCode::MalformedMessage,
                "apply_catalog.catalog is missing",
            ),
            Some(Err(e)) => refusal(RefusalCode::InvalidCatalog, e.to_string()),
            Some(Ok(c)) => {
                let vnf = c.vnf.to_string();
                match registry.apply_catalog(now(), c).await {
                    Ok(version) => Body::CatalogApplied(msg::CatalogApplied {
                        vnf,
                        version,
                        pushed_to: 0,
                    }),
                    Err(e) => from_error(e),
                }
            }
        },
        Body::ShowCatalog(m) => match m.vnf.parse::<VnfId>() {
            Err(e) => refusal(RefusalCode::InvalidRequest, e.to_string()),
            Ok(vnf) => match registry.catalog(&vnf).await {
                Ok(Some((c, _))) => Body::CatalogPush((&c).into()),
                Ok(None) => refusal(
                    RefusalCode::UnknownInstance,
                    format!("VNF {vnf} has no catalog (not on-boarded?)"),
                ),
                Err(e) => from_error(e),
            },
        },
        _ => refusal(
            RefusalCode::InvalidRequest,
            "this message is not an operator's request",
        ),
    }
}

/// Logs a refused enrollment of a connection not enrolled yet, at most once a second.
fn log_refused_enrollment(session: &Session, what: &str) {
    if session.agent().is_none()
        && let Some(skipped) = session.logs.as_ref().and_then(|l| l.allow("enroll"))
    {
        tracing::info!(
            what,
            skipped,
            "enrollment refused (logged at most once a second)"
        );
    }
}

/// Whether `key` is a well-formed instance key that Sec-EM has no record of (a store
/// error counts as known: the full path then answers it).
async fn unknown_identity<S: Store>(registry: &Registry<S>, key: &[u8]) -> bool {
    match asmn_shared::ids::InstanceKey::from_slice(key) {
        None => false,
        // Existence only: the record is parsed once, by the decision, for a known one.
        Some(id) => matches!(
            registry
                .store()
                .get(&crate::registry::instance_key(&id))
                .await,
            Ok(None)
        ),
    }
}

async fn reattest<S: Store>(
    registry: &Registry<S>,
    me: &asmn_shared::ids::InstanceKey,
    m: &msg::ReattestRequest,
) -> Body {
    let reveal = match m.reveal.as_ref().map(asmn_shared::chain::Reveal::try_from) {
        None => return refusal(RefusalCode::MalformedMessage, "reattest.reveal is missing"),
        Some(Err(e)) => return refusal(RefusalCode::MalformedMessage, e.to_string()),
        Some(Ok(r)) => r,
    };
    let sealed = match m
        .renewal
        .as_ref()
        .map(asmn_shared::chain::SealedRenewal::try_from)
    {
        None => None,
        Some(Err(e)) => return refusal(RefusalCode::MalformedMessage, e.to_string()),
        Some(Ok(r)) => Some(r),
    };
    if sealed.is_some() == m.dh_public.is_empty() {
        return refusal(
            RefusalCode::MalformedMessage,
            "reattest.renewal and reattest.dh_public come together",
        );
    }
    let req = crate::registry::Reattestation {
        reveal: &reveal,
        measurement: &m.measurement,
        renewal: sealed.as_ref().map(|s| (s, &m.dh_public[..])),
    };
    match registry.reattest(now(), me, &req).await {
        Ok(r) => Body::Reattested(msg::ReattestResponse {
            epoch: r.epoch,
            last_index: r.last_index,
        }),
        Err(e) => from_error(e),
    }
}

async fn onboard<S: Store>(registry: &Registry<S>, m: msg::OnboardRequest) -> Body {
    let golden = match wire::digests(&m.digests) {
        Ok(g) => g,
        Err(e) => return refusal(RefusalCode::InvalidRequest, e.to_string()),
    };
    match registry
        .onboard_descriptor(
            now(),
            "onboard request",
            m.vnfd_yaml.as_bytes(),
            golden,
            m.image_bytes,
        )
        .await
    {
        Ok(_) => Body::Ok(msg::Ack {}),
        Err(e) => from_error(e),
    }
}

/// A new instance of `vnf` with a fresh secret (256 bits from the operating system's
/// CSPRNG) and, unless `instance` names it, a name of its VNF and 8 random hex digits.
/// Both front doors (QUIC and REST) create instances here.
pub async fn create_fresh_instance<S: Store>(
    registry: &Registry<S>,
    req: wire::CreateInstance,
) -> Result<wire::BootstrapBundle, RegistryError> {
    let invalid = |m: String| {
        RegistryError::Refused(crate::registry::Refusal {
            code: RefusalCode::InvalidRequest,
            message: m,
        })
    };
    let (tenant, vnf, role) = (req.tenant, req.vnf, req.role);
    let Some(instance) = req.instance else {
        // A name of Sec-EM's choosing that happens to be taken: choose again.
        let mut last = None;
        for _ in 0..4 {
            let mut b = [0u8; 4];
            rand::rng().fill_bytes(&mut b);
            let name = format!("{vnf}-{}", hex::encode(b))
                .parse::<InstanceName>()
                .map_err(|e| invalid(e.to_string()))?;
            match create_named(registry, (&tenant, &vnf, role), name).await {
                Err(RegistryError::Refused(r)) if r.code == RefusalCode::AlreadyExists => {
                    last = Some(RegistryError::Refused(r));
                }
                other => return other,
            }
        }
        return Err(last.unwrap_or_else(|| invalid("no free name".into())));
    };
    create_named(registry, (&tenant, &vnf, role), instance).await
}

async fn create_named<S: Store>(
    registry: &Registry<S>,
    (tenant, vnf, role): (&asmn_shared::ids::TenantId, &VnfId, asmn_shared::ids::Role),
    instance: InstanceName,
) -> Result<wire::BootstrapBundle, RegistryError> {
    let (tenant, vnf) = (tenant.clone(), vnf.clone());
    let mut nonce = [0u8; 32];
    if rand::rngs::OsRng.try_fill_bytes(&mut nonce).is_err() {
        return Err(RegistryError::Refused(crate::registry::Refusal {
            code: RefusalCode::Unavailable,
            message: "the system's random source failed".into(),
        }));
    }
    let secret = Nonce::new(nonce);
    zeroize::Zeroize::zeroize(&mut nonce);
    registry
        .create_instance(now(), tenant, vnf, instance, role, secret)
        .await
}

async fn create_instance<S: Store>(registry: &Registry<S>, m: msg::CreateInstanceRequest) -> Body {
    let req = match wire::CreateInstance::try_from(&m) {
        Ok(r) => r,
        Err(e) => return refusal(RefusalCode::InvalidRequest, e.to_string()),
    };
    match create_fresh_instance(registry, req).await {
        Ok(bundle) => Body::InstanceCreated((&bundle).into()),
        Err(e) => from_error(e),
    }
}

async fn revoke<S: Store>(registry: &Registry<S>, m: msg::RevokeRequest) -> Body {
    let (id, reason) = match wire::Revoke::try_from(&m) {
        Ok(r) => (r.id, r.reason),
        Err(e) => return refusal(RefusalCode::InvalidRequest, e.to_string()),
    };
    match registry.revoke(now(), &id, &reason).await {
        Ok(()) => Body::Ok(msg::Ack {}),
        Err(e) => from_error(e),
    }
}

/// Most bytes of JSON in one listing page: a frame with room for the envelope.
const PAGE_BUDGET: usize = wire::MAX_FRAME - 1024;

async fn query<S: Store>(registry: &Registry<S>, m: msg::QueryRequest) -> Body {
    let page = |json: String, next: Option<String>| {
        Body::QueryResult(msg::QueryResult {
            json,
            next: next.unwrap_or_default(),
        })
    };
    let to_json =
        |v: &serde_json::Value| serde_json::to_string(v).unwrap_or_else(|_| "null".to_string());
    match m.what.as_str() {
        "instances" => {
            // As many whole records as fit in a frame (a record carries its D-H value: 1
            // to 2.5 KiB of JSON depending on the group), at most `limit`.
            let limit = if m.limit == 0 { 64 } else { m.limit.min(64) };
            match registry.instances_page(&m.after, limit as usize).await {
                Ok((records, mut next)) => {
                    let mut json = String::from("[");
                    for (i, rec) in records.iter().enumerate() {
                        let Ok(one) = serde_json::to_string(rec) else {
                            return refusal(RefusalCode::Unavailable, "a record did not encode");
                        };
                        if i > 0 && json.len() + one.len() + 2 > PAGE_BUDGET {
                            next = records.get(i - 1).map(|r| r.id.to_hex());
                            break;
                        }
                        if i > 0 {
                            json.push(',');
                        }
                        json.push_str(&one);
                    }
                    json.push(']');
                    page(json, next)
                }
                Err(e) => from_error(e),
            }
        }
        "instance" => {
            let Some(id) = hex::decode(&m.argument)
                .ok()
                .and_then(|b| asmn_shared::ids::InstanceKey::from_slice(&b))
            else {
                return refusal(
                    RefusalCode::InvalidRequest,
                    "the instance ID is 64 hex digits",
                );
            };
            match registry.instance_view(&id).await {
                Ok(Some(rec)) => match serde_json::to_string(&rec) {
                    Ok(json) => page(json, None),
                    Err(e) => refusal(RefusalCode::Unavailable, e.to_string()),
                },
                Ok(None) => refusal(RefusalCode::UnknownInstance, "no such instance"),
                Err(e) => from_error(e),
            }
        }
        "audit" => {
            // `after`: the first record to show (empty: from 1); `argument`: only records
            // of this instance (hex ID) or of this kind, when given.
            let since = if m.after.is_empty() {
                1
            } else {
                match m.after.parse::<u64>() {
                    Ok(n) => n,
                    Err(_) => {
                        return refusal(
                            RefusalCode::InvalidRequest,
                            "audit: `after` is a record number",
                        );
                    }
                }
            };
            let filter = m.argument.clone();
            let budget = if m.limit == 0 {
                PAGE_BUDGET
            } else {
                (m.limit as usize).saturating_mul(512).min(PAGE_BUDGET)
            };
            let keep = |r: &crate::audit::AuditRecord| {
                filter.is_empty() || r.kind == filter || r.instance.as_deref() == Some(&filter)
            };
            match crate::audit::page(registry.store(), registry.audit_key(), since, budget, keep)
                .await
            {
                Ok((records, next)) => match serde_json::to_string(&records) {
                    Ok(json) => page(json, next.map(|n| n.to_string())),
                    Err(e) => refusal(RefusalCode::Unavailable, e.to_string()),
                },
                Err(crate::audit::AuditError::Store(e)) => from_error(RegistryError::Store(e)),
                Err(e) => refusal(
                    RefusalCode::Unavailable,
                    format!("the audit log does not verify: {e}"),
                ),
            }
        }
        "audit-verify" | "audit-checkpoint" => {
            let checkpoint = if m.argument.is_empty() {
                None
            } else {
                match serde_json::from_str::<crate::audit::Checkpoint>(&m.argument) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        return refusal(
                            RefusalCode::InvalidRequest,
                            format!("the checkpoint is not valid JSON: {e}"),
                        );
                    }
                }
            };
            match crate::audit::verify(registry.store(), registry.audit_key(), checkpoint.as_ref())
                .await
            {
                Ok(head) if m.what == "audit-checkpoint" => match serde_json::to_string(&head) {
                    Ok(json) => page(json, None),
                    Err(e) => refusal(RefusalCode::Unavailable, e.to_string()),
                },
                Ok(head) => page(
                    to_json(&serde_json::json!({"ok": true, "records": head.seq})),
                    None,
                ),
                Err(crate::audit::AuditError::Store(e)) => from_error(RegistryError::Store(e)),
                Err(e) => page(
                    to_json(&serde_json::json!({"ok": false, "error": e.to_string()})),
                    None,
                ),
            }
        }
        "backup" => match registry.backup().await {
            Some(Ok(summary)) => page(to_json(&summary), None),
            Some(Err(e)) => refusal(RefusalCode::Unavailable, format!("backup failed: {e}")),
            None => refusal(
                RefusalCode::InvalidRequest,
                "this Sec-EM's store is etcd: back it up with `etcdctl snapshot save` \
                 (docs/deploy.md)",
            ),
        },
        "admin-revoked" => match registry.revoked_admins().await {
            Ok(v) => page(to_json(&serde_json::json!(v)), None),
            Err(e) => from_error(e),
        },
        other => refusal(
            RefusalCode::InvalidRequest,
            format!(
                "unknown query {other:?}: instances, instance, audit, audit-verify, audit-checkpoint, admin-revoked, backup"
            ),
        ),
    }
}

/// Open connections, in total and per source address.
#[derive(Debug, Default)]
struct Admission {
    per_source: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    total: std::sync::atomic::AtomicUsize,
}

/// One admitted connection; dropping it gives its place back.
struct Admitted {
    admission: Arc<Admission>,
    ip: std::net::IpAddr,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Admission {
    /// Admits a connection from `ip` unless a cap is reached (then the metric's event).
    fn admit(
        self: &Arc<Self>,
        ip: std::net::IpAddr,
        limits: &Limits,
        metrics: &Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Admitted, &'static str> {
        use std::sync::atomic::Ordering;
        let mut per = self.per_source.lock().map_err(|_| "refused_total")?;
        if self.total.load(Ordering::Relaxed) >= limits.max_connections {
            return Err("refused_total");
        }
        let n = per.entry(ip).or_insert(0);
        if *n >= limits.max_connections_per_source {
            return Err("refused_source");
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = metrics {
            m.connections.inc();
        }
        Ok(Admitted {
            admission: Arc::clone(self),
            ip,
            metrics: metrics.clone(),
        })
    }

    fn total(&self) -> usize {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count(&self, ip: std::net::IpAddr) -> usize {
        self.per_source
            .lock()
            .map_or(0, |per| per.get(&ip).copied().unwrap_or(0))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut per) = self.admission.per_source.lock()
            && let Some(n) = per.get_mut(&self.ip)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
        self.admission
            .total
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.connections.dec();
        }
    }
}

/// Logs at most one line per second per kind of event, with the number not logged since.
#[derive(Debug, Default)]
pub struct LogLimiter {
    last: std::sync::Mutex<std::collections::HashMap<&'static str, (std::time::Instant, u64)>>,
}

impl LogLimiter {
    /// Whether to log an event of `kind` now, and how many were skipped before it.
    pub fn allow(&self, kind: &'static str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut g = self.last.lock().ok()?;
        let e = g
            .entry(kind)
            .or_insert((now - std::time::Duration::from_secs(2), 0));
        if now.duration_since(e.0) >= std::time::Duration::from_secs(1) {
            let skipped = e.1;
            *e = (now, 0);
            Some(skipped)
        } else {
            e.1 += 1;
            None
        }
    }
}

fn guard(metrics: &Option<Arc<crate::metrics::Metrics>>, event: &str) {
    if let Some(m) = metrics {
        m.guard(event);
    }
}

/// Serves connections on `endpoint` until it is closed, within `limits`: caps on
/// connections (total and per source), address validation above `retry_above`, a
/// deadline to enroll for connections without the admin certificate (which get few
/// streams until then), a deadline on every request. Enrolled agents get pushes from
/// `hub`.
pub async fn serve<S: Store>(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry<S>>,
    hub: Arc<crate::push::PushHub>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    limits: Limits,
) {
    let admission = Arc::new(Admission::default());
    let logs = Arc::new(LogLimiter::default());
    let strangers = Arc::new(Strangers::new(&limits));
    let _housekeeping = {
        let strangers = Arc::clone(&strangers);
        crate::store::AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
            loop {
                tick.tick().await;
                // Sources whose budget is full again are forgotten: the map holds only
                // sources that asked lately.
                strangers.per_source.retain_recent();
                strangers.per_source.shrink_to_fit();
                strangers.new_connections.retain_recent();
                strangers.new_connections.shrink_to_fit();
            }
        }))
    };
    let limits = Arc::new(limits);
    while let Some(incoming) = endpoint.accept().await {
        let source = incoming.remote_address();
        // Above the threshold every new connection proves its address first; so does one
        // from a source that holds half its places already (a spoofed source address
        // could otherwise fill a real one's places with handshakes that never finish).
        if !incoming.remote_address_validated()
            && incoming.may_retry()
            && (admission.total() >= limits.retry_above
                || admission.count(source.ip()) * 2 >= limits.max_connections_per_source)
        {
            guard(&metrics, "retry");
            let _ = incoming.retry();
            continue;
        }
        // New connections per source address, counted only once the address is proved
        // (a spoofed source cannot spend a real one's budget).
        if incoming.remote_address_validated()
            && strangers.new_connections.check_key(&source.ip()).is_err()
        {
            guard(&metrics, "refused_rate");
            if let Some(skipped) = logs.allow("refused_rate") {
                tracing::warn!(%source, skipped, "connection ignored: too many new connections from this address");
            }
            // Not even a refusal: answering costs Sec-EM a packet and tells the sender
            // to try again at once; silence makes it wait for its own timeout.
            incoming.ignore();
            continue;
        }
        let admitted = match admission.admit(source.ip(), &limits, &metrics) {
            Ok(a) => a,
            Err(event) => {
                guard(&metrics, event);
                if let Some(skipped) = logs.allow(event) {
                    tracing::warn!(%source, event, skipped, "connection refused: cap reached");
                }
                incoming.refuse();
                continue;
            }
        };
        let (registry, hub, metrics, limits, logs, strangers) = (
            Arc::clone(&registry),
            Arc::clone(&hub),
            metrics.clone(),
            Arc::clone(&limits),
            Arc::clone(&logs),
            Arc::clone(&strangers),
        );
        tokio::spawn(async move {
            let _admitted = admitted;
            let conn = match tokio::time::timeout(limits.enroll_deadline, incoming).await {
                Ok(Ok(c)) => c,
                _ => {
                    guard(&metrics, "handshake_failed");
                    return;
                }
            };
            serve_connection(conn, registry, hub, metrics, limits, logs, strangers).await;
        });
    }
}

/// Requests of peers that have not proved themselves (no admin certificate, not enrolled)
/// handled at once, across all connections: however many strangers ask, they queue among
/// themselves and never take more than this share of Sec-EM.
const STRANGER_LANE: usize = 16;

/// What strangers' requests may take: a lane of [`STRANGER_LANE`] across all of them, and
/// a budget per source address.
struct Strangers {
    lane: tokio::sync::Semaphore,
    per_source: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
    new_connections: governor::DefaultKeyedRateLimiter<std::net::IpAddr>,
}

impl Strangers {
    fn new(limits: &Limits) -> Self {
        let quota = |per_sec: u32| {
            let rate = std::num::NonZeroU32::new(per_sec).unwrap_or(std::num::NonZeroU32::MIN);
            let burst = rate.saturating_mul(std::num::NonZeroU32::MIN.saturating_add(1));
            governor::Quota::per_second(rate).allow_burst(burst)
        };
        Self {
            lane: tokio::sync::Semaphore::new(STRANGER_LANE),
            per_source: governor::RateLimiter::keyed(quota(
                limits.stranger_requests_per_source_per_sec,
            )),
            new_connections: governor::RateLimiter::keyed(quota(
                limits.connections_per_source_per_sec,
            )),
        }
    }

    /// Waits until `source` may be served (its budget) and a place in the lane is free.
    async fn admit(
        &self,
        source: std::net::IpAddr,
        metrics: &Option<Arc<crate::metrics::Metrics>>,
    ) -> Option<tokio::sync::SemaphorePermit<'_>> {
        use governor::clock::Clock;
        // The limiter's own clock (making one calibrates it: far too slow per request).
        let clock = self.per_source.clock();
        // Bounded: each wait is what the budget says; the request deadline ends it anyway.
        for _ in 0..1_000 {
            match self.per_source.check_key(&source) {
                Ok(()) => break,
                Err(not_until) => {
                    guard(metrics, "stranger_throttled");
                    tokio::time::sleep(not_until.wait_time_from(clock.now())).await;
                }
            }
        }
        self.lane.acquire().await.ok()
    }
}

/// An enrolled agent whose connection to this replica ended (and that has not
/// reconnected to it since) is lost until it enrolls again, here or elsewhere.
async fn agent_gone<S: Store>(
    registry: &Registry<S>,
    hub: &crate::push::PushHub,
    conn: &quinn::Connection,
    session: &Session,
) {
    if let Some(id) = session.agent()
        && hub.detach(&id, conn.stable_id())
    {
        // The reason may be the peer's words: printable and short in the audit log.
        let why: String = conn
            .close_reason()
            .map_or_else(|| "closed".to_string(), |r| r.to_string())
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .take(120)
            .collect();
        if let Err(e) = registry
            .agent_lost(now(), &id, format!("control connection ended: {why}"))
            .await
        {
            tracing::warn!(error = %e, "cannot record a lost agent");
        }
    }
}

/// Serves the streams of one connection until it ends.
async fn serve_connection<S: Store>(
    conn: quinn::Connection,
    registry: Arc<Registry<S>>,
    hub: Arc<crate::push::PushHub>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    limits: Arc<Limits>,
    logs: Arc<LogLimiter>,
    strangers: Arc<Strangers>,
) {
    let source = conn.remote_address().ip();
    // An admin certificate on the deny-list (or one whose serial cannot be read, or a
    // deny-list that cannot be read) earns nothing: the connection is a stranger's.
    let admin_serial = asmn_channel::tls::peer_certificate(&conn)
        .as_ref()
        .and_then(|c| crate::pki::serial_of(c));
    let admin = match &admin_serial {
        Some(serial) => matches!(registry.admin_revoked(serial).await, Ok(false)),
        None => false,
    };
    if admin {
        asmn_channel::tls::open_up(&conn, &limits.transport);
    }
    let session = Arc::new(Session {
        admin,
        admin_serial,
        agent: std::sync::Mutex::new(None),
        agent_vnf: std::sync::Mutex::new(None),
        push: Some((conn.clone(), Arc::clone(&hub))),
        pusher: std::sync::Mutex::new(None),
        metrics: metrics.clone(),
        verify_budget: Some(crate::registry::verify_peer_limiter(
            limits.verify_peer_per_sec,
        )),
        logs: Some(logs),
        limits: Some(Arc::clone(&limits)),
    });
    // Jittered (half to all of the configured time): strangers that connected together
    // are not all closed, and do not all come back, at the same moment.
    let deadline = tokio::time::sleep(
        limits
            .enroll_deadline
            .mul_f64(rand::random_range(0.5..=1.0)),
    );
    tokio::pin!(deadline);
    let mut enrolled = session.admin;
    // The connection's requests: it keeps its place under the caps until they are done.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        while tasks.try_join_next().is_some() {}
        let stream = tokio::select! {
            s = conn.accept_bi() => s,
            () = &mut deadline, if !enrolled => {
                if session.agent().is_some() {
                    enrolled = true;
                    continue;
                }
                guard(&metrics, "enroll_deadline");
                conn.close(0u32.into(), b"enroll within the deadline");
                while tasks.join_next().await.is_some() {}
                agent_gone(&registry, &hub, &conn, &session).await;
                return;
            }
        };
        let Ok((mut send, mut recv)) = stream else {
            // Bounded: each task ends within the request deadline, a decision, and the
            // write deadline.
            while tasks.join_next().await.is_some() {}
            agent_gone(&registry, &hub, &conn, &session).await;
            return;
        };
        let (registry, session, limits, strangers) = (
            Arc::clone(&registry),
            Arc::clone(&session),
            Arc::clone(&limits),
            Arc::clone(&strangers),
        );
        tasks.spawn(async move {
            // The deadline covers what a peer controls: sending its request, and waiting
            // for its turn. The decision itself is not cancelled half-way (a commit
            // without its audit record, or a group of others' audit records dropped).
            let received = async {
                // A stranger's request is read only up to what an enrollment needs, then
                // handled in the strangers' lane (taken after the read: a stranger that
                // never finishes its request holds no place in it).
                let proved = session.admin || session.agent().is_some();
                let cap = if proved {
                    wire::FRAME_HEADER + wire::MAX_FRAME
                } else {
                    asmn_channel::tls::STRANGER_REQUEST
                };
                match recv.read_to_end(cap).await {
                    Err(e) => Err(msg::Envelope {
                        request_id: 0,
                        body: Some(refusal(
                            RefusalCode::MalformedMessage,
                            format!("request too large or cut: {e}"),
                        )),
                    }),
                    Ok(bytes) => match asmn_channel::call::decode_one_frame(&bytes) {
                        Err(e) => Err(msg::Envelope {
                            request_id: 0,
                            body: Some(refusal(RefusalCode::MalformedMessage, e.to_string())),
                        }),
                        Ok(env) => {
                            let lane = if proved {
                                None
                            } else {
                                strangers.admit(source, &session.metrics).await
                            };
                            Ok((env, lane))
                        }
                    },
                }
            };
            let reply = match tokio::time::timeout(limits.request_deadline, received).await {
                Err(_) => {
                    guard(&session.metrics, "request_deadline");
                    let _ = send.reset(1u32.into());
                    return;
                }
                Ok(Err(refused)) => refused,
                Ok(Ok((env, _lane))) => handle(&registry, &session, env).await,
            };
            let frame = match wire::encode_frame(&reply) {
                Ok(f) => f,
                // Never a silent drop: the caller learns that the answer was too large.
                Err(e) => match wire::encode_frame(&msg::Envelope {
                    request_id: reply.request_id,
                    body: Some(refusal(
                        RefusalCode::TooLarge,
                        format!(
                            "the answer does not fit in one frame ({e}); ask for a smaller page"
                        ),
                    )),
                }) {
                    Ok(f) => f,
                    Err(_) => return,
                },
            };
            let write = async {
                let _ = send.write_all(&frame).await;
                let _ = send.finish();
            };
            if tokio::time::timeout(limits.request_deadline, write)
                .await
                .is_err()
            {
                let _ = send.reset(1u32.into());
            }
        });
    }
}
