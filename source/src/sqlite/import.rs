//! Importing archived rows into SQLite: one write transaction per part (or
//! replay batch).
//!
//! A [`SqliteImportSession`] owns a connection. Pushed rows are buffered and
//! every [`FLUSH_BYTES`] written, off the async runtime, into the connection's
//! `TEMP` table `koan_import`: a temporary table lives in a file of its own,
//! so staging takes no lock on the database and other writers go on.
//! [`SqliteImportSession::commit`] then takes the write lock (`BEGIN
//! IMMEDIATE`), writes the staged rows per mode with row isolation, and
//! commits. Nothing is written to the database unless the commit succeeds;
//! an aborted or dropped session just closes its connection (the `TEMP`
//! table goes with it). Memory stays bounded: one buffer plus the largest row,
//! and SQLite spills the `TEMP` table to disk.

use std::fmt;

use koan_protocol::commands::RestoreMode;
use koan_protocol::events::RowFailure;
use rusqlite::Connection;
use rusqlite::types::Value;
use tokio::sync::OwnedSemaphorePermit;

use crate::error::{SourceError, sqlite};
use crate::postgres::FLUSH_BYTES;
use crate::rows::{ImportLine, ImportOutcome, sort_failures};
use crate::sqlite::connection::blocking;
use crate::sqlite::isolate::{Written, write_rows};
use crate::sqlite::merge::{IMPORT_INSERT, IMPORT_SETUP, MergePlan, RowsFrom, WriteTo};
use crate::sqlite::sql::parse_integer_key;

/// Largest text SQLite stores (its default `SQLITE_MAX_LENGTH`).
const MAX_TEXT_BYTES: usize = 1_000_000_000;

/// Where an import's rows go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// The target table, per mode.
    Target(RestoreMode),
    /// A `replace` staging table.
    Staging(String),
}

/// The connection and what it writes with; moved to the blocking pool for each call.
pub(crate) struct Importer {
    connection: Connection,
    plan: MergePlan,
    _permit: OwnedSemaphorePermit,
}

impl Importer {
    /// Creates the `TEMP` staging table on `connection`.
    pub(crate) fn new(
        connection: Connection,
        plan: MergePlan,
        permit: OwnedSemaphorePermit,
        context: &str,
    ) -> Result<Self, SourceError> {
        connection
            .execute_batch(IMPORT_SETUP)
            .map_err(|error| sqlite(context, error))?;
        Ok(Self {
            connection,
            plan,
            _permit: permit,
        })
    }

    /// Appends rows to the `TEMP` table (its transaction touches no database lock).
    fn stage(&self, rows: &[PendingRow], context: &str) -> Result<(), SourceError> {
        let connection = &self.connection;
        let staged = (|| {
            connection.execute_batch("BEGIN DEFERRED")?;
            let mut statement = connection.prepare_cached(IMPORT_INSERT)?;
            for row in rows {
                let typed_key = match self.plan.key_type().is_numeric() {
                    true => parse_integer_key(&row.key).map_or(Value::Null, Value::Integer),
                    false => Value::Text(row.key.clone()),
                };
                statement.execute(rusqlite::params![
                    row.seq,
                    row.key,
                    typed_key,
                    row.version,
                    row.doc,
                    row.line_no,
                    row.raw,
                    row.part,
                ])?;
            }
            connection.execute_batch("COMMIT")
        })();
        staged.map_err(|error| {
            let _ = connection.execute_batch("ROLLBACK");
            sqlite(context, error)
        })
    }

    /// Writes the staged rows `[0, staged)` in one write transaction.
    fn merge(
        &self,
        destination: &Destination,
        staged: u64,
        context: &str,
    ) -> Result<Written, SourceError> {
        if staged == 0 {
            return Ok(Written::default());
        }
        let connection = &self.connection;
        connection
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|error| sqlite(context, error))?;
        let to = match destination {
            Destination::Target(mode) => WriteTo::Target(*mode),
            Destination::Staging(table) => WriteTo::Staging(table),
        };
        let range = (0, i64::try_from(staged).unwrap_or(i64::MAX));
        let written = write_rows(connection, &self.plan, RowsFrom::Import, to, range, context)
            .and_then(|written| {
                connection
                    .execute_batch("COMMIT")
                    .map_err(|error| sqlite(context, error))?;
                Ok(written)
            });
        if written.is_err() {
            let _ = connection.execute_batch("ROLLBACK");
        }
        written
    }
}

/// One pushed row, owned until it is staged.
struct PendingRow {
    seq: i64,
    key: String,
    version: Option<String>,
    doc: String,
    line_no: i64,
    raw: String,
    part: String,
}

/// One import in progress: rows pushed so far are staged in the session's
/// `TEMP` table (or buffered to be).
///
/// End it with [`commit`](Self::commit) or [`abort`](Self::abort). Dropped
/// without either (a cancelled job), its connection closes: nothing is written.
pub struct SqliteImportSession {
    importer: Option<Importer>,
    pending: Vec<PendingRow>,
    pending_bytes: usize,
    destination: Destination,
    context: String,
    staged: u64,
    local_failures: Vec<RowFailure>,
    /// The first failure (message, retryable): every later call fails with it.
    failure: Option<(String, bool)>,
}

impl fmt::Debug for SqliteImportSession {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SqliteImportSession")
            .field("context", &self.context)
            .field("destination", &self.destination)
            .field("staged", &self.staged)
            .field("buffered", &self.pending_bytes)
            .field("local_failures", &self.local_failures.len())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl SqliteImportSession {
    pub(crate) fn new(importer: Importer, destination: Destination, context: String) -> Self {
        Self {
            importer: Some(importer),
            pending: Vec::new(),
            pending_bytes: 0,
            destination,
            context,
            staged: 0,
            local_failures: Vec::new(),
            failure: None,
        }
    }

    /// Adds one row. A row SQLite text cannot hold (a NUL character, a field
    /// over SQLite's length limit) is not staged: it becomes a failure of the
    /// outcome. An `Err` means the import cannot go on: abort it.
    pub async fn push(&mut self, line: &ImportLine<'_>) -> Result<(), SourceError> {
        self.check_usable()?;
        if let Some((code, reason)) = unstorable(line) {
            self.local_failures.push(RowFailure {
                key: (!line.key.contains('\0')).then(|| line.key.to_string()),
                part: Some(line.part.to_string()),
                line_no: Some(line.line_no),
                code: code.to_string(),
                reason,
                line: line.raw.replace('\0', "\\u0000"),
            });
            return Ok(());
        }
        let row = PendingRow {
            seq: i64::try_from(self.staged).unwrap_or(i64::MAX),
            key: line.key.to_string(),
            version: line.version.map(str::to_string),
            doc: line.doc.to_string(),
            line_no: i64::try_from(line.line_no).unwrap_or(i64::MAX),
            raw: line.raw.to_string(),
            part: line.part.to_string(),
        };
        self.pending_bytes += 64
            + row.key.len()
            + row.doc.len()
            + row.raw.len()
            + row.part.len()
            + row.version.as_ref().map_or(0, String::len);
        self.pending.push(row);
        self.staged += 1;
        if self.pending_bytes >= FLUSH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Rows pushed so far (refused rows not counted).
    pub fn rows_staged(&self) -> u64 {
        self.staged
    }

    /// Drops the session: nothing from this import is written.
    pub async fn abort(mut self) {
        if let Some(importer) = self.importer.take() {
            let closed = blocking(&self.context, move || {
                drop(importer);
                Ok(())
            })
            .await;
            if let Err(error) = closed {
                tracing::warn!(context = %self.context, %error, "closing the aborted import failed");
            }
        }
        tracing::debug!(context = %self.context, staged = self.staged, "import aborted");
    }

    /// Stages what is buffered, writes the staged rows per the target's mode
    /// (or into the `replace` staging table) and commits. Rows that fail are
    /// isolated and listed; any other error rolls everything back.
    pub async fn commit(mut self) -> Result<ImportOutcome, SourceError> {
        if let Err(error) = self.check_usable() {
            self.abort().await;
            return Err(error);
        }
        self.flush().await?;
        let Some(importer) = self.importer.take() else {
            return Err(self.used_after_failure());
        };
        let destination = self.destination.clone();
        let staged = self.staged;
        let context = self.context.clone();
        let written = blocking(&self.context, move || {
            importer.merge(&destination, staged, &context)
        })
        .await?;
        let settled = written.rows_written + written.failures.len() as u64;
        let mut failures = std::mem::take(&mut self.local_failures);
        failures.extend(written.failures);
        sort_failures(&mut failures);
        let outcome = ImportOutcome {
            rows_written: written.rows_written,
            rows_skipped: self.staged.saturating_sub(settled),
            failures,
        };
        tracing::debug!(
            context = %self.context,
            staged = self.staged,
            written = outcome.rows_written,
            skipped = outcome.rows_skipped,
            failed = outcome.failures.len(),
            "import committed"
        );
        Ok(outcome)
    }

    /// Stages the buffered rows in the `TEMP` table.
    async fn flush(&mut self) -> Result<(), SourceError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let Some(importer) = self.importer.take() else {
            return Err(self.used_after_failure());
        };
        let rows = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let context = self.context.clone();
        let staged = blocking(&self.context, move || {
            importer.stage(&rows, &context)?;
            Ok(importer)
        })
        .await;
        match staged {
            Ok(importer) => {
                self.importer = Some(importer);
                Ok(())
            }
            Err(error) => {
                self.failure = Some((error.to_string(), error.is_retryable()));
                Err(error)
            }
        }
    }

    fn check_usable(&self) -> Result<(), SourceError> {
        if self.failure.is_some() || self.importer.is_none() {
            return Err(self.used_after_failure());
        }
        Ok(())
    }

    fn used_after_failure(&self) -> SourceError {
        let (reason, retryable) = self
            .failure
            .clone()
            .unwrap_or_else(|| ("the session is closed".to_string(), false));
        SourceError::ImportFailed {
            context: self.context.clone(),
            reason,
            retryable,
        }
    }
}

/// Why a row cannot be staged at all, as (code, reason): the same refusals
/// as the PostgreSQL source's for NUL characters (no JSON text holds a raw
/// one, and keys never do), and SQLite's own length limit.
fn unstorable(line: &ImportLine<'_>) -> Option<(&'static str, String)> {
    if line.key.contains('\0') {
        return Some((
            "type_mismatch",
            "the key contains a NUL character, which a key cannot hold".into(),
        ));
    }
    let texts = [line.doc, line.version.unwrap_or(""), line.raw, line.part];
    if texts.iter().any(|text| text.contains('\0')) {
        return Some((
            "invalid_document",
            "the line contains a NUL character, which JSON text cannot hold".into(),
        ));
    }
    let longest = [
        line.key,
        line.doc,
        line.version.unwrap_or(""),
        line.raw,
        line.part,
    ]
    .iter()
    .map(|text| text.len())
    .max()
    .unwrap_or(0);
    (longest > MAX_TEXT_BYTES).then(|| {
        (
            "invalid_document",
            format!("a field of {longest} bytes exceeds SQLite's {MAX_TEXT_BYTES}-byte limit"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(key: &'a str, doc: &'a str) -> ImportLine<'a> {
        ImportLine {
            line_no: 3,
            part: "p/000000-0000-r.jsonl.zst",
            key,
            version: None,
            doc,
            raw: doc,
        }
    }

    #[test]
    fn refuses_rows_with_nul_characters() {
        assert_eq!(
            unstorable(&line("a\0b", "{}")).map(|f| f.0),
            Some("type_mismatch")
        );
        assert_eq!(
            unstorable(&line("a", "{\"x\": \"\0\"}")).map(|f| f.0),
            Some("invalid_document")
        );
        assert!(unstorable(&line("a", "{\"x\": \"\\u0000\"}")).is_none());
        assert!(unstorable(&line("it's \"é\" 😀", "[1]")).is_none());
    }
}
