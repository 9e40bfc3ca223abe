//! The gRPC face of the metadata service (`mxcas.meta.v1.Meta`).
//!
//! Writes are proposed to raft and answered once committed and applied (fsync on a majority,
//! then on this node's state machine); a follower answers `UNAVAILABLE` with the leader's
//! address in the `x-mxcas-leader` metadata so clients retry there. Reads first confirm this
//! node is the leader with a current view (openraft's read index, `ensure_linearizable`), then
//! read the local redb state on a blocking thread. Errors map to statuses in [`crate::pb`].

use std::sync::Arc;

use mxcas_proto::meta as pb;
use mxcas_proto::meta::meta_server::{Meta, MetaServer};
use tonic::{Request, Response, Status};

use openraft::BasicNode;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};

use crate::command::{Command, CommandOutput};
use crate::error::StorageError;
use crate::model::{ContentRecord, MediaKey};
use crate::pb::{LEADER_METADATA, cid_from_wire, status_from_command_error, status_from_storage_error};
use crate::raft::{NodeId, RaftNode};
use crate::state_machine::StateMachine;

#[derive(Clone)]
pub struct MetaService {
    node_id: u64,
    sm: Arc<StateMachine>,
    node: RaftNode,
    /// The last state digest and the applied index it was computed at: a digest reads the
    /// whole state, so it is computed once per state, by one caller at a time.
    digest: Arc<tokio::sync::Mutex<Option<DigestAt>>>,
}

/// A state digest and the applied index it was computed at.
type DigestAt = (u64, [u8; 32]);

/// `UNAVAILABLE`, naming the leader (when known) for the client to retry there.
fn forward(f: &ForwardToLeader<NodeId, BasicNode>) -> Status {
    let mut status = Status::unavailable(match &f.leader_id {
        Some(id) => format!("this metadata node is not the leader; node {id} is"),
        None => "this metadata node is not the leader and knows of none (election in progress)".to_owned(),
    });
    if let Some(node) = &f.leader_node
        && let Ok(v) = node.addr.parse()
    {
        status.metadata_mut().insert(LEADER_METADATA, v);
    }
    status
}

fn no_quorum(ms: u64) -> Status {
    Status::unavailable(format!("metadata cluster has no quorum: the leader has not heard from a majority for {ms} ms"))
}

fn raft_write_status(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => forward(&f),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => Status::failed_precondition(e.to_string()),
        RaftError::Fatal(f) => {
            tracing::error!(error = %f, "raft stopped");
            Status::unavailable(format!("metadata node stopped: {f}"))
        }
    }
}

fn raft_read_status(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> Status {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => forward(&f),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            Status::unavailable(format!("metadata cluster has no quorum: {q}"))
        }
        RaftError::Fatal(f) => Status::unavailable(format!("metadata node stopped: {f}")),
    }
}

impl MetaService {
    pub fn new(node: RaftNode) -> Self {
        Self { node_id: node.id, sm: node.sm.clone(), node, digest: Default::default() }
    }

    /// The tonic service to mount on a server.
    pub fn into_server(self) -> MetaServer<Self> {
        MetaServer::new(self)
    }

    /// False once raft stopped (a storage failure is fatal): the node must not get traffic.
    pub fn is_healthy(&self) -> bool {
        self.node.raft.metrics().borrow().running_state.is_ok()
    }

    /// Proposes `cmd` and waits for its outcome, unless this node leads without a majority:
    /// then the write is refused (or stops being waited for) as soon as the quorum lease runs
    /// out, so clients fail over or give up instead of hanging. A write abandoned this way may
    /// still commit once a majority returns: a retried commit is deduplicated by its upload
    /// ID; an abandoned reservation (`CreatePending`) holds its slot until it expires.
    async fn apply(&self, mut cmd: Command) -> Result<CommandOutput, Status> {
        // Time is the leader's: a follower refuses the write anyway, so the clock stamped here
        // is the one of the node that proposes it.
        cmd.stamp(now_ms());
        let mut quorum_lost = self.node.quorum_lost.clone();
        if let Some(ms) = *quorum_lost.borrow_and_update() {
            return Err(no_quorum(ms));
        }
        let resp = tokio::select! {
            resp = self.node.raft.client_write(cmd) => resp.map_err(raft_write_status)?,
            lost = quorum_lost.wait_for(Option::is_some) => {
                return Err(match lost.ok().and_then(|v| *v) {
                    Some(ms) => no_quorum(ms),
                    None => Status::unavailable("metadata node stopped"),
                });
            }
        };
        resp.data.0.map_err(|rejected| status_from_command_error(&rejected))
    }

    /// Reads after confirming, through the leader's read index, that this node's state is
    /// current (linearizable).
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateMachine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, Status> {
        self.node.raft.ensure_linearizable().await.map_err(raft_read_status)?;
        self.read_local(f).await
    }

    /// Reads this node's state as it is. Only for answers that cannot be stale: facts that
    /// never change once true (an mxc that has content and its CID, a CID's blob).
    async fn read_local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&StateMachine) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, Status> {
        let sm = self.sm.clone();
        tokio::task::spawn_blocking(move || f(&sm))
            .await
            .map_err(|e| Status::internal(format!("read task failed: {e}")))?
            .map_err(|e| status_from_storage_error(&e))
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn required<T>(field: Option<T>, name: &str) -> Result<T, Status> {
    field.ok_or_else(|| Status::invalid_argument(format!("missing field {name}")))
}

fn unexpected(out: CommandOutput) -> Status {
    Status::internal(format!("state machine answered with the wrong output: {out:?}"))
}

#[tonic::async_trait]
impl Meta for MetaService {
    async fn create_pending(
        &self,
        req: Request<pb::CreatePendingRequest>,
    ) -> Result<Response<pb::CreatePendingResponse>, Status> {
        let r = req.into_inner();
        let cmd = Command::CreatePending {
            media: required(r.media, "media")?.into(),
            user_id: r.user_id,
            now_ms: 0,
            ttl_ms: r.ttl_ms,
            max_pending_per_user: r.max_pending_per_user,
        };
        match self.apply(cmd).await? {
            CommandOutput::Pending(media) => {
                Ok(Response::new(pb::CreatePendingResponse { media: Some((&media).into()) }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn commit_upload(
        &self,
        req: Request<pb::CommitUploadRequest>,
    ) -> Result<Response<pb::CommitUploadResponse>, Status> {
        let r = req.into_inner();
        let media = required(r.media, "media")?;
        let content = ContentRecord::try_from(required(r.content, "content")?)?;
        let cmd = Command::CommitUpload {
            server_name: media.server_name,
            media_id: Some(media.media_id).filter(|m| !m.is_empty()),
            user_id: r.user_id,
            now_ms: 0,
            content: ContentRecord { refcount: 0, created_at_ms: 0, lost: false, ..content },
            content_type: r.content_type,
            filename: r.filename,
            lost_key: r.lost_key,
        };
        match self.apply(cmd).await? {
            CommandOutput::Committed(o) => Ok(Response::new(pb::CommitUploadResponse {
                media: Some((&o.media).into()),
                content: Some((&o.content).into()),
                deduplicated: o.deduplicated,
                generation: o.generation,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn begin_sweep(&self, req: Request<pb::BeginSweepRequest>) -> Result<Response<pb::Generations>, Status> {
        let min_interval_ms = req.into_inner().min_interval_ms;
        match self.apply(Command::BeginSweep { now_ms: 0, min_interval_ms }).await? {
            CommandOutput::Sweep(g) => {
                Ok(Response::new(pb::Generations { generation: g.generation, sealed: g.sealed }))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn get_generations(
        &self,
        _req: Request<pb::GetGenerationsRequest>,
    ) -> Result<Response<pb::Generations>, Status> {
        let g = self.read(|sm| sm.generations()).await?;
        Ok(Response::new(pb::Generations { generation: g.generation, sealed: g.sealed }))
    }

    async fn report_lost(
        &self,
        req: Request<pb::ReportLostRequest>,
    ) -> Result<Response<pb::ReportLostResponse>, Status> {
        let r = req.into_inner();
        let cid = cid_from_wire(&r.cid)?;
        match self.apply(Command::ReportLost { cid, blob_key: r.blob_key }).await? {
            CommandOutput::Lost { marked } => Ok(Response::new(pb::ReportLostResponse { marked })),
            other => Err(unexpected(other)),
        }
    }

    async fn get_media(&self, req: Request<pb::GetMediaRequest>) -> Result<Response<pb::GetMediaResponse>, Status> {
        let r = req.into_inner();
        let linearizable = r.linearizable;
        let key: MediaKey = required(r.media, "media")?.into();
        let lookup = |sm: &StateMachine, key: &MediaKey| -> Result<_, StorageError> {
            let media = sm.get_media(key)?;
            let content = match media.as_ref().and_then(|m| m.cid()) {
                Some(cid) => sm.get_content(cid)?,
                None => None,
            };
            Ok((media, content))
        };
        // An mxc with content keeps it (until deletion exists; then the change feed tells
        // edges), so a local "ready" is served as is. Its content record may since have been
        // repaired onto another blob: an edge that finds the named blob missing asks again
        // with `linearizable`. "Missing" or "pending" might be stale, so those are confirmed
        // through the leader.
        let k = key.clone();
        let local = if linearizable { (None, None) } else { self.read_local(move |sm| lookup(sm, &k)).await? };
        let (media, content) = match local {
            found @ (Some(_), Some(_)) => found,
            _ => self.read(move |sm| lookup(sm, &key)).await?,
        };
        Ok(Response::new(pb::GetMediaResponse {
            media: media.as_ref().map(Into::into),
            content: content.as_ref().map(Into::into),
        }))
    }

    async fn get_content(
        &self,
        req: Request<pb::GetContentRequest>,
    ) -> Result<Response<pb::GetContentResponse>, Status> {
        let cid = cid_from_wire(&req.into_inner().cid)?;
        // A CID's content record, once there, names the same bytes forever.
        let content = match self.read_local(move |sm| sm.get_content(&cid)).await? {
            Some(c) => Some(c),
            None => self.read(move |sm| sm.get_content(&cid)).await?,
        };
        Ok(Response::new(pb::GetContentResponse { content: content.as_ref().map(Into::into) }))
    }

    async fn referenced(
        &self,
        req: Request<pb::ReferencedRequest>,
    ) -> Result<Response<pb::ReferencedResponse>, Status> {
        let keys = req.into_inner().keys;
        if keys.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 keys per call"));
        }
        let referenced = self.read(move |sm| sm.referenced(&keys)).await?;
        Ok(Response::new(pb::ReferencedResponse { referenced }))
    }

    type WatchChangesStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Change, Status>> + Send + 'static>>;

    async fn watch_changes(
        &self,
        _req: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        use tokio_stream::StreamExt;
        use tokio_stream::wrappers::BroadcastStream;
        use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
        let stream = BroadcastStream::new(self.node.changes.subscribe()).map(|item| {
            Ok(match item {
                Ok(c) => {
                    pb::Change { kind: pb::change::Kind::Ready as i32, index: c.index, media: Some((&c.media).into()) }
                }
                Err(BroadcastStreamRecvError::Lagged(_)) => {
                    pb::Change { kind: pb::change::Kind::Resync as i32, index: 0, media: None }
                }
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let want_digest = req.into_inner().digest;
        let node_id = self.node_id;
        // The node's own view, without a leader round trip: operators ask every node.
        let (last_applied, (media_count, content_count)) =
            self.read_local(move |sm| Ok((sm.last_applied()?, sm.counts()?))).await?;
        let state_digest = if want_digest {
            // One full read at a time, and none again until the state changes: any metadata
            // client may ask, so asking must not be a way to load the node.
            let Ok(mut cached) = self.digest.try_lock() else {
                return Err(Status::resource_exhausted("a state digest is being computed; ask again shortly"));
            };
            let (at, digest) = match *cached {
                Some((at, d)) if at == self.sm.last_applied().map_err(|e| status_from_storage_error(&e))? => (at, d),
                _ => self.read_local(|sm| Ok((sm.last_applied()?, sm.digest()?))).await?,
            };
            *cached = Some((at, digest));
            crate::raft::backup::hex(&digest)
        } else {
            String::new()
        };
        Ok(Response::new(pb::StatusResponse { node_id, last_applied, media_count, content_count, state_digest }))
    }
}
