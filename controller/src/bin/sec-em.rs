//! `sec-em`: the Sec-EM controller of an ASMN tenant.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use asmn_controller::{config, pki};
use clap::{Parser, Subcommand};

/// Sec-EM, the security element manager of an ASMN tenant.
///
/// It attests VNF instances by their hash chains, introduces verified peers to each other,
/// and pushes Sec-catalogs and revocations. Start with `sec-em init` to make its CA,
/// certificates and configuration, then `sec-em serve`.
#[derive(Parser, Debug)]
#[command(name = "sec-em", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make the controller CA, the server certificate, the admin client certificate
    /// (for asmnctl) and sec-em.toml in DIR. Keys are written with mode 0600.
    Init {
        /// Directory for the keys, certificates and configuration.
        #[arg(long, default_value = "/etc/asmn")]
        dir: PathBuf,
        /// Names (DNS or IP) agents and operators use to reach Sec-EM; the first is the
        /// TLS server name. Repeat the flag for more.
        #[arg(long = "server-name", default_values_t = ["sec-em".to_string(), "127.0.0.1".to_string()])]
        server_names: Vec<String>,
        /// Where the QUIC endpoint will listen.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// Where `sec-em serve` exports Prometheus metrics (HTTP).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_addr: SocketAddr,
        /// The embedded store's file (relative to DIR, or absolute). The packaged unit
        /// may write only its state directory: /var/lib/asmn/sec-em.redb there.
        #[arg(long, default_value = "sec-em.redb")]
        store_file: PathBuf,
        /// Where to write the CA key (`ca.key`): by default DIR. Point it at an offline
        /// directory (removable media) to keep it off the Sec-EM host: `sec-em serve`
        /// never reads it; only `sec-em issue-admin` does.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Replace existing keys and configuration (agents pinning the old CA will be
        /// refused).
        #[arg(long)]
        force: bool,
    },
    /// Issue another admin client certificate for asmnctl, signed with the CA key (which
    /// may be offline). Each operator gets their own, so one can be revoked
    /// (`asmnctl admin revoke SERIAL`) without touching the others.
    IssueAdmin {
        /// The directory holding ca.pem (as written by `sec-em init`).
        #[arg(long, default_value = "/etc/asmn")]
        dir: PathBuf,
        /// The directory holding ca.key (`--ca-dir` of `sec-em init`; default DIR).
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// A name for the certificate's holder (its common name).
        #[arg(long)]
        name: String,
        /// Where to write NAME.pem and NAME.key (mode 0600).
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Serve agents and operators over QUIC until SIGTERM or SIGINT. Exit codes: 0 stopped
    /// by a signal; 78 the configuration, keys or store schema are wrong (a restart
    /// cannot help); 1 anything else (a restart may: the store unreachable, the port
    /// taken).
    Serve {
        /// The configuration file.
        #[arg(long, default_value = "/etc/asmn/sec-em.toml")]
        config: PathBuf,
        /// Log format: text or json.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
    },
    /// Write a consistent backup of the embedded store to FILE (mode 0600). While Sec-EM
    /// serves it takes the snapshot itself, in one read transaction (this command asks it
    /// over QUIC with the admin certificate); when it is stopped, from the file. For an
    /// etcd store use `etcdctl snapshot save` (docs/deploy.md).
    Backup {
        /// The configuration file.
        #[arg(long, default_value = "/etc/asmn/sec-em.toml")]
        config: PathBuf,
        /// Where to write the backup.
        #[arg(long)]
        out: PathBuf,
        /// The admin client certificate (default: admin.pem beside the configuration).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Its key (default: admin.key beside the configuration).
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Put a backup back as the embedded store, with Sec-EM stopped. The backup is
    /// checked (format, checksum, schema) before anything is touched; an existing store
    /// is kept beside it (`.before-restore-TIME`), and replaced only with --force.
    Restore {
        /// The configuration file.
        #[arg(long, default_value = "/etc/asmn/sec-em.toml")]
        config: PathBuf,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// Replace an existing store.
        #[arg(long)]
        force: bool,
    },
    /// Read a configuration file and report the first problem, if any.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = "/etc/asmn/sec-em.toml")]
        config: PathBuf,
    },
    /// Print the OpenAPI 3.1 document of the REST API (`rest_addr`; also served at
    /// /v1/openapi.json and committed as docs/openapi.json).
    Openapi,
}

fn current_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Average Gregorian year; the certificate starts on January 1 of this year or the
    // one before, which is all that matters here.
    1970 + (secs / 31_556_952) as i32
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            dir,
            server_names,
            listen,
            metrics_addr,
            store_file,
            ca_dir,
            force,
        } => {
            let ca_dir = ca_dir.unwrap_or_else(|| dir.clone());
            let cfg_path = dir.join("sec-em.toml");
            if !force && cfg_path.exists() {
                anyhow::bail!(
                    "{} already exists; pass --force to replace the controller's keys and configuration",
                    cfg_path.display()
                );
            }
            let pki = pki::generate(&server_names, current_year() - 1)?;
            pki::write(&dir, &ca_dir, &pki, force)?;
            let audit_key =
                asmn_controller::audit::AuditKey::generate().map_err(anyhow::Error::msg)?;
            pki::write_file(
                &dir.join("audit.key"),
                audit_key.to_file_text().as_bytes(),
                true,
            )?;
            let server_name = server_names.first().map_or("sec-em", String::as_str);
            let store_file = store_file.to_str().ok_or_else(|| {
                anyhow::anyhow!("--store-file {}: not UTF-8", store_file.display())
            })?;
            let text = config::initial(listen, server_name, store_file, metrics_addr);
            pki::write_file(&cfg_path, text.as_bytes(), true)?;
            config::Config::load(&cfg_path).context("the configuration just written")?;
            println!(
                "wrote the controller CA, certificates and keys to {}",
                dir.display()
            );
            println!("  ca.pem      the CA agents pin (it goes into every bootstrap bundle)");
            println!(
                "  server.pem  the server certificate for {}",
                server_names.join(", ")
            );
            println!(
                "  admin.pem   the admin client certificate for asmnctl (keys: *.key, mode 0600), serial {}",
                pki::serial_of_pem(&pki.admin_cert).unwrap_or_default()
            );
            println!(
                "  audit.key   authenticates the audit log: back it up, never put it in the store"
            );
            println!(
                "  ca.key      the CA key, in {}{}",
                ca_dir.display(),
                if ca_dir == dir {
                    " (move it offline: `sec-em serve` never needs it)"
                } else {
                    ""
                }
            );
            println!(
                "  sec-em.toml the configuration; check it with: sec-em check-config --config {}",
                cfg_path.display()
            );
            Ok(())
        }
        Command::Serve { config, log_format } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            if log_format == "json" {
                tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .json()
                    .with_env_filter(filter)
                    .init();
            } else {
                tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .with_env_filter(filter)
                    .init();
            }
            let cfg = config::Config::load(&config).map_err(|e| ConfigFault(e.into()))?;
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            rt.block_on(async { asmn_controller::daemon::run(cfg, shutdown_signal()).await })
                .map_err(|e| {
                    use asmn_channel::tls::TlsError;
                    use asmn_controller::daemon::DaemonError;
                    let fault = matches!(
                        e,
                        DaemonError::Read { .. }
                            | DaemonError::AuditKey { .. }
                            | DaemonError::Schema(_)
                            | DaemonError::Transport(TlsError::Material(_))
                    );
                    if fault {
                        anyhow::Error::new(ConfigFault(e.into()))
                    } else {
                        e.into()
                    }
                })?;
            Ok(())
        }
        Command::IssueAdmin {
            dir,
            ca_dir,
            name,
            out_dir,
        } => {
            let ca_dir = ca_dir.unwrap_or_else(|| dir.clone());
            let read = |p: PathBuf| {
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
            };
            let ca_cert = read(dir.join("ca.pem"))?;
            let ca_key = read(ca_dir.join("ca.key"))?;
            if name.is_empty()
                || name.len() > 64
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
            {
                anyhow::bail!("--name must be 1 to 64 letters, digits, '-', '_' or '.'");
            }
            let (cert, key, serial) =
                pki::issue_admin(&ca_cert, &ca_key, &name, current_year() - 1)?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let (cert_path, key_path) = (
                out_dir.join(format!("{name}.pem")),
                out_dir.join(format!("{name}.key")),
            );
            for p in [&cert_path, &key_path] {
                if p.exists() {
                    anyhow::bail!("{} already exists", p.display());
                }
            }
            pki::write_file(&cert_path, cert.as_bytes(), false)?;
            pki::write_file(&key_path, key.as_bytes(), true)?;
            println!(
                "issued admin certificate {} (serial {serial}) and its key {}",
                cert_path.display(),
                key_path.display()
            );
            Ok(())
        }
        Command::Backup {
            config,
            out,
            cert,
            key,
        } => backup(&config, &out, cert, key),
        Command::Restore {
            config,
            from,
            force,
        } => restore(&config, &from, force),
        Command::Openapi => {
            print!("{}", asmn_controller::rest::document());
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = config::Config::load(&config)?;
            println!(
                "{}: valid (listen {}, store {:?}, overlay {}/{}, {})",
                config.display(),
                c.listen,
                c.store,
                c.overlay_net,
                c.overlay_prefix,
                c.dh_group
            );
            Ok(())
        }
    }
}

/// The audit key of `cfg`: it authenticates backups too.
fn audit_key(cfg: &config::Config) -> anyhow::Result<asmn_controller::audit::AuditKey> {
    let text = std::fs::read_to_string(&cfg.audit_key)
        .with_context(|| format!("reading the audit key {}", cfg.audit_key.display()))?;
    asmn_controller::audit::AuditKey::from_file_text(&text)
        .map_err(|e| anyhow::anyhow!("the audit key {}: {e}", cfg.audit_key.display()))
}

fn embedded_path(cfg: &config::Config) -> anyhow::Result<PathBuf> {
    match &cfg.store {
        config::StoreUrl::Embedded(p) => Ok(p.clone()),
        config::StoreUrl::Etcd(url, _) => anyhow::bail!(
            "the store is etcd ({url}): back it up and restore it with `etcdctl snapshot \
             save` / `snapshot restore` (docs/deploy.md)"
        ),
    }
}

fn backup(
    config_path: &std::path::Path,
    out: &std::path::Path,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> anyhow::Result<()> {
    use asmn_controller::store::embedded::EmbeddedStore;
    let cfg = config::Config::load(config_path)?;
    let path = embedded_path(&cfg)?;
    let audit_key = audit_key(&cfg)?;
    if !path.exists() {
        anyhow::bail!(
            "{}: no store there (is `store` in {} right?)",
            path.display(),
            config_path.display()
        );
    }
    // Sec-EM stopped: the file is free.
    let direct = EmbeddedStore::open(&path);
    let (header, sha) = match direct {
        Ok(store) => {
            let snap = store.snapshotter().snapshot()?;
            drop(store);
            asmn_controller::backup::write(out, &snap, &audit_key)?
        }
        Err(open_error) => {
            let dir = config_path.parent().unwrap_or(std::path::Path::new("."));
            let cert = cert.unwrap_or_else(|| dir.join("admin.pem"));
            let key = key.unwrap_or_else(|| dir.join("admin.key"));
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let (ca, cert, key) = (read(&cfg.ca)?, read(&cert)?, read(&key)?);
            let addr = if cfg.listen.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], cfg.listen.port()))
            } else {
                cfg.listen
            };
            let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let summary = rt
                .block_on(async {
                    let ep = asmn_channel::tls::client(&ca, Some((&cert, &key)))?;
                    let (conn, _) = asmn_channel::call::connect(
                        &ep,
                        &[addr.to_string()],
                        &cfg.server_name,
                        std::time::Duration::from_secs(5),
                    )
                    .await?;
                    let body =
                        asmn_shared::wire::msg::Body::Query(asmn_shared::wire::msg::QueryRequest {
                            what: "backup".into(),
                            argument: String::new(),
                            after: String::new(),
                            limit: 0,
                        });
                    let answer =
                        asmn_channel::call::call(&conn, body, std::time::Duration::from_secs(600))
                            .await?;
                    conn.close(0u32.into(), b"done");
                    match answer {
                        asmn_shared::wire::msg::Body::QueryResult(r) => Ok(r.json),
                        other => anyhow::bail!("unexpected answer: {other:?}"),
                    }
                })
                .with_context(|| {
                    format!(
                        "the store {} is in use ({open_error}) and the serving Sec-EM at {addr} \
                         did not take the backup",
                        path.display()
                    )
                })?;
            let v: serde_json::Value = serde_json::from_str(&summary)?;
            let taken = PathBuf::from(v["path"].as_str().unwrap_or_default());
            // Copy what Sec-EM wrote (in its state directory), checking it on the way.
            let (h, snap) = asmn_controller::backup::read(&taken, &audit_key)?;
            let (_, sha) = asmn_controller::backup::write(out, &snap, &audit_key)?;
            let _ = std::fs::remove_file(&taken);
            (h, sha)
        }
    };
    println!(
        "backup {}: {} entries at revision {}, schema {}, sha256 {sha}",
        out.display(),
        header.entries,
        header.revision,
        header
            .schema
            .map_or_else(|| "unmarked (1)".to_string(), |v| v.to_string())
    );
    Ok(())
}

fn restore(
    config_path: &std::path::Path,
    from: &std::path::Path,
    force: bool,
) -> anyhow::Result<()> {
    use asmn_controller::store::embedded::EmbeddedStore;
    use asmn_controller::store::schema;
    let cfg = config::Config::load(config_path)?;
    let path = embedded_path(&cfg)?;
    let (header, snap) = asmn_controller::backup::read(from, &audit_key(&cfg)?)?;
    if let Some((_, v)) = snap.entries.iter().find(|(k, _)| k == schema::KEY) {
        let m: schema::Marker = serde_json::from_slice(v).context("the backup's schema marker")?;
        schema::readable(&m, schema::Ours::THIS)?;
    }
    if path.exists() {
        // Opening it proves Sec-EM is not serving it.
        drop(EmbeddedStore::open(&path).with_context(|| {
            format!("{} is in use: stop sec-em before restoring", path.display())
        })?);
        if !force {
            anyhow::bail!(
                "{} exists; pass --force to replace it (it is kept beside, renamed)",
                path.display()
            );
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let kept = path.with_extension(format!("before-restore-{secs}"));
        std::fs::rename(&path, &kept)
            .with_context(|| format!("moving {} aside", path.display()))?;
        println!("the store that was there is now {}", kept.display());
    }
    EmbeddedStore::create_from(&path, &snap)?;
    // The store belongs to whoever owns its directory (the asmn user of the packaged
    // unit), also when root restores it.
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(if dir.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            dir
        })
        .with_context(|| format!("reading the owner of {}", dir.display()))?;
        std::os::unix::fs::chown(&path, Some(meta.uid()), Some(meta.gid()))
            .with_context(|| format!("giving {} to its directory's owner", path.display()))?;
    }
    println!(
        "restored {} entries (revision {}) from {} into {}; start sec-em",
        header.entries,
        header.revision,
        from.display(),
        path.display()
    );
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// An error of the configuration, keys or store schema: restarting cannot fix it.
#[derive(Debug)]
struct ConfigFault(anyhow::Error);

impl std::fmt::Display for ConfigFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for ConfigFault {}

/// `serve`'s exit code for a [`ConfigFault`] (EX_CONFIG): the unit does not restart it.
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sec-em: error: {e:#}");
            if !serving {
                ExitCode::from(2)
            } else if e.downcast_ref::<ConfigFault>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                // A failure a restart may cure (the store unreachable, the port taken).
                ExitCode::from(1)
            }
        }
    }
}
