//! gRPC servers of a metadata node for raft traffic (`Raft`) and membership (`Cluster`).

use std::collections::{BTreeMap, BTreeSet};

use mxcas_proto::meta as pb;
use openraft::{BasicNode, ChangeMembers};
use serde::Serialize;
use tonic::{Request, Response, Status};

use std::io::{Read, Seek};

use super::network::{decode as decode_as, encode};
use super::{NodeId, Raft, backup};

#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
}

impl RaftService {
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }

    pub fn into_server(self) -> pb::raft_server::RaftServer<Self> {
        pb::raft_server::RaftServer::new(self).max_decoding_message_size(256 << 20)
    }
}

/// Answers in the encoding the request came in.
fn reply<T: Serialize, E: Serialize>(
    encoding: pb::Encoding,
    result: Result<T, E>,
) -> Result<Response<pb::RaftReply>, Status> {
    let failed = |e: String| Status::internal(format!("encode: {e}"));
    let (data, error) = match result {
        Ok(v) => (encode(encoding, &v).map_err(failed)?, Vec::new()),
        Err(e) => (Vec::new(), encode(encoding, &e).map_err(failed)?),
    };
    Ok(Response::new(pb::RaftReply { data, error, encoding: encoding.into() }))
}

fn decode<T: serde::de::DeserializeOwned>(m: Request<pb::RaftMessage>) -> Result<(pb::Encoding, T), Status> {
    let m = m.into_inner();
    let encoding = m.encoding();
    let value =
        decode_as(encoding, &m.data).map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))?;
    Ok((encoding, value))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftReply>, Status> {
        let (encoding, req) = decode(req)?;
        reply(encoding, self.raft.append_entries(req).await)
    }

    async fn vote(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftReply>, Status> {
        let (encoding, req) = decode(req)?;
        reply(encoding, self.raft.vote(req).await)
    }

    async fn install_snapshot(&self, req: Request<pb::RaftMessage>) -> Result<Response<pb::RaftReply>, Status> {
        let (encoding, req) = decode(req)?;
        reply(encoding, self.raft.install_snapshot(req).await)
    }
}

/// How long an export waits for its client to take the next chunk.
const EXPORT_STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Membership administration (`mxcas admin cluster …`).
#[derive(Clone)]
pub struct ClusterService {
    id: NodeId,
    raft: Raft,
    sm: std::sync::Arc<crate::state_machine::StateMachine>,
    log: super::log_store::LogStore,
    dir: std::path::PathBuf,
    /// One export at a time: each writes a full copy of the state to the node's disk.
    exporting: std::sync::Arc<tokio::sync::Semaphore>,
}

impl ClusterService {
    pub fn new(node: &super::RaftNode) -> Self {
        Self {
            id: node.id,
            raft: node.raft.clone(),
            sm: node.sm.clone(),
            log: node.log.clone(),
            dir: node.dir.clone(),
            exporting: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    pub fn into_server(self) -> pb::cluster_server::ClusterServer<Self> {
        pb::cluster_server::ClusterServer::new(self)
    }

    async fn status(&self) -> pb::ClusterStatus {
        let committed = self.log.committed_index().await;
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(id, node)| pb::MemberStatus {
                id: *id,
                addr: node.addr.clone(),
                voter: voters.contains(id),
                matched: m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
                    .or_else(|| (*id == self.id).then_some(m.last_log_index).flatten()),
            })
            .collect();
        let leader_addr =
            m.current_leader.and_then(|l| membership.get_node(&l).map(|n| n.addr.clone())).unwrap_or_default();
        pb::ClusterStatus {
            node_id: self.id,
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            state: format!("{:?}", m.state),
            members,
        }
    }
}

fn raft_status<E: std::fmt::Display>(e: E) -> Status {
    let text = e.to_string();
    if text.contains("forward") || text.contains("leader") {
        Status::failed_precondition(format!("{text} (run this against the leader; see `mxcas admin cluster status`)"))
    } else {
        Status::internal(text)
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn init(&self, req: Request<pb::InitRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let members: BTreeMap<NodeId, BasicNode> =
            req.into_inner().members.into_iter().map(|m| (m.id, BasicNode { addr: m.addr })).collect();
        if members.is_empty() {
            return Err(Status::invalid_argument("no members given"));
        }
        self.raft.initialize(members).await.map_err(raft_status)?;
        Ok(Response::new(self.status().await))
    }

    async fn add_learner(&self, req: Request<pb::AddLearnerRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let m = req.into_inner().member.ok_or_else(|| Status::invalid_argument("no member given"))?;
        self.raft.add_learner(m.id, BasicNode { addr: m.addr }, true).await.map_err(raft_status)?;
        Ok(Response::new(self.status().await))
    }

    async fn change_membership(
        &self,
        req: Request<pb::ChangeMembershipRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let r = req.into_inner();
        let voters: BTreeSet<NodeId> = r.voters.into_iter().collect();
        let remove: BTreeSet<NodeId> = r.remove.into_iter().collect();
        if !voters.is_empty() {
            self.raft.change_membership(ChangeMembers::ReplaceAllVoters(voters), true).await.map_err(raft_status)?;
        }
        if !remove.is_empty() {
            let current: BTreeSet<NodeId> =
                self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
            let still_voting: BTreeSet<NodeId> = current.difference(&remove).copied().collect();
            if still_voting.is_empty() {
                return Err(Status::failed_precondition("refusing to remove every voter"));
            }
            if still_voting != current {
                self.raft
                    .change_membership(ChangeMembers::ReplaceAllVoters(still_voting), true)
                    .await
                    .map_err(raft_status)?;
            }
            self.raft.change_membership(ChangeMembers::RemoveNodes(remove), false).await.map_err(raft_status)?;
        }
        Ok(Response::new(self.status().await))
    }

    async fn status(&self, _req: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        Ok(Response::new(self.status().await))
    }

    type ExportSnapshotStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::SnapshotChunk, Status>> + Send + 'static>>;

    async fn export_snapshot(
        &self,
        _req: Request<pb::ExportSnapshotRequest>,
    ) -> Result<Response<Self::ExportSnapshotStream>, Status> {
        let permit = self.exporting.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("an export from this node is already running; retry when it has finished")
        })?;
        let (sm, id, dir) = (self.sm.clone(), self.id, self.dir.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            // A client that stays connected but stops reading must not hold the export slot
            // (and this thread) forever.
            let send = |item: Result<pb::SnapshotChunk, Status>| -> bool {
                runtime.block_on(async {
                    match tokio::time::timeout(EXPORT_STALL, tx.send(item)).await {
                        Ok(Ok(())) => true,
                        Ok(Err(_)) => false, // client went away
                        Err(_) => {
                            tracing::warn!("backup export abandoned: the client stopped reading for {EXPORT_STALL:?}");
                            false
                        }
                    }
                })
            };
            if let Err(status) = export_chunks(&sm, id, &dir, send) {
                send(Err(status));
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Spools `sm`'s state into an unlinked file in `dir` (the node's directory, sized for the
/// state, unlike /tmp in many containers), so its read transaction is not held open while a
/// slow client downloads; then hands it to `send` as the header chunk and 1 MiB record
/// chunks, stopping quietly when `send` says the client is gone.
fn export_chunks(
    sm: &crate::state_machine::StateMachine,
    id: NodeId,
    dir: &std::path::Path,
    send: impl Fn(Result<pb::SnapshotChunk, Status>) -> bool,
) -> Result<(), Status> {
    let internal = |e: &dyn std::fmt::Display| Status::internal(format!("export failed: {e}"));
    let mut file = tempfile::tempfile_in(dir).map_err(|e| internal(&e))?;
    let header = backup::export_records(sm, id, &mut file).map_err(|e| internal(&e))?;
    tracing::info!(records = header.records, sha256 = %header.sha256, "exporting a backup");
    file.rewind().map_err(|e| internal(&e))?;
    if !send(Ok(pb::SnapshotChunk { header: backup::encode_header(&header), data: Vec::new() })) {
        return Ok(());
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| internal(&e))?;
        if n == 0 || !send(Ok(pb::SnapshotChunk { header: Vec::new(), data: buf[..n].to_vec() })) {
            return Ok(());
        }
    }
}
