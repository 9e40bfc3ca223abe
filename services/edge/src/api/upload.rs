//! Uploads: `POST /_matrix/media/v3/upload`, `POST /_matrix/media/v1/create` with
//! `PUT /_matrix/media/v3/upload/{server}/{id}`, and the media `config` endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;

const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

pub async fn config(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = state.tenants.for_request(&headers)?;
    tenant.auth.authenticate(&headers, &query).await?;
    Ok(Json(json!({ "m.upload.size": tenant.max_upload_size })))
}

pub async fn upload(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let tenant = state.tenants.for_request(&headers)?;
    let user = tenant.auth.authenticate_member(&headers, &query).await?.user_id;
    tenant.upload_limit.check(&user)?;
    let (content_type, filename) = upload_params(tenant.max_upload_size, &headers, &query)?;
    let to = destination(tenant);
    let uploaded = state.media.upload(to, &user, None, content_type, filename, body.into_data_stream()).await?;
    let uri = uploaded.media.key.to_string();
    state.thumbnails.after_upload(uploaded);
    Ok(Json(json!({ "content_uri": uri })))
}

pub async fn upload_to(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    Query(query): Query<BTreeMap<String, String>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let Path((server_name, media_id)) = path.map_err(super::path_error)?;
    if !super::valid_server_name(&server_name) || !super::valid_media_id(&media_id) {
        return Err(ApiError::bad_request("M_INVALID_PARAM", "Malformed server name or media ID"));
    }
    // The mxc names its tenant: its homeserver checks the token (so only that homeserver's
    // users can fill its reservations), its limits apply.
    let Some(tenant) = state.tenants.by_server_name(&server_name) else {
        return Err(ApiError::not_found("Media IDs of other servers cannot be uploaded to here"));
    };
    let user = tenant.auth.authenticate_member(&headers, &query).await?.user_id;
    tenant.upload_limit.check(&user)?;
    let (content_type, filename) = upload_params(tenant.max_upload_size, &headers, &query)?;
    let to = destination(tenant);
    let uploaded =
        state.media.upload(to, &user, Some(media_id), content_type, filename, body.into_data_stream()).await?;
    state.thumbnails.after_upload(uploaded);
    Ok(Json(json!({})))
}

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let tenant = state.tenants.for_request(&headers)?;
    let user = tenant.auth.authenticate_member(&headers, &query).await?.user_id;
    tenant.upload_limit.check(&user)?;
    let (key, expires_at) = state.media.create_pending(destination(tenant), &user).await?;
    Ok(Json(json!({ "content_uri": key.to_string(), "unused_expires_at": expires_at })))
}

/// Where a tenant's uploads go, within its limits.
fn destination(tenant: &crate::tenants::Tenant) -> crate::media::UploadTo<'_> {
    crate::media::UploadTo {
        server_name: &tenant.server_name,
        max_size: tenant.max_upload_size,
        quota: tenant.quota.as_ref(),
        quota_info_uri: tenant.quota_info_uri.as_deref(),
        quota_admin_contact: tenant.quota_admin_contact.as_deref(),
    }
}

/// Content type and filename of an upload; rejects a declared size over the limit before any
/// byte is read.
fn upload_params(
    limit: u64,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
) -> Result<(String, Option<String>), ApiError> {
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| ApiError::bad_request("M_INVALID_PARAM", "Malformed Content-Length"))?;
        if len > limit {
            return Err(crate::ingest::IngestError::TooLarge { limit }.into());
        }
    }
    let content_type = match headers.get(header::CONTENT_TYPE) {
        None => DEFAULT_CONTENT_TYPE.to_owned(),
        Some(v) => {
            let v = v.to_str().map_err(|_| ApiError::bad_request("M_INVALID_PARAM", "Content-Type must be ASCII"))?;
            let v = v.trim();
            if v.len() > 255 || super::headers::parse_content_type(v).is_none() {
                return Err(ApiError::bad_request(
                    "M_INVALID_PARAM",
                    "Content-Type must be one media type, type/subtype with optional ;name=value parameters",
                ));
            }
            v.to_owned()
        }
    };
    let filename = match query.get("filename") {
        None => None,
        Some(f) if f.len() > 255 || f.chars().any(char::is_control) => {
            return Err(ApiError::bad_request(
                "M_INVALID_PARAM",
                "filename must be at most 255 bytes without control characters",
            ));
        }
        Some(f) => Some(f.clone()).filter(|f| !f.is_empty()),
    };
    Ok((content_type, filename))
}
