//! `mxcas admin cluster …`: membership of the metadata cluster, over its gRPC `Cluster` API.

use anyhow::Context;
use clap::Subcommand;
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
    Status,
}

fn endpoint(meta: &str) -> String {
    if meta.starts_with("http") { meta.to_owned() } else { format!("http://{meta}") }
}

pub async fn run(meta: &str, cmd: ClusterCmd) -> anyhow::Result<()> {
    let mut client = ClusterClient::connect(endpoint(meta))
        .await
        .with_context(|| format!("cannot reach the metadata node at {meta}"))?;
    let status = match cmd {
        ClusterCmd::Init { members } => {
            let members = members
                .iter()
                .map(|m| {
                    let (id, addr) = m.split_once('=').context("a member is ID=HOST:PORT")?;
                    Ok(pb::Member { id: id.parse().context("member ID must be a number")?, addr: addr.to_owned() })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            client.init(pb::InitRequest { members }).await
        }
        ClusterCmd::AddLearner { id, addr } => {
            let (mut leader, _) = on_leader(client).await?;
            leader.add_learner(pb::AddLearnerRequest { member: Some(pb::Member { id, addr }) }).await
        }
        ClusterCmd::Promote { id } => {
            let (mut leader, status) = on_leader(client).await?;
            let mut voters: Vec<u64> = status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            if !status.members.iter().any(|m| m.id == id) {
                anyhow::bail!("node {id} is not a member; add it first with `mxcas admin cluster add-learner`");
            }
            voters.push(id);
            leader.change_membership(pb::ChangeMembershipRequest { voters, remove: vec![] }).await
        }
        ClusterCmd::Remove { id } => {
            let (mut leader, _) = on_leader(client).await?;
            leader.change_membership(pb::ChangeMembershipRequest { voters: vec![], remove: vec![id] }).await
        }
        ClusterCmd::Status => client.status(pb::ClusterStatusRequest {}).await,
    }
    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
    .into_inner();
    print_status(&status);
    Ok(())
}

/// A client for the current leader (membership changes must go there), and the cluster status
/// as the node first asked sees it.
async fn on_leader(
    mut client: ClusterClient<tonic::transport::Channel>,
) -> anyhow::Result<(ClusterClient<tonic::transport::Channel>, pb::ClusterStatus)> {
    let status = client.status(pb::ClusterStatusRequest {}).await?.into_inner();
    match status.leader_id {
        Some(l) if l != status.node_id && !status.leader_addr.is_empty() => {
            Ok((ClusterClient::connect(endpoint(&status.leader_addr)).await?, status))
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
