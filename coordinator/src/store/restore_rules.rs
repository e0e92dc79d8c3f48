//! Decisions every state store backend shares for restores, replays and
//! verifies: which jobs go to which pool, how a planned restore is checked,
//! how failed rows are batched for a replay, and how failures are worded.

use std::collections::BTreeSet;

use uuid::Uuid;

use koan_protocol::archive::PartInfo;
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::RestorePlanned;
use koan_protocol::jobs::{
    ApplyRestore, ImportPart, Job, PlanRestore, ReplayJob, ReplayLine, RestoreTarget, VerifyJob,
};
use koan_protocol::names::check_ident;
use koan_protocol::plan::EntitySpec;
use koan_protocol::progress::OperationState;

use crate::error::CoordinatorError;
use crate::store::rules::QueuedMessage;
use crate::store::{BackupSource, OperationRecord, OperationRole};

/// Most lines one `replay_rows` job carries.
pub const REPLAY_BATCH_LINES: usize = 500;
/// Most bytes of lines one `replay_rows` job carries (a batch holds at least one line).
pub const REPLAY_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Problems quoted in a failed verify's error (the report lists them all).
pub const QUOTED_PROBLEMS: usize = 3;

/// The pool a job of a restore goes to: the restore's pool when it names one,
/// else the entity's.
pub fn restore_pool<'a>(pool: Option<&'a str>, entity: &'a EntitySpec) -> &'a str {
    pool.unwrap_or(&entity.pool)
}

/// The mode a replay writes with: `replace` replays as `overwrite` (the swap is done).
pub fn replay_mode(mode: RestoreMode) -> RestoreMode {
    match mode {
        RestoreMode::Replace => RestoreMode::Overwrite,
        other => other,
    }
}

/// The `plan_restore` job of a new restore, to its pool or the backup's first entity's.
pub fn plan_restore_job(
    operation_id: Uuid,
    backup: &BackupSource,
    mode: RestoreMode,
    filter: &[String],
    target_scope: Option<&str>,
    pool: Option<&str>,
) -> Result<QueuedMessage, CoordinatorError> {
    let manifest_path = backup.manifest.clone().ok_or_else(|| {
        CoordinatorError::corrupt("backup", format!("{} has no manifest", backup.backup_id))
    })?;
    let job = Job::PlanRestore(PlanRestore {
        operation_id,
        backup_id: backup.backup_id,
        manifest_path,
        mode,
        entities: filter.to_vec(),
        target_scope: target_scope.map(str::to_string),
    });
    QueuedMessage::job(pool.unwrap_or(backup.first_pool()), &job)
}

/// The `verify_backup` job of a new verify, to the backup's first entity's pool.
pub fn verify_job(
    operation_id: Uuid,
    backup: &BackupSource,
) -> Result<QueuedMessage, CoordinatorError> {
    let manifest_path = backup.manifest.clone().ok_or_else(|| {
        CoordinatorError::corrupt("backup", format!("{} has no manifest", backup.backup_id))
    })?;
    let job = Job::Verify(VerifyJob {
        operation_id,
        backup_id: backup.backup_id,
        manifest_path,
    });
    QueuedMessage::job(backup.first_pool(), &job)
}

/// The mode of the restore operation `record` (every restore has one).
pub fn restore_mode(record: &OperationRecord) -> Result<RestoreMode, CoordinatorError> {
    record
        .mode
        .ok_or_else(|| CoordinatorError::corrupt("restore", "no mode"))
}

/// What every job of one restore shares.
#[derive(Debug, Clone, Copy)]
pub struct RestoreContext<'a> {
    /// The restore operation.
    pub operation_id: Uuid,
    /// Reconciliation mode.
    pub mode: RestoreMode,
    /// Scope rows are re-stamped with.
    pub target_scope: Option<&'a str>,
    /// The restore's pool, overriding each entity's.
    pub pool: Option<&'a str>,
}

impl<'a> RestoreContext<'a> {
    /// The context of the restore operation `record`.
    pub fn of(record: &'a OperationRecord) -> Result<Self, CoordinatorError> {
        Ok(Self {
            operation_id: record.id,
            mode: restore_mode(record)?,
            target_scope: record.target_scope.as_deref(),
            pool: record.pool.as_deref(),
        })
    }

    fn target(&self, staging_table: Option<&str>) -> RestoreTarget {
        RestoreTarget {
            mode: self.mode,
            target_scope: self.target_scope.map(str::to_string),
            staging_table: staging_table.map(str::to_string),
        }
    }
}

/// The `import_part` job of one unit.
pub fn import_job(
    context: &RestoreContext<'_>,
    entity: &EntitySpec,
    staging_table: Option<&str>,
    unit: u32,
    chunk: u32,
    part: &PartInfo,
) -> Result<QueuedMessage, CoordinatorError> {
    let job = Job::ImportPart(ImportPart {
        operation_id: context.operation_id,
        entity: entity.clone(),
        target: context.target(staging_table),
        unit,
        chunk,
        part: part.clone(),
    });
    QueuedMessage::job(restore_pool(context.pool, entity), &job)
}

/// The `apply_restore` job of one entity (`replace` mode).
pub fn apply_job(
    context: &RestoreContext<'_>,
    entity: &EntitySpec,
    staging_table: Option<&str>,
) -> Result<QueuedMessage, CoordinatorError> {
    let job = Job::ApplyRestore(ApplyRestore {
        operation_id: context.operation_id,
        entity: entity.clone(),
        target: context.target(staging_table),
    });
    QueuedMessage::job(restore_pool(context.pool, entity), &job)
}

/// The `replay_rows` job of one batch; `context.mode` is the replay's mode already.
pub fn replay_job(
    context: &RestoreContext<'_>,
    restore_id: Uuid,
    entity: &EntitySpec,
    lines: Vec<ReplayLine>,
) -> Result<QueuedMessage, CoordinatorError> {
    let job = Job::Replay(ReplayJob {
        operation_id: context.operation_id,
        restore_id,
        entity: entity.clone(),
        target: context.target(None),
        lines,
    });
    QueuedMessage::job(restore_pool(context.pool, entity), &job)
}

/// An unresolved diagnostic to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRow {
    /// The diagnostic.
    pub diagnostic_id: i64,
    /// Its entity.
    pub entity: String,
    /// The raw archive line.
    pub line: String,
}

/// One `replay_rows` job's worth of lines, all of one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayBatch {
    /// Batch number within the replay, from 0.
    pub batch: u32,
    /// The entity.
    pub entity: String,
    /// The lines, in diagnostic order.
    pub lines: Vec<ReplayLine>,
}

/// Groups `rows` (ordered by entity, then id) into batches of one entity, of
/// at most [`REPLAY_BATCH_LINES`] lines and [`REPLAY_BATCH_BYTES`] bytes.
pub fn replay_batches(rows: Vec<PendingRow>) -> Vec<ReplayBatch> {
    let mut batches: Vec<ReplayBatch> = Vec::new();
    let mut bytes = 0usize;
    for row in rows {
        let fits = batches.last().is_some_and(|batch| {
            batch.entity == row.entity
                && batch.lines.len() < REPLAY_BATCH_LINES
                && bytes.saturating_add(row.line.len()) <= REPLAY_BATCH_BYTES
        });
        if !fits {
            let batch = u32::try_from(batches.len()).unwrap_or(u32::MAX);
            batches.push(ReplayBatch {
                batch,
                entity: row.entity,
                lines: Vec::new(),
            });
            bytes = 0;
        }
        bytes = bytes.saturating_add(row.line.len());
        if let Some(batch) = batches.last_mut() {
            batch.lines.push(ReplayLine {
                diagnostic_id: row.diagnostic_id,
                line: row.line,
            });
        }
    }
    batches
}

/// Checks a `restore_planned` report against the entities the restore
/// recorded: each recorded entity exactly once, and a valid staging table for
/// each in `replace` mode.
pub fn check_restore_plan(
    mode: RestoreMode,
    recorded: &[String],
    planned: &RestorePlanned,
) -> Result<(), CoordinatorError> {
    let invalid = |reason: String| {
        CoordinatorError::InvalidReport(format!(
            "restore_planned of operation {}: {reason}",
            planned.operation_id
        ))
    };
    let mut seen = BTreeSet::new();
    for entity in &planned.entities {
        let name = entity.spec.name.as_str();
        if !recorded.iter().any(|known| known == name) {
            return Err(invalid(format!(
                "entity '{}' is not restored by this operation",
                name.escape_default()
            )));
        }
        if !seen.insert(name) {
            return Err(invalid(format!("entity '{name}' is planned twice")));
        }
        match (&entity.staging_table, mode) {
            (Some(table), _) => check_ident("staging_table", table)
                .map_err(|error| invalid(format!("entity '{name}': {error}")))?,
            (None, RestoreMode::Replace) => {
                return Err(invalid(format!(
                    "entity '{name}' has no staging table in replace mode"
                )));
            }
            (None, _) => {}
        }
        if u32::try_from(entity.parts.len()).is_err() {
            return Err(invalid(format!("entity '{name}' has too many parts")));
        }
    }
    if let Some(missing) = recorded.iter().find(|name| !seen.contains(name.as_str())) {
        return Err(invalid(format!("entity '{missing}' is missing")));
    }
    Ok(())
}

/// Whether a replay of an operation may start; `Err` carries the refusal code and message.
pub fn check_replay(
    restore_id: Uuid,
    role: OperationRole,
    state: OperationState,
    unresolved: u64,
) -> Result<(), (&'static str, String)> {
    if role != OperationRole::Restore {
        return Err((
            "not_a_restore",
            format!(
                "operation {restore_id} is a {}, not a restore",
                role.as_str()
            ),
        ));
    }
    if !state.is_terminal() {
        return Err((
            "restore_running",
            format!(
                "restore {restore_id} is {}: replay its failed rows once it has ended",
                state.as_str()
            ),
        ));
    }
    if unresolved == 0 {
        return Err((
            "nothing_to_replay",
            format!("restore {restore_id} has no unresolved failed rows"),
        ));
    }
    Ok(())
}

/// Error text of a restore failed by one part.
pub fn import_failure(entity: &str, chunk: u32, part: u32, code: &str, error: &str) -> String {
    format!("entity '{entity}' chunk {chunk} part {part}: {error} ({code})")
}

/// Error text of an operation a worker failed as a whole.
pub fn operation_failure(code: &str, error: &str) -> String {
    format!("{error} ({code})")
}

/// Error text of a verify that found problems: "N of M parts are bad: ...".
pub fn verify_failure(problems: &[String], parts: u64) -> String {
    let bad = u64::try_from(problems.len()).unwrap_or(u64::MAX);
    let quoted: Vec<&str> = problems
        .iter()
        .take(QUOTED_PROBLEMS)
        .map(String::as_str)
        .collect();
    let mut error = format!(
        "{bad} of {} parts are bad: {}",
        parts.max(bad),
        quoted.join("; ")
    );
    if problems.len() > QUOTED_PROBLEMS {
        error.push_str(&format!(" (and {} more)", problems.len() - QUOTED_PROBLEMS));
    }
    error
}

#[cfg(test)]
mod tests {
    use super::*;
    use koan_protocol::events::{RestoreEntity, RestorePart};
    use koan_protocol::plan::{BackupEntity, BackupPlan};

    fn row(id: i64, entity: &str, bytes: usize) -> PendingRow {
        PendingRow {
            diagnostic_id: id,
            entity: entity.into(),
            line: "x".repeat(bytes),
        }
    }

    #[test]
    fn replay_batches_hold_one_entity_and_at_most_500_lines() {
        let mut rows: Vec<_> = (0..1_001).map(|id| row(id, "orders", 10)).collect();
        rows.extend((2_000..2_003).map(|id| row(id, "invoices", 10)));
        let batches = replay_batches(rows);
        let shape: Vec<_> = batches
            .iter()
            .map(|batch| (batch.batch, batch.entity.as_str(), batch.lines.len()))
            .collect();
        assert_eq!(
            shape,
            [
                (0, "orders", 500),
                (1, "orders", 500),
                (2, "orders", 1),
                (3, "invoices", 3)
            ]
        );
        assert_eq!(batches[1].lines[0].diagnostic_id, 500);
        assert!(replay_batches(Vec::new()).is_empty());
    }

    #[test]
    fn replay_batches_are_bounded_in_bytes() {
        let big = REPLAY_BATCH_BYTES / 2 + 1;
        let rows = vec![
            row(1, "e", big),
            row(2, "e", big),
            row(3, "e", REPLAY_BATCH_BYTES * 2),
        ];
        let sizes: Vec<_> = replay_batches(rows)
            .iter()
            .map(|batch| batch.lines.len())
            .collect();
        assert_eq!(
            sizes,
            [1, 1, 1],
            "an oversize line still gets its own batch"
        );
    }

    #[test]
    fn replace_replays_as_overwrite() {
        assert_eq!(replay_mode(RestoreMode::Replace), RestoreMode::Overwrite);
        assert_eq!(replay_mode(RestoreMode::Merge), RestoreMode::Merge);
        assert_eq!(
            replay_mode(RestoreMode::SkipExisting),
            RestoreMode::SkipExisting
        );
    }

    #[test]
    fn verify_failures_quote_the_first_problems() {
        let problems: Vec<String> = (1..=5).map(|n| format!("part p{n}: hash")).collect();
        let error = verify_failure(&problems, 40);
        assert!(
            error.starts_with("5 of 40 parts are bad: part p1: hash; part p2"),
            "{error}"
        );
        assert!(error.ends_with("(and 2 more)"), "{error}");
        assert!(!error.contains("p4"), "{error}");
        assert_eq!(
            verify_failure(&problems[..1], 0),
            "1 of 1 parts are bad: part p1: hash"
        );
    }

    #[test]
    fn replays_need_a_finished_restore_with_unresolved_rows() {
        let id = Uuid::nil();
        use OperationState::*;
        assert!(check_replay(id, OperationRole::Restore, Completed, 2).is_ok());
        assert!(check_replay(id, OperationRole::Restore, Failed, 2).is_ok());
        let codes: Vec<_> = [
            check_replay(id, OperationRole::Backup, Completed, 2),
            check_replay(id, OperationRole::Replay, Completed, 2),
            check_replay(id, OperationRole::Restore, Running, 2),
            check_replay(id, OperationRole::Restore, Completed, 0),
        ]
        .into_iter()
        .map(|outcome| outcome.unwrap_err().0)
        .collect();
        assert_eq!(
            codes,
            [
                "not_a_restore",
                "not_a_restore",
                "restore_running",
                "nothing_to_replay"
            ]
        );
    }

    #[test]
    fn planned_restores_must_match_the_recorded_entities() {
        let spec = |name: &str| {
            BackupPlan::new("p")
                .entity(BackupEntity::new(name, "T"))
                .entity_specs()
                .remove(0)
        };
        let entity = |name: &str, staging: Option<&str>| RestoreEntity {
            spec: spec(name),
            staging_table: staging.map(str::to_string),
            parts: vec![RestorePart {
                chunk: 0,
                part: PartInfo {
                    part: 0,
                    path: "p".into(),
                    first_key: None,
                    last_key: None,
                    rows: 1,
                    raw_bytes: 1,
                    compressed_bytes: 1,
                    blake3: String::new(),
                },
            }],
        };
        let planned = |entities| RestorePlanned {
            operation_id: Uuid::nil(),
            entities,
        };
        let recorded = vec!["a".to_string(), "b".to_string()];
        let good = planned(vec![entity("a", None), entity("b", None)]);
        check_restore_plan(RestoreMode::Merge, &recorded, &good).unwrap();
        let error = check_restore_plan(RestoreMode::Replace, &recorded, &good).unwrap_err();
        assert!(error.to_string().contains("staging table"), "{error}");
        let staged = planned(vec![
            entity("a", Some("koan_stage_a")),
            entity("b", Some("koan_stage_b")),
        ]);
        check_restore_plan(RestoreMode::Replace, &recorded, &staged).unwrap();
        for (bad, names) in [
            (planned(vec![entity("a", None)]), "'b' is missing"),
            (planned(vec![entity("a", None), entity("a", None)]), "twice"),
            (
                planned(vec![entity("a", None), entity("c", None)]),
                "'c' is not restored",
            ),
            (
                planned(vec![
                    entity("a", Some("x\"; drop table t")),
                    entity("b", None),
                ]),
                "staging_table",
            ),
        ] {
            let error = check_restore_plan(RestoreMode::Merge, &recorded, &bad).unwrap_err();
            assert_eq!(error.code(), "invalid_report");
            assert!(error.to_string().contains(names), "{error}");
        }
    }
}
