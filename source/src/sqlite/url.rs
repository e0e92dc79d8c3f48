//! `sqlite://` URLs: everything after `sqlite://` is the database file's path.
//!
//! - `sqlite:///var/lib/app.db` is the absolute path `/var/lib/app.db`;
//! - `sqlite://app.db` and `sqlite://data/app.db` are relative to the working
//!   directory of the process, resolved once, when the source is built.
//!
//! The path is percent-decoded (`%20` for a space). A query string or a
//! fragment is refused rather than silently taken as part of a file name: write
//! `%3F` for `?` and `%23` for `#`. `:memory:` is refused, as an in-memory
//! database belongs to one connection and every call opens its own. The path is
//! given to SQLite as a plain file name (never as a `file:` URI), so no URI
//! parameter can sneak in.

use std::path::PathBuf;

use crate::error::SourceError;

/// The scheme this module accepts, lower case.
pub(crate) const SCHEME: &str = "sqlite://";

/// Whether `url` is a `sqlite://` URL (scheme compared case-insensitively).
pub(crate) fn is_sqlite_url(url: &str) -> bool {
    url.get(..SCHEME.len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case(SCHEME))
}

/// The absolute path of the database file named by `url`.
pub(crate) fn parse_url(url: &str) -> Result<PathBuf, SourceError> {
    let config = |reason: String| SourceError::Config { reason };
    if !is_sqlite_url(url) {
        return Err(config(format!(
            "a sqlite url starts with {SCHEME} (sqlite:///absolute/path.db or sqlite://relative/path.db)"
        )));
    }
    let rest = &url[SCHEME.len()..];
    if rest.contains(['?', '#']) {
        return Err(config(format!(
            "sqlite url '{}' has a query string or fragment, which is not supported; \
             percent-encode '?' as %3F and '#' as %23 if they are part of the file name",
            rest.escape_default()
        )));
    }
    let decoded = percent_decode(rest).map_err(config)?;
    if decoded.is_empty() {
        return Err(config("the sqlite url names no file".into()));
    }
    if decoded.contains('\0') {
        return Err(config("the sqlite path contains a NUL character".into()));
    }
    if decoded == ":memory:" {
        return Err(config(
            "an in-memory sqlite database belongs to one connection and cannot be shared; name a file"
                .into(),
        ));
    }
    if decoded.ends_with('/') {
        return Err(config(format!(
            "sqlite path '{}' names a directory, not a database file",
            decoded.escape_default()
        )));
    }
    std::path::absolute(&decoded).map_err(|error| {
        config(format!(
            "cannot resolve sqlite path '{}': {error}",
            decoded.escape_default()
        ))
    })
}

/// Decodes `%XX` escapes; the result must be UTF-8.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = bytes
                .get(index + 1..index + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| {
                    format!(
                        "sqlite url has a bad percent escape at byte {index} of '{}'",
                        text.escape_default()
                    )
                })?;
            decoded.push(hex);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).map_err(|_| "the decoded sqlite path is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_and_relative_paths() {
        assert_eq!(
            parse_url("sqlite:///var/lib/app.db").expect("absolute"),
            PathBuf::from("/var/lib/app.db")
        );
        assert_eq!(
            parse_url("SQLite:///tmp/My%20App.db").expect("escaped"),
            PathBuf::from("/tmp/My App.db")
        );
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(
            parse_url("sqlite://data/app.db").expect("relative"),
            cwd.join("data/app.db")
        );
        assert!(is_sqlite_url("sqlite://x.db"));
        assert!(!is_sqlite_url("postgres://x"));
        assert!(!is_sqlite_url("sql"));
    }

    #[test]
    fn refuses_what_is_not_a_file_name() {
        for (url, needle) in [
            ("sqlite://", "names no file"),
            ("sqlite://:memory:", "in-memory"),
            ("sqlite:///tmp/a.db?mode=ro", "query string"),
            ("sqlite:///tmp/a.db#x", "query string"),
            ("sqlite:///tmp/a%2", "percent escape"),
            ("sqlite:///tmp/a%zz", "percent escape"),
            ("sqlite:///tmp/a%00b", "NUL"),
            ("sqlite:///tmp/%ff", "not UTF-8"),
            ("sqlite:///tmp/", "directory"),
            ("postgres://x", "starts with sqlite://"),
        ] {
            let error = parse_url(url).expect_err(url);
            assert_eq!(error.code(), "config", "{url}");
            assert!(error.to_string().contains(needle), "{url}: {error}");
        }
    }
}
