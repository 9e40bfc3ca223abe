//! Response headers for served media, as the Matrix spec asks (client-server API, "Content
//! repository"): inline display only for safe types, a sandboxing CSP, CORP cross-origin,
//! no sniffing, and strong immutable caching keyed by the CID.

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

/// Types the spec lists as safe to display inline (everything else is `attachment`).
const INLINE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

pub const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a media type exactly as RFC 9110 §8.3.1 writes it, `type/subtype *(; name=value)`
/// with token or quoted-string values, and returns its lower-case essence (`type/subtype`).
/// Anything else (a comma, a second type, stray characters) is `None`: browsers would each
/// read such a value their own way.
pub fn parse_content_type(value: &str) -> Option<String> {
    let b = value.as_bytes();
    let mut i = 0;
    let token = |i: &mut usize| -> Option<()> {
        let start = *i;
        while *i < b.len() && is_tchar(b[*i]) {
            *i += 1;
        }
        (*i > start).then_some(())
    };
    let ows = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t') {
            *i += 1;
        }
    };
    token(&mut i)?;
    if b.get(i) != Some(&b'/') {
        return None;
    }
    i += 1;
    token(&mut i)?;
    let essence = value[..i].to_ascii_lowercase();
    loop {
        ows(&mut i);
        if i == b.len() {
            return Some(essence);
        }
        if b[i] != b';' {
            return None;
        }
        i += 1;
        ows(&mut i);
        token(&mut i)?;
        if b.get(i) != Some(&b'=') {
            return None;
        }
        i += 1;
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i)? {
                    b'"' => {
                        i += 1;
                        break;
                    }
                    b'\\' => i += 2,
                    c if *c == b'\t' || (0x20..0x7f).contains(c) => i += 1,
                    _ => return None,
                }
            }
        } else {
            token(&mut i)?;
        }
    }
}

/// Whether `content_type` may be shown inline: it must parse as exactly one media type, and
/// that type must be on the spec's list.
pub fn is_inline_safe(content_type: &str) -> bool {
    parse_content_type(content_type).is_some_and(|essence| INLINE_TYPES.contains(&essence.as_str()))
}

/// RFC 5987 `attr-char`s stay; everything else is percent-encoded.
const FILENAME_ENCODE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'%')
    .add(b'\'')
    .add(b'(')
    .add(b')')
    .add(b'*')
    .add(b',')
    .add(b'/')
    .add(b':')
    .add(b';')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'@')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'{')
    .add(b'}')
    .add(b'\x7f');

/// `Content-Disposition` for a download: `inline` or `attachment`, with the filename in the
/// RFC 6266 `filename*` form (UTF-8, percent-encoded), so no filename can break the header.
pub fn content_disposition(content_type: &str, filename: Option<&str>) -> String {
    let kind = if is_inline_safe(content_type) { "inline" } else { "attachment" };
    match filename.filter(|f| !f.is_empty()) {
        Some(name) => format!("{kind}; filename*=utf-8''{}", utf8_percent_encode(name, FILENAME_ENCODE)),
        None => kind.to_owned(),
    }
}

/// Sets `name` to `value` unless `value` is not a valid header value (then leaves it out).
pub fn insert(h: &mut axum::http::HeaderMap, name: axum::http::header::HeaderName, value: &str) {
    if let Ok(v) = axum::http::HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// The headers every answer with media (a download or a thumbnail) carries: its `ETag`, year-long
/// immutable caching (public for the legacy endpoints, private for the authenticated ones),
/// the sandboxing CSP, CORP cross-origin and no sniffing.
pub fn media_headers(etag: &str, legacy: bool) -> axum::http::HeaderMap {
    use axum::http::header;
    let mut h = axum::http::HeaderMap::new();
    insert(&mut h, header::ETAG, etag);
    insert(
        &mut h,
        header::CACHE_CONTROL,
        if legacy { "public, max-age=31536000, immutable" } else { "private, max-age=31536000, immutable" },
    );
    insert(&mut h, header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY);
    insert(&mut h, header::HeaderName::from_static("cross-origin-resource-policy"), "cross-origin");
    insert(&mut h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    h
}

/// Whether the request's `If-None-Match` names `etag` (weak or strong) or is `*`.
pub fn not_modified(req: &axum::http::HeaderMap, etag: &str) -> bool {
    let if_none_match = req.get(axum::http::header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if_none_match.is_some_and(|v| v.trim() == "*" || v.split(',').any(|t| t.trim().trim_start_matches("W/") == etag))
}

/// A request without `timeout_ms` waits this long for an async upload (the spec's default).
const DEFAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a download or thumbnail request waits for media not uploaded yet: `timeout_ms`
/// (default 20 s), capped at `max`.
pub fn wait_of(
    query: &std::collections::BTreeMap<String, String>,
    max: std::time::Duration,
) -> Result<std::time::Duration, super::error::ApiError> {
    let wait = match query.get("timeout_ms") {
        None => DEFAULT_WAIT,
        Some(v) => std::time::Duration::from_millis(
            v.parse::<u64>()
                .map_err(|_| super::error::ApiError::bad_request("M_INVALID_PARAM", "timeout_ms must be an integer"))?,
        ),
    };
    Ok(wait.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_only_for_safe_types() {
        assert!(is_inline_safe("image/png"));
        assert!(is_inline_safe("Text/Plain; charset=utf-8"));
        assert!(!is_inline_safe("text/html"));
        assert!(!is_inline_safe("image/svg+xml"));
        assert!(!is_inline_safe("application/octet-stream"));
        // Browsers read the last type of a list: never inline.
        assert!(!is_inline_safe("text/plain;a=b,text/html"));
        assert!(!is_inline_safe("text/plain, text/html"));
    }

    #[test]
    fn content_types_parse_strictly() {
        assert_eq!(parse_content_type("Text/Plain; charset=\"utf-8\"").as_deref(), Some("text/plain"));
        assert_eq!(parse_content_type("image/png").as_deref(), Some("image/png"));
        assert_eq!(parse_content_type("a/b;x=y;z=\"q\\\"r\"").as_deref(), Some("a/b"));
        for bad in [
            "",
            "text",
            "text/",
            "/plain",
            "text/plain,",
            "text/plain;a",
            "text/plain;a=\"x",
            "te xt/plain",
            "text/plain;a=b,text/html",
        ] {
            assert_eq!(parse_content_type(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn filenames_cannot_escape_the_header() {
        assert_eq!(content_disposition("image/png", Some("cat.png")), "inline; filename*=utf-8''cat.png");
        assert_eq!(
            content_disposition("text/html", Some("a\"b;\r\nX: y ü.html")),
            "attachment; filename*=utf-8''a%22b%3B%0D%0AX%3A%20y%20%C3%BC.html"
        );
        assert_eq!(content_disposition("text/html", None), "attachment");
    }
}
