//! Imports into a live table: every mode against its definition, idempotence,
//! row isolation, scopes.

use koan_protocol::commands::RestoreMode;
use koan_protocol::plan::{KeyType, ScopeMatch, VersionSource};

use crate::support::{
    Archived, TestDb, archived, count, documents, import, koan_entity, restore_target,
};

const PART: &str = "b/_all/p/id/entities/e/000000-0000-r1.jsonl.zst";

fn doc(n: i64, version: Option<i64>) -> String {
    match version {
        Some(version) => format!(r#"{{"n": {n}, "meta": {{"v": {version}}}}}"#),
        None => format!(r#"{{"n": {n}}}"#),
    }
}

/// Archived rows `a`..`g` with versions for the merge tests (version 2, or none).
fn merge_archive(version_of: impl Fn(i64) -> Option<String>) -> Vec<Archived> {
    let plan: [(&str, Option<i64>); 7] = [
        ("a", Some(2)), // target 1: older, updated
        ("b", Some(2)), // target 3: newer, kept
        ("c", Some(2)), // target 2: equal, kept
        ("d", Some(2)), // missing: inserted
        ("e", Some(2)), // target has no version: older, updated
        ("f", None),    // target 1; archived has no version: kept
        ("g", None),    // missing: inserted
    ];
    plan.iter()
        .map(|(key, version)| {
            let version_json = version.and_then(&version_of);
            archived(*key, version_json.as_deref(), &doc(100, *version))
        })
        .collect()
}

#[tokio::test]
async fn merge_by_json_path_replaces_only_older_rows() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE m ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO m VALUES ('a', '{"n": 1, "meta": {"v": 1}}'), ('b', '{"n": 1, "meta": {"v": 3}}'),
             ('c', '{"n": 1, "meta": {"v": 2}}'), ('e', '{"n": 1}'), ('f', '{"n": 1, "meta": {"v": 1}}'),
             ('z', '{"n": 1, "meta": {"v": 1}}');"#,
    )
    .await;
    let source = db.source(2);
    let mut entity = koan_entity("m");
    entity.version = Some(VersionSource::JsonPath(vec!["meta".into(), "v".into()]));
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let rows = merge_archive(|v| Some(v.to_string()));
    let target = restore_target(RestoreMode::Merge);

    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("merge");
    assert_eq!(
        (outcome.rows_written, outcome.rows_skipped),
        (4, 3),
        "{outcome:?}"
    );
    assert!(outcome.failures.is_empty());
    let after = documents(&db, "m").await;
    let n = |key: &str| after[key].clone();
    assert_eq!(
        n("a"),
        doc(100, Some(2)),
        "older row reverted to the archive"
    );
    assert_eq!(n("b"), doc(1, Some(3)), "newer row untouched");
    assert_eq!(n("c"), doc(1, Some(2)), "equal row untouched");
    assert_eq!(n("d"), doc(100, Some(2)), "missing row restored");
    assert_eq!(n("e"), doc(100, Some(2)), "a row without version is older");
    assert_eq!(
        n("f"),
        doc(1, Some(1)),
        "an archived row without version never wins"
    );
    assert_eq!(n("g"), doc(100, None));
    assert_eq!(n("z"), doc(1, Some(1)), "rows absent from the archive stay");

    let again = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("again");
    assert_eq!((again.rows_written, again.rows_skipped), (0, 7));
    assert_eq!(documents(&db, "m").await, after, "idempotent");
}

#[tokio::test]
async fn merge_by_version_column_compares_values_not_text() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE vc ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL, rev bigint,
                            at timestamptz);
           INSERT INTO vc VALUES (1, '{"n": 1}', 9, NULL), (2, '{"n": 1}', 11, NULL),
             (3, '{"n": 1}', 10, NULL), (5, '{"n": 1}', NULL, NULL),
             (6, '{"n": 1}', NULL, '2024-01-01 10:00:00+00'), (7, '{"n": 1}', NULL, '2024-03-01 00:00:00+00');"#,
    )
    .await;
    let source = db.source(2);
    let mut entity = koan_entity("vc");
    entity.version = Some(VersionSource::Column("rev".into()));
    let entity = source.prepare_target(&entity).await.expect("prepare");
    assert_eq!(entity.key_type, Some(KeyType::Bigint));
    let rows: Vec<Archived> = [1, 2, 3, 4, 5]
        .iter()
        .map(|key| archived(key, Some("10"), r#"{"n": 2}"#))
        .collect();
    let target = restore_target(RestoreMode::Merge);
    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("merge");
    assert_eq!(
        (outcome.rows_written, outcome.rows_skipped),
        (3, 2),
        "{outcome:?}"
    );
    let revs = db
        .client
        .query(
            r#"SELECT "Id", "Json"->>'n', rev FROM vc WHERE "Id" <= 5 ORDER BY "Id""#,
            &[],
        )
        .await
        .expect("rows");
    let got: Vec<(i64, String, Option<i64>)> = revs
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let expected = vec![
        (1, "2".to_string(), Some(10)), // 9 < 10 as numbers (not as text)
        (2, "1".to_string(), Some(11)),
        (3, "1".to_string(), Some(10)),
        (4, "2".to_string(), Some(10)),
        (5, "2".to_string(), Some(10)),
    ];
    assert_eq!(got, expected);

    // A timestamptz version column takes the JSON string `to_jsonb` produced.
    let mut by_time = entity.clone();
    by_time.version = Some(VersionSource::Column("at".into()));
    let newer = r#""2024-02-01T00:00:00+00:00""#;
    let rows = vec![
        archived(6, Some(newer), r#"{"n": 3}"#),
        archived(7, Some(newer), r#"{"n": 3}"#),
    ];
    let outcome = import(&source, &by_time, &target, PART, &rows)
        .await
        .expect("merge by time");
    assert_eq!((outcome.rows_written, outcome.rows_skipped), (1, 1));
    assert_eq!(
        count(
            &db,
            r#"SELECT count(*) FROM vc WHERE "Json"->>'n' = '3' AND "Id" = 6 AND at = '2024-02-01'"#
        )
        .await,
        1
    );
}

#[tokio::test]
async fn overwrite_upserts_and_skip_existing_only_inserts() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE o ("Id" uuid PRIMARY KEY, "Json" json NOT NULL);
           CREATE TABLE s ("Id" varchar(40) PRIMARY KEY, "Json" text NOT NULL);"#,
    )
    .await;
    let source = db.source(2);
    let keys: Vec<String> = (0..6)
        .map(|i| format!("00000000-0000-0000-0000-00000000000{i}"))
        .collect();
    let existing = &keys[..3];
    for (table, key_type) in [("o", "uuid"), ("s", "text")] {
        for key in existing {
            let seed =
                format!(r#"INSERT INTO {table} VALUES ($1::text::{key_type}, '{{"old": true}}')"#);
            db.client.execute(&seed, &[key]).await.expect("seed");
        }
    }
    let rows: Vec<Archived> = keys
        .iter()
        .map(|key| archived(key.to_uppercase(), Some("1"), r#"{"new": "it's \"x\""}"#))
        .collect();

    let entity = source.prepare_target(&koan_entity("o")).await.expect("o");
    let target = restore_target(RestoreMode::Overwrite);
    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("overwrite");
    assert_eq!((outcome.rows_written, outcome.rows_skipped), (6, 0));
    let all = documents(&db, "o").await;
    assert_eq!(all.len(), 6);
    assert!(
        all.values().all(|doc| doc == r#"{"new": "it's \"x\""}"#),
        "{all:?}"
    );

    // Text keys are taken as is (the archive holds the key's own text).
    let rows: Vec<Archived> = keys
        .iter()
        .map(|key| archived(key, None, r#"{"new": true}"#))
        .collect();
    let entity = source.prepare_target(&koan_entity("s")).await.expect("s");
    let target = restore_target(RestoreMode::SkipExisting);
    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("skip-existing");
    assert_eq!((outcome.rows_written, outcome.rows_skipped), (3, 3));
    let all = documents(&db, "s").await;
    for key in existing {
        assert_eq!(all[key], r#"{"old": true}"#, "existing rows untouched");
    }
    for key in &keys[3..] {
        assert_eq!(all[key], r#"{"new": true}"#);
    }
}

#[tokio::test]
async fn importing_the_same_rows_twice_changes_nothing() {
    let db = TestDb::new().await;
    db.exec(r#"CREATE TABLE i ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);"#)
        .await;
    let source = db.source(2);
    let entity = source
        .prepare_target(&koan_entity("i"))
        .await
        .expect("prepare");
    let mut rows: Vec<Archived> = (1..=500)
        .map(|key| archived(key, None, &format!(r#"{{"k": {key}}}"#)))
        .collect();
    // A key repeated inside one import (as another text of the same value): the last line wins.
    rows.push(archived("0007", None, r#"{"k": "seven"}"#));
    for mode in [
        RestoreMode::Overwrite,
        RestoreMode::Merge,
        RestoreMode::SkipExisting,
    ] {
        let target = restore_target(mode);
        let first = import(&source, &entity, &target, PART, &rows)
            .await
            .expect("first");
        let snapshot = documents(&db, "i").await;
        let second = import(&source, &entity, &target, PART, &rows)
            .await
            .expect("second");
        assert_eq!(documents(&db, "i").await, snapshot, "{mode:?}");
        assert_eq!(snapshot.len(), 500, "{mode:?}");
        assert_eq!(snapshot["7"], r#"{"k": "seven"}"#, "{mode:?}");
        assert_eq!(
            first.rows_written + first.rows_skipped,
            501,
            "{mode:?}: {first:?}"
        );
        assert_eq!(
            second.rows_written + second.rows_skipped,
            501,
            "{mode:?}: {second:?}"
        );
    }
}

#[tokio::test]
async fn failing_rows_are_isolated_and_the_rest_is_written() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE iso ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL,
             CONSTRAINT positive_n CHECK (("Json"->>'n')::int > 0));"#,
    )
    .await;
    let source = db.source(2);
    let entity = source
        .prepare_target(&koan_entity("iso"))
        .await
        .expect("prepare");
    let mut rows: Vec<Archived> = (1..=100)
        .map(|key| archived(key, None, &format!(r#"{{"n": {key}}}"#)))
        .collect();
    for index in [9, 49, 89] {
        rows[index].doc = r#"{"n": -1}"#.into();
    }
    rows[60].key = "61x".into();
    let target = restore_target(RestoreMode::Overwrite);
    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("import");
    assert_eq!(outcome.rows_written, 96, "{outcome:?}");
    assert_eq!(outcome.rows_skipped, 0);
    let summary: Vec<(Option<u64>, Option<&str>, &str)> = outcome
        .failures
        .iter()
        .map(|failure| {
            (
                failure.line_no,
                failure.key.as_deref(),
                failure.code.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (Some(10), Some("10"), "constraint_violation"),
            (Some(50), Some("50"), "constraint_violation"),
            (Some(61), Some("61x"), "type_mismatch"),
            (Some(90), Some("90"), "constraint_violation"),
        ]
    );
    for failure in &outcome.failures {
        assert_eq!(failure.part.as_deref(), Some(PART));
        let line = &rows[failure.line_no.expect("line") as usize - 1];
        assert_eq!(failure.line, line.raw(), "the raw line is kept");
        if failure.code == "constraint_violation" {
            assert!(failure.reason.contains("positive_n"), "{}", failure.reason);
        } else {
            assert!(failure.reason.contains("bigint"), "{}", failure.reason);
        }
    }
    assert_eq!(count(&db, "SELECT count(*) FROM iso").await, 96);

    // Invalid JSON and a NUL are documents that cannot be stored; the rest goes in.
    let rows = vec![
        archived(200, None, r#"{"n": 1"#),
        archived(201, None, r#"{"n": 1, "s": "\u0000"}"#),
        archived(202, None, r#"{"n": 2}"#),
        archived("20\u{0}3", None, r#"{"n": 2}"#),
    ];
    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("docs");
    let codes: Vec<&str> = outcome.failures.iter().map(|f| f.code.as_str()).collect();
    assert_eq!(
        codes,
        vec!["invalid_document", "invalid_document", "type_mismatch"]
    );
    assert_eq!(outcome.rows_written, 1);
}

#[tokio::test]
async fn target_scope_restamps_rows_and_never_touches_another_scope() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE sc ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);
           INSERT INTO sc VALUES
             ('k1', '{"n": 0, "__koan_tenant": "tenant-a"}'),
             ('k2', '{"n": 0, "__koan_tenant": "tenant-a"}'),
             ('k3', '{"n": 0, "__koan_tenant": "tenant-c"}'),
             ('k5', '{"n": 0, "__koan_tenant": "tenant-b"}');
           CREATE TABLE col ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL, tenant text NOT NULL);
           INSERT INTO col VALUES ('k1', '{"n": 0}', 'other');"#,
    )
    .await;
    let source = db.source(2);
    let mut entity = koan_entity("sc");
    entity.scope = Some("tenant-a".into());
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let before = documents(&db, "sc").await;
    let rows: Vec<Archived> = ["k1", "k3", "k4", "k5"]
        .iter()
        .map(|key| archived(key, None, r#"{"n": 1, "__koan_tenant": "tenant-a"}"#))
        .collect();
    let mut target = restore_target(RestoreMode::Overwrite);
    target.target_scope = Some("tenant-b".into());
    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("import");
    assert_eq!(
        outcome.rows_written, 2,
        "k4 inserted, k5 updated: {outcome:?}"
    );
    let conflicts: Vec<(&str, &str)> = outcome
        .failures
        .iter()
        .map(|f| (f.key.as_deref().unwrap_or(""), f.code.as_str()))
        .collect();
    assert_eq!(
        conflicts,
        vec![("k1", "scope_conflict"), ("k3", "scope_conflict")]
    );
    assert!(
        outcome.failures[0].reason.contains("tenant-a"),
        "{:?}",
        outcome.failures
    );
    assert_eq!(outcome.failures[1].line, rows[1].raw());
    let after = documents(&db, "sc").await;
    for key in ["k1", "k2", "k3"] {
        assert_eq!(after[key], before[key], "{key}: other scopes are untouched");
    }
    assert_eq!(after["k4"], r#"{"n": 1, "__koan_tenant": "tenant-b"}"#);
    assert_eq!(after["k5"], r#"{"n": 1, "__koan_tenant": "tenant-b"}"#);

    // Merge and skip-existing keep the same isolation; a same-scope restore needs no target scope.
    let target = restore_target(RestoreMode::SkipExisting);
    let outcome = import(&source, &entity, &target, PART, &rows[..2])
        .await
        .expect("same");
    assert_eq!((outcome.rows_skipped, outcome.failures.len()), (1, 1));
    assert_eq!(outcome.failures[0].key.as_deref(), Some("k3"));

    // A scope column is set from the scope: the archive of a Koan row does not hold it.
    let mut entity = koan_entity("col");
    entity.scope = Some("t1".into());
    entity.scope_match = ScopeMatch::Column("tenant".into());
    let entity = source.prepare_target(&entity).await.expect("col");
    let rows = vec![archived("k1", None, "{}"), archived("k2", None, "{}")];
    let outcome = import(
        &source,
        &entity,
        &restore_target(RestoreMode::Merge),
        PART,
        &rows,
    )
    .await
    .expect("column scope");
    assert_eq!(outcome.rows_written, 1);
    assert_eq!(outcome.failures[0].code, "scope_conflict");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM col WHERE tenant = 't1' AND \"Id\" = 'k2'"
        )
        .await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM col WHERE tenant = 'other'").await,
        1
    );
}
