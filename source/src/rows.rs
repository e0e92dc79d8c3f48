//! The rows every backend exchanges with the worker: [`ExportRow`]s out of a
//! backup, [`ImportLine`]s into a restore, and what an import or a swap did.

use bytes::Bytes;
use koan_protocol::events::RowFailure;

use crate::error::SourceError;

/// One exported row: the key, version and document as UTF-8 text.
///
/// PostgreSQL rows are zero-copy slices of the received data: the slices keep
/// their receive buffer alive, so copy a field (for example the last key, kept
/// as a continuation position) before holding it long.
#[derive(Debug, Clone)]
pub struct ExportRow {
    /// The key as text (`key::text`; a SQLite integer key in decimal).
    pub key: Bytes,
    /// The version as JSON text; `None` when the entity has none or it is NULL.
    pub version: Option<Bytes>,
    /// The document as JSON text.
    pub doc: Bytes,
}

impl ExportRow {
    /// The key as a string slice.
    pub fn key_str(&self) -> Result<&str, SourceError> {
        std::str::from_utf8(&self.key)
            .map_err(|error| SourceError::decode(format!("key is not UTF-8: {error}")))
    }

    /// A row from its three fields, refusing a NULL key or document and any field that is not UTF-8.
    pub(crate) fn from_fields(fields: [Option<Bytes>; 3]) -> Result<Self, SourceError> {
        let [key, version, doc] = fields;
        let key = key.ok_or_else(|| SourceError::decode("row with a NULL key"))?;
        let doc = doc.ok_or_else(|| SourceError::decode("row with a NULL document"))?;
        for (name, field) in [
            ("key", Some(&key)),
            ("version", version.as_ref()),
            ("document", Some(&doc)),
        ] {
            if let Some(bytes) = field
                && let Err(error) = std::str::from_utf8(bytes)
            {
                return Err(SourceError::decode(format!("{name} is not UTF-8: {error}")));
            }
        }
        Ok(Self { key, version, doc })
    }
}

/// One archived row, as the worker parsed it from a JSON line.
#[derive(Debug, Clone, Copy)]
pub struct ImportLine<'a> {
    /// Line number in the part, from 1.
    pub line_no: u64,
    /// The part's path.
    pub part: &'a str,
    /// The key as text: a JSON string's content, or a number's digits.
    pub key: &'a str,
    /// The version as JSON text, if the line has one.
    pub version: Option<&'a str>,
    /// The document as JSON text.
    pub doc: &'a str,
    /// The whole line, kept for diagnostics and replays.
    pub raw: &'a str,
}

/// How a `replace` import stages a part (PostgreSQL; SQLite always stages
/// typed rows in its staging table).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StagingForm {
    /// Into the restore's load table, typed, when it has one (the target was
    /// missing when the restore was planned): PostgreSQL parses the documents
    /// while the parts are imported in parallel, and the apply renames the
    /// table into place. A row that cannot be loaded typed fails the whole
    /// import with [`SourceError::RowsRefused`]: stage that part again as
    /// [`StagingForm::Text`]. Without a load table, the same as `Text`.
    #[default]
    Typed,
    /// Into the staging table as text, cast when applied, where row
    /// isolation names every row that does not convert.
    Text,
}

/// What an import wrote.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportOutcome {
    /// Rows inserted or updated (in `replace` mode: newly staged).
    pub rows_written: u64,
    /// Rows left as they were (an existing row not older, a key already staged, a duplicate line).
    pub rows_skipped: u64,
    /// Rows that could not be written, isolated from the rest, ordered by part and line.
    pub failures: Vec<RowFailure>,
}

/// What `replace` mode's swap did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApplyOutcome {
    /// Staged rows written into the target.
    pub rows_written: u64,
    /// Staged rows left out: a key staged more than once is written once.
    pub rows_skipped: u64,
    /// Rows of the scope removed first.
    pub rows_removed: u64,
    /// Staged rows that could not be written, isolated from the rest.
    pub failures: Vec<RowFailure>,
}

/// Orders failures by part, then line number.
pub(crate) fn sort_failures(failures: &mut [RowFailure]) {
    failures.sort_by(|a, b| a.part.cmp(&b.part).then(a.line_no.cmp(&b.line_no)));
}
