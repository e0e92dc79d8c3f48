//! Verify against archives written by the export jobs into a temporary
//! directory, then damaged on purpose.
//!
//! Needs PostgreSQL on 127.0.0.1:5432 with trust auth for user `postgres`
//! (to make the backups). Each test creates its own database and drops it afterwards.

#![allow(clippy::unwrap_used)]

mod common;

use koan_protocol::events::WorkerEvent;
use koan_protocol::plan::{BackupEntity, BackupPlan};
use koan_source::Source;
use koan_worker::Storage;

use common::TestDatabase;
use common::archive::{backup, verify, verify_problems};

const LEDGER: &str = r#"
    CREATE TABLE "Ledger" ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);
    INSERT INTO "Ledger"
    SELECT n::bigint * 1000000000, jsonb_build_object('meta', jsonb_build_object('version', n % 5), 'n', n)
    FROM generate_series(-50, 449) n;"#;

#[tokio::test]
async fn verify_names_every_bad_part() {
    let database = TestDatabase::create().await;
    let client = database.client().await;
    client.batch_execute(LEDGER).await.unwrap();
    let plan_spec =
        BackupPlan::new("ledger").entity(BackupEntity::new("ledger", "Ledger").chunk_rows(100));
    let source = Source::new(&database.url, 4).unwrap();
    let storage = Storage::open(&database.directory.display().to_string()).unwrap();
    let (mut manifest, path) = backup(&source, &storage, &plan_spec, 4 * 1024).await;
    assert!(verify_problems(&verify(&storage, &manifest, &path).await).is_empty());

    let chunks = &mut manifest.entities[0].chunks;
    assert!(
        chunks.len() >= 4 && chunks[3].parts.len() >= 2,
        "{chunks:?}"
    );
    let missing = chunks[0].parts[0].path.clone();
    storage.delete(&missing).await.unwrap();
    let truncated = chunks[1].parts[0].path.clone();
    let bytes = storage.get(&truncated).await.unwrap();
    storage
        .put(&truncated, bytes[..bytes.len() - 20].to_vec())
        .await
        .unwrap();
    let relabelled = chunks[2].parts[0].path.clone();
    chunks[2].parts[0].last_key = Some("123".into());
    // The chunk's range shrinks under its last part's keys.
    let narrowed = chunks[3].parts[1].path.clone();
    chunks[3].range.hi = chunks[3].parts[1].first_key.clone();
    storage
        .put(&path, serde_json::to_vec(&manifest).unwrap())
        .await
        .unwrap();

    let problems = verify_problems(&verify(&storage, &manifest, &path).await);
    let about = |path: &str| -> Vec<&String> {
        problems
            .iter()
            .filter(|problem| problem.starts_with(path))
            .collect()
    };
    assert_eq!(about(&missing), [&format!("{missing}: missing")]);
    let truncated_problems = about(&truncated);
    for expected in ["size mismatch", "hash mismatch", "truncated"] {
        assert!(
            truncated_problems
                .iter()
                .any(|problem| problem.contains(expected)),
            "{expected}: {truncated_problems:?}"
        );
    }
    assert_eq!(about(&relabelled).len(), 1, "{problems:?}");
    assert!(about(&relabelled)[0].contains("last key mismatch: expected '123'"));
    assert_eq!(about(&narrowed).len(), 1, "{problems:?}");
    assert!(about(&narrowed)[0].contains("outside the chunk's range"));
    assert_eq!(
        problems.len(),
        2 + truncated_problems.len() + 1,
        "no other part is named: {problems:?}"
    );

    // A manifest of another format is a problem; a missing one fails the operation.
    let mut future = serde_json::to_value(&manifest).unwrap();
    future["format_version"] = 2.into();
    storage
        .put(&path, serde_json::to_vec(&future).unwrap())
        .await
        .unwrap();
    let problems = verify_problems(&verify(&storage, &manifest, &path).await);
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("format version 2"), "{problems:?}");
    storage.delete(&path).await.unwrap();
    let events = verify(&storage, &manifest, &path).await;
    assert!(
        matches!(events.as_slice(), [WorkerEvent::OperationFailed(failed)] if failed.code == "manifest_missing" && failed.error.contains(&path)),
        "{events:?}"
    );
}
