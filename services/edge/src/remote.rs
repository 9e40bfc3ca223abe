//! Media of other servers, fetched over federation (spec v1.11) and kept like local media.
//!
//! A download of `mxc://<other server>/<id>` that this cluster has no record of asks the
//! origin, signed with `X-Matrix` by a tenant whose key mxcas holds:
//! `GET /_matrix/federation/v1/media/download/{id}`, whose `multipart/mixed` answer carries the
//! bytes or a `Location` (followed once, not cached, under the same address rules); an origin
//! that answers 404 `M_UNRECOGNIZED` (it predates authenticated media) is asked
//! `GET /_matrix/media/v3/download/{origin}/{id}?allow_remote=false`. The bytes are stored as
//! they arrive (at most the tenant's upload limit: more is 502 `M_TOO_LARGE`) and named by
//! their CID; a media ID that is a CID must be that CID, or the bytes are discarded and the
//! answer is 502 (MSC2846: never stored, never served). Then `(origin, id)` is recorded in the
//! metadata, so the same bytes are stored once, and the download is served from the store.
//!
//! Bounds: the requesting user's tenant signs and its upload limit applies (a tenant whose key
//! mxcas does not hold does not fetch); at most [`MAX_FETCHES`] fetches at once per edge; one
//! fetch per media on an edge (single flight); an answer whose `Content-Length` is over the
//! limit is refused before it is read; a media fetch may take `[federation]
//! remote_media_timeout`. A CID media ID mxcas cannot check (another hash or codec) is refused
//! before anything is fetched.
//!
//! An origin that fails to answer (unreachable, timing out, 5xx) is left alone for 30 s,
//! doubling with each failure in a row up to 10 minutes (502 with `Retry-After` meanwhile).
//!
//! MSC2846, verify then fall back: media named by a CID that its origin does not deliver (it
//! is down, backed off, answers 404 or an error, or serves bytes that are not that CID) is
//! fetched by blocks ([`crate::block_fetch`]) from the trustless gateways (`/ipfs/`) of the
//! origin, unless it failed to answer, of the `via` servers the client named, and of the
//! servers of the room the client names, in that order, all at once, each request signed
//! with `X-Matrix` and each block verified against the DAG the media ID names before it is
//! kept; a source that sends a block that does not verify is dropped (and logged), its blocks
//! asked of the others. The origin's whole bytes are checked against the CID as mxcas's
//! profile computes it, so those of another chunking or layout (CIDv0, the IPFS importer's
//! defaults) are discarded there as not proven, and then come by blocks; an identity CID
//! carries its bytes and needs no source. A `via` is never passed on: the servers asked serve
//! what they hold (a gateway never fetches), so one download makes no chain of requests.
//! Opaque media IDs come from their origin only.
//!
//! A `room` and `event` hint adds that room's servers, asked of the requester's homeserver
//! with the requester's token (so only rooms the user can see count): those in the room at the
//! event and now first, then those in it now only, then those in it then only.
//!
//! Media fetched by blocks is streamed to the download that started the fetch as it is
//! stored ([`crate::flight`]); media fetched whole from the origin is checked, stored, then
//! served (its CID proves it only once every byte is in).
//!
//! Not yet: one fetch cluster-wide, a quota on fetched bytes.

use std::sync::Arc;

use axum::http::{StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use mxcas_federation::multipart::{self, Event, MediaPart, MultipartReader};
use mxcas_federation::x_matrix;
use mxcas_meta::MediaKey;

use tokio::sync::oneshot;

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::flight::{Arrival, Live};
use crate::media::{Proof, Resolved};

/// Remote media fetches in flight at once on this edge.
pub const MAX_FETCHES: usize = 16;
/// Largest error body read from a remote.
const MAX_ERROR_BODY: usize = 16 * 1024;

pub(crate) fn bad_gateway(why: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", why)
}

/// What an origin answered for a media ID.
struct Fetched {
    content_type: Option<String>,
    body: futures::stream::BoxStream<'static, Result<Bytes, String>>,
}

/// Fetches `key` (a remote mxc) for a user of `tenant`, from its origin or else from the
/// `via` servers the client named (MSC2846), stores and records it, and answers its record.
pub async fn fetch(
    state: &Arc<AppState>,
    key: &MediaKey,
    tenant: &Arc<crate::tenants::Tenant>,
    hints: Hints,
    want_live: bool,
) -> Result<Arrival, ApiError> {
    if tenant.signing_key.is_none() {
        return Err(ApiError::not_found(format!(
            "Media from {} is not held here, and {} has no signing key here to fetch it over federation",
            key.server_name, tenant.server_name
        )));
    }
    let named = cid::Cid::try_from(key.media_id.as_str()).ok();
    if let Some(cid) = &named
        && let Err(e) = mxcas_cas::VerifiedBlock::supported(cid)
    {
        state
            .media
            .metrics
            .remote_fetches
            .get_or_create(&crate::metrics::ResultLabels { result: "unverifiable" })
            .inc();
        return Err(bad_gateway(format!(
            "The media ID is a CID of a kind mxcas cannot check ({e}): it is not fetched"
        )));
    }
    // Only content that proves itself may come from anyone but its origin.
    let hints = if named.is_some() { hints } else { Hints::default() };
    let (state_key, signer, owned) = (key.clone(), tenant.clone(), state.clone());
    let flight = format!("mxc://{key}");
    let name = flight.clone();
    single_flight(state, flight, want_live, move |live| async move {
        let timeout = owned.federation.remote_media_timeout();
        let fetch = fetch_uncached(&owned, &state_key, &signer, named, hints, live);
        once_in_cluster(&owned, &state_key, &name, timeout, fetch).await
    })
    .await
}

/// Most `via` servers asked for one media.
pub const MAX_VIA: usize = 8;
/// Most servers of a room hint asked for one media.
pub const MAX_ROOM_SERVERS: usize = 8;

/// Where a download's client says remote media may be held besides its origin (MSC2846).
#[derive(Clone, Debug, Default)]
pub struct Hints {
    /// `via` parameters, in the client's order.
    pub via: Vec<String>,
    /// `room` and `event` parameters.
    pub room: Option<RoomHint>,
}

/// A room and an event in it where the media was sent, with the requester's credentials to
/// ask its homeserver who is in that room.
#[derive(Clone)]
pub struct RoomHint {
    pub room: String,
    pub event: String,
    pub token: String,
    /// An application service's `user_id`.
    pub masquerade: Option<String>,
}

impl std::fmt::Debug for RoomHint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.room, self.event)
    }
}

impl RoomHint {
    /// The `room` and `event` parameters of a download by the holder of `token`, if both are
    /// given and look like a room and an event ID (a hint is advice: one that is not is
    /// ignored, never the download's failure).
    pub fn of(query: &std::collections::BTreeMap<String, String>, token: Option<&str>) -> Option<Self> {
        let (room, event) = (query.get("room")?, query.get("event")?);
        let well_formed = |id: &str, sigil: char| id.starts_with(sigil) && id.len() > 1 && id.len() <= 255;
        if !well_formed(room, '!') || !well_formed(event, '$') {
            tracing::debug!(%room, %event, "a room hint that names no room or event; ignored");
            return None;
        }
        Some(Self {
            room: room.clone(),
            event: event.clone(),
            token: token?.to_owned(),
            masquerade: query.get("user_id").cloned(),
        })
    }
}

/// Adds to `servers` those of `candidates` worth asking for `key`, in order, at most `cap` of
/// them: valid server names not listed yet, without the origin (asked first anyway) or our own
/// names (what this cluster holds it has looked up already).
fn add_servers(
    state: &AppState,
    key: &MediaKey,
    servers: &mut Vec<String>,
    candidates: impl IntoIterator<Item = String>,
    cap: usize,
) {
    let mut added = 0;
    for server in candidates {
        if added == cap {
            break;
        }
        if crate::api::valid_server_name(&server)
            && server != key.server_name
            && !state.media.local.contains(&server)
            && !servers.contains(&server)
        {
            servers.push(server);
            added += 1;
        }
    }
}

/// Runs `fetch` (of remote or IPFS media, `flight` naming what it fetches) once on this edge
/// however many downloads ask for it meanwhile ([`crate::flight`]); the download that starts
/// it gets its bytes as they arrive if it streams them and `want_live`.
pub(crate) async fn single_flight<F, Fut>(
    state: &AppState,
    flight: String,
    want_live: bool,
    fetch: F,
) -> Result<Arrival, ApiError>
where
    F: FnOnce(Option<oneshot::Sender<Live>>) -> Fut,
    Fut: std::future::Future<Output = Result<Resolved, ApiError>> + Send + 'static,
{
    let joined = state.flights.join(flight, &state.remote_slots, |live| fetch(want_live.then_some(live)));
    joined.wait(want_live).await
}

/// How long a fetch claim holds unless renewed: the holder renews it every third of this
/// while it fetches, so a holder that died or finished frees the others within about this.
const CLAIM_LEASE: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a waiting edge asks again whether the claim is still held.
const CLAIM_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs `fetch` of `key` (`flight` naming it) once in the cluster where the metadata can
/// arbitrate: the edge claims the fetch from the metadata leader first, and while another edge
/// holds the claim it waits for that edge's record (polling, 20 ms doubling to 250 ms, and
/// asking again for the claim every second, so a holder that failed or died frees it at
/// once or within [`CLAIM_LEASE`]) rather than asking the same servers again. Only a record
/// whose content is not marked lost ends the wait (another edge may be healing it). A claim is
/// advice, never safety: the leader holds one for 5 minutes at most however often it is
/// renewed, a leader change forgets it, and a metadata service that cannot answer lets the
/// edge fetch; at worst two edges fetch, and the first record stays. The waiting ends by
/// `timeout` whatever happens. The claim is released when the fetch ends, however it ends.
pub(crate) async fn once_in_cluster<F>(
    state: &AppState,
    key: &MediaKey,
    flight: &str,
    timeout: std::time::Duration,
    fetch: F,
) -> Result<Resolved, ApiError>
where
    F: std::future::Future<Output = Result<Resolved, ApiError>>,
{
    use mxcas_meta::claims::Claim;
    let (meta, claimant) = (state.media.meta.clone(), state.flights.claimant.clone());
    let give_up = tokio::time::Instant::now() + timeout;
    let mut counted = false;
    'claim: loop {
        match meta.claim_fetch(flight, &claimant, CLAIM_LEASE, false).await {
            Ok(Claim::Held(_)) if tokio::time::Instant::now() < give_up => {}
            Ok(_) => break,
            Err(e) => {
                tracing::info!(mxc = %key, error = %e, "cannot claim a fetch; fetching anyway");
                break;
            }
        }
        if !std::mem::replace(&mut counted, true) {
            state.media.metrics.remote_fetches.get_or_create(&crate::metrics::ResultLabels { result: "waited" }).inc();
            tracing::debug!(mxc = %key, "another edge is fetching this media; waiting for its record");
        }
        let recheck = (tokio::time::Instant::now() + CLAIM_RECHECK).min(give_up);
        let mut pause = std::time::Duration::from_millis(20);
        while tokio::time::Instant::now() < recheck {
            tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(recheck)).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(250));
            match state.media.resolve_remote_fresh(key).await {
                Ok(Some(r)) if !r.content.lost => return Ok(r),
                Ok(_) => {}
                // A metadata hiccup (an election) does not end the wait.
                Err(e) => tracing::debug!(mxc = %key, error = %e.message, "cannot look the media up yet"),
            }
        }
        continue 'claim;
    }
    let renew = async {
        loop {
            tokio::time::sleep(CLAIM_LEASE / 3).await;
            let _ = meta.claim_fetch(flight, &claimant, CLAIM_LEASE, false).await;
        }
    };
    let result = tokio::select! {
        r = fetch => r,
        never = renew => never,
    };
    // The answer goes out without waiting for the release (which lapses anyway).
    let (flight, key_name) = (flight.to_owned(), key.to_string());
    tokio::spawn(async move {
        if let Err(e) = meta.claim_fetch(&flight, &claimant, CLAIM_LEASE, true).await {
            tracing::debug!(mxc = %key_name, error = %e, "cannot release a fetch claim; it lapses");
        }
    });
    result
}

/// What bytes fetched for `key` will be served as, from their first bytes (as
/// [`crate::media::MediaService::store_remote`] decides, for a live answer before they are
/// stored): media named by the CID mxcas writes is typed by its bytes; other media IDs by
/// their format if recognised.
pub(crate) fn live_type(key: &MediaKey, head: &[u8]) -> String {
    let as_ours = cid::Cid::try_from(key.media_id.as_str())
        .is_ok_and(|c| c.version() == cid::Version::V1 && c.to_string() == key.media_id && checkable(&c));
    if as_ours {
        crate::sniff::by_bytes(head).to_owned()
    } else {
        crate::sniff::for_reserved(head, "application/octet-stream".to_owned())
    }
}

/// Whether mxcas can prove bytes are what a CID names by computing its own CID of them: the
/// sha2-256 raw and dag-pb CIDs its profile makes (others will be checked block by block).
fn checkable(cid: &cid::Cid) -> bool {
    cid.hash().code() == mxcas_cas::SHA2_256
        && cid.hash().size() == 32
        && matches!(cid.codec(), mxcas_cas::RAW | mxcas_cas::DAG_PB)
}

/// The declared type of remote media if it is a valid one (as an upload's must be).
fn valid_type(declared: Option<String>) -> Option<String> {
    declared.filter(|t| t.len() <= 255 && crate::api::headers::parse_content_type(t).is_some())
}

/// The origin first; then, for media named by a CID, the blocks of its DAG from the gateways
/// of the origin (if it answers at all), the `via` servers and the room's servers, all at
/// once, each block verified as it arrives. The origin's whole bytes are checked against the
/// CID as mxcas computes it, so media of another chunking or layout is discarded there (it
/// cannot be proven whole) and then comes by blocks. A CID mxcas's profile never makes whole
/// (an identity CID, which carries its bytes) is read by blocks only.
async fn fetch_uncached(
    state: &AppState,
    key: &MediaKey,
    signer: &crate::tenants::Tenant,
    named: Option<cid::Cid>,
    hints: Hints,
    live: Option<oneshot::Sender<Live>>,
) -> Result<Resolved, ApiError> {
    let whole = named.as_ref().is_none_or(checkable);
    let from_origin = if whole { Some(from_origin(state, key, signer).await) } else { None };
    let origin_failed = match from_origin {
        Some(Ok(r)) => return Ok(r),
        Some(Err(e)) => Some(e),
        None => None,
    };
    let Some(root) = named else {
        return Err(origin_failed.expect("an opaque media ID is asked of its origin"));
    };
    // From here on one deadline bounds the fallback, whatever it waits on: discovery, the
    // homeserver, the blocks (whose stream then fails, so the store cleans up).
    let deadline = tokio::time::Instant::now() + state.federation.remote_media_timeout();
    // An origin that did not answer is not asked again; one that answered without the bytes
    // (or with bytes of another layout than ours) may still serve its blocks.
    let mut servers: Vec<String> = Vec::new();
    if state.federation.backed_off(&key.server_name).is_none() {
        servers.push(key.server_name.clone());
    }
    add_servers(state, key, &mut servers, hints.via, MAX_VIA);
    if let Some(hint) = &hints.room {
        let lookup = signer.auth.room_servers(&hint.token, hint.masquerade.as_deref(), &hint.room, &hint.event);
        let in_room = tokio::time::timeout_at(deadline, lookup).await.unwrap_or_default();
        tracing::debug!(mxc = %key, room = ?hint, servers = ?in_room, "servers of a room hint");
        add_servers(state, key, &mut servers, in_room, MAX_ROOM_SERVERS);
    }
    if root.hash().code() == mxcas_cas::IDENTITY {
        // The CID carries the bytes: nothing to ask of anyone.
        servers.clear();
    } else if servers.is_empty() {
        return Err(origin_failed.unwrap_or_else(|| bad_gateway("No server that may hold this media can be asked")));
    }
    match by_blocks(state, key, signer, root, &servers, live, deadline).await {
        Ok(r) => Ok(r),
        // No source had it at all: the origin's answer says most.
        Err(e) if e.status == StatusCode::NOT_FOUND && origin_failed.is_some() => Err(origin_failed.expect("checked")),
        Err(e) => Err(e),
    }
}

/// `key`'s bytes from the trustless gateways of `servers` (Matrix servers, asked with signed
/// requests at their federation addresses, found all at once), verified block by block
/// against `root`, by `deadline`. A server that cannot be reached, or fails every block it
/// is asked for, is left alone for a while like an origin that fails.
async fn by_blocks(
    state: &AppState,
    key: &MediaKey,
    signer: &crate::tenants::Tenant,
    root: cid::Cid,
    servers: &[String],
    live: Option<oneshot::Sender<Live>>,
    deadline: tokio::time::Instant,
) -> Result<Resolved, ApiError> {
    let fed = &state.federation;
    let signing_key = signer.signing_key.clone().expect("chosen for its key");
    let asked: Vec<&String> = servers.iter().filter(|s| fed.backed_off(s).is_none()).collect();
    let found = futures::future::join_all(asked.iter().map(|s| async move {
        tokio::time::timeout_at(deadline, fed.target(s)).await.unwrap_or_else(|_| {
            Err(crate::federation::FederationError::Unreachable {
                server: (*s).clone(),
                reason: "discovery did not end by the deadline".into(),
            })
        })
    }))
    .await;
    let mut names = Vec::new();
    let mut sources = Vec::new();
    for (server, target) in asked.into_iter().zip(found) {
        match target {
            Ok(target) => {
                names.push(server.clone());
                sources.push(crate::block_fetch::Source {
                    base: target.base,
                    http: fed.http().clone(),
                    signed: Some(Arc::new(crate::block_fetch::Signed {
                        key: signing_key.clone(),
                        origin: signer.server_name.clone(),
                        destination: server.clone(),
                        host: target.host,
                    })),
                });
            }
            Err(e) => {
                tracing::info!(%server, error = %e, "cannot reach a server that may hold remote media");
                if matches!(e, crate::federation::FederationError::Unreachable { .. }) {
                    fed.failed(server);
                }
            }
        }
    }
    if sources.is_empty() && root.hash().code() != mxcas_cas::IDENTITY {
        return Err(bad_gateway("None of the servers that may hold this media can be reached"));
    }
    let limit = signer.max_upload_size;
    let (rx, report) = crate::block_fetch::fetch(sources, root, 0..u64::MAX, state.ipfs.fetch_config().clone())
        .map_err(|e| bad_gateway(format!("The media's DAG cannot be read: {e}")))?;
    let stored = async {
        let (size, body) = crate::block_fetch::into_body(rx, deadline).await.map_err(|e| match e {
            crate::block_fetch::FetchError::NoSource { cid, failing: 0, .. }
                if crate::gateway::as_v1(&cid) == crate::gateway::as_v1(&root) =>
            {
                ApiError::not_found("No server that may hold this media has it")
            }
            e => bad_gateway(format!("The media could not be fetched from verified blocks: {e}")),
        })?;
        if size > limit {
            return Err(ApiError::remote_too_large(limit));
        }
        let (body, served_as) = match live {
            Some(live) => {
                crate::flight::tee(body, size, live, state.media.live_grace(), |head| live_type(key, head)).await
            }
            None => (Box::pin(body) as futures::stream::BoxStream<'static, _>, None),
        };
        state.media.store_remote(key, None, body, limit, Proof::Blocks { served_as }).await
    }
    .await;
    let reports = report.await.unwrap_or_default();
    tracing::info!(mxc = %key, ok = stored.is_ok(), sources = ?reports, "remote media fetched by blocks");
    crate::ipfs::count_blocks(state, &reports);
    // Backed off only for failing to answer (errors, timeouts, 5xx); a refusal (a gateway
    // closed to other servers) or a bad block drops a source for this fetch only.
    for (server, r) in names.iter().zip(&reports) {
        if r.blocks == 0 && !r.refused && r.failures >= crate::block_fetch::MAX_FAILURES {
            fed.failed(server);
        }
    }
    stored
}

/// The origin's federation download of `key`, checked whole against the media ID if that is
/// a CID.
async fn from_origin(state: &AppState, key: &MediaKey, signer: &crate::tenants::Tenant) -> Result<Resolved, ApiError> {
    let fed = &state.federation;
    let origin = key.server_name.as_str();
    if let Some(left) = fed.backed_off(origin) {
        let mut e = bad_gateway(format!("{origin} failed to answer lately; it is asked again later"));
        e.retry_after_ms = Some(left.as_millis() as u64 + 1);
        return Err(e);
    }
    let target = fed.target(origin).await.map_err(|e| {
        tracing::info!(%origin, error = %e, "cannot reach a remote media server");
        if matches!(e, crate::federation::FederationError::Unreachable { .. }) {
            fed.failed(origin);
        }
        bad_gateway(format!("Cannot reach {origin}"))
    })?;
    let signing_key = signer.signing_key.as_ref().expect("chosen for its key");
    let uri = format!("/_matrix/federation/v1/media/download/{}", key.media_id);
    let auth = x_matrix::authorization(signing_key, &signer.server_name, &key.server_name, "GET", &uri, None)
        .map_err(|e| ApiError::internal(format!("cannot sign: {e}")))?;
    let resp = fed
        .http()
        .get(format!("{}{uri}", target.base))
        .header(header::HOST, &target.host)
        .header(header::AUTHORIZATION, auth)
        .timeout(fed.remote_media_timeout())
        .send()
        .await
        .map_err(|e| {
            tracing::info!(%origin, error = %e, "remote media request failed");
            fed.failed(origin);
            bad_gateway(format!("{origin} did not answer"))
        })?;
    if resp.status().is_server_error() {
        fed.failed(origin);
        return Err(bad_gateway(format!("{origin} answered {}", resp.status())));
    }
    fed.answered(origin);
    too_large(&resp, signer.max_upload_size)?;
    let fetched = match resp.status() {
        StatusCode::OK => from_multipart(state, key, resp, signer.max_upload_size).await?,
        StatusCode::NOT_FOUND => {
            let body = read_small(resp).await;
            if body["errcode"] == "M_UNRECOGNIZED" {
                legacy(state, key, &target, signer.max_upload_size).await?
            } else {
                return Err(ApiError::not_found("Media not found on its origin"));
            }
        }
        s => return Err(bad_gateway(format!("{} answered {s}", key.server_name))),
    };
    state
        .media
        .store_remote(key, valid_type(fetched.content_type), fetched.body, signer.max_upload_size, Proof::Recompute)
        .await
}

/// Refuses an answer that says it is larger than the limit before reading it (a multipart
/// answer is a little larger than its media: its framing is allowed for).
fn too_large(resp: &reqwest::Response, limit: u64) -> Result<(), ApiError> {
    match resp.content_length() {
        Some(n) if n > limit.saturating_add(mxcas_federation::multipart::MAX_HEAD as u64) => {
            Err(ApiError::remote_too_large(limit))
        }
        _ => Ok(()),
    }
}

/// A small JSON error body (anything else, or more than 16 KiB, reads as `null`).
async fn read_small(resp: reqwest::Response) -> serde_json::Value {
    let body = crate::federation::read_limited(resp, MAX_ERROR_BODY).await.unwrap_or_default();
    serde_json::from_slice(&body).unwrap_or_default()
}

/// The bytes of a `multipart/mixed` answer, or of the `Location` it names.
async fn from_multipart(
    state: &AppState,
    key: &MediaKey,
    resp: reqwest::Response,
    limit: u64,
) -> Result<Fetched, ApiError> {
    let ct = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let boundary = multipart::boundary_of(&ct)
        .ok_or_else(|| bad_gateway(format!("{} answered {ct:?}, not multipart/mixed", key.server_name)))?;
    let mut reader = MultipartReader::new(&boundary);
    let mut chunks = resp.bytes_stream();
    // Up to the media part's head.
    let media = loop {
        match reader.next_event().map_err(|e| bad_gateway(e.to_string()))? {
            Some(Event::Head { media, .. }) => break media,
            Some(_) => return Err(bad_gateway("multipart answer without a media part")),
            None => match chunks.next().await {
                Some(Ok(c)) => reader.push(&c),
                Some(Err(e)) => return Err(bad_gateway(format!("reading the answer: {e}"))),
                None => return Err(bad_gateway("the multipart answer ends early")),
            },
        }
    };
    match media {
        MediaPart::Location(url) => location(state, key, &url, limit).await,
        MediaPart::Bytes { content_type, .. } => {
            let body = futures::stream::unfold((reader, chunks, false), |(mut reader, mut chunks, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match reader.next_event() {
                        Err(e) => return Some((Err(e.to_string()), (reader, chunks, true))),
                        Ok(Some(Event::Bytes(b))) => return Some((Ok(Bytes::from(b)), (reader, chunks, false))),
                        Ok(Some(Event::End)) => return None,
                        Ok(Some(Event::Head { .. })) => {
                            return Some((Err("a second media part".into()), (reader, chunks, true)));
                        }
                        Ok(None) => match chunks.next().await {
                            Some(Ok(c)) => reader.push(&c),
                            Some(Err(e)) => return Some((Err(e.to_string()), (reader, chunks, true))),
                            None => {
                                return Some((Err("the multipart answer ends early".into()), (reader, chunks, true)));
                            }
                        },
                    }
                }
            });
            Ok(Fetched { content_type, body: body.boxed() })
        }
    }
}

/// A `Location` the origin sent the bytes to: fetched once, unsigned, under the address rules.
async fn location(state: &AppState, key: &MediaKey, url: &str, limit: u64) -> Result<Fetched, ApiError> {
    // The bytes of an opaque ID are not checked against anything: they come over TLS only.
    if !url.starts_with("https://") {
        return Err(bad_gateway("the origin sent the media to a URL that is not https"));
    }
    state.federation.check_location(&key.server_name, url).map_err(|e| bad_gateway(e.to_string()))?;
    let resp = state.federation.http().get(url).timeout(state.federation.remote_media_timeout()).send().await.map_err(
        |e| {
            tracing::info!(origin = %key.server_name, error = %e, "remote media Location failed");
            bad_gateway("The origin's Location did not answer")
        },
    )?;
    if resp.status() != StatusCode::OK {
        return Err(bad_gateway(format!("the origin's Location answered {}", resp.status())));
    }
    too_large(&resp, limit)?;
    Ok(plain(resp))
}

/// The legacy download of a server older than authenticated media.
async fn legacy(
    state: &AppState,
    key: &MediaKey,
    target: &crate::federation::Target,
    limit: u64,
) -> Result<Fetched, ApiError> {
    let url =
        format!("{}/_matrix/media/v3/download/{}/{}?allow_remote=false", target.base, key.server_name, key.media_id);
    let resp = state
        .federation
        .http()
        .get(url)
        .header(header::HOST, &target.host)
        .timeout(state.federation.remote_media_timeout())
        .send()
        .await
        .map_err(|_| bad_gateway(format!("{} did not answer", key.server_name)))?;
    too_large(&resp, limit)?;
    match resp.status() {
        StatusCode::OK => Ok(plain(resp)),
        StatusCode::NOT_FOUND => Err(ApiError::not_found("Media not found on its origin")),
        s => Err(bad_gateway(format!("{} answered {s}", key.server_name))),
    }
}

fn plain(resp: reqwest::Response) -> Fetched {
    let content_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = resp.bytes_stream().map(|r| r.map_err(|e| e.to_string())).boxed();
    Fetched { content_type, body }
}
