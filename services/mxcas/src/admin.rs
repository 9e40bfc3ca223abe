//! `mxcas admin cluster …`: membership of the metadata cluster, over its gRPC `Cluster` API.

use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;

use mxcas_meta::raft::BasicNode;
use mxcas_meta::raft::backup;
use mxcas_meta::tls::{self, Tls};
use mxcas_proto::meta as pb;
use mxcas_proto::meta::cluster_client::ClusterClient;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Make the listed nodes the first voters of a new cluster (once, against any of them).
    Init {
        /// `ID=HOST:PORT`, one per member (e.g. `--member 1=10.0.0.1:7100`).
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
    /// Add a node as a learner (it receives the log, catching up by snapshot if needed, but
    /// does not vote). Returns once it has caught up.
    AddLearner {
        #[arg(long)]
        id: u64,
        /// Its gRPC address as the other nodes reach it.
        #[arg(long)]
        addr: String,
    },
    /// Make a learner a voter.
    Promote {
        #[arg(long)]
        id: u64,
    },
    /// Remove a node from the cluster (voter or learner).
    Remove {
        #[arg(long)]
        id: u64,
    },
    /// Leader, term, log and applied indexes, members and how far each has replicated.
    Status {
        /// Print JSON (one object; with `--all`, one per member under `members_status`).
        #[arg(long)]
        json: bool,
        /// Also ask every member for its own view (applied index, term, leader), so a script
        /// can check convergence with one command.
        #[arg(long)]
        all: bool,
    },
}

type Client = ClusterClient<tonic::transport::Channel>;

/// A node's refusal, as the operator should read it.
fn grpc_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", s.code(), s.message())
}

async fn connect(addr: &str, tls: Option<&Tls>) -> anyhow::Result<Client> {
    let channel = tls::endpoint(addr, tls)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the metadata node at {addr}"))?;
    Ok(ClusterClient::new(channel))
}

pub async fn run(meta: &str, tls: Option<&Tls>, cmd: ClusterCmd) -> anyhow::Result<()> {
    let mut client = connect(meta, tls).await?;
    let status = match cmd {
        ClusterCmd::Init { members } => {
            let members = parse_members(&members)?;
            client.init(pb::InitRequest { members }).await
        }
        ClusterCmd::AddLearner { id, addr } => {
            let (mut leader, _) = on_leader(client, tls).await?;
            leader.add_learner(pb::AddLearnerRequest { member: Some(pb::Member { id, addr }) }).await
        }
        ClusterCmd::Promote { id } => {
            let (mut leader, status) = on_leader(client, tls).await?;
            let mut voters: Vec<u64> = status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            if !status.members.iter().any(|m| m.id == id) {
                anyhow::bail!("node {id} is not a member; add it first with `mxcas admin cluster add-learner`");
            }
            voters.push(id);
            leader.change_membership(pb::ChangeMembershipRequest { voters, remove: vec![] }).await
        }
        ClusterCmd::Remove { id } => {
            let (mut leader, _) = on_leader(client, tls).await?;
            leader.change_membership(pb::ChangeMembershipRequest { voters: vec![], remove: vec![id] }).await
        }
        ClusterCmd::Status { json, all } => {
            let status = client.status(pb::ClusterStatusRequest {}).await.map_err(grpc_error)?.into_inner();
            let mut views = Vec::new();
            if all {
                for m in &status.members {
                    let view = match connect(&m.addr, tls).await {
                        Ok(mut c) => {
                            c.status(pb::ClusterStatusRequest {}).await.map(|r| r.into_inner()).map_err(grpc_error)
                        }
                        Err(e) => Err(e),
                    };
                    views.push((m.id, view));
                }
            }
            if json {
                let mut out = status_json(&status);
                if all {
                    out["members_status"] = views
                        .iter()
                        .map(|(id, v)| match v {
                            Ok(s) => status_json(s),
                            Err(e) => serde_json::json!({ "node_id": id, "error": e.to_string() }),
                        })
                        .collect();
                }
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_status(&status);
                if all {
                    println!("every member's own view:");
                    for (id, v) in &views {
                        match v {
                            Ok(s) => println!(
                                "  {:>4}  {:<9} term {:>4}  leader {:>4}  committed {:>8}  applied {:>8}",
                                id,
                                s.state,
                                s.term,
                                s.leader_id.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
                                s.committed.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                                s.last_applied.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                            ),
                            Err(e) => println!("  {id:>4}  unreachable: {e}"),
                        }
                    }
                }
            }
            return Ok(());
        }
    }
    .map_err(grpc_error)?
    .into_inner();
    print_status(&status);
    Ok(())
}

fn status_json(s: &pb::ClusterStatus) -> serde_json::Value {
    serde_json::json!({
        "node_id": s.node_id,
        "state": s.state,
        "leader_id": s.leader_id,
        "leader_addr": s.leader_addr,
        "term": s.term,
        "last_log_index": s.last_log_index,
        "committed": s.committed,
        "last_applied": s.last_applied,
        "snapshot_index": s.snapshot_index,
        "members": s.members.iter().map(|m| serde_json::json!({
            "id": m.id, "addr": m.addr, "voter": m.voter, "matched": m.matched,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Stream a backup of the metadata state from the node at `--meta` (as of its applied
    /// index; ask the leader for the newest state) into a file.
    Export {
        /// Where to write the backup (written to FILE.partial, then renamed when complete).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into the empty data directory of one member of a new cluster. Run it
    /// for every member, with the same backup and `--member` list, then start the nodes: they
    /// form the cluster without `cluster init`. Offline: does not contact any node.
    #[command(alias = "restore")]
    Import {
        /// The backup file.
        #[arg(long)]
        file: PathBuf,
        /// The new node's data directory (as given to `mxcas meta --data-dir`).
        #[arg(long)]
        data_dir: PathBuf,
        /// The new node's raft ID.
        #[arg(long)]
        id: u64,
        /// `ID=HOST:PORT`, one per member of the new cluster.
        #[arg(long = "member", required = true)]
        members: Vec<String>,
    },
}

fn parse_members(members: &[String]) -> anyhow::Result<Vec<pb::Member>> {
    let mut seen = std::collections::BTreeSet::new();
    members
        .iter()
        .map(|m| {
            let (id, addr) = m.split_once('=').context("a member is ID=HOST:PORT")?;
            let id: u64 = id.parse().context("member ID must be a number")?;
            anyhow::ensure!(seen.insert(id), "member ID {id} is given twice");
            Ok(pb::Member { id, addr: addr.to_owned() })
        })
        .collect()
}

pub async fn snapshot(meta: &str, tls: Option<&Tls>, cmd: SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Export { out } => export(meta, tls, &out).await,
        SnapshotCmd::Import { file, data_dir, id, members } => {
            let members = parse_members(&members)?.into_iter().map(|m| (m.id, BasicNode { addr: m.addr })).collect();
            let dir = data_dir.join("meta");
            let restored = backup::import(&file, &dir, id, members)
                .await
                .with_context(|| format!("cannot import {} into {}", file.display(), dir.display()))?;
            let h = &restored.header;
            println!(
                "restored {} records (backup of node {} at {}) into {} as node {id}; state digest {}",
                restored.records,
                h.node_id,
                h.last_log_id.map(|l| l.to_string()).unwrap_or_default(),
                dir.display(),
                h.state_digest()
            );
            println!("next: do the same for every other member, then start them all with `mxcas meta`");
            Ok(())
        }
    }
}

async fn export(meta: &str, tls: Option<&Tls>, out: &std::path::Path) -> anyhow::Result<()> {
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let result = export_to(meta, tls, &partial, out).await;
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

async fn export_to(
    meta: &str,
    tls: Option<&Tls>,
    partial: &std::path::Path,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    use sha2::Digest;
    use std::io::Write;
    let mut client = connect(meta, tls).await?;
    let mut stream = client.export_snapshot(pb::ExportSnapshotRequest {}).await.map_err(grpc_error)?.into_inner();
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(partial).with_context(|| format!("cannot create {}", partial.display()))?,
    );
    let mut header = None;
    let mut hash = sha2::Sha256::new();
    let (mut bytes, mut reported) = (0u64, 0u64);
    while let Some(chunk) = stream.message().await.map_err(grpc_error)? {
        match (&header, chunk.header.is_empty()) {
            (None, false) => {
                let mut r = chunk.header.as_slice();
                header = Some(backup::read_header(&mut r).context("the node sent a malformed backup header")?);
                file.write_all(&chunk.header)?;
            }
            (None, true) => anyhow::bail!("the node sent records before the backup header"),
            (Some(_), false) => anyhow::bail!("the node sent a second backup header"),
            (Some(_), true) => {}
        }
        hash.update(&chunk.data);
        file.write_all(&chunk.data)?;
        bytes += chunk.data.len() as u64;
        if bytes - reported >= 64 << 20 {
            eprintln!("  {} MiB received", bytes >> 20);
            reported = bytes;
        }
    }
    let header = header.context("the node sent no backup")?;
    let actual = backup::hex(&hash.finalize());
    anyhow::ensure!(
        actual == header.sha256,
        "the backup arrived corrupt (sha256 {actual}, expected {})",
        header.sha256
    );
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(partial, out)
        .with_context(|| format!("cannot rename {} to {}", partial.display(), out.display()))?;
    // The rename itself must survive a crash.
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync {}", parent.display()))?;
    println!(
        "backup of node {} at {}: {} records, {bytes} bytes, state digest {} -> {}",
        header.node_id,
        header.last_log_id.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
        header.records,
        header.state_digest(),
        out.display()
    );
    Ok(())
}

/// A client for the current leader (membership changes must go there), and the cluster status
/// as the node first asked sees it.
async fn on_leader(mut client: Client, tls: Option<&Tls>) -> anyhow::Result<(Client, pb::ClusterStatus)> {
    let status = client.status(pb::ClusterStatusRequest {}).await?.into_inner();
    match status.leader_id {
        Some(l) if l != status.node_id && !status.leader_addr.is_empty() => {
            Ok((connect(&status.leader_addr, tls).await?, status))
        }
        Some(_) => Ok((client, status)),
        None => anyhow::bail!("the cluster has no leader right now; retry shortly"),
    }
}

fn print_status(s: &pb::ClusterStatus) {
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    println!("node:         {} ({})", s.node_id, s.state);
    println!("leader:       {} {}", opt(s.leader_id), s.leader_addr);
    println!("term:         {}", s.term);
    println!("last log:     {}", opt(s.last_log_index));
    println!("committed:    {}", opt(s.committed));
    println!("applied:      {}", opt(s.last_applied));
    println!("snapshot:     {}", opt(s.snapshot_index));
    println!("members:");
    let head = s.last_log_index.unwrap_or(0);
    for m in &s.members {
        let lag = m.matched.map(|x| head.saturating_sub(x).to_string()).unwrap_or_else(|| "?".into());
        println!(
            "  {:>4}  {:<24} {:<8} matched {:>8}  lag {}",
            m.id,
            m.addr,
            if m.voter { "voter" } else { "learner" },
            opt(m.matched),
            lag
        );
    }
}
