//! The gRPC face of the metadata service (`mxcas.meta.v1.Meta`).
//!
//! Writes go through the [`Writer`] (group commit, fsync before the answer); reads open a
//! redb read transaction on a blocking thread. Errors map to statuses in [`crate::pb`].

use std::sync::Arc;

use mxcas_proto::meta as pb;
use mxcas_proto::meta::meta_server::{Meta, MetaServer};
use tonic::{Request, Response, Status};

use crate::command::{Command, CommandOutput};
use crate::error::StorageError;
use crate::model::{ContentRecord, MediaKey};
use crate::pb::{cid_from_wire, status_from_command_error, status_from_storage_error};
use crate::state_machine::{StateMachine, Writer};

#[derive(Clone)]
pub struct MetaService {
    node_id: u64,
    sm: Arc<StateMachine>,
    writer: Writer,
}

impl MetaService {
    pub fn new(node_id: u64, sm: Arc<StateMachine>) -> Result<Self, StorageError> {
        let writer = Writer::spawn(sm.clone())?;
        Ok(Self { node_id, sm, writer })
    }

    /// The tonic service to mount on a server.
    pub fn into_server(self) -> MetaServer<Self> {
        MetaServer::new(self)
    }

    /// False once the node's storage failed: it must not be sent traffic.
    pub fn is_healthy(&self) -> bool {
        !self.writer.is_stopped()
    }

    async fn apply(&self, cmd: Command) -> Result<CommandOutput, Status> {
        match self.writer.submit(cmd).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(rejected)) => Err(status_from_command_error(&rejected)),
            Err(e) => Err(status_from_storage_error(&e)),
        }
    }

    async fn read<T: Send + 'static>(
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
            now_ms: r.now_ms,
            expires_at_ms: r.expires_at_ms,
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
        if r.upload_id.is_empty() {
            return Err(Status::invalid_argument("missing upload_id"));
        }
        let cmd = Command::CommitUpload {
            upload_id: r.upload_id,
            server_name: media.server_name,
            media_id: Some(media.media_id).filter(|m| !m.is_empty()),
            user_id: r.user_id,
            now_ms: r.now_ms,
            content,
            content_type: r.content_type,
            filename: r.filename,
        };
        match self.apply(cmd).await? {
            CommandOutput::Committed(o) => Ok(Response::new(pb::CommitUploadResponse {
                media: Some((&o.media).into()),
                content: Some((&o.content).into()),
                deduplicated: o.deduplicated,
            })),
            other => Err(unexpected(other)),
        }
    }

    async fn expire_pending(
        &self,
        req: Request<pb::ExpirePendingRequest>,
    ) -> Result<Response<pb::ExpirePendingResponse>, Status> {
        let now_ms = req.into_inner().now_ms;
        match self.apply(Command::ExpirePending { now_ms }).await? {
            CommandOutput::Expired { removed } => Ok(Response::new(pb::ExpirePendingResponse { removed })),
            other => Err(unexpected(other)),
        }
    }

    async fn get_media(&self, req: Request<pb::GetMediaRequest>) -> Result<Response<pb::GetMediaResponse>, Status> {
        let key: MediaKey = required(req.into_inner().media, "media")?.into();
        let (media, content) = self
            .read(move |sm| {
                let media = sm.get_media(&key)?;
                let content = match media.as_ref().and_then(|m| m.cid()) {
                    Some(cid) => sm.get_content(cid)?,
                    None => None,
                };
                Ok((media, content))
            })
            .await?;
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
        let content = self.read(move |sm| sm.get_content(&cid)).await?;
        Ok(Response::new(pb::GetContentResponse { content: content.as_ref().map(Into::into) }))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let node_id = self.node_id;
        let (last_applied, (media_count, content_count)) =
            self.read(|sm| Ok((sm.last_applied()?, sm.counts()?))).await?;
        Ok(Response::new(pb::StatusResponse { node_id, last_applied, media_count, content_count }))
    }
}
