//! Imports into a live table: every mode against its definition, idempotence,
//! row isolation, scopes. The scenarios are the PostgreSQL tests' own.

use koan_protocol::commands::RestoreMode;
use koan_protocol::plan::{KeyType, ScopeMatch, VersionSource};

use crate::support::{
    Archived, TestFile, archived, failure_summary, import, koan_entity, normalized, push_all,
    restore_target,
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
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE m ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);
           INSERT INTO m VALUES ('a', '{"n": 1, "meta": {"v": 1}}'), ('b', '{"n": 1, "meta": {"v": 3}}'),
             ('c', '{"n": 1, "meta": {"v": 2}}'), ('e', '{"n": 1}'), ('f', '{"n": 1, "meta": {"v": 1}}'),
             ('z', '{"n": 1, "meta": {"v": 1}}');"#,
    );
    let source = file.source(2);
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
    let after = file.documents("m");
    let n = |key: &str| after[key].clone();
    assert_eq!(
        n("a"),
        normalized(&doc(100, Some(2))),
        "older row reverted to the archive"
    );
    assert_eq!(n("b"), normalized(&doc(1, Some(3))), "newer row untouched");
    assert_eq!(n("c"), normalized(&doc(1, Some(2))), "equal row untouched");
    assert_eq!(
        n("d"),
        normalized(&doc(100, Some(2))),
        "missing row restored"
    );
    assert_eq!(
        n("e"),
        normalized(&doc(100, Some(2))),
        "a row without version is older"
    );
    assert_eq!(
        n("f"),
        normalized(&doc(1, Some(1))),
        "an archived row without version never wins"
    );
    assert_eq!(n("g"), normalized(&doc(100, None)));
    assert_eq!(
        n("z"),
        normalized(&doc(1, Some(1))),
        "rows absent from the archive stay"
    );

    let again = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("again");
    assert_eq!((again.rows_written, again.rows_skipped), (0, 7));
    assert_eq!(file.documents("m"), after, "idempotent");
}

#[tokio::test]
async fn merge_by_version_column_compares_values_not_text() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE vc ("Id" INTEGER PRIMARY KEY, "Json" TEXT NOT NULL, rev INTEGER, at TEXT);
           INSERT INTO vc VALUES (1, '{"n": 1}', 9, NULL), (2, '{"n": 1}', 11, NULL),
             (3, '{"n": 1}', 10, NULL), (5, '{"n": 1}', NULL, NULL),
             (6, '{"n": 1}', NULL, '2024-01-01T10:00:00+00:00'), (7, '{"n": 1}', NULL, '2024-03-01T00:00:00+00:00');"#,
    );
    let source = file.source(2);
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
    let connection = file.connect();
    let mut statement = connection
        .prepare(r#"SELECT "Id", "Json" ->> '$.n', rev, typeof(rev) FROM vc WHERE "Id" <= 5 ORDER BY "Id""#)
        .expect("prepare");
    let got: Vec<(i64, i64, Option<i64>, String)> = statement
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .expect("rows")
        .map(|row| row.expect("row"))
        .collect();
    let expected = vec![
        (1, 2, Some(10), "integer".to_string()), // 9 < 10 as numbers (not as text)
        (2, 1, Some(11), "integer".to_string()),
        (3, 1, Some(10), "integer".to_string()),
        (4, 2, Some(10), "integer".to_string()),
        (5, 2, Some(10), "integer".to_string()),
    ];
    assert_eq!(got, expected);

    // A text version column takes the JSON string, and compares as one.
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
        file.count(r#"SELECT count(*) FROM vc WHERE "Json" ->> '$.n' = 3 AND "Id" = 6 AND at = '2024-02-01T00:00:00+00:00'"#),
        1
    );
}

#[tokio::test]
async fn overwrite_upserts_and_skip_existing_only_inserts() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE o ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);
           CREATE TABLE s ("Id" VARCHAR(40) PRIMARY KEY, "Json" JSON NOT NULL);"#,
    );
    let source = file.source(2);
    let keys: Vec<String> = (0..6).map(|i| format!("k-{i}")).collect();
    for table in ["o", "s"] {
        for key in &keys[..3] {
            file.exec(&format!(
                r#"INSERT INTO {table} VALUES ('{key}', '{{"old": true}}')"#
            ));
        }
    }
    let rows: Vec<Archived> = keys
        .iter()
        .map(|key| archived(key, Some("1"), r#"{"new": "it's \"x\""}"#))
        .collect();
    let entity = source.prepare_target(&koan_entity("o")).await.expect("o");
    let outcome = import(
        &source,
        &entity,
        &restore_target(RestoreMode::Overwrite),
        PART,
        &rows,
    )
    .await
    .expect("overwrite");
    assert_eq!((outcome.rows_written, outcome.rows_skipped), (6, 0));
    let all = file.documents("o");
    assert_eq!(all.len(), 6);
    assert!(
        all.values()
            .all(|doc| *doc == normalized(r#"{"new": "it's \"x\""}"#)),
        "{all:?}"
    );

    let rows: Vec<Archived> = keys
        .iter()
        .map(|key| archived(key, None, r#"{"new": true}"#))
        .collect();
    let entity = source.prepare_target(&koan_entity("s")).await.expect("s");
    let outcome = import(
        &source,
        &entity,
        &restore_target(RestoreMode::SkipExisting),
        PART,
        &rows,
    )
    .await
    .expect("skip-existing");
    assert_eq!((outcome.rows_written, outcome.rows_skipped), (3, 3));
    let all = file.documents("s");
    for key in &keys[..3] {
        assert_eq!(
            all[key],
            normalized(r#"{"old": true}"#),
            "existing rows untouched"
        );
    }
    for key in &keys[3..] {
        assert_eq!(all[key], normalized(r#"{"new": true}"#));
    }
}

#[tokio::test]
async fn importing_the_same_rows_twice_changes_nothing() {
    let file = TestFile::new();
    file.exec(r#"CREATE TABLE i ("Id" INTEGER PRIMARY KEY, "Json" TEXT NOT NULL);"#);
    let source = file.source(2);
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
        let snapshot = file.documents("i");
        let second = import(&source, &entity, &target, PART, &rows)
            .await
            .expect("second");
        assert_eq!(file.documents("i"), snapshot, "{mode:?}");
        assert_eq!(snapshot.len(), 500, "{mode:?}");
        assert_eq!(snapshot["7"], normalized(r#"{"k": "seven"}"#), "{mode:?}");
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
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE iso ("Id" INTEGER PRIMARY KEY, "Json" TEXT NOT NULL,
             CONSTRAINT positive_n CHECK (("Json" ->> '$.n') > 0));"#,
    );
    let source = file.source(2);
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
    let some =
        |line: u64, key: &str, code: &str| (Some(line), Some(key.to_string()), code.to_string());
    assert_eq!(
        failure_summary(&outcome),
        vec![
            some(10, "10", "constraint_violation"),
            some(50, "50", "constraint_violation"),
            some(61, "61x", "type_mismatch"),
            some(90, "90", "constraint_violation"),
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
    assert_eq!(file.count("SELECT count(*) FROM iso"), 96);

    // Invalid JSON and a NUL character cannot be stored; a NUL in a key neither.
    let rows = vec![
        archived(200, None, r#"{"n": 1"#),
        archived(201, None, "{\"n\": 1, \"s\": \"\0\"}"),
        archived(202, None, r#"{"n": 2}"#),
        archived("20\u{0}3", None, r#"{"n": 2}"#),
        archived(204, Some("{bad"), r#"{"n": 2}"#),
    ];
    let outcome = import(&source, &entity, &target, PART, &rows)
        .await
        .expect("docs");
    let codes: Vec<&str> = outcome.failures.iter().map(|f| f.code.as_str()).collect();
    assert_eq!(
        codes,
        vec![
            "invalid_document",
            "invalid_document",
            "type_mismatch",
            "type_mismatch"
        ]
    );
    assert_eq!(outcome.rows_written, 1);
}

#[tokio::test]
async fn target_scope_restamps_rows_and_never_touches_another_scope() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE sc ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);
           INSERT INTO sc VALUES
             ('k1', '{"n": 0, "__koan_tenant": "tenant-a"}'),
             ('k2', '{"n": 0, "__koan_tenant": "tenant-a"}'),
             ('k3', '{"n": 0, "__koan_tenant": "tenant-c"}'),
             ('k5', '{"n": 0, "__koan_tenant": "tenant-b"}');
           CREATE TABLE col ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL, tenant TEXT NOT NULL);
           INSERT INTO col VALUES ('k1', '{"n": 0}', 'other');"#,
    );
    let source = file.source(2);
    let mut entity = koan_entity("sc");
    entity.scope = Some("tenant-a".into());
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let before = file.documents("sc");
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
    let after = file.documents("sc");
    for key in ["k1", "k2", "k3"] {
        assert_eq!(after[key], before[key], "{key}: other scopes are untouched");
    }
    let restamped = normalized(r#"{"n": 1, "__koan_tenant": "tenant-b"}"#);
    assert_eq!(after["k4"], restamped);
    assert_eq!(after["k5"], restamped);

    // A document that is not an object cannot be re-stamped.
    let scalar = vec![archived("k6", None, "[1]"), archived("k7", None, "{}")];
    let outcome = import(&source, &entity, &target, PART, &scalar)
        .await
        .expect("scalar");
    assert_eq!(
        failure_summary(&outcome),
        vec![(Some(1), Some("k6".into()), "invalid_document".into())]
    );
    assert_eq!(
        file.documents("sc")["k7"],
        normalized(r#"{"__koan_tenant": "tenant-b"}"#)
    );

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
        file.count("SELECT count(*) FROM col WHERE tenant = 't1' AND \"Id\" = 'k2'"),
        1
    );
    assert_eq!(
        file.count("SELECT count(*) FROM col WHERE tenant = 'other'"),
        1
    );
}

#[tokio::test]
async fn an_aborted_or_dropped_import_writes_nothing_and_holds_no_lock() {
    let file = TestFile::new();
    file.exec(r#"CREATE TABLE a ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL);"#);
    let source = file.source(1);
    let entity = source
        .prepare_target(&koan_entity("a"))
        .await
        .expect("prepare");
    let target = restore_target(RestoreMode::Overwrite);
    // Enough rows to flush several times into the TEMP table.
    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(10_000));
    let rows: Vec<Archived> = (0..700)
        .map(|i| archived(format!("k{i:04}"), None, &big))
        .collect();

    let mut session = source.begin_import(&entity, &target).await.expect("begin");
    push_all(&mut session, PART, &rows).await.expect("push");
    assert_eq!(session.rows_staged(), 700);
    // Staging took no lock: another connection writes meanwhile.
    file.exec(r#"INSERT INTO a VALUES ('other', '{}')"#);
    session.abort().await;
    assert_eq!(file.count("SELECT count(*) FROM a"), 1);

    let mut session = source
        .begin_import(&entity, &target)
        .await
        .expect("begin again");
    push_all(&mut session, PART, &rows[..10])
        .await
        .expect("push");
    drop(session);
    let outcome = import(&source, &entity, &target, PART, &rows[..3])
        .await
        .expect("slot is back");
    assert_eq!(outcome.rows_written, 3);
    assert_eq!(file.count("SELECT count(*) FROM a"), 4);
}
