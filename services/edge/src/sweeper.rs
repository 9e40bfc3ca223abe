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

/// One sweep: seal, then delete what sealed generations hold that nobody references.
pub async fn sweep_once(store: &BlobStore, meta: &MetaClient, min_interval: Duration) -> Result<Swept, String> {
    let generations = meta.begin_sweep(min_interval).await.map_err(|e| e.to_string())?;
    let sealed = generations.sealed;
    let mut swept = Swept { sealed, ..Swept::default() };
    let is_sealed = |key: &str| blob_key::generation(key).is_some_and(|g| g <= sealed);
    let mut batches = store.list_meta("blobs").try_chunks(BATCH).map_err(|e| e.1.to_string()).boxed();
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
    for (key, path) in store.staging_files("blobs") {
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
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(config.interval) => {}
        }
        match sweep_once(&store, &meta, config.interval).await {
            Ok(s) => {
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
