//! The PostgreSQL state store: the conformance suite, plus what is specific to
//! PostgreSQL (concurrent migrations, concurrent drainers, event pacing).
//!
//! Needs PostgreSQL on 127.0.0.1:5432 with trust auth for `postgres`
//! (`KOAN_TEST_DATABASE_URL` overrides); each test works in a schema of its own.

#![allow(clippy::unwrap_used)]

mod common;
mod conformance;

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;

use common::{Recorder, TestSchema};
use koan_coordinator::StateStore;
use koan_coordinator::store::Policy;

macro_rules! conformance {
    ($($module:ident :: $check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let schema = TestSchema::new().await;
                let store = schema.store(conformance::policy()).await;
                conformance::$module::$check(&store).await;
                store.close();
            }
        )+
    };
}

/// Checks that drive the store through `Commands`, which holds it in an `Arc`.
macro_rules! conformance_commands {
    ($($module:ident :: $check:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let schema = TestSchema::new().await;
                let store = std::sync::Arc::new(schema.store(conformance::policy()).await);
                conformance::$module::$check(std::sync::Arc::clone(&store)).await;
                store.close();
            }
        )+
    };
}

// The checks are listed once, for every backend.
include!("conformance/list.rs");
for_each_conformance_check!(conformance, conformance_commands);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_starting_together_migrate_once() {
    let schema = TestSchema::new().await;
    let policy = conformance::policy();
    let (first, second, third) = tokio::join!(
        schema.store(policy),
        schema.store(policy),
        schema.store(policy)
    );
    assert_eq!(first.token_secret(), second.token_secret());
    assert_eq!(first.token_secret(), third.token_secret());
    assert_ne!(first.token_secret(), &[0u8; 32]);
    // Reconnecting keeps the secret: tokens survive restarts.
    let again = schema.store(policy).await;
    assert_eq!(again.token_secret(), first.token_secret());
    let (client, connection) = tokio_postgres::connect(schema.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let versions = client
        .query(
            &format!("SELECT version FROM \"{}\".schema_migrations", schema.name),
            &[],
        )
        .await
        .unwrap();
    let mut versions: Vec<i32> = versions.iter().map(|row| row.get(0)).collect();
    versions.sort_unstable();
    assert_eq!(versions, [1, 2, 3, 4, 5], "every migration once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_drainers_never_publish_twice() {
    let schema = TestSchema::new().await;
    let first = schema.store(conformance::policy()).await;
    let second = schema.store(conformance::policy()).await;
    for _ in 0..20 {
        let operation_id = conformance::submit(&first).await;
        conformance::changes(&first, conformance::planned(operation_id, "orders", 10)).await;
    }
    let (first_sink, second_sink) = (Recorder::default(), Recorder::default());
    let (a, b) = tokio::join!(
        drain_until_empty(&first, &first_sink),
        drain_until_empty(&second, &second_sink)
    );
    let published = a + b;
    let mut ids = HashSet::new();
    for message in first_sink.taken().iter().chain(second_sink.taken().iter()) {
        assert!(
            ids.insert(message.message_id),
            "published twice: {message:?}"
        );
    }
    // 20 × (2 plan jobs + 1 event) + 20 × (10 export jobs + 1 event)
    assert_eq!(published, 20 * 3 + 20 * 11);
    assert_eq!(ids.len(), published);
}

async fn drain_until_empty(store: &koan_coordinator::PgStateStore, sink: &Recorder) -> usize {
    let mut published = 0;
    let mut idle = 0;
    while idle < 20 {
        let drained = store.drain_outbox(sink, 7).await.unwrap();
        published += drained.published;
        if drained.published == 0 {
            idle += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    published
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_events_are_paced_but_never_lost() {
    let schema = TestSchema::new().await;
    let store = schema
        .store(Policy {
            progress_interval: Duration::from_secs(3600),
            ..conformance::policy()
        })
        .await;
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
    let events = conformance::events(&conformance::drain(&store, 100).await);
    // Submission, and the move to running; the progress reports are held back.
    let states: Vec<_> = events
        .iter()
        .map(|event| event.report().state.as_str())
        .collect();
    assert_eq!(states, ["planning", "running"]);
    assert_eq!(
        store.flush_progress(Utc::now()).await.unwrap(),
        0,
        "interval not over"
    );
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
    // Terminal events are never held back.
    conformance::changes(
        &store,
        conformance::chunk_failed(operation_id, "orders", 0, "r1", false),
    )
    .await;
    let events = conformance::events(&conformance::drain(&store, 100).await);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].report().state.as_str(), "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivered_restore_reports_apply_once_across_coordinators() {
    use koan_coordinator::store::Applied;
    use koan_protocol::commands::RestoreMode;

    let schema = TestSchema::new().await;
    let first = schema.store(conformance::policy()).await;
    let second = schema.store(conformance::policy()).await;
    let backup_id = conformance::completed_backup(&first).await;
    let restore_id =
        conformance::restore(&first, backup_id, RestoreMode::Overwrite, &["orders"], None).await;
    let planned = conformance::restore_planned(restore_id, &[("orders", 2)], false);
    let failures = vec![conformance::row_failure("orders", "k", "type_mismatch")];
    let imported = conformance::imported(restore_id, "orders", 0, 40, failures);
    // Two coordinators receive copies of the same reports at once.
    let (a, b) = tokio::join!(first.apply(&planned), second.apply(&planned));
    let outcomes = [a.unwrap(), b.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|applied| **applied == Applied::Changed)
            .count(),
        1,
        "{outcomes:?}"
    );
    let (a, b, c) = tokio::join!(
        first.apply(&imported),
        second.apply(&imported),
        first.apply(&imported)
    );
    let outcomes = [a.unwrap(), b.unwrap(), c.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|applied| **applied == Applied::Changed)
            .count(),
        1,
        "{outcomes:?}"
    );
    let report = conformance::report(&first, restore_id).await;
    assert_eq!((report.chunks_total, report.chunks_done), (2, 1));
    assert_eq!(
        (report.rows_done, report.rows_written, report.rows_failed),
        (50, 40, 1)
    );
    assert_eq!(
        first.diagnostics(restore_id, true, 10).await.unwrap().len(),
        1
    );
    let imports = conformance::jobs(&conformance::drain(&first, 100).await)
        .into_iter()
        .filter(|(_, job)| matches!(job, koan_protocol::jobs::Job::ImportPart(_)))
        .count();
    assert_eq!(imports, 2, "one import job per unit");

    // Replays of one restore submitted at once are serialized (the restore's
    // row is locked); each carries every unresolved row, and writing a row
    // twice upserts it by key.
    let done = conformance::imported(restore_id, "orders", 1, 50, Vec::new());
    conformance::changes(&first, done).await;
    let replay = |operation_id| koan_coordinator::store::NewReplay {
        operation_id,
        command_id: None,
        restore_id,
        trace: None,
    };
    let (x, y) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    let (replay_x, replay_y) = (replay(x), replay(y));
    let (a, b) = tokio::join!(
        first.submit_replay(&replay_x),
        second.submit_replay(&replay_y)
    );
    for submission in [a.unwrap(), b.unwrap()] {
        assert!(
            matches!(
                submission,
                koan_coordinator::store::ReplaySubmission::Submitted(_)
            ),
            "{submission:?}"
        );
    }
    for id in [x, y] {
        let replay = conformance::report(&first, id).await;
        assert_eq!((replay.rows_total, replay.chunks_total), (1, 1));
    }
}
