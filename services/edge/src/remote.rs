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
//! One fetch per media on an edge at a time (single flight); not yet: streaming to the client
//! while fetching, fallback sources (`via`, room hints), per-host backoff, one fetch
//! cluster-wide.

use std::sync::Arc;

use axum::http::{StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use mxcas_federation::multipart::{self, Event, MediaPart, MultipartReader};
use mxcas_federation::x_matrix;
use mxcas_meta::MediaKey;

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::media::Resolved;

fn bad_gateway(why: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "M_UNKNOWN", why)
}

/// What an origin answered for a media ID.
struct Fetched {
    content_type: Option<String>,
    body: futures::stream::BoxStream<'static, Result<Bytes, String>>,
}

/// Fetches `key` (a remote mxc) from its origin, stores and records it, and answers its record.
pub async fn fetch(state: &AppState, key: &MediaKey) -> Result<Resolved, ApiError> {
    let Some(signer) = state.tenants.all().iter().find(|t| t.signing_key.is_some()).cloned() else {
        return Err(ApiError::not_found(format!(
            "Media from {} is not held here, and no signing key is configured to fetch it over federation",
            key.server_name
        )));
    };
    let flight = state.remote_fetches.clone();
    let state_key = key.clone();
    // One fetch per media on this edge: concurrent downloads wait for it.
    let result = flight
        .try_get_with(key.clone(), async move { fetch_uncached(state, &state_key, &signer).await.map(Arc::new) })
        .await;
    flight.invalidate(key).await;
    result.map(|r| (*r).clone()).map_err(|e| (*e).clone())
}

async fn fetch_uncached(
    state: &AppState,
    key: &MediaKey,
    signer: &crate::tenants::Tenant,
) -> Result<Resolved, ApiError> {
    let fed = &state.federation;
    let target = fed.target(&key.server_name).await.map_err(|e| {
        tracing::info!(origin = %key.server_name, error = %e, "cannot reach a remote media server");
        bad_gateway(format!("Cannot reach {}", key.server_name))
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
        .send()
        .await
        .map_err(|e| {
            tracing::info!(origin = %key.server_name, error = %e, "remote media request failed");
            bad_gateway(format!("{} did not answer", key.server_name))
        })?;
    let fetched = match resp.status() {
        StatusCode::OK => from_multipart(state, key, resp).await?,
        StatusCode::NOT_FOUND => {
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            if body["errcode"] == "M_UNRECOGNIZED" {
                legacy(state, key, &target).await?
            } else {
                return Err(ApiError::not_found("Media not found on its origin"));
            }
        }
        s => return Err(bad_gateway(format!("{} answered {s}", key.server_name))),
    };
    state.media.store_remote(key, fetched.content_type, fetched.body, signer.max_upload_size).await
}

/// The bytes of a `multipart/mixed` answer, or of the `Location` it names.
async fn from_multipart(state: &AppState, key: &MediaKey, resp: reqwest::Response) -> Result<Fetched, ApiError> {
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
        MediaPart::Location(url) => location(state, key, &url).await,
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
async fn location(state: &AppState, key: &MediaKey, url: &str) -> Result<Fetched, ApiError> {
    if !url.starts_with("https://") && !state.federation.allows_private() {
        return Err(bad_gateway("the origin redirected to a URL that is not https"));
    }
    state.federation.check_location(&key.server_name, url).map_err(|e| bad_gateway(e.to_string()))?;
    let resp = state.federation.http().get(url).send().await.map_err(|e| {
        tracing::info!(origin = %key.server_name, error = %e, "remote media Location failed");
        bad_gateway("The origin's Location did not answer")
    })?;
    if resp.status() != StatusCode::OK {
        return Err(bad_gateway(format!("the origin's Location answered {}", resp.status())));
    }
    Ok(plain(resp))
}

/// The legacy download of a server older than authenticated media.
async fn legacy(state: &AppState, key: &MediaKey, target: &crate::federation::Target) -> Result<Fetched, ApiError> {
    let url =
        format!("{}/_matrix/media/v3/download/{}/{}?allow_remote=false", target.base, key.server_name, key.media_id);
    let resp = state
        .federation
        .http()
        .get(url)
        .header(header::HOST, &target.host)
        .send()
        .await
        .map_err(|_| bad_gateway(format!("{} did not answer", key.server_name)))?;
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
