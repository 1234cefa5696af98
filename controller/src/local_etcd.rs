//! A throw-away etcd cluster on loopback, for tests and the load benchmark: one or more
//! members of the installed `etcd` (Debian's `etcd-server` 3.4), each on free ports with a
//! temporary data directory, killed (SIGKILL, by PID) and removed on drop. With
//! [`LocalEtcd::start_tls`] the members speak TLS to clients and to each other and require
//! client certificates (`--client-cert-auth`, `--peer-client-cert-auth`), from a CA made
//! for the cluster.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::store::Store;
use crate::store::etcd::{EtcdOptions, EtcdStore, EtcdTls};

/// Why a local cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalEtcdError {
    /// No `etcd` on the PATH.
    #[error("etcd is not installed (apt-get install etcd-server)")]
    NotInstalled,
    /// A member could not be started.
    #[error("starting etcd: {0}")]
    Spawn(std::io::Error),
    /// The temporary directory could not be made.
    #[error("etcd data directory: {0}")]
    Dir(std::io::Error),
    /// The cluster did not answer in time; what its members logged last.
    #[error("etcd did not answer within {limit:?}; its members' last log lines:\n{logs}")]
    Timeout {
        /// How long it was given.
        limit: Duration,
        /// The tail of each member's log, and whether it still runs.
        logs: String,
    },
    /// The cluster's certificates could not be made.
    #[error("etcd certificates: {0}")]
    Pki(String),
}

/// The PKI of a TLS cluster: files in its directory, and the client's PEM texts.
struct LocalTls {
    ca: PathBuf,
    member_cert: PathBuf,
    member_key: PathBuf,
    client: EtcdTls,
    /// A client certificate from another CA (for tests that must be refused).
    foreign: EtcdTls,
}

/// The files of a cluster PKI written by [`write_cluster_pki`].
#[derive(Clone, Debug)]
pub struct ClusterPki {
    /// The cluster CA (`--trusted-ca-file`, and `[etcd] ca` of Sec-EM).
    pub ca: PathBuf,
    /// The members' certificate (server and peer), valid for every host given.
    pub member_cert: PathBuf,
    /// Its key.
    pub member_key: PathBuf,
    /// Sec-EM's client certificate (`[etcd] cert`).
    pub client_cert: PathBuf,
    /// Its key (`[etcd] key`).
    pub client_key: PathBuf,
}

/// Makes a CA for an etcd cluster whose members are reached at `hosts` (addresses or
/// names), a member certificate for all of them and a client certificate, as files in
/// `dir` (keys mode 0600).
pub fn write_cluster_pki(dir: &Path, hosts: &[String]) -> Result<ClusterPki, LocalEtcdError> {
    let t = cluster_pki(dir, hosts.to_vec())?;
    let write = |name: &str, text: &str| -> Result<PathBuf, LocalEtcdError> {
        let path = dir.join(name);
        crate::pki::write_file(&path, text.as_bytes(), name.ends_with(".key"))
            .map_err(|e| LocalEtcdError::Pki(e.to_string()))?;
        Ok(path)
    };
    Ok(ClusterPki {
        client_cert: write("etcd-client.pem", &t.client.cert_pem)?,
        client_key: write("etcd-client.key", &t.client.key_pem)?,
        ca: t.ca,
        member_cert: t.member_cert,
        member_key: t.member_key,
    })
}

fn cluster_pki(dir: &Path, hosts: Vec<String>) -> Result<LocalTls, LocalEtcdError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let e = |e: rcgen::Error| LocalEtcdError::Pki(e.to_string());
    let ca = |name: &str| -> Result<(CertificateParams, KeyPair, String), LocalEtcdError> {
        let key = KeyPair::generate().map_err(e)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let pem = p.self_signed(&key).map_err(e)?.pem();
        Ok((p, key, pem))
    };
    let leaf = |issuer: &Issuer<'_, &KeyPair>,
                names: Vec<String>,
                cn: &str,
                usages: Vec<ExtendedKeyUsagePurpose>|
     -> Result<(String, String), LocalEtcdError> {
        let key = KeyPair::generate().map_err(e)?;
        let mut p = CertificateParams::new(names).map_err(e)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = usages;
        Ok((
            p.signed_by(&key, issuer).map_err(e)?.pem(),
            key.serialize_pem(),
        ))
    };
    let (ca_params, ca_key, ca_pem) = ca("asmn test etcd CA")?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let both = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let (member_pem, member_key) = leaf(&issuer, hosts, "etcd-member", both)?;
    let (client_pem, client_key) = leaf(
        &issuer,
        Vec::new(),
        "sec-em",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    let (other_params, other_key, _) = ca("a foreign CA")?;
    let other = Issuer::from_params(&other_params, &other_key);
    let (foreign_pem, foreign_key) = leaf(
        &other,
        Vec::new(),
        "sec-em",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    let write = |name: &str, text: &str| -> Result<PathBuf, LocalEtcdError> {
        let path = dir.join(name);
        crate::pki::write_file(&path, text.as_bytes(), name.ends_with(".key"))
            .map_err(|e| LocalEtcdError::Pki(e.to_string()))?;
        Ok(path)
    };
    Ok(LocalTls {
        ca: write("etcd-ca.pem", &ca_pem)?,
        member_cert: write("etcd-member.pem", &member_pem)?,
        member_key: write("etcd-member.key", &member_key)?,
        client: EtcdTls {
            ca_pem: ca_pem.clone(),
            cert_pem: client_pem,
            key_pem: client_key,
        },
        foreign: EtcdTls {
            ca_pem,
            cert_pem: foreign_pem,
            key_pem: foreign_key,
        },
    })
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A local etcd cluster.
pub struct LocalEtcd {
    bin: PathBuf,
    dir: tempfile::TempDir,
    token: String,
    members: Vec<Member>,
    tls: Option<LocalTls>,
}

impl std::fmt::Debug for LocalEtcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalEtcd({})", self.url())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// The `etcd` binary on the PATH.
pub fn binary() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    })
}

/// Ports for members are drawn below Linux's ephemeral range (32768 and up by default):
/// a port from `bind(0)` is free only until the listener closes, and before the member
/// binds it any outgoing connection (another member's, a client's) may take it as its
/// source port, which left a member unable to listen and the cluster without quorum.
const MEMBER_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port in [`MEMBER_PORTS`] that is free now and not among `taken`.
fn free_port(taken: &[u16]) -> std::io::Result<u16> {
    for _ in 0..200 {
        let port = rand::random_range(MEMBER_PORTS);
        if !taken.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        format!("no free loopback port in {MEMBER_PORTS:?} after 200 tries"),
    ))
}

impl LocalEtcd {
    /// Starts a plaintext cluster of `members` (1 or more) and waits up to 30 s until it
    /// answers.
    pub async fn start(members: usize) -> Result<LocalEtcd, LocalEtcdError> {
        Self::start_with(members, false).await
    }

    /// Starts a cluster of `members` that speaks TLS and requires client certificates.
    pub async fn start_tls(members: usize) -> Result<LocalEtcd, LocalEtcdError> {
        Self::start_with(members, true).await
    }

    async fn start_with(members: usize, tls: bool) -> Result<LocalEtcd, LocalEtcdError> {
        let bin = binary().ok_or(LocalEtcdError::NotInstalled)?;
        let dir = tempfile::tempdir().map_err(LocalEtcdError::Dir)?;
        let tls = if tls {
            Some(cluster_pki(
                dir.path(),
                vec!["127.0.0.1".into(), "localhost".into()],
            )?)
        } else {
            None
        };
        let tag = format!("asmn{}", std::process::id());
        let mut list = Vec::new();
        let mut taken = Vec::new();
        for i in 0..members.max(1) {
            let client = free_port(&taken).map_err(LocalEtcdError::Spawn)?;
            taken.push(client);
            let peer = free_port(&taken).map_err(LocalEtcdError::Spawn)?;
            taken.push(peer);
            list.push(Member {
                name: format!("{tag}-{i}-{}", rand::random::<u32>()),
                client,
                peer,
                child: None,
            });
        }
        let mut cluster = LocalEtcd {
            bin,
            dir,
            token: tag,
            members: list,
            tls,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn spawn(&mut self, i: usize) -> Result<(), LocalEtcdError> {
        let scheme = self.scheme();
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={scheme}://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let data: &Path = self.dir.path();
        // Each start appends to the member's log, read back when the cluster fails to
        // answer.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.join(format!("{}.log", m.name)))
            .map_err(LocalEtcdError::Spawn)?;
        let mut command = Command::new(&self.bin);
        if let Some(t) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&t.member_cert)
                .arg("--key-file")
                .arg(&t.member_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth")
                .arg("--peer-cert-file")
                .arg(&t.member_cert)
                .arg("--peer-key-file")
                .arg(&t.member_key)
                .arg("--peer-trusted-ca-file")
                .arg(&t.ca)
                .arg("--peer-client-cert-auth");
        }
        let child = command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(data.join(&m.name))
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(&self.token)
            // Loopback between members: heartbeats every 50 ms and an election timeout of
            // 500 ms (etcd's defaults, 100 ms and 1 s, suit a LAN); a leader lost is
            // replaced in about a second even on a loaded 2-core machine.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(LocalEtcdError::Spawn)?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// For tests: a cluster of `members`, or `None` when etcd is not installed, which is
    /// allowed outside CI only (under `CI` it panics, so a missing etcd fails loudly).
    pub async fn for_tests(members: usize) -> Option<LocalEtcd> {
        Self::for_tests_with(members, false).await
    }

    /// [`LocalEtcd::for_tests`] with TLS and client certificates.
    pub async fn for_tests_tls(members: usize) -> Option<LocalEtcd> {
        Self::for_tests_with(members, true).await
    }

    async fn for_tests_with(members: usize, tls: bool) -> Option<LocalEtcd> {
        match LocalEtcd::start_with(members, tls).await {
            Ok(c) => Some(c),
            Err(LocalEtcdError::NotInstalled) => {
                assert!(
                    std::env::var("CI").is_err(),
                    "etcd is required under CI (apt-get install etcd-server)"
                );
                asmn_shared::skip::note("etcd is not installed (apt-get install etcd-server)");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Waits until a write through the cluster's URL succeeds.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), LocalEtcdError> {
        let deadline = Instant::now() + limit;
        loop {
            // Each try is bounded by the deadline: a port that accepts but never answers
            // must not hold the wait past it.
            let attempt = async {
                let s = EtcdStore::connect_with(&self.url(), &self.options()).await?;
                s.put("/asmn/v1/probe", b"1".to_vec()).await
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if let Ok(Ok(_)) = tokio::time::timeout(left, attempt).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalEtcdError::Timeout {
                    limit,
                    logs: self.log_tails(8),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of each member's log, headed by its name, ports and whether
    /// it still runs.
    fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for m in &self.members {
            let running = match &m.child {
                None => "stopped".to_string(),
                Some(c) => format!("pid {}", c.id()),
            };
            out.push_str(&format!(
                "-- {} (client {}, peer {}, {running})\n",
                m.name, m.client, m.peer
            ));
            let text = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                .unwrap_or_else(|e| format!("(no log: {e})"));
            let all: Vec<&str> = text.lines().collect();
            for line in &all[all.len().saturating_sub(lines)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// `etcd://127.0.0.1:PORT[,...]` (`etcds://` with TLS): every member's client
    /// address.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}", addrs.join(","))
    }

    /// How a client connects: with the cluster's CA and a client certificate under TLS.
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            tls: self.tls.as_ref().map(|t| t.client.clone()),
            user: None,
        }
    }

    /// Options with a client certificate from another CA (under TLS), which etcd must
    /// refuse; without a certificate at all when `none`.
    pub fn bad_options(&self, none: bool) -> Option<EtcdOptions> {
        let t = self.tls.as_ref()?;
        let mut tls = t.foreign.clone();
        if none {
            tls = EtcdTls {
                ca_pem: t.client.ca_pem.clone(),
                cert_pem: String::new(),
                key_pem: String::new(),
            };
        }
        Some(EtcdOptions {
            tls: Some(tls),
            user: None,
        })
    }

    /// `sec-em.toml` text (as `config::initial` writes it) with its store replaced by this
    /// cluster, and the `[etcd]` section it needs (client files written beside the
    /// cluster's data).
    pub fn configure(&self, text: &str) -> Result<String, LocalEtcdError> {
        let mut out = text.replace(
            "store = \"embedded:sec-em.redb\"",
            &format!("store = \"{}\"", self.url()),
        );
        out = out.replace(
            "store = \"embedded:state.redb\"",
            &format!("store = \"{}\"", self.url()),
        );
        match &self.tls {
            None => out.push_str("\n[etcd]\nallow_plaintext = true\n"),
            Some(t) => {
                let dir = self.dir.path();
                let write = |name: &str, text: &str| -> Result<PathBuf, LocalEtcdError> {
                    let path = dir.join(name);
                    crate::pki::write_file(&path, text.as_bytes(), name.ends_with(".key"))
                        .map_err(|e| LocalEtcdError::Pki(e.to_string()))?;
                    Ok(path)
                };
                let cert = write("sec-em-client.pem", &t.client.cert_pem)?;
                let key = write("sec-em-client.key", &t.client.key_pem)?;
                out.push_str(&format!(
                    "\n[etcd]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                    t.ca.display().to_string(),
                    cert.display().to_string(),
                    key.display().to_string()
                ));
            }
        }
        Ok(out)
    }

    /// Members in the cluster.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member (never: `start` makes at least one).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The OS process ID of member `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.child.as_ref().map(Child::id)
    }

    /// Kills member `i` (SIGKILL, by PID) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members.get_mut(i).and_then(|m| m.child.take()) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its ports and data.
    pub fn restart(&mut self, i: usize) -> Result<(), LocalEtcdError> {
        self.kill(i);
        self.spawn(i)
    }

    /// The index of the member that is leader now, asked of each running member.
    pub async fn leader(&self) -> Option<usize> {
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let mut options = etcd_client::ConnectOptions::new();
            if let Some(t) = &self.tls {
                options = options.with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(&t.client.ca_pem))
                        .identity(etcd_client::Identity::from_pem(
                            &t.client.cert_pem,
                            &t.client.key_pem,
                        )),
                );
            }
            let Ok(mut c) = tokio::time::timeout(
                Duration::from_secs(2),
                etcd_client::Client::connect(
                    [format!("{}://127.0.0.1:{}", self.scheme(), m.client)],
                    Some(options),
                ),
            )
            .await
            else {
                continue;
            };
            let Ok(c) = c.as_mut() else { continue };
            let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await
            else {
                continue;
            };
            let leader = status.leader();
            let Ok(Ok(members)) =
                tokio::time::timeout(Duration::from_secs(2), c.member_list()).await
            else {
                continue;
            };
            let name = members
                .members()
                .iter()
                .find(|x| x.id() == leader)
                .map(|x| x.name().to_string())?;
            return self.members.iter().position(|m| m.name == name);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_member_that_cannot_listen_is_shown_with_its_log_when_the_wait_ends() {
        let Some(bin) = binary() else {
            assert!(std::env::var("CI").is_err(), "etcd is required under CI");
            asmn_shared::skip::note("etcd is not installed (apt-get install etcd-server)");
            return;
        };
        // Another listener holds the member's client port, so etcd cannot start.
        let blocker = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = blocker.local_addr().expect("addr").port();
        let peer = free_port(&[client]).expect("port");
        let mut cluster = LocalEtcd {
            bin,
            dir: tempfile::tempdir().expect("tmp"),
            token: "asmn-blocked".into(),
            members: vec![Member {
                name: format!("asmn-blocked-{}", std::process::id()),
                client,
                peer,
                child: None,
            }],
            tls: None,
        };
        cluster.spawn(0).expect("spawn");
        let started = Instant::now();
        let err = cluster
            .wait_ready(Duration::from_secs(3))
            .await
            .expect_err("a member that cannot listen never answers");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the wait outlived its limit: {:?}",
            started.elapsed()
        );
        let text = err.to_string();
        assert!(text.contains(&format!("client {client}")), "{text}");
        assert!(text.contains("address already in use"), "{text}");
    }

    #[test]
    fn member_ports_are_drawn_below_the_ephemeral_range_and_never_twice() {
        let mut taken = Vec::new();
        for _ in 0..20 {
            let p = free_port(&taken).expect("port");
            assert!(MEMBER_PORTS.contains(&p), "{p}");
            assert!(!taken.contains(&p), "{p} twice");
            taken.push(p);
        }
    }
}
