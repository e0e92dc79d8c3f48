//! Archive lines read back: parsing one line into its key, version and
//! document, and the diagnostic record of a line that does not parse.
//!
//! Import, replay and verify all parse lines here. A line is
//! `{"id": <key>, "v": <version>, "doc": <document>}` (see
//! `koan_protocol::archive`); it parses when it is UTF-8, valid JSON of that
//! shape, and its key is a JSON integer for numeric key types or a JSON
//! string otherwise. The document is kept as raw JSON text, never rebuilt.

use koan_protocol::archive::ArchiveLine;
use koan_protocol::events::RowFailure;
use koan_protocol::plan::KeyType;
use serde_json::Value;

/// Code of the diagnostic recorded for a line that does not parse.
pub const UNPARSABLE_LINE: &str = "unparsable_line";
/// Longest reason kept in a diagnostic.
const MAX_REASON_CHARS: usize = 500;

/// A line that parsed.
#[derive(Debug)]
pub struct ParsedLine {
    /// The key's text form: a string key's content, or an integer key's digits
    /// (what PostgreSQL prints for `key::text`).
    pub key: String,
    /// Whether the key was a JSON number.
    pub numeric_key: bool,
    /// The version as JSON text; `None` when absent or `null`.
    pub version: Option<String>,
    /// The document.
    pub doc: Box<serde_json::value::RawValue>,
}

/// Parses one line (without its `\n`) of an entity whose keys are of
/// `key_type` (either kind of key is accepted when it is unknown). Returns
/// the line as text and what it holds, or why it does not parse.
pub fn parse_line(bytes: &[u8], key_type: Option<KeyType>) -> Result<(&str, ParsedLine), String> {
    let text = std::str::from_utf8(bytes).map_err(|error| {
        format!(
            "line is not valid UTF-8 (invalid byte at offset {})",
            error.valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        return Err("line is empty".into());
    }
    let line: ArchiveLine = serde_json::from_str(text).map_err(|error| {
        let mut reason = error.to_string();
        truncate(&mut reason);
        reason
    })?;
    let (key, numeric_key) = match line.id {
        Value::String(key) => {
            if let Some(key_type) = key_type.filter(|key_type| key_type.is_numeric()) {
                return Err(format!(
                    "key is a string, the entity's key type is {}",
                    key_type.sql()
                ));
            }
            (key, false)
        }
        Value::Number(number) if number.is_i64() || number.is_u64() => {
            if let Some(key_type) = key_type.filter(|key_type| !key_type.is_numeric()) {
                return Err(format!(
                    "key {number} is a number, the entity's key type is {}",
                    key_type.sql()
                ));
            }
            (number.to_string(), true)
        }
        Value::Number(number) => return Err(format!("key {number} is not an integer")),
        other => {
            return Err(format!(
                "key must be a string or an integer, found {}",
                json_kind(&other)
            ));
        }
    };
    let version = line.v.map(|version| version.to_string());
    Ok((
        text,
        ParsedLine {
            key,
            numeric_key,
            version,
            doc: line.doc,
        },
    ))
}

/// The diagnostic of a line that does not parse: kept with its raw text so
/// it can be fixed and replayed.
///
/// Bytes that are not UTF-8 are written as `\xNN` (lossy, but showing what
/// was there): never valid JSON, so such a line keeps failing on replay until
/// someone repairs it, rather than being written with replacement characters.
pub fn unparsable(
    part: Option<&str>,
    line_no: Option<u64>,
    reason: String,
    raw: &[u8],
) -> RowFailure {
    RowFailure {
        key: None,
        part: part.map(str::to_string),
        line_no,
        code: UNPARSABLE_LINE.to_string(),
        reason,
        line: escape_invalid_utf8(raw),
    }
}

/// `raw` as text, each byte that is not part of valid UTF-8 written as `\xNN`.
pub fn escape_invalid_utf8(raw: &[u8]) -> String {
    let mut text = String::with_capacity(raw.len());
    for chunk in raw.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            text.push_str(&format!("\\x{byte:02x}"));
        }
    }
    text
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn truncate(reason: &mut String) {
    if let Some((cut, _)) = reason.char_indices().nth(MAX_REASON_CHARS) {
        reason.truncate(cut);
        reason.push('…');
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_versions_and_documents() {
        let (text, parsed) = parse_line(
            br#"{"id":"a\"b\u00e9","v":7,"doc":{"x": [1, 2]}}"#,
            Some(KeyType::Text),
        )
        .unwrap();
        assert_eq!(text, r#"{"id":"a\"b\u00e9","v":7,"doc":{"x": [1, 2]}}"#);
        assert_eq!(parsed.key, "a\"bé");
        assert!(!parsed.numeric_key);
        assert_eq!(parsed.version.as_deref(), Some("7"));
        assert_eq!(parsed.doc.get(), r#"{"x": [1, 2]}"#);

        let (_, parsed) = parse_line(
            br#"{"id":-9007199254740993,"doc":{}}"#,
            Some(KeyType::Bigint),
        )
        .unwrap();
        assert_eq!(parsed.key, "-9007199254740993");
        assert!(parsed.numeric_key);
        assert!(parsed.version.is_none());

        let (_, parsed) = parse_line(br#"{"id":5,"v":null,"doc":"text"}"#, None).unwrap();
        assert!(parsed.version.is_none());
        let (_, parsed) = parse_line(br#"{"id":"k","v":"2024-01-01","doc":1}"#, None).unwrap();
        assert_eq!(parsed.version.as_deref(), Some("\"2024-01-01\""));
    }

    #[test]
    fn says_why_a_line_does_not_parse() {
        for (line, key_type, expected) in [
            (&b"\xff{}"[..], None, "not valid UTF-8"),
            (b"", None, "empty"),
            (b"  ", None, "empty"),
            (b"{\"id\":1,\"doc\":", None, "EOF"),
            (b"{\"id\":1}", None, "missing field `doc`"),
            (b"{\"id\":1.5,\"doc\":{}}", None, "not an integer"),
            (b"{\"id\":[1],\"doc\":{}}", None, "found an array"),
            (
                b"{\"id\":\"1\",\"doc\":{}}",
                Some(KeyType::Integer),
                "key type is integer",
            ),
            (
                b"{\"id\":1,\"doc\":{}}",
                Some(KeyType::Uuid),
                "key type is uuid",
            ),
            (b"not json", None, "expected"),
        ] {
            let reason = parse_line(line, key_type).unwrap_err();
            assert!(
                reason.contains(expected),
                "{:?}: {reason}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn unparsable_lines_keep_their_raw_text() {
        let failure = unparsable(
            Some("b/p"),
            Some(3),
            "bad".into(),
            b"{\"id\":\"\xffa\xc3\"}",
        );
        assert_eq!(failure.code, UNPARSABLE_LINE);
        assert_eq!(failure.part.as_deref(), Some("b/p"));
        assert_eq!(failure.line_no, Some(3));
        assert_eq!(failure.line, r#"{"id":"\xffa\xc3"}"#);
        assert!(
            parse_line(failure.line.as_bytes(), None).is_err(),
            "still unparsable"
        );
        assert!(failure.key.is_none());
        let mut long = "é".repeat(2_000);
        truncate(&mut long);
        assert_eq!(long.chars().count(), MAX_REASON_CHARS + 1);
    }
}
