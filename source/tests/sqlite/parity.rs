//! [`Source`] over both backends: the same calls dispatch to PostgreSQL (a
//! database of the test's own, dropped at the end) and to SQLite, and give the
//! same results: every restore mode, with and without a target scope, by
//! version path and version column, bad rows and all; exports and plans too.

use std::collections::BTreeMap;

use koan_protocol::commands::RestoreMode;
use koan_protocol::jobs::RestoreTarget;
use koan_protocol::plan::{Consistency, EntitySpec, VersionSource};
use koan_source::{Backend, ImportOutcome, Source, SourceError, StagingForm};
use serde_json::Value;

use crate::pg_support::TestDb;
use crate::support::{Archived, TestFile, archived, koan_entity, range, restore_target};

/// The same database twice: PostgreSQL and SQLite, both behind [`Source`].
struct Pair {
    db: TestDb,
    file: TestFile,
    pg: Source,
    lite: Source,
}

impl Pair {
    async fn new() -> Self {
        let db = TestDb::new().await;
        let file = TestFile::new();
        let pg = Source::from_url(&db.url, 3).expect("pg source");
        let lite = Source::from_url(&file.url, 3).expect("sqlite source");
        assert_eq!(
            (pg.backend(), lite.backend()),
            (Backend::Postgres, Backend::Sqlite)
        );
        Self { db, file, pg, lite }
    }

    async fn exec(&self, pg_sql: &str, sqlite_sql: &str) {
        self.db.exec(pg_sql).await;
        self.file.exec(sqlite_sql);
    }

    /// Key → (document, version column as text), documents parsed so spacing does not matter.
    async fn rows(&self, table: &str) -> [BTreeMap<String, (Value, Option<String>)>; 2] {
        let parse = |doc: &str| serde_json::from_str::<Value>(doc).expect("json");
        let pg = self
            .db
            .client
            .query(
                &format!("SELECT \"Id\"::text, \"Json\"::text, rev::text FROM {table}"),
                &[],
            )
            .await
            .expect("pg rows")
            .iter()
            .map(|row| (row.get(0), (parse(row.get(1)), row.get(2))))
            .collect();
        let connection = self.file.connect();
        let mut statement = connection
            .prepare(&format!(
                "SELECT CAST(\"Id\" AS TEXT), \"Json\", CAST(rev AS TEXT) FROM {table}"
            ))
            .expect("prepare");
        let lite = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get(2)?,
                ))
            })
            .expect("sqlite rows")
            .map(|row| {
                let (key, doc, rev) = row.expect("row");
                (key, (parse(&doc), rev))
            })
            .collect();
        [pg, lite]
    }
}

/// `(written, skipped, [(line, key, code)])` of an import.
type Summary = (u64, u64, Vec<(Option<u64>, Option<String>, String)>);

fn summary(outcome: &ImportOutcome) -> Summary {
    (
        outcome.rows_written,
        outcome.rows_skipped,
        outcome
            .failures
            .iter()
            .map(|failure| (failure.line_no, failure.key.clone(), failure.code.clone()))
            .collect(),
    )
}

async fn import_via(
    source: &Source,
    entity: &EntitySpec,
    target: &RestoreTarget,
    part: &str,
    rows: &[Archived],
    first_line: u64,
) -> Result<ImportOutcome, SourceError> {
    let mut session = source
        .begin_import(entity, target, StagingForm::Typed)
        .await?;
    for (index, row) in rows.iter().enumerate() {
        let raw = row.raw();
        if let Err(error) = session
            .push(&row.line(first_line + index as u64, part, &raw))
            .await
        {
            session.abort().await;
            return Err(error);
        }
    }
    session.commit().await
}

fn scoped(tenant: &str, n: i64, version: Option<i64>) -> String {
    match version {
        Some(v) => format!(r#"{{"n": {n}, "__koan_tenant": "{tenant}", "meta": {{"v": {v}}}}}"#),
        None => format!(r#"{{"n": {n}, "__koan_tenant": "{tenant}"}}"#),
    }
}

/// The archive: versions older, newer and equal, other scopes, new keys, a
/// key twice around a bad row, and every kind of bad row.
fn archive() -> Vec<Archived> {
    let v = |n: i64| Some(n.to_string());
    let line =
        |key: &str, version: Option<String>, doc: String| archived(key, version.as_deref(), &doc);
    vec![
        line("a1", v(3), scoped("tenant-a", 10, Some(3))),
        line("a2", v(3), scoped("tenant-a", 10, Some(3))),
        line("a3", v(3), scoped("tenant-a", 10, Some(3))),
        line("b1", v(3), scoped("tenant-a", 10, Some(3))),
        line("n1", v(3), scoped("tenant-a", 10, Some(3))),
        line("c1", v(3), scoped("tenant-a", 10, Some(3))),
        line("c2", Some("null".into()), scoped("tenant-a", 10, None)),
        line("dup", v(1), scoped("tenant-a", 11, Some(1))),
        line("c3", v(3), r#"{"n": "#.into()),
        line("c4", Some("{bad".into()), scoped("tenant-a", 10, Some(3))),
        line("c5", v(3), scoped("tenant-a", 5000, Some(3))),
        line("c6", v(3), "[1, 2]".into()),
        line("dup", v(2), scoped("tenant-a", 13, Some(2))),
        line("c7", v(4), scoped("tenant-a", 12, Some(4))),
    ]
}

const SEED_PG: &str = r#"('a1', '{"n": 1, "__koan_tenant": "tenant-a", "meta": {"v": 1}}', 1),
    ('a2', '{"n": 1, "__koan_tenant": "tenant-a", "meta": {"v": 5}}', 5),
    ('a3', '{"n": 1, "__koan_tenant": "tenant-a"}', NULL),
    ('a9', '{"n": 1, "__koan_tenant": "tenant-a"}', 1),
    ('b1', '{"n": 1, "__koan_tenant": "tenant-b", "meta": {"v": 1}}', 1),
    ('b9', '{"n": 1, "__koan_tenant": "tenant-b"}', 1),
    ('n1', '{"n": 1}', 1)"#;

#[tokio::test]
async fn every_mode_gives_the_same_results_on_both_backends() {
    let pair = Pair::new().await;
    let rows = archive();
    let entities: [(&str, Option<&str>, VersionSource); 3] = [
        (
            "path",
            Some("tenant-a"),
            VersionSource::JsonPath(vec!["meta".into(), "v".into()]),
        ),
        (
            "column",
            Some("tenant-a"),
            VersionSource::Column("rev".into()),
        ),
        ("unscoped", None, VersionSource::Column("rev".into())),
    ];
    let modes = [
        RestoreMode::Merge,
        RestoreMode::Overwrite,
        RestoreMode::SkipExisting,
        RestoreMode::Replace,
    ];
    let mut case = 0;
    for (label, scope, version) in &entities {
        for mode in modes {
            for target_scope in [None, Some("tenant-b")] {
                case += 1;
                let table = format!("c{case}");
                let what = format!(
                    "{table}: {label}, {}, target scope {target_scope:?}",
                    mode.as_str()
                );
                pair.exec(
                    &format!(
                        "CREATE TABLE {table} (\"Id\" text PRIMARY KEY, \"Json\" jsonb NOT NULL, rev bigint, \
                         CONSTRAINT {table}_small CHECK ((\"Json\"->>'n')::numeric < 1000)); \
                         INSERT INTO {table} VALUES {SEED_PG};"
                    ),
                    &format!(
                        "CREATE TABLE {table} (\"Id\" TEXT PRIMARY KEY, \"Json\" TEXT NOT NULL, rev INTEGER, \
                         CONSTRAINT {table}_small CHECK ((\"Json\" ->> '$.n') < 1000)); \
                         INSERT INTO {table} VALUES {SEED_PG};"
                    ),
                )
                .await;
                let mut entity = koan_entity(&table);
                entity.scope = scope.map(str::to_string);
                entity.version = Some(version.clone());
                let mut target = restore_target(mode);
                target.target_scope = target_scope.map(str::to_string);

                let mut results = Vec::new();
                for source in [&pair.pg, &pair.lite] {
                    let entity = source.prepare_target(&entity).await.expect("prepare");
                    let mut outcomes = Vec::new();
                    if mode == RestoreMode::Replace {
                        let mut target = target.clone();
                        let staging = source
                            .create_staging(&entity, uuid::Uuid::from_u128(case))
                            .await
                            .expect("staging");
                        target.staging_table = Some(staging);
                        // PostgreSQL stages rows as text and judges them when
                        // applying; SQLite judges them when staging. What the
                        // restore as a whole reports is the same.
                        let mut skipped = 0;
                        let mut codes = Vec::new();
                        for (part, lines, first) in [("p1", &rows[..7], 1), ("p2", &rows[7..], 8)] {
                            let outcome = import_via(source, &entity, &target, part, lines, first)
                                .await
                                .expect("stage");
                            let (_, part_skipped, part_codes) = summary(&outcome);
                            skipped += part_skipped;
                            codes.extend(part_codes);
                        }
                        let applied = source.apply_staged(&entity, &target).await.expect("apply");
                        skipped += applied.rows_skipped;
                        codes.extend(
                            applied
                                .failures
                                .iter()
                                .map(|f| (f.line_no, f.key.clone(), f.code.clone())),
                        );
                        codes.sort();
                        outcomes.push((applied.rows_written, applied.rows_removed, codes));
                        outcomes.push((skipped, 0, Vec::new()));
                    } else {
                        let outcome = import_via(source, &entity, &target, "p1", &rows, 1)
                            .await
                            .expect("import");
                        outcomes.push(summary(&outcome));
                        // Idempotent on both.
                        let again = import_via(source, &entity, &target, "p1", &rows, 1)
                            .await
                            .expect("again");
                        outcomes.push(summary(&again));
                    }
                    results.push(outcomes);
                }
                assert_eq!(
                    results[0], results[1],
                    "{what}: outcomes (postgres, sqlite)"
                );
                assert!(
                    results[0].iter().any(|outcome| outcome
                        .2
                        .iter()
                        .any(|failure| failure.2 == "invalid_document")),
                    "{what}: the bad rows were exercised: {:?}",
                    results[0]
                );
                let [pg_rows, lite_rows] = pair.rows(&table).await;
                assert_eq!(pg_rows, lite_rows, "{what}: rows (postgres, sqlite)");
            }
        }
    }
    assert_eq!(case, 24);
}

#[tokio::test]
async fn exports_and_plans_agree_and_only_postgres_shares_snapshots() {
    let pair = Pair::new().await;
    let mut seed = String::new();
    for i in 0..250 {
        let tenant = if i % 5 == 0 { "tenant-b" } else { "tenant-a" };
        seed.push_str(&format!(
            "{}('k{i:03}', '{{\"i\": {i}, \"__koan_tenant\": \"{tenant}\", \"meta\": {{\"v\": {}}}}}', {})",
            if i == 0 { "" } else { ", " },
            i * 2,
            i % 7
        ));
    }
    pair.exec(
        &format!("CREATE TABLE e (\"Id\" text PRIMARY KEY, \"Json\" jsonb NOT NULL, rev bigint); INSERT INTO e VALUES {seed};"),
        &format!("CREATE TABLE e (\"Id\" TEXT PRIMARY KEY, \"Json\" TEXT NOT NULL, rev INTEGER); INSERT INTO e VALUES {seed};"),
    )
    .await;
    let mut entity = koan_entity("e");
    entity.scope = Some("tenant-a".into());
    entity.chunk_rows = 30;
    for version in [
        VersionSource::JsonPath(vec!["meta".into(), "v".into()]),
        VersionSource::Column("rev".into()),
    ] {
        entity.version = Some(version);
        let mut exported = Vec::new();
        let mut plans = Vec::new();
        for source in [&pair.pg, &pair.lite] {
            let resolved = source.inspect(&entity).await.expect("inspect");
            let plan = source.plan_ranges(&resolved).await.expect("plan");
            let mut rows = Vec::new();
            for key_range in &plan.ranges {
                let mut stream = source
                    .export(&resolved, key_range, None, None)
                    .await
                    .expect("export");
                while let Some(row) = stream.next().await.expect("row") {
                    let json = |bytes: &[u8]| serde_json::from_slice::<Value>(bytes).expect("json");
                    rows.push((
                        row.key_str().expect("key").to_string(),
                        row.version.as_deref().map(json),
                        json(&row.doc),
                    ));
                }
                assert_eq!(stream.rows(), stream.rows());
            }
            plans.push(plan);
            exported.push(rows);
        }
        assert_eq!(plans[0], plans[1], "the same boundaries");
        assert_eq!(plans[0].rows_total, 200);
        assert_eq!(
            exported[0], exported[1],
            "the same rows, versions and documents"
        );

        // Continuation after a key agrees too.
        let tail = range(Some("k100"), Some("k200"));
        let mut tails = Vec::new();
        for source in [&pair.pg, &pair.lite] {
            let resolved = source.inspect(&entity).await.expect("inspect");
            let mut stream = source
                .export(&resolved, &tail, Some("k150"), None)
                .await
                .expect("tail");
            let mut keys = Vec::new();
            while let Some(row) = stream.next().await.expect("row") {
                keys.push(row.key_str().expect("key").to_string());
            }
            tails.push(keys);
        }
        assert_eq!(tails[0], tails[1]);
        assert_eq!(tails[0].first().map(String::as_str), Some("k151"));
    }

    // Snapshot consistency: PostgreSQL honours it, SQLite refuses it clearly.
    pair.pg
        .capabilities()
        .check(Consistency::Snapshot)
        .expect("pg snapshot");
    let holder = pair.pg.open_snapshot().await.expect("holder");
    let resolved = pair.pg.inspect(&entity).await.expect("inspect");
    let mut stream = pair
        .pg
        .export(
            &resolved,
            &Default::default(),
            None,
            Some(holder.snapshot_id()),
        )
        .await
        .expect("export in the snapshot");
    assert!(stream.next().await.expect("row").is_some());
    drop(stream);
    holder.release().await;
    let error = pair
        .lite
        .capabilities()
        .check(Consistency::Snapshot)
        .expect_err("sqlite");
    assert_eq!(error.code(), "unsupported");
    let error = pair.lite.open_snapshot().await.expect_err("sqlite holder");
    assert_eq!(error.code(), "unsupported");
    assert_eq!(pair.lite.pool_status().max_size, 3);
    assert!(
        pair.pg.target().contains("127.0.0.1"),
        "{}",
        pair.pg.target()
    );
    assert_eq!(pair.lite.target(), pair.file.path.display().to_string());
}
