//! The `multipart/mixed` body of `GET /_matrix/federation/v1/media/{download,thumbnail}`
//! (spec v1.11): a JSON part (the media's metadata, `{}` today), then either the media's bytes
//! with their `Content-Type` (and `Content-Disposition`) or an empty part with a `Location`
//! the requester fetches the bytes from.
//!
//! [`MultipartReader`] reads such a body pushed in pieces, bounded (the JSON part and the part
//! headers are small; the media part is handed out as it arrives, holding back only what could
//! be the start of the closing delimiter), and refuses a body that is not exactly that shape.

use serde_json::Value;

/// Longest JSON part or header block read.
pub const MAX_HEAD: usize = 64 * 1024;

/// `multipart/mixed; boundary=…`.
pub fn content_type(boundary: &str) -> String {
    format!("multipart/mixed; boundary={boundary}")
}

/// Everything before the media's bytes: the JSON part and the media part's headers.
pub fn head(boundary: &str, metadata: &Value, media_type: &str, disposition: Option<&str>) -> Vec<u8> {
    let mut out = json_part(boundary, metadata);
    out.extend_from_slice(format!("--{boundary}\r\nContent-Type: {media_type}\r\n").as_bytes());
    if let Some(d) = disposition {
        out.extend_from_slice(format!("Content-Disposition: {d}\r\n").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The closing delimiter, after the media's bytes.
pub fn tail(boundary: &str) -> Vec<u8> {
    format!("\r\n--{boundary}--\r\n").into_bytes()
}

/// A whole body that redirects to `location` for the bytes.
pub fn redirect(boundary: &str, metadata: &Value, location: &str) -> Vec<u8> {
    let mut out = json_part(boundary, metadata);
    out.extend_from_slice(format!("--{boundary}\r\nLocation: {location}\r\n\r\n").as_bytes());
    out.extend_from_slice(&tail(boundary));
    out
}

fn json_part(boundary: &str, metadata: &Value) -> Vec<u8> {
    format!("--{boundary}\r\nContent-Type: application/json\r\n\r\n{metadata}\r\n").into_bytes()
}

/// The boundary of a `multipart/mixed` content type, if that is what it is.
pub fn boundary_of(content_type: &str) -> Option<String> {
    let mut parts = content_type.split(';');
    if !parts.next()?.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        let v = v.trim().trim_matches('"');
        let valid = !v.is_empty() && v.len() <= 70 && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        (k.trim().eq_ignore_ascii_case("boundary") && valid).then(|| v.to_owned())
    })
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    #[error("multipart body: {0}")]
    Malformed(&'static str),
    #[error("multipart body: the {0} is over {MAX_HEAD} bytes")]
    TooLarge(&'static str),
    #[error("multipart body ends early")]
    Truncated,
}

/// What the media part is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MediaPart {
    /// The bytes follow, of this type.
    Bytes { content_type: Option<String>, content_disposition: Option<String> },
    /// The bytes are at this URL.
    Location(String),
}

/// One step of reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The JSON part and the media part's headers.
    Head { metadata: Value, media: MediaPart },
    /// Media bytes, in order.
    Bytes(Vec<u8>),
    /// The closing delimiter: the body is complete.
    End,
}

enum State {
    Preamble,
    JsonHeaders,
    Json,
    MediaHeaders {
        metadata: Value,
    },
    Media,
    /// The last bytes were handed out; the end is next.
    EndPending,
    /// After the closing delimiter (an epilogue is ignored).
    Done,
}

pub struct MultipartReader {
    dash_boundary: Vec<u8>,
    /// `\r\n--boundary`: what ends a part.
    delimiter: Vec<u8>,
    buf: Vec<u8>,
    /// How far `buf` was searched already for what the state waits for (no rescans).
    scanned: usize,
    /// The media part is a `Location`: it must have no body.
    location: bool,
    state: State,
    failed: Option<MultipartError>,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl MultipartReader {
    pub fn new(boundary: &str) -> Self {
        let dash_boundary = format!("--{boundary}").into_bytes();
        let delimiter = format!("\r\n--{boundary}").into_bytes();
        Self {
            dash_boundary,
            delimiter,
            buf: Vec::new(),
            scanned: 0,
            location: false,
            state: State::Preamble,
            failed: None,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next event, or `Ok(None)` until more bytes are pushed.
    pub fn next_event(&mut self) -> Result<Option<Event>, MultipartError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.step();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    /// Checks the body ended after its closing delimiter.
    pub fn finish(&self) -> Result<(), MultipartError> {
        match (&self.failed, &self.state) {
            (Some(e), _) => Err(e.clone()),
            (None, State::Done | State::EndPending) => Ok(()),
            _ => Err(MultipartError::Truncated),
        }
    }

    fn step(&mut self) -> Result<Option<Event>, MultipartError> {
        loop {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Preamble => {
                    // The first delimiter may open the body or follow a preamble line.
                    let at = if self.buf.starts_with(&self.dash_boundary) {
                        Some(0)
                    } else {
                        let delimiter = self.delimiter.clone();
                        self.find_new(&delimiter).map(|i| i + 2)
                    };
                    let Some(at) = at else {
                        self.state = State::Preamble;
                        return self.wait("preamble");
                    };
                    let Some(line) = self.line_after(at + self.dash_boundary.len()) else {
                        self.state = State::Preamble;
                        return Ok(None);
                    };
                    let line = line?;
                    self.consume(line);
                    self.state = State::JsonHeaders;
                }
                State::JsonHeaders => {
                    let Some(headers) = self.headers()? else {
                        self.state = State::JsonHeaders;
                        return Ok(None);
                    };
                    let ct = header(&headers, "content-type").unwrap_or_default();
                    if !ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json") {
                        return Err(MultipartError::Malformed("the first part is not application/json"));
                    }
                    self.state = State::Json;
                }
                State::Json => {
                    let delimiter = self.delimiter.clone();
                    let Some(end) = self.find_new(&delimiter) else {
                        self.state = State::Json;
                        return self.wait("JSON part");
                    };
                    let metadata: Value = serde_json::from_slice(&self.buf[..end])
                        .map_err(|_| MultipartError::Malformed("the JSON part is not JSON"))?;
                    if !metadata.is_object() {
                        return Err(MultipartError::Malformed("the JSON part is not an object"));
                    }
                    let after = end + self.delimiter.len();
                    if self.buf[after..].starts_with(b"--") {
                        return Err(MultipartError::Malformed("the body ends after its JSON part"));
                    }
                    let Some(line) = self.line_after(after) else {
                        // Searched again once the rest of the line is here.
                        self.scanned = end;
                        self.state = State::Json;
                        return Ok(None);
                    };
                    let line = line?;
                    self.consume(line);
                    self.state = State::MediaHeaders { metadata };
                }
                State::MediaHeaders { metadata } => {
                    let Some(headers) = self.headers()? else {
                        self.state = State::MediaHeaders { metadata };
                        return Ok(None);
                    };
                    self.location = false;
                    let media = match header(&headers, "location") {
                        Some(l) => {
                            self.location = true;
                            MediaPart::Location(l)
                        }
                        None => MediaPart::Bytes {
                            content_type: header(&headers, "content-type"),
                            content_disposition: header(&headers, "content-disposition"),
                        },
                    };
                    self.state = State::Media;
                    return Ok(Some(Event::Head { metadata, media }));
                }
                State::Media => {
                    if let Some(end) = find(&self.buf, &self.delimiter) {
                        let after = end + self.delimiter.len();
                        if self.buf.len() < after + 2 {
                            // Hand out what surely precedes the delimiter; wait for its end.
                            if self.location && end > 0 {
                                return Err(MultipartError::Malformed("a Location part with a body"));
                            }
                            self.state = State::Media;
                            return Ok(self.take(end));
                        }
                        if &self.buf[after..after + 2] != b"--" {
                            return Err(MultipartError::Malformed("more than two parts"));
                        }
                        if self.location && end > 0 {
                            return Err(MultipartError::Malformed("a Location part with a body"));
                        }
                        let bytes: Vec<u8> = self.buf.drain(..end).collect();
                        self.buf.clear();
                        if bytes.is_empty() {
                            self.state = State::Done;
                            return Ok(Some(Event::End));
                        }
                        // The bytes now, the end on the next call.
                        self.state = State::EndPending;
                        return Ok(Some(Event::Bytes(bytes)));
                    }
                    // Everything but a tail that could begin the delimiter is media.
                    let keep = self.delimiter.len() - 1;
                    let n = self.buf.len().saturating_sub(keep);
                    if self.location && n > 0 {
                        return Err(MultipartError::Malformed("a Location part with a body"));
                    }
                    self.state = State::Media;
                    return Ok(self.take(n));
                }
                State::EndPending => {
                    self.state = State::Done;
                    return Ok(Some(Event::End));
                }
                State::Done => {
                    // An epilogue after the closing delimiter is ignored.
                    self.buf.clear();
                    self.state = State::Done;
                    return Ok(None);
                }
            }
        }
    }

    /// `needle` in the buffer, searching only what was not searched before.
    fn find_new(&mut self, needle: &[u8]) -> Option<usize> {
        let from = self.scanned.saturating_sub(needle.len());
        match find(&self.buf[from..], needle) {
            Some(i) => Some(from + i),
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// Drops the first `n` bytes (what they held is read).
    fn consume(&mut self, n: usize) {
        self.buf.drain(..n);
        self.scanned = 0;
    }

    /// Where the line after a delimiter ending at `at` ends: transport padding (spaces and
    /// tabs), then CRLF. `None` until it is all here.
    fn line_after(&self, at: usize) -> Option<Result<usize, MultipartError>> {
        let pad = self.buf[at..].iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
        let i = at + pad;
        if self.buf.len() < i + 2 {
            return None;
        }
        Some(if &self.buf[i..i + 2] == b"\r\n" {
            Ok(i + 2)
        } else {
            Err(MultipartError::Malformed("a delimiter is not followed by a line break"))
        })
    }

    fn take(&mut self, n: usize) -> Option<Event> {
        (n > 0).then(|| Event::Bytes(self.buf.drain(..n).collect()))
    }

    fn wait(&self, what: &'static str) -> Result<Option<Event>, MultipartError> {
        if self.buf.len() > MAX_HEAD { Err(MultipartError::TooLarge(what)) } else { Ok(None) }
    }

    /// A part's header block, once all of it is here.
    fn headers(&mut self) -> Result<Option<Vec<(String, String)>>, MultipartError> {
        // A part may have no headers at all: then it starts with the blank line.
        let end = if self.buf.starts_with(b"\r\n") { Some(0) } else { self.find_new(b"\r\n\r\n").map(|i| i + 2) };
        let Some(end) = end else { return self.wait("part headers").map(|_| None) };
        let block = String::from_utf8(self.buf[..end].to_vec())
            .map_err(|_| MultipartError::Malformed("part headers are not UTF-8"))?;
        self.consume(end + 2);
        let mut headers = Vec::new();
        for line in block.split("\r\n").filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once(':').ok_or(MultipartError::Malformed("a part header without a colon"))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(Some(headers))
    }
}

fn header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read_all(body: &[u8], boundary: &str, piece: usize) -> Result<(Value, MediaPart, Vec<u8>), MultipartError> {
        let mut r = MultipartReader::new(boundary);
        let (mut head, mut bytes, mut ended) = (None, Vec::new(), false);
        for chunk in body.chunks(piece.max(1)) {
            r.push(chunk);
            while let Some(e) = r.next_event()? {
                match e {
                    Event::Head { metadata, media } => head = Some((metadata, media)),
                    Event::Bytes(b) => bytes.extend(b),
                    Event::End => ended = true,
                }
            }
        }
        r.finish()?;
        assert!(ended);
        let (metadata, media) = head.expect("head");
        Ok((metadata, media, bytes))
    }

    #[test]
    fn what_is_written_reads_back_in_any_pieces() {
        let b = "6f2b1a7c9e";
        // Media that holds line breaks and dashes, even a partial delimiter.
        let media: Vec<u8> =
            b"\r\n--6f2b1a7\r\n\r\n--x\r\n".iter().copied().chain((0..=255u8).cycle().take(5000)).collect();
        let mut body = head(b, &json!({}), "image/png", Some("inline; filename=\"a.png\""));
        body.extend_from_slice(&media);
        body.extend_from_slice(&tail(b));
        for piece in [1, 2, 5, 13, 100, body.len()] {
            let (metadata, part, bytes) = read_all(&body, b, piece).expect("valid");
            assert_eq!(metadata, json!({}));
            assert_eq!(
                part,
                MediaPart::Bytes {
                    content_type: Some("image/png".into()),
                    content_disposition: Some("inline; filename=\"a.png\"".into())
                }
            );
            assert_eq!(bytes, media, "pieces of {piece}");
        }
        let empty = [head(b, &json!({}), "text/plain", None), tail(b)].concat();
        assert_eq!(read_all(&empty, b, 3).expect("valid").2, b"");
    }

    #[test]
    fn a_redirect_names_its_location() {
        let body = redirect("bnd", &json!({}), "https://cdn.example/x");
        let (_, part, bytes) = read_all(&body, "bnd", 4).expect("valid");
        assert_eq!(part, MediaPart::Location("https://cdn.example/x".into()));
        assert!(bytes.is_empty());
        // Synapse's form: a preamble line, then parts.
        let synapse = b"\r\n--bnd\r\nContent-Type: application/json\r\n\r\n{}\r\n--bnd\r\nContent-Type: text/plain\r\n\r\nhi\r\n--bnd--\r\n";
        assert_eq!(read_all(synapse, "bnd", 7).expect("valid").2, b"hi");
    }

    #[test]
    fn bodies_of_another_shape_are_refused() {
        let b = "q";
        let ok = [head(b, &json!({}), "text/plain", None), b"x".to_vec(), tail(b)].concat();
        assert!(read_all(&ok, b, 1).is_ok());
        // Truncated anywhere before the closing delimiter.
        for cut in 0..ok.len() - 2 {
            assert!(read_all(&ok[..cut], b, 3).is_err(), "cut at {cut}");
        }
        let three = [head(b, &json!({}), "text/plain", None), b"x\r\n--q\r\n\r\ny".to_vec(), tail(b)].concat();
        assert_eq!(read_all(&three, b, 4).map(|_| ()), Err(MultipartError::Malformed("more than two parts")));
        let not_json = b"--q\r\nContent-Type: text/plain\r\n\r\n{}\r\n--q\r\n\r\nx\r\n--q--\r\n";
        assert!(read_all(not_json, b, 4).is_err());
        let bad_json = b"--q\r\nContent-Type: application/json\r\n\r\n{\r\n--q\r\n\r\nx\r\n--q--\r\n";
        assert!(read_all(bad_json, b, 4).is_err());
        // A JSON part without end is refused once it passes the bound, not buffered forever.
        let mut r = MultipartReader::new(b);
        r.push(b"--q\r\nContent-Type: application/json\r\n\r\n");
        r.push(&vec![b' '; MAX_HEAD + 1]);
        assert!(matches!(r.next_event(), Err(MultipartError::TooLarge(_))));
    }

    #[test]
    fn padding_after_delimiters_is_allowed_and_a_location_part_has_no_body() {
        let padded = b"--q \t\r\nContent-Type: application/json\r\n\r\n{}\r\n--q  \r\n\r\nok\r\n--q--\r\n";
        assert_eq!(read_all(padded, "q", 3).expect("valid").2, b"ok");
        let with_body = b"--q\r\nContent-Type: application/json\r\n\r\n{}\r\n--q\r\nLocation: https://x.example/a\r\n\r\nbytes\r\n--q--\r\n";
        assert_eq!(
            read_all(with_body, "q", 4).map(|_| ()),
            Err(MultipartError::Malformed("a Location part with a body"))
        );
    }

    #[test]
    fn a_large_head_pushed_a_byte_at_a_time_reads_back() {
        // A JSON part of nearly MAX_HEAD bytes, a byte per push (each push searches only what
        // is new: `find_new`).
        let mut body = b"--q\r\nContent-Type: application/json\r\n\r\n{\"a\":\"".to_vec();
        body.extend(std::iter::repeat_n(b'x', MAX_HEAD - 100));
        body.extend_from_slice(b"\"}\r\n--q\r\n\r\nz\r\n--q--\r\n");
        assert_eq!(read_all(&body, "q", 1).expect("valid").2, b"z");
    }

    #[test]
    fn boundaries_are_read_from_the_content_type() {
        assert_eq!(boundary_of("multipart/mixed; boundary=abc").as_deref(), Some("abc"));
        assert_eq!(boundary_of("Multipart/Mixed;boundary=\"a b\"").as_deref(), Some("a b"));
        assert_eq!(boundary_of("multipart/form-data; boundary=abc"), None);
        assert_eq!(boundary_of("multipart/mixed"), None);
        assert_eq!(boundary_of(&format!("multipart/mixed; boundary={}", "x".repeat(71))), None);
        assert_eq!(content_type("z"), "multipart/mixed; boundary=z");
    }
}
