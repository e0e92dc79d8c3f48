//! Restore diagnostics: rows a restore could not write, recorded with their
//! raw line, listed in id order, and resolved by replays.

use uuid::Uuid;

use koan_protocol::commands::RowDiagnostic;
use koan_protocol::events::RowFailure;

use crate::error::CoordinatorError;

use super::db::{Db, get, micros, text, uint};

/// Records `failures` of `entity` as unresolved diagnostics of the restore, in order.
pub(super) fn record_failures(
    db: &Db<'_>,
    restore_id: Uuid,
    entity: &str,
    failures: &[RowFailure],
) -> Result<(), CoordinatorError> {
    let restore_id = text(restore_id);
    for failure in failures {
        db.execute(
            "record diagnostic",
            "INSERT INTO restore_diagnostics (operation_id, entity, key, part, line_no, code,
                 reason, line, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
            (
                &restore_id,
                entity,
                &failure.key,
                &failure.part,
                failure
                    .line_no
                    .map(|line| i64::try_from(line).unwrap_or(i64::MAX)),
                &failure.code,
                &failure.reason,
                &failure.line,
                micros(db.now),
            ),
        )?;
    }
    Ok(())
}

/// The diagnostics of a restore in id order (unresolved only unless
/// `include_resolved`), at most `limit` of them.
pub(super) fn list(
    db: &Db<'_>,
    restore_id: Uuid,
    include_resolved: bool,
    limit: u32,
) -> Result<Vec<RowDiagnostic>, CoordinatorError> {
    db.query(
        "list diagnostics",
        "SELECT id, entity, key, part, line_no, code, reason, line, resolved
         FROM restore_diagnostics
         WHERE operation_id = ?1 AND (?2 OR resolved = 0)
         ORDER BY id LIMIT ?3",
        (text(restore_id), include_resolved, i64::from(limit)),
        |row| {
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
        },
    )
}
