//! The media service: what the HTTP handlers call. Owns the flow of an upload (ingest into
//! the blob store, commit to the metadata service, clean-up on failure or deduplication) and
//! of a download (resolve an mxc to its content, waiting for async uploads).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::Stream;
use moka::future::Cache;
use mxcas_meta::client::CommitRequest;
use mxcas_meta::{ContentRecord, MediaKey, MediaRecord, MediaState, MetaClient, MetaError};

use crate::api::error::ApiError;
use crate::cache::BlockCache;
use crate::config::MediaConfig;
use crate::ingest::ingest;
use crate::metrics::{Metrics, ResultLabels};
use crate::store::BlobStore;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// An mxc that has content, with its content record.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub media: MediaRecord,
    pub content: ContentRecord,
}

pub struct MediaService {
    pub server_name: String,
    pub config: MediaConfig,
    pub freeze_after_ms: Option<u64>,
    pub meta: MetaClient,
    pub store: BlobStore,
    pub blocks: BlockCache,
    pub metrics: Arc<Metrics>,
    /// Ready mxc records (immutable once uploaded) cached for `cache.media_ttl`.
    resolved: Cache<MediaKey, Resolved>,
    /// Upload slots (`media.max_concurrent_uploads`).
    upload_slots: Arc<tokio::sync::Semaphore>,
    /// Downloads waiting for an async upload, woken by the change feed.
    waiters: std::sync::Mutex<std::collections::HashMap<MediaKey, Arc<tokio::sync::Notify>>>,
    /// Woken when changes may have been missed (feed reconnect or lag).
    resync: tokio::sync::Notify,
    poll_interval: Duration,
}

impl MediaService {
    pub fn new(
        server_name: String,
        config: MediaConfig,
        cache: &crate::config::CacheConfig,
        meta: MetaClient,
        store: BlobStore,
        blocks: BlockCache,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let freeze_after_ms = config.freeze_after_ms()?;
        let resolved = Cache::builder().max_capacity(100_000).time_to_live(cache.media_ttl).build();
        let upload_slots = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_uploads as usize));
        Ok(Self {
            server_name,
            config,
            freeze_after_ms,
            meta,
            store,
            blocks,
            metrics,
            resolved,
            upload_slots,
            waiters: Default::default(),
            resync: tokio::sync::Notify::new(),
            poll_interval: cache.change_poll_interval,
        })
    }

    /// Reserves a new media ID for `user` (`POST /create`). Returns `(mxc, expires_at_ms)`.
    pub async fn create_pending(&self, user: &str) -> Result<(MediaKey, u64), ApiError> {
        let now = now_ms();
        let expires = now + self.config.unused_expires_after.as_millis() as u64;
        let key = MediaKey::new(&self.server_name, random_media_id());
        self.meta.create_pending(&key, user, now, expires, self.config.max_pending_uploads_per_user).await?;
        Ok((key, expires))
    }

    /// Stores `body` and records it: as a new mxc named by its CID (`media_id == None`) or as
    /// the content of a reserved media ID. Returns the mxc.
    pub async fn upload<S, E>(
        &self,
        user: &str,
        media_id: Option<String>,
        content_type: String,
        filename: Option<String>,
        body: S,
    ) -> Result<MediaKey, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if let Some(id) = &media_id {
            self.check_reservation(user, id).await?;
        }
        let _slot = match tokio::time::timeout(Duration::from_secs(10), self.upload_slots.clone().acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            _ => return Err(ApiError::unavailable("Too many uploads in progress; retry shortly", 5_000)),
        };
        let started = now_ms();
        let limit = self.config.max_upload_size.as_u64();
        let ingested = match ingest(&self.store, body, limit, self.config.upload_idle_timeout, started).await {
            Ok(i) => i,
            Err(e) => {
                self.count_upload("error");
                return Err(e.into());
            }
        };
        self.metrics.upload_bytes.inc_by(ingested.content.size);
        let request = CommitRequest {
            upload_id: uuid::Uuid::new_v4().to_string(),
            server_name: self.server_name.clone(),
            media_id,
            user_id: user.to_owned(),
            now_ms: now_ms(),
            content: ingested.content.clone(),
            content_type,
            filename,
        };
        match self.meta.commit_upload(&request).await {
            Ok(outcome) => {
                if outcome.deduplicated {
                    self.store.delete_later(ingested.keys());
                    self.count_upload("deduplicated");
                } else {
                    self.count_upload("new");
                }
                tracing::debug!(mxc = %outcome.media.key, size = outcome.content.size, dedup = outcome.deduplicated, "uploaded");
                Ok(outcome.media.key)
            }
            Err(e) => {
                // A commit that may have been applied (unavailable after sending) leaves a
                // referenced blob: only delete when the service surely refused it.
                if matches!(e, MetaError::Rejected(_)) {
                    self.store.delete_later(ingested.keys());
                }
                self.count_upload("error");
                Err(e.into())
            }
        }
    }

    /// Fails fast, before any byte is read, when `media_id` cannot take this user's upload
    /// (the metadata service checks again, atomically, when the upload commits).
    async fn check_reservation(&self, user: &str, media_id: &str) -> Result<(), ApiError> {
        let key = MediaKey::new(&self.server_name, media_id);
        let rejected = |e: mxcas_meta::CommandError| ApiError::from(MetaError::Rejected(e));
        match self.meta.get_media(&key).await? {
            None => Err(rejected(mxcas_meta::CommandError::NotFound)),
            Some((MediaRecord { state: MediaState::Ready { .. }, .. }, _)) => {
                Err(rejected(mxcas_meta::CommandError::AlreadyExists))
            }
            Some((MediaRecord { uploader, .. }, _)) if uploader != user => {
                Err(rejected(mxcas_meta::CommandError::PermissionDenied))
            }
            Some((MediaRecord { state: MediaState::Pending { expires_at_ms }, .. }, _))
                if expires_at_ms <= now_ms() =>
            {
                Err(rejected(mxcas_meta::CommandError::NotFound))
            }
            Some(_) => Ok(()),
        }
    }

    fn count_upload(&self, result: &'static str) {
        self.metrics.uploads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Resolves an mxc of this server to its content, waiting up to `wait` for an async upload
    /// that has not arrived yet.
    pub async fn resolve(&self, key: &MediaKey, wait: Duration, legacy: bool) -> Result<Resolved, ApiError> {
        if key.server_name != self.server_name {
            return Err(ApiError::not_found(format!(
                "Media from {} is not held here (fetching from other servers is not supported yet)",
                key.server_name
            )));
        }
        let resolved = match self.resolved.get(key).await {
            Some(r) => r,
            None => self.resolve_uncached(key, wait).await?,
        };
        if legacy
            && let Some(freeze) = self.freeze_after_ms
            && resolved.media.created_at_ms > freeze
        {
            return Err(ApiError::not_found(
                "Media uploaded after the freeze is only available through /_matrix/client/v1/media",
            ));
        }
        Ok(resolved)
    }

    async fn resolve_uncached(&self, key: &MediaKey, wait: Duration) -> Result<Resolved, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.waiter(key);
        let result = loop {
            // Register for wake-ups before looking, so a change between the look and the wait
            // is not missed.
            let changed = notify.notified();
            let resynced = self.resync.notified();
            tokio::pin!(changed, resynced);
            changed.as_mut().enable();
            resynced.as_mut().enable();
            match self.meta.get_media(key).await {
                Err(e) => break Err(e.into()),
                Ok(None) => break Err(ApiError::not_found("Media not found")),
                Ok(Some((media @ MediaRecord { state: MediaState::Ready { .. }, .. }, Some(content)))) => {
                    let r = Resolved { media, content };
                    self.resolved.insert(key.clone(), r.clone()).await;
                    break Ok(r);
                }
                Ok(Some((MediaRecord { state: MediaState::Ready { .. }, .. }, None))) => {
                    break Err(ApiError::internal("Media record has no content record"));
                }
                Ok(Some((MediaRecord { state: MediaState::Pending { expires_at_ms }, .. }, _))) => {
                    if expires_at_ms <= now_ms() {
                        break Err(ApiError::not_found("Media not found"));
                    }
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        break Err(ApiError::new(
                            axum::http::StatusCode::GATEWAY_TIMEOUT,
                            "M_NOT_YET_UPLOADED",
                            "The media has not been uploaded yet",
                        ));
                    }
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = &mut resynced => {}
                        _ = tokio::time::sleep(self.poll_interval.min(deadline - now)) => {}
                    }
                }
            }
        };
        self.release_waiter(key, notify);
        result
    }

    fn waiter(&self, key: &MediaKey) -> Arc<tokio::sync::Notify> {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(key.clone()).or_default().clone()
    }

    fn release_waiter(&self, key: &MediaKey, notify: Arc<tokio::sync::Notify>) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: nobody else waits on this key.
        if Arc::strong_count(&notify) == 2 {
            w.remove(key);
        }
    }

    /// Follows the metadata service's change feed (runs until `cancel`): wakes downloads
    /// waiting on an mxc as soon as it has content, and every waiter after a gap.
    pub async fn watch_loop(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        use futures::StreamExt;
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                s = self.meta.watch_changes() => s,
            };
            match stream {
                Ok(mut stream) => {
                    // Anything may have happened while we were not watching.
                    self.resync.notify_waiters();
                    loop {
                        let item = tokio::select! {
                            _ = cancel.cancelled() => return,
                            item = stream.next() => item,
                        };
                        match item {
                            Some(Ok(mxcas_meta::client::Change::Ready(key))) => {
                                let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
                                if let Some(n) = w {
                                    n.notify_waiters();
                                }
                            }
                            Some(Ok(mxcas_meta::client::Change::Resync)) => self.resync.notify_waiters(),
                            Some(Err(e)) => {
                                tracing::debug!(error = %e, "change feed interrupted");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot subscribe to the change feed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Expires unused reservations now and then (runs until `cancel`).
    pub async fn expire_loop(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    match self.meta.expire_pending(now_ms()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "expired unused media reservations"),
                        Err(e) => tracing::warn!(error = %e, "could not expire media reservations"),
                    }
                }
            }
        }
    }
}

/// 24 random characters of `[A-Za-z0-9]` (~143 bits): unguessable, and visibly not a CID.
fn random_media_id() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect()
}
