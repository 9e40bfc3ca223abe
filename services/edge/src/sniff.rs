//! What an upload is served as, decided by its bytes where they can decide.
//!
//! Media named by its CID is the same media for everyone who uploads those bytes, so nothing
//! an uploader declares may change how it is served to others (a sticker's bytes re-uploaded
//! as `application/x-msdownload` named `run.exe` must stay a PNG without that name). Its type
//! is therefore a function of the bytes alone:
//!
//! - first bytes that are text (UTF-8 without NUL, or UTF-16 with its byte-order mark) are
//!   `text/plain` with that charset, whatever format signature they happen to spell (a PEM
//!   key starts like a certificate, `MZ…` text like a Windows program);
//! - otherwise a format recognised from its first bytes (`infer`: images, audio, video,
//!   archives, documents, executables, …) is served as that type, under its standard name;
//! - anything else is `application/octet-stream`.
//!
//! Media under an ID reserved with `/create` belongs to the one user who reserved it: a
//! recognised format is still served as what it is, but otherwise (text, unknown bytes, or a
//! generic container such as zip or OLE2 that a more specific declared type describes better)
//! the type it was uploaded with is kept. See `docs/api.md` ("What an upload is served as").

/// How many first bytes decide (enough for every signature `infer` knows, and for the text
/// check to be meaningful).
pub const HEAD: usize = 8192;

/// The type `head` (an upload's first [`HEAD`] bytes, or all of a smaller one) is recognised
/// as, if any: never for text (see the module docs), and never a text format `infer` guesses
/// from content (HTML, XML, scripts), since markup guessed from bytes is what
/// content-sniffing attacks rely on.
pub fn recognised(head: &[u8]) -> Option<&'static str> {
    if text_charset(head).is_some() { None } else { format_of(head) }
}

/// The non-text format `infer` finds in `head`, under its registered name.
fn format_of(head: &[u8]) -> Option<&'static str> {
    let t = infer::get(head).filter(|t| t.matcher_type() != infer::MatcherType::Text)?;
    Some(match t.mime_type() {
        // infer's names → the registered ones clients and the inline list use.
        "audio/opus" => "audio/ogg",
        "audio/m4a" | "audio/x-m4a" => "audio/mp4",
        "video/x-m4v" => "video/mp4",
        // Without its `std` feature infer calls every OLE2 compound file a Word document
        // (Excel, PowerPoint and installers too): all that is known is the container.
        "application/msword" => "application/x-ole-storage",
        other => other,
    })
}

/// Whether `t` only names a container (zip, OLE2) that a declared type may describe better
/// (a .docx is a zip; the document inside may start past the first bytes).
fn generic(t: &str) -> bool {
    matches!(t, "application/zip" | "application/x-ole-storage")
}

/// The type media named by its CID is served as: decided by its first bytes only.
pub fn by_bytes(head: &[u8]) -> &'static str {
    match text_charset(head) {
        Some(Charset::Utf8) => "text/plain; charset=utf-8",
        Some(Charset::Utf16Le) => "text/plain; charset=utf-16le",
        Some(Charset::Utf16Be) => "text/plain; charset=utf-16be",
        None => format_of(head).unwrap_or("application/octet-stream"),
    }
}

/// The type media under a reserved ID is served as: its format when the bytes say more than
/// `declared`, else `declared`.
pub fn for_reserved(head: &[u8], declared: String) -> String {
    match recognised(head) {
        Some(t) if !generic(t) => t.to_owned(),
        _ => declared,
    }
}

enum Charset {
    Utf8,
    Utf16Le,
    Utf16Be,
}

/// The charset `head` is text in, if it is text: UTF-16 with a byte-order mark, or UTF-8
/// without NUL (a character cut by the end of a full [`HEAD`] allowed).
fn text_charset(head: &[u8]) -> Option<Charset> {
    if head.starts_with(&[0xff, 0xfe]) {
        return Some(Charset::Utf16Le);
    }
    if head.starts_with(&[0xfe, 0xff]) {
        return Some(Charset::Utf16Be);
    }
    if head.contains(&0) {
        return None;
    }
    match std::str::from_utf8(head) {
        Ok(_) => Some(Charset::Utf8),
        Err(e) if e.error_len().is_none() && head.len() == HEAD && head.len() - e.valid_up_to() < 4 => {
            Some(Charset::Utf8)
        }
        Err(_) => None,
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
        // A PDF's second line is a binary comment (as the PDF spec recommends); one that is
        // ASCII throughout its first 8 KiB is text, and served as such.
        assert_eq!(by_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"), "application/pdf");
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
        // A multi-byte character cut by the end of a full head is still text; at the end of
        // a whole (shorter) file it is not UTF-8.
        let mut cut = vec![b'a'; HEAD - 2];
        cut.extend_from_slice(&"€".as_bytes()[..2]);
        assert_eq!(by_bytes(&cut), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(&"ab€".as_bytes()[..4]), "application/octet-stream");
        // Text that spells a format's signature is still text.
        assert_eq!(by_bytes(b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"MZ is how this note starts"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"BM text"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"ID3 tags explained"), "text/plain; charset=utf-8");
        assert_eq!(by_bytes(b"\xff\xfeh\x00i\x00"), "text/plain; charset=utf-16le");
        assert_eq!(by_bytes(b"\xfe\xff\x00h\x00i"), "text/plain; charset=utf-16be");
    }

    #[test]
    fn formats_are_named_as_clients_expect() {
        // An Ogg Opus voice message (Element's) is audio/ogg, which is inline-safe.
        let mut opus = b"OggS\x00\x02".to_vec();
        opus.extend([0u8; 20]);
        opus.extend(b"\x13OpusHead\x01\x01\x38\x01\x80\xbb\x00\x00\x00\x00\x00");
        assert_eq!(recognised(&opus), Some("audio/ogg"));
        assert!(crate::api::headers::is_inline_safe(by_bytes(&opus)));
        let m4a = b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00M4A mp42isom\x00\x00";
        assert_eq!(recognised(m4a), Some("audio/mp4"));
        // Generic containers do not override a more specific declared type on reserved IDs...
        let ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00\x00\x00\x00\x00\x00\x00";
        assert_eq!(recognised(ole), Some("application/x-ole-storage"));
        assert_eq!(for_reserved(ole, "application/vnd.ms-excel".into()), "application/vnd.ms-excel");
        let zip = b"PK\x03\x04\x14\x00\x00\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00";
        assert_eq!(
            for_reserved(zip, "application/vnd.openxmlformats-officedocument.wordprocessingml.document".into()),
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
        );
        // ...but a specific format does, and text keeps what was declared.
        let png = [0x89u8, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R'];
        assert_eq!(for_reserved(&png, "text/html".into()), "image/png");
        assert_eq!(for_reserved(b"a,b\n1,2\n", "text/csv".into()), "text/csv");
    }
}
