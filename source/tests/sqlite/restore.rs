//! Restore targets: `replace` staging and swap, table creation, refusals.

use koan_protocol::commands::RestoreMode;
use koan_protocol::plan::{KeyType, Layout, ScopeMatch, VersionSource};
use koan_source::ApplyOutcome;

use crate::support::{
    Archived, TestFile, archived, export_all, import, koan_entity, normalized, restore_target,
};

fn tenant_doc(tenant: &str, n: i64) -> String {
    format!(r#"{{"n": {n}, "__koan_tenant": "{tenant}"}}"#)
}

#[tokio::test]
async fn replace_swaps_only_the_scope_and_a_failed_swap_changes_nothing() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE r ("Id" TEXT PRIMARY KEY, "Json" TEXT NOT NULL,
             CONSTRAINT small_n CHECK (("Json" ->> '$.n') < 1000));
           WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 20)
           INSERT INTO r SELECT 'a' || n, json_object('n', 0, '__koan_tenant', 'tenant-a') FROM g;
           WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 5)
           INSERT INTO r SELECT 'b' || n, json_object('n', 0, '__koan_tenant', 'tenant-b') FROM g;
           CREATE TABLE pin (a_key TEXT REFERENCES r ("Id"));
           INSERT INTO pin VALUES ('a3');"#,
    );
    let source = file.source(3);
    let mut entity = koan_entity("r");
    entity.scope = Some("tenant-a".into());
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let operation = uuid::Uuid::new_v4();
    let staging = source
        .create_staging(&entity, operation)
        .await
        .expect("staging");
    assert!(
        staging.starts_with("koan_stage_") && staging.ends_with("_e"),
        "{staging}"
    );
    assert_eq!(
        source
            .create_staging(&entity, operation)
            .await
            .expect("again"),
        staging,
        "idempotent"
    );
    let mut target = restore_target(RestoreMode::Replace);
    let error = source
        .begin_import(&entity, &target)
        .await
        .expect_err("replace needs staging");
    assert_eq!(error.code(), "invalid_plan");
    target.staging_table = Some(staging.clone());

    // The archive: a1..a10 (a3 kept for the foreign key), a key of tenant-b, a row over the check.
    let part1: Vec<Archived> = (1..=5)
        .map(|i| archived(format!("a{i}"), None, &tenant_doc("tenant-a", i)))
        .collect();
    let mut part2: Vec<Archived> = (6..=10)
        .map(|i| archived(format!("a{i}"), None, &tenant_doc("tenant-a", i)))
        .collect();
    part2.push(archived("b1", None, &tenant_doc("tenant-a", 1)));
    part2.push(archived("a11", None, &tenant_doc("tenant-a", 5000)));
    let staged = import(&source, &entity, &target, "p1", &part1)
        .await
        .expect("p1");
    assert_eq!((staged.rows_written, staged.rows_skipped), (5, 0));
    import(&source, &entity, &target, "p2", &part2)
        .await
        .expect("p2");
    let twice = import(&source, &entity, &target, "p1", &part1)
        .await
        .expect("p1 again");
    assert_eq!(
        (twice.rows_written, twice.rows_skipped),
        (0, 5),
        "a part staged twice is harmless"
    );
    assert_eq!(
        file.documents("r").len(),
        25,
        "staging does not touch the target"
    );

    // The foreign key on a3 makes the DELETE fail: nothing changes, the staging table stays.
    let before = file.documents("r");
    let error = source.apply_staged(&entity, &target).await.expect_err("fk");
    assert_eq!(error.code(), "constraint_violation", "{error}");
    assert_eq!(file.documents("r"), before, "the scope is never left empty");
    assert_eq!(
        file.count(&format!("SELECT count(*) FROM \"{staging}\"")),
        12
    );

    file.exec("DROP TABLE pin");
    let outcome = source.apply_staged(&entity, &target).await.expect("apply");
    assert_eq!(
        (outcome.rows_written, outcome.rows_removed),
        (10, 20),
        "{outcome:?}"
    );
    let codes: Vec<(&str, &str)> = outcome
        .failures
        .iter()
        .map(|f| (f.key.as_deref().unwrap_or(""), f.code.as_str()))
        .collect();
    assert_eq!(
        codes,
        vec![("b1", "scope_conflict"), ("a11", "constraint_violation")]
    );
    assert_eq!(outcome.failures[1].part.as_deref(), Some("p2"));
    assert!(
        outcome.failures[1].reason.contains("small_n"),
        "{:?}",
        outcome.failures
    );
    let after = file.documents("r");
    let tenant_a = after
        .values()
        .filter(|doc| doc.contains("tenant-a"))
        .count();
    assert_eq!(tenant_a, 10, "exactly the archived rows");
    assert_eq!(after["a7"], normalized(&tenant_doc("tenant-a", 7)));
    for i in 1..=5 {
        let key = format!("b{i}");
        assert_eq!(after[&key], before[&key], "tenant-b untouched");
    }
    assert_eq!(
        file.count(&format!(
            "SELECT count(*) FROM sqlite_schema WHERE name = '{staging}'"
        )),
        0,
        "staging dropped"
    );
    let again = source.apply_staged(&entity, &target).await.expect("again");
    assert_eq!(again, ApplyOutcome::default());
    assert_eq!(file.documents("r"), after);
    source
        .drop_staging(&entity, &staging)
        .await
        .expect("drop missing");
    let refused = source
        .drop_staging(&entity, "r")
        .await
        .expect_err("not staging");
    assert_eq!(refused.code(), "invalid_name");
    assert_eq!(file.documents("r"), after, "r is still there");
}

#[tokio::test]
async fn replace_into_another_scope_restamps_when_staging() {
    let file = TestFile::new();
    file.exec(
        r#"CREATE TABLE r ("Id" INTEGER PRIMARY KEY, "Json" TEXT NOT NULL, tenant TEXT);
           INSERT INTO r VALUES (1, '{"n": 0}', 'copy'), (2, '{"n": 0}', 'copy'), (9, '{"n": 0}', 'orig');"#,
    );
    let source = file.source(2);
    let mut entity = koan_entity("r");
    entity.scope = Some("orig".into());
    entity.scope_match = ScopeMatch::Column("tenant".into());
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let staging = source
        .create_staging(&entity, uuid::Uuid::new_v4())
        .await
        .expect("staging");
    let mut target = restore_target(RestoreMode::Replace);
    target.target_scope = Some("copy".into());
    target.staging_table = Some(staging);
    // Within a part the last line of a key wins; across parts the first part staged wins.
    let part1 = vec![
        archived(3, None, r#"{"n": 1}"#),
        archived("03", None, r#"{"n": 2}"#),
    ];
    let part2 = vec![
        archived(3, None, r#"{"n": 3}"#),
        archived(4, None, r#"{"n": 4}"#),
    ];
    let first = import(&source, &entity, &target, "p1", &part1)
        .await
        .expect("p1");
    assert_eq!((first.rows_written, first.rows_skipped), (1, 1));
    let second = import(&source, &entity, &target, "p2", &part2)
        .await
        .expect("p2");
    assert_eq!((second.rows_written, second.rows_skipped), (1, 1));
    let outcome = source.apply_staged(&entity, &target).await.expect("apply");
    assert_eq!(
        (outcome.rows_written, outcome.rows_removed),
        (2, 2),
        "{outcome:?}"
    );
    let rows: Vec<(i64, String, String)> = {
        let connection = file.connect();
        let mut statement = connection
            .prepare(r#"SELECT "Id", "Json", tenant FROM r ORDER BY "Id""#)
            .expect("prepare");
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
            .expect("rows")
            .map(|row| row.expect("row"))
            .collect()
    };
    assert_eq!(
        rows,
        vec![
            (3, r#"{"n":2}"#.to_string(), "copy".to_string()),
            (4, r#"{"n":4}"#.to_string(), "copy".to_string()),
            (9, r#"{"n": 0}"#.to_string(), "orig".to_string()),
        ]
    );
}

#[tokio::test]
async fn prepare_target_creates_the_file_and_missing_koan_tables() {
    let file = TestFile::new();
    assert!(!file.path.exists());
    let source = file.source(4);
    for (table, key_type, resolved, key) in [
        ("texts", KeyType::Text, KeyType::Text, "k-1"),
        (
            "uuids",
            KeyType::Uuid,
            KeyType::Text,
            "6f1f5a2e-8d8e-4c4e-9a7e-0c1b2d3e4f50",
        ),
        ("bigints", KeyType::Bigint, KeyType::Bigint, "42"),
    ] {
        let mut entity = koan_entity(table);
        entity.key_type = Some(key_type);
        entity.version = Some(VersionSource::Column("rev".into()));
        entity.scope = Some("t1".into());
        entity.scope_match = ScopeMatch::Column("tenant".into());
        // Four workers racing to create the same table.
        let racers: Vec<_> = (0..4)
            .map(|_| {
                let source = source.clone();
                let entity = entity.clone();
                tokio::spawn(async move { source.prepare_target(&entity).await })
            })
            .collect();
        for racer in racers {
            let prepared = racer.await.expect("join").expect("prepare");
            assert_eq!(prepared.key_type, Some(resolved), "{table}");
        }
        let rows = vec![archived(key, Some("3"), r#"{"a": 1}"#)];
        let outcome = import(
            &source,
            &entity,
            &restore_target(RestoreMode::Merge),
            "p",
            &rows,
        )
        .await
        .expect("import");
        assert_eq!(outcome.rows_written, 1, "{table}");
        let exported = export_all(&source, &entity, &Default::default(), None)
            .await
            .expect("export");
        assert_eq!(
            exported,
            vec![(key.to_string(), Some("3".into()), r#"{"a":1}"#.to_string())],
            "{table}: what is restored exports the same"
        );
    }
    assert!(file.path.exists());

    let mut relational = koan_entity("people");
    relational.layout = Layout::Relational;
    relational.document = None;
    let error = source
        .prepare_target(&relational)
        .await
        .expect_err("relational");
    assert_eq!(error.code(), "not_supported", "{error}");
    let mut other_schema = koan_entity("t");
    other_schema.schema = "restored".into();
    other_schema.key_type = Some(KeyType::Text);
    let error = source
        .prepare_target(&other_schema)
        .await
        .expect_err("schema");
    assert_eq!(error.code(), "not_supported", "{error}");
}
