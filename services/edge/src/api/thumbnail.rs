//! `GET`/`HEAD` of thumbnails: `/_matrix/client/v1/media/thumbnail/{server}/{id}`
//! (authenticated) and the legacy `/_matrix/media/v3/thumbnail/…` (unauthenticated, frozen like
//! the legacy downloads).
//!
//! `width` and `height` (required, positive integers), `method` (`crop` or `scale`, default
//! `scale`), `animated` (`true`/`false`, default `false`), `timeout_ms` (wait for an async
//! upload, as for downloads). The answer is the nearest configured size at least as large as
//! asked (see [`crate::thumbnails::Thumbnails::choose`]), never enlarged past the source, always
//! `inline`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::headers::{insert, media_headers, not_modified, wait_of};

#[derive(Deserialize)]
pub struct ThumbnailPath {
    server_name: String,
    media_id: String,
}

pub async fn thumbnail_v1(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<ThumbnailPath>, PathRejection>,
    Query(query): Query<BTreeMap<String, String>>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    super::authorize_media(&state, &headers, &query).await?;
    let Path(path) = path.map_err(super::path_error)?;
    let hints = super::download::hints_of(&headers, &query, raw.as_deref());
    serve(&state, method, &headers, path, &query, hints, false).await
}

pub async fn thumbnail_legacy(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    path: Result<Path<ThumbnailPath>, PathRejection>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let Path(path) = path.map_err(super::path_error)?;
    super::legacy_allowed(&state)?;
    serve(&state, method, &headers, path, &query, crate::remote::Hints::default(), true).await
}

/// What the query asks for.
#[derive(Debug, PartialEq)]
pub struct Asked {
    pub spec: mxcas_thumbnail::Spec,
    pub wait: Duration,
}

/// The thumbnail query (`width`, `height`, `method`, `animated`, `timeout_ms`), strictly.
pub fn parse(query: &BTreeMap<String, String>, max_wait: Duration) -> Result<Asked, ApiError> {
    let invalid = |m: &str| ApiError::bad_request("M_INVALID_PARAM", m.to_owned());
    let side = |name: &str| -> Result<u32, ApiError> {
        let v =
            query.get(name).ok_or_else(|| ApiError::bad_request("M_MISSING_PARAM", format!("{name} is required")))?;
        match v.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(invalid(&format!("{name} must be a positive integer"))),
        }
    };
    let (width, height) = (side("width")?, side("height")?);
    let method = match query.get("method").map(String::as_str) {
        None => mxcas_thumbnail::Method::Scale,
        Some(m) => mxcas_thumbnail::Method::parse(m).ok_or_else(|| invalid("method must be crop or scale"))?,
    };
    let animated = match query.get("animated").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(invalid("animated must be true or false")),
    };
    let wait = wait_of(query, max_wait)?;
    Ok(Asked { spec: mxcas_thumbnail::Spec { width, height, method, animated }, wait })
}

async fn serve(
    state: &Arc<AppState>,
    method: Method,
    req_headers: &HeaderMap,
    path: ThumbnailPath,
    query: &BTreeMap<String, String>,
    hints: crate::remote::Hints,
    legacy: bool,
) -> Result<Response, ApiError> {
    let key = super::download::checked_key(path.server_name, path.media_id)?;
    let asked = parse(query, state.media.config.max_download_wait)?;
    // Remote and IPFS media is fetched whole (as for a download) and thumbnailed here.
    let resolved =
        super::download::resolve(state, req_headers, &key, asked.wait, hints, legacy, false).await?.held()?;
    let (made, bytes) = thumbnail_of(state, &resolved, asked.spec).await?;

    let etag = format!("\"{}\"", made.record.cid);
    let mut h = media_headers(&etag, legacy);
    if not_modified(req_headers, &etag) {
        return Ok((StatusCode::NOT_MODIFIED, h).into_response());
    }
    // Thumbnails are images this server made (JPEG, PNG, GIF): always shown inline.
    insert(&mut h, header::CONTENT_TYPE, &made.record.content_type);
    insert(&mut h, header::CONTENT_DISPOSITION, "inline");
    insert(&mut h, header::CONTENT_LENGTH, &bytes.len().to_string());
    if method == Method::HEAD {
        return Ok((StatusCode::OK, h).into_response());
    }
    Ok((StatusCode::OK, h, bytes).into_response())
}

/// The thumbnail of `resolved` nearest to `asked` (made if need be, within `max_wait`).
pub async fn thumbnail_of(
    state: &AppState,
    resolved: &crate::media::Resolved,
    asked: mxcas_thumbnail::Spec,
) -> Result<(crate::thumbnails::Made, bytes::Bytes), ApiError> {
    let mxcas_meta::MediaState::Ready { content_type, .. } = &resolved.media.state else {
        return Err(ApiError::internal("media has no content"));
    };
    let thumbs = &state.thumbnails;
    let spec = thumbs.choose(asked, content_type);
    let making = async {
        let made = thumbs.get(resolved, spec).await?;
        thumbs.bytes(resolved, made).await
    };
    tokio::time::timeout(thumbs.config.max_wait, making)
        .await
        .map_err(|_| ApiError::unavailable("The thumbnail is still being made; retry shortly", 2_000))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn queries_parse_strictly() {
        let max = Duration::from_secs(60);
        let a = parse(&q(&[("width", "96"), ("height", "64")]), max).expect("ok");
        assert_eq!(
            (a.spec.width, a.spec.height, a.spec.method, a.spec.animated),
            (96, 64, mxcas_thumbnail::Method::Scale, false)
        );
        let a = parse(
            &q(&[("width", "1"), ("height", "1"), ("method", "crop"), ("animated", "true"), ("timeout_ms", "999999")]),
            max,
        )
        .expect("ok");
        assert_eq!((a.spec.method, a.spec.animated, a.wait), (mxcas_thumbnail::Method::Crop, true, max));
        for (bad, errcode) in [
            (vec![("height", "5")], "M_MISSING_PARAM"),
            (vec![("width", "5")], "M_MISSING_PARAM"),
            (vec![("width", "0"), ("height", "5")], "M_INVALID_PARAM"),
            (vec![("width", "-3"), ("height", "5")], "M_INVALID_PARAM"),
            (vec![("width", "2.5"), ("height", "5")], "M_INVALID_PARAM"),
            (vec![("width", "99999999999"), ("height", "5")], "M_INVALID_PARAM"),
            (vec![("width", "5"), ("height", "5"), ("method", "stretch")], "M_INVALID_PARAM"),
            (vec![("width", "5"), ("height", "5"), ("animated", "yes")], "M_INVALID_PARAM"),
        ] {
            let e = parse(&q(&bad), max).expect_err("refused");
            assert_eq!((e.status, e.errcode), (StatusCode::BAD_REQUEST, errcode), "{bad:?}");
        }
    }
}
