//! The client edges use to reach the metadata service.
//!
//! Knows every metadata node's address and keeps one cached tonic channel (HTTP/2,
//! multiplexed) per node. Every call has a deadline. A follower's "not the leader" answer
//! names the leader (`x-mxcas-leader`), and the client retries there at once; other
//! "unavailable" answers (no leader yet, node down) are retried on another node with capped
//! exponential backoff within a time budget, for calls that are safe to repeat (reads, and
//! commits, which are idempotent by what they say). A node that just failed to answer at all
//! is tried last, and is not followed to even when another node still names it as leader; the
//! node calls go to first follows the one that last answered a write (the leader).
//!
//! Concurrent commits share calls: while one `CommitUploads` call is in flight, commits
//! arriving meanwhile wait and go together in the next one (at most [`COMMITS_IN_FLIGHT`]
//! calls at a time), so an edge under load costs the leader one call per group, not per upload.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cid::Cid;
use mxcas_proto::meta as pb;
use mxcas_proto::meta::meta_client::MetaClient as PbClient;
use tonic::transport::Channel;

use crate::claims::Claim;
use crate::command::{CommitOutcome, Generations, ThumbnailOutcome};
use crate::error::MetaError;
use crate::model::{ContentRecord, MediaKey, MediaRecord, Quota, ThumbnailRecord, ThumbnailSpec, Usage};
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

/// `CommitUploads` calls one client has in flight at a time.
pub const COMMITS_IN_FLIGHT: usize = 4;
/// Commits in one `CommitUploads` call, at most (the service takes up to 1024).
const COMMITS_PER_CALL: usize = 256;
/// How long commits go one per call after a node answered that it does not know
/// `CommitUploads`, before that is tried again (a rolling upgrade may be over by then).
const SINGLE_COMMITS_FOR: Duration = Duration::from_secs(60);

type CommitReply = tokio::sync::oneshot::Sender<Result<CommitOutcome, MetaError>>;

struct Inner {
    /// Commits waiting for the next `CommitUploads` call (the task sending them holds only a
    /// weak reference: it stops once the last client is dropped).
    commits: Mutex<Option<tokio::sync::mpsc::UnboundedSender<(pb::CommitUploadRequest, CommitReply)>>>,
    /// Until when commits go one per call: a node answered that it does not know
    /// `CommitUploads` (an older version, during a rolling upgrade).
    single_commits_until: Mutex<Option<tokio::time::Instant>>,
    endpoints: Vec<String>,
    config: ClientConfig,
    channels: Mutex<HashMap<String, PbClient<Channel>>>,
    /// Where calls go first: the last known leader.
    current: Mutex<String>,
    /// When each node last failed to answer at all (timeout, connection refused): such nodes
    /// are tried after every other one.
    silent_since: Mutex<HashMap<String, tokio::time::Instant>>,
}

/// One event of the change feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The mxc now has content.
    Ready(MediaKey),
    /// The content record of this CID changed: drop cached copies.
    Content(Cid),
    /// Changes were missed: treat every cached mutable fact as stale.
    Resync,
    /// The leader still leads; every change up to the index was sent.
    Alive,
}

/// A finished upload as the edge stored it, to be committed.
#[derive(Clone, Debug)]
pub struct CommitRequest {
    pub server_name: String,
    /// `None`: a synchronous upload, the media ID is the CID.
    pub media_id: Option<String>,
    pub user_id: String,
    pub content: ContentRecord,
    pub content_type: String,
    pub filename: Option<String>,
    /// The stored copy under this key was found missing or corrupt: replace it.
    pub lost_key: Option<String>,
    /// Counted against the user's and the server name's quota (see `Command::Limited`).
    pub quota: Option<Quota>,
}

impl From<&CommitRequest> for pb::CommitUploadRequest {
    fn from(c: &CommitRequest) -> Self {
        pb::CommitUploadRequest {
            media: Some(pb::MediaKey {
                server_name: c.server_name.clone(),
                media_id: c.media_id.clone().unwrap_or_default(),
            }),
            user_id: c.user_id.clone(),
            content: Some((&c.content).into()),
            content_type: c.content_type.clone(),
            filename: c.filename.clone(),
            lost_key: c.lost_key.clone(),
            quota: c.quota.as_ref().map(Into::into),
        }
    }
}

/// Picks the node to try after `failed` within one call: nodes that did not fail in this call
/// first, then those silent longest ago (never-silent first), in configured order after
/// `failed` among equals. Pure, for unit tests.
fn pick_next(
    endpoints: &[String],
    failed: &str,
    failed_in_call: &std::collections::HashSet<String>,
    silent_since: &HashMap<String, tokio::time::Instant>,
) -> String {
    let n = endpoints.len();
    let start = endpoints.iter().position(|e| e == failed).map(|i| i + 1).unwrap_or(0);
    (0..n)
        .map(|k| &endpoints[(start + k) % n])
        .filter(|e| *e != failed)
        .enumerate()
        .min_by_key(|(order, e)| (failed_in_call.contains(*e), silent_since.get(*e).copied(), *order))
        .map(|(_, e)| e.clone())
        .unwrap_or_else(|| failed.to_owned())
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
                commits: Mutex::new(None),
                single_commits_until: Mutex::new(None),
                endpoints,
                config,
                channels: Mutex::new(HashMap::new()),
                current: Mutex::new(first.clone()),
                silent_since: Mutex::new(HashMap::new()),
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

    fn mark_silent(&self, url: &str, silent: bool) {
        if let Ok(mut m) = self.inner.silent_since.lock() {
            if silent {
                m.insert(url.to_owned(), tokio::time::Instant::now());
            } else {
                m.remove(url);
            }
        }
    }

    fn next_after(&self, url: &str, failed_in_call: &std::collections::HashSet<String>) -> String {
        let silent = self.inner.silent_since.lock().map(|m| m.clone()).unwrap_or_default();
        pick_next(&self.inner.endpoints, url, failed_in_call, &silent)
    }

    /// Runs `call` against the leader: follows redirects always, and retries other
    /// "unavailable" answers (on another node, with backoff) as `retry` allows.
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
        let mut failed_in_call = std::collections::HashSet::new();
        loop {
            let url = self.current();
            let attempt_end = deadline.min(tokio::time::Instant::now() + attempt_cap);
            let (status, silent) = match tokio::time::timeout_at(attempt_end, call(self.client_for(&url)?)).await {
                Ok(Ok(v)) => {
                    self.mark_silent(&url, false);
                    return Ok(v);
                }
                // A transport failure (connection refused or reset: tonic keeps its cause as the
                // source; statuses a node sent have none) is as silent as a timeout.
                Ok(Err(status)) => {
                    let silent = std::error::Error::source(&status).is_some();
                    (status, silent)
                }
                Err(_) => (tonic::Status::unavailable(format!("no answer from {url} within {attempt_cap:?}")), true),
            };
            self.mark_silent(&url, silent);
            failed_in_call.insert(url.clone());
            let leader = status
                .metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok())
                .map(|a| tls::url(a, config.tls.as_ref()));
            let err = meta_error_from_status(&status);
            let now = tokio::time::Instant::now();
            match leader {
                // Not applied: this node refused it as a follower. Go to the leader, unless
                // that node just failed to answer in this very call (the follower's view is
                // older than ours: an election is under way).
                Some(leader) if leader != url && now < deadline && !failed_in_call.contains(&leader) => {
                    tracing::debug!(from = %url, to = %leader, "following the metadata leader");
                    self.set_current(leader);
                    continue;
                }
                _ => {}
            }
            if !err.is_retryable() || !idempotent || now + backoff > deadline {
                return Err(err);
            }
            let next = self.next_after(&url, &failed_in_call);
            if failed_in_call.len() >= self.inner.endpoints.len() {
                // Every node was tried: start a new round, silent nodes still last.
                failed_in_call.clear();
            }
            tracing::debug!(node = %url, next = %next, error = %err, ?backoff, "metadata call failed; trying another node");
            self.set_current(next);
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
        ttl: Duration,
        max_pending_per_user: u32,
        quota: Option<&Quota>,
    ) -> Result<MediaRecord, MetaError> {
        let req = pb::CreatePendingRequest {
            media: Some(media.into()),
            user_id: user_id.to_owned(),
            ttl_ms: ttl.as_millis() as u64,
            max_pending_per_user,
            quota: quota.map(Into::into),
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

    /// Records a finished upload; safe to retry (the same commit gets the same answer).
    /// Concurrent commits are sent together (see the module documentation).
    pub async fn commit_upload(&self, c: &CommitRequest) -> Result<CommitOutcome, MetaError> {
        let req = pb::CommitUploadRequest::from(c);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut queue = self.inner.commits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            // Started on first use (on the caller's runtime: a client belongs to the runtime it
            // is used on, like its channels), and again if its task ended.
            let queue = match queue.as_ref() {
                Some(q) if !q.is_closed() => q,
                _ => queue.insert(self.start_committer()),
            };
            queue.send((req, tx)).map_err(|_| MetaError::Unavailable("commit queue closed".into()))?;
        }
        rx.await.map_err(|_| MetaError::Unavailable("commit dropped: the client is shutting down".into()))?
    }

    /// Starts the task that groups queued commits into `CommitUploads` calls.
    fn start_committer(&self) -> tokio::sync::mpsc::UnboundedSender<(pb::CommitUploadRequest, CommitReply)> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(pb::CommitUploadRequest, CommitReply)>();
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let slots = Arc::new(tokio::sync::Semaphore::new(COMMITS_IN_FLIGHT));
            while let Some(first) = rx.recv().await {
                // Wait for a slot before taking the queue: commits arriving meanwhile join.
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                // A commit whose caller gave up meanwhile (an upload cancelled) is not sent.
                let mut group: Vec<_> = Some(first).into_iter().filter(|(_, r)| !r.is_closed()).collect();
                while group.len() < COMMITS_PER_CALL {
                    match rx.try_recv() {
                        Ok(c) if c.1.is_closed() => {}
                        Ok(c) => group.push(c),
                        Err(_) => break,
                    }
                }
                if group.is_empty() {
                    continue;
                }
                let Some(inner) = weak.upgrade() else { return };
                let client = MetaClient { inner };
                tokio::spawn(async move {
                    client.commit_group(group).await;
                    drop(slot);
                });
            }
        });
        tx
    }

    /// Commits `group` in one call and answers each commit.
    async fn commit_group(&self, group: Vec<(pb::CommitUploadRequest, CommitReply)>) {
        let (reqs, replies): (Vec<_>, Vec<_>) = group.into_iter().unzip();
        let results: Vec<Result<CommitOutcome, MetaError>> = match self.commit_uploads(reqs.clone()).await {
            Ok(results) => results,
            Err(e) => vec![Err(e); replies.len()],
        };
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }

    /// One answer per commit, in order; `Err` when the call as a whole failed.
    async fn commit_uploads(
        &self,
        reqs: Vec<pb::CommitUploadRequest>,
    ) -> Result<Vec<Result<CommitOutcome, MetaError>>, MetaError> {
        let single_until = self.inner.single_commits_until.lock().map(|u| *u).unwrap_or(None);
        if single_until.is_none_or(|until| tokio::time::Instant::now() >= until) {
            let req = pb::CommitUploadsRequest { commits: reqs.clone() };
            let answer = self
                .retrying(Retry::Write, |mut cl| {
                    let req = req.clone();
                    async move {
                        match cl.commit_uploads(req).await {
                            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
                            other => other.map(Some),
                        }
                    }
                })
                .await?;
            match answer {
                Some(resp) => {
                    let results = resp.into_inner().results;
                    if results.len() != reqs.len() {
                        return Err(wire("commit_uploads: answers do not match the commits"));
                    }
                    return Ok(results.into_iter().map(commit_result).collect());
                }
                None => {
                    tracing::info!(
                        "a metadata node predates CommitUploads: committing one upload per call for {SINGLE_COMMITS_FOR:?}"
                    );
                    if let Ok(mut until) = self.inner.single_commits_until.lock() {
                        *until = Some(tokio::time::Instant::now() + SINGLE_COMMITS_FOR);
                    }
                }
            }
        }
        Ok(futures::future::join_all(reqs.into_iter().map(|req| async move {
            let resp = self
                .retrying(Retry::Write, |mut cl| {
                    let req = req.clone();
                    async move { cl.commit_upload(req).await }
                })
                .await?;
            commit_outcome(resp.into_inner())
        }))
        .await)
    }

    /// Starts an orphan sweep (see [`crate::command::Command::BeginSweep`]); safe to retry.
    pub async fn begin_sweep(&self, min_interval: Duration) -> Result<Generations, MetaError> {
        let req = pb::BeginSweepRequest { min_interval_ms: min_interval.as_millis() as u64 };
        let resp = self.retrying(Retry::Write, |mut cl| async move { cl.begin_sweep(req).await }).await?;
        Ok(resp.into_inner().into())
    }

    /// The current reclaim generations (linearizable).
    pub async fn generations(&self) -> Result<Generations, MetaError> {
        let resp = self
            .retrying(Retry::Read, |mut cl| async move { cl.get_generations(pb::GetGenerationsRequest {}).await })
            .await?;
        Ok(resp.into_inner().into())
    }

    /// Records `id` as the blob store's identity unless one is recorded; returns the recorded
    /// one. Safe to retry.
    pub async fn register_store(&self, id: u64) -> Result<u64, MetaError> {
        let req = pb::RegisterStoreRequest { store_id: id };
        let resp = self.retrying(Retry::Write, |mut cl| async move { cl.register_store(req).await }).await?;
        Ok(resp.into_inner().store_id)
    }

    /// Marks `cid`'s stored bytes under `blob_key` as lost; safe to retry. Returns whether
    /// the record still named that key.
    pub async fn report_lost(&self, cid: &Cid, blob_key: &str) -> Result<bool, MetaError> {
        let req = pb::ReportLostRequest { cid: cid.to_bytes(), blob_key: blob_key.to_owned() };
        let resp = self
            .retrying(Retry::Write, |mut cl| {
                let req = req.clone();
                async move { cl.report_lost(req).await }
            })
            .await?;
        Ok(resp.into_inner().marked)
    }

    /// The mxc record and, once uploaded, its content record (a linearizable read).
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

    /// Records that `root`'s stored DAG holds `blocks` (see [`Command::IndexBlocks`]), in
    /// calls of at most [`MAX_BLOCKS_PER_INDEX`]; safe to retry. Returns the blocks added.
    ///
    /// [`Command::IndexBlocks`]: crate::command::Command::IndexBlocks
    /// [`MAX_BLOCKS_PER_INDEX`]: crate::command::MAX_BLOCKS_PER_INDEX
    pub async fn index_blocks(&self, root: &Cid, blocks: &[Cid]) -> Result<u64, MetaError> {
        let mut added = 0;
        for part in blocks.chunks(crate::command::MAX_BLOCKS_PER_INDEX) {
            let req =
                pb::IndexBlocksRequest { root: root.to_bytes(), blocks: part.iter().map(|c| c.to_bytes()).collect() };
            let resp = self
                .retrying(Retry::Write, |mut cl| {
                    let req = req.clone();
                    async move { cl.index_blocks(req).await }
                })
                .await?;
            added += resp.into_inner().added;
        }
        Ok(added)
    }

    /// Roots of stored content whose DAG holds `block` (a linearizable read). A metadata
    /// service that predates the block index answers none.
    pub async fn find_block(&self, block: &Cid) -> Result<Vec<Cid>, MetaError> {
        let req = pb::FindBlockRequest { cid: block.to_bytes() };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move {
                    match cl.find_block(req).await {
                        Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
                        other => other.map(Some),
                    }
                }
            })
            .await?;
        let Some(resp) = resp else { return Ok(Vec::new()) };
        resp.into_inner()
            .roots
            .iter()
            .map(|b| {
                Cid::try_from(b.as_slice())
                    .map_err(|e| MetaError::Internal(format!("bad root CID from the metadata service: {e}")))
            })
            .collect()
    }

    /// Records a thumbnail stored as `content` (see [`Command::CommitThumbnail`]); safe to
    /// retry.
    ///
    /// [`Command::CommitThumbnail`]: crate::command::Command::CommitThumbnail
    pub async fn commit_thumbnail(
        &self,
        thumbnail: &ThumbnailRecord,
        content: &ContentRecord,
        lost_key: Option<&str>,
    ) -> Result<ThumbnailOutcome, MetaError> {
        let req = pb::CommitThumbnailRequest {
            thumbnail: Some(thumbnail.into()),
            content: Some(content.into()),
            lost_key: lost_key.map(str::to_owned),
        };
        let resp = self
            .retrying(Retry::Write, |mut cl| {
                let req = req.clone();
                async move { cl.commit_thumbnail(req).await }
            })
            .await?
            .into_inner();
        let thumbnail = required(resp.thumbnail, "thumbnail").and_then(|t| Ok(ThumbnailRecord::try_from(t)?))?;
        let content = required(resp.content, "content").and_then(|c| Ok(ContentRecord::try_from(c)?))?;
        Ok(ThumbnailOutcome { thumbnail, content, deduplicated: resp.deduplicated, generation: resp.generation })
    }

    /// Claims the making of `spec` of `source` for `claimant` (or, with `release`, gives its
    /// claim up). A metadata service older than claims grants every claim: edges then make
    /// thumbnails as before, and the first recorded stays.
    pub async fn claim_thumbnail(
        &self,
        source: &Cid,
        spec: &ThumbnailSpec,
        claimant: &str,
        lease: Duration,
        release: bool,
    ) -> Result<Claim, MetaError> {
        let req = pb::ClaimThumbnailRequest {
            source: source.to_bytes(),
            spec: Some(spec.into()),
            claimant: claimant.to_owned(),
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            release,
        };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move {
                    match cl.claim_thumbnail(req).await {
                        Err(s) if s.code() == tonic::Code::Unimplemented => {
                            Ok(tonic::Response::new(pb::ClaimThumbnailResponse { granted: true, held_for_ms: 0 }))
                        }
                        other => other,
                    }
                }
            })
            .await?
            .into_inner();
        Ok(claim_of(resp.granted, resp.held_for_ms))
    }

    /// Claims (or with `release`, gives up) the fetch of remote media `media` for `claimant`
    /// ([`Claim::Held`]: another edge is fetching it). A metadata node older than fetch
    /// claims answers granted.
    pub async fn claim_fetch(
        &self,
        media: &str,
        claimant: &str,
        lease: Duration,
        release: bool,
    ) -> Result<Claim, MetaError> {
        let req = pb::ClaimFetchRequest {
            media: media.to_owned(),
            claimant: claimant.to_owned(),
            lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
            release,
        };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move {
                    match cl.claim_fetch(req).await {
                        Err(s) if s.code() == tonic::Code::Unimplemented => {
                            Ok(tonic::Response::new(pb::ClaimFetchResponse { granted: true, held_for_ms: 0 }))
                        }
                        other => other,
                    }
                }
            })
            .await?
            .into_inner();
        Ok(claim_of(resp.granted, resp.held_for_ms))
    }

    /// What `user` and `tenant` uploaded in the current window of `period` (a linearizable
    /// read; the windows' `window` field is not filled).
    pub async fn usage(&self, user: &str, tenant: &str, period: Duration) -> Result<(Usage, Usage), MetaError> {
        let req = pb::GetUsageRequest {
            user_id: user.to_owned(),
            tenant: tenant.to_owned(),
            period_ms: period.as_millis() as u64,
        };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move { cl.get_usage(req).await }
            })
            .await?
            .into_inner();
        let usage =
            |u: Option<pb::Usage>| u.map(|u| Usage { window: 0, bytes: u.bytes, files: u.files }).unwrap_or_default();
        Ok((usage(resp.user), usage(resp.tenant)))
    }

    /// Every thumbnail recorded for `source`, with their content records (a linearizable read).
    pub async fn thumbnails(&self, source: &Cid) -> Result<Vec<(ThumbnailRecord, ContentRecord)>, MetaError> {
        let req = pb::GetThumbnailsRequest { source: source.to_bytes() };
        let resp = self
            .retrying(Retry::Read, |mut cl| {
                let req = req.clone();
                async move { cl.get_thumbnails(req).await }
            })
            .await?;
        let mut out = Vec::new();
        for t in resp.into_inner().thumbnails {
            let record = required(t.thumbnail, "thumbnail").and_then(|t| Ok(ThumbnailRecord::try_from(t)?))?;
            // A record without content is damage on the node: skip it (it is made again).
            if let Some(c) = t.content {
                out.push((record, ContentRecord::try_from(c)?));
            }
        }
        Ok(out)
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

    /// Subscribes to the change feed (served by the leader; followers redirect there) from
    /// after log index `after` (0: from now). Items are `(index, change)`; resume after the
    /// last index seen by calling again once the stream ends or stays silent.
    pub async fn watch_changes(
        &self,
        after: u64,
    ) -> Result<impl futures::Stream<Item = Result<(u64, Change), MetaError>> + Send + 'static, MetaError> {
        use futures::StreamExt;
        let req = pb::WatchChangesRequest { after_index: after };
        let stream =
            self.retrying(Retry::Read, |mut cl| async move { cl.watch_changes(req).await }).await?.into_inner();
        Ok(stream.map(|item| {
            let c = item.map_err(|status| meta_error_from_status(&status))?;
            let kind = pb::change::Kind::try_from(c.kind).unwrap_or(pb::change::Kind::Resync);
            let change = match kind {
                pb::change::Kind::Ready => match c.media {
                    Some(m) => Change::Ready(m.into()),
                    None => Change::Resync,
                },
                pb::change::Kind::Content => match Cid::try_from(c.cid.as_slice()) {
                    Ok(cid) => Change::Content(cid),
                    Err(_) => Change::Resync,
                },
                pb::change::Kind::Alive => Change::Alive,
                pb::change::Kind::Resync | pb::change::Kind::Unspecified => Change::Resync,
            };
            Ok((c.index, change))
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

fn commit_result(r: pb::CommitResult) -> Result<CommitOutcome, MetaError> {
    match r.result {
        Some(pb::commit_result::Result::Committed(c)) => commit_outcome(c),
        Some(pb::commit_result::Result::Failed(f)) => {
            Err(meta_error_from_status(&tonic::Status::new(tonic::Code::from(f.code), f.message)))
        }
        None => Err(wire("commit_uploads: an empty answer")),
    }
}

fn commit_outcome(r: pb::CommitUploadResponse) -> Result<CommitOutcome, MetaError> {
    let media = r.media.ok_or_else(|| wire("commit_upload: no media"))?;
    let content = r.content.ok_or_else(|| wire("commit_upload: no content"))?;
    Ok(CommitOutcome {
        media: MediaRecord::try_from(media).map_err(MetaError::from)?,
        content: ContentRecord::try_from(content).map_err(MetaError::from)?,
        deduplicated: r.deduplicated,
        generation: r.generation,
    })
}

fn wire(what: &str) -> MetaError {
    MetaError::Internal(format!("malformed answer from the metadata service: {what}"))
}

fn required<T>(field: Option<T>, name: &str) -> Result<T, MetaError> {
    field.ok_or_else(|| MetaError::Internal(format!("malformed answer from the metadata service: no {name}")))
}

/// A claim response's answer.
fn claim_of(granted: bool, held_for_ms: u64) -> Claim {
    if granted { Claim::Granted } else { Claim::Held(Duration::from_millis(held_for_ms)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps() -> Vec<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_node_that_just_went_silent_is_tried_last() {
        let now = tokio::time::Instant::now();
        let mut silent = HashMap::new();
        let mut in_call = std::collections::HashSet::new();
        // Plain round robin while nobody is silent.
        assert_eq!(pick_next(&eps(), "a", &in_call, &silent), "b");
        assert_eq!(pick_next(&eps(), "c", &in_call, &silent), "a");
        // "a" swallowed the call; "b" answered "no leader yet": the next try is "c", then
        // "b" again, never back to the silent "a" while others remain.
        silent.insert("a".to_string(), now);
        in_call.insert("a".to_string());
        assert_eq!(pick_next(&eps(), "a", &in_call, &silent), "b");
        in_call.insert("b".to_string());
        assert_eq!(pick_next(&eps(), "b", &in_call, &silent), "c");
        in_call.insert("c".to_string());
        assert_eq!(pick_next(&eps(), "c", &in_call, &silent), "b", "all tried: the silent node still last");
        // Across calls, a node silent long ago comes before one silent just now.
        let in_call = std::collections::HashSet::new();
        silent.insert("b".to_string(), now + Duration::from_secs(1));
        assert_eq!(pick_next(&eps(), "c", &in_call, &silent), "a");
    }
}
