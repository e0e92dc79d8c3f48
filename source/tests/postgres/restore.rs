//! Restore targets: `replace` staging and swap, table creation, the relational
//! layout, aborted imports, a large import.

use std::time::Instant;

use koan_protocol::archive::KeyRange;
use koan_protocol::commands::RestoreMode;
use koan_protocol::plan::{KeyType, Layout, ScopeMatch, VersionSource};
use koan_source::{ApplyOutcome, StagingForm};

use crate::support::{
    Archived, TestDb, archived, count, documents, export_all, import, koan_entity, push_all,
    restore_target,
};

fn tenant_doc(tenant: &str, n: i64) -> String {
    format!(r#"{{"n": {n}, "__koan_tenant": "{tenant}"}}"#)
}

#[tokio::test]
async fn replace_swaps_only_the_scope_and_a_failed_swap_changes_nothing() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE r ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL,
             CONSTRAINT small_n CHECK (("Json"->>'n')::int < 1000));
           INSERT INTO r SELECT 'a' || g, jsonb_build_object('n', 0, '__koan_tenant', 'tenant-a')
             FROM generate_series(1, 20) g;
           INSERT INTO r SELECT 'b' || g, jsonb_build_object('n', 0, '__koan_tenant', 'tenant-b')
             FROM generate_series(1, 5) g;
           CREATE TABLE pin (a_key text REFERENCES r ("Id"));
           INSERT INTO pin VALUES ('a3');"#,
    )
    .await;
    let source = db.source(3);
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
        .begin_import(&entity, &target, StagingForm::Typed)
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
        (5, 0),
        "a part imported twice is staged once, and says so again"
    );
    // A key in two parts (a broken archive): the first staged wins at apply.
    let part3 = vec![archived("a5", None, &tenant_doc("tenant-a", 55))];
    import(&source, &entity, &target, "p3", &part3)
        .await
        .expect("p3");
    assert_eq!(
        documents(&db, "r").await.len(),
        25,
        "staging does not touch the target"
    );

    // The foreign key on a3 makes the DELETE fail: nothing changes, the staging table stays.
    let before = documents(&db, "r").await;
    let error = source.apply_staged(&entity, &target).await.expect_err("fk");
    assert_eq!(error.code(), "constraint_violation", "{error}");
    assert_eq!(
        documents(&db, "r").await,
        before,
        "the scope is never left empty"
    );
    let staged_rows = format!("SELECT count(k) FROM \"{staging}\"");
    assert_eq!(count(&db, &staged_rows).await, 13, "each part's rows once");
    let markers = format!("SELECT count(*) FROM \"{staging}\" WHERE k IS NULL");
    assert_eq!(count(&db, &markers).await, 3, "one marker per part");

    db.exec("DROP TABLE pin").await;
    let outcome = source.apply_staged(&entity, &target).await.expect("apply");
    assert_eq!(
        (
            outcome.rows_written,
            outcome.rows_skipped,
            outcome.rows_removed
        ),
        (10, 1, 20),
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
    assert_eq!(
        outcome.failures[1].line,
        part2[6].raw(),
        "the failing row's archive line, rebuilt from the staged row"
    );
    assert!(
        outcome.failures[1].reason.contains("small_n"),
        "{:?}",
        outcome.failures
    );
    let after = documents(&db, "r").await;
    let tenant_a: Vec<&String> = after
        .iter()
        .filter(|(_, doc)| doc.contains("tenant-a"))
        .map(|(key, _)| key)
        .collect();
    assert_eq!(
        tenant_a.len(),
        10,
        "exactly the archived rows: {tenant_a:?}"
    );
    assert_eq!(after["a7"], tenant_doc("tenant-a", 7));
    assert_eq!(
        after["a5"],
        tenant_doc("tenant-a", 5),
        "the first staged row"
    );
    for i in 1..=5 {
        let key = format!("b{i}");
        assert_eq!(after[&key], before[&key], "tenant-b untouched");
    }
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM pg_class WHERE relname = '{staging}'")
        )
        .await,
        0,
        "staging dropped"
    );
    let again = source.apply_staged(&entity, &target).await.expect("again");
    assert_eq!(again, ApplyOutcome::default());
    assert_eq!(documents(&db, "r").await, after);
    source
        .drop_staging(&entity, &staging)
        .await
        .expect("drop missing");
    let refused = source
        .drop_staging(&entity, "r")
        .await
        .expect_err("not staging");
    assert_eq!(refused.code(), "invalid_name");
}

/// Stages `parts` for a `replace` into `table` and applies them.
async fn replace_into(
    db: &TestDb,
    table: &str,
    key_type: KeyType,
    parts: &[(&str, Vec<Archived>)],
) -> ApplyOutcome {
    let source = db.source(3);
    let mut entity = koan_entity(table);
    entity.key_type = Some(key_type);
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let mut target = restore_target(RestoreMode::Replace);
    target.staging_table = Some(
        source
            .create_staging(&entity, uuid::Uuid::new_v4())
            .await
            .expect("staging"),
    );
    for (part, rows) in parts {
        import(&source, &entity, &target, part, rows)
            .await
            .expect("stage");
    }
    source.apply_staged(&entity, &target).await.expect("apply")
}

#[tokio::test]
async fn replace_into_an_empty_table_builds_the_key_index_once_and_keeps_its_definition() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE e ("Id" text NOT NULL, "Json" jsonb NOT NULL,
             CONSTRAINT small_n CHECK (("Json"->>'n')::int < 1000),
             CONSTRAINT e_key PRIMARY KEY ("Id") INCLUDE ("Json") DEFERRABLE);
           CREATE TABLE f ("Id" text NOT NULL, "Json" jsonb NOT NULL,
             CONSTRAINT f_key PRIMARY KEY ("Id") WITH (fillfactor = 70));"#,
    )
    .await;
    let constraint = |name: &str| {
        format!(
            "SELECT oid::bigint FROM pg_constraint WHERE conname = '{name}' \
             AND pg_get_constraintdef(oid) = 'PRIMARY KEY (\"Id\") INCLUDE (\"Json\") DEFERRABLE'"
        )
    };
    let before = count(&db, &constraint("e_key")).await;
    let f_before = count(
        &db,
        "SELECT oid::bigint FROM pg_constraint WHERE conname = 'f_key'",
    )
    .await;
    let p1: Vec<Archived> = (1..=50)
        .map(|i| archived(format!("k{i:03}"), None, &tenant_doc("t", i)))
        .collect();
    let mut p2: Vec<Archived> = (51..=60)
        .map(|i| archived(format!("k{i:03}"), None, &tenant_doc("t", i)))
        .collect();
    p2.push(archived("k999", None, &tenant_doc("t", 5000)));
    let parts = [("p1", p1), ("p2", p2)];
    let outcome = replace_into(&db, "e", KeyType::Text, &parts).await;
    assert_eq!(
        (
            outcome.rows_written,
            outcome.rows_skipped,
            outcome.rows_removed
        ),
        (60, 0, 0),
        "{outcome:?}"
    );
    let codes: Vec<(Option<&str>, &str)> = outcome
        .failures
        .iter()
        .map(|f| (f.key.as_deref(), f.code.as_str()))
        .collect();
    assert_eq!(codes, vec![(Some("k999"), "constraint_violation")]);
    assert_eq!(documents(&db, "e").await.len(), 60);
    let after = count(&db, &constraint("e_key")).await;
    assert_ne!(
        after, before,
        "the key constraint was built again after the load, with its name and definition"
    );
    let indexes = "SELECT count(*) FROM pg_index WHERE indrelid = 'e'::regclass";
    assert_eq!(count(&db, indexes).await, 1);
    let duplicate = db
        .client
        .execute(r#"INSERT INTO e VALUES ('k001', '{}')"#, &[])
        .await
        .expect_err("the key is enforced again");
    assert_eq!(duplicate.code().map(|code| code.code()), Some("23505"));

    // Storage parameters are not in a constraint's definition: that index stays.
    let outcome = replace_into(&db, "f", KeyType::Text, &parts).await;
    assert_eq!((outcome.rows_written, outcome.rows_skipped), (61, 0));
    assert_eq!(
        count(
            &db,
            "SELECT oid::bigint FROM pg_constraint WHERE conname = 'f_key'"
        )
        .await,
        f_before,
        "the index with storage parameters was kept"
    );
}

#[tokio::test]
async fn replace_into_an_empty_table_falls_back_when_keys_collide_once_cast() {
    let db = TestDb::new().await;
    db.exec(r#"CREATE TABLE n ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL)"#)
        .await;
    // "7" and "07" differ as text, so both are staged and loaded, and the
    // primary key cannot be added back: the rows are written again with it
    // in place, and the second becomes a failure.
    let p1 = vec![
        archived("5", None, r#"{"n": 5}"#),
        archived("7", None, r#"{"n": 7}"#),
    ];
    let p2 = vec![archived("07", None, r#"{"n": 70}"#)];
    let outcome = replace_into(&db, "n", KeyType::Bigint, &[("p1", p1), ("p2", p2)]).await;
    assert_eq!(
        (outcome.rows_written, outcome.rows_skipped),
        (2, 1),
        "{outcome:?}"
    );
    assert!(outcome.failures.is_empty(), "{outcome:?}");
    let rows: Vec<(i64, String)> = db
        .client
        .query(r#"SELECT "Id", "Json"::text FROM n ORDER BY 1"#, &[])
        .await
        .expect("rows")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![(5, r#"{"n": 5}"#.into()), (7, r#"{"n": 7}"#.into())]
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'n'::regclass AND contype = 'p'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn prepare_target_creates_missing_koan_tables_only() {
    let db = TestDb::new().await;
    let source = db.source(4);
    for (table, key_type, key) in [
        ("texts", KeyType::Text, "k-1"),
        (
            "uuids",
            KeyType::Uuid,
            "6f1f5a2e-8d8e-4c4e-9a7e-0c1b2d3e4f50",
        ),
        ("bigints", KeyType::Bigint, "42"),
    ] {
        let mut entity = koan_entity(table);
        entity.schema = "restored-schema".into();
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
            assert_eq!(prepared.key_type, Some(key_type), "{table}");
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
        let qualified = format!("\"restored-schema\".{table}");
        assert_eq!(
            count(
                &db,
                &format!("SELECT count(*) FROM {qualified} WHERE rev = '3' AND tenant = 't1'")
            )
            .await,
            1
        );
    }
    let mut relational = koan_entity("people");
    relational.layout = Layout::Relational;
    relational.document = None;
    relational.key_type = Some(KeyType::Bigint);
    let error = source
        .prepare_target(&relational)
        .await
        .expect_err("relational");
    assert_eq!(error.code(), "missing_table");
    assert!(
        error
            .to_string()
            .contains("cannot create a relational table from an archive"),
        "{error}"
    );
}

#[tokio::test]
async fn relational_rows_round_trip() {
    let db = TestDb::new().await;
    db.exec(
        r#"CREATE TABLE people (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             name text NOT NULL,
             age int CHECK (age >= 0),
             tenant text NOT NULL,
             updated_at timestamptz,
             tags text[],
             extra jsonb,
             name_length int GENERATED ALWAYS AS (length(name)) STORED);
           INSERT INTO people (name, age, tenant, updated_at, tags, extra)
             SELECT 'p' || g, g, CASE WHEN g % 2 = 0 THEN 't1' ELSE 't2' END,
                    '2024-01-01'::timestamptz + g * interval '1 hour',
                    ARRAY['x', 'it''s ' || g], jsonb_build_object('g', g)
             FROM generate_series(1, 50) g;"#,
    )
    .await;
    let source = db.source(2);
    let mut entity = koan_entity("people");
    entity.layout = Layout::Relational;
    entity.document = None;
    entity.key = "id".into();
    entity.scope = Some("t1".into());
    entity.scope_match = ScopeMatch::Column("tenant".into());
    entity.version = Some(VersionSource::Column("updated_at".into()));
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let exported = export_all(&source, &entity, &KeyRange::default(), None, None)
        .await
        .expect("export");
    assert_eq!(exported.len(), 25);
    let snapshot = "SELECT jsonb_agg(to_jsonb(p.*) ORDER BY p.id)::text FROM people AS p";
    let before: String = db
        .client
        .query_one(snapshot, &[])
        .await
        .expect("snap")
        .get(0);

    db.exec(
        "DELETE FROM people WHERE id IN (2, 4);
         UPDATE people SET name = 'older', updated_at = '2000-01-01' WHERE id = 6;
         UPDATE people SET name = 'newer', updated_at = '2100-01-01' WHERE id = 8;",
    )
    .await;
    let rows: Vec<Archived> = exported
        .iter()
        .map(|(key, version, doc)| archived(key, version.as_deref(), doc))
        .collect();
    let outcome = import(
        &source,
        &entity,
        &restore_target(RestoreMode::Merge),
        "p",
        &rows,
    )
    .await
    .expect("merge");
    assert_eq!(
        (outcome.rows_written, outcome.rows_skipped),
        (3, 22),
        "{outcome:?}"
    );
    assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    assert_eq!(
        count(&db, "SELECT count(*) FROM people WHERE name = 'newer'").await,
        1
    );
    db.exec("UPDATE people SET name = 'p8', updated_at = '2024-01-01'::timestamptz + interval '8 hours' WHERE id = 8")
        .await;
    let after: String = db
        .client
        .query_one(snapshot, &[])
        .await
        .expect("snap")
        .get(0);
    assert_eq!(after, before, "the table equals the source again");

    // A row of the archive that breaks the check is isolated, the doc's other fields are typed.
    let mut bad = rows[0].clone();
    bad.doc = bad.doc.replace("\"age\": 2,", "\"age\": -5,");
    let mut wrong_type = rows[1].clone();
    wrong_type.doc = wrong_type.doc.replace("\"age\": 4,", "\"age\": \"four\",");
    let outcome = import(
        &source,
        &entity,
        &restore_target(RestoreMode::Overwrite),
        "p",
        &[bad, wrong_type],
    )
    .await
    .expect("overwrite");
    let codes: Vec<&str> = outcome.failures.iter().map(|f| f.code.as_str()).collect();
    assert_eq!(
        codes,
        vec!["constraint_violation", "type_mismatch"],
        "{:?}",
        outcome.failures
    );

    // A JSON-path version into the row works the same way: nothing is newer.
    let mut by_path = entity.clone();
    by_path.version = Some(VersionSource::JsonPath(vec!["updated_at".into()]));
    let outcome = import(
        &source,
        &by_path,
        &restore_target(RestoreMode::Merge),
        "p",
        &rows,
    )
    .await
    .expect("merge by path");
    assert_eq!((outcome.rows_written, outcome.rows_skipped), (0, 25));

    // Replace: the scope's rows are exactly the archive's, the other scope's untouched.
    db.exec("DELETE FROM people WHERE id = 10; UPDATE people SET name = 'changed' WHERE id IN (12, 13);")
        .await;
    let staging = source
        .create_staging(&entity, uuid::Uuid::new_v4())
        .await
        .expect("staging");
    let mut target = restore_target(RestoreMode::Replace);
    target.staging_table = Some(staging);
    let staged = import(&source, &entity, &target, "p", &rows)
        .await
        .expect("stage");
    assert_eq!(staged.rows_written, 25);
    let applied = source.apply_staged(&entity, &target).await.expect("apply");
    assert_eq!(
        (applied.rows_written, applied.rows_removed),
        (25, 24),
        "{applied:?}"
    );
    assert!(applied.failures.is_empty(), "{:?}", applied.failures);
    assert_eq!(
        count(&db, "SELECT count(*) FROM people WHERE name = 'changed'").await,
        1
    );
    db.exec("UPDATE people SET name = 'p13' WHERE id = 13")
        .await;
    let after: String = db
        .client
        .query_one(snapshot, &[])
        .await
        .expect("snap")
        .get(0);
    assert_eq!(after, before);
}

#[tokio::test]
async fn aborted_or_dropped_imports_write_nothing() {
    let db = TestDb::new().await;
    db.exec(r#"CREATE TABLE ab ("Id" bigint PRIMARY KEY, "Json" jsonb NOT NULL);"#)
        .await;
    // One connection: each import must give it back cleanly for the next to start.
    let source = db.source(1);
    let entity = source
        .prepare_target(&koan_entity("ab"))
        .await
        .expect("prepare");
    let target = restore_target(RestoreMode::Overwrite);
    let rows: Vec<Archived> = (1..=20_000)
        .map(|key| archived(key, None, &format!(r#"{{"pad": "{}"}}"#, "x".repeat(200))))
        .collect();

    let mut session = source
        .begin_import(&entity, &target, StagingForm::Typed)
        .await
        .expect("begin");
    push_all(&mut session, "p", &rows).await.expect("push");
    assert_eq!(session.rows_staged(), 20_000);
    session.abort().await;
    assert_eq!(count(&db, "SELECT count(*) FROM ab").await, 0);

    let mut session = source
        .begin_import(&entity, &target, StagingForm::Typed)
        .await
        .expect("begin");
    push_all(&mut session, "p", &rows[..100])
        .await
        .expect("push");
    drop(session);
    assert_eq!(count(&db, "SELECT count(*) FROM ab").await, 0);

    let outcome = import(&source, &entity, &target, "p", &rows[..10])
        .await
        .expect("after");
    assert_eq!(outcome.rows_written, 10, "the pool still works");
}

#[tokio::test]
async fn a_large_import_is_set_based() {
    let db = TestDb::new().await;
    db.exec(r#"CREATE TABLE big ("Id" text PRIMARY KEY, "Json" jsonb NOT NULL);"#)
        .await;
    let source = db.source(2);
    let mut entity = koan_entity("big");
    entity.version = Some(VersionSource::JsonPath(vec!["v".into()]));
    entity.scope = Some("t".into());
    let entity = source.prepare_target(&entity).await.expect("prepare");
    let pad = "y".repeat(240);
    let rows: Vec<Archived> = (0..200_000)
        .map(|i| {
            let doc = format!(r#"{{"v": 1, "i": {i}, "pad": "{pad}", "__koan_tenant": "t"}}"#);
            archived(format!("key-{i:07}"), Some("1"), &doc)
        })
        .collect();
    for (mode, written) in [(RestoreMode::Merge, 200_000), (RestoreMode::Merge, 0)] {
        let started = Instant::now();
        let outcome = import(&source, &entity, &restore_target(mode), "big", &rows)
            .await
            .expect("import");
        eprintln!("200k rows, {mode:?}: {:?}", started.elapsed());
        assert_eq!(outcome.rows_written, written);
        assert_eq!(outcome.rows_written + outcome.rows_skipped, 200_000);
    }
    assert_eq!(count(&db, "SELECT count(*) FROM big").await, 200_000);
}
