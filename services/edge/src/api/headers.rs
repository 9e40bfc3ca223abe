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

/// Whether `content_type` (parameters ignored) may be shown inline.
pub fn is_inline_safe(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    INLINE_TYPES.contains(&essence.as_str())
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
