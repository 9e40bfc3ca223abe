//! A metadata cluster of real `mxcas meta` processes on loopback.
//!
//! Node `i` listens on 127.0.0.(10+i) (port from the OS) and makes its outgoing raft
//! connections from that address; the address it advertises (to peers and edges) is its
//! [`LinkProxy`], so a test can cut single links. `kill -9`, restart (same data, new port,
//! proxy re-pointed), partitions, and status/digest reads over the nodes' own gRPC APIs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use mxcas_proto::meta as pb;

use std::sync::Arc;

use crate::node::mxcas_bin;
use crate::pki::TestPki;
use crate::proxy::LinkProxy;
use crate::wait_for;

pub struct MetaProc {
    pub id: u64,
    pub ip: Ipv4Addr,
    pub proxy: LinkProxy,
    /// Where the process listens now (changes on restart).
    pub listen: Option<SocketAddr>,
    child: Option<Child>,
    dir: tempfile::TempDir,
    starts: u32,
    /// What this harness connects to the node with (loaded once).
    tls: Option<mxcas_meta::tls::Tls>,
}

/// Raft settings for tests: quick elections, frequent snapshots.
#[derive(Clone)]
pub struct MetaOptions {
    pub snapshot_every: u64,
    /// More `[meta]` settings, as TOML lines.
    pub extra: &'static str,
    /// Mutual TLS on every gRPC link (nodes, admin, and this harness's own calls).
    pub tls: Option<Arc<TestPki>>,
    /// Nodes reach each other at their own addresses, not through this harness's link
    /// proxies (for benchmarks: no partitions or restarts then; the proxies still front each
    /// node for clients).
    pub direct: bool,
}

impl Default for MetaOptions {
    fn default() -> Self {
        Self { snapshot_every: 10_000, extra: "", tls: None, direct: false }
    }
}

impl MetaProc {
    pub async fn start(id: u64, opts: &MetaOptions) -> anyhow::Result<Self> {
        let mut p = Self::prepare(id, opts).await?;
        p.spawn().await?;
        Ok(p)
    }

    /// Writes the node's config and starts its proxy, without starting the node.
    pub async fn prepare(id: u64, opts: &MetaOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix(&format!("mxcas-meta{id}-")).tempdir()?;
        let ip = Ipv4Addr::new(127, 0, 0, 10 + id as u8);
        let proxy = LinkProxy::start().await?;
        // Direct: advertised as the address it listens on.
        let advertise = if opts.direct { String::new() } else { format!("advertise = \"{}\"\n", proxy.addr) };
        let config = format!(
            "data_dir = \"{}\"\n[meta]\nnode_id = {id}\nlisten = \"{ip}:0\"\n{advertise}bind_outgoing = \"{ip}\"\nsnapshot_every = {}\n{}\n",
            dir.path().join("data").display(),
            opts.snapshot_every,
            opts.extra,
        );
        let config = match &opts.tls {
            Some(pki) => format!("{config}{}", pki.toml()),
            None => config,
        };
        std::fs::write(dir.path().join("meta.toml"), config)?;
        let tls = opts.tls.as_ref().map(|pki| pki.tls()).transpose()?;
        Ok(MetaProc { id, ip, proxy, listen: None, child: None, dir, starts: 0, tls })
    }

    fn log_path(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("meta.{n}.log"))
    }

    pub async fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path(self.starts))?;
        let child = Command::new(mxcas_bin())
            .arg("meta")
            .arg("--config")
            .arg(self.dir.path().join("meta.toml"))
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start mxcas meta")?;
        self.child = Some(child);
        let path = self.log_path(self.starts);
        let prefix = format!("mxcas: metadata node {} on ", self.id);
        let line = wait_for("the metadata node to listen", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let prefix = prefix.clone();
            async move { text.lines().find_map(|l| l.strip_prefix(&prefix).map(str::to_owned)) }
        })
        .await
        .with_context(|| self.log())?;
        let addr: SocketAddr = line.split_whitespace().next().context("no address")?.parse()?;
        self.proxy.set_target(addr);
        self.listen = Some(addr);
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.listen = None;
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Process ID, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The node's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|i| {
                format!(
                    "--- meta {} start {i} ---\n{}",
                    self.id,
                    std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
                )
            })
            .collect()
    }

    /// A connection to the node's own address (not through its proxy), over TLS if on.
    pub async fn channel(&self) -> anyhow::Result<tonic::transport::Channel> {
        let addr = self.listen.context("node is down")?.to_string();
        let endpoint = mxcas_meta::tls::endpoint(&addr, self.tls.as_ref()).map_err(anyhow::Error::msg)?;
        Ok(endpoint.connect_timeout(Duration::from_secs(5)).connect().await?)
    }

    /// The config file the node runs with (for `mxcas admin --config`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("meta.toml")
    }

    /// Raft's view from this node (leader, term, indexes, members).
    pub async fn cluster_status(&self) -> anyhow::Result<pb::ClusterStatus> {
        let mut c = pb::cluster_client::ClusterClient::new(self.channel().await?);
        Ok(c.status(pb::ClusterStatusRequest {}).await?.into_inner())
    }

    /// This node's applied state, with its digest.
    pub async fn state(&self) -> anyhow::Result<pb::StatusResponse> {
        let mut c = pb::meta_client::MetaClient::new(self.channel().await?);
        Ok(c.status(pb::StatusRequest { digest: true }).await?.into_inner())
    }
}

impl Drop for MetaProc {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("==== {} ====", self.log());
        }
    }
}

pub struct Cluster {
    pub metas: Vec<MetaProc>,
}

/// `mxcas admin --meta ADDR cluster ARGS…`; fails with its output unless it succeeds.
pub fn admin(meta: &str, args: &[&str]) -> anyhow::Result<String> {
    admin_with_config(meta, None, args)
}

/// [`admin`] with `--config` (for its `[tls]`).
pub fn admin_with_config(meta: &str, config: Option<&std::path::Path>, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(mxcas_bin());
    cmd.args(["admin", "--meta", meta]);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let out = cmd.arg("cluster").args(args).output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    anyhow::ensure!(out.status.success(), "mxcas admin cluster {args:?} failed:\n{text}");
    Ok(text)
}

impl Cluster {
    /// Starts `n` nodes and makes them one cluster.
    pub async fn start(n: u64, opts: MetaOptions) -> anyhow::Result<Self> {
        let mut metas = Vec::new();
        for id in 1..=n {
            metas.push(MetaProc::start(id, &opts).await?);
        }
        let member = |m: &MetaProc| match (opts.direct, m.listen) {
            (true, Some(addr)) => format!("{}={addr}", m.id),
            _ => format!("{}={}", m.id, m.proxy.addr),
        };
        let members: Vec<String> = metas.iter().map(member).collect();
        let mut args = vec!["init"];
        for m in &members {
            args.extend(["--member", m.as_str()]);
        }
        let config = opts.tls.as_ref().map(|_| metas[0].config_path());
        admin_with_config(&metas[0].proxy.addr.to_string(), config.as_deref(), &args)?;
        let cluster = Cluster { metas };
        cluster.wait_leader(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    /// A new cluster of `n` nodes restored from `backup` (`mxcas admin snapshot import` into
    /// each node's empty data directory, then started; no `cluster init`).
    pub async fn restore(n: u64, opts: MetaOptions, backup: &std::path::Path) -> anyhow::Result<Self> {
        let mut metas = Vec::new();
        for id in 1..=n {
            metas.push(MetaProc::prepare(id, &opts).await?);
        }
        let members: Vec<String> = metas.iter().map(|m| format!("{}={}", m.id, m.proxy.addr)).collect();
        for m in &metas {
            let mut cmd = Command::new(mxcas_bin());
            cmd.args(["admin", "snapshot", "import", "--file"]).arg(backup).arg("--data-dir").arg(m.data_dir());
            cmd.args(["--id", &m.id.to_string()]);
            for member in &members {
                cmd.args(["--member", member]);
            }
            let out = cmd.output()?;
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            anyhow::ensure!(out.status.success(), "snapshot import for node {} failed:\n{text}", m.id);
            print!("{text}");
        }
        for m in &mut metas {
            m.spawn().await?;
        }
        let cluster = Cluster { metas };
        cluster.wait_leader(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    /// Addresses edges use (the proxies).
    pub fn endpoints(&self) -> Vec<String> {
        self.metas.iter().map(|m| m.proxy.addr.to_string()).collect()
    }

    pub fn node(&mut self, id: u64) -> &mut MetaProc {
        &mut self.metas[(id - 1) as usize]
    }

    /// The leader that a majority of running nodes agree on.
    pub async fn leader(&self) -> Option<u64> {
        let mut votes = std::collections::BTreeMap::new();
        for m in self.metas.iter().filter(|m| m.is_running()) {
            if let Ok(s) = m.cluster_status().await
                && let Some(l) = s.leader_id
            {
                *votes.entry(l).or_insert(0usize) += 1;
            }
        }
        let majority = self.metas.len() / 2 + 1;
        votes.into_iter().find(|(_, v)| *v >= majority).map(|(l, _)| l)
    }

    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        wait_for("a leader", timeout, || self.leader()).await
    }

    /// Waits for a leader other than `old`.
    pub async fn wait_new_leader(&self, old: u64, timeout: Duration) -> anyhow::Result<u64> {
        wait_for("a new leader", timeout, || async { self.leader().await.filter(|l| *l != old) }).await
    }

    /// Cuts every raft link between `id` and the other nodes (both directions).
    pub fn isolate(&self, id: u64) {
        let ip = IpAddr::V4(self.metas[(id - 1) as usize].ip);
        for m in &self.metas {
            if m.id != id {
                m.proxy.block(ip);
                self.metas[(id - 1) as usize].proxy.block(IpAddr::V4(m.ip));
            }
        }
    }

    pub fn heal(&self) {
        for m in &self.metas {
            m.proxy.unblock_all();
        }
    }

    /// Waits until every running node has applied the same state; returns its digest.
    pub async fn converged(&self, timeout: Duration) -> anyhow::Result<String> {
        wait_for("every node to apply the same state", timeout, || async {
            let mut digests = Vec::new();
            for m in self.metas.iter().filter(|m| m.is_running()) {
                digests.push(m.state().await.ok()?);
            }
            let first = digests.first()?.clone();
            digests
                .iter()
                .all(|d| d.state_digest == first.state_digest && d.last_applied == first.last_applied)
                .then_some(first.state_digest)
        })
        .await
    }
}
