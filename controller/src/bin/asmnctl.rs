//! `asmnctl`: the operator's command line for Sec-EM.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use asmn_controller::pki;
use asmn_shared::catalog::parse_vnfd;
use asmn_shared::measure::{self, MeasureOptions};
use asmn_shared::wire::msg::{self, Body};
use clap::{Parser, Subcommand};
use prost::Message;

/// Operate Sec-EM: on-board VNF images, create instances and their bootstrap bundles,
/// inspect and revoke instances, read and verify the audit log.
///
/// Exit codes: 0 success; 1 Sec-EM refused (or the audit log does not verify); 2 a local
/// error (arguments, files); 3 Sec-EM unreachable.
#[derive(Parser, Debug)]
#[command(name = "asmnctl", version, about, long_about)]
struct Cli {
    /// Sec-EM's QUIC address (host:port). Repeat it for the replicas of a deployment:
    /// they are tried in order, the next as soon as one does not answer within 250 ms.
    #[arg(long, global = true, default_value = "127.0.0.1:7443")]
    controller: Vec<String>,
    /// The name in Sec-EM's certificate.
    #[arg(long, global = true, default_value = "sec-em")]
    server_name: String,
    /// Directory with ca.pem, admin.pem and admin.key (made by `sec-em init`).
    #[arg(long, global = true, default_value = "/etc/asmn")]
    pki: PathBuf,
    /// The admin client certificate to present (default: PKI/admin.pem); from
    /// `sec-em issue-admin` for operators of their own.
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Its key (default: PKI/admin.key).
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for Sec-EM to answer the connection.
    #[arg(long, global = true, default_value_t = 10)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// VNF images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// VNF instances.
    Instance {
        #[command(subcommand)]
        command: InstanceCommand,
    },
    /// Revoke an instance: it is cut off and cannot enroll again.
    Revoke {
        /// The instance ID (64 hex digits, from `instance list`).
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "revoked by the operator")]
        reason: String,
    },
    /// Sec-catalogs.
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// The audit log of security decisions.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Admin client certificates.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Revoke an admin certificate by its serial (hex, as `sec-em init` and
    /// `sec-em issue-admin` print it): every later request presenting it is refused.
    Revoke {
        /// The certificate's serial.
        serial: String,
    },
    /// List the revoked serials.
    Revoked,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Measure an image and register it with its VNFD and Sec-catalog.
    ///
    /// With --sol001 the descriptor is an ETSI NFV-SOL 001 VNFD (TOSCA): its VDU's
    /// sw_image_data.checksum is the golden digest and its SecurityGroupRule policies
    /// the whitelist (example: images/examples/web-server.sol001.yaml). IMAGE may then be
    /// left out (on-boarding by digest: the orchestrator holds the image; the checksum
    /// must be sha-256); given, it is measured and must match the checksum.
    Onboard {
        /// The image file or block device.
        #[arg(required_unless_present = "sol001")]
        image: Option<PathBuf>,
        /// The ASMN VNFD (YAML, with its sec_catalog section).
        #[arg(long, required_unless_present = "sol001", conflicts_with = "sol001")]
        vnfd: Option<PathBuf>,
        /// An ETSI SOL001 VNFD (TOSCA YAML) instead.
        #[arg(long)]
        sol001: Option<PathBuf>,
        /// Golden digests to register (SHA-256 is always included).
        #[arg(long, default_value = "sha256")]
        algo: String,
    },
}

#[derive(Subcommand, Debug)]
enum InstanceCommand {
    /// Create an instance and write its bootstrap bundle (its secret, mode 0600).
    Create {
        /// Tenant.
        #[arg(long)]
        tenant: String,
        /// On-boarded VNF.
        #[arg(long)]
        vnf: String,
        /// Role: vnf or gateway.
        #[arg(long, default_value = "vnf", value_parser = ["vnf", "gateway"])]
        role: String,
        /// Instance name (default: VNF name and a random suffix).
        #[arg(long)]
        name: Option<String>,
        /// Where to write the bundle for the VIM to hand to the VM.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing bundle file.
        #[arg(long)]
        force: bool,
    },
    /// List instances.
    List,
    /// Show one instance.
    Show {
        /// The instance ID (64 hex digits).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum CatalogCommand {
    /// Validate a catalog file (`vnf:` + `sec_catalog:`, or a whole VNFD) and put it in
    /// force as the VNF's next version.
    Apply {
        /// The catalog file.
        file: PathBuf,
    },
    /// Show the catalog in force for a VNF.
    Show {
        /// The VNF.
        vnf: String,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Print the audit log, a page at a time from Sec-EM (any length).
    Show {
        /// The first record to print.
        #[arg(long, default_value_t = 1)]
        since: u64,
        /// Only records of this instance (64 hex digits) or of this kind
        /// (such as enroll.refused).
        #[arg(long)]
        filter: Option<String>,
        /// Print at most this many records.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Check every record's hash, link and MAC (audit key): exit 1 if a record was
    /// changed, deleted or forged; with --checkpoint, also if the log was cut after it.
    Verify {
        /// A checkpoint written earlier by `asmnctl audit checkpoint`.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Verify the log and write its head, authenticated, to FILE: keep it outside Sec-EM
    /// and its store to detect a later cut (`audit verify --checkpoint FILE`).
    Checkpoint {
        /// Where to write the checkpoint (JSON).
        #[arg(long)]
        out: PathBuf,
    },
}

/// An error with the exit code it maps to.
struct Failure(u8, String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(2, e.to_string())
    }
}

fn unreachable_err(e: impl std::fmt::Display) -> Failure {
    Failure(
        3,
        format!("cannot reach Sec-EM: {e} (is `sec-em serve` running, and --controller right?)"),
    )
}

fn read(path: &Path) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure(2, format!("{}: {e} (see --pki)", path.display())))
}

async fn call(cli: &Cli, body: Body) -> Result<Body, Failure> {
    let ca = read(&cli.pki.join("ca.pem"))?;
    let cert = read(
        &cli.cert
            .clone()
            .unwrap_or_else(|| cli.pki.join("admin.pem")),
    )?;
    let key = read(&cli.key.clone().unwrap_or_else(|| cli.pki.join("admin.key")))?;
    let ep = asmn_channel::tls::client(&ca, Some((&cert, &key)))?;
    let timeout = std::time::Duration::from_secs(cli.timeout.max(1));
    let (conn, _) = asmn_channel::call::connect(&ep, &cli.controller, &cli.server_name, timeout)
        .await
        .map_err(unreachable_err)?;
    // Verifying the audit log reads all of it: allow it minutes, not seconds.
    let answer_within = match &body {
        Body::Query(q) if q.what.starts_with("audit-") => std::time::Duration::from_secs(600),
        _ => timeout.max(std::time::Duration::from_secs(30)),
    };
    let reply = asmn_channel::call::call(&conn, body, answer_within).await;
    conn.close(0u32.into(), b"done");
    match reply {
        Ok(b) => Ok(b),
        Err(asmn_channel::call::CallError::Refused { code, message }) => {
            Err(Failure(1, format!("Sec-EM refused ({code:?}): {message}")))
        }
        Err(e @ asmn_channel::call::CallError::Protocol(_)) => Err(Failure(1, e.to_string())),
        Err(e) => Err(unreachable_err(e)),
    }
}

/// One page of a query: the JSON and the `after` of the next page, if any.
async fn query_page(
    cli: &Cli,
    what: &str,
    argument: &str,
    after: &str,
) -> Result<(serde_json::Value, Option<String>), Failure> {
    match call(
        cli,
        Body::Query(msg::QueryRequest {
            what: what.into(),
            argument: argument.into(),
            after: after.into(),
            limit: 0,
        }),
    )
    .await?
    {
        Body::QueryResult(r) => Ok((
            serde_json::from_str(&r.json)?,
            (!r.next.is_empty()).then_some(r.next),
        )),
        other => Err(Failure(1, format!("unexpected answer: {other:?}"))),
    }
}

async fn query(cli: &Cli, what: &str, argument: &str) -> Result<serde_json::Value, Failure> {
    Ok(query_page(cli, what, argument, "").await?.0)
}

/// Every page of a listing, handed to `each` in order; at most `pages` pages.
async fn query_all(
    cli: &Cli,
    what: &str,
    argument: &str,
    first: String,
    mut each: impl FnMut(serde_json::Value) -> bool,
) -> Result<(), Failure> {
    let mut after = first;
    // Bounded: a listing of 10 million pages is not one an operator asked for.
    for _ in 0..10_000_000u64 {
        let (v, next) = query_page(cli, what, argument, &after).await?;
        if !each(v) {
            return Ok(());
        }
        match next {
            Some(n) if n != after => after = n,
            _ => return Ok(()),
        }
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn print_instances(list: &serde_json::Value) {
    println!(
        "{:<12}  {:<10} {:<14} {:<18} {:<8} {:<16} {:<12} {:>13}",
        "ID", "TENANT", "VNF", "INSTANCE", "ROLE", "OVERLAY", "STATE", "CHAIN"
    );
    for r in list.as_array().into_iter().flatten() {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
        println!(
            "{:<12}  {:<10} {:<14} {:<18} {:<8} {:<16} {:<12} {:>6}/{:<6}",
            short(&s("id")),
            s("tenant"),
            s("vnf"),
            s("instance"),
            s("role"),
            s("overlay"),
            r["state"]["state"].as_str().unwrap_or("?"),
            r["chain"]["last_index"],
            r["chain"]["length"]
        );
    }
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Image {
            command:
                ImageCommand::Onboard {
                    image,
                    vnfd,
                    sol001,
                    algo,
                },
        } => {
            let file = sol001
                .as_ref()
                .or(vnfd.as_ref())
                .ok_or_else(|| Failure(2, "give --vnfd FILE or --sol001 FILE".into()))?;
            let name = file.display().to_string();
            let text = std::fs::read(file).map_err(|e| Failure(2, format!("{name}: {e}")))?;
            // Checked here first, as Sec-EM will: errors name the file.
            let checksum = if sol001.is_some() {
                let s = asmn_shared::sol001::parse_sol001(&name, &text)
                    .map_err(|e| Failure(2, e.to_string()))?;
                Some(s)
            } else {
                parse_vnfd(&name, &text)?;
                None
            };
            let (digests, bytes, shown): (Vec<msg::DigestMsg>, u64, Vec<(String, String)>) =
                match &image {
                    Some(image) => {
                        let mut algs = measure::parse_algorithms(algo)?;
                        algs.push(measure::Algorithm::Sha256);
                        if let Some(s) = &checksum
                            && let Ok(a) = measure::parse_algorithms(&s.algorithm.replace('-', ""))
                        {
                            algs.extend(a);
                        }
                        let m = measure::measure_path(
                            image,
                            &algs,
                            MeasureOptions::default(),
                            &mut |_| {},
                        )?;
                        if let Some(s) = &checksum {
                            let want = s.algorithm.replace('-', "");
                            match m.digests.iter().find(|(a, _)| a.name() == want) {
                                Some((_, d)) if d.0 == s.digest => {}
                                Some((_, d)) => {
                                    return Err(Failure(
                                        2,
                                        format!(
                                            "{}: its {} is {d}, but {name} says {} (sw_image_data.checksum of {}): not the VNFD's image",
                                            image.display(),
                                            s.algorithm,
                                            hex::encode(&s.digest),
                                            s.vdu
                                        ),
                                    ));
                                }
                                None => {
                                    return Err(Failure(
                                        2,
                                        format!(
                                            "{name}: the checksum's algorithm {} cannot be measured here",
                                            s.algorithm
                                        ),
                                    ));
                                }
                            }
                        }
                        let digests = m
                            .digests
                            .iter()
                            .map(|(a, d)| msg::DigestMsg {
                                algorithm: a.name().into(),
                                value: d.0.clone(),
                            })
                            .collect();
                        let shown = m
                            .digests
                            .iter()
                            .map(|(a, d)| (a.name().to_string(), d.to_string()))
                            .collect();
                        (digests, m.bytes, shown)
                    }
                    None => {
                        // On-boarding by digest: the agent measures SHA-256.
                        let s = checksum
                            .as_ref()
                            .ok_or_else(|| Failure(2, "an image is needed with --vnfd".into()))?;
                        if s.algorithm != "sha-256" && s.algorithm != "sha256" {
                            return Err(Failure(
                                2,
                                format!(
                                    "{name}: the checksum is {}; on-boarding by digest needs sha-256 (the agents measure SHA-256): give the image to measure it",
                                    s.algorithm
                                ),
                            ));
                        }
                        (
                            vec![msg::DigestMsg {
                                algorithm: "sha256".into(),
                                value: s.digest.clone(),
                            }],
                            s.size.unwrap_or(0),
                            vec![("sha256".into(), hex::encode(&s.digest))],
                        )
                    }
                };
            call(
                cli,
                Body::Onboard(msg::OnboardRequest {
                    vnfd_yaml: String::from_utf8(text)
                        .map_err(|_| Failure(2, "the VNFD is not UTF-8".into()))?,
                    digests,
                    image_bytes: bytes,
                }),
            )
            .await?;
            let what = image.as_ref().map_or_else(
                || format!("{name} (by digest)"),
                |i| i.display().to_string(),
            );
            if cli.json {
                let d: serde_json::Map<String, serde_json::Value> = shown
                    .iter()
                    .map(|(a, d)| (a.clone(), serde_json::Value::String(d.clone())))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"onboarded": what, "bytes": bytes, "digests": d})
                );
            } else {
                println!("on-boarded {what} ({bytes} bytes)");
                for (a, d) in &shown {
                    println!("  {a:<7} {d}");
                }
            }
        }
        Command::Instance {
            command:
                InstanceCommand::Create {
                    tenant,
                    vnf,
                    role,
                    name,
                    out,
                    force,
                },
        } => {
            if out.exists() && !force {
                return Err(Failure(
                    2,
                    format!("{} exists; pass --force to replace it", out.display()),
                ));
            }
            let role = if role == "gateway" {
                msg::RoleMsg::Gateway
            } else {
                msg::RoleMsg::Vnf
            };
            let b = match call(
                cli,
                Body::CreateInstance(msg::CreateInstanceRequest {
                    tenant: tenant.clone(),
                    vnf: vnf.clone(),
                    instance: name.clone().unwrap_or_default(),
                    role: role as i32,
                }),
            )
            .await?
            {
                Body::InstanceCreated(b) => b,
                other => return Err(Failure(1, format!("unexpected answer: {other:?}"))),
            };
            let bundle = asmn_shared::wire::BootstrapBundle::try_from(&b)?;
            pki::write_file(out, &b.encode_to_vec(), true)?;
            let id = bundle.instance_key().to_hex();
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"id": id, "instance": b.instance, "bundle": out})
                );
            } else {
                println!("created {}/{}/{} ({})", b.tenant, b.vnf, b.instance, id);
                println!(
                    "bundle written to {} (mode 0600): hand it to the VM (cloud-init or config drive)",
                    out.display()
                );
            }
        }
        Command::Instance {
            command: InstanceCommand::List,
        } => {
            let mut all = Vec::new();
            query_all(cli, "instances", "", String::new(), |v| {
                all.extend(v.as_array().cloned().unwrap_or_default());
                true
            })
            .await?;
            let v = serde_json::Value::Array(all);
            if cli.json {
                println!("{v}");
            } else {
                print_instances(&v);
            }
        }
        Command::Instance {
            command: InstanceCommand::Show { id },
        } => {
            let v = query(cli, "instance", id).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Command::Revoke { id, reason } => {
            let bytes = hex::decode(id)
                .map_err(|_| Failure(2, "the instance ID is 64 hex digits".into()))?;
            call(
                cli,
                Body::Revoke(msg::RevokeRequest {
                    instance_key: bytes,
                    reason: reason.clone(),
                }),
            )
            .await?;
            println!("revoked {id}");
        }
        Command::Catalog {
            command: CatalogCommand::Apply { file },
        } => {
            let bytes =
                std::fs::read(file).map_err(|e| Failure(2, format!("{}: {e}", file.display())))?;
            let catalog = asmn_shared::catalog::parse_catalog(&file.display().to_string(), &bytes)?;
            // Agents receive a catalog in one frame: say so here, before sending anything.
            let push = msg::Envelope {
                request_id: u64::MAX,
                body: Some(Body::CatalogPush((&catalog).into())),
            };
            let encoded = push.encoded_len();
            let most = asmn_shared::wire::MAX_FRAME - asmn_controller::registry::PUSH_MARGIN;
            if encoded > most {
                return Err(Failure(
                    2,
                    format!(
                        "{}: this catalog cannot be pushed to agents in one frame ({encoded} bytes encoded, at most {most}); merge rules or shorten source lists",
                        file.display()
                    ),
                ));
            }
            let t = std::time::Instant::now();
            let applied = call(
                cli,
                Body::ApplyCatalog(msg::ApplyCatalogRequest {
                    catalog: Some((&catalog).into()),
                }),
            )
            .await?;
            let Body::CatalogApplied(a) = applied else {
                return Err(Failure(1, format!("unexpected answer: {applied:?}")));
            };
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"vnf": a.vnf, "version": a.version, "seconds": t.elapsed().as_secs_f64()})
                );
            } else {
                println!(
                    "catalog of {} is now version {} ({} rules)",
                    a.vnf,
                    a.version,
                    catalog.rules.len()
                );
            }
        }
        Command::Catalog {
            command: CatalogCommand::Show { vnf },
        } => {
            let shown = call(
                cli,
                Body::ShowCatalog(msg::ShowCatalogRequest { vnf: vnf.clone() }),
            )
            .await?;
            let Body::CatalogPush(c) = shown else {
                return Err(Failure(1, format!("unexpected answer: {shown:?}")));
            };
            let c = asmn_shared::catalog::SecCatalog::try_from(&c)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!(
                    "{} catalog version {}, default {:?}",
                    c.vnf, c.version, c.default_action
                );
                println!(
                    "{:<16} {:<6} {:<12} {:<24} {:>12} {:>10}",
                    "RULE", "PROTO", "PORTS", "SOURCES", "RATE kbit/s", "BURST kbit"
                );
                for r in &c.rules {
                    let sources = r.sources.as_ref().map_or("any".to_string(), |s| {
                        s.iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    });
                    println!(
                        "{:<16} {:<6} {:<12} {:<24} {:>12} {:>10}",
                        r.name,
                        r.protocol.name(),
                        r.ports.map_or("any".to_string(), |p| p.to_string()),
                        sources,
                        if r.police.rate.is_unlimited() {
                            "unlimited".to_string()
                        } else {
                            r.police.rate.0.to_string()
                        },
                        r.police.effective_burst().0
                    );
                }
            }
        }
        Command::Audit {
            command:
                AuditCommand::Show {
                    since,
                    filter,
                    limit,
                },
        } => {
            let mut left = limit.unwrap_or(u64::MAX);
            let json = cli.json;
            query_all(
                cli,
                "audit",
                filter.as_deref().unwrap_or(""),
                since.to_string(),
                |v| {
                    for r in v.as_array().into_iter().flatten() {
                        if left == 0 {
                            return false;
                        }
                        left -= 1;
                        if json {
                            println!("{r}");
                        } else {
                            println!(
                                "{:>6}  {:>10}  {:<22} {:<12}  {}",
                                r["seq"],
                                r["time"],
                                r["kind"].as_str().unwrap_or("?"),
                                r["instance"].as_str().map(short).unwrap_or("-"),
                                r["detail"].as_str().unwrap_or("")
                            );
                        }
                    }
                    left > 0
                },
            )
            .await?;
        }
        Command::Audit {
            command: AuditCommand::Verify { checkpoint },
        } => {
            let argument = match checkpoint {
                None => String::new(),
                Some(p) => read(p)?,
            };
            let v = query(cli, "audit-verify", &argument).await?;
            if cli.json {
                println!("{v}");
            }
            if v["ok"] == true {
                if !cli.json {
                    println!(
                        "audit log intact: {} records; hashes, links and MACs hold{}",
                        v["records"],
                        if checkpoint.is_some() {
                            "; it reaches the checkpoint unchanged"
                        } else {
                            ""
                        }
                    );
                }
            } else {
                return Err(Failure(
                    1,
                    format!(
                        "audit log NOT intact: {}",
                        v["error"].as_str().unwrap_or("?")
                    ),
                ));
            }
        }
        Command::Audit {
            command: AuditCommand::Checkpoint { out },
        } => {
            let v = query(cli, "audit-checkpoint", "").await?;
            if v.get("seq").is_none() {
                return Err(Failure(
                    1,
                    format!(
                        "audit log NOT intact: {}",
                        v["error"].as_str().unwrap_or("?")
                    ),
                ));
            }
            let text = serde_json::to_string_pretty(&v)?;
            pki::write_file(out, text.as_bytes(), false)?;
            println!(
                "checkpoint at record {} written to {}: keep it away from Sec-EM",
                v["seq"],
                out.display()
            );
        }
        Command::Admin {
            command: AdminCommand::Revoke { serial },
        } => {
            call(
                cli,
                Body::RevokeAdmin(msg::RevokeAdminRequest {
                    serial: serial.clone(),
                }),
            )
            .await?;
            println!("admin certificate {serial} revoked");
        }
        Command::Admin {
            command: AdminCommand::Revoked,
        } => {
            let v = query(cli, "admin-revoked", "").await?;
            if cli.json {
                println!("{v}");
            } else {
                for s in v.as_array().into_iter().flatten() {
                    println!("{}", s.as_str().unwrap_or("?"));
                }
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("asmnctl: error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("asmnctl: error: {message}");
            ExitCode::from(code)
        }
    }
}
