//! The orphan sweeper: deletes blob-store objects that no content record references.
//!
//! Orphans come from uploads whose commit failed or whose outcome is unknown (the metadata
//! service unavailable after the bytes were stored, an edge killed between the two), and from
//! deduplicated uploads whose background delete failed. An object only appears in a listing
//! once it is complete (multipart parts are invisible), and its commit follows within the
//! metadata client's retry budget (seconds), so any object older than `grace` (default 1h)
//! that the metadata service does not reference is garbage. Every edge may sweep: deletes
//! are idempotent and each decision is a linearizable read. Abandoned multipart uploads are
//! not listed at all; on S3 a bucket lifecycle rule (`AbortIncompleteMultipartUpload`)
//! reclaims them (see docs/storage.md).

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use mxcas_meta::MetaClient;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::media::now_ms;
use crate::metrics::{Metrics, ResultLabels};
use crate::store::BlobStore;

/// `[sweeper]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SweeperConfig {
    /// Run the sweeper on this edge. Default true.
    pub enabled: bool,
    /// Time between sweeps. Default 10m.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Only objects older than this are considered. Default 1h; must be far longer than an
    /// upload's commit takes (seconds).
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for SweeperConfig {
    fn default() -> Self {
        Self { enabled: true, interval: Duration::from_secs(600), grace: Duration::from_secs(3600) }
    }
}

/// Objects per metadata query.
const BATCH: usize = 1000;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub examined: u64,
    pub deleted: u64,
}

/// Lists the store once and deletes unreferenced objects older than `grace`.
pub async fn sweep_once(store: &BlobStore, meta: &MetaClient, grace: Duration) -> Result<Swept, String> {
    let cutoff = now_ms().saturating_sub(grace.as_millis() as u64) as i64;
    let mut swept = Swept::default();
    let mut batches = store.list_meta("blobs").try_chunks(BATCH).map_err(|e| e.1.to_string()).boxed();
    while let Some(batch) = batches.next().await {
        let old: Vec<String> = batch?.into_iter().filter(|(_, modified)| *modified < cutoff).map(|(k, _)| k).collect();
        if old.is_empty() {
            continue;
        }
        swept.examined += old.len() as u64;
        let referenced = meta.referenced(&old).await.map_err(|e| e.to_string())?;
        for (key, used) in old.iter().zip(referenced) {
            if !used {
                store.delete(key).await.map_err(|e| e.to_string())?;
                tracing::info!(%key, "deleted orphaned object");
                swept.deleted += 1;
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
        match sweep_once(&store, &meta, config.grace).await {
            Ok(s) => {
                metrics.orphans_deleted.inc_by(s.deleted);
                metrics.sweeps.get_or_create(&ResultLabels { result: "ok" }).inc();
                if s.deleted > 0 {
                    tracing::info!(examined = s.examined, deleted = s.deleted, "orphan sweep done");
                }
            }
            Err(e) => {
                metrics.sweeps.get_or_create(&ResultLabels { result: "error" }).inc();
                tracing::warn!(error = %e, "orphan sweep failed; will retry next interval");
            }
        }
    }
}
