//! Conformance checks for the restore commands over a state store: unknown
//! backups, tenant isolation, warnings, diagnostics and replays by command.

use std::sync::Arc;

use uuid::Uuid;

use koan_coordinator::commands::Answer;
use koan_coordinator::store::StateStore;
use koan_coordinator::{Commands, PlanRegistry};
use koan_protocol::commands::{
    Accepted, Command, DiagnosticsQuery, ListOperations, OperationRef, ReplayRows, Reply,
    RestoreMode, StartRestore, VerifyBackup,
};
use koan_protocol::jobs::Job;
use koan_protocol::progress::{OperationKind, OperationState};

use super::*;

fn commands<S: StateStore>(store: &Arc<S>) -> Commands<S> {
    Commands::new(Arc::clone(store), Arc::new(PlanRegistry::new()), None)
}

async fn ask<S: StateStore>(commands: &Commands<S>, command: Command) -> Answer {
    let payload = koan_protocol::encode(&command).expect("command encodes");
    let answer = commands.answer(&payload, None).await.expect("answer");
    assert!(answer.dead_letter.is_none(), "{answer:?}");
    answer
}

fn refusal(answer: &Answer) -> (String, String) {
    match &answer.reply {
        Reply::Rejected(rejected) => (rejected.code.clone(), rejected.error.clone()),
        other => panic!("expected rejected, got {other:?}"),
    }
}

fn accepted(answer: &Answer) -> Accepted {
    match &answer.reply {
        Reply::Accepted(accepted) => {
            assert_eq!(answer.changed, !accepted.existing);
            accepted.clone()
        }
        other => panic!("expected accepted, got {other:?}"),
    }
}

fn start(backup_id: Uuid) -> StartRestore {
    StartRestore {
        backup_id,
        ..StartRestore::default()
    }
}

fn verify(backup_id: Uuid, operation_id: Option<Uuid>) -> Command {
    Command::Verify(VerifyBackup {
        backup_id,
        operation_id,
    })
}

fn diagnostics(operation_id: Uuid, include_resolved: bool) -> Command {
    Command::Diagnostics(DiagnosticsQuery {
        operation_id,
        include_resolved,
    })
}

fn replay(operation_id: Uuid, replay_id: Option<Uuid>) -> Command {
    Command::Replay(ReplayRows {
        operation_id,
        replay_id,
    })
}

pub async fn unknown_backups_are_refused<S: StateStore>(store: Arc<S>) {
    let commands = commands(&store);
    let unknown = Uuid::now_v7();
    for command in [Command::StartRestore(start(unknown)), verify(unknown, None)] {
        let (code, error) = refusal(&ask(&commands, command).await);
        assert_eq!(code, "unknown_backup", "{error}");
        assert!(error.contains(&unknown.to_string()), "{error}");
    }
    let running = submit(store.as_ref()).await;
    let (code, error) = refusal(&ask(&commands, Command::StartRestore(start(running))).await);
    assert_eq!(code, "unknown_backup");
    assert!(
        error.contains("not complete") && error.contains("planning"),
        "{error}"
    );

    let (code, _) = refusal(&ask(&commands, diagnostics(unknown, false)).await);
    assert_eq!(code, "unknown_operation");
    let (code, error) = refusal(&ask(&commands, diagnostics(running, false)).await);
    assert_eq!(code, "not_a_restore", "{error}");
    let (code, _) = refusal(&ask(&commands, replay(unknown, None)).await);
    assert_eq!(code, "unknown_operation");
    let (code, _) = refusal(&ask(&commands, replay(running, None)).await);
    assert_eq!(code, "not_a_restore");

    let backup_id = completed_backup(store.as_ref()).await;
    let mut entities = start(backup_id);
    entities.entities = vec!["orders".into(), "payments".into()];
    let (code, error) = refusal(&ask(&commands, Command::StartRestore(entities)).await);
    assert_eq!(code, "unknown_entity");
    assert!(error.contains("'payments'"), "{error}");

    let verify_id = Uuid::now_v7();
    let first = accepted(&ask(&commands, verify(backup_id, Some(verify_id))).await);
    assert_eq!((first.operation_id, first.existing), (verify_id, false));
    let again = accepted(&ask(&commands, verify(backup_id, Some(verify_id))).await);
    assert_eq!((again.operation_id, again.existing), (verify_id, true));
    let (code, _) = refusal(&ask(&commands, replay(verify_id, None)).await);
    assert_eq!(code, "not_a_restore");
}

pub async fn cross_scope_restores_are_refused<S: StateStore>(store: Arc<S>) {
    let commands = commands(&store);
    let backup_id = completed_backup(store.as_ref()).await;
    let orders = |scope: Option<&str>, target_scope: Option<&str>| StartRestore {
        entities: vec!["orders".into()],
        scope: scope.map(str::to_string),
        target_scope: target_scope.map(str::to_string),
        ..start(backup_id)
    };

    let (code, error) = refusal(
        &ask(
            &commands,
            Command::StartRestore(orders(Some("tenant-b"), None)),
        )
        .await,
    );
    assert_eq!(code, "cross_scope");
    assert_eq!(
        error,
        format!(
            "backup {backup_id} holds scope 'tenant-a', not 'tenant-b'; pass --target-scope \
             tenant-b to restore it into 'tenant-b'"
        )
    );
    // Every entity: `invoices` was backed up unscoped, so it holds every scope.
    let mut every = orders(Some("tenant-a"), None);
    every.entities.clear();
    let (code, error) = refusal(&ask(&commands, Command::StartRestore(every)).await);
    assert_eq!(code, "cross_scope");
    assert!(error.contains("'invoices' is unscoped"), "{error}");
    // Acting for one scope, writing into another.
    let (code, _) = refusal(
        &ask(
            &commands,
            Command::StartRestore(orders(Some("tenant-a"), Some("tenant-c"))),
        )
        .await,
    );
    assert_eq!(code, "cross_scope");
    let (code, error) = refusal(
        &ask(
            &commands,
            Command::StartRestore(orders(None, Some("../tenant"))),
        )
        .await,
    );
    assert_eq!(code, "invalid_name");
    assert!(error.contains("target_scope"), "{error}");

    // Named explicitly, the cross-scope restore is accepted, once.
    let restore_id = Uuid::now_v7();
    let explicit = StartRestore {
        operation_id: Some(restore_id),
        mode: RestoreMode::Merge,
        ..orders(Some("tenant-b"), Some("tenant-b"))
    };
    let first = accepted(&ask(&commands, Command::StartRestore(explicit.clone())).await);
    assert_eq!((first.operation_id, first.existing), (restore_id, false));
    assert_eq!(
        first.warnings,
        ["entity 'orders' has no version: merge behaves as overwrite"]
    );
    let again = accepted(&ask(&commands, Command::StartRestore(explicit)).await);
    assert_eq!((again.operation_id, again.existing), (restore_id, true));
    let own = StartRestore {
        mode: RestoreMode::Overwrite,
        ..orders(Some("tenant-a"), None)
    };
    let own = accepted(&ask(&commands, Command::StartRestore(own)).await);
    assert!(own.warnings.is_empty());

    let plan_jobs: Vec<_> = jobs(&drain(store.as_ref(), 100).await)
        .into_iter()
        .filter_map(|(_, job)| match job {
            Job::PlanRestore(plan) => Some(plan),
            _ => None,
        })
        .collect();
    assert_eq!(plan_jobs.len(), 2, "one plan job per restore, once");
    assert_eq!(plan_jobs[0].operation_id, restore_id);
    assert_eq!(plan_jobs[0].target_scope.as_deref(), Some("tenant-b"));
    assert_eq!(plan_jobs[0].entities, ["orders"]);
    assert_eq!(plan_jobs[1].target_scope, None);

    let Reply::Diagnostics(listing) = ask(&commands, diagnostics(restore_id, false)).await.reply
    else {
        panic!("expected diagnostics")
    };
    assert_eq!(listing.operation_id, restore_id);
    assert!(listing.rows.is_empty());
    let (code, error) = refusal(&ask(&commands, replay(restore_id, None)).await);
    assert_eq!(code, "restore_running", "{error}");
}

pub async fn diagnostics_and_replays_by_command<S: StateStore>(store: Arc<S>) {
    let commands = commands(&store);
    let backup_id = completed_backup(store.as_ref()).await;
    let restore_id = Uuid::now_v7();
    let command = StartRestore {
        operation_id: Some(restore_id),
        mode: RestoreMode::Overwrite,
        ..start(backup_id)
    };
    accepted(&ask(&commands, Command::StartRestore(command)).await);
    changes(
        store.as_ref(),
        restore_planned(restore_id, &[("orders", 1), ("invoices", 1)], false),
    )
    .await;
    let failures = vec![row_failure("orders", "x", "constraint_violation")];
    changes(
        store.as_ref(),
        imported(restore_id, "orders", 0, 49, failures),
    )
    .await;
    let failures = vec![row_failure("invoices", "y", "unparsable_line")];
    changes(
        store.as_ref(),
        imported(restore_id, "invoices", 0, 49, failures),
    )
    .await;
    let completed = report(store.as_ref(), restore_id).await;
    assert_eq!(
        (completed.state, completed.rows_failed),
        (OperationState::Completed, 2)
    );

    let Reply::Diagnostics(listing) = ask(&commands, diagnostics(restore_id, false)).await.reply
    else {
        panic!("expected diagnostics")
    };
    let keys: Vec<_> = listing
        .rows
        .iter()
        .map(|row| row.failure.key.clone().unwrap_or_default())
        .collect();
    assert_eq!(keys, ["x", "y"]);
    let (x, y) = (listing.rows[0].id, listing.rows[1].id);

    let replay_id = Uuid::now_v7();
    let first = accepted(&ask(&commands, replay(restore_id, Some(replay_id))).await);
    assert_eq!((first.operation_id, first.existing), (replay_id, false));
    let again = accepted(&ask(&commands, replay(restore_id, Some(replay_id))).await);
    assert!(again.existing);
    changes(store.as_ref(), replay_done(replay_id, &[x], &[])).await;
    changes(store.as_ref(), replay_done(replay_id, &[], &[y])).await;
    let Reply::Status(status) = ask(
        &commands,
        Command::Status(OperationRef {
            operation_id: replay_id,
        }),
    )
    .await
    .reply
    else {
        panic!("expected status")
    };
    assert_eq!(status.kind, OperationKind::Restore);
    assert_eq!(status.state, OperationState::Completed);
    assert_eq!(status.source_operation, Some(restore_id));
    assert_eq!((status.rows_written, status.rows_failed), (1, 1));

    // A replay's id names its restore's diagnostics, and replays them again.
    let Reply::Diagnostics(listing) = ask(&commands, diagnostics(replay_id, false)).await.reply
    else {
        panic!("expected diagnostics")
    };
    assert_eq!(listing.operation_id, restore_id);
    let ids: Vec<_> = listing.rows.iter().map(|row| row.id).collect();
    assert_eq!(ids, [y]);
    let Reply::Diagnostics(listing) = ask(&commands, diagnostics(restore_id, true)).await.reply
    else {
        panic!("expected diagnostics")
    };
    let states: Vec<_> = listing
        .rows
        .iter()
        .map(|row| (row.id, row.resolved))
        .collect();
    assert_eq!(states, [(x, true), (y, false)]);
    let second = accepted(&ask(&commands, replay(replay_id, None)).await);
    assert_ne!(second.operation_id, replay_id);
    assert_eq!(
        report(store.as_ref(), second.operation_id)
            .await
            .source_operation,
        Some(restore_id)
    );

    let Reply::Operations(listed) =
        ask(&commands, Command::List(ListOperations { limit: Some(10) }))
            .await
            .reply
    else {
        panic!("expected operations")
    };
    let kinds: Vec<_> = listed
        .operations
        .iter()
        .map(|report| (report.kind, report.mode.clone()))
        .collect();
    assert_eq!(
        kinds,
        [
            (OperationKind::Restore, Some("overwrite".to_string())),
            (OperationKind::Restore, Some("overwrite".to_string())),
            (OperationKind::Restore, Some("overwrite".to_string())),
            (OperationKind::Backup, None),
        ]
    );
}
