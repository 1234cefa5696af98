//! Sec-EM's request handling: one envelope in, one envelope out, over the registry.
//!
//! Operator requests need the admin client certificate; agents' need nothing but their
//! reveals. Every malformed or unexpected message is answered with a typed refusal and
//! changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use asmn_shared::catalog::parse_vnfd;
use asmn_shared::crypto::Nonce;
use asmn_shared::ids::{InstanceName, TenantId, VnfId};
use asmn_shared::measure::{Algorithm, DigestValue};
use asmn_shared::wire::msg::{self, Body, RefusalCode};
use asmn_shared::wire::{self, Enroll};
use rand::{RngCore, TryRngCore};

use crate::registry::{Registry, RegistryError};
use crate::store::Store;
use crate::transport;

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
    let admin = session.admin;
    let request_id = env.request_id;
    let started = std::time::Instant::now();
    let is_reveal = matches!(env.body, Some(Body::Enroll(_)) | Some(Body::Reattest(_)));
    let ack_latency = match (&session.metrics, &env.body) {
        (Some(m), Some(Body::CatalogAck(a))) => m.catalog_acked(&a.vnf, a.version),
        _ => None,
    };
    let body = match env.body {
        None => refusal(RefusalCode::MalformedMessage, "empty envelope"),
        Some(Body::Enroll(m)) => match Enroll::try_from(&m) {
            Err(e) => refusal(RefusalCode::MalformedMessage, e.to_string()),
            Ok(req) => match registry.enroll(now(), &req).await {
                Ok(enrolled) => {
                    if let Ok(mut g) = session.agent.lock() {
                        *g = Some(req.id);
                    }
                    if let Ok(mut g) = session.agent_vnf.lock() {
                        *g = Some(req.vnf.clone());
                    }
                    if let Some((conn, hub)) = &session.push {
                        let mut first = vec![Body::CatalogPush((&enrolled.catalog).into())];
                        // A gateway enforces the catalogs of the VNFs behind it.
                        if req.role == asmn_shared::ids::Role::Gateway {
                            match registry.catalogs_guarded_by(&req.vnf).await {
                                Ok(list) => {
                                    first.extend(list.iter().map(|c| Body::CatalogPush(c.into())))
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot list guarded catalogs")
                                }
                            }
                        }
                        let task = hub.attach(
                            conn.clone(),
                            req.id,
                            (req.tenant.clone(), req.vnf.clone(), req.role),
                            first,
                        );
                        if let Ok(mut p) = session.pusher.lock() {
                            *p = Some(task);
                        }
                    }
                    Body::Enrolled((&enrolled).into())
                }
                Err(e) => from_error(e),
            },
        },
        Some(Body::VerifyPeer(m)) => match (session.agent(), m.overlay.parse::<std::net::IpAddr>())
        {
            (None, _) => refusal(
                RefusalCode::NotAuthorized,
                "enroll on this connection first",
            ),
            (_, Err(_)) => refusal(
                RefusalCode::MalformedMessage,
                "verify_peer.overlay is not an IP address",
            ),
            (Some(me), Ok(ip)) if m.source.is_empty() => {
                match registry.verify_peer(now(), &me, ip).await {
                    // The peer is asked to verify back by the push follower (see `push`).
                    Ok(peer) => Body::Peer((&peer).into()),
                    Err(e) => from_error(e),
                }
            }
            (Some(me), Ok(ip)) => match m.source.parse::<std::net::IpAddr>() {
                Err(_) => refusal(
                    RefusalCode::MalformedMessage,
                    "verify_peer.source is not an IP address",
                ),
                Ok(source) => match registry.verify_pair(now(), &me, source, ip).await {
                    Ok(peer) => Body::Peer((&peer).into()),
                    Err(e) => from_error(e),
                },
            },
        },
        Some(Body::CatalogAck(m)) => match session.agent() {
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
            Some(me) => match registry.ack_catalog(&me, m.version, ack_latency).await {
                Ok(()) => Body::Ok(msg::Ack {}),
                Err(e) => from_error(e),
            },
        },
        Some(Body::Reattest(m)) => match session.agent() {
            None => refusal(
                RefusalCode::NotAuthorized,
                "enroll on this connection first",
            ),
            Some(me) => reattest(registry, &me, &m).await,
        },
        Some(Body::PublishKeys(m)) => {
            match (session.agent(), <[u8; 32]>::try_from(&m.wg_public_key[..])) {
                (None, _) => refusal(
                    RefusalCode::NotAuthorized,
                    "enroll on this connection first",
                ),
                (_, Err(_)) => refusal(
                    RefusalCode::MalformedMessage,
                    "publish_keys.wg_public_key must be 32 bytes",
                ),
                (Some(me), Ok(wg)) => match registry
                    .publish_keys(now(), &me, wg, &m.dh_public, m.epoch)
                    .await
                {
                    Ok(()) => Body::Ok(msg::Ack {}),
                    Err(e) => from_error(e),
                },
            }
        }
        Some(Body::Onboard(m)) if admin => onboard(registry, m).await,
        Some(Body::CreateInstance(m)) if admin => create_instance(registry, m).await,
        Some(Body::Revoke(m)) if admin => revoke(registry, m).await,
        Some(Body::Query(m)) if admin => query(registry, m).await,
        Some(Body::ApplyCatalog(m)) if admin => match m
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
        Some(Body::ShowCatalog(m)) if admin => match m.vnf.parse::<VnfId>() {
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
        Some(Body::Onboard(_))
        | Some(Body::CreateInstance(_))
        | Some(Body::Revoke(_))
        | Some(Body::ApplyCatalog(_))
        | Some(Body::Query(_))
        | Some(Body::ShowCatalog(_))
            if !admin =>
        {
            refusal(
                RefusalCode::NotAuthorized,
                "operator requests need the admin client certificate (asmnctl --cert/--key)",
            )
        }
        Some(_) => refusal(
            RefusalCode::InvalidRequest,
            "this message is not a request Sec-EM serves (yet)",
        ),
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
                m.refused(&reason);
            }
            _ => {}
        }
    }
    msg::Envelope {
        request_id,
        body: Some(body),
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
    let vnfd = match parse_vnfd("onboard request", m.vnfd_yaml.as_bytes()) {
        Ok(v) => v,
        Err(e) => return refusal(RefusalCode::InvalidCatalog, e.to_string()),
    };
    let mut golden = BTreeMap::new();
    for d in &m.digests {
        let Ok(alg) = d.algorithm.parse::<Algorithm>() else {
            return refusal(
                RefusalCode::InvalidRequest,
                format!("unknown digest algorithm {:?}", d.algorithm),
            );
        };
        if d.value.len() != alg.output_len() {
            return refusal(
                RefusalCode::InvalidRequest,
                format!("{alg} digest of {} bytes", d.value.len()),
            );
        }
        golden.insert(alg, DigestValue(d.value.clone()));
    }
    match registry.onboard(now(), vnfd, golden, m.image_bytes).await {
        Ok(()) => Body::Ok(msg::Ack {}),
        Err(e) => from_error(e),
    }
}

async fn create_instance<S: Store>(registry: &Registry<S>, m: msg::CreateInstanceRequest) -> Body {
    let names = (
        m.tenant.parse::<TenantId>(),
        m.vnf.parse::<VnfId>(),
        if m.instance.is_empty() {
            let mut b = [0u8; 4];
            rand::rng().fill_bytes(&mut b);
            format!("{}-{}", m.vnf, hex::encode(b))
        } else {
            m.instance.clone()
        }
        .parse::<InstanceName>(),
    );
    let (tenant, vnf, instance) = match names {
        (Ok(t), Ok(v), Ok(i)) => (t, v, i),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return refusal(RefusalCode::InvalidRequest, e.to_string());
        }
    };
    let role = match msg::RoleMsg::try_from(m.role) {
        Ok(msg::RoleMsg::Gateway) => asmn_shared::ids::Role::Gateway,
        Ok(msg::RoleMsg::Vnf) | Ok(msg::RoleMsg::Unspecified) => asmn_shared::ids::Role::Vnf,
        Err(_) => return refusal(RefusalCode::InvalidRequest, "unknown role"),
    };
    // The instance's secret: 256 bits from the operating system's CSPRNG.
    let mut nonce = [0u8; 32];
    if rand::rngs::OsRng.try_fill_bytes(&mut nonce).is_err() {
        return refusal(
            RefusalCode::Unavailable,
            "the system's random source failed",
        );
    }
    let secret = Nonce::new(nonce);
    zeroize::Zeroize::zeroize(&mut nonce);
    let nonce = secret;
    match registry
        .create_instance(now(), tenant, vnf, instance, role, nonce)
        .await
    {
        Ok(bundle) => Body::InstanceCreated((&bundle).into()),
        Err(e) => from_error(e),
    }
}

async fn revoke<S: Store>(registry: &Registry<S>, m: msg::RevokeRequest) -> Body {
    let Some(id) = asmn_shared::ids::InstanceKey::from_slice(&m.instance_key) else {
        return refusal(RefusalCode::InvalidRequest, "instance_key must be 32 bytes");
    };
    let reason = if m.reason.is_empty() {
        "revoked by the operator".to_string()
    } else {
        m.reason.chars().take(256).collect()
    };
    match registry.revoke(now(), &id, &reason).await {
        Ok(()) => Body::Ok(msg::Ack {}),
        Err(e) => from_error(e),
    }
}

async fn query<S: Store>(registry: &Registry<S>, m: msg::QueryRequest) -> Body {
    let result = match m.what.as_str() {
        "instances" => registry
            .instances()
            .await
            .map(|v| serde_json::to_string(&v)),
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
                Ok(Some(rec)) => Ok(serde_json::to_string(&rec)),
                Ok(None) => return refusal(RefusalCode::UnknownInstance, "no such instance"),
                Err(e) => Err(e),
            }
        }
        "audit" => crate::audit::verify(registry.store())
            .await
            .map(|v| serde_json::to_string(&v))
            .map_err(RegistryError::from),
        "audit-verify" => match crate::audit::verify(registry.store()).await {
            Ok(v) => Ok(serde_json::to_string(
                &serde_json::json!({"ok": true, "records": v.len()}),
            )),
            Err(crate::audit::AuditError::Store(e)) => Err(RegistryError::Store(e)),
            Err(e) => Ok(serde_json::to_string(
                &serde_json::json!({"ok": false, "error": e.to_string()}),
            )),
        },
        other => {
            return refusal(
                RefusalCode::InvalidRequest,
                format!("unknown query {other:?}: instances, instance, audit, audit-verify"),
            );
        }
    };
    match result {
        Ok(Ok(json)) => Body::QueryResult(msg::QueryResult { json }),
        Ok(Err(e)) => refusal(RefusalCode::Unavailable, e.to_string()),
        Err(e) => from_error(e),
    }
}

/// Serves connections on `endpoint` until it is closed: every connection and stream in
/// its own task, each request bounded by the frame cap. Enrolled agents get pushes from
/// `hub`.
pub async fn serve<S: Store>(
    endpoint: quinn::Endpoint,
    registry: Arc<Registry<S>>,
    hub: Arc<crate::push::PushHub>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (registry, hub, metrics) = (Arc::clone(&registry), Arc::clone(&hub), metrics.clone());
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            let session = Arc::new(Session {
                admin: transport::is_admin(&conn),
                agent: std::sync::Mutex::new(None),
                agent_vnf: std::sync::Mutex::new(None),
                push: Some((conn.clone(), hub)),
                pusher: std::sync::Mutex::new(None),
                metrics,
            });
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let (registry, session) = (Arc::clone(&registry), Arc::clone(&session));
                tokio::spawn(async move {
                    let reply = match recv.read_to_end(wire::FRAME_HEADER + wire::MAX_FRAME).await {
                        Err(e) => msg::Envelope {
                            request_id: 0,
                            body: Some(refusal(
                                RefusalCode::MalformedMessage,
                                format!("request too large or cut: {e}"),
                            )),
                        },
                        Ok(bytes) => match transport::decode_one_frame(&bytes) {
                            Err(e) => msg::Envelope {
                                request_id: 0,
                                body: Some(refusal(RefusalCode::MalformedMessage, e.to_string())),
                            },
                            Ok(env) => handle(&registry, &session, env).await,
                        },
                    };
                    if let Ok(frame) = wire::encode_frame(&reply) {
                        let _ = send.write_all(&frame).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}
