//! The client edges use to reach the metadata service.
//!
//! One cached tonic channel (HTTP/2, multiplexed), a deadline on every call, and retries with
//! capped exponential backoff for calls that are safe to repeat (reads, and commits, which
//! the service deduplicates by `upload_id`) while the service answers "unavailable".

use std::time::Duration;

use cid::Cid;
use mxcas_proto::meta as pb;
use mxcas_proto::meta::meta_client::MetaClient as PbClient;
use tonic::transport::{Channel, Endpoint};

use crate::command::CommitOutcome;
use crate::error::MetaError;
use crate::model::{ContentRecord, MediaKey, MediaRecord};
use crate::pb::meta_error_from_status;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Deadline of one call attempt.
    pub call_timeout: Duration,
    /// Total time retries of one call may take.
    pub retry_budget: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { call_timeout: Duration::from_secs(5), retry_budget: Duration::from_secs(10) }
    }
}

#[derive(Clone)]
pub struct MetaClient {
    inner: PbClient<Channel>,
    config: ClientConfig,
}

/// A finished upload as the edge stored it, to be committed.
#[derive(Clone, Debug)]
pub struct CommitRequest {
    pub upload_id: String,
    pub server_name: String,
    /// `None`: a synchronous upload, the media ID is the CID.
    pub media_id: Option<String>,
    pub user_id: String,
    pub now_ms: u64,
    pub content: ContentRecord,
    pub content_type: String,
    pub filename: Option<String>,
}

impl MetaClient {
    /// A client for the service at `url` (`http://host:port`). Connects lazily.
    pub fn new(url: &str, config: ClientConfig) -> Result<Self, MetaError> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| MetaError::Internal(format!("bad metadata service URL {url:?}: {e}")))?
            .connect_timeout(config.call_timeout)
            .timeout(config.call_timeout)
            .tcp_nodelay(true);
        Ok(Self { inner: PbClient::new(endpoint.connect_lazy()), config })
    }

    /// Runs `call` until it succeeds, fails for good, or the retry budget is spent.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T, MetaError>
    where
        F: FnMut(PbClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.config.retry_budget;
        let mut backoff = Duration::from_millis(20);
        loop {
            let err = match call(self.inner.clone()).await {
                Ok(v) => return Ok(v),
                Err(status) => meta_error_from_status(&status),
            };
            if !err.is_retryable() || tokio::time::Instant::now() + backoff > deadline {
                return Err(err);
            }
            tracing::debug!(error = %err, ?backoff, "metadata call failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Reserves `media` for an asynchronous upload. Not retried: a retry after a lost answer
    /// would see its own reservation as a conflict.
    pub async fn create_pending(
        &self,
        media: &MediaKey,
        user_id: &str,
        now_ms: u64,
        expires_at_ms: u64,
        max_pending_per_user: u32,
    ) -> Result<MediaRecord, MetaError> {
        let req = pb::CreatePendingRequest {
            media: Some(media.into()),
            user_id: user_id.to_owned(),
            now_ms,
            expires_at_ms,
            max_pending_per_user,
        };
        let resp = self.inner.clone().create_pending(req).await.map_err(|s| meta_error_from_status(&s))?;
        let media = resp.into_inner().media.ok_or_else(|| wire("create_pending: no media"))?;
        MediaRecord::try_from(media).map_err(|e| MetaError::Internal(e.to_string()))
    }

    /// Records a finished upload; safe to retry (deduplicated by `upload_id`).
    pub async fn commit_upload(&self, c: &CommitRequest) -> Result<CommitOutcome, MetaError> {
        let req = pb::CommitUploadRequest {
            upload_id: c.upload_id.clone(),
            media: Some(pb::MediaKey {
                server_name: c.server_name.clone(),
                media_id: c.media_id.clone().unwrap_or_default(),
            }),
            user_id: c.user_id.clone(),
            now_ms: c.now_ms,
            content: Some((&c.content).into()),
            content_type: c.content_type.clone(),
            filename: c.filename.clone(),
        };
        let resp = self
            .retrying(|mut cl| {
                let req = req.clone();
                async move { cl.commit_upload(req).await }
            })
            .await?;
        let r = resp.into_inner();
        let media = r.media.ok_or_else(|| wire("commit_upload: no media"))?;
        let content = r.content.ok_or_else(|| wire("commit_upload: no content"))?;
        Ok(CommitOutcome {
            media: MediaRecord::try_from(media).map_err(|e| MetaError::Internal(e.to_string()))?,
            content: ContentRecord::try_from(content).map_err(|e| MetaError::Internal(e.to_string()))?,
            deduplicated: r.deduplicated,
        })
    }

    pub async fn expire_pending(&self, now_ms: u64) -> Result<u64, MetaError> {
        let req = pb::ExpirePendingRequest { now_ms };
        let resp = self.retrying(|mut cl| async move { cl.expire_pending(req).await }).await?;
        Ok(resp.into_inner().removed)
    }

    /// The mxc record and, once uploaded, its content record.
    pub async fn get_media(&self, key: &MediaKey) -> Result<Option<(MediaRecord, Option<ContentRecord>)>, MetaError> {
        let req = pb::GetMediaRequest { media: Some(key.into()) };
        let resp = self
            .retrying(|mut cl| {
                let req = req.clone();
                async move { cl.get_media(req).await }
            })
            .await?;
        let r = resp.into_inner();
        let Some(media) = r.media else { return Ok(None) };
        let media = MediaRecord::try_from(media).map_err(|e| MetaError::Internal(e.to_string()))?;
        let content =
            r.content.map(ContentRecord::try_from).transpose().map_err(|e| MetaError::Internal(e.to_string()))?;
        Ok(Some((media, content)))
    }

    pub async fn get_content(&self, cid: &Cid) -> Result<Option<ContentRecord>, MetaError> {
        let req = pb::GetContentRequest { cid: cid.to_bytes() };
        let resp = self
            .retrying(|mut cl| {
                let req = req.clone();
                async move { cl.get_content(req).await }
            })
            .await?;
        resp.into_inner()
            .content
            .map(ContentRecord::try_from)
            .transpose()
            .map_err(|e| MetaError::Internal(e.to_string()))
    }

    /// `(last_applied, media_count, content_count)` of the node answering.
    pub async fn status(&self) -> Result<(u64, u64, u64), MetaError> {
        let resp = self.retrying(|mut cl| async move { cl.status(pb::StatusRequest {}).await }).await?;
        let s = resp.into_inner();
        Ok((s.last_applied, s.media_count, s.content_count))
    }
}

fn wire(what: &str) -> MetaError {
    MetaError::Internal(format!("malformed answer from the metadata service: {what}"))
}
