//! Canonical JSON (the Matrix specification's appendix): object members sorted by key (UTF-8
//! byte order, which is code point order), no insignificant whitespace, integers only (within
//! ±(2^53 − 1)), strings with only the escapes JSON requires (`"`, `\`, and control
//! characters: `\b \f \n \r \t` short, others `\u00XX`), everything else as UTF-8. The same
//! bytes Synapse's `canonicaljson` writes, so a signature made here verifies there.

use serde_json::Value;

/// Largest magnitude of an integer canonical JSON allows.
pub const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    #[error("a number that is not an integer within ±(2^53 - 1): {0}")]
    Number(String),
}

/// The canonical encoding of `value`.
pub fn encode(value: &Value) -> Result<String, CanonicalError> {
    let mut out = String::new();
    write(value, &mut out)?;
    Ok(out)
}

fn write(value: &Value, out: &mut String) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_i64() {
            Some(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => out.push_str(&i.to_string()),
            _ => return Err(CanonicalError::Number(n.to_string())),
        },
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Sorted here whatever order the map keeps.
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(k, out);
                out.push(':');
                write(v, out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

fn string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_specifications_examples_encode_as_it_says() {
        // From the Matrix specification's canonical JSON appendix.
        assert_eq!(encode(&json!({})).expect("canonical"), "{}");
        assert_eq!(encode(&json!({"one": 1, "two": "Two"})).expect("canonical"), r#"{"one":1,"two":"Two"}"#);
        assert_eq!(encode(&json!({"b": "2", "a": "1"})).expect("canonical"), r#"{"a":"1","b":"2"}"#);
        assert_eq!(
            encode(&json!({"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {"display_name": "John Doe", "three_pids": [{"medium": "email", "address": "john.doe@example.org"}, {"medium": "msisdn", "address": "123456789"}]}}})).expect("canonical"),
            r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#
        );
        assert_eq!(encode(&json!({"a": "日本語"})).expect("canonical"), "{\"a\":\"日本語\"}");
        assert_eq!(encode(&json!({"本": 2, "日": 1})).expect("canonical"), "{\"日\":1,\"本\":2}");
        assert_eq!(encode(&json!({"a": "\u{65e5}"})).expect("canonical"), "{\"a\":\"日\"}");
        assert_eq!(encode(&json!({"a": null})).expect("canonical"), r#"{"a":null}"#);
        assert_eq!(encode(&json!({"a": -0})).expect("canonical"), r#"{"a":0}"#);
    }

    #[test]
    fn strings_escape_only_what_json_requires() {
        assert_eq!(
            encode(&json!("a\"b\\c\n\t\r\u{8}\u{c}\u{1}\u{1f}\u{7f}/")).expect("canonical"),
            "\"a\\\"b\\\\c\\n\\t\\r\\b\\f\\u0001\\u001f\u{7f}/\""
        );
    }

    #[test]
    fn numbers_must_be_safe_integers() {
        assert!(encode(&json!(1.5)).is_err());
        assert!(encode(&json!(MAX_SAFE_INTEGER + 1)).is_err());
        assert!(encode(&json!(-MAX_SAFE_INTEGER - 1)).is_err());
        assert!(encode(&json!(u64::MAX)).is_err());
        assert_eq!(
            encode(&json!([MAX_SAFE_INTEGER, -MAX_SAFE_INTEGER])).expect("canonical"),
            "[9007199254740991,-9007199254740991]"
        );
    }
}
