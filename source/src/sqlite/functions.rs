//! The SQL functions koan registers on every SQLite connection, so scopes and
//! versions mean what they mean in the PostgreSQL source:
//!
//! - `koan_field_text(doc, field)`: PostgreSQL's `doc::jsonb ->> field`, the
//!   text of a top-level field: a string's content, `true`/`false`, a number's
//!   or a container's JSON text; NULL for JSON `null`, a missing field, or a
//!   document that is not an object.
//! - `koan_path_json(doc, path)`: `nullif(doc::jsonb #> path, 'null')::text`,
//!   the JSON text at a path (a JSON array of field names; a field that parses
//!   as an integer indexes an array, negative from the end, as `#>` does).
//! - `koan_value_json(value)`: `nullif(to_jsonb(value), 'null')::text` for a
//!   column value: integers and reals are numbers, text is a string, a blob is
//!   the string `\x<hex>`, NULL is no version.
//! - `koan_newer(old, new)` and `koan_newer_path(old_doc, new_doc, path)`:
//!   `merge` mode's `coalesce(old < new, new IS NOT NULL)` over those JSON
//!   values, compared in `jsonb` order ([`jsonb_cmp`]).
//!
//! A document that is not JSON raises an error starting with
//! [`DATA_ERROR_PREFIX`], which row isolation treats as a bad row (PostgreSQL's
//! failed `::jsonb` cast).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ffi};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

use crate::error::DATA_ERROR_PREFIX;

/// Registers every function on `connection`.
pub(crate) fn register(connection: &Connection) -> rusqlite::Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    connection.create_scalar_function("koan_field_text", 2, flags, |ctx| {
        let Some(doc) = document(ctx, 0)? else {
            return Ok(None);
        };
        let field = text_arg(ctx, 1)?;
        field_text(&doc, &field).map_err(data_error)
    })?;
    connection.create_scalar_function("koan_path_json", 2, flags, |ctx| {
        let Some(doc) = document(ctx, 0)? else {
            return Ok(None);
        };
        let path = path_arg(ctx, 1)?;
        Ok(path_value(&doc, &path)
            .map_err(data_error)?
            .map(|value| value.to_string()))
    })?;
    connection.create_scalar_function("koan_value_json", 1, flags, |ctx| {
        Ok(column_value(ctx.get_raw(0))
            .map_err(data_error)?
            .map(|value| value.to_string()))
    })?;
    connection.create_scalar_function("koan_newer", 2, flags, |ctx| {
        let old = column_value(ctx.get_raw(0)).map_err(data_error)?;
        let new = column_value(ctx.get_raw(1)).map_err(data_error)?;
        Ok(i64::from(is_newer(old.as_ref(), new.as_ref())))
    })?;
    connection.create_scalar_function("koan_newer_path", 3, flags, |ctx| {
        let path = path_arg(ctx, 2)?;
        let old = match document(ctx, 0)? {
            Some(doc) => path_value(&doc, &path).map_err(data_error)?,
            None => None,
        };
        let new = match document(ctx, 1)? {
            Some(doc) => path_value(&doc, &path).map_err(data_error)?,
            None => None,
        };
        Ok(i64::from(is_newer(old.as_ref(), new.as_ref())))
    })?;
    Ok(())
}

/// `merge`'s `coalesce(old < new, new IS NOT NULL)`: a missing archived
/// version never wins, a missing target version always loses.
pub(crate) fn is_newer(old: Option<&Value>, new: Option<&Value>) -> bool {
    match (old, new) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(old), Some(new)) => jsonb_cmp(old, new) == Ordering::Less,
    }
}

/// PostgreSQL's `jsonb` ordering of two top-level values:
/// `object > array > boolean > number > string > null`; containers with more
/// members sort higher, then members compare in order (object pairs in `jsonb`
/// storage order: shorter keys first). A top-level scalar sorts below a
/// one-element array, and an empty top-level array below everything, as in
/// PostgreSQL. Strings compare by code point (PostgreSQL uses the database
/// collation: the same order under `C` and `C.UTF-8`).
pub(crate) fn jsonb_cmp(a: &Value, b: &Value) -> Ordering {
    let scalar = |value: &Value| !matches!(value, Value::Array(_) | Value::Object(_));
    match (a, b) {
        (a, Value::Array(items)) if scalar(a) => match items.len() {
            0 => Ordering::Greater,
            _ => Ordering::Less,
        },
        (Value::Array(items), b) if scalar(b) => match items.len() {
            0 => Ordering::Less,
            _ => Ordering::Greater,
        },
        _ => nested_cmp(a, b),
    }
}

fn nested_cmp(a: &Value, b: &Value) -> Ordering {
    let rank = |value: &Value| match value {
        Value::Null => 0,
        Value::String(_) => 1,
        Value::Number(_) => 2,
        Value::Bool(_) => 3,
        Value::Array(_) => 4,
        Value::Object(_) => 5,
    };
    match (a, b) {
        (Value::Null, Value::Null) => Ordering::Equal,
        (Value::String(a), Value::String(b)) => a.cmp(b),
        (Value::Number(a), Value::Number(b)) => number_cmp(a, b),
        (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
        (Value::Array(a), Value::Array(b)) => a.len().cmp(&b.len()).then_with(|| {
            a.iter()
                .zip(b)
                .map(|(a, b)| nested_cmp(a, b))
                .find(|order| order.is_ne())
                .unwrap_or(Ordering::Equal)
        }),
        (Value::Object(a), Value::Object(b)) => a.len().cmp(&b.len()).then_with(|| {
            storage_order(a)
                .into_iter()
                .zip(storage_order(b))
                .map(|((ka, va), (kb, vb))| ka.cmp(kb).then_with(|| nested_cmp(va, vb)))
                .find(|order| order.is_ne())
                .unwrap_or(Ordering::Equal)
        }),
        (a, b) => rank(a).cmp(&rank(b)),
    }
}

/// An object's pairs in `jsonb` storage order: shorter keys first, then by bytes.
fn storage_order(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut pairs: Vec<(&String, &Value)> = map.iter().collect();
    pairs.sort_by(|x, y| x.0.len().cmp(&y.0.len()).then_with(|| x.0.cmp(y.0)));
    pairs
}

fn number_cmp(a: &Number, b: &Number) -> Ordering {
    let integer = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    match (integer(a), integer(b)) {
        (Some(a), Some(b)) => a.cmp(&b),
        _ => {
            let (a, b) = (a.as_f64().unwrap_or(0.0), b.as_f64().unwrap_or(0.0));
            a.partial_cmp(&b).unwrap_or(Ordering::Equal)
        }
    }
}

/// `doc ->> field` (see the module documentation).
pub(crate) fn field_text(doc: &str, field: &str) -> Result<Option<String>, String> {
    let root = parse(doc)?;
    let Some(value) = child(root, field, false)? else {
        return Ok(None);
    };
    let text = value.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text)
            .map(Some)
            .map_err(|error| error.to_string()),
        Some(b'n') => Ok(None),
        _ => Ok(Some(text.to_string())),
    }
}

/// `nullif(doc #> path, 'null')`, parsed.
pub(crate) fn path_value(doc: &str, path: &[String]) -> Result<Option<Value>, String> {
    let mut current = parse(doc)?;
    for field in path {
        match child(current, field, true)? {
            Some(next) => current = next,
            None => return Ok(None),
        }
    }
    let value: Value = serde_json::from_str(current.get())
        .map_err(|error| format!("the value at the version path: {error}"))?;
    Ok((!value.is_null()).then_some(value))
}

/// `nullif(to_jsonb(value), 'null')` of a column value.
pub(crate) fn column_value(value: ValueRef<'_>) -> Result<Option<Value>, String> {
    Ok(match value {
        ValueRef::Null => None,
        ValueRef::Integer(integer) => Some(Value::from(integer)),
        ValueRef::Real(real) => Some(match Number::from_f64(real) {
            Some(number) => Value::Number(number),
            None if real.is_nan() => Value::String("NaN".into()),
            None if real > 0.0 => Value::String("Infinity".into()),
            None => Value::String("-Infinity".into()),
        }),
        ValueRef::Text(bytes) => Some(Value::String(
            std::str::from_utf8(bytes)
                .map_err(|error| format!("a text value is not UTF-8: {error}"))?
                .to_string(),
        )),
        ValueRef::Blob(bytes) => {
            let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            Some(Value::String(format!("\\x{hex}")))
        }
    })
}

fn parse(doc: &str) -> Result<&RawValue, String> {
    serde_json::from_str::<&RawValue>(doc)
        .map_err(|error| format!("the document is not JSON: {error}"))
}

/// The member `field` of an object; with `index_arrays`, element `field` of an
/// array when it parses as an integer (negative from the end). Anything else: `None`.
fn child<'a>(
    value: &'a RawValue,
    field: &str,
    index_arrays: bool,
) -> Result<Option<&'a RawValue>, String> {
    let text = value.get();
    let malformed = |error: serde_json::Error| format!("the document is not JSON: {error}");
    match text.as_bytes().first() {
        Some(b'{') => {
            // Duplicate keys: the last one wins, as in jsonb.
            let members: BTreeMap<String, &RawValue> =
                serde_json::from_str(text).map_err(malformed)?;
            Ok(members.get(field).copied())
        }
        Some(b'[') if index_arrays => {
            let Ok(index) = field.parse::<i64>() else {
                return Ok(None);
            };
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(malformed)?;
            let len = i64::try_from(items.len()).unwrap_or(i64::MAX);
            let position = if index < 0 { len + index } else { index };
            Ok(usize::try_from(position)
                .ok()
                .and_then(|position| items.get(position).copied()))
        }
        _ => Ok(None),
    }
}

/// A document argument as JSON text; `None` for SQL NULL.
fn document(ctx: &Context<'_>, index: usize) -> rusqlite::Result<Option<String>> {
    match ctx.get_raw(index) {
        ValueRef::Null => Ok(None),
        ValueRef::Text(bytes) => std::str::from_utf8(bytes)
            .map(|text| Some(text.to_string()))
            .map_err(|error| data_error(format!("the document is not UTF-8: {error}"))),
        ValueRef::Integer(integer) => Ok(Some(integer.to_string())),
        ValueRef::Real(real) => Ok(Some(
            Number::from_f64(real)
                .map(|number| number.to_string())
                .unwrap_or_else(|| "null".into()),
        )),
        ValueRef::Blob(_) => Err(data_error("the document is a blob, not JSON text")),
    }
}

fn text_arg(ctx: &Context<'_>, index: usize) -> rusqlite::Result<String> {
    match ctx.get_raw(index) {
        ValueRef::Text(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        _ => Err(data_error("a field name must be text")),
    }
}

fn path_arg(ctx: &Context<'_>, index: usize) -> rusqlite::Result<Vec<String>> {
    let text = text_arg(ctx, index)?;
    serde_json::from_str(&text).map_err(|error| data_error(format!("bad path {text}: {error}")))
}

/// An error SQLite reports as `SQLITE_ERROR` with [`DATA_ERROR_PREFIX`].
fn data_error(message: impl std::fmt::Display) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        ffi::Error::new(ffi::SQLITE_ERROR),
        Some(format!("{DATA_ERROR_PREFIX}{message}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_text_is_postgres_arrow_text() {
        let doc =
            r#"{"t": "tenant-a", "n": 12, "b": true, "z": null, "o": {"x": 1}, "t2": "a\"b"}"#;
        assert_eq!(field_text(doc, "t").unwrap().as_deref(), Some("tenant-a"));
        assert_eq!(field_text(doc, "n").unwrap().as_deref(), Some("12"));
        assert_eq!(field_text(doc, "b").unwrap().as_deref(), Some("true"));
        assert_eq!(field_text(doc, "z").unwrap(), None);
        assert_eq!(field_text(doc, "missing").unwrap(), None);
        assert_eq!(
            field_text(doc, "o").unwrap().as_deref(),
            Some(r#"{"x": 1}"#)
        );
        assert_eq!(field_text(doc, "t2").unwrap().as_deref(), Some("a\"b"));
        assert_eq!(
            field_text(r#"{"t": 1, "t": "last"}"#, "t")
                .unwrap()
                .as_deref(),
            Some("last")
        );
        assert_eq!(
            field_text("[1, 2]", "0").unwrap(),
            None,
            "->> text on an array"
        );
        assert_eq!(field_text("5", "t").unwrap(), None);
        assert_eq!(
            field_text(r#"{"big": 1e400}"#, "big").unwrap().as_deref(),
            Some("1e400")
        );
        assert!(field_text("{nope", "t").is_err());
    }

    #[test]
    fn path_value_is_postgres_hash_arrow() {
        let doc = r#"{"meta": {"v": 3, "list": [10, 20, 30], "nil": null}}"#;
        let path = |fields: &[&str]| fields.iter().map(|f| f.to_string()).collect::<Vec<_>>();
        assert_eq!(
            path_value(doc, &path(&["meta", "v"])).unwrap(),
            Some(json!(3))
        );
        assert_eq!(
            path_value(doc, &path(&["meta", "list", "1"])).unwrap(),
            Some(json!(20))
        );
        assert_eq!(
            path_value(doc, &path(&["meta", "list", "-1"])).unwrap(),
            Some(json!(30))
        );
        assert_eq!(
            path_value(doc, &path(&["meta", "list", "3"])).unwrap(),
            None
        );
        assert_eq!(
            path_value(doc, &path(&["meta", "list", "x"])).unwrap(),
            None
        );
        assert_eq!(
            path_value(doc, &path(&["meta", "nil"])).unwrap(),
            None,
            "JSON null is no version"
        );
        assert_eq!(
            path_value(doc, &path(&["meta", "v", "deeper"])).unwrap(),
            None
        );
        assert_eq!(path_value("7", &path(&["meta"])).unwrap(), None);
        assert!(path_value("{", &path(&["meta"])).is_err());
    }

    #[test]
    fn jsonb_order() {
        let ordered = [
            json!(null),
            json!(""),
            json!("a"),
            json!("b"),
            json!(-5),
            json!(2),
            json!(2.5),
            json!(10),
            json!(false),
            json!(true),
            json!([0]),
            json!([1, 0]),
            json!({"b": 1}),
            json!({"a": 1, "b": 2}),
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(jsonb_cmp(a, b), i.cmp(&j), "{a} vs {b}");
            }
        }
        // Numbers numerically (not as text), strings by code point.
        assert_eq!(jsonb_cmp(&json!(9), &json!(10)), Ordering::Less);
        assert_eq!(jsonb_cmp(&json!("9"), &json!("10")), Ordering::Greater);
        assert_eq!(
            jsonb_cmp(
                &json!("2024-01-01T10:00:00Z"),
                &json!("2024-02-01T00:00:00Z")
            ),
            Ordering::Less
        );
        assert_eq!(jsonb_cmp(&json!(1), &json!(1.0)), Ordering::Equal);
        // Objects with as many pairs: shorter keys first, in jsonb storage order.
        assert_eq!(
            jsonb_cmp(&json!({"bb": 1, "a": 2}), &json!({"bb": 0, "a": 3})),
            Ordering::Less
        );
        // PostgreSQL's quirks at the top level.
        assert_eq!(jsonb_cmp(&json!([]), &json!(null)), Ordering::Less);
        assert_eq!(jsonb_cmp(&json!(5), &json!([5])), Ordering::Less);
        assert_eq!(jsonb_cmp(&json!(5), &json!([])), Ordering::Greater);
    }

    #[test]
    fn newer_is_merge_condition() {
        assert!(
            is_newer(None, Some(&json!(1))),
            "a row without version is older"
        );
        assert!(
            !is_newer(Some(&json!(1)), None),
            "an archived row without version never wins"
        );
        assert!(!is_newer(None, None));
        assert!(is_newer(Some(&json!(9)), Some(&json!(10))));
        assert!(!is_newer(Some(&json!(10)), Some(&json!(10))));
        assert!(!is_newer(Some(&json!(11)), Some(&json!(10))));
    }

    #[test]
    fn functions_work_in_sql() {
        let connection = Connection::open_in_memory().unwrap();
        register(&connection).unwrap();
        let row: (Option<String>, Option<String>, Option<String>, i64, i64) = connection
            .query_row(
                "SELECT koan_field_text('{\"t\": \"a\"}', 't'), \
                 koan_path_json('{\"m\": {\"v\": [1, 2]}}', '[\"m\", \"v\"]'), \
                 koan_value_json(x'00ff'), \
                 koan_newer(9, 10), koan_newer_path('{\"v\": 2}', '{\"v\": 1}', '[\"v\"]')",
                [],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(row.0.as_deref(), Some("a"));
        assert_eq!(row.1.as_deref(), Some("[1,2]"));
        assert_eq!(row.2.as_deref(), Some("\"\\\\x00ff\""));
        assert_eq!((row.3, row.4), (1, 0));
        let error = connection
            .query_row("SELECT koan_field_text('{oops', 't')", [], |row| {
                row.get::<_, Option<String>>(0)
            })
            .unwrap_err();
        assert!(error.to_string().starts_with(DATA_ERROR_PREFIX), "{error}");
    }
}
