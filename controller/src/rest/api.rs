//! The resources of the REST API, their JSON, and the OpenAPI document generated from
//! them (`docs/openapi.json`; CI checks the committed one against this code).

// utoipa's `params(...)` expansion names the parameter types in full.
#![allow(unused_qualifications)]

use std::collections::BTreeMap;
use std::sync::Arc;

use asmn_shared::ids::{InstanceKey, Role, TenantId, VnfId};
use asmn_shared::measure::{Algorithm, DigestValue};
use asmn_shared::wire;
use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{Problem, Rest};
use crate::registry::{InstanceRecord, InstanceState, VnfRecord};
use crate::service::now;
use crate::store::Store;

type Shared<S> = State<Arc<Rest<S>>>;
type Answer<T> = Result<T, Problem>;

/// Largest JSON request body. A descriptor or catalog is at most 1 MiB of YAML, but its
/// JSON string may escape every character (`\u0000`: 6 bytes): a body the schema admits
/// is read whole and refused by the catalog rules (422), not cut off with a 413 while the
/// client is still sending it (which the client sees as a broken connection).
const JSON_LIMIT: usize = 16 << 20;
/// Largest image uploaded for on-boarding.
const UPLOAD_LIMIT: usize = 64 << 30;
/// Page size when `limit` is not given.
const DEFAULT_LIMIT: u32 = 100;
/// Largest page.
const MAX_LIMIT: u32 = 1000;

pub(super) fn routes<S: Store>() -> Router<Arc<Rest<S>>> {
    Router::new()
        .route("/v1/health", get(health::<S>))
        .route("/v1/openapi.json", get(openapi_json))
        .route(
            "/v1/vnf-packages",
            get(list_packages::<S>).post(onboard_by_digest::<S>),
        )
        .route(
            "/v1/vnf-packages/upload",
            post(onboard_by_upload::<S>).layer(DefaultBodyLimit::max(UPLOAD_LIMIT)),
        )
        .route("/v1/vnf-packages/{vnf}", get(show_package::<S>))
        .route(
            "/v1/instances",
            get(list_instances::<S>).post(create_instance::<S>),
        )
        .route("/v1/instances/{id}", get(show_instance::<S>))
        .route("/v1/instances/{id}/revoke", post(revoke_instance::<S>))
        .route(
            "/v1/catalogs/{vnf}",
            get(show_catalog::<S>).put(put_catalog::<S>),
        )
        .route("/v1/catalogs/{vnf}/history", get(catalog_history::<S>))
        .route("/v1/audit", get(audit::<S>))
        .route(
            "/v1/subscriptions",
            get(list_subscriptions::<S>).post(subscribe::<S>),
        )
        .route(
            "/v1/subscriptions/{id}",
            get(show_subscription::<S>).delete(unsubscribe::<S>),
        )
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
}

/// The OpenAPI document of this API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "ASMN Sec-EM northbound API",
        version = "1",
        description = "On-boarding, instances, Sec-catalogs, the audit log and event subscriptions of an ASMN tenant, for orchestrators (NFVO/VNFM). Every route but health and this document needs an admin client certificate of the tenant's CA (mutual TLS). Errors are RFC 9457 problem documents with a stable `code`."
    ),
    paths(
        health,
        openapi_json,
        list_packages,
        onboard_by_digest,
        onboard_by_upload,
        show_package,
        list_instances,
        create_instance,
        show_instance,
        revoke_instance,
        show_catalog,
        put_catalog,
        catalog_history,
        audit,
        list_subscriptions,
        subscribe,
        show_subscription,
        unsubscribe,
    ),
    components(schemas(Problem, Event)),
    modifiers(&MutualTls),
    tags(
        (name = "vnf-packages", description = "VNFs on-boarded with their golden digests"),
        (name = "instances", description = "VNF instances: bundles, attestation state, revocation"),
        (name = "catalogs", description = "Sec-catalogs: the whitelists agents and gateways enforce"),
        (name = "audit", description = "The hash-chained log of security decisions"),
        (name = "subscriptions", description = "Event notifications (signed webhooks)"),
        (name = "service", description = "Health and this document"),
    )
)]
pub struct ApiDoc;

struct MutualTls;

impl utoipa::Modify for MutualTls {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{SecurityRequirement, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme("admin-certificate", SecurityScheme::MutualTls {
            description: Some(
                "An admin client certificate of the tenant's CA (`sec-em init`, `asmnctl admin issue`), not on the deny-list".into(),
            ),
            extensions: None,
        });
        api.security = Some(vec![SecurityRequirement::new(
            "admin-certificate",
            Vec::<String>::new(),
        )]);
    }
}

// ---------------------------------------------------------------------------------------
// Shared shapes

/// Paging of a listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Where the previous page ended (its `next`); absent for the first page.
    #[param(max_length = 128)]
    after: Option<String>,
    /// Items per page, 1 to 1000 (100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

fn limit(l: Option<u32>) -> Answer<usize> {
    match l.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(Problem::bad_request("limit: 1 to 1000")),
        n if n > MAX_LIMIT => Err(Problem::bad_request("limit: 1 to 1000")),
        n => Ok(n as usize),
    }
}

fn after_text(a: Option<String>) -> Answer<String> {
    match a {
        None => Ok(String::new()),
        Some(a) if a.len() > 128 || !a.bytes().all(|b| b.is_ascii_graphic()) => Err(
            Problem::bad_request("after: the `next` of the previous page"),
        ),
        Some(a) => Ok(a),
    }
}

fn vnf_id(v: Result<Path<String>, PathRejection>) -> Answer<VnfId> {
    let Path(v) = v?;
    v.parse::<VnfId>()
        .map_err(|e| Problem::bad_request(format!("vnf: {e}")))
}

fn instance_id(v: Result<Path<String>, PathRejection>) -> Answer<InstanceKey> {
    let Path(v) = v?;
    hex::decode(&v)
        .ok()
        .and_then(|b| InstanceKey::from_slice(&b))
        .ok_or_else(|| Problem::bad_request("id: the instance ID is 64 hex digits"))
}

fn created<T: Serialize>(body: T) -> axum::response::Response {
    (StatusCode::CREATED, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------
// Health and the document

/// Sec-EM's health.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, or `degraded` when the store does not answer.
    status: String,
    /// Sec-EM's version.
    version: String,
    /// Agents with a push stream to this replica.
    connected_agents: u64,
    /// Whether the store answered.
    store: bool,
}

/// Health of this replica and its store (no client certificate needed).
#[utoipa::path(get, path = "/v1/health", tag = "service", security(()),
    responses(
        (status = 200, description = "Serving", body = Health),
        (status = 503, description = "The store does not answer", body = Health),
    ))]
async fn health<S: Store>(State(rest): Shared<S>) -> axum::response::Response {
    // Anyone may ask: the store is asked at most once a second for all of them.
    let cached = rest
        .health
        .lock()
        .ok()
        .and_then(|h| *h)
        .filter(|(at, _)| at.elapsed() < std::time::Duration::from_secs(1));
    let store = match cached {
        Some((_, ok)) => ok,
        None => {
            let ok = crate::audit::head(rest.registry.store()).await.is_ok();
            if let Ok(mut h) = rest.health.lock() {
                *h = Some((std::time::Instant::now(), ok));
            }
            ok
        }
    };
    let h = Health {
        status: if store { "ok" } else { "degraded" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        connected_agents: (rest.agents)() as u64,
        store,
    };
    let status = if store {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(h)).into_response()
}

/// This document (OpenAPI 3.1; no client certificate needed).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "service", security(()),
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi_json() -> axum::response::Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        document(),
    )
        .into_response()
}

/// The OpenAPI document, as committed under `docs/openapi.json`.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .map(|mut s| {
            s.push('\n');
            s
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// VNF packages

/// An on-boarded VNF.
#[derive(Debug, Serialize, ToSchema)]
pub struct VnfPackage {
    /// The VNF's ID.
    vnf: String,
    /// The VNFD's name and version.
    name: String,
    /// The VNFD's version string.
    version: String,
    /// The image's size in bytes (0 when on-boarded by digest without a size).
    image_bytes: u64,
    /// The golden digests (algorithm -> hex).
    digests: BTreeMap<String, String>,
    /// How re-attestation treats a changed measurement: `strict` or `continuity`.
    attestation: String,
}

impl From<&VnfRecord> for VnfPackage {
    fn from(r: &VnfRecord) -> Self {
        Self {
            vnf: r.vnfd.vnf.to_string(),
            name: r.vnfd.name.clone(),
            version: r.vnfd.version.clone(),
            image_bytes: r.image_bytes,
            digests: r
                .golden
                .iter()
                .map(|(a, d)| (a.name().to_string(), d.to_hex()))
                .collect(),
            attestation: serde_json::to_value(r.vnfd.attestation)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        }
    }
}

/// A page of VNF packages.
#[derive(Debug, Serialize, ToSchema)]
pub struct VnfPackagePage {
    /// The packages, by VNF ID.
    items: Vec<VnfPackage>,
    /// `after` of the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// On-boarding by digest: the orchestrator has the image and its checksum.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OnboardByDigest {
    /// The descriptor: an ETSI SOL001 VNFD (TOSCA YAML) or an ASMN VNFD (YAML), as text.
    #[schema(max_length = 1048576)]
    descriptor: String,
    /// The image's digests, algorithm (`sha256`, `sha512`, `sha1`, `md5`, `crc32`) ->
    /// hex. `sha256` is required; a SOL001 VNFD's `sw_image_data.checksum` must match.
    digests: BTreeMap<String, String>,
    /// The image's size in bytes, if known.
    #[serde(default)]
    image_bytes: Option<u64>,
}

/// On-board a VNF by its image's digests.
#[utoipa::path(post, path = "/v1/vnf-packages", tag = "vnf-packages",
    request_body = OnboardByDigest,
    responses(
        (status = 201, description = "On-boarded", body = VnfPackage),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The descriptor or its catalog is refused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn onboard_by_digest<S: Store>(
    State(rest): Shared<S>,
    body: Result<Json<OnboardByDigest>, JsonRejection>,
) -> Answer<axum::response::Response> {
    let Json(req) = body?;
    let mut golden = BTreeMap::new();
    for (alg, value) in &req.digests {
        let a = alg
            .parse::<Algorithm>()
            .map_err(|e| Problem::bad_request(format!("digests: {e}")))?;
        let v = hex::decode(value)
            .ok()
            .filter(|v| v.len() == a.output_len())
            .ok_or_else(|| {
                Problem::bad_request(format!("digests.{alg}: {} hex digits", a.output_len() * 2))
            })?;
        golden.insert(a, DigestValue(v));
    }
    onboard(
        &rest,
        req.descriptor.as_bytes(),
        golden,
        req.image_bytes.unwrap_or(0),
    )
    .await
}

async fn onboard<S: Store>(
    rest: &Rest<S>,
    descriptor: &[u8],
    golden: BTreeMap<Algorithm, DigestValue>,
    bytes: u64,
) -> Answer<axum::response::Response> {
    let vnf = rest
        .registry
        .onboard_descriptor(now(), "descriptor", descriptor, golden, bytes)
        .await?;
    match rest.registry.vnf(&vnf).await? {
        Some(r) => Ok(created(VnfPackage::from(&r))),
        None => Err(Problem::unavailable("the package vanished; retry")),
    }
}

/// The upload form: the descriptor first, then the image.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct OnboardUpload {
    /// The descriptor (SOL001 or ASMN VNFD), as text.
    descriptor: String,
    /// The image's bytes; Sec-EM measures them (SHA-256 and SHA-512) as they arrive.
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
}

/// Reads a stream of chunks as `std::io::Read` (the measuring threads pull from it).
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.current = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        bytes::Buf::advance(&mut self.current, n);
        Ok(n)
    }
}

/// On-board a VNF by uploading its image (multipart: `descriptor`, then `image`).
#[utoipa::path(post, path = "/v1/vnf-packages/upload", tag = "vnf-packages",
    request_body(content = OnboardUpload, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Measured and on-boarded", body = VnfPackage),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not multipart", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The descriptor or its catalog is refused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn onboard_by_upload<S: Store>(
    State(rest): Shared<S>,
    form: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Answer<axum::response::Response> {
    let mut form = form?;
    let mut descriptor: Option<Vec<u8>> = None;
    while let Some(mut field) = form.next_field().await? {
        match field.name() {
            Some("descriptor") => {
                // Read a chunk at a time: refused as soon as it passes 1 MiB.
                let mut text = Vec::new();
                while let Some(c) = field.chunk().await? {
                    if text.len() + c.len() > 1 << 20 {
                        return Err(Problem::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too-large",
                            "descriptor: at most 1 MiB",
                        ));
                    }
                    text.extend_from_slice(&c);
                }
                descriptor = Some(text);
            }
            Some("image") => {
                let Some(d) = descriptor.take() else {
                    return Err(Problem::bad_request(
                        "send the descriptor part before the image part",
                    ));
                };
                let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
                let measuring = tokio::task::spawn_blocking(move || {
                    asmn_shared::measure::measure_reader(
                        ChunkReader {
                            rx,
                            current: bytes::Bytes::new(),
                        },
                        "the uploaded image",
                        None,
                        &[Algorithm::Sha256, Algorithm::Sha512],
                        asmn_shared::measure::MeasureOptions::default(),
                        &mut |_| {},
                    )
                });
                let mut failed = None;
                loop {
                    match field.chunk().await {
                        Ok(Some(c)) => {
                            if tx.send(c).await.is_err() {
                                break;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
                drop(tx);
                let m = measuring
                    .await
                    .map_err(|e| Problem::unavailable(format!("measuring failed: {e}")))?
                    .map_err(|e| Problem::bad_request(format!("image: {e}")))?;
                if let Some(e) = failed {
                    return Err(e.into());
                }
                return onboard(&rest, &d, m.digests, m.bytes).await;
            }
            _ => {
                return Err(Problem::bad_request(
                    "the form has two parts: descriptor, then image",
                ));
            }
        }
    }
    Err(Problem::bad_request(
        "the form has two parts: descriptor, then image",
    ))
}

/// The on-boarded VNFs.
#[utoipa::path(get, path = "/v1/vnf-packages", tag = "vnf-packages", params(PageQuery),
    responses(
        (status = 200, description = "A page of packages", body = VnfPackagePage),
        (status = 400, description = "Bad paging", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_packages<S: Store>(
    State(rest): Shared<S>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Answer<Json<VnfPackagePage>> {
    let Query(q) = q?;
    let (records, next) = rest
        .registry
        .vnfs_page(&after_text(q.after)?, limit(q.limit)?)
        .await?;
    Ok(Json(VnfPackagePage {
        items: records.iter().map(VnfPackage::from).collect(),
        next,
    }))
}

/// One on-boarded VNF.
#[utoipa::path(get, path = "/v1/vnf-packages/{vnf}", tag = "vnf-packages",
    params(("vnf" = String, Path, description = "The VNF's ID")),
    responses(
        (status = 200, description = "The package", body = VnfPackage),
        (status = 400, description = "Not a VNF ID", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "Not on-boarded", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_package<S: Store>(
    State(rest): Shared<S>,
    vnf: Result<Path<String>, PathRejection>,
) -> Answer<Json<VnfPackage>> {
    let vnf = vnf_id(vnf)?;
    match rest.registry.vnf(&vnf).await? {
        Some(r) => Ok(Json(VnfPackage::from(&r))),
        None => Err(Problem::not_found(format!("VNF {vnf} is not on-boarded"))),
    }
}

// ---------------------------------------------------------------------------------------
// Instances

/// A VNF instance as Sec-EM tracks it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Instance {
    /// The instance ID (64 hex digits).
    id: String,
    /// Tenant.
    tenant: String,
    /// VNF.
    vnf: String,
    /// Instance name.
    name: String,
    /// `vnf` or `gateway`.
    role: String,
    /// Overlay address, `ip/prefix`.
    overlay: String,
    /// `created`, `enrolled`, `quarantined` or `revoked`.
    state: String,
    /// Why it was quarantined or revoked.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The hash chain: epoch, length, the last accepted index (counting down).
    chain: ChainPosition,
    /// When the last reveal was accepted (seconds since the epoch).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_attestation: Option<u64>,
    /// The catalog version the agent enforces (acknowledged).
    #[serde(skip_serializing_if = "Option::is_none")]
    enforced_catalog: Option<u64>,
    /// Milliseconds from pushing that version to its acknowledgement.
    #[serde(skip_serializing_if = "Option::is_none")]
    catalog_ack_ms: Option<u64>,
    /// The agent's WireGuard public key (hex), once enrolled.
    #[serde(skip_serializing_if = "Option::is_none")]
    wg_public_key: Option<String>,
    /// The agent's underlay endpoint, once enrolled.
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
}

/// Where an instance's hash chain stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChainPosition {
    /// Epoch (renewals).
    epoch: u32,
    /// Chain length N.
    length: u32,
    /// The last accepted index (N: only the anchor so far).
    last_index: u32,
}

impl From<&InstanceRecord> for Instance {
    fn from(r: &InstanceRecord) -> Self {
        let (state, reason) = match &r.state {
            InstanceState::Created => ("created", None),
            InstanceState::Enrolled => ("enrolled", None),
            InstanceState::Quarantined(why) => ("quarantined", Some(why.clone())),
            InstanceState::Revoked(why) => ("revoked", Some(why.clone())),
        };
        Self {
            id: r.id.to_hex(),
            tenant: r.tenant.to_string(),
            vnf: r.vnf.to_string(),
            name: r.instance.to_string(),
            role: r.role.to_string(),
            overlay: r.overlay.to_string(),
            state: state.into(),
            reason,
            chain: ChainPosition {
                epoch: r.chain.epoch,
                length: r.chain.length,
                last_index: r.chain.last_index,
            },
            last_attestation: r.last_attestation,
            enforced_catalog: r.enforced_catalog,
            catalog_ack_ms: r.catalog_latency_ms,
            wg_public_key: r.wg_public_key.map(hex::encode),
            endpoint: r.endpoint.map(|e| e.to_string()),
        }
    }
}

/// A page of instances.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstancePage {
    /// The instances, by ID.
    items: Vec<Instance>,
    /// `after` of the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// The agent's configuration to write beside the bundle (`/etc/asmn/agent.toml`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// The block device or file the agent measures (the VNF image), such as `/dev/vda`.
    #[schema(max_length = 255)]
    target: String,
    /// The agent's WireGuard underlay address, `ip:port`.
    #[schema(max_length = 64)]
    underlay: String,
    /// Where the agent serves its metrics, `ip:port`.
    #[serde(default)]
    #[schema(max_length = 64)]
    metrics_addr: Option<String>,
    /// The agent's state directory (`/var/lib/asmn-agent`, the packaged unit's, when
    /// absent).
    #[serde(default)]
    #[schema(max_length = 255)]
    state_dir: Option<String>,
    /// The real-time (`SCHED_FIFO`) priority of the agent's data plane, 1 to 99 (the
    /// packaged unit allows up to 10), or 0 for ordinary scheduling. Absent: not written,
    /// and the agent's default applies: 10 for a gateway (its limiters count time: kept
    /// off the CPU, it passes less than a rule's rate), ordinary scheduling for a VNF.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 99)]
    realtime_priority: Option<u8>,
}

/// An instance to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstance {
    /// The tenant.
    #[schema(max_length = 63)]
    tenant: String,
    /// The on-boarded VNF.
    #[schema(max_length = 63)]
    vnf: String,
    /// The instance's name; Sec-EM picks `<vnf>-<8 hex digits>` when absent.
    #[serde(default)]
    #[schema(max_length = 63)]
    name: Option<String>,
    /// `vnf` (default) or `gateway`.
    #[serde(default)]
    role: Option<String>,
    /// With it, the config drive and user-data carry the agent's configuration too.
    #[serde(default)]
    agent: Option<AgentSettings>,
}

/// A created instance and what its VM needs.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedInstance {
    /// The instance.
    instance: Instance,
    /// The bootstrap bundle (base64 of its binary form): the instance's secret. Hand it
    /// to this VM only.
    bundle: String,
    /// The files of a config drive (label `cidata`): path -> base64 content; the agent
    /// package's `asmn-bundle` hook installs them at boot.
    config_drive: BTreeMap<String, String>,
    /// A cloud-init `#cloud-config` user-data that writes the same files.
    user_data: String,
}

/// An absolute path that can be written in TOML between quotes as it is.
fn plain_path(field: &str, p: &str) -> Answer<String> {
    if !p.starts_with('/')
        || p.len() > 255
        || p.chars().any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err(Problem::bad_request(format!(
            "agent.{field}: an absolute path without quotes or control characters"
        )));
    }
    Ok(p.to_string())
}

/// The agent's configuration. Its bundle is `bundle` beside it (a relative path is
/// the file's directory's): `/etc/asmn/bundle` in the VM, where the config drive's
/// `asmn-bundle` unit and the cloud-init user-data put both files.
fn agent_toml(a: &AgentSettings) -> Answer<String> {
    let target = plain_path("target", &a.target)?;
    let addr = |field: &str, v: &str| {
        v.parse::<std::net::SocketAddr>()
            .map_err(|_| Problem::bad_request(format!("agent.{field}: ip:port")))
    };
    let underlay = addr("underlay", &a.underlay)?;
    let state = plain_path(
        "state_dir",
        a.state_dir.as_deref().unwrap_or("/var/lib/asmn-agent"),
    )?;
    let mut t = format!(
        "# Written by Sec-EM for this instance.\nbundle = \"bundle\"\ntarget = \"{target}\"\nunderlay = \"{underlay}\"\nstate_dir = \"{state}\"\n"
    );
    if let Some(m) = &a.metrics_addr {
        t.push_str(&format!(
            "metrics_addr = \"{}\"\n",
            addr("metrics_addr", m)?
        ));
    }
    // Written only when asked: an agent older than the field refuses it.
    match a.realtime_priority {
        Some(p) if p > 99 => {
            return Err(Problem::bad_request(
                "agent.realtime_priority: 1 to 99, or 0 for ordinary scheduling",
            ));
        }
        Some(p) => t.push_str(&format!("realtime_priority = {p}\n")),
        None => {}
    }
    Ok(t)
}

fn user_data(bundle_b64: &str, toml: Option<&str>) -> String {
    let mut u = String::from(
        "#cloud-config\n# ASMN: the instance's bootstrap bundle (its secret) and agent configuration.\nwrite_files:\n",
    );
    u.push_str(&format!(
        "  - path: /etc/asmn/bundle\n    owner: asmn-agent:asmn-agent\n    permissions: '0600'\n    encoding: b64\n    content: {bundle_b64}\n"
    ));
    if let Some(t) = toml {
        let b64 = base64::engine::general_purpose::STANDARD.encode(t);
        u.push_str(&format!(
            "  - path: /etc/asmn/agent.toml\n    permissions: '0644'\n    encoding: b64\n    content: {b64}\n"
        ));
    }
    u.push_str("runcmd:\n  - [systemctl, restart, asmn-agent.service]\n");
    u
}

/// Create an instance of an on-boarded VNF: its bundle, config drive and user-data.
#[utoipa::path(post, path = "/v1/instances", tag = "instances", request_body = CreateInstance,
    responses(
        (status = 201, description = "Created", body = CreatedInstance),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "The VNF is not on-boarded", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The name exists", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn create_instance<S: Store>(
    State(rest): Shared<S>,
    body: Result<Json<CreateInstance>, JsonRejection>,
) -> Answer<axum::response::Response> {
    let Json(req) = body?;
    let tenant = req
        .tenant
        .parse::<TenantId>()
        .map_err(|e| Problem::bad_request(format!("tenant: {e}")))?;
    let vnf = req
        .vnf
        .parse::<VnfId>()
        .map_err(|e| Problem::bad_request(format!("vnf: {e}")))?;
    let instance = match &req.name {
        None => None,
        Some(n) => Some(
            n.parse()
                .map_err(|e| Problem::bad_request(format!("name: {e}")))?,
        ),
    };
    let role = match req.role.as_deref() {
        None | Some("vnf") => Role::Vnf,
        Some("gateway") => Role::Gateway,
        Some(_) => return Err(Problem::bad_request("role: vnf or gateway")),
    };
    let toml = req.agent.as_ref().map(agent_toml).transpose()?;
    let bundle = crate::service::create_fresh_instance(
        &rest.registry,
        wire::CreateInstance {
            tenant,
            vnf,
            instance,
            role,
        },
    )
    .await?;
    let id = bundle.instance_key();
    let encoded = prost::Message::encode_to_vec(&wire::msg::BootstrapBundleMsg::from(&bundle));
    let b64 = base64::engine::general_purpose::STANDARD.encode(&encoded);
    let mut drive = BTreeMap::new();
    drive.insert("asmn/bundle".to_string(), b64.clone());
    if let Some(t) = &toml {
        drive.insert(
            "asmn/agent.toml".to_string(),
            base64::engine::general_purpose::STANDARD.encode(t),
        );
    }
    let record = rest
        .registry
        .instance_view(&id)
        .await?
        .ok_or_else(|| Problem::unavailable("the instance vanished; retry"))?;
    Ok(created(CreatedInstance {
        instance: Instance::from(&record),
        user_data: user_data(&b64, toml.as_deref()),
        bundle: b64,
        config_drive: drive,
    }))
}

/// The instances, by ID.
#[utoipa::path(get, path = "/v1/instances", tag = "instances", params(PageQuery),
    responses(
        (status = 200, description = "A page of instances", body = InstancePage),
        (status = 400, description = "Bad paging", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_instances<S: Store>(
    State(rest): Shared<S>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Answer<Json<InstancePage>> {
    let Query(q) = q?;
    let after = after_text(q.after)?;
    if !after.is_empty() && (after.len() != 64 || !after.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(Problem::bad_request(
            "after: an instance ID (64 hex digits)",
        ));
    }
    let (records, next) = rest
        .registry
        .instances_page(&after.to_ascii_lowercase(), limit(q.limit)?)
        .await?;
    Ok(Json(InstancePage {
        items: records.iter().map(Instance::from).collect(),
        next,
    }))
}

/// One instance: its state, chain position, enforced catalog version and
/// acknowledgement latency.
#[utoipa::path(get, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "The instance ID (64 hex digits)")),
    responses(
        (status = 200, description = "The instance", body = Instance),
        (status = 400, description = "Not an instance ID", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such instance", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_instance<S: Store>(
    State(rest): Shared<S>,
    id: Result<Path<String>, PathRejection>,
) -> Answer<Json<Instance>> {
    let id = instance_id(id)?;
    match rest.registry.instance_view(&id).await? {
        Some(r) => Ok(Json(Instance::from(&r))),
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-instance",
            "no such instance",
        )),
    }
}

/// Why an instance is revoked.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// Recorded in the audit log and pushed to its peers.
    #[schema(max_length = 256)]
    reason: String,
}

/// Revoke an instance: its peers drop their tunnels to it, and it cannot enroll again.
#[utoipa::path(post, path = "/v1/instances/{id}/revoke", tag = "instances",
    params(("id" = String, Path, description = "The instance ID (64 hex digits)")),
    request_body = Revocation,
    responses(
        (status = 200, description = "Revoked", body = Instance),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such instance", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn revoke_instance<S: Store>(
    State(rest): Shared<S>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Revocation>, JsonRejection>,
) -> Answer<Json<Instance>> {
    let id = instance_id(id)?;
    let Json(r) = body?;
    // As the QUIC request is checked (wire::Revoke).
    let req = wire::Revoke::try_from(&wire::msg::RevokeRequest {
        instance_key: id.as_bytes().to_vec(),
        reason: r.reason,
    })
    .map_err(|e| Problem::bad_request(e.to_string()))?;
    rest.registry.revoke(now(), &req.id, &req.reason).await?;
    match rest.registry.instance_view(&id).await? {
        Some(r) => Ok(Json(Instance::from(&r))),
        None => Err(Problem::unavailable("the instance vanished; retry")),
    }
}

// ---------------------------------------------------------------------------------------
// Catalogs

/// A Sec-catalog version.
#[derive(Debug, Serialize, ToSchema)]
pub struct Catalog {
    /// The VNF it protects.
    vnf: String,
    /// Its version.
    version: u64,
    /// The catalog: gateway, default action and rules (protocol, ports, sources,
    /// policing rate and burst).
    #[schema(value_type = Object)]
    catalog: serde_json::Value,
}

impl From<&asmn_shared::catalog::SecCatalog> for Catalog {
    fn from(c: &asmn_shared::catalog::SecCatalog) -> Self {
        Self {
            vnf: c.vnf.to_string(),
            version: c.version,
            catalog: serde_json::to_value(c).unwrap_or_default(),
        }
    }
}

/// A page of catalog versions.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogPage {
    /// The versions, oldest first.
    items: Vec<Catalog>,
    /// `after` of the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// A new catalog version.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutCatalog {
    /// The catalog file's text (YAML, as `asmnctl catalog apply` reads it); its `vnf`
    /// must be the path's.
    #[schema(max_length = 1048576)]
    catalog: String,
}

/// The version put in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct CatalogApplied {
    /// The VNF.
    vnf: String,
    /// The new version (versions only increase).
    version: u64,
}

/// The catalog in force for a VNF.
#[utoipa::path(get, path = "/v1/catalogs/{vnf}", tag = "catalogs",
    params(("vnf" = String, Path, description = "The VNF's ID")),
    responses(
        (status = 200, description = "The catalog in force", body = Catalog),
        (status = 400, description = "Not a VNF ID", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No catalog", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_catalog<S: Store>(
    State(rest): Shared<S>,
    vnf: Result<Path<String>, PathRejection>,
) -> Answer<Json<Catalog>> {
    let vnf = vnf_id(vnf)?;
    match rest.registry.catalog(&vnf).await? {
        Some((c, _)) => Ok(Json(Catalog::from(&c))),
        None => Err(Problem::not_found(format!("no catalog for {vnf}"))),
    }
}

/// Put a new catalog version in force: validated as `asmnctl catalog apply` does, then
/// pushed to the VNF's agents and gateways.
#[utoipa::path(put, path = "/v1/catalogs/{vnf}", tag = "catalogs",
    params(("vnf" = String, Path, description = "The VNF's ID")),
    request_body = PutCatalog,
    responses(
        (status = 200, description = "In force", body = CatalogApplied),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The catalog is refused", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn put_catalog<S: Store>(
    State(rest): Shared<S>,
    vnf: Result<Path<String>, PathRejection>,
    body: Result<Json<PutCatalog>, JsonRejection>,
) -> Answer<Json<CatalogApplied>> {
    let vnf = vnf_id(vnf)?;
    let Json(req) = body?;
    let catalog =
        asmn_shared::catalog::parse_catalog("catalog", req.catalog.as_bytes()).map_err(|e| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-catalog",
                e.to_string(),
            )
        })?;
    if catalog.vnf != vnf {
        return Err(Problem::bad_request(format!(
            "the catalog is {}'s, the path names {vnf}",
            catalog.vnf
        )));
    }
    let version = rest.registry.apply_catalog(now(), catalog).await?;
    Ok(Json(CatalogApplied {
        vnf: vnf.to_string(),
        version,
    }))
}

/// The catalog versions a VNF has had, oldest first.
#[utoipa::path(get, path = "/v1/catalogs/{vnf}/history", tag = "catalogs",
    params(("vnf" = String, Path, description = "The VNF's ID"), PageQuery),
    responses(
        (status = 200, description = "A page of versions", body = CatalogPage),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn catalog_history<S: Store>(
    State(rest): Shared<S>,
    vnf: Result<Path<String>, PathRejection>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Answer<Json<CatalogPage>> {
    let vnf = vnf_id(vnf)?;
    let Query(q) = q?;
    let after = match after_text(q.after)?.as_str() {
        "" => 0,
        a => a
            .parse::<u64>()
            .map_err(|_| Problem::bad_request("after: a catalog version"))?,
    };
    let (items, next) = rest
        .registry
        .catalog_history(&vnf, after, limit(q.limit)?)
        .await?;
    Ok(Json(CatalogPage {
        items: items.iter().map(Catalog::from).collect(),
        next: next.map(|n| n.to_string()),
    }))
}

// ---------------------------------------------------------------------------------------
// Audit

/// Which audit records.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// The first record number to show (a page's `next`); 1 when absent.
    #[param(max_length = 20)]
    after: Option<String>,
    /// Records per page, 1 to 1000 (100 when absent).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only records of this instance (64 hex digits).
    #[param(max_length = 64)]
    instance: Option<String>,
    /// Only records of this kind, such as `enroll.refused`.
    #[param(max_length = 64)]
    kind: Option<String>,
}

/// One security decision, as the log holds it (hash-chained and authenticated).
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditRecord {
    /// Position in the log, from 1.
    seq: u64,
    /// Seconds since the Unix epoch.
    time: u64,
    /// What was decided, such as `enroll.accepted` or `instance.revoked`.
    kind: String,
    /// The instance concerned (hex ID), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    instance: Option<String>,
    /// Details for a human.
    detail: String,
    /// Hash of the previous record (hex).
    prev: String,
    /// SHA-256 over the record's other fields (hex).
    hash: String,
    /// HMAC-SHA256 of `hash` under the audit key (hex).
    mac: String,
}

/// A page of audit records.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// The records, in log order.
    items: Vec<AuditRecord>,
    /// `after` of the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// The audit log, paged, filtered by instance and kind; every record is checked
/// against its MAC and its predecessor before it is shown.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses(
        (status = 200, description = "A page of records", body = AuditPage),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable, or the log does not verify", body = Problem, content_type = "application/problem+json"),
    ))]
async fn audit<S: Store>(
    State(rest): Shared<S>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Answer<Json<AuditPage>> {
    let Query(q) = q?;
    let since = match after_text(q.after)?.as_str() {
        "" => 1,
        a => a
            .parse::<u64>()
            .map_err(|_| Problem::bad_request("after: a record number"))?,
    };
    let limit = limit(q.limit)?;
    let instance = match q.instance {
        None => None,
        Some(i) if i.len() == 64 && i.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(i.to_ascii_lowercase())
        }
        Some(_) => return Err(Problem::bad_request("instance: 64 hex digits")),
    };
    if q.kind.as_ref().is_some_and(|k| k.len() > 64) {
        return Err(Problem::bad_request("kind: at most 64 characters"));
    }
    let kind = q.kind;
    let keep = |r: &crate::audit::AuditRecord| {
        instance
            .as_ref()
            .is_none_or(|i| r.instance.as_ref() == Some(i))
            && kind.as_ref().is_none_or(|k| &r.kind == k)
    };
    // One record is well under 2 KiB of JSON: a budget for `limit` and one more.
    let budget = (limit + 1).saturating_mul(2048);
    let (mut records, mut next) = crate::audit::page(
        rest.registry.store(),
        rest.registry.audit_key(),
        since,
        budget,
        keep,
    )
    .await
    .map_err(|e| match e {
        crate::audit::AuditError::Store(e) => {
            Problem::from(crate::registry::RegistryError::from(e))
        }
        other => Problem::unavailable(format!("the audit log does not verify: {other}")),
    })?;
    if records.len() > limit {
        next = Some(records[limit].seq);
        records.truncate(limit);
    }
    Ok(Json(AuditPage {
        items: records
            .into_iter()
            .map(|r| AuditRecord {
                seq: r.seq,
                time: r.time,
                kind: r.kind,
                instance: r.instance,
                detail: r.detail,
                prev: r.prev,
                hash: r.hash,
                mac: r.mac,
            })
            .collect(),
        next: next.map(|n| n.to_string()),
    }))
}

// ---------------------------------------------------------------------------------------
// Subscriptions

/// A subscription to ask for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSubscription {
    /// Where Sec-EM POSTs the events (`http://` or `https://`).
    #[schema(max_length = 2048)]
    callback: String,
    /// The event types wanted (all when absent or empty): `instance.created`,
    /// `instance.enrolled`, `instance.refused`, `instance.quarantined`,
    /// `instance.revoked`, `reattestation.failed`, `catalog.applied`,
    /// `catalog.acknowledged`, `agent.lost`.
    #[serde(default)]
    types: Vec<String>,
}

/// A subscription (its secret is shown once, when it is made).
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionView {
    /// Its ID.
    id: String,
    /// Where events go.
    callback: String,
    /// The event types (empty: all).
    types: Vec<String>,
    /// When it was made (seconds since the epoch).
    created: u64,
    /// The HMAC-SHA256 key of the `ASMN-Signature` header (64 hex digits): only in the
    /// answer that made it.
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl SubscriptionView {
    fn of(s: crate::notify::Subscription, with_secret: bool) -> Self {
        Self {
            id: s.id,
            callback: s.callback,
            types: s.types,
            created: s.created,
            secret: with_secret.then_some(s.secret),
        }
    }
}

/// The subscriptions.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionList {
    /// Every subscription (at most 64).
    items: Vec<SubscriptionView>,
}

/// An event, as Sec-EM POSTs it to a subscription's callback (JSON), with the header
/// `ASMN-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub struct Event {
    /// The audit record's number: increasing, and the same on a redelivery (drop
    /// duplicates by it).
    id: u64,
    /// The event type.
    #[serde(rename = "type")]
    kind: String,
    /// Seconds since the epoch.
    time: u64,
    /// The audit record's kind.
    audit_kind: String,
    /// Details for a human.
    detail: String,
    /// The subscription.
    subscription: String,
    /// The instance concerned: id, tenant, vnf, name, state.
    #[schema(value_type = Option<Object>)]
    instance: Option<serde_json::Value>,
    /// For catalog events: vnf and version.
    #[schema(value_type = Option<Object>)]
    catalog: Option<serde_json::Value>,
    /// Events dropped for this subscription (its queue was full) just before this one.
    dropped_before: Option<u64>,
}

const SUBSCRIPTION_ID: &str = "The subscription's ID (32 hex digits)";

/// The subscriptions.
#[utoipa::path(get, path = "/v1/subscriptions", tag = "subscriptions",
    responses(
        (status = 200, description = "Every subscription", body = SubscriptionList),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn list_subscriptions<S: Store>(State(rest): Shared<S>) -> Answer<Json<SubscriptionList>> {
    let subs = crate::notify::list(rest.registry.store()).await?;
    Ok(Json(SubscriptionList {
        items: subs
            .into_iter()
            .map(|s| SubscriptionView::of(s, false))
            .collect(),
    }))
}

/// Subscribe a callback to events; the answer carries the signing secret, once.
#[utoipa::path(post, path = "/v1/subscriptions", tag = "subscriptions",
    request_body = NewSubscription,
    responses(
        (status = 201, description = "Subscribed", body = SubscriptionView),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Too many subscriptions", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn subscribe<S: Store>(
    State(rest): Shared<S>,
    body: Result<Json<NewSubscription>, JsonRejection>,
) -> Answer<axum::response::Response> {
    let Json(req) = body?;
    let sub = crate::notify::create(&rest.registry, now(), &req.callback, &req.types).await?;
    // The host only: a callback's path or query may hold the orchestrator's token.
    let host = reqwest::Url::parse(&sub.callback)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .unwrap_or_default();
    tracing::info!(id = %sub.id, %host, "subscription made");
    Ok(created(SubscriptionView::of(sub, true)))
}

/// One subscription.
#[utoipa::path(get, path = "/v1/subscriptions/{id}", tag = "subscriptions",
    params(("id" = String, Path, description = SUBSCRIPTION_ID)),
    responses(
        (status = 200, description = "The subscription", body = SubscriptionView),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such subscription", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn show_subscription<S: Store>(
    State(rest): Shared<S>,
    id: Result<Path<String>, PathRejection>,
) -> Answer<Json<SubscriptionView>> {
    let Path(id) = id?;
    match crate::notify::get(rest.registry.store(), &id).await? {
        Some(s) => Ok(Json(SubscriptionView::of(s, false))),
        None => Err(Problem::not_found("no such subscription")),
    }
}

/// Delete a subscription: its events stop.
#[utoipa::path(delete, path = "/v1/subscriptions/{id}", tag = "subscriptions",
    params(("id" = String, Path, description = SUBSCRIPTION_ID)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Bad request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No client certificate", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Revoked certificate", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such subscription", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Store unavailable; retry", body = Problem, content_type = "application/problem+json"),
    ))]
async fn unsubscribe<S: Store>(
    State(rest): Shared<S>,
    id: Result<Path<String>, PathRejection>,
) -> Answer<StatusCode> {
    let Path(id) = id?;
    if crate::notify::delete(rest.registry.store(), &id).await? {
        tracing::info!(%id, "subscription deleted");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::not_found("no such subscription"))
    }
}
