//! Restores, replays and verifies through the coordinator service, over a
//! real RabbitMQ (a vhost of its own) and a real PostgreSQL: the test plays
//! client and worker, in protocol messages only.

#![allow(clippy::unwrap_used)]

mod common;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::TestSchema;
use common::service::{
    Vhost, WAIT, back_up, command, config, next, report, subscribe, until_terminal,
};
use koan_protocol::archive::{PartInfo, part_path};
use koan_protocol::commands::{
    Command, DiagnosticsQuery, ReplayRows, Reply, RestoreMode, StartRestore, VerifyBackup,
};
use koan_protocol::events::{
    OperationEvent, PartImported, ReplayDone, RestoreEntity, RestorePart, RestorePlanned,
    RowFailure, VerifyDone, WorkerEvent,
};
use koan_protocol::jobs::Job;
use koan_protocol::plan::KeyType;
use koan_protocol::topology::{EVENTS_EXCHANGE, operation_follow_key, pool_queue};
use koan_transport::{Broker, topology};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restores_replays_and_verifies_run_from_command_to_terminal_event() {
    let vhost = Vhost::new();
    let schema = TestSchema::new().await;
    let shutdown = CancellationToken::new();
    let service = tokio::spawn(koan_coordinator::run(
        config(&vhost, &schema),
        shutdown.clone(),
    ));
    let client = Broker::connect_with_retry(&vhost.url(), "test client", WAIT)
        .await
        .unwrap();
    topology::declare_coordinator(client.publisher())
        .await
        .unwrap();
    topology::declare_pool(client.publisher(), "default")
        .await
        .unwrap();
    let mut jobs = subscribe(&client, &pool_queue("default")).await;
    let backup_id = Uuid::now_v7();
    let manifest = back_up(&client, &mut jobs, backup_id).await;

    // Another tenant's backup is refused without an explicit target scope.
    let cross = Command::StartRestore(StartRestore {
        backup_id,
        scope: Some("tenant-b".into()),
        ..StartRestore::default()
    });
    let Reply::Rejected(rejected) = command(&client, &cross).await else {
        panic!("cross-scope restore accepted")
    };
    assert_eq!(rejected.code, "cross_scope");
    assert!(
        rejected.error.contains("tenant-a") && rejected.error.contains("--target-scope tenant-b"),
        "{}",
        rejected.error
    );

    let restore_id = Uuid::now_v7();
    let mut events = client
        .follow(EVENTS_EXCHANGE, &[operation_follow_key(restore_id)])
        .await
        .unwrap();
    let start = Command::StartRestore(StartRestore {
        backup_id,
        operation_id: Some(restore_id),
        scope: Some("tenant-a".into()),
        ..StartRestore::default()
    });
    let Reply::Accepted(accepted) = command(&client, &start).await else {
        panic!("restore not accepted")
    };
    assert_eq!(accepted.operation_id, restore_id);
    assert_eq!(
        accepted.warnings,
        ["entity 'orders' has no version: merge behaves as overwrite"]
    );
    let Job::PlanRestore(plan) = next::<Job>(&mut jobs).await else {
        panic!("expected plan_restore")
    };
    assert_eq!(plan.manifest_path, manifest);
    assert_eq!(plan.mode, RestoreMode::Merge);
    // The worker reads the manifest: one part of 10 rows.
    let mut spec = koan_protocol::plan::BackupPlan::new("orders:daily")
        .entity(
            koan_protocol::plan::BackupEntity::new("orders", "Order")
                .in_scope("default", "tenant-a"),
        )
        .entity_specs()
        .remove(0);
    spec.key_type = Some(KeyType::Text);
    let part = PartInfo {
        part: 0,
        path: part_path(&spec, "orders:daily", backup_id, 0, 0, "run1").unwrap(),
        first_key: Some("a".into()),
        last_key: Some("j".into()),
        rows: 10,
        raw_bytes: 400,
        compressed_bytes: 100,
        blake3: "00".repeat(32),
    };
    report(
        &client,
        "restore_planned",
        WorkerEvent::RestorePlanned(RestorePlanned {
            operation_id: restore_id,
            entities: vec![RestoreEntity {
                spec: spec.clone(),
                staging_table: None,
                parts: vec![RestorePart {
                    chunk: 0,
                    part: part.clone(),
                }],
            }],
        }),
    )
    .await;
    let Job::ImportPart(import) = next::<Job>(&mut jobs).await else {
        panic!("expected import_part")
    };
    assert_eq!(
        (import.unit, import.part.path.as_str()),
        (0, part.path.as_str())
    );
    let failure = |key: &str| RowFailure {
        key: Some(key.into()),
        part: Some(part.path.clone()),
        line_no: Some(3),
        code: "constraint_violation".into(),
        reason: "new row violates check constraint \"order_status_allowed\"".into(),
        line: format!("{{\"id\":\"{key}\",\"doc\":{{}}}}"),
    };
    let imported = WorkerEvent::PartImported(PartImported {
        operation_id: restore_id,
        entity: "orders".into(),
        unit: 0,
        rows_written: 8,
        rows_skipped: 0,
        failures: vec![failure("c"), failure("f")],
        raw_bytes: 400,
    });
    // Redelivered: counted once.
    report(&client, "part_imported", imported.clone()).await;
    report(&client, "part_imported", imported).await;
    let (percents, terminal) = until_terminal(&mut events).await;
    let OperationEvent::Completed(restored) = terminal else {
        panic!("restore failed: {terminal:?}")
    };
    assert!(
        percents.windows(2).all(|pair| pair[0] <= pair[1]),
        "{percents:?}"
    );
    assert_eq!(restored.percent, 100.0);
    assert_eq!(
        (
            restored.rows_done,
            restored.rows_written,
            restored.rows_failed
        ),
        (10, 8, 2)
    );
    assert_eq!(restored.source_operation, Some(backup_id));

    let query = Command::Diagnostics(DiagnosticsQuery {
        operation_id: restore_id,
        include_resolved: false,
    });
    let Reply::Diagnostics(listing) = command(&client, &query).await else {
        panic!("expected diagnostics")
    };
    let keys: Vec<_> = listing
        .rows
        .iter()
        .map(|row| row.failure.key.clone().unwrap_or_default())
        .collect();
    assert_eq!(keys, ["c", "f"]);

    let replay_id = Uuid::now_v7();
    let mut replay_events = client
        .follow(EVENTS_EXCHANGE, &[operation_follow_key(replay_id)])
        .await
        .unwrap();
    let replay = Command::Replay(ReplayRows {
        operation_id: restore_id,
        replay_id: Some(replay_id),
    });
    assert!(matches!(
        command(&client, &replay).await,
        Reply::Accepted(_)
    ));
    let Job::Replay(replay_job) = next::<Job>(&mut jobs).await else {
        panic!("expected replay_rows")
    };
    assert_eq!(replay_job.lines.len(), 2);
    assert_eq!(replay_job.target.mode, RestoreMode::Merge);
    report(
        &client,
        "replay_done",
        WorkerEvent::ReplayDone(ReplayDone {
            operation_id: replay_id,
            resolved: replay_job
                .lines
                .iter()
                .map(|line| line.diagnostic_id)
                .collect(),
            failed: Vec::new(),
        }),
    )
    .await;
    let (_, terminal) = until_terminal(&mut replay_events).await;
    assert!(
        matches!(&terminal, OperationEvent::Completed(report) if report.rows_written == 2),
        "{terminal:?}"
    );
    let Reply::Diagnostics(listing) = command(&client, &query).await else {
        panic!("expected diagnostics")
    };
    assert!(listing.rows.is_empty(), "{listing:?}");
    let Reply::Accepted(again) = command(&client, &replay).await else {
        panic!("the same replay id is one operation")
    };
    assert!(again.existing);
    let fresh = Command::Replay(ReplayRows {
        operation_id: restore_id,
        replay_id: None,
    });
    let Reply::Rejected(rejected) = command(&client, &fresh).await else {
        panic!("a replay with nothing left was accepted")
    };
    assert_eq!(rejected.code, "nothing_to_replay");

    // A verify that finds a bad part fails, naming it.
    let verify_id = Uuid::now_v7();
    let mut verify_events = client
        .follow(EVENTS_EXCHANGE, &[operation_follow_key(verify_id)])
        .await
        .unwrap();
    let verify = Command::Verify(VerifyBackup {
        backup_id,
        operation_id: Some(verify_id),
    });
    assert!(matches!(
        command(&client, &verify).await,
        Reply::Accepted(_)
    ));
    let Job::Verify(verify_job) = next::<Job>(&mut jobs).await else {
        panic!("expected verify_backup")
    };
    assert_eq!(verify_job.manifest_path, manifest);
    let problem = format!("{}: blake3 differs from the manifest", part.path);
    report(
        &client,
        "verify_done",
        WorkerEvent::VerifyDone(VerifyDone {
            operation_id: verify_id,
            parts_checked: 1,
            rows: 10,
            problems: vec![problem.clone()],
        }),
    )
    .await;
    let (_, terminal) = until_terminal(&mut verify_events).await;
    let OperationEvent::Failed(verified) = terminal else {
        panic!("a bad part must fail the verify: {terminal:?}")
    };
    assert_eq!(verified.problems, std::slice::from_ref(&problem));
    assert_eq!(
        verified.error.as_deref(),
        Some(format!("1 of 1 parts are bad: {problem}").as_str())
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, service)
        .await
        .expect("stops in time")
        .unwrap()
        .unwrap();
    client.close().await;
}
