//! Who is calling: `Authorization: Bearer <token>` → Matrix user ID.
//!
//! Tokens come from the config for now; validating them against the homeserver is the seam
//! for a later change (this is the only place that decides who a request is from).

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode, header};

use super::error::ApiError;

pub struct Authenticator {
    tokens: BTreeMap<String, String>,
}

impl Authenticator {
    pub fn new(tokens: BTreeMap<String, String>) -> Self {
        Self { tokens }
    }

    /// The user the request is from, or 401 `M_MISSING_TOKEN` / `M_UNKNOWN_TOKEN`. The token
    /// comes from `Authorization: Bearer` (scheme case-insensitive) or, deprecated but still
    /// in the spec, the `access_token` query parameter.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        self.authenticate_with_query(headers, None)
    }

    pub fn authenticate_with_query(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<String, ApiError> {
        let from_header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        });
        let token = from_header
            .or(query_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", "Missing access token"))?;
        self.tokens
            .get(token)
            .cloned()
            .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Unrecognised access token"))
    }
}
