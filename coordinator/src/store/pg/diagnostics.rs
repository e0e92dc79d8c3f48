//! Restore diagnostics: rows a restore could not write, recorded with their
//! raw line, listed in id order, and resolved by replays.

use uuid::Uuid;

use koan_protocol::commands::RowDiagnostic;
use koan_protocol::events::RowFailure;

use crate::error::CoordinatorError;

use super::PgStateStore;
use super::db::{Db, get, uint};

/// Rows inserted by one statement.
const RECORD_BATCH: usize = 1_000;

/// Records `failures` of `entity` as unresolved diagnostics of the restore.
pub(super) async fn record_failures(
    db: &Db<'_>,
    restore_id: Uuid,
    entity: &str,
    failures: &[RowFailure],
) -> Result<(), CoordinatorError> {
    for batch in failures.chunks(RECORD_BATCH) {
        let keys: Vec<Option<&str>> = batch.iter().map(|row| row.key.as_deref()).collect();
        let parts: Vec<Option<&str>> = batch.iter().map(|row| row.part.as_deref()).collect();
        let line_numbers: Vec<Option<i64>> = batch
            .iter()
            .map(|row| {
                row.line_no
                    .map(|line| i64::try_from(line).unwrap_or(i64::MAX))
            })
            .collect();
        let codes: Vec<&str> = batch.iter().map(|row| row.code.as_str()).collect();
        let reasons: Vec<&str> = batch.iter().map(|row| row.reason.as_str()).collect();
        let lines: Vec<&str> = batch.iter().map(|row| row.line.as_str()).collect();
        db.execute(
            "record diagnostics",
            "INSERT INTO {s}.restore_diagnostics (operation_id, entity, key, part, line_no, code,
                 reason, line, created_at, updated_at)
             SELECT $1, $2, key, part, line_no, code, reason, line, $9, $9
             FROM unnest($3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[])
                  WITH ORDINALITY AS failed(key, part, line_no, code, reason, line, position)
             ORDER BY position",
            &[
                &restore_id,
                &entity,
                &keys,
                &parts,
                &line_numbers,
                &codes,
                &reasons,
                &lines,
                &db.now,
            ],
        )
        .await?;
    }
    Ok(())
}

pub(super) async fn list(
    store: &PgStateStore,
    restore_id: Uuid,
    include_resolved: bool,
    limit: u32,
) -> Result<Vec<RowDiagnostic>, CoordinatorError> {
    let mut client = store.client().await?;
    let db = Db::begin_read(&mut client, store).await?;
    let rows = db
        .query(
            "list diagnostics",
            "SELECT id, entity, key, part, line_no, code, reason, line, resolved
             FROM {s}.restore_diagnostics
             WHERE operation_id = $1 AND ($2 OR NOT resolved)
             ORDER BY id LIMIT $3",
            &[&restore_id, &include_resolved, &i64::from(limit)],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(RowDiagnostic {
                id: get(row, "id")?,
                entity: get(row, "entity")?,
                failure: RowFailure {
                    key: get(row, "key")?,
                    part: get(row, "part")?,
                    line_no: get::<Option<i64>>(row, "line_no")?.map(uint),
                    code: get(row, "code")?,
                    reason: get(row, "reason")?,
                    line: get(row, "line")?,
                },
                resolved: get(row, "resolved")?,
            })
        })
        .collect()
}
