//! The server-server endpoints the edge serves:
//!
//! - `GET /_matrix/key/v2/server`: the key document of the request's tenant (by `Host`), signed
//!   with its signing key, for deployments where mxcas answers for the server name itself (a
//!   homeserver that publishes the same key serves this route itself; see
//!   docs/decentralisation.md).
//! - `GET /_matrix/federation/v1/media/download/{mediaId}` (spec v1.11): local media as
//!   `multipart/mixed` (a JSON part, then the bytes), for a request signed with `X-Matrix` by
//!   its origin for one of our server names.
//! - `GET /_matrix/federation/v1/media/thumbnail/{mediaId}?width=&height=…`: its thumbnail (the
//!   client endpoint's parameters and rules), framed the same way.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{StreamExt, stream};
use mxcas_federation::{keys, multipart};
use mxcas_meta::{MediaKey, MediaState};

use super::AppState;
use super::error::ApiError;
use super::headers::{content_disposition, insert, wait_of};

pub async fn server_keys(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let tenant = state.tenants.for_request(&headers)?;
    let Some(key) = &tenant.signing_key else {
        return Err(ApiError::not_found(format!(
            "No signing key is configured for {} here; its homeserver publishes its keys",
            tenant.server_name
        )));
    };
    let valid_until = crate::media::now_ms() + state.federation.key_validity().as_millis() as u64;
    let doc = keys::server_keys_document(key, &tenant.server_name, valid_until);
    Ok(([(header::CONTENT_TYPE, "application/json")], doc.to_string()).into_response())
}

/// Checks a federation media request: its signature, then its media ID. Answers the origin
/// and the local media asked for.
async fn signed_request_for(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    media_id: String,
) -> Result<(String, MediaKey), ApiError> {
    let (origin, destination) = authenticated(state, method, uri, headers).await?;
    if !super::valid_media_id(&media_id) {
        return Err(ApiError::bad_request("M_INVALID_PARAM", "Malformed media ID"));
    }
    Ok((origin, MediaKey::new(destination, media_id)))
}

/// The headers of a `multipart/mixed` answer framed by `boundary`.
fn multipart_headers(boundary: &str, length: Option<u64>) -> HeaderMap {
    let mut h = HeaderMap::new();
    insert(&mut h, header::CONTENT_TYPE, &multipart::content_type(boundary));
    if let Some(n) = length {
        insert(&mut h, header::CONTENT_LENGTH, &n.to_string());
    }
    h
}

/// Whether a request carries an `X-Matrix` authorization (it comes from a Matrix server).
pub(super) fn is_signed(headers: &HeaderMap) -> bool {
    crate::federation::x_matrix_credential(headers).is_some()
}

/// Checks the request's signature; answers (origin, destination).
pub(super) async fn authenticated(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(String, String), ApiError> {
    // The Host's tenant is the destination of a request that names none.
    let host_tenant = state.tenants.for_request(headers).ok().map(|t| t.server_name.clone());
    // Federation is answered for tenants whose signing key mxcas holds (the key that makes
    // this edge a server of that name); others' federation goes to their homeserver.
    let is_ours = |name: &str| state.tenants.by_server_name(name).is_some_and(|t| t.signing_key.is_some());
    let request_uri = uri.path_and_query().map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned());
    state
        .federation
        .authenticate(headers, method.as_str(), &request_uri, &is_ours, host_tenant.as_deref().unwrap_or(""))
        .await
}

pub async fn media_thumbnail(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(media_id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let (origin, key) = signed_request_for(&state, &method, &uri, &headers, media_id).await?;
    let asked = super::thumbnail::parse(&query, state.media.config.max_download_wait)?;
    let resolved = state.media.resolve(&key, asked.wait, false).await?;
    tracing::debug!(%origin, mxc = %key, "federation thumbnail");
    let (made, bytes) = super::thumbnail::thumbnail_of(&state, &resolved, asked.spec).await?;
    let boundary = uuid::Uuid::new_v4().simple().to_string();
    // Thumbnails are images this server made: shown inline.
    let mut body = multipart::head(&boundary, &serde_json::json!({}), &made.record.content_type, Some("inline"));
    body.extend_from_slice(&bytes);
    body.extend_from_slice(&multipart::tail(&boundary));
    Ok((StatusCode::OK, multipart_headers(&boundary, None), body).into_response())
}

pub async fn media_download(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Path(media_id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let (origin, key) = signed_request_for(&state, &method, &uri, &headers, media_id).await?;
    let wait = wait_of(&query, state.media.config.max_download_wait)?;
    let resolved = state.media.resolve(&key, wait, false).await?;
    tracing::debug!(%origin, mxc = %key, "federation download");
    let MediaState::Ready { content_type, .. } = &resolved.media.state else {
        return Err(ApiError::internal("media has no content"));
    };
    let boundary = uuid::Uuid::new_v4().simple().to_string();
    let head = multipart::head(
        &boundary,
        &serde_json::json!({}),
        content_type,
        Some(&content_disposition(content_type, None)),
    );
    let tail = multipart::tail(&boundary);
    let content = resolved.content.clone();
    let length = head.len() as u64 + content.size + tail.len() as u64;
    let h = multipart_headers(&boundary, Some(length));
    if method == Method::HEAD {
        return Ok((StatusCode::OK, h, Body::empty()).into_response());
    }
    // The first block before the status line: a loss becomes an error, not a cut body.
    let count = crate::cache::BlockCache::block_count(&content);
    let mut blocks = state.media.blocks.read_ahead(&content, 0..count);
    let first = match blocks.next().await {
        Some(Ok(b)) => b,
        Some(Err(e)) if e.is_data_loss() => {
            state.media.after_read_failure(&resolved, &e, true).await?;
            return Err(ApiError::data_loss());
        }
        Some(Err(e)) => return Err(e.into()),
        None => return Err(ApiError::internal("media of no blocks")),
    };
    let cid = content.cid;
    let rest = blocks.map(move |block| {
        block.map_err(|e| {
            tracing::error!(%cid, error = %e, "aborting a federation download");
            std::io::Error::other(e.to_string())
        })
    });
    let body = stream::iter([Ok(Bytes::from(head)), Ok(first)])
        .chain(rest)
        .chain(stream::once(async move { Ok(Bytes::from(tail)) }));
    Ok((StatusCode::OK, h, Body::from_stream(body)).into_response())
}
