//! `Authorization: X-Matrix origin="…",destination="…",key="ed25519:…",sig="…"`: how a server
//! proves a request is its own. The signature covers the canonical JSON of
//! `{method, uri, origin, destination, content?}`, where `uri` is the request target (path and
//! query) exactly as sent.

use serde_json::{Value, json};

use crate::signing::{SignatureError, SigningKey, verify};

/// One parsed `X-Matrix` credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XMatrix {
    pub origin: String,
    /// Absent in requests from servers older than spec v1.3.
    pub destination: Option<String>,
    /// `ed25519:<key id>`.
    pub key: String,
    pub sig: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XMatrixError {
    #[error("not an X-Matrix authorization")]
    Scheme,
    #[error("malformed X-Matrix parameters: {0}")]
    Syntax(&'static str),
    #[error("X-Matrix without {0}")]
    Missing(&'static str),
    #[error("X-Matrix parameter {0} given twice")]
    Repeated(String),
}

/// Longest header value parsed (a credential is a few hundred bytes).
const MAX_LEN: usize = 4096;

/// Parses an `Authorization` header value.
pub fn parse(header: &str) -> Result<XMatrix, XMatrixError> {
    if header.len() > MAX_LEN {
        return Err(XMatrixError::Syntax("too long"));
    }
    let (scheme, mut rest) = header.trim().split_once([' ', '\t']).ok_or(XMatrixError::Scheme)?;
    if !scheme.eq_ignore_ascii_case("X-Matrix") {
        return Err(XMatrixError::Scheme);
    }
    let (mut origin, mut destination, mut key, mut sig) = (None, None, None, None);
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            break;
        }
        let eq = rest.find('=').ok_or(XMatrixError::Syntax("parameter without ="))?;
        let name = rest[..eq].trim().to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(XMatrixError::Syntax("bad parameter name"));
        }
        rest = rest[eq + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            // A quoted string: backslash escapes the next character.
            let mut v = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => v.push(chars.next().ok_or(XMatrixError::Syntax("unterminated escape"))?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let end = end.ok_or(XMatrixError::Syntax("unterminated quoted value"))?;
            value = v;
            rest = &quoted[end..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_owned();
            rest = &rest[end..];
        }
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.is_empty() {
            return Err(XMatrixError::Syntax("parameters not separated by commas"));
        }
        let slot = match name.as_str() {
            "origin" => &mut origin,
            "destination" => &mut destination,
            "key" => &mut key,
            "sig" => &mut sig,
            // Unknown parameters are ignored (room for extensions).
            _ => continue,
        };
        if slot.replace(value).is_some() {
            return Err(XMatrixError::Repeated(name));
        }
    }
    Ok(XMatrix {
        origin: origin.ok_or(XMatrixError::Missing("origin"))?,
        destination,
        key: key.ok_or(XMatrixError::Missing("key"))?,
        sig: sig.ok_or(XMatrixError::Missing("sig"))?,
    })
}

/// What an X-Matrix signature covers.
pub fn request_json(method: &str, uri: &str, origin: &str, destination: &str, content: Option<&Value>) -> Value {
    let mut v = json!({ "method": method, "uri": uri, "origin": origin, "destination": destination });
    if let Some(c) = content {
        v["content"] = c.clone();
    }
    v
}

/// The `Authorization` header value for a request from `origin` (signed with `key`).
pub fn authorization(
    key: &SigningKey,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&Value>,
) -> Result<String, SignatureError> {
    let signed = crate::canonical::encode(&request_json(method, uri, origin, destination, content))?;
    let sig = key.sign(signed.as_bytes());
    Ok(format!(
        "X-Matrix origin=\"{}\",destination=\"{}\",key=\"{}\",sig=\"{sig}\"",
        quote(origin),
        quote(destination),
        key.name()
    ))
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Checks `auth`'s signature of a request as received (`destination`: our server name, which
/// the caller has checked against `auth.destination`), by the origin's key `public_key`.
pub fn verify_request(
    auth: &XMatrix,
    destination: &str,
    method: &str,
    uri: &str,
    content: Option<&Value>,
    public_key: &[u8; 32],
) -> Result<(), SignatureError> {
    let signed = crate::canonical::encode(&request_json(method, uri, &auth.origin, destination, content))?;
    verify(signed.as_bytes(), &auth.sig, public_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_as_servers_send_them() {
        let h = parse(r#"X-Matrix origin="origin.hs.example.com",destination="destination.hs.example.com",key="ed25519:key1",sig="ABCDEF...""#)
            .expect("parses");
        assert_eq!(h.origin, "origin.hs.example.com");
        assert_eq!(h.destination.as_deref(), Some("destination.hs.example.com"));
        assert_eq!((h.key.as_str(), h.sig.as_str()), ("ed25519:key1", "ABCDEF..."));
        // Unquoted values, spaces after commas, any case, unknown parameters, no destination.
        let h = parse("x-matrix Origin=a.example:8448, key=ed25519:k, sig=abc, extra=1").expect("parses");
        assert_eq!(
            (h.origin.as_str(), h.destination, h.key.as_str(), h.sig.as_str()),
            ("a.example:8448", None, "ed25519:k", "abc")
        );
        assert!(parse("X-Matrix\torigin=a,key=k,sig=s").is_ok(), "a tab after the scheme");
        let h = parse(r#"X-Matrix origin="a\"b",key="k",sig="s""#).expect("parses");
        assert_eq!(h.origin, "a\"b");
        for bad in [
            "Bearer abc",
            "X-Matrix",
            r#"X-Matrix origin="a",key="k""#,
            r#"X-Matrix origin="a,key="k",sig="s""#,
            r#"X-Matrix origin="a" key="k",sig="s""#,
            r#"X-Matrix origin="a",origin="b",key="k",sig="s""#,
            "X-Matrix =a,key=k,sig=s",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse(&format!("X-Matrix origin=\"{}\",key=k,sig=s", "a".repeat(5000))).is_err());
    }

    #[test]
    fn a_signed_request_verifies_only_as_it_was_sent() {
        let key = SigningKey::from_seed("abc", &[3; 32]).expect("key");
        let public = key.public_key();
        let uri = "/_matrix/federation/v1/media/download/bafkreiabc";
        let header = authorization(&key, "origin.example", "dest.example", "GET", uri, None).expect("sign");
        let auth = parse(&header).expect("own header parses");
        assert_eq!(auth.destination.as_deref(), Some("dest.example"));
        verify_request(&auth, "dest.example", "GET", uri, None, &public).expect("verifies");
        assert!(verify_request(&auth, "other.example", "GET", uri, None, &public).is_err(), "another destination");
        assert!(verify_request(&auth, "dest.example", "POST", uri, None, &public).is_err(), "another method");
        assert!(
            verify_request(&auth, "dest.example", "GET", &format!("{uri}?x=1"), None, &public).is_err(),
            "another URI"
        );
        let mut forged = auth.clone();
        forged.origin = "evil.example".into();
        assert!(verify_request(&forged, "dest.example", "GET", uri, None, &public).is_err(), "another origin");
        let content = serde_json::json!({"a": 1});
        let with_body =
            parse(&authorization(&key, "o", "d", "PUT", "/x", Some(&content)).expect("sign")).expect("parse");
        verify_request(&with_body, "d", "PUT", "/x", Some(&content), &public).expect("content is covered");
        assert!(verify_request(&with_body, "d", "PUT", "/x", None, &public).is_err());
    }
}
