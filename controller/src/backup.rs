//! Backups of the embedded store, as files: `sec-em backup` writes one (through the
//! serving Sec-EM, which takes it in one read transaction, or from the file when Sec-EM
//! is stopped) and `sec-em restore` puts one back into a new store file.
//!
//! The format is JSON lines: a header (`format`, `version`, the store's revision and
//! schema, the number of entries), one line per entry (`k`, and `v` in base64), and a
//! last line with the SHA-256 of every byte before it and its HMAC under the audit key
//! (`audit.key`, which the store never holds): a file that is cut, changed (its hash
//! recomputed or not) or not a backup is refused before anything is written. (etcd stores are backed up with
//! `etcdctl snapshot save`: see docs/deploy.md.)

use std::io::{BufRead, Write};
use std::path::Path;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::audit::AuditKey;
use crate::store::embedded::Snapshot;

/// The header's `format`.
pub const FORMAT: &str = "asmn-sec-em-backup";

/// Longest line read (a key and a base64 value of the store's limits, with room).
const MAX_LINE: usize = 4 << 20;

/// Why a backup could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// I/O on the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a backup, or a damaged one.
    #[error("{path}: not a usable backup: {reason}")]
    Bad {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a backup holds, as its header says.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    /// [`FORMAT`].
    pub format: String,
    /// The format's version (1).
    pub version: u32,
    /// The store's revision when it was taken.
    pub revision: u64,
    /// The store's schema version (`meta/schema`), if marked.
    pub schema: Option<u32>,
    /// Entries.
    pub entries: u64,
    /// When it was taken (Unix seconds).
    pub taken_at: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    k: String,
    v: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Trailer {
    sha256: String,
    mac: String,
}

/// The largest revision a backup may carry: a store's revision counts writes, and one
/// near the end of u64 would overflow the next write.
pub const MAX_REVISION: u64 = 1 << 53;

fn schema_of(snap: &Snapshot) -> Option<u32> {
    snap.entries
        .iter()
        .find(|(k, _)| k == crate::store::schema::KEY)
        .and_then(|(_, v)| serde_json::from_slice::<crate::store::schema::Marker>(v).ok())
        .map(|m| m.version)
}

/// Writes `snap` to `path` (mode 0600: the store holds instance secrets), through a
/// temporary file renamed into place, so a crash never leaves half a backup under the
/// name. Returns its header and the file's SHA-256 (hex).
pub fn write(
    path: &Path,
    snap: &Snapshot,
    key: &AuditKey,
) -> Result<(Header, String), BackupError> {
    let io = |source| BackupError::Io {
        path: path.display().to_string(),
        source,
    };
    let header = Header {
        format: FORMAT.into(),
        version: 1,
        revision: snap.revision,
        schema: schema_of(snap),
        entries: snap.entries.len() as u64,
        taken_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let mut body = Vec::new();
    fn line(out: &mut Vec<u8>, v: &impl serde::Serialize) {
        out.extend_from_slice(serde_json::to_string(v).unwrap_or_default().as_bytes());
        out.push(b'\n');
    }
    line(&mut body, &header);
    let b64 = base64::engine::general_purpose::STANDARD;
    for (k, v) in &snap.entries {
        line(
            &mut body,
            &Entry {
                k: k.clone(),
                v: b64.encode(v),
            },
        );
    }
    let sha = hex::encode(Sha256::digest(&body));
    line(
        &mut body,
        &Trailer {
            mac: key.backup_mac(&sha),
            sha256: sha.clone(),
        },
    );
    let tmp = path.with_extension("partial");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok((header, hex::encode(Sha256::digest(&body))))
}

/// Reads and checks the backup at `path`: its format, every entry, and the checksum
/// over all of it.
pub fn read(path: &Path, key: &AuditKey) -> Result<(Header, Snapshot), BackupError> {
    let name = path.display().to_string();
    let bad = |reason: String| BackupError::Bad {
        path: name.clone(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|source| BackupError::Io {
        path: name.clone(),
        source,
    })?;
    let mut reader = std::io::BufReader::new(f);
    let mut hasher = Sha256::new();
    let mut next_line = |what: &str| -> Result<Option<Vec<u8>>, BackupError> {
        let mut buf = Vec::new();
        let n = std::io::Read::take(&mut reader, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| BackupError::Io {
                path: name.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        if n > MAX_LINE || buf.last() != Some(&b'\n') {
            return Err(bad(format!("{what}: a line is cut or too long")));
        }
        Ok(Some(buf))
    };
    let first = next_line("header")?.ok_or_else(|| bad("the file is empty".into()))?;
    hasher.update(&first);
    let header: Header = serde_json::from_slice(&first)
        .map_err(|e| bad(format!("the first line is not a backup header: {e}")))?;
    if header.format != FORMAT || header.version != 1 {
        return Err(bad(format!(
            "format {:?} version {}; this sec-em reads {FORMAT:?} version 1",
            header.format, header.version
        )));
    }
    if header.revision > MAX_REVISION {
        return Err(bad(format!(
            "revision {} is beyond any store's ({MAX_REVISION} at most)",
            header.revision
        )));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut entries = Vec::new();
    for i in 0..header.entries {
        let line = next_line("entry")?
            .ok_or_else(|| bad(format!("cut after {i} of {} entries", header.entries)))?;
        hasher.update(&line);
        let e: Entry = serde_json::from_slice(&line).map_err(|e| bad(format!("entry {i}: {e}")))?;
        let v = b64
            .decode(e.v.as_bytes())
            .map_err(|e| bad(format!("entry {i}: {e}")))?;
        entries.push((e.k, v));
    }
    let last = next_line("checksum")?.ok_or_else(|| bad("no checksum line: cut".into()))?;
    let trailer: Trailer = serde_json::from_slice(&last)
        .map_err(|e| bad(format!("the last line is not the checksum: {e}")))?;
    let sum = hex::encode(hasher.finalize());
    if trailer.sha256 != sum {
        return Err(bad(format!(
            "checksum mismatch (the file says {}, its content is {sum}): it was changed",
            trailer.sha256
        )));
    }
    if !key.verifies_backup(&sum, &trailer.mac) {
        return Err(bad(
            "its MAC does not verify under this Sec-EM's audit key: it was changed (the \
             checksum recomputed), or it comes from another deployment"
                .into(),
        ));
    }
    if next_line("end")?.is_some() {
        return Err(bad("lines after the checksum".into()));
    }
    Ok((
        header.clone(),
        Snapshot {
            revision: header.revision,
            entries,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_reads_back_and_any_change_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("b.asmnbak");
        let snap = Snapshot {
            revision: 42,
            entries: vec![
                ("a/1".into(), b"one".to_vec()),
                ("b/2".into(), vec![0, 255, 7]),
            ],
        };
        let key = AuditKey::new([9; 32]);
        let (h, _) = write(&p, &snap, &key).expect("write");
        assert_eq!(h.entries, 2);
        assert_eq!(read(&p, &key).expect("read").1, snap);
        // Another deployment's key: refused.
        assert!(matches!(
            read(&p, &AuditKey::new([8; 32])),
            Err(BackupError::Bad { .. })
        ));
        let text = std::fs::read_to_string(&p).expect("text");
        for broken in [
            text.replace("\"a/1\"", "\"a/9\""),
            text.lines().take(2).collect::<Vec<_>>().join("\n") + "\n",
            text[..text.len() - 5].to_string(),
            String::new(),
            "hello\n".into(),
            text.clone() + "more\n",
        ] {
            std::fs::write(&p, &broken).expect("write");
            assert!(
                matches!(read(&p, &key), Err(BackupError::Bad { .. })),
                "{broken:?}"
            );
        }
        // An entry changed and the checksum recomputed: the MAC still refuses it.
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines[1] = lines[1].replace("\"a/1\"", "\"a/9\"");
        let body: String = lines[..lines.len() - 1]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        let sum = hex::encode(Sha256::digest(body.as_bytes()));
        let old: Trailer = serde_json::from_str(lines.last().expect("trailer")).expect("json");
        let forged = format!(
            "{body}{}\n",
            serde_json::to_string(&Trailer {
                sha256: sum,
                mac: old.mac
            })
            .expect("json")
        );
        std::fs::write(&p, forged).expect("write");
        let e = read(&p, &key).expect_err("a forged backup");
        assert!(e.to_string().contains("MAC"), "{e}");
        // A revision that would overflow the store's counter.
        let huge = Snapshot {
            revision: u64::MAX,
            entries: Vec::new(),
        };
        write(&p, &huge, &key).expect("write");
        assert!(matches!(read(&p, &key), Err(BackupError::Bad { .. })));
    }
}
