//! The northbound REST API of a `sec-em serve` process: the same rules as the QUIC front
//! door, problem documents for every error, the admin certificate required (and a
//! revoked one refused), paged listings, on-boarding from a SOL001 VNFD by digest and by
//! upload; signed notifications of a tenant's whole life, once each and in order, also
//! to a receiver that was down for 30 s; the committed OpenAPI document is the one the
//! code generates, and schemathesis finds no 5xx and no response off the schema.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use asmn_shared::measure::{Algorithm, measure_bytes};
use asmn_shared::wire::BootstrapBundle;
use asmn_shared::wire::msg::{self, Body};
use base64::Engine;
use common::{IMAGE, Pushes, ask_opt, enroll_with_prover_of, free_tcp, init_for_load, start};
use serde_json::{Value, json};

/// A TLS client configuration: the tenant's CA in `dir`, and `identity`'s certificate.
fn client_tls(dir: &std::path::Path, identity: Option<&str>) -> rustls::ClientConfig {
    use asmn_channel::tls;
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).expect(n);
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(tls::roots(&read("ca.pem")).expect("roots"));
    match identity {
        None => builder.with_no_client_auth(),
        Some(name) => builder
            .with_client_auth_cert(
                tls::certs(&read(&format!("{name}.pem"))).expect("cert"),
                tls::private_key(&read(&format!("{name}.key"))).expect("key"),
            )
            .expect("identity"),
    }
}

/// An HTTPS client of the REST API: the tenant's CA, and an identity if given.
struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn new(dir: &std::path::Path, port: u16, identity: Option<&str>) -> Api {
        Api {
            client: reqwest::Client::builder()
                .use_preconfigured_tls(client_tls(dir, identity))
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            // `sec-em init` names 127.0.0.1 in the server certificate.
            base: format!("https://127.0.0.1:{port}"),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, String, Value) {
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let text = r.text().await.expect("body");
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, ct, v)
    }

    async fn get(&self, path: &str) -> (u16, String, Value) {
        self.send(self.client.get(format!("{}{path}", self.base)))
            .await
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, String, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    async fn put(&self, path: &str, body: &Value) -> (u16, String, Value) {
        self.send(self.client.put(format!("{}{path}", self.base)).json(body))
            .await
    }
}

/// A `sec-em serve` with its REST API on loopback.
struct Served {
    dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
    rest: u16,
    admin: common::Client,
    agents: common::Client,
    daemon: Option<common::Daemon>,
}

async fn serve() -> Served {
    let dir = tempfile::tempdir().expect("tmp");
    let rest = free_tcp();
    let (cfg, admin, agents) = init_for_load(dir.path(), |t| {
        let t = t.replace(
            "# rest_addr = \"0.0.0.0:7444\"",
            &format!("rest_addr = \"127.0.0.1:{rest}\""),
        );
        assert!(t.contains("rest_addr = \"127.0.0.1"), "rest_addr set");
        format!("{t}\n[notifications]\nmax_backoff_secs = 1\n")
    });
    let daemon = start(&cfg);
    let s = Served {
        dir,
        cfg,
        rest,
        admin,
        agents,
        daemon: Some(daemon),
    };
    s.wait_up().await;
    s
}

impl Served {
    async fn wait_up(&self) {
        let api = self.api(Some("admin"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = api
                .client
                .get(format!("{}/v1/health", api.base))
                .send()
                .await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "the REST API did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops `sec-em` and starts it again on the same configuration and store.
    async fn restart(&mut self) {
        self.daemon.take();
        self.daemon = Some(start(&self.cfg));
        self.wait_up().await;
    }

    fn metrics_port(&self) -> u16 {
        let text = std::fs::read_to_string(&self.cfg).expect("cfg");
        text.lines()
            .find_map(|l| l.strip_prefix("metrics_addr = \"127.0.0.1:"))
            .and_then(|p| p.trim_end_matches('"').parse().ok())
            .expect("metrics_addr")
    }

    fn api(&self, identity: Option<&str>) -> Api {
        Api::new(self.dir.path(), self.rest, identity)
    }
}

fn sha256_hex(b: &[u8]) -> String {
    measure_bytes(b, &[Algorithm::Sha256])
        .expect("measure")
        .get(Algorithm::Sha256)
        .expect("sha256")
        .to_hex()
}

/// The SOL001 example VNFD with `image`'s SHA-256 as its checksum.
fn sol001_for(image: &[u8]) -> String {
    include_str!("../../images/examples/web-server.sol001.yaml").replace(
        "5f2b3c8e1d0a4f6b7c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c",
        &sha256_hex(image),
    )
}

/// On-boards the SOL001 example by the digest of [`IMAGE`].
async fn onboard_web(api: &Api) {
    let p = api
        .post(
            "/v1/vnf-packages",
            &json!({"descriptor": sol001_for(IMAGE), "digests": {"sha256": sha256_hex(IMAGE)}}),
        )
        .await;
    assert_eq!(p.0, 201, "{p:?}");
}

fn bundle_of(created: &Value) -> BootstrapBundle {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(created["bundle"].as_str().expect("bundle"))
        .expect("base64");
    let m: msg::BootstrapBundleMsg = prost::Message::decode(raw.as_slice()).expect("decode");
    BootstrapBundle::try_from(&m).expect("bundle")
}

fn assert_problem(r: &(u16, String, Value), status: u16, code: &str) {
    assert_eq!(r.0, status, "{r:?}");
    assert_eq!(r.1, "application/problem+json", "{r:?}");
    assert_eq!(r.2["status"], status, "{r:?}");
    assert_eq!(r.2["code"], code, "{r:?}");
    assert_eq!(r.2["type"], format!("urn:asmn:problem:{code}"), "{r:?}");
    assert!(
        r.2["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_keeps_the_quic_rules_and_answers_problems() {
    let s = serve().await;
    let api = s.api(Some("admin"));
    let anonymous = s.api(None);

    // Health and the document need no certificate; nothing else is served without one.
    let h = anonymous.get("/v1/health").await;
    assert_eq!((h.0, &h.2["status"]), (200, &json!("ok")), "{h:?}");
    let doc = anonymous.get("/v1/openapi.json").await;
    assert_eq!(doc.0, 200);
    assert_eq!(
        doc.2,
        serde_json::from_str::<Value>(&asmn_controller::rest::document()).expect("json")
    );
    assert_problem(
        &anonymous.get("/v1/instances").await,
        401,
        "client-certificate-required",
    );
    assert_problem(
        &anonymous
            .post(
                "/v1/vnf-packages",
                &json!({"descriptor": "", "digests": {}}),
            )
            .await,
        401,
        "client-certificate-required",
    );

    // On-boarding by digest from the SOL001 VNFD: the checksum must be the digest.
    let sol = sol001_for(IMAGE);
    let wrong = api
        .post(
            "/v1/vnf-packages",
            &json!({"descriptor": sol, "digests": {"sha256": sha256_hex(b"another image")}}),
        )
        .await;
    assert_problem(&wrong, 400, "invalid-request");
    assert!(
        wrong.2["detail"]
            .as_str()
            .is_some_and(|d| d.contains("checksum")),
        "{wrong:?}"
    );
    let p = api
        .post(
            "/v1/vnf-packages",
            &json!({"descriptor": sol, "digests": {"sha256": sha256_hex(IMAGE)}, "image_bytes": IMAGE.len()}),
        )
        .await;
    assert_eq!(p.0, 201, "{p:?}");
    assert_eq!(p.2["vnf"], "web-server");
    assert_eq!(p.2["digests"]["sha256"], sha256_hex(IMAGE));
    // A descriptor the catalog rules refuse: 422 with the field named.
    let bad = api
        .post(
            "/v1/vnf-packages",
            &json!({"descriptor": "vnfd:\n  id: x\n  sec_catalog:\n    default_action: maybe\n", "digests": {"sha256": sha256_hex(IMAGE)}}),
        )
        .await;
    assert_problem(&bad, 422, "invalid-catalog");
    // Malformed JSON, a wrong field, a bad digest: problems, never a 5xx.
    let raw = api
        .send(
            api.client
                .post(format!("{}/v1/vnf-packages", api.base))
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert_problem(&raw, 400, "bad-request");
    assert_problem(
        &api.post(
            "/v1/vnf-packages",
            &json!({"descriptor": sol, "digests": {"sha256": "zz"}}),
        )
        .await,
        400,
        "bad-request",
    );
    assert_problem(
        &api.post(
            "/v1/vnf-packages",
            &json!({"descriptor": sol, "digests": {}, "extra": 1}),
        )
        .await,
        400,
        "bad-request",
    );
    assert_problem(&api.get("/v1/no-such-thing").await, 404, "not-found");
    let method = api
        .send(api.client.delete(format!("{}/v1/instances", api.base)))
        .await;
    assert_problem(&method, 405, "method-not-allowed");

    // On-boarding by upload: Sec-EM measures what it receives.
    let image2: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let vnfd2 = "vnfd:\n  id: cache\n  sec_catalog:\n    default_action: drop\n    rules:\n      - name: redis\n        protocol: tcp\n        port: 6379\n        ingress_policing_rate: 0\n";
    let form = reqwest::multipart::Form::new()
        .text("descriptor", vnfd2)
        .part(
            "image",
            reqwest::multipart::Part::bytes(image2.clone()).file_name("cache.img"),
        );
    let up = api
        .send(
            api.client
                .post(format!("{}/v1/vnf-packages/upload", api.base))
                .multipart(form),
        )
        .await;
    assert_eq!(up.0, 201, "{up:?}");
    assert_eq!(up.2["digests"]["sha256"], sha256_hex(&image2));
    assert_eq!(up.2["image_bytes"], image2.len());
    assert_eq!(up.2["vnf"], "cache", "{up:?}");
    let listed = api.get("/v1/vnf-packages?limit=1").await;
    assert_eq!(listed.2["items"][0]["vnf"], "cache", "{listed:?}");
    let next = listed.2["next"].as_str().expect("a second page");
    let second = api
        .get(&format!("/v1/vnf-packages?limit=1&after={next}"))
        .await;
    assert_eq!(second.2["items"][0]["vnf"], "web-server", "{second:?}");
    assert!(second.2.get("next").is_none(), "{second:?}");
    assert_problem(
        &api.get("/v1/vnf-packages?limit=0").await,
        400,
        "bad-request",
    );
    assert_problem(
        &api.get("/v1/vnf-packages?limit=banana").await,
        400,
        "bad-request",
    );

    // Instances: created over REST, enrolled over QUIC with the bundle REST returned.
    let mut ids = Vec::new();
    for name in ["web-1", "web-2", "web-3"] {
        let c = api
            .post(
                "/v1/instances",
                &json!({"tenant": "t1", "vnf": "web-server", "name": name,
                        "agent": {"target": "/dev/vda", "underlay": "192.0.2.10:51820"}}),
            )
            .await;
        assert_eq!(c.0, 201, "{c:?}");
        assert_eq!(c.2["instance"]["state"], "created");
        let drive = &c.2["config_drive"];
        assert_eq!(drive["asmn/bundle"], c.2["bundle"]);
        let toml = base64::engine::general_purpose::STANDARD
            .decode(drive["asmn/agent.toml"].as_str().expect("agent.toml"))
            .expect("b64");
        let toml = String::from_utf8(toml).expect("utf-8");
        assert!(toml.contains("underlay = \"192.0.2.10:51820\""), "{toml}");
        assert!(
            !toml.contains("realtime_priority"),
            "a VNF's default: {toml}"
        );
        let ud = c.2["user_data"].as_str().expect("user_data");
        assert!(ud.starts_with("#cloud-config\n") && ud.contains("/etc/asmn/bundle"));
        let bundle = bundle_of(&c.2);
        assert_eq!(bundle.instance.to_string(), name);
        ids.push((bundle.instance_key().to_hex(), bundle));
    }
    assert_problem(
        &api.post(
            "/v1/instances",
            &json!({"tenant": "t1", "vnf": "web-server", "name": "web-1"}),
        )
        .await,
        409,
        "already-exists",
    );
    assert_problem(
        &api.post("/v1/instances", &json!({"tenant": "t1", "vnf": "nope"}))
            .await,
        404,
        "unknown-instance",
    );
    assert_problem(
        &api.post(
            "/v1/instances",
            &json!({"tenant": "t1", "vnf": "web-server", "agent": {"target": "vda", "underlay": "x"}}),
        )
        .await,
        400,
        "bad-request",
    );
    let agents = s.agents.connect().await;
    let (req, _prover) = enroll_with_prover_of(&ids[0].1, IMAGE);
    let e = ask_opt(&agents, Body::Enroll(req)).await;
    assert!(matches!(e, Some(Body::Enrolled(_))), "{e:?}");
    let one = api.get(&format!("/v1/instances/{}", ids[0].0)).await;
    assert_eq!(one.0, 200, "{one:?}");
    assert_eq!(one.2["state"], "enrolled");
    assert_eq!(one.2["chain"]["length"], 64);
    assert_eq!(one.2["chain"]["last_index"], 63, "{one:?}");
    // The same instance as the QUIC listing shows it.
    let admin = s.admin.connect().await;
    let q = ask_opt(
        &admin,
        Body::Query(msg::QueryRequest {
            what: "instance".into(),
            argument: ids[0].0.clone(),
            after: String::new(),
            limit: 0,
        }),
    )
    .await;
    let Some(Body::QueryResult(q)) = q else {
        panic!("{q:?}")
    };
    let q: Value = serde_json::from_str(&q.json).expect("json");
    assert_eq!(q["chain"]["last_index"], one.2["chain"]["last_index"]);
    assert_eq!(q["overlay"], one.2["overlay"]);
    // Paged: one at a time, every instance once.
    let mut seen = Vec::new();
    let mut after = String::new();
    for _ in 0..10 {
        let page = api.get(&format!("/v1/instances?limit=1{after}")).await;
        assert_eq!(page.0, 200, "{page:?}");
        for i in page.2["items"].as_array().expect("items") {
            seen.push(i["id"].as_str().expect("id").to_string());
        }
        match page.2["next"].as_str() {
            Some(n) => after = format!("&after={n}"),
            None => break,
        }
    }
    let mut want: Vec<String> = ids.iter().map(|(i, _)| i.clone()).collect();
    want.sort();
    assert_eq!(seen, want);
    assert_problem(&api.get("/v1/instances/abc").await, 400, "bad-request");
    assert_problem(
        &api.get(&format!("/v1/instances/{}", "0".repeat(64))).await,
        404,
        "unknown-instance",
    );

    // Catalogs: a new version, validated as asmnctl validates it; the history.
    let cat = "vnf: web-server\nsec_catalog:\n  default_action: drop\n  rules:\n    - name: https\n      protocol: tcp\n      port: 443\n      ingress_policing_rate: 5000\n";
    let put = api
        .put("/v1/catalogs/web-server", &json!({"catalog": cat}))
        .await;
    assert_eq!((put.0, &put.2["version"]), (200, &json!(2)), "{put:?}");
    let shown = api.get("/v1/catalogs/web-server").await;
    assert_eq!(shown.2["version"], 2);
    assert_eq!(shown.2["catalog"]["rules"][0]["name"], "https");
    let hist = api.get("/v1/catalogs/web-server/history").await;
    let versions: Vec<u64> = hist.2["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|c| c["version"].as_u64().expect("v"))
        .collect();
    assert_eq!(versions, [1, 2], "{hist:?}");
    assert_problem(
        &api.put("/v1/catalogs/cache", &json!({"catalog": cat}))
            .await,
        400,
        "bad-request",
    );
    assert_problem(
        &api.put(
            "/v1/catalogs/web-server",
            &json!({"catalog": cat.replace("port: 443", "port: 70000")}),
        )
        .await,
        422,
        "invalid-catalog",
    );
    assert_problem(&api.get("/v1/catalogs/nothing").await, 404, "not-found");

    // Revocation, then the audit log filtered by instance and by kind.
    let rv = api
        .post(
            &format!("/v1/instances/{}/revoke", ids[1].0),
            &json!({"reason": "decommissioned by the VNFM"}),
        )
        .await;
    assert_eq!((rv.0, &rv.2["state"]), (200, &json!("revoked")), "{rv:?}");
    let audit = api.get(&format!("/v1/audit?instance={}", ids[1].0)).await;
    let kinds: Vec<&str> = audit.2["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, ["instance.created", "instance.revoked"], "{audit:?}");
    let created = api.get("/v1/audit?kind=instance.created&limit=2").await;
    assert_eq!(created.2["items"].as_array().expect("items").len(), 2);
    let rest = api
        .get(&format!(
            "/v1/audit?kind=instance.created&after={}",
            created.2["next"].as_str().expect("next")
        ))
        .await;
    assert_eq!(
        rest.2["items"].as_array().expect("items").len(),
        1,
        "{rest:?}"
    );
    assert_problem(&api.get("/v1/audit?instance=xyz").await, 400, "bad-request");

    // A revoked admin certificate is refused on the next request, over REST too.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sec-em"))
        .args(["issue-admin", "--dir"])
        .arg(s.dir.path())
        .args(["--name", "ops-2", "--out-dir"])
        .arg(s.dir.path())
        .output()
        .expect("issue-admin");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ops2 = s.api(Some("ops-2"));
    assert_eq!(ops2.get("/v1/instances").await.0, 200);
    let serial = asmn_controller::pki::serial_of_pem(
        &std::fs::read_to_string(s.dir.path().join("ops-2.pem")).expect("pem"),
    )
    .expect("serial");
    let r = ask_opt(
        &admin,
        Body::RevokeAdmin(msg::RevokeAdminRequest { serial }),
    )
    .await;
    assert!(matches!(r, Some(Body::Ok(_))), "{r:?}");
    assert_problem(
        &ops2.get("/v1/instances").await,
        403,
        "admin-certificate-revoked",
    );
    assert_eq!(api.get("/v1/instances").await.0, 200);

    // The data plane's real-time priority is written only when asked (0 included: an
    // agent older than the field would refuse it, and the agent has a gateway's default);
    // a priority out of SCHED_FIFO's range is refused.
    let agent_toml_of = |c: &(u16, String, Value)| {
        let b64 = c.2["config_drive"]["asmn/agent.toml"]
            .as_str()
            .expect("agent.toml")
            .to_string();
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("b64"),
        )
        .expect("utf-8")
    };
    for (name, priority, want) in [
        ("gw-default", None, None),
        ("gw-ordinary", Some(0), Some("realtime_priority = 0\n")),
        ("gw-five", Some(5), Some("realtime_priority = 5\n")),
    ] {
        let mut agent = json!({"target": "/dev/vda", "underlay": "192.0.2.11:51820"});
        if let Some(p) = priority {
            agent["realtime_priority"] = json!(p);
        }
        let c = api
            .post(
                "/v1/instances",
                &json!({"tenant": "t1", "vnf": "web-server", "name": name,
                        "role": "gateway", "agent": agent}),
            )
            .await;
        assert_eq!(c.0, 201, "{c:?}");
        let toml = agent_toml_of(&c);
        match want {
            Some(line) => assert!(toml.contains(line), "{name}: {toml}"),
            None => assert!(!toml.contains("realtime_priority"), "{name}: {toml}"),
        }
    }
    assert_problem(
        &api.post(
            "/v1/instances",
            &json!({"tenant": "t1", "vnf": "web-server", "role": "gateway",
                    "agent": {"target": "/dev/vda", "underlay": "192.0.2.11:51820",
                              "realtime_priority": 100}}),
        )
        .await,
        400,
        "bad-request",
    );
}

/// What a receiver got: the signature header, the delivery header and the body.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// A webhook receiver on `port` (0: any) answering 204; its port, and the task that
/// serves it (aborting it closes the listener and every connection).
async fn receiver(port: u16, got: Received) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let got = Arc::clone(&got);
            conns.spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let got = Arc::clone(&got);
                        async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let (sig, delivery) = (h("asmn-signature"), h("asmn-delivery"));
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            got.lock().expect("lock").push((sig, delivery, body));
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(204)
                                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                                    .expect("response"),
                            )
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (port, task)
}

/// The events received so far: each one's signature checked, in arrival order.
fn events(got: &Received, secret: &str) -> Vec<Value> {
    let now = asmn_controller::service::now();
    got.lock()
        .expect("lock")
        .iter()
        .map(|(sig, delivery, body)| {
            asmn_controller::notify::verify_signature(secret, sig, body, now, 300)
                .expect("every notification is signed with the subscription's secret");
            let v: Value = serde_json::from_slice(body).expect("json");
            assert_eq!(
                v["id"].to_string(),
                *delivery,
                "ASMN-Delivery is the event's id"
            );
            v
        })
        .collect()
}

/// `(type, instance name)` of each event.
fn summary(evs: &[Value]) -> Vec<(String, String)> {
    evs.iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["instance"]["name"]
                    .as_str()
                    .or(e["catalog"]["vnf"].as_str())
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect()
}

async fn wait_for(got: &Received, secret: &str, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let evs = events(got, secret);
        if evs.len() >= n || Instant::now() >= deadline {
            return evs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The events are `expected` exactly once each, in the log's order (increasing IDs),
/// each instance's in the order of `expected`; a catalog version's acknowledgement comes
/// after it is applied. (When an acknowledgement by every agent is recorded depends on
/// when the agents acknowledge: its place among other instances' events may vary.)
fn in_log_order(evs: &[Value], expected: &[(String, String)]) {
    let got = summary(evs);
    let mut a = got.clone();
    let mut b = expected.to_vec();
    a.sort();
    b.sort();
    assert_eq!(a, b, "every event once: {got:#?}");
    let ids: Vec<u64> = evs.iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in log order: {ids:?}");
    let of = |list: &[(String, String)], name: &str| -> Vec<String> {
        list.iter()
            .filter(|(t, n)| n == name && !t.starts_with("catalog."))
            .map(|(t, _)| t.clone())
            .collect()
    };
    for (_, name) in expected {
        assert_eq!(
            of(&got, name),
            of(expected, name),
            "{name}'s events in order"
        );
    }
    for v in 1..=2u64 {
        let at = |t: &str| {
            evs.iter()
                .position(|e| e["type"] == t && e["catalog"]["version"] == v)
        };
        if let (Some(applied), Some(acked)) = (at("catalog.applied"), at("catalog.acknowledged")) {
            assert!(
                applied < acked,
                "version {v} acknowledged before it was applied"
            );
        }
    }
}

fn pair(t: &str, n: &str) -> (String, String) {
    (t.to_string(), n.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_of_a_tenants_life_arrives_once_in_order_and_after_an_outage() {
    let s = serve().await;
    let api = s.api(Some("admin"));
    let got: Received = Arc::default();
    let (port, rx_task) = receiver(0, Arc::clone(&got)).await;
    let sub = api
        .post(
            "/v1/subscriptions",
            &json!({"callback": format!("http://127.0.0.1:{port}/asmn-events")}),
        )
        .await;
    assert_eq!(sub.0, 201, "{sub:?}");
    let secret = sub.2["secret"].as_str().expect("secret").to_string();
    assert_eq!(secret.len(), 64);
    let listed = api.get("/v1/subscriptions").await;
    assert_eq!(listed.2["items"][0]["id"], sub.2["id"]);
    assert!(
        listed.2["items"][0].get("secret").is_none(),
        "the secret is shown once"
    );
    assert_problem(
        &api.post("/v1/subscriptions", &json!({"callback": "ftp://x/"}))
            .await,
        400,
        "invalid-request",
    );
    assert_problem(
        &api.post(
            "/v1/subscriptions",
            &json!({"callback": "http://127.0.0.1:1/", "types": ["instance.exploded"]}),
        )
        .await,
        400,
        "invalid-request",
    );

    // The tenant's life: on-board, two instances enroll, a fake is refused and
    // quarantined, a catalog is put and acknowledged by both agents, a re-attestation
    // fails (a replayed reveal), one instance is revoked, the other's agent goes away.
    onboard_web(&api).await;
    let mut bundles = BTreeMap::new();
    for name in ["web-a", "web-b", "web-fake"] {
        let c = api
            .post(
                "/v1/instances",
                &json!({"tenant": "demo", "vnf": "web-server", "name": name}),
            )
            .await;
        assert_eq!(c.0, 201, "{c:?}");
        bundles.insert(name, bundle_of(&c.2));
    }
    let conn_a = s.agents.connect().await;
    let conn_b = s.agents.connect().await;
    let (req_a, mut prover_a) = enroll_with_prover_of(&bundles["web-a"], IMAGE);
    let replay = req_a.reveal.clone();
    assert!(matches!(
        ask_opt(&conn_a, Body::Enroll(req_a)).await,
        Some(Body::Enrolled(_))
    ));
    let mut push_a = Pushes::open(&conn_a).await;
    let (req_b, _) = enroll_with_prover_of(&bundles["web-b"], IMAGE);
    assert!(matches!(
        ask_opt(&conn_b, Body::Enroll(req_b)).await,
        Some(Body::Enrolled(_))
    ));
    let mut push_b = Pushes::open(&conn_b).await;
    let conn_f = s.agents.connect().await;
    let (req_f, _) = enroll_with_prover_of(&bundles["web-fake"], b"a tampered image");
    let refused = ask_opt(&conn_f, Body::Enroll(req_f)).await;
    assert!(matches!(refused, Some(Body::Refused(_))), "{refused:?}");
    // Both agents take the catalog in force at enrollment (version 1) first.
    for push in [&mut push_a, &mut push_b] {
        assert!(matches!(push.next().await, Body::CatalogPush(_)));
    }
    let cat = "vnf: web-server\nsec_catalog:\n  default_action: drop\n  rules:\n    - name: https\n      protocol: tcp\n      port: 443\n      ingress_policing_rate: 5000\n";
    let put = api
        .put("/v1/catalogs/web-server", &json!({"catalog": cat}))
        .await;
    assert_eq!(put.0, 200, "{put:?}");
    for (push, conn) in [(&mut push_a, &conn_a), (&mut push_b, &conn_b)] {
        let version = loop {
            match push.next().await {
                Body::CatalogPush(c) if c.version == 2 => break c.version,
                _ => {}
            }
        };
        let ack = ask_opt(
            conn,
            Body::CatalogAck(msg::CatalogAck {
                vnf: "web-server".into(),
                version,
            }),
        )
        .await;
        assert!(matches!(ack, Some(Body::Ok(_))), "{ack:?}");
    }
    // Wait for the acknowledgement event before the next step: it is decided by
    // watching the store, so it could otherwise come after later records.
    // An agent cannot claim a version never put in force.
    let forged = ask_opt(
        &conn_a,
        Body::CatalogAck(msg::CatalogAck {
            vnf: "web-server".into(),
            version: 999,
        }),
    )
    .await;
    assert!(
        matches!(&forged, Some(Body::Refused(r)) if r.code == msg::RefusalCode::InvalidRequest as i32),
        "{forged:?}"
    );
    // Wait for version 2's acknowledgement before the next step: it is decided by
    // watching the store, so it could otherwise come after later records.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !events(&got, &secret)
        .iter()
        .any(|e| e["type"] == "catalog.acknowledged" && e["catalog"]["version"] == 2)
    {
        assert!(Instant::now() < deadline, "{:#?}", events(&got, &secret));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bad = ask_opt(
        &conn_a,
        Body::Reattest(msg::ReattestRequest {
            reveal: replay,
            measurement: hex::decode(sha256_hex(IMAGE)).expect("hex"),
            renewal: None,
            dh_public: vec![],
        }),
    )
    .await;
    assert!(matches!(bad, Some(Body::Refused(_))), "{bad:?}");
    let _ = prover_a.reveal();
    let rv = api
        .post(
            &format!(
                "/v1/instances/{}/revoke",
                bundles["web-b"].instance_key().to_hex()
            ),
            &json!({"reason": "scaled in"}),
        )
        .await;
    assert_eq!(rv.0, 200, "{rv:?}");
    conn_a.close(0u32.into(), b"the VM stopped");

    let life = [
        pair("catalog.applied", "web-server"),
        pair("catalog.acknowledged", "web-server"),
        pair("instance.created", "web-a"),
        pair("instance.created", "web-b"),
        pair("instance.created", "web-fake"),
        pair("instance.enrolled", "web-a"),
        pair("instance.enrolled", "web-b"),
        pair("instance.refused", "web-fake"),
        pair("instance.quarantined", "web-fake"),
        pair("catalog.applied", "web-server"),
        pair("catalog.acknowledged", "web-server"),
        pair("reattestation.failed", "web-a"),
        pair("instance.revoked", "web-b"),
        pair("agent.lost", "web-a"),
    ];
    let evs = wait_for(&got, &secret, life.len(), Duration::from_secs(15)).await;
    in_log_order(&evs, &life);
    assert!(evs.iter().all(|e| e["subscription"] == sub.2["id"]));
    let revoked = evs
        .iter()
        .find(|e| e["type"] == "instance.revoked")
        .expect("revoked");
    assert_eq!(revoked["instance"]["state"], "revoked", "{revoked}");
    let acked2 = evs
        .iter()
        .find(|e| e["type"] == "catalog.acknowledged" && e["catalog"]["version"] == 2)
        .expect("version 2 acknowledged");
    assert!(
        acked2["detail"]
            .as_str()
            .is_some_and(|d| d.contains("acknowledged by 2 agents")),
        "{acked2}"
    );

    // The receiver goes down for 30 s; the tenant lives on; the events arrive after.
    rx_task.abort();
    let _ = rx_task.await;
    let down = Instant::now();
    let c = api
        .post(
            "/v1/instances",
            &json!({"tenant": "demo", "vnf": "web-server", "name": "web-c"}),
        )
        .await;
    assert_eq!(c.0, 201, "{c:?}");
    let bc = bundle_of(&c.2);
    let conn_c = s.agents.connect().await;
    let (req_c, _) = enroll_with_prover_of(&bc, IMAGE);
    assert!(matches!(
        ask_opt(&conn_c, Body::Enroll(req_c)).await,
        Some(Body::Enrolled(_))
    ));
    let rv = api
        .post(
            &format!("/v1/instances/{}/revoke", bc.instance_key().to_hex()),
            &json!({"reason": "scaled in"}),
        )
        .await;
    assert_eq!(rv.0, 200, "{rv:?}");
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down.elapsed())).await;
    assert_eq!(
        events(&got, &secret).len(),
        life.len(),
        "nothing while down"
    );
    let (_, _rx_again) = receiver(port, Arc::clone(&got)).await;
    let back = Instant::now();
    let after = [
        pair("instance.created", "web-c"),
        pair("instance.enrolled", "web-c"),
        pair("instance.revoked", "web-c"),
    ];
    let evs = wait_for(
        &got,
        &secret,
        life.len() + after.len(),
        Duration::from_secs(15),
    )
    .await;
    let all: Vec<_> = life.iter().chain(after.iter()).cloned().collect();
    in_log_order(&evs, &all);
    assert_eq!(
        summary(&evs[life.len()..]),
        after,
        "the outage's events once, in order, after it"
    );
    eprintln!(
        "events after a 30 s outage delivered {} ms after the receiver came back",
        back.elapsed().as_millis()
    );
    drop(conn_b);
}

#[test]
fn the_committed_openapi_document_is_the_generated_one() {
    let committed = include_str!("../../docs/openapi.json");
    let generated = asmn_controller::rest::document();
    assert!(
        committed == generated,
        "docs/openapi.json is stale: run `cargo run -p asmn-controller --bin sec-em -- openapi > docs/openapi.json`"
    );
}

/// The Python virtual environment with openapi-spec-validator and schemathesis
/// (`scripts/deps.sh`'s `asmn_python_tools`; `ASMN_VENV`).
fn venv() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("ASMN_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/venv"));
    if dir.join("bin/st").exists() {
        return Some(dir);
    }
    let why = format!(
        "schemathesis is not installed in {} (scripts/deps.sh: asmn_python_tools)",
        dir.display()
    );
    assert!(std::env::var("CI").is_err(), "{why}");
    asmn_shared::skip::note(&why);
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_response_off_the_schema() {
    let Some(venv) = venv() else {
        return;
    };
    let s = serve().await;
    let api = s.api(Some("admin"));
    // Something to find: a package, an instance, a catalog history, a subscription.
    onboard_web(&api).await;
    let c = api
        .post(
            "/v1/instances",
            &json!({"tenant": "t1", "vnf": "web-server"}),
        )
        .await;
    assert_eq!(c.0, 201, "{c:?}");
    let validated = std::process::Command::new(venv.join("bin/openapi-spec-validator"))
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"))
        .output()
        .expect("openapi-spec-validator");
    assert!(
        validated.status.success(),
        "{}",
        String::from_utf8_lossy(&validated.stdout)
    );
    let d = s.dir.path();
    let out = std::process::Command::new(venv.join("bin/st"))
        .current_dir(d)
        .args(["run", "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--max-examples", "40", "--seed", "1", "--workers", "2"])
        .args(["--suppress-health-check", "all", "--no-color"])
        .arg(format!("--tls-verify={}", d.join("ca.pem").display()))
        .arg(format!("--request-cert={}", d.join("admin.pem").display()))
        .arg(format!("--request-cert-key={}", d.join("admin.key").display()))
        .arg(format!("--url=https://127.0.0.1:{}", s.rest))
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"))
        .output()
        .expect("schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "schemathesis failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // At least a few hundred generated requests: schemathesis reports its count.
    let generated: u64 = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_suffix(" passed")?
                .split_once(" generated")?
                .0
                .trim()
                .parse()
                .ok()
        })
        .expect("schemathesis reports how many test cases it generated");
    assert!(generated >= 300, "only {generated} requests generated");
}

/// A TLS connection to the REST API from `source` without a client certificate.
async fn anonymous_tls(
    s: &Served,
    source: std::net::IpAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    tls_as(s, source, None).await
}

/// A TLS connection to the REST API from `source`, with `identity`'s certificate if given.
async fn tls_as(
    s: &Served,
    source: std::net::IpAddr,
    identity: Option<&str>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    connect_tls(Arc::new(client_tls(s.dir.path(), identity)), source, s.rest).await
}

/// A TLS connection with `config` from `source` to the REST API on loopback `port`.
async fn connect_tls(
    config: Arc<rustls::ClientConfig>,
    source: std::net::IpAddr,
    port: u16,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(std::net::SocketAddr::new(source, 0))?;
    let tcp = sock
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Reads one HTTP/1.1 answer (headers and a `content-length` body): its status and body.
async fn read_answer<R: tokio::io::AsyncRead + Unpin>(c: &mut R) -> std::io::Result<(u16, Value)> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if got.len() > 64 << 10 || c.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other(format!(
                "no whole answer: {}",
                String::from_utf8_lossy(&got)
            )));
        }
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    c.read_exact(&mut body).await?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

/// A client that sends its whole request before it reads its answer (as Python's
/// `requests` and schemathesis do) gets Sec-EM's refusal even when Sec-EM refused before
/// it read the body, and the connection serves on. Before Sec-EM read such a body's rest,
/// it closed the connection with bytes unread and the kernel answered with a reset: the
/// client saw a broken connection (34 of 200 in a Python loop, and a CI run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_before_its_body_is_read_still_gets_its_answer() {
    use tokio::io::AsyncWriteExt;
    let s = serve().await;
    let form = |parts: &[(&str, Vec<u8>)]| {
        let mut b = Vec::new();
        for (name, data) in parts {
            b.extend_from_slice(
                format!(
                    "--XyZ\r\ncontent-disposition: form-data; name=\"{name}\"; filename=\"f\"\r\n\r\n"
                )
                .as_bytes(),
            );
            b.extend_from_slice(data);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    };
    let upload = "/v1/vnf-packages/upload";
    let multipart = "multipart/form-data; boundary=XyZ";
    // Method, path, content type, body; the status and problem code expected.
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        // The image before its descriptor: refused at the part's header, 8 MiB unread.
        (
            "POST",
            upload,
            multipart,
            form(&[("image", vec![7u8; 8 << 20]), ("descriptor", b"x".to_vec())]),
            400,
            "bad-request",
        ),
        // A descriptor over 1 MiB: refused after its first MiB, 2 MiB unread.
        (
            "POST",
            upload,
            multipart,
            form(&[
                ("descriptor", vec![b'#'; 3 << 20]),
                ("image", vec![0u8; 16]),
            ]),
            413,
            "too-large",
        ),
        // A method the resource does not take, with a body.
        (
            "PATCH",
            "/v1/instances",
            "application/json",
            serde_json::to_vec(&json!({"pad": "p".repeat(1 << 20)})).expect("json"),
            405,
            "method-not-allowed",
        ),
    ];
    for round in 0..4 {
        for (method, path, ct, body, status, code) in &cases {
            let mut c = tls_as(&s, [127, 0, 0, 1].into(), Some("admin"))
                .await
                .expect("connect");
            let head = format!(
                "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {ct}\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let sent = tokio::time::timeout(Duration::from_secs(20), async {
                c.write_all(head.as_bytes()).await?;
                c.write_all(body).await?;
                c.flush().await
            })
            .await
            .expect("sent in time");
            assert!(
                sent.is_ok(),
                "round {round}, {method} {path}: sending failed: {sent:?}"
            );
            let (got, problem) = tokio::time::timeout(Duration::from_secs(20), read_answer(&mut c))
                .await
                .expect("answered in time")
                .unwrap_or_else(|e| panic!("round {round}, {method} {path}: {e}"));
            assert_eq!(got, *status, "round {round}, {method} {path}: {problem}");
            assert_eq!(problem["code"], *code, "{problem}");
            // The body was read to its end: the same connection answers the next request.
            c.write_all(b"GET /v1/health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                .await
                .expect("ask again");
            let (again, _) = tokio::time::timeout(Duration::from_secs(20), read_answer(&mut c))
                .await
                .expect("answered in time")
                .expect("a second answer on the connection");
            assert_eq!(again, 200, "round {round}, {method} {path}");
        }
    }
    // The reading is bounded: a refused upload that goes on (1 GiB announced) is cut off
    // after at most 16 MiB more, and the connection closed.
    let mut c = tls_as(&s, [127, 0, 0, 1].into(), Some("admin"))
        .await
        .expect("connect");
    let start = form(&[("image", Vec::new())]);
    let start = &start[..start.len() - b"\r\n--XyZ--\r\n".len()];
    let head = format!(
        "POST {upload} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {multipart}\r\ncontent-length: {}\r\n\r\n",
        1u64 << 30
    );
    c.write_all(head.as_bytes()).await.expect("head");
    c.write_all(start).await.expect("part");
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0usize;
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        while sent < 256 << 20 {
            c.write_all(&chunk).await?;
            sent += chunk.len();
        }
        Ok::<(), std::io::Error>(())
    })
    .await
    .expect("cut off in time");
    assert!(cut.is_err(), "Sec-EM read {sent} bytes of a refused upload");
    assert!(
        sent <= 48 << 20,
        "Sec-EM read {sent} bytes of a refused upload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_peers_cannot_hold_the_rest_api_nor_grow_its_metrics() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = serve().await;
    let api = s.api(Some("admin"));

    // 1. A thousand made-up methods: refused, and counted under one label.
    for i in 0..1000 {
        let Ok(mut c) = anonymous_tls(&s, [127, 0, 0, 3].into()).await else {
            continue;
        };
        let req = format!(
            "X{i}{} /v1/health HTTP/1.1\r\nhost: x\r\n\r\n",
            "Y".repeat(200)
        );
        let _ = c.write_all(req.as_bytes()).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut sink)).await;
    }
    let metrics = {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", s.metrics_port()))
            .await
            .expect("metrics");
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .expect("ask");
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut text))
            .await
            .expect("in time")
            .expect("read");
        text
    };
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("asmn_rest_requests_total{"))
        .count();
    assert!(series < 20, "{series} request series:\n{metrics}");
    assert!(
        metrics.contains("method=\"other\""),
        "made-up methods are counted as other"
    );

    // 2. Connections held open without a certificate, each with pipelined requests
    //    whose answers it never reads: at most 32 from one address, each for at most 5 s.
    let attacker: std::net::IpAddr = [127, 0, 0, 2].into();
    let mut held = Vec::new();
    for _ in 0..64 {
        if let Ok(c) = anonymous_tls(&s, attacker).await {
            held.push(c);
        }
    }
    assert!(
        (16..=32).contains(&held.len()),
        "{} connections from one address",
        held.len()
    );
    for c in &mut held {
        let many = "GET /v1/openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(50);
        let _ =
            tokio::time::timeout(Duration::from_millis(200), c.write_all(many.as_bytes())).await;
    }
    let t = Instant::now();
    let r = api.get("/v1/instances").await;
    assert_eq!(r.0, 200, "{r:?}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the operator waited {:?}",
        t.elapsed()
    );
    // Within the deadline, Sec-EM has closed every held connection.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for mut c in held {
        let mut sink = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut sink)).await;
        assert!(ended.is_ok(), "a held connection is still open after 11 s");
        // One answer at most: the connection served one request.
        let answers = String::from_utf8_lossy(&sink)
            .matches("HTTP/1.1 200")
            .count();
        assert!(
            answers <= 1,
            "{answers} answers on one anonymous connection"
        );
    }
}

/// CPU time (user and system, in seconds) of process `pid` so far, from `/proc`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command's closing parenthesis: utime and stime are 12 and 13.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// Peers without a certificate cannot make Sec-EM read a body it refused: a body of
/// one-byte chunks (six bytes on the wire, two task wake-ups on Sec-EM a byte), sent as
/// fast as 8 connections at once can, is cut off within a second and costs Sec-EM little
/// CPU. The first version of reading refused bodies to their end read them for each
/// anonymous connection's whole 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_peers_cannot_make_sec_em_read_refused_bodies() {
    use tokio::io::AsyncWriteExt;
    let s = serve().await;
    let pid = s.daemon.as_ref().expect("daemon").0.id();
    let chunks = "1\r\nX\r\n".repeat(10_000).into_bytes();
    let config = Arc::new(client_tls(s.dir.path(), None));
    let before = cpu_seconds(pid);
    let started = Instant::now();
    let mut attackers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (config, chunks, port) = (Arc::clone(&config), chunks.clone(), s.rest);
        attackers.spawn(async move {
            // Three connections one after the other: (bytes written, how long it lasted).
            let mut held = Vec::new();
            for _ in 0..3 {
                let mut c = connect_tls(Arc::clone(&config), [127, 0, 0, 2].into(), port)
                    .await
                    .expect("connect");
                let t = Instant::now();
                let head = "POST /v1/instances HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                let mut sent = 0usize;
                let mut written = c.write_all(head.as_bytes()).await;
                while written.is_ok() && t.elapsed() < Duration::from_secs(8) {
                    written = match tokio::time::timeout(Duration::from_secs(8), c.write_all(&chunks))
                        .await
                    {
                        Ok(w) => w,
                        Err(_) => Err(std::io::Error::other("write stalled")),
                    };
                    sent += chunks.len();
                }
                held.push((sent, t.elapsed()));
            }
            held
        });
    }
    let held: Vec<(usize, Duration)> = attackers.join_all().await.into_iter().flatten().collect();
    let used = cpu_seconds(pid) - before;
    let took = started.elapsed().as_secs_f64();
    let longest = held.iter().map(|h| h.1).max().expect("connections");
    let most = held.iter().map(|h| h.0).max().expect("connections");
    eprintln!(
        "{} connections in {took:.1} s: the longest held {longest:?}, the most written {most} bytes; Sec-EM used {used:.2} s of CPU",
        held.len()
    );
    assert!(
        longest < Duration::from_secs(1),
        "an anonymous refused body was read for {longest:?}: {held:?}"
    );
    assert!(
        used < 0.5,
        "Sec-EM used {used:.2} s of CPU for 24 anonymous refused bodies: {held:?}"
    );
    // And it still answers its operator.
    let r = s.api(Some("admin")).get("/v1/instances").await;
    assert_eq!(r.0, 200, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_part_over_1_mib_is_refused() {
    let s = serve().await;
    let api = s.api(Some("admin"));
    let form = reqwest::multipart::Form::new()
        .text("descriptor", "#".repeat(3 << 20))
        .part("image", reqwest::multipart::Part::bytes(vec![0u8; 16]));
    let r = api
        .send(
            api.client
                .post(format!("{}/v1/vnf-packages/upload", api.base))
                .multipart(form),
        )
        .await;
    assert_problem(&r, 413, "too-large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_acknowledgement_is_recorded_once_across_restarts() {
    let mut s = serve().await;
    let api = s.api(Some("admin"));
    // A subscriber that wants other events, and is down: its position stays at the
    // start, so a restarted Sec-EM reads the catalog records again.
    let sub = api
        .post(
            "/v1/subscriptions",
            &json!({"callback": format!("http://127.0.0.1:{}/", free_tcp()), "types": ["instance.revoked"]}),
        )
        .await;
    assert_eq!(sub.0, 201, "{sub:?}");
    onboard_web(&api).await;
    let c = api
        .post(
            "/v1/instances",
            &json!({"tenant": "t1", "vnf": "web-server", "name": "a"}),
        )
        .await;
    let conn = s.agents.connect().await;
    let (req, _) = enroll_with_prover_of(&bundle_of(&c.2), IMAGE);
    assert!(matches!(
        ask_opt(&conn, Body::Enroll(req)).await,
        Some(Body::Enrolled(_))
    ));
    let cat = "vnf: web-server\nsec_catalog:\n  default_action: drop\n";
    assert_eq!(
        api.put("/v1/catalogs/web-server", &json!({"catalog": cat}))
            .await
            .0,
        200
    );
    let ack = ask_opt(
        &conn,
        Body::CatalogAck(msg::CatalogAck {
            vnf: "web-server".into(),
            version: 2,
        }),
    )
    .await;
    assert!(matches!(ack, Some(Body::Ok(_))), "{ack:?}");
    let versions = |v: &Value| -> Vec<u64> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|r| notify_catalog_version(r["detail"].as_str().expect("detail")))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = api.get("/v1/audit?kind=catalog.acknowledged").await;
        if versions(&a.2).contains(&2) {
            break;
        }
        assert!(Instant::now() < deadline, "{a:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(conn);
    s.restart().await;
    // The new process takes the lease once the old one's runs out (5 s), then reads the
    // log again from the subscriber's position.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let a = s
        .api(Some("admin"))
        .get("/v1/audit?kind=catalog.acknowledged")
        .await;
    assert_eq!(versions(&a.2), [1, 2], "{a:?}");
}

/// The version in a catalog record's detail (`<vnf> catalog version <n>...`).
fn notify_catalog_version(detail: &str) -> u64 {
    detail
        .split_once(" catalog version ")
        .and_then(|(_, r)| r.split(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
