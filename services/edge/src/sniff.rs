//! What an upload is served as, decided by its bytes where they can decide.
//!
//! Media named by its CID is the same media for everyone who uploads those bytes, so nothing
//! an uploader declares may change how it is served to others (a sticker's bytes re-uploaded
//! as `application/x-msdownload` named `run.exe` must stay a PNG without that name). Its type
//! is therefore a function of the bytes alone:
//!
//! - a format recognised from its first bytes (`infer`: images, audio, video, archives,
//!   documents, executables, …) is served as that type;
//! - anything else is `text/plain; charset=utf-8` when its first bytes are UTF-8 text without
//!   NUL, else `application/octet-stream`.
//!
//! Media under an ID reserved with `/create` belongs to the one user who reserved it: a
//! recognised format is still served as what it is, but otherwise the type it was uploaded
//! with is kept. See `docs/api.md` ("What an upload is served as").

/// How many first bytes decide (enough for every signature `infer` knows, and for the text
/// check to be meaningful).
pub const HEAD: usize = 8192;

/// The type `head` (an upload's first [`HEAD`] bytes, or all of a smaller one) is recognised
/// as, if any. Text formats `infer` guesses from content (HTML, XML, shell scripts) are not
/// recognised: markup guessed from bytes is what content-sniffing attacks rely on, and such
/// media is served as plain text instead.
pub fn recognised(head: &[u8]) -> Option<&'static str> {
    infer::get(head).filter(|t| t.matcher_type() != infer::MatcherType::Text).map(|t| t.mime_type())
}

/// The type media named by its CID is served as: decided by its first bytes only.
pub fn by_bytes(head: &[u8]) -> &'static str {
    recognised(head).unwrap_or(if textual(head) { "text/plain; charset=utf-8" } else { "application/octet-stream" })
}

/// UTF-8 without NUL (a sequence cut at the end of `head` is allowed).
fn textual(head: &[u8]) -> bool {
    if head.contains(&0) {
        return false;
    }
    match std::str::from_utf8(head) {
        Ok(_) => true,
        // Only an incomplete character at the very end (the head cut one in two).
        Err(e) => e.error_len().is_none() && head.len() - e.valid_up_to() < 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bytes_decide_what_cid_named_media_is() {
        let png = [0x89u8, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R'];
        assert_eq!(by_bytes(&png), "image/png");
        assert_eq!(by_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"), "image/jpeg");
        assert_eq!(by_bytes(b"GIF89a\x01\x00\x01\x00"), "image/gif");
        assert_eq!(by_bytes(b"%PDF-1.7\n"), "application/pdf");
        assert_eq!(by_bytes(b"MZ\x90\x00\x03\x00\x00\x00"), "application/vnd.microsoft.portable-executable");
        assert_eq!(by_bytes(b"hello, world\n"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes("grüße".as_bytes()), "text/plain; charset=utf-8");
        // HTML and SVG are text here: served as text/plain, never as markup.
        assert_eq!(by_bytes(b"<script>alert(1)</script>"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"<svg xmlns=\"http://www.w3.org/2000/svg\"/>"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"<!DOCTYPE html><html><body>x</body></html>"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"<?xml version=\"1.0\"?><a/>"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"#!/bin/sh\nrm -rf /\n"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"\x00\x01\x02binary"), "application/octet-stream");
        assert_eq!(by_bytes(b"\xc3\x28 not utf-8"), "application/octet-stream");
        assert_eq!(by_bytes(b""), "text/plain; charset=utf-8");
        // A multi-byte character cut by the end of the head is still text.
        let mut cut = "ab€".as_bytes().to_vec();
        cut.pop();
        assert_eq!(by_bytes(&cut), "text/plain; charset=utf-8");
    }
}
