//! Conformance checks for restores at the state store: units once, imports
//! once, diagnostics, `replace` mode's apply, failures, percent.

use koan_coordinator::store::{OperationRole, StateStore};
use koan_protocol::archive::manifest_path;
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::OperationEvent;
use koan_protocol::jobs::Job;
use koan_protocol::progress::{OperationKind, OperationState};

use super::*;

pub async fn restore_planned_twice_creates_units_once<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let backup_report = report(store, backup_id).await;
    assert_eq!(
        backup_report.mode, None,
        "backups leave restore fields default"
    );
    assert_eq!(backup_report.source_operation, None);
    assert_eq!(backup_report.rows_written, 0);

    let restore_id = restore(store, backup_id, RestoreMode::Overwrite, &[], None).await;
    let messages = drain(store, 100).await;
    let queued = jobs(&messages);
    assert_eq!(queued.len(), 1);
    let (pool, Job::PlanRestore(plan_job)) = &queued[0] else {
        panic!("expected plan_restore, got {queued:?}")
    };
    assert_eq!(pool, "default", "the backup's first entity's pool");
    assert_eq!(plan_job.operation_id, restore_id);
    assert_eq!(plan_job.backup_id, backup_id);
    assert_eq!(
        plan_job.manifest_path,
        manifest_path(&plan(), backup_id).unwrap()
    );
    assert_eq!(plan_job.mode, RestoreMode::Overwrite);
    assert!(plan_job.entities.is_empty());
    assert_eq!(plan_job.target_scope.as_deref(), Some("tenant-z"));
    let announced = events(&messages);
    assert_eq!(announced.len(), 1);
    let first = announced[0].report();
    assert_eq!(
        (first.kind, first.state, first.percent),
        (OperationKind::Restore, OperationState::Planning, 0.0)
    );
    assert_eq!(first.mode.as_deref(), Some("overwrite"));
    assert_eq!(first.source_operation, Some(backup_id));
    assert_eq!(first.backup_id, Some(backup_id));
    assert_eq!(first.plan_id, "orders:daily");
    let names: Vec<_> = first
        .entities
        .iter()
        .map(|e| (e.name.as_str(), e.state.as_str()))
        .collect();
    assert_eq!(names, [("orders", "planning"), ("invoices", "planning")]);
    let stored = store.operation(restore_id).await.unwrap().unwrap();
    assert_eq!(stored.role, OperationRole::Restore);
    assert_eq!(stored.target_scope.as_deref(), Some("tenant-z"));

    changes(
        store,
        restore_planned(restore_id, &[("orders", 3), ("invoices", 1)], false),
    )
    .await;
    ignored(
        store,
        restore_planned(restore_id, &[("orders", 5), ("invoices", 2)], false),
    )
    .await;
    let planned = report(store, restore_id).await;
    assert_eq!(planned.state, OperationState::Running);
    assert_eq!((planned.chunks_total, planned.rows_total), (4, 200));
    assert_eq!(
        (planned.chunks_done, planned.rows_done, planned.percent),
        (0, 0, 0.0)
    );
    let imports = jobs(&drain(store, 100).await);
    let shape: Vec<_> = imports
        .iter()
        .map(|(pool, job)| match job {
            Job::ImportPart(import) => (
                pool.as_str(),
                import.entity.name.as_str(),
                import.unit,
                import.chunk,
                import.part.path.clone(),
            ),
            other => panic!("expected import_part, got {other:?}"),
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("default", "orders", 0, 0, unit_path("orders", 0)),
            ("default", "orders", 1, 0, unit_path("orders", 1)),
            ("default", "orders", 2, 1, unit_path("orders", 2)),
            ("billing", "invoices", 0, 0, unit_path("invoices", 0)),
        ],
        "one import job per unit, once, to each entity's pool"
    );
    for (_, job) in &imports {
        let Job::ImportPart(import) = job else {
            unreachable!()
        };
        assert_eq!(import.operation_id, restore_id);
        assert_eq!(import.target.mode, RestoreMode::Overwrite);
        assert_eq!(import.target.target_scope.as_deref(), Some("tenant-z"));
        assert_eq!(import.target.staging_table, None);
        assert_eq!(import.entity.key_type, Some(KeyType::Text), "archived spec");
    }

    // A restore with a pool sends every job there; a plan naming an entity it
    // does not restore is refused.
    let only_orders = restore(
        store,
        backup_id,
        RestoreMode::Merge,
        &["orders"],
        Some("staging"),
    )
    .await;
    let queued = jobs(&drain(store, 100).await);
    let [(pool, Job::PlanRestore(plan_job))] = queued.as_slice() else {
        panic!("expected one plan_restore, got {queued:?}")
    };
    assert_eq!(pool, "staging");
    assert_eq!(plan_job.entities, ["orders"]);
    let error = store
        .apply(&restore_planned(
            only_orders,
            &[("orders", 1), ("invoices", 1)],
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    assert!(error.to_string().contains("invoices"), "{error}");
    changes(store, restore_planned(only_orders, &[("orders", 2)], false)).await;
    let queued = jobs(&drain(store, 100).await);
    assert_eq!(queued.len(), 2);
    assert!(queued.iter().all(|(pool, _)| pool == "staging"));
}

pub async fn part_imported_twice_counts_once<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let restore_id = restore(store, backup_id, RestoreMode::Overwrite, &[], None).await;
    changes(
        store,
        restore_planned(restore_id, &[("orders", 2), ("invoices", 1)], false),
    )
    .await;
    let failures = vec![
        row_failure("orders", "k1", "unparsable_line"),
        row_failure("orders", "k2", "constraint_violation"),
    ];
    changes(store, imported(restore_id, "orders", 0, 45, failures)).await;
    ignored(store, imported(restore_id, "orders", 0, 50, Vec::new())).await;
    let once = report(store, restore_id).await;
    assert_eq!(
        (
            once.rows_done,
            once.rows_written,
            once.rows_skipped,
            once.rows_failed
        ),
        (50, 45, 3, 2)
    );
    assert_eq!(
        (once.chunks_done, once.bytes_done, once.bytes_compressed),
        (1, 500, 150)
    );
    assert_eq!(once.percent, 33.0, "99 × 50 / 150");
    assert_eq!(once.entities[0].rows_done, 50);
    assert_eq!(
        store
            .diagnostics(restore_id, true, 100)
            .await
            .unwrap()
            .len(),
        2,
        "failures recorded once"
    );
    // A unit the plan does not have is refused.
    let error = store
        .apply(&imported(restore_id, "orders", 9, 50, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");

    changes(store, imported(restore_id, "invoices", 0, 50, Vec::new())).await;
    assert_eq!(report(store, restore_id).await.entities[1].state, "done");
    changes(store, imported(restore_id, "orders", 1, 50, Vec::new())).await;
    let completed = report(store, restore_id).await;
    assert_eq!(completed.state, OperationState::Completed);
    assert_eq!(completed.percent, 100.0);
    assert_eq!(
        (
            completed.rows_done,
            completed.rows_written,
            completed.rows_failed
        ),
        (150, 145, 2)
    );
    assert!(
        completed
            .entities
            .iter()
            .all(|entity| entity.state == "done")
    );
    ignored(store, imported(restore_id, "orders", 1, 50, Vec::new())).await;
    assert_events_monotonic_to_100(&drain(store, 1000).await);
}

pub async fn diagnostics_are_recorded_and_listed<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let restore_id = restore(store, backup_id, RestoreMode::Overwrite, &[], None).await;
    changes(
        store,
        restore_planned(restore_id, &[("orders", 1), ("invoices", 1)], false),
    )
    .await;
    let failures = ["a", "b", "c"]
        .iter()
        .map(|key| row_failure("orders", key, "unparsable_line"))
        .collect();
    changes(store, imported(restore_id, "orders", 0, 40, failures)).await;
    let failures = vec![row_failure("invoices", "d", "constraint_violation")];
    changes(store, imported(restore_id, "invoices", 0, 49, failures)).await;

    let listed = store.diagnostics(restore_id, false, 100).await.unwrap();
    let rows: Vec<_> = listed
        .iter()
        .map(|row| {
            (
                row.entity.as_str(),
                row.failure.key.as_deref().unwrap_or_default(),
                row.failure.code.as_str(),
                row.resolved,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("orders", "a", "unparsable_line", false),
            ("orders", "b", "unparsable_line", false),
            ("orders", "c", "unparsable_line", false),
            ("invoices", "d", "constraint_violation", false),
        ]
    );
    assert!(
        listed.windows(2).all(|pair| pair[0].id < pair[1].id),
        "id order"
    );
    assert_eq!(
        listed[0].failure,
        row_failure("orders", "a", "unparsable_line")
    );
    let first_two = store.diagnostics(restore_id, false, 2).await.unwrap();
    assert_eq!(first_two, listed[..2]);
    assert!(
        store
            .diagnostics(backup_id, true, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(report(store, restore_id).await.rows_failed, 4);
}

pub async fn replace_mode_applies_each_entity<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let restore_id = restore(store, backup_id, RestoreMode::Replace, &[], None).await;
    let mut seen = vec![report(store, restore_id).await.percent];
    changes(
        store,
        restore_planned(restore_id, &[("orders", 2), ("invoices", 1)], true),
    )
    .await;
    let imports = jobs(&drain(store, 100).await);
    assert!(matches!(imports[0].1, Job::PlanRestore(_)));
    assert_eq!(imports.len(), 4);
    assert!(imports[1..].iter().all(|(_, job)| matches!(job,
        Job::ImportPart(import) if import.target.staging_table.as_deref()
            == Some(format!("stage_{}", import.entity.name).as_str()))));
    seen.push(report(store, restore_id).await.percent);
    // Too early: nothing is staged yet.
    ignored(store, applied(restore_id, "orders", 100, Vec::new())).await;
    for (entity, unit) in [("orders", 0), ("orders", 1), ("invoices", 0)] {
        changes(store, imported(restore_id, entity, unit, 50, Vec::new())).await;
        seen.push(report(store, restore_id).await.percent);
    }
    let staged = report(store, restore_id).await;
    assert_eq!(staged.state, OperationState::Finalizing);
    assert_eq!(staged.percent, 99.0);
    assert_eq!(staged.rows_written, 0, "staged rows are not written yet");
    assert_eq!(staged.rows_done, 150);
    assert!(
        staged
            .entities
            .iter()
            .all(|entity| entity.state == "running")
    );
    let applies: Vec<_> = jobs(&drain(store, 100).await)
        .into_iter()
        .map(|(pool, job)| match job {
            Job::ApplyRestore(apply) => {
                assert_eq!(apply.operation_id, restore_id);
                assert_eq!(apply.target.mode, RestoreMode::Replace);
                assert_eq!(apply.target.target_scope.as_deref(), Some("tenant-z"));
                (pool, apply.entity.name, apply.target.staging_table)
            }
            other => panic!("expected apply_restore, got {other:?}"),
        })
        .collect();
    assert_eq!(
        applies,
        [
            (
                "default".to_string(),
                "orders".to_string(),
                Some("stage_orders".to_string())
            ),
            (
                "billing".to_string(),
                "invoices".to_string(),
                Some("stage_invoices".to_string())
            ),
        ]
    );
    let failures = vec![row_failure("orders", "dup", "constraint_violation")];
    changes(store, applied(restore_id, "orders", 99, failures)).await;
    ignored(store, applied(restore_id, "orders", 99, Vec::new())).await;
    seen.push(report(store, restore_id).await.percent);
    let error = store
        .apply(&applied(restore_id, "payments", 1, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    changes(store, applied(restore_id, "invoices", 50, Vec::new())).await;
    let completed = report(store, restore_id).await;
    seen.push(completed.percent);
    assert_eq!(completed.state, OperationState::Completed);
    assert_eq!((completed.rows_written, completed.rows_failed), (149, 1));
    assert_eq!(
        store.diagnostics(restore_id, false, 10).await.unwrap()[0]
            .failure
            .key
            .as_deref(),
        Some("dup")
    );
    assert!(seen.windows(2).all(|pair| pair[0] <= pair[1]), "{seen:?}");
    assert_eq!(seen, [0.0, 0.0, 33.0, 66.0, 99.0, 99.0, 100.0]);
}

pub async fn restore_percent_is_monotonic_to_100<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let restore_id = restore(store, backup_id, RestoreMode::SkipExisting, &[], None).await;
    let mut seen = vec![report(store, restore_id).await.percent];
    changes(
        store,
        restore_planned(restore_id, &[("orders", 4), ("invoices", 3)], false),
    )
    .await;
    seen.push(report(store, restore_id).await.percent);
    let units = [
        ("invoices", 2),
        ("orders", 0),
        ("orders", 3),
        ("invoices", 0),
        ("orders", 1),
        ("invoices", 1),
        ("orders", 2),
    ];
    for (entity, unit) in units {
        changes(store, imported(restore_id, entity, unit, 10, Vec::new())).await;
        // A redelivered copy changes nothing.
        ignored(store, imported(restore_id, entity, unit, 10, Vec::new())).await;
        let now = report(store, restore_id).await;
        seen.push(now.percent);
        if now.state != OperationState::Completed {
            assert!(now.percent < 100.0, "{seen:?}");
        }
    }
    assert!(seen.windows(2).all(|pair| pair[0] <= pair[1]), "{seen:?}");
    assert_eq!(seen.last(), Some(&100.0));
    assert_eq!(seen.iter().filter(|percent| **percent == 100.0).count(), 1);
    let completed = report(store, restore_id).await;
    assert_eq!(
        (
            completed.rows_done,
            completed.rows_written,
            completed.rows_skipped
        ),
        (350, 70, 280)
    );
    assert_eq!(completed.mode.as_deref(), Some("skip-existing"));
    assert_events_monotonic_to_100(&drain(store, 1000).await);
}

pub async fn empty_restores_complete_at_once<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let merge = restore(store, backup_id, RestoreMode::Merge, &[], None).await;
    changes(
        store,
        restore_planned(merge, &[("orders", 0), ("invoices", 0)], false),
    )
    .await;
    let completed = report(store, merge).await;
    assert_eq!(
        (completed.state, completed.percent),
        (OperationState::Completed, 100.0)
    );
    drain(store, 100).await;

    // Replace still empties the scope: each entity is applied.
    let replace = restore(store, backup_id, RestoreMode::Replace, &[], None).await;
    changes(
        store,
        restore_planned(replace, &[("orders", 0), ("invoices", 0)], true),
    )
    .await;
    assert_eq!(
        report(store, replace).await.state,
        OperationState::Finalizing
    );
    let queued = jobs(&drain(store, 100).await);
    assert_eq!(queued.len(), 3, "plan_restore and two apply_restore jobs");
    assert!(
        queued[1..]
            .iter()
            .all(|(_, job)| matches!(job, Job::ApplyRestore(_)))
    );
    changes(store, applied(replace, "orders", 0, Vec::new())).await;
    changes(store, applied(replace, "invoices", 0, Vec::new())).await;
    assert_eq!(
        report(store, replace).await.state,
        OperationState::Completed
    );
}

pub async fn import_failures_fail_the_restore<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    // Retryable failures are counted; the conformance policy gives up after 3.
    let restore_id = restore(store, backup_id, RestoreMode::Overwrite, &[], None).await;
    changes(
        store,
        restore_planned(restore_id, &[("orders", 2), ("invoices", 1)], false),
    )
    .await;
    for _ in 0..2 {
        changes(store, import_failed(restore_id, "orders", 1, true)).await;
        assert_eq!(
            report(store, restore_id).await.state,
            OperationState::Running
        );
    }
    changes(store, import_failed(restore_id, "orders", 1, true)).await;
    let failed = report(store, restore_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let error = failed.error.unwrap();
    assert!(error.contains(&unit_path("orders", 1)), "{error}");
    assert!(
        error.contains("hash_mismatch") && error.contains("gave up after 3"),
        "{error}"
    );
    assert!(error.contains("entity 'orders' chunk 0 part 1"), "{error}");
    ignored(store, imported(restore_id, "orders", 0, 50, Vec::new())).await;

    // A fatal failure fails at once, naming the part; an imported unit's late failure is ignored.
    let restore_id = restore(store, backup_id, RestoreMode::Overwrite, &[], None).await;
    changes(
        store,
        restore_planned(restore_id, &[("orders", 2), ("invoices", 1)], false),
    )
    .await;
    changes(store, imported(restore_id, "orders", 0, 50, Vec::new())).await;
    ignored(store, import_failed(restore_id, "orders", 0, false)).await;
    changes(store, import_failed(restore_id, "invoices", 0, false)).await;
    let failed = report(store, restore_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let error = failed.error.unwrap();
    assert!(error.contains(&unit_path("invoices", 0)), "{error}");
    assert!(!error.contains("gave up"), "{error}");
    let events = events(&drain(store, 1000).await);
    assert!(matches!(events.last(), Some(OperationEvent::Failed(_))));

    // A worker failing a restore as a whole.
    let restore_id = restore(store, backup_id, RestoreMode::Overwrite, &[], None).await;
    changes(store, operation_failed(restore_id)).await;
    let failed = report(store, restore_id).await;
    assert_eq!(failed.state, OperationState::Failed);
    let error = failed.error.unwrap();
    assert!(
        error.contains("(missing_table)") && error.contains("Order"),
        "{error}"
    );
    ignored(
        store,
        restore_planned(restore_id, &[("orders", 1), ("invoices", 1)], false),
    )
    .await;
    // ... but not a backup.
    let backup = submit(store).await;
    ignored(store, operation_failed(backup)).await;
    assert_eq!(report(store, backup).await.state, OperationState::Planning);
}

pub async fn reports_for_another_kind_are_invalid<S: StateStore>(store: &S) {
    let backup_id = completed_backup(store).await;
    let running = submit(store).await;
    let error = store
        .apply(&imported(running, "orders", 0, 50, Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    assert!(error.to_string().contains("part_imported"), "{error}");
    let restore_id = restore(store, backup_id, RestoreMode::Merge, &[], None).await;
    let error = store
        .apply(&planned(restore_id, "orders", 2))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    let error = store
        .apply(&verify_done(restore_id, &[]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    let error = store
        .apply(&replay_done(restore_id, &[1], &[]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), "invalid_report");
    assert_eq!(
        report(store, restore_id).await.state,
        OperationState::Planning
    );
}
