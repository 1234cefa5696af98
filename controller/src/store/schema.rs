//! The store's schema version, checked (and an older store migrated) before Sec-EM serves.
//!
//! The key `meta/schema` holds `{"version": V, "compatible_down_to": C, "written_by": ...}`:
//! the layout the store is in (V) and the oldest Sec-EM schema that can still serve it (C).
//! A Sec-EM whose schema is S:
//! - on a store without the key: writes the marker when the store is empty; otherwise the
//!   store is of version 1 (written before versions were recorded) and is migrated;
//! - on V < S: runs the migrations from V up to S, then writes the marker;
//! - on V > S: serves if C <= S (a newer replica's change that older ones can still read:
//!   a rolling upgrade, two adjacent versions on one etcd), and refuses with a clear error
//!   otherwise;
//! - while serving, re-reads the marker every few seconds and stops when a newer replica
//!   made the store unreadable for it.
//!
//! A migration that older replicas cannot read sets C to its new version: it ships in a
//! release after one whose replicas all run the previous version (upgrade one step at a
//! time, as the deployment guide says).

use serde::{Deserialize, Serialize};

use super::{Cas, Expect, Store, StoreError};

/// The key of the marker.
pub const KEY: &str = "meta/schema";

/// The schema this build writes.
pub const CURRENT: u32 = 3;

/// The oldest schema that can read stores this build writes. Schema 2 replicas can still
/// serve a schema 3 store during a rolling upgrade: they do not list the gateways they
/// enroll in the gateway index, and a schema 3 replica that misses one there finds it by
/// listing the instances (and lists it). Meanwhile, with two gateway instances of one VNF
/// enrolled by replicas of different schemas, replicas may pick different ones for a pair
/// (its traffic may go through one and come back through the other) until both are
/// listed. The release after this one, when no schema 2 replica is left, may drop that
/// fallback and set this to 3.
pub const COMPATIBLE_DOWN_TO: u32 = 2;

/// The marker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// The layout the store is in.
    pub version: u32,
    /// The oldest schema that can serve it.
    pub compatible_down_to: u32,
    /// Which Sec-EM wrote the marker.
    pub written_by: String,
}

/// A Sec-EM's schema, as [`check`] sees it (tests play other versions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ours {
    /// The schema it writes.
    pub version: u32,
    /// The oldest schema that reads what it writes.
    pub compatible_down_to: u32,
}

impl Ours {
    /// This build's.
    pub const THIS: Ours = Ours {
        version: CURRENT,
        compatible_down_to: COMPATIBLE_DOWN_TO,
    };
}

/// Why the store cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A newer Sec-EM migrated the store beyond what this one reads.
    #[error(
        "the store is at schema version {store} (written by {by}), which needs a Sec-EM of \
         schema {needs} or newer; this sec-em has schema {ours}. Upgrade this sec-em \
         (or restore a backup taken before the upgrade)"
    )]
    Newer {
        /// The store's version.
        store: u32,
        /// The oldest schema that reads it.
        needs: u32,
        /// Ours.
        ours: u32,
        /// Who wrote it.
        by: String,
    },
    /// The marker is not one.
    #[error("the schema marker {KEY} is damaged: {0}")]
    Damaged(String),
    /// No migration from this version.
    #[error("no migration from schema version {0}")]
    NoMigration(u32),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`check`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An empty store, marked with our version.
    Created,
    /// Already at our version.
    Current,
    /// Migrated from this version.
    Migrated(u32),
    /// A newer replica's store that we can read (a rolling upgrade).
    NewerCompatible(u32),
}

fn marker(ours: Ours) -> Marker {
    Marker {
        version: ours.version,
        compatible_down_to: ours.compatible_down_to,
        written_by: format!("sec-em {}", env!("CARGO_PKG_VERSION")),
    }
}

fn encode(m: &Marker) -> Vec<u8> {
    serde_json::to_vec(m).unwrap_or_default()
}

async fn read<S: Store>(store: &S) -> Result<Option<(Marker, u64)>, SchemaError> {
    match store.get(KEY).await? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v.value)
            .map(|m| Some((m, v.revision)))
            .map_err(|e| SchemaError::Damaged(e.to_string())),
    }
}

/// Version 1 to 2: version 1 is the layout of every store written before the marker
/// existed, which version 2 keeps; the step records it.
async fn v1_to_v2<S: Store>(_store: &S) -> Result<(), SchemaError> {
    Ok(())
}

/// Version 2 to 3: the gateway index (`gateways/<tenant>/<vnf>/<id>`), one entry per
/// enrolled gateway instance, so that a peer check finds its gateway without listing
/// every instance. Idempotent (puts of empty values).
async fn v2_to_v3<S: Store>(store: &S) -> Result<(), SchemaError> {
    let listing = store.list(&super::keys::instances_prefix()).await?;
    for (_, v) in &listing.entries {
        let Ok(rec) = serde_json::from_slice::<serde_json::Value>(&v.value) else {
            continue;
        };
        let enrolled_gateway = rec["role"] == "gateway" && rec["state"]["state"] == "enrolled";
        let (Some(id), Some(tenant), Some(vnf)) = (
            rec["id"].as_str(),
            rec["tenant"].as_str(),
            rec["vnf"].as_str(),
        ) else {
            continue;
        };
        if enrolled_gateway {
            store
                .put(
                    &format!("{}gateways/{tenant}/{vnf}/{id}", super::PREFIX),
                    Vec::new(),
                )
                .await?;
        }
    }
    Ok(())
}

async fn migrate_step<S: Store>(store: &S, from: u32) -> Result<(), SchemaError> {
    match from {
        1 => v1_to_v2(store).await,
        2 => v2_to_v3(store).await,
        v => Err(SchemaError::NoMigration(v)),
    }
}

/// Whether `ours` can serve a store marked `m`.
pub fn readable(m: &Marker, ours: Ours) -> Result<(), SchemaError> {
    if m.version > ours.version && m.compatible_down_to > ours.version {
        return Err(SchemaError::Newer {
            store: m.version,
            needs: m.compatible_down_to,
            ours: ours.version,
            by: m.written_by.clone(),
        });
    }
    Ok(())
}

/// Checks the store's schema for a Sec-EM of schema `ours`, migrating an older store.
/// Replicas starting together are safe: the marker is written by compare-and-swap, and
/// migrations are idempotent.
pub async fn check<S: Store>(store: &S, ours: Ours) -> Result<Outcome, SchemaError> {
    for _ in 0..16 {
        let (from, expect) = match read(store).await? {
            Some((m, _)) if m.version == ours.version => return Ok(Outcome::Current),
            Some((m, _)) if m.version > ours.version => {
                readable(&m, ours)?;
                return Ok(Outcome::NewerCompatible(m.version));
            }
            Some((m, rev)) => (m.version, Expect::Revision(rev)),
            None => {
                // Any key at all (etcd refuses an empty start key: begin just above it;
                // every key of the schema starts with a printable character).
                let empty = store.list_page("", "\u{1}", 1).await?.entries.is_empty();
                if empty {
                    match store
                        .compare_and_swap(KEY, Expect::Absent, encode(&marker(ours)))
                        .await?
                    {
                        Cas::Swapped { .. } => return Ok(Outcome::Created),
                        Cas::Conflict { .. } => continue,
                    }
                }
                (1, Expect::Absent)
            }
        };
        for v in from..ours.version {
            migrate_step(store, v).await?;
        }
        match store
            .compare_and_swap(KEY, expect, encode(&marker(ours)))
            .await?
        {
            Cas::Swapped { .. } => {
                tracing::info!(from, to = ours.version, "store migrated");
                return Ok(Outcome::Migrated(from));
            }
            // Another replica wrote the marker meanwhile: look again.
            Cas::Conflict { .. } => continue,
        }
    }
    Err(SchemaError::Damaged(
        "the marker keeps changing under this check".into(),
    ))
}

/// Whether a serving Sec-EM of schema `ours` can still serve the store (a newer replica
/// may have migrated it beyond).
pub async fn still_readable<S: Store>(store: &S, ours: Ours) -> Result<(), SchemaError> {
    match read(store).await? {
        Some((m, _)) => readable(&m, ours),
        None => Ok(()),
    }
}
