//! ed25519 keys and signed JSON, as servers sign events, key documents and requests.
//!
//! A signed JSON object carries `signatures: {<server>: {"ed25519:<key id>": <base64>}}`; the
//! signature covers the canonical JSON of the object without `signatures` and `unsigned`.
//! Base64 is written unpadded standard (the specification's form) and read in either
//! alphabet, padded or not (as Synapse reads it).

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine as _;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD_NO_PAD};
use serde_json::{Map, Value};

use crate::canonical::{self, CanonicalError};

/// Why a signature does not hold.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("not a JSON object")]
    NotAnObject,
    #[error("no signature by {server} with {key}")]
    Missing { server: String, key: String },
    #[error("the signature is not base64 of 64 bytes")]
    Malformed,
    #[error("the signature does not verify")]
    Invalid,
    #[error(transparent)]
    Canonical(#[from] CanonicalError),
}

/// Base64 as servers write it in practice: padded or not, and with whatever the unused bits
/// of the last character hold (Python's decoder, which Synapse uses, ignores them).
const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
    .with_decode_allow_trailing_bits(true)
    .with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// Decodes base64 in either alphabet, with or without padding.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    STANDARD_LENIENT.decode(s).or_else(|_| URL_SAFE_LENIENT.decode(s)).ok()
}

pub fn encode_base64(bytes: &[u8]) -> String {
    STANDARD_NO_PAD.encode(bytes)
}

/// A server's ed25519 signing key.
pub struct SigningKey {
    /// `a_AbCd` in `ed25519:a_AbCd`.
    pub key_id: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(ed25519:{}, <secret>)", self.key_id)
    }
}

impl SigningKey {
    pub fn from_seed(key_id: &str, seed: &[u8; 32]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).map_err(|e| format!("bad ed25519 seed: {e}"))?;
        Ok(Self { key_id: key_id.to_owned(), pair })
    }

    /// `ed25519:<key id>`.
    pub fn name(&self) -> String {
        format!("ed25519:{}", self.key_id)
    }

    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// The unpadded base64 signature of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        encode_base64(self.pair.sign(message).as_ref())
    }

    /// Adds this key's signature, as `server`'s, to the JSON object `value` (keeping any
    /// signatures it already has).
    pub fn sign_json(&self, server: &str, value: &mut Value) -> Result<(), SignatureError> {
        let signature = self.sign(signed_bytes(value)?.as_bytes());
        let obj = value.as_object_mut().ok_or(SignatureError::NotAnObject)?;
        let sigs = obj.entry("signatures").or_insert_with(|| Value::Object(Map::new()));
        let Some(sigs) = sigs.as_object_mut() else { return Err(SignatureError::NotAnObject) };
        let mine = sigs.entry(server).or_insert_with(|| Value::Object(Map::new()));
        let Some(mine) = mine.as_object_mut() else { return Err(SignatureError::NotAnObject) };
        mine.insert(self.name(), Value::String(signature));
        Ok(())
    }
}

/// The bytes a JSON signature covers: the canonical JSON of the object without `signatures`
/// and `unsigned`.
pub fn signed_bytes(value: &Value) -> Result<String, SignatureError> {
    let mut obj = value.as_object().ok_or(SignatureError::NotAnObject)?.clone();
    obj.remove("signatures");
    obj.remove("unsigned");
    Ok(canonical::encode(&Value::Object(obj))?)
}

/// Checks `signature` (base64) of `message` by the ed25519 `public_key`.
pub fn verify(message: &[u8], signature: &str, public_key: &[u8; 32]) -> Result<(), SignatureError> {
    let sig = decode_base64(signature).filter(|s| s.len() == 64).ok_or(SignatureError::Malformed)?;
    UnparsedPublicKey::new(&ED25519, public_key).verify(message, &sig).map_err(|_| SignatureError::Invalid)
}

/// The signature `value` carries by `server` with the key named `key_name`.
pub fn signature_of<'a>(value: &'a Value, server: &str, key_name: &str) -> Result<&'a str, SignatureError> {
    value
        .get("signatures")
        .and_then(|s| s.get(server))
        .and_then(|s| s.get(key_name))
        .and_then(Value::as_str)
        .ok_or_else(|| SignatureError::Missing { server: server.to_owned(), key: key_name.to_owned() })
}

/// Checks that `value` carries a valid signature by `server` with the key named `key_name`
/// (`ed25519:…`) whose public half is `public_key`.
pub fn verify_json(value: &Value, server: &str, key_name: &str, public_key: &[u8; 32]) -> Result<(), SignatureError> {
    let sig = signature_of(value, server, key_name)?;
    verify(signed_bytes(value)?.as_bytes(), sig, public_key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The specification's signing-key example: seed `YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1`
    /// as key `ed25519:1`.
    fn spec_key() -> SigningKey {
        let seed: [u8; 32] =
            decode_base64("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1").expect("base64").try_into().expect("32 bytes");
        SigningKey::from_seed("1", &seed).expect("key")
    }

    #[test]
    fn signatures_match_the_specifications_examples() {
        // The appendix's "Signing JSON" examples.
        let key = spec_key();
        let mut empty = json!({});
        key.sign_json("domain", &mut empty).expect("sign");
        assert_eq!(
            empty["signatures"]["domain"]["ed25519:1"],
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
        );
        let mut data = json!({"one": 1, "two": "Two"});
        key.sign_json("domain", &mut data).expect("sign");
        assert_eq!(
            data["signatures"]["domain"]["ed25519:1"],
            "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
        );
        let public = key.public_key();
        verify_json(&data, "domain", "ed25519:1", &public).expect("verifies");
    }

    #[test]
    fn a_changed_object_or_another_key_does_not_verify() {
        let key = spec_key();
        let mut data = json!({"a": 1, "unsigned": {"age": 5}});
        key.sign_json("hs", &mut data).expect("sign");
        let public = key.public_key();
        // `unsigned` is not covered: it may change.
        data["unsigned"]["age"] = json!(6);
        verify_json(&data, "hs", "ed25519:1", &public).expect("unsigned is outside the signature");
        let mut changed = data.clone();
        changed["a"] = json!(2);
        assert_eq!(verify_json(&changed, "hs", "ed25519:1", &public), Err(SignatureError::Invalid));
        let other = SigningKey::from_seed("2", &[7; 32]).expect("key");
        assert_eq!(verify_json(&data, "hs", "ed25519:1", &other.public_key()), Err(SignatureError::Invalid));
        assert!(matches!(verify_json(&data, "other", "ed25519:1", &public), Err(SignatureError::Missing { .. })));
        let mut garbled = data.clone();
        garbled["signatures"]["hs"]["ed25519:1"] = json!("!!!");
        assert_eq!(verify_json(&garbled, "hs", "ed25519:1", &public), Err(SignatureError::Malformed));
        // URL-safe or padded base64 of the same signature is the same signature.
        let sig = data["signatures"]["hs"]["ed25519:1"].as_str().expect("sig").to_owned();
        let url_safe =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(decode_base64(&sig).expect("b64")) + "==";
        let mut other_form = data.clone();
        other_form["signatures"]["hs"]["ed25519:1"] = json!(url_safe);
        verify_json(&other_form, "hs", "ed25519:1", &public).expect("either alphabet");
    }
}
