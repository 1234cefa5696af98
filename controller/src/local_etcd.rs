//! A throw-away etcd cluster on loopback, for tests and the load benchmark: one or more
//! members of the installed `etcd` (Debian's `etcd-server` 3.4), each on free ports with a
//! temporary data directory, killed (SIGKILL, by PID) and removed on drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::store::Store;
use crate::store::etcd::EtcdStore;

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
    /// The cluster did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
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

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalEtcd {
    /// Starts a cluster of `members` (1 or more) and waits up to 30 s until it answers.
    pub async fn start(members: usize) -> Result<LocalEtcd, LocalEtcdError> {
        let bin = binary().ok_or(LocalEtcdError::NotInstalled)?;
        let dir = tempfile::tempdir().map_err(LocalEtcdError::Dir)?;
        let tag = format!("asmn{}", std::process::id());
        let mut list = Vec::new();
        for i in 0..members.max(1) {
            list.push(Member {
                name: format!("{tag}-{i}-{}", rand::random::<u32>()),
                client: free_port().map_err(LocalEtcdError::Spawn)?,
                peer: free_port().map_err(LocalEtcdError::Spawn)?,
                child: None,
            });
        }
        let mut cluster = LocalEtcd {
            bin,
            dir,
            token: tag,
            members: list,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i)?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), LocalEtcdError> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let data: &Path = self.dir.path();
        let child = Command::new(&self.bin)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(data.join(&m.name))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(&self.token)
            // Loopback between members: heartbeats every 50 ms and an election timeout of
            // 500 ms (etcd's defaults, 100 ms and 1 s, suit a LAN); a leader lost is
            // replaced in about a second even on a loaded 2-core machine.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(LocalEtcdError::Spawn)?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// For tests: a cluster of `members`, or `None` when etcd is not installed, which is
    /// allowed outside CI only (under `CI` it panics, so a missing etcd fails loudly).
    pub async fn for_tests(members: usize) -> Option<LocalEtcd> {
        match LocalEtcd::start(members).await {
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
            if let Ok(s) = EtcdStore::connect(&self.url()).await
                && s.put("/asmn/v1/probe", b"1".to_vec()).await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LocalEtcdError::Timeout(limit));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `etcd://127.0.0.1:PORT[,...]`: every member's client address.
    pub fn url(&self) -> String {
        let addrs: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        format!("etcd://{}", addrs.join(","))
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
            let Ok(mut c) = tokio::time::timeout(
                Duration::from_secs(2),
                etcd_client::Client::connect([format!("http://127.0.0.1:{}", m.client)], None),
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
