//! A real etcd cluster on loopback (Debian's `etcd-server`, fsync on), the commit-rate
//! baseline of the cluster benchmark: the same number of clients putting ~600-byte values
//! through etcd's own gRPC API.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// etcd's API subset (`tests/proto/etcd/kv.proto`).
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

pub struct Etcd {
    children: Vec<Child>,
    /// Client URLs, one per member.
    pub clients: Vec<String>,
    dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts `n` members (`ETCD_BIN`, default `etcd` on the PATH) and waits for a leader.
    pub async fn start(n: usize) -> anyhow::Result<Self> {
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let dir = tempfile::Builder::new().prefix("mxcas-etcd-").tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect();
        let mut children = Vec::new();
        let mut clients = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("e{i}.log")))?;
            let child = Command::new(&bin)
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("e{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", "mxcas-bench"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start {bin} (apt-get install etcd-server): {e}"))?;
            children.push(child);
            clients.push(format!("http://127.0.0.1:{client}"));
        }
        let etcd = Self { children, clients, dir };
        crate::wait_for("an etcd leader", Duration::from_secs(30), || async { etcd.leader().await.ok() })
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", etcd.log()))?;
        Ok(etcd)
    }

    /// A channel to the member that leads.
    pub async fn leader(&self) -> anyhow::Result<tonic::transport::Channel> {
        for url in &self.clients {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?.connect().await?;
            let status = pb::maintenance_client::MaintenanceClient::new(channel.clone())
                .status(pb::StatusRequest {})
                .await?
                .into_inner();
            let me = status.header.map(|h| h.member_id).unwrap_or(0);
            if status.leader != 0 && status.leader == me {
                return Ok(channel);
            }
        }
        anyhow::bail!("no etcd member leads yet")
    }

    pub fn log(&self) -> String {
        (0..self.children.len())
            .map(|i| std::fs::read_to_string(self.dir.path().join(format!("e{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
