//! Restore jobs against a fake store: what is pushed, aborted, committed,
//! reported and requeued. The same jobs against PostgreSQL are in
//! `tests/restore_postgres.rs`.

use std::sync::{Arc, Mutex};

use koan_protocol::archive::PartInfo;
use koan_protocol::commands::RestoreMode;
use koan_protocol::events::{RowFailure, WorkerEvent};
use koan_protocol::jobs::{ApplyRestore, ImportPart, ReplayJob, ReplayLine, RestoreTarget};
use koan_protocol::plan::{BackupEntity, BackupPlan, EntitySpec, KeyType};
use koan_protocol::topology::JOB_DELIVERY_LIMIT;
use koan_source::{ApplyOutcome, ImportLine, ImportOutcome, SourceError, StagingForm};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;
use crate::events::MemoryEvents;
use crate::jobs::apply::apply_restore;
use crate::jobs::replay::replay_rows;
use crate::jobs::target::ImportWriter;

/// A row as the fake store keeps it: key, version, document.
type Row = (String, Option<String>, String);

#[derive(Debug, Default)]
struct FakeState {
    committed: Vec<Row>,
    pushed_lines: Vec<u64>,
    aborted: usize,
    /// Keys the store refuses at commit, as a constraint would.
    rejected_keys: Vec<String>,
    /// Fail `begin_import` with a retryable error this many times.
    unreachable_times: usize,
    /// Refuse the first push of this many typed imports, as a source whose
    /// load table cannot take a row would.
    refuse_typed: usize,
    /// The form of each import begun.
    forms: Vec<StagingForm>,
    staging_dropped: Vec<String>,
    apply_error: bool,
}

#[derive(Debug, Clone, Default)]
struct FakeStore {
    state: Arc<Mutex<FakeState>>,
}

impl FakeStore {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }
}

fn unreachable() -> SourceError {
    SourceError::Unreachable {
        target: "127.0.0.1:5432/app as koan".into(),
        reason: "connection refused".into(),
    }
}

struct FakeSession {
    store: FakeStore,
    rows: Vec<(u64, Row, String)>,
    /// The first push fails with `RowsRefused`.
    refuse: bool,
}

impl RestoreStore for FakeStore {
    type Session = FakeSession;

    async fn prepare_target(&self, entity: &EntitySpec) -> Result<EntitySpec, SourceError> {
        Ok(entity.clone())
    }

    async fn prepare_replace(
        &self,
        entity: &EntitySpec,
        operation_id: Uuid,
        _target_scope: Option<&str>,
    ) -> Result<(EntitySpec, String), SourceError> {
        let table = format!("koan_staging_{}_{}", entity.name, operation_id.simple());
        Ok((entity.clone(), table))
    }

    async fn drop_staging(&self, _entity: &EntitySpec, table: &str) -> Result<(), SourceError> {
        self.state().staging_dropped.push(table.to_string());
        Ok(())
    }

    async fn begin_import(
        &self,
        _entity: &EntitySpec,
        _target: &RestoreTarget,
        form: StagingForm,
    ) -> Result<FakeSession, SourceError> {
        let mut state = self.state();
        state.forms.push(form);
        if state.unreachable_times > 0 {
            state.unreachable_times -= 1;
            return Err(unreachable());
        }
        let refuse = form == StagingForm::Typed && state.refuse_typed > 0;
        if refuse {
            state.refuse_typed -= 1;
        }
        Ok(FakeSession {
            store: self.clone(),
            rows: Vec::new(),
            refuse,
        })
    }

    async fn apply_staged(
        &self,
        _entity: &EntitySpec,
        _target: &RestoreTarget,
    ) -> Result<ApplyOutcome, SourceError> {
        if self.state().apply_error {
            return Err(SourceError::MissingTable {
                schema: "public".into(),
                table: "koan_stage_x".into(),
                hint: None,
            });
        }
        Ok(ApplyOutcome {
            rows_written: 7,
            rows_skipped: 0,
            rows_removed: 3,
            failures: Vec::new(),
        })
    }
}

impl ImportWriter for FakeSession {
    async fn push(&mut self, line: &ImportLine<'_>) -> Result<(), SourceError> {
        if self.refuse {
            return Err(SourceError::RowsRefused {
                context: "import of entity orders into koan_load_x".into(),
                reason: format!(
                    "line {}: a \\u escape, which jsonb may refuse",
                    line.line_no
                ),
            });
        }
        self.store.state().pushed_lines.push(line.line_no);
        self.rows.push((
            line.line_no,
            (
                line.key.to_string(),
                line.version.map(str::to_string),
                line.doc.to_string(),
            ),
            line.raw.to_string(),
        ));
        Ok(())
    }

    async fn abort(self) {
        self.store.state().aborted += 1;
    }

    async fn commit(self) -> Result<ImportOutcome, SourceError> {
        let mut state = self.store.state();
        let mut outcome = ImportOutcome {
            rows_written: 0,
            rows_skipped: 0,
            failures: Vec::new(),
        };
        for (line_no, row, raw) in self.rows {
            if state.rejected_keys.contains(&row.0) {
                outcome.failures.push(RowFailure {
                    key: Some(row.0.clone()),
                    part: Some("p".into()),
                    line_no: Some(line_no),
                    code: "constraint_violation".into(),
                    reason: "23514 violates check constraint".into(),
                    line: raw,
                });
                continue;
            }
            // Idempotent, like the real upsert.
            state.committed.retain(|existing| existing.0 != row.0);
            state.committed.push(row);
            outcome.rows_written += 1;
        }
        Ok(outcome)
    }
}

fn entity() -> EntitySpec {
    let mut spec = BackupPlan::new("p")
        .entity(BackupEntity::new("orders", "Order").version("$.v"))
        .entity_specs()
        .remove(0);
    spec.key_type = Some(KeyType::Bigint);
    spec
}

fn memory_storage() -> Storage {
    Storage::from_store(Arc::new(object_store::memory::InMemory::new()))
}

/// Stores `text` compressed at `path`; returns the part as a manifest would describe it.
async fn store_part(storage: &Storage, path: &str, text: &str) -> PartInfo {
    let stored = zstd::encode_all(text.as_bytes(), 3).unwrap();
    storage.put(path, stored.clone()).await.unwrap();
    PartInfo {
        part: 0,
        path: path.into(),
        first_key: None,
        last_key: None,
        rows: text.lines().count() as u64,
        raw_bytes: text.len() as u64,
        compressed_bytes: stored.len() as u64,
        blake3: blake3::hash(&stored).to_hex().to_string(),
    }
}

fn lines(count: u64) -> String {
    (1..=count)
        .map(|n| format!("{{\"id\":{n},\"v\":{n},\"doc\":{{\"n\":{n}}}}}\n"))
        .collect()
}

fn import_job(part: PartInfo) -> ImportPart {
    ImportPart {
        operation_id: Uuid::now_v7(),
        entity: entity(),
        target: RestoreTarget {
            mode: RestoreMode::Merge,
            target_scope: None,
            staging_table: None,
        },
        unit: 4,
        chunk: 1,
        part,
    }
}

async fn run_import(
    store: &FakeStore,
    storage: &Storage,
    job: &ImportPart,
    delivery: u32,
) -> (Outcome, Vec<WorkerEvent>) {
    let events = MemoryEvents::granting();
    let outcome = import_part(
        store,
        storage,
        &events,
        job,
        delivery,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    (outcome, events.events())
}

#[tokio::test]
async fn imports_a_part_and_isolates_unparsable_lines() {
    let storage = memory_storage();
    let mut text = lines(10);
    text.push_str("{\"id\":11,\"doc\":\n");
    text.push_str("{\"id\":\"twelve\",\"doc\":{}}\n");
    text.push_str(
        &lines(2)
            .replace("\"id\":1,", "\"id\":13,")
            .replace("\"id\":2,", "\"id\":14,"),
    );
    let part = store_part(
        &storage,
        "b/s/p/x/entities/orders/000001-0000-r.jsonl.zst",
        &text,
    )
    .await;
    let store = FakeStore::default();
    store.state().rejected_keys.push("5".into());
    let job = import_job(part.clone());
    let (outcome, events) = run_import(&store, &storage, &job, 0).await;
    assert_eq!(outcome, Outcome::Ack);
    let [WorkerEvent::PartImported(imported)] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(
        (imported.unit, imported.rows_written, imported.raw_bytes),
        (4, 11, part.raw_bytes)
    );
    let codes: Vec<(&str, Option<u64>)> = imported
        .failures
        .iter()
        .map(|failure| (failure.code.as_str(), failure.line_no))
        .collect();
    assert_eq!(
        codes,
        [
            ("unparsable_line", Some(11)),
            ("unparsable_line", Some(12)),
            ("constraint_violation", Some(5))
        ]
    );
    assert_eq!(imported.failures[0].line, "{\"id\":11,\"doc\":");
    assert_eq!(
        imported.failures[0].part.as_deref(),
        Some(part.path.as_str())
    );
    assert!(imported.failures[1].reason.contains("key type is bigint"));
    let state = store.state();
    assert_eq!(state.committed.len(), 11);
    assert_eq!(
        state.committed[0],
        (
            "1".to_string(),
            Some("1".to_string()),
            "{\"n\":1}".to_string()
        )
    );
    assert_eq!(state.aborted, 0);
}

#[tokio::test]
async fn a_part_refused_as_typed_is_read_again_and_staged_as_text() {
    let storage = memory_storage();
    let part = store_part(
        &storage,
        "b/s/p/x/entities/orders/000001-0000-r.jsonl.zst",
        &lines(6),
    )
    .await;
    let store = FakeStore::default();
    store.state().refuse_typed = 1;
    let mut job = import_job(part.clone());
    job.target.mode = RestoreMode::Replace;
    job.target.staging_table = Some("koan_stage_x_orders".into());
    let (outcome, events) = run_import(&store, &storage, &job, 0).await;
    assert_eq!(outcome, Outcome::Ack);
    let [WorkerEvent::PartImported(imported)] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(
        (imported.rows_written, imported.raw_bytes),
        (6, part.raw_bytes)
    );
    assert!(imported.failures.is_empty());
    let state = store.state();
    assert_eq!(state.forms, [StagingForm::Typed, StagingForm::Text]);
    assert_eq!(state.aborted, 1, "the refused attempt is rolled back");
    assert_eq!(
        state.committed.len(),
        6,
        "every row once, from the text attempt"
    );
    assert_eq!(state.pushed_lines, [1, 2, 3, 4, 5, 6]);
}

#[tokio::test]
async fn a_damaged_part_writes_nothing() {
    let storage = memory_storage();
    let store = FakeStore::default();
    let part = store_part(&storage, "b/p1.jsonl.zst", &lines(3_000)).await;

    // One flipped byte: hash mismatch, whatever zstd makes of it.
    let mut stored = storage.get(&part.path).await.unwrap().to_vec();
    let middle = stored.len() / 2;
    stored[middle] ^= 0x20;
    storage.put(&part.path, stored).await.unwrap();
    let (outcome, events) = run_import(&store, &storage, &import_job(part.clone()), 0).await;
    assert_eq!(outcome, Outcome::Ack);
    let [WorkerEvent::ImportFailed(failed)] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(failed.code, "hash_mismatch");
    assert!(!failed.retryable);
    assert!(
        failed.error.contains(&part.path) && failed.error.contains(&part.blake3),
        "{}",
        failed.error
    );
    assert!(failed.error.contains("nothing from it was written"));

    // The manifest expects another row count.
    let mut wrong_rows = store_part(&storage, "b/p2.jsonl.zst", &lines(20)).await;
    wrong_rows.rows = 21;
    let (_, events) = run_import(&store, &storage, &import_job(wrong_rows), 0).await;
    assert!(
        matches!(events.as_slice(), [WorkerEvent::ImportFailed(failed)] if failed.code == "row_count_mismatch" && failed.error.contains("expected 21 rows, found 20")),
        "{events:?}"
    );

    // Another stored size: refused before a transaction is opened.
    let mut wrong_size = store_part(&storage, "b/p3.jsonl.zst", &lines(20)).await;
    wrong_size.compressed_bytes += 1;
    let (_, events) = run_import(&store, &storage, &import_job(wrong_size), 0).await;
    assert!(
        matches!(events.as_slice(), [WorkerEvent::ImportFailed(failed)] if failed.code == "size_mismatch"),
        "{events:?}"
    );

    // Gone.
    let mut missing = part.clone();
    missing.path = "b/gone.jsonl.zst".into();
    let (outcome, events) = run_import(&store, &storage, &import_job(missing), 0).await;
    assert_eq!(outcome, Outcome::Ack);
    assert!(
        matches!(events.as_slice(), [WorkerEvent::ImportFailed(failed)] if failed.code == "missing_part" && !failed.retryable && failed.error.contains("b/gone.jsonl.zst")),
        "{events:?}"
    );

    let state = store.state();
    assert!(state.committed.is_empty());
    assert_eq!(
        state.aborted, 2,
        "the two parts that were read were rolled back"
    );
}

#[tokio::test]
async fn retryable_errors_requeue_until_the_last_delivery() {
    let storage = memory_storage();
    let part = store_part(&storage, "b/p.jsonl.zst", &lines(5)).await;
    let job = import_job(part);
    let store = FakeStore::default();
    store.state().unreachable_times = 2;
    let (outcome, events) = run_import(&store, &storage, &job, 0).await;
    assert_eq!(outcome, Outcome::Requeue);
    assert!(
        matches!(events.as_slice(), [WorkerEvent::ImportFailed(failed)] if failed.retryable && failed.code == "unreachable" && failed.error.contains("b/p.jsonl.zst")),
        "{events:?}"
    );
    let (outcome, events) = run_import(&store, &storage, &job, JOB_DELIVERY_LIMIT - 1).await;
    assert_eq!(outcome, Outcome::Ack);
    assert!(
        matches!(events.as_slice(), [WorkerEvent::ImportFailed(failed)] if !failed.retryable),
        "{events:?}"
    );
    // Importing twice leaves the same rows.
    for _ in 0..2 {
        let (outcome, _) = run_import(&store, &storage, &job, 0).await;
        assert_eq!(outcome, Outcome::Ack);
    }
    assert_eq!(store.state().committed.len(), 5);
}

#[tokio::test]
async fn shutdown_aborts_and_requeues() {
    let storage = memory_storage();
    let part = store_part(&storage, "b/p.jsonl.zst", &lines(5)).await;
    let store = FakeStore::default();
    let events = MemoryEvents::granting();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let outcome = import_part(&store, &storage, &events, &import_job(part), 0, &cancel)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Requeue);
    assert!(events.events().is_empty());
    assert_eq!(store.state().aborted, 1);
    assert!(store.state().committed.is_empty());
}

#[tokio::test]
async fn replay_maps_failures_back_to_diagnostics() {
    let store = FakeStore::default();
    store.state().rejected_keys.push("2".into());
    let job = ReplayJob {
        operation_id: Uuid::now_v7(),
        restore_id: Uuid::now_v7(),
        entity: entity(),
        target: RestoreTarget {
            mode: RestoreMode::Replace,
            target_scope: None,
            staging_table: Some("koan_staging_gone".into()),
        },
        lines: vec![
            ReplayLine {
                diagnostic_id: 10,
                line: "{\"id\":1,\"doc\":{}}\n".into(),
            },
            ReplayLine {
                diagnostic_id: 11,
                line: "{\"id\":2,\"doc\":{}}".into(),
            },
            ReplayLine {
                diagnostic_id: 12,
                line: "{broken".into(),
            },
            ReplayLine {
                diagnostic_id: 13,
                line: "{\"id\":3,\"v\":2,\"doc\":[]}".into(),
            },
        ],
    };
    let events = MemoryEvents::granting();
    assert_eq!(
        replay_rows(&store, &events, &job, 0).await.unwrap(),
        Outcome::Ack
    );
    let recorded = events.events();
    let [WorkerEvent::ReplayDone(done)] = recorded.as_slice() else {
        panic!("{recorded:?}");
    };
    assert_eq!(done.resolved, [10, 13]);
    let failed: Vec<(i64, &str)> = done
        .failed
        .iter()
        .map(|failed| (failed.diagnostic_id, failed.failure.code.as_str()))
        .collect();
    assert_eq!(
        failed,
        [(12, "unparsable_line"), (11, "constraint_violation")]
    );
    assert!(
        done.failed
            .iter()
            .all(|failed| failed.failure.line_no.is_none())
    );
    assert_eq!(done.failed[0].failure.line, "{broken");
    assert_eq!(store.state().pushed_lines, [1, 2, 4]);
    assert_eq!(store.state().committed.len(), 2);
}

#[tokio::test]
async fn apply_reports_and_drops_the_staging_table_of_a_failure() {
    let store = FakeStore::default();
    let mut job = ApplyRestore {
        operation_id: Uuid::now_v7(),
        entity: entity(),
        target: RestoreTarget {
            mode: RestoreMode::Replace,
            target_scope: None,
            staging_table: Some("koan_staging_orders".into()),
        },
    };
    let events = MemoryEvents::granting();
    let cancel = CancellationToken::new();
    assert_eq!(
        apply_restore(&store, &events, &job, 0, &cancel)
            .await
            .unwrap(),
        Outcome::Ack
    );
    assert!(
        matches!(events.events().as_slice(), [WorkerEvent::RestoreApplied(applied)] if applied.rows_written == 7 && applied.rows_removed == 3 && applied.entity == "orders"),
        "{:?}",
        events.events()
    );
    assert!(
        store.state().staging_dropped.is_empty(),
        "the store drops it"
    );

    store.state().apply_error = true;
    let events = MemoryEvents::granting();
    assert_eq!(
        apply_restore(&store, &events, &job, 0, &cancel)
            .await
            .unwrap(),
        Outcome::Ack
    );
    assert!(
        matches!(events.events().as_slice(), [WorkerEvent::OperationFailed(failed)] if failed.code == "missing_table" && failed.error.contains("entity orders")),
        "{:?}",
        events.events()
    );
    assert_eq!(store.state().staging_dropped, ["koan_staging_orders"]);

    job.target.staging_table = None;
    let events = MemoryEvents::granting();
    assert_eq!(
        apply_restore(&store, &events, &job, 0, &cancel)
            .await
            .unwrap(),
        Outcome::Ack
    );
    assert!(
        matches!(events.events().as_slice(), [WorkerEvent::OperationFailed(failed)] if failed.code == "no_staging_table"),
        "{:?}",
        events.events()
    );
}
