//! Validated names and SQL quoting.
//!
//! Every name that reaches SQL or a storage key passes through here first.
//! Validation is deliberately narrow: a hostile name such as `../../etc` or
//! `x"; drop table t; --` is refused with an error naming the field and value,
//! and quoting is still applied to whatever passed, as a second wall.

use crate::error::ProtocolError;

const MAX_NAME: usize = 128;
const MAX_IDENT: usize = 63;

fn invalid(field: &str, value: &str, reason: &'static str) -> ProtocolError {
    ProtocolError::InvalidName {
        field: field.to_string(),
        value: value.escape_default().take(200).collect(),
        reason,
    }
}

/// Checks a name that becomes a storage path segment or a routing key part:
/// plan ids, entity names, buckets, scopes, pools.
///
/// Allowed: 1 to 128 ASCII letters, digits, `_`, `-`, `.` and `:`, not starting
/// with `.` or `-`, never containing `..`.
pub fn check_name(field: &str, value: &str) -> Result<(), ProtocolError> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_NAME {
        return Err(invalid(field, value, "longer than 128 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    {
        return Err(invalid(
            field,
            value,
            "only ASCII letters, digits, '_', '-', '.' and ':' are allowed",
        ));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return Err(invalid(field, value, "must not start with '.' or '-'"));
    }
    if value.contains("..") {
        return Err(invalid(field, value, "must not contain '..'"));
    }
    Ok(())
}

/// Checks a SQL identifier (schema, table, column): 1 to 63 bytes, starting
/// with an ASCII letter or `_`, then letters, digits, `_`, `#`, `$`, `-`, `:`.
/// Koan partition tables (`Order#archive`) pass; quotes, semicolons, spaces,
/// slashes and control characters do not.
pub fn check_ident(field: &str, value: &str) -> Result<(), ProtocolError> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_IDENT {
        return Err(invalid(field, value, "longer than 63 bytes"));
    }
    let mut chars = value.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok {
        return Err(invalid(field, value, "must start with a letter or '_'"));
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '#' | '$' | '-' | ':')) {
        return Err(invalid(
            field,
            value,
            "only ASCII letters, digits, '_', '#', '$', '-' and ':' are allowed",
        ));
    }
    Ok(())
}

/// Checks a JSON field name used in a scope match or a version path.
pub fn check_json_field(field: &str, value: &str) -> Result<(), ProtocolError> {
    if value.is_empty() || value.len() > MAX_IDENT {
        return Err(invalid(field, value, "must be 1 to 63 bytes"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '$'))
    {
        return Err(invalid(
            field,
            value,
            "only ASCII letters, digits, '_', '-' and '$' are allowed",
        ));
    }
    Ok(())
}

/// Quotes a SQL identifier (`"..."`, inner quotes doubled).
pub fn quote_ident(ident: &str) -> String {
    let mut quoted = String::with_capacity(ident.len() + 2);
    quoted.push('"');
    for c in ident.chars() {
        if c == '"' {
            quoted.push('"');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// Quotes a SQL string literal (`'...'`, inner quotes doubled).
///
/// Valid only with `standard_conforming_strings = on`, which every session
/// koan-backup opens sets explicitly. Refuses NUL, which PostgreSQL text cannot hold.
pub fn quote_literal(value: &str) -> Result<String, ProtocolError> {
    if value.contains('\0') {
        return Err(invalid("literal", value, "must not contain NUL"));
    }
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('\'');
    for c in value.chars() {
        if c == '\'' {
            quoted.push('\'');
        }
        quoted.push(c);
    }
    quoted.push('\'');
    Ok(quoted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_hostile_names() {
        for bad in [
            "../x",
            "../../etc",
            "",
            ".hidden",
            "a/b",
            "x\"; drop table",
            "a b",
            "-x",
        ] {
            assert!(check_name("entity", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["orders", "orders:daily", "tenant-a", "v1.2", "A_b"] {
            check_name("entity", good).unwrap();
        }
    }

    #[test]
    fn refuses_hostile_identifiers() {
        let error = check_ident("table", "a\"; drop table t; --").unwrap_err();
        assert!(error.to_string().contains("table"));
        assert!(error.to_string().contains("drop table"));
        for bad in ["", "1abc", "a.b", "a b", "a;b", "../x", "a\0"] {
            assert!(check_ident("table", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["Order", "Order#archive", "_t", "tbl$1", "koan:orders"] {
            check_ident("table", good).unwrap();
        }
    }

    #[test]
    fn quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert!(quote_literal("a\0").is_err());
    }
}
