//! Thumbnails as content: made from a source's verified bytes on a bounded worker pool
//! ([`mxcas_thumbnail::Pool`]), stored in the blob store like any upload, and recorded in the
//! metadata under (source CID, spec), so every mxc of the same bytes shares them and every
//! edge finds them.
//!
//! - **Single flight.** On one edge, concurrent requests for a missing thumbnail share one
//!   making (the known-thumbnail cache's loader), and wait for a background pregeneration of
//!   the same source instead of starting their own. Across edges, the edge about to make a
//!   thumbnail first claims it from the metadata leader; the others wait for it to be
//!   recorded (polling, within the request's wait) or for the claim to lapse. Claims are
//!   advice: when they are lost (a leader change) two edges may both make it, and the first
//!   thumbnail recorded for (source, spec) stays, a later one being a released duplicate.
//! - **Background.** After an image upload, the configured sizes are made in one decode,
//!   without delaying the upload's answer; a full queue skips it (made on demand later).
//! - **Refusals** that the bytes decide (not an image, corrupt, over the limits) are
//!   remembered per source CID: asking again costs no decode.
//! - **Losses.** A recorded thumbnail whose bytes turn out missing or corrupt is reported
//!   lost, dropped from the cache and made again, replacing it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use bytes::Bytes;
use cid::Cid;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use moka::future::Cache;
use mxcas_meta::claims::Claim;
use mxcas_meta::model::{ThumbnailMethod, ThumbnailRecord, ThumbnailSpec};
use mxcas_meta::{ContentRecord, MediaState};
use mxcas_thumbnail::{Limits, Method, Pool, PoolError, Spec};

use crate::api::error::ApiError;
use crate::config::{ThumbnailConfig, ThumbnailMethodName};
use crate::media::{MediaService, Resolved};
use crate::metrics::ResultLabels;

/// A recorded thumbnail and its content record.
#[derive(Clone, Debug)]
pub struct Made {
    pub record: ThumbnailRecord,
    pub content: ContentRecord,
    /// Its bytes, when this edge just made and recorded them (they are what it hashed into
    /// `content.cid`): the requests waiting for the making are answered without reading them
    /// back. Never kept in the cache.
    fresh: Option<Bytes>,
}

impl Made {
    fn without_bytes(&self) -> Self {
        Self { fresh: None, ..self.clone() }
    }
}

pub struct Thumbnails {
    pub config: ThumbnailConfig,
    media: Arc<MediaService>,
    pool: Pool,
    /// One permit per job the pool may hold (running or queued), taken before the source is
    /// read into memory and kept until the job ends: at most `workers + queue` sources are in
    /// memory at once, whatever the requests.
    jobs: Arc<tokio::sync::Semaphore>,
    sizes: Vec<Spec>,
    limits: Limits,
    /// Recorded thumbnails by (source, spec). Records only change when lost bytes are
    /// replaced, and whoever finds the loss drops the entry.
    known: Cache<(Cid, ThumbnailSpec), Made>,
    /// Sources whose bytes decide that no thumbnail can be made (and why).
    refused: Cache<Cid, ApiError>,
    /// Background pregenerations in flight, by source.
    pregenerating: Mutex<HashMap<Cid, Shared<BoxFuture<'static, ()>>>>,
    /// This process, as it claims thumbnails from the metadata leader.
    claimant: String,
}

/// Longest pause between looks at a thumbnail another edge is making.
const MAX_CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(250);

fn method_of(m: ThumbnailMethodName) -> Method {
    match m {
        ThumbnailMethodName::Crop => Method::Crop,
        ThumbnailMethodName::Scale => Method::Scale,
    }
}

fn to_record_spec(s: &Spec) -> ThumbnailSpec {
    let method = match s.method {
        Method::Crop => ThumbnailMethod::Crop,
        Method::Scale => ThumbnailMethod::Scale,
    };
    ThumbnailSpec { width: s.width, height: s.height, method, animated: s.animated }
}

fn to_spec(s: &ThumbnailSpec) -> Spec {
    let method = match s.method {
        ThumbnailMethod::Crop => Method::Crop,
        ThumbnailMethod::Scale => Method::Scale,
    };
    Spec { width: s.width, height: s.height, method, animated: s.animated }
}

/// Types worth trying: images (the bytes decide in the end).
fn may_be_image(content_type: &str) -> bool {
    content_type.trim().to_ascii_lowercase().starts_with("image/")
}

/// Types whose files can carry an animation.
fn may_animate(content_type: &str) -> bool {
    let t = content_type.trim().to_ascii_lowercase();
    ["image/gif", "image/webp", "image/png", "image/apng"].iter().any(|a| t.starts_with(a))
}

pub fn cannot_thumbnail(why: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("M_UNKNOWN", format!("Cannot generate thumbnails for the requested content: {why}"))
}

fn too_large(why: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", format!("The media is too large to thumbnail: {why}"))
}

fn busy() -> ApiError {
    ApiError::unavailable("Thumbnails are being made for other requests; retry shortly", 2_000)
}

impl Thumbnails {
    pub fn new(config: ThumbnailConfig, media: Arc<MediaService>) -> Result<Self, String> {
        config.validate()?;
        let pool = Pool::new(config.workers, config.queue).map_err(|e| format!("thumbnail workers: {e}"))?;
        let sizes = config
            .sizes
            .iter()
            .map(|s| Spec { width: s.width, height: s.height, method: method_of(s.method), animated: false })
            .collect();
        let limits = Limits {
            max_source_bytes: config.max_source_size.as_u64(),
            max_pixels: config.max_pixels,
            max_frames: config.max_frames,
            max_animation_pixels: config.max_animation_pixels,
        };
        let jobs = Arc::new(tokio::sync::Semaphore::new(config.workers + config.queue));
        Ok(Self {
            config,
            media,
            pool,
            jobs,
            sizes,
            limits,
            known: Cache::builder().max_capacity(100_000).build(),
            refused: Cache::builder().max_capacity(100_000).build(),
            pregenerating: Mutex::new(HashMap::new()),
            claimant: crate::flight::edge_claimant().to_owned(),
        })
    }

    /// The thumbnail that answers a request for `requested` of media of `content_type`: the
    /// nearest configured size at least as large, or the size asked (capped); animated only
    /// for types that can animate (so a still format never gets a second, identical record).
    pub fn choose(&self, requested: Spec, content_type: &str) -> ThumbnailSpec {
        let mut chosen = mxcas_thumbnail::size::choose(&requested, &self.sizes, self.config.max_side);
        chosen.animated = requested.animated && may_animate(content_type);
        to_record_spec(&chosen)
    }

    /// `resolved`'s thumbnail for `spec`, made now if it was not recorded yet.
    pub async fn get(self: &Arc<Self>, resolved: &Resolved, spec: ThumbnailSpec) -> Result<Made, ApiError> {
        let source = self.check_source(resolved)?;
        let cid = source.cid;
        if let Some(refusal) = self.refused.get(&cid).await {
            return Err(refusal);
        }
        // A background pregeneration of this source makes this size too: wait for it.
        let running = self.pregenerating.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&cid).cloned();
        if let Some(running) = running
            && self.sizes.iter().any(|s| to_record_spec(s) == spec)
        {
            running.await;
        }
        // The single flight runs in a task of its own: a request that gives up (timeout, client
        // gone) neither stops the making nor hands it to the next request to start again; later
        // requests join it, and what was paid for is recorded.
        let this = self.clone();
        let flight = tokio::spawn(async move {
            let maker = this.clone();
            let made = this
                .known
                .try_get_with((cid, spec), async move { maker.make(source, spec, None).await })
                .await
                .map_err(|e: Arc<ApiError>| (*e).clone())?;
            if made.fresh.is_some() {
                // The cache keeps records, not bytes.
                this.known.insert((cid, spec), made.without_bytes()).await;
            }
            Ok(made)
        });
        flight.await.unwrap_or_else(|e| Err(ApiError::internal(format!("thumbnail task failed: {e}"))))
    }

    /// The thumbnail's bytes, each block verified. Bytes found missing or corrupt are
    /// reported lost and made again once.
    pub async fn bytes(self: &Arc<Self>, resolved: &Resolved, made: Made) -> Result<(Made, Bytes), ApiError> {
        if let Some(bytes) = made.fresh.clone() {
            return Ok((made.without_bytes(), bytes));
        }
        let failure = match self.media.read_all(&made.content).await {
            Ok(bytes) => return Ok((made, bytes.into())),
            Err(e) if e.is_data_loss() => e,
            Err(e) => return Err(e.into()),
        };
        tracing::warn!(source = %made.record.source, thumbnail = %made.content.cid, error = %failure,
            "recorded thumbnail is lost; making it again");
        let key = (made.record.source, made.record.spec);
        self.known.invalidate(&key).await;
        // Only this cluster's store may call bytes lost.
        self.media.check_store_identity().await?;
        self.media.metrics.data_loss.inc();
        self.media.meta.report_lost(&made.content.cid, &made.content.blob_key).await?;
        let source = self.check_source(resolved)?;
        let again = self.make(source, made.record.spec, Some(made.content.blob_key.clone())).await?;
        let bytes = match again.fresh.clone() {
            Some(fresh) => fresh,
            None => self.media.read_all(&again.content).await?.into(),
        };
        let again = again.without_bytes();
        self.known.insert(key, again.clone()).await;
        Ok((again, bytes))
    }

    fn check_source(&self, resolved: &Resolved) -> Result<ContentRecord, ApiError> {
        let MediaState::Ready { content_type, .. } = &resolved.media.state else {
            return Err(ApiError::internal("media has no content"));
        };
        if !self.config.enabled {
            return Err(cannot_thumbnail("thumbnails are turned off on this server"));
        }
        if !may_be_image(content_type) {
            return Err(cannot_thumbnail(format!("{content_type} is not an image")));
        }
        if resolved.content.size > self.config.max_source_size.as_u64() {
            return Err(too_large(format!(
                "{} bytes, over the limit of {}",
                resolved.content.size,
                self.config.max_source_size.as_u64()
            )));
        }
        Ok(resolved.content.clone())
    }

    /// Makes, stores and records `spec` of `source`, unless the metadata has it already or
    /// another edge makes it first. (A lost thumbnail, `lost_key`, is remade without a claim:
    /// whoever finds the loss replaces it.)
    async fn make(
        &self,
        source: ContentRecord,
        spec: ThumbnailSpec,
        lost_key: Option<String>,
    ) -> Result<Made, ApiError> {
        let started = std::time::Instant::now();
        if lost_key.is_none() {
            if let Some(found) = self.recorded(&source.cid, &[spec]).await?.into_iter().next() {
                return Ok(found);
            }
            if let Some(found) = self.claim_or_wait(&source.cid, spec).await? {
                return Ok(found);
            }
        }
        let claimed = started.elapsed();
        let made = async {
            let mut made = self.generate(&source, vec![spec]).await?;
            let generated = started.elapsed();
            let (spec, thumb) = made.pop().ok_or_else(|| ApiError::internal("no thumbnail made"))?;
            let stored = self.store(&source, spec, thumb, lost_key.clone()).await;
            // Where a making's time goes (the pool's own part is in the duration metric).
            tracing::debug!(source = %source.cid, lookup_and_claim = ?claimed, read_and_make = ?(generated - claimed),
                store_and_record = ?(started.elapsed() - generated), "thumbnail made");
            stored
        }
        .await;
        if made.is_err() && lost_key.is_none() {
            self.release(source.cid, spec);
        }
        made
    }

    /// Claims the making of `spec` of `source` from the metadata leader: `None` once this
    /// edge holds the claim, or the thumbnail as recorded by the edge that held it. Waits
    /// while another edge holds it (bounded by the caller's wait and the claim's lease).
    async fn claim_or_wait(&self, source: &Cid, spec: ThumbnailSpec) -> Result<Option<Made>, ApiError> {
        let mut pause = std::time::Duration::from_millis(20);
        // Claims are advice: past this, make it anyway (a holder that renews its claim and
        // never records, or a leader that keeps answering "held", costs a second making, not
        // a thumbnail that is never served).
        let give_up = tokio::time::Instant::now() + self.config.max_wait;
        loop {
            match self.media.meta.claim_thumbnail(source, &spec, &self.claimant, self.config.max_wait, false).await? {
                Claim::Granted => {
                    // Recorded between the caller's look and this claim: nothing to make.
                    let found = self.recorded(source, &[spec]).await?.into_iter().next();
                    if found.is_some() {
                        self.release(*source, spec);
                    }
                    return Ok(found);
                }
                Claim::Held(_) if tokio::time::Instant::now() >= give_up => {
                    tracing::warn!(source = %source, "a thumbnail claimed elsewhere was not recorded in time; making it here");
                    return Ok(None);
                }
                Claim::Held(left) => {
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(MAX_CLAIM_POLL);
                    if let Some(found) = self.recorded(source, &[spec]).await?.into_iter().next() {
                        return Ok(Some(found));
                    }
                }
            }
        }
    }

    /// Gives up this edge's claim on `spec` of `source` (making it failed), in the background:
    /// a claim not given up lapses anyway.
    fn release(&self, source: Cid, spec: ThumbnailSpec) {
        let (meta, claimant, lease) = (self.media.meta.clone(), self.claimant.clone(), self.config.max_wait);
        tokio::spawn(async move {
            if let Err(e) = meta.claim_thumbnail(&source, &spec, &claimant, lease, true).await {
                tracing::debug!(source = %source, error = %e, "thumbnail claim not released (it lapses)");
            }
        });
    }

    /// The recorded thumbnails of `source` among `specs` (with bytes not known lost).
    async fn recorded(&self, source: &Cid, specs: &[ThumbnailSpec]) -> Result<Vec<Made>, ApiError> {
        let all = self.media.meta.thumbnails(source).await?;
        Ok(all
            .into_iter()
            .filter(|(r, c)| specs.contains(&r.spec) && !c.lost)
            .map(|(record, content)| Made { record, content, fresh: None })
            .collect())
    }

    /// Decodes `source` once and makes every spec of `specs` on the pool.
    async fn generate(
        &self,
        source: &ContentRecord,
        specs: Vec<ThumbnailSpec>,
    ) -> Result<Vec<(ThumbnailSpec, mxcas_thumbnail::Thumbnail)>, ApiError> {
        // Refused at once when the pool is full, before the source is read into memory.
        let Ok(permit) = self.jobs.clone().try_acquire_owned() else {
            self.count("busy");
            return Err(busy());
        };
        // A lost source is answered here; the download path is the one that reports it.
        let bytes = self.media.read_all(source).await?;
        let limits = self.limits;
        let job_specs: Vec<Spec> = specs.iter().map(to_spec).collect();
        let started = std::time::Instant::now();
        let job = self
            .pool
            .run(move || {
                let made = mxcas_thumbnail::generate(&bytes, &job_specs, &limits);
                drop((bytes, permit));
                made
            })
            .map_err(|_| {
                self.count("busy");
                busy()
            })?;
        let result = match job.await {
            Ok(r) => r,
            Err(PoolError::Panicked(why)) => {
                tracing::error!(source = %source.cid, panic = %why, "thumbnail job panicked");
                self.count("error");
                return Err(ApiError::internal("Making the thumbnail failed"));
            }
            Err(PoolError::Busy) => return Err(busy()),
        };
        self.media.metrics.thumbnail_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(thumbs) => {
                self.count("made");
                Ok(specs.into_iter().zip(thumbs).collect())
            }
            Err(e) => {
                use mxcas_thumbnail::Error;
                let refusal = match &e {
                    Error::Unsupported(_) | Error::Corrupt(_) => Some(cannot_thumbnail(&e)),
                    Error::TooLarge(_) => Some(too_large(&e)),
                    Error::Internal(_) => None,
                };
                self.count(if refusal.is_some() { "refused" } else { "error" });
                match refusal {
                    Some(r) => {
                        self.refused.insert(source.cid, r.clone()).await;
                        Err(r)
                    }
                    None => {
                        tracing::error!(source = %source.cid, error = %e, "making a thumbnail failed");
                        Err(ApiError::internal("Making the thumbnail failed"))
                    }
                }
            }
        }
    }

    async fn store(
        &self,
        source: &ContentRecord,
        spec: ThumbnailSpec,
        thumb: mxcas_thumbnail::Thumbnail,
        lost_key: Option<String>,
    ) -> Result<Made, ApiError> {
        let record = ThumbnailRecord {
            source: source.cid,
            spec,
            cid: source.cid, // replaced by the thumbnail's own CID when stored
            content_type: thumb.content_type.to_owned(),
            width: thumb.width,
            height: thumb.height,
            animated: thumb.animated,
            created_at_ms: 0,
        };
        let bytes = Bytes::from(thumb.bytes);
        let (record, content, ours) = self.media.store_thumbnail(record, bytes.clone(), lost_key).await?;
        // Recorded as other bytes (another edge's thumbnail came first): answer with those.
        Ok(Made { record, content, fresh: ours.then_some(bytes) })
    }

    fn count(&self, result: &'static str) {
        self.media.metrics.thumbnails.get_or_create(&ResultLabels { result }).inc();
    }

    /// After an upload (its records as the commit answered them): makes the configured sizes
    /// in the background if it is an image (never delaying the caller). Nothing is looked up
    /// or cached here: the commit's answer is the record.
    pub fn after_upload(self: &Arc<Self>, uploaded: Resolved) {
        if !self.config.enabled || !self.config.pregenerate || self.sizes.is_empty() {
            return;
        }
        let Ok(source) = self.check_source(&uploaded) else { return };
        let this = self.clone();
        tokio::spawn(async move {
            let cid = source.cid;
            let work = {
                let mut running = this.pregenerating.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if running.contains_key(&cid) {
                    return;
                }
                let me = this.clone();
                let work = async move {
                    if let Err(e) = me.pregenerate(source).await {
                        tracing::debug!(source = %cid, error = %e.message, "thumbnails not made in the background");
                    }
                    me.pregenerating.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&cid);
                }
                .boxed()
                .shared();
                running.insert(cid, work.clone());
                work
            };
            work.await;
        });
    }

    async fn pregenerate(&self, source: ContentRecord) -> Result<(), ApiError> {
        if self.refused.get(&source.cid).await.is_some() {
            return Ok(());
        }
        let wanted: Vec<ThumbnailSpec> = self.sizes.iter().map(to_record_spec).collect();
        let have = self.recorded(&source.cid, &wanted).await?;
        let missing: Vec<ThumbnailSpec> =
            wanted.into_iter().filter(|s| !have.iter().any(|m| m.record.spec == *s)).collect();
        for m in have {
            self.known.insert((m.record.source, m.record.spec), m).await;
        }
        // Only what this edge may make: sizes another edge is making already are its to record.
        // Claims taken are released if anything after them fails (a claim error included).
        let mut mine = Vec::new();
        let made = async {
            for spec in missing {
                let claim =
                    self.media.meta.claim_thumbnail(&source.cid, &spec, &self.claimant, self.config.max_wait, false);
                if claim.await? == Claim::Granted {
                    mine.push(spec);
                }
            }
            if mine.is_empty() {
                return Ok(());
            }
            for (spec, thumb) in self.generate(&source, mine.clone()).await? {
                let made = self.store(&source, spec, thumb, None).await?;
                self.known.insert((source.cid, spec), made.without_bytes()).await;
            }
            Ok(())
        }
        .await;
        if made.is_err() {
            for spec in mine {
                self.release(source.cid, spec);
            }
        }
        made
    }
}
