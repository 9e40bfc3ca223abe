//! The media service: what the HTTP handlers call. Owns the flow of an upload (ingest into
//! the blob store under the current reclaim generation, commit to the metadata service,
//! storing again when the generation was sealed meanwhile, repairing lost content, releasing
//! duplicates) and of a download (resolve an mxc to its content, waiting for async uploads,
//! telling data loss from a record that moved).
//!
//! The edge deletes an object it wrote only when the metadata service said, in the same
//! command that decided it, that no commit can ever reference it (a released duplicate), or
//! when no commit of it was ever sent (a failed ingest). Everything else that ends up
//! unreferenced is the sweeper's, which only deletes objects of sealed generations.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cid::Cid;
use futures::Stream;
use moka::future::Cache;
use mxcas_meta::client::CommitRequest;
use mxcas_meta::model::ThumbnailRecord;
use mxcas_meta::{CommandError, ContentRecord, MediaKey, MediaRecord, MediaState, MetaClient, MetaError};

use crate::api::error::ApiError;
use crate::cache::BlockCache;
use crate::cache::BlockError;
use crate::config::MediaConfig;
use crate::ingest::{Pace, ingest};
use crate::metrics::{Metrics, ResultLabels};
use crate::pause::{self, PausePoints};
use crate::store::BlobStore;

/// Adds `info_uri` to a user's quota refusal and `admin_contact` to a tenant's.
fn with_quota_details(mut e: ApiError, to: UploadTo<'_>) -> ApiError {
    match e.errcode {
        "M_USER_LIMIT_EXCEEDED" => e.info_uri = to.quota_info_uri.map(str::to_owned),
        "M_RESOURCE_LIMIT_EXCEEDED" => e.admin_contact = to.quota_admin_contact.map(str::to_owned),
        _ => {}
    }
    e
}

fn is_quota_refusal(e: &ApiError) -> bool {
    matches!(e.errcode, "M_USER_LIMIT_EXCEEDED" | "M_RESOURCE_LIMIT_EXCEEDED")
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How remote bytes prove they are what their media ID names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    /// Not yet: a CID media ID must be mxcas's CID of them.
    Recompute,
    /// Each block was verified against the media ID's DAG as it arrived; `served_as` is the
    /// type a download was answered with while they arrived (recorded as is).
    Blocks { served_as: Option<String> },
}

/// An mxc that has content, with its content record.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub media: MediaRecord,
    pub content: ContentRecord,
}

/// Where an upload goes: its tenant's server name and size limit.
#[derive(Clone, Copy, Debug)]
pub struct UploadTo<'a> {
    pub server_name: &'a str,
    pub max_size: u64,
    /// The tenant's quotas (held in the metadata, across every edge).
    pub quota: Option<&'a mxcas_meta::model::Quota>,
    /// Sent with a user's quota refusal.
    pub quota_info_uri: Option<&'a str>,
    /// Sent with a tenant's quota refusal.
    pub quota_admin_contact: Option<&'a str>,
}

pub struct MediaService {
    /// The server names whose media is held here (every tenant's).
    pub local: std::collections::BTreeSet<String>,
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
    /// Uploads in progress per user (`media.max_concurrent_uploads_per_user`).
    uploading: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    /// Downloads waiting for an async upload, woken by the change feed.
    waiters: std::sync::Mutex<std::collections::HashMap<MediaKey, Arc<tokio::sync::Notify>>>,
    /// Woken when changes may have been missed (feed reconnect or lag).
    resync: tokio::sync::Notify,
    poll_interval: Duration,
    /// The reclaim generation new uploads store under (0: not learnt yet).
    generation: AtomicU64,
    /// Bumped by every invalidation from the change feed: a record read before one is not
    /// cached after it (the read may predate the change).
    invalidations: AtomicU64,
    /// Test hooks (see [`crate::pause`]).
    pub pause: PausePoints,
}

/// A change feed with no message (the leader sends ALIVE every second) for this long is left
/// for another node.
/// (An ALIVE can be late by a read-index round or two under load, 2 s each.)
const FEED_SILENCE: Duration = Duration::from_secs(6);

/// Commit attempts of one upload (a commit may be refused as reclaimed, or find the stored
/// copy lost, and go again).
const COMMIT_ROUNDS: usize = 4;

impl MediaService {
    pub fn new(
        local: std::collections::BTreeSet<String>,
        config: MediaConfig,
        cache: &crate::config::CacheConfig,
        meta: MetaClient,
        store: BlobStore,
        blocks: BlockCache,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let freeze_after_ms = config.freeze_after_ms()?;
        let resolved = Cache::builder()
            .max_capacity(100_000)
            .time_to_live(cache.media_ttl)
            .support_invalidation_closures()
            .build();
        let upload_slots = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_uploads as usize));
        Ok(Self {
            local,
            config,
            freeze_after_ms,
            meta,
            store,
            blocks,
            metrics,
            resolved,
            upload_slots,
            uploading: Default::default(),
            waiters: Default::default(),
            resync: tokio::sync::Notify::new(),
            poll_interval: cache.change_poll_interval,
            generation: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            pause: PausePoints::default(),
        })
    }

    /// The reclaim generation to store a new upload under.
    async fn current_generation(&self) -> Result<u64, ApiError> {
        match self.generation.load(Ordering::Relaxed) {
            0 => {
                let g = self.meta.generations().await?;
                self.learn_generation(g.generation);
                Ok(g.generation)
            }
            g => Ok(g),
        }
    }

    /// Takes the generation the metadata service answered with. Not a maximum: a cluster
    /// restored from a backup may be at an older one, and keys must be of issued generations.
    fn learn_generation(&self, generation: u64) {
        // Generations only grow (a restore jumps them far ahead), so a late answer never
        // moves an edge back.
        self.generation.fetch_max(generation, Ordering::Relaxed);
    }

    /// Checks that this edge's blob store is the cluster's: its `mxcas/store-id` object names
    /// the identity the metadata records (registering one on first use). Only then may a
    /// missing object be called lost; otherwise the store is misconfigured (wrong bucket,
    /// unmounted directory), which is answered as unavailable and never recorded as loss.
    pub async fn check_store_identity(&self) -> Result<(), ApiError> {
        use crate::store::{STORE_ID_KEY, StoreError};
        let misconfigured = |why: String| {
            tracing::error!(
                "blob store identity check failed: {why}; is this edge's [store] the cluster's bucket or directory?"
            );
            self.metrics.store_misconfigured.inc();
            ApiError::unavailable("Media storage is misconfigured on this server; an operator must fix it", 30_000)
        };
        let unavailable = |e: StoreError| {
            tracing::warn!(error = %e, "cannot read the blob store's identity");
            ApiError::unavailable("Media storage is temporarily unavailable; retry later", 2_000)
        };
        let read = || async {
            match self.store.get(STORE_ID_KEY).await {
                Ok(b) => Ok(std::str::from_utf8(&b).ok().and_then(|s| s.trim().parse::<u64>().ok()).or(Some(0))),
                Err(StoreError::NotFound(_)) => Ok(None),
                Err(e) => Err(unavailable(e)),
            }
        };
        let recorded = self.meta.generations().await?.store_id;
        let in_store = read().await?;
        match (recorded, in_store) {
            (0, _) => {
                // First use: the store's marker (made now if absent) becomes the cluster's.
                let id = match in_store {
                    Some(id) if id != 0 => id,
                    Some(_) => return Err(misconfigured(format!("{STORE_ID_KEY} is malformed"))),
                    None => {
                        let fresh = rand::random::<u64>().max(1);
                        self.store.put_if_absent(STORE_ID_KEY, fresh.to_string().into()).await.map_err(unavailable)?;
                        read().await?.unwrap_or(0)
                    }
                };
                let registered = self.meta.register_store(id).await?;
                if registered != id {
                    return Err(misconfigured(format!(
                        "{STORE_ID_KEY} holds {id}, the cluster's store is {registered}"
                    )));
                }
                Ok(())
            }
            (want, Some(found)) if found == want => Ok(()),
            (want, Some(found)) => {
                Err(misconfigured(format!("{STORE_ID_KEY} holds {found}, the cluster's store is {want}")))
            }
            (want, None) => Err(misconfigured(format!("{STORE_ID_KEY} (the cluster's store {want}) is missing"))),
        }
    }

    /// Reserves a new media ID for `user` (`POST /create`). Returns `(mxc, expires_at_ms)`.
    pub async fn create_pending(&self, to: UploadTo<'_>, user: &str) -> Result<(MediaKey, u64), ApiError> {
        // Over quota: refused before it costs a raft write (the command checks again).
        self.check_quota(to, user).await?;
        let key = MediaKey::new(to.server_name, random_media_id());
        let ttl = self.config.unused_expires_after;
        let record = self
            .meta
            .create_pending(&key, user, ttl, self.config.max_pending_uploads_per_user, to.quota)
            .await
            .map_err(|e| with_quota_details(e.into(), to))?;
        let expires = match record.state {
            MediaState::Pending { expires_at_ms } => expires_at_ms,
            MediaState::Ready { .. } => return Err(ApiError::internal("a new reservation already has content")),
        };
        Ok((key, expires))
    }

    /// How long a live download may take to accept a chunk before it is cut
    /// ([`crate::flight::tee`]): well within the idle time the store's ingest allows.
    pub fn live_grace(&self) -> Duration {
        (self.config.upload_idle_timeout / 4).min(Duration::from_secs(10))
    }

    fn pace(&self) -> Pace {
        Pace { idle_timeout: self.config.upload_idle_timeout, min_rate: self.config.min_upload_rate.as_u64() }
    }

    /// One of `user`'s upload slots on this edge, or 429 when they are all taken.
    fn user_slot(&self, user: &str) -> Result<UserSlot, ApiError> {
        let mut uploading = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        let n = uploading.entry(user.to_owned()).or_insert(0);
        if *n >= self.config.max_concurrent_uploads_per_user {
            return Err(ApiError {
                retry_after_ms: Some(5_000),
                ..ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "M_LIMIT_EXCEEDED",
                    format!(
                        "Too many uploads in progress for this user (limit {}); finish one first",
                        self.config.max_concurrent_uploads_per_user
                    ),
                )
            });
        }
        *n += 1;
        self.metrics.uploads_in_progress.inc();
        Ok(UserSlot { uploading: self.uploading.clone(), user: user.to_owned(), metrics: self.metrics.clone() })
    }

    /// Stores `body` and records it: as a new mxc named by its CID (`media_id == None`) or as
    /// the content of a reserved media ID. Returns the mxc's record and its content's, as the
    /// commit answered them.
    pub async fn upload<S, E>(
        &self,
        to: UploadTo<'_>,
        user: &str,
        media_id: Option<String>,
        content_type: String,
        filename: Option<String>,
        body: S,
    ) -> Result<Resolved, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        if let Some(id) = &media_id {
            self.check_reservation(to.server_name, user, id).await?;
        }
        let _mine = self.user_slot(user)?;
        let _slot = match tokio::time::timeout(Duration::from_secs(10), self.upload_slots.clone().acquire_owned()).await
        {
            Ok(Ok(permit)) => permit,
            _ => return Err(ApiError::unavailable("Too many uploads in progress; retry shortly", 5_000)),
        };
        // Quotas are decided by the commit, atomically. A synchronous upload is not refused
        // before its bytes are read: the same bytes again (a client retrying an upload whose
        // answer it lost) make no new media and are never refused. A reservation is filled once,
        // so one over quota is refused before a byte is read.
        if media_id.is_some()
            && let Err(e) = self.check_quota(to, user).await
        {
            if is_quota_refusal(&e) {
                self.count_upload("refused");
            }
            return Err(e);
        }
        let started = now_ms();
        let limit = to.max_size;
        let generation = self.current_generation().await?;
        let ingested = match ingest(&self.store, body, limit, self.pace(), started, generation).await {
            Ok(i) => i,
            Err(e) => {
                self.count_upload("error");
                return Err(e.into());
            }
        };
        self.metrics.upload_bytes.inc_by(ingested.content.size);
        self.pause.pass(pause::BEFORE_COMMIT).await;
        // What it is served as (see crate::sniff): media named by its CID takes its type
        // from its bytes and no filename, so no uploader can change how it is served to the
        // others who upload the same bytes; a reserved ID is its uploader's own.
        let (content_type, filename) = match &media_id {
            None => (crate::sniff::by_bytes(&ingested.head).to_owned(), None),
            Some(_) => (crate::sniff::for_reserved(&ingested.head, content_type), filename),
        };
        let mut request = CommitRequest {
            server_name: to.server_name.to_owned(),
            media_id,
            user_id: user.to_owned(),
            content: ingested.content.clone(),
            content_type,
            filename,
            lost_key: None,
            quota: to.quota.cloned(),
        };
        let result = self.commit(&mut request).await.map_err(|e| with_quota_details(e, to));
        self.count_upload(match &result {
            Ok((Committed::New, _)) => "new",
            Ok((Committed::Repaired, _)) => "repaired",
            Ok((Committed::Deduplicated, _)) => "deduplicated",
            Err(e) if is_quota_refusal(e) => "refused",
            Err(_) => "error",
        });
        // On error nothing is deleted here: a commit whose answer was lost may have landed,
        // and an unreferenced object is the sweeper's once its generation is sealed.
        let (committed, resolved) = result?;
        // The upload is recorded: its slots are free before the index is written.
        drop((_slot, _mine));
        self.index_blocks(&resolved.content.cid, &ingested.blocks, matches!(committed, Committed::Deduplicated)).await;
        Ok(resolved)
    }

    /// Records the blocks of a stored DAG for the trustless gateway (every upload of it, so
    /// one whose indexing failed is indexed by the next). The bytes are safe whatever
    /// happens here: a failure only leaves inner blocks unfound by the gateway until then.
    async fn index_blocks(&self, root: &Cid, blocks: &[Cid], deduplicated: bool) {
        let Some(last) = blocks.last() else { return };
        // The same file again: indexed already unless its first indexing failed (the last
        // block is recorded with the last call).
        if deduplicated && self.meta.find_block(last).await.is_ok_and(|roots| roots.contains(root)) {
            return;
        }
        match self.meta.index_blocks(root, blocks).await {
            Ok(_) => {}
            Err(e) => {
                self.metrics.block_index_failures.inc();
                tracing::warn!(cid = %root, blocks = blocks.len(), error = %e,
                    "could not index the blocks of an upload for the IPFS gateway; uploading the file again retries");
            }
        }
    }

    /// Commits `request` until it is settled: stores the objects again under the current
    /// generation if theirs was sealed meanwhile, checks that a copy it deduplicates onto is
    /// really there and repairs it with ours if not, and deletes ours once released.
    async fn commit(&self, request: &mut CommitRequest) -> Result<(Committed, Resolved), ApiError> {
        for _ in 0..COMMIT_ROUNDS {
            let started = std::time::Instant::now();
            let answer = self.meta.commit_upload(request).await;
            self.metrics.meta_commit_seconds.observe(started.elapsed().as_secs_f64());
            let outcome = match answer {
                Ok(o) => o,
                Err(MetaError::Rejected(CommandError::Reclaimed { generation })) => {
                    self.learn_generation(generation);
                    self.restore(&mut request.content, generation).await?;
                    continue;
                }
                // Final: had an earlier attempt of this commit landed, this one would make no new
                // media and not be refused. So nothing references these objects, ever.
                Err(MetaError::Rejected(e @ CommandError::QuotaExceeded { .. })) => {
                    self.store.delete_later(request.content.object_keys().map(str::to_owned).collect());
                    return Err(MetaError::Rejected(e).into());
                }
                Err(e) => return Err(e.into()),
            };
            self.learn_generation(outcome.generation);
            if !outcome.deduplicated {
                tracing::debug!(mxc = %outcome.media.key, size = outcome.content.size, "uploaded");
                let how = if request.lost_key.is_some() {
                    self.metrics.repairs.inc();
                    tracing::warn!(cid = %outcome.content.cid, "lost content repaired by a new upload of the same bytes");
                    Committed::Repaired
                } else {
                    Committed::New
                };
                return Ok((how, Resolved { media: outcome.media, content: outcome.content }));
            }
            // The bytes are stored already; ours are released (tombstoned: no commit can
            // reference them now). Make sure that copy exists before telling the client its
            // media is safe.
            match self.stored_copy_intact(&outcome.content).await {
                Ok(true) => {
                    self.store.delete_later(request.content.object_keys().map(str::to_owned).collect());
                    return Ok((Committed::Deduplicated, Resolved { media: outcome.media, content: outcome.content }));
                }
                // Cannot tell: keep our copy (the sweeper takes it once sealed) and let the
                // client retry, which deduplicates and checks again.
                Err(e) => return Err(e),
                Ok(false) => {
                    self.metrics.data_loss.inc();
                    tracing::error!(
                        cid = %outcome.content.cid,
                        blob = %outcome.content.blob_key,
                        "stored copy of re-uploaded content is missing or corrupt; repairing it with the new upload"
                    );
                    // Our keys were released by that answer: repair with a fresh copy of them.
                    let released: Vec<String> = request.content.object_keys().map(str::to_owned).collect();
                    let generation = self.current_generation().await?;
                    self.restore(&mut request.content, generation).await?;
                    self.store.delete_later(released);
                    request.lost_key = Some(outcome.content.blob_key.clone());
                }
            }
        }
        Err(ApiError::unavailable("The upload could not be recorded; retry it", 2_000))
    }

    /// Stores the bytes of remote media `key` and records them under `key`. They are named by
    /// their CID like any content. Unless they are proven already ([`Proof::Blocks`]: each
    /// block verified against the DAG the media ID names, as a block fetch does), a media ID
    /// that is a CID must be theirs as mxcas computes it, or nothing is kept (MSC2846: bytes
    /// that do not prove their name are never stored or served). `max_size` bounds what is
    /// read.
    pub async fn store_remote<S, E>(
        &self,
        key: &MediaKey,
        declared_type: Option<String>,
        body: S,
        max_size: u64,
        proof: Proof,
    ) -> Result<Resolved, ApiError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let generation = self.current_generation().await?;
        let ingested = match ingest(&self.store, body, max_size, self.pace(), now_ms(), generation).await {
            Ok(i) => i,
            Err(crate::ingest::IngestError::TooLarge { limit }) => {
                self.count_remote("too_large");
                return Err(ApiError::remote_too_large(limit));
            }
            Err(e @ crate::ingest::IngestError::Store(_)) => return Err(e.into()),
            Err(e) => {
                self.count_remote("broken");
                return Err(ApiError::new(
                    axum::http::StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    format!("The remote answer broke off: {e}"),
                ));
            }
        };
        let objects: Vec<String> = ingested.content.object_keys().map(str::to_owned).collect();
        if proof == Proof::Recompute
            && let Ok(named) = Cid::try_from(key.media_id.as_str())
            && crate::gateway::as_v1(&named) != ingested.content.cid
        {
            self.store.delete_later(objects);
            self.count_remote("mismatch");
            tracing::warn!(mxc = %key, got = %ingested.content.cid,
                "a remote server served bytes that mxcas's profile does not give the media ID (a CID): a lie, or another chunking; discarded (its blocks may still prove it)");
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_GATEWAY,
                "M_UNKNOWN",
                "The origin served bytes that do not match the media ID (a CID): they were discarded",
            ));
        }
        let user = format!("@_mxcas_federation:{}", key.server_name);
        // A media ID spelt as the CID mxcas writes is recorded as that CID's media; any other
        // (opaque, or another spelling of a CID) through a reservation of (origin, ID).
        let cid_named = key.media_id == ingested.content.cid.to_string();
        let content_type = if let Proof::Blocks { served_as: Some(t) } = &proof {
            // What the download that watched it arrive was answered with.
            t.clone()
        } else if cid_named {
            crate::sniff::by_bytes(&ingested.head).to_owned()
        } else {
            crate::sniff::for_reserved(
                &ingested.head,
                declared_type.unwrap_or_else(|| "application/octet-stream".into()),
            )
        };
        if !cid_named {
            match self.meta.create_pending(key, &user, Duration::from_secs(60), u32::MAX, None).await {
                Ok(_) => {}
                // Reserved already: by another fetch of it (in progress or abandoned), which
                // this commit fills as the same uploader, or recorded (the commit then answers
                // that record, or refuses other bytes).
                Err(MetaError::Rejected(CommandError::AlreadyExists)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut request = CommitRequest {
            server_name: key.server_name.clone(),
            media_id: (!cid_named).then(|| key.media_id.clone()),
            user_id: user,
            content: ingested.content.clone(),
            content_type,
            filename: None,
            lost_key: None,
            quota: None,
        };
        let resolved = match self.commit(&mut request).await {
            Ok((_, r)) => r,
            // Another fetch recorded other bytes for this opaque ID first: that record stays.
            Err(e) if e.errcode == "M_CANNOT_OVERWRITE_MEDIA" || e.status == axum::http::StatusCode::CONFLICT => {
                self.store.delete_later(objects);
                return self.resolve_uncached(key, Duration::ZERO).await;
            }
            Err(e) => return Err(e),
        };
        self.count_remote("stored");
        self.index_blocks(&resolved.content.cid, &ingested.blocks, false).await;
        Ok(resolved)
    }

    fn count_remote(&self, result: &'static str) {
        self.metrics.remote_fetches.get_or_create(&ResultLabels { result }).inc();
    }

    /// Whether the legacy endpoints must not serve `r`: it arrived after the freeze. Frozen by
    /// when the upload (or the fetch from another server) arrived, by the leader's clock, not
    /// when the record was made: a reservation made before the freeze and filled after it is
    /// new media.
    pub fn frozen(&self, r: &Resolved) -> bool {
        let arrived_at_ms = match &r.media.state {
            MediaState::Ready { uploaded_at_ms, .. } => *uploaded_at_ms,
            MediaState::Pending { .. } => r.media.created_at_ms,
        };
        self.freeze_after_ms.is_some_and(|freeze| arrived_at_ms > freeze)
    }

    /// [`Self::resolve_remote`] from the metadata, past this edge's cache of records.
    pub async fn resolve_remote_fresh(&self, key: &MediaKey) -> Result<Option<Resolved>, ApiError> {
        self.resolved.invalidate(key).await;
        self.resolve_remote(key).await
    }

    /// The record of remote media `key` if this cluster holds it (no fetch). A reservation
    /// another fetch left (in progress, or abandoned) counts as not held: the caller fetches
    /// and fills it.
    pub async fn resolve_remote(&self, key: &MediaKey) -> Result<Option<Resolved>, ApiError> {
        if let Some(r) = self.resolved.get(key).await {
            return Ok(Some(r));
        }
        match self.resolve_uncached(key, Duration::ZERO).await {
            Ok(r) => Ok(Some(r)),
            Err(e)
                if matches!(e.status, axum::http::StatusCode::NOT_FOUND | axum::http::StatusCode::GATEWAY_TIMEOUT) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Stores a made thumbnail's bytes as content of their own and records them as `made`'s
    /// thumbnail (its `cid` is filled in here). Answers what the metadata recorded: ours, or
    /// one another edge recorded first (ours then released and deleted), and whether it is
    /// ours. `lost_key`: the recorded copy was found missing or corrupt there.
    pub async fn store_thumbnail(
        &self,
        mut made: ThumbnailRecord,
        bytes: Bytes,
        lost_key: Option<String>,
    ) -> Result<(ThumbnailRecord, ContentRecord, bool), ApiError> {
        let generation = self.current_generation().await?;
        let size = (bytes.len() as u64).max(1);
        let body = futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes)]);
        let mut content = ingest(&self.store, body, size, self.pace(), now_ms(), generation).await?.content;
        made.cid = content.cid;
        for _ in 0..COMMIT_ROUNDS {
            match self.meta.commit_thumbnail(&made, &content, lost_key.as_deref()).await {
                Ok(o) => {
                    self.learn_generation(o.generation);
                    if o.deduplicated {
                        self.store.delete_later(content.object_keys().map(str::to_owned).collect());
                    }
                    let ours = o.thumbnail.cid == content.cid;
                    return Ok((o.thumbnail, o.content, ours));
                }
                Err(MetaError::Rejected(CommandError::Reclaimed { generation })) => {
                    self.learn_generation(generation);
                    self.restore(&mut content, generation).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::unavailable("The thumbnail could not be recorded; retry", 2_000))
    }

    /// All of `content`'s bytes, each block verified (for sources of thumbnails: bounded by
    /// the caller).
    pub async fn read_all(&self, content: &ContentRecord) -> Result<Vec<u8>, BlockError> {
        let blocks = self.blocks.read_ahead(content, 0..BlockCache::block_count(content));
        futures::TryStreamExt::try_fold(
            blocks,
            Vec::with_capacity(content.size as usize),
            |mut out, block| async move {
                out.extend_from_slice(&block);
                Ok(out)
            },
        )
        .await
    }

    /// Copies an upload's objects to keys of `generation` (its own generation was sealed before
    /// it committed, so the sweeper may delete them at any time). A copy that fails means the
    /// bytes are gone: the upload fails, before any success was sent.
    async fn restore(&self, content: &mut ContentRecord, generation: u64) -> Result<(), ApiError> {
        let blob_key = BlobStore::new_blob_key(generation);
        let index_key = content.index_key.as_ref().map(|_| mxcas_meta::model::blob_key::index_of(&blob_key));
        let copied = async {
            self.store.copy(&content.blob_key, &blob_key).await?;
            if let (Some(from), Some(to)) = (&content.index_key, &index_key) {
                self.store.copy(from, to).await?;
            }
            Ok::<_, crate::store::StoreError>(())
        };
        if let Err(e) = copied.await {
            tracing::warn!(blob = %content.blob_key, error = %e, "upload's objects were reclaimed before it committed");
            self.store.delete_later([Some(blob_key), index_key].into_iter().flatten().collect());
            return Err(ApiError::unavailable("The upload took too long to be recorded; upload it again", 1_000));
        }
        self.metrics.restored.inc();
        content.blob_key = blob_key;
        content.index_key = index_key;
        Ok(())
    }

    /// Whether the stored copy of `content` is there, asked of the store itself (a cached
    /// block proves nothing about the object): its blob and block index must exist with the
    /// right sizes, and a one-block file is read and verified. An error means "cannot tell".
    async fn stored_copy_intact(&self, content: &ContentRecord) -> Result<bool, ApiError> {
        use crate::store::StoreError;
        let unavailable = |e: StoreError| {
            tracing::warn!(error = %e, "cannot check the stored copy of a deduplicated upload");
            ApiError::unavailable("Media storage is temporarily unavailable; retry the upload", 2_000)
        };
        let blob_ok = self.store.size(&content.blob_key).await.map_err(unavailable)? == Some(content.size);
        let intact = blob_ok
            && match &content.index_key {
                Some(index) => self.store.size(index).await.map_err(unavailable)?.is_some(),
                None => match self.store.get(&content.blob_key).await {
                    Ok(bytes) => mxcas_cas::sha256_digest(&content.cid)
                        .is_some_and(|want| <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(&bytes)) == want),
                    Err(StoreError::NotFound(_)) => false,
                    Err(e) => return Err(unavailable(e)),
                },
            };
        if !intact {
            // Only this cluster's store may say the copy is gone.
            self.check_store_identity().await?;
        }
        Ok(intact)
    }

    /// Refuses when `user`'s (or the tenant's) quota is used up, from a linearizable read of
    /// the usage, before a reservation costs a raft write. The metadata service decides again,
    /// atomically.
    async fn check_quota(&self, to: UploadTo<'_>, user: &str) -> Result<(), ApiError> {
        let Some(q) = to.quota else { return Ok(()) };
        let (u, t) = match self.meta.usage(user, to.server_name, Duration::from_millis(q.period_ms)).await {
            Ok(usage) => usage,
            // A metadata service older than quotas (mid-upgrade): no pre-check; upgrade every
            // metadata node before edges with quotas (docs/operations/cluster.md).
            Err(MetaError::Internal(m)) if m.starts_with("Unimplemented") => {
                tracing::warn!("the metadata service does not know quotas yet: upgrade it before the edges");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let full = |used: mxcas_meta::model::Usage, bytes: u64, files: u64| {
            (bytes > 0 && used.bytes >= bytes) || (files > 0 && used.files >= files)
        };
        let scope = if full(u, q.user_bytes, q.user_files) {
            mxcas_meta::model::QuotaScope::User
        } else if full(t, q.tenant_bytes, q.tenant_files) {
            mxcas_meta::model::QuotaScope::Tenant
        } else {
            return Ok(());
        };
        let refused = ApiError::from(MetaError::Rejected(CommandError::QuotaExceeded { scope }));
        Err(with_quota_details(refused, to))
    }

    /// Fails fast, before any byte is read, when `media_id` cannot take this user's upload
    /// (the metadata service checks again, atomically, when the upload commits).
    async fn check_reservation(&self, server_name: &str, user: &str, media_id: &str) -> Result<(), ApiError> {
        let key = MediaKey::new(server_name, media_id);
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

    /// The record this edge has cached for `key`, if any (tests of the cache's rules).
    #[doc(hidden)]
    pub async fn cached(&self, key: &MediaKey) -> Option<Resolved> {
        self.resolved.get(key).await
    }

    /// Resolves an mxc of this server to its content, waiting up to `wait` for an async upload
    /// that has not arrived yet.
    pub async fn resolve(&self, key: &MediaKey, wait: Duration, legacy: bool) -> Result<Resolved, ApiError> {
        if !self.local.contains(&key.server_name) {
            return Err(ApiError::not_found(format!(
                "Media from {} is not held here: it is not one of this cluster's server names",
                key.server_name
            )));
        }
        let resolved = match self.resolved.get(key).await {
            Some(r) => r,
            None => self.resolve_uncached(key, wait).await?,
        };
        if legacy && self.frozen(&resolved) {
            return Err(ApiError::not_found(
                "Media uploaded after the freeze is only available through /_matrix/client/v1/media",
            ));
        }
        Ok(resolved)
    }

    /// After reading `stale`'s content failed with `error`: the record may have moved to
    /// another object (repaired by a re-upload) that this edge has not seen. Asks the leader;
    /// returns the moved record, or reports the loss and answers it as such.
    pub async fn after_read_failure(
        &self,
        stale: &Resolved,
        error: &BlockError,
        retried: bool,
    ) -> Result<Resolved, ApiError> {
        let key = &stale.media.key;
        self.resolved.invalidate(key).await;
        if !retried {
            let fresh = self.resolve_uncached(key, Duration::ZERO).await?;
            if fresh.content.blob_key != stale.content.blob_key {
                self.metrics.stale_records.inc();
            }
            return Ok(fresh);
        }
        // Twice, from the leader's current record: lost, if this store is the cluster's.
        self.record_loss(&stale.content, error).await?;
        Err(ApiError::data_loss())
    }

    /// `content`'s stored bytes were found missing or corrupt: once the store is checked to be
    /// the cluster's (a wrong bucket is a misconfiguration, not a loss), counted, logged and
    /// reported to the metadata service.
    pub async fn record_loss(&self, content: &ContentRecord, error: &BlockError) -> Result<(), ApiError> {
        self.check_store_identity().await?;
        self.metrics.data_loss.inc();
        tracing::error!(
            cid = %content.cid,
            blob = %content.blob_key,
            %error,
            "stored media is lost: its object is missing or fails verification; an upload of the same bytes repairs it"
        );
        if !content.lost
            && let Err(e) = self.meta.report_lost(&content.cid, &content.blob_key).await
        {
            tracing::warn!(error = %e, "could not record the loss in the metadata service");
        }
        Ok(())
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
            let epoch = self.invalidations.load(Ordering::SeqCst);
            match self.meta.get_media(key).await {
                Err(e) => break Err(e.into()),
                Ok(None) => break Err(ApiError::not_found("Media not found")),
                Ok(Some((media @ MediaRecord { state: MediaState::Ready { .. }, .. }, Some(content)))) => {
                    let r = Resolved { media, content };
                    self.pause.pass(pause::RECORD_READ).await;
                    if !r.content.lost {
                        self.resolved.insert(key.clone(), r.clone()).await;
                        // An invalidation since the read may have missed this entry: drop it.
                        if self.invalidations.load(Ordering::SeqCst) != epoch {
                            self.resolved.invalidate(key).await;
                        }
                    }
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
    /// waiting on an mxc as soon as it has content, drops cached records whose content
    /// changed, and everything after a gap. The feed is the leader's; a leader that stops
    /// proving it leads (no ALIVE for [`FEED_SILENCE`]) is left, and the feed resumes from the
    /// last index seen on whichever node leads, so no change is missed across a reconnect.
    pub async fn watch_loop(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        use futures::StreamExt;
        use mxcas_meta::client::Change;
        let mut after = 0u64;
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                s = self.meta.watch_changes(after) => s,
            };
            match stream {
                Ok(stream) => {
                    let mut stream = std::pin::pin!(stream);
                    if after == 0 {
                        // First subscription: anything may have happened before.
                        self.resync().await;
                    }
                    loop {
                        let item = tokio::select! {
                            _ = cancel.cancelled() => return,
                            item = tokio::time::timeout(FEED_SILENCE, stream.next()) => item,
                        };
                        let (index, change) = match item {
                            Ok(Some(Ok(c))) => c,
                            Ok(Some(Err(e))) => {
                                tracing::debug!(error = %e, "change feed ended; resuming elsewhere");
                                break;
                            }
                            Ok(None) => break,
                            Err(_) => {
                                tracing::debug!("change feed silent; resuming elsewhere");
                                break;
                            }
                        };
                        let change_is_alive = change == Change::Alive;
                        match change {
                            Change::Ready(key) => {
                                self.count_feed("ready");
                                let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
                                if let Some(n) = w {
                                    n.notify_waiters();
                                }
                            }
                            Change::Content(cid) => {
                                self.count_feed("content");
                                self.invalidations.fetch_add(1, Ordering::SeqCst);
                                if let Err(e) = self.resolved.invalidate_entries_if(move |_, r| r.content.cid == cid) {
                                    tracing::warn!(error = %e, "cannot drop cached records; dropping all");
                                    self.resolved.invalidate_all();
                                }
                            }
                            Change::Resync => {
                                self.count_feed("resync");
                                self.resync().await;
                            }
                            Change::Alive => {}
                        }
                        // An entry's changes arrive one message each: only ALIVE (or a later
                        // index) says the entry at `index` was sent whole. Resuming one entry
                        // early only repeats changes, which are idempotent.
                        after = match change_is_alive {
                            true => after.max(index),
                            false => after.max(index.saturating_sub(1)),
                        };
                    }
                    self.count_feed("reconnect");
                }
                Err(e) => tracing::debug!(error = %e, "cannot subscribe to the change feed; retrying"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    fn count_feed(&self, kind: &'static str) {
        self.metrics.feed.get_or_create(&crate::metrics::KindLabels { kind }).inc();
    }

    /// Changes may have been missed: drop every cached record and wake every waiter.
    async fn resync(&self) {
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        self.resolved.invalidate_all();
        self.resync.notify_waiters();
    }

    /// Keeps the reclaim generation fresh for new uploads (runs until `cancel`): an upload
    /// stored under a generation that gets sealed before it commits has to be copied.
    pub async fn generation_loop(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(30));
        let mut identity_checked = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    // Register (or check) the store's identity early, so a wrong bucket shows
                    // at start rather than at the first loss.
                    if !identity_checked {
                        identity_checked = self.check_store_identity().await.is_ok();
                    }
                }
            }
            match self.meta.generations().await {
                Ok(g) => self.learn_generation(g.generation),
                Err(e) => tracing::debug!(error = %e, "could not refresh the reclaim generation"),
            }
        }
    }
}

/// How an upload was recorded.
enum Committed {
    New,
    Repaired,
    Deduplicated,
}

/// 24 random characters of `[A-Za-z0-9]` (~143 bits): unguessable, and visibly not a CID.
fn random_media_id() -> String {
    use rand::Rng;
    use rand::distr::Alphanumeric;
    rand::rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect()
}

/// A user's upload slot; given back when dropped.
struct UserSlot {
    uploading: Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>,
    user: String,
    metrics: Arc<Metrics>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        self.metrics.uploads_in_progress.dec();
        let mut uploading = self.uploading.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = uploading.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                uploading.remove(&self.user);
            }
        }
    }
}
