//! `sec-em serve`: load the PKI, open the store, serve QUIC until told to stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, StoreUrl};
use crate::registry::{Registry, RegistryConfig};
use crate::service;
use crate::store::Store;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A file named in the configuration could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The QUIC endpoint could not start.
    #[error("starting the QUIC endpoint: {0}")]
    Transport(#[from] asmn_channel::tls::TlsError),
    /// The store's schema is not one this Sec-EM serves.
    #[error("{0}")]
    Schema(#[from] crate::store::schema::SchemaError),
    /// The audit key file is not a key.
    #[error("the audit key {path}: {reason}")]
    AuditKey {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// How often a serving Sec-EM checks that the store's schema is still one it serves.
const SCHEMA_RECHECK: Duration = Duration::from_secs(5);

/// How long open connections get to finish when the daemon stops.
pub const DRAIN: Duration = Duration::from_secs(5);

fn read(path: &std::path::Path) -> Result<String, DaemonError> {
    std::fs::read_to_string(path).map_err(|source| DaemonError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Runs Sec-EM with `config` until `shutdown` completes, then closes every connection
/// cleanly and waits up to [`DRAIN`] for them to go.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let ca = read(&config.ca)?;
    let cert = read(&config.cert)?;
    let key = read(&config.key)?;
    match config.store.clone() {
        StoreUrl::Embedded(path) => {
            let store = EmbeddedStore::open(&path)?;
            tracing::info!(path = %path.display(), "store: embedded");
            let audit_key = crate::audit::AuditKey::from_file_text(&read(&config.audit_key)?)
                .map_err(|reason| DaemonError::AuditKey {
                    path: config.audit_key.display().to_string(),
                    reason,
                })?;
            let hook = backup_hook(&store, &path, audit_key);
            serve_with(config, store, Some(hook), (&ca, &cert, &key), shutdown).await
        }
        StoreUrl::Etcd(url, files) => {
            let options = files.load().map_err(|reason| DaemonError::Read {
                path: "[etcd]".into(),
                source: std::io::Error::other(reason),
            })?;
            let store = EtcdStore::connect_with(&url, &options).await?;
            tracing::info!(%url, tls = options.tls.is_some(), "store: etcd");
            serve_with(config, store, None, (&ca, &cert, &key), shutdown).await
        }
    }
}

/// Backups of the embedded store at `path` while it serves: files in `backups/` beside
/// it (the service's state directory, the one place it may write).
fn backup_hook(
    store: &EmbeddedStore,
    path: &std::path::Path,
    key: crate::audit::AuditKey,
) -> crate::registry::BackupHook {
    let snap = store.snapshotter();
    let dir = path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("backups");
    Arc::new(move || {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let s = snap.snapshot().map_err(|e| e.to_string())?;
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let file = dir.join(format!("sec-em-{secs}-r{}.asmnbak", s.revision));
        let (h, sha) = crate::backup::write(&file, &s, &key).map_err(|e| e.to_string())?;
        tracing::info!(file = %file.display(), entries = h.entries, revision = h.revision, "backup written");
        Ok(serde_json::json!({
            "path": file,
            "entries": h.entries,
            "revision": h.revision,
            "schema": h.schema,
            "sha256": sha,
        }))
    })
}

async fn serve_with<S: Store>(
    config: Config,
    raw_store: S,
    backup: Option<crate::registry::BackupHook>,
    (ca, cert, key): (&str, &str, &str),
    shutdown: impl Future<Output = ()>,
) -> Result<(), DaemonError> {
    use crate::store::schema::{self, Ours};
    match schema::check(&raw_store, Ours::THIS).await? {
        schema::Outcome::Created => tracing::info!(version = schema::CURRENT, "new store"),
        schema::Outcome::Current => {}
        schema::Outcome::Migrated(from) => {
            tracing::info!(from, to = schema::CURRENT, "store migrated to this schema")
        }
        schema::Outcome::NewerCompatible(v) => tracing::warn!(
            store = v,
            ours = schema::CURRENT,
            "the store was upgraded by a newer Sec-EM; serving it as a compatible older \
             replica (finish the rolling upgrade)"
        ),
    }
    let metrics = crate::metrics::Metrics::new();
    let store = crate::metrics::MeteredStore::new(raw_store, Arc::clone(&metrics));
    let audit_key =
        crate::audit::AuditKey::from_file_text(&read(&config.audit_key)?).map_err(|reason| {
            DaemonError::AuditKey {
                path: config.audit_key.display().to_string(),
                reason,
            }
        })?;
    let endpoint =
        asmn_channel::tls::server(config.listen, ca, cert, key, &config.limits.transport)?;
    let local = endpoint
        .local_addr()
        .map_err(|e| asmn_channel::tls::TlsError::Socket(e.to_string()))?;
    let advertise = if config.listen.ip().is_unspecified() {
        format!("{}:{}", config.server_name, local.port())
    } else {
        local.to_string()
    };
    let registry = Registry::new(
        store,
        RegistryConfig {
            controllers: if config.controllers.is_empty() {
                vec![advertise]
            } else {
                config.controllers.clone()
            },
            server_name: config.server_name.clone(),
            ca_pem: ca.to_string(),
            chain_length: config.chain_length,
            dh_group: config.dh_group,
            reattest_interval_secs: config.reattest_interval_secs,
            overlay_net: config.overlay_net,
            overlay_prefix: config.overlay_prefix,
            audit_key,
            audit_refusals_per_min: config.limits.audit_refusals_per_min,
        },
    );
    let registry = Arc::new(match backup {
        Some(hook) => registry.with_backup(hook),
        None => registry,
    });
    tracing::info!(listen = %local, server_name = %config.server_name, "sec-em serving");
    let hub = crate::push::PushHub::new();
    let _follower = crate::push::follow(
        registry.store_arc(),
        Arc::clone(&hub),
        Some(Arc::clone(&metrics)),
    );
    let _metrics_http = match config.metrics_addr {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Read {
                    path: format!("metrics address {addr}"),
                    source,
                })?;
            tracing::info!(%addr, "metrics on http://{addr}/metrics");
            let hub = Arc::clone(&hub);
            Some(crate::metrics::serve(
                listener,
                Arc::clone(&metrics),
                move || hub.len(),
            ))
        }
    };
    // The REST API and the notifier (subscriptions are made over REST; a replica with
    // the REST API may deliver them, the one holding the lease does).
    let (_rest, _notifier) = match config.rest_addr {
        None => (None, None),
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Read {
                    path: format!("rest_addr {addr}"),
                    source,
                })?;
            let tls = crate::rest::tls_config(ca, cert, key)?;
            let hub_len = Arc::clone(&hub);
            let rest = Arc::new(crate::rest::Rest::new(
                Arc::clone(&registry),
                Some(Arc::clone(&metrics)),
                Arc::new(move || hub_len.len()),
            ));
            tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "REST API on https://{addr}/v1");
            let ca_pem = match &config.notifications.ca {
                None => None,
                Some(p) => Some(read(p)?),
            };
            let notifier = crate::notify::spawn(
                Arc::clone(&registry),
                crate::notify::NotifyOptions {
                    queue: config.notifications.queue,
                    ca: ca_pem,
                    max_backoff: config.notifications.max_backoff,
                },
                Some(Arc::clone(&metrics)),
            )
            .map_err(|reason| DaemonError::Read {
                path: "[notifications]".into(),
                source: std::io::Error::other(reason),
            })?;
            (
                Some(crate::rest::serve(listener, tls, rest)),
                Some(notifier),
            )
        }
    };
    let schema_store = registry.store_arc();
    let server = tokio::spawn(service::serve(
        endpoint.clone(),
        registry,
        hub,
        Some(metrics),
        config.limits.clone(),
    ));
    // A newer replica may migrate the store beyond what this one reads: stop then,
    // rather than write in a layout the others no longer expect.
    let outgrown = async move {
        loop {
            tokio::time::sleep(SCHEMA_RECHECK).await;
            match schema::still_readable(&*schema_store, Ours::THIS).await {
                Err(e @ schema::SchemaError::Newer { .. }) => return e,
                Err(e) => tracing::debug!(error = %e, "schema re-check failed; trying again"),
                Ok(()) => {}
            }
        }
    };
    let mut result = Ok(());
    tokio::select! {
        () = shutdown => {}
        e = outgrown => {
            tracing::error!(error = %e, "stopping");
            result = Err(DaemonError::Schema(e));
        }
    }
    tracing::info!("shutting down: closing connections");
    endpoint.close(0u32.into(), b"sec-em shutting down");
    if tokio::time::timeout(DRAIN, endpoint.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN:?}; exiting anyway");
    }
    server.abort();
    result
}
