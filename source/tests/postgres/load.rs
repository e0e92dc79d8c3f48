//! `replace` into a missing Koan-layout table: parts loaded typed into a load
//! table that the apply renames into place, the text fallback for parts the
//! load refuses, and the staged writes when the swap cannot happen.

use koan_protocol::commands::RestoreMode;
use koan_protocol::plan::{EntitySpec, KeyType, ScopeMatch, VersionSource};
use koan_source::{PgSource, StagingForm};

use crate::support::{
    Archived, TestDb, archived, count, documents, import, koan_entity, push_all, restore_target,
};

fn tenant_doc(tenant: &str, n: i64) -> String {
    format!(r#"{{"n": {n}, "__koan_tenant": "{tenant}"}}"#)
}

/// A bigint-keyed entity with a version column and a scope column, as a
/// Koan table created by a restore has them.
fn columns_entity(table: &str) -> EntitySpec {
    let mut entity = koan_entity(table);
    entity.key_type = Some(KeyType::Bigint);
    entity.version = Some(VersionSource::Column("rev".into()));
    entity.scope_match = ScopeMatch::Column("tenant".into());
    entity.scope = Some("tenant-a".into());
    entity
}

async fn relation_exists(db: &TestDb, name: &str) -> bool {
    count(
        db,
        &format!("SELECT count(*) FROM pg_class WHERE relname = '{name}'"),
    )
    .await
        == 1
}

/// Imports `rows` as `part`, typed first and as text when the typed load refuses it.
async fn import_with_fallback(
    source: &PgSource,
    entity: &EntitySpec,
    staging: &str,
    part: &str,
    rows: &[Archived],
) -> bool {
    let mut target = restore_target(RestoreMode::Replace);
    target.staging_table = Some(staging.to_string());
    let mut session = source
        .begin_import(entity, &target, StagingForm::Typed)
        .await
        .expect("begin");
    let pushed = push_all(&mut session, part, rows).await;
    let typed = match pushed {
        Ok(()) => session.commit().await.map(|_| ()),
        Err(error) => {
            session.abort().await;
            Err(error)
        }
    };
    match typed {
        Ok(()) => true,
        Err(error) => {
            assert_eq!(error.code(), "rows_refused", "{error}");
            let mut session = source
                .begin_import(entity, &target, StagingForm::Text)
                .await
                .expect("begin text");
            push_all(&mut session, part, rows).await.expect("push text");
            session.commit().await.expect("commit text");
            false
        }
    }
}

#[tokio::test]
async fn a_missing_target_is_loaded_typed_and_renamed_into_place() {
    let db = TestDb::new().await;
    let source = db.source(3);
    let entity = columns_entity("fresh");
    let operation = uuid::Uuid::new_v4();
    let (prepared, staging) = source
        .prepare_replace(&entity, operation, None)
        .await
        .expect("prepare");
    assert_eq!(prepared.key_type, Some(KeyType::Bigint));
    let load = staging.replacen("koan_stage_", "koan_load_", 1);
    assert!(
        !relation_exists(&db, "fresh").await,
        "the target appears only when applied"
    );
    assert!(relation_exists(&db, &load).await && relation_exists(&db, &staging).await);
    assert_eq!(
        source
            .prepare_replace(&entity, operation, None)
            .await
            .expect("again")
            .1,
        staging,
        "idempotent"
    );

    let doc = |n: i64| format!(r#"{{"n": {n}}}"#);
    let part1: Vec<Archived> = (1..=3)
        .map(|n| archived(n, Some(&n.to_string()), &doc(n)))
        .collect();
    let part2 = vec![
        archived(4, Some("null"), &doc(4)),
        archived(5, None, &doc(5)),
    ];
    // `jsonb` would refuse neither row as text, but a typed load does not
    // take a `\u` escape nor a key that is not canonical.
    let part3 = vec![
        archived(6, None, r#"{"s": "a\u0001b"}"#),
        archived(7, None, &doc(7)),
    ];
    // jsonb refuses this number whichever way: the load fails at the server,
    // the text staging isolates the row at apply.
    let part4 = vec![
        archived(8, None, r#"{"n": 1e1000000}"#),
        archived(9, None, &doc(9)),
    ];
    assert!(import_with_fallback(&source, &prepared, &staging, "p1", &part1).await);
    assert!(import_with_fallback(&source, &prepared, &staging, "p2", &part2).await);
    assert!(
        import_with_fallback(&source, &prepared, &staging, "p1", &part1).await,
        "again"
    );
    assert!(!import_with_fallback(&source, &prepared, &staging, "p3", &part3).await);
    assert!(!import_with_fallback(&source, &prepared, &staging, "p4", &part4).await);
    let loaded = format!("SELECT count(*) FROM \"{load}\"");
    assert_eq!(count(&db, &loaded).await, 5, "each loaded part once");
    let markers = format!("SELECT count(*) FROM \"{staging}\" WHERE k IS NULL");
    assert_eq!(count(&db, &markers).await, 4);
    assert!(!relation_exists(&db, "fresh").await);

    let mut target = restore_target(RestoreMode::Replace);
    target.staging_table = Some(staging.clone());
    let outcome = source
        .apply_staged(&prepared, &target)
        .await
        .expect("apply");
    assert_eq!(
        (
            outcome.rows_written,
            outcome.rows_skipped,
            outcome.rows_removed
        ),
        (8, 0, 0)
    );
    let [failure] = outcome.failures.as_slice() else {
        panic!("{:?}", outcome.failures);
    };
    assert_eq!(
        (
            failure.key.as_deref(),
            failure.part.as_deref(),
            failure.line_no
        ),
        (Some("8"), Some("p4"), Some(1))
    );
    let rows = documents(&db, "fresh").await;
    assert_eq!(rows.len(), 8);
    assert_eq!(rows["6"], r#"{"s": "a\u0001b"}"#);
    assert_eq!(rows["3"], r#"{"n": 3}"#);
    let columns = "SELECT count(*) FROM fresh WHERE tenant = 'tenant-a' \
                   AND (rev = '3'::jsonb OR \"Id\" <> 3) AND (rev IS NULL OR \"Id\" <= 3)";
    assert_eq!(
        count(&db, columns).await,
        8,
        "scope column set, versions typed, JSON null as NULL"
    );
    let key =
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'fresh'::regclass AND contype = 'p'";
    assert_eq!(count(&db, key).await, 1, "the key is the primary key");
    let duplicate = db
        .client
        .batch_execute("INSERT INTO fresh VALUES (1, '{}')")
        .await;
    assert!(duplicate.is_err(), "the key constraint holds");
    assert!(!relation_exists(&db, &load).await && !relation_exists(&db, &staging).await);

    let again = source
        .apply_staged(&prepared, &target)
        .await
        .expect("again");
    assert_eq!((again.rows_written, again.rows_removed), (0, 0));
    assert_eq!(documents(&db, "fresh").await.len(), 8);
}

#[tokio::test]
async fn a_key_loaded_twice_is_written_once_with_the_key_built() {
    let db = TestDb::new().await;
    let source = db.source(3);
    let mut entity = koan_entity("twice");
    entity.key_type = Some(KeyType::Text);
    let (prepared, staging) = source
        .prepare_replace(&entity, uuid::Uuid::new_v4(), None)
        .await
        .expect("prepare");
    let mut target = restore_target(RestoreMode::Replace);
    target.staging_table = Some(staging.clone());
    let part1 = vec![
        archived("a", None, r#"{"n": 1}"#),
        archived("b", None, r#"{"n": 2}"#),
    ];
    let part2 = vec![
        archived("b", None, r#"{"n": 22}"#),
        archived("c", None, r#"{"n": 3}"#),
    ];
    import(&source, &prepared, &target, "p1", &part1)
        .await
        .expect("p1");
    import(&source, &prepared, &target, "p2", &part2)
        .await
        .expect("p2");
    let outcome = source
        .apply_staged(&prepared, &target)
        .await
        .expect("apply");
    assert_eq!(
        (
            outcome.rows_written,
            outcome.rows_skipped,
            outcome.failures.len()
        ),
        (3, 1, 0)
    );
    let rows = documents(&db, "twice").await;
    assert_eq!(
        rows.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(["{\"n\": 2}", "{\"n\": 22}"].contains(&rows["b"].as_str()));
    let key =
        "SELECT count(*) FROM pg_constraint WHERE conrelid = 'twice'::regclass AND contype = 'p'";
    assert_eq!(count(&db, key).await, 1);
    let load = staging.replacen("koan_stage_", "koan_load_", 1);
    assert!(!relation_exists(&db, &load).await);
}

#[tokio::test]
async fn a_target_created_meanwhile_gets_the_loaded_rows_as_a_replace() {
    let db = TestDb::new().await;
    let source = db.source(3);
    let mut entity = koan_entity("meanwhile");
    entity.key_type = Some(KeyType::Text);
    entity.scope = Some("tenant-a".into());
    let (prepared, staging) = source
        .prepare_replace(&entity, uuid::Uuid::new_v4(), None)
        .await
        .expect("prepare");
    let mut target = restore_target(RestoreMode::Replace);
    target.staging_table = Some(staging.clone());
    let part: Vec<Archived> = ["a1", "a2", "b1"]
        .iter()
        .map(|key| archived(key, None, &tenant_doc("tenant-a", 1)))
        .collect();
    import(&source, &prepared, &target, "p1", &part)
        .await
        .expect("p1");
    // Another restore (or the application) created the table since.
    db.exec(
        r#"CREATE TABLE meanwhile ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO meanwhile VALUES
             ('a9', '{"__koan_tenant": "tenant-a"}'), ('b1', '{"__koan_tenant": "tenant-b"}');"#,
    )
    .await;
    let outcome = source
        .apply_staged(&prepared, &target)
        .await
        .expect("apply");
    assert_eq!(
        (outcome.rows_written, outcome.rows_removed),
        (2, 1),
        "tenant-a replaced, tenant-b kept"
    );
    let [conflict] = outcome.failures.as_slice() else {
        panic!("{:?}", outcome.failures);
    };
    assert_eq!(
        (conflict.code.as_str(), conflict.key.as_deref()),
        ("scope_conflict", Some("b1"))
    );
    let rows = documents(&db, "meanwhile").await;
    assert_eq!(
        rows.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a1", "a2", "b1"]
    );
    assert!(
        rows["b1"].contains("tenant-b"),
        "another scope's row is never touched"
    );
}

#[tokio::test]
async fn only_koan_documents_written_as_archived_are_loaded() {
    let db = TestDb::new().await;
    let source = db.source(2);
    // Re-stamped documents: the target is created at once, as for other modes.
    let mut restamped = koan_entity("restamped");
    restamped.key_type = Some(KeyType::Text);
    restamped.scope = Some("tenant-a".into());
    let (_, staging) = source
        .prepare_replace(&restamped, uuid::Uuid::new_v4(), Some("tenant-b"))
        .await
        .expect("prepare");
    assert!(relation_exists(&db, "restamped").await);
    let load = staging.replacen("koan_stage_", "koan_load_", 1);
    assert!(!relation_exists(&db, &load).await);
    // A relational table is never created.
    let mut relational = koan_entity("people");
    relational.layout = koan_protocol::plan::Layout::Relational;
    relational.document = None;
    relational.key_type = Some(KeyType::Bigint);
    let error = source
        .prepare_replace(&relational, uuid::Uuid::new_v4(), None)
        .await
        .expect_err("relational");
    assert_eq!(error.code(), "missing_table", "{error}");

    // A restore that fails before its apply leaves no target, and dropping
    // its staging table drops the load table too.
    let mut fresh = koan_entity("never");
    fresh.key_type = Some(KeyType::Uuid);
    let (prepared, staging) = source
        .prepare_replace(&fresh, uuid::Uuid::new_v4(), None)
        .await
        .expect("prepare");
    let mut target = restore_target(RestoreMode::Replace);
    target.staging_table = Some(staging.clone());
    let id = "0193a3c0-7b2e-7c3d-8e4f-0123456789ab";
    import(
        &source,
        &prepared,
        &target,
        "p1",
        &[archived(id, None, "{}")],
    )
    .await
    .expect("uuid keys load typed");
    let load = staging.replacen("koan_stage_", "koan_load_", 1);
    assert_eq!(
        count(&db, &format!("SELECT count(*) FROM \"{load}\"")).await,
        1
    );
    source
        .drop_staging(&prepared, &staging)
        .await
        .expect("drop");
    assert!(!relation_exists(&db, &load).await && !relation_exists(&db, &staging).await);
    assert!(!relation_exists(&db, "never").await);
}
