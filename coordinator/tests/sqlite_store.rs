//! The SQLite state store: the conformance suite (on a file, as the embedded
//! mode runs it, and in memory), plus what is specific to SQLite: reopening a
//! file keeps its operations, outbox and token secret; drains of one file
//! never publish a message twice; held-back progress is flushed.

#![allow(clippy::unwrap_used)]

mod common;
mod conformance;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use uuid::Uuid;

use common::Recorder;
use koan_coordinator::store::{Applied, Policy, SqliteStateStore, StateStore};
use koan_coordinator::{CoordinatorError, SqliteStateStore as Exported};
use koan_protocol::events::OperationEvent;
use koan_protocol::jobs::Job;
use koan_protocol::progress::OperationState;

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("koan-sqlite-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    /// The database file in this directory.
    fn db(&self) -> PathBuf {
        self.0.join("state.sqlite")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open(path: &Path, policy: Policy) -> SqliteStateStore {
    SqliteStateStore::open(path, policy)
        .unwrap_or_else(|error| panic!("opening {}: {error}", path.display()))
}

/// Every conformance check on a fresh file store, in WAL mode as in production.
mod file {
    use super::*;

    macro_rules! file_check {
        ($($module:ident :: $check:ident),+ $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let dir = TempDir::new();
                    let store = open(&dir.db(), crate::conformance::policy());
                    crate::conformance::$module::$check(&store).await;
                }
            )+
        };
    }

    macro_rules! file_command_check {
        ($($module:ident :: $check:ident),+ $(,)?) => {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let dir = TempDir::new();
                    let store = Arc::new(open(&dir.db(), crate::conformance::policy()));
                    crate::conformance::$module::$check(Arc::clone(&store)).await;
                }
            )+
        };
    }

    include!("conformance/list.rs");
    for_each_conformance_check!(file_check, file_command_check);
}

/// Every conformance check on a fresh in-memory store (on a current-thread
/// runtime: transactions run on the blocking pool either way).
mod memory {
    use super::*;

    fn store() -> SqliteStateStore {
        SqliteStateStore::in_memory(crate::conformance::policy()).unwrap()
    }

    macro_rules! memory_check {
        ($($module:ident :: $check:ident),+ $(,)?) => {
            $(
                #[tokio::test]
                async fn $check() {
                    crate::conformance::$module::$check(&store()).await;
                }
            )+
        };
    }

    macro_rules! memory_command_check {
        ($($module:ident :: $check:ident),+ $(,)?) => {
            $(
                #[tokio::test]
                async fn $check() {
                    crate::conformance::$module::$check(Arc::new(store())).await;
                }
            )+
        };
    }

    include!("conformance/list.rs");
    for_each_conformance_check!(memory_check, memory_command_check);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_file_keeps_its_operations_outbox_and_secret() {
    let dir = TempDir::new();
    let policy = conformance::policy();
    let store = open(&dir.db(), policy);
    let secret = *store.token_secret();
    assert_ne!(secret, [0u8; 32]);
    let operation_id = conformance::submit(&store).await;
    conformance::changes(&store, conformance::planned(operation_id, "orders", 2)).await;
    assert!(
        conformance::claim(&store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    conformance::changes(
        &store,
        conformance::part(operation_id, "orders", 0, 0, "r1", 60, "k0060"),
    )
    .await;
    let before = conformance::report(&store, operation_id).await;
    let queued = conformance::drain(&store, 3).await;
    assert!(!queued.is_empty());
    // Queued after the drain: must survive the restart unpublished.
    conformance::changes(
        &store,
        conformance::progress(operation_id, "orders", 0, "r1", 5),
    )
    .await;
    drop(store);

    let store = open(&dir.db(), policy);
    assert_eq!(
        store.token_secret(),
        &secret,
        "the secret is kept in the file"
    );
    assert_eq!(store.path(), Some(dir.db().as_path()));
    let after = conformance::report(&store, operation_id).await;
    assert_eq!(after.state, OperationState::Planning);
    assert_eq!(after.sequence, before.sequence + 1);
    assert_eq!((after.rows_done, after.chunks_total), (65, 2));
    assert_eq!(after.labels, before.labels);
    assert_eq!(after.created_at, before.created_at);
    // A token issued before the restart names the same durable position.
    let token = before.continuation_token.unwrap();
    assert_eq!(after.continuation_token.as_deref(), Some(token.as_str()));
    let payload = koan_protocol::token::verify(&token, store.token_secret()).unwrap();
    assert_eq!(
        (payload.operation_id, payload.rows_done),
        (operation_id, 60)
    );
    assert_eq!(
        store
            .find_submission(Some(operation_id), None)
            .await
            .unwrap(),
        Some(operation_id)
    );
    let leftover = conformance::events(&conformance::drain(&store, 10).await);
    assert_eq!(
        leftover.len(),
        1,
        "the progress event queued before the restart"
    );
    assert_eq!(leftover[0].report().rows_done, 65);
    // The fencing state survived: the owner carries on, a stranger is ignored.
    conformance::ignored(
        &store,
        conformance::done(operation_id, "orders", 0, "r2", 1),
    )
    .await;
    conformance::changes(
        &store,
        conformance::done(operation_id, "orders", 0, "r1", 1),
    )
    .await;
    let claim = conformance::claim(&store, operation_id, "orders", 1, 1, "r3").await;
    assert!(claim.granted && claim.resume_after.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_secret_is_created_once_per_file() {
    let (first_dir, second_dir) = (TempDir::new(), TempDir::new());
    let policy = conformance::policy();
    let first = *open(&first_dir.db(), policy).token_secret();
    let second = *open(&second_dir.db(), policy).token_secret();
    assert_ne!(first, second, "each deployment has its own secret");
    for _ in 0..3 {
        assert_eq!(open(&first_dir.db(), policy).token_secret(), &first);
    }
    let memory = SqliteStateStore::in_memory(policy).unwrap();
    assert_ne!(memory.token_secret(), &first);
    // Reopening migrated nothing twice.
    let conn = rusqlite::Connection::open(first_dir.db()).unwrap();
    let migrations: i64 = conn
        .query_row("SELECT count(*) FROM schema_migrations", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(migrations, 3, "init, trace_context, metrics: each once");
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn a_file_that_cannot_be_created_is_named() {
    let dir = TempDir::new();
    let path = dir.0.join("missing").join("state.sqlite");
    let error = Exported::open(&path, conformance::policy()).unwrap_err();
    assert!(
        matches!(error, CoordinatorError::StoreUnreachable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("missing"), "{error}");
    assert!(error.is_retryable());
}

async fn drain_until_empty(store: &SqliteStateStore, sink: &Recorder) -> (usize, usize) {
    let (mut published, mut busy, mut idle) = (0, 0, 0);
    while idle < 20 {
        let drained = store.drain_outbox(sink, 7).await.unwrap();
        published += drained.published;
        busy += usize::from(drained.busy);
        if drained.published == 0 {
            idle += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    (published, busy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drains_of_one_file_never_publish_twice() {
    let dir = TempDir::new();
    let store = Arc::new(open(&dir.db(), conformance::policy()));
    // A second store on the same file (a second connection) shares its drain turn.
    let other = open(&dir.db(), conformance::policy());
    for _ in 0..10 {
        let operation_id = conformance::submit(store.as_ref()).await;
        conformance::changes(
            store.as_ref(),
            conformance::planned(operation_id, "orders", 10),
        )
        .await;
    }
    let sinks = [
        Recorder::default(),
        Recorder::default(),
        Recorder::default(),
    ];
    let ((a, _), (b, _), (c, _)) = tokio::join!(
        drain_until_empty(&store, &sinks[0]),
        drain_until_empty(&store, &sinks[1]),
        drain_until_empty(&other, &sinks[2]),
    );
    let mut ids = HashSet::new();
    let mut positions = Vec::new();
    for sink in &sinks {
        let taken = sink.taken();
        // Each drain publishes in outbox order.
        assert!(taken.windows(2).all(|pair| pair[0].id < pair[1].id));
        for message in taken {
            assert!(
                ids.insert(message.message_id),
                "published twice: {message:?}"
            );
            positions.push(message.id);
        }
    }
    // 10 × (2 plan jobs + 1 event) + 10 × (10 export jobs + 1 event)
    assert_eq!(a + b + c, 10 * 3 + 10 * 11);
    assert_eq!(ids.len(), a + b + c);
    positions.sort_unstable();
    positions.dedup();
    assert_eq!(positions.len(), a + b + c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_a_report_applied_at_once_change_the_state_once() {
    let store = SqliteStateStore::in_memory(conformance::policy()).unwrap();
    let operation_id = conformance::submit(&store).await;
    let planned = conformance::planned(operation_id, "orders", 2);
    let (a, b, c) = tokio::join!(
        store.apply(&planned),
        store.apply(&planned),
        store.apply(&planned)
    );
    let outcomes = [a.unwrap(), b.unwrap(), c.unwrap()];
    let changed = outcomes
        .iter()
        .filter(|applied| **applied == Applied::Changed)
        .count();
    assert_eq!(changed, 1, "{outcomes:?}");
    assert!(
        conformance::claim(&store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    let part = conformance::part(operation_id, "orders", 0, 0, "r1", 40, "k0040");
    let (a, b) = tokio::join!(store.apply(&part), store.apply(&part));
    assert_eq!(
        [a.unwrap(), b.unwrap()]
            .iter()
            .filter(|applied| **applied == Applied::Changed)
            .count(),
        1
    );
    let report = conformance::report(&store, operation_id).await;
    assert_eq!((report.rows_done, report.chunks_total), (40, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_back_progress_is_flushed_once() {
    let store = SqliteStateStore::in_memory(Policy {
        progress_interval: Duration::from_secs(3600),
        ..conformance::policy()
    })
    .unwrap();
    let operation_id = conformance::submit(&store).await;
    conformance::changes(&store, conformance::planned(operation_id, "orders", 2)).await;
    conformance::changes(&store, conformance::planned(operation_id, "invoices", 1)).await;
    assert!(
        conformance::claim(&store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    for rows in [10, 20, 30] {
        conformance::changes(
            &store,
            conformance::progress(operation_id, "orders", 0, "r1", rows),
        )
        .await;
    }
    let states: Vec<_> = conformance::events(&conformance::drain(&store, 100).await)
        .iter()
        .map(|event| event.report().state)
        .collect();
    assert_eq!(states, [OperationState::Planning, OperationState::Running]);
    assert_eq!(store.flush_progress(Utc::now()).await.unwrap(), 0);
    let later = Utc::now() + chrono::Duration::hours(2);
    assert_eq!(store.flush_progress(later).await.unwrap(), 1);
    assert_eq!(
        store.flush_progress(later).await.unwrap(),
        0,
        "announced once"
    );
    let flushed = conformance::events(&conformance::drain(&store, 100).await);
    assert_eq!(flushed.len(), 1);
    let latest = conformance::report(&store, operation_id).await;
    assert_eq!(flushed[0].report().sequence, latest.sequence);
    assert_eq!(flushed[0].report().rows_done, 30);
}

/// The `export_chunk` job of `entity` chunk `chunk` among `jobs`, at its latest attempt.
fn export_job(jobs: &[(String, Job)], entity: &str, chunk: u32) -> Job {
    jobs.iter()
        .rev()
        .find(|(_, job)| {
            matches!(job, Job::ExportChunk(export) if export.entity.name == entity && export.chunk == chunk)
        })
        .map(|(_, job)| job.clone())
        .unwrap()
}

// (`conformance::dead_jobs` covers dead-lettered jobs of every kind; this is
// the export job made stale by a lease expiry rather than by hand.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_job_superseded_by_a_lease_expiry_dies_harmlessly() {
    let store = SqliteStateStore::in_memory(conformance::policy()).unwrap();
    let operation_id = conformance::submit(&store).await;
    conformance::changes(&store, conformance::planned(operation_id, "orders", 2)).await;
    conformance::changes(&store, conformance::planned(operation_id, "invoices", 1)).await;
    assert!(
        conformance::claim(&store, operation_id, "orders", 0, 1, "r1")
            .await
            .granted
    );
    let first = conformance::jobs(&conformance::drain(&store, 100).await);
    let later = Utc::now() + chrono::Duration::hours(1);
    assert_eq!(store.reap_expired_leases(later).await.unwrap(), 1);
    let republished = export_job(
        &conformance::jobs(&conformance::drain(&store, 100).await),
        "orders",
        0,
    );
    assert!(matches!(&republished, Job::ExportChunk(job) if job.attempt == 2));
    assert_eq!(
        store
            .fail_dead_job(&export_job(&first, "orders", 0), "delivery limit")
            .await
            .unwrap(),
        Applied::Unchanged("a later attempt of the chunk was published")
    );
    assert_eq!(
        conformance::report(&store, operation_id).await.state,
        OperationState::Running
    );
    assert!(
        conformance::drain(&store, 100).await.is_empty(),
        "nothing queued"
    );
    // The re-published attempt dying fails the chunk and the backup.
    assert_eq!(
        store
            .fail_dead_job(&republished, "delivery limit")
            .await
            .unwrap(),
        Applied::Changed
    );
    let report = conformance::report(&store, operation_id).await;
    assert_eq!(report.state, OperationState::Failed);
    let error = report.error.unwrap();
    assert!(error.contains("entity 'orders' chunk 0"), "{error}");
    assert!(error.contains("(delivery limit)"), "{error}");
    let events = conformance::events(&conformance::drain(&store, 100).await);
    assert!(
        matches!(events.last(), Some(OperationEvent::Failed(_))),
        "{events:?}"
    );
}
