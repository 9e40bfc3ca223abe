//! The Matrix media API over HTTP (axum): routes, auth, CORS, request metrics.
//!
//! Handlers parse and validate, then call [`crate::media::MediaService`]; every error leaves
//! through [`error::ApiError`] as Matrix JSON. Route templates (never raw paths) label metrics.

pub mod auth;
pub mod download;
pub mod error;
pub mod federation;
pub mod gateway;
pub mod headers;
pub mod range;
pub mod thumbnail;
pub mod upload;

use std::sync::Arc;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};

use crate::media::MediaService;
use crate::metrics::{Metrics, RouteLabels};
use error::ApiError;

pub struct AppState {
    pub media: Arc<MediaService>,
    pub thumbnails: Arc<crate::thumbnails::Thumbnails>,
    /// Who a request is from is decided by its tenant's homeserver (`tenants.rs`).
    pub tenants: crate::tenants::Tenants,
    pub metrics: Arc<Metrics>,
    /// The IPFS gateway's block look-ups.
    pub gateway: crate::gateway::Gateway,
    /// Other Matrix servers: their keys, and how to reach them.
    pub federation: crate::federation::Federation,
    /// Remote and IPFS media being fetched on this edge (one fetch per media).
    pub flights: Arc<crate::flight::Flights>,
    /// Remote media fetches in flight on this edge ([`crate::remote::MAX_FETCHES`]).
    pub remote_slots: Arc<tokio::sync::Semaphore>,
    /// `ipfs:` media: the trustless gateways it is fetched from.
    pub ipfs: crate::ipfs::Ipfs,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/_matrix/media/v3/upload", post(upload::upload))
        .route("/_matrix/media/v3/upload/{server_name}/{media_id}", put(upload::upload_to))
        .route("/_matrix/media/v1/create", post(upload::create))
        .route("/_matrix/client/v1/media/config", get(upload::config))
        .route("/_matrix/media/v3/config", get(upload::config))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}", get(download::download_v1))
        .route("/_matrix/client/v1/media/download/{server_name}/{media_id}/{file_name}", get(download::download_v1))
        .route("/_matrix/media/v3/download/{server_name}/{media_id}", get(download::download_legacy))
        .route("/_matrix/media/v3/download/{server_name}/{media_id}/{file_name}", get(download::download_legacy))
        .route("/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}", get(thumbnail::thumbnail_v1))
        .route("/_matrix/media/v3/thumbnail/{server_name}/{media_id}", get(thumbnail::thumbnail_legacy))
        .route("/_matrix/key/v2/server", get(federation::server_keys))
        .route("/_matrix/federation/v1/media/download/{media_id}", get(federation::media_download))
        .route("/_matrix/federation/v1/media/thumbnail/{media_id}", get(federation::media_thumbnail))
        .route("/ipfs/{cid}", get(gateway::ipfs))
        .route("/ipfs/{cid}/{*path}", get(gateway::ipfs_path))
        .fallback(|| async { ApiError::unrecognized() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED", "Method not allowed for this endpoint")
        })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(middleware::from_fn(request_limits))
        .layer(middleware::from_fn(cors))
        .with_state(state)
}

/// CORS as the client-server spec requires: any origin, the API's methods and headers;
/// preflight `OPTIONS` answered directly.
async fn cors(req: Request, next: Next) -> Response {
    let mut resp =
        if req.method() == Method::OPTIONS { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization, Range, If-None-Match"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Content-Range, Content-Length, ETag, X-Ipfs-Path, X-Ipfs-Roots"),
    );
    resp
}

/// Longest request target accepted (path and query).
pub const MAX_URI: usize = 8 * 1024;
/// Most headers, and most header bytes (names and values), accepted in a request.
pub const MAX_HEADERS: usize = 100;
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Requests over the URI and header limits get the HTTP status for it (414, 431) with a
/// Matrix error body and CORS headers. The server's own limits sit above these (see
/// `http_server`), so within them the client always gets a Matrix answer.
async fn request_limits(req: Request, next: Next) -> Response {
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri_len > MAX_URI {
        return ApiError::new(StatusCode::URI_TOO_LONG, "M_UNKNOWN", format!("Request URI over {MAX_URI} bytes"))
            .into_response();
    }
    let headers = req.headers();
    let bytes: usize = headers.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "M_UNKNOWN",
            format!("Request headers over {MAX_HEADERS} fields or {MAX_HEADER_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(req).await
}

/// One span and one metric per request, labelled by route template and status class.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let span = tracing::debug_span!("http", method = %req.method(), route = %route);
    let resp = tracing::Instrument::instrument(next.run(req), span).await;
    let status = match resp.status().as_u16() {
        100..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    state.metrics.http_requests.get_or_create(&RouteLabels { route, status }).inc();
    resp
}

/// The authenticated media endpoints' gate (downloads and thumbnails alike): the request's
/// tenant, a token it accepts, and that user's download rate.
pub async fn authorize_media(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    query: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    let tenant = state.tenants.for_request(headers)?;
    let caller = tenant.auth.authenticate(headers, query).await?;
    tenant.download_limit.check(&caller.user_id)
}

/// The legacy unauthenticated media endpoints' gate: off unless `[media] legacy_download`.
pub fn legacy_allowed(state: &AppState) -> Result<(), ApiError> {
    if !state.media.config.legacy_download {
        return Err(ApiError::not_found("Unauthenticated media download is disabled; use /_matrix/client/v1/media"));
    }
    Ok(())
}

/// A path that does not decode (bad UTF-8, wrong shape) as Matrix JSON.
pub fn path_error(e: axum::extract::rejection::PathRejection) -> ApiError {
    ApiError::bad_request("M_INVALID_PARAM", format!("Malformed path: {}", e.body_text()))
}

/// `[A-Za-z0-9_-]{1,255}`: the spec's media ID grammar (and every CIDv1 in base32).
pub fn valid_media_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `hostname[:port]` per the spec's server name grammar (DNS name, IPv4, or `[IPv6]`).
pub fn valid_server_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        match rest.split_once(']') {
            Some((v6, tail))
                if !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.') =>
            {
                (None, tail)
            }
            _ => return false,
        }
    } else {
        match name.rsplit_once(':') {
            Some((h, p)) => (Some(h), &name[h.len()..][..p.len() + 1]),
            None => (Some(name), ""),
        }
    };
    if let Some(h) = host
        && (h.split('.').any(str::is_empty) || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
    {
        return false;
    }
    match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(p) => p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in ["localhost", "example.org", "example.org:8448", "1.2.3.4:5", "[::1]", "[::1]:8008"] {
            assert!(valid_server_name(ok), "{ok}");
        }
        for bad in ["", "a/b", "..", "ex ample", "host:", "host:123456", "[::1", "a:b:c", "x%2f"] {
            assert!(!valid_server_name(bad), "{bad}");
        }
    }

    #[test]
    fn media_ids() {
        assert!(valid_media_id("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"));
        assert!(valid_media_id("abc_DEF-123"));
        for bad in ["", "..", "a/b", "a.b", "a%2Fb", "ü"] {
            assert!(!valid_media_id(bad), "{bad}");
        }
    }
}
