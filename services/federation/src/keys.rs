//! Server key documents (`GET /_matrix/key/v2/server`): a server's ed25519 public keys, signed
//! by themselves, valid until `valid_until_ts`.
//!
//! A document is accepted only for the server that was asked (`server_name` must match), when
//! every key in `verify_keys` is well formed and has signed it, and while it is fresh. Keys in
//! `old_verify_keys` are kept with the time they expired: a request signed after that is not
//! accepted with them.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::signing::{SigningKey, decode_base64, encode_base64, signature_of, signed_bytes, verify};

/// Longest a fetched key document is trusted, whatever its `valid_until_ts` says (the
/// specification's cap for room versions that enforce it).
pub const MAX_VALIDITY_MS: u64 = 7 * 24 * 3600 * 1000;
/// Most ed25519 keys a document may list (each is a signature check; servers have one or two).
pub const MAX_KEYS: usize = 16;
/// Largest key document read (a few keys are a few hundred bytes).
pub const MAX_DOCUMENT_SIZE: usize = 16 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key document is not a JSON object with server_name, verify_keys and valid_until_ts")]
    Shape,
    #[error("the key document is for {found}, not {wanted}")]
    WrongServer { wanted: String, found: String },
    #[error("key {0} is not an ed25519 key of 32 bytes")]
    BadKey(String),
    #[error("the key document lists no ed25519 key")]
    NoKeys,
    #[error("the key document lists more than {MAX_KEYS} keys")]
    TooManyKeys,
    #[error("key {key} has not signed the document: {reason}")]
    Unsigned { key: String, reason: String },
    #[error("the key document expired at {0}")]
    Expired(u64),
}

/// A checked key document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerKeys {
    pub server_name: String,
    /// Key name (`ed25519:…`) → public key.
    pub verify_keys: BTreeMap<String, [u8; 32]>,
    /// Key name → (public key, when it stopped being used, ms).
    pub old_verify_keys: BTreeMap<String, ([u8; 32], u64)>,
    /// Until when this document may be used (its own `valid_until_ts`, capped).
    pub valid_until_ms: u64,
}

impl ServerKeys {
    /// The public key named `key` for a request received at `now_ms`.
    pub fn key_at(&self, key: &str, now_ms: u64) -> Option<[u8; 32]> {
        if now_ms >= self.valid_until_ms {
            return None;
        }
        self.verify_keys
            .get(key)
            .copied()
            .or_else(|| self.old_verify_keys.get(key).and_then(|(k, expired)| (now_ms < *expired).then_some(*k)))
    }
}

fn ed25519_key(name: &str, entry: &Value) -> Result<[u8; 32], KeyError> {
    let bad = || KeyError::BadKey(name.to_owned());
    if !name.starts_with("ed25519:") {
        return Err(bad());
    }
    let bytes = entry.get("key").and_then(Value::as_str).and_then(decode_base64).ok_or_else(bad)?;
    bytes.try_into().map_err(|_| bad())
}

/// Checks a key document fetched from `server` at `now_ms`.
pub fn verify_server_keys(doc: &Value, server: &str, now_ms: u64) -> Result<ServerKeys, KeyError> {
    let found = doc.get("server_name").and_then(Value::as_str).ok_or(KeyError::Shape)?;
    if found != server {
        return Err(KeyError::WrongServer { wanted: server.to_owned(), found: found.to_owned() });
    }
    let valid_until = doc.get("valid_until_ts").and_then(Value::as_u64).ok_or(KeyError::Shape)?;
    if valid_until <= now_ms {
        return Err(KeyError::Expired(valid_until));
    }
    let listed = doc.get("verify_keys").and_then(Value::as_object).ok_or(KeyError::Shape)?;
    let mut verify_keys = BTreeMap::new();
    for (name, entry) in listed {
        // Keys of other algorithms are not ours to check.
        if !name.starts_with("ed25519:") {
            continue;
        }
        verify_keys.insert(name.clone(), ed25519_key(name, entry)?);
    }
    if verify_keys.is_empty() {
        return Err(KeyError::NoKeys);
    }
    if listed.len() > MAX_KEYS
        || doc.get("old_verify_keys").and_then(Value::as_object).is_some_and(|o| o.len() > MAX_KEYS)
    {
        return Err(KeyError::TooManyKeys);
    }
    // The signed bytes once, every key's signature over them.
    let signed = signed_bytes(doc).map_err(|e| KeyError::Unsigned { key: String::new(), reason: e.to_string() })?;
    for (name, key) in &verify_keys {
        signature_of(doc, server, name)
            .and_then(|sig| verify(signed.as_bytes(), sig, key))
            .map_err(|e| KeyError::Unsigned { key: name.clone(), reason: e.to_string() })?;
    }
    let mut old_verify_keys = BTreeMap::new();
    if let Some(old) = doc.get("old_verify_keys").and_then(Value::as_object) {
        for (name, entry) in old {
            if !name.starts_with("ed25519:") {
                continue;
            }
            let expired = entry.get("expired_ts").and_then(Value::as_u64).ok_or(KeyError::Shape)?;
            old_verify_keys.insert(name.clone(), (ed25519_key(name, entry)?, expired));
        }
    }
    Ok(ServerKeys {
        server_name: server.to_owned(),
        verify_keys,
        old_verify_keys,
        valid_until_ms: valid_until.min(now_ms.saturating_add(MAX_VALIDITY_MS)),
    })
}

/// Our own key document for `server`, signed with `key`, valid until `valid_until_ms`.
pub fn server_keys_document(key: &SigningKey, server: &str, valid_until_ms: u64) -> Value {
    let mut doc = json!({
        "server_name": server,
        // Canonical JSON holds integers up to 2^53 - 1 only.
        "valid_until_ts": valid_until_ms.min(crate::canonical::MAX_SAFE_INTEGER as u64),
        "verify_keys": { key.name(): { "key": encode_base64(&key.public_key()) } },
        "old_verify_keys": {},
    });
    // An object of strings and safe integers always signs.
    key.sign_json(server, &mut doc).expect("a key document is canonical JSON");
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn our_document_verifies_and_tampering_does_not() {
        let key = SigningKey::from_seed("a_1", &[9; 32]).expect("key");
        let doc = server_keys_document(&key, "hs.example", NOW + 3_600_000);
        let keys = verify_server_keys(&doc, "hs.example", NOW).expect("valid");
        assert_eq!(keys.key_at("ed25519:a_1", NOW), Some(key.public_key()));
        assert_eq!(keys.key_at("ed25519:a_1", NOW + 3_600_000), None, "not past valid_until_ts");
        assert_eq!(keys.key_at("ed25519:other", NOW), None);

        assert!(matches!(verify_server_keys(&doc, "other.example", NOW), Err(KeyError::WrongServer { .. })));
        assert!(matches!(verify_server_keys(&doc, "hs.example", NOW + 3_600_000), Err(KeyError::Expired(_))));
        let mut longer = doc.clone();
        longer["valid_until_ts"] = json!(NOW + 7_200_000);
        assert!(
            matches!(verify_server_keys(&longer, "hs.example", NOW), Err(KeyError::Unsigned { .. })),
            "a changed document"
        );
        // A second key that did not sign.
        let mut extra = doc.clone();
        extra["verify_keys"]["ed25519:b"] = json!({"key": encode_base64(&[1; 32])});
        assert!(matches!(verify_server_keys(&extra, "hs.example", NOW), Err(KeyError::Unsigned { .. })));
        let mut short = doc.clone();
        short["verify_keys"]["ed25519:a_1"] = json!({"key": encode_base64(&[1; 31])});
        assert!(matches!(verify_server_keys(&short, "hs.example", NOW), Err(KeyError::BadKey(_))));
        // A far-future valid_until_ts is capped.
        let long = server_keys_document(&key, "hs.example", u64::MAX / 2);
        assert_eq!(verify_server_keys(&long, "hs.example", NOW).expect("valid").valid_until_ms, NOW + MAX_VALIDITY_MS);
    }

    #[test]
    fn a_document_of_many_keys_is_refused_before_checking_them() {
        let key = SigningKey::from_seed("a", &[9; 32]).expect("key");
        let mut doc = server_keys_document(&key, "hs.example", NOW + 1000);
        for i in 0..MAX_KEYS {
            doc["verify_keys"][format!("ed25519:k{i}")] = json!({"key": encode_base64(&[i as u8; 32])});
        }
        assert_eq!(verify_server_keys(&doc, "hs.example", NOW), Err(KeyError::TooManyKeys));
    }

    #[test]
    fn old_keys_hold_until_they_expired() {
        let key = SigningKey::from_seed("new", &[9; 32]).expect("key");
        let mut doc = json!({
            "server_name": "hs.example",
            "valid_until_ts": NOW + 1000,
            "verify_keys": { key.name(): { "key": encode_base64(&key.public_key()) } },
            "old_verify_keys": { "ed25519:old": { "key": encode_base64(&[5; 32]), "expired_ts": NOW - 10 } },
        });
        key.sign_json("hs.example", &mut doc).expect("sign");
        let keys = verify_server_keys(&doc, "hs.example", NOW - 100).expect("valid");
        assert_eq!(keys.key_at("ed25519:old", NOW - 100), Some([5; 32]));
        assert_eq!(keys.key_at("ed25519:old", NOW - 10), None);
    }
}
