//! Restore and verify against real PostgreSQL databases, without RabbitMQ:
//! backups are made with the export jobs into a temporary directory, then
//! restored into another database with the restore jobs reporting to
//! `MemoryEvents`.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 with trust auth for user `postgres`.
//! Each test creates its own databases and drops them afterwards.

#![allow(clippy::unwrap_used)]

mod common;

use koan_protocol::archive::PartInfo;
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{RowFailure, WorkerEvent};
use koan_protocol::jobs::{ImportPart, PlanRestore, ReplayJob, ReplayLine, RestoreTarget};
use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec, KeyType};
use koan_source::Source;
use koan_worker::jobs::Outcome;
use koan_worker::jobs::import::import_part;
use koan_worker::jobs::plan_restore::plan_restore;
use koan_worker::jobs::replay::replay_rows;
use koan_worker::{MemoryEvents, Storage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::TestDatabase;
use common::archive::{backup, dump, import_all, plan, verify, verify_problems};

const ORDERS: &str = r#"
    CREATE TABLE "Order" ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
    INSERT INTO "Order"
    SELECT 'order-' || lpad(n::text, 5, '0') || CASE WHEN n % 7 = 0 THEN ' "ü\' ELSE '' END,
           jsonb_build_object('n', n, 'text', E'multi\nline "quoted"', 'nested', jsonb_build_object('a', array[n, n + 1]))
    FROM generate_series(1, 2000) n;
    INSERT INTO "Order" VALUES ('order-big', jsonb_build_object('blob', repeat('x', 5 * 1024 * 1024)));"#;

const LEDGER: &str = r#"
    CREATE TABLE "Ledger" ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);
    INSERT INTO "Ledger"
    SELECT n::bigint * 1000000000, jsonb_build_object('meta', jsonb_build_object('version', n % 5), 'n', n)
    FROM generate_series(-50, 449) n;"#;

fn storage_of(database: &TestDatabase) -> Storage {
    Storage::open(&database.directory.display().to_string()).unwrap()
}

fn imported_rows(events: &[WorkerEvent]) -> (u64, usize) {
    let mut rows = 0;
    let mut failures = 0;
    for event in events {
        match event {
            WorkerEvent::PartImported(imported) => {
                rows += imported.rows_written + imported.rows_skipped;
                failures += imported.failures.len();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    (rows, failures)
}

#[tokio::test]
async fn round_trip_into_another_database() {
    let source_database = TestDatabase::create().await;
    let source_client = source_database.client().await;
    source_client
        .batch_execute(&format!("{ORDERS}{LEDGER}"))
        .await
        .unwrap();
    let plan_spec = BackupPlan::new("shop:nightly")
        .entity(BackupEntity::new("orders", "Order").chunk_rows(300))
        .entity(
            BackupEntity::new("ledger", "Ledger")
                .version("$.meta.version")
                .chunk_rows(100),
        );
    let source = Source::new(&source_database.url, 4).unwrap();
    let storage = storage_of(&source_database);
    let (manifest, path) = backup(&source, &storage, &plan_spec, 16 * 1024).await;
    assert_eq!(manifest.totals.rows, 2_501);
    assert!(
        manifest.totals.parts > manifest.totals.chunks,
        "{:?}",
        manifest.totals
    );

    let verified = verify(&storage, &manifest, &path).await;
    assert_eq!(verify_problems(&verified), Vec::<String>::new());
    assert!(
        matches!(verified.last(), Some(WorkerEvent::VerifyDone(done)) if done.parts_checked == manifest.totals.parts && done.rows == 2_501)
    );
    assert!(
        matches!(&verified[verified.len() - 2], WorkerEvent::VerifyProgress(progress) if progress.parts_done == progress.parts_total && progress.rows_done == 2_501)
    );

    // An empty database: the Koan-layout tables are created from the archive.
    let target_database = TestDatabase::create().await;
    let target_client = target_database.client().await;
    let target = Source::new(&target_database.url, 4).unwrap();
    let operation_id = Uuid::now_v7();
    let entities = plan(
        &target,
        &storage,
        &manifest,
        &path,
        RestoreMode::Merge,
        operation_id,
    )
    .await
    .unwrap();
    assert_eq!(entities.len(), 2);
    assert_eq!(entities[0].spec, manifest.entities[0].spec);
    assert!(entities.iter().all(|entity| entity.staging_table.is_none()));
    let manifest_parts: Vec<&PartInfo> = manifest.parts().map(|(_, _, part)| part).collect();
    let planned_parts: Vec<&PartInfo> = entities
        .iter()
        .flat_map(|entity| entity.parts.iter().map(|part| &part.part))
        .collect();
    assert_eq!(planned_parts, manifest_parts);

    let events = import_all(
        &target,
        &storage,
        &entities,
        RestoreMode::Merge,
        operation_id,
    )
    .await;
    assert_eq!(imported_rows(&events), (2_501, 0));
    for table in ["Order", "Ledger"] {
        assert_eq!(
            dump(&target_client, table).await,
            dump(&source_client, table).await,
            "{table}"
        );
    }
    // Redelivered imports leave exactly the same rows.
    let events = import_all(
        &target,
        &storage,
        &entities,
        RestoreMode::Merge,
        operation_id,
    )
    .await;
    assert_eq!(imported_rows(&events), (2_501, 0));
    for table in ["Order", "Ledger"] {
        assert_eq!(
            dump(&target_client, table).await,
            dump(&source_client, table).await,
            "{table}"
        );
    }
}

#[tokio::test]
async fn a_flipped_byte_fails_its_part_and_writes_nothing_from_it() {
    let source_database = TestDatabase::create().await;
    let source_client = source_database.client().await;
    source_client.batch_execute(LEDGER).await.unwrap();
    let plan_spec = BackupPlan::new("ledger").entity(
        BackupEntity::new("ledger", "Ledger")
            .version("$.meta.version")
            .chunk_rows(100),
    );
    let source = Source::new(&source_database.url, 4).unwrap();
    let storage = storage_of(&source_database);
    let (manifest, path) = backup(&source, &storage, &plan_spec, 4 * 1024).await;
    let damaged = manifest.entities[0].chunks[2].parts[0].clone();
    let mut bytes = storage.get(&damaged.path).await.unwrap().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    storage.put(&damaged.path, bytes).await.unwrap();

    let problems = verify_problems(&verify(&storage, &manifest, &path).await);
    assert!(!problems.is_empty());
    assert!(
        problems
            .iter()
            .all(|problem| problem.contains(&damaged.path)),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|problem| problem.contains("hash mismatch")),
        "{problems:?}"
    );

    let target_database = TestDatabase::create().await;
    let target_client = target_database.client().await;
    let target = Source::new(&target_database.url, 4).unwrap();
    let operation_id = Uuid::now_v7();
    let entities = plan(
        &target,
        &storage,
        &manifest,
        &path,
        RestoreMode::Merge,
        operation_id,
    )
    .await
    .unwrap();
    let events = import_all(
        &target,
        &storage,
        &entities,
        RestoreMode::Merge,
        operation_id,
    )
    .await;
    let failed: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            WorkerEvent::ImportFailed(failed) => Some(failed),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1, "{events:?}");
    assert_eq!(failed[0].code, "hash_mismatch");
    assert!(!failed[0].retryable);
    assert!(
        failed[0].error.contains(&damaged.path),
        "{}",
        failed[0].error
    );
    let unit = entities[0]
        .parts
        .iter()
        .position(|part| part.part.path == damaged.path)
        .unwrap();
    assert_eq!(failed[0].unit as usize, unit);

    let restored = dump(&target_client, "Ledger").await;
    assert_eq!(restored.len() as u64, 500 - damaged.rows);
    let first: i64 = damaged.first_key.as_deref().unwrap().parse().unwrap();
    let last: i64 = damaged.last_key.as_deref().unwrap().parse().unwrap();
    assert!(
        restored.iter().all(|(key, _)| {
            let key: i64 = key.parse().unwrap();
            key < first || key > last
        }),
        "no row of the damaged part may be written"
    );
}

/// A hand-made part: 20 good rows, 3 lines that do not parse, 2 rows the target's constraint refuses.
async fn crafted_part(storage: &Storage) -> PartInfo {
    let mut raw: Vec<u8> = Vec::new();
    for n in 1..=20 {
        raw.extend_from_slice(format!("{{\"id\":{n},\"doc\":{{\"n\":{n}}}}}\n").as_bytes());
        let extra: &[u8] = match n {
            5 => b"{\"id\":100,\"doc\":{\"n\":\n",
            9 => b"{\"id\":\"101\",\"doc\":{}}\n",
            12 => b"{\"id\":102,\"doc\":{\"n\":\"\xff\"}}\n",
            15 => b"{\"id\":200,\"doc\":{\"other\":1}}\n",
            18 => b"{\"id\":201,\"doc\":{\"other\":2}}\n",
            _ => b"",
        };
        raw.extend_from_slice(extra);
    }
    let stored = zstd::encode_all(&raw[..], 3).unwrap();
    let path = "handmade/_all/p/x/entities/ledger/000000-0000-r.jsonl.zst".to_string();
    storage.put(&path, stored.clone()).await.unwrap();
    PartInfo {
        part: 0,
        path,
        first_key: Some("1".into()),
        last_key: Some("20".into()),
        rows: 25,
        raw_bytes: raw.len() as u64,
        compressed_bytes: stored.len() as u64,
        blake3: blake3::hash(&stored).to_hex().to_string(),
    }
}

async fn count(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(r#"SELECT count(*) FROM "Ledger""#, &[])
        .await
        .unwrap()
        .get(0)
}

fn ledger_spec() -> EntitySpec {
    let mut spec = BackupPlan::new("p")
        .entity(BackupEntity::new("ledger", "Ledger"))
        .entity_specs()
        .remove(0);
    spec.key_type = Some(KeyType::Bigint);
    spec
}

#[tokio::test]
async fn unparsable_lines_and_refused_rows_are_isolated_then_replayed() {
    let database = TestDatabase::create().await;
    let client = database.client().await;
    client
        .batch_execute(
            r#"CREATE TABLE "Ledger" ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL,
                                      CONSTRAINT has_n CHECK ("Json" ? 'n'));"#,
        )
        .await
        .unwrap();
    let storage = storage_of(&database);
    let part = crafted_part(&storage).await;
    let target = Source::new(&database.url, 2).unwrap();
    let job = ImportPart {
        operation_id: Uuid::now_v7(),
        entity: ledger_spec(),
        target: RestoreTarget {
            mode: RestoreMode::Merge,
            target_scope: None,
            staging_table: None,
        },
        unit: 0,
        chunk: 0,
        part: part.clone(),
    };
    let events = MemoryEvents::granting();
    let outcome = import_part(
        &target,
        &storage,
        &events,
        &job,
        0,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(outcome, Outcome::Ack);
    let recorded = events.events();
    let [WorkerEvent::PartImported(imported)] = recorded.as_slice() else {
        panic!("{recorded:?}");
    };
    assert_eq!(imported.rows_written, 20);
    assert_eq!(imported.raw_bytes, part.raw_bytes);
    let mut failures: Vec<&RowFailure> = imported.failures.iter().collect();
    failures.sort_by_key(|failure| failure.line_no);
    let summary: Vec<(Option<u64>, &str)> = failures
        .iter()
        .map(|failure| (failure.line_no, failure.code.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (Some(6), "unparsable_line"),
            (Some(11), "unparsable_line"),
            (Some(15), "unparsable_line"),
            (Some(19), "constraint_violation"),
            (Some(23), "constraint_violation"),
        ]
    );
    assert!(
        failures
            .iter()
            .all(|failure| failure.part.as_deref() == Some(part.path.as_str()))
    );
    assert_eq!(failures[0].line, "{\"id\":100,\"doc\":{\"n\":");
    assert!(
        failures[2].reason.contains("UTF-8"),
        "{}",
        failures[2].reason
    );
    assert!(
        failures[3].reason.contains("has_n"),
        "{}",
        failures[3].reason
    );
    assert_eq!(failures[3].key.as_deref(), Some("200"));
    assert_eq!(count(&client).await, 20);

    // The cause is fixed; replay the five diagnostics, twice.
    client
        .batch_execute(r#"ALTER TABLE "Ledger" DROP CONSTRAINT has_n"#)
        .await
        .unwrap();
    let replay = ReplayJob {
        operation_id: Uuid::now_v7(),
        restore_id: job.operation_id,
        entity: ledger_spec(),
        target: job.target.clone(),
        lines: failures
            .iter()
            .enumerate()
            .map(|(index, failure)| ReplayLine {
                diagnostic_id: index as i64 + 1,
                line: failure.line.clone(),
            })
            .collect(),
    };
    for _ in 0..2 {
        let events = MemoryEvents::granting();
        let outcome = replay_rows(&target, &events, &replay, 0).await.unwrap();
        assert_eq!(outcome, Outcome::Ack);
        let recorded = events.events();
        let [WorkerEvent::ReplayDone(done)] = recorded.as_slice() else {
            panic!("{recorded:?}");
        };
        assert_eq!(done.resolved, [4, 5]);
        let failed: Vec<(i64, &str)> = done
            .failed
            .iter()
            .map(|failed| (failed.diagnostic_id, failed.failure.code.as_str()))
            .collect();
        assert_eq!(
            failed,
            [
                (1, "unparsable_line"),
                (2, "unparsable_line"),
                (3, "unparsable_line")
            ]
        );
        assert_eq!(count(&client).await, 22);
    }
}

#[tokio::test]
async fn replace_restores_swap_the_staged_rows_in() {
    let source_database = TestDatabase::create().await;
    let source_client = source_database.client().await;
    source_client.batch_execute(LEDGER).await.unwrap();
    let plan_spec =
        BackupPlan::new("ledger").entity(BackupEntity::new("ledger", "Ledger").chunk_rows(150));
    let source = Source::new(&source_database.url, 4).unwrap();
    let storage = storage_of(&source_database);
    let (manifest, path) = backup(&source, &storage, &plan_spec, 8 * 1024).await;

    let target_database = TestDatabase::create().await;
    let target_client = target_database.client().await;
    target_client
        .batch_execute(
            r#"CREATE TABLE "Ledger" ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);
               INSERT INTO "Ledger" SELECT n, '{"stale": true}' FROM generate_series(1, 30) n;"#,
        )
        .await
        .unwrap();
    let target = Source::new(&target_database.url, 4).unwrap();
    let operation_id = Uuid::now_v7();
    let entities = plan(
        &target,
        &storage,
        &manifest,
        &path,
        RestoreMode::Replace,
        operation_id,
    )
    .await
    .unwrap();
    let staging = entities[0].staging_table.clone().expect("a staging table");
    let events = import_all(
        &target,
        &storage,
        &entities,
        RestoreMode::Replace,
        operation_id,
    )
    .await;
    let applied: Vec<_> = events
        .iter()
        .filter_map(|event| match event {
            WorkerEvent::RestoreApplied(applied) => Some(applied),
            _ => None,
        })
        .collect();
    assert_eq!(applied.len(), 1, "{events:?}");
    assert_eq!(
        (applied[0].rows_written, applied[0].rows_removed),
        (500, 30)
    );
    assert_eq!(
        dump(&target_client, "Ledger").await,
        dump(&source_client, "Ledger").await
    );
    let left: i64 = target_client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = $1",
            &[&staging],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the staging table {staging} is dropped");
}

#[tokio::test]
async fn planning_refuses_what_it_cannot_restore() {
    let source_database = TestDatabase::create().await;
    source_database
        .client()
        .await
        .batch_execute(LEDGER)
        .await
        .unwrap();
    let plan_spec = BackupPlan::new("ledger").entity(BackupEntity::new("ledger", "Ledger"));
    let source = Source::new(&source_database.url, 2).unwrap();
    let storage = storage_of(&source_database);
    let (manifest, path) = backup(&source, &storage, &plan_spec, 64 * 1024).await;

    let target_database = TestDatabase::create().await;
    target_database
        .client()
        .await
        .batch_execute(r#"CREATE TABLE "Ledger" ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL)"#)
        .await
        .unwrap();
    let target = Source::new(&target_database.url, 2).unwrap();
    let failed = |events: Vec<WorkerEvent>| match events.as_slice() {
        [WorkerEvent::OperationFailed(failed)] => (failed.code.clone(), failed.error.clone()),
        other => panic!("expected OperationFailed, got {other:?}"),
    };

    let events = plan(
        &target,
        &storage,
        &manifest,
        &path,
        RestoreMode::Replace,
        Uuid::now_v7(),
    )
    .await
    .unwrap_err();
    let (code, error) = failed(events);
    assert_eq!(code, "key_type_mismatch");
    assert!(
        error.contains("key column Id") && error.contains("Ledger"),
        "{error}"
    );

    let events = MemoryEvents::granting();
    let job = PlanRestore {
        operation_id: Uuid::now_v7(),
        backup_id: manifest.backup_id,
        manifest_path: path.clone(),
        mode: RestoreMode::Merge,
        entities: vec!["ledger".into(), "ghost".into()],
        target_scope: None,
    };
    assert_eq!(
        plan_restore(&target, &storage, &events, &job, 0)
            .await
            .unwrap(),
        Outcome::Ack
    );
    let (code, error) = failed(events.events());
    assert_eq!(code, "unknown_entity");
    assert!(
        error.contains("'ghost'") && error.contains("ledger"),
        "{error}"
    );

    let gone = format!(
        "{}/elsewhere/manifest.json",
        path.rsplit_once('/').unwrap().0
    );
    let events = plan(
        &target,
        &storage,
        &manifest,
        &gone,
        RestoreMode::Merge,
        Uuid::now_v7(),
    )
    .await
    .unwrap_err();
    let (code, error) = failed(events);
    assert_eq!(code, "manifest_missing");
    assert!(error.contains(&gone), "{error}");
}
