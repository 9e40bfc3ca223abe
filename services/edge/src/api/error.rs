//! The one place where edge errors become Matrix error responses
//! (`{"errcode": "M_…", "error": "…"}` with the spec's HTTP status).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mxcas_meta::{CommandError, MetaError};

use crate::cache::BlockError;
use crate::ingest::IngestError;

/// Errcode of [`ApiError::data_loss`] (namespaced as the spec asks of non-`M_` codes).
pub const DATA_LOSS: &str = "IO.MXCAS.DATA_LOSS";

#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    pub retry_after_ms: Option<u64>,
    /// `soft_logout` of an `M_UNKNOWN_TOKEN` (the client may refresh instead of logging out).
    pub soft_logout: Option<bool>,
    /// `info_uri` of an `M_USER_LIMIT_EXCEEDED` (where the user learns about the limit).
    pub info_uri: Option<String>,
    /// `admin_contact` of an `M_RESOURCE_LIMIT_EXCEEDED`.
    pub admin_contact: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            retry_after_ms: None,
            soft_logout: None,
            info_uri: None,
            admin_contact: None,
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", message)
    }
    pub fn bad_request(errcode: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, errcode, message)
    }
    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "Unrecognized request")
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", message)
    }
    /// The stored bytes of this media are missing or corrupt. Permanent until someone uploads
    /// the same bytes again (which repairs it): not "retry later".
    /// Remote media over the size limit (spec: 502 `M_TOO_LARGE`).
    pub fn remote_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "M_TOO_LARGE",
            format!("The remote media is larger than the limit of {limit} bytes"),
        )
    }
    pub fn data_loss() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            DATA_LOSS,
            "The stored bytes of this media are lost (missing or corrupt in storage); uploading the same file again restores it",
        )
    }
    pub fn unavailable(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", message)
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "errcode": self.errcode, "error": self.message });
        if let Some(ms) = self.retry_after_ms {
            body["retry_after_ms"] = ms.into();
        }
        if let Some(soft) = self.soft_logout {
            body["soft_logout"] = soft.into();
        }
        if let Some(uri) = &self.info_uri {
            body["info_uri"] = uri.clone().into();
        }
        if let Some(contact) = &self.admin_contact {
            body["admin_contact"] = contact.clone().into();
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(ms) = self.retry_after_ms {
            let secs = ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<MetaError> for ApiError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Rejected(CommandError::NotFound) => ApiError::not_found("Media not found"),
            MetaError::Rejected(CommandError::AlreadyExists) => {
                ApiError::new(StatusCode::CONFLICT, "M_CANNOT_OVERWRITE_MEDIA", "This media ID already has content")
            }
            MetaError::Rejected(CommandError::PermissionDenied) => {
                ApiError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", "This media ID was created by another user")
            }
            MetaError::Rejected(CommandError::PendingLimit { limit }) => ApiError {
                retry_after_ms: Some(60_000),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "M_LIMIT_EXCEEDED",
                    format!("Too many pending uploads (limit {limit}); upload content to one or wait for it to expire"),
                )
            },
            MetaError::Rejected(CommandError::QuotaExceeded { scope: mxcas_meta::model::QuotaScope::User }) => {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "M_USER_LIMIT_EXCEEDED",
                    "This upload does not fit your upload quota for this period; wait for the next period",
                )
            }
            MetaError::Rejected(CommandError::QuotaExceeded { scope: mxcas_meta::model::QuotaScope::Tenant }) => {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "M_RESOURCE_LIMIT_EXCEEDED",
                    "This upload does not fit this homeserver's upload quota for this period; contact its administrator",
                )
            }
            MetaError::Rejected(CommandError::Reclaimed { .. }) => {
                ApiError::unavailable("The upload took too long to be recorded; upload it again", 1_000)
            }
            MetaError::Rejected(CommandError::InvalidArgument(m)) => {
                tracing::error!(error = %m, "metadata service rejected a request as malformed");
                ApiError::internal("Internal error")
            }
            MetaError::Unavailable(m) => {
                tracing::warn!(error = %m, "metadata service unavailable");
                ApiError::unavailable("Media metadata service is temporarily unavailable; retry later", 2_000)
            }
            MetaError::Internal(m) => {
                tracing::error!(error = %m, "metadata service failed");
                ApiError::internal("Internal error in the media metadata service")
            }
        }
    }
}

impl From<BlockError> for ApiError {
    fn from(e: BlockError) -> Self {
        match e {
            BlockError::Store(m) => {
                tracing::error!(error = %m, "blob store read failed");
                ApiError::unavailable("Media storage is temporarily unavailable; retry later", 2_000)
            }
            BlockError::Missing { .. } | BlockError::Corrupt { .. } => ApiError::data_loss(),
            BlockError::OutOfRange { .. } => ApiError::internal("Internal error: a block past the end of the media"),
        }
    }
}

impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> Self {
        match e {
            IngestError::TooLarge { limit } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!("Upload is larger than the limit of {limit} bytes"),
            ),
            IngestError::Body(m) => ApiError::bad_request(
                "M_UNKNOWN",
                format!("The request body could not be read completely ({m}); nothing was stored"),
            ),
            IngestError::Idle(t) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "M_UNKNOWN",
                format!("No upload data arrived for {}s; nothing was stored", t.as_secs()),
            ),
            IngestError::TooSlow(rate) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "M_UNKNOWN",
                format!("The upload arrived slower than {rate} bytes/s on average; nothing was stored"),
            ),
            IngestError::Store(m) => {
                tracing::error!(error = %m, "blob store write failed");
                ApiError::unavailable("Media storage is temporarily unavailable; retry the upload", 2_000)
            }
            IngestError::Hasher(m) => {
                tracing::error!(error = %m, "hashing failed");
                ApiError::internal("Internal error while hashing the upload")
            }
        }
    }
}
