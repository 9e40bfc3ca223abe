//! Prometheus metrics of an edge (`/metrics` on the admin port).
//!
//! Names follow `mxcas_edge_<what>_<unit>`; labels come from small fixed sets (route
//! templates, status classes, cache results), never from CIDs, paths or addresses.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Route template, e.g. `/_matrix/client/v1/media/download/{server_name}/{media_id}`.
    pub route: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Change feed: `ready`, `content`, `resync`, `reconnect`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// A small fixed set per metric (`hit`, `miss`, `coalesced`, `error` for the cache).
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<RouteLabels, Counter>,
    pub cache_requests: Family<ResultLabels, Counter>,
    pub cache_bytes: Gauge,
    pub store_reads: Counter,
    pub store_read_bytes: Counter,
    pub store_writes: Counter,
    pub upload_bytes: Counter,
    pub uploads: Family<ResultLabels, Counter>,
    pub orphans_deleted: Counter,
    pub sweeps: Family<ResultLabels, Counter>,
    /// Stored objects found missing or corrupt (alert on any increase).
    pub data_loss: Counter,
    /// Lost content repaired by an upload of the same bytes.
    pub repairs: Counter,
    /// Uploads whose objects were stored again because their generation was sealed.
    pub restored: Counter,
    /// Identity checks that found this edge's blob store is not the cluster's.
    pub store_misconfigured: Counter,
    /// Change-feed events received, by kind.
    pub feed: Family<KindLabels, Counter>,
    /// Reads that found a cached record stale (its object gone because the record moved)
    /// and recovered by asking the leader: what the change feed should have prevented.
    pub stale_records: Counter,
    /// Access-token checks by result: static, cached, valid (asked the homeserver), refused,
    /// unavailable (the homeserver could not answer).
    pub auth_checks: Family<ResultLabels, Counter>,
    /// Uploads streaming in now (from when the user's slot is taken until the upload ends).
    pub uploads_in_progress: Gauge,
    /// How long writing a new object took (local backend: the file's fsync and the shared
    /// directory fsync included).
    pub store_write_seconds: Histogram,
    /// How long an upload's commit to the metadata service took.
    pub meta_commit_seconds: Histogram,
    /// Thumbnail jobs by result: made, refused (the bytes decide: not an image, corrupt, too
    /// large), busy (the pool was full), error.
    pub thumbnails: Family<ResultLabels, Counter>,
    /// How long one thumbnail job took on its worker (one decode, every size asked of it).
    pub thumbnail_seconds: Histogram,
    /// Uploads whose blocks could not be recorded for the IPFS gateway (retried by the next
    /// upload of the same bytes).
    pub block_index_failures: Counter,
    /// Trustless-gateway responses by result: raw, car, not_modified, not_found, refused
    /// (bad request or access), error.
    pub gateway: Family<ResultLabels, Counter>,
    /// Remote media stored (fetched over federation or from IPFS gateways), by result: stored,
    /// mismatch (bytes not matching their CID media ID, discarded), too_large, broken (the
    /// answer broke off).
    pub remote_fetches: Family<ResultLabels, Counter>,
    /// `ipfs:` media fetched from trustless gateways, by result: stored, not_found (no gateway
    /// has the root), failed (no gateway served a verified copy of some block, or the DAG is
    /// no file), too_large, unverifiable (a CID mxcas cannot check).
    pub ipfs_fetches: Family<ResultLabels, Counter>,
    /// Block requests to trustless gateways, by result: verified, bad (did not verify: that
    /// gateway is not asked again by that fetch), failed (error, timeout, broken body).
    pub gateway_blocks: Family<ResultLabels, Counter>,
}

/// Buckets from 0.25 ms to about 8 s, doubling.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mxcas_edge");
        let http_requests = Family::<RouteLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by route template and status class", http_requests.clone());
        let cache_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "cache_requests",
            "Block cache look-ups: hit, miss (this request read the store), coalesced (waited for another request's read), error",
            cache_requests.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register("cache_size_bytes", "Bytes held by the block cache", cache_bytes.clone());
        let store_reads = Counter::default();
        registry.register("store_reads", "Read requests sent to the blob store", store_reads.clone());
        let store_read_bytes = Counter::default();
        registry.register("store_read_bytes", "Bytes read from the blob store", store_read_bytes.clone());
        let store_writes = Counter::default();
        registry.register("store_writes", "Objects written to the blob store (put or multipart)", store_writes.clone());
        let upload_bytes = Counter::default();
        registry.register("upload_bytes", "Bytes received in uploads", upload_bytes.clone());
        let uploads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "uploads",
            "Finished uploads: new, deduplicated, repaired, refused (over a quota), error",
            uploads.clone(),
        );
        let orphans_deleted = Counter::default();
        registry.register(
            "orphans_deleted",
            "Unreferenced blob-store objects deleted by the sweeper",
            orphans_deleted.clone(),
        );
        let sweeps = Family::<ResultLabels, Counter>::default();
        registry.register("sweeps", "Orphan sweeps: ok, error", sweeps.clone());
        let data_loss = Counter::default();
        registry.register(
            "data_loss",
            "Stored objects found missing or corrupt when read (each is data loss until re-uploaded)",
            data_loss.clone(),
        );
        let repairs = Counter::default();
        registry.register("repairs", "Lost content repaired by an upload of the same bytes", repairs.clone());
        let restored = Counter::default();
        registry.register(
            "upload_restores",
            "Uploads stored again under a new generation because theirs was sealed before they committed",
            restored.clone(),
        );
        let feed = Family::<KindLabels, Counter>::default();
        registry.register(
            "feed_events",
            "Change-feed events received: ready, content, resync, reconnect",
            feed.clone(),
        );
        let stale_records = Counter::default();
        registry.register(
            "stale_records",
            "Downloads that found a cached record stale and asked the metadata leader again",
            stale_records.clone(),
        );
        let store_misconfigured = Counter::default();
        registry.register(
            "store_misconfigured",
            "Blob store identity checks that failed (wrong bucket or unmounted directory; alert on any)",
            store_misconfigured.clone(),
        );
        let store_write_seconds = latency_buckets();
        registry.register(
            "store_write_duration_seconds",
            "Time to write one new object to the blob store, durably",
            store_write_seconds.clone(),
        );
        let meta_commit_seconds = latency_buckets();
        registry.register(
            "meta_commit_duration_seconds",
            "Time for one upload's commit to the metadata service",
            meta_commit_seconds.clone(),
        );
        let auth_checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "auth_checks",
            "Access-token checks: static, cached, valid (asked the homeserver), refused, unavailable",
            auth_checks.clone(),
        );
        let thumbnails = Family::<ResultLabels, Counter>::default();
        registry.register(
            "thumbnails",
            "Thumbnail jobs: made, refused (not an image, corrupt, over the limits), busy (pool full), error",
            thumbnails.clone(),
        );
        let thumbnail_seconds = latency_buckets();
        registry.register(
            "thumbnail_duration_seconds",
            "Time of one thumbnail job on its worker (one decode, every size made of it)",
            thumbnail_seconds.clone(),
        );
        let block_index_failures = Counter::default();
        registry.register(
            "block_index_failures",
            "Uploads whose blocks could not be indexed for the IPFS gateway (the next upload of the file retries)",
            block_index_failures.clone(),
        );
        let gateway = Family::<ResultLabels, Counter>::default();
        registry.register(
            "gateway_responses",
            "IPFS trustless gateway responses: raw, car, not_modified, not_found, refused, error",
            gateway.clone(),
        );
        let remote_fetches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "remote_fetches",
            "Remote media (federation, IPFS gateways) stored: stored, mismatch (not the bytes its CID names; discarded), too_large, broken, waited (another edge was fetching it: its record was awaited)",
            remote_fetches.clone(),
        );
        let ipfs_fetches = Family::<ResultLabels, Counter>::default();
        registry.register(
            "ipfs_fetches",
            "ipfs: media fetched from trustless gateways: stored, not_found, failed, too_large, unverifiable",
            ipfs_fetches.clone(),
        );
        let gateway_blocks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "gateway_blocks",
            "Block requests to trustless gateways: verified, bad (did not verify), failed",
            gateway_blocks.clone(),
        );
        let uploads_in_progress = Gauge::default();
        registry.register("uploads_in_progress", "Uploads being received now", uploads_in_progress.clone());
        Self {
            block_index_failures,
            gateway,
            remote_fetches,
            ipfs_fetches,
            gateway_blocks,
            thumbnails,
            thumbnail_seconds,
            uploads_in_progress,
            auth_checks,
            store_write_seconds,
            meta_commit_seconds,
            store_misconfigured,
            feed,
            stale_records,
            data_loss,
            repairs,
            restored,
            orphans_deleted,
            sweeps,
            registry,
            http_requests,
            cache_requests,
            cache_bytes,
            store_reads,
            store_read_bytes,
            store_writes,
            upload_bytes,
            uploads,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
