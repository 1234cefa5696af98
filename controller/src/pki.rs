//! The controller's PKI, made by `sec-em init`: a CA, the server certificate agents and
//! operators verify (pinned through the bootstrap bundle), and the admin client
//! certificate `asmnctl` presents. ECDSA P-256 keys, generated with ring.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};

/// Why the PKI could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file exists and `--force` was not given.
    #[error(
        "{0} already exists; pass --force to replace the controller's keys (agents pinning the old CA will be refused)"
    )]
    Exists(PathBuf),
    /// Writing failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// PEM certificates and keys.
pub struct Pki {
    /// The CA certificate.
    pub ca_cert: String,
    /// The CA key (secret).
    pub ca_key: String,
    /// The server certificate.
    pub server_cert: String,
    /// The server key (secret).
    pub server_key: String,
    /// The admin client certificate.
    pub admin_cert: String,
    /// The admin client key (secret).
    pub admin_key: String,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pki(<certificates and redacted keys>)")
    }
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ASMN");
    dn.push(DnType::CommonName, cn);
    dn
}

/// Makes a CA, a server certificate for `server_names` and an admin client certificate,
/// valid from January 1 of `year` for 20 (CA) and 10 (leaves) years.
pub fn generate(server_names: &[String], year: i32) -> Result<Pki, PkiError> {
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = named("ASMN Sec-EM CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = date_time_ymd(year, 1, 1);
    ca.not_after = date_time_ymd(year + 20, 1, 1);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(server_names.to_vec())?;
    server.distinguished_name = named(server_names.first().map_or("sec-em", |s| s.as_str()));
    server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = date_time_ymd(year, 1, 1);
    server.not_after = date_time_ymd(year + 10, 1, 1);
    let server_cert = server.signed_by(&server_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name = named("asmn-admin");
    admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    admin.not_before = date_time_ymd(year, 1, 1);
    admin.not_after = date_time_ymd(year + 10, 1, 1);
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    Ok(Pki {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
    })
}

/// The files `sec-em init` writes, relative to its directory.
pub const FILES: [(&str, bool); 6] = [
    ("ca.pem", false),
    ("ca.key", true),
    ("server.pem", false),
    ("server.key", true),
    ("admin.pem", false),
    ("admin.key", true),
];

/// Writes the PKI into `dir` (keys with mode 0600), the CA key into `ca_dir` (an offline
/// directory: `sec-em serve` never reads it), refusing to replace existing files unless
/// `force`.
pub fn write(dir: &Path, ca_dir: &Path, pki: &Pki, force: bool) -> Result<(), PkiError> {
    for d in [dir, ca_dir] {
        fs::create_dir_all(d).map_err(|source| PkiError::Io {
            path: d.to_path_buf(),
            source,
        })?;
    }
    let place = |name: &str| {
        if name == "ca.key" {
            ca_dir.join(name)
        } else {
            dir.join(name)
        }
    };
    if !force && let Some(existing) = FILES.iter().map(|(f, _)| place(f)).find(|p| p.exists()) {
        return Err(PkiError::Exists(existing));
    }
    let contents = [
        &pki.ca_cert,
        &pki.ca_key,
        &pki.server_cert,
        &pki.server_key,
        &pki.admin_cert,
        &pki.admin_key,
    ];
    for ((name, secret), text) in FILES.iter().zip(contents) {
        write_file(&place(name), text.as_bytes(), *secret)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` (mode 0600 when `secret`, 0644 otherwise), replacing it.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Remove first: an existing file keeps its mode when truncated.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The serial number of a DER certificate, as lower-case hex without leading zeros (what
/// `asmnctl admin revoke` takes), if it parses.
pub fn serial_of(cert: &[u8]) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    crate::registry::normalize_serial(&hex::encode(parsed.raw_serial()))
}

/// The serial of the first certificate of a PEM text.
pub fn serial_of_pem(pem: &str) -> Option<String> {
    let der = asmn_channel::tls::certs(pem).ok()?.into_iter().next()?;
    serial_of(&der)
}

/// Issues another admin client certificate named `name`, signed by the CA (PEM
/// certificate and key, as `sec-em init` wrote them), valid from January 1 of `year` for
/// 10 years. Returns the certificate, its key and its serial.
pub fn issue_admin(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    name: &str,
    year: i32,
) -> Result<(String, String, String), PkiError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = named(name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = date_time_ymd(year, 1, 1);
    params.not_after = date_time_ymd(year + 10, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    let serial = serial_of(cert.der()).unwrap_or_default();
    Ok((cert.pem(), key.serialize_pem(), serial))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn init_writes_keys_0600_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tmp");
        let pki = generate(&["sec-em".into(), "127.0.0.1".into()], 2026).expect("pki");
        assert!(
            pki.ca_cert.contains("BEGIN CERTIFICATE") && pki.server_key.contains("PRIVATE KEY")
        );
        write(dir.path(), dir.path(), &pki, false).expect("write");
        for (name, secret) in FILES {
            let mode = fs::metadata(dir.path().join(name))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, if secret { 0o600 } else { 0o644 }, "{name}");
        }
        let again = generate(&["sec-em".into()], 2026).expect("pki");
        assert!(matches!(
            write(dir.path(), dir.path(), &again, false),
            Err(PkiError::Exists(_))
        ));
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.pem")).expect("ca"),
            pki.ca_cert
        );
        write(dir.path(), dir.path(), &again, true).expect("force");
        assert_eq!(
            fs::read_to_string(dir.path().join("ca.pem")).expect("ca"),
            again.ca_cert
        );
        assert!(!format!("{again:?}").contains("PRIVATE"));
    }

    #[test]
    fn the_ca_key_can_live_offline_and_issue_admins_there() {
        let online = tempfile::tempdir().expect("tmp");
        let offline = tempfile::tempdir().expect("tmp");
        let pki = generate(&["sec-em".into()], 2026).expect("pki");
        write(online.path(), offline.path(), &pki, false).expect("write");
        assert!(!online.path().join("ca.key").exists());
        assert!(offline.path().join("ca.key").exists());
        assert!(online.path().join("server.key").exists());
        let ca_key = fs::read_to_string(offline.path().join("ca.key")).expect("key");
        let (cert, key, serial) = issue_admin(&pki.ca_cert, &ca_key, "ops-2", 2026).expect("issue");
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        assert_eq!(serial_of_pem(&cert), Some(serial.clone()));
        assert_ne!(serial_of_pem(&pki.admin_cert), Some(serial));
    }
}
