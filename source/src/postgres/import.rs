//! Importing archived rows: one transaction per part (or replay batch).
//!
//! An [`ImportSession`] owns a pooled connection inside a read-write
//! transaction. Rows are streamed with binary `COPY ... FROM STDIN` into a
//! table of text columns, so no value can break the `COPY`:
//!
//! - into the target: a `TEMP` table (`ON COMMIT DROP`), which
//!   [`ImportSession::commit`] then writes with one set-based statement (row
//!   isolation finds failing rows);
//! - into a `replace` staging table: the rows land there as they are, and
//!   `commit` records the part's marker row; casts, re-stamping and row
//!   isolation happen once, when the staged rows are applied;
//! - into a `replace` load table (`load.rs`): the rows land typed, in the
//!   target's final shape, and `commit` records the marker row with the
//!   number of rows loaded. A row the client cannot type, or the server
//!   refuses, fails the import with [`SourceError::RowsRefused`].
//!
//! Nothing is written unless the commit succeeds. Memory stays bounded: rows
//! are encoded into a buffer sent every [`FLUSH_BYTES`], and the driver's
//! channel pushes back.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::RowFailure;
use tokio_postgres::CopyInSink;
use tokio_postgres::error::SqlState;

use crate::error::SourceError;
use crate::postgres::isolate::{Written, write_rows};
use crate::postgres::load::LoadTable;
use crate::postgres::merge::{IMPORT_COPY, IMPORT_SETUP, MergeSql, RowsFrom};
use crate::postgres::session::Session;
use crate::rows::{ImportLine, ImportOutcome, sort_failures};

/// Encoded rows are sent to the server once this many bytes are buffered.
pub const FLUSH_BYTES: usize = 2 * 1024 * 1024;
/// Largest document accepted (jsonb's own limit is just under 256 MiB).
const MAX_DOCUMENT_BYTES: usize = 255 * 1024 * 1024;
/// Largest key, version, raw line or part path (a `COPY` field is at most 1 GiB).
const MAX_FIELD_BYTES: usize = 1024 * 1024 * 1024 - 1;
/// Binary `COPY` header: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// How long [`ImportSession::abort`] waits for `ROLLBACK` before closing the connection.
const ABORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an import's rows go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Destination {
    /// The target table, per mode.
    Target(RestoreMode),
    /// A `replace` staging table.
    Staging(String),
    /// A `replace` load table, with the staging table that keeps its markers.
    Load(Box<LoadTable>, String),
}

/// One import in progress: rows pushed so far are in the transaction's `COPY`.
///
/// End it with [`commit`](Self::commit) or [`abort`](Self::abort). Dropped
/// without either (a cancelled job), its connection is closed and the server
/// rolls back: nothing is written.
pub struct ImportSession {
    copy: Option<Pin<Box<CopyInSink<Bytes>>>>,
    session: Option<Session>,
    buffer: BytesMut,
    sql: MergeSql,
    destination: Destination,
    context: String,
    staged: u64,
    /// The part of the first row pushed (a staging import is one part).
    part: Option<String>,
    local_failures: Vec<RowFailure>,
    /// The first failure (message, retryable): every later call fails with it.
    failure: Option<(String, bool)>,
}

impl fmt::Debug for ImportSession {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ImportSession")
            .field("context", &self.context)
            .field("destination", &self.destination)
            .field("staged", &self.staged)
            .field("buffered", &self.buffer.len())
            .field("local_failures", &self.local_failures.len())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl ImportSession {
    /// Begins the transaction, creates the text staging table and starts the `COPY`.
    pub(crate) async fn start(
        mut session: Session,
        sql: MergeSql,
        destination: Destination,
        context: String,
    ) -> Result<Self, SourceError> {
        if let Err(error) = session.begin_write().await {
            session.end_failed(&error).await;
            return Err(error);
        }
        let copy = match &destination {
            Destination::Target(_) => match session.client().batch_execute(IMPORT_SETUP).await {
                Ok(()) => session.client().copy_in(IMPORT_COPY).await,
                Err(error) => Err(error),
            },
            Destination::Staging(table) => {
                let statement = sql.staging_copy_statement(table);
                session.client().copy_in(&statement).await
            }
            Destination::Load(load, _) => session.client().copy_in(&load.copy_statement()).await,
        };
        let copy = match copy {
            Ok(copy) => copy,
            Err(error) => {
                let mapped = SourceError::query(context, error);
                session.end_failed(&mapped).await;
                return Err(mapped);
            }
        };
        let mut buffer = BytesMut::with_capacity(FLUSH_BYTES + 64 * 1024);
        buffer.put_slice(COPY_HEADER);
        Ok(Self {
            copy: Some(Box::pin(copy)),
            session: Some(session),
            buffer,
            sql,
            destination,
            context,
            staged: 0,
            part: None,
            local_failures: Vec::new(),
            failure: None,
        })
    }

    /// Streams one row into the `COPY`. A row PostgreSQL text cannot hold (a
    /// NUL character, an oversized document) is not sent: it becomes a failure
    /// of the outcome. An `Err` means the import cannot go on: abort it.
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
        match self.destination {
            Destination::Target(_) => {
                let seq = i64::try_from(self.staged).unwrap_or(i64::MAX);
                encode_row(&mut self.buffer, seq, line);
            }
            Destination::Staging(_) => encode_staged_row(&mut self.buffer, line),
            Destination::Load(ref load, _) => {
                if let Err(reason) = load.encode_row(&mut self.buffer, line) {
                    let refused = SourceError::RowsRefused {
                        context: self.context.clone(),
                        reason,
                    };
                    self.failure = Some((refused.to_string(), false));
                    return Err(refused);
                }
            }
        }
        if self.part.is_none() {
            self.part = Some(line.part.to_string());
        }
        self.staged += 1;
        if self.buffer.len() >= FLUSH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Rows pushed into the `COPY` so far (refused rows not counted).
    pub fn rows_staged(&self) -> u64 {
        self.staged
    }

    /// Rolls back: nothing from this import is written.
    pub async fn abort(mut self) {
        // Dropping the sink makes the driver send CopyFail: the COPY ends with
        // an error and the transaction can be rolled back normally.
        drop(self.copy.take());
        if let Some(session) = self.session.take()
            && tokio::time::timeout(ABORT_TIMEOUT, session.abort())
                .await
                .is_err()
        {
            // The timed-out future dropped the session inside its transaction:
            // the connection was closed instead, and the server rolls back.
            tracing::warn!(context = %self.context, "rollback timed out, connection closed");
        }
        tracing::debug!(context = %self.context, staged = self.staged, "import aborted");
    }

    /// Ends the `COPY`, writes the staged rows per the target's mode (or into
    /// the `replace` staging table), and commits. Rows that fail are isolated
    /// and listed; any other error rolls everything back.
    pub async fn commit(mut self) -> Result<ImportOutcome, SourceError> {
        if let Err(error) = self.check_usable() {
            self.abort().await;
            return Err(error);
        }
        let (Some(mut copy), Some(session)) = (self.copy.take(), self.session.take()) else {
            return Err(self.used_after_failure());
        };
        self.buffer.put_i16(-1);
        let trailer = self.buffer.split().freeze();
        let copied = match copy.send(trailer).await {
            Ok(()) => copy.as_mut().finish().await,
            Err(error) => Err(error),
        };
        if let Err(error) = copied {
            let mapped = self.copy_error(error);
            session.end_failed(&mapped).await;
            return Err(mapped);
        }
        let written = match (&self.destination, &self.part) {
            (_, None) => Written::default(),
            (Destination::Target(mode), Some(_)) => {
                let range = (0, i64::try_from(self.staged).unwrap_or(i64::MAX));
                let result = write_rows(
                    session.client(),
                    &self.sql,
                    RowsFrom::Import,
                    &self.sql.write_statement(RowsFrom::Import, *mode),
                    range,
                    &self.context,
                )
                .await;
                match result {
                    Ok(written) => written,
                    Err(error) => {
                        session.end_failed(&error).await;
                        return Err(error);
                    }
                }
            }
            (Destination::Staging(table) | Destination::Load(_, table), Some(part)) => {
                let marker = self.sql.staging_marker_statement(table);
                let loaded = matches!(self.destination, Destination::Load(..))
                    .then(|| i64::try_from(self.staged).unwrap_or(i64::MAX));
                match session.client().execute(&marker, &[part, &loaded]).await {
                    // Staged now, or by an earlier import of the same part
                    // whose rows are already there: the same outcome.
                    Ok(marked) => {
                        if marked == 0 {
                            session.abort().await;
                            tracing::debug!(context = %self.context, %part, "part already staged");
                            return Ok(self.staged_outcome());
                        }
                        Written {
                            rows_written: self.staged,
                            failures: Vec::new(),
                        }
                    }
                    Err(error) => {
                        let mapped = SourceError::query(self.context.clone(), error);
                        session.end_failed(&mapped).await;
                        return Err(mapped);
                    }
                }
            }
        };
        session.commit().await?;
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

    /// A staging import's outcome: every row sent is staged; casts and
    /// conflicts are judged when the staged rows are applied.
    fn staged_outcome(&mut self) -> ImportOutcome {
        let mut failures = std::mem::take(&mut self.local_failures);
        sort_failures(&mut failures);
        ImportOutcome {
            rows_written: self.staged,
            rows_skipped: 0,
            failures,
        }
    }

    async fn flush(&mut self) -> Result<(), SourceError> {
        let chunk = self.buffer.split().freeze();
        let Some(copy) = self.copy.as_mut() else {
            return Err(self.used_after_failure());
        };
        if let Err(error) = copy.send(chunk).await {
            let mapped = self.copy_error(error);
            self.failure = Some((mapped.to_string(), mapped.is_retryable()));
            return Err(mapped);
        }
        Ok(())
    }

    /// A failed `COPY`. Into a load table, a data exception (class 22: a
    /// document or version `jsonb` refuses, a number out of range) or a
    /// document nested too deep (`54001`) is [`SourceError::RowsRefused`]:
    /// the part is to be staged again as text.
    fn copy_error(&self, error: tokio_postgres::Error) -> SourceError {
        let refused = matches!(self.destination, Destination::Load(..))
            && error.code().is_some_and(|state| {
                state.code().starts_with("22") || *state == SqlState::STATEMENT_TOO_COMPLEX
            });
        if refused {
            let reason = error
                .as_db_error()
                .map_or_else(|| error.to_string(), |db| db.message().to_string());
            return SourceError::RowsRefused {
                context: self.context.clone(),
                reason,
            };
        }
        SourceError::query(self.context.clone(), error)
    }

    fn check_usable(&self) -> Result<(), SourceError> {
        if self.failure.is_some() || self.copy.is_none() || self.session.is_none() {
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

/// Why a row cannot be sent at all, as (code, reason).
fn unstorable(line: &ImportLine<'_>) -> Option<(&'static str, String)> {
    if line.key.contains('\0') {
        return Some((
            "type_mismatch",
            "the key contains a NUL character, which PostgreSQL text cannot hold".into(),
        ));
    }
    let texts = [line.doc, line.version.unwrap_or(""), line.raw, line.part];
    if texts.iter().any(|text| text.contains('\0')) {
        return Some((
            "invalid_document",
            "the line contains a NUL character, which PostgreSQL text cannot hold".into(),
        ));
    }
    if line.doc.len() > MAX_DOCUMENT_BYTES {
        return Some((
            "invalid_document",
            format!(
                "document of {} bytes exceeds the {MAX_DOCUMENT_BYTES}-byte jsonb limit",
                line.doc.len()
            ),
        ));
    }
    let longest = [line.key, line.version.unwrap_or(""), line.raw, line.part]
        .iter()
        .map(|text| text.len())
        .max()
        .unwrap_or(0);
    (longest > MAX_FIELD_BYTES).then(|| {
        (
            "invalid_document",
            format!("a field of {longest} bytes exceeds the {MAX_FIELD_BYTES}-byte limit"),
        )
    })
}

/// One binary `COPY` tuple: `seq, k, v, d, line_no, raw, part`.
fn encode_row(buffer: &mut BytesMut, seq: i64, line: &ImportLine<'_>) {
    buffer.reserve(64 + line.key.len() + line.doc.len() + line.raw.len() + line.part.len());
    buffer.put_i16(7);
    put_bigint(buffer, seq);
    put_text(buffer, line.key);
    match line.version {
        Some(version) => put_text(buffer, version),
        None => buffer.put_i32(-1),
    }
    put_text(buffer, line.doc);
    put_bigint(buffer, i64::try_from(line.line_no).unwrap_or(i64::MAX));
    put_text(buffer, line.raw);
    put_text(buffer, line.part);
}

/// One binary `COPY` tuple of a staging table: `k, v, d, line_no, part`
/// (`seq` is the table's own sequence; no raw line is kept).
fn encode_staged_row(buffer: &mut BytesMut, line: &ImportLine<'_>) {
    buffer.reserve(48 + line.key.len() + line.doc.len() + line.part.len());
    buffer.put_i16(5);
    put_text(buffer, line.key);
    match line.version {
        Some(version) => put_text(buffer, version),
        None => buffer.put_i32(-1),
    }
    put_text(buffer, line.doc);
    put_bigint(buffer, i64::try_from(line.line_no).unwrap_or(i64::MAX));
    put_text(buffer, line.part);
}

fn put_bigint(buffer: &mut BytesMut, value: i64) {
    buffer.put_i32(8);
    buffer.put_i64(value);
}

/// Lengths were checked by [`unstorable`]: every field fits an `i32`.
fn put_text(buffer: &mut BytesMut, text: &str) {
    buffer.put_i32(i32::try_from(text.len()).unwrap_or(i32::MAX));
    buffer.put_slice(text.as_bytes());
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
    fn encodes_binary_copy_tuples() {
        let mut buffer = BytesMut::new();
        let mut row = line("k1", "{}");
        row.version = Some("7");
        encode_row(&mut buffer, 5, &row);
        let mut expected = vec![
            0, 7, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 2, b'k', b'1',
        ];
        expected.extend([0, 0, 0, 1, b'7', 0, 0, 0, 2, b'{', b'}']);
        expected.extend([0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 2, b'{', b'}']);
        expected.extend(25_i32.to_be_bytes());
        expected.extend(b"p/000000-0000-r.jsonl.zst");
        assert_eq!(&buffer[..], &expected[..]);

        buffer.clear();
        encode_row(&mut buffer, 0, &line("k", "1"));
        assert_eq!(&buffer[19..23], &(-1_i32).to_be_bytes(), "NULL version");
        assert_eq!(COPY_HEADER.len(), 19);
    }

    #[test]
    fn refuses_rows_postgres_text_cannot_hold() {
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
