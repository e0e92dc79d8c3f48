//! Row isolation: write a whole range of rows in one statement, and find the
//! rows that fail when it does not go through.
//!
//! The range is first written in one set-based statement, inside a savepoint.
//! If that fails with a data error (SQLSTATE class 22) or an integrity
//! violation (class 23), it is rolled back to the savepoint and split in two
//! halves, each tried the same way, down to single rows: a range holding `k`
//! bad rows among `n` costs about `2k·log2(n)` statements, instead of `n`
//! row-by-row statements, with the same result (rows are still written in
//! `seq` order). A single row that fails becomes a [`RowFailure`]. Any other
//! error (connection lost, missing column, ...) fails the whole write.

use koan_protocol::events::RowFailure;
use tokio_postgres::Client;

use crate::error::SourceError;
use crate::postgres::merge::{MergeSql, RowsFrom};
use crate::rows::sort_failures;

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

/// Runs `statement` (a [`MergeSql`] write statement over `rows`) on the rows
/// `seq` in `[lo, hi)`, isolating failing rows.
/// The client must be inside a transaction.
pub(crate) async fn write_rows(
    client: &Client,
    sql: &MergeSql,
    rows: RowsFrom<'_>,
    statement: &str,
    (lo, hi): (i64, i64),
    context: &str,
) -> Result<Written, SourceError> {
    let mut written = Written::default();
    let mut pending = vec![(lo, hi)];
    let mut isolating = false;
    while let Some((lo, hi)) = pending.pop() {
        execute(client, "SAVEPOINT koan_rows", context).await?;
        match client.query(statement, &[&lo, &hi]).await {
            Ok(result) => {
                execute(client, "RELEASE SAVEPOINT koan_rows", context).await?;
                for row in result {
                    let count: Option<i64> = row.try_get(6).map_err(|e| query(context, e))?;
                    if let Some(count) = count {
                        written.rows_written += u64::try_from(count).unwrap_or(0);
                        continue;
                    }
                    written
                        .failures
                        .push(conflict(&row).map_err(|e| query(context, e))?);
                }
            }
            Err(error) if is_row_error(&error) => {
                execute(
                    client,
                    "ROLLBACK TO SAVEPOINT koan_rows; RELEASE SAVEPOINT koan_rows",
                    context,
                )
                .await?;
                if hi - lo <= 1 {
                    written
                        .failures
                        .push(row_failure(client, sql, rows, lo, &error, context).await?);
                    continue;
                }
                if !isolating {
                    isolating = true;
                    tracing::info!(
                        context,
                        rows = hi - lo,
                        sqlstate = error.code().map(|state| state.code()).unwrap_or(""),
                        "set-based write failed, isolating the failing rows"
                    );
                    execute(client, &sql.index_statement(rows), context).await?;
                }
                let middle = lo + (hi - lo) / 2;
                // Popped in order: the lower half first, so rows keep their order.
                pending.push((middle, hi));
                pending.push((lo, middle));
            }
            Err(error) => return Err(query(context, error)),
        }
    }
    sort_failures(&mut written.failures);
    Ok(written)
}

/// Errors that belong to rows rather than to the statement: class 22 (data
/// exception: bad key, invalid JSON, type mismatch), 23 (integrity), and
/// `21000` (one statement updating a row twice: two lines whose keys differ as
/// text but not as values, `1` and `01`; split up, they apply in order).
pub(crate) fn is_row_error(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        code.starts_with("22") || code.starts_with("23") || code == "21000"
    })
}

/// One row that failed alone: its key, line and why.
async fn row_failure(
    client: &Client,
    sql: &MergeSql,
    rows: RowsFrom<'_>,
    seq: i64,
    error: &tokio_postgres::Error,
    context: &str,
) -> Result<RowFailure, SourceError> {
    let row = client
        .query_opt(&sql.row_statement(rows), &[&seq])
        .await
        .map_err(|e| query(context, e))?;
    let field = |index: usize| -> Result<Option<String>, SourceError> {
        match &row {
            Some(row) => row.try_get(index).map_err(|e| query(context, e)),
            None => Ok(None),
        }
    };
    let line_no: Option<i64> = match &row {
        Some(row) => row.try_get(1).map_err(|e| query(context, e))?,
        None => None,
    };
    let integrity = error
        .as_db_error()
        .is_some_and(|db| db.code().code().starts_with("23"));
    let code = if integrity {
        "constraint_violation"
    } else {
        classify_data_error(client, sql, rows, seq, context).await?
    };
    Ok(RowFailure {
        key: field(0)?,
        part: field(2)?,
        line_no: line_no.and_then(|line| u64::try_from(line).ok()),
        code: code.to_string(),
        reason: row_reason(error),
        line: field(3)?.unwrap_or_default(),
    })
}

/// A data error is `invalid_document` when the document is not JSON (or not
/// an object where one is needed), else `type_mismatch` (key, version, column).
async fn classify_data_error(
    client: &Client,
    sql: &MergeSql,
    rows: RowsFrom<'_>,
    seq: i64,
    context: &str,
) -> Result<&'static str, SourceError> {
    execute(client, "SAVEPOINT koan_probe", context).await?;
    match client.query_opt(&sql.document_probe(rows), &[&seq]).await {
        Ok(row) => {
            execute(client, "RELEASE SAVEPOINT koan_probe", context).await?;
            let kind: Option<String> = match row {
                Some(row) => row.try_get(0).map_err(|e| query(context, e))?,
                None => None,
            };
            if sql.needs_object_documents() && kind.as_deref() != Some("object") {
                Ok("invalid_document")
            } else {
                Ok("type_mismatch")
            }
        }
        Err(error) if is_row_error(&error) => {
            execute(
                client,
                "ROLLBACK TO SAVEPOINT koan_probe; RELEASE SAVEPOINT koan_probe",
                context,
            )
            .await?;
            Ok("invalid_document")
        }
        Err(error) => Err(query(context, error)),
    }
}

/// A row whose key exists in the target under another scope: never written.
fn conflict(row: &tokio_postgres::Row) -> Result<RowFailure, tokio_postgres::Error> {
    let key: Option<String> = row.try_get(1)?;
    let line_no: Option<i64> = row.try_get(2)?;
    let found: Option<String> = row.try_get(5)?;
    let owner = match &found {
        Some(scope) => format!("scope '{}'", scope.escape_default()),
        None => "no scope".to_string(),
    };
    Ok(RowFailure {
        reason: format!(
            "key {} already exists in the target and belongs to {owner}; \
             a restore never modifies another scope's row",
            key.as_deref().unwrap_or("?").escape_default()
        ),
        key,
        part: row.try_get(3)?,
        line_no: line_no.and_then(|line| u64::try_from(line).ok()),
        code: "scope_conflict".into(),
        line: row.try_get::<_, Option<String>>(4)?.unwrap_or_default(),
    })
}

/// The server's message, naming the constraint, with the detail unless it
/// only repeats the row (the raw line is kept separately).
pub(crate) fn row_reason(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        return error.to_string();
    };
    let mut reason = format!("{} {}", db.code().code(), db.message());
    if let Some(constraint) = db.constraint()
        && !db.message().contains(constraint)
    {
        reason.push_str(&format!(" (constraint {constraint})"));
    }
    if let Some(detail) = db.detail()
        && !detail.starts_with("Failing row contains")
    {
        reason.push_str(&format!(" (detail: {detail})"));
    }
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

async fn execute(client: &Client, statement: &str, context: &str) -> Result<(), SourceError> {
    client
        .batch_execute(statement)
        .await
        .map_err(|error| query(context, error))
}

fn query(context: &str, error: tokio_postgres::Error) -> SourceError {
    SourceError::query(context, error)
}
