//! Row isolation for SQLite: write a range of rows all or nothing, and find
//! the rows that fail, exactly as the PostgreSQL source does.
//!
//! PostgreSQL writes a range `[lo, hi)` with one statement inside a
//! savepoint; on a data or integrity error it rolls back and retries both
//! halves, down to single rows. Here a range is written row by row inside the
//! savepoint `koan_rows`, and any row error rolls the whole range back and
//! splits it the same way. The outcome is the same as PostgreSQL's, counts
//! included: a key imported twice keeps its last line *within the range that
//! is written*, as in PostgreSQL's set-based statement.
//!
//! Row errors are PostgreSQL's classes 22 and 23: a key that is not of the
//! key type (any row of the range), a document or version that is not JSON, a
//! document that must be an object (it is re-stamped) and is not, a document
//! SQLite's `json()` refuses, and constraint violations. Anything else
//! (I/O, a lock timeout, a missing column) fails the whole write.

use koan_protocol::events::RowFailure;
use rusqlite::types::Value;
use rusqlite::{Connection, ErrorCode, OptionalExtension, Statement, ToSql, ffi};

use crate::error::{DATA_ERROR_PREFIX, SourceError, sqlite};
use crate::rows::sort_failures;
use crate::sqlite::merge::{MergePlan, RowsFrom, WriteTo};

/// Longest failure reason kept (the raw line is kept separately).
const MAX_REASON: usize = 1000;

/// What a write did.
#[derive(Debug, Default)]
pub(crate) struct Written {
    /// Rows inserted or updated.
    pub(crate) rows_written: u64,
    /// Rows that failed or conflicted with another scope, by part and line.
    pub(crate) failures: Vec<RowFailure>,
}

/// Why one row cannot be written.
#[derive(Debug)]
enum RowError {
    /// PostgreSQL's class 22: the data does not fit.
    Data(String),
    /// PostgreSQL's class 23: a constraint refused the row.
    Integrity(String),
}

/// Why a range attempt stopped.
enum Stop {
    Row(RowError),
    Fatal(SourceError),
}

/// One row of a range to write.
struct SourceRow {
    seq: i64,
    key_text: String,
    key: Value,
    version: Option<String>,
    doc: String,
}

/// Writes the rows `seq` in `[lo, hi)` of `rows` to `to`, isolating failing
/// rows. The connection must be inside a write transaction.
pub(crate) fn write_rows(
    connection: &Connection,
    plan: &MergePlan,
    rows: RowsFrom<'_>,
    to: WriteTo<'_>,
    (lo, hi): (i64, i64),
    context: &str,
) -> Result<Written, SourceError> {
    let execute = |statement: &str| {
        connection
            .execute_batch(statement)
            .map_err(|error| sqlite(context, error))
    };
    let mut written = Written::default();
    let mut pending = vec![(lo, hi)];
    let mut isolating = false;
    while let Some((lo, hi)) = pending.pop() {
        execute("SAVEPOINT koan_rows")?;
        match write_range(connection, plan, rows, to, (lo, hi), context) {
            Ok(range) => {
                execute("RELEASE SAVEPOINT koan_rows")?;
                written.rows_written += range.rows_written;
                written.failures.extend(range.failures);
            }
            Err(Stop::Row(error)) => {
                execute("ROLLBACK TO SAVEPOINT koan_rows; RELEASE SAVEPOINT koan_rows")?;
                if hi - lo <= 1 {
                    written
                        .failures
                        .push(row_failure(connection, plan, rows, lo, &error, context)?);
                    continue;
                }
                if !isolating {
                    isolating = true;
                    tracing::info!(
                        context,
                        rows = hi - lo,
                        error = ?error,
                        "range write failed, isolating the failing rows"
                    );
                }
                let middle = lo + (hi - lo) / 2;
                // Popped in order: the lower half first, so rows keep their order.
                pending.push((middle, hi));
                pending.push((lo, middle));
            }
            Err(Stop::Fatal(error)) => return Err(error),
        }
    }
    sort_failures(&mut written.failures);
    Ok(written)
}

/// What writing one row did.
enum RowOutcome {
    /// Inserted or updated.
    Written,
    /// Left as it was (an existing row not older, a key already staged).
    Unchanged,
    /// The key exists under another scope (its scope, if any): never written.
    Conflict(Option<String>),
}

/// One attempt at a whole range: every row written, or the first row error.
fn write_range(
    connection: &Connection,
    plan: &MergePlan,
    rows: RowsFrom<'_>,
    to: WriteTo<'_>,
    (lo, hi): (i64, i64),
    context: &str,
) -> Result<Written, Stop> {
    let fatal = |error| Stop::Fatal(sqlite(context, error));
    if rows == RowsFrom::Import {
        // PostgreSQL casts every key of the range (the duplicate check does).
        let bad: Option<String> = connection
            .query_row(plan.bad_key_statement(), [lo, hi], |row| row.get(0))
            .optional()
            .map_err(fatal)?;
        if let Some(bad) = bad {
            return Err(Stop::Row(RowError::Data(format!(
                "key '{}' is not a valid {} value",
                bad.escape_default().take(200).collect::<String>(),
                plan.key_type().sql()
            ))));
        }
    }
    let mut statement = connection
        .prepare_cached(&plan.rows_statement(rows))
        .map_err(fatal)?;
    let mut cursor = statement.query([lo, hi]).map_err(fatal)?;
    let mut written = Written::default();
    while let Some(row) = cursor.next().map_err(fatal)? {
        let source = SourceRow {
            seq: row.get(0).map_err(fatal)?,
            key_text: row.get(1).map_err(fatal)?,
            key: row.get(2).map_err(fatal)?,
            version: row.get(3).map_err(fatal)?,
            doc: row.get(4).map_err(fatal)?,
        };
        match write_one(connection, plan, rows, to, &source, context)? {
            RowOutcome::Written => written.rows_written += 1,
            RowOutcome::Unchanged => {}
            RowOutcome::Conflict(found) => written.failures.push(
                conflict(connection, plan, rows, &source, found, context).map_err(Stop::Fatal)?,
            ),
        }
    }
    Ok(written)
}

/// Writes one row.
fn write_one(
    connection: &Connection,
    plan: &MergePlan,
    rows: RowsFrom<'_>,
    to: WriteTo<'_>,
    row: &SourceRow,
    context: &str,
) -> Result<RowOutcome, Stop> {
    if rows == RowsFrom::Import {
        check_document(plan, &row.doc).map_err(|reason| Stop::Row(RowError::Data(reason)))?;
        if let Some(version) = &row.version
            && let Err(error) = serde_json::from_str::<serde::de::IgnoredAny>(version)
        {
            return Err(Stop::Row(RowError::Data(format!(
                "the version is not JSON: {error}"
            ))));
        }
    }
    // nullif(v, 'null'): a JSON null is no version.
    let version = row
        .version
        .as_deref()
        .filter(|version| version.trim() != "null");
    let statement_text = match to {
        WriteTo::Staging(table) => plan.staging_insert_statement(table),
        WriteTo::Target(mode) => {
            if let Some(found_statement) = plan.found_statement() {
                let found: Option<Option<String>> = connection
                    .prepare_cached(&found_statement)
                    .and_then(|mut statement| {
                        statement
                            .query_row(&[(":key", &row.key as &dyn ToSql)], |found| found.get(0))
                            .optional()
                    })
                    .map_err(|error| stop(error, context))?;
                if let Some(found) = found
                    && found.as_deref() != plan.scope()
                {
                    return Ok(RowOutcome::Conflict(found));
                }
            }
            plan.upsert_statement(rows, mode)
        }
    };
    let mut statement = connection
        .prepare_cached(&statement_text)
        .map_err(|error| Stop::Fatal(sqlite(context, error)))?;
    bind(&mut statement, ":key", &row.key, context)?;
    bind(&mut statement, ":doc", &row.doc, context)?;
    bind(&mut statement, ":ver", &version, context)?;
    bind(&mut statement, ":scope", &plan.scope(), context)?;
    bind(&mut statement, ":seq", &row.seq, context)?;
    match statement.raw_execute() {
        Ok(0) => Ok(RowOutcome::Unchanged),
        Ok(_) => Ok(RowOutcome::Written),
        Err(error) => Err(stop(error, context)),
    }
}

/// Binds `value` to the named parameter when the statement has it.
fn bind(
    statement: &mut Statement<'_>,
    name: &str,
    value: &dyn ToSql,
    context: &str,
) -> Result<(), Stop> {
    let fatal = |error| Stop::Fatal(sqlite(context, error));
    if let Some(index) = statement.parameter_index(name).map_err(fatal)? {
        statement.raw_bind_parameter(index, value).map_err(fatal)?;
    }
    Ok(())
}

/// The document checks PostgreSQL's `::jsonb` cast and `jsonb_set` make: it
/// is JSON, and an object when it is re-stamped.
fn check_document(plan: &MergePlan, doc: &str) -> Result<(), String> {
    serde_json::from_str::<serde::de::IgnoredAny>(doc)
        .map_err(|error| format!("the document is not JSON: {error}"))?;
    if plan.needs_object_documents() && !is_object(doc) {
        return Err(
            "the document is not a JSON object, so its scope field cannot be re-stamped".into(),
        );
    }
    Ok(())
}

/// Whether valid JSON text is an object.
fn is_object(doc: &str) -> bool {
    doc.trim_start().starts_with('{')
}

/// A failed statement: a row error (data or integrity) stops the range; anything else the write.
fn stop(error: rusqlite::Error, context: &str) -> Stop {
    let rusqlite::Error::SqliteFailure(failure, message) = &error else {
        return Stop::Fatal(sqlite(context, error));
    };
    let message = message.clone().unwrap_or_else(|| failure.to_string());
    if message.starts_with(DATA_ERROR_PREFIX) || message.contains("malformed JSON") {
        return Stop::Row(RowError::Data(message));
    }
    match failure.code {
        // A STRICT table refusing a value's type is PostgreSQL's failed cast.
        ErrorCode::ConstraintViolation
            if failure.extended_code == ffi::SQLITE_CONSTRAINT_DATATYPE =>
        {
            Stop::Row(RowError::Data(message))
        }
        ErrorCode::ConstraintViolation => Stop::Row(RowError::Integrity(message)),
        ErrorCode::TooBig | ErrorCode::TypeMismatch => Stop::Row(RowError::Data(message)),
        _ => Stop::Fatal(sqlite(context, error)),
    }
}

/// One row that failed alone: its key, line and why.
fn row_failure(
    connection: &Connection,
    plan: &MergePlan,
    rows: RowsFrom<'_>,
    seq: i64,
    error: &RowError,
    context: &str,
) -> Result<RowFailure, SourceError> {
    type Line = (
        Option<String>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
    );
    let line: Option<Line> = connection
        .query_row(&plan.row_statement(rows), [seq], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })
        .optional()
        .map_err(|error| sqlite(context, error))?;
    let (key, line_no, part, raw, doc) = line.unwrap_or((None, None, None, None, None));
    let (code, reason) = match error {
        RowError::Integrity(reason) => ("constraint_violation", reason),
        RowError::Data(reason) => {
            let invalid_document = match doc.as_deref() {
                Some(doc) => check_document(plan, doc).is_err(),
                None => plan.needs_object_documents(),
            };
            let code = if invalid_document {
                "invalid_document"
            } else {
                "type_mismatch"
            };
            (code, reason)
        }
    };
    Ok(RowFailure {
        key,
        part,
        line_no: line_no.and_then(|line| u64::try_from(line).ok()),
        code: code.to_string(),
        reason: truncated(reason),
        line: raw.unwrap_or_default(),
    })
}

/// A row whose key exists in the target under another scope: never written.
fn conflict(
    connection: &Connection,
    plan: &MergePlan,
    rows: RowsFrom<'_>,
    source: &SourceRow,
    found: Option<String>,
    context: &str,
) -> Result<RowFailure, SourceError> {
    let (line_no, part, raw): (Option<i64>, Option<String>, Option<String>) = connection
        .query_row(&plan.row_statement(rows), [source.seq], |row| {
            Ok((row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .map_err(|error| sqlite(context, error))?;
    let owner = match &found {
        Some(scope) => format!("scope '{}'", scope.escape_default()),
        None => "no scope".to_string(),
    };
    Ok(RowFailure {
        reason: format!(
            "key {} already exists in the target and belongs to {owner}; \
             a restore never modifies another scope's row",
            source.key_text.escape_default()
        ),
        key: Some(source.key_text.clone()),
        part,
        line_no: line_no.and_then(|line| u64::try_from(line).ok()),
        code: "scope_conflict".into(),
        line: raw.unwrap_or_default(),
    })
}

fn truncated(reason: &str) -> String {
    let mut reason = reason.to_string();
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}
