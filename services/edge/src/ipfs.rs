//! `mxc://<server>/ipfs:<cid>` media (MSC2706): content named by an IPFS CID, fetched from
//! trustless gateways rather than from the server in the URI.
//!
//! A download of `ipfs:` media this cluster does not hold asks every gateway of `[ipfs]
//! gateways` for the blocks of the CID's DAG at once ([`crate::block_fetch`]), each block
//! verified against its CID as it arrives, so the file is proven whatever the gateways are:
//! any UnixFS file DAG (CIDv0 or v1, any chunking or layout) within the limits. The verified
//! bytes are stored like uploaded content (under mxcas's own CID of them) and recorded under
//! the `ipfs:` media ID as it was asked, so the same bytes are stored once whichever names
//! they arrive by; later downloads are served from the store. The media ID's server is where
//! the media was announced, not asked: no request goes to it.
//!
//! `mxc://<server>/ipfs:<cid>` and `mxc://<server>/<cid>` name the same bytes when `<cid>` is
//! the CID mxcas's profile gives them: a local `ipfs:` ID whose CID is such media held here is
//! served from it without asking any gateway.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use cid::Cid;
use mxcas_meta::MediaKey;

use crate::api::AppState;
use crate::api::error::ApiError;
use tokio::sync::oneshot;

use crate::block_fetch::{self, FetchConfig, FetchError, Source};
use crate::config::IpfsConfig;
use crate::flight::{Arrival, Live};
use crate::media::Resolved;
use crate::metrics::ResultLabels;
use crate::remote::bad_gateway;

/// The media ID prefix of IPFS-hosted media.
pub const PREFIX: &str = "ipfs:";

#[derive(Clone)]
pub struct Ipfs {
    sources: Vec<Source>,
    fetch: FetchConfig,
    fetch_timeout: Duration,
}

impl Ipfs {
    /// The gateways of `config` (checked by [`IpfsConfig::validate`]).
    pub fn new(config: &IpfsConfig) -> Result<Self, String> {
        // Gateways are the operator's: any address, but no redirects (a gateway answers
        // blocks, it does not send them elsewhere).
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.block_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("ipfs gateway HTTP client: {e}"))?;
        let sources = config
            .gateways
            .iter()
            .map(|base| Source { base: base.clone(), http: http.clone(), signed: None })
            .collect();
        let fetch = FetchConfig {
            window: config.blocks_in_flight,
            per_source: config.blocks_in_flight_per_gateway,
            block_timeout: config.block_timeout,
            ..FetchConfig::default()
        };
        Ok(Self { sources, fetch, fetch_timeout: config.fetch_timeout })
    }

    /// How block fetches go (`[ipfs] blocks_in_flight`, …), for `ipfs:` media and for remote
    /// media fetched by blocks alike.
    pub(crate) fn fetch_config(&self) -> &FetchConfig {
        &self.fetch
    }
}

/// The CID of an `ipfs:` media ID: `None` for other media IDs, an error for a malformed one.
pub fn media_cid(media_id: &str) -> Option<Result<Cid, ApiError>> {
    let cid = media_id.strip_prefix(PREFIX)?;
    let malformed = || ApiError::bad_request("M_INVALID_PARAM", "Malformed IPFS media ID: want ipfs:<CID>");
    if cid.is_empty() || cid.len() > 255 - PREFIX.len() || !cid.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Some(Err(malformed()));
    }
    Some(Cid::try_from(cid).map_err(|_| malformed()))
}

/// The record of `ipfs:` media `key` (named `cid`), which this cluster does not hold under
/// that ID: the media held here that `cid` names, or fetched now from the gateways for a user
/// of `tenant` (whose upload limit bounds it).
pub async fn resolve(
    state: &Arc<AppState>,
    key: &MediaKey,
    cid: Cid,
    tenant: &Arc<crate::tenants::Tenant>,
    want_live: bool,
) -> Result<Arrival, ApiError> {
    if state.media.local.contains(&key.server_name) {
        let plain = MediaKey::new(key.server_name.clone(), crate::gateway::as_v1(&cid).to_string());
        if let Some(r) = state.media.resolve_remote(&plain).await? {
            return Ok(Arrival::Held(r));
        }
    }
    fetch_again(state, key, cid, tenant, want_live).await
}

/// `ipfs:` media `key` fetched from the gateways, whether held or not (held but lost from the
/// store, a fetch repairs it).
pub async fn fetch_again(
    state: &Arc<AppState>,
    key: &MediaKey,
    cid: Cid,
    tenant: &Arc<crate::tenants::Tenant>,
    want_live: bool,
) -> Result<Arrival, ApiError> {
    if state.ipfs.sources.is_empty() {
        return Err(ApiError::not_found(
            "IPFS media is not held here, and no IPFS gateways are configured to fetch it",
        ));
    }
    if let Err(e) = mxcas_cas::VerifiedBlock::supported(&cid) {
        count(state, "unverifiable");
        return Err(bad_gateway(format!("The CID is of a kind mxcas cannot check ({e}): it is not fetched")));
    }
    let (owned, fetch_key, limit) = (state.clone(), key.clone(), tenant.max_upload_size);
    let flight = format!("mxc://{key}");
    let name = flight.clone();
    crate::remote::single_flight(state, flight, want_live, move |live| async move {
        let timeout = owned.ipfs.fetch_timeout;
        let fetch = async {
            // The deadline ends the block stream, so the store sees a failed body and cleans up.
            let deadline = tokio::time::Instant::now() + timeout;
            fetch(&owned, &fetch_key, cid, limit, live, deadline).await
        };
        crate::remote::once_in_cluster(&owned, &fetch_key, &name, timeout, fetch).await
    })
    .await
}

/// Counts what the sources of a block fetch delivered (`gateway_blocks`).
pub(crate) fn count_blocks(state: &AppState, sources: &[block_fetch::SourceReport]) {
    let blocks = &state.media.metrics.gateway_blocks;
    for s in sources {
        blocks.get_or_create(&ResultLabels { result: "verified" }).inc_by(s.blocks);
        blocks.get_or_create(&ResultLabels { result: "bad" }).inc_by(s.bad_blocks);
        blocks.get_or_create(&ResultLabels { result: "failed" }).inc_by(s.failures.into());
    }
}

fn count(state: &AppState, result: &'static str) {
    state.media.metrics.ipfs_fetches.get_or_create(&ResultLabels { result }).inc();
}

fn fetch_error(state: &AppState, root: &Cid, e: FetchError) -> ApiError {
    match e {
        FetchError::NoSource { cid, failing: 0, .. } if crate::gateway::as_v1(&cid) == crate::gateway::as_v1(root) => {
            count(state, "not_found");
            ApiError::not_found("No configured IPFS gateway served this CID")
        }
        e => {
            count(state, "failed");
            bad_gateway(format!("The IPFS gateways did not deliver the media: {e}"))
        }
    }
}

async fn fetch(
    state: &AppState,
    key: &MediaKey,
    cid: Cid,
    limit: u64,
    live: Option<oneshot::Sender<Live>>,
    deadline: tokio::time::Instant,
) -> Result<Resolved, ApiError> {
    let (rx, report) = block_fetch::fetch(state.ipfs.sources.clone(), cid, 0..u64::MAX, state.ipfs.fetch.clone())
        .map_err(|e| fetch_error(state, &cid, e))?;
    let stored = store(state, key, cid, limit, rx, live, deadline).await;
    let sources = report.await.unwrap_or_default();
    tracing::info!(mxc = %key, ok = stored.is_ok(), ?sources, "IPFS media fetched from gateways");
    count_blocks(state, &sources);
    if stored.is_ok() {
        count(state, "stored");
    }
    stored
}

/// Stores what the fetch `rx` delivers as `key`'s bytes.
async fn store(
    state: &AppState,
    key: &MediaKey,
    cid: Cid,
    limit: u64,
    rx: block_fetch::Receiver,
    live: Option<oneshot::Sender<Live>>,
    deadline: tokio::time::Instant,
) -> Result<Resolved, ApiError> {
    // The root comes first, and with it the file's size: over the limit, nothing more is read.
    let (size, body) = block_fetch::into_body(rx, deadline).await.map_err(|e| fetch_error(state, &cid, e))?;
    if size > limit {
        count(state, "too_large");
        return Err(ApiError::remote_too_large(limit));
    }
    let (body, served_as) = match live {
        Some(live) => {
            let grace = state.media.live_grace();
            crate::flight::tee(body, size, live, grace, |head| crate::remote::live_type(key, head)).await
        }
        None => (Box::pin(body) as futures::stream::BoxStream<'static, _>, None),
    };
    let proof = crate::media::Proof::Blocks { served_as };
    let stored = state.media.store_remote(key, None, body, limit, proof).await;
    if stored.as_ref().is_err_and(|e| e.status == StatusCode::BAD_GATEWAY) {
        count(state, "failed");
    }
    stored
}
