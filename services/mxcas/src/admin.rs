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
            let leader = leader_client(&mut client).await?;
            leader_or(client, leader).add_learner(pb::AddLearnerRequest { member: Some(pb::Member { id, addr }) }).await
        }
        ClusterCmd::Promote { id } => {
            let status = client.status(pb::ClusterStatusRequest {}).await?.into_inner();
            let mut voters: Vec<u64> = status.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            if !status.members.iter().any(|m| m.id == id) {
                anyhow::bail!("node {id} is not a member; add it first with `mxcas admin cluster add-learner`");
            }
            voters.push(id);
            let leader = leader_client(&mut client).await?;
            leader_or(client, leader).change_membership(pb::ChangeMembershipRequest { voters, remove: vec![] }).await
        }
        ClusterCmd::Remove { id } => {
            let leader = leader_client(&mut client).await?;
            leader_or(client, leader)
                .change_membership(pb::ChangeMembershipRequest { voters: vec![], remove: vec![id] })
                .await
        }
        ClusterCmd::Status => client.status(pb::ClusterStatusRequest {}).await,
    }
    .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
    .into_inner();
    print_status(&status);
    Ok(())
}

/// A client connected to the current leader, if the node we asked knows another one.
async fn leader_client(
    client: &mut ClusterClient<tonic::transport::Channel>,
) -> anyhow::Result<Option<ClusterClient<tonic::transport::Channel>>> {
    let status = client.status(pb::ClusterStatusRequest {}).await?.into_inner();
    match status.leader_id {
        Some(l) if l != status.node_id && !status.leader_addr.is_empty() => {
            Ok(Some(ClusterClient::connect(endpoint(&status.leader_addr)).await?))
        }
        Some(_) => Ok(None),
        None => anyhow::bail!("the cluster has no leader right now; retry shortly"),
    }
}

fn leader_or(
    this: ClusterClient<tonic::transport::Channel>,
    leader: Option<ClusterClient<tonic::transport::Channel>>,
) -> ClusterClient<tonic::transport::Channel> {
    leader.unwrap_or(this)
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
