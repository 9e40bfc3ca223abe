//! `GET`/`HEAD` of media: `/_matrix/client/v1/media/download/…` (authenticated) and the legacy
//! `/_matrix/media/v3/download/…` (unauthenticated, can be frozen by config).
//!
//! Ranges are served block by block from the hot cache: a range of a large file reads only
//! the 1 MiB blocks it covers, read ahead of the client in parallel. The first block is
//! fetched (and verified) before the status line is sent, so a store failure becomes a proper
//! error; a failure later in a long body aborts the connection rather than sending unverified
//! bytes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{StreamExt, stream};
use mxcas_meta::{MediaKey, MediaState};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::headers::{content_disposition, insert, media_headers, not_modified, wait_of};
use super::range::{RangeDecision, decide};
use crate::cache::{BlockCache, BlockError};
use crate::flight::{Arrival, Live};
use crate::media::Resolved;

#[derive(Deserialize)]
pub struct MediaPath {
    server_name: String,
    media_id: String,
    file_name: Option<String>,
}

pub async fn download_v1(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<MediaPath>, PathRejection>,
    Query(query): Query<BTreeMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    super::authorize_media(&state, &headers, &query).await?;
    let Path(path) = path.map_err(super::path_error)?;
    let hints = hints_of(&headers, &query, raw.as_deref());
    serve(&state, method, &headers, path, &query, hints, false).await
}

/// Where a client says remote media may be held (MSC2846's `via`, `room` and `event`).
pub(super) fn hints_of(
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
    raw: Option<&str>,
) -> crate::remote::Hints {
    crate::remote::Hints {
        via: via_of(raw),
        room: crate::remote::RoomHint::of(query, super::auth::access_token(headers, query)),
    }
}

/// The `via` parameters of a query (MSC2846: servers that may hold remote media, in the order
/// to ask them), each as given.
fn via_of(raw: Option<&str>) -> Vec<String> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == "via")
        .map(|(_, v)| v.into_owned())
        .take(crate::remote::MAX_VIA * 4)
        .collect()
}

pub async fn download_legacy(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<MediaPath>, PathRejection>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let Path(path) = path.map_err(super::path_error)?;
    super::legacy_allowed(&state)?;
    serve(&state, method, &headers, path, &query, crate::remote::Hints::default(), true).await
}

async fn serve(
    state: &Arc<AppState>,
    method: Method,
    headers: &HeaderMap,
    path: MediaPath,
    query: &BTreeMap<String, String>,
    hints: crate::remote::Hints,
    legacy: bool,
) -> Result<Response, ApiError> {
    let wait = wait_of(query, state.media.config.max_download_wait)?;
    let key = checked_key(path.server_name, path.media_id)?;
    let file_name = path.file_name.as_deref();
    // A whole GET of media fetched now may be answered while it is fetched.
    let want_live = method == Method::GET && !headers.contains_key(header::RANGE);
    let resolved = match resolve(state, headers, &key, wait, hints.clone(), legacy, want_live).await? {
        Arrival::Held(r) => r,
        Arrival::Live(live) => return Ok(respond_live(live, file_name)),
    };
    // A missing or corrupt first block may mean the record moved (repaired by a re-upload)
    // since this edge read it: ask again once, then answer the loss.
    // A record marked lost is still tried: the mark is a report, the read is the proof.
    let failure = match respond(state, method.clone(), headers, &resolved, file_name, legacy).await {
        Err(Failure::Block(e)) if e.is_data_loss() => e,
        other => return other.map_err(ApiError::from),
    };
    let fresh = state.media.after_read_failure(&resolved, &failure, false).await?;
    let lost = match respond(state, method.clone(), headers, &fresh, file_name, legacy).await {
        Err(Failure::Block(e)) if e.is_data_loss() => e,
        other => return other.map_err(ApiError::from),
    };
    // Twice, from the leader's current record: reported as lost (any other answer, such as a
    // store that is not the cluster's, is the answer).
    match state.media.after_read_failure(&fresh, &lost, true).await {
        Err(e) if e.errcode == ApiError::data_loss().errcode => {}
        Err(e) => return Err(e),
        Ok(_) => return Err(ApiError::data_loss()),
    }
    // Media of other servers (and IPFS media) can be had again from where it came: fetched
    // anew and verified like the first time, which repairs the stored content for every
    // record of those bytes. Local media is lost until its bytes are uploaded again.
    let ipfs = crate::ipfs::media_cid(&key.media_id).transpose()?;
    if legacy || (ipfs.is_none() && state.media.local.contains(&key.server_name)) {
        return Err(ApiError::data_loss());
    }
    tracing::warn!(mxc = %key, "remote media lost from the store; fetching it again");
    let tenant = state.tenants.for_request(headers)?;
    let again = match ipfs {
        Some(cid) => crate::ipfs::fetch_again(state, &key, cid, tenant, want_live).await,
        None => crate::remote::fetch(state, &key, tenant, hints, want_live).await,
    };
    match again.map_err(|e| {
        tracing::warn!(mxc = %key, error = %e.message, "lost remote media could not be fetched again");
        ApiError::data_loss()
    })? {
        Arrival::Held(r) => respond(state, method, headers, &r, file_name, legacy).await.map_err(ApiError::from),
        Arrival::Live(live) => Ok(respond_live(live, file_name)),
    }
}

/// The media key of a download or thumbnail path, or the client's error.
pub(super) fn checked_key(server_name: String, media_id: String) -> Result<MediaKey, ApiError> {
    if !super::valid_server_name(&server_name) {
        return Err(ApiError::bad_request("M_INVALID_PARAM", "Malformed server name"));
    }
    match crate::ipfs::media_cid(&media_id) {
        Some(Err(e)) => return Err(e),
        Some(Ok(_)) => {}
        None if !super::valid_media_id(&media_id) => {
            return Err(ApiError::bad_request("M_INVALID_PARAM", "Malformed media ID"));
        }
        None => {}
    }
    Ok(MediaKey::new(server_name, media_id))
}

/// The record of `key` for a client's download or thumbnail: local media (waiting up to
/// `wait` for one not uploaded yet), `ipfs:` media from the IPFS gateways, or remote media
/// from its origin or the servers `hints` names, fetched for the user of the request's
/// tenant unless held already. The legacy endpoints never fetch. With `want_live`, a fetch
/// this request starts may answer its bytes as they arrive.
pub(super) async fn resolve(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    key: &MediaKey,
    wait: std::time::Duration,
    hints: crate::remote::Hints,
    legacy: bool,
    want_live: bool,
) -> Result<Arrival, ApiError> {
    if let Some(cid) = crate::ipfs::media_cid(&key.media_id).transpose()? {
        // IPFS media comes from the gateways, whatever server the URI names (the legacy
        // endpoints serve only what is held, like remote media).
        return match state.media.resolve_remote(key).await? {
            Some(r) if !(legacy && state.media.frozen(&r)) => Ok(Arrival::Held(r)),
            Some(_) => Err(ApiError::not_found("Media not found")),
            None if legacy => Err(ApiError::not_found("Media not found")),
            None => crate::ipfs::resolve(state, key, cid, state.tenants.for_request(headers)?, want_live).await,
        };
    }
    if state.media.local.contains(&key.server_name) {
        return state.media.resolve(key, wait, legacy).await.map(Arrival::Held);
    }
    match state.media.resolve_remote(key).await? {
        // The legacy endpoints never reach out to other servers: only what this cluster
        // already holds, and frozen like local media (by when it was fetched).
        Some(r) if legacy && state.media.frozen(&r) => Err(ApiError::not_found("Media not found")),
        Some(r) => Ok(Arrival::Held(r)),
        None if legacy => Err(ApiError::not_found("Media not found")),
        None => crate::remote::fetch(state, key, state.tenants.for_request(headers)?, hints, want_live).await,
    }
}

/// A download answered while its media is fetched ([`crate::flight`]): the whole file, its
/// bytes verified as they arrive. No `ETag` (the stored CID is not known yet) and no ranges.
fn respond_live(live: Live, file_name: Option<&str>) -> Response {
    let mut h = media_headers("\"\"", false);
    h.remove(header::ETAG);
    insert(&mut h, header::CONTENT_TYPE, &live.content_type);
    insert(&mut h, header::CONTENT_DISPOSITION, &content_disposition(&live.content_type, file_name));
    insert(&mut h, header::CONTENT_LENGTH, &live.size.to_string());
    (StatusCode::OK, h, Body::from_stream(live.body())).into_response()
}

/// Why a response could not be made.
enum Failure {
    Api(ApiError),
    /// Reading the first block failed.
    Block(BlockError),
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure::Api(e)
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Api(e) => e,
            Failure::Block(e) => e.into(),
        }
    }
}

async fn respond(
    state: &AppState,
    method: Method,
    req_headers: &HeaderMap,
    r: &Resolved,
    file_name: Option<&str>,
    legacy: bool,
) -> Result<Response, Failure> {
    let MediaState::Ready { cid, content_type, filename, .. } = &r.media.state else {
        return Err(ApiError::internal("media has no content").into());
    };
    let size = r.content.size;
    let etag = format!("\"{cid}\"");

    let mut h = media_headers(&etag, legacy);
    insert(&mut h, header::ACCEPT_RANGES, "bytes");
    if not_modified(req_headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }

    // If-Range: the range applies only to this exact representation (strong ETag match; we
    // send no Last-Modified, so a date never matches).
    let if_range_ok =
        req_headers.get(header::IF_RANGE).map(|v| v.to_str().is_ok_and(|v| v.trim() == etag)).unwrap_or(true);
    let range_header = req_headers.get(header::RANGE).and_then(|v| v.to_str().ok()).filter(|_| if_range_ok);
    let (status, start, end) = match decide(range_header, size) {
        RangeDecision::Unsatisfiable => {
            // An error, not the media: no media headers, nothing cached for a year.
            let mut resp =
                ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "M_UNKNOWN", "Range not satisfiable").into_response();
            let rh = resp.headers_mut();
            insert(rh, header::CONTENT_RANGE, &format!("bytes */{size}"));
            insert(rh, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
            insert(rh, header::CACHE_CONTROL, "no-store");
            return Ok(resp);
        }
        RangeDecision::Partial { start, end } => {
            insert(&mut h, header::CONTENT_RANGE, &format!("bytes {start}-{end}/{size}"));
            (StatusCode::PARTIAL_CONTENT, start, end + 1)
        }
        RangeDecision::Full => (StatusCode::OK, 0, size),
    };
    insert(&mut h, header::CONTENT_TYPE, content_type);
    // Media named by its CID is everyone's who uploaded those bytes: a filename stored with it
    // (by versions before bytes decided) is one uploader's, so only the URL's is used.
    let stored_name = if r.media.key.media_id == cid.to_string() { None } else { filename.as_deref() };
    insert(&mut h, header::CONTENT_DISPOSITION, &content_disposition(content_type, file_name.or(stored_name)));
    insert(&mut h, header::CONTENT_LENGTH, &(end - start).to_string());

    if method == Method::HEAD || start == end {
        return Ok((status, h, Body::empty()).into_response());
    }

    let chunk = r.content.chunk_size as u64;
    let first_block = start / chunk;
    let last_block = (end - 1) / chunk;
    let content = r.content.clone();
    let slice = move |i: u64, bytes: Bytes| -> Bytes {
        let range = BlockCache::block_range(&content, i);
        let from = start.max(range.start) - range.start;
        let to = end.min(range.end) - range.start;
        bytes.slice(from as usize..to as usize)
    };
    // The blocks after the first are read while the first is awaited.
    let mut blocks =
        state.media.blocks.read_ahead(&r.content, first_block..last_block + 1).zip(stream::iter(first_block..));
    let Some((first, _)) = blocks.next().await else {
        return Err(ApiError::internal("a non-empty range covers no block").into());
    };
    let head = slice(first_block, first.map_err(Failure::Block)?);
    let content = r.content.clone();
    let (media, resolved) = (state.media.clone(), r.clone());
    let rest = blocks.map(move |(block, i)| {
        block.map(|bytes| slice(i, bytes)).map_err(|e| {
            tracing::error!(cid = %content.cid, block = i, error = %e, "aborting response body");
            if e.is_data_loss() {
                // Past the status line: the client sees a cut body; the loss is recorded.
                let (media, resolved, err) = (media.clone(), resolved.clone(), e.clone());
                tokio::spawn(async move { media.after_read_failure(&resolved, &err, true).await });
            }
            std::io::Error::other(e.to_string())
        })
    });
    let body = stream::once(async move { Ok(head) }).chain(rest);
    Ok((status, h, Body::from_stream(body)).into_response())
}
