//! The client edges use to reach the metadata service.
//!
//! Knows every metadata node's address and keeps one cached tonic channel (HTTP/2,
//! multiplexed) per node. Every call has a deadline. A follower's "not the leader" answer
//! names the leader (`x-mxcas-leader`), and the client retries there at once; other
//! "unavailable" answers (no leader yet, node down) are retried on the next node with capped
//! exponential backoff within a time budget, for calls that are safe to repeat (reads, and
//! commits, which the service deduplicates by `upload_id`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cid::Cid;
use mxcas_proto::meta as pb;
use mxcas_proto::meta::meta_client::MetaClient as PbClient;
use tonic::transport::Channel;

use crate::command::CommitOutcome;
use crate::error::MetaError;
use crate::model::{ContentRecord, MediaKey, MediaRecord};
use crate::pb::{LEADER_METADATA, meta_error_from_status};
use crate::tls;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Deadline of one call attempt.
    pub call_timeout: Duration,
    /// Total time retries of one read may take.
    pub retry_budget: Duration,
    /// Total time retries of one write may take: long enough to ride out a leader election
    /// (about one election timeout), short enough that an upload without quorum fails fast.
    pub write_budget: Duration,
    /// Mutual TLS to the metadata nodes (`None`: plain HTTP/2).
    pub tls: Option<crate::tls::Tls>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            call_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(10),
            write_budget: Duration::from_secs(4),
            tls: None,
        }
    }
}

/// Which calls may be repeated, and for how long.
#[derive(Clone, Copy)]
enum Retry {
    /// Only redirects to the leader are followed (the node refused it, so nothing happened).
    Never,
    /// Idempotent writes: retried within the write budget.
    Write,
    /// Reads: retried within the retry budget.
    Read,
}

#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    config: ClientConfig,
    channels: Mutex<HashMap<String, PbClient<Channel>>>,
    /// Where calls go first: the last known leader.
    current: Mutex<String>,
}

/// One event of the change feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The mxc now has content.
    Ready(MediaKey),
    /// Changes were missed: treat every cached mutable fact as stale.
    Resync,
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
    /// A client for the metadata nodes at `endpoints` (`host:port`, any of them; the client
    /// finds the leader). Connects lazily.
    pub fn new(endpoints: &[String], config: ClientConfig) -> Result<Self, MetaError> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| tls::url(e, config.tls.as_ref())).collect();
        let first =
            endpoints.first().cloned().ok_or_else(|| MetaError::Internal("no metadata service address".into()))?;
        let client = Self {
            inner: Arc::new(Inner {
                endpoints,
                config,
                channels: Mutex::new(HashMap::new()),
                current: Mutex::new(first.clone()),
            }),
        };
        for e in &client.inner.endpoints {
            client.client_for(e)?;
        }
        Ok(client)
    }

    fn client_for(&self, url: &str) -> Result<PbClient<Channel>, MetaError> {
        let mut channels =
            self.inner.channels.lock().map_err(|_| MetaError::Internal("client lock poisoned".into()))?;
        if let Some(c) = channels.get(url) {
            return Ok(c.clone());
        }
        let timeout = self.inner.config.call_timeout;
        let endpoint = tls::endpoint(url, self.inner.config.tls.as_ref())
            .map_err(MetaError::Internal)?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        let client = PbClient::new(endpoint.connect_lazy());
        channels.insert(url.to_owned(), client.clone());
        Ok(client)
    }

    fn current(&self) -> String {
        self.inner.current.lock().map(|c| c.clone()).unwrap_or_else(|_| self.inner.endpoints[0].clone())
    }

    fn set_current(&self, url: String) {
        if let Ok(mut c) = self.inner.current.lock() {
            *c = url;
        }
    }

    /// The next configured node after `url` (round robin), to try when `url` fails.
    fn next_after(&self, url: &str) -> String {
        let eps = &self.inner.endpoints;
        let i = eps.iter().position(|e| e == url).map(|i| i + 1).unwrap_or(0);
        eps[i % eps.len()].clone()
    }

    /// Runs `call` against the leader: follows redirects always, and retries other
    /// "unavailable" answers (on the next node, with backoff) as `retry` allows.
    async fn retrying<T, F, Fut>(&self, retry: Retry, mut call: F) -> Result<T, MetaError>
    where
        F: FnMut(PbClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let config = &self.inner.config;
        let (idempotent, budget) = match retry {
            Retry::Never => (false, config.write_budget),
            Retry::Write => (true, config.write_budget),
            Retry::Read => (true, config.retry_budget),
        };
        let deadline = tokio::time::Instant::now() + budget;
        // A retryable attempt gets at most half the budget, so a node that swallows calls
        // (powered off, black-holed) still leaves time to try another. A call that cannot be
        // retried gets the whole budget: giving up early would only leave its outcome unknown.
        let attempt_cap = if idempotent { (budget / 2).min(config.call_timeout) } else { budget };
        let mut backoff = Duration::from_millis(20);
        loop {
            let url = self.current();
            let attempt_end = deadline.min(tokio::time::Instant::now() + attempt_cap);
            let status = match tokio::time::timeout_at(attempt_end, call(self.client_for(&url)?)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(status)) => status,
                Err(_) => tonic::Status::unavailable(format!("no answer from {url} within {attempt_cap:?}")),
            };
            let leader = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(|a| tls::url(a, config.tls.as_ref()));
            let err = meta_error_from_status(&status);
            let now = tokio::time::Instant::now();
            match leader {
                // Not applied: this node refused it as a follower. Go to the leader.
                Some(leader) if leader != url && now < deadline => {
                    tracing::debug!(from = %url, to = %leader, "following the metadata leader");
                    self.set_current(leader);
                    continue;
                }
                _ => {}
            }
            if !err.is_retryable() || !idempotent || now + backoff > deadline {
                return Err(err);
            }
            tracing::debug!(node = %url, error = %err, ?backoff, "metadata call failed; trying the next node");
            self.set_current(self.next_after(&url));
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
        let resp = self
            .retrying(Retry::Never, |mut cl| {
                let req = req.clone();
                async move { cl.create_pending(req).await }
            })
            .await?;
        let media = resp.into_inner().media.ok_or_else(|| wire("create_pending: no media"))?;
        MediaRecord::try_from(media).map_err(MetaError::from)
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
            .retrying(Retry::Write, |mut cl| {
                let req = req.clone();
                async move { cl.commit_upload(req).await }
            })
            .await?;
        let r = resp.into_inner();
        let media = r.media.ok_or_else(|| wire("commit_upload: no media"))?;
        let content = r.content.ok_or_else(|| wire("commit_upload: no content"))?;
        Ok(CommitOutcome {
            media: MediaRecord::try_from(media).map_err(MetaError::from)?,
            content: ContentRecord::try_from(content).map_err(MetaError::from)?,
            deduplicated: r.deduplicated,
        })
    }

    pub async fn expire_pending(&self, now_ms: u64) -> Result<u64, MetaError> {
        let req = pb::ExpirePendingRequest { now_ms };
        let resp = self.retrying(Retry::Write, |mut cl| async move { cl.expire_pending(req).await }).await?;
        Ok(resp.into_inner().removed)
    }

    /// The mxc record and, once uploaded, its content record.
    pub async fn get_media(&self, key: &MediaKey) -> Result<Option<(MediaRecord, Option<ContentRecord>)>, MetaError> {
        let req = pb::GetMediaRequest { media: Some(key.into()) };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move { cl.get_media(req).await }
            })
            .await?;
        let r = resp.into_inner();
        let Some(media) = r.media else { return Ok(None) };
        let media = MediaRecord::try_from(media).map_err(MetaError::from)?;
        let content = r.content.map(ContentRecord::try_from).transpose().map_err(MetaError::from)?;
        Ok(Some((media, content)))
    }

    pub async fn get_content(&self, cid: &Cid) -> Result<Option<ContentRecord>, MetaError> {
        let req = pb::GetContentRequest { cid: cid.to_bytes() };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move { cl.get_content(req).await }
            })
            .await?;
        resp.into_inner().content.map(ContentRecord::try_from).transpose().map_err(MetaError::from)
    }

    /// For each object key, whether the metadata references it (a linearizable read).
    pub async fn referenced(&self, keys: &[String]) -> Result<Vec<bool>, MetaError> {
        let req = pb::ReferencedRequest { keys: keys.to_vec() };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move { cl.referenced(req).await }
            })
            .await?;
        let referenced = resp.into_inner().referenced;
        if referenced.len() != keys.len() {
            return Err(wire("referenced: wrong number of answers"));
        }
        Ok(referenced)
    }

    /// Subscribes to the change feed of one metadata node (the current one; call again after
    /// the stream ends, which also moves on to the next node if that one is down).
    pub async fn watch_changes(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<Change, MetaError>> + Send + 'static, MetaError> {
        use futures::StreamExt;
        let url = self.current();
        let mut client = self.client_for(&url)?;
        let stream = match client.watch_changes(pb::WatchChangesRequest {}).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                self.set_current(self.next_after(&url));
                return Err(meta_error_from_status(&status));
            }
        };
        Ok(stream.map(|item| match item {
            Ok(c) if c.kind == pb::change::Kind::Ready as i32 => match c.media {
                Some(m) => Ok(Change::Ready(m.into())),
                None => Ok(Change::Resync),
            },
            Ok(_) => Ok(Change::Resync),
            Err(status) => Err(meta_error_from_status(&status)),
        }))
    }

    /// `(last_applied, media_count, content_count)` of the node answering.
    pub async fn status(&self) -> Result<(u64, u64, u64), MetaError> {
        let resp = self
            .retrying(Retry::Read, |mut cl| async move { cl.status(pb::StatusRequest { digest: false }).await })
            .await?;
        let s = resp.into_inner();
        Ok((s.last_applied, s.media_count, s.content_count))
    }
}

fn wire(what: &str) -> MetaError {
    MetaError::Internal(format!("malformed answer from the metadata service: {what}"))
}
