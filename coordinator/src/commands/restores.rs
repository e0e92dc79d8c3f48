//! Restore commands: `start_restore`, `verify`, `diagnostics` and `replay`.
//!
//! Restores and verifies read a backup this coordinator completed (its plan,
//! entities and manifest are in the state store); anything else is refused
//! `unknown_backup`. A restore into another scope than the backup's needs the
//! target scope named explicitly (tenant isolation), else `cross_scope`.

use tracing::{Instrument, info, warn};
use uuid::Uuid;

use koan_protocol::commands::{
    Diagnostics, DiagnosticsQuery, ReplayRows, Reply, RestoreMode, RowDiagnostic, StartRestore,
    VerifyBackup,
};
use koan_protocol::names::check_name;
use koan_protocol::plan::EntitySpec;

use crate::error::CoordinatorError;
use crate::store::{
    BackupSource, NewReplay, NewRestore, NewVerify, OperationRole, ReplaySubmission, StateStore,
};

use super::{
    Answer, Commands, accepted, check_description, check_labels, record_operation_span, refuse,
};

/// Most diagnostics one `diagnostics` reply lists.
pub const MAX_DIAGNOSTICS_LISTED: u32 = 10_000;
/// Most bytes of lines, reasons and keys one `diagnostics` reply carries
/// (the reply must stay well below the broker's message size limit).
pub const MAX_DIAGNOSTICS_BYTES: usize = 8 * 1024 * 1024;
/// Longest raw line quoted in a `diagnostics` reply (a replay uses the stored line, whole).
pub const MAX_LISTED_LINE: usize = 16 * 1024;

impl<S: StateStore> Commands<S> {
    pub(super) async fn start_restore(
        &self,
        start: StartRestore,
        message_id: Option<&str>,
    ) -> Result<Answer, CoordinatorError> {
        if let Some(existing) = self
            .store
            .find_submission(start.operation_id, message_id)
            .await?
        {
            info!(operation_id = %existing, "restore submitted again");
            return Ok(accepted(existing, true, Vec::new()));
        }
        let backup = match self.completed_backup(start.backup_id).await? {
            Ok(backup) => backup,
            Err(refusal) => return Ok(refusal),
        };
        for (field, value) in [
            ("scope", &start.scope),
            ("target_scope", &start.target_scope),
            ("pool", &start.pool),
        ] {
            if let Some(value) = value
                && let Err(error) = check_name(field, value)
            {
                return Ok(refuse(error.code(), error.to_string()));
            }
        }
        if let Err(error) = check_labels(&start.labels) {
            return Ok(refuse("invalid_labels", error));
        }
        if let Err(error) = check_description(start.description.as_deref()) {
            return Ok(refuse("invalid_command", error));
        }
        let entities = match select_entities(&backup, &start.entities) {
            Ok(entities) => entities,
            Err(error) => return Ok(refuse("unknown_entity", error)),
        };
        if let Err(error) = check_scope(
            backup.backup_id,
            &entities,
            start.scope.as_deref(),
            start.target_scope.as_deref(),
        ) {
            return Ok(refuse("cross_scope", error));
        }
        let warnings = restore_warnings(start.mode, &entities, start.target_scope.as_deref());
        let operation_id = start.operation_id.unwrap_or_else(Uuid::now_v7);
        // The planning worker gets the selection without duplicates, in plan order.
        let filter = if start.entities.is_empty() {
            Vec::new()
        } else {
            entities.iter().map(|entity| entity.name.clone()).collect()
        };
        let submitted = self
            .store
            .submit_restore(&NewRestore {
                operation_id,
                command_id: message_id.map(str::to_string),
                backup,
                mode: start.mode,
                filter,
                entities,
                target_scope: start.target_scope,
                pool: start.pool,
                labels: start.labels,
                description: start.description,
                trace: koan_telemetry::current(),
            })
            .instrument(record_operation_span(operation_id))
            .await?;
        info!(operation_id = %submitted.operation_id, backup_id = %start.backup_id,
            mode = start.mode.as_str(), existing = submitted.existing, "restore accepted");
        Ok(accepted(
            submitted.operation_id,
            submitted.existing,
            warnings,
        ))
    }

    pub(super) async fn verify(
        &self,
        verify: VerifyBackup,
        message_id: Option<&str>,
    ) -> Result<Answer, CoordinatorError> {
        if let Some(existing) = self
            .store
            .find_submission(verify.operation_id, message_id)
            .await?
        {
            info!(operation_id = %existing, "verify submitted again");
            return Ok(accepted(existing, true, Vec::new()));
        }
        let backup = match self.completed_backup(verify.backup_id).await? {
            Ok(backup) => backup,
            Err(refusal) => return Ok(refusal),
        };
        let operation_id = verify.operation_id.unwrap_or_else(Uuid::now_v7);
        let submitted = self
            .store
            .submit_verify(&NewVerify {
                operation_id,
                command_id: message_id.map(str::to_string),
                backup,
                trace: koan_telemetry::current(),
            })
            .instrument(record_operation_span(operation_id))
            .await?;
        info!(operation_id = %submitted.operation_id, backup_id = %verify.backup_id,
            existing = submitted.existing, "verify accepted");
        Ok(accepted(
            submitted.operation_id,
            submitted.existing,
            Vec::new(),
        ))
    }

    pub(super) async fn diagnostics(
        &self,
        query: DiagnosticsQuery,
    ) -> Result<Answer, CoordinatorError> {
        let restore_id = match self.restore_of(query.operation_id).await? {
            Ok(restore_id) => restore_id,
            Err(refusal) => return Ok(refusal),
        };
        let rows = self
            .store
            .diagnostics(restore_id, query.include_resolved, MAX_DIAGNOSTICS_LISTED)
            .await?;
        let found = rows.len();
        let rows = fit_listing(rows);
        if rows.len() < found || found >= MAX_DIAGNOSTICS_LISTED as usize {
            warn!(operation_id = %restore_id, listed = rows.len(), "diagnostics listing cut to fit one reply");
        }
        Ok(Answer::reply(Reply::Diagnostics(Diagnostics {
            operation_id: restore_id,
            rows,
        })))
    }

    pub(super) async fn replay(
        &self,
        replay: ReplayRows,
        message_id: Option<&str>,
    ) -> Result<Answer, CoordinatorError> {
        if let Some(existing) = self
            .store
            .find_submission(replay.replay_id, message_id)
            .await?
        {
            info!(operation_id = %existing, "replay submitted again");
            return Ok(accepted(existing, true, Vec::new()));
        }
        let restore_id = match self.restore_of(replay.operation_id).await? {
            Ok(restore_id) => restore_id,
            Err(refusal) => return Ok(refusal),
        };
        let operation_id = replay.replay_id.unwrap_or_else(Uuid::now_v7);
        let submission = self
            .store
            .submit_replay(&NewReplay {
                operation_id,
                command_id: message_id.map(str::to_string),
                restore_id,
                trace: koan_telemetry::current(),
            })
            .instrument(record_operation_span(operation_id))
            .await?;
        match submission {
            ReplaySubmission::Submitted(submitted) => {
                info!(operation_id = %submitted.operation_id, %restore_id,
                    existing = submitted.existing, "replay accepted");
                Ok(accepted(
                    submitted.operation_id,
                    submitted.existing,
                    Vec::new(),
                ))
            }
            ReplaySubmission::Refused { code, error } => Ok(refuse(code, error)),
        }
    }

    /// The backup `backup_id` if this coordinator completed it; else the refusal.
    async fn completed_backup(
        &self,
        backup_id: Uuid,
    ) -> Result<Result<BackupSource, Answer>, CoordinatorError> {
        let refusal = match self.store.backup_source(backup_id).await? {
            Some(backup) if backup.is_complete() => return Ok(Ok(backup)),
            Some(backup) => format!(
                "backup {backup_id} is not complete (it is {})",
                backup.state.as_str()
            ),
            None => format!("no backup {backup_id} is known to this coordinator"),
        };
        Ok(Err(refuse("unknown_backup", refusal)))
    }

    /// The restore owning the diagnostics of `operation_id`: itself, or the
    /// restore a replay replays; else the refusal.
    async fn restore_of(
        &self,
        operation_id: Uuid,
    ) -> Result<Result<Uuid, Answer>, CoordinatorError> {
        let Some(operation) = self.store.operation(operation_id).await? else {
            let error = format!("no operation {operation_id}");
            return Ok(Err(refuse("unknown_operation", error)));
        };
        match (operation.role, operation.source_operation) {
            (OperationRole::Restore, _) => Ok(Ok(operation.id)),
            (OperationRole::Replay, Some(restore_id)) => Ok(Ok(restore_id)),
            (role, _) => Ok(Err(refuse(
                "not_a_restore",
                format!(
                    "operation {operation_id} is a {}, not a restore",
                    role.as_str()
                ),
            ))),
        }
    }
}

/// The entities a restore selects, in plan order: every entity of the backup
/// when `filter` is empty; a name the backup does not hold is an error naming it.
fn select_entities(backup: &BackupSource, filter: &[String]) -> Result<Vec<EntitySpec>, String> {
    if let Some(unknown) = filter
        .iter()
        .find(|name| !backup.entities.iter().any(|entity| &entity.name == *name))
    {
        let held: Vec<&str> = backup
            .entities
            .iter()
            .map(|entity| entity.name.as_str())
            .collect();
        return Err(format!(
            "backup {} has no entity '{}' (it holds {})",
            backup.backup_id,
            unknown.escape_default(),
            held.join(", ")
        ));
    }
    Ok(backup
        .entities
        .iter()
        .filter(|entity| filter.is_empty() || filter.contains(&entity.name))
        .cloned()
        .collect())
}

/// Tenant isolation: a restore acting for `scope` may only read a backup of
/// that scope, unless it names `scope` as its target explicitly; and it may
/// only write into its own scope.
fn check_scope(
    backup_id: Uuid,
    entities: &[EntitySpec],
    scope: Option<&str>,
    target_scope: Option<&str>,
) -> Result<(), String> {
    let Some(scope) = scope else {
        return Ok(());
    };
    match target_scope {
        Some(target) if target == scope => return Ok(()),
        Some(target) => {
            return Err(format!(
                "a restore acting for scope '{scope}' cannot write into scope '{target}'"
            ));
        }
        None => {}
    }
    for entity in entities {
        if entity.scope.as_deref() == Some(scope) {
            continue;
        }
        let held = match &entity.scope {
            Some(held) => format!("scope '{held}'"),
            None => format!("every scope (entity '{}' is unscoped)", entity.name),
        };
        return Err(format!(
            "backup {backup_id} holds {held}, not '{scope}'; pass --target-scope {scope} \
             to restore it into '{scope}'"
        ));
    }
    Ok(())
}

/// What the client should tell its user about a restore it submits.
fn restore_warnings(
    mode: RestoreMode,
    entities: &[EntitySpec],
    target_scope: Option<&str>,
) -> Vec<String> {
    let mut warnings = Vec::new();
    for entity in entities {
        if mode == RestoreMode::Merge && entity.version.is_none() {
            warnings.push(format!(
                "entity '{}' has no version: merge behaves as overwrite",
                entity.name
            ));
        }
        if let Some(target) = target_scope
            && entity.scope.is_none()
        {
            warnings.push(format!(
                "entity '{}' was backed up unscoped: every row is re-stamped with scope '{target}'",
                entity.name
            ));
        }
    }
    warnings
}

/// Cuts a listing to fit one reply: long lines are shortened (the stored line
/// stays whole for replays) and rows past the byte budget are left out.
fn fit_listing(rows: Vec<RowDiagnostic>) -> Vec<RowDiagnostic> {
    let mut budget = MAX_DIAGNOSTICS_BYTES;
    let mut listed = Vec::with_capacity(rows.len());
    for mut row in rows {
        let line = &mut row.failure.line;
        if line.len() > MAX_LISTED_LINE {
            let mut cut = MAX_LISTED_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            let total = line.len();
            line.truncate(cut);
            line.push_str(&format!("… ({total} bytes)"));
        }
        let size = row.failure.line.len()
            + row.failure.reason.len()
            + row.failure.key.as_ref().map_or(0, String::len)
            + row.failure.part.as_ref().map_or(0, String::len)
            + row.entity.len()
            + 64;
        let Some(left) = budget.checked_sub(size) else {
            break;
        };
        budget = left;
        listed.push(row);
    }
    listed
}

#[cfg(test)]
mod tests {
    use super::*;
    use koan_protocol::events::RowFailure;
    use koan_protocol::plan::{BackupEntity, BackupPlan};
    use koan_protocol::progress::OperationState;

    fn backup() -> BackupSource {
        let plan = BackupPlan::new("p")
            .entity(
                BackupEntity::new("orders", "Order")
                    .in_scope("orders", "tenant-a")
                    .version("$.version"),
            )
            .entity(BackupEntity::new("invoices", "Invoice").in_scope("invoices", "tenant-a"));
        BackupSource {
            operation_id: Uuid::nil(),
            backup_id: Uuid::nil(),
            state: OperationState::Completed,
            entities: plan.entity_specs(),
            plan,
            manifest: Some("m".into()),
        }
    }

    #[test]
    fn entities_are_selected_in_plan_order() {
        let backup = backup();
        let names = |filter: &[&str]| {
            let filter: Vec<String> = filter.iter().map(|name| name.to_string()).collect();
            select_entities(&backup, &filter).map(|entities| {
                entities
                    .into_iter()
                    .map(|entity| entity.name)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(names(&[]).unwrap(), ["orders", "invoices"]);
        assert_eq!(
            names(&["invoices", "orders"]).unwrap(),
            ["orders", "invoices"]
        );
        assert_eq!(names(&["invoices", "invoices"]).unwrap(), ["invoices"]);
        let error = names(&["orders", "payments"]).unwrap_err();
        assert!(error.contains("'payments'"), "{error}");
        assert!(error.contains("orders, invoices"), "{error}");
    }

    #[test]
    fn cross_scope_restores_need_the_target_named() {
        let entities = backup().entities;
        let id = Uuid::nil();
        check_scope(id, &entities, None, None).unwrap();
        check_scope(id, &entities, Some("tenant-a"), None).unwrap();
        check_scope(id, &entities, Some("tenant-b"), Some("tenant-b")).unwrap();
        let error = check_scope(id, &entities, Some("tenant-b"), None).unwrap_err();
        assert_eq!(
            error,
            format!(
                "backup {id} holds scope 'tenant-a', not 'tenant-b'; pass --target-scope \
                 tenant-b to restore it into 'tenant-b'"
            )
        );
        let error = check_scope(id, &entities, Some("tenant-a"), Some("tenant-c")).unwrap_err();
        assert!(
            error.contains("cannot write into scope 'tenant-c'"),
            "{error}"
        );
        let unscoped = BackupPlan::new("p")
            .entity(BackupEntity::new("orders", "Order"))
            .entity_specs();
        let error = check_scope(id, &unscoped, Some("tenant-a"), None).unwrap_err();
        assert!(error.contains("unscoped"), "{error}");
    }

    #[test]
    fn merge_without_version_is_announced() {
        let entities = backup().entities;
        assert!(restore_warnings(RestoreMode::Merge, &entities[..1], None).is_empty());
        assert_eq!(
            restore_warnings(RestoreMode::Merge, &entities, None),
            ["entity 'invoices' has no version: merge behaves as overwrite"]
        );
        assert!(restore_warnings(RestoreMode::Overwrite, &entities, None).is_empty());
        let unscoped = BackupPlan::new("p")
            .entity(BackupEntity::new("orders", "Order"))
            .entity_specs();
        let warnings = restore_warnings(RestoreMode::Replace, &unscoped, Some("t"));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("re-stamped with scope 't'"));
    }

    #[test]
    fn listings_fit_one_reply() {
        let row = |id: i64, line: String| RowDiagnostic {
            id,
            entity: "orders".into(),
            failure: RowFailure {
                key: Some("k".into()),
                part: None,
                line_no: Some(1),
                code: "unparsable_line".into(),
                reason: "expected value".into(),
                line,
            },
            resolved: false,
        };
        let long = "é".repeat(MAX_LISTED_LINE);
        let listed = fit_listing(vec![row(1, long.clone()), row(2, "{}".into())]);
        assert_eq!(listed.len(), 2);
        assert!(listed[0].failure.line.len() < MAX_LISTED_LINE + 32);
        assert!(
            listed[0]
                .failure
                .line
                .ends_with(&format!("({} bytes)", long.len()))
        );
        assert_eq!(listed[1].failure.line, "{}");
        let many: Vec<_> = (0..1_000)
            .map(|id| row(id, "x".repeat(MAX_LISTED_LINE)))
            .collect();
        let listed = fit_listing(many);
        assert!(
            listed.len() < 1_000 && listed.len() > 400,
            "{}",
            listed.len()
        );
    }
}
