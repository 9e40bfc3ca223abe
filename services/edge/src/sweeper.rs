//! The orphan sweeper: deletes blob-store objects that no content record references and no
//! commit can ever reference.
//!
//! Orphans come from uploads whose commit failed or whose outcome is unknown (the metadata
//! service unavailable after the bytes were stored, an edge killed between the two), from
//! uploads refused as duplicates whose own delete failed, and from multipart staging files of
//! killed uploads. Whether an object is garbage is decided by protocol, not by its age or any
//! clock: every upload names its objects under the *reclaim generation* current when it
//! started (`blobs/<generation>/…`). A sweep first commits `BeginSweep` through raft, which
//! advances the generation (at most once per interval) and *seals* the generations two behind
//! it: from then on the metadata service refuses every commit that names an object of a
//! sealed generation (the edge copies such an upload's objects to the current generation and
//! commits again, or fails the upload, before any success is sent). Only then does the sweep
//! list sealed generations and ask, linearizably, which of their objects are referenced: an
//! object unreferenced at that point can never become referenced, so deleting it is safe
//! whatever the timing. Every edge may sweep; the generation advances once per interval of
//! leader time however many do.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use mxcas_meta::MetaClient;
use mxcas_meta::model::blob_key;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, ResultLabels};
use crate::store::BlobStore;

/// `[sweeper]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweeperConfig {
    /// Run the sweeper on this edge. Default true.
    pub enabled: bool,
    /// Time between sweeps, and the least time between two generation advances (so an
    /// upload has at least this long to commit before its objects must be copied). Default 10m.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self { enabled: true, interval: Duration::from_secs(600) }
    }
}

/// Objects per metadata query.
const BATCH: usize = 1000;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// Generations up to this one were swept.
    pub sealed: u64,
    pub examined: u64,
    pub deleted: u64,
    /// Staging files of killed multipart uploads removed (local store only).
    pub staging_deleted: u64,
}

/// Every this many sweeps, a sweep lists every sealed generation again (objects of an old
/// generation become unreferenced later when their content is repaired onto new ones); the
/// others list only generations sealed since the last sweep.
const FULL_SWEEP_EVERY: u64 = 36;

/// One full sweep: seal, then delete what any sealed generation holds that nobody references.
pub async fn sweep_once(store: &BlobStore, meta: &MetaClient, min_interval: Duration) -> Result<Swept, String> {
    sweep(store, meta, min_interval, None).await
}

/// One sweep: seal, then delete what sealed generations after `after` (all of them when
/// `None`) hold that nobody references.
pub async fn sweep(
    store: &BlobStore,
    meta: &MetaClient,
    min_interval: Duration,
    after: Option<u64>,
) -> Result<Swept, String> {
    let generations = meta.begin_sweep(min_interval).await.map_err(|e| e.to_string())?;
    let sealed = generations.sealed;
    let mut swept = Swept { sealed, ..Swept::default() };
    let is_sealed = |key: &str| blob_key::generation(key).is_some_and(|g| g <= sealed);
    let listing = match after {
        None => store.list_meta("blobs"),
        // Only the generations sealed since: one prefix each (usually one).
        Some(after) => {
            let prefixes: Vec<String> =
                (after.saturating_add(1)..=sealed).map(|g| blob_key::after_generation(g.saturating_sub(1))).collect();
            let store = store.clone();
            futures::stream::iter(prefixes).flat_map(move |p| store.list_meta(p.trim_end_matches('/'))).boxed()
        }
    };
    let mut batches = listing.try_chunks(BATCH).map_err(|e| e.1.to_string()).boxed();
    while let Some(batch) = batches.next().await {
        let candidates: Vec<String> = batch?.into_iter().map(|(k, _)| k).filter(|k| is_sealed(k)).collect();
        if candidates.is_empty() {
            continue;
        }
        swept.examined += candidates.len() as u64;
        let referenced = meta.referenced(&candidates).await.map_err(|e| e.to_string())?;
        for (key, used) in candidates.iter().zip(referenced) {
            if !used {
                store.delete(key).await.map_err(|e| e.to_string())?;
                tracing::info!(%key, "deleted orphaned object");
                swept.deleted += 1;
            }
        }
    }
    // A staging file is never an object anyone references; one of a sealed generation belongs
    // to an upload that can no longer commit (if it is still running, it fails).
    let walker = store.clone();
    let staging =
        tokio::task::spawn_blocking(move || walker.staging_files("blobs")).await.map_err(|e| e.to_string())?;
    for (key, path) in staging {
        if is_sealed(&key) {
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), "deleted staging file of an abandoned upload");
                    swept.staging_deleted += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("cannot delete {}: {e}", path.display())),
            }
        }
    }
    Ok(swept)
}

pub async fn run(
    store: BlobStore,
    meta: MetaClient,
    config: SweeperConfig,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    // Sealed generations up to this one were listed by a sweep that finished.
    let mut swept_through: Option<u64> = None;
    for round in 0u64.. {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(config.interval) => {}
        }
        let after = swept_through.filter(|_| round % FULL_SWEEP_EVERY != 0);
        match sweep(&store, &meta, config.interval, after).await {
            Ok(s) => {
                swept_through = Some(s.sealed);
                metrics.orphans_deleted.inc_by(s.deleted + s.staging_deleted);
                metrics.sweeps.get_or_create(&ResultLabels { result: "ok" }).inc();
                if s.deleted + s.staging_deleted > 0 {
                    tracing::info!(
                        sealed = s.sealed,
                        examined = s.examined,
                        deleted = s.deleted,
                        staging = s.staging_deleted,
                        "orphan sweep done"
                    );
                }
            }
            Err(e) => {
                metrics.sweeps.get_or_create(&ResultLabels { result: "error" }).inc();
                tracing::warn!(error = %e, "orphan sweep failed; will retry next interval");
            }
        }
    }
}
